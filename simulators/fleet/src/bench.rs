//! `hexfleet-sim bench`: the standard benchmark.
//!
//! It builds nothing. It uses Redis at `--redis-url` or starts its own
//! `redis-server`, runs the node as a separate process (this same binary in
//! `serve-node` mode, so its CPU and memory can be read on their own), and
//! measures what the node spends per operation ([`cost`](crate::cost)): CPU
//! time read from `/proc` and from Redis's `INFO` at the start and end of a
//! steady window, divided by what the node counted in it. The simulator
//! shares the machine, so throughputs measure the machine; costs per
//! operation do not. Phases:
//!
//! - ingest: node and Redis CPU per fix, UDP datagrams and bytes per fix;
//! - nearby queries under that ingest: CPU per query and latency;
//! - fan-out to riders on a dense area: CPU per delta item, bytes per item;
//! - end-to-end latency (fix created → rider applied) at loads both sides
//!   carry here;
//! - dashboards: memory per dashboard, CPU per item, latency;
//! - idle connections: a paced ramp, handshake latency, memory and CPU per
//!   connection;
//!
//! and derives what one core of the node carries of each.

use std::{
    io::{BufRead, BufReader},
    net::SocketAddr,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::Arc,
    time::{Duration, Instant},
};

use anyhow::{bail, Context as _};
use futures_util::StreamExt;
use hdrhistogram::Histogram;
use hexfleet_client::Connector;
use hexfleet_testkit::RedisServer;
use rand::{Rng, SeedableRng};
use serde::Serialize;
use tokio_util::sync::CancellationToken;

use crate::{
    cost::{Probe, Window},
    dashboards::{self, DashboardStats, ViewSummary},
    fleet::{self, FleetStats, Target},
    latency::LatencyBook,
    report::Summary,
    scenario::Scenario,
};

/// How big each phase is.
#[derive(Debug, Clone, Serialize)]
pub struct Sizes {
    /// Drivers and their rate (Hz) in the ingest phase, no riders.
    pub ingest: (usize, f64),
    /// Nearby queries per second...
    pub nearby_per_s: f64,
    /// ...under these drivers and rate (each: a light load, where the
    /// cost per query stands out of the window-to-window noise, and a
    /// heavy one, for latency).
    pub nearby_under: Vec<(usize, f64)>,
    /// Each measuring window.
    pub window: Duration,
    /// (drivers, rate, riders).
    pub latency_loads: Vec<(usize, f64, usize)>,
    /// (drivers, rate, riders) on one square kilometre.
    pub fanout: (usize, f64, usize),
    /// (connections, seconds between a driver's fixes, handshakes per
    /// second while ramping up).
    pub idle: (usize, f64, f64),
    /// (drivers, rate, dashboards): half watch the city, half a district.
    pub dashboards: (usize, f64, usize),
    /// Zones over the city, each count an ingest window at the ingest
    /// phase's load, one after another at the end of the run (0 first: the
    /// node as it is then, to compare with).
    pub zones: Vec<usize>,
    pub redis_benchmark_requests: usize,
}

impl Sizes {
    pub fn full() -> Self {
        Self {
            ingest: (10_000, 1.0),
            nearby_per_s: 200.0,
            nearby_under: vec![(10_000, 0.2), (10_000, 2.0)],
            window: Duration::from_secs(15),
            // The last is past what this machine carries with the simulator
            // beside the node: it shows where that is.
            latency_loads: vec![(2_000, 1.0, 500), (5_000, 1.0, 1_000), (10_000, 1.0, 1_000)],
            fanout: (500, 4.0, 300),
            idle: (50_000, 50.0, 500.0),
            dashboards: (2_000, 1.0, 2_000),
            zones: vec![0, 100, 10_000],
            redis_benchmark_requests: 2_000_000,
        }
    }

    /// Seconds, tiny sizes: proves every phase runs, measures nothing.
    pub fn smoke() -> Self {
        Self {
            ingest: (20, 5.0),
            nearby_per_s: 20.0,
            nearby_under: vec![(20, 5.0)],
            window: Duration::from_secs(2),
            latency_loads: vec![(20, 5.0, 10)],
            fanout: (20, 5.0, 10),
            idle: (50, 50.0, 200.0),
            dashboards: (20, 2.0, 10),
            zones: vec![0, 10],
            redis_benchmark_requests: 20_000,
        }
    }
}

#[derive(Debug, Serialize)]
pub struct Report {
    pub machine: String,
    pub command: String,
    pub sizes: Sizes,
    pub redis_geoadd_per_s: Option<f64>,
    pub ingest: IngestCost,
    pub nearby: Vec<NearbyCost>,
    pub fanout: FanoutCost,
    pub latency: Vec<LatencyStep>,
    pub dashboards: DashboardStep,
    pub idle: IdleStep,
    pub zones: Vec<ZonesCost>,
    pub capacity: Capacity,
}

/// Ingest with zones over the city.
#[derive(Debug, Serialize)]
pub struct ZonesCost {
    pub zones: usize,
    /// Cells the node's zone index holds.
    pub zone_cells: f64,
    pub window: Window,
    pub node_us_per_fix: f64,
    pub redis_us_per_fix: f64,
    /// Entries and exits per second (each fix's crossings).
    pub events_per_s: f64,
    /// Exact point-in-polygon tests per fix.
    pub tests_per_fix: f64,
    /// From the fix that caused an event to the event in the stream
    /// (the node's histogram: bucket bounds).
    pub event_p50_ms: f64,
    pub event_p99_ms: f64,
    /// Putting the zones: how long, over HTTP, one at a time.
    pub put_s: f64,
}

#[derive(Debug, Serialize)]
pub struct IngestCost {
    pub drivers: usize,
    pub rate_hz: f64,
    pub window: Window,
    pub node_us_per_fix: f64,
    pub redis_us_per_fix: f64,
    /// UDP datagrams on the wire per fix, both directions.
    pub datagrams_per_fix: f64,
    pub bytes_in_per_fix: f64,
    pub bytes_out_per_fix: f64,
}

#[derive(Debug, Serialize)]
pub struct NearbyCost {
    pub window: Window,
    /// Node CPU per query, the fixes' own cost taken out (none when no
    /// query was answered).
    pub node_us_per_query: Option<f64>,
    pub redis_us_per_query: Option<f64>,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
    pub requests: u64,
}

#[derive(Debug, Serialize)]
pub struct FanoutCost {
    pub riders: usize,
    pub window: Window,
    /// Node CPU per delta item, the fixes' own cost taken out.
    pub node_us_per_item: Option<f64>,
    pub items_per_frame: f64,
    /// Moved items riders applied, per second.
    pub applied_moves_per_s: f64,
    pub bytes_per_item: f64,
    pub bytes_per_moved_record: usize,
}

#[derive(Debug, Serialize)]
pub struct LatencyStep {
    pub riders: usize,
    pub window: Window,
    pub sent_per_s: f64,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub p999_ms: f64,
    /// Inside the node (fix in → delta written), bucket bounds.
    pub node_delay_p50_ms: f64,
    pub node_delay_p99_ms: f64,
}

#[derive(Debug, Serialize)]
pub struct DashboardStep {
    pub dashboards: u64,
    pub window: Window,
    pub rss_before_kib: u64,
    pub rss_after_kib: u64,
    pub kib_per_dashboard: f64,
    /// Node CPU per item sent to dashboards, the fixes' own cost taken out.
    pub node_us_per_item: Option<f64>,
    /// Watching the whole city: per-cell counts.
    pub city: ViewSummary,
    /// Watching a district of about 2 km: every vehicle.
    pub district: ViewSummary,
}

#[derive(Debug, Serialize)]
pub struct IdleStep {
    pub target: usize,
    pub connected: u64,
    pub connect_errors: u64,
    pub ramp_s: f64,
    pub handshake_p50_ms: f64,
    pub handshake_p99_ms: f64,
    pub handshake_max_ms: f64,
    pub rss_before_kib: u64,
    pub rss_after_kib: u64,
    pub kib_per_connection: f64,
    pub window: Window,
    /// Node CPU per connection per second, the fixes' own cost taken out.
    pub node_us_per_connection_s: f64,
    /// UDP datagrams per connection per minute, both directions, fixes
    /// included.
    pub datagrams_per_connection_min: f64,
}

/// What one core of the node carries of each operation alone, from the
/// costs above; and Redis.
#[derive(Debug, Serialize)]
pub struct Capacity {
    pub fixes_per_core_s: Option<f64>,
    pub delta_items_per_core_s: Option<f64>,
    pub dashboard_items_per_core_s: Option<f64>,
    pub nearby_per_core_s: Option<f64>,
    pub idle_connections_per_core: Option<f64>,
    pub idle_connections_per_gib: Option<f64>,
    pub redis_fixes_per_core_s: Option<f64>,
}

/// CPU µs per operation, or none when too few were counted to say.
fn per_op(us_per_s: f64, ops_per_s: f64) -> Option<f64> {
    (ops_per_s >= 1.0).then(|| us_per_s / ops_per_s)
}

/// A figure for the table, or "n/a".
fn shown(v: Option<f64>, decimals: usize) -> String {
    v.map_or("n/a".into(), |v| format!("{v:.decimals$}"))
}

/// Handshakes in flight at once. Drivers start reporting as soon as they
/// connect, so a gentler ramp keeps late handshakes from starving on a
/// machine the load already fills.
const BENCH_HANDSHAKES: usize = 32;

/// A process we started, killed when dropped.
struct Owned(Child);

impl Drop for Owned {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The node, in its own process.
struct NodeProcess {
    _child: Owned,
    pid: u32,
    quic: SocketAddr,
    http: SocketAddr,
    admin: SocketAddr,
    cert: PathBuf,
}

fn start_node(redis_url: &str, dev_dir: &Path, secret: &str) -> anyhow::Result<NodeProcess> {
    let exe = std::env::current_exe().context("finding this executable")?;
    let mut child = Command::new(exe)
        .args(["serve-node", "--redis-url", redis_url, "--dev-dir"])
        .arg(dev_dir)
        .env("HEXFLEET_TOKEN_SECRET", secret)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .context("starting the node process")?;
    let pid = child.id();
    let stdout = child.stdout.take().context("the node's stdout")?;
    let owned = Owned(child);
    for line in BufReader::new(stdout).lines() {
        let line = line?;
        if let Some(rest) = line.strip_prefix("READY ") {
            let mut parts = rest.split(' ');
            let (Some(quic), Some(http), Some(admin), Some(cert)) =
                (parts.next(), parts.next(), parts.next(), parts.next())
            else {
                bail!("unexpected READY line {line:?}");
            };
            return Ok(NodeProcess {
                _child: owned,
                pid,
                quic: quic.parse()?,
                http: http.parse()?,
                admin: admin.parse()?,
                cert: cert.into(),
            });
        }
    }
    bail!("the node process ended before it was ready")
}

pub(crate) fn rss_kib(pid: u32) -> anyhow::Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .context("VmRSS in /proc/PID/status")
}

/// The raw pipelined GEOADD rate, when redis-benchmark is installed.
fn redis_geoadd_rate(port: u16, requests: usize) -> Option<f64> {
    let out = Command::new("redis-benchmark")
        .args([
            "-h",
            "127.0.0.1",
            "-p",
            &port.to_string(),
            "-P",
            "64",
            "-r",
            "1000000",
            "-q",
        ])
        .args(["-n", &requests.to_string()])
        .args([
            "GEOADD",
            "hexfleet:bench:geo",
            "13.4",
            "52.5",
            "member:__rand_int__",
        ])
        .output()
        .ok()?;
    // "GEOADD ...: 123456.79 requests per second, p50=..." (the last of
    // several progress lines separated by carriage returns).
    let text = String::from_utf8_lossy(&out.stdout).replace('\r', "\n");
    text.lines()
        .filter_map(|l| l.split_once(" requests per second"))
        .filter_map(|(before, _)| before.split_whitespace().next_back()?.parse::<f64>().ok())
        .next_back()
}

/// The cumulative buckets of the node's delta delay histogram: (upper
/// bound in seconds, count).
fn delay_buckets(text: &str) -> Vec<(f64, f64)> {
    buckets(text, "hexfleet_delta_delay_seconds")
}

/// A counter's value (summed over its labels) in a metrics text.
fn counter(text: &str, name: &str) -> f64 {
    text.lines()
        .filter(|l| l.starts_with(name) && !l.starts_with('#'))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// The cumulative buckets of one of the node's histograms.
fn buckets(text: &str, histogram: &str) -> Vec<(f64, f64)> {
    let prefix = format!("{histogram}_bucket{{le=\"");
    text.lines()
        .filter_map(|l| l.strip_prefix(prefix.as_str()))
        .filter_map(|rest| {
            let (le, count) = rest.split_once("\"} ")?;
            let le = if le == "+Inf" {
                f64::INFINITY
            } else {
                le.parse().ok()?
            };
            Some((le, count.trim().parse().ok()?))
        })
        .collect()
}

/// The bucket bound under which quantile `q` of the observations made
/// between two snapshots fall, in milliseconds.
fn bucket_quantile_ms(before: &[(f64, f64)], after: &[(f64, f64)], q: f64) -> f64 {
    let window: Vec<(f64, f64)> = after
        .iter()
        .map(|&(le, n)| {
            (
                le,
                n - before
                    .iter()
                    .find(|(b, _)| *b == le)
                    .map_or(0.0, |(_, m)| *m),
            )
        })
        .collect();
    let total = window.last().map_or(0.0, |(_, n)| *n);
    window
        .iter()
        .find(|(_, n)| total > 0.0 && *n >= q * total)
        .map_or(0.0, |(le, _)| le * 1e3)
}

async fn metrics_text(http: &reqwest::Client, addr: SocketAddr) -> anyhow::Result<String> {
    Ok(http
        .get(format!("http://{addr}/metrics"))
        .send()
        .await?
        .text()
        .await?)
}

struct Bench {
    node: NodeProcess,
    secret: String,
    http: reqwest::Client,
    probe: Probe,
    seed: u64,
}

/// A fleet running in the background until [`Running::finish`].
struct Running {
    scenario: Scenario,
    stats: Arc<FleetStats>,
    book: Arc<LatencyBook>,
    stop: CancellationToken,
    fleet: tokio::task::JoinHandle<anyhow::Result<fleet::Outcome>>,
    started: Instant,
}

impl Running {
    async fn finish(self, node: &str) -> anyhow::Result<Summary> {
        self.stop.cancel();
        let outcome = self.fleet.await??;
        Ok(Summary::new(
            &self.scenario,
            node,
            &self.stats,
            &self.book,
            None,
            &outcome,
            self.started.elapsed(),
        ))
    }

    fn sent(&self) -> u64 {
        self.stats.sent.load(std::sync::atomic::Ordering::Relaxed)
    }
}

impl Bench {
    fn scenario(&self, name: &str, drivers: usize, rate: f64, riders: usize) -> Scenario {
        let mut s = Scenario {
            name: name.into(),
            duration: Duration::from_secs(3600),
            seed: self.seed,
            ..Scenario::default()
        };
        s.drivers.count = drivers;
        s.drivers.rate_hz = rate;
        s.drivers.off_duty_per_minute = 0.0;
        // Leave nothing behind to go stale during the next phase.
        s.drivers.goodbye = true;
        s.riders.count = riders;
        s.riders.radius_m = 1_000.0;
        s
    }

    /// Starts a fleet and waits (bounded) until everyone has connected.
    async fn launch(
        &self,
        scenario: Scenario,
        connect_per_s: Option<f64>,
        within: Duration,
    ) -> Running {
        let stats = Arc::new(FleetStats::default());
        let book = Arc::new(LatencyBook::default());
        let stop = CancellationToken::new();
        let target = Target {
            node: self.node.quic,
            seeds: Vec::new(),
            token_secret: self.secret.clone(),
            connect_concurrency: BENCH_HANDSHAKES,
            connect_per_s,
        };
        let cert = self.node.cert.clone();
        let prefix = format!("b{}", rand::rng().random::<u32>());
        let fleet = {
            let (scenario, stats, book, stop) =
                (scenario.clone(), stats.clone(), book.clone(), stop.clone());
            tokio::spawn(async move {
                fleet::run(
                    &scenario,
                    &target,
                    &prefix,
                    || Connector::new(&cert, hexfleet_protocol::dev::DEV_SERVER_NAME),
                    stats,
                    book,
                    stop,
                )
                .await
            })
        };
        let started = Instant::now();
        let everyone = (scenario.drivers.count + scenario.riders.count) as u64;
        let deadline = Instant::now() + within;
        while stats.settled() < everyone && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        // Let the first fixes (each vehicle's arrival) pass.
        tokio::time::sleep(Duration::from_secs(2)).await;
        Running {
            scenario,
            stats,
            book,
            stop,
            fleet,
            started,
        }
    }

    /// A steady window of `length`, optionally with nearby queries.
    async fn window(
        &self,
        length: Duration,
        nearby: Option<(crate::movement::BBox, f64)>,
    ) -> anyhow::Result<(Window, Option<Histogram<u64>>)> {
        let a = self.probe.read().await?;
        let queries = match nearby {
            Some((bbox, per_s)) => Some(self.nearby_load(bbox, per_s, length).await?),
            None => {
                tokio::time::sleep(length).await;
                None
            }
        };
        let b = self.probe.read().await?;
        Ok((Window::between(&a, &b), queries))
    }

    async fn ingest(
        &self,
        (drivers, rate): (usize, f64),
        sizes: &Sizes,
    ) -> anyhow::Result<IngestCost> {
        let scenario = self.scenario("ingest", drivers, rate, 0);
        let running = self.launch(scenario, None, Duration::from_secs(180)).await;
        let (window, _) = self.window(sizes.window, None).await?;
        let (in_b, out_b) = window.bytes_per_fix();
        let ingest = IngestCost {
            drivers,
            rate_hz: rate,
            node_us_per_fix: window.node_us_per_fix(),
            redis_us_per_fix: window.redis_us_per_fix(),
            datagrams_per_fix: window.datagrams_per_fix(),
            bytes_in_per_fix: in_b,
            bytes_out_per_fix: out_b,
            window,
        };
        eprintln!(
            "bench: {:.0} fixes/s: node {:.1} µs/fix, redis {:.1} µs/fix, {:.2} datagrams/fix",
            window.fixes_per_s,
            ingest.node_us_per_fix,
            ingest.redis_us_per_fix,
            ingest.datagrams_per_fix
        );
        running.finish(&self.node.quic.to_string()).await?;
        Ok(ingest)
    }

    /// Nearby queries under ingest: a window without them, then one with
    /// them; the difference is what the queries cost.
    async fn nearby(
        &self,
        (drivers, rate): (usize, f64),
        sizes: &Sizes,
    ) -> anyhow::Result<NearbyCost> {
        let scenario = self.scenario("nearby", drivers, rate, 0);
        let bbox = scenario.bbox();
        let running = self.launch(scenario, None, Duration::from_secs(180)).await;
        let (quiet, _) = self.window(sizes.window, None).await?;
        let (window, queries) = self
            .window(sizes.window, Some((bbox, sizes.nearby_per_s)))
            .await?;
        running.finish(&self.node.quic.to_string()).await?;
        let queries = queries.context("nearby latencies")?;
        let per_query = |beyond: f64| per_op(beyond, window.nearby_per_s);
        let ms = |q: f64| queries.value_at_quantile(q) as f64 / 1e3;
        Ok(NearbyCost {
            node_us_per_query: per_query(window.beyond_fixes(quiet.node_us_per_fix())),
            redis_us_per_query: per_query(
                (window.redis_cpu_us_per_s - window.fixes_per_s * quiet.redis_us_per_fix())
                    .max(0.0),
            ),
            p50_ms: ms(0.5),
            p99_ms: ms(0.99),
            max_ms: queries.max() as f64 / 1e3,
            requests: queries.len(),
            window,
        })
    }

    async fn fanout(
        &self,
        (drivers, rate, riders): (usize, f64, usize),
        sizes: &Sizes,
        us_per_fix: f64,
    ) -> anyhow::Result<FanoutCost> {
        let mut scenario = self.scenario("fan-out", drivers, rate, riders);
        // One square kilometre: every rider sees most of the fleet.
        scenario.city.bbox = [52.515, 13.395, 52.524, 13.410];
        scenario.riders.walking_share = 0.0;
        let running = self.launch(scenario, None, Duration::from_secs(120)).await;
        running.book.reset();
        let started = Instant::now();
        let (window, _) = self.window(sizes.window, None).await?;
        let applied = running.book.percentiles().samples as f64 / started.elapsed().as_secs_f64();
        let summary = running.finish(&self.node.quic.to_string()).await?;
        Ok(FanoutCost {
            riders,
            node_us_per_item: per_op(window.beyond_fixes(us_per_fix), window.delta_items_per_s),
            items_per_frame: window.delta_items_per_s / window.delta_frames_per_s.max(1e-9),
            applied_moves_per_s: applied,
            bytes_per_item: summary.deltas.bytes_per_item,
            bytes_per_moved_record: hexfleet_protocol::Moved::LEN,
            window,
        })
    }

    async fn latency(
        &self,
        (drivers, rate, riders): (usize, f64, usize),
        sizes: &Sizes,
    ) -> anyhow::Result<LatencyStep> {
        let scenario = self.scenario("latency", drivers, rate, riders);
        let running = self.launch(scenario, None, Duration::from_secs(180)).await;
        running.book.reset();
        let delays0 = delay_buckets(&metrics_text(&self.http, self.node.admin).await?);
        let sent0 = running.sent();
        let (window, _) = self.window(sizes.window, None).await?;
        let delays1 = delay_buckets(&metrics_text(&self.http, self.node.admin).await?);
        let sent_per_s = (running.sent() - sent0) as f64 / window.secs;
        let summary = running.finish(&self.node.quic.to_string()).await?;
        Ok(LatencyStep {
            riders,
            sent_per_s,
            p50_ms: summary.latency_ms.p50,
            p99_ms: summary.latency_ms.p99,
            p999_ms: summary.latency_ms.p999,
            node_delay_p50_ms: bucket_quantile_ms(&delays0, &delays1, 0.5),
            node_delay_p99_ms: bucket_quantile_ms(&delays0, &delays1, 0.99),
            window,
        })
    }

    /// Puts `n` zones over the city, then an ingest window at the ingest
    /// phase's load: what zones add to a fix, and how soon an event is in
    /// the stream.
    async fn zones(
        &self,
        n: usize,
        (drivers, rate): (usize, f64),
        sizes: &Sizes,
    ) -> anyhow::Result<ZonesCost> {
        let scenario = self.scenario("zones", drivers, rate, 0);
        let put_s = self.put_zones(n, scenario.bbox()).await?;
        let running = self.launch(scenario, None, Duration::from_secs(180)).await;
        let before = metrics_text(&self.http, self.node.admin).await?;
        let (window, _) = self.window(sizes.window, None).await?;
        let after = metrics_text(&self.http, self.node.admin).await?;
        running.finish(&self.node.quic.to_string()).await?;
        let (d0, d1) = (
            buckets(&before, "hexfleet_zone_event_delay_seconds"),
            buckets(&after, "hexfleet_zone_event_delay_seconds"),
        );
        let delta = |name: &str| counter(&after, name) - counter(&before, name);
        let fixes = window.fixes_per_s * window.secs;
        let cost = ZonesCost {
            zones: n,
            zone_cells: counter(&after, "hexfleet_zone_cells"),
            node_us_per_fix: window.node_us_per_fix(),
            redis_us_per_fix: window.redis_us_per_fix(),
            events_per_s: delta("hexfleet_zone_events_total") / window.secs,
            tests_per_fix: delta("hexfleet_zone_tests_total") / fixes.max(1.0),
            event_p50_ms: bucket_quantile_ms(&d0, &d1, 0.5),
            event_p99_ms: bucket_quantile_ms(&d0, &d1, 0.99),
            put_s,
            window,
        };
        eprintln!(
            "bench: {n} zones: node {:.1} µs/fix, {:.0} events/s, event p99 {:.1} ms",
            cost.node_us_per_fix, cost.events_per_s, cost.event_p99_ms
        );
        Ok(cost)
    }

    /// Puts zones `z0`… up to `n` (star-shaped, 150–600 m across, over the
    /// city), eight requests at a time; waits until the node applies them.
    async fn put_zones(&self, n: usize, city: crate::movement::BBox) -> anyhow::Result<f64> {
        let operator = crate::fleet::token(
            &self.secret,
            hexfleet_protocol::Role::Dashboard,
            "bench-ops",
        )?;
        let started = Instant::now();
        let mut rng = rand::rngs::StdRng::seed_from_u64(self.seed);
        let bodies: Vec<(usize, String)> = (0..n)
            .map(|i| {
                let lat = rng.random_range(city.min_lat..city.max_lat);
                let lon = rng.random_range(city.min_lon..city.max_lon);
                let r = rng.random_range(150.0..600.0);
                let k = rng.random_range(6..24);
                let mut ring: Vec<[f64; 2]> = (0..k)
                    .map(|j| {
                        use geo::Destination;
                        let bearing = j as f64 / k as f64 * 360.0;
                        let r = rng.random_range(0.5 * r..r);
                        let p = geo::Haversine.destination(geo::Point::new(lon, lat), bearing, r);
                        [p.x(), p.y()]
                    })
                    .collect();
                ring.push(ring[0]);
                let body = serde_json::json!({"type": "Feature", "properties": {"kind": "venue"},
                    "geometry": {"type": "Polygon", "coordinates": [ring]}});
                (i, body.to_string())
            })
            .collect();
        let mut puts = futures_util::stream::iter(bodies)
            .map(|(i, body)| {
                let request = self
                    .http
                    .put(format!("http://{}/v1/zones/z{i}", self.node.http))
                    .bearer_auth(&operator)
                    .body(body);
                async move { request.send().await.and_then(|r| r.error_for_status()) }
            })
            .buffer_unordered(8);
        while let Some(put) = puts.next().await {
            put.context("putting a zone")?;
        }
        let deadline = Instant::now() + Duration::from_secs(120);
        while counter(
            &metrics_text(&self.http, self.node.admin).await?,
            "hexfleet_zones",
        ) < n as f64
        {
            anyhow::ensure!(
                Instant::now() < deadline,
                "the node did not apply {n} zones"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        Ok(started.elapsed().as_secs_f64())
    }

    /// Queries the nearby API at a steady rate for `duration`.
    async fn nearby_load(
        &self,
        bbox: crate::movement::BBox,
        per_s: f64,
        duration: Duration,
    ) -> anyhow::Result<Histogram<u64>> {
        let reader = crate::fleet::token(
            &self.secret,
            hexfleet_protocol::Role::Dashboard,
            "bench-reader",
        )?;
        let mut histogram = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3)?;
        let mut ticker = tokio::time::interval(Duration::from_secs_f64(1.0 / per_s));
        let end = Instant::now() + duration;
        let mut rng = rand::rng();
        while Instant::now() < end {
            ticker.tick().await;
            let (lat, lon) = bbox.random_point(&mut rng);
            let url = format!(
                "http://{}/v1/vehicles?lat={lat}&lon={lon}&radius_m=1000&limit=10",
                self.node.http
            );
            let started = Instant::now();
            let ok = self
                .http
                .get(&url)
                .bearer_auth(&reader)
                .send()
                .await
                .is_ok_and(|r| r.status().is_success());
            if ok {
                histogram.record((started.elapsed().as_micros() as u64).max(1))?;
            }
        }
        Ok(histogram)
    }

    /// Runs a fleet, then connects dashboards (half on the whole city, half
    /// on districts): node memory and CPU per dashboard item, what they
    /// receive, and how long a fix takes to reach a district dashboard.
    async fn dashboards(
        &self,
        (drivers, rate, count): (usize, f64, usize),
        sizes: &Sizes,
        us_per_fix: f64,
    ) -> anyhow::Result<DashboardStep> {
        let scenario = self.scenario("dashboards", drivers, rate, 0);
        let bbox = scenario.bbox();
        let running = self.launch(scenario, None, Duration::from_secs(120)).await;
        let before = rss_kib(self.node.pid)?;
        let dashboard_stats = Arc::new(DashboardStats::default());
        let watchers = tokio::spawn(dashboards::watch(
            count,
            Arc::new(dashboards::Target {
                http: self.node.http,
                tls: None,
                token_secret: self.secret.clone(),
                format: hexfleet_protocol::dashboard::Format::Json,
            }),
            bbox,
            self.seed,
            dashboard_stats.clone(),
            running.book.clone(),
            running.stop.clone(),
        ));
        let connected = || {
            dashboard_stats
                .city
                .connected
                .load(std::sync::atomic::Ordering::Relaxed)
                + dashboard_stats
                    .district
                    .connected
                    .load(std::sync::atomic::Ordering::Relaxed)
        };
        let deadline = Instant::now() + Duration::from_secs(60);
        while (connected() as usize) < count && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        tokio::time::sleep(Duration::from_secs(2)).await;
        let after = rss_kib(self.node.pid)?;
        dashboard_stats.reset();
        let started = Instant::now();
        let (window, _) = self.window(sizes.window, None).await?;
        let secs = started.elapsed().as_secs_f64();
        let city = ViewSummary::of(&dashboard_stats.city, secs);
        let district = ViewSummary::of(&dashboard_stats.district, secs);
        let dashboards = connected();
        running.finish(&self.node.quic.to_string()).await?;
        let _ = watchers.await;
        Ok(DashboardStep {
            dashboards,
            rss_before_kib: before,
            rss_after_kib: after,
            kib_per_dashboard: after.saturating_sub(before) as f64 / dashboards.max(1) as f64,
            node_us_per_item: per_op(window.beyond_fixes(us_per_fix), window.delta_items_per_s),
            window,
            city,
            district,
        })
    }

    /// Connects `n` drivers, paced, that report once every `every_s`:
    /// handshake latency, the node's memory before and after, and its CPU
    /// while they idle.
    async fn idle(
        &self,
        (n, every_s, per_s): (usize, f64, f64),
        sizes: &Sizes,
        us_per_fix: f64,
    ) -> anyhow::Result<IdleStep> {
        let before = rss_kib(self.node.pid)?;
        let mut scenario = self.scenario("idle connections", n, 1.0 / every_s, 0);
        scenario.drivers.gps_noise_m = 0.0;
        let ramp = n as f64 / per_s;
        let running = self
            .launch(
                scenario,
                Some(per_s),
                Duration::from_secs_f64(ramp * 2.0 + 60.0),
            )
            .await;
        let ramp_s = running.started.elapsed().as_secs_f64();
        let connected = running
            .stats
            .connected
            .load(std::sync::atomic::Ordering::Relaxed);
        let connect_errors = running
            .stats
            .connect_errors
            .load(std::sync::atomic::Ordering::Relaxed);
        let (p50, p99, max) = running.stats.connect_percentiles().unwrap_or_default();
        let after = rss_kib(self.node.pid)?;
        let (window, _) = self.window(sizes.window, None).await?;
        running.finish(&self.node.quic.to_string()).await?;
        let per_conn = connected.max(1) as f64;
        Ok(IdleStep {
            target: n,
            connected,
            connect_errors,
            ramp_s,
            handshake_p50_ms: p50,
            handshake_p99_ms: p99,
            handshake_max_ms: max,
            rss_before_kib: before,
            rss_after_kib: after,
            kib_per_connection: after.saturating_sub(before) as f64 / per_conn,
            node_us_per_connection_s: window.beyond_fixes(us_per_fix) / per_conn,
            datagrams_per_connection_min: (window.datagrams_in_per_s + window.datagrams_out_per_s)
                * 60.0
                / per_conn,
            window,
        })
    }
}

pub struct Options {
    pub redis_url: Option<String>,
    pub smoke: bool,
    pub json: Option<PathBuf>,
    pub markdown: Option<PathBuf>,
    pub command: String,
}

fn machine() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|c| {
            c.lines().find_map(|l| {
                l.strip_prefix("model name")
                    .map(|v| v.trim_start_matches([' ', '\t', ':']).to_string())
            })
        })
        .unwrap_or_else(|| "unknown CPU".into());
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    let mem_gib = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            m.lines().find_map(|l| {
                l.strip_prefix("MemTotal:")
                    .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
            })
        })
        .map_or(0.0, |kib| kib / 1024.0 / 1024.0);
    format!(
        "{cores} cores ({cpu}), {mem_gib:.0} GiB; node, Redis and simulator on the same machine"
    )
}

pub async fn run(options: Options) -> anyhow::Result<Report> {
    let sizes = if options.smoke {
        Sizes::smoke()
    } else {
        Sizes::full()
    };
    let scratch = tempfile::tempdir()?;
    let (_redis, redis_url, redis_port) = match &options.redis_url {
        Some(url) => {
            let port = url
                .rsplit(':')
                .next()
                .and_then(|p| p.trim_end_matches('/').parse().ok())
                .unwrap_or(6379);
            (None, url.clone(), port)
        }
        None => {
            let redis = RedisServer::try_start()?;
            let (url, port) = (redis.url(), redis.port);
            (Some(redis), url, port)
        }
    };
    let secret = format!("bench-{}", rand::rng().random::<u64>());
    let node = start_node(&redis_url, scratch.path(), &secret)?;
    let http = reqwest::Client::new();
    let probe = Probe {
        node_pid: node.pid,
        admin: node.admin,
        redis: Some(redis::Client::open(redis_url.as_str())?),
        http: http.clone(),
    };
    let bench = Bench {
        node,
        secret,
        http,
        probe,
        seed: 7,
    };
    eprintln!(
        "bench: node pid {} on {} / http {}; redis {redis_url}",
        bench.node.pid, bench.node.quic, bench.node.http
    );

    eprintln!("bench: redis-benchmark GEOADD -P 64");
    let redis_geoadd_per_s = redis_geoadd_rate(redis_port, sizes.redis_benchmark_requests);

    let (drivers, rate) = sizes.ingest;
    eprintln!("bench: ingest, {drivers} drivers at {rate} Hz");
    let ingest = bench.ingest(sizes.ingest, &sizes).await?;
    let mut nearby = Vec::new();
    for &(drivers, rate) in &sizes.nearby_under {
        eprintln!(
            "bench: nearby queries at {}/s under {drivers} drivers at {rate} Hz",
            sizes.nearby_per_s
        );
        nearby.push(bench.nearby((drivers, rate), &sizes).await?);
    }
    let us_per_fix = ingest.node_us_per_fix;

    let (_, _, riders) = sizes.fanout;
    eprintln!("bench: fan-out, {riders} riders over a dense area");
    let fanout = bench.fanout(sizes.fanout, &sizes, us_per_fix).await?;

    let mut latency = Vec::new();
    for &load in &sizes.latency_loads {
        eprintln!(
            "bench: latency at {:.0} fixes/s with {} riders",
            load.0 as f64 * load.1,
            load.2
        );
        latency.push(bench.latency(load, &sizes).await?);
    }

    eprintln!("bench: {} dashboards", sizes.dashboards.2);
    let dashboards = bench
        .dashboards(sizes.dashboards, &sizes, us_per_fix)
        .await?;

    eprintln!("bench: {} idle driver connections", sizes.idle.0);
    let idle = bench.idle(sizes.idle, &sizes, us_per_fix).await?;

    // Last: the zones stay.
    let mut zones = Vec::new();
    for &n in &sizes.zones {
        eprintln!("bench: ingest under {n} zones");
        zones.push(bench.zones(n, sizes.ingest, &sizes).await?);
    }

    let per_core = |us: Option<f64>| us.filter(|&us| us > 0.0).map(|us| 1e6 / us);
    let capacity = Capacity {
        fixes_per_core_s: per_core(Some(ingest.node_us_per_fix)),
        delta_items_per_core_s: per_core(fanout.node_us_per_item),
        dashboard_items_per_core_s: per_core(dashboards.node_us_per_item),
        nearby_per_core_s: per_core(nearby.first().and_then(|n| n.node_us_per_query)),
        idle_connections_per_core: per_core(Some(idle.node_us_per_connection_s)),
        idle_connections_per_gib: (idle.kib_per_connection > 0.0)
            .then(|| 1024.0 * 1024.0 / idle.kib_per_connection),
        redis_fixes_per_core_s: per_core(Some(ingest.redis_us_per_fix)),
    };
    let report = Report {
        machine: machine(),
        command: options.command.clone(),
        sizes,
        redis_geoadd_per_s,
        ingest,
        nearby,
        fanout,
        latency,
        dashboards,
        idle,
        zones,
        capacity,
    };
    let markdown = report.markdown();
    println!("{markdown}");
    if let Some(path) = &options.json {
        std::fs::write(path, serde_json::to_vec_pretty(&report)?)
            .with_context(|| format!("writing {}", path.display()))?;
    }
    if let Some(path) = &options.markdown {
        std::fs::write(path, &markdown).with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(report)
}

impl Report {
    pub fn markdown(&self) -> String {
        let mut out = String::new();
        let mut line = |s: String| {
            out.push_str(&s);
            out.push('\n');
        };
        line("# hexfleet benchmarks".into());
        line(String::new());
        line(format!("Machine: {}.", self.machine));
        line(String::new());
        line(format!("Reproduce: `{}`", self.command));
        line(String::new());
        line("## What the node spends per operation".into());
        line(String::new());
        line("Node and Redis CPU time (user + system, `/proc/PID/stat` and `INFO cpu`) over a steady window, divided by what the node counted in it; where other work runs beside (fixes under queries, deltas, dashboards), the fixes' own cost is taken out first.".into());
        line(String::new());
        line("| measure | result | target |".into());
        line("|---|---|---|".into());
        let i = &self.ingest;
        let w = &i.window;
        line(format!(
            "| node CPU per accepted fix ({} drivers at {} Hz, Redis store) | **{:.1} µs** ({:.0} fixes/s; node {:.2} cores) | ≤ 10 µs |",
            i.drivers, i.rate_hz, i.node_us_per_fix, w.fixes_per_s, w.node_cpu_us_per_s / 1e6
        ));
        line(format!(
            "| Redis CPU per fix | **{:.1} µs** | ≤ 2 µs |",
            i.redis_us_per_fix
        ));
        line(format!(
            "| UDP datagrams per fix, both directions | **{:.2}** ({:.2} in, {:.2} out); {:.0} bytes in, {:.0} out per fix | ≤ 1.5 |",
            i.datagrams_per_fix,
            w.datagrams_in_per_s / w.fixes_per_s.max(1e-9),
            w.datagrams_out_per_s / w.fixes_per_s.max(1e-9),
            i.bytes_in_per_fix,
            i.bytes_out_per_fix
        ));
        for n in &self.nearby {
            line(format!(
            "| nearby query (10 results, 1 km) under {:.0} fixes/s | **{} µs** node CPU, {} µs Redis; p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms ({} requests, {:.0}/s) | ≤ 50 µs; p99 ≤ 5 ms |",
            n.window.fixes_per_s, shown(n.node_us_per_query, 1), shown(n.redis_us_per_query, 1), n.p50_ms, n.p99_ms, n.max_ms, n.requests, n.window.nearby_per_s
        ));
        }
        let f = &self.fanout;
        line(format!(
            "| node CPU per delta item to riders ({} riders on one km², {:.0} fixes/s) | **{} µs** ({:.0} items/s, {:.1} items per frame) | ≤ 1 µs |",
            f.riders, f.window.fixes_per_s, shown(f.node_us_per_item, 2), f.window.delta_items_per_s, f.items_per_frame
        ));
        line(format!(
            "| wire bytes per delta item | **{:.1}** (a moved record is {} bytes) | ≤ 16 |",
            f.bytes_per_item, f.bytes_per_moved_record
        ));
        let d = &self.dashboards;
        line(format!(
            "| node CPU per dashboard item ({} dashboards, JSON) | **{} µs** ({:.0} items/s) | |",
            d.dashboards,
            shown(d.node_us_per_item, 2),
            d.window.delta_items_per_s
        ));
        let c = &self.idle;
        line(format!(
            "| memory per idle driver connection | **{:.1} KiB** ({} connections: RSS {} → {} KiB) | ≤ 16 KiB |",
            c.kib_per_connection, c.connected, c.rss_before_kib, c.rss_after_kib
        ));
        line(format!(
            "| connections held (one fix per {:.0} s each), paced at {:.0}/s | **{} of {}**, {} connect errors; handshake p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms | all; p99 ≤ 200 ms |",
            self.sizes.idle.1, self.sizes.idle.2, c.connected, c.target, c.connect_errors, c.handshake_p50_ms, c.handshake_p99_ms, c.handshake_max_ms
        ));
        line(format!(
            "| node CPU per idle connection | **{:.2} µs per second** ({:.1} datagrams per connection per minute, fixes included) | ≤ 1 µs/s |",
            c.node_us_per_connection_s, c.datagrams_per_connection_min
        ));
        line(String::new());
        let k = &self.capacity;
        line("### One core of the node, from these costs".into());
        line(String::new());
        line("| operation | per core per second |".into());
        line("|---|---|".into());
        for (what, v) in [
            ("fixes", k.fixes_per_core_s),
            ("delta items to riders", k.delta_items_per_core_s),
            ("dashboard items", k.dashboard_items_per_core_s),
            ("nearby queries", k.nearby_per_core_s),
            ("idle connections held (CPU)", k.idle_connections_per_core),
            (
                "idle connections per GiB of memory",
                k.idle_connections_per_gib,
            ),
            ("Redis: fixes per Redis core", k.redis_fixes_per_core_s),
        ] {
            line(format!("| {what} | {} |", shown(v, 0)));
        }
        line(String::new());
        line("## Latency at loads this machine carries".into());
        line(String::new());
        line("| load | fix created → rider applied | inside the node (fix in → delta written) | node CPU |".into());
        line("|---|---|---|---|".into());
        for s in &self.latency {
            line(format!(
                "| {:.0} fixes/s (sent {:.0}/s), {} riders, {:.0} delta items/s | p50 {:.2} ms, p99 {:.2} ms, p99.9 {:.2} ms | p50 ≤ {} ms, p99 ≤ {} ms | {:.2} cores |",
                s.window.fixes_per_s, s.sent_per_s, s.riders, s.window.delta_items_per_s, s.p50_ms, s.p99_ms, s.p999_ms, s.node_delay_p50_ms, s.node_delay_p99_ms, s.window.node_cpu_us_per_s / 1e6
            ));
        }
        let l = &d.district.latency_ms;
        line(format!(
            "| {:.0} fixes/s, {} dashboards (half city, half district) | to a district dashboard: p50 {:.2} ms, p99 {:.2} ms, p99.9 {:.2} ms | | {:.2} cores |",
            d.window.fixes_per_s, d.dashboards, l.p50, l.p99, l.p999, d.window.node_cpu_us_per_s / 1e6
        ));
        line(String::new());
        line("## Dashboards".into());
        line(String::new());
        line("| measure | result |".into());
        line("|---|---|".into());
        line(format!(
            "| node memory per dashboard | {:.1} KiB ({} dashboards: RSS {} → {} KiB) |",
            d.kib_per_dashboard, d.dashboards, d.rss_before_kib, d.rss_after_kib
        ));
        for (name, v) in [
            ("whole city (counts)", &d.city),
            ("district (vehicles)", &d.district),
        ] {
            line(format!(
                "| a dashboard on the {name} | {:.1} KB/s, {:.1} bytes per item; {:.0} items/s over {} dashboards |",
                v.bytes_per_s / 1e3, v.bytes_per_item, v.items_per_s, v.connected
            ));
        }
        line(String::new());
        line("## Zones".into());
        line(String::new());
        line(format!(
            "Ingest at the ingest phase's load ({} drivers at {} Hz) with zones over the city (star-shaped, 150–600 m across, put one at a time over HTTP), measured one after another at the end of the run; exact tests are those past a zone's box.",
            self.ingest.drivers, self.ingest.rate_hz
        ));
        line(String::new());
        line("| zones | node CPU per fix | Redis CPU per fix | exact tests per fix | events/s | fix → event in the stream | index cells | put, over HTTP |".into());
        line("|---|---|---|---|---|---|---|---|".into());
        for z in &self.zones {
            line(format!(
                "| {} | {:.1} µs | {:.1} µs | {:.2} | {:.0} | p50 ≤ {:.1} ms, p99 ≤ {:.1} ms | {:.0} | {:.1} s |",
                z.zones, z.node_us_per_fix, z.redis_us_per_fix, z.tests_per_fix, z.events_per_s, z.event_p50_ms, z.event_p99_ms, z.zone_cells, z.put_s
            ));
        }
        let raw = self
            .redis_geoadd_per_s
            .map_or("redis-benchmark not installed".into(), |r| {
                format!("{r:.0} GEOADD/s")
            });
        line(format!(
            "| raw `redis-benchmark -P 64` GEOADD (this machine's speed today) | {raw} |"
        ));
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantiles_come_from_the_buckets_filled_between_two_snapshots() {
        let text = |counts: [u32; 4]| {
            format!(
                "hexfleet_delta_delay_seconds_bucket{{le=\"0.001\"}} {}\nhexfleet_delta_delay_seconds_bucket{{le=\"0.002\"}} {}\nhexfleet_delta_delay_seconds_bucket{{le=\"0.004\"}} {}\nhexfleet_delta_delay_seconds_bucket{{le=\"+Inf\"}} {}\n",
                counts[0], counts[1], counts[2], counts[3]
            )
        };
        let before = delay_buckets(&text([100, 100, 100, 100]));
        let after = delay_buckets(&text([150, 190, 199, 200]));
        assert_eq!(before.len(), 4);
        assert_eq!(bucket_quantile_ms(&before, &after, 0.5), 1.0);
        assert_eq!(bucket_quantile_ms(&before, &after, 0.9), 2.0);
        assert_eq!(bucket_quantile_ms(&before, &after, 0.99), 4.0);
        assert_eq!(
            bucket_quantile_ms(&after, &after, 0.5),
            0.0,
            "nothing observed"
        );
    }
}
