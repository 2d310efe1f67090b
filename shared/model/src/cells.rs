//! The H3 cell model: where a position is indexed, which shard owns it and
//! which cells a radius covers.
//!
//! The shard of a position is always `index_cell.parent(shard_res)`, never a
//! second `to_cell()` at the coarse resolution: H3 children are not strictly
//! contained in their parents, and the two answers differ near edges. Every
//! component must agree on a vehicle's shard, so there is exactly one way to
//! compute it, [`CellModel::locate`].

use std::collections::HashSet;

use h3o::{CellIndex, LatLng, Resolution};

use crate::{IndexCell, Position, ShardId};

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CellModelError {
    #[error("resolution {0} is not an H3 resolution (0 to 15)")]
    Resolution(u8),
    #[error("the shard resolution ({shard}) must be coarser than the index resolution ({index})")]
    Order { index: u8, shard: u8 },
}

/// The two resolutions that define the grid: fixes are indexed at
/// `index_res`, shards are cells at `shard_res`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CellModel {
    index_res: Resolution,
    shard_res: Resolution,
}

impl Default for CellModel {
    fn default() -> Self {
        Self {
            index_res: Resolution::Nine,
            shard_res: Resolution::Five,
        }
    }
}

impl CellModel {
    pub fn new(index_res: u8, shard_res: u8) -> Result<Self, CellModelError> {
        let index =
            Resolution::try_from(index_res).map_err(|_| CellModelError::Resolution(index_res))?;
        let shard =
            Resolution::try_from(shard_res).map_err(|_| CellModelError::Resolution(shard_res))?;
        if shard >= index {
            return Err(CellModelError::Order {
                index: index_res,
                shard: shard_res,
            });
        }
        Ok(Self {
            index_res: index,
            shard_res: shard,
        })
    }

    pub fn index_res(&self) -> Resolution {
        self.index_res
    }

    pub fn shard_res(&self) -> Resolution {
        self.shard_res
    }

    /// The index cell of a position and the shard that owns it.
    pub fn locate(&self, position: Position) -> (IndexCell, ShardId) {
        let cell = to_latlng(position).to_cell(self.index_res);
        (IndexCell(cell), self.shard_of(IndexCell(cell)))
    }

    /// The shard of an index cell: its parent at the shard resolution.
    pub fn shard_of(&self, cell: IndexCell) -> ShardId {
        // `shard_res` is coarser than `index_res` (checked in `new`), so the
        // parent always exists.
        ShardId(cell.0.parent(self.shard_res).unwrap_or(cell.0))
    }

    /// The index cells a rider at `center` watching `radius_m` subscribes to:
    /// `grid_disk(cell, k)` with the smallest safe `k`. Every point within
    /// `radius_m` of `center` lies in one of the returned cells.
    pub fn neighbourhood(&self, center: Position, radius_m: f64) -> Vec<CellIndex> {
        disk_covering(center, radius_m, self.index_res)
    }

    /// The shards that can hold a vehicle within `radius_m` of `center`.
    ///
    /// Covers the circle at the shard resolution, then adds one ring: a
    /// vehicle's shard is the *parent* of its index cell, which near edges is
    /// a neighbour of the shard-resolution cell its position falls in.
    pub fn shards_within(&self, center: Position, radius_m: f64) -> Vec<ShardId> {
        let cell = to_latlng(center).to_cell(self.shard_res);
        let k = disk_k(cell, radius_m) + 1;
        cell.grid_disk::<Vec<_>>(k)
            .into_iter()
            .map(ShardId)
            .collect()
    }
}

impl CellModel {
    /// The shards whose vehicles can stand in `cells` (index cells): each
    /// cell's own shard, and the shard of every index cell within
    /// `margin_m` of it. A node keeps a vehicle in its shard until it has
    /// driven `margin_m` past the shard's edge (hand-off hysteresis), so a
    /// vehicle standing in a cell may be kept by a neighbouring shard.
    pub fn shards_watching(
        &self,
        cells: impl IntoIterator<Item = CellIndex>,
        margin_m: f64,
    ) -> HashSet<ShardId> {
        let mut shards = HashSet::new();
        for cell in cells {
            if margin_m <= 0.0 {
                shards.insert(self.shard_of(IndexCell(cell)));
                continue;
            }
            let k = disk_k(cell, margin_m) + 1;
            for near in cell.grid_disk::<Vec<_>>(k) {
                shards.insert(self.shard_of(IndexCell(near)));
            }
        }
        shards
    }

    /// The shards under cells of any resolution (a dashboard's density
    /// cover), or `None` when there are more than `max` of them.
    pub fn shards_under(&self, cells: &[CellIndex], max: usize) -> Option<HashSet<ShardId>> {
        let mut shards = HashSet::new();
        for cell in cells {
            if cell.resolution() >= self.shard_res {
                shards.insert(ShardId(cell.parent(self.shard_res).unwrap_or(*cell)));
            } else {
                let count = cell.children_count(self.shard_res) as usize;
                if shards.len() + count > max {
                    return None;
                }
                shards.extend(cell.children(self.shard_res).map(ShardId));
            }
            if shards.len() > max {
                return None;
            }
        }
        Some(shards)
    }
}

fn to_latlng(position: Position) -> LatLng {
    // A `Position` is finite and in range, which is all `LatLng::new` checks.
    LatLng::new(position.lat(), position.lon()).expect("Position is always a valid LatLng")
}

fn disk_covering(center: Position, radius_m: f64, res: Resolution) -> Vec<CellIndex> {
    let cell = to_latlng(center).to_cell(res);
    cell.grid_disk::<Vec<_>>(disk_k(cell, radius_m))
}

/// The smallest ring count `k` whose disk around `cell` covers the circle of
/// `radius_m` around any point inside `cell`.
///
/// On a regular hexagonal grid with edge `e`, the disk of `k` rings is a large
/// hexagon whose sides run between its six corner cells; the nearest its
/// boundary comes to the centre cell's centre is `1.5·k·e + (√3/2)·e`. The
/// point is at most `e` from that centre, so the disk covers the circle when
/// `1.5·k·e − 0.134·e ≥ r`. H3 cells vary in size and shape, so the edge is
/// taken from this cell's own area and the bound is padded; the property
/// tests below check it on random points, pentagons included.
fn disk_k(cell: CellIndex, radius_m: f64) -> u32 {
    if radius_m <= 0.0 {
        return 0;
    }
    // Edge of a regular hexagon with this cell's area.
    let edge = (2.0 * cell.area_m2() / (3.0 * 3f64.sqrt())).sqrt();
    let k = ((radius_m + CORNER_SLACK * edge) / (1.5 * edge * SPACING_MARGIN)).ceil();
    k as u32
}

/// Neighbouring cells can be smaller than the one we measured.
const SPACING_MARGIN: f64 = 0.85;
/// The point can sit in a corner of an irregular cell.
const CORNER_SLACK: f64 = 0.5;

#[cfg(test)]
mod tests {
    use std::collections::HashSet;

    use rand::{rngs::StdRng, Rng, SeedableRng};

    use super::*;

    fn random_point_within(rng: &mut StdRng, center: Position, radius_m: f64) -> Position {
        // Uniform over bearing and (area-uniform) distance, on the sphere.
        use geo::Destination;
        let d = radius_m * rng.random::<f64>().sqrt();
        let bearing = rng.random::<f64>() * 360.0;
        let origin = geo::Point::new(center.lon(), center.lat());
        let p = crate::geodesy::REDIS_SPHERE.destination(origin, bearing, d);
        Position::new(p.y(), p.x()).unwrap()
    }

    #[test]
    fn the_shard_is_the_parent_of_the_index_cell() {
        let model = CellModel::default();
        let mut rng = StdRng::seed_from_u64(7);
        for _ in 0..10_000 {
            let p = Position::new(
                rng.random_range(-85.0..85.0),
                rng.random_range(-180.0..180.0),
            )
            .unwrap();
            let (cell, shard) = model.locate(p);
            assert_eq!(cell.0.resolution(), Resolution::Nine);
            assert_eq!(shard.0.resolution(), Resolution::Five);
            assert_eq!(Some(shard.0), cell.0.parent(Resolution::Five));
        }
    }

    #[test]
    fn the_neighbourhood_covers_every_point_within_the_radius() {
        let model = CellModel::default();
        let mut rng = StdRng::seed_from_u64(11);
        for _ in 0..300 {
            let center = Position::new(
                rng.random_range(-80.0..80.0),
                rng.random_range(-179.0..179.0),
            )
            .unwrap();
            let radius = rng.random_range(0.0..3_000.0);
            let disk: HashSet<_> = model.neighbourhood(center, radius).into_iter().collect();
            for _ in 0..200 {
                let p = random_point_within(&mut rng, center, radius);
                let (cell, _) = model.locate(p);
                assert!(
                    disk.contains(&cell.0),
                    "{p:?} within {radius} m of {center:?} is outside the disk"
                );
            }
        }
    }

    #[test]
    fn the_neighbourhood_covers_the_radius_around_pentagons() {
        let model = CellModel::default();
        let mut rng = StdRng::seed_from_u64(13);
        for pentagon in Resolution::Nine.pentagons() {
            let ll = LatLng::from(pentagon);
            let center = Position::new(ll.lat(), ll.lng()).unwrap();
            let radius = 1_500.0;
            let disk: HashSet<_> = model.neighbourhood(center, radius).into_iter().collect();
            for _ in 0..500 {
                let (cell, _) = model.locate(random_point_within(&mut rng, center, radius));
                assert!(disk.contains(&cell.0));
            }
        }
    }

    #[test]
    fn a_zero_radius_watches_just_the_own_cell() {
        let model = CellModel::default();
        let p = Position::new(40.7128, -74.0060).unwrap();
        assert_eq!(model.neighbourhood(p, 0.0), vec![model.locate(p).0 .0]);
    }

    #[test]
    fn shards_within_cover_the_shards_of_every_point_in_the_radius() {
        let model = CellModel::default();
        let mut rng = StdRng::seed_from_u64(17);
        for _ in 0..100 {
            let center = Position::new(
                rng.random_range(-80.0..80.0),
                rng.random_range(-179.0..179.0),
            )
            .unwrap();
            let radius = rng.random_range(0.0..50_000.0);
            let shards: HashSet<_> = model.shards_within(center, radius).into_iter().collect();
            for _ in 0..300 {
                let (_, shard) = model.locate(random_point_within(&mut rng, center, radius));
                assert!(shards.contains(&shard));
            }
        }
    }

    #[test]
    fn resolutions_must_be_valid_and_ordered() {
        assert!(CellModel::new(9, 5).is_ok());
        assert_eq!(CellModel::new(16, 5), Err(CellModelError::Resolution(16)));
        assert_eq!(
            CellModel::new(5, 9),
            Err(CellModelError::Order { index: 5, shard: 9 })
        );
    }
}
