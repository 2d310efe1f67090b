//! Simulated riders: real rider clients spread over the city, some walking
//! and re-subscribing as they go, all feeding the latency book.

use std::{
    net::SocketAddr,
    sync::{atomic::Ordering, Arc},
    time::Duration,
};

use hexfleet_client::{Applied, Connector, RiderOptions, RiderStats, Subscription};
use hexfleet_model::VehicleId;
use hexfleet_protocol::{Claims, Role};
use rand::{rngs::StdRng, Rng, SeedableRng};

use crate::{fleet::Crew, movement::BBox};

#[derive(Debug, Clone)]
pub struct RiderPlan {
    pub node: SocketAddr,
    pub riders: usize,
    pub radius_m: f64,
    /// Share of riders who walk and re-subscribe every few seconds.
    pub walking_share: f64,
    pub bbox: BBox,
    pub token_secret: String,
    pub seed: u64,
}

const WALK_MPS: f64 = 1.4;
const RESUBSCRIBE_EVERY: Duration = Duration::from_secs(5);
const METRES_PER_DEGREE: f64 = 111_320.0;

pub fn rider_token(secret: &str, id: &str) -> Result<String, hexfleet_model::InvalidVehicleId> {
    let expires = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
        + 24 * 3600;
    Ok(Claims::new(Role::Rider, VehicleId::new(id)?, expires).mint(secret.as_bytes()))
}

/// One rider until `stop`; returns what it received.
pub async fn ride(
    n: usize,
    plan: Arc<RiderPlan>,
    connector: Connector,
    crew: Crew,
) -> Option<RiderStats> {
    let Crew {
        stats,
        book,
        gate,
        stop,
    } = crew;
    let mut rng =
        StdRng::seed_from_u64(plan.seed ^ 0x5eed ^ (n as u64).wrapping_mul(0x2545_f491_4f6c_dd1d));
    let id = format!("rider-{n}");
    let token = match rider_token(&plan.token_secret, &id) {
        Ok(t) => t,
        Err(e) => {
            stats.error(format!("{id}: {e}"));
            return None;
        }
    };
    let observer = {
        let book = book.clone();
        Arc::new(move |state: &hexfleet_model::VehicleState, how: Applied| {
            // A vehicle added by a (re)subscription shows an older fix; only
            // moves are deliveries of the fix just sent.
            if how == Applied::Moved {
                book.applied(state);
            }
        })
    };
    let options = RiderOptions {
        reconnect: true,
        observer: Some(observer),
    };
    let client = {
        let _permit = tokio::select! {
            permit = gate.acquire() => permit.ok()?,
            _ = stop.cancelled() => return None,
        };
        connector.rider(plan.node, &token, options).await
    };
    let client = match client {
        Ok(c) => c,
        Err(e) => {
            stats.error(format!("{id}: {e}"));
            stats.connect_errors.fetch_add(1, Ordering::Relaxed);
            return None;
        }
    };
    stats.riders_connected.fetch_add(1, Ordering::Relaxed);
    let (mut lat, mut lon) = plan.bbox.random_point(&mut rng);
    client.subscribe(Subscription::around(lat, lon, plan.radius_m));
    let walking = rng.random_bool(plan.walking_share.clamp(0.0, 1.0));
    let bearing = rng.random_range(0.0..std::f64::consts::TAU);
    let mut ticker = tokio::time::interval_at(
        tokio::time::Instant::now() + RESUBSCRIBE_EVERY,
        RESUBSCRIBE_EVERY,
    );
    loop {
        tokio::select! {
            _ = ticker.tick(), if walking => {
                let step = WALK_MPS * RESUBSCRIBE_EVERY.as_secs_f64();
                lat += step * bearing.cos() / METRES_PER_DEGREE;
                lon += step * bearing.sin() / (METRES_PER_DEGREE * lat.to_radians().cos());
                client.subscribe(Subscription::around(lat, lon, plan.radius_m));
            }
            _ = stop.cancelled() => break,
        }
    }
    let received = client.stats();
    client.close().await;
    Some(received)
}
