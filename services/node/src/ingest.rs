//! What happens to a valid fix: it is located (index cell and shard), becomes
//! the vehicle's state in the [`VehicleTable`], is staged for the store, and
//! is handed to the fan-out. This is the one place that changes vehicle
//! state: fixes, reports, sign-offs and evictions all go through it, so the
//! table, the store and the subscribers never disagree about what happened.

use std::{collections::HashMap, sync::Arc, time::Instant};

use hexfleet_model::{
    CellModel, IndexCell, Membership, Position, ShardId, VehicleId, VehicleState, ZoneId,
};
use hexfleet_protocol::{zone::ZoneCause, DriverReport, RemoveReason};
use parking_lot::Mutex;

use crate::{
    clock,
    fanout::FanOut,
    metrics::Metrics,
    store::{seen_due, writer::StoreWriter, Removal, Version},
    table::{Entry, VehicleTable},
    validate::ValidFix,
    zones::{Standing, Trigger, Zones},
};

pub struct Ingest {
    pub cells: CellModel,
    pub table: Arc<VehicleTable>,
    pub writer: Arc<StoreWriter>,
    pub fanout: Arc<FanOut>,
    pub metrics: Arc<Metrics>,
    /// Zone memberships are kept here, with the state: every change of a
    /// vehicle passes through, and its events are staged with its write.
    pub zones: Arc<Zones>,
    /// Vehicles handed to another node as they crossed into its shard:
    /// their copy here stays in the store (nearby reads and replicas keep
    /// finding them) until the new node has written them and left a
    /// tombstone for it, or until [`Ingest::handed_due`] lets it go.
    pub handed: Mutex<HashMap<VehicleId, Handed>>,
}

/// A vehicle whose driver was sent to another node, and whose copy in
/// `shard` (at `last`) waits for that node to write it, until `until`.
#[derive(Debug, Clone, Copy)]
pub struct Handed {
    pub shard: ShardId,
    pub last: Version,
    pub until: Instant,
}

/// What becomes of a handed-off vehicle's copy in its shard.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Handing {
    /// The shard itself changes hands: the vehicle stays in it for the new
    /// owner.
    WithShard,
    /// It crossed into a shard another node owns: its copy here stays until
    /// that node has written it (no gap in what reads find), or until
    /// `until` if its driver arrives nowhere.
    Crossing { until: Instant },
    /// Another node holds a newer state of it already: its copy here goes.
    HeldElsewhere,
}

/// Where an accepted fix is indexed and stored: its index cell, and the
/// shard that keeps the vehicle. That is the cell's shard, except in a
/// cluster while a driver that crossed into another node's shard has not
/// yet gone far enough to be handed over (hysteresis): it stays in its
/// shard a little beyond the edge.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Placed {
    pub cell: IndexCell,
    pub shard: ShardId,
}

impl Ingest {
    /// Where a position is indexed, and its shard.
    pub fn locate(&self, position: Position) -> Placed {
        let (cell, shard) = self.cells.locate(position);
        Placed { cell, shard }
    }

    /// Applies a validated fix of vehicle `id`, as of `now_ms` (node clock),
    /// placed as the router said. `inherited`: the zones the vehicle was in
    /// on the node it comes from, for its first fix here.
    pub fn accept(
        &self,
        id: &VehicleId,
        valid: &ValidFix,
        report: DriverReport,
        now_ms: i64,
        placed: Placed,
        inherited: Option<&[Membership]>,
    ) {
        let Placed { cell, shard } = placed;
        let state = state_of(id, valid, report, now_ms);
        let mut events = Vec::new();
        let mut kept = None;
        let previous = self
            .table
            .upsert_with(Entry { state, cell, shard }, |old, new| {
                let (mut zones, before) = match old {
                    Some(old) => {
                        let zones = std::mem::take(&mut old.state.zones);
                        (zones, Some(Standing::from(&old.state)))
                    }
                    None => (inherited.map(<[_]>::to_vec).unwrap_or_default(), None),
                };
                self.zones.update(
                    &mut zones,
                    &new.state,
                    cell.0,
                    now_ms,
                    Trigger::new(ZoneCause::Moved, before),
                    &mut events,
                );
                new.state.zones = zones;
                kept = Some(new.state.clone());
            });
        // `upsert_with` always prepares the entry.
        let Some(state) = kept else { return };
        self.writer.stage_events(shard, events);
        self.fanout.vehicle_changed(state.clone(), cell, shard);
        let (relocated, seen) = match previous {
            Some(p) if p.shard != shard => {
                self.writer
                    .stage_removal_of(p.shard, id.clone(), p.version, None);
                (true, true)
            }
            Some(p) => (false, seen_due(p.seen_ms, now_ms)),
            None => (true, true),
        };
        self.writer.stage_fix(shard, state, relocated, seen);
        self.metrics.fixes_accepted.inc();
    }

    /// Applies a driver's report (class, status) to its live vehicle. A
    /// vehicle with no accepted fix yet has no state to change; the report
    /// applies from its first fix.
    pub fn report(&self, id: &VehicleId, report: DriverReport, now_ms: i64) {
        let mut events = Vec::new();
        let updated = self.table.update(id, |state| {
            let before = Standing::from(&*state);
            state.class = report.class;
            state.status = report.status;
            state.seen_ms = now_ms;
            // A zone's filter may see the vehicle differently now.
            let trigger = Trigger::new(ZoneCause::Reported, Some(before));
            self.rezone_state(state, now_ms, trigger, &mut events);
        });
        if let Some(entry) = updated {
            self.writer.stage_events(entry.shard, events);
            self.fanout
                .vehicle_changed(entry.state.clone(), entry.cell, entry.shard);
            self.writer.stage_upsert(entry.shard, entry.state, false);
        }
    }

    /// The vehicle is gone (signed off, or offline for too long).
    /// Returns the shard it leaves, if it was held here.
    pub fn sign_off(&self, id: &VehicleId, reason: RemoveReason) -> Option<ShardId> {
        let entry = self.table.remove(id)?;
        tracing::debug!(vehicle = %id, shard = %entry.shard, ?reason, "signed off");
        self.gone(&entry, reason, ZoneCause::SignedOff, clock::now_ms());
        Some(entry.shard)
    }

    /// A vehicle removed from the table is gone for good: it leaves its
    /// zones, the store and the riders' views.
    fn gone(&self, entry: &Entry, reason: RemoveReason, cause: ZoneCause, now_ms: i64) {
        let events = Zones::leave_all(&entry.state, now_ms, cause);
        self.writer.stage_events(entry.shard, events);
        self.writer
            .stage_removal(entry.shard, &entry.state, Some(reason));
        self.fanout
            .vehicle_removed(entry.state.id.clone(), reason, entry.shard);
    }

    /// Applies removals another node made in `shard` but could not write
    /// before the shard became this node's (a sign-off during a Redis
    /// stall, a vehicle that crossed out): a vehicle held here in that
    /// shard at the removed state or an older one goes as it went there; a
    /// newer one is its driver's since, and stays. Returns how many went.
    pub fn apply_tombstones(&self, shard: ShardId, removals: &[Removal]) -> usize {
        let now_ms = clock::now_ms();
        let mut applied = 0;
        for r in removals {
            let outdated = |e: &Entry| e.shard == shard && Version::of(&e.state) <= r.last;
            let Some(entry) = self.table.remove_if(&r.id, outdated) else {
                if self.table.get(&r.id).is_none() {
                    // Most often a driver handed off as it crossed, now
                    // written by its new node.
                    self.handed.lock().remove(&r.id);
                    // Not held here: the store may still hold it.
                    self.writer
                        .stage_removal_of(shard, r.id.clone(), r.last, r.gone);
                }
                continue;
            };
            match r.gone {
                Some(reason) => {
                    let cause = match reason {
                        RemoveReason::Stale => ZoneCause::Stale,
                        _ => ZoneCause::SignedOff,
                    };
                    self.gone(&entry, reason, cause, now_ms);
                }
                None => {
                    // It moved on (to a shard the other node holds): it
                    // leaves this one, and riders see it again from there.
                    self.writer.stage_removal(shard, &entry.state, None);
                    self.fanout.vehicle_in_transit(r.id.clone(), shard);
                }
            }
            applied += 1;
        }
        if applied > 0 {
            self.metrics.store_tombstones_applied.inc_by(applied as u64);
            self.metrics.vehicles.set(self.table.len() as i64);
        }
        applied
    }

    /// The driver is handed to another node: this node forgets the vehicle
    /// without signing it off. Riders keep seeing it (in transit) until its
    /// new node's first fix moves it; `how` says what becomes of its copy
    /// in the store. Returns what this node last held.
    pub fn hand_off(&self, id: &VehicleId, how: Handing) -> Option<Entry> {
        let entry = self.table.remove(id)?;
        match how {
            Handing::WithShard => {}
            Handing::Crossing { until } => {
                let handed = Handed {
                    shard: entry.shard,
                    last: Version::of(&entry.state),
                    until,
                };
                self.handed.lock().insert(id.clone(), handed);
            }
            Handing::HeldElsewhere => {
                self.writer.stage_removal(entry.shard, &entry.state, None);
            }
        }
        self.fanout.vehicle_in_transit(id.clone(), entry.shard);
        self.metrics.handoffs.inc();
        self.metrics.vehicles.set(self.table.len() as i64);
        Some(entry)
    }

    /// The handed-off vehicles past their wait whose new node has not taken
    /// them (no tombstone came back), and that are not held here again: they
    /// leave the handed set, for their copies to go.
    pub fn handed_due(&self, now: Instant) -> Vec<(VehicleId, Handed)> {
        let mut due = Vec::new();
        self.handed.lock().retain(|id, h| {
            if h.until > now {
                return true;
            }
            if self.table.get(id).is_none() {
                due.push((id.clone(), *h));
            }
            false
        });
        due
    }

    /// Lets go of a handed-off vehicle's copy that its new node never took:
    /// `arrived` says whether its driver was written elsewhere since (then
    /// only the copy here goes); if not, the vehicle is gone (offline) for
    /// riders and the store.
    pub fn let_go(&self, id: VehicleId, handed: Handed, arrived: bool) {
        if arrived {
            self.writer
                .stage_removal_of(handed.shard, id, handed.last, None);
            return;
        }
        let reason = RemoveReason::Offline;
        self.writer
            .stage_removal_of(handed.shard, id.clone(), handed.last, Some(reason));
        self.fanout.vehicle_removed(id, reason, handed.shard);
    }

    /// The shard is no longer this node's: its vehicles stay in the store
    /// for the new owner, and leave this node's table (in transit for the
    /// fan-out, until a replica or their new node shows them again).
    pub fn release_shard(&self, shard: ShardId) -> usize {
        let released = self.table.remove_in(shard);
        tracing::debug!(%shard, released = released.len(), "shard released");
        for entry in &released {
            self.fanout
                .vehicle_in_transit(entry.state.id.clone(), shard);
        }
        self.metrics.vehicles.set(self.table.len() as i64);
        released.len()
    }

    /// Takes over a shard's vehicles read from the store: those this node
    /// does not hold already with a newer fix become its own. Returns how
    /// many.
    pub fn take_over(&self, shard: ShardId, states: Vec<VehicleState>) -> usize {
        self.adopt(states, Some(shard))
    }

    /// Evicts every vehicle last heard from before `cutoff_ms`; returns how
    /// many.
    pub fn evict_stale(&self, cutoff_ms: i64) -> usize {
        let evicted = self.table.evict_stale(cutoff_ms);
        let now_ms = clock::now_ms();
        for entry in &evicted {
            tracing::debug!(vehicle = %entry.state.id, shard = %entry.shard, "evicted");
            self.gone(entry, RemoveReason::Stale, ZoneCause::Stale, now_ms);
        }
        self.metrics.vehicles_evicted.inc_by(evicted.len() as u64);
        self.metrics.vehicles.set(self.table.len() as i64);
        evicted.len()
    }

    /// Zones changed (created, changed, deleted): the vehicles that were in
    /// one or can be in one now get their memberships again, with events.
    /// Returns how many vehicles were looked at.
    pub fn rezone(&self, changed: &[ZoneId]) -> usize {
        if changed.is_empty() {
            return 0;
        }
        let mut candidates = std::collections::HashSet::new();
        self.table.each(|state| {
            if state.zones.iter().any(|m| changed.contains(&m.zone)) {
                candidates.insert(state.id.clone());
            }
        });
        let res = self.cells.index_res();
        for zone in changed.iter().filter_map(|id| self.zones.get(id)) {
            for state in self.table.in_cells(zone.cells(res), |_| true) {
                candidates.insert(state.id);
            }
        }
        let now_ms = clock::now_ms();
        for id in &candidates {
            let mut events = Vec::new();
            let updated = self.table.update(id, |state| {
                self.rezone_state(state, now_ms, Trigger::ZONE_CHANGED, &mut events);
            });
            if let Some(entry) = updated.filter(|_| !events.is_empty()) {
                self.writer.stage_events(entry.shard, events);
                self.writer.stage_upsert(entry.shard, entry.state, false);
            }
        }
        candidates.len()
    }

    /// Brings a vehicle's memberships up to its state where it stands.
    fn rezone_state(
        &self,
        state: &mut VehicleState,
        now_ms: i64,
        trigger: Trigger,
        events: &mut Vec<hexfleet_protocol::zone::ZoneEvent>,
    ) {
        let mut zones = std::mem::take(&mut state.zones);
        let (cell, _) = self.cells.locate(state.position());
        self.zones
            .update(&mut zones, state, cell.0, now_ms, trigger, events);
        state.zones = zones;
    }

    /// Loads vehicles a store already holds (a node taking over its shards),
    /// so the table, the sweeper and the fan-out know them.
    pub fn restore(&self, states: Vec<VehicleState>) -> usize {
        self.adopt(states, None)
    }

    /// Makes stored vehicles this node's, kept in `shard` (or each in the
    /// shard of its position), unless the table already holds a newer fix.
    fn adopt(&self, states: Vec<VehicleState>, shard: Option<ShardId>) -> usize {
        let mut adopted = 0;
        for state in states {
            let Some(position) = indexable(&state) else {
                continue;
            };
            if let Some(held) = self
                .table
                .get(&state.id)
                .filter(|held| held.state.seq >= state.seq)
            {
                // Held here already, newer: a copy taken over in another
                // shard is a leftover, removed from there.
                if let Some(shard) = shard.filter(|&s| s != held.shard) {
                    tracing::debug!(vehicle = %state.id, %shard, held = %held.shard, "leftover removed");
                    self.writer.stage_removal(shard, &state, None);
                }
                continue;
            }
            let (cell, located) = self.cells.locate(position);
            let shard = shard.unwrap_or(located);
            self.fanout.vehicle_changed(state.clone(), cell, shard);
            self.table.upsert(Entry { state, cell, shard });
            adopted += 1;
        }
        self.metrics.vehicles.set(self.table.len() as i64);
        adopted
    }
}

/// The state a validated fix of vehicle `id` makes, heard at `now_ms`
/// (node clock), before its zones are worked out.
pub fn state_of(
    id: &VehicleId,
    valid: &ValidFix,
    report: DriverReport,
    now_ms: i64,
) -> VehicleState {
    let f = &valid.fix;
    VehicleState {
        id: id.clone(),
        lat: f.lat,
        lon: f.lon,
        heading_deg: f.heading_deg,
        speed_mps: f.speed_mps,
        accuracy_m: f.accuracy_m,
        fix_time_ms: f.fix_time_ms,
        seq: f.seq,
        class: report.class,
        status: report.status,
        seen_ms: now_ms,
        zones: Vec::new(),
        clock_offset_ms: valid.clock_offset_ms,
    }
}

/// The position of a stored vehicle, if the index can hold it.
fn indexable(state: &VehicleState) -> Option<Position> {
    let position = Position::new(state.lat, state.lon)
        .ok()
        .filter(|p| p.is_indexable());
    if position.is_none() {
        tracing::warn!(id = %state.id, "stored vehicle has an invalid position; skipped");
    }
    position
}
