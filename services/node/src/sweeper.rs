//! The sweeper: evicts vehicles not heard from for `stale_after`.
//!
//! Redis GEO has no per-member expiry, so staleness is the node's job: every
//! `sweep_interval` it removes stale vehicles from the table and stages their
//! removal from the store.

use std::{sync::Arc, time::Duration};

use tokio_util::sync::CancellationToken;

use crate::{clock, metrics::Metrics, store::writer::StoreWriter, table::VehicleTable};

pub struct Sweeper {
    pub table: Arc<VehicleTable>,
    pub writer: Arc<StoreWriter>,
    pub metrics: Arc<Metrics>,
    pub stale_after: Duration,
    pub interval: Duration,
}

impl Sweeper {
    /// One pass: evicts what is stale at `now_ms` and returns how many.
    pub fn sweep(&self, now_ms: i64) -> usize {
        let cutoff = now_ms - self.stale_after.as_millis() as i64;
        let evicted = self.table.evict_stale(cutoff);
        for entry in &evicted {
            self.writer
                .stage_removal(entry.shard, entry.state.id.clone(), true);
        }
        self.metrics.vehicles_evicted.inc_by(evicted.len() as u64);
        self.metrics.vehicles.set(self.table.len() as i64);
        evicted.len()
    }

    pub async fn run(self: std::sync::Arc<Self>, shutdown: CancellationToken) {
        let mut ticker = tokio::time::interval(self.interval);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = ticker.tick() => {}
                _ = shutdown.cancelled() => return,
            }
            let evicted = self.sweep(clock::now_ms());
            if evicted > 0 {
                tracing::debug!(evicted, "evicted stale vehicles");
            }
        }
    }
}
