//! `hexfleet-sim`: drives real QUIC driver clients against a node.
//!
//! - `load`: a fleet against a running node, with a summary at the end.
//! - `demo`: an embedded node plus a simulated fleet, to see it work.

mod fleet;
mod latency;
mod movement;
mod riders;

use std::{
    net::SocketAddr,
    path::PathBuf,
    sync::{atomic::Ordering, Arc},
    time::{Duration, Instant},
};

use anyhow::Context as _;
use clap::{Args, Parser, Subcommand};
use hexfleet_client::Connector;
use hexfleet_node::{
    config::{Config, StoreKind},
    Node,
};
use tokio_util::sync::CancellationToken;

use crate::{
    fleet::{FleetOptions, FleetStats, Outcome},
    latency::LatencyBook,
    movement::BBox,
};

#[derive(Parser)]
#[command(name = "hexfleet-sim", version, about = "hexfleet fleet simulator")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Drive a fleet against a running node and report what it accepted.
    Load(LoadArgs),
    /// Run an embedded node with a simulated fleet.
    Demo(DemoArgs),
}

#[derive(Args, Clone)]
struct FleetArgs {
    /// Fixes per driver per second.
    #[arg(long, default_value_t = 1.0)]
    rate: f64,
    /// City bounding box: min_lat,min_lon,max_lat,max_lon (default: Berlin).
    #[arg(long)]
    bbox: Option<BBox>,
    /// Driver ids are <prefix>-<n>.
    #[arg(long, default_value = "sim")]
    id_prefix: String,
    /// Connections in handshake at once while ramping up.
    #[arg(long, default_value_t = 64)]
    connect_concurrency: usize,
    /// Radius each simulated rider watches, metres.
    #[arg(long, default_value_t = 1_000.0)]
    rider_radius: f64,
    /// Sign the drivers off at the end, so the node removes their vehicles at
    /// once; without it they disconnect and their vehicles go stale.
    #[arg(long)]
    goodbye: bool,
    /// Seed of the fleet's randomness.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Secret that signs the drivers' tokens; must match the node's.
    #[arg(long, env = "HEXFLEET_TOKEN_SECRET", hide_env_values = true, default_value = hexfleet_protocol::dev::DEV_TOKEN_SECRET, hide_default_value = true)]
    token_secret: String,
}

#[derive(Args)]
struct LoadArgs {
    /// Simulated drivers (one QUIC connection each).
    #[arg(long, default_value_t = 100)]
    drivers: usize,
    /// Simulated riders (one QUIC connection each), spread over the city;
    /// a fifth of them walk and re-subscribe.
    #[arg(long, default_value_t = 0)]
    riders: usize,
    /// QUIC address of the node.
    #[arg(long, default_value = "127.0.0.1:4433")]
    node: SocketAddr,
    /// How long to drive, e.g. 20s, 5m.
    #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
    duration: Duration,
    /// Certificate (PEM or DER) to trust; default: the node's development
    /// certificate on this machine.
    #[arg(long, env = "HEXFLEET_CA")]
    ca: Option<PathBuf>,
    /// The name the node's certificate is issued for.
    #[arg(long, default_value = hexfleet_protocol::dev::DEV_SERVER_NAME)]
    server_name: String,
    #[command(flatten)]
    fleet: FleetArgs,
}

#[derive(Args)]
struct DemoArgs {
    /// Simulated drivers (one QUIC connection each).
    #[arg(long, default_value_t = 1_000)]
    drivers: usize,
    /// Simulated riders watching the fleet.
    #[arg(long, default_value_t = 50)]
    riders: usize,
    /// HTTP address of the embedded node.
    #[arg(long, default_value = "127.0.0.1:8080")]
    http_listen: SocketAddr,
    /// QUIC address of the embedded node.
    #[arg(long, default_value = "127.0.0.1:4433")]
    quic_listen: SocketAddr,
    /// Use Redis at this URL instead of the in-memory store.
    #[arg(long, env = "HEXFLEET_REDIS_URL")]
    redis_url: Option<String>,
    /// Stop after this long (default: run until Ctrl-C).
    #[arg(long, value_parser = humantime::parse_duration)]
    duration: Option<Duration>,
    #[command(flatten)]
    fleet: FleetArgs,
}

impl FleetArgs {
    fn options(
        &self,
        node: SocketAddr,
        drivers: usize,
        riders: usize,
    ) -> anyhow::Result<FleetOptions> {
        anyhow::ensure!(
            self.rate > 0.0 && self.rate <= 100.0,
            "--rate must be in (0, 100] fixes per second"
        );
        anyhow::ensure!(drivers > 0, "--drivers must be at least 1");
        Ok(FleetOptions {
            node,
            drivers,
            rate_hz: self.rate,
            bbox: self.bbox.unwrap_or(BBox::BERLIN),
            id_prefix: self.id_prefix.clone(),
            token_secret: self.token_secret.clone(),
            connect_concurrency: self.connect_concurrency,
            goodbye: self.goodbye,
            seed: self.seed,
            riders,
            rider_radius_m: self.rider_radius,
        })
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

fn print_summary(
    options: &FleetOptions,
    stats: &FleetStats,
    book: &LatencyBook,
    outcome: &Outcome,
    elapsed: Duration,
) {
    let secs = elapsed.as_secs_f64().max(1e-9);
    let sent = stats.sent.load(Ordering::Relaxed);
    let connected = stats.connected.load(Ordering::Relaxed);
    let lost = sent.saturating_sub(outcome.accepted + outcome.rejected);
    println!();
    println!(
        "drivers        {connected} connected of {}",
        options.drivers
    );
    if let Some((p50, p99, max)) = stats.connect_percentiles() {
        println!("handshake      p50 {p50:.1} ms  p99 {p99:.1} ms  max {max:.1} ms");
    }
    println!("fixes sent     {sent} ({:.0}/s)", sent as f64 / secs);
    println!(
        "accepted       {} ({:.0}/s, {:.2}% of sent)",
        outcome.accepted,
        outcome.accepted as f64 / secs,
        100.0 * outcome.accepted as f64 / sent.max(1) as f64
    );
    println!("rejected       {}", outcome.rejected);
    for (reason, n) in &outcome.rejected_by_reason {
        println!("  {:<20} {n}", reason.as_str());
    }
    println!("unacknowledged {lost}");
    println!(
        "errors         {} connect, {} send",
        stats.connect_errors.load(Ordering::Relaxed),
        stats.send_errors.load(Ordering::Relaxed)
    );
    if options.riders > 0 {
        let r = &outcome.riders;
        let items = r.added + r.moved + r.removed;
        println!(
            "riders         {} connected of {} ({} reconnects)",
            stats.riders_connected.load(Ordering::Relaxed),
            options.riders,
            r.reconnects
        );
        let l = book.percentiles();
        println!(
            "latency        p50 {:.2} ms  p90 {:.2} ms  p99 {:.2} ms  p99.9 {:.2} ms  max {:.2} ms  ({} samples: fix created -> rider applied)",
            l.p50, l.p90, l.p99, l.p999, l.max, l.samples
        );
        println!(
            "deltas         {items} items ({:.0}/s): {} added, {} moved, {} removed, in {} frames",
            items as f64 / secs,
            r.added,
            r.moved,
            r.removed,
            r.frames
        );
        println!(
            "wire           {:.1} bytes per delta item ({} bytes of updates; a moved item is a {}-byte record)",
            r.bytes as f64 / items.max(1) as f64,
            r.bytes,
            hexfleet_protocol::Moved::LEN
        );
    }
    if let Some(e) = stats.last_error() {
        println!("last error     {e}");
    }
}

async fn load(args: LoadArgs) -> anyhow::Result<()> {
    let options = args.fleet.options(args.node, args.drivers, args.riders)?;
    let ca = args
        .ca
        .clone()
        .unwrap_or_else(hexfleet_protocol::dev::default_dev_cert);
    let server_name = args.server_name.clone();
    // Fail early and clearly if the certificate is missing.
    Connector::new(&ca, &server_name).with_context(|| format!("trusting {}", ca.display()))?;
    println!(
        "hexfleet-sim load: {} drivers at {} Hz and {} riders for {:?} against {}",
        options.drivers, options.rate_hz, options.riders, args.duration, options.node
    );
    let stats = Arc::new(FleetStats::default());
    let book = Arc::new(LatencyBook::default());
    let stop = stop_after(Some(args.duration));
    let started = Instant::now();
    let progress = spawn_progress(options.clone(), stats.clone(), book.clone(), stop.clone());
    let outcome = fleet::run(
        options.clone(),
        || Connector::new(&ca, &server_name),
        stats.clone(),
        book.clone(),
        stop,
    )
    .await?;
    progress.abort();
    print_summary(
        &options,
        &stats,
        &book,
        &outcome,
        started.elapsed().min(args.duration),
    );
    Ok(())
}

/// Prints a line every two seconds while the fleet runs. Latency is
/// measured from the moment every client is connected, so the ramp-up's
/// handshake storm does not count.
fn spawn_progress(
    options: FleetOptions,
    stats: Arc<FleetStats>,
    book: Arc<LatencyBook>,
    stop: CancellationToken,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let started = Instant::now();
        let mut ticker = tokio::time::interval(Duration::from_secs(2));
        ticker.tick().await;
        let (mut last_sent, mut last_samples, mut measuring) = (0, 0, false);
        while !stop.is_cancelled() {
            ticker.tick().await;
            let sent = stats.sent.load(Ordering::Relaxed);
            let drivers = stats.connected.load(Ordering::Relaxed);
            let riders = stats.riders_connected.load(Ordering::Relaxed);
            if !measuring
                && drivers as usize >= options.drivers
                && riders as usize >= options.riders
            {
                book.reset();
                (measuring, last_samples) = (true, 0);
            }
            let l = book.percentiles();
            println!(
                "[{:>4}s] drivers {:>6}  riders {:>5}  fixes/s {:>8.0}  applied/s {:>8.0}  p99 {:>7.2} ms  errors {}",
                started.elapsed().as_secs(),
                drivers,
                riders,
                (sent - last_sent) as f64 / 2.0,
                l.samples.saturating_sub(last_samples) as f64 / 2.0,
                l.p99,
                stats.connect_errors.load(Ordering::Relaxed) + stats.send_errors.load(Ordering::Relaxed),
            );
            (last_sent, last_samples) = (sent, l.samples);
        }
    })
}

async fn demo(args: DemoArgs) -> anyhow::Result<()> {
    let mut config = Config {
        node_id: "demo".into(),
        ..Config::default()
    };
    config.quic.listen = args.quic_listen;
    config.http.listen = args.http_listen;
    config.auth.token_secret = args.fleet.token_secret.clone();
    if let Some(url) = &args.redis_url {
        config.store.kind = StoreKind::Redis;
        config.store.redis_url = url.clone();
    }
    let node = Node::start(config)
        .await
        .context("starting the embedded node")?;
    let cert = node
        .dev_cert
        .clone()
        .context("the demo node uses a development certificate")?;
    let options = args
        .fleet
        .options(node.quic_addr, args.drivers, args.riders)?;
    let (lat, lon) = options.bbox.center();
    println!(
        "hexfleet demo: an embedded node with {} simulated drivers",
        options.drivers
    );
    println!("  store   {}", node.store.kind());
    println!("  QUIC    {} (ALPN hexfleet/1)", node.quic_addr);
    println!("  HTTP    http://{}", node.http_addr);
    println!(
        "  try     curl 'http://{}/v1/vehicles?lat={lat:.4}&lon={lon:.4}&radius_m=2000&limit=5'",
        node.http_addr
    );
    println!("          curl http://{}/metrics", node.http_addr);
    println!("Ctrl-C to stop.");

    let stats = Arc::new(FleetStats::default());
    let book = Arc::new(LatencyBook::default());
    let stop = stop_after(args.duration);
    let status = {
        let (metrics, table, stop, book) = (
            node.metrics.clone(),
            node.table.clone(),
            stop.clone(),
            book.clone(),
        );
        tokio::spawn(async move {
            let started = Instant::now();
            let mut ticker = tokio::time::interval(Duration::from_secs(2));
            ticker.tick().await;
            let mut last = 0;
            while !stop.is_cancelled() {
                ticker.tick().await;
                let accepted = metrics.fixes_accepted.get();
                println!(
                    "[{:>4}s] vehicles {:>6}  fixes/s {:>7.0}  riders {:>4}  rider latency p99 {:>6.2} ms",
                    started.elapsed().as_secs(),
                    table.len(),
                    (accepted - last) as f64 / 2.0,
                    metrics.subscribers.get(),
                    book.percentiles().p99,
                );
                last = accepted;
            }
        })
    };
    let started = Instant::now();
    let outcome = fleet::run(
        options.clone(),
        || Connector::new(&cert, hexfleet_protocol::dev::DEV_SERVER_NAME),
        stats.clone(),
        book.clone(),
        stop,
    )
    .await?;
    status.abort();
    print_summary(&options, &stats, &book, &outcome, started.elapsed());
    node.shutdown(Duration::from_secs(5)).await;
    Ok(())
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()),
        )
        .init();
    match Cli::parse().command {
        Command::Load(args) => load(args).await,
        Command::Demo(args) => demo(args).await,
    }
}
