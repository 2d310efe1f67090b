//! The in-process store: the embedded default for a single node. It keeps
//! the same per-shard layout as Redis so both answer alike.

use std::{
    collections::{BTreeMap, HashMap, VecDeque},
    time::Duration,
};

use async_trait::async_trait;
use hexfleet_model::{ShardId, VehicleId, VehicleState, ZoneId};
use hexfleet_protocol::zone::ZoneEvent;
use parking_lot::RwLock;

use super::{
    nearest_first, Applied, Batch, Nearby, NearbyQuery, Removal, Store, StoreError, ZoneChanges,
    ZONE_STREAM_LEN,
};

#[derive(Default)]
pub struct MemoryStore {
    inner: RwLock<Inner>,
}

#[derive(Default)]
struct Inner {
    shards: HashMap<ShardId, HashMap<VehicleId, VehicleState>>,
    locator: HashMap<VehicleId, ShardId>,
    handed_over: HashMap<VehicleId, VehicleState>,
    outboxes: HashMap<ShardId, Vec<ZoneEvent>>,
    /// Removals left for a shard's holder (no TTL: one process holds every
    /// shard, so they are taken at once).
    tombstones: HashMap<ShardId, HashMap<VehicleId, Removal>>,
    /// The zone event stream: (sequence, event), the newest last.
    stream: VecDeque<(u64, ZoneEvent)>,
    stream_seq: u64,
    /// Zones by id: (version, Feature; `None` once deleted).
    zones: BTreeMap<ZoneId, (u64, Option<String>)>,
    zones_version: u64,
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
        for sb in batch.shards.iter().filter(|sb| !sb.events.is_empty()) {
            inner
                .outboxes
                .entry(sb.shard)
                .or_default()
                .extend(sb.events.iter().cloned());
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

    async fn relay_zone_events(&self, shard: ShardId) -> Result<Vec<ZoneEvent>, StoreError> {
        let mut inner = self.inner.write();
        let events = inner.outboxes.remove(&shard).unwrap_or_default();
        for event in &events {
            inner.stream_seq += 1;
            let seq = inner.stream_seq;
            inner.stream.push_back((seq, event.clone()));
            if inner.stream.len() > ZONE_STREAM_LEN {
                inner.stream.pop_front();
            }
        }
        Ok(events)
    }

    async fn zone_events(
        &self,
        cursor: Option<&str>,
        count: usize,
    ) -> Result<(String, Vec<ZoneEvent>), StoreError> {
        let inner = self.inner.read();
        let Some(after) = cursor.and_then(|c| c.parse::<u64>().ok()) else {
            return Ok((inner.stream_seq.to_string(), Vec::new()));
        };
        let events: Vec<(u64, ZoneEvent)> = inner
            .stream
            .iter()
            .filter(|(seq, _)| *seq > after)
            .take(count)
            .cloned()
            .collect();
        let cursor = events.last().map_or(after, |(seq, _)| *seq);
        Ok((
            cursor.to_string(),
            events.into_iter().map(|(_, e)| e).collect(),
        ))
    }

    async fn put_zone(
        &self,
        id: &ZoneId,
        feature: &str,
        max_zones: usize,
    ) -> Result<Option<u64>, StoreError> {
        let mut inner = self.inner.write();
        let live = inner.zones.values().filter(|(_, f)| f.is_some()).count();
        let exists = inner.zones.get(id).is_some_and(|(_, f)| f.is_some());
        if !exists && live >= max_zones {
            return Ok(None);
        }
        inner.zones_version += 1;
        let version = inner.zones_version;
        inner
            .zones
            .insert(id.clone(), (version, Some(feature.to_string())));
        Ok(Some(version))
    }

    async fn delete_zone(&self, id: &ZoneId) -> Result<bool, StoreError> {
        let mut inner = self.inner.write();
        if !inner.zones.get(id).is_some_and(|(_, f)| f.is_some()) {
            return Ok(false);
        }
        inner.zones_version += 1;
        let version = inner.zones_version;
        inner.zones.insert(id.clone(), (version, None));
        Ok(true)
    }

    async fn zone_changes(&self, since: u64) -> Result<ZoneChanges, StoreError> {
        let inner = self.inner.read();
        Ok(ZoneChanges {
            version: inner.zones_version,
            zones: inner
                .zones
                .iter()
                .filter(|(_, (version, _))| *version > since)
                .map(|(id, (_, feature))| (id.clone(), feature.clone()))
                .collect(),
        })
    }

    async fn put_zone_counts(
        &self,
        _node: &str,
        _counts: &[u8],
        _ttl: Duration,
    ) -> Result<(), StoreError> {
        // One node, which counts its own.
        Ok(())
    }

    async fn zone_counts(&self, nodes: &[String]) -> Result<Vec<Option<Vec<u8>>>, StoreError> {
        Ok(vec![None; nodes.len()])
    }

    async fn shards(&self) -> Result<Vec<ShardId>, StoreError> {
        let inner = self.inner.read();
        Ok(inner
            .shards
            .keys()
            .chain(inner.outboxes.keys())
            .copied()
            .collect())
    }

    async fn locate(&self, ids: &[VehicleId]) -> Result<Vec<Option<ShardId>>, StoreError> {
        let inner = self.inner.read();
        Ok(ids
            .iter()
            .map(|id| inner.locator.get(id).copied())
            .collect())
    }

    async fn bus_seqs(&self, shards: &[ShardId]) -> Result<Vec<u64>, StoreError> {
        // No bus: one process holds every shard.
        Ok(vec![0; shards.len()])
    }

    async fn leave_tombstones(
        &self,
        shard: ShardId,
        removals: &[Removal],
        _ttl: Duration,
    ) -> Result<(), StoreError> {
        let mut inner = self.inner.write();
        let left = inner.tombstones.entry(shard).or_default();
        for r in removals {
            left.insert(r.id.clone(), r.clone());
        }
        Ok(())
    }

    async fn take_tombstones(&self, shard: ShardId) -> Result<Vec<Removal>, StoreError> {
        let taken = self.inner.write().tombstones.remove(&shard);
        Ok(taken.map(|t| t.into_values().collect()).unwrap_or_default())
    }
}
