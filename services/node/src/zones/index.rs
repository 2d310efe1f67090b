//! Zones on the cell index: which zones a fix's cell can be in, and whether
//! it needs an exact test.
//!
//! Each zone is tiled with h3o's polygon tiler at the index resolution
//! ([`ContainmentMode::Covers`]: every cell the polygon touches, each marked
//! when wholly inside). A cell wholly inside needs no test; a cell the
//! polygon's edge crosses is tested exactly with `geo`. One more kind of
//! cell is tested exactly: a neighbour of an edge cell that comes within
//! [`EDGE_MARGIN_DEG`] of the edge without touching it. h3o's cell edges are
//! straight on the gnomonic projection, the polygon's in longitude and
//! latitude; the two disagree by up to a millimetre, so such a cell may hold
//! a sliver on the other side. With it, membership is exactly `geo`'s
//! point-in-polygon everywhere (the tests replay random moves against
//! brute force), while a fix deep inside or away from every edge costs one
//! hash lookup per resolution in use. Cells wholly inside are stored
//! compacted, so a large zone costs memory for its edge, not its area.

use std::{
    collections::{HashMap, HashSet},
    sync::Arc,
};

use geo::{BoundingRect, Contains, Distance, Euclidean, LineString, Point, Rect};
use h3o::{
    geom::{ContainmentMode, TilerBuilder},
    CellIndex, Resolution,
};
use hexfleet_model::{VehicleClass, VehicleStatus, ZoneId};

use super::spec::{ZoneError, ZoneSpec};

/// A zone with its cover.
#[derive(Debug)]
pub struct Zone {
    pub spec: ZoneSpec,
    /// The box around it (x: longitude, y: latitude).
    pub bounds: Option<Rect<f64>>,
    /// No filter: every vehicle counts.
    any_vehicle: bool,
    /// Cells where a point may be in or out: tested exactly.
    edge: Vec<CellIndex>,
    /// Cells wholly inside, compacted (coarser where whole parents are).
    inside: Vec<CellIndex>,
}

impl Zone {
    /// Tiles a zone at the index resolution.
    pub fn new(spec: ZoneSpec, res: Resolution) -> Result<Self, ZoneError> {
        let mut tiler = TilerBuilder::new(res)
            .containment_mode(ContainmentMode::Covers)
            .disable_transmeridian_heuristic()
            .build();
        for polygon in &spec.geometry.0 {
            tiler
                .add(polygon.clone())
                .map_err(|e| ZoneError::Invalid(e.to_string()))?;
        }
        let mut whole = HashSet::new();
        let mut touched = HashSet::new();
        for cell in tiler.into_annotated_coverage() {
            if cell.is_fully_contained {
                whole.insert(cell.cell);
            } else {
                touched.insert(cell.cell);
            }
        }
        // A cell can be partly in one polygon and wholly in another.
        touched.retain(|c| !whole.contains(c));
        let rings: Vec<&LineString<f64>> = spec
            .geometry
            .0
            .iter()
            .flat_map(|p| std::iter::once(p.exterior()).chain(p.interiors()))
            .collect();
        let near_edge = |cell: CellIndex| {
            let outline: LineString<f64> = cell
                .boundary()
                .iter()
                .chain(cell.boundary().iter().take(1))
                .map(|v| (v.lng(), v.lat()))
                .collect();
            rings
                .iter()
                .any(|ring| Euclidean.distance(*ring, &outline) < EDGE_MARGIN_DEG)
        };
        let mut edge: HashSet<CellIndex> = touched.clone();
        let mut looked = HashSet::new();
        for cell in &touched {
            for next in cell.grid_disk::<Vec<_>>(1) {
                if !touched.contains(&next) && looked.insert(next) && near_edge(next) {
                    edge.insert(next);
                }
            }
        }
        let mut inside: Vec<CellIndex> = whole.into_iter().filter(|c| !edge.contains(c)).collect();
        inside.sort_unstable();
        CellIndex::compact(&mut inside).map_err(|e| ZoneError::Invalid(e.to_string()))?;
        let mut edge: Vec<CellIndex> = edge.into_iter().collect();
        edge.sort_unstable();
        Ok(Self {
            bounds: spec.geometry.bounding_rect(),
            any_vehicle: spec.filter.classes.is_empty() && spec.filter.statuses.is_empty(),
            spec,
            edge,
            inside,
        })
    }

    pub fn id(&self) -> &ZoneId {
        &self.spec.id
    }

    /// Exactly: is the point (lat, lon) in the zone's polygon? (Its box
    /// first: most points tested near a small zone are outside it.)
    pub fn contains(&self, lat: f64, lon: f64) -> bool {
        let in_box = self.bounds.is_some_and(|b| {
            lon >= b.min().x && lon <= b.max().x && lat >= b.min().y && lat <= b.max().y
        });
        in_box && self.spec.geometry.contains(&Point::new(lon, lat))
    }

    pub fn admits(&self, class: VehicleClass, status: VehicleStatus) -> bool {
        self.any_vehicle || self.spec.filter.matches(class, status)
    }

    /// Every index cell a vehicle in the zone can be in.
    pub fn cells(&self, res: Resolution) -> impl Iterator<Item = CellIndex> + '_ {
        self.edge
            .iter()
            .copied()
            .chain(self.inside.iter().flat_map(move |c| c.children(res)))
    }

    /// How many cells (edge, and compacted inside) the index holds for it.
    pub fn cover_len(&self) -> usize {
        self.edge.len() + self.inside.len()
    }
}

/// How near the edge a cell that does not touch it must come to be tested
/// exactly: about 10 cm, a hundred times what h3o's and `geo`'s edges can
/// disagree by.
const EDGE_MARGIN_DEG: f64 = 1e-6;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Test {
    Inside,
    Exact,
}

/// A zone as a cell lists it: what a fix needs to rule it out (its box,
/// whether it filters) without reading the zone itself, so the entries of
/// a busy cell stay in a few cache lines.
#[derive(Debug)]
struct CellEntry {
    zone: Arc<Zone>,
    test: Test,
    any_vehicle: bool,
    /// west, south, east, north
    bounds: [f64; 4],
}

impl CellEntry {
    fn new(zone: &Arc<Zone>, test: Test) -> Self {
        let bounds = zone
            .bounds
            .map_or([0.0; 4], |b| [b.min().x, b.min().y, b.max().x, b.max().y]);
        Self {
            zone: zone.clone(),
            test,
            any_vehicle: zone.any_vehicle,
            bounds,
        }
    }
}

/// Cell ids are well-spread 64-bit integers: a fast hash does.
type CellMap<V> = HashMap<CellIndex, V, xxhash_rust::xxh3::Xxh3DefaultBuilder>;

/// Every zone, by the cells it covers. Changed in place, one zone at a time
/// (a change costs the cells of the zone changed, not of all zones), read
/// by every fix.
#[derive(Debug)]
pub struct ZoneIndex {
    zones: HashMap<ZoneId, Arc<Zone>>,
    by_cell: CellMap<Vec<CellEntry>>,
    /// How many cells `by_cell` holds at each resolution...
    per_resolution: [usize; 16],
    /// ...and so the resolutions a fix looks up, finest first.
    resolutions: Vec<Resolution>,
    res: Resolution,
}

impl ZoneIndex {
    pub fn new(res: Resolution) -> Self {
        Self {
            zones: HashMap::new(),
            by_cell: CellMap::default(),
            per_resolution: [0; 16],
            resolutions: Vec::new(),
            res,
        }
    }

    fn cells_of(zone: &Zone) -> impl Iterator<Item = (CellIndex, Test)> + '_ {
        zone.edge
            .iter()
            .map(|c| (*c, Test::Exact))
            .chain(zone.inside.iter().map(|c| (*c, Test::Inside)))
    }

    /// Adds a zone, or replaces the one with its id.
    pub fn insert(&mut self, zone: Arc<Zone>) {
        self.remove(zone.id());
        for (cell, test) in Self::cells_of(&zone) {
            self.per_resolution[u8::from(cell.resolution()) as usize] += 1;
            self.by_cell
                .entry(cell)
                .or_default()
                .push(CellEntry::new(&zone, test));
        }
        self.zones.insert(zone.id().clone(), zone);
        self.resolutions_changed();
    }

    /// Removes a zone; `false` if there was none.
    pub fn remove(&mut self, id: &ZoneId) -> bool {
        let Some(zone) = self.zones.remove(id) else {
            return false;
        };
        for (cell, _) in Self::cells_of(&zone) {
            let slot = &mut self.per_resolution[u8::from(cell.resolution()) as usize];
            *slot = slot.saturating_sub(1);
            if let Some(entries) = self.by_cell.get_mut(&cell) {
                entries.retain(|e| e.zone.id() != id);
                if entries.is_empty() {
                    self.by_cell.remove(&cell);
                }
            }
        }
        self.resolutions_changed();
        true
    }

    fn resolutions_changed(&mut self) {
        self.resolutions = (0..16u8)
            .rev()
            .filter(|r| self.per_resolution[*r as usize] > 0)
            .filter_map(|r| Resolution::try_from(r).ok())
            .collect();
    }

    /// Cells held (edge cells, and compacted inside cells).
    pub fn cells(&self) -> usize {
        self.per_resolution.iter().sum()
    }

    pub fn zones(&self) -> &HashMap<ZoneId, Arc<Zone>> {
        &self.zones
    }

    pub fn get(&self, id: &ZoneId) -> Option<&Arc<Zone>> {
        self.zones.get(id)
    }

    pub fn is_empty(&self) -> bool {
        self.zones.is_empty()
    }

    pub fn resolution(&self) -> Resolution {
        self.res
    }

    /// Calls `found` with each zone a vehicle at (lat, lon), indexed in
    /// `cell`, of this class and status, is in (each once); returns how
    /// many exact tests it took.
    pub fn containing<'a>(
        &'a self,
        cell: CellIndex,
        lat: f64,
        lon: f64,
        class: VehicleClass,
        status: VehicleStatus,
        mut found: impl FnMut(&'a Arc<Zone>),
    ) -> usize {
        let mut tests = 0;
        for &res in &self.resolutions {
            let key = if res == self.res {
                cell
            } else {
                match cell.parent(res) {
                    Some(parent) => parent,
                    None => continue,
                }
            };
            let Some(entries) = self.by_cell.get(&key) else {
                continue;
            };
            for entry in entries {
                let inside = match entry.test {
                    Test::Inside => true,
                    Test::Exact => {
                        let [west, south, east, north] = entry.bounds;
                        if lon < west || lon > east || lat < south || lat > north {
                            continue;
                        }
                        tests += 1;
                        entry.zone.spec.geometry.contains(&Point::new(lon, lat))
                    }
                };
                // A zone has one entry per cell, and a cell is edge or
                // inside (at one resolution): no zone is found twice.
                if inside && (entry.any_vehicle || entry.zone.admits(class, status)) {
                    found(&entry.zone);
                }
            }
        }
        tests
    }
}
