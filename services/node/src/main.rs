//! `hexfleet-node`: runs an ingest node, or mints a token.

use std::{net::SocketAddr, path::PathBuf, time::Duration};

use anyhow::Context as _;
use clap::{Args, Parser, Subcommand};
use hexfleet_model::VehicleId;
use hexfleet_node::{
    clock,
    config::{Config, StoreKind},
    Node,
};
use hexfleet_protocol::{Claims, Role, SigningKey};

#[derive(Parser)]
#[command(name = "hexfleet-node", version, about = "hexfleet ingest node")]
struct Cli {
    #[command(flatten)]
    run: RunArgs,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Print a signed token for a driver, rider or dashboard.
    Token(TokenArgs),
}

#[derive(Args)]
struct RunArgs {
    /// Configuration file (TOML); see config/default.toml.
    #[arg(long, env = "HEXFLEET_CONFIG", global = true)]
    config: Option<PathBuf>,
    /// This node's id.
    #[arg(long, env = "HEXFLEET_NODE_ID")]
    node_id: Option<String>,
    /// UDP address of the QUIC endpoint.
    #[arg(long, env = "HEXFLEET_QUIC_LISTEN")]
    quic_listen: Option<SocketAddr>,
    /// TCP address of the HTTP API.
    #[arg(long, env = "HEXFLEET_HTTP_LISTEN")]
    http_listen: Option<SocketAddr>,
    /// Serve HTTPS/WSS on the HTTP address (false: plain HTTP, only behind a
    /// proxy that terminates TLS).
    #[arg(long, env = "HEXFLEET_HTTP_TLS", value_parser = clap::builder::BoolishValueParser::new())]
    http_tls: Option<bool>,
    /// TCP address of the admin listener (metrics, probes).
    #[arg(long, env = "HEXFLEET_ADMIN_LISTEN")]
    admin_listen: Option<SocketAddr>,
    /// JSON Web Key Set file of the keys that sign tokens (by kid).
    #[arg(long, env = "HEXFLEET_JWKS")]
    jwks: Option<PathBuf>,
    /// Logs as JSON lines (one object per event) instead of text.
    #[arg(long, env = "HEXFLEET_LOG_JSON", value_parser = clap::builder::BoolishValueParser::new(), global = true)]
    log_json: bool,
    /// Vehicle store.
    #[arg(long, env = "HEXFLEET_STORE", value_parser = parse_store)]
    store: Option<StoreKind>,
    /// Redis URL (for redis-cluster: comma-separated seed nodes). Implies
    /// `--store redis` unless `--store` says otherwise.
    #[arg(long, env = "HEXFLEET_REDIS_URL")]
    redis_url: Option<String>,
    /// TLS certificate chain (PEM); without it a development certificate is made.
    #[arg(long, env = "HEXFLEET_TLS_CERT", requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    /// TLS private key (PEM).
    #[arg(long, env = "HEXFLEET_TLS_KEY", requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    /// Join a cluster of nodes sharing the Redis store.
    #[arg(long, env = "HEXFLEET_CLUSTER", value_parser = clap::builder::BoolishValueParser::new())]
    cluster: bool,
    /// The QUIC address other nodes redirect clients to (default: the bound one).
    #[arg(long, env = "HEXFLEET_ADVERTISE_QUIC")]
    advertise_quic: Option<String>,
    /// The HTTP address shown in `/v1/cluster` (default: the bound one).
    #[arg(long, env = "HEXFLEET_ADVERTISE_HTTP")]
    advertise_http: Option<String>,
    /// A development node: the public development token secret is allowed
    /// on listeners beyond loopback.
    #[arg(long, env = "HEXFLEET_DEV", value_parser = clap::builder::BoolishValueParser::new())]
    dev: bool,
    /// Secret that signs tokens (HMAC-SHA256).
    #[arg(
        long,
        env = "HEXFLEET_TOKEN_SECRET",
        hide_env_values = true,
        global = true
    )]
    token_secret: Option<String>,
}

#[derive(Args)]
struct TokenArgs {
    /// Mint a driver token for this driver (vehicle) id.
    #[arg(long, group = "subject")]
    driver: Option<String>,
    /// Mint a rider token for this rider id.
    #[arg(long, group = "subject")]
    rider: Option<String>,
    /// Mint a dashboard token for this dashboard id.
    #[arg(long, group = "subject")]
    dashboard: Option<String>,
    /// How long the token is valid.
    #[arg(long, default_value = "24h", value_parser = humantime::parse_duration)]
    ttl: Duration,
    /// The key id to put in the header (a key of the node's JWKS).
    #[arg(long)]
    kid: Option<String>,
    /// Sign with this private key (PEM) instead of the shared secret.
    #[arg(long, requires = "alg")]
    key: Option<PathBuf>,
    /// The key's algorithm: RS256, RS384, RS512, PS256, ES256, ES384, EdDSA.
    #[arg(long, requires = "key")]
    alg: Option<hexfleet_protocol::Algorithm>,
    /// The audience claim.
    #[arg(long)]
    aud: Option<String>,
}

fn parse_store(s: &str) -> Result<StoreKind, String> {
    match s {
        "memory" => Ok(StoreKind::Memory),
        "redis" => Ok(StoreKind::Redis),
        "redis-cluster" => Ok(StoreKind::RedisCluster),
        _ => Err("expected memory, redis or redis-cluster".into()),
    }
}

impl RunArgs {
    fn config(&self) -> anyhow::Result<Config> {
        let mut config = match &self.config {
            Some(path) => Config::from_file(path)?,
            None => Config::default(),
        };
        if let Some(v) = &self.node_id {
            config.node_id = v.clone();
        }
        if let Some(v) = self.quic_listen {
            config.quic.listen = v;
        }
        if let Some(v) = self.http_listen {
            config.http.listen = v;
        }
        if let Some(v) = self.http_tls {
            config.http.tls = v;
        }
        if let Some(v) = self.admin_listen {
            config.admin.listen = v;
        }
        if let Some(v) = &self.jwks {
            config.auth.jwks = Some(v.clone());
        }
        if let Some(v) = &self.redis_url {
            config.store.redis_url = v.clone();
            config.store.kind = StoreKind::Redis;
        }
        if let Some(v) = self.store {
            config.store.kind = v;
        }
        if let (Some(cert), Some(key)) = (&self.tls_cert, &self.tls_key) {
            config.tls.cert = Some(cert.clone());
            config.tls.key = Some(key.clone());
        }
        config.dev |= self.dev;
        config.cluster.enabled |= self.cluster;
        if let Some(v) = &self.advertise_quic {
            config.cluster.advertise_quic = v.clone();
        }
        if let Some(v) = &self.advertise_http {
            config.cluster.advertise_http = v.clone();
        }
        if let Some(v) = &self.token_secret {
            config.auth.token_secret = v.clone();
        }
        Ok(config)
    }
}

fn mint(args: &TokenArgs, secret: &str) -> anyhow::Result<String> {
    let (role, subject) = match (&args.driver, &args.rider, &args.dashboard) {
        (Some(id), _, _) => (Role::Driver, id),
        (_, Some(id), _) => (Role::Rider, id),
        (_, _, Some(id)) => (Role::Dashboard, id),
        _ => anyhow::bail!("say whom the token is for: --driver ID, --rider ID or --dashboard ID"),
    };
    let subject = VehicleId::new(subject).context("the id")?;
    let now = clock::now_s();
    let mut claims = Claims::new(role, subject, now + args.ttl.as_secs()).issued(now);
    if let Some(aud) = &args.aud {
        claims = claims.for_audience(aud.clone());
    }
    let mut key = match (&args.key, args.alg) {
        (Some(path), Some(alg)) => {
            let pem = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
            SigningKey::from_pem(alg, &pem)?
        }
        _ => SigningKey::hs256(secret.as_bytes()),
    };
    if let Some(kid) = &args.kid {
        key = key.with_kid(kid.clone());
    }
    Ok(claims.sign(&key)?)
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| "info,quinn=warn".into());
    if cli.run.log_json {
        tracing_subscriber::fmt()
            .json()
            .with_current_span(true)
            .with_env_filter(filter)
            .init();
    } else {
        // Colours for a person at a terminal, plain text for a file or a
        // journal.
        tracing_subscriber::fmt()
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stdout()))
            .with_env_filter(filter)
            .init();
    }
    let config = cli.run.config()?;
    if let Some(Command::Token(args)) = &cli.command {
        println!("{}", mint(args, &config.auth.token_secret)?);
        return Ok(());
    }
    let node = Node::start(config).await?;
    if let Some(cert) = &node.dev_cert {
        tracing::info!(cert = %cert.display(), "clients on this machine trust this development certificate");
    }
    let stopping = node.shutdown_token();
    let signal = tokio::select! {
        signal = shutdown_signal() => Some(signal.context("waiting for a shutdown signal")?),
        // The node stopped itself (another process took its id).
        _ = stopping.cancelled() => None,
    };
    tracing::info!(
        signal = signal.unwrap_or("none: the node stopped itself"),
        "shutting down: telling clients, draining sessions, writing the last changes"
    );
    node.shutdown(Duration::from_secs(5)).await;
    tracing::info!("stopped");
    match signal {
        Some(_) => Ok(()),
        None => {
            anyhow::bail!("the node stopped itself: another process holds its id (see the log)")
        }
    }
}

/// Ctrl-C (SIGINT), or SIGTERM from systemd, Kubernetes or `docker stop`:
/// either one drains the node the same way.
async fn shutdown_signal() -> std::io::Result<&'static str> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut terminate = signal(SignalKind::terminate())?;
    tokio::select! {
        interrupted = tokio::signal::ctrl_c() => interrupted.map(|()| "SIGINT"),
        _ = terminate.recv() => Ok("SIGTERM"),
    }
}
