//! What happens to a valid fix: it is located (index cell and shard), becomes
//! the vehicle's state in the [`VehicleTable`], is staged for the store, and
//! is handed to the fan-out. This is the one place that changes vehicle
//! state: fixes, reports, sign-offs and evictions all go through it, so the
//! table, the store and the subscribers never disagree about what happened.

use std::sync::Arc;

use hexfleet_model::{CellModel, VehicleId, VehicleState};
use hexfleet_protocol::{DriverReport, RemoveReason};

use crate::{
    fanout::FanOut,
    metrics::Metrics,
    store::writer::StoreWriter,
    table::{Entry, VehicleTable},
    validate::ValidFix,
};

pub struct Ingest {
    pub cells: CellModel,
    pub table: Arc<VehicleTable>,
    pub writer: Arc<StoreWriter>,
    pub fanout: Arc<FanOut>,
    pub metrics: Arc<Metrics>,
}

impl Ingest {
    /// Applies a validated fix of vehicle `id`, as of `now_ms` (node clock).
    pub fn accept(&self, id: &VehicleId, valid: &ValidFix, report: DriverReport, now_ms: i64) {
        let (cell, shard) = self.cells.locate(valid.position);
        let f = &valid.fix;
        let state = VehicleState {
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
        };
        let previous = self.table.upsert(Entry {
            state: state.clone(),
            cell,
            shard,
        });
        self.fanout.vehicle_changed(state.clone(), cell);
        let relocated = match previous {
            Some(p) if p.shard != shard => {
                self.writer.stage_removal(p.shard, id.clone(), false);
                true
            }
            Some(_) => false,
            None => true,
        };
        self.writer.stage_upsert(shard, state, relocated);
        self.metrics.fixes_accepted.inc();
    }

    /// Applies a driver's report (class, status) to its live vehicle. A
    /// vehicle with no accepted fix yet has no state to change; the report
    /// applies from its first fix.
    pub fn report(&self, id: &VehicleId, report: DriverReport, now_ms: i64) {
        let updated = self.table.update(id, |state| {
            state.class = report.class;
            state.status = report.status;
            state.seen_ms = now_ms;
        });
        if let Some(entry) = updated {
            self.fanout.vehicle_changed(entry.state.clone(), entry.cell);
            self.writer.stage_upsert(entry.shard, entry.state, false);
        }
    }

    /// The vehicle is gone (signed off, or offline for too long).
    pub fn sign_off(&self, id: &VehicleId, reason: RemoveReason) {
        if let Some(entry) = self.table.remove(id) {
            self.writer.stage_removal(entry.shard, id.clone(), true);
            self.fanout.vehicle_removed(id.clone(), reason);
        }
    }

    /// Evicts every vehicle last heard from before `cutoff_ms`; returns how
    /// many.
    pub fn evict_stale(&self, cutoff_ms: i64) -> usize {
        let evicted = self.table.evict_stale(cutoff_ms);
        for entry in &evicted {
            self.writer
                .stage_removal(entry.shard, entry.state.id.clone(), true);
            self.fanout
                .vehicle_removed(entry.state.id.clone(), RemoveReason::Stale);
        }
        self.metrics.vehicles_evicted.inc_by(evicted.len() as u64);
        self.metrics.vehicles.set(self.table.len() as i64);
        evicted.len()
    }

    /// Loads vehicles a store already holds (a node taking over its shards),
    /// so the table, the sweeper and the fan-out know them.
    pub fn restore(&self, states: Vec<VehicleState>) -> usize {
        let mut restored = 0;
        for state in states {
            let position = hexfleet_model::Position::new(state.lat, state.lon)
                .ok()
                .filter(|p| p.is_indexable());
            let Some(position) = position else {
                tracing::warn!(id = %state.id, "stored vehicle has an invalid position; skipped");
                continue;
            };
            let (cell, shard) = self.cells.locate(position);
            self.fanout.vehicle_changed(state.clone(), cell);
            self.table.upsert(Entry { state, cell, shard });
            restored += 1;
        }
        self.metrics.vehicles.set(self.table.len() as i64);
        restored
    }
}
