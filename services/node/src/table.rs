//! The vehicle table: the live vehicles of this node's shards, in memory.
//!
//! It is the node's source of truth for "where is vehicle X now" and the
//! reference the fan-out and the sweeper work from. Sharded internally
//! (DashMap), so concurrent driver sessions do not contend on one lock.

use dashmap::DashMap;
use hexfleet_model::{BBox, IndexCell, ShardId, VehicleId, VehicleState};

/// One vehicle as the node holds it: its latest state and where it is indexed.
#[derive(Debug, Clone, PartialEq)]
pub struct Entry {
    pub state: VehicleState,
    pub cell: IndexCell,
    pub shard: ShardId,
}

/// What an upsert replaced.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Previous {
    pub cell: IndexCell,
    pub shard: ShardId,
}

#[derive(Default)]
pub struct VehicleTable {
    vehicles: DashMap<VehicleId, Entry>,
}

impl VehicleTable {
    pub fn new() -> Self {
        Self::default()
    }

    /// Inserts or replaces a vehicle's entry and says where it was before.
    pub fn upsert(&self, entry: Entry) -> Option<Previous> {
        self.vehicles
            .insert(entry.state.id.clone(), entry)
            .map(|old| Previous {
                cell: old.cell,
                shard: old.shard,
            })
    }

    /// Changes a vehicle's state in place (class, status) without moving it.
    /// Returns the updated entry, or `None` when the vehicle is not live.
    pub fn update(&self, id: &VehicleId, f: impl FnOnce(&mut VehicleState)) -> Option<Entry> {
        let mut entry = self.vehicles.get_mut(id)?;
        f(&mut entry.state);
        Some(entry.clone())
    }

    pub fn get(&self, id: &VehicleId) -> Option<Entry> {
        self.vehicles.get(id).map(|e| e.clone())
    }

    pub fn remove(&self, id: &VehicleId) -> Option<Entry> {
        self.vehicles.remove(id).map(|(_, e)| e)
    }

    /// Removes and returns every vehicle last heard from before `cutoff_ms`.
    pub fn evict_stale(&self, cutoff_ms: i64) -> Vec<Entry> {
        let mut evicted = Vec::new();
        self.vehicles.retain(|_, entry| {
            let live = entry.state.seen_ms >= cutoff_ms;
            if !live {
                evicted.push(entry.clone());
            }
            live
        });
        evicted
    }

    /// Removes and returns every vehicle kept in `shard`.
    pub fn remove_in(&self, shard: ShardId) -> Vec<Entry> {
        let mut removed = Vec::new();
        self.vehicles.retain(|_, entry| {
            let keep = entry.shard != shard;
            if !keep {
                removed.push(entry.clone());
            }
            keep
        });
        removed
    }

    /// How many vehicles are kept in each shard.
    pub fn shard_counts(&self) -> std::collections::HashMap<ShardId, usize> {
        let mut counts = std::collections::HashMap::new();
        for e in self.vehicles.iter() {
            *counts.entry(e.shard).or_default() += 1;
        }
        counts
    }

    /// A copy of every entry (not an atomic snapshot: entries change while
    /// it is taken, each one is consistent).
    pub fn entries(&self) -> Vec<Entry> {
        self.vehicles.iter().map(|e| e.value().clone()).collect()
    }

    /// The box around every live vehicle (`None` when there are none, or
    /// all stand on one point).
    pub fn bounds(&self) -> Option<BBox> {
        let (mut south, mut west, mut north, mut east) = (90.0, 180.0, -90.0, -180.0);
        for e in self.vehicles.iter() {
            let (lat, lon) = (e.state.lat, e.state.lon);
            (south, north) = (f64::min(south, lat), f64::max(north, lat));
            (west, east) = (f64::min(west, lon), f64::max(east, lon));
        }
        BBox::new(south, west, north, east).ok()
    }

    pub fn len(&self) -> usize {
        self.vehicles.len()
    }

    pub fn is_empty(&self) -> bool {
        self.vehicles.is_empty()
    }
}
