//! The in-process store: the embedded default for a single node. It keeps
//! the same per-shard layout as Redis so both answer alike.

use std::{collections::HashMap, time::Duration};

use async_trait::async_trait;
use hexfleet_model::{ShardId, VehicleId, VehicleState};
use parking_lot::RwLock;

use super::{nearest_first, Applied, Batch, Nearby, NearbyQuery, Store, StoreError};

#[derive(Default)]
pub struct MemoryStore {
    inner: RwLock<Inner>,
}

#[derive(Default)]
struct Inner {
    shards: HashMap<ShardId, HashMap<VehicleId, VehicleState>>,
    locator: HashMap<VehicleId, ShardId>,
    handed_over: HashMap<VehicleId, VehicleState>,
}

impl MemoryStore {
    pub fn new() -> Self {
        Self::default()
    }
}

#[async_trait]
impl Store for MemoryStore {
    fn kind(&self) -> &'static str {
        "memory"
    }

    async fn apply(&self, batch: &Batch) -> Result<Applied, StoreError> {
        let mut inner = self.inner.write();
        let Inner {
            shards, locator, ..
        } = &mut *inner;
        for sb in &batch.shards {
            let vehicles = shards.entry(sb.shard).or_default();
            for removal in &sb.removals {
                vehicles.remove(&removal.id);
                if removal.forget() {
                    locator.remove(&removal.id);
                }
            }
            for upsert in &sb.upserts {
                vehicles.insert(upsert.state.id.clone(), upsert.state.clone());
                if upsert.relocated {
                    locator.insert(upsert.state.id.clone(), sb.shard);
                }
            }
            if vehicles.is_empty() {
                shards.remove(&sb.shard);
            }
        }
        // Memory holds any valid state, and is never shared by a cluster.
        Ok(Applied::default())
    }

    async fn load_shard(&self, shard: ShardId) -> Result<Vec<VehicleState>, StoreError> {
        let inner = self.inner.read();
        Ok(inner
            .shards
            .get(&shard)
            .map(|v| v.values().cloned().collect())
            .unwrap_or_default())
    }

    async fn snapshot_shard(&self, shard: ShardId) -> Result<(u64, Vec<VehicleState>), StoreError> {
        Ok((0, self.load_shard(shard).await?))
    }

    async fn hand_over(&self, state: &VehicleState, _ttl: Duration) -> Result<(), StoreError> {
        let mut inner = self.inner.write();
        inner.handed_over.insert(state.id.clone(), state.clone());
        Ok(())
    }

    async fn handed_over(&self, id: &VehicleId) -> Result<Option<VehicleState>, StoreError> {
        Ok(self.inner.write().handed_over.remove(id))
    }

    async fn vehicle(&self, id: &VehicleId) -> Result<Option<VehicleState>, StoreError> {
        let inner = self.inner.read();
        Ok(inner
            .locator
            .get(id)
            .and_then(|shard| inner.shards.get(shard))
            .and_then(|vehicles| vehicles.get(id))
            .cloned())
    }

    async fn nearby(&self, query: &NearbyQuery) -> Result<Vec<Nearby>, StoreError> {
        let inner = self.inner.read();
        let found = query
            .shards
            .iter()
            .filter_map(|shard| inner.shards.get(shard))
            .flat_map(|vehicles| vehicles.values())
            .filter_map(|state| {
                let distance_m = state.position().distance_m(query.center);
                (distance_m <= query.radius_m).then(|| Nearby {
                    state: state.clone(),
                    distance_m,
                })
            })
            .collect();
        Ok(nearest_first(found, query.limit))
    }

    async fn load_all(&self) -> Result<Vec<VehicleState>, StoreError> {
        let inner = self.inner.read();
        Ok(inner
            .shards
            .values()
            .flat_map(|v| v.values().cloned())
            .collect())
    }

    async fn ping(&self) -> Result<(), StoreError> {
        Ok(())
    }
}
