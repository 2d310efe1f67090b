//! A simulated fleet: many real driver and rider clients (QUIC connections
//! through the SDK) in one process, playing a [`Scenario`].

use std::{
    collections::HashMap,
    net::SocketAddr,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use hexfleet_client::{Connector, DriverClient, DriverOptions, DriverStats, RiderStats};
use hexfleet_model::{VehicleClass, VehicleId, VehicleStatus};
use hexfleet_protocol::{Claims, DriverReport, Fix, RejectReason, Role};
use parking_lot::Mutex;
use rand::{rngs::StdRng, Rng, SeedableRng};
use tokio::sync::{watch, Semaphore};
use tokio_util::sync::CancellationToken;

use crate::{
    latency::LatencyBook,
    riders,
    scenario::Scenario,
    streets::{Car, City},
};

/// Where the fleet connects, and how.
#[derive(Debug, Clone)]
pub struct Target {
    /// The first node.
    pub node: SocketAddr,
    /// Every node clients are spread over (client `n` starts at node
    /// `n % len`), and reconnect through.
    pub seeds: Vec<SocketAddr>,
    pub token_secret: String,
    /// Connections in handshake at once, to ramp up without a TLS storm.
    pub connect_concurrency: usize,
    /// Handshakes started per second at most (a paced ramp), if set.
    pub connect_per_s: Option<f64>,
}

/// Spaces handshake starts evenly: each caller takes the next free slot.
pub struct Pacer {
    interval: Duration,
    next: Mutex<tokio::time::Instant>,
}

impl Pacer {
    pub fn new(per_s: f64) -> Self {
        Self {
            interval: Duration::from_secs_f64(1.0 / per_s.max(1e-3)),
            next: Mutex::new(tokio::time::Instant::now()),
        }
    }

    pub async fn wait(&self) {
        let at = {
            let mut next = self.next.lock();
            let at = (*next).max(tokio::time::Instant::now());
            *next = at + self.interval;
            at
        };
        tokio::time::sleep_until(at).await;
    }
}

/// The kinds of deliberately bad fix, and the rejection each must get.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum BadFix {
    NullIsland,
    Teleport,
    Duplicate,
    TimeBackwards,
}

impl BadFix {
    const ALL: [BadFix; 4] = [
        Self::NullIsland,
        Self::Teleport,
        Self::Duplicate,
        Self::TimeBackwards,
    ];

    #[cfg(test)]
    fn expected(self) -> RejectReason {
        match self {
            Self::NullIsland => RejectReason::NullIsland,
            Self::Teleport => RejectReason::TooFast,
            Self::Duplicate => RejectReason::StaleSeq,
            Self::TimeBackwards => RejectReason::TimeBackwards,
        }
    }
}

/// Live counters, read while the fleet runs and for the summary.
#[derive(Default)]
pub struct FleetStats {
    pub connected: AtomicU64,
    /// Rider sessions started (a rider that leaves is replaced by a new one).
    pub riders_connected: AtomicU64,
    pub connect_errors: AtomicU64,
    pub sent: AtomicU64,
    pub bad_sent: AtomicU64,
    pub send_errors: AtomicU64,
    pub reconnects: AtomicU64,
    connect_ms: Mutex<Vec<f64>>,
    last_error: Mutex<Option<String>>,
}

impl FleetStats {
    pub fn error(&self, e: impl std::fmt::Display) {
        *self.last_error.lock() = Some(e.to_string());
    }

    /// Clients that have connected or given up.
    pub fn settled(&self) -> u64 {
        self.connected.load(Ordering::Relaxed)
            + self.riders_connected.load(Ordering::Relaxed)
            + self.connect_errors.load(Ordering::Relaxed)
    }

    pub fn last_error(&self) -> Option<String> {
        self.last_error.lock().clone()
    }

    fn handshake(&self, took: Duration) {
        self.connect_ms.lock().push(took.as_secs_f64() * 1e3);
    }

    /// Handshake latency percentiles in ms (p50, p99, max).
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

/// What the node said about the fleet's fixes, and what riders received.
#[derive(Debug, Default, Clone)]
pub struct Outcome {
    pub accepted: u64,
    pub rejected: u64,
    pub rejected_by_reason: Vec<(RejectReason, u64)>,
    pub riders: RiderStats,
}

/// What every simulated client shares: counters, the latency book, the
/// handshake gate, the reconnect-storm signal and the stop signal.
#[derive(Clone)]
pub struct Crew {
    pub stats: Arc<FleetStats>,
    pub book: Arc<LatencyBook>,
    pub gate: Arc<Semaphore>,
    pub pacer: Option<Arc<Pacer>>,
    pub storm: watch::Receiver<u64>,
    pub stop: CancellationToken,
}

impl Crew {
    pub fn new(
        target: &Target,
        stats: Arc<FleetStats>,
        book: Arc<LatencyBook>,
        stop: CancellationToken,
    ) -> (Self, watch::Sender<u64>) {
        let (storm_tx, storm) = watch::channel(0);
        let crew = Self {
            stats,
            book,
            gate: Arc::new(Semaphore::new(target.connect_concurrency.max(1))),
            pacer: target.connect_per_s.map(|r| Arc::new(Pacer::new(r))),
            storm,
            stop,
        };
        (crew, storm_tx)
    }
}

pub fn token(
    secret: &str,
    role: Role,
    id: &str,
) -> Result<String, hexfleet_model::InvalidVehicleId> {
    let expires = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
        + 24 * 3600;
    Ok(Claims::new(role, VehicleId::new(id)?, expires).mint(secret.as_bytes()))
}

/// Clients per client endpoint (UDP socket); spreading them over several
/// sockets spreads them over the node's endpoints too.
const CLIENTS_PER_CONNECTOR: usize = 250;

/// Plays the scenario until `stop` (or its duration), then collects the
/// node's verdicts and what riders received.
pub async fn run(
    scenario: &Scenario,
    target: &Target,
    id_prefix: &str,
    connect: impl Fn() -> Result<Connector, hexfleet_client::ClientError>,
    stats: Arc<FleetStats>,
    book: Arc<LatencyBook>,
    stop: CancellationToken,
) -> anyhow::Result<Outcome> {
    let clients = scenario.drivers.count + scenario.riders.count;
    let connectors = (0..clients.div_ceil(CLIENTS_PER_CONNECTOR).max(1))
        .map(|_| connect())
        .collect::<Result<Vec<_>, _>>()?;
    let (crew, storm) = Crew::new(target, stats, book, stop.clone());
    if let Some(at) = scenario.reconnect_storm_at {
        let stop = stop.clone();
        tokio::spawn(async move {
            tokio::select! {
                _ = tokio::time::sleep(at) => { storm.send_modify(|g| *g += 1); }
                _ = stop.cancelled() => {}
            }
        });
    }
    let city = City::new(scenario.bbox(), scenario.city.block_m);
    let mut drivers = tokio::task::JoinSet::new();
    for n in 0..scenario.drivers.count {
        let connector = connectors[n / CLIENTS_PER_CONNECTOR].clone();
        let driver = Driver {
            n,
            id: format!("{id_prefix}-{n}"),
            scenario: scenario.clone(),
            target: target.clone(),
            city,
            connector,
            crew: crew.clone(),
        };
        drivers.spawn(driver.run());
    }
    let plan = Arc::new(riders::Plan::new(scenario, target, id_prefix));
    let mut riding = tokio::task::JoinSet::new();
    for n in 0..scenario.riders.count {
        let connector = connectors[(scenario.drivers.count + n) / CLIENTS_PER_CONNECTOR].clone();
        riding.spawn(riders::ride(n, plan.clone(), connector, crew.clone()));
    }

    let mut outcome = Outcome::default();
    let mut by_reason = HashMap::<RejectReason, u64>::new();
    while let Some(done) = drivers.join_next().await {
        let Ok(Some(acknowledged)) = done else {
            continue;
        };
        for (s, first_seq) in acknowledged {
            let acked = s.acked_seq.saturating_sub(first_seq.saturating_sub(1));
            // A rejected sequence at or below the acknowledged one was not
            // accepted, unless it was a duplicate of one that was.
            let rejected_up_to_ack = s
                .rejections
                .iter()
                .filter(|(seq, reason)| *seq <= s.acked_seq && *reason != RejectReason::StaleSeq)
                .count() as u64;
            outcome.accepted += acked.saturating_sub(rejected_up_to_ack);
            outcome.rejected += s.rejected_total;
            for (_, reason) in s.rejections {
                *by_reason.entry(reason).or_default() += 1;
            }
        }
    }
    while let Some(done) = riding.join_next().await {
        if let Ok(Some(r)) = done {
            outcome.riders += &r;
        }
    }
    outcome.rejected_by_reason = by_reason.into_iter().collect();
    outcome.rejected_by_reason.sort_by_key(|(r, _)| r.as_str());
    Ok(outcome)
}

/// Connects through the handshake gate; `None` when stopped first or refused.
pub async fn gated<T, F: std::future::Future<Output = Result<T, hexfleet_client::ClientError>>>(
    crew: &Crew,
    who: &str,
    connect: impl FnOnce() -> F,
) -> Option<T> {
    let started;
    let connected = {
        if let Some(pacer) = &crew.pacer {
            tokio::select! {
                _ = pacer.wait() => {}
                _ = crew.stop.cancelled() => return None,
            }
        }
        let _permit = tokio::select! {
            permit = crew.gate.acquire() => permit.ok()?,
            _ = crew.stop.cancelled() => return None,
        };
        started = Instant::now();
        connect().await
    };
    match connected {
        Ok(c) => {
            crew.stats.handshake(started.elapsed());
            Some(c)
        }
        Err(e) => {
            crew.stats.error(format!("{who}: {e}"));
            crew.stats.connect_errors.fetch_add(1, Ordering::Relaxed);
            None
        }
    }
}

/// One simulated driver.
struct Driver {
    n: usize,
    id: String,
    scenario: Scenario,
    target: Target,
    city: City,
    connector: Connector,
    crew: Crew,
}

/// How far off a phone's clock is, when it is (`wrong_clock_share`): what
/// phones' clocks are seen to do (a time set by hand, a time zone applied
/// twice, days without network time).
const WRONG_CLOCKS_MS: [i64; 4] = [20_000, -60_000, 3_600_000, -86_400_000];

/// What a driver's connections were acknowledged: per connection, the stats
/// and the first sequence it used.
type Acknowledged = Vec<(DriverStats, u64)>;

impl Target {
    /// The node client `n` starts at.
    pub fn node_for(&self, n: usize) -> SocketAddr {
        match self.seeds.len() {
            0 => self.node,
            len => self.seeds[n % len],
        }
    }
}

impl Driver {
    async fn connect(&self, token: &str, report: DriverReport) -> Option<DriverClient> {
        // Redirects are followed and lost nodes replaced through the seeds.
        let options = DriverOptions {
            reconnect: true,
            seeds: self.target.seeds.clone(),
            ..Default::default()
        };
        gated(&self.crew, &self.id, || {
            self.connector
                .driver_with(self.target.node_for(self.n), token, report, options)
        })
        .await
    }

    async fn run(self) -> Option<Acknowledged> {
        let crew = self.crew.clone();
        let plan = &self.scenario.drivers;
        let mut rng = StdRng::seed_from_u64(
            self.scenario.seed ^ (self.n as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15),
        );
        let (vehicle, token) = match token(&self.target.token_secret, Role::Driver, &self.id)
            .and_then(|t| Ok((VehicleId::new(&self.id)?, t)))
        {
            Ok(pair) => pair,
            Err(e) => {
                crew.stats.error(format!("{}: {e}", self.id));
                crew.stats.connect_errors.fetch_add(1, Ordering::Relaxed);
                return None;
            }
        };
        let mut report = DriverReport {
            class: VehicleClass::ALL[self.n % VehicleClass::ALL.len()],
            status: VehicleStatus::Available,
        };
        let mut client = self.connect(&token, report).await?;
        crew.stats.connected.fetch_add(1, Ordering::Relaxed);
        let mut acknowledged = Acknowledged::new();
        let mut storm = crew.storm.clone();
        let mut car = Car::new(self.city, plan.gps_noise_m, &mut rng);
        // How far off this phone's clock is; it stamps its fixes with it.
        let clock_skew_ms = match rng.random_bool(plan.wrong_clock_share) {
            true => WRONG_CLOCKS_MS[rng.random_range(0..WRONG_CLOCKS_MS.len())],
            false => 0,
        };
        let mut off_duty_until: Option<Instant> = None;
        let mut last: Option<Fix> = None;
        let period = Duration::from_secs_f64(1.0 / plan.rate_hz);
        // Spread the fleet's fixes evenly over each period.
        let phase = period.mul_f64(rng.random::<f64>());
        let mut ticker = tokio::time::interval_at(tokio::time::Instant::now() + phase, period);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
        let mut then = Instant::now();
        loop {
            tokio::select! {
                _ = ticker.tick() => {}
                changed = storm.changed() => {
                    if changed.is_ok() {
                        acknowledged.push((client.stats(), client.first_seq()));
                        client.abandon();
                        client = self.connect(&token, report).await?;
                        crew.stats.reconnects.fetch_add(1, Ordering::Relaxed);
                    }
                    continue;
                }
                _ = crew.stop.cancelled() => break,
                // Its node died or handed it over: back at its last fix at
                // once, as an app using the SDK does, not at its next.
                _ = client.lost() => {
                    if let Err(e) = client.resume().await {
                        crew.stats.error(format!("{}: {e}", self.id));
                        return Some(acknowledged);
                    }
                    continue;
                }
            }
            let now = Instant::now();
            let dt = now.duration_since(then).as_secs_f64();
            then = now;
            car.step(dt, &mut rng);

            // Status: trips start and end at destinations; now and then a
            // driver takes a break.
            let mut status = report.status;
            if let Some(until) = off_duty_until {
                if now >= until {
                    off_duty_until = None;
                    status = VehicleStatus::Available;
                }
            } else if rng.random_bool((plan.off_duty_per_minute * dt / 60.0).clamp(0.0, 1.0)) {
                off_duty_until = Some(now + Duration::from_secs(rng.random_range(20..90)));
                status = VehicleStatus::OffDuty;
            }
            if car.arrived() {
                car.plan(&mut rng);
                status = match status {
                    VehicleStatus::Available if rng.random_bool(0.5) => VehicleStatus::OnTrip,
                    VehicleStatus::OnTrip => VehicleStatus::Available,
                    s => s,
                };
            }
            if status != report.status {
                report.status = status;
                if let Err(e) = client.report(report).await {
                    crew.stats.error(format!("{}: {e}", self.id));
                }
            }

            let r = car.report(&mut rng);
            let fix = Fix {
                seq: client.next_seq(),
                fix_time_ms: hexfleet_node::clock::now_ms() + clock_skew_ms,
                lat: r.lat,
                lon: r.lon,
                heading_deg: r.heading_deg,
                speed_mps: r.speed_mps,
                accuracy_m: plan.gps_noise_m.max(1.0) as f32,
            };
            let sent = match (last, rng.random_bool(plan.bad_fix_share)) {
                (Some(previous), true) => {
                    let bad = BadFix::ALL[rng.random_range(0..BadFix::ALL.len())];
                    crew.stats.bad_sent.fetch_add(1, Ordering::Relaxed);
                    client.send_raw(spoil(bad, fix, previous)).await
                }
                _ => {
                    crew.book.sent(&vehicle, fix.lat, fix.lon);
                    last = Some(fix);
                    client.send_raw(fix).await
                }
            };
            match sent {
                Ok(()) => {
                    crew.stats.sent.fetch_add(1, Ordering::Relaxed);
                }
                Err(e) => {
                    crew.stats.error(format!("{}: {e}", self.id));
                    crew.stats.send_errors.fetch_add(1, Ordering::Relaxed);
                    return Some(acknowledged);
                }
            }
        }
        // Ask the node what it accepted: its own acknowledgements may be
        // far apart (`ingest.ack_interval`). The last fixes, as datagrams,
        // can arrive after the request on the stream: ask again until they
        // are in, or until they are taken for lost.
        let target = client.next_seq().saturating_sub(1);
        let deadline = Instant::now() + Duration::from_secs(2);
        while client.acked_seq() < target && Instant::now() < deadline {
            if client.acknowledged(Duration::from_secs(1)).await.is_err() {
                break;
            }
            if client.acked_seq() < target {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
        acknowledged.push((client.stats(), client.first_seq()));
        if plan.goodbye {
            let _ = client.goodbye().await;
        } else {
            client.abandon();
        }
        Some(acknowledged)
    }
}

/// Turns a good fix into a bad one of the given kind.
fn spoil(bad: BadFix, fix: Fix, previous: Fix) -> Fix {
    match bad {
        BadFix::NullIsland => Fix {
            lat: 0.0,
            lon: 0.0,
            ..fix
        },
        BadFix::Teleport => Fix {
            lat: (fix.lat + 1.0).min(89.0),
            ..fix
        },
        BadFix::Duplicate => previous,
        BadFix::TimeBackwards => Fix {
            fix_time_ms: previous.fix_time_ms - 10_000,
            ..fix
        },
    }
}

#[cfg(test)]
mod tests {
    use hexfleet_node::{
        config::IngestConfig,
        validate::{Limits, Validator},
    };

    use super::*;

    #[test]
    fn each_kind_of_bad_fix_is_rejected_by_the_node_for_its_reason() {
        let now = hexfleet_node::clock::now_ms();
        let fix = |seq: u64, t: i64, lat: f64| Fix {
            seq,
            fix_time_ms: t,
            lat,
            lon: 13.4,
            heading_deg: 0.0,
            speed_mps: 5.0,
            accuracy_m: 3.0,
        };
        for bad in BadFix::ALL {
            let mut validator = Validator::new(
                Limits::new(&IngestConfig::default(), Duration::from_secs(30)),
                None,
            );
            let previous = fix(1, now - 1_000, 52.5);
            validator.check(&previous, now).unwrap();
            let next = fix(2, now, 52.50001);
            assert_eq!(
                validator.check(&spoil(bad, next, previous), now),
                Err(bad.expected()),
                "{bad:?}"
            );
            assert!(
                validator.check(&next, now).is_ok(),
                "a good fix after a bad one is still accepted"
            );
        }
    }
}
