//! The store writer: stages vehicle changes and flushes them in batches.
//!
//! Sessions stage changes synchronously (a short lock on one of several
//! stripes, chosen by shard) and never wait on the store. Every
//! `flush_interval` the writer takes everything staged, which has coalesced to
//! the latest change per vehicle and shard, and writes it as one [`Batch`].
//! A failed flush keeps its changes and merges them under newer ones, so a
//! store outage loses nothing and memory stays bounded by the number of
//! vehicles.
//!
//! A change the store refuses for its content is different: retrying it
//! would fail forever and hold up everything behind it. It is dropped,
//! counted (`store_refused`) and logged with the vehicle's id; the rest of
//! the flush stands.
//!
//! In a cluster each shard's changes go out with the shard's lease
//! ([`Fences`]): changes to a shard whose lease is being acquired wait;
//! changes to a shard this node does not own are dropped; a shard whose
//! lease turns out not to be the one held (`fenced`) is reported back, and
//! its changes wait until the cluster knows why: the store lost the lease
//! and nobody took it since (they are written under the lease taken back),
//! or another node holds the shard (they are dropped). A removal is never
//! simply dropped: the node holding the shard may have loaded the vehicle
//! this node was removing (a sign-off during a Redis stall), so it is left
//! there as a tombstone for the holder to apply.

use std::{
    collections::{HashMap, HashSet},
    sync::Arc,
    time::{Duration, Instant},
};
use tracing::Instrument;

use hexfleet_model::{ShardId, VehicleId, VehicleState};
use hexfleet_protocol::{zone::ZoneEvent, RemoveReason};
use tokio::sync::{watch, Notify};
use tokio_util::sync::CancellationToken;

use super::{Batch, Refused, Removal, ShardBatch, Store, Upsert, Version};
use crate::{metrics::Metrics, staging::LatestWins};

#[derive(Debug, Clone, PartialEq)]
enum Change {
    Upsert {
        state: VehicleState,
        relocated: bool,
        seen: bool,
    },
    Remove {
        gone: Option<RemoveReason>,
        last: Version,
    },
}

type Stage = HashMap<(ShardId, VehicleId), Change>;

/// Removals this node cannot write (the shard is another node's now),
/// waiting to be left as tombstones for the shard's holder.
type Tombs = HashMap<ShardId, Vec<Removal>>;

/// How long tombstones wait for a node to hold their shard: far beyond any
/// hand-over, so only a shard nobody holds for that long loses them (its
/// vehicles then go stale in the store's own sweep).
pub const TOMBSTONE_TTL: Duration = Duration::from_secs(600);

/// Zone events waiting for their shard's next write, in order.
type Events = HashMap<ShardId, Vec<ZoneEvent>>;

/// The most zone events kept while the store cannot be written; beyond it
/// new ones are dropped, and counted (`zone_events_dropped`).
const MAX_PENDING_EVENTS: usize = 100_000;

/// Whether and how this node may write a shard now.
#[derive(Debug, Clone, PartialEq)]
pub enum Fence {
    /// A single node: every shard is its own, no lease.
    Unfenced,
    /// This node holds the shard's lease, with this value.
    Held(Arc<str>),
    /// This node owns the shard but is still acquiring its lease: the
    /// changes wait.
    Awaiting,
    /// Another node owns the shard: the changes are dropped.
    Foreign,
}

/// The cluster's side of the writer: which lease each shard is written
/// under, and who hears that a lease was lost.
pub trait Fences: Send + Sync {
    fn fence(&self, shard: ShardId) -> Fence;
    /// The store refused a write to `shard`: its lease is someone else's.
    fn fenced(&self, shard: ShardId);
    /// Whether flushes are published on the shards' bus channels.
    fn publishes(&self) -> bool;
}

/// A single node's fences: none.
pub struct Unfenced;

impl Fences for Unfenced {
    fn fence(&self, _shard: ShardId) -> Fence {
        Fence::Unfenced
    }
    fn fenced(&self, _shard: ShardId) {}
    fn publishes(&self) -> bool {
        false
    }
}

pub struct StoreWriter {
    staged: LatestWins<(ShardId, VehicleId), Change>,
    metrics: Arc<Metrics>,
    recovered: Notify,
    /// Completed flush attempts, for whoever must know that what it staged
    /// has been written.
    flushes: watch::Sender<u64>,
    /// Shards whose changes must not be written (the lease was lost).
    discarded: parking_lot::Mutex<HashSet<ShardId>>,
    /// The flush that last dropped changes to a shard (discarded, or
    /// another node's), for [`StoreWriter::is_written`].
    dropped_at: parking_lot::Mutex<HashMap<ShardId, u64>>,
    /// Shards with changes the last flush left unwritten (failed, fenced,
    /// or waiting for a lease).
    unwritten: parking_lot::Mutex<HashSet<ShardId>>,
    /// Flushes in a row whose changes to a shard waited for its lease.
    waiting: parking_lot::Mutex<HashMap<ShardId, u32>>,
    /// Zone events staged since the last flush took them.
    events: parking_lot::Mutex<(Events, usize)>,
    /// Shards whose outbox holds events to relay, and who hears of them.
    outboxes: parking_lot::Mutex<HashSet<ShardId>>,
    outboxes_written: Notify,
}

/// The flushes completed when a change was staged (see
/// [`StoreWriter::is_written`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ticket(u64);

/// Folds a newer change into an older one for the same vehicle and shard.
/// The newer wins, except that a pending relocation or last-seen write is
/// not forgotten: the store must still learn where the vehicle now is, and
/// when it was last seen.
fn merge(older: Option<Change>, newer: Change) -> Change {
    match (older, newer) {
        (
            Some(Change::Upsert {
                relocated: r0,
                seen: s0,
                ..
            }),
            Change::Upsert {
                state,
                relocated,
                seen,
            },
        ) => Change::Upsert {
            state,
            relocated: relocated || r0,
            seen: seen || s0,
        },
        (_, newer) => newer,
    }
}

impl StoreWriter {
    pub fn new(metrics: Arc<Metrics>) -> Self {
        Self {
            staged: LatestWins::new(merge),
            metrics,
            recovered: Notify::new(),
            flushes: watch::Sender::new(0),
            discarded: Default::default(),
            dropped_at: Default::default(),
            unwritten: Default::default(),
            waiting: Default::default(),
            events: Default::default(),
            outboxes: Default::default(),
            outboxes_written: Notify::new(),
        }
    }

    /// Stages zone events of vehicles in `shard`, in order: they are
    /// written with the shard's next write.
    pub fn stage_events(&self, shard: ShardId, events: Vec<ZoneEvent>) {
        if events.is_empty() {
            return;
        }
        let mut staged = self.events.lock();
        let (by_shard, count) = &mut *staged;
        if *count + events.len() > MAX_PENDING_EVENTS {
            self.metrics.zone_events_dropped.inc_by(events.len() as u64);
            tracing::warn!(
                dropped = events.len(),
                "too many zone events waiting for the store; dropped"
            );
            return;
        }
        *count += events.len();
        by_shard.entry(shard).or_default().extend(events);
    }

    /// Asks for a shard's outbox to be relayed (it may hold events another
    /// node wrote before this one took the shard).
    pub fn relay(&self, shard: ShardId) {
        self.outboxes.lock().insert(shard);
        self.outboxes_written.notify_one();
    }

    /// The shards whose outbox has events to relay, taken.
    pub fn take_outboxes(&self) -> HashSet<ShardId> {
        std::mem::take(&mut *self.outboxes.lock())
    }

    /// Notified when an outbox was written.
    pub fn outboxes_written(&self) -> &Notify {
        &self.outboxes_written
    }

    /// Drops every change to `shard` staged so far: this node lost its
    /// lease, and what it accepted must not land later. Its removals are
    /// left as tombstones for the shard's holder.
    pub fn discard(&self, shard: ShardId) {
        self.discarded.lock().insert(shard);
    }

    /// Where the writer's work stands now, for a change about to be staged:
    /// see [`StoreWriter::is_written`].
    pub fn ticket(&self) -> Ticket {
        Ticket(*self.flushes.borrow())
    }

    /// Whether a change to `shard` staged after `ticket` was taken is in
    /// the store: a flush that began after it has ended, nothing of the
    /// shard is left unwritten (fenced, failed, waiting for its lease), and
    /// nothing of it was dropped since (a lease lost). What a driver is
    /// acknowledged waits for this.
    pub fn is_written(&self, shard: ShardId, ticket: Ticket) -> bool {
        let done = *self.flushes.borrow();
        done != u64::MAX
            && done >= ticket.0.saturating_add(2)
            && !self.has_unwritten(shard)
            && self
                .dropped_at
                .lock()
                .get(&shard)
                .is_none_or(|&at| at <= ticket.0)
    }

    /// Whether the last flush left changes to `shard` unwritten (failed,
    /// fenced, waiting for its lease).
    pub fn has_unwritten(&self, shard: ShardId) -> bool {
        self.unwritten.lock().contains(&shard)
    }

    /// Marks what this flush drops of `shard`.
    fn dropping(&self, shard: ShardId) {
        let this_flush = self.flushes.borrow().saturating_add(1);
        self.dropped_at.lock().insert(shard, this_flush);
    }

    /// Waits until everything staged before the call has been through a
    /// flush (written, refused, fenced or dropped), or the writer stopped.
    pub async fn flushed(&self) {
        let mut flushes = self.flushes.subscribe();
        let from = *flushes.borrow_and_update();
        // The flush under way may have taken its changes before the call.
        let _ = flushes
            .wait_for(|done| *done >= from.saturating_add(2))
            .await;
    }

    /// Waits until every change to `shard` staged before the call is
    /// written (or dropped as another node's), as long as `still` holds.
    /// Returns whether it was.
    pub async fn written(&self, shard: ShardId, still: impl Fn() -> bool) -> bool {
        loop {
            self.flushed().await;
            if !self.has_unwritten(shard) {
                return true;
            }
            if !still() || *self.flushes.borrow() == u64::MAX {
                return false;
            }
        }
    }

    /// Stages the latest state of a vehicle in its shard. `relocated` says
    /// the vehicle is new to this shard.
    pub fn stage_upsert(&self, shard: ShardId, state: VehicleState, relocated: bool) {
        self.stage_fix(shard, state, relocated, true);
    }

    /// Stages a vehicle's new fix; `seen` says whether the store's
    /// last-seen index must be written too ([`super::seen_due`]).
    pub fn stage_fix(&self, shard: ShardId, state: VehicleState, relocated: bool, seen: bool) {
        let id = state.id.clone();
        let seen = seen || relocated;
        self.staged.stage(
            (shard, id),
            Change::Upsert {
                state,
                relocated,
                seen,
            },
        );
    }

    /// Stages the removal of `last` (a vehicle's state) from a shard;
    /// `gone` says why when it is gone for good rather than moved to another
    /// shard or node.
    pub fn stage_removal(&self, shard: ShardId, last: &VehicleState, gone: Option<RemoveReason>) {
        self.stage_removal_of(shard, last.id.clone(), Version::of(last), gone);
    }

    /// [`StoreWriter::stage_removal`], given the removed state's version.
    pub fn stage_removal_of(
        &self,
        shard: ShardId,
        id: VehicleId,
        last: Version,
        gone: Option<RemoveReason>,
    ) {
        self.staged
            .stage((shard, id), Change::Remove { gone, last });
    }

    /// Notified when a flush succeeds after failures. The store may have lost
    /// data meanwhile (a Redis restarted without persistence), so whoever
    /// owns the vehicles re-stages all of them.
    pub fn recovered(&self) -> &Notify {
        &self.recovered
    }

    /// Moves everything staged into `stage` (newer over older) and
    /// `events` (after older ones), less what was discarded (whose removals
    /// go to `tombs`).
    fn take_into(&self, stage: &mut Stage, events: &mut Events, tombs: &mut Tombs) {
        self.staged.take_into(stage);
        {
            let mut staged = self.events.lock();
            staged.1 = 0;
            // Kept across failed flushes too: bounded as a whole.
            let mut held: usize = events.values().map(Vec::len).sum();
            let mut dropped = 0;
            for (shard, mut new) in staged.0.drain() {
                let room = MAX_PENDING_EVENTS.saturating_sub(held);
                if new.len() > room {
                    dropped += new.len() - room;
                    new.truncate(room);
                }
                held += new.len();
                if !new.is_empty() {
                    events.entry(shard).or_default().append(&mut new);
                }
            }
            if dropped > 0 {
                self.metrics.zone_events_dropped.inc_by(dropped as u64);
                tracing::warn!(
                    dropped,
                    "too many zone events waiting for the store; dropped"
                );
            }
        }
        let discarded = std::mem::take(&mut *self.discarded.lock());
        for &shard in &discarded {
            self.dropping(shard);
        }
        if !discarded.is_empty() {
            stage.retain(|(shard, id), change| {
                if !discarded.contains(shard) {
                    return true;
                }
                entomb(tombs, *shard, id, change);
                false
            });
            events.retain(|shard, _| !discarded.contains(shard));
        }
    }

    /// Leaves the tombstones for their shards' holders; those the store
    /// does not take wait for the next flush.
    async fn leave_tombstones(&self, store: &dyn Store, tombs: &mut Tombs) {
        if tombs.is_empty() {
            return;
        }
        let shards: Vec<ShardId> = tombs.keys().copied().collect();
        for shard in shards {
            let Some(removals) = tombs.get(&shard) else {
                continue;
            };
            match store.leave_tombstones(shard, removals, TOMBSTONE_TTL).await {
                Ok(()) => {
                    self.metrics
                        .store_tombstones_left
                        .inc_by(removals.len() as u64);
                    tracing::info!(%shard, removals = removals.len(), "left removals this node could not write for the shard's holder");
                    tombs.remove(&shard);
                }
                Err(e) => {
                    tracing::warn!(%shard, error = %e, "leaving tombstones; trying again");
                    return;
                }
            }
        }
    }

    /// Flushes every `interval` until `shutdown`, then flushes what is left
    /// once more.
    pub async fn run(
        self: Arc<Self>,
        store: Arc<dyn Store>,
        fences: Arc<dyn Fences>,
        interval: Duration,
        shutdown: CancellationToken,
    ) {
        let mut ticker = tokio::time::interval(interval);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut pending = Stage::new();
        let mut events = Events::new();
        let mut owed = OwedLocators::default();
        let mut tombs = Tombs::new();
        let mut failures = 0u32;
        loop {
            tokio::select! {
                _ = ticker.tick() => {}
                _ = shutdown.cancelled() => {
                    self.take_into(&mut pending, &mut events, &mut tombs);
                    let flushed = self.flush(store.as_ref(), fences.as_ref(), &mut pending, &mut events, &mut owed, &mut tombs).await;
                    if let Err(e) = flushed {
                        tracing::warn!(error = %e, lost = pending.len(), "final flush failed");
                    }
                    // Whoever waits for a flush waits no more.
                    self.flushes.send_replace(u64::MAX);
                    return;
                }
            }
            self.take_into(&mut pending, &mut events, &mut tombs);
            // A flush with nothing to write asks the store nothing.
            let asked = !pending.is_empty() || !events.is_empty();
            let span = tracing::debug_span!("flush", changes = pending.len());
            let flushed = self
                .flush(
                    store.as_ref(),
                    fences.as_ref(),
                    &mut pending,
                    &mut events,
                    &mut owed,
                    &mut tombs,
                )
                .instrument(span)
                .await;
            // Removals waiting to be left as tombstones are not in the
            // store yet either.
            *self.unwritten.lock() = pending
                .keys()
                .map(|(shard, _)| *shard)
                .chain(events.keys().copied())
                .chain(tombs.keys().copied())
                .collect();
            self.flushes.send_modify(|n| *n += 1);
            if asked {
                self.metrics.store_up.set(i64::from(flushed.is_ok()));
            }
            match flushed {
                Ok(()) if failures > 0 => {
                    failures = 0;
                    tracing::info!("store writes succeed again");
                    self.recovered.notify_one();
                }
                Ok(()) => {}
                Err(e) => {
                    failures += 1;
                    self.metrics.store_flush_errors.inc();
                    tracing::warn!(error = %e, failures, "store flush failed; retrying");
                    let backoff = interval
                        .saturating_mul(1 << failures.min(8))
                        .min(Duration::from_secs(1));
                    tokio::time::sleep(backoff).await;
                }
            }
        }
    }

    async fn flush(
        &self,
        store: &dyn Store,
        fences: &dyn Fences,
        pending: &mut Stage,
        events: &mut Events,
        owed: &mut OwedLocators,
        tombs: &mut Tombs,
    ) -> Result<(), super::StoreError> {
        owed.settle(pending);
        let batch = self.to_batch(pending, events, tombs, fences);
        self.metrics.store_pending.set(pending.len() as u64);
        self.leave_tombstones(store, tombs).await;
        if batch.is_empty() {
            return Ok(());
        }
        let started = Instant::now();
        let applied = store.apply(&batch).await?;
        self.metrics
            .store_flush_seconds
            .observe(started.elapsed().as_secs_f64());
        self.metrics
            .store_flush_batch_size
            .observe(batch.len() as f64);
        // What was in the batch is written; what waited for a lease stays
        // (even if the lease arrived meanwhile: it goes in the next flush),
        // and so does what was fenced, until its lease is known.
        let written: HashSet<ShardId> = batch
            .shards
            .iter()
            .map(|sb| sb.shard)
            .filter(|&shard| applied.written(shard))
            .collect();
        pending.retain(|(shard, _), _| !written.contains(shard));
        events.retain(|shard, _| !written.contains(shard));
        let outboxes: Vec<ShardId> = batch
            .shards
            .iter()
            .filter(|sb| !sb.events.is_empty() && written.contains(&sb.shard))
            .map(|sb| sb.shard)
            .collect();
        if !outboxes.is_empty() {
            self.outboxes.lock().extend(outboxes);
            self.outboxes_written.notify_one();
        }
        for r in applied.refused {
            self.refused(r, owed);
        }
        for shard in applied.fenced {
            self.metrics.store_fenced.inc();
            tracing::warn!(%shard, "the shard's lease is not the one held: nothing of this flush was written to it, and its changes wait until the lease is checked");
            fences.fenced(shard);
        }
        // The others stand; these are tried again (and the flush counts as
        // failed, so the next waits).
        match applied.failed.first() {
            Some((shard, why)) => Err(super::StoreError::Unwritable(format!(
                "{} of {} shards not written now (first: {shard}: {why})",
                applied.failed.len(),
                batch.shards.len()
            ))),
            None => Ok(()),
        }
    }

    /// The batch of what may be written now: changes to shards whose lease
    /// is being acquired stay in `pending`, changes to shards another node
    /// owns are dropped (their removals go to `tombs`).
    fn to_batch(
        &self,
        pending: &mut Stage,
        events: &mut Events,
        tombs: &mut Tombs,
        fences: &dyn Fences,
    ) -> Batch {
        let mut verdicts: HashMap<ShardId, Fence> = HashMap::new();
        let mut verdict = |shard: ShardId| {
            verdicts
                .entry(shard)
                .or_insert_with(|| fences.fence(shard))
                .clone()
        };
        let before = pending.len();
        pending.retain(|(shard, id), change| {
            if verdict(*shard) != Fence::Foreign {
                return true;
            }
            self.dropping(*shard);
            entomb(tombs, *shard, id, change);
            false
        });
        let dropped = before - pending.len();
        if dropped > 0 {
            self.metrics.store_foreign_dropped.inc_by(dropped as u64);
        }
        events.retain(|shard, lost| {
            let foreign = verdict(*shard) == Fence::Foreign;
            if foreign {
                // The shard's new owner recounts from the last state written.
                self.metrics.zone_events_dropped.inc_by(lost.len() as u64);
            }
            !foreign
        });
        let publish = fences.publishes();
        let mut batch = to_batch(pending, events, |shard| match verdict(shard) {
            Fence::Unfenced => Some(None),
            Fence::Held(lease) => Some(Some(lease)),
            Fence::Awaiting | Fence::Foreign => None,
        });
        self.note_waiting(&verdicts);
        for sb in &mut batch.shards {
            sb.publish = publish;
        }
        batch
    }

    /// Counts, per shard, the flushes in a row whose changes waited for the
    /// shard's lease, and says so when it has been long: changes that wait
    /// are served from memory but not stored.
    fn note_waiting(&self, verdicts: &HashMap<ShardId, Fence>) {
        const LONG: u32 = 200;
        let mut waiting = self.waiting.lock();
        waiting.retain(|shard, _| verdicts.get(shard) == Some(&Fence::Awaiting));
        for (shard, fence) in verdicts {
            if *fence == Fence::Awaiting {
                let flushes = waiting.entry(*shard).or_default();
                *flushes += 1;
                if *flushes == LONG {
                    tracing::warn!(%shard, flushes = LONG, "changes to a shard have waited for its lease this many flushes in a row");
                }
            }
        }
    }

    fn refused(&self, refused: Refused, owed: &mut OwedLocators) {
        self.metrics.store_refused.inc();
        tracing::warn!(
            vehicle = %refused.id,
            shard = %refused.shard,
            reason = %refused.reason,
            "the store refused a vehicle's change; dropped it and wrote the rest"
        );
        if refused.relocated {
            owed.insert(refused.shard, refused.id);
        }
    }
}

/// Vehicles whose arrival in a shard the store refused: their locator was
/// never written, so their next upsert there must write it. Bounded, since
/// only what validation let through and the store refused lands here.
#[derive(Default)]
struct OwedLocators(HashSet<(ShardId, VehicleId)>);

impl OwedLocators {
    const MAX: usize = 65_536;

    fn insert(&mut self, shard: ShardId, id: VehicleId) {
        if self.0.len() >= Self::MAX {
            tracing::warn!("forgetting {} owed locators", self.0.len());
            self.0.clear();
        }
        self.0.insert((shard, id));
    }

    /// Marks pending upserts that owe a locator as relocations; a pending
    /// removal settles the debt too.
    fn settle(&mut self, pending: &mut Stage) {
        if self.0.is_empty() {
            return;
        }
        self.0.retain(|key| match pending.get_mut(key) {
            Some(Change::Upsert { relocated, .. }) => {
                *relocated = true;
                false
            }
            Some(Change::Remove { .. }) => false,
            None => true,
        });
    }
}

/// Keeps a removal this node cannot write as a tombstone.
fn entomb(tombs: &mut Tombs, shard: ShardId, id: &VehicleId, change: &Change) {
    if let Change::Remove { gone, last } = change {
        tombs.entry(shard).or_default().push(Removal {
            id: id.clone(),
            gone: *gone,
            last: *last,
        });
    }
}

/// The changes of `stage` to shards `fence` gives a lease for (`Some`), by
/// shard.
fn to_batch(
    stage: &Stage,
    events: &Events,
    mut fence: impl FnMut(ShardId) -> Option<Option<Arc<str>>>,
) -> Batch {
    let mut shards: HashMap<ShardId, ShardBatch> = HashMap::new();
    let mut fences: HashMap<ShardId, Option<Option<Arc<str>>>> = HashMap::new();
    let changes = stage
        .iter()
        .map(|((shard, id), change)| (shard, Some((id, change))));
    let outboxes = events.keys().map(|shard| (shard, None));
    for (shard, change) in changes.chain(outboxes) {
        let Some(lease) = fences
            .entry(*shard)
            .or_insert_with(|| fence(*shard))
            .clone()
        else {
            continue;
        };
        let sb = shards.entry(*shard).or_insert_with(|| ShardBatch {
            shard: *shard,
            upserts: Vec::new(),
            removals: Vec::new(),
            fence: lease,
            publish: false,
            events: events.get(shard).cloned().unwrap_or_default(),
        });
        let Some((id, change)) = change else {
            continue;
        };
        match change {
            Change::Upsert {
                state,
                relocated,
                seen,
            } => sb.upserts.push(Upsert {
                state: state.clone(),
                relocated: *relocated,
                seen: *seen,
            }),
            Change::Remove { gone, last } => sb.removals.push(Removal {
                id: id.clone(),
                gone: *gone,
                last: *last,
            }),
        }
    }
    Batch {
        shards: shards.into_values().collect(),
    }
}

#[cfg(test)]
mod tests {
    use hexfleet_model::{VehicleClass, VehicleStatus};

    use super::*;

    fn state(id: &str, seq: u64) -> VehicleState {
        VehicleState {
            id: VehicleId::new(id).unwrap(),
            lat: 1.0,
            lon: 1.0,
            heading_deg: 0.0,
            speed_mps: 0.0,
            accuracy_m: 1.0,
            fix_time_ms: 0,
            seq,
            class: VehicleClass::Economy,
            status: VehicleStatus::Available,
            seen_ms: 0,
            zones: Vec::new(),
            clock_offset_ms: 0,
        }
    }

    fn shard() -> ShardId {
        "85283473fffffff".parse().unwrap()
    }

    #[test]
    fn changes_to_one_vehicle_coalesce_to_the_latest() {
        let w = StoreWriter::new(Arc::new(Metrics::new()));
        for seq in 1..=100 {
            w.stage_upsert(shard(), state("v1", seq), seq == 1);
        }
        w.stage_upsert(shard(), state("v2", 1), true);
        let mut stage = Stage::new();
        w.take_into(&mut stage, &mut Events::new(), &mut Tombs::new());
        let batch = to_batch(&stage, &Events::new(), |_| Some(None));
        assert_eq!(batch.len(), 2);
        let v1 = batch.shards[0]
            .upserts
            .iter()
            .find(|u| u.state.id.as_str() == "v1")
            .unwrap();
        assert_eq!(v1.state.seq, 100);
        assert!(
            v1.relocated,
            "the first upsert's relocation must survive coalescing"
        );
    }

    /// Awaiting the lease of `awaited` until the first flush has asked;
    /// every other shard is unfenced.
    struct LeaseArrives {
        awaited: ShardId,
        asked: parking_lot::Mutex<u32>,
    }

    impl Fences for LeaseArrives {
        fn fence(&self, shard: ShardId) -> Fence {
            if shard != self.awaited {
                return Fence::Unfenced;
            }
            let mut asked = self.asked.lock();
            *asked += 1;
            if *asked == 1 {
                Fence::Awaiting
            } else {
                Fence::Held("n1 1".into())
            }
        }
        fn fenced(&self, _shard: ShardId) {}
        fn publishes(&self) -> bool {
            false
        }
    }

    #[tokio::test]
    async fn a_change_waiting_for_a_lease_that_arrives_during_a_flush_is_written_by_the_next() {
        let w = StoreWriter::new(Arc::new(Metrics::new()));
        let store = crate::store::memory::MemoryStore::new();
        let other: ShardId = "85283477fffffff".parse().unwrap();
        let fences = LeaseArrives {
            awaited: shard(),
            asked: Default::default(),
        };
        w.stage_upsert(shard(), state("v1", 1), true);
        w.stage_upsert(other, state("v2", 1), true);
        let (mut pending, mut owed) = (Stage::new(), OwedLocators::default());
        w.take_into(&mut pending, &mut Events::new(), &mut Tombs::new());
        // v1 waits for its lease in the first flush, and is written by the
        // second.
        for waiting in [1, 0] {
            let (mut events, mut tombs) = (Events::new(), Tombs::new());
            w.flush(
                &store,
                &fences,
                &mut pending,
                &mut events,
                &mut owed,
                &mut tombs,
            )
            .await
            .unwrap();
            assert_eq!(pending.len(), waiting);
        }
        let v1 = store.vehicle(&VehicleId::new("v1").unwrap()).await.unwrap();
        assert_eq!(v1.map(|s| s.seq), Some(1), "written, with its locator");
    }

    #[test]
    fn zone_events_waiting_through_failed_flushes_are_bounded_and_the_rest_counted() {
        let metrics = Arc::new(Metrics::new());
        let w = StoreWriter::new(metrics.clone());
        let event = |i: usize| ZoneEvent {
            event: hexfleet_protocol::zone::ZoneEventKind::Entered,
            zone: hexfleet_model::ZoneId::new("z").unwrap(),
            cause: hexfleet_protocol::zone::ZoneCause::Moved,
            at_ms: i as i64,
            vehicle: state("v1", 1),
        };
        // Every flush fails: what waits is kept, and more keeps coming.
        let (mut failed, mut events) = (Stage::new(), Events::new());
        for round in 0..3 {
            let batch: Vec<ZoneEvent> = (0..MAX_PENDING_EVENTS / 2 + 10).map(event).collect();
            w.stage_events(shard(), batch);
            w.take_into(&mut failed, &mut events, &mut Tombs::new());
            let held: usize = events.values().map(Vec::len).sum();
            assert!(held <= MAX_PENDING_EVENTS, "round {round}: {held} held");
        }
        let held: usize = events.values().map(Vec::len).sum();
        assert_eq!(held, MAX_PENDING_EVENTS);
        let staged = 3 * (MAX_PENDING_EVENTS / 2 + 10);
        assert_eq!(
            metrics.zone_events_dropped.get(),
            (staged - MAX_PENDING_EVENTS) as u64
        );
        // The oldest are kept, in order.
        assert_eq!(events[&shard()][0].at_ms, 0);
    }

    #[test]
    fn a_removal_after_an_upsert_wins_and_a_failed_batch_merges_under_newer_changes() {
        let w = StoreWriter::new(Arc::new(Metrics::new()));
        w.stage_upsert(shard(), state("v1", 1), true);
        let mut failed = Stage::new();
        w.take_into(&mut failed, &mut Events::new(), &mut Tombs::new());
        // The flush of `failed` failed; meanwhile the vehicle went away.
        w.stage_removal(shard(), &state("v1", 1), Some(RemoveReason::Offline));
        w.take_into(&mut failed, &mut Events::new(), &mut Tombs::new());
        let batch = to_batch(&failed, &Events::new(), |_| Some(None));
        assert_eq!(batch.shards[0].upserts, vec![]);
        assert_eq!(batch.shards[0].removals.len(), 1);
    }
}
