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
//! - this module: the handle everyone else talks to, and the task's loop;
//! - `index`: vehicles by cell, subscribers by watched cell, and which
//!   delta each watcher is owed;
//! - `density`: the counts.

mod density;
mod index;

use std::{
    collections::HashMap,
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc,
    },
};

use h3o::CellIndex;
use hexfleet_model::{IndexCell, VehicleId, VehicleState};
use hexfleet_protocol::{Filter, RemoveReason};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

pub use self::{density::Density, index::Index};
use crate::{
    mailbox::Mailbox,
    metrics::Metrics,
    staging::{newest, LatestWins},
};

pub type SubscriberId = u64;

#[derive(Debug, Clone)]
enum VehicleEvent {
    Upsert {
        state: VehicleState,
        cell: IndexCell,
    },
    Removed(RemoveReason),
}

/// A subscriber's wish, waiting for the fan-out task.
enum Command {
    Subscribe {
        cells: Vec<CellIndex>,
        filter: Filter,
        version: u32,
        mailbox: Arc<Mailbox>,
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
}

impl FanOut {
    pub fn new(metrics: Arc<Metrics>) -> Self {
        Self {
            events: LatestWins::new(newest),
            commands: LatestWins::new(newest),
            wake: Notify::new(),
            running: AtomicBool::new(false),
            density: Arc::new(Density::default()),
            next_subscriber: AtomicU64::new(1),
            metrics,
        }
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

    /// A vehicle has a new state (position, class or status).
    pub fn vehicle_changed(&self, state: VehicleState, cell: IndexCell) {
        self.events
            .stage(state.id.clone(), VehicleEvent::Upsert { state, cell });
        self.wake.notify_one();
    }

    /// A vehicle is gone.
    pub fn vehicle_removed(&self, id: VehicleId, reason: RemoveReason) {
        self.events.stage(id, VehicleEvent::Removed(reason));
        self.wake.notify_one();
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
        let (mut commands, mut events) = (HashMap::new(), HashMap::new());
        loop {
            tokio::select! {
                biased;
                _ = shutdown.cancelled() => return,
                _ = self.wake.notified() => {}
            }
            // Both are bounded: one pending change per subscriber, one per
            // vehicle. Subscriptions first, so a snapshot includes the
            // changes staged with it.
            self.commands.take_into(&mut commands);
            for (id, command) in commands.drain() {
                index.command(id, command, &self.metrics);
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
