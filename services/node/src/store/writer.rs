//! The store writer: stages vehicle changes and flushes them in batches.
//!
//! Sessions stage changes synchronously (a short lock on one of several
//! stripes, chosen by shard) and never wait on the store. Every
//! `flush_interval` the writer takes everything staged, which has coalesced to
//! the latest change per vehicle and shard, and writes it as one [`Batch`].
//! A failed flush keeps its changes and merges them under newer ones, so a
//! store outage loses nothing and memory stays bounded by the number of
//! vehicles.
//!
//! A change the store refuses for its content is different: retrying it
//! would fail forever and hold up everything behind it. It is dropped,
//! counted (`store_refused`) and logged with the vehicle's id; the rest of
//! the flush stands.

use std::{
    collections::{HashMap, HashSet},
    sync::Arc,
    time::{Duration, Instant},
};

use hexfleet_model::{ShardId, VehicleId, VehicleState};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use super::{Batch, Refused, Removal, ShardBatch, Store, Upsert};
use crate::{metrics::Metrics, staging::LatestWins};

#[derive(Debug, Clone, PartialEq)]
enum Change {
    Upsert {
        state: VehicleState,
        relocated: bool,
    },
    Remove {
        forget: bool,
    },
}

type Stage = HashMap<(ShardId, VehicleId), Change>;

pub struct StoreWriter {
    staged: LatestWins<(ShardId, VehicleId), Change>,
    metrics: Arc<Metrics>,
    recovered: Notify,
}

/// Folds a newer change into an older one for the same vehicle and shard.
/// The newer wins, except that a pending relocation is not forgotten: the
/// store must still learn where the vehicle now is.
fn merge(older: Option<Change>, newer: Change) -> Change {
    match (older, newer) {
        (
            Some(Change::Upsert {
                relocated: true, ..
            }),
            Change::Upsert { state, .. },
        ) => Change::Upsert {
            state,
            relocated: true,
        },
        (_, newer) => newer,
    }
}

impl StoreWriter {
    pub fn new(metrics: Arc<Metrics>) -> Self {
        Self {
            staged: LatestWins::new(merge),
            metrics,
            recovered: Notify::new(),
        }
    }

    /// Stages the latest state of a vehicle in its shard. `relocated` says
    /// the vehicle is new to this shard.
    pub fn stage_upsert(&self, shard: ShardId, state: VehicleState, relocated: bool) {
        let id = state.id.clone();
        self.staged
            .stage((shard, id), Change::Upsert { state, relocated });
    }

    /// Stages a vehicle's removal from a shard; `forget` when it is gone for
    /// good rather than moved to another shard.
    pub fn stage_removal(&self, shard: ShardId, id: VehicleId, forget: bool) {
        self.staged.stage((shard, id), Change::Remove { forget });
    }

    /// Notified when a flush succeeds after failures. The store may have lost
    /// data meanwhile (a Redis restarted without persistence), so whoever
    /// owns the vehicles re-stages all of them.
    pub fn recovered(&self) -> &Notify {
        &self.recovered
    }

    /// Moves everything staged into `stage`, newer over older.
    fn take_into(&self, stage: &mut Stage) {
        self.staged.take_into(stage);
    }

    /// Flushes every `interval` until `shutdown`, then flushes what is left
    /// once more.
    pub async fn run(
        self: Arc<Self>,
        store: Arc<dyn Store>,
        interval: Duration,
        shutdown: CancellationToken,
    ) {
        let mut ticker = tokio::time::interval(interval);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut pending = Stage::new();
        let mut owed = OwedLocators::default();
        let mut failures = 0u32;
        loop {
            tokio::select! {
                _ = ticker.tick() => {}
                _ = shutdown.cancelled() => {
                    self.take_into(&mut pending);
                    if let Err(e) = self.flush(store.as_ref(), &mut pending, &mut owed).await {
                        tracing::warn!(error = %e, lost = pending.len(), "final flush failed");
                    }
                    return;
                }
            }
            self.take_into(&mut pending);
            match self.flush(store.as_ref(), &mut pending, &mut owed).await {
                Ok(()) if failures > 0 => {
                    failures = 0;
                    tracing::info!("store writes succeed again");
                    self.recovered.notify_one();
                }
                Ok(()) => {}
                Err(e) => {
                    failures += 1;
                    self.metrics.store_flush_errors.inc();
                    tracing::warn!(error = %e, failures, "store flush failed; retrying");
                    let backoff = interval
                        .saturating_mul(1 << failures.min(8))
                        .min(Duration::from_secs(1));
                    tokio::time::sleep(backoff).await;
                }
            }
        }
    }

    async fn flush(
        &self,
        store: &dyn Store,
        pending: &mut Stage,
        owed: &mut OwedLocators,
    ) -> Result<(), super::StoreError> {
        owed.settle(pending);
        let batch = to_batch(pending);
        self.metrics.store_pending.set(batch.len() as u64);
        if batch.is_empty() {
            return Ok(());
        }
        let started = Instant::now();
        let refused = store.apply(&batch).await?;
        self.metrics
            .store_flush_seconds
            .observe(started.elapsed().as_secs_f64());
        self.metrics
            .store_flush_batch_size
            .observe(batch.len() as f64);
        pending.clear();
        for r in refused {
            self.refused(r, owed);
        }
        Ok(())
    }

    fn refused(&self, refused: Refused, owed: &mut OwedLocators) {
        self.metrics.store_refused.inc();
        tracing::warn!(
            vehicle = %refused.id,
            shard = %refused.shard,
            reason = %refused.reason,
            "the store refused a vehicle's change; dropped it and wrote the rest"
        );
        if refused.relocated {
            owed.insert(refused.shard, refused.id);
        }
    }
}

/// Vehicles whose arrival in a shard the store refused: their locator was
/// never written, so their next upsert there must write it. Bounded, since
/// only what validation let through and the store refused lands here.
#[derive(Default)]
struct OwedLocators(HashSet<(ShardId, VehicleId)>);

impl OwedLocators {
    const MAX: usize = 65_536;

    fn insert(&mut self, shard: ShardId, id: VehicleId) {
        if self.0.len() >= Self::MAX {
            tracing::warn!("forgetting {} owed locators", self.0.len());
            self.0.clear();
        }
        self.0.insert((shard, id));
    }

    /// Marks pending upserts that owe a locator as relocations; a pending
    /// removal settles the debt too.
    fn settle(&mut self, pending: &mut Stage) {
        if self.0.is_empty() {
            return;
        }
        self.0.retain(|key| match pending.get_mut(key) {
            Some(Change::Upsert { relocated, .. }) => {
                *relocated = true;
                false
            }
            Some(Change::Remove { .. }) => false,
            None => true,
        });
    }
}

fn to_batch(stage: &Stage) -> Batch {
    let mut shards: HashMap<ShardId, ShardBatch> = HashMap::new();
    for ((shard, id), change) in stage {
        let sb = shards.entry(*shard).or_insert_with(|| ShardBatch {
            shard: *shard,
            upserts: Vec::new(),
            removals: Vec::new(),
        });
        match change {
            Change::Upsert { state, relocated } => sb.upserts.push(Upsert {
                state: state.clone(),
                relocated: *relocated,
            }),
            Change::Remove { forget } => sb.removals.push(Removal {
                id: id.clone(),
                forget: *forget,
            }),
        }
    }
    Batch {
        shards: shards.into_values().collect(),
    }
}

#[cfg(test)]
mod tests {
    use hexfleet_model::{VehicleClass, VehicleStatus};

    use super::*;

    fn state(id: &str, seq: u64) -> VehicleState {
        VehicleState {
            id: VehicleId::new(id).unwrap(),
            lat: 1.0,
            lon: 1.0,
            heading_deg: 0.0,
            speed_mps: 0.0,
            accuracy_m: 1.0,
            fix_time_ms: 0,
            seq,
            class: VehicleClass::Economy,
            status: VehicleStatus::Available,
            seen_ms: 0,
        }
    }

    fn shard() -> ShardId {
        "85283473fffffff".parse().unwrap()
    }

    #[test]
    fn changes_to_one_vehicle_coalesce_to_the_latest() {
        let w = StoreWriter::new(Arc::new(Metrics::new()));
        for seq in 1..=100 {
            w.stage_upsert(shard(), state("v1", seq), seq == 1);
        }
        w.stage_upsert(shard(), state("v2", 1), true);
        let mut stage = Stage::new();
        w.take_into(&mut stage);
        let batch = to_batch(&stage);
        assert_eq!(batch.len(), 2);
        let v1 = batch.shards[0]
            .upserts
            .iter()
            .find(|u| u.state.id.as_str() == "v1")
            .unwrap();
        assert_eq!(v1.state.seq, 100);
        assert!(
            v1.relocated,
            "the first upsert's relocation must survive coalescing"
        );
    }

    #[test]
    fn a_removal_after_an_upsert_wins_and_a_failed_batch_merges_under_newer_changes() {
        let w = StoreWriter::new(Arc::new(Metrics::new()));
        w.stage_upsert(shard(), state("v1", 1), true);
        let mut failed = Stage::new();
        w.take_into(&mut failed);
        // The flush of `failed` failed; meanwhile the vehicle went away.
        w.stage_removal(shard(), VehicleId::new("v1").unwrap(), true);
        w.take_into(&mut failed);
        let batch = to_batch(&failed);
        assert_eq!(batch.shards[0].upserts, vec![]);
        assert_eq!(batch.shards[0].removals.len(), 1);
    }
}
