//! The client side of a QUIC endpoint: TLS trust, ALPN, transport settings,
//! and the `Hello` handshake every role shares. One `Connector` serves many
//! connections (the simulator puts hundreds of drivers on one).
//!
//! Where UDP is blocked (some corporate Wi-Fi, some carriers), QUIC never
//! connects: after [`Connector::with_fallback`]'s short timeout the
//! connector tries the same session over a WebSocket on the node's HTTPS
//! port beside QUIC, takes whichever connects first, and remembers, per
//! network ([`Connector::set_network`]), that only WebSocket worked, so the
//! next connections go there at once. Once that memory expires QUIC is
//! tried first again.

use std::{
    collections::HashMap,
    net::{Ipv4Addr, Ipv6Addr, SocketAddr},
    path::Path,
    sync::{atomic::Ordering, Arc},
    time::{Duration, Instant},
};

use futures_util::StreamExt;
use hexfleet_protocol::{
    dev, ClientMsg, ErrorCode, FrameError, Hello, Redirect, Role, ServerMsg, Welcome,
    PROTOCOL_VERSION,
};
use quinn::Runtime;
use rustls::pki_types::{pem::PemObject, CertificateDer};

use crate::transport::{quic_control, CloseAs, Conn, CountedSocket, Transport, UdpStats, WsConn};
pub(crate) use crate::transport::{ControlRead, ControlWrite};

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("reading the certificate {path}: {reason}")]
    Certificate { path: String, reason: String },
    #[error("TLS configuration: {0}")]
    Tls(String),
    #[error("binding the client socket: {0}")]
    Bind(std::io::Error),
    #[error("connecting: {0}")]
    Connect(#[from] quinn::ConnectError),
    #[error("connection: {0}")]
    Connection(#[from] quinn::ConnectionError),
    #[error("the node refused: {code:?}: {reason}")]
    Refused { code: ErrorCode, reason: String },
    #[error("protocol: {0}")]
    Protocol(String),
    #[error("frame: {0}")]
    Frame(#[from] FrameError),
    #[error("sending a datagram: {0}")]
    Datagram(#[from] quinn::SendDatagramError),
    #[error("writing to the control stream: {0}")]
    Write(#[from] quinn::WriteError),
    #[error("WebSocket: {0}")]
    WebSocket(String),
    #[error("too many redirects")]
    TooManyRedirects,
    #[error("timed out")]
    Timeout,
}

impl ClientError {
    /// Turns how a connection ended into the error the node meant.
    pub(crate) fn from_close(e: &quinn::ConnectionError) -> Self {
        if let quinn::ConnectionError::ApplicationClosed(close) = e {
            if let Some(code) = ErrorCode::from_close_code(close.error_code.into_inner()) {
                return ClientError::Refused {
                    code,
                    reason: String::from_utf8_lossy(&close.reason).into_owned(),
                };
            }
        }
        ClientError::Connection(e.clone())
    }
}

/// A session the node welcomed.
pub(crate) struct Established {
    pub conn: Conn,
    pub tx: ControlWrite,
    pub rx: ControlRead,
    pub welcome: Welcome,
    /// How long `Hello` took to be answered, and the machine's clock when
    /// it was (Unix ms): with the welcome's `node_time_ms`, the clock's
    /// offset.
    pub round_trip: std::time::Duration,
    pub welcomed_ms: i64,
}

/// What the node answered to `Hello`.
pub(crate) enum Greeting {
    Welcome(Box<Established>),
    Redirect(SocketAddr),
}

/// Socket buffer requested for a client socket. Many connections share one
/// socket, and a burst of handshakes overflows the default (~200 KiB) buffer;
/// a dropped handshake packet costs a one-second retransmission timeout.
const CLIENT_UDP_BUFFER: usize = 4 * 1024 * 1024;

fn client_socket(addr: SocketAddr) -> std::io::Result<std::net::UdpSocket> {
    let socket = std::net::UdpSocket::bind(addr)?;
    let sock = socket2::SockRef::from(&socket);
    // Best effort: the kernel caps these at net.core.{r,w}mem_max.
    let _ = sock.set_recv_buffer_size(CLIENT_UDP_BUFFER);
    let _ = sock.set_send_buffer_size(CLIENT_UDP_BUFFER);
    Ok(socket)
}

/// A client endpoint per address family, bound on first use to the
/// unspecified address of that family (`0.0.0.0:0` or `[::]:0`), so the
/// kernel picks the route and source address for any node, local or remote.
#[derive(Default)]
struct Endpoints {
    v4: Option<quinn::Endpoint>,
    v6: Option<quinn::Endpoint>,
}

/// Which transports a connector uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TransportPolicy {
    /// QUIC, falling back to WebSocket where UDP is blocked (the default).
    Auto,
    QuicOnly,
    WebSocketOnly,
}

/// What a connector learned about the networks it was on.
struct Routes {
    /// The node's HTTPS address for a QUIC address, where it is not the
    /// same address (as the nodes of a cluster say in their redirects).
    https: HashMap<SocketAddr, SocketAddr>,
    /// The network the device is on now, as the app names it.
    network: String,
    /// Networks where QUIC did not connect and WebSocket did, until when.
    websocket_until: HashMap<String, Instant>,
    /// Nodes this client could not connect to lately, and when: said in
    /// every `Hello` for [`UNREACHABLE_MEMORY`], so a node does not send it
    /// back there (it forwards its fixes instead).
    unreachable: HashMap<SocketAddr, Instant>,
}

/// How long a node this client could not connect to is reported as such.
pub const UNREACHABLE_MEMORY: Duration = Duration::from_secs(30);

#[derive(Clone)]
pub struct Connector {
    config: quinn::ClientConfig,
    endpoints: Arc<parking_lot::Mutex<Endpoints>>,
    server_name: String,
    timeout: Duration,
    /// TLS for the WebSocket fallback (HTTP/1.1 over TLS 1.2 or 1.3).
    https: Arc<rustls::ClientConfig>,
    policy: TransportPolicy,
    /// Liveness of a WebSocket session (QUIC's transport has its own).
    keep_alive: Duration,
    idle: Duration,
    quic_timeout: Duration,
    remember_for: Duration,
    routes: Arc<parking_lot::Mutex<Routes>>,
    udp: Arc<UdpStats>,
}

/// How long QUIC has to connect alone before a WebSocket is tried beside it
/// (whichever connects first is used). A QUIC handshake takes one round
/// trip, a WebSocket over TLS three or four, so on a network that carries
/// UDP QUIC wins the race even when it is slow, and the WebSocket attempt
/// is dropped.
pub const DEFAULT_QUIC_TIMEOUT: Duration = Duration::from_millis(500);
/// How long a network where only WebSocket worked is remembered as such.
pub const DEFAULT_REMEMBER_FOR: Duration = Duration::from_secs(10 * 60);

const MAX_REDIRECTS: usize = 3;

/// Keep-alives keep an idle connection open and its NAT binding fresh: the
/// strictest NATs forget a UDP binding after 30 s. Each one wakes a phone's
/// radio (and costs the node a packet each way), so they are as rare as the
/// NATs allow; a moving driver's fixes keep the connection alive anyway.
const DEFAULT_KEEP_ALIVE: Duration = Duration::from_secs(20);
/// A node silent this long is taken for gone, and a reconnecting client
/// connects again (to another node, if that one died). More than two
/// keep-alives, so one lost packet does not end a connection.
const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(45);

fn transport(keep_alive: Duration, idle: Duration) -> Arc<quinn::TransportConfig> {
    let mut transport = quinn::TransportConfig::default();
    transport.keep_alive_interval(Some(keep_alive));
    if let Ok(idle) = quinn::IdleTimeout::try_from(idle) {
        transport.max_idle_timeout(Some(idle));
    }
    // Riders receive their updates on one stream the node opens.
    transport.max_concurrent_uni_streams(1u32.into());
    // Ask the node to acknowledge each packet as it reads it rather than on
    // its 25 ms delayed-ACK timer: a driver reporting every second or so gets
    // one ACK per fix either way, but the node then sends it in the wake-up
    // that read the fix instead of waking again for the timer.
    let mut acks = quinn::AckFrequencyConfig::default();
    acks.ack_eliciting_threshold(0u32.into());
    transport.ack_frequency_config(Some(acks));
    Arc::new(transport)
}

/// The certificates in `ca` (PEM or DER), as trust roots.
fn roots(ca: &Path) -> Result<rustls::RootCertStore, ClientError> {
    let cert_err = |reason: String| ClientError::Certificate {
        path: ca.display().to_string(),
        reason,
    };
    let bytes = std::fs::read(ca).map_err(|e| cert_err(e.to_string()))?;
    let certs: Vec<CertificateDer<'static>> = if bytes.starts_with(b"-----BEGIN") {
        CertificateDer::pem_slice_iter(&bytes)
            .collect::<Result<_, _>>()
            .map_err(|e| cert_err(e.to_string()))?
    } else {
        vec![CertificateDer::from(bytes)]
    };
    let mut roots = rustls::RootCertStore::empty();
    for cert in certs {
        roots.add(cert).map_err(|e| cert_err(e.to_string()))?;
    }
    Ok(roots)
}

/// A TLS client configuration for a node's HTTPS API and WSS dashboards
/// (TLS 1.2 and 1.3, HTTP/1.1), trusting the certificates in `ca`.
pub fn https_config(ca: &Path) -> Result<rustls::ClientConfig, ClientError> {
    https_with_roots(roots(ca)?)
}

fn https_with_roots(roots: rustls::RootCertStore) -> Result<rustls::ClientConfig, ClientError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| ClientError::Tls(e.to_string()))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(config)
}

/// Whether a failed attempt found nobody answering at the address (rather
/// than a node that answered and refused).
fn could_not_connect(e: &ClientError) -> bool {
    udp_looks_blocked(e) || matches!(e, ClientError::WebSocket(_))
}

/// Whether a failed QUIC attempt looks like a network that drops UDP (no
/// answer at all), rather than a node that answered.
fn udp_looks_blocked(e: &ClientError) -> bool {
    matches!(
        e,
        ClientError::Timeout
            | ClientError::Bind(_)
            | ClientError::Connect(_)
            | ClientError::Connection(
                quinn::ConnectionError::TimedOut | quinn::ConnectionError::Reset
            )
    )
}

impl Connector {
    /// A connector that trusts the certificates in `ca` (PEM or DER) and
    /// expects nodes to present `server_name`.
    pub fn new(ca: &Path, server_name: &str) -> Result<Self, ClientError> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let roots = roots(ca)?;
        let https = Arc::new(https_with_roots(roots.clone())?);
        let mut crypto = rustls::ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(|e| ClientError::Tls(e.to_string()))?
            .with_root_certificates(roots)
            .with_no_client_auth();
        crypto.alpn_protocols = vec![hexfleet_protocol::ALPN.to_vec()];
        let crypto = quinn::crypto::rustls::QuicClientConfig::try_from(crypto)
            .map_err(|e| ClientError::Tls(e.to_string()))?;
        let mut config = quinn::ClientConfig::new(Arc::new(crypto));
        config.transport_config(transport(DEFAULT_KEEP_ALIVE, DEFAULT_IDLE_TIMEOUT));
        Ok(Self {
            config,
            endpoints: Arc::default(),
            server_name: server_name.to_string(),
            timeout: Duration::from_secs(10),
            https,
            policy: TransportPolicy::Auto,
            keep_alive: DEFAULT_KEEP_ALIVE,
            idle: DEFAULT_IDLE_TIMEOUT,
            quic_timeout: DEFAULT_QUIC_TIMEOUT,
            remember_for: DEFAULT_REMEMBER_FOR,
            routes: Arc::new(parking_lot::Mutex::new(Routes {
                https: HashMap::new(),
                network: String::new(),
                websocket_until: HashMap::new(),
                unreachable: HashMap::new(),
            })),
            udp: Arc::default(),
        })
    }

    /// Which transports new connections use.
    pub fn with_transport(mut self, policy: TransportPolicy) -> Self {
        self.policy = policy;
        self
    }

    /// How long QUIC has alone before a WebSocket is tried beside it, and
    /// how long a network where only WebSocket worked is remembered.
    pub fn with_fallback(mut self, quic_timeout: Duration, remember_for: Duration) -> Self {
        self.quic_timeout = quic_timeout;
        self.remember_for = remember_for;
        self
    }

    /// Where the node at QUIC address `quic` serves HTTPS, when not on the
    /// same address and port number (as a node on 443 serves both).
    pub fn set_https_address(&self, quic: SocketAddr, https: SocketAddr) {
        self.routes.lock().https.insert(quic, https);
    }

    /// Names the network the device is on now (a Wi-Fi SSID, a carrier):
    /// what worked is remembered per network.
    pub fn set_network(&self, network: &str) {
        self.routes.lock().network = network.to_string();
    }

    /// Drops every datagram this connector's QUIC sockets send or receive,
    /// as a network that blocks UDP does (for tests and demos of the
    /// fallback); `false` lets them through again.
    pub fn simulate_udp_blocked(&self, blocked: bool) {
        self.udp.blocked.store(blocked, Ordering::Relaxed);
    }

    /// UDP datagrams this connector's QUIC sockets sent and received, each
    /// a wake-up of a phone's radio.
    pub fn udp_datagrams(&self) -> (u64, u64) {
        (
            self.udp.sent.load(Ordering::Relaxed),
            self.udp.received.load(Ordering::Relaxed),
        )
    }

    /// Whether new connections on the current network go straight to
    /// WebSocket, because QUIC did not connect on it lately.
    pub fn remembers_websocket(&self) -> bool {
        let routes = self.routes.lock();
        routes
            .websocket_until
            .get(&routes.network)
            .is_some_and(|until| Instant::now() < *until)
    }

    fn remember(&self, worked: Transport) {
        let mut routes = self.routes.lock();
        let network = routes.network.clone();
        match worked {
            Transport::Quic => {
                routes.websocket_until.remove(&network);
            }
            Transport::WebSocket => {
                let until = Instant::now() + self.remember_for;
                routes.websocket_until.insert(network, until);
            }
        }
    }

    fn https_for(&self, quic: SocketAddr) -> SocketAddr {
        self.routes.lock().https.get(&quic).copied().unwrap_or(quic)
    }

    /// Where a redirect says to go; its HTTPS address is noted for a
    /// WebSocket fallback.
    pub(crate) fn follow(&self, redirect: &Redirect) -> Option<SocketAddr> {
        let to: SocketAddr = redirect.addr.parse().ok()?;
        if let Ok(https) = redirect.https.parse() {
            self.set_https_address(to, https);
        }
        Some(to)
    }

    /// A connection to `addr` with its control stream, over the transport
    /// the policy and the network's memory choose.
    async fn open(
        &self,
        addr: SocketAddr,
    ) -> Result<(Conn, ControlWrite, ControlRead), ClientError> {
        match self.policy {
            TransportPolicy::QuicOnly => self.open_quic(addr).await,
            TransportPolicy::WebSocketOnly => self.open_websocket(addr).await,
            TransportPolicy::Auto if self.remembers_websocket() => {
                match self.open_websocket(addr).await {
                    Ok(opened) => Ok(opened),
                    // The WebSocket failed too: perhaps the network changed.
                    Err(_) => self.open_quic(addr).await,
                }
            }
            TransportPolicy::Auto => self.race(addr).await,
        }
    }

    /// QUIC first; if it has not connected within `quic_timeout`, a
    /// WebSocket beside it, and the first to connect is used (the other is
    /// dropped). What won is remembered for the network.
    async fn race(
        &self,
        addr: SocketAddr,
    ) -> Result<(Conn, ControlWrite, ControlRead), ClientError> {
        // Once the WebSocket has failed too, QUIC has this long in all:
        // a node neither way reaches is unreachable, and said so soon.
        let quic_deadline = tokio::time::Instant::now() + self.quic_timeout * 4;
        let quic = self.open_quic(addr);
        tokio::pin!(quic);
        let mut quic_live = match tokio::time::timeout(self.quic_timeout, &mut quic).await {
            Ok(Ok(opened)) => {
                self.remember(Transport::Quic);
                return Ok(opened);
            }
            Ok(Err(e)) if !udp_looks_blocked(&e) => return Err(e),
            // Failed at once (no UDP socket, say): WebSocket alone.
            Ok(Err(_)) => false,
            Err(_) => true,
        };
        tracing::debug!(%addr, "QUIC has not connected yet; trying WebSocket beside it");
        // The WebSocket has as long as QUIC had in all: a node whose TCP
        // port accepts and then says nothing (its ingress cut, a load
        // balancer's dead target) is unreachable, and said so soon.
        let websocket_deadline = tokio::time::Instant::now() + self.quic_timeout * 4;
        let websocket = self.open_websocket(addr);
        tokio::pin!(websocket);
        let mut websocket_failed = None;
        loop {
            tokio::select! {
                opened = &mut quic, if quic_live => match opened {
                    Ok(opened) => {
                        self.remember(Transport::Quic);
                        return Ok(opened);
                    }
                    Err(e) if !udp_looks_blocked(&e) => return Err(e),
                    Err(_) => quic_live = false,
                },
                opened = &mut websocket, if websocket_failed.is_none() => match opened {
                    Ok(opened) => {
                        self.remember(Transport::WebSocket);
                        return Ok(opened);
                    }
                    Err(e) => websocket_failed = Some(e),
                },
                _ = tokio::time::sleep_until(quic_deadline), if quic_live && websocket_failed.is_some() => {
                    quic_live = false;
                }
                _ = tokio::time::sleep_until(websocket_deadline), if websocket_failed.is_none() => {
                    websocket_failed = Some(ClientError::Timeout);
                }
            }
            if !quic_live {
                if let Some(e) = websocket_failed {
                    return Err(e);
                }
            }
        }
    }

    async fn open_quic(
        &self,
        addr: SocketAddr,
    ) -> Result<(Conn, ControlWrite, ControlRead), ClientError> {
        let endpoint = self.endpoint_for(addr)?;
        let conn = endpoint.connect(addr, &self.server_name)?.await?;
        let (send, recv) = conn.open_bi().await?;
        let (tx, rx) = quic_control(send, recv);
        Ok((Conn::Quic(conn), tx, rx))
    }

    async fn open_websocket(
        &self,
        addr: SocketAddr,
    ) -> Result<(Conn, ControlWrite, ControlRead), ClientError> {
        let https = self.https_for(addr);
        let liveness = (self.keep_alive, self.idle);
        WsConn::connect(self.https.clone(), &self.server_name, https, addr, liveness).await
    }

    fn quic_socket(&self, addr: SocketAddr) -> Result<Arc<dyn quinn::AsyncUdpSocket>, ClientError> {
        let socket = client_socket(addr).map_err(ClientError::Bind)?;
        let inner = quinn::TokioRuntime
            .wrap_udp_socket(socket)
            .map_err(ClientError::Bind)?;
        Ok(Arc::new(CountedSocket::new(inner, self.udp.clone())))
    }

    /// A connector for new connections that ping every `keep_alive` and take
    /// the node for gone after `idle` of silence: how fast a client notices
    /// that its node died, against a packet every `keep_alive` when idle
    /// (each one wakes a phone's radio).
    ///
    /// A node that takes longer than `idle` to welcome a new connection is
    /// taken for gone too (a handshake with a dead node otherwise waits
    /// for quinn's own timeout, seconds).
    pub fn with_liveness(mut self, keep_alive: Duration, idle: Duration) -> Self {
        self.config.transport_config(transport(keep_alive, idle));
        self.timeout = idle;
        self.keep_alive = keep_alive;
        self.idle = idle;
        self
    }

    /// The endpoint for `addr`'s family, bound the first time it is needed.
    /// Many connections share it (the simulator puts hundreds on one).
    fn endpoint_for(&self, addr: SocketAddr) -> Result<quinn::Endpoint, ClientError> {
        let mut endpoints = self.endpoints.lock();
        let (slot, unspecified): (_, SocketAddr) = match addr {
            SocketAddr::V4(_) => (&mut endpoints.v4, (Ipv4Addr::UNSPECIFIED, 0).into()),
            SocketAddr::V6(_) => (&mut endpoints.v6, (Ipv6Addr::UNSPECIFIED, 0).into()),
        };
        if let Some(endpoint) = slot {
            return Ok(endpoint.clone());
        }
        let socket = self.quic_socket(unspecified)?;
        let mut endpoint = quinn::Endpoint::new_with_abstract_socket(
            quinn::EndpointConfig::default(),
            None,
            socket,
            Arc::new(quinn::TokioRuntime),
        )
        .map_err(ClientError::Bind)?;
        endpoint.set_default_client_config(self.config.clone());
        Ok(slot.insert(endpoint).clone())
    }

    /// Moves every connection of this connector to a new local socket, as
    /// a phone does going from Wi-Fi to cellular: QUIC migrates each
    /// connection to the new address (the node validates the new path), so
    /// sessions carry on with no reconnect. Returns the new local addresses.
    pub fn rebind(&self) -> Result<Vec<SocketAddr>, ClientError> {
        let endpoints = self.endpoints.lock();
        let mut bound = Vec::new();
        for (endpoint, unspecified) in [
            (&endpoints.v4, SocketAddr::from((Ipv4Addr::UNSPECIFIED, 0))),
            (&endpoints.v6, SocketAddr::from((Ipv6Addr::UNSPECIFIED, 0))),
        ] {
            if let Some(endpoint) = endpoint {
                let socket = self.quic_socket(unspecified)?;
                endpoint
                    .rebind_abstract(socket)
                    .map_err(ClientError::Bind)?;
                bound.push(endpoint.local_addr().map_err(ClientError::Bind)?);
            }
        }
        Ok(bound)
    }

    /// The local addresses of this connector's sockets.
    pub fn local_addrs(&self) -> Vec<SocketAddr> {
        let endpoints = self.endpoints.lock();
        [&endpoints.v4, &endpoints.v6]
            .into_iter()
            .flatten()
            .filter_map(|e| e.local_addr().ok())
            .collect()
    }

    /// A connector that trusts the development certificate a node on this
    /// machine wrote to the default location.
    pub fn dev() -> Result<Self, ClientError> {
        Self::new(&dev::default_dev_cert(), dev::DEV_SERVER_NAME)
    }

    /// Connects, says `Hello` and follows redirects to the node that owns the
    /// client's shard. A node it is redirected to and cannot connect to is
    /// one its peers may still reach: the client goes back to the node that
    /// redirected it, saying so, and that node keeps it.
    pub(crate) async fn hello(
        &self,
        mut addr: SocketAddr,
        role: Role,
        token: &str,
    ) -> Result<Greeting, ClientError> {
        let mut redirected_by = None;
        for _ in 0..=MAX_REDIRECTS + 1 {
            let said = tokio::time::timeout(self.timeout, self.hello_once(addr, role, token))
                .await
                .unwrap_or(Err(ClientError::Timeout));
            // A node is reached when it answered `Hello`: a connection made
            // whose `Hello` then went unanswered (a lossy path) is not.
            match &said {
                Ok(_) => self.reached(addr, true),
                Err(e) if could_not_connect(e) => self.reached(addr, false),
                Err(_) => {}
            }
            match said {
                Ok(Greeting::Redirect(to)) => {
                    redirected_by = Some(addr);
                    addr = to;
                }
                Err(e) if could_not_connect(&e) && redirected_by.is_some() => {
                    tracing::debug!(%addr, error = %e, "could not reach the node redirected to; back to the one that sent it there");
                    addr = redirected_by.take().unwrap_or(addr);
                }
                other => return other,
            }
        }
        Err(ClientError::TooManyRedirects)
    }

    /// The nodes this client could not connect to lately (see
    /// [`UNREACHABLE_MEMORY`]).
    pub fn unreachable(&self) -> Vec<SocketAddr> {
        let mut routes = self.routes.lock();
        let now = Instant::now();
        routes
            .unreachable
            .retain(|_, at| now.duration_since(*at) < UNREACHABLE_MEMORY);
        let mut addrs: Vec<(SocketAddr, Instant)> =
            routes.unreachable.iter().map(|(a, t)| (*a, *t)).collect();
        // The latest first, as many as a `Hello` carries.
        addrs.sort_by_key(|a| std::cmp::Reverse(a.1));
        addrs
            .into_iter()
            .take(hexfleet_protocol::MAX_UNREACHABLE_REPORTED)
            .map(|(a, _)| a)
            .collect()
    }

    /// Notes how a connection to `node` ended. One that timed out (nothing
    /// heard from the node for the idle timeout: the path failed, or the
    /// node) counts as a node this client could not reach: the next
    /// `Hello`s say so, and the node reached keeps the client rather than
    /// sending it straight back through the path that just failed.
    pub(crate) fn connection_ended(&self, node: SocketAddr, how: Option<&ClientError>) {
        if matches!(
            how,
            Some(ClientError::Connection(quinn::ConnectionError::TimedOut))
        ) {
            self.reached(node, false);
        }
    }

    /// Notes whether a connection to `addr` could be made.
    fn reached(&self, addr: SocketAddr, reached: bool) {
        let mut routes = self.routes.lock();
        match reached {
            true => {
                routes.unreachable.remove(&addr);
            }
            false => {
                routes.unreachable.insert(addr, Instant::now());
            }
        }
    }

    async fn hello_once(
        &self,
        addr: SocketAddr,
        role: Role,
        token: &str,
    ) -> Result<Greeting, ClientError> {
        let unreachable = self.unreachable();
        let opened = tokio::time::timeout(self.timeout, self.open(addr))
            .await
            .unwrap_or(Err(ClientError::Timeout));
        let (conn, mut tx, mut rx) = opened?;
        let sent = std::time::Instant::now();
        tx.send(ClientMsg::Hello(Hello {
            version: PROTOCOL_VERSION,
            role,
            token: token.to_string(),
            unreachable: unreachable.iter().map(|a| a.to_string()).collect(),
        }))
        .await?;
        match rx.next().await {
            Some(Ok(ServerMsg::Welcome(welcome))) => Ok(Greeting::Welcome(Box::new(Established {
                conn,
                tx,
                rx,
                welcome,
                round_trip: sent.elapsed(),
                welcomed_ms: crate::driver::now_ms(),
            }))),
            Some(Ok(ServerMsg::Redirect(r))) => {
                conn.close(CloseAs::Redirected, "redirected");
                self.follow(&r).map(Greeting::Redirect).ok_or_else(|| {
                    ClientError::Protocol(format!("redirect to an invalid address {:?}", r.addr))
                })
            }
            Some(Ok(ServerMsg::Error(e))) => Err(ClientError::Refused {
                code: e.code,
                reason: e.reason,
            }),
            Some(Ok(other)) => Err(ClientError::Protocol(format!(
                "expected Welcome, got {other:?}"
            ))),
            Some(Err(e)) => Err(e.into()),
            None => Err(conn.close_error().unwrap_or_else(|| {
                ClientError::Protocol("the node closed the control stream".into())
            })),
        }
    }
}
