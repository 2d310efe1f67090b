//! A subscriber's mailbox: what its view is owed, latest wins per vehicle.
//!
//! The fan-out puts changes in; the subscriber's writer takes them all out
//! whenever it is free to write. While the writer is busy (a slow network, a
//! slow phone), changes to one vehicle fold into one, so a mailbox never holds
//! more than one entry per vehicle in view, and the fan-out never waits.

use std::collections::HashMap;

use hexfleet_model::{VehicleId, VehicleState};
use hexfleet_protocol::RemoveReason;
use parking_lot::Mutex;
use tokio::sync::Notify;

/// What the subscriber must learn about one vehicle.
#[derive(Debug, Clone, PartialEq)]
pub enum Change {
    /// Entered the view, or changed more than its position: send it whole.
    Upsert(VehicleState),
    /// Only moved: position, heading and speed suffice.
    Moved(VehicleState),
    Removed(RemoveReason),
}

/// Folds a newer change over an older one for the same vehicle.
fn fold(older: Option<Change>, newer: Change) -> Change {
    match (older, newer) {
        // The subscriber has not yet learned the vehicle's full state.
        (Some(Change::Upsert(_)) | Some(Change::Removed(_)), Change::Moved(state)) => {
            Change::Upsert(state)
        }
        (_, newer) => newer,
    }
}

/// What a viewer (a rider, a dashboard) is owed for one change, given
/// whether it has been shown the vehicle.
#[derive(Debug, Clone, PartialEq)]
pub enum Delta {
    /// New to the viewer, or changed more than its position: the full state.
    Added(VehicleId, VehicleState),
    /// Already shown, only moved.
    Moved(VehicleId, VehicleState),
    Removed(VehicleId, RemoveReason),
}

impl Delta {
    /// The delta for `change`; none for the removal of a vehicle the viewer
    /// was never shown.
    pub fn of(id: VehicleId, change: Change, shown: bool) -> Option<Delta> {
        match change {
            Change::Removed(reason) => shown.then_some(Delta::Removed(id, reason)),
            Change::Moved(state) if shown => Some(Delta::Moved(id, state)),
            Change::Moved(state) | Change::Upsert(state) => Some(Delta::Added(id, state)),
        }
    }
}

/// Cuts items, each with its cost, into frames whose costs add up to at most
/// `budget` (an item costing more goes alone). There is always at least one
/// frame: a reset or a new subscription with no changes still tells the
/// viewer where its view stands.
pub fn frames<T>(items: impl IntoIterator<Item = (T, usize)>, budget: usize) -> Vec<Vec<T>> {
    let mut frames = vec![Vec::new()];
    let mut used = 0;
    for (item, cost) in items {
        if used + cost > budget && used > 0 {
            frames.push(Vec::new());
            used = 0;
        }
        used += cost;
        // Never empty: it starts with one frame and only grows.
        if let Some(frame) = frames.last_mut() {
            frame.push(item);
        }
    }
    frames
}

/// Everything taken from a mailbox at once.
#[derive(Debug, Default, PartialEq)]
pub struct Drained {
    /// The subscriber's view restarts: forget what was sent before.
    pub reset: bool,
    /// The latest subscription the changes reflect.
    pub version: u32,
    pub changes: Vec<(VehicleId, Change)>,
}

#[derive(Default)]
struct Pending {
    reset: bool,
    version: u32,
    version_changed: bool,
    changes: HashMap<VehicleId, Change>,
}

#[derive(Default)]
pub struct Mailbox {
    pending: Mutex<Pending>,
    ready: Notify,
}

impl Mailbox {
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds a change; returns whether it folded into a pending one.
    pub fn push(&self, id: VehicleId, change: Change) -> bool {
        let folded = {
            let mut p = self.pending.lock();
            let older = p.changes.remove(&id);
            let folded = older.is_some();
            p.changes.insert(id, fold(older, change));
            folded
        };
        self.ready.notify_one();
        folded
    }

    /// Replaces everything pending with a fresh view (a snapshot).
    pub fn reset(&self, version: u32, view: Vec<VehicleState>) {
        {
            let mut p = self.pending.lock();
            p.reset = true;
            p.version = version;
            p.version_changed = true;
            p.changes = view
                .into_iter()
                .map(|s| (s.id.clone(), Change::Upsert(s)))
                .collect();
        }
        self.ready.notify_one();
    }

    /// Marks the pending changes as reflecting subscription `version`.
    pub fn set_version(&self, version: u32) {
        {
            let mut p = self.pending.lock();
            p.version = version;
            p.version_changed = true;
        }
        self.ready.notify_one();
    }

    /// Takes everything pending, or `None` when there is nothing to say.
    pub fn take(&self) -> Option<Drained> {
        let mut p = self.pending.lock();
        if p.changes.is_empty() && !p.reset && !p.version_changed {
            return None;
        }
        let drained = Drained {
            reset: std::mem::take(&mut p.reset),
            version: p.version,
            changes: p.changes.drain().collect(),
        };
        p.version_changed = false;
        Some(drained)
    }

    /// Waits until something is pending (or was pushed since the last take).
    pub async fn ready(&self) {
        self.ready.notified().await;
    }

    pub fn len(&self) -> usize {
        self.pending.lock().changes.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use hexfleet_model::{VehicleClass, VehicleStatus};

    use super::*;

    fn state(id: &str, lat: f64) -> VehicleState {
        VehicleState {
            id: VehicleId::new(id).unwrap(),
            lat,
            lon: 13.4,
            heading_deg: 0.0,
            speed_mps: 0.0,
            accuracy_m: 1.0,
            fix_time_ms: 0,
            seq: 1,
            class: VehicleClass::Economy,
            status: VehicleStatus::Available,
            seen_ms: 0,
            zones: Vec::new(),
            clock_offset_ms: 0,
        }
    }

    fn id(s: &str) -> VehicleId {
        VehicleId::new(s).unwrap()
    }

    #[test]
    fn moves_of_one_vehicle_coalesce_to_the_latest_position() {
        let m = Mailbox::new();
        assert!(!m.push(id("a"), Change::Moved(state("a", 1.0))));
        for i in 2..100 {
            assert!(m.push(id("a"), Change::Moved(state("a", f64::from(i)))));
        }
        let d = m.take().unwrap();
        assert_eq!(d.changes, vec![(id("a"), Change::Moved(state("a", 99.0)))]);
        assert_eq!(m.take(), None);
    }

    #[test]
    fn a_move_after_an_unsent_add_is_still_an_add() {
        let m = Mailbox::new();
        m.push(id("a"), Change::Upsert(state("a", 1.0)));
        m.push(id("a"), Change::Moved(state("a", 2.0)));
        assert_eq!(
            m.take().unwrap().changes,
            vec![(id("a"), Change::Upsert(state("a", 2.0)))]
        );
    }

    #[test]
    fn a_removal_wins_over_pending_moves_and_a_reset_replaces_everything() {
        let m = Mailbox::new();
        m.push(id("a"), Change::Moved(state("a", 1.0)));
        m.push(id("a"), Change::Removed(RemoveReason::Stale));
        m.push(id("b"), Change::Moved(state("b", 1.0)));
        m.reset(4, vec![state("c", 3.0)]);
        let d = m.take().unwrap();
        assert!(d.reset);
        assert_eq!(d.version, 4);
        assert_eq!(d.changes, vec![(id("c"), Change::Upsert(state("c", 3.0)))]);
    }

    #[test]
    fn a_version_change_alone_is_worth_telling() {
        let m = Mailbox::new();
        m.set_version(2);
        let d = m.take().unwrap();
        assert_eq!((d.reset, d.version, d.changes.len()), (false, 2, 0));
    }

    #[test]
    fn frames_stay_within_their_budget_and_there_is_always_one() {
        assert_eq!(
            frames(Vec::<(u8, usize)>::new(), 10),
            vec![Vec::<u8>::new()]
        );
        let items = [(1, 4), (2, 4), (3, 4), (4, 30), (5, 1)];
        assert_eq!(
            frames(items, 10),
            vec![vec![1, 2], vec![3], vec![4], vec![5]],
            "an item over the budget goes alone"
        );
        let fifty_each = frames((0..120).map(|i| (i, 1)), 50);
        assert_eq!(
            fifty_each.iter().map(Vec::len).collect::<Vec<_>>(),
            [50, 50, 20]
        );
    }

    #[test]
    fn a_viewer_is_owed_a_move_only_for_what_it_was_shown() {
        let s = state("a", 1.0);
        assert_eq!(
            Delta::of(id("a"), Change::Moved(s.clone()), true),
            Some(Delta::Moved(id("a"), s.clone()))
        );
        assert_eq!(
            Delta::of(id("a"), Change::Moved(s.clone()), false),
            Some(Delta::Added(id("a"), s.clone()))
        );
        assert_eq!(
            Delta::of(id("a"), Change::Upsert(s.clone()), true),
            Some(Delta::Added(id("a"), s))
        );
        assert_eq!(
            Delta::of(id("a"), Change::Removed(RemoveReason::Stale), false),
            None
        );
    }
}
