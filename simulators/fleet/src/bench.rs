//! `hexfleet-sim bench`: the standard benchmark.
//!
//! It builds nothing. It uses Redis at `--redis-url` or starts its own
//! `redis-server`, runs the node as a separate process (this same binary in
//! `serve-node` mode, so its memory can be read on its own), and measures:
//!
//! - the raw `redis-benchmark -P 64` GEOADD rate on the same Redis;
//! - the ingest ceiling: accepted fixes/s at increasing offered loads;
//! - end-to-end latency (fix created → rider applied) at fixed loads with
//!   riders, and the nearby API's latency under that load;
//! - fan-out: delta items/s to riders watching a dense area, and bytes per
//!   item;
//! - node memory per idle driver connection.

use std::{
    io::{BufRead, BufReader},
    net::SocketAddr,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::Arc,
    time::{Duration, Instant},
};

use anyhow::{bail, Context as _};
use hdrhistogram::Histogram;
use hexfleet_client::Connector;
use hexfleet_testkit::RedisServer;
use rand::Rng;
use serde::Serialize;
use tokio_util::sync::CancellationToken;

use crate::{
    dashboards::{self, DashboardStats, ViewSummary},
    fleet::{self, FleetStats, Target},
    latency::LatencyBook,
    report::Summary,
    scenario::Scenario,
};

/// How big each phase is.
#[derive(Debug, Clone, Serialize)]
pub struct Sizes {
    pub ingest_drivers: usize,
    pub ingest_rates_hz: Vec<f64>,
    pub step: Duration,
    pub latency_loads: Vec<(usize, f64, usize)>,
    pub fanout: (usize, f64, usize),
    pub idle_connections: usize,
    /// (drivers, rate, dashboards): half watch the city, half a district.
    pub dashboards: (usize, f64, usize),
    pub redis_benchmark_requests: usize,
}

impl Sizes {
    pub fn full() -> Self {
        Self {
            ingest_drivers: 2_000,
            ingest_rates_hz: vec![5.0, 10.0, 20.0, 40.0],
            step: Duration::from_secs(8),
            // (drivers, rate, riders): 5k, 20k and 50k fixes/s.
            latency_loads: vec![(2_000, 2.5, 500), (2_000, 10.0, 2_000), (2_000, 25.0, 500)],
            fanout: (500, 4.0, 300),
            idle_connections: 20_000,
            dashboards: (2_000, 1.0, 2_000),
            redis_benchmark_requests: 2_000_000,
        }
    }

    /// Seconds, tiny sizes: proves every phase runs, measures nothing.
    pub fn smoke() -> Self {
        Self {
            ingest_drivers: 20,
            ingest_rates_hz: vec![5.0],
            step: Duration::from_secs(2),
            latency_loads: vec![(20, 5.0, 10)],
            fanout: (20, 5.0, 10),
            idle_connections: 50,
            dashboards: (20, 2.0, 10),
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
    pub ingest: Vec<IngestStep>,
    pub ingest_ceiling_per_s: f64,
    pub ceiling_vs_raw_geoadd: Option<f64>,
    pub latency: Vec<LatencyStep>,
    pub fanout: FanoutStep,
    pub idle: IdleStep,
    pub dashboards: DashboardStep,
}

#[derive(Debug, Serialize)]
pub struct DashboardStep {
    pub fixes_per_s: f64,
    pub dashboards: u64,
    pub rss_before_kib: u64,
    pub rss_after_kib: u64,
    pub kib_per_dashboard: f64,
    /// Watching the whole city: per-cell counts.
    pub city: ViewSummary,
    /// Watching a district of about 2 km: every vehicle.
    pub district: ViewSummary,
}

#[derive(Debug, Serialize)]
pub struct IngestStep {
    pub offered_per_s: f64,
    pub sent_per_s: f64,
    pub accepted_per_s: f64,
}

#[derive(Debug, Serialize)]
pub struct LatencyStep {
    pub fixes_per_s: f64,
    pub riders: usize,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub p999_ms: f64,
    pub delta_items_per_s: f64,
    /// Inside the node (fix in → delta written), bucket bounds.
    pub node_delay_p50_ms: f64,
    pub node_delay_p99_ms: f64,
    pub nearby_p50_ms: f64,
    pub nearby_p99_ms: f64,
    pub nearby_requests: u64,
}

#[derive(Debug, Serialize)]
pub struct FanoutStep {
    pub fixes_per_s: f64,
    pub riders: usize,
    /// Delta items the node wrote to riders' streams, per second.
    pub node_items_per_s: f64,
    /// Moved items riders applied, per second.
    pub applied_moves_per_s: f64,
    pub bytes_per_item: f64,
    pub bytes_per_moved_record: usize,
}

#[derive(Debug, Serialize)]
pub struct IdleStep {
    pub connections: u64,
    pub rss_before_kib: u64,
    pub rss_after_kib: u64,
    pub kib_per_connection: f64,
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

fn rss_kib(pid: u32) -> anyhow::Result<u64> {
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
    text.lines()
        .filter_map(|l| l.strip_prefix("hexfleet_delta_delay_seconds_bucket{le=\""))
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

/// Node-side counters read from /metrics.
async fn counters(http: &reqwest::Client, addr: SocketAddr) -> anyhow::Result<(f64, f64)> {
    let text = metrics_text(http, addr).await?;
    let value = |prefix: &str| -> f64 {
        text.lines()
            .filter(|l| l.starts_with(prefix))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    };
    Ok((
        value("hexfleet_fixes_accepted_total"),
        value("hexfleet_delta_items_total"),
    ))
}

struct Bench {
    node: NodeProcess,
    secret: String,
    http: reqwest::Client,
    seed: u64,
}

/// What one fleet run produced, with node-side rates over its steady part.
struct Step {
    summary: Summary,
    accepted_per_s: f64,
    node_items_per_s: f64,
    /// Moved items riders applied per second, over the same window.
    applied_moves_per_s: f64,
    /// Node-side delay, fix in → delta out, p50 and p99 bucket bounds (ms).
    node_delay_ms: (f64, f64),
    nearby: Option<Histogram<u64>>,
}

impl Bench {
    fn scenario(
        &self,
        name: &str,
        drivers: usize,
        rate: f64,
        riders: usize,
        duration: Duration,
    ) -> Scenario {
        let mut s = Scenario {
            name: name.into(),
            duration,
            seed: self.seed,
            ..Scenario::default()
        };
        s.drivers.count = drivers;
        s.drivers.rate_hz = rate;
        s.drivers.off_duty_per_minute = 0.0;
        // Leave nothing behind to go stale during the next step.
        s.drivers.goodbye = true;
        s.riders.count = riders;
        s.riders.radius_m = 1_000.0;
        s
    }

    /// Starts a fleet in the background; it runs until `stop`.
    fn spawn_fleet(
        &self,
        scenario: &Scenario,
        prefix: &str,
        stats: &Arc<FleetStats>,
        book: &Arc<LatencyBook>,
        stop: &CancellationToken,
    ) -> tokio::task::JoinHandle<anyhow::Result<fleet::Outcome>> {
        let target = Target {
            node: self.node.quic,
            seeds: Vec::new(),
            token_secret: self.secret.clone(),
            connect_concurrency: BENCH_HANDSHAKES,
        };
        let cert = self.node.cert.clone();
        let (scenario, prefix) = (scenario.clone(), prefix.to_string());
        let (stats, book, stop) = (stats.clone(), book.clone(), stop.clone());
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
    }

    /// Waits until `n` clients have connected or given up (at most `within`).
    async fn settle(stats: &FleetStats, n: usize, within: Duration) {
        let deadline = Instant::now() + within;
        while (stats.settled() as usize) < n && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Runs a fleet; measures node-side rates over `step` once everyone is
    /// connected; optionally loads the nearby API meanwhile.
    async fn step(
        &self,
        scenario: Scenario,
        step: Duration,
        nearby_per_s: f64,
    ) -> anyhow::Result<Step> {
        let stats = Arc::new(FleetStats::default());
        let book = Arc::new(LatencyBook::default());
        let stop = CancellationToken::new();
        let prefix = format!("b{}", rand::rng().random::<u32>());
        let fleet = self.spawn_fleet(&scenario, &prefix, &stats, &book, &stop);
        // Wait for everyone to connect (bounded), then measure.
        let everyone = scenario.drivers.count + scenario.riders.count;
        Self::settle(&stats, everyone, Duration::from_secs(120)).await;
        tokio::time::sleep(Duration::from_secs(1)).await;
        book.reset();
        let started = Instant::now();
        let (accepted0, items0) = counters(&self.http, self.node.admin).await?;
        let delays0 = delay_buckets(&metrics_text(&self.http, self.node.admin).await?);
        let sent0 = stats.sent.load(std::sync::atomic::Ordering::Relaxed);
        let nearby =
            (nearby_per_s > 0.0).then(|| self.nearby_load(scenario.bbox(), nearby_per_s, step));
        let nearby = match nearby {
            Some(load) => Some(load.await?),
            None => {
                tokio::time::sleep(step).await;
                None
            }
        };
        let (accepted1, items1) = counters(&self.http, self.node.admin).await?;
        let delays1 = delay_buckets(&metrics_text(&self.http, self.node.admin).await?);
        let applied = book.percentiles().samples;
        let secs = started.elapsed().as_secs_f64();
        let sent = stats.sent.load(std::sync::atomic::Ordering::Relaxed) - sent0;
        stop.cancel();
        let outcome = fleet.await??;
        let mut summary = Summary::new(
            &scenario,
            &self.node.quic.to_string(),
            &stats,
            &book,
            None,
            &outcome,
            started.elapsed(),
        );
        summary.fixes.sent_per_s = sent as f64 / secs;
        Ok(Step {
            summary,
            accepted_per_s: (accepted1 - accepted0) / secs,
            node_items_per_s: (items1 - items0) / secs,
            applied_moves_per_s: applied as f64 / secs,
            node_delay_ms: (
                bucket_quantile_ms(&delays0, &delays1, 0.5),
                bucket_quantile_ms(&delays0, &delays1, 0.99),
            ),
            nearby,
        })
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
                "http://{}/v1/vehicles?lat={lat}&lon={lon}&radius_m=1000&limit=20",
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
    /// on districts): node memory per dashboard, what they receive, and how
    /// long a fix takes to reach a district dashboard.
    async fn dashboards(
        &self,
        (drivers, rate, count): (usize, f64, usize),
        step: Duration,
    ) -> anyhow::Result<DashboardStep> {
        let scenario = self.scenario("dashboards", drivers, rate, 0, Duration::from_secs(600));
        let stats = Arc::new(FleetStats::default());
        let book = Arc::new(LatencyBook::default());
        let stop = CancellationToken::new();
        let fleet = self.spawn_fleet(&scenario, "dash", &stats, &book, &stop);
        Self::settle(&stats, drivers, Duration::from_secs(120)).await;
        tokio::time::sleep(Duration::from_secs(2)).await;
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
            scenario.bbox(),
            self.seed,
            dashboard_stats.clone(),
            book.clone(),
            stop.clone(),
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
        let (accepted0, _) = counters(&self.http, self.node.admin).await?;
        dashboard_stats.reset();
        let started = Instant::now();
        tokio::time::sleep(step).await;
        let secs = started.elapsed().as_secs_f64();
        let (accepted1, _) = counters(&self.http, self.node.admin).await?;
        let city = ViewSummary::of(&dashboard_stats.city, secs);
        let district = ViewSummary::of(&dashboard_stats.district, secs);
        stop.cancel();
        let _ = fleet.await;
        let _ = watchers.await;
        let dashboards = connected();
        Ok(DashboardStep {
            fixes_per_s: (accepted1 - accepted0) / secs,
            dashboards,
            rss_before_kib: before,
            rss_after_kib: after,
            kib_per_dashboard: after.saturating_sub(before) as f64 / dashboards.max(1) as f64,
            city,
            district,
        })
    }

    /// Connects `n` drivers that report once and then idle, and reads the
    /// node's memory before and after.
    async fn idle(&self, n: usize) -> anyhow::Result<IdleStep> {
        let before = rss_kib(self.node.pid)?;
        let mut scenario = self.scenario("idle connections", n, 0.01, 0, Duration::from_secs(600));
        scenario.drivers.gps_noise_m = 0.0;
        let stats = Arc::new(FleetStats::default());
        let stop = CancellationToken::new();
        let book = Arc::new(LatencyBook::default());
        let fleet = self.spawn_fleet(&scenario, "idle", &stats, &book, &stop);
        Self::settle(&stats, n, Duration::from_secs(300)).await;
        tokio::time::sleep(Duration::from_secs(3)).await;
        let connected = stats.connected.load(std::sync::atomic::Ordering::Relaxed);
        let after = rss_kib(self.node.pid)?;
        stop.cancel();
        let _ = fleet.await;
        Ok(IdleStep {
            connections: connected,
            rss_before_kib: before,
            rss_after_kib: after,
            kib_per_connection: after.saturating_sub(before) as f64 / connected.max(1) as f64,
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
    let bench = Bench {
        node,
        secret,
        http: reqwest::Client::new(),
        seed: 7,
    };
    eprintln!(
        "bench: node pid {} on {} / http {}; redis {redis_url}",
        bench.node.pid, bench.node.quic, bench.node.http
    );

    eprintln!("bench: redis-benchmark GEOADD -P 64");
    let redis_geoadd_per_s = redis_geoadd_rate(redis_port, sizes.redis_benchmark_requests);

    let mut ingest = Vec::new();
    for &rate in &sizes.ingest_rates_hz {
        let offered = sizes.ingest_drivers as f64 * rate;
        eprintln!("bench: ingest at {offered:.0} fixes/s offered");
        let scenario = bench.scenario(
            "ingest",
            sizes.ingest_drivers,
            rate,
            0,
            Duration::from_secs(600),
        );
        let step = bench.step(scenario, sizes.step, 0.0).await?;
        ingest.push(IngestStep {
            offered_per_s: offered,
            sent_per_s: step.summary.fixes.sent_per_s,
            accepted_per_s: step.accepted_per_s,
        });
    }
    let ingest_ceiling_per_s = ingest.iter().map(|s| s.accepted_per_s).fold(0.0, f64::max);

    let mut latency = Vec::new();
    for &(drivers, rate, riders) in &sizes.latency_loads {
        eprintln!(
            "bench: latency at {:.0} fixes/s with {riders} riders",
            drivers as f64 * rate
        );
        let scenario = bench.scenario("latency", drivers, rate, riders, Duration::from_secs(600));
        let step = bench.step(scenario, sizes.step, 100.0).await?;
        let nearby = step.nearby.as_ref();
        let ms = |h: Option<&Histogram<u64>>, q: f64| {
            h.map_or(0.0, |h| h.value_at_quantile(q) as f64 / 1e3)
        };
        latency.push(LatencyStep {
            fixes_per_s: step.accepted_per_s,
            riders,
            p50_ms: step.summary.latency_ms.p50,
            p99_ms: step.summary.latency_ms.p99,
            p999_ms: step.summary.latency_ms.p999,
            delta_items_per_s: step.node_items_per_s,
            node_delay_p50_ms: step.node_delay_ms.0,
            node_delay_p99_ms: step.node_delay_ms.1,
            nearby_p50_ms: ms(nearby, 0.5),
            nearby_p99_ms: ms(nearby, 0.99),
            nearby_requests: nearby.map_or(0, |h| h.len()),
        });
    }

    let (drivers, rate, riders) = sizes.fanout;
    eprintln!("bench: fan-out, {riders} riders over a dense area");
    let mut scenario = bench.scenario("fan-out", drivers, rate, riders, Duration::from_secs(600));
    // One square kilometre: every rider sees most of the fleet.
    scenario.city.bbox = [52.515, 13.395, 52.524, 13.410];
    scenario.riders.walking_share = 0.0;
    let step = bench.step(scenario, sizes.step, 0.0).await?;
    let fanout = FanoutStep {
        fixes_per_s: step.accepted_per_s,
        riders,
        node_items_per_s: step.node_items_per_s,
        applied_moves_per_s: step.applied_moves_per_s,
        bytes_per_item: step.summary.deltas.bytes_per_item,
        bytes_per_moved_record: hexfleet_protocol::Moved::LEN,
    };

    eprintln!("bench: {} dashboards", sizes.dashboards.2);
    let dashboards = bench.dashboards(sizes.dashboards, sizes.step).await?;

    eprintln!("bench: {} idle driver connections", sizes.idle_connections);
    let idle = bench.idle(sizes.idle_connections).await?;

    let report = Report {
        machine: machine(),
        command: options.command.clone(),
        ceiling_vs_raw_geoadd: redis_geoadd_per_s.map(|raw| ingest_ceiling_per_s / raw),
        sizes,
        redis_geoadd_per_s,
        ingest,
        ingest_ceiling_per_s,
        latency,
        fanout,
        idle,
        dashboards,
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
        line("| measure | result | target |".into());
        line("|---|---|---|".into());
        let raw = self
            .redis_geoadd_per_s
            .map_or("redis-benchmark not installed".into(), |r| {
                format!("{r:.0} GEOADD/s")
            });
        line(format!("| raw `redis-benchmark -P 64` GEOADD | {raw} | |"));
        for s in &self.ingest {
            line(format!(
                "| ingest at {:.0} fixes/s offered | {:.0} sent/s by the simulator, {:.0} accepted/s by the node | |",
                s.offered_per_s, s.sent_per_s, s.accepted_per_s
            ));
        }
        let ratio = self
            .ceiling_vs_raw_geoadd
            .map_or(String::new(), |r| format!(" ({r:.2}× the raw GEOADD rate)"));
        line(format!("| **ingest ceiling** (Redis store) | **{:.0} fixes/s**{ratio} | ≥ 100,000/s, ≥ 0.2× raw |", self.ingest_ceiling_per_s));
        for s in &self.latency {
            line(format!(
                "| end-to-end latency at {:.0} fixes/s, {} riders | p50 {:.2} ms, p99 {:.2} ms, p99.9 {:.2} ms; {:.0} delta items/s | p99 ≤ 10 ms at 20k/s, 2,000 riders |",
                s.fixes_per_s, s.riders, s.p50_ms, s.p99_ms, s.p999_ms, s.delta_items_per_s
            ));
            line(format!(
                "| … of which inside the node (fix in → delta written) | p50 ≤ {} ms, p99 ≤ {} ms | |",
                s.node_delay_p50_ms, s.node_delay_p99_ms
            ));
        }
        for s in &self.latency {
            line(format!(
                "| nearby API under {:.0} fixes/s | p50 {:.2} ms, p99 {:.2} ms ({} requests) | p99 ≤ 5 ms |",
                s.fixes_per_s, s.nearby_p50_ms, s.nearby_p99_ms, s.nearby_requests
            ));
        }
        let f = &self.fanout;
        line(format!(
            "| fan-out, {} riders on one km², {:.0} fixes/s | {:.0} delta items/s sent by the node; riders applied {:.0} moves/s | ≥ 1,000,000/s |",
            f.riders, f.fixes_per_s, f.node_items_per_s, f.applied_moves_per_s
        ));
        line(format!(
            "| wire | {} bytes per moved record; {:.1} bytes per delta item with framing | ≤ 16 bytes per moved item |",
            f.bytes_per_moved_record, f.bytes_per_item
        ));
        let i = &self.idle;
        line(format!(
            "| node memory per idle driver connection | {:.1} KiB ({} connections: RSS {} → {} KiB) | ≤ 16 KiB at 20,000 |",
            i.kib_per_connection, i.connections, i.rss_before_kib, i.rss_after_kib
        ));
        let d = &self.dashboards;
        line(format!(
            "| node memory per dashboard (WebSocket, half city, half district) | {:.1} KiB ({} dashboards: RSS {} → {} KiB) | < 30 KB per connection (Centrifugo) |",
            d.kib_per_dashboard, d.dashboards, d.rss_before_kib, d.rss_after_kib
        ));
        let l = &d.district.latency_ms;
        line(format!(
            "| latency, fix created → district dashboard received, {:.0} fixes/s | p50 {:.2} ms, p99 {:.2} ms, p99.9 {:.2} ms ({} samples) | p99 ≤ 10 ms |",
            d.fixes_per_s, l.p50, l.p99, l.p999, l.samples
        ));
        for (name, v) in [
            ("whole city (counts)", &d.city),
            ("district (vehicles)", &d.district),
        ] {
            line(format!(
                "| a dashboard on the {name} | {:.1} KB/s, {:.1} bytes per item; {:.0} items/s over {} dashboards | |",
                v.bytes_per_s / 1e3, v.bytes_per_item, v.items_per_s, v.connected
            ));
        }
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
