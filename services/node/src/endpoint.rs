//! The QUIC endpoint(s): binds the UDP socket(s), accepts connections and
//! hands each to a session task.
//!
//! With `quic.endpoints > 1`, several sockets share the port with
//! SO_REUSEPORT; the kernel hashes each client's address to one socket, so a
//! connection always reaches the same endpoint, and the endpoints' driver
//! tasks spread over cores.

use std::{
    io::IoSliceMut,
    net::SocketAddr,
    pin::Pin,
    sync::Arc,
    task::{Context as TaskContext, Poll},
    time::Duration,
};

use prometheus_client::metrics::counter::Counter;
use quinn::{
    udp::{RecvMeta, Transmit},
    AsyncUdpSocket, Runtime, UdpPoller,
};

use socket2::{Domain, Protocol, Socket, Type};
use tokio_util::{sync::CancellationToken, task::TaskTracker};
use tracing::Instrument;

use crate::{
    config::QuicConfig,
    metrics::Metrics,
    per_address::{AddressSlot, PerAddress},
    session,
    session::Context,
};

/// Peers acknowledge every this many packets the node sends them (or after
/// their delayed-ACK timer).
const ACK_EVERY: u32 = 8;

#[derive(Debug, thiserror::Error)]
pub enum EndpointError {
    #[error("binding UDP {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("invalid QUIC setting: {0}")]
    Setting(String),
}

/// The transport settings every node connection uses.
pub fn transport(config: &QuicConfig) -> Result<quinn::TransportConfig, EndpointError> {
    let mut t = quinn::TransportConfig::default();
    let idle = quinn::IdleTimeout::try_from(config.idle_timeout)
        .map_err(|e| EndpointError::Setting(e.to_string()))?;
    t.max_idle_timeout(Some(idle));
    // One control stream from the client; nothing else.
    t.max_concurrent_bidi_streams(1u32.into());
    t.max_concurrent_uni_streams(0u32.into());
    // Control frames are small: small windows keep per-connection memory low.
    t.stream_receive_window((64 * 1024u32).into());
    t.receive_window((128 * 1024u32).into());
    t.send_window(256 * 1024);
    t.datagram_receive_buffer_size(Some(64 * 1024));
    t.datagram_send_buffer_size(16 * 1024);
    // A busy rider gets an update every millisecond or two and would
    // acknowledge every second one, each ACK a packet its radio sends and
    // the node decrypts and processes. Ask peers to acknowledge every
    // `ACK_EVERY` packets, or after their delayed-ACK timer (25 ms): a
    // sparse view is acknowledged as before.
    let mut acks = quinn::AckFrequencyConfig::default();
    acks.ack_eliciting_threshold((ACK_EVERY - 1).into());
    t.ack_frequency_config(Some(acks));
    Ok(t)
}

fn bind_udp(
    addr: SocketAddr,
    shared: bool,
    buffer: usize,
) -> Result<std::net::UdpSocket, EndpointError> {
    let err = |source| EndpointError::Bind { addr, source };
    let socket =
        Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP)).map_err(err)?;
    if shared {
        socket.set_reuse_port(true).map_err(err)?;
    }
    // Best effort: the kernel caps these at net.core.{r,w}mem_max.
    let _ = socket.set_recv_buffer_size(buffer);
    let _ = socket.set_send_buffer_size(buffer);
    if let (Ok(recv), Ok(send)) = (socket.recv_buffer_size(), socket.send_buffer_size()) {
        if recv < buffer {
            tracing::debug!(
                requested = buffer,
                recv,
                send,
                "UDP buffers capped by the kernel"
            );
        }
    }
    socket.bind(&addr.into()).map_err(err)?;
    socket.set_nonblocking(true).map_err(err)?;
    Ok(socket.into())
}

/// A UDP socket that counts what goes through it (`udp_datagrams`,
/// `udp_bytes`): every segment of a GSO send or GRO receive is a datagram
/// on the wire, and each one wakes a phone's radio.
#[derive(Debug)]
struct Counted {
    inner: Arc<dyn AsyncUdpSocket>,
    /// `[received, sent]`.
    datagrams: [Counter; 2],
    bytes: [Counter; 2],
}

impl AsyncUdpSocket for Counted {
    fn create_io_poller(self: Arc<Self>) -> Pin<Box<dyn UdpPoller>> {
        self.inner.clone().create_io_poller()
    }

    fn try_send(&self, transmit: &Transmit) -> std::io::Result<()> {
        self.inner.try_send(transmit)?;
        let len = transmit.contents.len();
        let segments = transmit.segment_size.map_or(1, |s| len.div_ceil(s.max(1)));
        self.datagrams[1].inc_by(segments as u64);
        self.bytes[1].inc_by(len as u64);
        Ok(())
    }

    fn poll_recv(
        &self,
        cx: &mut TaskContext,
        bufs: &mut [IoSliceMut<'_>],
        meta: &mut [RecvMeta],
    ) -> Poll<std::io::Result<usize>> {
        let polled = self.inner.poll_recv(cx, bufs, meta);
        if let Poll::Ready(Ok(n)) = &polled {
            let (mut datagrams, mut bytes) = (0, 0);
            for m in &meta[..*n] {
                datagrams += m.len.div_ceil(m.stride.max(1)) as u64;
                bytes += m.len as u64;
            }
            self.datagrams[0].inc_by(datagrams);
            self.bytes[0].inc_by(bytes);
        }
        polled
    }

    fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.inner.local_addr()
    }

    fn max_transmit_segments(&self) -> usize {
        self.inner.max_transmit_segments()
    }

    fn max_receive_segments(&self) -> usize {
        self.inner.max_receive_segments()
    }

    fn may_fragment(&self) -> bool {
        self.inner.may_fragment()
    }
}

/// Says when an endpoint's UDP socket is closed. `Endpoint::wait_idle`
/// returns once the connections have drained, but the socket closes only
/// when quinn's endpoint driver, a task of its own, notices that nobody
/// holds the endpoint any more: a node restarted on the same port a moment
/// later could find it still bound.
pub struct Released(std::sync::Weak<dyn AsyncUdpSocket>);

impl Released {
    /// Waits (at most `within`) until the socket is closed; says whether it
    /// is.
    pub async fn wait(self, within: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + within;
        while self.0.strong_count() > 0 {
            if tokio::time::Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        true
    }
}

/// Binds `config.endpoints` endpoints on one address. Returns them, each
/// with what says when its socket is closed, and the address actually
/// bound (port 0 becomes the chosen port).
pub fn bind(
    config: &QuicConfig,
    server: quinn::ServerConfig,
    metrics: &Metrics,
) -> Result<(Vec<(quinn::Endpoint, Released)>, SocketAddr), EndpointError> {
    let shared = config.endpoints > 1;
    let mut addr = config.listen;
    let mut endpoints = Vec::with_capacity(config.endpoints);
    let runtime = Arc::new(quinn::TokioRuntime);
    for _ in 0..config.endpoints {
        let socket = bind_udp(addr, shared, config.udp_buffer_bytes)?;
        addr = socket
            .local_addr()
            .map_err(|source| EndpointError::Bind { addr, source })?;
        let err = |source| EndpointError::Bind { addr, source };
        let inner = runtime.wrap_udp_socket(socket).map_err(err)?;
        let released = Released(Arc::downgrade(&inner));
        let socket = Arc::new(Counted {
            inner,
            datagrams: metrics.udp_datagrams.clone(),
            bytes: metrics.udp_bytes.clone(),
        });
        let endpoint = quinn::Endpoint::new_with_abstract_socket(
            quinn::EndpointConfig::default(),
            Some(server.clone()),
            socket,
            runtime.clone(),
        )
        .map_err(err)?;
        endpoints.push((endpoint, released));
    }
    Ok((endpoints, addr))
}

/// Who gets in: the node's connection limit, the per-address limit, and
/// handshakes in progress (Retry above one threshold, drop above another).
pub struct Admission {
    max_connections: usize,
    per_address: Arc<PerAddress>,
    retry_above: usize,
    max_handshakes: usize,
}

impl Admission {
    pub fn new(config: &QuicConfig) -> Self {
        Self {
            max_connections: config.max_connections,
            per_address: PerAddress::new(config.max_connections_per_address),
            retry_above: config.retry_above_handshakes,
            max_handshakes: config.max_handshakes,
        }
    }
}

/// A connection let in: its place in its address's count, held for its
/// life, and in the handshake count until the handshake completes.
pub struct Admitted {
    pub address: AddressSlot,
    pub handshake: Handshaking,
}

/// Counts one handshake in progress until dropped.
pub struct Handshaking(Option<Arc<crate::metrics::Metrics>>);

impl Handshaking {
    fn new(metrics: Arc<crate::metrics::Metrics>) -> Self {
        metrics.handshakes.inc();
        Self(Some(metrics))
    }

    /// The handshake is over (either way).
    pub fn done(&mut self) {
        if let Some(m) = self.0.take() {
            m.handshakes.dec();
        }
    }
}

impl Drop for Handshaking {
    fn drop(&mut self) {
        self.done();
    }
}

/// Accepts connections until shutdown, each served by its own task.
pub async fn accept_loop(
    endpoint: quinn::Endpoint,
    released: Released,
    ctx: Arc<Context>,
    admission: Admission,
    sessions: TaskTracker,
    shutdown: CancellationToken,
) {
    let metrics = ctx.ingest.metrics.clone();
    loop {
        let incoming = tokio::select! {
            incoming = endpoint.accept() => incoming,
            _ = shutdown.cancelled() => None,
        };
        let Some(incoming) = incoming else { break };
        let handshakes = metrics.handshakes.get().max(0) as usize;
        if handshakes >= admission.max_handshakes {
            // No answer at all: a flood gets nothing back to amplify.
            metrics.connection_refused("handshake_limit").inc();
            incoming.ignore();
            continue;
        }
        if handshakes >= admission.retry_above && !incoming.remote_address_validated() {
            // A stateless Retry: a spoofed source never answers it, and the
            // node keeps nothing for it.
            metrics.handshakes_retried.inc();
            if incoming.retry().is_err() {
                tracing::debug!("a Retry was refused for an already retried Initial");
            }
            continue;
        }
        if metrics.connections.get() as usize >= admission.max_connections {
            metrics.connection_refused("node_limit").inc();
            incoming.refuse();
            continue;
        }
        let Some(address) = admission
            .per_address
            .try_acquire(incoming.remote_address().ip())
        else {
            metrics.connection_refused("address_limit").inc();
            incoming.refuse();
            continue;
        };
        let admitted = Admitted {
            address,
            handshake: Handshaking::new(metrics.clone()),
        };
        // Every log line of the session carries who it is.
        let span = tracing::info_span!(
            "session",
            peer = %incoming.remote_address(),
            role = tracing::field::Empty,
            id = tracing::field::Empty,
        );
        sessions.spawn(session::serve(incoming, ctx.clone(), admitted).instrument(span));
    }
    // Sessions tell their clients why and acknowledge their last fixes
    // before the endpoint closes what is left.
    sessions.close();
    let _ = tokio::time::timeout(crate::SESSION_DRAIN, sessions.wait()).await;
    let code = hexfleet_protocol::ErrorCode::ShuttingDown;
    endpoint.close(code.close_code().into(), code.as_str().as_bytes());
    // Let closed connections drain, then let the socket go, so the port is
    // free when we return (a node restarted on it binds at once).
    endpoint.wait_idle().await;
    drop(endpoint);
    if !released.wait(SOCKET_RELEASE).await {
        tracing::warn!(
            "the QUIC socket was still open {SOCKET_RELEASE:?} after the endpoint closed"
        );
    }
}

/// How long the endpoint driver gets to close the socket once the endpoint
/// is idle and let go: it needs one more turn of the runtime.
const SOCKET_RELEASE: Duration = Duration::from_secs(2);
