//! The fan-out's index: vehicles by index cell, subscribers by watched cell.
//! For a vehicle change, each subscriber watching its old or new cell is
//! owed an `added`, `moved` or `removed` (with its reason), or nothing.

use std::{
    collections::{HashMap, HashSet},
    sync::Arc,
    time::Instant,
};

use h3o::CellIndex;
use hexfleet_model::{IndexCell, ShardId, VehicleId, VehicleState};
use hexfleet_protocol::{Filter, RemoveReason};

use super::{
    density::{Density, Tallied},
    Command, Reach, Shards, SubscriberId, VehicleEvent,
};
use crate::{
    mailbox::{Change, Mailbox},
    metrics::Metrics,
};

struct Subscriber {
    cells: HashSet<CellIndex>,
    filter: Filter,
    mailbox: Arc<Mailbox>,
    /// The shards whose vehicles can stand in `cells` (clustered only).
    shards: HashSet<ShardId>,
}

/// A vehicle as the index holds it.
struct Tracked {
    cell: CellIndex,
    state: VehicleState,
    /// The shard it was last heard of in (local or replicated).
    shard: ShardId,
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
    vehicles: HashMap<VehicleId, Tracked>,
    in_cell: HashMap<CellIndex, HashSet<VehicleId>>,
    watchers: HashMap<CellIndex, Vec<SubscriberId>>,
    subscribers: HashMap<SubscriberId, Subscriber>,
    density: Arc<Density>,
    reach: Option<Reach>,
    /// Vehicles in transit, and until when they are kept.
    transits: HashMap<VehicleId, Instant>,
    /// Subscribers (and density dashboards) per watched shard.
    shard_watchers: HashMap<ShardId, u32>,
    /// Density dashboards' shards.
    replicated: HashMap<SubscriberId, HashSet<ShardId>>,
    needed_changed: bool,
}

impl Index {
    pub fn new(density: Arc<Density>) -> Self {
        Self {
            density,
            ..Self::default()
        }
    }

    pub fn set_reach(&mut self, reach: Option<Reach>) {
        self.reach = reach;
    }

    /// The watched shards, if they changed since last taken.
    pub(super) fn take_needed_shards(&mut self) -> Option<Shards> {
        if !std::mem::take(&mut self.needed_changed) {
            return None;
        }
        Some(Arc::new(self.shard_watchers.keys().copied().collect()))
    }

    fn watch_shards<'a>(&mut self, shards: impl IntoIterator<Item = &'a ShardId>, by: i32) {
        for shard in shards {
            let count = self.shard_watchers.entry(*shard).or_default();
            *count = count.saturating_add_signed(by);
            if *count == 0 {
                self.shard_watchers.remove(shard);
                self.needed_changed = true;
            } else if *count == 1 && by > 0 {
                self.needed_changed = true;
            }
        }
    }

    /// Removes the vehicles whose transit grace is over: they did not show
    /// up anywhere else.
    pub fn expire_transits(&mut self, now: Instant, metrics: &Metrics) {
        let expired: Vec<VehicleId> = self
            .transits
            .iter()
            .filter(|(_, until)| **until <= now)
            .map(|(id, _)| id.clone())
            .collect();
        for id in expired {
            self.transits.remove(&id);
            self.remove(&id, RemoveReason::Offline, metrics);
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
        let shards = match self.reach {
            Some(reach) => reach
                .cells
                .shards_watching(cells.iter().copied(), reach.margin_m),
            None => HashSet::new(),
        };
        let new = Subscriber {
            cells: cells.into_iter().collect(),
            filter,
            mailbox,
            shards,
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
                        .is_some_and(|t| new.cells.contains(&t.cell));
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
        self.watch_shards(&new.shards, 1);
        self.subscribers.insert(id, new);
        metrics.subscribers.set(self.subscribers.len() as i64);
    }

    /// Applies a vehicle's new state, as [`FanOut::vehicle_changed`] does.
    pub fn vehicle_changed(
        &mut self,
        state: VehicleState,
        cell: IndexCell,
        shard: ShardId,
        metrics: &Metrics,
    ) {
        self.upsert(state.id.clone(), state, cell.0, shard, metrics);
    }

    fn deliver(&self, sub: &Subscriber, id: &VehicleId, change: Change, metrics: &Metrics) {
        if sub.mailbox.push(id.clone(), change) {
            metrics.mailbox_coalesced.inc();
        }
    }

    pub(super) fn vehicle(&mut self, id: VehicleId, event: VehicleEvent, metrics: &Metrics) {
        let shard = event.shard();
        let Some(tracked) = self.vehicles.get(&id) else {
            if let VehicleEvent::Upsert { state, cell, shard } = event {
                self.upsert(id, state, cell.0, shard, metrics);
            }
            return;
        };
        // A shard the vehicle already left has nothing more to say about it.
        let from_its_shard = tracked.shard == shard;
        match event {
            VehicleEvent::Upsert { state, cell, shard } => {
                self.upsert(id, state, cell.0, shard, metrics)
            }
            VehicleEvent::Removed { reason, .. } if from_its_shard => {
                self.transits.remove(&id);
                self.remove(&id, reason, metrics)
            }
            VehicleEvent::Transit { .. } if from_its_shard => {
                if let Some(reach) = self.reach {
                    self.transits
                        .insert(id, Instant::now() + reach.transit_grace);
                }
            }
            VehicleEvent::Removed { .. } | VehicleEvent::Transit { .. } => {}
        }
    }

    fn upsert(
        &mut self,
        id: VehicleId,
        state: VehicleState,
        cell: CellIndex,
        shard: ShardId,
        metrics: &Metrics,
    ) {
        if let Some(held) = self.vehicles.get_mut(&id) {
            // An older state (a replica's batch overtaken by the vehicle's
            // new owner) changes nothing.
            if state.seq < held.state.seq {
                return;
            }
            if held.state == state && held.cell == cell {
                held.shard = shard;
                self.transits.remove(&id);
                return;
            }
        }
        self.transits.remove(&id);
        let old = self
            .vehicles
            .insert(
                id.clone(),
                Tracked {
                    cell,
                    state: state.clone(),
                    shard,
                },
            )
            .map(|t| (t.cell, t.state));
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

    pub(super) fn remove(&mut self, id: &VehicleId, reason: RemoveReason, metrics: &Metrics) {
        let Some(Tracked { cell, state, .. }) = self.vehicles.remove(id) else {
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
            .map(|t| &t.state)
            .filter(|s| filter.matches(s.class, s.status))
    }

    pub(super) fn command(&mut self, id: SubscriberId, command: Command, metrics: &Metrics) {
        match command {
            Command::Subscribe {
                cells,
                filter,
                version,
                mailbox,
            } => self.subscribe(id, cells, filter, version, mailbox, metrics),
            Command::Replicate { shards } => {
                self.detach(id, metrics);
                self.watch_shards(&shards, 1);
                self.replicated.insert(id, shards);
                metrics.subscribers.set(self.subscribers.len() as i64);
            }
            Command::Unsubscribe => {
                self.detach(id, metrics);
                metrics.subscribers.set(self.subscribers.len() as i64);
            }
        }
    }

    /// Removes a subscriber from the index and returns it.
    fn detach(&mut self, id: SubscriberId, metrics: &Metrics) -> Option<Subscriber> {
        if let Some(shards) = self.replicated.remove(&id) {
            self.watch_shards(&shards, -1);
        }
        let sub = self.subscribers.remove(&id)?;
        self.watch_shards(&sub.shards, -1);
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
