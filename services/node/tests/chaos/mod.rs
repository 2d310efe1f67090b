//! Faults as users live them: a moving fleet, riders on every node, a fault
//! (a node killed, frozen or cut from Redis; Redis stalled), and a checker
//! comparing what every rider sees with the truth, during the fault and
//! after it.
//!
//! The truth is where each driver is: it drives on, on its circle, whatever
//! its connection does (a driver whose node is gone is still moving, and
//! sends its fixes as soon as it can). Every 100 ms each rider's
//! view is compared with it: a vehicle is *bad* for a rider while it is
//! missing from its view or shown more than 60 m from where it is. The
//! figures are the longest bad streak of any (rider, vehicle) pair and how
//! long after the fault every rider is right again. After convergence the
//! store and every node's API are checked: no ghost (a signed-off vehicle
//! still anywhere), no vehicle in two shards or listed twice, every
//! driver's stored state its latest. Three round zones lie where the
//! fleet drives in and out of them: once the fleet stops, every (vehicle,
//! zone) pair's events in the stream must alternate, entry first, and end
//! as the vehicle's last stored position says (inside, or outside or
//! gone): an event doubled or lost shows.
//!
//! The suite runs each scenario small (`chaos_*_small`, checking only what
//! holds after convergence); `scripts/chaos.sh SCENARIO` runs it at the
//! issue's scale in release mode and prints the figures.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicI64, Ordering};

use hexfleet_model::geodesy::haversine_m;
use tokio_util::sync::CancellationToken;

use super::*;

/// How far behind a shown vehicle may be before it counts as wrong.
const BEHIND_M: f64 = 60.0;
/// How often the checker looks at every rider's view.
const SAMPLE: Duration = Duration::from_millis(100);
/// Steps of each driver's client kept for the report.
const TRAIL: usize = 64;

/// A driver's client's last steps, each at its time since the fleet started.
type Trail = VecDeque<(Duration, String)>;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// kill -9 of the node holding the most drivers.
    Kill,
    /// SIGSTOP of that node for the fault's length, then SIGCONT.
    Freeze,
    /// Redis SIGSTOPped (data kept), a sixth of the drivers signing off
    /// meanwhile.
    RedisStall,
    /// One node cut from Redis (its clients still reach it), a sixth of
    /// its drivers signing off meanwhile.
    RedisCut,
    /// On a Redis Cluster with a replica per master: kill -9 of a master.
    MasterKill,
    /// The same: `CLUSTER FAILOVER` on a replica.
    MasterFailover,
    /// The same: every slot holding a shard of the fleet moved to another
    /// master with its keys.
    SlotsMoved,
    /// Phones whose clocks are wrong from the start (see [`phone_clock`]);
    /// at the fault, a sixth of them jump a minute ahead.
    Clocks,
    /// One node's client-facing addresses (relays its clients and its
    /// peers' probes go through: UDP for QUIC, TCP for its HTTPS and the
    /// WebSocket fallback) drop everything both ways, while the node keeps
    /// Redis and its peers (which reach its HTTP API directly).
    ClientCut,
    /// The same, QUIC datagrams toward the node dropped only (its HTTPS
    /// cut).
    ClientCutIn,
    /// The same, QUIC datagrams from the node dropped only (its HTTPS cut).
    ClientCutOut,
    /// The same node's client side losing 30% of QUIC datagrams each way.
    ClientLoss,
    /// The busiest node at a 10% duty cycle (SIGSTOP 90 ms, SIGCONT 10 ms).
    Slow,
    /// Redis refusing every write (`maxmemory` reached under
    /// `noeviction`) while it answers reads, a sixth of the drivers signing
    /// off meanwhile.
    RedisFull,
}

/// How driver `i`'s phone clock is off in the `clocks` scenario (ms), and
/// whether the SDK reads it (and corrects it at connect) or the app stamps
/// its fixes itself (then only the node can tell): a sixth right, a sixth
/// 20 s ahead, a sixth 60 s behind, a sixth an hour ahead (the app's own
/// stamps), a sixth a day behind (read by the SDK), and a sixth right until
/// the fault, then a minute ahead.
fn phone_clock(i: usize) -> (i64, bool) {
    match i % 6 {
        1 => (20_000, false),
        2 => (-60_000, false),
        3 => (3_600_000, false),
        4 => (-86_400_000, true),
        _ => (0, false),
    }
}

/// Makes `redis` refuse every write (a `maxmemory` of one byte under
/// `noeviction`, as a full server does), or take them again.
fn refuse_writes(redis: &RedisServer, refuse: bool) {
    let mut conn = redis.conn();
    let set = |conn: &mut redis::Connection, name: &str, value: &str| {
        redis::cmd("CONFIG")
            .arg("SET")
            .arg(name)
            .arg(value)
            .query::<()>(conn)
            .unwrap_or_else(|e| panic!("CONFIG SET {name} {value}: {e}"));
    };
    set(&mut conn, "maxmemory-policy", "noeviction");
    set(&mut conn, "maxmemory", if refuse { "1" } else { "0" });
}

/// The clocks that jump at the fault, and by how much.
fn jumps(i: usize) -> bool {
    i % 6 == 5
}
const JUMP_MS: i64 = 60_000;

impl Fault {
    fn from_name(name: &str) -> Option<Fault> {
        Some(match name {
            "kill" => Fault::Kill,
            "freeze" => Fault::Freeze,
            "redis-stall" => Fault::RedisStall,
            "redis-cut" => Fault::RedisCut,
            "cluster-master-kill" => Fault::MasterKill,
            "cluster-failover" => Fault::MasterFailover,
            "cluster-slots" => Fault::SlotsMoved,
            "clocks" => Fault::Clocks,
            "clientcut" => Fault::ClientCut,
            "clientcut-in" => Fault::ClientCutIn,
            "clientcut-out" => Fault::ClientCutOut,
            "client-loss" => Fault::ClientLoss,
            "slow" => Fault::Slow,
            "redis-full" => Fault::RedisFull,
            _ => return None,
        })
    }

    /// Whether it is a fault of one node's client-facing side (its QUIC
    /// address behind a relay).
    fn on_client_side(self) -> bool {
        matches!(
            self,
            Fault::ClientCut | Fault::ClientCutIn | Fault::ClientCutOut | Fault::ClientLoss
        )
    }

    /// What the relay in front of the node drops (toward it, from it).
    fn client_loss(self) -> (f64, f64) {
        match self {
            Fault::ClientCut => (1.0, 1.0),
            Fault::ClientCutIn => (1.0, 0.0),
            Fault::ClientCutOut => (0.0, 1.0),
            Fault::ClientLoss => (0.3, 0.3),
            _ => (0.0, 0.0),
        }
    }

    /// Whether it runs on a Redis Cluster.
    fn on_redis_cluster(self) -> bool {
        matches!(
            self,
            Fault::MasterKill | Fault::MasterFailover | Fault::SlotsMoved
        )
    }
}

/// The store the nodes share: one server (which a relay in front of one
/// node can cut from it), or a Redis Cluster with a replica per master.
enum Store {
    Single {
        redis: RedisServer,
        relay: hexfleet_testkit::TcpRelay,
    },
    Cluster(RedisCluster),
}

impl Store {
    /// A connection to look at what it holds.
    fn conn(&self) -> Box<dyn redis::ConnectionLike> {
        match self {
            Store::Single { redis, .. } => Box::new(redis.conn()),
            Store::Cluster(cluster) => Box::new(cluster.conn()),
        }
    }
}

pub struct Scenario {
    pub fault: Fault,
    pub drivers: usize,
    pub nodes: usize,
    pub speed_mps: f64,
    pub fix_every: Duration,
    /// How long the fault lasts (a kill lasts for good).
    pub fault_for: Duration,
    /// How long the fleet runs before the fault.
    pub warm_up: Duration,
    /// Whether drivers connect again as soon as their connection is lost
    /// (`DriverClient::lost`, `resume`), or only at their next fix.
    pub resume: bool,
    /// More `[cluster]` settings for every node.
    pub cluster_settings: String,
}

impl Scenario {
    /// The suite's size: small, quick, checking what holds afterwards.
    pub fn small(fault: Fault) -> Self {
        Scenario {
            fault,
            drivers: 24,
            nodes: 3,
            speed_mps: 25.0,
            fix_every: Duration::from_millis(500),
            fault_for: Duration::from_secs(3),
            warm_up: Duration::from_secs(2),
            resume: true,
            cluster_settings: String::new(),
        }
    }

    /// The scale `scripts/chaos.sh` runs, from `CHAOS_*` variables.
    pub fn from_env() -> Option<Self> {
        let var = |name: &str| std::env::var(name).ok();
        let fault = Fault::from_name(&var("CHAOS_SCENARIO")?)?;
        let number =
            |name: &str, default: u64| var(name).and_then(|v| v.parse().ok()).unwrap_or(default);
        Some(Scenario {
            fault,
            drivers: number("CHAOS_DRIVERS", 300) as usize,
            nodes: 3,
            speed_mps: 25.0,
            fix_every: Duration::from_millis(number("CHAOS_FIX_MS", 1000)),
            fault_for: Duration::from_secs(number("CHAOS_FAULT_S", 8)),
            warm_up: Duration::from_secs(number("CHAOS_WARM_UP_S", 5)),
            resume: number("CHAOS_RESUME", 1) != 0,
            cluster_settings: var("CHAOS_CLUSTER_SETTINGS").unwrap_or_default(),
        })
    }
}

/// Where a driver is, and whether it is still on the road.
#[derive(Debug, Clone, Copy)]
struct Truth {
    at: (f64, f64),
    gone: bool,
}

/// A driver's route: a circle of 200 m at a steady speed, from a phase.
#[derive(Debug, Clone, Copy)]
struct Route {
    centre: (f64, f64),
    phase: f64,
    speed_mps: f64,
}

impl Route {
    const RADIUS_M: f64 = 200.0;

    fn at(&self, since_start: Duration) -> (f64, f64) {
        let angle = self.phase + self.speed_mps * since_start.as_secs_f64() / Self::RADIUS_M;
        offset(
            self.centre,
            Self::RADIUS_M * angle.cos(),
            Self::RADIUS_M * angle.sin(),
        )
    }
}

/// What the checker found.
#[derive(Debug, Default)]
pub struct Report {
    /// The longest time any vehicle was wrong for any rider, from the
    /// fault on.
    pub longest_bad: Duration,
    /// The 99th percentile of the (rider, vehicle) pairs' longest streaks.
    pub p99_bad: Duration,
    /// The largest share of pairs wrong at one moment.
    pub worst_share: f64,
    /// From the end of the fault to every rider right.
    pub converged: Duration,
    pub ghosts: Vec<String>,
    pub duplicates: Vec<String>,
    pub stale: Vec<String>,
    /// The longest a vehicle took, from its driver's connect, to be shown
    /// right to every rider.
    pub on_map_after: Duration,
    /// Stored states whose fix time is not in node time (more than 2 s
    /// from when the node heard it).
    pub untimely: Vec<String>,
    /// Zone events in the stream once the fleet stopped.
    pub zone_events: usize,
    /// (vehicle, zone) pairs whose events do not alternate, entry first,
    /// or do not end where the vehicle is: an event doubled or lost.
    pub zone_faults: Vec<String>,
}

/// A process's CPU time so far (user + system), from `/proc/PID/stat`.
fn cpu_seconds(node: &Node) -> f64 {
    let stat =
        std::fs::read_to_string(format!("/proc/{}/stat", node.child.id())).unwrap_or_default();
    // Fields after the command's closing parenthesis: utime and stime are
    // the 12th and 13th, in clock ticks (100 a second here).
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .map_or("", |(_, rest)| rest)
        .split_whitespace()
        .collect();
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|f| f.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    (ticks(11) + ticks(12)) / 100.0
}

/// Every node's CPU time and relayed fixes so far, by id.
async fn costs(cluster: &Cluster) -> HashMap<String, (f64, f64)> {
    let mut costs = HashMap::new();
    for node in &cluster.nodes {
        let relayed = node.metric("hexfleet_fixes_relayed_total").await;
        costs.insert(node.id.clone(), (cpu_seconds(node), relayed));
    }
    costs
}

/// The zones the fleet drives through: circles of this radius around the
/// meeting point and two spots 450 m from it.
const ZONE_RADIUS_M: f64 = 150.0;

fn zones_around(meeting: (f64, f64)) -> Vec<(String, (f64, f64))> {
    [(0.0, 0.0), (450.0, 0.0), (0.0, -450.0)]
        .iter()
        .enumerate()
        .map(|(i, (east, north))| (format!("zone-{i}"), offset(meeting, *east, *north)))
        .collect()
}

/// What is wrong with the zone events of `events` (in stream order), given
/// where each vehicle was last stored (`None`: gone) once the fleet
/// stopped.
fn zone_faults(
    events: &[hexfleet_protocol::zone::ZoneEvent],
    zones: &[(String, (f64, f64))],
    last_at: &HashMap<String, Option<(f64, f64)>>,
) -> Vec<String> {
    let mut inside: HashMap<(String, String), bool> = HashMap::new();
    let mut faults = Vec::new();
    for e in events {
        let key = (e.vehicle.id.to_string(), e.zone.to_string());
        let was = inside.entry(key.clone()).or_insert(false);
        let entered = e.event == hexfleet_protocol::zone::ZoneEventKind::Entered;
        if *was == entered {
            faults.push(format!(
                "{} {} {} twice in a row ({})",
                key.0,
                e.event.as_str(),
                key.1,
                e.cause.as_str()
            ));
        }
        *was = entered;
    }
    for (id, at) in last_at {
        for (zone, centre) in zones {
            let is_inside = inside
                .get(&(id.clone(), zone.clone()))
                .copied()
                .unwrap_or(false);
            // Within 10 m of the edge (a 32-gon's sides cut the circle) it
            // may be either.
            let should = match at {
                None => Some(false),
                Some(p) => {
                    let d = haversine_m(p.0, p.1, centre.0, centre.1);
                    if d < ZONE_RADIUS_M - 10.0 {
                        Some(true)
                    } else if d > ZONE_RADIUS_M + 10.0 {
                        Some(false)
                    } else {
                        None
                    }
                }
            };
            if should.is_some_and(|should| should != is_inside) {
                faults.push(format!(
                    "{id} ends {} {zone} by its events, {} by where it is",
                    if is_inside { "inside" } else { "outside" },
                    if is_inside { "outside" } else { "inside" },
                ));
            }
        }
    }
    faults.sort();
    faults
}

/// Brings a fault on a Redis Cluster about; says what it did.
fn redis_cluster_fault(
    redis: &mut RedisCluster,
    fault: Fault,
    truth: &HashMap<String, Truth>,
) -> String {
    match fault {
        Fault::MasterKill => {
            let master = &mut redis.masters()[0];
            let port = master.port;
            master.kill();
            format!("the master on {port} killed")
        }
        Fault::MasterFailover => match redis.fail_over() {
            Some(port) => format!("the replica on {port} promoted"),
            None => panic!("no replica to promote"),
        },
        Fault::SlotsMoved => {
            let started = Instant::now();
            let shards: HashSet<ShardId> =
                truth.values().map(|t| shard_of(t.at.0, t.at.1)).collect();
            let slots = move_slots_of(redis, &shards);
            format!(
                "{slots} slots holding {} shards moved in {} ms",
                shards.len(),
                started.elapsed().as_millis()
            )
        }
        _ => unreachable!("not a Redis Cluster fault"),
    }
}

/// A spot `m` metres east and `n` metres north of `from`.
fn offset(from: (f64, f64), east_m: f64, north_m: f64) -> (f64, f64) {
    let lat = from.0 + north_m / 111_320.0;
    let lon = from.1 + east_m / (111_320.0 * from.0.to_radians().cos());
    (lat, lon)
}

/// A corner of the centre's shard where the most nodes' shards meet: the
/// fleet around it is shared by them, as a city's is.
fn meeting_point(cluster: &Cluster) -> (f64, f64) {
    let home = shard_of(CENTER.0, CENTER.1);
    let owners = |at: (f64, f64)| -> usize {
        let around: HashSet<String> = [0.0_f64, 120.0, 240.0]
            .iter()
            .map(|deg| {
                let (e, n) = (
                    150.0 * deg.to_radians().cos(),
                    150.0 * deg.to_radians().sin(),
                );
                let p = offset(at, e, n);
                cluster.owner(shard_of(p.0, p.1)).id.clone()
            })
            .collect();
        around.len()
    };
    home.0
        .boundary()
        .iter()
        .map(|v| (v.lat(), v.lng()))
        .max_by_key(|&v| owners(v))
        .unwrap_or(CENTER)
}

/// For each node, a spot in a shard it owns near the centre: its rider
/// looks from there, so it stays on that node.
fn lookouts(cluster: &Cluster, meeting: (f64, f64)) -> Vec<(String, (f64, f64))> {
    let home = shard_of(meeting.0, meeting.1);
    let centre = |s: &ShardId| {
        let c = h3o::LatLng::from(s.0);
        (c.lat(), c.lng())
    };
    let mut near: Vec<ShardId> = home
        .0
        .grid_disk::<Vec<_>>(2)
        .into_iter()
        .map(ShardId)
        .collect();
    near.sort_by(|a, b| {
        let (a, b) = (centre(a), centre(b));
        let da = haversine_m(a.0, a.1, meeting.0, meeting.1);
        let db = haversine_m(b.0, b.1, meeting.0, meeting.1);
        da.total_cmp(&db)
    });
    cluster
        .nodes
        .iter()
        .filter_map(|n| {
            let shard = near.iter().find(|s| cluster.owner(**s).id == n.id)?;
            Some((n.id.clone(), centre(shard)))
        })
        .collect()
}

pub async fn run(s: Scenario) -> Report {
    // The clients' own logs (the SDK runs in this process), as
    // CHAOS_CLIENT_LOG filters them (e.g. `hexfleet_client=debug`).
    if let Ok(filter) = std::env::var("CHAOS_CLIENT_LOG") {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::new(filter))
            .with_test_writer()
            .try_init();
    }
    let cut_id = format!("n{}", s.nodes - 1);
    let grace = Duration::from_secs(10);
    let (mut store, mut cluster) = if s.fault.on_redis_cluster() {
        let redis = RedisCluster::start_with_replicas(3);
        let urls = HashMap::new();
        let cluster =
            Cluster::start_reaching("redis-cluster", redis.seeds(), urls, s.nodes, false, grace)
                .await;
        (Store::Cluster(redis), cluster)
    } else {
        let redis = RedisServer::start();
        let target: SocketAddr = redis.url().trim_start_matches("redis://").parse().unwrap();
        let relay = hexfleet_testkit::TcpRelay::start(target).await.unwrap();
        let urls = match s.fault {
            Fault::RedisCut => {
                HashMap::from([(cut_id.clone(), format!("redis://{}", relay.addr()))])
            }
            _ => HashMap::new(),
        };
        let cluster = match s.fault.on_client_side() {
            true => {
                let relayed = [cut_id.as_str()];
                Cluster::start_relayed(redis.url(), s.nodes, &relayed, &s.cluster_settings, "")
                    .await
            }
            false => {
                Cluster::start_reaching("redis", redis.url(), urls, s.nodes, false, grace).await
            }
        };
        (Store::Single { redis, relay }, cluster)
    };

    // Drivers on circles of 200 m around spots spread over ~1.5 km, where
    // shards of several nodes meet.
    let meeting = meeting_point(&cluster);
    let began = Instant::now();
    let gone: Arc<Mutex<HashSet<String>>> = Arc::default();
    // What each driver's client last said: its node, its reconnects, its
    // last send's error, its acknowledged and next seq.
    let client_side: Arc<Mutex<HashMap<String, String>>> = Arc::default();
    // And its last few steps, each at its time since `began`.
    let trails: Arc<Mutex<HashMap<String, Trail>>> = Arc::default();
    let side = (s.drivers as f64).sqrt().ceil() as usize;
    let routes: Vec<(String, Route)> = (0..s.drivers)
        .map(|i| {
            let (row, col) = ((i / side) as f64, (i % side) as f64);
            let half = (side as f64 - 1.0) / 2.0;
            let step = 1_500.0 / side.max(1) as f64;
            let route = Route {
                centre: offset(meeting, (col - half) * step, (row - half) * step),
                phase: i as f64,
                speed_mps: s.speed_mps,
            };
            (format!("car-{i}"), route)
        })
        .collect();
    let truth = || -> HashMap<String, Truth> {
        let (now, gone) = (began.elapsed(), gone.lock());
        routes
            .iter()
            .map(|(id, route)| {
                let t = Truth {
                    at: route.at(now),
                    gone: gone.contains(id),
                };
                (id.clone(), t)
            })
            .collect()
    };
    let mut riders = Vec::new();
    for (node, at) in lookouts(&cluster, meeting) {
        let node = cluster.by_id(&node);
        let sub = Subscription::around(at.0, at.1, 5_000.0);
        riders.push(rider(&cluster, node, &format!("rider-{}", node.id), sub).await);
    }
    let zones = zones_around(meeting);
    for (id, centre) in &zones {
        put_zone(
            &cluster,
            &cluster.nodes[0],
            id,
            &round_zone(*centre, ZONE_RADIUS_M),
        )
        .await;
    }
    let wrong = |r: &RiderClient, truth: &HashMap<String, Truth>| -> HashSet<String> {
        let view = r.view();
        truth
            .iter()
            .filter(|(id, t)| {
                let shown = view.get(&VehicleId::new(id.as_str()).unwrap());
                match (t.gone, shown) {
                    (true, shown) => shown.is_some(),
                    (false, None) => true,
                    (false, Some(v)) => haversine_m(v.lat, v.lon, t.at.0, t.at.1) > BEHIND_M,
                }
            })
            .map(|(id, _)| id.clone())
            .collect()
    };
    // The jump of the clocks that jump, once the fault is on.
    let jumped = Arc::new(AtomicI64::new(0));
    let stop = CancellationToken::new();
    let mut leave = Vec::new();
    // Drivers connect while the riders watch: each vehicle's first moment
    // right for every rider, from its driver's connect.
    let connected: Mutex<HashMap<String, Instant>> = Mutex::default();
    let connecting = async {
        for (i, (id, route)) in routes.iter().enumerate() {
            let (id, route) = (id.clone(), *route);
            let via = cluster.nodes[i % cluster.nodes.len()].quic;
            let (skew_ms, sdk_clock) = match s.fault {
                Fault::Clocks => phone_clock(i),
                _ => (0, false),
            };
            let jump = (s.fault == Fault::Clocks && jumps(i)).then(|| jumped.clone());
            let options = DriverOptions {
                reconnect: true,
                seeds: cluster.seeds(),
                clock_skew_ms: if sdk_clock { skew_ms } else { 0 },
            };
            let mut client = cluster
                .connector()
                .driver_with(via, &token(Role::Driver, &id), report(), options)
                .await
                .unwrap_or_else(|e| panic!("{id} connects: {e}"));
            connected.lock().insert(id.clone(), Instant::now());
            let (gone, stop, going) = (gone.clone(), stop.clone(), CancellationToken::new());
            let client_side = client_side.clone();
            let trails = trails.clone();
            leave.push((id.clone(), going.clone()));
            let (every, resume) = (s.fix_every, s.resume);
            tokio::spawn(async move {
                let step = |what: String| {
                    let mut trails = trails.lock();
                    let trail = trails.entry(id.clone()).or_default();
                    if trail.len() == TRAIL {
                        trail.pop_front();
                    }
                    trail.push_back((began.elapsed(), what));
                };
                let mut tick = tokio::time::interval(every);
                tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
                loop {
                    tokio::select! {
                        _ = stop.cancelled() => return,
                        _ = going.cancelled() => {
                            gone.lock().insert(id.clone());
                            let _ = client.goodbye().await;
                            return;
                        }
                        _ = tick.tick() => {}
                        // An app that takes its vehicle back to the map as soon
                        // as its connection is lost, not at its next fix.
                        _ = client.lost(), if resume => {
                            step(format!("lost {}: {:?}", client.node(), client.closed_error()));
                            let resumed = client.resume().await;
                            step(format!("resumed on {}: {resumed:?}", client.node()));
                            continue;
                        }
                    }
                    let at = route.at(began.elapsed());
                    let mut fix = FixInput::at(at.0, at.1);
                    if !sdk_clock {
                        // The app stamps its fixes with the phone's clock.
                        let jump = jump.as_ref().map_or(0, |j| j.load(Ordering::Relaxed));
                        fix.fix_time_ms = Some(hexfleet_node::clock::now_ms() + skew_ms + jump);
                    }
                    let sent = client.send_fix(fix).await;
                    step(format!("fix {:?} to {}", sent, client.node()));
                    client_side.lock().insert(
                        id.clone(),
                        format!(
                            "on {} reconnects {} acked {} next {} last send {:?}; rejected {:?}",
                            client.node(),
                            client.reconnects(),
                            client.acked_seq(),
                            client.next_seq(),
                            sent.err(),
                            client.stats().rejections,
                        ),
                    );
                }
            });
        }
    };
    let watching = async {
        let mut on_map: HashMap<String, Instant> = HashMap::new();
        let watching = Instant::now();
        while on_map.len() < routes.len() {
            let truth = truth();
            let mut bad: HashSet<String> = HashSet::new();
            for r in &riders {
                bad.extend(wrong(r, &truth));
            }
            let now = Instant::now();
            for id in connected.lock().keys() {
                if !bad.contains(id) {
                    on_map.entry(id.clone()).or_insert(now);
                }
            }
            assert!(
                watching.elapsed() < WAIT,
                "every rider sees the fleet right: {} of {} vehicles\n{}",
                on_map.len(),
                routes.len(),
                cluster.logs()
            );
            tokio::time::sleep(SAMPLE).await;
        }
        on_map
    };
    let ((), on_map) = tokio::join!(connecting, watching);
    let warming = (Instant::now(), costs(&cluster).await);
    let connected = connected.into_inner();
    let (slowest, on_map_after) = on_map
        .iter()
        .map(|(id, at)| (id.clone(), at.saturating_duration_since(connected[id])))
        .max_by_key(|(_, after)| *after)
        .unwrap_or_default();
    println!(
        "  slowest on the map: {slowest}, {} ms after its driver connected; its client: {}",
        on_map_after.as_millis(),
        client_side.lock().get(&slowest).map_or("-", String::as_str)
    );
    tokio::time::sleep(s.warm_up).await;

    // The fault, watched.
    let victim = match s.fault {
        Fault::RedisCut => cut_id.clone(),
        fault if fault.on_client_side() => cut_id.clone(),
        _ => busiest(&cluster, &truth()),
    };
    let signing_off: Vec<String> = match s.fault {
        Fault::RedisStall | Fault::RedisCut | Fault::RedisFull => leave
            .iter()
            .enumerate()
            .filter(|(i, _)| i % 6 == 0)
            .map(|(_, (id, _))| id.clone())
            .collect(),
        _ => Vec::new(),
    };
    let share = {
        let truth = truth();
        let held = truth
            .values()
            .filter(|t| cluster.owner(shard_of(t.at.0, t.at.1)).id == victim)
            .count();
        held as f64 / truth.len().max(1) as f64
    };
    let before_fault = (Instant::now(), costs(&cluster).await);
    let started = Instant::now();
    let mut duty_cycle: Option<tokio::task::JoinHandle<()>> = None;
    let mut what = format!("{victim} holding {:.0}% of the fleet", share * 100.0);
    match s.fault {
        Fault::Kill => {
            let i = cluster.nodes.iter().position(|n| n.id == victim).unwrap();
            let mut node = cluster.nodes.remove(i);
            let _ = node.child.kill();
            let _ = node.child.wait();
        }
        Fault::Freeze => cluster.by_id(&victim).signal(Signal::STOP),
        Fault::RedisFull => {
            let Store::Single { redis, .. } = &store else {
                unreachable!("on one server")
            };
            refuse_writes(redis, true);
            what = "Redis refusing every write (maxmemory reached, noeviction)".into();
        }
        Fault::RedisStall | Fault::RedisCut => match &store {
            Store::Single { redis, .. } if s.fault == Fault::RedisStall => redis.stall(),
            Store::Single { relay, .. } => relay.cut(),
            Store::Cluster(_) => unreachable!("on one server"),
        },
        Fault::MasterKill | Fault::MasterFailover | Fault::SlotsMoved => {
            let Store::Cluster(redis) = &mut store else {
                unreachable!("on a Redis Cluster")
            };
            what = redis_cluster_fault(redis, s.fault, &truth());
        }
        Fault::Clocks => {
            jumped.store(JUMP_MS, Ordering::Relaxed);
            what = "a sixth of the phones' clocks jump a minute ahead".into();
        }
        Fault::ClientCut | Fault::ClientCutIn | Fault::ClientCutOut | Fault::ClientLoss => {
            let (inbound, outbound) = s.fault.client_loss();
            let (quic, https) = cluster.client_relays(&victim);
            quic.set_loss(inbound, outbound);
            // A cut one way is a cut for TCP; TCP rides out loss itself.
            if s.fault != Fault::ClientLoss {
                https.cut();
            }
            what = format!(
                "{what}: its client address dropping {:.0}% of datagrams toward it, {:.0}% from it",
                inbound * 100.0,
                outbound * 100.0
            );
        }
        Fault::Slow => {
            let pid = Pid::from_child(&cluster.by_id(&victim).child);
            duty_cycle = Some(tokio::spawn(async move {
                loop {
                    let _ = kill_process(pid, Signal::STOP);
                    tokio::time::sleep(Duration::from_millis(90)).await;
                    let _ = kill_process(pid, Signal::CONT);
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
            }));
            what = format!("{what}, at a 10% duty cycle");
        }
    }
    for (id, going) in &leave {
        if signing_off.contains(id) {
            going.cancel();
        }
    }
    let mut streaks: HashMap<(usize, String), (Instant, Duration)> = HashMap::new();
    let mut longest: HashMap<(usize, String), Duration> = HashMap::new();
    // When each pair's longest streak ended.
    let mut streaks_ended: HashMap<(usize, String), Instant> = HashMap::new();
    let mut worst_share: f64 = 0.0;
    let mut ended: Option<Instant> = None;
    let mut at_end = None;
    let converged;
    loop {
        let now = Instant::now();
        if ended.is_none() && now - started >= s.fault_for {
            match s.fault {
                Fault::Freeze => cluster.by_id(&victim).signal(Signal::CONT),
                Fault::RedisFull => {
                    if let Store::Single { redis, .. } = &store {
                        refuse_writes(redis, false);
                    }
                }
                Fault::RedisStall | Fault::RedisCut => match &store {
                    Store::Single { redis, .. } if s.fault == Fault::RedisStall => redis.resume(),
                    Store::Single { relay, .. } => relay.heal(),
                    Store::Cluster(_) => {}
                },
                fault if fault.on_client_side() => {
                    let (quic, https) = cluster.client_relays(&victim);
                    quic.heal();
                    https.heal();
                }
                Fault::Slow => {
                    if let Some(cycle) = duty_cycle.take() {
                        cycle.abort();
                        let _ = cycle.await;
                    }
                    cluster.by_id(&victim).signal(Signal::CONT);
                }
                // For good, or over at once.
                _ => {}
            }
            ended = Some(now);
            at_end = Some((now, costs(&cluster).await));
        }
        let truth = truth();
        let mut bad_pairs = 0;
        for (i, r) in riders.iter().enumerate() {
            let bad = wrong(r, &truth);
            bad_pairs += bad.len();
            for id in &bad {
                streaks
                    .entry((i, id.clone()))
                    .or_insert((now, Duration::ZERO));
            }
            streaks.retain(|(j, id), (since, _)| {
                if *j != i || bad.contains(id) {
                    return true;
                }
                let streak = now - *since;
                let held = longest.entry((i, id.clone())).or_default();
                if streak > *held {
                    *held = streak;
                    streaks_ended.insert((i, id.clone()), now);
                }
                false
            });
        }
        if std::env::var("CHAOS_TRACE").is_ok() && now - started < Duration::from_secs(8) {
            let per: Vec<usize> = riders.iter().map(|r| wrong(r, &truth).len()).collect();
            let views: Vec<usize> = riders.iter().map(|r| r.view().len()).collect();
            let links: Vec<String> = riders
                .iter()
                .map(|r| format!("{}:{:?}", r.stats().reconnects, r.transport()))
                .collect();
            println!(
                "TRACE {:>5} ms bad {per:?} shown {views:?} reconnects {links:?}",
                (now - started).as_millis()
            );
        }
        let pairs = (riders.len() * truth.len()).max(1);
        worst_share = worst_share.max(bad_pairs as f64 / pairs as f64);
        if let Some(end) = ended {
            if bad_pairs == 0 {
                converged = now - end;
                break;
            }
            if now - end >= Duration::from_secs(60) {
                // Which vehicles, and what each rider shows of them.
                let mut detail = Vec::new();
                for (i, r) in riders.iter().enumerate() {
                    let view = r.view();
                    for id in wrong(r, &truth) {
                        let t = &truth[&id];
                        let shown = view.get(&VehicleId::new(id.as_str()).unwrap()).map(|v| {
                            let off_m = haversine_m(v.lat, v.lon, t.at.0, t.at.1) as i64;
                            format!(
                                "shown {off_m} m off, seen_ms {}, status {:?}",
                                v.seen_ms, v.status
                            )
                        });
                        detail.push(format!(
                            "rider {i} {id}: signed off {}, {}",
                            t.gone,
                            shown.unwrap_or_else(|| "not shown".into())
                        ));
                    }
                }
                detail.sort();
                panic!(
                    "riders not right 60 s after the fault: {bad_pairs} pairs\n{}\n{}",
                    detail.join("\n"),
                    cluster.logs()
                );
            }
        }
        tokio::time::sleep(SAMPLE).await;
    }
    {
        let mut worst: Vec<(&(usize, String), &Duration)> = longest.iter().collect();
        worst.sort_by_key(|(_, d)| std::cmp::Reverse(**d));
        let gone = gone.lock();
        for ((rider, id), d) in worst.iter().take(5) {
            let state = if gone.contains(id) {
                "signed off"
            } else {
                "driving"
            };
            let nodes: Vec<String> = cluster
                .nodes
                .iter()
                .map(|n| format!("{}={}", n.id, n.quic))
                .collect();
            println!(
                "  worst: rider {rider}, {id} ({state}): {} ms; its client: {} (nodes {})",
                d.as_millis(),
                client_side.lock().get(id).map_or("-", String::as_str),
                nodes.join(" ")
            );
        }
        if let Some((pair, d)) = worst.first() {
            let id = &pair.1;
            if let Some(ended) = streaks_ended.get(*pair) {
                let ended = *ended - began;
                let (from, to) = (ended.saturating_sub(**d + Duration::from_secs(4)), ended);
                println!(
                    "  its streak ended {} ms after the fleet started; its client then:",
                    ended.as_millis()
                );
                for (at, step) in trails.lock().get(id).into_iter().flatten() {
                    if (from..=to).contains(at) {
                        println!("    {id}: {:>6} ms {step}", at.as_millis());
                    }
                }
            }
        }
    }
    let mut all: Vec<Duration> = longest.values().copied().collect();
    all.sort();
    let p99 = all
        .get((all.len() * 99 / 100).min(all.len().saturating_sub(1)))
        .copied()
        .unwrap_or_default();
    let mut report = Report {
        longest_bad: all.last().copied().unwrap_or_default(),
        p99_bad: p99,
        worst_share,
        converged,
        on_map_after,
        ..Report::default()
    };

    // After convergence: the store and every node's API.
    let settle = Instant::now();
    loop {
        let truth = truth();
        report.ghosts.clear();
        report.duplicates.clear();
        report.stale.clear();
        report.untimely.clear();
        for (id, t) in &truth {
            if let Some(st) = stored_in(&mut *store.conn(), id) {
                if (st.fix_time_ms - st.seen_ms).abs() > 2_000 {
                    report.untimely.push(format!(
                        "{id} (fix time {} ms from when it was heard)",
                        st.fix_time_ms - st.seen_ms
                    ));
                }
            }
            let (shards, located) = stored_copies_in(&mut *store.conn(), id);
            if t.gone && (!shards.is_empty() || located) {
                report.ghosts.push(id.clone());
            }
            let twice = || stored_copies_in(&mut *store.conn(), id).0.len() > 1;
            if shards.len() > 1 && lasting(twice).await {
                report.duplicates.push(id.clone());
            }
            if !t.gone {
                let route = routes.iter().find(|(r, _)| r == id).map(|(_, r)| *r);
                let stale = || {
                    let now = route.map_or(t.at, |r| r.at(began.elapsed()));
                    !stored_in(&mut *store.conn(), id)
                        .is_some_and(|st| haversine_m(st.lat, st.lon, now.0, now.1) <= BEHIND_M)
                };
                let stored = stored_in(&mut *store.conn(), id);
                let fresh = !(stale() && lasting(stale).await);
                if !fresh {
                    if std::env::var("CHAOS_TRACE").is_ok() {
                        let (shards, located) = stored_copies_in(&mut *store.conn(), id);
                        let st = stored.as_ref();
                        println!(
                            "TRACE stale {id}: copies in {shards:?} (locator {located}), stored {:?}, truth {:?} in {}",
                            st.map(|st| (st.lat, st.lon, st.seq, shard_of(st.lat, st.lon))),
                            t.at,
                            shard_of(t.at.0, t.at.1)
                        );
                        println!("TRACE   client: {:?}", client_side.lock().get(id));
                        for line in cluster
                            .logs()
                            .lines()
                            .filter(|l| l.contains("waited for its lease") || l.starts_with("---"))
                        {
                            println!("TRACE   {}", &line[..line.len().min(220)]);
                        }
                        for node in &cluster.nodes {
                            let url = format!("http://{}/v1/vehicles/{id}", node.http);
                            let found = api_json(url).await;
                            let pending = node.metric("hexfleet_store_pending").await;
                            let foreign = node.metric("hexfleet_store_foreign_dropped_total").await;
                            let redirected =
                                node.metric("hexfleet_sessions_redirected_total").await;
                            let handoffs = node.metric("hexfleet_handoffs_total").await;
                            println!(
                                "TRACE   {} (quic {}): redirected {redirected} handoffs {handoffs}",
                                node.id, node.quic
                            );
                            if node.id == cluster.nodes[0].id {
                                let mut conn = store.conn();
                                let all: Vec<String> = redis::cmd("KEYS")
                                    .arg("hexfleet:state:*")
                                    .query(&mut *conn)
                                    .unwrap_or_default();
                                for key in all {
                                    let there: bool = redis::cmd("HEXISTS")
                                        .arg(&key)
                                        .arg(id.as_str())
                                        .query(&mut *conn)
                                        .unwrap_or(false);
                                    if there {
                                        let member: bool = redis::cmd("SISMEMBER")
                                            .arg(keys::SHARDS)
                                            .arg(
                                                key.trim_start_matches("hexfleet:state:{")
                                                    .trim_end_matches('}'),
                                            )
                                            .query(&mut *conn)
                                            .unwrap_or(false);
                                        let loc: Option<String> = redis::cmd("GET")
                                            .arg(keys::locator(
                                                &VehicleId::new(id.as_str()).unwrap(),
                                            ))
                                            .query(&mut *conn)
                                            .unwrap_or(None);
                                        println!("TRACE   found in {key} (registered {member}), locator {loc:?}");
                                    }
                                }
                            }
                            println!(
                                "TRACE   {}: seq {:?} lat {:?} pending {pending} foreign dropped {foreign}",
                                node.id,
                                found.as_ref().and_then(|f| f["seq"].as_u64()),
                                found.as_ref().and_then(|f| f["lat"].as_f64()),
                            );
                        }
                    }
                    report.stale.push(id.clone());
                }
            }
        }
        for node in &cluster.nodes {
            let Some(listed) = nearby_ids(node, meeting, 5_000.0).await else {
                continue;
            };
            let mut seen = HashSet::new();
            for id in &listed {
                if !seen.insert(id) {
                    report
                        .duplicates
                        .push(format!("{id} (listed twice by {})", node.id));
                }
                if truth.get(id).is_some_and(|t| t.gone) {
                    report.ghosts.push(format!("{id} (listed by {})", node.id));
                }
            }
        }
        let clean = report.ghosts.is_empty()
            && report.duplicates.is_empty()
            && report.stale.is_empty()
            && report.untimely.is_empty();
        if clean || settle.elapsed() > Duration::from_secs(5) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    stop.cancel();
    // The fleet stopped (its drivers' connections dropped, within their
    // grace): every event is in the stream within a few flushes.
    let gone_now = gone.lock().clone();
    for _ in 0..10 {
        tokio::time::sleep(Duration::from_millis(500)).await;
        let last_at: HashMap<String, Option<(f64, f64)>> = routes
            .iter()
            .map(|(id, _)| {
                let at = match gone_now.contains(id) {
                    true => None,
                    false => stored_in(&mut *store.conn(), id).map(|st| (st.lat, st.lon)),
                };
                (id.clone(), at)
            })
            .collect();
        let reply: redis::Value = redis::cmd("XRANGE")
            .arg(keys::ZONE_EVENTS)
            .arg("-")
            .arg("+")
            .query(&mut *store.conn())
            .unwrap_or(redis::Value::Nil);
        let events = hexfleet_node::store::redis::zone_events_in(reply);
        report.zone_events = events.len();
        report.zone_faults = zone_faults(&events, &zones, &last_at);
        if report.zone_faults.is_empty() {
            break;
        }
    }
    if let Some(end) = &at_end {
        println!("{}", cost_line(&warming, &before_fault, end));
    }
    if let Ok(path) = std::env::var("CHAOS_NODE_LOGS") {
        let _ = std::fs::write(path, cluster.logs());
    }
    println!(
        "chaos {:?} ({what}): {} drivers at {} m/s, fixes every {} ms, {} riders on {} nodes, fault {} s: \
         longest hidden or > {BEHIND_M} m behind {} ms (p99 of pairs {} ms), worst moment {:.0}% of pairs; \
         every rider right {} ms after the fault; every vehicle on the map {} ms after its driver connected; \
         after: {} ghosts, {} duplicates, {} stale, {} fix times not in node time; \
         {} zone events, {} (vehicle, zone) pairs with one doubled or lost",
        s.fault,
        s.drivers,
        s.speed_mps,
        s.fix_every.as_millis(),
        riders.len(),
        s.nodes,
        s.fault_for.as_secs(),
        report.longest_bad.as_millis(),
        report.p99_bad.as_millis(),
        report.worst_share * 100.0,
        report.converged.as_millis(),
        report.on_map_after.as_millis(),
        report.ghosts.len(),
        report.duplicates.len(),
        report.stale.len(),
        report.untimely.len(),
        report.zone_events,
        report.zone_faults.len(),
    );
    report
}

type Costs = (Instant, HashMap<String, (f64, f64)>);

/// Each node's CPU (a share of one core) before the fault and during it,
/// and the fixes it relayed during it.
fn cost_line(warming: &Costs, before: &Costs, end: &Costs) -> String {
    let mut ids: Vec<&String> = end.1.keys().collect();
    ids.sort();
    let per_node: Vec<String> = ids
        .iter()
        .filter_map(|id| {
            let (w, b, e) = (warming.1.get(*id)?, before.1.get(*id)?, end.1.get(*id)?);
            let calm = (b.0 - w.0) / (before.0 - warming.0).as_secs_f64().max(0.001);
            let fault = (e.0 - b.0) / (end.0 - before.0).as_secs_f64().max(0.001);
            let relayed = e.1 - b.1;
            Some(format!(
                "{id} CPU {:.0}% before, {:.0}% during, {relayed:.0} fixes relayed",
                calm * 100.0,
                fault * 100.0
            ))
        })
        .collect();
    format!("  cost: {}", per_node.join("; "))
}

/// Whether `check` holds in ten looks 100 ms apart. A vehicle crossing
/// between shards is, for a moment, in both: its old node keeps its copy
/// until the new one has written it and the old one has seen the tombstone
/// it left (at its next renewal, 500 ms here). What the store holds after
/// a fault is judged by what lasts.
async fn lasting(check: impl Fn() -> bool) -> bool {
    for _ in 0..10 {
        if !check() {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    true
}

/// The node whose shards hold the most drivers now.
fn busiest(cluster: &Cluster, truth: &HashMap<String, Truth>) -> String {
    let mut count: HashMap<String, usize> = HashMap::new();
    for t in truth.values() {
        *count
            .entry(cluster.owner(shard_of(t.at.0, t.at.1)).id.clone())
            .or_default() += 1;
    }
    count
        .into_iter()
        .max_by_key(|(_, n)| *n)
        .map(|(id, _)| id)
        .unwrap_or_else(|| "n0".into())
}

/// What holds after convergence, whatever the fault.
pub fn assert_clean(report: &Report) {
    // Every kind of fault at once: one hides no other.
    let mut faults = Vec::new();
    let mut note = |what: &str, found: &[String]| {
        if !found.is_empty() {
            faults.push(format!("{what}: {found:?}"));
        }
    };
    note("ghosts", &report.ghosts);
    note("duplicates", &report.duplicates);
    note("stale", &report.stale);
    note("fix times not in node time", &report.untimely);
    note("zone events doubled or lost", &report.zone_faults);
    if report.zone_events == 0 {
        faults.push("the fleet crossed no zone's edge".into());
    }
    assert!(faults.is_empty(), "{}", faults.join("\n"));
}
