//! A simulated fleet: many real driver clients (QUIC connections through the
//! SDK) in one process, each moving and reporting at a fixed rate.

use std::{
    net::SocketAddr,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use hexfleet_client::{Connector, DriverStats, FixInput, RiderStats};
use hexfleet_model::{VehicleClass, VehicleId, VehicleStatus};
use hexfleet_protocol::{Claims, DriverReport, RejectReason, Role};
use parking_lot::Mutex;
use rand::{rngs::StdRng, Rng, SeedableRng};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

use crate::{
    latency::LatencyBook,
    movement::{BBox, Mover},
    riders::{self, RiderPlan},
};

#[derive(Debug, Clone)]
pub struct FleetOptions {
    pub node: SocketAddr,
    pub drivers: usize,
    /// Fixes per driver per second.
    pub rate_hz: f64,
    pub bbox: BBox,
    /// Driver ids are `<prefix>-<n>`.
    pub id_prefix: String,
    pub token_secret: String,
    /// Connections in handshake at once, to ramp up without a TLS storm.
    pub connect_concurrency: usize,
    /// Sign off at the end (the node removes the vehicles at once) rather
    /// than just disconnect (they stay until they go stale).
    pub goodbye: bool,
    pub seed: u64,
    /// Simulated riders, and the radius they watch.
    pub riders: usize,
    pub rider_radius_m: f64,
}

/// Live counters, read while the fleet runs and for the summary.
#[derive(Default)]
pub struct FleetStats {
    pub connected: AtomicU64,
    pub riders_connected: AtomicU64,
    pub connect_errors: AtomicU64,
    pub sent: AtomicU64,
    pub send_errors: AtomicU64,
    pub disconnected: AtomicU64,
    connect_ms: Mutex<Vec<f64>>,
    last_error: Mutex<Option<String>>,
}

/// What the node said about the fleet's fixes, and what riders received,
/// gathered at the end.
#[derive(Debug, Default, Clone)]
pub struct Outcome {
    pub accepted: u64,
    pub rejected: u64,
    pub rejected_by_reason: Vec<(RejectReason, u64)>,
    pub riders: RiderStats,
}

impl FleetStats {
    pub fn error(&self, e: impl std::fmt::Display) {
        *self.last_error.lock() = Some(e.to_string());
    }

    pub fn last_error(&self) -> Option<String> {
        self.last_error.lock().clone()
    }

    /// Connect latency percentiles in ms (p50, p99, max).
    pub fn connect_percentiles(&self) -> Option<(f64, f64, f64)> {
        let mut v = self.connect_ms.lock().clone();
        if v.is_empty() {
            return None;
        }
        v.sort_by(f64::total_cmp);
        let at = |q: f64| v[((v.len() - 1) as f64 * q).round() as usize];
        Some((at(0.5), at(0.99), v[v.len() - 1]))
    }
}

pub fn driver_token(secret: &str, id: &str) -> Result<String, hexfleet_model::InvalidVehicleId> {
    let expires = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
        + 24 * 3600;
    Ok(Claims::new(Role::Driver, VehicleId::new(id)?, expires).mint(secret.as_bytes()))
}

/// What every simulated client shares: counters, the latency book, the
/// handshake gate and the stop signal.
#[derive(Clone)]
pub struct Crew {
    pub stats: Arc<FleetStats>,
    pub book: Arc<LatencyBook>,
    pub gate: Arc<Semaphore>,
    pub stop: CancellationToken,
}

/// Drivers per client endpoint (UDP socket); spreading them over several
/// sockets spreads them over the node's endpoints too.
const DRIVERS_PER_CONNECTOR: usize = 250;

/// Runs the fleet until `stop`, then collects the node's verdicts.
pub async fn run(
    options: FleetOptions,
    connect: impl Fn() -> Result<Connector, hexfleet_client::ClientError>,
    stats: Arc<FleetStats>,
    book: Arc<LatencyBook>,
    stop: CancellationToken,
) -> anyhow::Result<Outcome> {
    let clients = options.drivers + options.riders;
    let connectors = (0..clients.div_ceil(DRIVERS_PER_CONNECTOR).max(1))
        .map(|_| connect())
        .collect::<Result<Vec<_>, _>>()?;
    let crew = Crew {
        stats,
        book,
        gate: Arc::new(Semaphore::new(options.connect_concurrency.max(1))),
        stop,
    };
    let period = Duration::from_secs_f64(1.0 / options.rate_hz);
    let mut tasks = tokio::task::JoinSet::new();
    for n in 0..options.drivers {
        let connector = connectors[n / DRIVERS_PER_CONNECTOR].clone();
        let (options, crew) = (options.clone(), crew.clone());
        tasks.spawn(async move { drive(n, connector, options, period, crew).await });
    }
    let plan = Arc::new(RiderPlan {
        node: options.node,
        riders: options.riders,
        radius_m: options.rider_radius_m,
        walking_share: 0.2,
        bbox: options.bbox,
        token_secret: options.token_secret.clone(),
        seed: options.seed,
    });
    let mut rider_tasks = tokio::task::JoinSet::new();
    for n in 0..plan.riders {
        let connector = connectors[(options.drivers + n) / DRIVERS_PER_CONNECTOR].clone();
        rider_tasks.spawn(riders::ride(n, plan.clone(), connector, crew.clone()));
    }
    let mut outcome = Outcome::default();
    let mut by_reason = std::collections::HashMap::<RejectReason, u64>::new();
    while let Some(done) = tasks.join_next().await {
        if let Ok(Some((s, first_seq))) = done {
            let acked = s.acked_seq.saturating_sub(first_seq.saturating_sub(1));
            let rejected_up_to_ack = s
                .rejections
                .iter()
                .filter(|(seq, _)| *seq <= s.acked_seq)
                .count() as u64;
            outcome.accepted += acked.saturating_sub(rejected_up_to_ack);
            outcome.rejected += s.rejected_total;
            for (_, reason) in s.rejections {
                *by_reason.entry(reason).or_default() += 1;
            }
        }
    }
    while let Some(done) = rider_tasks.join_next().await {
        if let Ok(Some(r)) = done {
            let total = &mut outcome.riders;
            total.frames += r.frames;
            total.bytes += r.bytes;
            total.added += r.added;
            total.moved += r.moved;
            total.removed += r.removed;
            total.snapshots += r.snapshots;
            total.reconnects += r.reconnects;
        }
    }
    outcome.rejected_by_reason = by_reason.into_iter().collect();
    outcome.rejected_by_reason.sort_by_key(|(r, _)| r.as_str());
    Ok(outcome)
}

/// One driver: connect, then move and report every `period` until `stop`,
/// then sign off. Returns what the node acknowledged, and the first sequence
/// this connection used.
async fn drive(
    n: usize,
    connector: Connector,
    options: FleetOptions,
    period: Duration,
    crew: Crew,
) -> Option<(DriverStats, u64)> {
    let Crew {
        stats,
        book,
        gate,
        stop,
    } = crew;
    let mut rng =
        StdRng::seed_from_u64(options.seed ^ (n as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15));
    let id = format!("{}-{n}", options.id_prefix);
    let (vehicle, token) = match driver_token(&options.token_secret, &id)
        .and_then(|t| Ok((VehicleId::new(&id)?, t)))
    {
        Ok(pair) => pair,
        Err(e) => {
            stats.error(format!("{id}: {e}"));
            stats.connect_errors.fetch_add(1, Ordering::Relaxed);
            return None;
        }
    };
    let report = DriverReport {
        class: VehicleClass::ALL[n % VehicleClass::ALL.len()],
        status: if n.is_multiple_of(5) {
            VehicleStatus::OnTrip
        } else {
            VehicleStatus::Available
        },
    };
    let (connected, handshake) = {
        let _permit = tokio::select! {
            permit = gate.acquire() => permit.ok()?,
            _ = stop.cancelled() => return None,
        };
        let started = Instant::now();
        (
            connector.driver(options.node, &token, report).await,
            started.elapsed(),
        )
    };
    let mut client = match connected {
        Ok(c) => c,
        Err(e) => {
            stats.error(format!("{id}: {e}"));
            stats.connect_errors.fetch_add(1, Ordering::Relaxed);
            return None;
        }
    };
    stats.connect_ms.lock().push(handshake.as_secs_f64() * 1e3);
    stats.connected.fetch_add(1, Ordering::Relaxed);

    let mut mover = Mover::new(options.bbox, &mut rng);
    // Spread the fleet's fixes evenly over each period.
    let phase = period.mul_f64(rng.random::<f64>());
    let mut ticker = tokio::time::interval_at(tokio::time::Instant::now() + phase, period);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    let mut last = Instant::now();
    loop {
        tokio::select! {
            _ = ticker.tick() => {}
            _ = stop.cancelled() => break,
        }
        let now = Instant::now();
        mover.step(now.duration_since(last).as_secs_f64(), &mut rng);
        last = now;
        let fix = FixInput {
            lat: mover.lat,
            lon: mover.lon,
            heading_deg: mover.heading_deg as f32,
            speed_mps: mover.speed_mps as f32,
            accuracy_m: 5.0,
            fix_time_ms: None,
        };
        book.sent(&vehicle, fix.lat, fix.lon);
        match client.send_fix(fix).await {
            Ok(_) => {
                stats.sent.fetch_add(1, Ordering::Relaxed);
            }
            Err(e) => {
                stats.error(format!("{id}: {e}"));
                stats.send_errors.fetch_add(1, Ordering::Relaxed);
                stats.disconnected.fetch_add(1, Ordering::Relaxed);
                return None;
            }
        }
    }
    // Let the last acknowledgements arrive.
    let target = client.next_seq().saturating_sub(1);
    let deadline = Instant::now() + Duration::from_secs(2);
    while client.acked_seq() < target && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let acknowledged = (client.stats(), client.first_seq());
    if options.goodbye {
        let _ = client.goodbye().await;
    } else {
        client.abandon();
    }
    Some(acknowledged)
}
