//! Live vehicle counts per cell, at every resolution coarser than the
//! index's, for dashboards showing a wide area.

use std::{
    collections::HashMap,
    sync::atomic::{AtomicU64, Ordering},
};

use h3o::{CellIndex, Resolution};
use hexfleet_model::{VehicleClass, VehicleState, VehicleStatus};
use hexfleet_protocol::{dashboard::StatusCounts, Filter};
use parking_lot::RwLock;

/// Vehicles per class and status.
type Tally = [[u32; VehicleStatus::ALL.len()]; VehicleClass::ALL.len()];

/// Where one vehicle is counted: its index cell, class and status.
#[derive(Clone, Copy, PartialEq)]
pub(super) struct Tallied {
    cell: CellIndex,
    class: usize,
    status: usize,
}

impl Tallied {
    pub(super) fn of(cell: CellIndex, state: &VehicleState) -> Self {
        Self {
            cell,
            class: state.class as usize,
            status: state.status as usize,
        }
    }
}

/// Live vehicle counts per cell, by class and status, at every resolution
/// coarser than the index resolution (a vehicle counts in each parent of its
/// index cell). Only the fan-out task writes; dashboards read a few hundred
/// cells at a time, and skip reading when [`Density::generation`] has not
/// moved.
#[derive(Default)]
pub struct Density {
    tallies: RwLock<HashMap<CellIndex, Tally>>,
    generation: AtomicU64,
}

impl Density {
    /// Changes each time any count does.
    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    /// Counts by status of the vehicles in each cell that match `filter`.
    pub fn counts(&self, cells: &[CellIndex], filter: &Filter) -> Vec<StatusCounts> {
        let tallies = self.tallies.read();
        cells
            .iter()
            .map(|cell| {
                let mut counts = StatusCounts::default();
                if let Some(tally) = tallies.get(cell) {
                    for class in VehicleClass::ALL {
                        for status in VehicleStatus::ALL {
                            if filter.matches(class, status) {
                                counts.add(status, tally[class as usize][status as usize]);
                            }
                        }
                    }
                }
                counts
            })
            .collect()
    }

    /// Moves one vehicle's count from where it was to where it is.
    pub(super) fn shift(&self, from: Option<Tallied>, to: Option<Tallied>) {
        if from == to {
            return;
        }
        let mut tallies = self.tallies.write();
        // From the finest parent up: once both have the same parent (and
        // class and status), every coarser parent is the same too.
        let finest = from.or(to).map_or(0, |t| u8::from(t.cell.resolution()));
        for res in (0..finest)
            .rev()
            .filter_map(|r| Resolution::try_from(r).ok())
        {
            let parent = |t: Tallied| t.cell.parent(res).map(|p| (p, t.class, t.status));
            let (old, new) = (from.and_then(parent), to.and_then(parent));
            if old == new {
                break;
            }
            if let Some((cell, class, status)) = old {
                if let Some(tally) = tallies.get_mut(&cell) {
                    tally[class][status] = tally[class][status].saturating_sub(1);
                    if tally.iter().flatten().all(|n| *n == 0) {
                        tallies.remove(&cell);
                    }
                }
            }
            if let Some((cell, class, status)) = new {
                tallies.entry(cell).or_default()[class][status] += 1;
            }
        }
        self.generation.fetch_add(1, Ordering::Release);
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use hexfleet_model::{CellModel, Position, VehicleId};
    use hexfleet_protocol::RemoveReason;

    use super::*;
    use crate::{fanout::Index, metrics::Metrics};

    fn state(i: usize, lat: f64, lon: f64, status: VehicleStatus) -> VehicleState {
        VehicleState {
            id: VehicleId::new(&format!("v{i}")).unwrap(),
            lat,
            lon,
            heading_deg: 0.0,
            speed_mps: 0.0,
            accuracy_m: 1.0,
            fix_time_ms: 0,
            seq: 1,
            class: VehicleClass::ALL[i % VehicleClass::ALL.len()],
            status,
            seen_ms: 0,
            zones: Vec::new(),
            clock_offset_ms: 0,
        }
    }

    #[test]
    fn density_counts_match_a_recount_after_moves_status_changes_and_removals() {
        let cells = CellModel::default();
        let metrics = Metrics::new();
        let density = Arc::new(Density::default());
        let mut index = Index::new(density.clone());
        let mut truth: HashMap<usize, (CellIndex, VehicleState)> = HashMap::new();
        let mut seed = 7u64;
        let mut next = move |n: u64| {
            seed = seed.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1);
            (seed >> 33) % n
        };
        for step in 0..3_000 {
            let i = next(200) as usize;
            if next(10) == 0 {
                index.remove(
                    &state(i, 0.0, 0.0, VehicleStatus::Available).id,
                    RemoveReason::Stale,
                    &metrics,
                );
                truth.remove(&i);
                continue;
            }
            let lat = 52.40 + next(2_000) as f64 * 1e-4;
            let lon = 13.30 + next(2_000) as f64 * 1e-4;
            let status = VehicleStatus::ALL[(step % 7) % 3];
            let (cell, shard) = cells.locate(Position::new(lat, lon).unwrap());
            let s = state(i, lat, lon, status);
            index.vehicle_changed(s.clone(), cell, shard, &metrics);
            truth.insert(i, (cell.0, s));
        }
        let filter = Filter {
            classes: vec![VehicleClass::Xl, VehicleClass::Van],
            statuses: Vec::new(),
        };
        for res in [Resolution::Four, Resolution::Six, Resolution::Eight] {
            let mut expected: HashMap<CellIndex, StatusCounts> = HashMap::new();
            for (cell, s) in truth.values() {
                if filter.matches(s.class, s.status) {
                    expected
                        .entry(cell.parent(res).unwrap())
                        .or_default()
                        .add(s.status, 1);
                }
            }
            let coarse: Vec<CellIndex> = expected.keys().copied().collect();
            let counted = density.counts(&coarse, &filter);
            for (cell, counts) in coarse.iter().zip(counted) {
                assert_eq!(counts, expected[cell], "{cell} at {res}");
            }
        }
        // Nothing left over once everyone is gone.
        for i in truth.keys() {
            index.remove(
                &state(*i, 0.0, 0.0, VehicleStatus::Available).id,
                RemoveReason::Offline,
                &metrics,
            );
        }
        assert!(density.tallies.read().is_empty());
    }
}
