//! The QUIC endpoint(s): binds the UDP socket(s), accepts connections and
//! hands each to a session task.
//!
//! With `quic.endpoints > 1`, several sockets share the port with
//! SO_REUSEPORT; the kernel hashes each client's address to one socket, so a
//! connection always reaches the same endpoint, and the endpoints' driver
//! tasks spread over cores.

use std::{net::SocketAddr, sync::Arc};

use socket2::{Domain, Protocol, Socket, Type};
use tokio_util::{sync::CancellationToken, task::TaskTracker};
use tracing::Instrument;

use crate::{
    config::QuicConfig,
    per_address::{AddressSlot, PerAddress},
    session,
    session::Context,
};

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

/// Binds `config.endpoints` endpoints on one address. Returns them and the
/// address actually bound (port 0 becomes the chosen port).
pub fn bind(
    config: &QuicConfig,
    server: quinn::ServerConfig,
) -> Result<(Vec<quinn::Endpoint>, SocketAddr), EndpointError> {
    let shared = config.endpoints > 1;
    let mut addr = config.listen;
    let mut endpoints = Vec::with_capacity(config.endpoints);
    for _ in 0..config.endpoints {
        let socket = bind_udp(addr, shared, config.udp_buffer_bytes)?;
        addr = socket
            .local_addr()
            .map_err(|source| EndpointError::Bind { addr, source })?;
        let endpoint = quinn::Endpoint::new(
            quinn::EndpointConfig::default(),
            Some(server.clone()),
            socket,
            Arc::new(quinn::TokioRuntime),
        )
        .map_err(|source| EndpointError::Bind { addr, source })?;
        endpoints.push(endpoint);
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
    let code = hexfleet_protocol::ErrorCode::ShuttingDown;
    endpoint.close(code.close_code().into(), code.as_str().as_bytes());
    // Let closed connections drain, so the port is free when we return.
    endpoint.wait_idle().await;
}
