//! A driver session: reads fixes from datagrams (and from the control stream
//! as a fallback), validates each with its own [`Validator`], and hands valid
//! ones to [`Ingest`](crate::ingest::Ingest). It acknowledges the highest
//! sequence accepted *and written to the store* (an `Ack` is a promise that
//! the fix is kept: a node that cannot write, cut from Redis, acknowledges
//! nothing) and lists rejections with their reasons at most once per
//! `ack_interval` (at once when the last `Ack` is older than that; within a
//! second when there are rejections): each `Ack` is a packet the phone must
//! wake for, and acknowledge, while QUIC already acknowledges every
//! datagram.
//!
//! A driver that disconnects without `Goodbye` stays visible for
//! `offline_grace`, in case it comes back (phones lose signal); then its
//! vehicle goes offline, unless it came back through another node
//! meanwhile ([`go_offline`]).
//!
//! In a cluster each accepted fix is routed: a fix in a shard this node owns
//! is taken; a driver that crosses into another node's shard stays here
//! until it is `handoff_distance_m` past where it crossed (its vehicle kept
//! in its shard, a little beyond the edge), then is handed over: its last
//! state is left in the store for the new node, the vehicle goes in transit
//! (riders keep seeing it), and the driver is told `Redirect`. A driver
//! whose first fix lands in another node's shard is redirected at once.

use std::{collections::VecDeque, sync::Arc, time::Instant};

use futures_util::{stream, StreamExt};

use hexfleet_model::{Position, ShardId, VehicleClass, VehicleId, VehicleState, VehicleStatus};
use hexfleet_protocol::{
    decode_datagram, Ack, ClientMsg, ClockReport, DriverReport, ErrorCode, Fix,
    Limits as WireLimits, Redirect, RejectReason, Rejection, RemoveReason, Role, ServerMsg,
    Welcome, MAX_FRAME_LEN, MAX_REJECTIONS_PER_ACK, PROTOCOL_VERSION,
};
use tokio_util::sync::CancellationToken;

use super::{
    common_sources, forward, send,
    transport::{CloseAs, ControlRead, ControlWrite, Peer},
    Context, Expiry, Goodbye, Outcome, Refusal, Source, Stop, ERROR_FRAME_GRACE,
};
use crate::{
    budget::{RequestBudget, Verdict},
    clock,
    cluster::Cluster,
    ingest::{Handing, Placed},
    store::{writer::Ticket, Version},
    validate::{LastFix, ValidFix, Validator},
};

/// Rejections are reported this soon at most, even when the acknowledgement
/// interval is longer: the app learns what is wrong with its fixes while it
/// can still tell its user.
const REJECTIONS_WITHIN: std::time::Duration = std::time::Duration::from_secs(1);

/// How long an `AckNow` waits for the fixes accepted before it to be
/// written; then it is answered with what is.
const ACK_NOW_WAIT: std::time::Duration = std::time::Duration::from_secs(1);

/// Accepted fixes a session remembers while they wait to be written; past
/// this, the oldest is forgotten (a newer one acknowledges it).
const MAX_UNWRITTEN_ACKS: usize = 64;

/// What wakes a driver session.
pub(super) enum Event {
    /// A datagram; `None` once the connection is gone.
    Datagram(Option<bytes::Bytes>),
    Control(Result<ClientMsg, Stop>),
    /// The cluster's ownership may have changed.
    OwnershipChanged,
    Expired(Refusal),
    Superseded,
    ShuttingDown,
}

type Events<'s> = stream::SelectAll<Source<'s, Event>>;

/// What a driver's client brings (see [`common_sources`]): its control
/// messages, datagrams, the token's expiry, the node's shutdown, and a
/// newer session of the same driver. A datagram does not re-poll the
/// control stream, the expiry or the cancellation tokens.
pub(super) fn client_events<'s>(
    conn: &'s Peer,
    rx: &'s mut ControlRead,
    expiry: Expiry,
    ctx: &Context,
    superseded: &CancellationToken,
) -> Vec<Source<'s, Event>> {
    let superseded = superseded.clone().cancelled_owned();
    let mut sources = common_sources(
        rx,
        expiry,
        ctx,
        Event::Control,
        Event::Expired,
        Event::ShuttingDown,
    );
    sources.push(Box::pin(stream::unfold(conn, |conn| async move {
        Some((Event::Datagram(conn.read_datagram().await), conn))
    })));
    sources.push(Box::pin(stream::once(async move {
        superseded.await;
        Event::Superseded
    })));
    sources
}

/// Where an accepted fix goes.
enum Route {
    Here(Placed),
    /// To the node that owns its shard.
    Away(Redirect),
    /// Nowhere for now: the shard is changing hands.
    Unavailable,
}

/// Who said `Hello`, and what it said besides its token.
pub(super) struct Greeted {
    pub id: VehicleId,
    pub token: String,
    /// The nodes' QUIC addresses the client could not reach lately.
    pub unreachable: Vec<String>,
}

pub(super) async fn serve(
    conn: &Peer,
    tx: &mut ControlWrite,
    rx: &mut ControlRead,
    ctx: &Arc<Context>,
    greeted: Greeted,
    expiry: Expiry,
) -> Outcome {
    let Greeted {
        id,
        token,
        unreachable,
    } = greeted;
    // A driver handed over by another node continues from what it left;
    // one whose node died, from its last state written (its zones: an
    // entry is announced once, whichever node holds the vehicle).
    let (inherited, zones, stored_at) = match &ctx.cluster {
        Some(_) if ctx.ingest.table.get(&id).is_none() => {
            let handed = ctx.store.handed_over(&id).await.unwrap_or_else(|e| {
                tracing::warn!(vehicle = %id, error = %e, "reading a handed-over driver's state");
                None
            });
            let stored = ctx.store.vehicle(&id).await.unwrap_or_else(|e| {
                tracing::warn!(vehicle = %id, error = %e, "reading a driver's last state");
                None
            });
            // Where the store holds it: if its first fix here lands in
            // another shard, that copy must go (its holder may have loaded
            // it when its last node died).
            let shard = match &stored {
                Some(_) => ctx
                    .store
                    .locate(std::slice::from_ref(&id))
                    .await
                    .ok()
                    .and_then(|at| at.into_iter().next().flatten()),
                None => None,
            };
            let stored_at = shard.zip(stored.as_ref().map(Version::of));
            // The newer of the two: a hand-over note outlives the hand-over.
            let zones = match (&handed, stored) {
                (Some(h), Some(s)) if s.seq > h.seq => Some(s.zones),
                (Some(h), _) => Some(h.zones.clone()),
                (None, s) => s.map(|s| s.zones),
            };
            (handed, zones, stored_at)
        }
        _ => (None, None, None),
    };
    let mut session = DriverSession::start(conn, ctx, id, inherited);
    session.inherited_zones = zones;
    session.stored_at = stored_at;
    session.unreachable = unreachable;
    let mut outcome = session.run(tx, rx, expiry).await;
    // Its shard's owner is one its client cannot reach: the session goes
    // on there, relayed (see `forward`).
    let relayed = match (&outcome, session.forward_to.take()) {
        (Err(Stop::Redirected(redirect)), Some((via, first))) => {
            let relay = forward::Relay {
                token,
                owner: redirect.clone(),
                reported: session.unreachable.contains(&redirect.addr),
                via,
                report: session.report,
                first,
                superseded: session.superseded.clone(),
                expiry,
            };
            outcome = forward::relay(conn, tx, rx, ctx, &session.id, relay).await;
            true
        }
        _ => false,
    };
    let id = session.id;
    // Forget our registration, unless a newer session already replaced it.
    let replaced = ctx
        .drivers
        .remove_if(&id, |_, (generation, _)| *generation == session.generation)
        .is_none();
    // A relayed driver's vehicle is its owner's, which gives it its grace.
    let lost = !relayed && matches!(outcome, Err(Stop::Lost | Stop::Refused(_)));
    if lost && !replaced && !ctx.shutdown.is_cancelled() {
        let ctx = ctx.clone();
        tokio::spawn(async move {
            tokio::select! {
                _ = tokio::time::sleep(ctx.offline_grace) => {}
                _ = ctx.shutdown.cancelled() => return,
            }
            if !ctx.drivers.contains_key(&id) {
                go_offline(&ctx, &id).await;
            }
        });
    }
    outcome
}

/// A driver silent past its grace goes offline: signed off, out of its
/// zones, removed from riders' views. Unless, in a cluster, it came back
/// through another node meanwhile (it drove into that node's shard, lost
/// signal here, and reconnected there): then the store holds a newer state
/// of it than this node does, and this node lets its copy go as in a
/// hand-off, with no sign-off, no zone exit and no removal, leaving the
/// vehicle to the node that has it (and its locator pointing there).
async fn go_offline(ctx: &Context, id: &VehicleId) {
    let Some(held) = ctx.ingest.table.get(id) else {
        return;
    };
    if ctx.cluster.is_some() {
        let stored = ctx.store.vehicle(id).await;
        if ctx.drivers.contains_key(id) {
            // It came back here while the store was read.
            return;
        }
        match stored {
            Ok(Some(stored))
                if stored.seq > held.state.seq || stored.seen_ms > held.state.seen_ms =>
            {
                tracing::info!(vehicle = %id, "a silent driver came back through another node; letting its vehicle go there");
                // Its copy leaves this node's shard: only this node writes
                // there while it holds the lease (and a write without it is
                // fenced), so the other node's copy is never touched.
                ctx.ingest.hand_off(id, Handing::HeldElsewhere);
                return;
            }
            Ok(_) => {}
            Err(e) => {
                tracing::warn!(vehicle = %id, error = %e, "reading a silent driver's stored state; signing it off")
            }
        }
    }
    ctx.ingest.sign_off(id, RemoveReason::Offline);
}

/// How long a `Goodbye` waits for its removal to be written before the
/// driver is told to say it through another node.
const GOODBYE_WRITE_WAIT: std::time::Duration = std::time::Duration::from_secs(2);
/// How long a driver being handed over waits for its state to be left for
/// the next node.
const HAND_OVER_WAIT: std::time::Duration = std::time::Duration::from_millis(250);
/// How often a waiting `Goodbye` looks whether this node may still write.
const GOODBYE_LOOK_EVERY: std::time::Duration = std::time::Duration::from_millis(50);

struct DriverSession<'a> {
    conn: &'a Peer,
    ctx: &'a Context,
    id: VehicleId,
    generation: u64,
    superseded: CancellationToken,
    validator: Validator,
    report: DriverReport,
    /// The zones the vehicle was in on the node it comes from (or as last
    /// written), for its first fix here.
    inherited_zones: Option<Vec<hexfleet_model::Membership>>,
    /// Where the store held the vehicle when the driver arrived, and that
    /// state's version, until its first fix here is accepted.
    stored_at: Option<(ShardId, Version)>,
    /// Fixes accepted and not yet known to be written: acknowledged only
    /// once they are (an `Ack` is a promise the fix is kept).
    accepted: VecDeque<(u64, ShardId, Ticket)>,
    /// An `AckNow` waiting for what it asked about to be written, and the
    /// latest it is answered.
    ack_now_by: Option<tokio::time::Instant>,
    /// Highest sequence accepted and written, and the highest already
    /// acknowledged.
    acked_seq: u64,
    ack_sent: u64,
    /// When the last `Ack` went out (long ago at the start: the first fix
    /// is acknowledged at once).
    ack_sent_at: tokio::time::Instant,
    rejections: Vec<Rejection>,
    rejected_total: u64,
    rejected_unsent: bool,
    /// This node's correction of the device's clock changed since the
    /// last `Ack` said it (`correction_said`).
    clock_unsent: bool,
    correction_said: i64,
    /// `Clock` reports received.
    clock_reports: u32,
    /// Where the driver crossed into a shard this node does not own, while
    /// it stays here (hand-off hysteresis).
    crossed_at: Option<Position>,
    /// The cluster's ownership changes as of the last check of this
    /// driver's shard.
    ownership_seen: u64,
    /// The connection's fix budget (`ingest.fixes`).
    budget: RequestBudget,
    /// Nodes' client addresses this driver's client said it could not
    /// reach: it is not redirected there.
    unreachable: Vec<String>,
    /// Set when the driver belongs on a node its client cannot reach: where
    /// the peers reach that node, and the fix that found it.
    forward_to: Option<(String, Option<Fix>)>,
}

impl<'a> DriverSession<'a> {
    fn start(
        conn: &'a Peer,
        ctx: &'a Context,
        id: VehicleId,
        inherited: Option<VehicleState>,
    ) -> Self {
        // Continue from what the node already holds for this driver, or
        // what the node that handed it over left.
        let previous = ctx.ingest.table.get(&id).map(|e| e.state).or(inherited);
        let last = previous.as_ref().map(|s| LastFix {
            seq: s.seq,
            fix_time_ms: s.fix_time_ms,
            position: s.position(),
        });
        let report = previous.as_ref().map_or(
            DriverReport {
                class: VehicleClass::Economy,
                status: VehicleStatus::Available,
            },
            |s| DriverReport {
                class: s.class,
                status: s.status,
            },
        );
        let generation = conn.generation();
        let superseded = CancellationToken::new();
        if let Some((_, older)) = ctx
            .drivers
            .insert(id.clone(), (generation, superseded.clone()))
        {
            older.cancel();
        }
        let seq = last.map_or(0, |l| l.seq);
        let mut validator = Validator::new(ctx.limits, last);
        if let Some(state) = &previous {
            validator.assume_offset(state.clock_offset_ms);
        }
        Self {
            validator,
            accepted: VecDeque::new(),
            ack_now_by: None,
            acked_seq: seq,
            ack_sent: seq,
            ack_sent_at: tokio::time::Instant::now()
                .checked_sub(ctx.ack_interval)
                .unwrap_or_else(tokio::time::Instant::now),
            conn,
            ctx,
            id,
            generation,
            superseded,
            report,
            rejections: Vec::new(),
            inherited_zones: None,
            stored_at: None,
            rejected_total: 0,
            rejected_unsent: false,
            clock_unsent: false,
            correction_said: 0,
            clock_reports: 0,
            crossed_at: None,
            ownership_seen: 0,
            budget: RequestBudget::new(&ctx.fix_budget, Instant::now()),
            unreachable: Vec::new(),
            forward_to: None,
        }
    }

    async fn run(
        &mut self,
        tx: &mut ControlWrite,
        rx: &mut ControlRead,
        expiry: Expiry,
    ) -> Outcome {
        let datagrams = self.conn.datagrams();
        let welcome = ServerMsg::Welcome(Welcome {
            node: self.ctx.node_id.clone(),
            version: PROTOCOL_VERSION,
            resume_seq: self.acked_seq,
            limits: WireLimits {
                max_frame_len: MAX_FRAME_LEN as u32,
                datagrams,
                ack_interval_ms: self.ctx.ack_interval.as_millis() as u32,
            },
            node_time_ms: clock::now_ms(),
        });
        send(tx, welcome, self.ctx).await?;
        let mut events = self.events(rx, expiry);
        // Armed only while something waits to be acknowledged.
        let ack_due = tokio::time::sleep(self.ctx.ack_interval);
        tokio::pin!(ack_due);
        let mut ack_armed = false;
        loop {
            let event = tokio::select! {
                event = events.next() => Some(event),
                _ = &mut ack_due, if ack_armed => None,
            };
            let Some(event) = event else {
                ack_armed = false;
                self.on_ack_due(tx).await?;
                if let Some(due) = self.ack_due(tokio::time::Instant::now()) {
                    ack_due.as_mut().reset(due);
                    ack_armed = true;
                }
                continue;
            };
            match event {
                Some(Event::Datagram(Some(bytes))) => self.on_datagram(&bytes).await?,
                // The connection is gone (closed by the peer, timed out).
                Some(Event::Datagram(None)) | None => return Err(Stop::Lost),
                Some(Event::Control(msg)) => match msg? {
                    ClientMsg::Fix(fix) => self.on_fix(&fix).await?,
                    ClientMsg::Driver(report) => {
                        self.report = report;
                        self.ctx.ingest.report(&self.id, report, clock::now_ms());
                    }
                    ClientMsg::Goodbye => {
                        self.sign_off_kept().await?;
                        // The last word on what was accepted, received
                        // before the close (which discards unsent data).
                        let _ = tokio::time::timeout(ERROR_FRAME_GRACE, async {
                            if self.send_ack(tx).await.is_ok() {
                                tx.finish().await;
                            }
                        })
                        .await;
                        self.conn.close(CloseAs::Goodbye, "goodbye").await;
                        return Ok(Goodbye);
                    }
                    ClientMsg::AckNow => self.on_ack_now()?,
                    ClientMsg::Clock(report) => self.on_clock(report)?,
                    ClientMsg::Hello(_) => {
                        return Err(
                            Refusal::new(ErrorCode::ProtocolViolation, "Hello sent twice").into(),
                        );
                    }
                    ClientMsg::Subscribe(_) => {
                        return Err(Refusal::new(
                            ErrorCode::ProtocolViolation,
                            "drivers do not subscribe",
                        )
                        .into());
                    }
                },
                Some(Event::OwnershipChanged) => self.still_ours().await?,
                Some(Event::Expired(refusal)) => {
                    let _ = tokio::time::timeout(ERROR_FRAME_GRACE, self.send_ack(tx)).await;
                    return Err(refusal.into());
                }
                Some(Event::Superseded) => {
                    return Err(
                        Refusal::new(ErrorCode::Superseded, "the driver connected again").into(),
                    );
                }
                Some(Event::ShuttingDown) => {
                    // The last word on what was accepted, if the client reads
                    // it promptly: the node will not wait long to stop.
                    let _ = tokio::time::timeout(ERROR_FRAME_GRACE, self.send_ack(tx)).await;
                    return Err(
                        Refusal::new(ErrorCode::ShuttingDown, "the node is shutting down").into(),
                    );
                }
            }
            let now = tokio::time::Instant::now();
            if let Some(due) = self.ack_due(now) {
                if due <= now {
                    ack_armed = false;
                    self.on_ack_due(tx).await?;
                    if let Some(due) = self.ack_due(now) {
                        ack_due.as_mut().reset(due);
                        ack_armed = true;
                    }
                } else if !ack_armed || due < ack_due.deadline() {
                    ack_due.as_mut().reset(due);
                    ack_armed = true;
                }
            }
        }
    }

    /// Everything a driver session waits for (see [`client_events`]), and
    /// the cluster's ownership changes.
    fn events<'s>(&self, rx: &'s mut ControlRead, expiry: Expiry) -> Events<'s>
    where
        'a: 's,
    {
        let mut sources = client_events(self.conn, rx, expiry, self.ctx, &self.superseded);
        if let Some(cluster) = &self.ctx.cluster {
            sources.push(Box::pin(stream::unfold(
                cluster.watch_changes(),
                |mut changes| async move {
                    changes.changed().await.ok()?;
                    Some((Event::OwnershipChanged, changes))
                },
            )));
        }
        stream::select_all(sources)
    }

    async fn on_datagram(&mut self, bytes: &[u8]) -> Result<(), Stop> {
        match decode_datagram::<Fix>(bytes) {
            Ok(fix) => self.on_fix(&fix).await,
            Err(_) => {
                self.reject(0, RejectReason::Malformed);
                Ok(())
            }
        }
    }

    /// Spends one request of the connection's fix budget: `false` when it
    /// is refused; an error when the connection keeps going over.
    fn spend(&mut self) -> Result<bool, Stop> {
        match self.budget.spend(Instant::now()) {
            Verdict::Allow => Ok(true),
            Verdict::Refuse => Ok(false),
            Verdict::Close => {
                self.ctx.ingest.metrics.rate_limited(Role::Driver).inc();
                let why = self.ctx.fix_budget.closing("fixes");
                Err(Refusal::new(ErrorCode::RateLimited, why).into())
            }
        }
    }

    async fn on_fix(&mut self, fix: &Fix) -> Result<(), Stop> {
        if !self.spend()? {
            self.reject(fix.seq, RejectReason::RateLimited);
            return Ok(());
        }
        let now = clock::now_ms();
        let before = self.validator.clock_offset_ms();
        let checked = self.validator.check(fix, now);
        self.clock_noted(before);
        let valid = match checked {
            Ok(valid) => valid,
            Err(reason) => {
                self.reject(fix.seq, reason);
                return Ok(());
            }
        };
        if valid.fix.fix_time_ms != fix.fix_time_ms {
            self.ctx.ingest.metrics.fixes_time_corrected.inc();
        }
        let placed = self.ctx.ingest.locate(valid.position);
        let placed = match &self.ctx.cluster {
            None => placed,
            Some(cluster) => match self.route(cluster, placed, &valid) {
                Route::Here(placed) => placed,
                away => {
                    // Not held here, its phone's clock found off: the next
                    // node starts from that offset rather than over.
                    let clock_off = self.validator.clock_correction_ms() != 0;
                    if clock_off && self.ctx.ingest.table.get(&self.id).is_none() {
                        let mut state = crate::ingest::state_of(&self.id, &valid, self.report, now);
                        // Not accepted anywhere: the next node takes it
                        // again if it is sent again.
                        state.seq = state.seq.saturating_sub(1);
                        self.hand_over(&state, cluster).await;
                    }
                    return self.leave(cluster, away, true, Some(*fix)).await;
                }
            },
        };
        let inherited = self.inherited_zones.take();
        if let Some((old, version)) = self.stored_at.take() {
            if old != placed.shard {
                // A copy in the shard it was last written to, which this
                // node may not hold (then its holder gets a tombstone).
                let writer = &self.ctx.ingest.writer;
                writer.stage_removal_of(old, self.id.clone(), version, None);
            }
        }
        self.ctx.ingest.accept(
            &self.id,
            &valid,
            self.report,
            now,
            placed,
            inherited.as_deref(),
        );
        if self.accepted.len() == MAX_UNWRITTEN_ACKS {
            // A newer one stands for it: acknowledging it says as much.
            self.accepted.pop_front();
        }
        let ticket = self.ctx.ingest.writer.ticket();
        self.accepted
            .push_back((valid.fix.seq, placed.shard, ticket));
        Ok(())
    }

    /// Signs the vehicle off for good: held here, it goes as ever; not held
    /// (the driver came from another node and sent no fix here yet), its
    /// stored copy goes (a tombstone if another node holds that shard).
    /// Confirmed only once the removal is in the store: a node that cannot
    /// write it (cut from Redis) tells the driver to say it elsewhere.
    async fn sign_off_kept(&mut self) -> Result<(), Stop> {
        let reason = RemoveReason::Offline;
        let shard = self.ctx.ingest.sign_off(&self.id, reason).or_else(|| {
            let (shard, version) = self.stored_at.take()?;
            let writer = &self.ctx.ingest.writer;
            writer.stage_removal_of(shard, self.id.clone(), version, Some(reason));
            Some(shard)
        });
        let Some(shard) = shard else {
            return Ok(());
        };
        // Waits while this node may still write the shard: one that steps
        // down (cut from the store) says so at once.
        let cluster = self.ctx.cluster.as_deref();
        let may_write = || cluster.is_none_or(|c| c.may_write(shard));
        let written = self.ctx.ingest.writer.written(shard, may_write);
        tokio::pin!(written);
        let until = tokio::time::Instant::now() + GOODBYE_WRITE_WAIT;
        let kept = loop {
            tokio::select! {
                done = &mut written => break done,
                // A flush stuck on a store that does not answer is not
                // waited out once this node may no longer write there.
                _ = tokio::time::sleep(GOODBYE_LOOK_EVERY) => {
                    if !may_write() || tokio::time::Instant::now() >= until {
                        break false;
                    }
                }
            }
        };
        match kept {
            true => Ok(()),
            false => Err(Refusal::new(
                ErrorCode::Unavailable,
                "the sign-off could not be written here; say goodbye through another node",
            )
            .into()),
        }
    }

    /// Where a valid fix belongs (see the module notes on hysteresis).
    fn route(&mut self, cluster: &Cluster, placed: Placed, valid: &ValidFix) -> Route {
        if cluster.owns(placed.shard) {
            self.crossed_at = None;
            return Route::Here(placed);
        }
        let home = self.ctx.ingest.table.get(&self.id).map(|e| e.shard);
        if let Some(home) = home.filter(|&h| cluster.owns(h)) {
            let crossed = *self.crossed_at.get_or_insert(valid.position);
            // Nor is a driver handed over while its shard's changes are
            // not all written (the store refusing writes, or away): the
            // next node would start from an older stored state, without
            // this node's note, and the two nodes' zone events for the
            // vehicle would land in either order once the store takes them.
            let behind = self.ctx.ingest.writer.has_unwritten(home);
            if behind || crossed.distance_m(valid.position) < cluster.handoff_distance_m() {
                return Route::Here(Placed {
                    cell: placed.cell,
                    shard: home,
                });
            }
        }
        match cluster.redirect_for(placed.shard) {
            Some(redirect) => Route::Away(redirect),
            None => Route::Unavailable,
        }
    }

    /// Checks that the vehicle's shard is still this node's (ownership
    /// moves when nodes join or leave); if not, hands the driver over.
    async fn still_ours(&mut self) -> Result<(), Stop> {
        let Some(cluster) = &self.ctx.cluster else {
            return Ok(());
        };
        // Nothing moved since the last look: no need to look again.
        let changes = cluster.changes();
        if changes == self.ownership_seen {
            return Ok(());
        }
        self.ownership_seen = changes;
        let Some(entry) = self.ctx.ingest.table.get(&self.id) else {
            return Ok(());
        };
        if cluster.owns(entry.shard) {
            return Ok(());
        }
        let shard = self.ctx.ingest.locate(entry.state.position()).shard;
        let away = match cluster.redirect_for(shard) {
            Some(redirect) => Route::Away(redirect),
            None => Route::Unavailable,
        };
        // The shard itself moves: the vehicle stays in it for the new owner.
        self.leave(cluster, away, false, None).await
    }

    /// Hands the driver over: its last state is left for the next node, its
    /// vehicle goes in transit here, and the client is told where to go; or,
    /// when its client cannot reach that node, its session is relayed there
    /// (`fix`, not accepted here, goes first).
    async fn leave(
        &mut self,
        cluster: &Cluster,
        away: Route,
        leaves_shard: bool,
        fix: Option<Fix>,
    ) -> Result<(), Stop> {
        if let Some(entry) = self.ctx.ingest.table.get(&self.id) {
            self.hand_over(&entry.state, cluster).await;
            let how = match leaves_shard {
                true => Handing::Crossing {
                    until: Instant::now() + self.ctx.offline_grace,
                },
                false => Handing::WithShard,
            };
            self.ctx.ingest.hand_off(&self.id, how);
        }
        match away {
            Route::Away(redirect) => {
                if !cluster.may_redirect_to(&redirect.addr, &self.unreachable) {
                    self.forward_to = cluster.peer_http_at(&redirect.addr).map(|via| (via, fix));
                }
                Err(Stop::Redirected(redirect))
            }
            _ => Err(Refusal::new(
                ErrorCode::Unavailable,
                "this driver's shard is changing hands; connect again shortly",
            )
            .into()),
        }
    }

    /// Leaves the driver's state for the next node. A help to it (it
    /// reads the stored state without it), so a store that does not answer
    /// (this node cut from it) does not hold the driver here.
    async fn hand_over(&self, state: &VehicleState, cluster: &Cluster) {
        let handing = self.ctx.store.hand_over(state, cluster.handoff_ttl());
        match tokio::time::timeout(HAND_OVER_WAIT, handing).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                tracing::warn!(vehicle = %self.id, error = %e, "leaving a handed-over driver's state")
            }
            Err(_) => {
                tracing::warn!(vehicle = %self.id, "leaving a handed-over driver's state: the store did not answer in time; the next node reads its stored state")
            }
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

    /// Whether something happened since the last `Ack`.
    fn unacknowledged(&self) -> bool {
        self.rejected_unsent || self.clock_unsent || self.acked_seq != self.ack_sent
    }

    /// The device clock's offset may have changed (from `before`): counted,
    /// logged when it is off, and, when this node's correction changed,
    /// said to the app in the next `Ack`, soon (what its SDK measured, the
    /// app knows).
    fn clock_noted(&mut self, before: i64) {
        let offset = self.validator.clock_offset_ms();
        if offset == before {
            return;
        }
        let metrics = &self.ctx.ingest.metrics;
        metrics
            .device_clock_offset_seconds
            .observe(offset.unsigned_abs() as f64 / 1000.0);
        let correction = self.validator.clock_correction_ms();
        if correction != 0 {
            tracing::info!(vehicle = %self.id, offset_ms = offset, correction_ms = correction, "a driver's device clock is off: its fix times are put in node time");
        }
        self.clock_unsent |= correction != self.correction_said;
    }

    /// When acknowledgements are next looked at, if anything waits for one.
    /// At most one `Ack` per `ack_interval` (rejections within a second): at
    /// once if the last one is that old, else when the interval is up; a
    /// rejection brings a later one closer. Fixes accepted and not written
    /// yet are looked at again when an `Ack` would be due, a flush later at
    /// the soonest and less often the longer they wait. An `AckNow` is answered
    /// as soon as what it asked about is written, or after
    /// [`ACK_NOW_WAIT`] with what is.
    fn ack_due(&mut self, now: tokio::time::Instant) -> Option<tokio::time::Instant> {
        self.settle();
        if let Some(by) = self.ack_now_by {
            return Some(match self.accepted.is_empty() {
                true => now,
                false => by.min(now + self.ctx.flush_interval),
            });
        }
        let wait = if self.rejected_unsent || self.clock_unsent {
            self.ctx.ack_interval.min(REJECTIONS_WITHIN)
        } else {
            self.ctx.ack_interval
        };
        if self.unacknowledged() {
            return Some(self.ack_sent_at + wait);
        }
        // Waiting for the writer: looked at again a flush later, then less
        // often the longer the store keeps them waiting (an outage must not
        // wake every session at every flush).
        let due = self.ack_sent_at + wait;
        let overdue = now
            .saturating_duration_since(due)
            .min(self.ctx.ack_interval);
        (!self.accepted.is_empty()).then(|| due.max(now + overdue.max(self.ctx.flush_interval)))
    }

    /// The acknowledgement timer is up: an `AckNow` waiting is answered,
    /// else news are sent.
    async fn on_ack_due(&mut self, tx: &mut ControlWrite) -> Result<(), Stop> {
        match self.ack_now_by {
            Some(by) => {
                self.settle();
                if self.accepted.is_empty() || tokio::time::Instant::now() >= by {
                    self.ack_now_by = None;
                    self.send_ack_now(tx, true).await?;
                }
                Ok(())
            }
            None => self.send_ack(tx).await,
        }
    }

    /// Moves what the writer has written since from `accepted` to
    /// `acked_seq`. Fixes supersede each other: the newest written one
    /// stands for those before it.
    fn settle(&mut self) {
        let writer = &self.ctx.ingest.writer;
        let written = self
            .accepted
            .iter()
            .filter(|(_, shard, ticket)| writer.is_written(*shard, *ticket))
            .map(|(seq, _, _)| *seq)
            .max();
        if let Some(seq) = written {
            self.acked_seq = self.acked_seq.max(seq);
            self.accepted.retain(|(s, _, _)| *s > seq);
        }
    }

    /// The client measured its clock and stamps its fixes in node time.
    /// The SDK says it once per connection; any more are counted against
    /// the fix budget, as `AckNow` is.
    fn on_clock(&mut self, report: ClockReport) -> Result<(), Stop> {
        if !crate::device_clock::within(report.offset_ms, crate::device_clock::MAX_OFFSET_MS) {
            return Err(
                Refusal::new(ErrorCode::BadRequest, "a clock offset of more than a year").into(),
            );
        }
        self.clock_reports += 1;
        if self.clock_reports > 1 && !self.spend()? {
            self.ctx.ingest.metrics.rate_limited(Role::Driver).inc();
            return Ok(());
        }
        let before = self.validator.clock_offset_ms();
        self.validator.reported_offset(report.offset_ms);
        tracing::debug!(vehicle = %self.id, offset_ms = report.offset_ms, round_trip_ms = report.round_trip_ms, "the client measured its clock");
        self.clock_noted(before);
        Ok(())
    }

    /// The driver asks what was accepted so far: it is told at once, even
    /// if nothing changed since the last `Ack`, so it always hears back.
    /// Requests share the fix budget: a flood of them is refused, then
    /// closed, as a flood of fixes is.
    fn on_ack_now(&mut self) -> Result<(), Stop> {
        if self.spend()? {
            // Answered once what was accepted before it is written (at the
            // next acknowledgement look, `ack_due`).
            let by = tokio::time::Instant::now() + ACK_NOW_WAIT;
            self.ack_now_by = Some(self.ack_now_by.map_or(by, |b| b.min(by)));
            Ok(())
        } else {
            self.ctx.ingest.metrics.rate_limited(Role::Driver).inc();
            Ok(())
        }
    }

    /// Sends an `Ack` when something happened since the last one.
    async fn send_ack(&mut self, tx: &mut ControlWrite) -> Result<(), Stop> {
        self.settle();
        if !self.unacknowledged() {
            return Ok(());
        }
        self.send_ack_now(tx, false).await
    }

    /// Sends an `Ack` of what was accepted and written, and rejected, so
    /// far; `answering` an `AckNow`.
    async fn send_ack_now(&mut self, tx: &mut ControlWrite, answering: bool) -> Result<(), Stop> {
        self.settle();
        self.ack_sent_at = tokio::time::Instant::now();
        self.correction_said = self.validator.clock_correction_ms();
        let ack = ServerMsg::Ack(Ack {
            seq: self.acked_seq,
            rejected: std::mem::take(&mut self.rejections),
            rejected_total: self.rejected_total,
            clock_offset_ms: self.correction_said,
            answers_ack_now: answering,
        });
        self.rejected_unsent = false;
        self.clock_unsent = false;
        self.ack_sent = self.acked_seq;
        send(tx, ack, self.ctx).await
    }
}
