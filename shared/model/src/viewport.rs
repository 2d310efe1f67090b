//! What a map viewport watches: the cells covering a bounding box, at the
//! index resolution when few enough to show every vehicle, else at the
//! finest coarser resolution whose cells are few enough to show counts.

use geo_types::{coord, Rect};
use h3o::{
    geom::{ContainmentMode, TilerBuilder},
    CellIndex, Resolution,
};
use serde::{Deserialize, Serialize};

use crate::CellModel;

/// A latitude/longitude box in degrees, south-west to north-east.
/// Constructed only through [`BBox::new`], so it is finite, in range and
/// not inverted.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(try_from = "RawBBox")]
pub struct BBox {
    south: f64,
    west: f64,
    north: f64,
    east: f64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum BBoxError {
    #[error("bbox latitudes must be finite numbers in [-90, 90]")]
    Latitude,
    #[error("bbox longitudes must be finite numbers in [-180, 180]")]
    Longitude,
    #[error("bbox is inverted: south must be below north and west left of east")]
    Inverted,
}

#[derive(Deserialize)]
struct RawBBox {
    south: f64,
    west: f64,
    north: f64,
    east: f64,
}

impl TryFrom<RawBBox> for BBox {
    type Error = BBoxError;

    fn try_from(raw: RawBBox) -> Result<Self, Self::Error> {
        Self::new(raw.south, raw.west, raw.north, raw.east)
    }
}

impl BBox {
    pub fn new(south: f64, west: f64, north: f64, east: f64) -> Result<Self, BBoxError> {
        let lat = |v: f64| v.is_finite() && (-90.0..=90.0).contains(&v);
        let lon = |v: f64| v.is_finite() && (-180.0..=180.0).contains(&v);
        if !(lat(south) && lat(north)) {
            return Err(BBoxError::Latitude);
        }
        if !(lon(west) && lon(east)) {
            return Err(BBoxError::Longitude);
        }
        if south >= north || west >= east {
            return Err(BBoxError::Inverted);
        }
        Ok(Self {
            south,
            west,
            north,
            east,
        })
    }

    pub fn south(&self) -> f64 {
        self.south
    }

    pub fn west(&self) -> f64 {
        self.west
    }

    pub fn north(&self) -> f64 {
        self.north
    }

    pub fn east(&self) -> f64 {
        self.east
    }
}

/// The latitude limit of a web (Mercator) map, beyond which nothing is tiled.
pub const MAX_TILED_LAT: f64 = 85.0;
/// Spans beyond which a viewport is shown as all base cells.
const MAX_TILED_LON_SPAN: f64 = 240.0;
const MAX_TILED_LAT_SPAN: f64 = 150.0;

/// How a viewport is shown.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ViewportCover {
    /// Every vehicle, from these index cells.
    Vehicles(Vec<CellIndex>),
    /// Counts per cell at a coarser resolution.
    Density {
        resolution: Resolution,
        cells: Vec<CellIndex>,
    },
}

impl CellModel {
    /// The cells at `res` covering `bbox` (every point of the box lies in
    /// one), or `None` when there would be more than `max`.
    ///
    /// Latitudes are clamped to ±[`MAX_TILED_LAT`], the edge of a web map.
    pub fn cover(&self, bbox: &BBox, res: Resolution, max: usize) -> Option<Vec<CellIndex>> {
        let clamp = |lat: f64| lat.clamp(-MAX_TILED_LAT, MAX_TILED_LAT);
        let (south, north) = (clamp(bbox.south), clamp(bbox.north));
        if south >= north {
            return Some(Vec::new());
        }
        let rect = Rect::new(
            coord! { x: bbox.west, y: south },
            coord! { x: bbox.east, y: north },
        );
        let mut tiler = TilerBuilder::new(res)
            .containment_mode(ContainmentMode::Covers)
            .disable_transmeridian_heuristic()
            .build();
        // A box from `BBox::new` is a valid polygon.
        tiler.add(rect.to_polygon()).ok()?;
        // The hint overestimates (it assumes pentagon-sized cells): refuse
        // early only when even a generous reading is over the limit.
        if tiler.coverage_size_hint() > max.saturating_mul(4).saturating_add(64) {
            return None;
        }
        let mut cells: Vec<CellIndex> = tiler.into_coverage().collect();
        cells.sort_unstable();
        cells.dedup();
        (cells.len() <= max).then_some(cells)
    }

    /// What a viewport watches: its index cells when there are at most
    /// `max_vehicle_cells`, else the cells of the finest coarser resolution
    /// with at most `max_density_cells` (resolution 0 at worst).
    pub fn viewport(
        &self,
        bbox: &BBox,
        max_vehicle_cells: usize,
        max_density_cells: usize,
    ) -> ViewportCover {
        if bbox.east - bbox.west > MAX_TILED_LON_SPAN
            || bbox.north - bbox.south > MAX_TILED_LAT_SPAN
        {
            // Boxes this wide are most of the globe: planar tiling misreads
            // cells that wrap around it, and every base cell is in view anyway.
            return ViewportCover::Density {
                resolution: Resolution::Zero,
                cells: CellIndex::base_cells().collect(),
            };
        }
        if let Some(cells) = self.cover(bbox, self.index_res(), max_vehicle_cells) {
            return ViewportCover::Vehicles(cells);
        }
        let mut res = self.index_res();
        while let Some(coarser) = res.pred() {
            res = coarser;
            if let Some(cells) = self.cover(bbox, res, max_density_cells) {
                return ViewportCover::Density {
                    resolution: res,
                    cells,
                };
            }
        }
        ViewportCover::Density {
            resolution: Resolution::Zero,
            cells: self
                .cover(bbox, Resolution::Zero, usize::MAX)
                .unwrap_or_default(),
        }
    }
}

#[cfg(test)]
mod tests {
    use rand::{rngs::StdRng, Rng, SeedableRng};

    use super::*;
    use crate::Position;

    fn berlin() -> BBox {
        BBox::new(52.50, 13.37, 52.53, 13.42).unwrap()
    }

    #[test]
    fn a_bbox_must_be_in_range_and_not_inverted() {
        assert_eq!(BBox::new(1.0, 0.0, 0.0, 1.0), Err(BBoxError::Inverted));
        assert_eq!(BBox::new(0.0, 1.0, 1.0, 0.0), Err(BBoxError::Inverted));
        assert_eq!(BBox::new(0.0, 0.0, 91.0, 1.0), Err(BBoxError::Latitude));
        assert_eq!(
            BBox::new(0.0, f64::NAN, 1.0, 1.0),
            Err(BBoxError::Longitude)
        );
        let json = r#"{"south":2,"west":0,"north":1,"east":1}"#;
        assert!(serde_json::from_str::<BBox>(json).is_err());
    }

    #[test]
    fn the_cover_holds_the_cell_of_every_point_in_the_box() {
        let model = CellModel::default();
        let bbox = berlin();
        let ViewportCover::Vehicles(cells) = model.viewport(&bbox, 5_000, 500) else {
            panic!("a few square kilometres show vehicles");
        };
        let mut rng = StdRng::seed_from_u64(5);
        for _ in 0..2_000 {
            let lat = rng.random_range(bbox.south()..=bbox.north());
            let lon = rng.random_range(bbox.west()..=bbox.east());
            let (cell, _) = model.locate(Position::new(lat, lon).unwrap());
            assert!(
                cells.binary_search(&cell.0).is_ok(),
                "{lat},{lon} uncovered"
            );
        }
    }

    #[test]
    fn a_wide_box_switches_to_counts_at_a_coarser_resolution() {
        let model = CellModel::default();
        let city = BBox::new(52.3, 13.0, 52.7, 13.8).unwrap();
        match model.viewport(&city, 1_500, 600) {
            ViewportCover::Density { resolution, cells } => {
                assert!(resolution < model.index_res());
                assert!(!cells.is_empty() && cells.len() <= 600);
                assert!(cells.iter().all(|c| c.resolution() == resolution));
            }
            other => panic!("expected density, got {other:?}"),
        }
        let world = BBox::new(-80.0, -179.0, 80.0, 179.0).unwrap();
        assert!(matches!(
            model.viewport(&world, 1_500, 600),
            ViewportCover::Density { .. }
        ));
    }

    #[test]
    fn any_box_on_the_globe_gets_a_cover() {
        let model = CellModel::default();
        let mut rng = StdRng::seed_from_u64(9);
        for _ in 0..60 {
            let height = 10f64.powf(rng.random_range(-3.0..2.3));
            let width = 10f64.powf(rng.random_range(-3.0..2.6));
            let south = rng.random_range(-90.0..90.0 - height.min(179.0));
            let west = rng.random_range(-180.0..180.0 - width.min(359.0));
            let bbox = BBox::new(
                south,
                west,
                south + height.min(179.0),
                west + width.min(359.0),
            )
            .unwrap();
            match model.viewport(&bbox, 1_500, 600) {
                ViewportCover::Vehicles(cells) => assert!(cells.len() <= 1_500),
                ViewportCover::Density { cells, .. } => assert!(cells.len() <= 600),
            }
        }
    }
}
