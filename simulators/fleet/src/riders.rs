//! Simulated riders: real rider clients spread over the city (or around a
//! shard boundary), some walking and re-subscribing as they go, leaving and
//! being replaced, all feeding the latency book.

use std::{
    sync::{atomic::Ordering, Arc},
    time::Duration,
};

use geo::Destination as _;
use hexfleet_client::{Applied, Connector, RiderOptions, RiderStats, Subscription};
use hexfleet_protocol::Role;
use rand::{rngs::StdRng, Rng, SeedableRng};

use crate::{
    fleet::{gated, token, Crew, Target},
    movement::BBox,
    scenario::Scenario,
};

const WALK_MPS: f64 = 1.4;
const RESUBSCRIBE_EVERY: Duration = Duration::from_secs(5);
const METRES_PER_DEGREE: f64 = 111_320.0;

/// What every rider of a run shares.
pub struct Plan {
    target: Target,
    id_prefix: String,
    radius_m: f64,
    walking_share: f64,
    lifetime: Option<Duration>,
    /// Where riders appear: the city, or a small box around a shard boundary.
    area: BBox,
    seed: u64,
}

impl Plan {
    pub fn new(scenario: &Scenario, target: &Target, id_prefix: &str) -> Self {
        let r = &scenario.riders;
        let area = match r.at_shard_boundary_m {
            Some(m) => around(shard_boundary_point(scenario.bbox()), m),
            None => scenario.bbox(),
        };
        Self {
            target: target.clone(),
            id_prefix: id_prefix.to_string(),
            radius_m: r.radius_m,
            walking_share: r.walking_share,
            lifetime: r.lifetime,
            area,
            seed: scenario.seed,
        }
    }
}

/// A vertex of the boundary of the shard (resolution 5) at the city centre:
/// three shards meet there.
fn shard_boundary_point(bbox: BBox) -> (f64, f64) {
    let (lat, lon) = bbox.center();
    h3o::LatLng::new(lat, lon)
        .ok()
        .and_then(|ll| {
            ll.to_cell(h3o::Resolution::Five)
                .boundary()
                .iter()
                .next()
                .copied()
        })
        .map_or((lat, lon), |v| (v.lat(), v.lng()))
}

fn around((lat, lon): (f64, f64), metres: f64) -> BBox {
    let dlat = metres / METRES_PER_DEGREE;
    let dlon = metres / (METRES_PER_DEGREE * lat.to_radians().cos().max(0.01));
    BBox {
        min_lat: lat - dlat,
        min_lon: lon - dlon,
        max_lat: lat + dlat,
        max_lon: lon + dlon,
    }
}

/// One rider slot until `stop`: a rider connects, watches, maybe walks, and
/// after its lifetime leaves for a new one. Returns what they received.
pub async fn ride(
    n: usize,
    plan: Arc<Plan>,
    connector: Connector,
    crew: Crew,
) -> Option<RiderStats> {
    let mut rng =
        StdRng::seed_from_u64(plan.seed ^ 0x5eed ^ (n as u64).wrapping_mul(0x2545_f491_4f6c_dd1d));
    let mut total = RiderStats::default();
    let mut generation = 0;
    let mut storm = crew.storm.clone();
    while !crew.stop.is_cancelled() {
        let id = format!("{}-rider-{n}-{generation}", plan.id_prefix);
        generation += 1;
        let token = match token(&plan.target.token_secret, Role::Rider, &id) {
            Ok(t) => t,
            Err(e) => {
                crew.stats.error(format!("{id}: {e}"));
                return None;
            }
        };
        let observer = {
            let book = crew.book.clone();
            Arc::new(move |state: &hexfleet_model::VehicleState, how: Applied| {
                // A vehicle added by a (re)subscription shows an older fix;
                // only moves are deliveries of the fix just sent.
                if how == Applied::Moved {
                    book.applied(state);
                }
            })
        };
        let options = RiderOptions {
            reconnect: true,
            observer: Some(observer),
            seeds: plan.target.seeds.clone(),
        };
        let client = gated(&crew, &id, || {
            connector.rider(plan.target.node_for(n), &token, options)
        })
        .await?;
        crew.stats.riders_connected.fetch_add(1, Ordering::Relaxed);
        let (mut lat, mut lon) = plan.area.random_point(&mut rng);
        client.subscribe(Subscription::around(lat, lon, plan.radius_m));
        let walking = rng.random_bool(plan.walking_share.clamp(0.0, 1.0));
        let bearing = rng.random_range(0.0..std::f64::consts::TAU);
        let leave = plan
            .lifetime
            .map(|l| tokio::time::Instant::now() + l.mul_f64(rng.random_range(0.5..1.5)));
        let mut walk = tokio::time::interval_at(
            tokio::time::Instant::now() + RESUBSCRIBE_EVERY,
            RESUBSCRIBE_EVERY,
        );
        loop {
            tokio::select! {
                _ = walk.tick(), if walking => {
                    let step = WALK_MPS * RESUBSCRIBE_EVERY.as_secs_f64();
                    let to = geo::Haversine.destination(geo::Point::new(lon, lat), bearing.to_degrees(), step);
                    (lat, lon) = (to.y(), to.x());
                    client.subscribe(Subscription::around(lat, lon, plan.radius_m));
                }
                changed = storm.changed() => {
                    if changed.is_ok() {
                        client.drop_connection();
                    }
                }
                _ = async { if let Some(at) = leave { tokio::time::sleep_until(at).await } else { std::future::pending().await } } => break,
                _ = crew.stop.cancelled() => break,
            }
        }
        total += &client.stats();
        client.close().await;
    }
    Some(total)
}
