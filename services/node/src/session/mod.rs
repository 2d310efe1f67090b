//! One client connection, from handshake to close: QUIC, or a WebSocket for
//! clients whose UDP is blocked ([`transport`]).
//!
//! The client opens one bidirectional control stream and says `Hello` with
//! its role and token; the session then becomes a [`driver`] session (fixes
//! in, acknowledgements out) or a [`rider`] session (subscriptions in,
//! deltas out on a stream the node opens).
//!
//! Whatever a client sends, the worst outcome is that *its* connection is
//! closed with an error code and reason: never a panic, never another
//! client's state.

mod driver;
mod forward;
mod rider;
mod transport;

use std::{pin::Pin, sync::Arc, time::Duration};

use dashmap::DashMap;
use futures_util::{stream, Stream, StreamExt};
use hexfleet_model::VehicleId;
use hexfleet_protocol::{
    ClientMsg, ErrorCode, ErrorFrame, FrameError, Hello, Redirect, Role, ServerMsg,
    MAX_UNREACHABLE_REPORTED, PROTOCOL_VERSION,
};
use tokio_util::sync::CancellationToken;
pub(crate) use transport::too_big;
use transport::{CloseAs, ControlRead, ControlWrite, Peer};

use crate::{
    auth::Auth, budget::RequestLimits, clock, cluster::Cluster, config::Config, fanout::FanOut,
    ingest::Ingest, store::Store, validate::Limits,
};

/// What every session of a node shares.
pub struct Context {
    pub node_id: String,
    pub ingest: Arc<Ingest>,
    pub fanout: Arc<FanOut>,
    /// The router, in a cluster: which shards are this node's.
    pub cluster: Option<Arc<Cluster>>,
    pub store: Arc<dyn Store>,
    auth: Arc<Auth>,
    limits: Limits,
    ack_interval: Duration,
    /// How often the writer flushes: how soon an accepted fix can be
    /// acknowledged as written.
    flush_interval: Duration,
    handshake_timeout: Duration,
    /// A WebSocket session silent this long is lost (QUIC's own idle
    /// timeout does this for QUIC).
    idle_timeout: Duration,
    /// How long a driver that lost its connection stays visible, waiting
    /// for it to come back.
    offline_grace: Duration,
    max_subscribe_radius_m: f64,
    slow_consumer_after: Duration,
    rider_requests: RequestLimits,
    fix_budget: RequestLimits,
    /// The live session of each driver. A driver that connects again closes
    /// its older connection, so one vehicle never has two writers.
    drivers: DashMap<VehicleId, (u64, CancellationToken)>,
    shutdown: CancellationToken,
}

impl Context {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        config: &Config,
        auth: Arc<Auth>,
        ingest: Arc<Ingest>,
        fanout: Arc<FanOut>,
        cluster: Option<Arc<Cluster>>,
        store: Arc<dyn Store>,
        shutdown: CancellationToken,
    ) -> Self {
        Self {
            node_id: config.node_id.clone(),
            ingest,
            fanout,
            cluster,
            store,
            auth,
            limits: Limits::new(&config.ingest, config.store.stale_after),
            ack_interval: config.ingest.ack_interval,
            flush_interval: config.store.flush_interval,
            handshake_timeout: config.quic.handshake_timeout,
            idle_timeout: config.quic.idle_timeout,
            offline_grace: config.ingest.offline_grace,
            max_subscribe_radius_m: config.riders.max_radius_m,
            slow_consumer_after: config.riders.slow_consumer_after,
            rider_requests: config.riders.requests.clone(),
            fix_budget: config.ingest.fixes.clone(),
            drivers: DashMap::new(),
            shutdown,
        }
    }
}

/// A session that ends well: the client said `Goodbye`.
#[derive(Debug)]
struct Goodbye;

/// Why a session stops without a `Goodbye`.
#[derive(Debug)]
enum Stop {
    /// The connection went away: closed or reset by the peer, or silent past
    /// the idle timeout (a phone in a tunnel, an app killed). Not the
    /// client's fault, and not a protocol violation; nobody to tell.
    Lost,
    /// The node ends the session and tells the client why.
    Refused(Refusal),
    /// The client belongs on another node: it is told where.
    Redirected(Redirect),
}

impl From<Refusal> for Stop {
    fn from(refusal: Refusal) -> Self {
        Stop::Refused(refusal)
    }
}

/// How a session turned out; every one is counted as exactly one of
/// `sessions_goodbye`, `sessions_lost`, `sessions_redirected` or
/// `sessions_refused{code}`.
type Outcome = Result<Goodbye, Stop>;

/// Whether a read or write error means the connection is gone, rather than
/// that the client sent something wrong or the node failed.
fn lost(e: &FrameError) -> bool {
    matches!(e, FrameError::Io(_))
}

/// Why a session ends early, and what the client is told.
#[derive(Debug)]
pub(crate) struct Refusal {
    pub(crate) code: ErrorCode,
    pub(crate) reason: String,
}

impl Refusal {
    fn new(code: ErrorCode, reason: impl Into<String>) -> Self {
        Self {
            code,
            reason: reason.into(),
        }
    }

    fn protocol(e: FrameError) -> Self {
        Self::new(ErrorCode::ProtocolViolation, e.to_string())
    }
}

/// Reads the next control message.
async fn next_message(rx: &mut ControlRead) -> Result<ClientMsg, Stop> {
    match rx.next().await {
        Some(Ok(msg)) => Ok(msg),
        Some(Err(e)) if lost(&e) => Err(Stop::Lost),
        Some(Err(e)) => Err(Refusal::protocol(e).into()),
        None => Err(Stop::Lost),
    }
}

/// One source of a session's wake-ups, as a stream of its events.
type Source<'s, E> = Pin<Box<dyn Stream<Item = E> + Send + 's>>;

/// What every session waits for besides its own sources: the client's
/// control messages, the token's expiry and the node's shutdown. A session
/// merges them with its own in a [`stream::SelectAll`], which polls a source
/// only when it has something (a `select!` would poll every branch on every
/// wake-up, once per fix or delta).
fn common_sources<'s, E: Send + 's>(
    rx: &'s mut ControlRead,
    expiry: Expiry,
    ctx: &Context,
    control: fn(Result<ClientMsg, Stop>) -> E,
    expired: fn(Refusal) -> E,
    shutting_down: E,
) -> Vec<Source<'s, E>> {
    let shutdown = ctx.shutdown.clone().cancelled_owned();
    let mut sources: Vec<Source<'s, E>> = vec![
        Box::pin(stream::unfold(rx, move |rx| async move {
            let msg = next_message(rx).await;
            Some((control(msg), rx))
        })),
        Box::pin(stream::once(expiry.passed()).map(expired)),
        Box::pin(stream::once(async move {
            shutdown.await;
            shutting_down
        })),
    ];
    if let Some(cluster) = ctx.cluster.clone() {
        // A node cut from its store serves no one: what it shows is
        // frozen, and what it is sent cannot be kept. Its clients go to
        // another node (their SDK reconnects through the seeds).
        let mut changes = cluster.watch_changes();
        sources.push(Box::pin(stream::once(async move {
            while !cluster.is_cut_off() {
                if changes.changed().await.is_err() {
                    std::future::pending::<()>().await;
                }
            }
            expired(Refusal::new(
                ErrorCode::Unavailable,
                "this node cannot reach its store; connect to another node",
            ))
        })));
    }
    sources
}

/// Decrements the open-connections gauge however the session ends.
struct OpenConnection<'a>(&'a prometheus_client::metrics::gauge::Gauge);

impl Drop for OpenConnection<'_> {
    fn drop(&mut self) {
        self.0.dec();
    }
}

/// Serves one incoming connection to its end.
pub async fn serve(
    incoming: quinn::Incoming,
    ctx: Arc<Context>,
    mut admitted: crate::endpoint::Admitted,
) {
    let metrics = ctx.ingest.metrics.clone();
    let connecting = tokio::time::timeout(ctx.handshake_timeout, incoming).await;
    admitted.handshake.done();
    let conn = match connecting {
        Ok(Ok(conn)) => conn,
        Ok(Err(e)) => {
            tracing::debug!(error = %e, "QUIC handshake failed");
            return;
        }
        Err(_) => {
            tracing::debug!("QUIC handshake timed out");
            return;
        }
    };
    if is_probe(&conn) {
        // A peer checking that clients can reach this address: answered by
        // the handshake itself.
        metrics.probes_answered.inc();
        use crate::cluster::probe;
        conn.close(probe::CLOSE_CODE.into(), probe::CLOSE_REASON);
        return;
    }
    metrics.connections.inc();
    metrics.connections_accepted.inc();
    let _open = OpenConnection(&metrics.connections);

    let peer = Peer::Quic(conn);
    let (tx, rx) = match tokio::time::timeout(ctx.handshake_timeout, accept_control(&peer)).await {
        Ok(Some((send, recv))) => (ControlWrite::quic(send), ControlRead::quic(recv)),
        Ok(None) => {
            ended(Err(Stop::Lost), &peer, None, &ctx).await;
            return;
        }
        Err(_) => {
            let refusal = Refusal::new(ErrorCode::ProtocolViolation, "no control stream");
            ended(Err(refusal.into()), &peer, None, &ctx).await;
            return;
        }
    };
    run(peer, tx, rx, &ctx).await;
}

/// Whether a connection is a peer's probe (ALPN `hexfleet-probe/1`).
fn is_probe(conn: &quinn::Connection) -> bool {
    conn.handshake_data()
        .and_then(|data| data.downcast::<quinn::crypto::rustls::HandshakeData>().ok())
        .and_then(|data| data.protocol)
        .is_some_and(|alpn| alpn == hexfleet_protocol::PROBE_ALPN)
}

async fn accept_control(peer: &Peer) -> Option<(quinn::SendStream, quinn::RecvStream)> {
    match peer {
        Peer::Quic(conn) => conn.accept_bi().await.ok(),
        Peer::Ws(_) => None,
    }
}

/// Serves a driver or rider that connected over WebSocket (`GET /v1/connect`
/// on the HTTPS port) because its network drops UDP: from `Hello` on, the
/// same session as over QUIC.
pub async fn serve_websocket(socket: axum::extract::ws::WebSocket, ctx: Arc<Context>) {
    let metrics = ctx.ingest.metrics.clone();
    metrics.connections.inc();
    metrics.connections_accepted.inc();
    metrics.websocket_sessions.inc();
    let _open = OpenConnection(&metrics.connections);
    let (peer, tx, rx) = Peer::websocket(socket, ctx.idle_timeout);
    run(peer, tx, rx, &ctx).await;
}

/// From `Hello` to the session's end, over either transport.
async fn run(peer: Peer, mut tx: ControlWrite, mut rx: ControlRead, ctx: &Arc<Context>) {
    let who = match tokio::time::timeout(ctx.handshake_timeout, handshake(&mut rx, ctx)).await {
        Ok(Ok(who)) => who,
        Ok(Err(stop)) => {
            ended(Err(stop), &peer, Some(&mut tx), ctx).await;
            return;
        }
        Err(_) => {
            let refusal = Refusal::new(ErrorCode::ProtocolViolation, "no Hello in time");
            ended(Err(refusal.into()), &peer, Some(&mut tx), ctx).await;
            return;
        }
    };
    let (role, subject, expires_at, hello) = who;
    tracing::Span::current()
        .record("role", role.as_str())
        .record("id", tracing::field::display(&subject));
    // Nodes the client could not reach: it is not sent there.
    let mut unreachable = hello.unreachable;
    unreachable.truncate(MAX_UNREACHABLE_REPORTED);
    if let Some(cluster) = &ctx.cluster {
        for addr in &unreachable {
            cluster.client_reports_unreachable(addr);
        }
    }
    let open = ctx.ingest.metrics.sessions(role);
    open.inc();
    let expiry = Expiry::at(expires_at);
    let outcome = match role {
        Role::Driver => {
            let greeted = driver::Greeted {
                id: subject,
                token: hello.token,
                unreachable,
            };
            driver::serve(&peer, &mut tx, &mut rx, ctx, greeted, expiry).await
        }
        Role::Rider => rider::serve(&peer, &mut tx, &mut rx, ctx, expiry, &unreachable).await,
        Role::Dashboard => Err(Refusal::new(
            ErrorCode::BadRequest,
            "dashboards connect to /v1/ws, not as drivers or riders",
        )
        .into()),
    };
    ended(outcome, &peer, Some(&mut tx), ctx).await;
    open.dec();
}

/// When a session's token expires: the session is closed then
/// (`token_expired`), and the client connects again with a fresh token.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Expiry(tokio::time::Instant);

impl Expiry {
    /// The moment `expires_at` (Unix seconds) passes on this node's clock.
    pub(crate) fn at(expires_at: u64) -> Self {
        let left = (expires_at + 1).saturating_sub(clock::now_s());
        // Far-future tokens: a year is forever for a session.
        let left = Duration::from_secs(left.min(365 * 24 * 3600));
        Self(tokio::time::Instant::now() + left)
    }

    /// Resolves when the token expires, with the refusal that ends the
    /// session.
    pub(crate) async fn passed(self) -> Refusal {
        tokio::time::sleep_until(self.0).await;
        Refusal::new(
            ErrorCode::TokenExpired,
            "the token expired: connect again with a fresh one",
        )
    }
}

/// Accounts for how a session ended and, when the node ends it, tells the
/// client why.
async fn ended(outcome: Outcome, peer: &Peer, tx: Option<&mut ControlWrite>, ctx: &Context) {
    let metrics = &ctx.ingest.metrics;
    match outcome {
        Ok(Goodbye) => {
            metrics.sessions_goodbye.inc();
        }
        Err(Stop::Lost) => {
            metrics.sessions_lost.inc();
            let why = peer.close_reason();
            tracing::debug!(
                reason = why.as_deref().unwrap_or("stream closed"),
                "connection lost"
            );
        }
        Err(Stop::Refused(refusal)) => close(peer, tx, refusal, ctx).await,
        Err(Stop::Redirected(redirect)) => {
            metrics.sessions_redirected.inc();
            tracing::debug!(to = %redirect.addr, shard = %redirect.shard, "redirecting a client");
            let reason = format!("redirected to {}", redirect.addr);
            if let Some(tx) = tx {
                let _ = tokio::time::timeout(ERROR_FRAME_GRACE, async {
                    if tx.send(ServerMsg::Redirect(redirect)).await.is_ok() {
                        tx.finish().await;
                    }
                })
                .await;
            }
            peer.close(CloseAs::Redirected, &reason).await;
        }
    };
}

/// Reads and checks `Hello`; returns who the client is.
async fn handshake(
    rx: &mut ControlRead,
    ctx: &Context,
) -> Result<(Role, VehicleId, u64, Hello), Stop> {
    let ClientMsg::Hello(hello) = next_message(rx).await? else {
        let refusal = Refusal::new(
            ErrorCode::ProtocolViolation,
            "the first message must be Hello",
        );
        return Err(refusal.into());
    };
    if hello.version != PROTOCOL_VERSION {
        let refusal = Refusal::new(
            ErrorCode::UnsupportedVersion,
            format!(
                "protocol version {} is not supported; this node speaks {PROTOCOL_VERSION}",
                hello.version
            ),
        );
        return Err(refusal.into());
    }
    let claims = ctx
        .auth
        .verify_for(&hello.token, hello.role, clock::now_s())
        .map_err(|e| Refusal::new(ErrorCode::Unauthorized, e.to_string()))?;
    Ok((claims.role, claims.subject, claims.expires_at, hello))
}

const ERROR_FRAME_GRACE: Duration = Duration::from_millis(250);

/// Tells the client why, counts it, and closes the connection.
async fn close(peer: &Peer, tx: Option<&mut ControlWrite>, refusal: Refusal, ctx: &Context) {
    ctx.ingest.metrics.refused(refusal.code).inc();
    let (code, reason) = (refusal.code.as_str(), &refusal.reason);
    if refusal.code == ErrorCode::Internal {
        tracing::warn!(code, %reason, "closing session");
    } else {
        tracing::info!(code, %reason, "closing session");
    }
    if let Some(tx) = tx {
        let frame = ServerMsg::Error(ErrorFrame {
            code: refusal.code,
            reason: refusal.reason.clone(),
        });
        // Give the frame a moment to arrive before the close discards it;
        // the peer reading it, or going away, ends the wait early.
        let _ = tokio::time::timeout(ERROR_FRAME_GRACE, async {
            if tx.send(frame).await.is_ok() {
                tx.finish().await;
            }
        })
        .await;
    }
    // The reason travels in the close too, in case the frame does not.
    peer.close(CloseAs::Refused(refusal.code), &refusal.reason)
        .await;
}

/// Sends one message on the control stream. A client that does not read it
/// for `slow_consumer_after` is cut off like a rider that does not read its
/// updates, rather than holding its session forever.
async fn send(tx: &mut ControlWrite, msg: ServerMsg, ctx: &Context) -> Result<(), Stop> {
    let after = ctx.slow_consumer_after;
    match crate::clock::timeout_if_blocked(after, tx.send(msg)).await {
        Ok(Ok(())) => Ok(()),
        Ok(Err(e)) if lost(&e) => Err(Stop::Lost),
        Ok(Err(e)) => Err(Refusal::new(
            ErrorCode::Internal,
            format!("writing to the control stream: {e}"),
        )
        .into()),
        Err(_) => Err(Refusal::new(
            ErrorCode::SlowConsumer,
            format!("the control stream was not read for more than {after:?}"),
        )
        .into()),
    }
}

/// A WebSocket's read buffer: frames are at most `MAX_FRAME_LEN`, and most
/// are small (tungstenite's default is 128 KiB per connection).
const WEBSOCKET_READ_BUFFER: usize = 4 * 1024;

/// `GET /v1/connect`: drivers and riders over WebSocket ([`hexfleet_protocol::ws`]).
/// The token comes in `Hello`, as over QUIC.
pub fn router(ctx: Arc<Context>) -> axum::Router {
    use axum::{
        extract::{State, WebSocketUpgrade},
        routing::get,
    };
    use tracing::Instrument;
    async fn upgrade(
        State(ctx): State<Arc<Context>>,
        ws: WebSocketUpgrade,
    ) -> axum::response::Response {
        let max = hexfleet_protocol::MAX_FRAME_LEN + 1;
        let span = tracing::info_span!(
            "session",
            transport = "websocket",
            role = tracing::field::Empty,
            id = tracing::field::Empty,
        );
        ws.max_message_size(max)
            .max_frame_size(max)
            .read_buffer_size(WEBSOCKET_READ_BUFFER)
            .write_buffer_size(0)
            .on_upgrade(move |socket| serve_websocket(socket, ctx).instrument(span))
    }
    axum::Router::new()
        .route(hexfleet_protocol::ws::PATH, get(upgrade))
        .with_state(ctx)
}
