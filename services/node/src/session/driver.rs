//! A driver session: reads fixes from datagrams (and from the control stream
//! as a fallback), validates each with its own [`Validator`], and hands valid
//! ones to [`Ingest`](crate::ingest::Ingest). Every `ack_interval` it
//! acknowledges the highest accepted sequence and lists rejections with their
//! reasons.
//!
//! A driver that disconnects without `Goodbye` stays visible for
//! `offline_grace`, in case it comes back (phones lose signal); then its
//! vehicle goes offline.

use std::sync::Arc;

use hexfleet_model::{VehicleClass, VehicleId, VehicleStatus};
use hexfleet_protocol::{
    decode_datagram, Ack, ClientMsg, DriverReport, ErrorCode, Fix, Limits as WireLimits,
    RejectReason, Rejection, RemoveReason, ServerMsg, Welcome, GOODBYE_CLOSE_CODE, MAX_FRAME_LEN,
    MAX_REJECTIONS_PER_ACK, PROTOCOL_VERSION,
};
use tokio_util::sync::CancellationToken;

use super::{
    next_message, send, Context, ControlRead, ControlWrite, Goodbye, Outcome, Refusal, Stop,
    ERROR_FRAME_GRACE,
};
use crate::{
    clock,
    validate::{LastFix, Validator},
};

pub(super) async fn serve(
    conn: &quinn::Connection,
    tx: &mut ControlWrite,
    rx: &mut ControlRead,
    ctx: &Arc<Context>,
    id: VehicleId,
) -> Outcome {
    let mut session = DriverSession::start(conn, ctx, id);
    let outcome = session.run(tx, rx).await;
    let id = session.id;
    // Forget our registration, unless a newer session already replaced it.
    let replaced = ctx
        .drivers
        .remove_if(&id, |_, (generation, _)| *generation == session.generation)
        .is_none();
    let lost = outcome.is_err();
    if lost && !replaced && !ctx.shutdown.is_cancelled() {
        let ctx = ctx.clone();
        tokio::spawn(async move {
            tokio::select! {
                _ = tokio::time::sleep(ctx.offline_grace) => {}
                _ = ctx.shutdown.cancelled() => return,
            }
            if !ctx.drivers.contains_key(&id) {
                ctx.ingest.sign_off(&id, RemoveReason::Offline);
            }
        });
    }
    outcome
}

struct DriverSession<'a> {
    conn: &'a quinn::Connection,
    ctx: &'a Context,
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

impl<'a> DriverSession<'a> {
    fn start(conn: &'a quinn::Connection, ctx: &'a Context, id: VehicleId) -> Self {
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
        let seq = last.map_or(0, |l| l.seq);
        Self {
            validator: Validator::new(ctx.limits, last),
            acked_seq: seq,
            ack_sent: seq,
            conn,
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

    async fn run(&mut self, tx: &mut ControlWrite, rx: &mut ControlRead) -> Outcome {
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
        send(tx, welcome, self.ctx).await?;
        let mut ack_tick = tokio::time::interval(self.ctx.ack_interval);
        ack_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let shutdown = self.ctx.shutdown.clone();
        loop {
            tokio::select! {
                datagram = self.conn.read_datagram() => match datagram {
                    Ok(bytes) => self.on_datagram(&bytes),
                    // The connection is gone (closed by the peer, timed out).
                    Err(_) => return Err(Stop::Lost),
                },
                msg = next_message(rx) => match msg? {
                    ClientMsg::Fix(fix) => self.on_fix(&fix),
                    ClientMsg::Driver(report) => {
                        self.report = report;
                        self.ctx.ingest.report(&self.id, report, clock::now_ms());
                    }
                    ClientMsg::Goodbye => {
                        self.ctx.ingest.sign_off(&self.id, RemoveReason::Offline);
                        self.conn.close(GOODBYE_CLOSE_CODE.into(), b"goodbye");
                        return Ok(Goodbye);
                    }
                    ClientMsg::Hello(_) => {
                        return Err(Refusal::new(ErrorCode::ProtocolViolation, "Hello sent twice").into());
                    }
                    ClientMsg::Subscribe(_) => {
                        return Err(Refusal::new(ErrorCode::ProtocolViolation, "drivers do not subscribe").into());
                    }
                },
                _ = ack_tick.tick() => self.send_ack(tx).await?,
                _ = self.superseded.cancelled() => {
                    return Err(Refusal::new(ErrorCode::Superseded, "the driver connected again").into());
                }
                _ = shutdown.cancelled() => {
                    // The last word on what was accepted, if the client reads
                    // it promptly: the node will not wait long to stop.
                    let _ = tokio::time::timeout(ERROR_FRAME_GRACE, self.send_ack(tx)).await;
                    return Err(Refusal::new(ErrorCode::ShuttingDown, "the node is shutting down").into());
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
    async fn send_ack(&mut self, tx: &mut ControlWrite) -> Result<(), Stop> {
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
        send(tx, ack, self.ctx).await
    }
}
