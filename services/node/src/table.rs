//! The vehicle table: the live vehicles of this node's shards, in memory.
//!
//! It is the node's source of truth for "where is vehicle X now" and the
//! reference the fan-out and the sweeper work from. Sharded internally
//! (DashMap), so concurrent driver sessions do not contend on one lock.
//!
//! It also indexes its vehicles by index cell, so the nearby API answers for
//! this node's shards from memory: the cells covering the circle, their
//! vehicles, exact distances. A vehicle changes cell every few hundred
//! metres, so keeping that index costs a fix almost nothing.

use std::collections::{HashMap, HashSet};

use dashmap::DashMap;
use h3o::CellIndex;
use hexfleet_model::{
    geodesy::{haversine_m, EARTH_RADIUS_M},
    BBox, CellModel, IndexCell, Position, ShardId, VehicleId, VehicleState,
};

use crate::store::{nearest_first, Nearby};

/// One vehicle as the node holds it: its latest state and where it is indexed.
#[derive(Debug, Clone, PartialEq)]
pub struct Entry {
    pub state: VehicleState,
    pub cell: IndexCell,
    pub shard: ShardId,
}

/// The latitude and longitude span that every point within a radius of a
/// centre lies in (on the sphere, exactly): a test that rejects most
/// candidates of a search without trigonometry. Written here rather than
/// taken from `geo` (which has no such bound): it must hold on the sphere
/// Redis measures on, the one [`haversine_m`] uses.
struct Reach {
    lat: f64,
    lon: f64,
    dlat: f64,
    /// `None` when the circle reaches a pole: every longitude.
    dlon: Option<f64>,
}

impl Reach {
    fn around(center: Position, radius_m: f64) -> Self {
        let angle = radius_m / EARTH_RADIUS_M;
        let lat = center.lat();
        // Slightly wider than exact, for rounding.
        let dlat = angle.to_degrees() * 1.000_001 + 1e-9;
        let sin_dlon = angle.sin() / lat.to_radians().cos();
        let dlon = (sin_dlon < 1.0).then(|| sin_dlon.asin().to_degrees() * 1.000_001 + 1e-9);
        Self {
            lat,
            lon: center.lon(),
            dlat,
            dlon,
        }
    }

    fn may_hold(&self, lat: f64, lon: f64) -> bool {
        if (lat - self.lat).abs() > self.dlat {
            return false;
        }
        let Some(dlon) = self.dlon else {
            return true;
        };
        // Across the antimeridian too.
        let d = (lon - self.lon).abs() % 360.0;
        d.min(360.0 - d) <= dlon
    }
}

/// What an upsert replaced.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Previous {
    pub cell: IndexCell,
    pub shard: ShardId,
    /// When the replaced state was seen (node clock, ms).
    pub seen_ms: i64,
    /// The replaced state's version.
    pub version: crate::store::Version,
}

/// The vehicles of one index cell, with their positions (lat, lon).
type CellVehicles = HashMap<VehicleId, (f64, f64)>;

#[derive(Default)]
pub struct VehicleTable {
    vehicles: DashMap<VehicleId, Entry>,
    /// The vehicles in each index cell, with their positions, so a search
    /// reads cells, not vehicles. Updated after `vehicles`: for a moment a
    /// vehicle may be listed in its old cell too, which a search tells by
    /// reading the vehicle's entry. Cells are hashed with xxh3, not
    /// SipHash: a nearby query looks up every cell of its disk (~170 for
    /// 1 km), and each fix its own.
    in_cell: DashMap<CellIndex, CellVehicles, xxhash_rust::xxh3::Xxh3DefaultBuilder>,
}

impl VehicleTable {
    pub fn new() -> Self {
        Self::default()
    }

    /// Inserts or replaces a vehicle's entry and says where it was before.
    pub fn upsert(&self, entry: Entry) -> Option<Previous> {
        self.upsert_with(entry, |_, _| {})
    }

    /// Inserts or replaces a vehicle's entry, which `prepare` completes
    /// from the entry it replaces (under the vehicle's lock, so two changes
    /// of one vehicle never both start from the same old entry; it may take
    /// what it needs out of the old one, which is dropped).
    pub fn upsert_with(
        &self,
        mut entry: Entry,
        prepare: impl FnOnce(Option<&mut Entry>, &mut Entry),
    ) -> Option<Previous> {
        let (id, cell) = (entry.state.id.clone(), entry.cell);
        let at = (entry.state.lat, entry.state.lon);
        let previous = match self.vehicles.entry(id.clone()) {
            dashmap::mapref::entry::Entry::Occupied(mut held) => {
                prepare(Some(held.get_mut()), &mut entry);
                let old = held.insert(entry);
                Some(Previous {
                    cell: old.cell,
                    shard: old.shard,
                    seen_ms: old.state.seen_ms,
                    version: crate::store::Version::of(&old.state),
                })
            }
            dashmap::mapref::entry::Entry::Vacant(free) => {
                prepare(None, &mut entry);
                free.insert(entry);
                None
            }
        };
        match previous {
            Some(p) if p.cell == cell => {
                if let Some(mut there) = self.in_cell.get_mut(&cell.0) {
                    if let Some(position) = there.get_mut(&id) {
                        *position = at;
                    }
                }
            }
            Some(p) => {
                self.leave_cell(p.cell, &id);
                self.in_cell.entry(cell.0).or_default().insert(id, at);
            }
            None => {
                self.in_cell.entry(cell.0).or_default().insert(id, at);
            }
        }
        previous
    }

    fn leave_cell(&self, cell: IndexCell, id: &VehicleId) {
        self.in_cell.remove_if_mut(&cell.0, |_, ids| {
            ids.remove(id);
            ids.is_empty()
        });
    }

    /// The vehicles of this table within `radius_m` of `center`, nearest
    /// first (ties by id), at most `limit`: the cells covering the circle,
    /// a box test, then the exact distance (the one Redis uses) for what is
    /// in the box; only the nearest `limit` are read in full.
    pub fn nearby(
        &self,
        cells: &CellModel,
        center: Position,
        radius_m: f64,
        limit: usize,
    ) -> Vec<Nearby> {
        let reach = Reach::around(center, radius_m);
        let mut candidates: Vec<(f64, VehicleId)> = Vec::new();
        for cell in cells.neighbourhood(center, radius_m) {
            let Some(there) = self.in_cell.get(&cell) else {
                continue;
            };
            for (id, &(lat, lon)) in there.iter() {
                if !reach.may_hold(lat, lon) {
                    continue;
                }
                let distance_m = haversine_m(center.lat(), center.lon(), lat, lon);
                if distance_m <= radius_m {
                    candidates.push((distance_m, id.clone()));
                }
            }
        }
        candidates.sort_by(|a, b| a.0.total_cmp(&b.0).then_with(|| a.1.cmp(&b.1)));
        let mut found = Vec::with_capacity(limit.min(candidates.len()));
        let mut taken = HashSet::new();
        for (_, id) in candidates {
            if found.len() == limit {
                break;
            }
            // The entry is the truth: it may have moved since its cell
            // listed it (or be listed twice while it changes cell).
            let Some(entry) = self.vehicles.get(&id) else {
                continue;
            };
            let distance_m = entry.state.position().distance_m(center);
            if distance_m <= radius_m && taken.insert(id) {
                found.push(Nearby {
                    state: entry.state.clone(),
                    distance_m,
                });
            }
        }
        nearest_first(found, limit)
    }

    /// Changes a vehicle's state in place (class, status) without moving it.
    /// Returns the updated entry, or `None` when the vehicle is not live.
    pub fn update(&self, id: &VehicleId, f: impl FnOnce(&mut VehicleState)) -> Option<Entry> {
        let mut entry = self.vehicles.get_mut(id)?;
        f(&mut entry.state);
        Some(entry.clone())
    }

    /// The states of the vehicles in `cells` that `keep` keeps.
    pub fn in_cells(
        &self,
        cells: impl IntoIterator<Item = CellIndex>,
        mut keep: impl FnMut(&VehicleState) -> bool,
    ) -> Vec<VehicleState> {
        let mut found = Vec::new();
        let mut seen = HashSet::new();
        for cell in cells {
            let Some(there) = self.in_cell.get(&cell) else {
                continue;
            };
            for id in there.keys() {
                if let Some(entry) = self.vehicles.get(id) {
                    if keep(&entry.state) && seen.insert(id.clone()) {
                        found.push(entry.state.clone());
                    }
                }
            }
        }
        found
    }

    /// Runs `f` on every vehicle's state, in no order.
    pub fn each(&self, mut f: impl FnMut(&VehicleState)) {
        self.each_entry(|entry| f(&entry.state));
    }

    /// Runs `f` on every vehicle's entry (its state, cell and shard), in no
    /// order.
    pub fn each_entry(&self, mut f: impl FnMut(&Entry)) {
        for entry in self.vehicles.iter() {
            f(entry.value());
        }
    }

    pub fn get(&self, id: &VehicleId) -> Option<Entry> {
        self.vehicles.get(id).map(|e| e.clone())
    }

    pub fn remove(&self, id: &VehicleId) -> Option<Entry> {
        self.remove_if(id, |_| true)
    }

    /// Removes a vehicle's entry if `condition` holds for it (checked under
    /// the vehicle's lock, so no change slips in between).
    pub fn remove_if(
        &self,
        id: &VehicleId,
        condition: impl FnOnce(&Entry) -> bool,
    ) -> Option<Entry> {
        let (_, entry) = self.vehicles.remove_if(id, |_, entry| condition(entry))?;
        self.leave_cell(entry.cell, id);
        Some(entry)
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
        for entry in &evicted {
            self.leave_cell(entry.cell, &entry.state.id);
        }
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
        for entry in &removed {
            self.leave_cell(entry.cell, &entry.state.id);
        }
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

#[cfg(test)]
mod tests {
    use hexfleet_model::{VehicleClass, VehicleStatus};
    use rand::{rngs::StdRng, Rng, SeedableRng};

    use super::*;

    fn state(id: &str, lat: f64, lon: f64, seen_ms: i64) -> VehicleState {
        VehicleState {
            id: VehicleId::new(id).unwrap(),
            lat,
            lon,
            heading_deg: 0.0,
            speed_mps: 0.0,
            accuracy_m: 1.0,
            fix_time_ms: seen_ms,
            seq: 1,
            class: VehicleClass::Economy,
            status: VehicleStatus::Available,
            seen_ms,
            zones: Vec::new(),
            clock_offset_ms: 0,
        }
    }

    /// What a nearby query must answer: every vehicle within the radius,
    /// by a look at each one.
    fn brute_force(
        table: &VehicleTable,
        center: Position,
        radius_m: f64,
        limit: usize,
    ) -> Vec<Nearby> {
        let found = table
            .entries()
            .into_iter()
            .filter_map(|e| {
                let distance_m = e.state.position().distance_m(center);
                (distance_m <= radius_m).then_some(Nearby {
                    state: e.state,
                    distance_m,
                })
            })
            .collect();
        nearest_first(found, limit)
    }

    #[test]
    fn nearby_from_the_cell_index_matches_a_look_at_every_vehicle_as_vehicles_move_and_leave() {
        let cells = CellModel::default();
        let table = VehicleTable::new();
        let mut rng = StdRng::seed_from_u64(12);
        let put = |table: &VehicleTable, s: VehicleState| {
            let (cell, shard) = cells.locate(s.position());
            table.upsert(Entry {
                state: s,
                cell,
                shard,
            });
        };
        for round in 0..40 {
            // Vehicles arrive, move (some far, across cells and shards),
            // sign off, go stale.
            for i in 0..50 {
                let id = format!("v{}", rng.random_range(0..400));
                let (lat, lon) = (
                    52.40 + rng.random_range(0.0..0.25),
                    13.20 + rng.random_range(0.0..0.40),
                );
                put(&table, state(&id, lat, lon, round * 100 + i));
            }
            for _ in 0..5 {
                table.remove(&VehicleId::new(&format!("v{}", rng.random_range(0..400))).unwrap());
            }
            table.evict_stale(round * 100 - 1_500);
            for _ in 0..20 {
                let center = Position::new(
                    52.40 + rng.random_range(0.0..0.25),
                    13.20 + rng.random_range(0.0..0.40),
                )
                .unwrap();
                let radius_m = rng.random_range(50.0..5_000.0);
                let limit = rng.random_range(1..60);
                let ids = |found: Vec<Nearby>| -> Vec<String> {
                    found.into_iter().map(|n| n.state.id.to_string()).collect()
                };
                assert_eq!(
                    ids(table.nearby(&cells, center, radius_m, limit)),
                    ids(brute_force(&table, center, radius_m, limit)),
                    "round {round}: {radius_m} m around {center:?}, limit {limit}"
                );
            }
        }
        // Nothing left behind in the cell index by removals and moves.
        let indexed: usize = table.in_cell.iter().map(|ids| ids.len()).sum();
        assert_eq!(indexed, table.len());
    }
}
