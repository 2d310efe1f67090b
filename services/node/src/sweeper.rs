//! The sweeper: evicts vehicles not heard from for `stale_after`.
//!
//! Redis GEO has no per-member expiry, so staleness is the node's job: every
//! `sweep_interval` it evicts stale vehicles: from the table, from the store,
//! and from every subscriber's view (as `removed: stale`).

use std::{sync::Arc, time::Duration};

use tokio_util::sync::CancellationToken;

use crate::{clock, ingest::Ingest};

pub struct Sweeper {
    pub ingest: Arc<Ingest>,
    pub stale_after: Duration,
    pub interval: Duration,
}

impl Sweeper {
    /// One pass: evicts what is stale at `now_ms` and returns how many.
    pub fn sweep(&self, now_ms: i64) -> usize {
        self.ingest
            .evict_stale(now_ms - self.stale_after.as_millis() as i64)
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
