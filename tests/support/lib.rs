//! Helpers for hexfleet's integration tests: a private `redis-server` per
//! test, an embedded node on free ports, tokens and clients for it.
//!
//! Every test starts what it needs and owns it: no shared Redis, no fixed
//! ports, nothing left running after the test (servers are killed on drop).

use std::{path::PathBuf, time::Duration};

pub mod dashboard;

pub use hexfleet_testkit::{eventually, free_tcp_port, free_udp_port, RedisCluster, RedisServer};

use hexfleet_client::{Connector, DriverClient};
use hexfleet_model::{VehicleClass, VehicleId, VehicleStatus};
use hexfleet_node::{
    config::{Config, StoreKind},
    Node,
};
use hexfleet_protocol::{Claims, DriverReport, Role};

pub const SECRET: &str = "integration-test-secret-0123456789";

/// An embedded node for a test, with its own dev-certificate directory.
pub struct TestNode {
    pub node: Node,
    pub http: reqwest::Client,
    _dir: tempfile::TempDir,
    cert: PathBuf,
}

/// A config for a test node on free loopback ports, with the given store.
pub fn test_config(redis: Option<&RedisServer>, dev_dir: &std::path::Path) -> Config {
    let mut config = Config {
        node_id: "test-node".into(),
        ..Config::default()
    };
    config.quic.listen = ([127, 0, 0, 1], 0).into();
    config.http.listen = ([127, 0, 0, 1], 0).into();
    config.admin.listen = ([127, 0, 0, 1], 0).into();
    // Plain HTTP, so tests of the API read it simply; tests/tls.rs covers
    // HTTPS and WSS, which a node serves by default.
    config.http.tls = false;
    // Tests wait for a driver's fixes to be acknowledged: promptly.
    config.ingest.ack_interval = std::time::Duration::from_millis(100);
    config.tls.dev_dir = dev_dir.to_path_buf();
    config.auth.token_secret = SECRET.into();
    if let Some(redis) = redis {
        config.store.kind = StoreKind::Redis;
        config.store.redis_url = redis.url();
    }
    config
}

impl TestNode {
    /// A node whose development certificate lives in `dir`, so a node
    /// started later with the same `dir` is trusted by the same clients.
    pub async fn start_in(
        dir: &std::path::Path,
        redis: Option<&RedisServer>,
        tweak: impl FnOnce(&mut Config),
    ) -> Self {
        let dir = dir.to_path_buf();
        Self::start_with(redis, move |c| {
            c.tls.dev_dir = dir;
            tweak(c);
        })
        .await
    }

    pub async fn start(redis: Option<&RedisServer>) -> Self {
        Self::start_with(redis, |_| {}).await
    }

    pub async fn start_with(redis: Option<&RedisServer>, tweak: impl FnOnce(&mut Config)) -> Self {
        let dir = tempfile::tempdir().expect("temp dir");
        let mut config = test_config(redis, dir.path());
        tweak(&mut config);
        let configured = config.tls.cert.clone();
        let node = Node::start(config).await.expect("the node starts");
        let cert = node
            .dev_cert
            .clone()
            .or(configured)
            .expect("a certificate clients can trust");
        Self {
            node,
            http: reqwest::Client::new(),
            _dir: dir,
            cert,
        }
    }

    /// The development certificate clients of this node trust.
    pub fn cert(&self) -> PathBuf {
        self.cert.clone()
    }

    pub fn connector(&self) -> Connector {
        Connector::new(&self.cert, hexfleet_protocol::dev::DEV_SERVER_NAME)
            .expect("the dev certificate loads")
    }

    /// A connected driver with the given id and report.
    pub async fn driver(&self, id: &str, report: DriverReport) -> DriverClient {
        self.connector()
            .driver(self.node.quic_addr, &driver_token(id), report)
            .await
            .expect("the driver connects")
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.node.http_addr)
    }

    /// A rider watching `radius_m` around a spot, its subscription taken,
    /// that times each fix `clock` is told of (no reconnects: a test sees
    /// its connection end).
    pub async fn timing_rider(
        &self,
        id: &str,
        at: (f64, f64),
        radius_m: f64,
        clock: &FixClock,
    ) -> hexfleet_client::RiderClient {
        let options = hexfleet_client::RiderOptions {
            reconnect: false,
            observer: Some(clock.observer()),
            ..Default::default()
        };
        let rider = self
            .connector()
            .rider(self.node.quic_addr, &token(Role::Rider, id), options)
            .await
            .expect("the rider connects");
        let sub = rider.subscribe(hexfleet_client::Subscription::around(at.0, at.1, radius_m));
        rider
            .wait_for(sub, Duration::from_secs(20))
            .await
            .expect("the subscription is taken");
        rider
    }

    /// The admin listener's URL for `path`.
    pub fn admin_url(&self, path: &str) -> String {
        format!("http://{}{path}", self.node.admin_addr)
    }

    /// GETs `path` on the public API with a dashboard's token.
    pub async fn get_json(&self, path: &str) -> (u16, serde_json::Value) {
        let token = token(Role::Dashboard, "api-reader");
        let resp = self
            .http
            .get(self.url(path))
            .bearer_auth(token)
            .send()
            .await
            .expect("HTTP request");
        let status = resp.status().as_u16();
        (status, resp.json().await.expect("a JSON body"))
    }

    /// GETs `path` on the admin listener (no token).
    pub async fn admin_json(&self, path: &str) -> (u16, serde_json::Value) {
        let resp = self
            .http
            .get(self.admin_url(path))
            .send()
            .await
            .expect("HTTP request");
        let status = resp.status().as_u16();
        (status, resp.json().await.expect("a JSON body"))
    }

    pub async fn metrics(&self) -> String {
        self.http
            .get(self.admin_url("/metrics"))
            .send()
            .await
            .expect("GET /metrics")
            .text()
            .await
            .expect("metrics text")
    }

    /// The value of one metric line (exact name with labels), or 0.
    pub async fn metric(&self, series: &str) -> f64 {
        self.metrics()
            .await
            .lines()
            .find_map(|l| {
                l.strip_prefix(series)
                    .and_then(|rest| rest.trim().parse().ok())
            })
            .unwrap_or(0.0)
    }

    pub async fn stop(self) {
        self.node.shutdown(Duration::from_secs(5)).await;
    }
}

/// Times each fix from its sending to its arrival in a rider's view.
/// Moved items carry no time: each fix is told apart by its latitude (as
/// the wire carries it, 1e-7°), and tagged (e.g. with its step) by the test.
#[derive(Clone, Default)]
pub struct FixClock {
    sent:
        std::sync::Arc<std::sync::Mutex<std::collections::HashMap<i64, (u64, std::time::Instant)>>>,
    delays: std::sync::Arc<std::sync::Mutex<Vec<(u64, u128)>>>,
}

impl FixClock {
    fn key(lat: f64) -> i64 {
        (lat * 1e7).round() as i64
    }

    /// A fix at `lat` is sent now.
    pub fn sent(&self, lat: f64, tag: u64) {
        let mut sent = self.sent.lock().expect("not poisoned");
        sent.insert(Self::key(lat), (tag, std::time::Instant::now()));
    }

    /// The rider's observer: each fix seen is timed once.
    pub fn observer(&self) -> hexfleet_client::Observer {
        let clock = self.clone();
        std::sync::Arc::new(move |state: &hexfleet_model::VehicleState, how| {
            if matches!(how, hexfleet_client::Applied::Removed(_)) {
                return;
            }
            let seen = clock
                .sent
                .lock()
                .expect("not poisoned")
                .remove(&Self::key(state.lat));
            if let Some((tag, at)) = seen {
                let delay = at.elapsed().as_millis();
                clock
                    .delays
                    .lock()
                    .expect("not poisoned")
                    .push((tag, delay));
            }
        })
    }

    /// The delays seen so far, with their tags, in the order seen.
    pub fn seen(&self) -> Vec<(u64, u128)> {
        self.delays.lock().expect("not poisoned").clone()
    }

    /// The delays seen so far, in milliseconds, sorted.
    pub fn sorted(&self) -> Vec<u128> {
        let mut delays: Vec<u128> = self.seen().into_iter().map(|(_, d)| d).collect();
        delays.sort_unstable();
        delays
    }

    /// Forgets the delays seen.
    pub fn clear(&self) {
        self.delays.lock().expect("not poisoned").clear();
    }
}

/// The client's side of a control stream, unchecked.
pub type RawCodec =
    hexfleet_protocol::FrameCodec<hexfleet_protocol::ServerMsg, hexfleet_protocol::ClientMsg>;
pub type RawWrite = tokio_util::codec::FramedWrite<quinn::SendStream, RawCodec>;
pub type RawRead = tokio_util::codec::FramedRead<quinn::RecvStream, RawCodec>;

/// A raw QUIC connection to the node with a control stream open, for sending
/// what the SDK never would. `window` caps what the client buffers per stream
/// (a small window makes a client that does not read block the node quickly).
pub async fn raw_connection(
    node: &TestNode,
    window: u32,
) -> (quinn::Connection, RawWrite, RawRead) {
    raw_connection_to(node.node.quic_addr, &node.cert, window).await
}

/// [`raw_connection`] to a node by its QUIC address and certificate.
pub async fn raw_connection_to(
    quic_addr: std::net::SocketAddr,
    cert: &std::path::Path,
    window: u32,
) -> (quinn::Connection, RawWrite, RawRead) {
    let config = quic_client_config(cert, window);
    let mut endpoint =
        quinn::Endpoint::client(([127, 0, 0, 1], 0).into()).expect("a client socket");
    endpoint.set_default_client_config(config);
    let conn = endpoint
        .connect(quic_addr, "localhost")
        .expect("connect")
        .await
        .expect("handshake");
    let (send, recv) = conn.open_bi().await.expect("a control stream");
    (
        conn,
        tokio_util::codec::FramedWrite::new(send, hexfleet_protocol::FrameCodec::default()),
        tokio_util::codec::FramedRead::new(recv, hexfleet_protocol::FrameCodec::default()),
    )
}

/// A QUIC client configuration trusting `cert` (DER), with per-stream and
/// per-connection receive windows of `window` bytes.
pub fn quic_client_config(cert: &std::path::Path, window: u32) -> quinn::ClientConfig {
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(rustls::pki_types::CertificateDer::from(
            std::fs::read(cert).expect("the dev certificate"),
        ))
        .expect("a valid certificate");
    let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
    let mut crypto = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("TLS versions")
        .with_root_certificates(roots)
        .with_no_client_auth();
    crypto.alpn_protocols = vec![hexfleet_protocol::ALPN.to_vec()];
    let crypto = quinn::crypto::rustls::QuicClientConfig::try_from(crypto).expect("QUIC TLS");
    let mut transport = quinn::TransportConfig::default();
    transport.stream_receive_window(window.into());
    transport.receive_window(window.into());
    let mut config = quinn::ClientConfig::new(std::sync::Arc::new(crypto));
    config.transport_config(std::sync::Arc::new(transport));
    config
}

pub fn token(role: Role, id: &str) -> String {
    Claims::new(
        role,
        VehicleId::new(id).expect("a valid id"),
        now_s() + 3600,
    )
    .mint(SECRET.as_bytes())
}

pub fn driver_token(id: &str) -> String {
    token(Role::Driver, id)
}

pub fn now_s() -> u64 {
    hexfleet_node::clock::now_s()
}

pub fn now_ms() -> i64 {
    hexfleet_node::clock::now_ms()
}

pub fn available() -> DriverReport {
    DriverReport {
        class: VehicleClass::Economy,
        status: VehicleStatus::Available,
    }
}

/// `n` parked vehicles scattered within `spread_deg` of `center`, heard
/// from just now.
pub fn parked_fleet(
    prefix: &str,
    center: (f64, f64),
    n: usize,
    spread_deg: f64,
) -> Vec<hexfleet_model::VehicleState> {
    use rand::{Rng, SeedableRng};
    let mut rng = rand::rngs::StdRng::seed_from_u64(n as u64);
    (0..n)
        .map(|i| hexfleet_model::VehicleState {
            id: VehicleId::new(&format!("{prefix}{i}")).expect("a valid id"),
            lat: center.0 + rng.random_range(-spread_deg..spread_deg),
            lon: center.1 + rng.random_range(-spread_deg..spread_deg),
            heading_deg: 0.0,
            speed_mps: 0.0,
            accuracy_m: 5.0,
            fix_time_ms: now_ms(),
            seq: 1,
            class: VehicleClass::Economy,
            status: VehicleStatus::Available,
            seen_ms: now_ms(),
            zones: Vec::new(),
            clock_offset_ms: 0,
        })
        .collect()
}

/// Writes vehicles to Redis as the node that owned them would have, so a
/// node started on it takes them over: many vehicles without as many
/// driver connections.
pub async fn preload(redis: &RedisServer, states: &[hexfleet_model::VehicleState]) {
    use hexfleet_node::store::{redis::RedisStore, Batch, ShardBatch, Store, Upsert};
    let cells = hexfleet_model::CellModel::default();
    let mut shards: std::collections::HashMap<_, Vec<Upsert>> = Default::default();
    for s in states {
        shards
            .entry(cells.locate(s.position()).1)
            .or_default()
            .push(Upsert {
                state: s.clone(),
                relocated: true,
                seen: true,
            });
    }
    let batch = Batch {
        shards: shards
            .into_iter()
            .map(|(shard, upserts)| ShardBatch {
                shard,
                upserts,
                removals: Vec::new(),
                fence: None,
                publish: false,
                events: Vec::new(),
            })
            .collect(),
    };
    let store = RedisStore::connect(&redis.url())
        .await
        .expect("connect to the test redis");
    let applied = store.apply(&batch).await.expect("preload the test redis");
    assert_eq!(applied, Default::default());
}
