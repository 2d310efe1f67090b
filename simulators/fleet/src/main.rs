//! `hexfleet-sim`: drives real QUIC drivers and riders against a node.
//!
//! - `load`: a fleet described by flags against a running node.
//! - `run SCENARIO.toml`: a scenario file against a running node.
//! - `demo`: an embedded node plus a simulated fleet, to see it work.
//! - `airport`: drivers queueing in an airport zone, the events the node
//!   shows checked against what they did.
//! - `bench`: the standard benchmark.

mod airport;
mod bench;
mod cost;
mod dashboards;
mod fleet;
mod latency;
mod movement;
mod report;
mod riders;
mod scenario;
mod streets;

use std::{
    net::SocketAddr,
    path::PathBuf,
    sync::{atomic::Ordering, Arc},
    time::{Duration, Instant},
};

use anyhow::Context as _;
use clap::{Args, Parser, Subcommand};
use hexfleet_client::{Connector, TransportPolicy};
use hexfleet_node::{
    config::{Config, StoreKind},
    Node,
};
use hexfleet_protocol::{dashboard::Format, Role};
use tokio_util::sync::CancellationToken;

use crate::{
    dashboards::DashboardStats,
    fleet::{FleetStats, Target},
    latency::LatencyBook,
    movement::BBox,
    report::Summary,
    scenario::Scenario,
};

#[derive(Parser)]
#[command(name = "hexfleet-sim", version, about = "hexfleet fleet simulator")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Drive a fleet described by flags against a running node.
    Load(LoadArgs),
    /// Play a scenario file (see simulators/scenarios/) against a running node.
    Run(RunArgs),
    /// Run an embedded node with a simulated fleet.
    Demo(DemoArgs),
    /// The standard benchmark: starts Redis (unless --redis-url) and a node,
    /// measures ingest, latency, fan-out, memory and the nearby API.
    Bench(BenchArgs),
    /// An airport zone with drivers queueing in it: the events the node
    /// shows a dashboard are checked against what the drivers did.
    Airport(AirportArgs),
    /// Run a node for `bench` in a process of its own (internal).
    #[command(hide = true)]
    ServeNode(ServeNodeArgs),
}

#[derive(Args)]
struct BenchArgs {
    /// Use this Redis instead of starting one.
    #[arg(long, env = "HEXFLEET_REDIS_URL")]
    redis_url: Option<String>,
    /// Seconds and tiny sizes: proves every phase runs; measures nothing.
    #[arg(long)]
    smoke: bool,
    /// Write the report as JSON.
    #[arg(long)]
    json: Option<PathBuf>,
    /// Write the markdown table (e.g. BENCHMARKS.md).
    #[arg(long)]
    markdown: Option<PathBuf>,
}

#[derive(Args)]
struct AirportArgs {
    #[command(flatten)]
    client: ClientArgs,
    /// Drivers coming to the airport (one QUIC connection each).
    #[arg(long, default_value_t = 40)]
    drivers: usize,
    /// The airport's waiting area: LAT,LON of its centre.
    #[arg(long, default_value = "52.3667,13.5033")]
    at: String,
    /// The longest a driver waits in the queue before going on.
    #[arg(long, default_value = "20s", value_parser = humantime::parse_duration)]
    max_wait: Duration,
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// The airport's size and the drives to it, against the default
    /// (a waiting area of 800 × 500 m, drivers from 700 m away).
    #[arg(long, default_value_t = 1.0)]
    scale: f64,
    /// Start a node in this process (in-memory store, or --redis-url)
    /// instead of using --node and --http.
    #[arg(long)]
    embedded: bool,
    /// The embedded node's Redis.
    #[arg(long, env = "HEXFLEET_REDIS_URL")]
    redis_url: Option<String>,
}

/// Plays the airport scenario; fails when what the node said differs from
/// what the drivers did.
async fn airport(args: AirportArgs) -> anyhow::Result<()> {
    let center = args
        .at
        .split_once(',')
        .and_then(|(lat, lon)| Some((lat.trim().parse().ok()?, lon.trim().parse().ok()?)))
        .context("--at must be LAT,LON")?;
    let options = airport::Options {
        drivers: args.drivers,
        center,
        max_wait: args.max_wait,
        seed: args.seed,
        scale: args.scale,
    };
    anyhow::ensure!(
        args.scale.is_finite() && (0.1..=10.0).contains(&args.scale),
        "--scale must be within 0.1 and 10"
    );
    let mut embedded = None;
    let target = if args.embedded {
        let mut config = Config {
            node_id: "airport".into(),
            ..Config::default()
        };
        config.quic.listen = ([127, 0, 0, 1], 0).into();
        config.http.listen = ([127, 0, 0, 1], 0).into();
        config.admin.listen = ([127, 0, 0, 1], 0).into();
        config.http.tls = false;
        let node =
            start_embedded(config, &args.client.token_secret, args.redis_url.as_ref()).await?;
        let ca = node.dev_cert.clone().context("a development certificate")?;
        let target = airport::Target {
            quic: node.quic_addr,
            http: node.http_addr,
            http_tls: None,
            ca,
            server_name: hexfleet_protocol::dev::DEV_SERVER_NAME.into(),
            token_secret: args.client.token_secret.clone(),
        };
        embedded = Some(node);
        target
    } else {
        let (ca, server_name) = trust(&args.client);
        let http_tls = if args.client.http_tls {
            Some((
                Arc::new(hexfleet_client::https_config(&ca)?),
                server_name.clone(),
            ))
        } else {
            None
        };
        airport::Target {
            quic: args.client.nodes[0],
            http: args.client.http,
            http_tls,
            ca,
            server_name,
            token_secret: args.client.token_secret.clone(),
        }
    };
    let summary = airport::run(options, target).await;
    if let Some(node) = embedded {
        node.shutdown(Duration::from_secs(5)).await;
    }
    let summary = summary?;
    summary.print();
    if let Some(path) = &args.client.json {
        std::fs::write(path, serde_json::to_vec_pretty(&summary)?)
            .with_context(|| format!("writing {}", path.display()))?;
    }
    anyhow::ensure!(
        summary.ok,
        "the node's zone events differ from what the drivers did"
    );
    Ok(())
}

#[derive(Args)]
struct ServeNodeArgs {
    #[arg(long)]
    redis_url: String,
    #[arg(long)]
    dev_dir: PathBuf,
    #[arg(long, env = "HEXFLEET_TOKEN_SECRET", hide_env_values = true)]
    token_secret: String,
}

/// Runs a node until stdin closes (the parent went away) and says
/// `READY <quic> <http> <cert>` once it listens.
async fn serve_node(args: ServeNodeArgs) -> anyhow::Result<()> {
    let mut config = Config {
        node_id: "bench".into(),
        ..Config::default()
    };
    config.quic.listen = ([127, 0, 0, 1], 0).into();
    config.quic.endpoints = 2;
    config.http.listen = ([127, 0, 0, 1], 0).into();
    config.admin.listen = ([127, 0, 0, 1], 0).into();
    // Loopback only: the bench measures the node, not TLS on its API.
    config.http.tls = false;
    // Every simulated client comes from 127.0.0.1.
    config.quic.max_connections_per_address = config.quic.max_connections;
    config.http.max_connections_per_address = 100_000;
    config.tls.dev_dir = args.dev_dir;
    config.auth.token_secret = args.token_secret;
    config.store.kind = StoreKind::Redis;
    config.store.redis_url = args.redis_url;
    let node = Node::start(config).await?;
    let cert = node.dev_cert.clone().context("a development certificate")?;
    println!(
        "READY {} {} {} {}",
        node.quic_addr,
        node.http_addr,
        node.admin_addr,
        cert.display()
    );
    // The parent holds our stdin; when it ends, so do we.
    tokio::task::spawn_blocking(|| {
        let mut sink = String::new();
        while std::io::stdin().read_line(&mut sink).is_ok_and(|n| n > 0) {
            sink.clear();
        }
    })
    .await?;
    node.shutdown(Duration::from_secs(2)).await;
    Ok(())
}

/// How to reach and authenticate with the node.
#[derive(Args, Clone)]
struct ClientArgs {
    /// QUIC address of a node; repeat it to spread the clients over the
    /// nodes of a cluster (each also reconnects through the others).
    #[arg(long = "node", default_value = "127.0.0.1:4433")]
    nodes: Vec<SocketAddr>,
    /// HTTP address of the node, for dashboards.
    #[arg(long, default_value = "127.0.0.1:8080")]
    http: SocketAddr,
    /// Whether the node's HTTP address speaks HTTPS/WSS (its default), with
    /// the certificate trusted for QUIC.
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    http_tls: bool,
    /// Certificate (PEM or DER) to trust; default: the node's development
    /// certificate on this machine.
    #[arg(long, env = "HEXFLEET_CA")]
    ca: Option<PathBuf>,
    /// The name the node's certificate is issued for.
    #[arg(long, default_value = hexfleet_protocol::dev::DEV_SERVER_NAME)]
    server_name: String,
    /// Secret that signs the clients' tokens; must match the node's.
    #[arg(long, env = "HEXFLEET_TOKEN_SECRET", hide_env_values = true, default_value = hexfleet_protocol::dev::DEV_TOKEN_SECRET, hide_default_value = true)]
    token_secret: String,
    /// How drivers and riders reach the node: quic, websocket (as clients
    /// whose UDP is blocked do, on the HTTPS address `--http`, which must
    /// then be TLS) or auto (QUIC, falling back to WebSocket).
    #[arg(long, default_value = "quic", value_parser = ["quic", "websocket", "auto"])]
    transport: String,
    /// Connections in handshake at once while ramping up.
    #[arg(long, default_value_t = 64)]
    connect_concurrency: usize,
    /// Handshakes started per second at most (a paced ramp); unpaced if unset.
    #[arg(long)]
    connect_rate: Option<f64>,
    /// Client ids are <prefix>-<n> (drivers) and <prefix>-rider-<n>-<k>.
    #[arg(long, default_value = "sim")]
    id_prefix: String,
    /// Also write the summary as JSON to this file.
    #[arg(long)]
    json: Option<PathBuf>,
}

#[derive(Args)]
struct LoadArgs {
    #[command(flatten)]
    client: ClientArgs,
    /// Simulated drivers (one QUIC connection each).
    #[arg(long, default_value_t = 100)]
    drivers: usize,
    /// Fixes per driver per second.
    #[arg(long, default_value_t = 1.0)]
    rate: f64,
    /// Simulated riders (one QUIC connection each); a fifth of them walk and
    /// re-subscribe.
    #[arg(long, default_value_t = 0)]
    riders: usize,
    /// Radius each rider watches, metres.
    #[arg(long, default_value_t = 1_000.0)]
    rider_radius: f64,
    /// Simulated dispatch dashboards (WebSocket to --http): half watch the
    /// whole city, half a district.
    #[arg(long, default_value_t = 0)]
    dashboards: usize,
    /// Dashboards read MessagePack frames instead of JSON.
    #[arg(long)]
    dashboard_msgpack: bool,
    /// City bounding box: min_lat,min_lon,max_lat,max_lon (default: Berlin).
    #[arg(long)]
    bbox: Option<BBox>,
    /// Share of deliberately bad fixes (0 to 1).
    #[arg(long, default_value_t = 0.0)]
    bad_fix_share: f64,
    /// Share of drivers whose phone's clock is wrong (0 to 1): 20 s ahead,
    /// 60 s behind, an hour ahead or a day behind.
    #[arg(long, default_value_t = 0.0)]
    wrong_clock_share: f64,
    /// How long to run, e.g. 20s, 5m.
    #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
    duration: Duration,
    /// Sign the drivers off at the end, so the node removes their vehicles
    /// at once; without it they disconnect and go stale.
    #[arg(long)]
    goodbye: bool,
    /// Seed of the fleet's randomness.
    #[arg(long, default_value_t = 1)]
    seed: u64,
}

#[derive(Args)]
struct RunArgs {
    /// The scenario file.
    scenario: PathBuf,
    #[command(flatten)]
    client: ClientArgs,
    /// Override the scenario's duration.
    #[arg(long, value_parser = humantime::parse_duration)]
    duration: Option<Duration>,
}

#[derive(Args)]
struct DemoArgs {
    /// Simulated drivers.
    #[arg(long, default_value_t = 1_000)]
    drivers: usize,
    /// Simulated riders watching the fleet.
    #[arg(long, default_value_t = 50)]
    riders: usize,
    /// Simulated dispatch dashboards (WebSockets) watching the city.
    #[arg(long, default_value_t = 0)]
    dashboards: usize,
    /// Share of drivers whose phone's clock is wrong (0 to 1): 20 s ahead,
    /// 60 s behind, an hour ahead or a day behind.
    #[arg(long, default_value_t = 0.0)]
    wrong_clock_share: f64,
    /// Serve HTTPS and WSS with the development certificate (a browser
    /// warns about it), as production nodes do; default: plain HTTP on
    /// loopback.
    #[arg(long)]
    https: bool,
    /// HTTP address of the embedded node.
    #[arg(long, default_value = "127.0.0.1:8080")]
    http_listen: SocketAddr,
    /// Admin address (metrics, probes) of the embedded node.
    #[arg(long, default_value = "127.0.0.1:9090")]
    admin_listen: SocketAddr,
    /// QUIC address of the embedded node.
    #[arg(long, default_value = "127.0.0.1:4433")]
    quic_listen: SocketAddr,
    /// Use Redis at this URL instead of the in-memory store.
    #[arg(long, env = "HEXFLEET_REDIS_URL")]
    redis_url: Option<String>,
    /// Stop after this long (default: run until Ctrl-C).
    #[arg(long, value_parser = humantime::parse_duration)]
    duration: Option<Duration>,
    #[arg(long, env = "HEXFLEET_TOKEN_SECRET", hide_env_values = true, default_value = hexfleet_protocol::dev::DEV_TOKEN_SECRET, hide_default_value = true)]
    token_secret: String,
}

impl LoadArgs {
    fn scenario(&self) -> anyhow::Result<Scenario> {
        let mut s = Scenario {
            name: format!(
                "load: {} drivers at {} Hz, {} riders",
                self.drivers, self.rate, self.riders
            ),
            duration: self.duration,
            seed: self.seed,
            ..Scenario::default()
        };
        if let Some(b) = self.bbox {
            s.city.bbox = [b.min_lat, b.min_lon, b.max_lat, b.max_lon];
        }
        s.drivers.count = self.drivers;
        s.drivers.rate_hz = self.rate;
        s.drivers.bad_fix_share = self.bad_fix_share;
        s.drivers.wrong_clock_share = self.wrong_clock_share;
        s.drivers.goodbye = self.goodbye;
        s.riders.count = self.riders;
        s.riders.radius_m = self.rider_radius;
        s.dashboards.count = self.dashboards;
        s.dashboards.msgpack = self.dashboard_msgpack;
        s.check()?;
        Ok(s)
    }
}

/// Stops on Ctrl-C or after `duration`.
fn stop_after(duration: Option<Duration>) -> CancellationToken {
    let stop = CancellationToken::new();
    let s = stop.clone();
    tokio::spawn(async move {
        match duration {
            Some(d) => tokio::select! {
                _ = tokio::time::sleep(d) => {}
                _ = tokio::signal::ctrl_c() => {}
            },
            None => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
        s.cancel();
    });
    stop
}

/// Shows a progress bar with a live line while the fleet runs. Latency is
/// measured from the moment every client is connected, so the ramp-up's
/// handshake storm does not count.
fn spawn_progress(
    scenario: &Scenario,
    stats: Arc<FleetStats>,
    book: Arc<LatencyBook>,
    dashboards: Arc<DashboardStats>,
    stop: CancellationToken,
) -> tokio::task::JoinHandle<()> {
    let (drivers, riders) = (scenario.drivers.count as u64, scenario.riders.count as u64);
    let bar = indicatif::ProgressBar::new(scenario.duration.as_secs().max(1));
    bar.set_style(
        indicatif::ProgressStyle::with_template("{elapsed_precise} [{bar:24}] {msg}")
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    tokio::spawn(async move {
        let mut ticker = tokio::time::interval(Duration::from_secs(1));
        ticker.tick().await;
        let (mut last_sent, mut last_samples, mut measuring) = (0, 0, false);
        while !stop.is_cancelled() {
            ticker.tick().await;
            let sent = stats.sent.load(Ordering::Relaxed);
            let d = stats.connected.load(Ordering::Relaxed);
            let r = stats.riders_connected.load(Ordering::Relaxed);
            if !measuring && d >= drivers && r >= riders {
                book.reset();
                dashboards.reset();
                (measuring, last_samples) = (true, 0);
            }
            let l = book.percentiles();
            bar.inc(1);
            bar.set_message(format!(
                "drivers {d}  riders {r}  fixes/s {}  applied/s {}  p99 {:.2} ms  errors {}",
                sent - last_sent,
                l.samples.saturating_sub(last_samples),
                l.p99,
                stats.connect_errors.load(Ordering::Relaxed)
                    + stats.send_errors.load(Ordering::Relaxed),
            ));
            (last_sent, last_samples) = (sent, l.samples);
        }
        bar.finish_and_clear();
    })
}

/// Plays a scenario against a node and prints (and maybe writes) the summary.
async fn play(
    scenario: Scenario,
    client: &ClientArgs,
    ca: PathBuf,
    server_name: String,
) -> anyhow::Result<Summary> {
    // Fail early and clearly if the certificate is missing.
    Connector::new(&ca, &server_name).with_context(|| format!("trusting {}", ca.display()))?;
    let target = Target {
        node: client.nodes[0],
        seeds: client.nodes.clone(),
        token_secret: client.token_secret.clone(),
        connect_concurrency: client.connect_concurrency,
        connect_per_s: client.connect_rate,
    };
    println!(
        "hexfleet-sim: {} — {} drivers, {} riders for {:?} against {}",
        scenario.name,
        scenario.drivers.count,
        scenario.riders.count,
        scenario.duration,
        target.node
    );
    let stats = Arc::new(FleetStats::default());
    let book = Arc::new(LatencyBook::default());
    let stop = stop_after(Some(scenario.duration));
    let started = Instant::now();
    let dashboard_stats = Arc::new(DashboardStats::default());
    let progress = spawn_progress(
        &scenario,
        stats.clone(),
        book.clone(),
        dashboard_stats.clone(),
        stop.clone(),
    );
    let tls = if client.http_tls && scenario.dashboards.count > 0 {
        let (ca, name) = trust(client);
        Some((Arc::new(hexfleet_client::https_config(&ca)?), name))
    } else {
        None
    };
    let dashboards = (scenario.dashboards.count > 0).then(|| {
        let target = Arc::new(dashboards::Target {
            http: client.http,
            tls,
            token_secret: client.token_secret.clone(),
            format: if scenario.dashboards.msgpack {
                Format::MsgPack
            } else {
                Format::Json
            },
        });
        tokio::spawn(dashboards::watch(
            scenario.dashboards.count,
            target,
            scenario.bbox(),
            scenario.seed,
            dashboard_stats.clone(),
            book.clone(),
            stop.clone(),
        ))
    });
    let policy = match client.transport.as_str() {
        "websocket" => TransportPolicy::WebSocketOnly,
        "auto" => TransportPolicy::Auto,
        _ => TransportPolicy::QuicOnly,
    };
    let outcome = fleet::run(
        &scenario,
        &target,
        &client.id_prefix,
        || {
            let connector = Connector::new(&ca, &server_name)?.with_transport(policy);
            connector.set_https_address(client.nodes[0], client.http);
            Ok(connector)
        },
        stats.clone(),
        book.clone(),
        stop,
    )
    .await?;
    let _ = progress.await;
    if let Some(dashboards) = dashboards {
        let _ = dashboards.await;
    }
    let elapsed = started.elapsed().min(scenario.duration);
    let summary = Summary::new(
        &scenario,
        &target.node.to_string(),
        &stats,
        &book,
        (scenario.dashboards.count > 0).then_some(&*dashboard_stats),
        &outcome,
        elapsed,
    );
    summary.print();
    if let Some(path) = &client.json {
        std::fs::write(path, serde_json::to_vec_pretty(&summary)?)
            .with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(summary)
}

fn trust(client: &ClientArgs) -> (PathBuf, String) {
    (
        client
            .ca
            .clone()
            .unwrap_or_else(hexfleet_protocol::dev::default_dev_cert),
        client.server_name.clone(),
    )
}

/// Starts a node in this process, its tokens signed with `token_secret`,
/// on Redis at `redis_url` if given, else on the in-memory store.
async fn start_embedded(
    mut config: Config,
    token_secret: &str,
    redis_url: Option<&String>,
) -> anyhow::Result<Node> {
    config.auth.token_secret = token_secret.to_string();
    if let Some(url) = redis_url {
        config.store.kind = StoreKind::Redis;
        config.store.redis_url = url.clone();
    }
    Node::start(config)
        .await
        .context("starting the embedded node")
}

async fn demo(args: DemoArgs) -> anyhow::Result<()> {
    let mut config = Config {
        node_id: "demo".into(),
        ..Config::default()
    };
    config.quic.listen = args.quic_listen;
    config.http.listen = args.http_listen;
    config.admin.listen = args.admin_listen;
    // The demo runs on loopback, opened in a local browser: plain HTTP
    // spares it a certificate warning, unless asked for HTTPS as
    // production nodes serve it.
    config.http.tls = args.https;
    // Every simulated client comes from 127.0.0.1, and an app on this
    // machine (the SDK's Python example) comes on top of the fleet.
    config.quic.max_connections_per_address = config.quic.max_connections;
    let node = start_embedded(config, &args.token_secret, args.redis_url.as_ref()).await?;
    let cert = node
        .dev_cert
        .clone()
        .context("the demo node uses a development certificate")?;
    let mut scenario = Scenario {
        name: "demo".into(),
        duration: args
            .duration
            .unwrap_or(Duration::from_secs(365 * 24 * 3600)),
        ..Scenario::default()
    };
    scenario.drivers.count = args.drivers;
    scenario.drivers.wrong_clock_share = args.wrong_clock_share;
    scenario.riders.count = args.riders;
    scenario.riders.lifetime = Some(Duration::from_secs(60));
    scenario.dashboards.count = args.dashboards;
    scenario.check()?;
    let (lat, lon) = scenario.bbox().center();
    println!(
        "hexfleet demo: an embedded node with {} simulated drivers and {} riders",
        args.drivers, args.riders
    );
    println!("  store   {}", node.store.kind());
    println!("  QUIC    {} (ALPN hexfleet/1)", node.quic_addr);
    let scheme = if node.http_tls { "https" } else { "http" };
    println!("  HTTP    {scheme}://{}", node.http_addr);
    let dispatch = fleet::token(&args.token_secret, Role::Dashboard, "demo-dispatch")?;
    // Street level, where every car is drawn moving; zoomed out, the city
    // shows as counts per cell.
    println!(
        "  dashboard  {scheme}://{}/?token={dispatch}&lat={lat:.4}&lon={lon:.4}&zoom=14.5",
        node.http_addr
    );
    println!("             open it in a browser; zoom out for counts over the whole city");
    println!(
        "  try     curl -k -H 'Authorization: Bearer {dispatch}' '{scheme}://{}/v1/vehicles?lat={lat:.4}&lon={lon:.4}&radius_m=2000&limit=5'",
        node.http_addr
    );
    println!("          curl http://{}/metrics", node.admin_addr);
    println!("Ctrl-C to stop.");
    let client = ClientArgs {
        nodes: vec![node.quic_addr],
        http: node.http_addr,
        http_tls: node.http_tls,
        ca: Some(cert.clone()),
        server_name: hexfleet_protocol::dev::DEV_SERVER_NAME.into(),
        token_secret: args.token_secret.clone(),
        transport: "quic".into(),
        connect_concurrency: 64,
        connect_rate: None,
        id_prefix: "demo".into(),
        json: None,
    };
    let status = {
        let (metrics, table) = (node.metrics.clone(), node.table.clone());
        tokio::spawn(async move {
            let mut ticker = tokio::time::interval(Duration::from_secs(5));
            ticker.tick().await;
            let mut last = 0;
            loop {
                ticker.tick().await;
                let accepted = metrics.fixes_accepted.get();
                println!(
                    "node: vehicles {}  fixes/s {:.0}  subscribers {}  delta items {}",
                    table.len(),
                    (accepted - last) as f64 / 5.0,
                    metrics.subscribers.get(),
                    metrics.delta_frames.get(),
                );
                last = accepted;
            }
        })
    };
    let played = play(scenario, &client, cert, client.server_name.clone()).await;
    status.abort();
    node.shutdown(Duration::from_secs(5)).await;
    played.map(|_| ())
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    match Cli::parse().command {
        Command::Load(args) => {
            let (ca, name) = trust(&args.client);
            play(args.scenario()?, &args.client, ca, name)
                .await
                .map(|_| ())
        }
        Command::Run(args) => {
            let mut scenario = Scenario::from_file(&args.scenario)?;
            if let Some(d) = args.duration {
                scenario.duration = d;
            }
            let (ca, name) = trust(&args.client);
            play(scenario, &args.client, ca, name).await.map(|_| ())
        }
        Command::Demo(args) => demo(args).await,
        Command::Bench(args) => {
            let command = std::iter::once("hexfleet-sim".to_string())
                .chain(std::env::args().skip(1))
                .collect::<Vec<_>>()
                .join(" ");
            bench::run(bench::Options {
                redis_url: args.redis_url,
                smoke: args.smoke,
                json: args.json,
                markdown: args.markdown,
                command,
            })
            .await
            .map(|_| ())
        }
        Command::ServeNode(args) => serve_node(args).await,
        Command::Airport(args) => airport(args).await,
    }
}
