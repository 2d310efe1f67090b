//! One QUIC connection, from handshake to close.
//!
//! The client opens one bidirectional control stream and says `Hello` with
//! its role and token. A driver session then reads fixes from datagrams (and
//! from the control stream as a fallback), validates each with its own
//! [`Validator`], and hands valid ones to [`Ingest`]. It acknowledges the
//! highest accepted sequence every `ack_interval`, listing rejections with
//! their reasons.
//!
//! Whatever a client sends, the worst outcome is that *its* connection is
//! closed with an error code and reason: never a panic, never another
//! client's state.

use std::{sync::Arc, time::Duration};

use dashmap::DashMap;
use futures_util::{SinkExt, StreamExt};
use hexfleet_model::{VehicleClass, VehicleId, VehicleStatus};
use hexfleet_protocol::{
    decode_datagram, Ack, Claims, ClientMsg, DriverReport, ErrorCode, ErrorFrame, Fix, FrameCodec,
    FrameError, Limits as WireLimits, RejectReason, Rejection, Role, ServerMsg, Welcome,
    GOODBYE_CLOSE_CODE, MAX_FRAME_LEN, MAX_REJECTIONS_PER_ACK, PROTOCOL_VERSION,
};
use tokio_util::{
    codec::{FramedRead, FramedWrite},
    sync::CancellationToken,
};

use crate::{
    clock,
    ingest::Ingest,
    validate::{LastFix, Limits, Validator},
};

type ControlRead = FramedRead<quinn::RecvStream, FrameCodec<ClientMsg, ServerMsg>>;
type ControlWrite = FramedWrite<quinn::SendStream, FrameCodec<ClientMsg, ServerMsg>>;

/// What every session of a node shares.
pub struct Context {
    pub node_id: String,
    pub ingest: Arc<Ingest>,
    pub token_secret: Vec<u8>,
    pub limits: Limits,
    pub ack_interval: Duration,
    pub handshake_timeout: Duration,
    /// The live session of each driver. A driver that connects again closes
    /// its older connection, so one vehicle never has two writers.
    drivers: DashMap<VehicleId, (u64, CancellationToken)>,
}

impl Context {
    pub fn new(
        node_id: String,
        ingest: Arc<Ingest>,
        token_secret: Vec<u8>,
        limits: Limits,
        ack_interval: Duration,
        handshake_timeout: Duration,
    ) -> Self {
        Self {
            node_id,
            ingest,
            token_secret,
            limits,
            ack_interval,
            handshake_timeout,
            drivers: DashMap::new(),
        }
    }
}

/// Why a session ends early, and what the client is told.
#[derive(Debug)]
struct Refusal {
    code: ErrorCode,
    reason: String,
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

/// Decrements the open-connections gauge however the session ends.
struct OpenConnection<'a>(&'a prometheus_client::metrics::gauge::Gauge);

impl Drop for OpenConnection<'_> {
    fn drop(&mut self) {
        self.0.dec();
    }
}

/// Serves one incoming connection to its end.
pub async fn serve(incoming: quinn::Incoming, ctx: Arc<Context>, shutdown: CancellationToken) {
    let metrics = ctx.ingest.metrics.clone();
    let conn = match tokio::time::timeout(ctx.handshake_timeout, incoming).await {
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
    metrics.connections.inc();
    metrics.connections_accepted.inc();
    let _open = OpenConnection(&metrics.connections);

    let (mut tx, mut rx) = match tokio::time::timeout(ctx.handshake_timeout, conn.accept_bi()).await
    {
        Ok(Ok((send, recv))) => (
            FramedWrite::new(send, FrameCodec::default()),
            FramedRead::new(recv, FrameCodec::default()),
        ),
        Ok(Err(_)) => return,
        Err(_) => {
            close(
                &conn,
                None,
                Refusal::new(ErrorCode::ProtocolViolation, "no control stream"),
                &ctx,
            )
            .await;
            return;
        }
    };
    let driver = match tokio::time::timeout(ctx.handshake_timeout, handshake(&mut rx, &ctx)).await {
        Ok(Ok(driver)) => driver,
        Ok(Err(refusal)) => {
            close(&conn, Some(&mut tx), refusal, &ctx).await;
            return;
        }
        Err(_) => {
            close(
                &conn,
                Some(&mut tx),
                Refusal::new(ErrorCode::ProtocolViolation, "no Hello in time"),
                &ctx,
            )
            .await;
            return;
        }
    };
    DriverSession::start(conn, tx, rx, ctx, driver)
        .run(shutdown)
        .await;
}

/// Reads and checks `Hello`; returns the authenticated driver.
async fn handshake(rx: &mut ControlRead, ctx: &Context) -> Result<VehicleId, Refusal> {
    let hello = match rx.next().await {
        Some(Ok(ClientMsg::Hello(hello))) => hello,
        Some(Ok(_)) => {
            return Err(Refusal::new(
                ErrorCode::ProtocolViolation,
                "the first message must be Hello",
            ))
        }
        Some(Err(e)) => return Err(Refusal::protocol(e)),
        None => {
            return Err(Refusal::new(
                ErrorCode::ProtocolViolation,
                "control stream closed before Hello",
            ))
        }
    };
    if hello.version != PROTOCOL_VERSION {
        return Err(Refusal::new(
            ErrorCode::UnsupportedVersion,
            format!(
                "protocol version {} is not supported; this node speaks {PROTOCOL_VERSION}",
                hello.version
            ),
        ));
    }
    let claims = Claims::verify_for(&hello.token, hello.role, &ctx.token_secret, clock::now_s())
        .map_err(|e| Refusal::new(ErrorCode::Unauthorized, e.to_string()))?;
    match claims.role {
        Role::Driver => Ok(claims.subject),
        role => Err(Refusal::new(
            ErrorCode::BadRequest,
            format!(
                "{} sessions are not served by this node version",
                role.as_str()
            ),
        )),
    }
}

const ERROR_FRAME_GRACE: Duration = Duration::from_millis(250);

/// Tells the client why, counts it, and closes the connection.
async fn close(
    conn: &quinn::Connection,
    tx: Option<&mut ControlWrite>,
    refusal: Refusal,
    ctx: &Context,
) {
    ctx.ingest.metrics.refused(refusal.code).inc();
    tracing::debug!(code = refusal.code.as_str(), reason = %refusal.reason, "closing session");
    if let Some(tx) = tx {
        let frame = ServerMsg::Error(ErrorFrame {
            code: refusal.code,
            reason: refusal.reason.clone(),
        });
        // Give the frame a moment to arrive before the close discards it;
        // the peer reading it, or going away, ends the wait early.
        let _ = tokio::time::timeout(ERROR_FRAME_GRACE, async {
            if tx.send(frame).await.is_ok() {
                let _ = tx.get_mut().finish();
                let _ = tx.get_mut().stopped().await;
            }
        })
        .await;
    }
    // The reason travels in the CONNECTION_CLOSE too, in case the frame does not.
    let mut reason = refusal.reason.into_bytes();
    reason.truncate(512);
    conn.close(refusal.code.close_code().into(), &reason);
}

struct DriverSession {
    conn: quinn::Connection,
    tx: ControlWrite,
    rx: ControlRead,
    ctx: Arc<Context>,
    id: VehicleId,
    generation: u64,
    superseded: CancellationToken,
    validator: Validator,
    report: DriverReport,
    /// Highest accepted sequence, and the highest already acknowledged.
    acked_seq: u64,
    ack_sent: u64,
    rejections: Vec<Rejection>,
    rejected_total: u64,
    rejected_unsent: bool,
}

impl DriverSession {
    fn start(
        conn: quinn::Connection,
        tx: ControlWrite,
        rx: ControlRead,
        ctx: Arc<Context>,
        id: VehicleId,
    ) -> Self {
        // Continue from what the node already holds for this driver.
        let previous = ctx.ingest.table.get(&id);
        let last = previous.as_ref().map(|e| LastFix {
            seq: e.state.seq,
            fix_time_ms: e.state.fix_time_ms,
            position: e.state.position(),
        });
        let report = previous.as_ref().map_or(
            DriverReport {
                class: VehicleClass::Economy,
                status: VehicleStatus::Available,
            },
            |e| DriverReport {
                class: e.state.class,
                status: e.state.status,
            },
        );
        let generation = conn.stable_id() as u64;
        let superseded = CancellationToken::new();
        if let Some((_, older)) = ctx
            .drivers
            .insert(id.clone(), (generation, superseded.clone()))
        {
            older.cancel();
        }
        Self {
            validator: Validator::new(ctx.limits, last),
            acked_seq: last.map_or(0, |l| l.seq),
            ack_sent: last.map_or(0, |l| l.seq),
            conn,
            tx,
            rx,
            ctx,
            id,
            generation,
            superseded,
            report,
            rejections: Vec::new(),
            rejected_total: 0,
            rejected_unsent: false,
        }
    }

    async fn run(mut self, shutdown: CancellationToken) {
        let outcome = self.serve(&shutdown).await;
        // Forget our registration, unless a newer session already replaced it.
        self.ctx.drivers.remove_if(&self.id, |_, (generation, _)| {
            *generation == self.generation
        });
        if let Err(refusal) = outcome {
            close(&self.conn, Some(&mut self.tx), refusal, &self.ctx).await;
        }
    }

    async fn serve(&mut self, shutdown: &CancellationToken) -> Result<(), Refusal> {
        let datagrams = self.conn.max_datagram_size().is_some();
        let welcome = ServerMsg::Welcome(Welcome {
            node: self.ctx.node_id.clone(),
            version: PROTOCOL_VERSION,
            resume_seq: self.acked_seq,
            limits: WireLimits {
                max_frame_len: MAX_FRAME_LEN as u32,
                datagrams,
                ack_interval_ms: self.ctx.ack_interval.as_millis() as u32,
            },
        });
        self.send(welcome).await?;
        let mut ack_tick = tokio::time::interval(self.ctx.ack_interval);
        ack_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                datagram = self.conn.read_datagram() => match datagram {
                    Ok(bytes) => self.on_datagram(&bytes),
                    // The connection is gone (closed by the peer, timed out).
                    Err(_) => return Ok(()),
                },
                frame = self.rx.next() => match frame {
                    Some(Ok(ClientMsg::Fix(fix))) => self.on_fix(&fix),
                    Some(Ok(ClientMsg::Driver(report))) => {
                        self.report = report;
                        self.ctx.ingest.report(&self.id, report, clock::now_ms());
                    }
                    Some(Ok(ClientMsg::Goodbye)) => {
                        self.ctx.ingest.sign_off(&self.id);
                        self.conn.close(GOODBYE_CLOSE_CODE.into(), b"goodbye");
                        return Ok(());
                    }
                    Some(Ok(ClientMsg::Hello(_))) => {
                        return Err(Refusal::new(ErrorCode::ProtocolViolation, "Hello sent twice"));
                    }
                    Some(Err(e)) => return Err(Refusal::protocol(e)),
                    None => return Ok(()),
                },
                _ = ack_tick.tick() => self.send_ack().await?,
                _ = self.superseded.cancelled() => {
                    return Err(Refusal::new(ErrorCode::Superseded, "the driver connected again"));
                }
                _ = shutdown.cancelled() => {
                    self.send_ack().await?;
                    return Err(Refusal::new(ErrorCode::ShuttingDown, "the node is shutting down"));
                }
            }
        }
    }

    fn on_datagram(&mut self, bytes: &[u8]) {
        match decode_datagram::<Fix>(bytes) {
            Ok(fix) => self.on_fix(&fix),
            Err(_) => self.reject(0, RejectReason::Malformed),
        }
    }

    fn on_fix(&mut self, fix: &Fix) {
        let now = clock::now_ms();
        match self.validator.check(fix, now) {
            Ok(valid) => {
                self.ctx.ingest.accept(&self.id, &valid, self.report, now);
                self.acked_seq = valid.fix.seq;
            }
            Err(reason) => self.reject(fix.seq, reason),
        }
    }

    fn reject(&mut self, seq: u64, reason: RejectReason) {
        self.ctx.ingest.metrics.rejected(reason).inc();
        self.rejected_total += 1;
        self.rejected_unsent = true;
        if self.rejections.len() < MAX_REJECTIONS_PER_ACK {
            self.rejections.push(Rejection { seq, reason });
        }
    }

    /// Sends an `Ack` when something happened since the last one.
    async fn send_ack(&mut self) -> Result<(), Refusal> {
        if !self.rejected_unsent && self.acked_seq == self.ack_sent {
            return Ok(());
        }
        let ack = ServerMsg::Ack(Ack {
            seq: self.acked_seq,
            rejected: std::mem::take(&mut self.rejections),
            rejected_total: self.rejected_total,
        });
        self.rejected_unsent = false;
        self.ack_sent = self.acked_seq;
        self.send(ack).await
    }

    async fn send(&mut self, msg: ServerMsg) -> Result<(), Refusal> {
        self.tx.send(msg).await.map_err(|e| {
            Refusal::new(
                ErrorCode::Internal,
                format!("writing to the control stream: {e}"),
            )
        })
    }
}
