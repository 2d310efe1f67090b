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

use std::{
    collections::{HashMap, HashSet},
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc,
    },
};

use h3o::{CellIndex, Resolution};
use hexfleet_model::{IndexCell, VehicleClass, VehicleId, VehicleState, VehicleStatus};
use hexfleet_protocol::{dashboard::StatusCounts, Filter, RemoveReason};
use parking_lot::RwLock;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::{
    mailbox::{Change, Mailbox},
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

struct Subscriber {
    cells: HashSet<CellIndex>,
    filter: Filter,
    mailbox: Arc<Mailbox>,
}

impl Subscriber {
    fn sees(&self, cell: CellIndex, state: &VehicleState) -> bool {
        self.cells.contains(&cell) && self.filter.matches(state.class, state.status)
    }
}

/// The fan-out's index. [`FanOut::run`] drives it; it is public so that
/// benchmarks can drive it directly, one change at a time.
#[derive(Default)]
pub struct Index {
    vehicles: HashMap<VehicleId, (CellIndex, VehicleState)>,
    in_cell: HashMap<CellIndex, HashSet<VehicleId>>,
    watchers: HashMap<CellIndex, Vec<SubscriberId>>,
    subscribers: HashMap<SubscriberId, Subscriber>,
    density: Arc<Density>,
}

impl Index {
    pub fn new(density: Arc<Density>) -> Self {
        Self {
            density,
            ..Self::default()
        }
    }

    /// Adds (or replaces) a subscriber, as [`FanOut::subscribe`] does.
    pub fn subscribe(
        &mut self,
        id: SubscriberId,
        cells: Vec<CellIndex>,
        filter: Filter,
        version: u32,
        mailbox: Arc<Mailbox>,
        metrics: &Metrics,
    ) {
        let new = Subscriber {
            cells: cells.into_iter().collect(),
            filter,
            mailbox,
        };
        // A subscriber that comes back with another mailbox (a dashboard
        // switching modes) starts a fresh view: a snapshot, not a difference.
        let previous = self
            .detach(id, metrics)
            .filter(|old| Arc::ptr_eq(&old.mailbox, &new.mailbox));
        match previous {
            None => new.mailbox.reset(
                version,
                self.view(&new.cells, &new.filter).cloned().collect(),
            ),
            Some(old) => {
                let before: HashSet<&VehicleId> =
                    self.view(&old.cells, &old.filter).map(|s| &s.id).collect();
                let after: HashMap<&VehicleId, &VehicleState> = self
                    .view(&new.cells, &new.filter)
                    .map(|s| (&s.id, s))
                    .collect();
                for gone in before.iter().filter(|id| !after.contains_key(*id)) {
                    let still_watched = self
                        .vehicles
                        .get(*gone)
                        .is_some_and(|(c, _)| new.cells.contains(c));
                    let reason = if still_watched {
                        RemoveReason::Filtered
                    } else {
                        RemoveReason::LeftView
                    };
                    self.deliver(&new, gone, Change::Removed(reason), metrics);
                }
                for (id, state) in after.iter().filter(|(id, _)| !before.contains(*id)) {
                    self.deliver(&new, id, Change::Upsert((*state).clone()), metrics);
                }
                new.mailbox.set_version(version);
            }
        }
        for cell in &new.cells {
            self.watchers.entry(*cell).or_default().push(id);
        }
        metrics.subscribed_cells.inc_by(new.cells.len() as i64);
        self.subscribers.insert(id, new);
        metrics.subscribers.set(self.subscribers.len() as i64);
    }

    /// Applies a vehicle's new state, as [`FanOut::vehicle_changed`] does.
    pub fn vehicle_changed(&mut self, state: VehicleState, cell: IndexCell, metrics: &Metrics) {
        self.upsert(state.id.clone(), state, cell.0, metrics);
    }

    fn deliver(&self, sub: &Subscriber, id: &VehicleId, change: Change, metrics: &Metrics) {
        if sub.mailbox.push(id.clone(), change) {
            metrics.mailbox_coalesced.inc();
        }
    }

    fn vehicle(&mut self, id: VehicleId, event: VehicleEvent, metrics: &Metrics) {
        match event {
            VehicleEvent::Upsert { state, cell } => self.upsert(id, state, cell.0, metrics),
            VehicleEvent::Removed(reason) => self.remove(&id, reason, metrics),
        }
    }

    fn upsert(&mut self, id: VehicleId, state: VehicleState, cell: CellIndex, metrics: &Metrics) {
        let old = self.vehicles.insert(id.clone(), (cell, state.clone()));
        self.density.shift(
            old.as_ref().map(|(c, s)| Tallied::of(*c, s)),
            Some(Tallied::of(cell, &state)),
        );
        let old_cell = old.as_ref().map(|(c, _)| *c);
        if old_cell != Some(cell) {
            if let Some(c) = old_cell {
                self.unindex(c, &id);
            }
            self.in_cell.entry(cell).or_default().insert(id.clone());
        }
        // Watchers of the new cell: added, moved, or filtered out.
        for sub_id in self.watchers.get(&cell).into_iter().flatten() {
            let Some(sub) = self.subscribers.get(sub_id) else {
                continue;
            };
            let was = old.as_ref().is_some_and(|(c, s)| sub.sees(*c, s));
            let now = sub.filter.matches(state.class, state.status);
            let change = match (was, now) {
                (false, true) => Change::Upsert(state.clone()),
                (true, true) => match &old {
                    Some((_, s)) if s.class == state.class && s.status == state.status => {
                        Change::Moved(state.clone())
                    }
                    _ => Change::Upsert(state.clone()),
                },
                (true, false) => Change::Removed(RemoveReason::Filtered),
                (false, false) => continue,
            };
            self.deliver(sub, &id, change, metrics);
        }
        // Watchers of only the old cell: it left their view.
        if let Some((old_cell, old_state)) = old.filter(|(c, _)| *c != cell) {
            for sub_id in self.watchers.get(&old_cell).into_iter().flatten() {
                let Some(sub) = self.subscribers.get(sub_id) else {
                    continue;
                };
                if !sub.cells.contains(&cell) && sub.sees(old_cell, &old_state) {
                    self.deliver(sub, &id, Change::Removed(RemoveReason::LeftView), metrics);
                }
            }
        }
    }

    fn unindex(&mut self, cell: CellIndex, id: &VehicleId) {
        if let Some(ids) = self.in_cell.get_mut(&cell) {
            ids.remove(id);
            if ids.is_empty() {
                self.in_cell.remove(&cell);
            }
        }
    }

    fn remove(&mut self, id: &VehicleId, reason: RemoveReason, metrics: &Metrics) {
        let Some((cell, state)) = self.vehicles.remove(id) else {
            return;
        };
        self.density.shift(Some(Tallied::of(cell, &state)), None);
        self.unindex(cell, id);
        for sub_id in self.watchers.get(&cell).into_iter().flatten() {
            let Some(sub) = self.subscribers.get(sub_id) else {
                continue;
            };
            if sub.sees(cell, &state) {
                self.deliver(sub, id, Change::Removed(reason), metrics);
            }
        }
    }

    /// The vehicles a subscriber with these cells and filter sees.
    fn view<'a>(
        &'a self,
        cells: &'a HashSet<CellIndex>,
        filter: &'a Filter,
    ) -> impl Iterator<Item = &'a VehicleState> + 'a {
        cells
            .iter()
            .filter_map(|c| self.in_cell.get(c))
            .flatten()
            .filter_map(|id| self.vehicles.get(id))
            .map(|(_, s)| s)
            .filter(|s| filter.matches(s.class, s.status))
    }

    fn command(&mut self, id: SubscriberId, command: Command, metrics: &Metrics) {
        match command {
            Command::Subscribe {
                cells,
                filter,
                version,
                mailbox,
            } => self.subscribe(id, cells, filter, version, mailbox, metrics),
            Command::Unsubscribe => {
                self.detach(id, metrics);
                metrics.subscribers.set(self.subscribers.len() as i64);
            }
        }
    }

    /// Removes a subscriber from the index and returns it.
    fn detach(&mut self, id: SubscriberId, metrics: &Metrics) -> Option<Subscriber> {
        let sub = self.subscribers.remove(&id)?;
        for cell in &sub.cells {
            if let Some(ids) = self.watchers.get_mut(cell) {
                ids.retain(|s| *s != id);
                if ids.is_empty() {
                    self.watchers.remove(cell);
                }
            }
        }
        metrics.subscribed_cells.dec_by(sub.cells.len() as i64);
        Some(sub)
    }
}

/// Vehicles per class and status.
type Tally = [[u32; VehicleStatus::ALL.len()]; VehicleClass::ALL.len()];

/// Where one vehicle is counted: its index cell, class and status.
#[derive(Clone, Copy, PartialEq)]
struct Tallied {
    cell: CellIndex,
    class: usize,
    status: usize,
}

impl Tallied {
    fn of(cell: CellIndex, state: &VehicleState) -> Self {
        Self {
            cell,
            class: state.class as usize,
            status: state.status as usize,
        }
    }
}

/// Live vehicle counts per cell, by class and status, at every resolution
/// coarser than the index resolution (a vehicle counts in each parent of its
/// index cell). Only the fan-out task writes; dashboards read a few hundred
/// cells at a time, and skip reading when [`Density::generation`] has not
/// moved.
#[derive(Default)]
pub struct Density {
    tallies: RwLock<HashMap<CellIndex, Tally>>,
    generation: AtomicU64,
}

impl Density {
    /// Changes each time any count does.
    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    /// Counts by status of the vehicles in each cell that match `filter`.
    pub fn counts(&self, cells: &[CellIndex], filter: &Filter) -> Vec<StatusCounts> {
        let tallies = self.tallies.read();
        cells
            .iter()
            .map(|cell| {
                let mut counts = StatusCounts::default();
                if let Some(tally) = tallies.get(cell) {
                    for class in VehicleClass::ALL {
                        for status in VehicleStatus::ALL {
                            if filter.matches(class, status) {
                                counts.add(status, tally[class as usize][status as usize]);
                            }
                        }
                    }
                }
                counts
            })
            .collect()
    }

    /// Moves one vehicle's count from where it was to where it is.
    fn shift(&self, from: Option<Tallied>, to: Option<Tallied>) {
        if from == to {
            return;
        }
        let mut tallies = self.tallies.write();
        // From the finest parent up: once both have the same parent (and
        // class and status), every coarser parent is the same too.
        let finest = from.or(to).map_or(0, |t| u8::from(t.cell.resolution()));
        for res in (0..finest)
            .rev()
            .filter_map(|r| Resolution::try_from(r).ok())
        {
            let parent = |t: Tallied| t.cell.parent(res).map(|p| (p, t.class, t.status));
            let (old, new) = (from.and_then(parent), to.and_then(parent));
            if old == new {
                break;
            }
            if let Some((cell, class, status)) = old {
                if let Some(tally) = tallies.get_mut(&cell) {
                    tally[class][status] = tally[class][status].saturating_sub(1);
                    if tally.iter().flatten().all(|n| *n == 0) {
                        tallies.remove(&cell);
                    }
                }
            }
            if let Some((cell, class, status)) = new {
                tallies.entry(cell).or_default()[class][status] += 1;
            }
        }
        self.generation.fetch_add(1, Ordering::Release);
    }
}

#[cfg(test)]
mod tests {
    use hexfleet_model::{CellModel, Position};

    use super::*;

    fn state(i: usize, lat: f64, lon: f64, status: VehicleStatus) -> VehicleState {
        VehicleState {
            id: VehicleId::new(&format!("v{i}")).unwrap(),
            lat,
            lon,
            heading_deg: 0.0,
            speed_mps: 0.0,
            accuracy_m: 1.0,
            fix_time_ms: 0,
            seq: 1,
            class: VehicleClass::ALL[i % VehicleClass::ALL.len()],
            status,
            seen_ms: 0,
        }
    }

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

    #[test]
    fn density_counts_match_a_recount_after_moves_status_changes_and_removals() {
        let cells = CellModel::default();
        let metrics = Metrics::new();
        let density = Arc::new(Density::default());
        let mut index = Index::new(density.clone());
        let mut truth: HashMap<usize, (CellIndex, VehicleState)> = HashMap::new();
        let mut seed = 7u64;
        let mut next = move |n: u64| {
            seed = seed.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1);
            (seed >> 33) % n
        };
        for step in 0..3_000 {
            let i = next(200) as usize;
            if next(10) == 0 {
                index.remove(
                    &state(i, 0.0, 0.0, VehicleStatus::Available).id,
                    RemoveReason::Stale,
                    &metrics,
                );
                truth.remove(&i);
                continue;
            }
            let lat = 52.40 + next(2_000) as f64 * 1e-4;
            let lon = 13.30 + next(2_000) as f64 * 1e-4;
            let status = VehicleStatus::ALL[(step % 7) % 3];
            let (cell, _) = cells.locate(Position::new(lat, lon).unwrap());
            let s = state(i, lat, lon, status);
            index.vehicle_changed(s.clone(), cell, &metrics);
            truth.insert(i, (cell.0, s));
        }
        let filter = Filter {
            classes: vec![VehicleClass::Xl, VehicleClass::Van],
            statuses: Vec::new(),
        };
        for res in [Resolution::Four, Resolution::Six, Resolution::Eight] {
            let mut expected: HashMap<CellIndex, StatusCounts> = HashMap::new();
            for (cell, s) in truth.values() {
                if filter.matches(s.class, s.status) {
                    expected
                        .entry(cell.parent(res).unwrap())
                        .or_default()
                        .add(s.status, 1);
                }
            }
            let coarse: Vec<CellIndex> = expected.keys().copied().collect();
            let counted = density.counts(&coarse, &filter);
            for (cell, counts) in coarse.iter().zip(counted) {
                assert_eq!(counts, expected[cell], "{cell} at {res}");
            }
        }
        // Nothing left over once everyone is gone.
        for i in truth.keys() {
            index.remove(
                &state(*i, 0.0, 0.0, VehicleStatus::Available).id,
                RemoveReason::Offline,
                &metrics,
            );
        }
        assert!(density.tallies.read().is_empty());
    }
}
