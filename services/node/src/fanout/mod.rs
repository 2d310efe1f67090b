//! The fan-out: who must hear about a vehicle change, and what.
//!
//! One task owns the index — vehicles by index cell, subscribers by watched
//! cell — and applies vehicle changes and subscription changes one at a time,
//! so a subscriber's snapshot and the deltas after it are always consistent.
//! Ingest stages vehicle changes latest-wins and never waits; the cost of a
//! change is proportional to the subscribers watching its old and new cells,
//! not to all subscribers.
//!
//! For each subscriber watching the vehicle's old or new cell, the change is
//! an `added`, `moved` or `removed` (with its reason) in that subscriber's
//! [`Mailbox`], or nothing at all.
//!
//! The same task keeps [`Density`]: live counts per cell at every resolution
//! coarser than the index's, which dashboards showing a wide area read.
//!
//! In a cluster, vehicles come from this node's own shards and from
//! replicas of other nodes' shards alike, and the index knows a vehicle by
//! its id wherever it comes from. A vehicle that leaves a shard for another
//! (crossing a boundary, handed to another node) is *in transit*: it stays
//! where it was until it shows up in its new shard, and moves there; only if
//! it does not within the transit grace is it removed (`offline`). So a
//! hand-off is never a `removed` then `added`. Changes from a shard the
//! vehicle already left, and states older than the one held, are ignored.
//! The task also says which shards its subscribers watch
//! ([`FanOut::needed_shards`]), so the cluster replicates exactly those.
//!
//! - this module: the handle everyone else talks to, and the task's loop;
//! - `index`: vehicles by cell, subscribers by watched cell, and which
//!   delta each watcher is owed;
//! - `density`: the counts.

mod density;
mod index;

use std::{
    collections::{HashMap, HashSet},
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc,
    },
    time::Duration,
};

use h3o::CellIndex;
use hexfleet_model::{CellModel, IndexCell, ShardId, VehicleId, VehicleState};
use hexfleet_protocol::{Filter, RemoveReason};
use tokio::sync::{watch, Notify};
use tokio_util::sync::CancellationToken;

pub use self::{density::Density, index::Index};
use crate::{mailbox::Mailbox, metrics::Metrics, staging::LatestWins};

pub type SubscriberId = u64;

/// The shards subscribers watch, shared with the cluster's replicas.
pub type Shards = Arc<HashSet<ShardId>>;

#[derive(Debug, Clone)]
enum VehicleEvent {
    Upsert {
        state: VehicleState,
        cell: IndexCell,
        shard: ShardId,
    },
    Removed {
        reason: RemoveReason,
        shard: ShardId,
    },
    /// It left `shard` for another, where it will show up.
    Transit { shard: ShardId },
}

impl VehicleEvent {
    fn shard(&self) -> ShardId {
        match self {
            Self::Upsert { shard, .. } | Self::Removed { shard, .. } | Self::Transit { shard } => {
                *shard
            }
        }
    }
}

/// Folds a vehicle's newer event into one still waiting. Events of one
/// vehicle can come from two shards at once (it crossed a boundary, and the
/// two shards' batches arrive in either order): a shard's word that the
/// vehicle left never erases a state from another shard, and an older
/// state never replaces a newer one.
fn merge(older: Option<VehicleEvent>, newer: VehicleEvent) -> VehicleEvent {
    match (older, newer) {
        (Some(old @ VehicleEvent::Upsert { .. }), newer)
            if !matches!(newer, VehicleEvent::Upsert { .. }) && newer.shard() != old.shard() =>
        {
            old
        }
        (Some(old), newer) if older_state(&newer, &old) => old,
        (_, newer) => newer,
    }
}

/// Whether `newer` is an upsert of an older fix than the upsert `old`.
fn older_state(newer: &VehicleEvent, old: &VehicleEvent) -> bool {
    match (newer, old) {
        (VehicleEvent::Upsert { state: n, .. }, VehicleEvent::Upsert { state: o, .. }) => {
            n.seq < o.seq
        }
        _ => false,
    }
}

/// What a clustered fan-out needs to know: how vehicles are located, how
/// far beyond its shard a vehicle may stand, and how long one in transit
/// is kept.
#[derive(Debug, Clone, Copy)]
pub struct Reach {
    pub cells: CellModel,
    pub margin_m: f64,
    pub transit_grace: Duration,
}

/// A subscriber's wish, waiting for the fan-out task.
enum Command {
    Subscribe {
        cells: Vec<CellIndex>,
        filter: Filter,
        version: u32,
        mailbox: Arc<Mailbox>,
    },
    /// A dashboard showing counts over `shards`: no deltas, but the
    /// shards must be replicated.
    Replicate {
        shards: HashSet<ShardId>,
    },
    Unsubscribe,
}

/// The handle ingest and sessions talk to; the index lives in [`FanOut::run`].
///
/// Vehicle changes and subscription changes are both staged latest-wins
/// (per vehicle, per subscriber), so what waits for the task is bounded by
/// the vehicles and subscribers there are, however fast anyone sends: a
/// newer subscription replaces one still waiting.
pub struct FanOut {
    events: LatestWins<VehicleId, VehicleEvent>,
    commands: LatestWins<SubscriberId, Command>,
    wake: Notify,
    running: AtomicBool,
    density: Arc<Density>,
    next_subscriber: AtomicU64,
    metrics: Arc<Metrics>,
    reach: Option<Reach>,
    needed: watch::Sender<Shards>,
}

impl FanOut {
    /// A single node's fan-out: every vehicle is its own.
    pub fn new(metrics: Arc<Metrics>) -> Self {
        Self::with_reach(metrics, None)
    }

    /// A clustered node's fan-out (see the module's notes on transit).
    pub fn with_reach(metrics: Arc<Metrics>, reach: Option<Reach>) -> Self {
        Self {
            events: LatestWins::new(merge),
            commands: LatestWins::new(crate::staging::newest),
            wake: Notify::new(),
            running: AtomicBool::new(false),
            density: Arc::new(Density::default()),
            next_subscriber: AtomicU64::new(1),
            metrics,
            reach,
            needed: watch::Sender::new(Shards::default()),
        }
    }

    /// The shards this node's subscribers watch (with the hand-off margin),
    /// updated as subscriptions change.
    pub fn needed_shards(&self) -> watch::Receiver<Shards> {
        self.needed.subscribe()
    }

    fn command(&self, id: SubscriberId, command: Command) {
        if self.commands.stage(id, command) {
            self.metrics.subscriptions_replaced.inc();
        }
        self.wake.notify_one();
    }

    /// A subscriber id no other subscriber of this node has.
    pub fn new_subscriber_id(&self) -> SubscriberId {
        self.next_subscriber.fetch_add(1, Ordering::Relaxed)
    }

    /// Live counts per coarse cell, kept by the fan-out task.
    pub fn density(&self) -> &Arc<Density> {
        &self.density
    }

    /// A vehicle of `shard` has a new state (position, class or status).
    pub fn vehicle_changed(&self, state: VehicleState, cell: IndexCell, shard: ShardId) {
        self.events.stage(
            state.id.clone(),
            VehicleEvent::Upsert { state, cell, shard },
        );
        self.wake.notify_one();
    }

    /// A vehicle of `shard` is gone.
    pub fn vehicle_removed(&self, id: VehicleId, reason: RemoveReason, shard: ShardId) {
        self.events
            .stage(id, VehicleEvent::Removed { reason, shard });
        self.wake.notify_one();
    }

    /// A vehicle left `shard` for another shard or node, where it will
    /// show up: kept as it is until then (or until the transit grace).
    pub fn vehicle_in_transit(&self, id: VehicleId, shard: ShardId) {
        self.events.stage(id, VehicleEvent::Transit { shard });
        self.wake.notify_one();
    }

    /// A dashboard showing counts over `shards` (replicated in a cluster).
    pub fn replicate(&self, id: SubscriberId, shards: HashSet<ShardId>) {
        self.command(id, Command::Replicate { shards });
    }

    /// Sets (or replaces) a subscriber's watched cells and filter. A new
    /// subscriber gets a snapshot; an existing one gets only the difference.
    pub fn subscribe(
        &self,
        id: SubscriberId,
        cells: Vec<CellIndex>,
        filter: Filter,
        version: u32,
        mailbox: Arc<Mailbox>,
    ) {
        self.command(
            id,
            Command::Subscribe {
                cells,
                filter,
                version,
                mailbox,
            },
        );
    }

    pub fn unsubscribe(&self, id: SubscriberId) {
        self.command(id, Command::Unsubscribe);
    }

    /// Runs the fan-out until shutdown. Call once.
    pub async fn run(self: Arc<Self>, shutdown: CancellationToken) {
        if self.running.swap(true, Ordering::AcqRel) {
            tracing::error!("the fan-out was started twice");
            return;
        }
        let mut index = Index::new(self.density.clone());
        index.set_reach(self.reach);
        let (mut commands, mut events) = (HashMap::new(), HashMap::new());
        // Vehicles in transit are looked at a few times a second.
        let mut transits = tokio::time::interval(Duration::from_millis(250));
        transits.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                biased;
                _ = shutdown.cancelled() => return,
                _ = self.wake.notified() => {}
                _ = transits.tick(), if self.reach.is_some() => {
                    index.expire_transits(std::time::Instant::now(), &self.metrics);
                }
            }
            // Both are bounded: one pending change per subscriber, one per
            // vehicle. Subscriptions first, so a snapshot includes the
            // changes staged with it.
            self.commands.take_into(&mut commands);
            for (id, command) in commands.drain() {
                index.command(id, command, &self.metrics);
            }
            if let Some(needed) = index.take_needed_shards() {
                self.needed.send_replace(needed);
            }
            self.events.take_into(&mut events);
            for (id, event) in events.drain() {
                index.vehicle(id, event, &self.metrics);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_flood_of_subscription_changes_from_one_subscriber_leaves_one_waiting() {
        let metrics = Arc::new(Metrics::new());
        let fanout = FanOut::new(metrics.clone());
        let mailbox = Arc::new(Mailbox::new());
        for version in 0..20_000 {
            fanout.subscribe(7, Vec::new(), Filter::any(), version, mailbox.clone());
        }
        let mut waiting = HashMap::new();
        fanout.commands.take_into(&mut waiting);
        assert_eq!(waiting.len(), 1);
        assert!(matches!(
            waiting[&7],
            Command::Subscribe {
                version: 19_999,
                ..
            }
        ));
        assert_eq!(metrics.subscriptions_replaced.get(), 19_999);
    }
}
