//! A rider session: subscriptions come in on the control stream; the view's
//! snapshot and deltas go out, in order, on one stream the node opens.
//!
//! The session's writer drains the rider's [`Mailbox`] whenever it is free
//! to write, so a slow rider gets fewer, fuller updates rather than a growing
//! queue. A write that stays blocked for `slow_consumer_after` ends the
//! session with `slow_consumer`.

use std::{collections::HashMap, sync::Arc};

use futures_util::{SinkExt, StreamExt};
use hexfleet_model::{Position, VehicleId};
use hexfleet_protocol::{
    Added, ClientMsg, ErrorCode, FrameCodec, Limits as WireLimits, Moved, Removed, RiderUpdate,
    ServerMsg, Subscribe, SubscribeError, Welcome, GOODBYE_CLOSE_CODE, MAX_FRAME_LEN,
    PROTOCOL_VERSION,
};
use tokio_util::codec::FramedWrite;

use super::{send, Context, ControlRead, ControlWrite, Refusal};
use crate::{
    mailbox::{Change, Drained, Mailbox},
    metrics::{DeltaKind, Metrics},
};

type PushWrite = FramedWrite<quinn::SendStream, FrameCodec<(), RiderUpdate>>;

pub(super) async fn serve(
    conn: &quinn::Connection,
    tx: &mut ControlWrite,
    rx: &mut ControlRead,
    ctx: &Arc<Context>,
) -> Result<(), Refusal> {
    let welcome = ServerMsg::Welcome(Welcome {
        node: ctx.node_id.clone(),
        version: PROTOCOL_VERSION,
        resume_seq: 0,
        limits: WireLimits {
            max_frame_len: MAX_FRAME_LEN as u32,
            datagrams: false,
            ack_interval_ms: 0,
        },
    });
    send(tx, welcome).await?;
    let push = conn
        .open_uni()
        .await
        .map_err(|e| Refusal::new(ErrorCode::Internal, format!("opening the push stream: {e}")))?;
    let id = ctx.fanout.new_subscriber_id();
    let mailbox = Arc::new(Mailbox::new());
    let mut writer = PushWriter {
        push: FramedWrite::with_capacity(push, FrameCodec::default(), 0),
        aliases: HashMap::new(),
        free: Vec::new(),
        next: 0,
        metrics: &ctx.ingest.metrics,
    };
    // A stream is invisible to the peer until something is sent on it: an
    // empty update (subscription 0) announces it.
    if writer.send(RiderUpdate::default()).await.is_err() {
        return Ok(());
    }
    let mut subscribed = false;
    let outcome = loop {
        tokio::select! {
            frame = rx.next() => match frame {
                Some(Ok(ClientMsg::Subscribe(s))) => match neighbourhood(&s, ctx) {
                    Ok(cells) => {
                        ctx.fanout.subscribe(id, cells, s.filter, s.id, mailbox.clone());
                        subscribed = true;
                    }
                    Err(reason) => {
                        let refused = SubscribeError { id: s.id, code: ErrorCode::BadRequest, reason };
                        if let Err(e) = send(tx, ServerMsg::SubscribeError(refused)).await {
                            break Err(e);
                        }
                    }
                },
                Some(Ok(ClientMsg::Goodbye)) => {
                    conn.close(GOODBYE_CLOSE_CODE.into(), b"goodbye");
                    break Ok(());
                }
                Some(Ok(_)) => break Err(Refusal::new(ErrorCode::ProtocolViolation, "riders may only Subscribe or say Goodbye")),
                Some(Err(e)) => break Err(Refusal::protocol(e)),
                None => break Ok(()),
            },
            _ = mailbox.ready() => {
                if let Some(drained) = mailbox.take() {
                    let written = tokio::time::timeout(ctx.slow_consumer_after, writer.write(drained)).await;
                    match written {
                        Ok(Ok(())) => {}
                        // The connection is gone; nobody to tell.
                        Ok(Err(_)) => break Ok(()),
                        Err(_) => break Err(Refusal::new(
                            ErrorCode::SlowConsumer,
                            format!("updates blocked for more than {:?}", ctx.slow_consumer_after),
                        )),
                    }
                }
            }
            _ = conn.closed() => break Ok(()),
            _ = ctx.shutdown.cancelled() => break Err(Refusal::new(ErrorCode::ShuttingDown, "the node is shutting down")),
        }
    };
    if subscribed {
        ctx.fanout.unsubscribe(id);
    }
    outcome
}

/// Checks a subscription and returns the cells it watches.
fn neighbourhood(s: &Subscribe, ctx: &Context) -> Result<Vec<h3o::CellIndex>, String> {
    let center = Position::new(s.lat, s.lon).map_err(|e| e.to_string())?;
    let max = ctx.max_subscribe_radius_m;
    if !(s.radius_m.is_finite() && s.radius_m > 0.0 && s.radius_m <= max) {
        return Err(format!(
            "radius_m must be in (0, {max}], not {}",
            s.radius_m
        ));
    }
    Ok(ctx.ingest.cells.neighbourhood(center, s.radius_m))
}

/// Encodes drained changes as updates: aliases for vehicles already shown,
/// fixed-point records for moves, frames under the size limit.
struct PushWriter<'a> {
    push: PushWrite,
    aliases: HashMap<VehicleId, u32>,
    free: Vec<u32>,
    next: u32,
    metrics: &'a Metrics,
}

/// Rough encoded sizes, to cut frames well under `MAX_FRAME_LEN`.
const ADDED_COST: usize = 128;
const REMOVED_COST: usize = 8;
const FRAME_BUDGET: usize = MAX_FRAME_LEN * 3 / 4;

impl PushWriter<'_> {
    fn alias(&mut self, id: &VehicleId) -> u32 {
        if let Some(&a) = self.aliases.get(id) {
            return a;
        }
        let a = self.free.pop().unwrap_or_else(|| {
            self.next += 1;
            self.next
        });
        self.aliases.insert(id.clone(), a);
        a
    }

    async fn write(&mut self, drained: Drained) -> Result<(), hexfleet_protocol::FrameError> {
        if drained.reset {
            self.aliases.clear();
            self.free.clear();
            self.next = 0;
        }
        let fresh = |snapshot| RiderUpdate {
            subscription: drained.version,
            snapshot,
            ..RiderUpdate::default()
        };
        let mut frame = fresh(drained.reset);
        let mut cost = 0;
        let mut sent = false;
        for (id, change) in drained.changes {
            match change {
                Change::Removed(reason) => {
                    // A vehicle the rider never saw needs no removal.
                    let Some(alias) = self.aliases.remove(&id) else {
                        continue;
                    };
                    self.free.push(alias);
                    frame.removed.push(Removed { alias, reason });
                    cost += REMOVED_COST;
                    self.metrics.delta_items(DeltaKind::Removed).inc();
                }
                Change::Moved(state) if self.aliases.contains_key(&id) => {
                    self.delay(&state);
                    let alias = self.alias(&id);
                    Moved::new(
                        alias,
                        state.lat,
                        state.lon,
                        state.heading_deg,
                        state.speed_mps,
                    )
                    .pack(&mut frame.moved);
                    cost += Moved::LEN;
                    self.metrics.delta_items(DeltaKind::Moved).inc();
                }
                Change::Moved(state) | Change::Upsert(state) => {
                    self.delay(&state);
                    let alias = self.alias(&id);
                    frame.added.push(Added { alias, state });
                    cost += ADDED_COST;
                    self.metrics.delta_items(DeltaKind::Added).inc();
                }
            }
            if cost >= FRAME_BUDGET {
                let full = std::mem::replace(&mut frame, fresh(false));
                self.send(full).await?;
                (cost, sent) = (0, true);
            }
        }
        // Always say something: a reset or a new version with no changes
        // still tells the rider where its view stands.
        if cost > 0 || !sent {
            self.send(frame).await?;
        }
        Ok(())
    }

    /// How long this state waited between reaching the node and leaving it.
    fn delay(&self, state: &hexfleet_model::VehicleState) {
        let waited_ms = crate::clock::now_ms().saturating_sub(state.seen_ms).max(0);
        self.metrics
            .delta_delay_seconds
            .observe(waited_ms as f64 / 1e3);
    }

    async fn send(&mut self, frame: RiderUpdate) -> Result<(), hexfleet_protocol::FrameError> {
        self.push.send(frame).await?;
        self.metrics.delta_frames.inc();
        Ok(())
    }
}
