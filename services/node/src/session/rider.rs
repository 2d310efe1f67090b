//! A rider session: subscriptions come in on the control stream; the view's
//! snapshot and deltas go out, in order, on one stream the node opens.
//!
//! The session's writer drains the rider's [`Mailbox`] whenever it is free
//! to write, so a slow rider gets fewer, fuller updates rather than a growing
//! queue; a busy one lingers two milliseconds first, so its frames fill. A write that stays blocked for `slow_consumer_after` ends the
//! session with `slow_consumer`.
//!
//! Subscriptions are held to the connection's [`RequestBudget`], and a
//! subscription change waiting for the fan-out is replaced by a newer one,
//! so a flood of them costs the node a bounded amount.

use std::{
    collections::HashMap,
    sync::Arc,
    time::{Duration, Instant},
};

use futures_util::{stream, StreamExt};
use hexfleet_model::{Position, VehicleId};
use hexfleet_protocol::{
    encoded_len, Added, ClientMsg, ErrorCode, FrameError, Limits as WireLimits, Moved, Redirect,
    Removed, RiderUpdate, Role, ServerMsg, Subscribe, SubscribeError, Welcome, MAX_FRAME_LEN,
    PROTOCOL_VERSION,
};

use super::{
    common_sources, lost, send,
    transport::{CloseAs, ControlRead, ControlWrite, Peer, PushWrite},
    Context, Expiry, Goodbye, Outcome, Refusal, Source, Stop,
};
use crate::{
    budget::{RequestBudget, Verdict},
    fanout::SubscriberId,
    mailbox::{frames, Delta, Drained, Mailbox},
    metrics::{DeltaKind, Metrics},
};

/// A writer that wrote less than this long ago is busy...
const BUSY_WITHIN: Duration = Duration::from_millis(5);
/// ...and lingers this long before its next update, so that update carries
/// the changes of that time too: under load, fuller frames and fewer
/// packets; an idle rider's update goes out at once.
const LINGER: Duration = Duration::from_millis(2);

/// What wakes a rider session.
enum Event {
    Control(Result<ClientMsg, Stop>),
    /// The mailbox has something.
    Ready,
    Expired(Refusal),
    Closed,
    ShuttingDown,
}

/// Everything a rider session waits for (see [`common_sources`]): a delta
/// does not re-poll the control stream or the cancellation futures.
fn events<'s>(
    conn: &'s Peer,
    rx: &'s mut ControlRead,
    mailbox: &Arc<Mailbox>,
    expiry: Expiry,
    ctx: &Context,
) -> stream::SelectAll<Source<'s, Event>> {
    let mut sources = common_sources(
        rx,
        expiry,
        ctx,
        Event::Control,
        Event::Expired,
        Event::ShuttingDown,
    );
    sources.push(Box::pin(stream::unfold(mailbox.clone(), |m| async move {
        m.ready().await;
        Some((Event::Ready, m))
    })));
    sources.push(Box::pin(stream::once(conn.closed()).map(|_| Event::Closed)));
    stream::select_all(sources)
}

pub(super) async fn serve(
    conn: &Peer,
    tx: &mut ControlWrite,
    rx: &mut ControlRead,
    ctx: &Arc<Context>,
    expiry: Expiry,
    unreachable: &[String],
) -> Outcome {
    let welcome = ServerMsg::Welcome(Welcome {
        node: ctx.node_id.clone(),
        version: PROTOCOL_VERSION,
        resume_seq: 0,
        limits: WireLimits {
            max_frame_len: MAX_FRAME_LEN as u32,
            datagrams: false,
            ack_interval_ms: 0,
        },
        node_time_ms: crate::clock::now_ms(),
    });
    send(tx, welcome, ctx).await?;
    // Only a connection that is gone refuses a stream the node may open.
    let push = conn.open_push().await.ok_or(Stop::Lost)?;
    let id = ctx.fanout.new_subscriber_id();
    let mailbox = Arc::new(Mailbox::new());
    let mut writer = PushWriter {
        push,
        aliases: HashMap::new(),
        free: Vec::new(),
        next: 0,
        metrics: &ctx.ingest.metrics,
    };
    // A stream is invisible to the peer until something is sent on it: an
    // empty update (subscription 0) announces it.
    if writer.send(RiderUpdate::default()).await.is_err() {
        return Err(Stop::Lost);
    }
    let mut subscribed = false;
    let mut budget = RequestBudget::new(&ctx.rider_requests, Instant::now());
    let mut events = events(conn, rx, &mailbox, expiry, ctx);
    let mut last_write: Option<Instant> = None;
    let outcome = loop {
        let Some(event) = events.next().await else {
            break Err(Stop::Lost);
        };
        match event {
            Event::Expired(refusal) => break Err(refusal.into()),
            Event::Control(msg) => match msg {
                Ok(ClientMsg::Subscribe(s)) => {
                    let first = (!subscribed).then_some(unreachable);
                    match subscribe(s, first, id, &mailbox, &mut budget, tx, ctx).await {
                        Ok(taken) => subscribed |= taken,
                        Err(stop) => break Err(stop),
                    }
                }
                Ok(ClientMsg::Goodbye) => {
                    conn.close(CloseAs::Goodbye, "goodbye").await;
                    break Ok(Goodbye);
                }
                Ok(_) => {
                    break Err(Refusal::new(
                        ErrorCode::ProtocolViolation,
                        "riders may only Subscribe or say Goodbye",
                    )
                    .into())
                }
                Err(stop) => break Err(stop),
            },
            Event::Ready => {
                // Busy (the last update went out a moment ago): linger so
                // this one carries more items. Idle: write at once.
                if last_write.is_some_and(|at| at.elapsed() < BUSY_WITHIN) {
                    tokio::time::sleep(LINGER).await;
                }
                if let Some(drained) = mailbox.take() {
                    ctx.ingest
                        .metrics
                        .mailbox_depth
                        .observe(drained.changes.len() as f64);
                    let written = crate::clock::timeout_if_blocked(
                        ctx.slow_consumer_after,
                        writer.write(drained),
                    )
                    .await;
                    last_write = Some(Instant::now());
                    match written {
                        Ok(Ok(())) => {}
                        Ok(Err(e)) if lost(&e) => break Err(Stop::Lost),
                        Ok(Err(e)) => {
                            break Err(Refusal::new(
                                ErrorCode::Internal,
                                format!("an update could not be sent: {e}"),
                            )
                            .into())
                        }
                        Err(_) => {
                            break Err(Refusal::new(
                                ErrorCode::SlowConsumer,
                                format!(
                                    "updates blocked for more than {:?}",
                                    ctx.slow_consumer_after
                                ),
                            )
                            .into())
                        }
                    }
                }
            }
            Event::Closed => break Err(Stop::Lost),
            Event::ShuttingDown => {
                break Err(
                    Refusal::new(ErrorCode::ShuttingDown, "the node is shutting down").into(),
                )
            }
        }
    };
    if subscribed {
        ctx.fanout.unsubscribe(id);
    }
    outcome
}

/// Handles one `Subscribe`. Within the connection's budget the fan-out takes
/// it (replacing one of this rider's still waiting); over budget it is
/// refused, and a connection that keeps going over is closed. Returns
/// whether the fan-out took it.
/// `first`: the rider's first look, and the nodes its client said it
/// cannot reach (it may be redirected, but not there).
async fn subscribe(
    s: Subscribe,
    first: Option<&[String]>,
    id: SubscriberId,
    mailbox: &Arc<Mailbox>,
    budget: &mut RequestBudget,
    tx: &mut ControlWrite,
    ctx: &Context,
) -> Result<bool, Stop> {
    let limits = &ctx.rider_requests;
    match budget.spend(Instant::now()) {
        Verdict::Allow => {}
        Verdict::Refuse => {
            ctx.ingest.metrics.rate_limited(Role::Rider).inc();
            let reason = limits.refusal("subscriptions");
            refuse(tx, ctx, s.id, ErrorCode::RateLimited, reason).await?;
            return Ok(false);
        }
        Verdict::Close => {
            ctx.ingest.metrics.rate_limited(Role::Rider).inc();
            let reason = limits.closing("subscriptions");
            return Err(Refusal::new(ErrorCode::RateLimited, reason).into());
        }
    }
    // A rider's first look decides where it is served best: on the node
    // that owns the shard it looks at. Any node would show it the same
    // view, through replicas; on the owner, the rider's own shard needs
    // none, and each node replicates only the shards along its edges.
    if let Some(unreachable) = first {
        if let Some(redirect) = redirect_for(&s, ctx, unreachable) {
            return Err(Stop::Redirected(redirect));
        }
    }
    match neighbourhood(&s, ctx) {
        Ok(cells) => {
            ctx.fanout
                .subscribe(id, cells, s.filter, s.id, mailbox.clone());
            Ok(true)
        }
        Err(reason) => {
            refuse(tx, ctx, s.id, ErrorCode::BadRequest, reason).await?;
            Ok(false)
        }
    }
}

/// Refuses one subscription; the connection and any previous subscription
/// stay as they were.
async fn refuse(
    tx: &mut ControlWrite,
    ctx: &Context,
    id: u32,
    code: ErrorCode,
    reason: String,
) -> Result<(), Stop> {
    let refused = SubscribeError { id, code, reason };
    send(tx, ServerMsg::SubscribeError(refused), ctx).await
}

/// Where a rider looking at `s` belongs, if not here: the owner of its
/// shard, unless its client cannot reach it (the peers' probes say so, or
/// the client did). Then it stays: any node shows the same view.
fn redirect_for(s: &Subscribe, ctx: &Context, unreachable: &[String]) -> Option<Redirect> {
    let cluster = ctx.cluster.as_ref()?;
    let center = Position::new(s.lat, s.lon).ok()?;
    let shard = ctx.ingest.locate(center).shard;
    let redirect = cluster.redirect_for(shard)?;
    cluster
        .may_redirect_to(&redirect.addr, unreachable)
        .then_some(redirect)
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

/// Room for items in one update: the frame limit less the update's own
/// fields. Items are counted at their exact encoded size, so an update of
/// any size (thousands of removals, a mass sign-off, a huge snapshot) is cut
/// into frames that all fit.
const FRAME_BUDGET: usize = MAX_FRAME_LEN - RiderUpdate::ENVELOPE_MAX;

/// One delta item on its way into an update.
enum Item {
    Removed(Removed),
    Moved(Moved),
    Added(Added),
}

impl Item {
    fn encoded_len(&self) -> Result<usize, FrameError> {
        match self {
            Item::Removed(r) => encoded_len(r),
            Item::Moved(_) => Ok(Moved::LEN),
            Item::Added(a) => encoded_len(a),
        }
    }

    fn add_to(self, frame: &mut RiderUpdate, metrics: &Metrics) {
        let kind = match self {
            Item::Removed(r) => {
                frame.removed.push(r);
                DeltaKind::Removed
            }
            Item::Moved(m) => {
                m.pack(&mut frame.moved);
                DeltaKind::Moved
            }
            Item::Added(a) => {
                frame.added.push(a);
                DeltaKind::Added
            }
        };
        metrics.delta_items(kind).inc();
    }
}

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

    async fn write(&mut self, drained: Drained) -> Result<(), FrameError> {
        if drained.reset {
            self.aliases.clear();
            self.free.clear();
            self.next = 0;
        }
        let mut items = Vec::with_capacity(drained.changes.len());
        for (id, change) in drained.changes {
            let shown = self.aliases.contains_key(&id);
            let Some(item) = Delta::of(id, change, shown).and_then(|d| self.item(d)) else {
                continue;
            };
            let cost = item.encoded_len()?;
            items.push((item, cost));
        }
        for (i, items) in frames(items, FRAME_BUDGET).into_iter().enumerate() {
            let mut frame = RiderUpdate {
                subscription: drained.version,
                snapshot: drained.reset && i == 0,
                ..RiderUpdate::default()
            };
            for item in items {
                item.add_to(&mut frame, self.metrics);
            }
            self.send(frame).await?;
        }
        Ok(())
    }

    /// The wire item for a delta, keeping the aliases: a vehicle gets one
    /// when first shown and gives it back when removed (a vehicle without
    /// one was never shown, and needs no removal).
    fn item(&mut self, delta: Delta) -> Option<Item> {
        Some(match delta {
            Delta::Removed(id, reason) => {
                let alias = self.aliases.remove(&id)?;
                self.free.push(alias);
                Item::Removed(Removed { alias, reason })
            }
            Delta::Moved(id, state) => {
                self.delay(&state);
                let alias = self.alias(&id);
                Item::Moved(Moved::new(
                    alias,
                    state.lat,
                    state.lon,
                    state.heading_deg,
                    state.speed_mps,
                ))
            }
            Delta::Added(id, state) => {
                self.delay(&state);
                let alias = self.alias(&id);
                Item::Added(Added { alias, state })
            }
        })
    }

    /// How long this state waited between reaching the node and leaving it.
    fn delay(&self, state: &hexfleet_model::VehicleState) {
        let waited_ms = crate::clock::now_ms().saturating_sub(state.seen_ms).max(0);
        self.metrics
            .delta_delay_seconds
            .observe(waited_ms as f64 / 1e3);
    }

    async fn send(&mut self, frame: RiderUpdate) -> Result<(), FrameError> {
        self.push.send(frame).await?;
        self.metrics.delta_frames.inc();
        Ok(())
    }
}
