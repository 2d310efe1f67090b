//! Node configuration: one struct, every field documented, every default in
//! one place. Loaded from TOML (`config/default.toml` documents the same
//! fields) and overridden by command-line flags and environment variables.

use std::{net::SocketAddr, path::PathBuf, time::Duration};

use hexfleet_model::{CellModel, CellModelError};

use crate::budget::RequestLimits;
use serde::Deserialize;

#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// This node's id, shown in `Welcome`, `/healthz` and logs.
    pub node_id: String,
    /// A development node: allowed to use the public development token
    /// secret on listeners beyond loopback. Never in production.
    pub dev: bool,
    pub quic: QuicConfig,
    pub http: HttpConfig,
    pub admin: AdminConfig,
    pub tls: TlsConfig,
    pub auth: AuthConfig,
    pub cells: CellsConfig,
    pub ingest: IngestConfig,
    pub riders: RidersConfig,
    pub dashboard: DashboardConfig,
    pub store: StoreConfig,
    pub cluster: ClusterConfig,
    pub zones: ZonesConfig,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RidersConfig {
    /// The largest radius a subscription may watch, in metres.
    pub max_radius_m: f64,
    /// A subscriber whose updates stay blocked this long is disconnected
    /// (`slow_consumer`).
    #[serde(with = "humantime_serde")]
    pub slow_consumer_after: Duration,
    /// How fast one rider connection may `Subscribe`: each one is a cover
    /// and a view difference for the node. A rider app re-subscribes when
    /// its rider moves, about once a second at most.
    pub requests: RequestLimits,
}

impl Default for RidersConfig {
    fn default() -> Self {
        Self {
            max_radius_m: 5_000.0,
            slow_consumer_after: Duration::from_secs(5),
            requests: RequestLimits {
                per_second: 5.0,
                burst: 20,
                close_after: 100,
            },
        }
    }
}

/// Dispatch dashboards (`GET /v1/ws` and the page at `/`). They follow the
/// riders' slow-consumer rule (`riders.slow_consumer_after`).
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DashboardConfig {
    /// A viewport covering more index cells than this shows per-cell counts
    /// instead of vehicles.
    pub max_vehicle_cells: usize,
    /// Counts are shown at the finest resolution whose cells covering the
    /// viewport are at most this many.
    pub max_density_cells: usize,
    /// How often counts are refreshed (only changed cells are sent).
    #[serde(with = "humantime_serde")]
    pub density_interval: Duration,
    /// A raster tile URL template for the map background, e.g.
    /// `https://tile.example.com/{z}/{x}/{y}.png`. Empty: a plain background.
    pub tile_url: String,
    /// How fast one dashboard may send `viewport`, `filter` and `find`: a
    /// viewport costs a cover of up to thousands of cells. The page sends one
    /// per pan or zoom gesture, debounced.
    pub requests: RequestLimits,
    /// The largest WebSocket message a dashboard may send, in bytes; a
    /// bigger one closes the connection (1009). Requests are a few hundred
    /// bytes.
    pub max_message_bytes: usize,
}

impl Default for DashboardConfig {
    fn default() -> Self {
        Self {
            max_vehicle_cells: 2_000,
            max_density_cells: 800,
            density_interval: Duration::from_millis(500),
            tile_url: String::new(),
            requests: RequestLimits {
                per_second: 10.0,
                burst: 40,
                close_after: 200,
            },
            max_message_bytes: 16 * 1024,
        }
    }
}

/// Zones (geofences): `PUT /v1/zones/{id}` and the events they raise.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ZonesConfig {
    /// The most zones the cluster holds; a new one beyond is refused.
    pub max_zones: usize,
    /// The most vertices one zone may have (all rings together).
    pub max_vertices: usize,
    /// The largest area one zone may cover, km²: its edge and inside cells
    /// cost memory on every node.
    pub max_area_km2: f64,
    /// How often each node reads zone changes from the store: every node
    /// applies a change within this (plus the tiling).
    #[serde(with = "humantime_serde")]
    pub poll_interval: Duration,
}

impl Default for ZonesConfig {
    fn default() -> Self {
        Self {
            max_zones: 20_000,
            max_vertices: 10_000,
            max_area_km2: 5_000.0,
            poll_interval: Duration::from_millis(250),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct QuicConfig {
    /// UDP address of the QUIC endpoint. Port 0 picks a free port.
    pub listen: SocketAddr,
    /// How many endpoints share the port (SO_REUSEPORT); the kernel spreads
    /// clients over them by address, so each endpoint task takes a share of
    /// the packets. 1 is enough until the endpoint task saturates a core.
    pub endpoints: usize,
    /// Requested UDP send and receive buffer size per socket, in bytes. The
    /// kernel may cap it (net.core.rmem_max); the effective size is logged.
    pub udp_buffer_bytes: usize,
    /// Connections beyond this are refused at once.
    pub max_connections: usize,
    /// A connection silent for this long is closed. Clients keep alive well
    /// within it.
    #[serde(with = "humantime_serde")]
    pub idle_timeout: Duration,
    /// Time allowed from the first packet to a verified `Hello`.
    #[serde(with = "humantime_serde")]
    pub handshake_timeout: Duration,
    /// Connections from one IP address at most. Carrier-grade NAT puts many
    /// phones behind one address, so this is generous; it stops one host
    /// from taking the node's whole connection budget.
    pub max_connections_per_address: usize,
    /// Handshakes in progress above which a new client must first prove its
    /// address with a QUIC Retry (one extra round trip): a flood of spoofed
    /// Initial packets then costs the node a stateless reply each, no state.
    pub retry_above_handshakes: usize,
    /// Handshakes in progress at most; beyond it new ones are dropped
    /// unanswered until some complete or time out.
    pub max_handshakes: usize,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct HttpConfig {
    /// TCP address of the HTTP API (health, metrics, vehicles).
    pub listen: SocketAddr,
    /// The largest `radius_m` the nearby API accepts.
    pub max_nearby_radius_m: f64,
    /// The largest `limit` the nearby API accepts.
    pub max_nearby_limit: usize,
    /// A connection must send a request's headers within this long, or it
    /// is closed: a client that trickles them ties up nothing for long.
    #[serde(with = "humantime_serde")]
    pub header_timeout: Duration,
    /// Open HTTP connections (WebSockets included) at most; beyond it, new
    /// ones wait in the kernel's accept queue until one closes.
    pub max_connections: usize,
    /// Open HTTP connections from one IP address at most; beyond it new ones
    /// are closed at once. As many as QUIC allows: drivers and riders whose
    /// UDP is blocked come over WebSocket, and a corporate network puts all
    /// its phones behind one address.
    pub max_connections_per_address: usize,
    /// Serve HTTPS and WSS with the node's certificate (`[tls]`). Turn it
    /// off only behind a proxy that terminates TLS.                (--http-tls)
    pub tls: bool,
}

/// The operators' listener: `/metrics`, `/healthz`, `/livez`, `/readyz`,
/// plain HTTP without tokens, for Prometheus and orchestrator probes. Keep
/// it off the public network.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AdminConfig {
    /// TCP address of the admin listener.
    pub listen: SocketAddr,
}

impl Default for AdminConfig {
    fn default() -> Self {
        Self {
            listen: ([127, 0, 0, 1], 9090).into(),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TlsConfig {
    /// Certificate chain (PEM). With `key`, used as is; without both, the
    /// node makes a development certificate for `localhost`.
    pub cert: Option<PathBuf>,
    /// Private key (PEM) of `cert`.
    pub key: Option<PathBuf>,
    /// Where the development certificate is written (and reused from), so
    /// clients on the same machine find it with no flag. Defaults to
    /// `$HEXFLEET_DEV_DIR` or `<tmp>/hexfleet-dev`.
    pub dev_dir: PathBuf,
    /// How often the certificate, key and `auth.jwks` files are checked for
    /// changes; a change (or SIGHUP) reloads them without dropping a
    /// connection.
    #[serde(with = "humantime_serde")]
    pub reload_interval: Duration,
}

#[derive(Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AuthConfig {
    /// Shared secret that signs tokens (HMAC-SHA256). Set it with
    /// `HEXFLEET_TOKEN_SECRET`; the built-in default is for development only.
    pub token_secret: String,
    /// A JSON Web Key Set file (RFC 7517): HS256 (`oct`), RS256 (`RSA`) and
    /// ES256 (`EC`) keys, each with a `kid`. Tokens naming a `kid` are
    /// checked against it; rotate keys by adding the new one, then removing
    /// the old once its tokens have expired. Reloaded on change and SIGHUP.
    pub jwks: Option<PathBuf>,
    /// When set, tokens must carry this `aud`.
    pub audience: Option<String>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct CellsConfig {
    /// H3 resolution fixes are indexed at (9 ≈ 0.1 km² cells).
    pub index_res: u8,
    /// H3 resolution of shards (5 ≈ 250 km² cells); coarser than `index_res`.
    pub shard_res: u8,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct IngestConfig {
    /// Fastest plausible vehicle, m/s. A fix implying more is `too_fast`.
    pub max_speed_mps: f64,
    /// Distance always allowed between fixes whatever the time, covering GPS
    /// jitter, in metres.
    pub jitter_m: f64,
    /// How far ahead of the node's clock a fix time may be (device skew).
    #[serde(with = "humantime_serde")]
    pub max_future: Duration,
    /// How old a fix may be when it arrives.
    #[serde(with = "humantime_serde")]
    pub max_age: Duration,
    /// A device clock off by more than this has its fix times put in node
    /// time (see `device_clock`); within it, a device's offset cannot be
    /// told from the time its fixes take to arrive, and is left alone.
    /// `max_future` and `max_age` apply after the correction.
    #[serde(with = "humantime_serde")]
    pub clock_tolerance: Duration,
    /// How often a driver's fixes are acknowledged, at most (rejections
    /// within a second).
    #[serde(with = "humantime_serde")]
    pub ack_interval: Duration,
    /// A driver that loses its connection stays visible this long, waiting
    /// for it to reconnect; then it goes offline.
    #[serde(with = "humantime_serde")]
    pub offline_grace: Duration,
    /// How fast one driver connection may send fixes. A phone's GPS gives at
    /// most 10-25 fixes a second, and a phone back from a tunnel may replay
    /// its buffered track at once (the burst); beyond the budget a fix is
    /// dropped and
    /// counted (`fixes_rejected{reason="rate_limited"}`), and a connection
    /// over budget `close_after` times within 10 s is closed
    /// (`rate_limited`).
    pub fixes: RequestLimits,
}

/// Many nodes acting as one, through the Redis store: membership leases,
/// shard ownership by rendezvous hashing confirmed by per-shard leases,
/// redirects, hand-offs and the bus of cross-node deltas.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ClusterConfig {
    /// Whether this node is one of many. Needs a Redis store. Off, the node
    /// owns every shard and needs no lease.
    pub enabled: bool,
    /// The QUIC address other nodes redirect clients to. Empty: the bound
    /// address (which must then not be unspecified).
    pub advertise_quic: String,
    /// The HTTP address clients are sent to (the HTTPS address in a
    /// redirect, for their WebSocket fallback) and shown in
    /// `GET /v1/cluster`. Empty: the bound one.
    pub advertise_http: String,
    /// Where the other nodes reach this node's HTTP API (their reach
    /// questions, relayed drivers), when not `advertise_http`: a node
    /// whose clients come through a load balancer its peers bypass. Empty:
    /// `advertise_http`; a port of 0: the port the HTTP listener bound.
    pub peer_http: String,
    /// How long a node's membership and its shard leases live without
    /// renewal: the longest a dead node's shards stay unowned.
    #[serde(with = "humantime_serde")]
    pub lease_ttl: Duration,
    /// How often leases are renewed and the live set is read; at most a
    /// third of `lease_ttl`, so two renewals can fail before one expires.
    #[serde(with = "humantime_serde")]
    pub renew_interval: Duration,
    /// Hand-off hysteresis: a driver that crosses into a shard owned by
    /// another node stays with its node until it is this far past the
    /// point where it crossed, so one driving along a boundary does not
    /// ping-pong between nodes.
    pub handoff_distance_m: f64,
    /// How often this node dials each peer's advertised QUIC address (a
    /// handshake and a close, as a client would connect): how the cluster
    /// learns that a node its peers reach is one its clients cannot.
    #[serde(with = "humantime_serde")]
    pub probe_interval: Duration,
    /// A probe not answered within this has failed; three failures in a
    /// row make this node say the peer is unreachable for clients.
    #[serde(with = "humantime_serde")]
    pub probe_timeout: Duration,
    /// A node its peers have found unreachable for clients this long hands
    /// its shards to reachable nodes (until then the nodes its clients
    /// reach forward their fixes to it); it takes them back once its peers
    /// reach it again.
    #[serde(with = "humantime_serde")]
    pub unreachable_handoff: Duration,
}

impl Default for ClusterConfig {
    fn default() -> Self {
        Self {
            enabled: false,
            advertise_quic: String::new(),
            advertise_http: String::new(),
            peer_http: String::new(),
            lease_ttl: Duration::from_secs(3),
            renew_interval: Duration::from_secs(1),
            handoff_distance_m: 250.0,
            probe_interval: Duration::from_millis(500),
            probe_timeout: Duration::from_secs(1),
            unreachable_handoff: Duration::from_secs(10),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum StoreKind {
    /// In-process; the embedded single-node default.
    Memory,
    /// One Redis server.
    Redis,
    /// A Redis Cluster; `redis_url` lists seed nodes separated by commas.
    RedisCluster,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct StoreConfig {
    pub kind: StoreKind,
    /// `redis://host:port[/db]`; for a cluster, comma-separated seed nodes.
    pub redis_url: String,
    /// How often staged vehicle changes are flushed to the store. Changes to
    /// one vehicle within an interval coalesce (latest wins).
    #[serde(with = "humantime_serde")]
    pub flush_interval: Duration,
    /// A vehicle not heard from for this long is evicted.
    #[serde(with = "humantime_serde")]
    pub stale_after: Duration,
    /// How often the sweeper looks for stale vehicles.
    #[serde(with = "humantime_serde")]
    pub sweep_interval: Duration,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            node_id: "node-1".into(),
            dev: false,
            quic: QuicConfig::default(),
            http: HttpConfig::default(),
            admin: AdminConfig::default(),
            tls: TlsConfig::default(),
            auth: AuthConfig::default(),
            cells: CellsConfig::default(),
            ingest: IngestConfig::default(),
            riders: RidersConfig::default(),
            dashboard: DashboardConfig::default(),
            store: StoreConfig::default(),
            cluster: ClusterConfig::default(),
            zones: ZonesConfig::default(),
        }
    }
}

impl Default for QuicConfig {
    fn default() -> Self {
        Self {
            listen: ([127, 0, 0, 1], 4433).into(),
            endpoints: 1,
            udp_buffer_bytes: 8 * 1024 * 1024,
            max_connections: 100_000,
            idle_timeout: Duration::from_secs(60),
            handshake_timeout: Duration::from_secs(5),
            max_connections_per_address: 1_000,
            retry_above_handshakes: 256,
            max_handshakes: 10_000,
        }
    }
}

impl Default for HttpConfig {
    fn default() -> Self {
        Self {
            listen: ([127, 0, 0, 1], 8080).into(),
            max_nearby_radius_m: 50_000.0,
            max_nearby_limit: 1_000,
            header_timeout: Duration::from_secs(10),
            max_connections: 10_000,
            max_connections_per_address: 1_000,
            tls: true,
        }
    }
}

impl Default for TlsConfig {
    fn default() -> Self {
        Self {
            cert: None,
            key: None,
            dev_dir: hexfleet_protocol::dev::default_dev_dir(),
            reload_interval: Duration::from_secs(10),
        }
    }
}

/// Never prints the secret.
impl std::fmt::Debug for AuthConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AuthConfig")
            .field("token_secret", &"<redacted>")
            .field("jwks", &self.jwks)
            .field("audience", &self.audience)
            .finish()
    }
}

impl Default for AuthConfig {
    fn default() -> Self {
        Self {
            token_secret: hexfleet_protocol::dev::DEV_TOKEN_SECRET.into(),
            jwks: None,
            audience: None,
        }
    }
}

impl Default for CellsConfig {
    fn default() -> Self {
        Self {
            index_res: 9,
            shard_res: 5,
        }
    }
}

impl Default for IngestConfig {
    fn default() -> Self {
        Self {
            max_speed_mps: 70.0,
            jitter_m: 50.0,
            max_future: Duration::from_secs(5),
            max_age: Duration::from_secs(30),
            clock_tolerance: Duration::from_secs(1),
            ack_interval: Duration::from_secs(30),
            offline_grace: Duration::from_secs(10),
            fixes: RequestLimits {
                per_second: 100.0,
                burst: 200,
                close_after: 1_000,
            },
        }
    }
}

impl StoreConfig {
    /// The seed nodes of a Redis Cluster, from `redis_url`.
    pub fn redis_seeds(&self) -> Vec<String> {
        self.redis_url
            .split(',')
            .map(|s| s.trim().to_string())
            .collect()
    }
}

impl Default for StoreConfig {
    fn default() -> Self {
        Self {
            kind: StoreKind::Memory,
            redis_url: "redis://127.0.0.1:6379".into(),
            flush_interval: Duration::from_millis(25),
            stale_after: Duration::from_secs(30),
            sweep_interval: Duration::from_secs(1),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("reading {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("parsing {path}: {source}")]
    Parse {
        path: PathBuf,
        source: Box<toml::de::Error>,
    },
    #[error(transparent)]
    Cells(#[from] CellModelError),
    #[error("{0}")]
    Invalid(&'static str),
    #[error("{0} must be more than zero")]
    Zero(&'static str),
    #[error(
        "the built-in development token secret is public, and {0} is not a loopback address: \
         set HEXFLEET_TOKEN_SECRET (or auth.token_secret) to a secret of at least 16 bytes, \
         or pass --dev (HEXFLEET_DEV=1) for a development node"
    )]
    DevSecret(SocketAddr),
    #[error(
        "no certificate is configured and {0} is not a loopback address: set tls.cert and \
         tls.key (--tls-cert, --tls-key), or pass --dev (HEXFLEET_DEV=1) for a development node \
         with a self-signed certificate"
    )]
    DevCert(SocketAddr),
}

impl Config {
    pub fn from_file(path: &std::path::Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.into(),
            source,
        })?;
        toml::from_str(&text).map_err(|source| ConfigError::Parse {
            path: path.into(),
            source: Box::new(source),
        })
    }

    /// Checks what the types cannot, and yields the cell model.
    pub fn validate(&self) -> Result<CellModel, ConfigError> {
        if self.quic.endpoints == 0 {
            return Err(ConfigError::Invalid("quic.endpoints must be at least 1"));
        }
        if self.auth.token_secret.len() < 16 {
            return Err(ConfigError::Invalid(
                "auth.token_secret must be at least 16 bytes",
            ));
        }
        if self.tls.cert.is_some() != self.tls.key.is_some() {
            return Err(ConfigError::Invalid("tls.cert and tls.key go together"));
        }
        let open = [self.quic.listen, self.http.listen]
            .into_iter()
            .find(|a| !a.ip().is_loopback());
        if let (Some(open), false) = (open, self.dev) {
            if self.uses_dev_secret() {
                return Err(ConfigError::DevSecret(open));
            }
            if self.tls.cert.is_none() {
                return Err(ConfigError::DevCert(open));
            }
        }
        // A zero here would panic a timer or make the node useless.
        let durations = [
            ("quic.idle_timeout", self.quic.idle_timeout),
            ("quic.handshake_timeout", self.quic.handshake_timeout),
            ("http.header_timeout", self.http.header_timeout),
            ("ingest.max_age", self.ingest.max_age),
            ("ingest.ack_interval", self.ingest.ack_interval),
            (
                "riders.slow_consumer_after",
                self.riders.slow_consumer_after,
            ),
            (
                "dashboard.density_interval",
                self.dashboard.density_interval,
            ),
            ("store.flush_interval", self.store.flush_interval),
            ("store.stale_after", self.store.stale_after),
            ("store.sweep_interval", self.store.sweep_interval),
            ("cluster.lease_ttl", self.cluster.lease_ttl),
            ("cluster.renew_interval", self.cluster.renew_interval),
            ("cluster.probe_interval", self.cluster.probe_interval),
            ("cluster.probe_timeout", self.cluster.probe_timeout),
            ("tls.reload_interval", self.tls.reload_interval),
        ];
        if let Some((name, _)) = durations.iter().find(|(_, d)| d.is_zero()) {
            return Err(ConfigError::Zero(name));
        }
        let counts = [
            ("quic.max_connections", self.quic.max_connections),
            ("http.max_connections", self.http.max_connections),
            (
                "http.max_connections_per_address",
                self.http.max_connections_per_address,
            ),
            (
                "quic.max_connections_per_address",
                self.quic.max_connections_per_address,
            ),
            ("quic.max_handshakes", self.quic.max_handshakes),
            ("ingest.fixes.burst", self.ingest.fixes.burst as usize),
            (
                "ingest.fixes.close_after",
                self.ingest.fixes.close_after as usize,
            ),
            (
                "dashboard.max_message_bytes",
                self.dashboard.max_message_bytes,
            ),
            ("http.max_nearby_limit", self.http.max_nearby_limit),
            (
                "dashboard.max_vehicle_cells",
                self.dashboard.max_vehicle_cells,
            ),
            (
                "dashboard.max_density_cells",
                self.dashboard.max_density_cells,
            ),
            ("riders.requests.burst", self.riders.requests.burst as usize),
            (
                "riders.requests.close_after",
                self.riders.requests.close_after as usize,
            ),
            (
                "dashboard.requests.burst",
                self.dashboard.requests.burst as usize,
            ),
            (
                "dashboard.requests.close_after",
                self.dashboard.requests.close_after as usize,
            ),
        ];
        if let Some((name, _)) = counts.iter().find(|(_, n)| *n == 0) {
            return Err(ConfigError::Zero(name));
        }
        let rates = [
            ("ingest.max_speed_mps", self.ingest.max_speed_mps),
            ("riders.max_radius_m", self.riders.max_radius_m),
            ("http.max_nearby_radius_m", self.http.max_nearby_radius_m),
            (
                "riders.requests.per_second",
                self.riders.requests.per_second,
            ),
            ("ingest.fixes.per_second", self.ingest.fixes.per_second),
            (
                "dashboard.requests.per_second",
                self.dashboard.requests.per_second,
            ),
        ];
        if let Some((name, _)) = rates.iter().find(|(_, v)| !(v.is_finite() && *v > 0.0)) {
            return Err(ConfigError::Zero(name));
        }
        if !(self.ingest.jitter_m.is_finite() && self.ingest.jitter_m >= 0.0) {
            return Err(ConfigError::Invalid(
                "ingest.jitter_m must be a finite number of metres, zero or more",
            ));
        }
        if self.cluster.enabled {
            if self.store.kind == StoreKind::Memory {
                return Err(ConfigError::Invalid(
                    "cluster.enabled needs a Redis store (store.kind = \"redis\" or \"redis-cluster\")",
                ));
            }
            if self.cluster.renew_interval * 3 > self.cluster.lease_ttl {
                return Err(ConfigError::Invalid(
                    "cluster.renew_interval must be at most a third of cluster.lease_ttl",
                ));
            }
            if !(self.cluster.handoff_distance_m.is_finite()
                && self.cluster.handoff_distance_m >= 0.0)
            {
                return Err(ConfigError::Invalid(
                    "cluster.handoff_distance_m must be a finite number of metres, zero or more",
                ));
            }
        }
        Ok(CellModel::new(self.cells.index_res, self.cells.shard_res)?)
    }

    /// Whether the token secret is the public development default.
    pub fn uses_dev_secret(&self) -> bool {
        self.auth.token_secret == hexfleet_protocol::dev::DEV_TOKEN_SECRET
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_shipped_default_toml_matches_the_built_in_defaults() {
        let path =
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../config/default.toml");
        let file = Config::from_file(&path).unwrap();
        let builtin = Config::default();
        assert_eq!(format!("{:?}", file.quic), format!("{:?}", builtin.quic));
        assert_eq!(format!("{:?}", file.http), format!("{:?}", builtin.http));
        assert_eq!(format!("{:?}", file.admin), format!("{:?}", builtin.admin));
        assert_eq!(format!("{:?}", file.auth), format!("{:?}", builtin.auth));
        assert_eq!(
            format!("{:?}", file.tls.reload_interval),
            format!("{:?}", builtin.tls.reload_interval)
        );
        assert_eq!(format!("{:?}", file.cells), format!("{:?}", builtin.cells));
        assert_eq!(
            format!("{:?}", file.ingest),
            format!("{:?}", builtin.ingest)
        );
        assert_eq!(format!("{:?}", file.store), format!("{:?}", builtin.store));
        assert_eq!(
            format!("{:?}", file.riders),
            format!("{:?}", builtin.riders)
        );
        assert_eq!(
            format!("{:?}", file.dashboard),
            format!("{:?}", builtin.dashboard)
        );
        assert_eq!(
            format!("{:?}", file.cluster),
            format!("{:?}", builtin.cluster)
        );
        assert_eq!(format!("{:?}", file.zones), format!("{:?}", builtin.zones));
        assert_eq!(file.node_id, builtin.node_id);
        assert_eq!(file.dev, builtin.dev);
        file.validate().unwrap();
    }

    fn with(f: impl FnOnce(&mut Config)) -> Config {
        let mut c = Config::default();
        c.auth.token_secret = "a-production-secret-of-some-length".into();
        f(&mut c);
        c
    }

    #[test]
    fn every_duration_that_must_not_be_zero_is_refused_by_name() {
        let zero = Duration::ZERO;
        type Set = fn(&mut Config, Duration);
        let cases: [(&str, Set); 10] = [
            ("quic.idle_timeout", |c, d| c.quic.idle_timeout = d),
            ("quic.handshake_timeout", |c, d| {
                c.quic.handshake_timeout = d
            }),
            ("http.header_timeout", |c, d| c.http.header_timeout = d),
            ("ingest.max_age", |c, d| c.ingest.max_age = d),
            ("ingest.ack_interval", |c, d| c.ingest.ack_interval = d),
            ("riders.slow_consumer_after", |c, d| {
                c.riders.slow_consumer_after = d
            }),
            ("dashboard.density_interval", |c, d| {
                c.dashboard.density_interval = d
            }),
            ("store.flush_interval", |c, d| c.store.flush_interval = d),
            ("store.stale_after", |c, d| c.store.stale_after = d),
            ("store.sweep_interval", |c, d| c.store.sweep_interval = d),
        ];
        for (name, set) in cases {
            let error = with(|c| set(c, zero)).validate().unwrap_err().to_string();
            assert_eq!(error, format!("{name} must be more than zero"));
        }
        let error = with(|c| c.riders.requests.per_second = f64::NAN)
            .validate()
            .unwrap_err();
        assert!(error.to_string().contains("riders.requests.per_second"));
        let error = with(|c| c.http.max_connections = 0).validate().unwrap_err();
        assert!(error.to_string().contains("http.max_connections"));
    }

    #[test]
    fn the_development_secret_is_refused_beyond_loopback_unless_dev() {
        let open: SocketAddr = "0.0.0.0:4433".parse().unwrap();
        let dev_secret = |f: fn(&mut Config)| {
            let mut c = Config::default();
            f(&mut c);
            c.validate().map(|_| ())
        };
        // Loopback, v4 or v6: a development node on one machine.
        assert!(dev_secret(|_| {}).is_ok());
        assert!(dev_secret(|c| c.quic.listen = "[::1]:4433".parse().unwrap()).is_ok());
        // Beyond loopback: refused, saying what to set.
        let refused = dev_secret(|c| c.quic.listen = "0.0.0.0:4433".parse().unwrap());
        let error = refused.unwrap_err().to_string();
        assert!(
            error.contains("HEXFLEET_TOKEN_SECRET") && error.contains("--dev"),
            "{error}"
        );
        assert!(error.contains(&open.to_string()));
        assert!(dev_secret(|c| c.http.listen = "[::]:8080".parse().unwrap()).is_err());
        // Unless it says it is a development node, or has a secret of its own.
        assert!(dev_secret(|c| {
            c.quic.listen = "0.0.0.0:4433".parse().unwrap();
            c.dev = true;
        })
        .is_ok());
        // A secret of its own is not enough: beyond loopback, a node needs
        // a real certificate too.
        let error = with(|c| c.quic.listen = open).validate().unwrap_err();
        assert!(matches!(error, ConfigError::DevCert(_)), "{error}");
        assert!(with(|c| {
            c.quic.listen = open;
            c.tls.cert = Some("/etc/hexfleet/cert.pem".into());
            c.tls.key = Some("/etc/hexfleet/key.pem".into());
        })
        .validate()
        .is_ok());
    }

    #[test]
    fn unknown_fields_are_refused() {
        assert!(toml::from_str::<Config>("[store]\nkindd = \"redis\"").is_err());
    }
}
