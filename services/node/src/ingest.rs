//! What happens to a valid fix: it is located (index cell and shard), becomes
//! the vehicle's state in the [`VehicleTable`], and is staged for the store.
//! This is the one place that turns driver input into vehicle state.

use std::sync::Arc;

use hexfleet_model::{CellModel, VehicleId, VehicleState};
use hexfleet_protocol::DriverReport;

use crate::{
    metrics::Metrics,
    store::writer::StoreWriter,
    table::{Entry, VehicleTable},
    validate::ValidFix,
};

pub struct Ingest {
    pub cells: CellModel,
    pub table: Arc<VehicleTable>,
    pub writer: Arc<StoreWriter>,
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
            self.writer.stage_upsert(entry.shard, entry.state, false);
        }
    }

    /// A driver signed off: the vehicle is gone at once.
    pub fn sign_off(&self, id: &VehicleId) {
        if let Some(entry) = self.table.remove(id) {
            self.writer.stage_removal(entry.shard, id.clone(), true);
        }
    }

    /// Loads vehicles a store already holds (a node taking over its shards),
    /// so the table, the sweeper and the fan-out know them.
    pub fn restore(&self, states: Vec<VehicleState>) -> usize {
        let mut restored = 0;
        for state in states {
            let Ok(position) = hexfleet_model::Position::new(state.lat, state.lon) else {
                tracing::warn!(id = %state.id, "stored vehicle has an invalid position; skipped");
                continue;
            };
            let (cell, shard) = self.cells.locate(position);
            self.table.upsert(Entry { state, cell, shard });
            restored += 1;
        }
        self.metrics.vehicles.set(self.table.len() as i64);
        restored
    }
}
