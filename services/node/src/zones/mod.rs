//! Zones (geofences): operators' polygons, which vehicles are in them, and
//! the events when one enters or leaves.
//!
//! - [`spec`]: a zone as GeoJSON, checked.
//! - [`index`]: zones on the cell index, so a fix costs work only for the
//!   zones touching its cell.
//! - [`view`]: counts and queues, the same on any node.
//! - [`sync`]: the tasks around it: zones read from the store (every node
//!   applies a change within a second), pending events moved from each
//!   shard's outbox to the event stream, the stream shown to dashboards,
//!   live counts shared across the cluster.
//!
//! Memberships are part of a vehicle's state ([`Membership`]): whichever
//! node holds the vehicle next (after a hand-off, a failover, a restart)
//! continues from the last membership written, so an entry is announced
//! once. Events are written with the state that records them, in the same
//! atomic write to the shard (its outbox), and moved from there to the
//! stream exactly once ([`crate::store::Store::relay_zone_events`]).

pub mod index;
pub mod spec;
pub mod sync;
pub mod view;

use std::{collections::HashMap, sync::Arc};

use h3o::{CellIndex, Resolution};
use hexfleet_model::{Membership, VehicleClass, VehicleState, VehicleStatus, ZoneId};
use hexfleet_protocol::zone::{ZoneCause, ZoneEvent, ZoneEventKind};
use parking_lot::RwLock;
use tokio::sync::{broadcast, watch};

use crate::metrics::Metrics;

pub use self::{
    index::{Zone, ZoneIndex},
    spec::{ZoneError, ZoneLimits, ZoneSpec},
};

/// Zone changes an API checks and tiles at once.
const TILING_AT_ONCE: usize = 2;

/// How many events dashboards may lag behind before they miss some.
const EVENTS_BUFFER: usize = 4096;

/// The zones this node knows, and what it needs to keep memberships.
pub struct Zones {
    index: RwLock<ZoneIndex>,
    pub limits: ZoneLimits,
    pub max_zones: usize,
    metrics: Arc<Metrics>,
    /// Bumped whenever the zones change (dashboards redraw them).
    changed: watch::Sender<u64>,
    /// Events as the stream has them, for this node's dashboards.
    events: broadcast::Sender<Arc<ZoneEvent>>,
    /// Zone changes checked and tiled at once, at most: a big zone takes
    /// up to a second of a core, and a flood of them must not take them
    /// all.
    pub tiling: tokio::sync::Semaphore,
    /// Whether the store's zones have been read once. Until then a
    /// vehicle's memberships stand as stored: a zone not known yet is not
    /// a zone deleted.
    loaded: std::sync::atomic::AtomicBool,
    /// The fleet's counts, computed at most once a second for everyone
    /// who shows them.
    counts: parking_lot::Mutex<Option<(std::time::Instant, Arc<sync::ZoneCounts>)>>,
}

/// Counts by status, as [`VehicleStatus::ALL`] orders them.
pub type StatusTally = [u32; VehicleStatus::ALL.len()];

impl Zones {
    pub fn new(
        res: Resolution,
        limits: ZoneLimits,
        max_zones: usize,
        metrics: Arc<Metrics>,
    ) -> Self {
        Self {
            index: RwLock::new(ZoneIndex::new(res)),
            limits,
            max_zones,
            metrics,
            changed: watch::Sender::new(0),
            events: broadcast::channel(EVENTS_BUFFER).0,
            counts: parking_lot::Mutex::new(None),
            loaded: std::sync::atomic::AtomicBool::new(false),
            tiling: tokio::sync::Semaphore::new(TILING_AT_ONCE),
        }
    }

    pub fn mark_loaded(&self) {
        self.loaded
            .store(true, std::sync::atomic::Ordering::Release);
    }

    pub fn is_loaded(&self) -> bool {
        self.loaded.load(std::sync::atomic::Ordering::Acquire)
    }

    /// The counts computed less than a second ago, if any.
    pub fn fresh_counts(&self) -> Option<Arc<sync::ZoneCounts>> {
        let cached = self.counts.lock();
        cached
            .as_ref()
            .filter(|(at, _)| at.elapsed() < sync::COUNTS_EVERY)
            .map(|(_, counts)| counts.clone())
    }

    pub fn keep_counts(&self, counts: Arc<sync::ZoneCounts>) {
        *self.counts.lock() = Some((std::time::Instant::now(), counts));
    }

    /// Reads the zones (briefly: no waiting while holding them).
    pub fn read(&self) -> parking_lot::RwLockReadGuard<'_, ZoneIndex> {
        self.index.read()
    }

    pub fn get(&self, id: &ZoneId) -> Option<Arc<Zone>> {
        self.index.read().get(id).cloned()
    }

    pub fn is_empty(&self) -> bool {
        self.index.read().is_empty()
    }

    pub fn watch_changes(&self) -> watch::Receiver<u64> {
        self.changed.subscribe()
    }

    pub fn subscribe_events(&self) -> broadcast::Receiver<Arc<ZoneEvent>> {
        self.events.subscribe()
    }

    /// Whether any dashboard of this node watches events.
    pub fn has_listeners(&self) -> bool {
        self.events.receiver_count() > 0
    }

    /// Shows an event from the stream to this node's dashboards.
    pub fn publish(&self, event: ZoneEvent) {
        // No dashboard listening is fine.
        let _ = self.events.send(Arc::new(event));
    }

    /// Applies zones created, changed (`Some`) or deleted (`None`), already
    /// tiled; returns the ids whose zone changed.
    pub fn apply(&self, changes: Vec<(ZoneId, Option<Arc<Zone>>)>) -> Vec<ZoneId> {
        let mut index = self.index.write();
        let mut changed = Vec::with_capacity(changes.len());
        for (id, zone) in changes {
            let differs = match (&zone, index.get(&id)) {
                (Some(new), Some(old)) => new.spec != old.spec,
                (None, None) => false,
                _ => true,
            };
            if !differs {
                continue;
            }
            match zone {
                Some(zone) => index.insert(zone),
                None => {
                    index.remove(&id);
                }
            }
            changed.push(id);
        }
        self.metrics.zones.set(index.zones().len() as i64);
        self.metrics.zone_cells.set(index.cells() as i64);
        drop(index);
        if !changed.is_empty() {
            self.changed.send_modify(|n| *n += 1);
        }
        changed
    }

    /// Brings a vehicle's memberships `zones` up to its state `state`
    /// (indexed in `cell`; `state.zones` is not read): entries keep their
    /// time, new ones are timed `now_ms`. Each change is pushed to `events`
    /// (with the state after it) as caused by `trigger` (see [`Trigger`]),
    /// or by the zone's deletion. Allocates nothing when nothing changes,
    /// as for most fixes.
    pub fn update(
        &self,
        zones: &mut Vec<Membership>,
        state: &VehicleState,
        cell: CellIndex,
        now_ms: i64,
        trigger: Trigger,
        events: &mut Vec<ZoneEvent>,
    ) {
        let index = self.index.read();
        if index.is_empty() && zones.is_empty() || !self.is_loaded() {
            return;
        }
        let (lat, lon, class, status) = (state.lat, state.lon, state.class, state.status);
        // First a look without keeping anything: the same zones as before?
        let (mut count, mut same) = (0, true);
        let tests = index.containing(cell, lat, lon, class, status, |zone| {
            count += 1;
            same &= zones.iter().any(|m| &m.zone == zone.id());
        });
        if tests > 0 {
            self.metrics.zone_tests.inc_by(tests as u64);
        }
        if same && count == zones.len() {
            return;
        }
        let mut now: Vec<Membership> = Vec::with_capacity(count);
        index.containing(cell, lat, lon, class, status, |zone| {
            now.push(Membership {
                zone: zone.id().clone(),
                entered_ms: zones
                    .iter()
                    .find(|m| &m.zone == zone.id())
                    .map_or(now_ms, |m| m.entered_ms),
            });
        });
        now.sort_by(|a, b| a.zone.cmp(&b.zone));
        let had = std::mem::replace(zones, now);
        let after = VehicleState {
            zones: zones.clone(),
            ..state.clone()
        };
        for m in had
            .iter()
            .filter(|m| !zones.iter().any(|n| n.zone == m.zone))
        {
            let cause = match index.get(&m.zone) {
                Some(zone) => trigger.cause_of(zone, false),
                None => ZoneCause::ZoneDeleted,
            };
            events.push(event(ZoneEventKind::Exited, &m.zone, cause, now_ms, &after));
        }
        for n in zones
            .iter()
            .filter(|n| !had.iter().any(|m| m.zone == n.zone))
        {
            let cause = index
                .get(&n.zone)
                .map_or(trigger.cause, |zone| trigger.cause_of(zone, true));
            events.push(event(
                ZoneEventKind::Entered,
                &n.zone,
                cause,
                now_ms,
                &after,
            ));
        }
    }

    /// The events of a vehicle that is gone (signed off, evicted): it
    /// leaves every zone it was in.
    pub fn leave_all(state: &VehicleState, now_ms: i64, cause: ZoneCause) -> Vec<ZoneEvent> {
        let after = VehicleState {
            zones: Vec::new(),
            ..state.clone()
        };
        state
            .zones
            .iter()
            .map(|m| event(ZoneEventKind::Exited, &m.zone, cause, now_ms, &after))
            .collect()
    }
}

/// What brings a vehicle's memberships up to date: a fix, a report, a
/// zone changed; and, for a fix or a report, how the vehicle stood when its
/// memberships were last brought up to date.
///
/// A membership that changes although the vehicle stood on the same side
/// of the zone before was changed by the zone, not by the vehicle: a fix
/// that arrives after a zone is applied but before the vehicles under it
/// are given their memberships again (or a vehicle whose stored memberships
/// predate the zone) enters it with cause `zone_changed`, never `moved`,
/// so an event's cause does not depend on which of the two came first.
#[derive(Debug, Clone, Copy)]
pub struct Trigger {
    pub cause: ZoneCause,
    pub before: Option<Standing>,
}

impl Trigger {
    /// The zones themselves changed.
    pub const ZONE_CHANGED: Self = Self {
        cause: ZoneCause::ZoneChanged,
        before: None,
    };

    /// A fix or a report, of a vehicle that stood as `before` (`None`: not
    /// known here, as for a vehicle's first fix on this node).
    pub fn new(cause: ZoneCause, before: Option<Standing>) -> Self {
        Self { cause, before }
    }

    /// The cause of the vehicle being `inside` `zone` now, where it was not
    /// by its memberships.
    fn cause_of(&self, zone: &Zone, inside: bool) -> ZoneCause {
        match self.before {
            Some(b) if b.is_in(zone) == inside => ZoneCause::ZoneChanged,
            _ => self.cause,
        }
    }
}

/// Where a vehicle was, and what it reported: what decides its zones.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Standing {
    pub lat: f64,
    pub lon: f64,
    pub class: VehicleClass,
    pub status: VehicleStatus,
}

impl Standing {
    fn is_in(&self, zone: &Zone) -> bool {
        zone.admits(self.class, self.status) && zone.contains(self.lat, self.lon)
    }
}

impl From<&VehicleState> for Standing {
    fn from(state: &VehicleState) -> Self {
        Self {
            lat: state.lat,
            lon: state.lon,
            class: state.class,
            status: state.status,
        }
    }
}

fn event(
    kind: ZoneEventKind,
    zone: &ZoneId,
    cause: ZoneCause,
    at_ms: i64,
    vehicle: &VehicleState,
) -> ZoneEvent {
    ZoneEvent {
        event: kind,
        zone: zone.clone(),
        cause,
        at_ms,
        vehicle: vehicle.clone(),
    }
}

/// Counts per zone by status of the vehicles in `states`.
pub fn tally<'a>(
    states: impl IntoIterator<Item = &'a VehicleState>,
) -> HashMap<ZoneId, StatusTally> {
    let mut counts: HashMap<ZoneId, StatusTally> = HashMap::new();
    for state in states {
        for m in &state.zones {
            counts.entry(m.zone.clone()).or_default()[state.status as usize] += 1;
        }
    }
    counts
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use geo::{Contains, LineString, MultiPolygon, Point, Polygon};
    use hexfleet_model::{CellModel, Position, VehicleClass, VehicleId};
    use hexfleet_protocol::Filter;
    use rand::{rngs::StdRng, Rng, SeedableRng};

    use super::*;

    const LIMITS: ZoneLimits = ZoneLimits {
        max_vertices: 1_000,
        max_area_km2: 500.0,
    };

    /// A star-shaped ring around (lat, lon): concave, simple.
    fn star(rng: &mut StdRng, lat: f64, lon: f64, r_min_m: f64, r_max_m: f64) -> LineString<f64> {
        use geo::Destination;
        let n = rng.random_range(5..30);
        let mut coords: Vec<(f64, f64)> = (0..n)
            .map(|i| {
                let bearing = i as f64 / n as f64 * 360.0;
                let r = rng.random_range(r_min_m..r_max_m);
                let p = geo::Haversine.destination(Point::new(lon, lat), bearing, r);
                (p.x(), p.y())
            })
            .collect();
        coords.push(coords[0]);
        LineString::from(coords)
    }

    fn random_zone(rng: &mut StdRng, i: usize, lat: f64, lon: f64) -> Arc<Zone> {
        let r = rng.random_range(150.0..3_000.0);
        let exterior = star(rng, lat, lon, 0.4 * r, r);
        let holes = if rng.random_bool(0.4) {
            vec![star(rng, lat, lon, 0.05 * r, 0.3 * r)]
        } else {
            Vec::new()
        };
        let filter = if i.is_multiple_of(4) {
            Filter {
                classes: Vec::new(),
                statuses: vec![VehicleStatus::Available],
            }
        } else {
            Filter::any()
        };
        let spec = ZoneSpec {
            id: ZoneId::new(&format!("z{i}")).unwrap(),
            name: format!("zone {i}"),
            kind: "test".into(),
            filter,
            geometry: MultiPolygon::new(vec![Polygon::new(exterior, holes)]),
            area_km2: 0.0,
        };
        // Through the one gate, as the API does.
        let spec = ZoneSpec::parse(
            spec.id.clone(),
            spec.to_feature().to_string().as_bytes(),
            LIMITS,
        )
        .unwrap();
        Arc::new(Zone::new(spec, CellModel::default().index_res()).unwrap())
    }

    fn vehicle(id: &str, lat: f64, lon: f64) -> VehicleState {
        VehicleState {
            id: VehicleId::new(id).unwrap(),
            lat,
            lon,
            heading_deg: 0.0,
            speed_mps: 0.0,
            accuracy_m: 5.0,
            fix_time_ms: 0,
            seq: 0,
            class: VehicleClass::Economy,
            status: VehicleStatus::Available,
            seen_ms: 0,
            zones: Vec::new(),
            clock_offset_ms: 0,
        }
    }

    /// A square of about 1.4 × 2.2 km in Berlin's centre, through the
    /// API's gate.
    fn square(id: &str, filter: Filter) -> Arc<Zone> {
        let square = serde_json::json!({"type": "Feature", "geometry": {"type": "Polygon", "coordinates": [[
            [13.39, 52.51], [13.41, 52.51], [13.41, 52.53], [13.39, 52.53], [13.39, 52.51]
        ]]}});
        let mut spec = ZoneSpec::parse(
            ZoneId::new(id).unwrap(),
            square.to_string().as_bytes(),
            LIMITS,
        )
        .unwrap();
        spec.filter = filter;
        Arc::new(Zone::new(spec, CellModel::default().index_res()).unwrap())
    }

    /// The zones a vehicle is in, by a look at every zone's polygon.
    fn brute_force(zones: &ZoneIndex, state: &VehicleState) -> BTreeSet<ZoneId> {
        zones
            .zones()
            .values()
            .filter(|z| z.admits(state.class, state.status))
            .filter(|z| z.spec.geometry.contains(&Point::new(state.lon, state.lat)))
            .map(|z| z.id().clone())
            .collect()
    }

    #[test]
    fn memberships_and_events_match_a_point_in_polygon_replay_of_every_move() {
        let cells = CellModel::default();
        let mut rng = StdRng::seed_from_u64(13);
        let zones = Zones::new(cells.index_res(), LIMITS, 1_000, Arc::new(Metrics::new()));
        zones.mark_loaded();
        // Around a city (zones cross shard edges: shards are ~8 km across)
        // and around a pentagon, where cells have five neighbours.
        let pentagon = Resolution::Nine
            .pentagons()
            .map(h3o::LatLng::from)
            .find(|p| p.lat().abs() < 60.0)
            .unwrap();
        let areas = [(52.52, 13.40), (pentagon.lat(), pentagon.lng())];
        let mut tiled = Vec::new();
        for i in 0..60 {
            let (lat, lon) = areas[i % 2];
            // Around the pentagon, closer: its own cell in several zones.
            let spread = if i % 2 == 1 { 0.02 } else { 0.1 };
            let (lat, lon) = (
                lat + rng.random_range(-spread..spread),
                lon + rng.random_range(-spread..spread),
            );
            let zone = random_zone(&mut rng, i, lat, lon);
            tiled.push((zone.id().clone(), Some(zone)));
        }
        zones.apply(tiled);
        let index = zones.read();
        // The cases the test is for are there: zones across shard edges,
        // and zones over a pentagon's cells.
        let res = cells.index_res();
        let across = index
            .zones()
            .values()
            .filter(|z| {
                let shards: std::collections::HashSet<_> = z
                    .cells(res)
                    .map(|c| cells.shard_of(hexfleet_model::IndexCell(c)))
                    .collect();
                shards.len() > 1
            })
            .count();
        let on_pentagon = index
            .zones()
            .values()
            .filter(|z| z.cells(res).any(|c| c.is_pentagon()))
            .count();
        assert!(across >= 10, "{across} zones cross a shard edge");
        assert!(on_pentagon >= 1, "{on_pentagon} zones hold the pentagon");
        let mut vehicles: Vec<VehicleState> = (0..300)
            .map(|i| {
                let (lat, lon) = areas[i % 2];
                let (dlat, dlon) = (rng.random_range(-0.05..0.05), rng.random_range(-0.05..0.05));
                vehicle(&format!("v{i}"), lat + dlat, lon + dlon)
            })
            .collect();
        let (mut entered, mut exited, mut checked) = (0, 0, 0);
        for step in 0..200 {
            let now_ms = step as i64 * 1_000;
            for v in vehicles.iter_mut() {
                // Mostly small moves (through edge cells), some jumps, and
                // status changes that filtered zones see.
                let metres = if rng.random_bool(0.05) {
                    5_000.0
                } else {
                    150.0
                };
                let was = Standing::from(&*v);
                v.lat += rng.random_range(-metres..metres) / 111_320.0;
                v.lon += rng.random_range(-metres..metres) / 70_000.0;
                if rng.random_bool(0.05) {
                    v.status = VehicleStatus::ALL[rng.random_range(0..3)];
                }
                let before: BTreeSet<ZoneId> = v.zones.iter().map(|m| m.zone.clone()).collect();
                let (cell, _) = cells.locate(Position::new(v.lat, v.lon).unwrap());
                let mut events = Vec::new();
                let mut held = std::mem::take(&mut v.zones);
                // Its memberships were first computed at step 0.
                let moved = Trigger::new(ZoneCause::Moved, (step > 0).then_some(was));
                zones.update(&mut held, v, cell.0, now_ms, moved, &mut events);
                v.zones = held;
                // The zones stand still: every change is the vehicle's.
                assert!(events.iter().all(|e| e.cause == ZoneCause::Moved));
                let after: BTreeSet<ZoneId> = v.zones.iter().map(|m| m.zone.clone()).collect();
                assert_eq!(after, brute_force(&index, v), "step {step}: {v:?}");
                let mut expected: Vec<(ZoneEventKind, ZoneId)> = before
                    .difference(&after)
                    .map(|z| (ZoneEventKind::Exited, z.clone()))
                    .chain(
                        after
                            .difference(&before)
                            .map(|z| (ZoneEventKind::Entered, z.clone())),
                    )
                    .collect();
                let mut got: Vec<(ZoneEventKind, ZoneId)> =
                    events.iter().map(|e| (e.event, e.zone.clone())).collect();
                expected.sort_by(|a, b| a.1.cmp(&b.1).then(a.0.as_str().cmp(b.0.as_str())));
                got.sort_by(|a, b| a.1.cmp(&b.1).then(a.0.as_str().cmp(b.0.as_str())));
                assert_eq!(got, expected, "step {step}: events of {}", v.id);
                for e in &events {
                    assert_eq!(
                        e.vehicle.zones, v.zones,
                        "an event carries the state after it"
                    );
                }
                // Staying keeps the time of entry (the queue's order).
                for m in &v.zones {
                    if before.contains(&m.zone) {
                        assert!(m.entered_ms < now_ms);
                    } else {
                        assert_eq!(m.entered_ms, now_ms);
                    }
                }
                entered += got.iter().filter(|e| e.0 == ZoneEventKind::Entered).count();
                exited += got.iter().filter(|e| e.0 == ZoneEventKind::Exited).count();
                checked += 1;
            }
        }
        println!("{checked} moves, {entered} entries, {exited} exits");
        assert!(
            entered > 500 && exited > 500,
            "the test moved vehicles across zones: {entered} in, {exited} out"
        );
    }

    #[test]
    fn a_fix_under_a_zone_not_yet_applied_to_the_vehicle_enters_it_as_zone_changed() {
        let cells = CellModel::default();
        let zones = Zones::new(cells.index_res(), LIMITS, 10, Arc::new(Metrics::new()));
        zones.mark_loaded();
        zones.apply(vec![(
            ZoneId::new("sq").unwrap(),
            Some(square("sq", Filter::any())),
        )]);
        // Fixes that arrive after the zone is applied, before the vehicles
        // under it are given their memberships again (they have none yet).
        let cause_of_entry = |from: (f64, f64), to: (f64, f64)| {
            let before = vehicle("v", from.0, from.1);
            let after = vehicle("v", to.0, to.1);
            let (cell, _) = cells.locate(after.position());
            let (mut held, mut events) = (Vec::new(), Vec::new());
            let trigger = Trigger::new(ZoneCause::Moved, Some(Standing::from(&before)));
            zones.update(&mut held, &after, cell.0, 1, trigger, &mut events);
            assert_eq!(events.len(), 1);
            assert_eq!(events[0].event, ZoneEventKind::Entered);
            events[0].cause
        };
        // Inside before and after: the zone came under it.
        assert_eq!(
            cause_of_entry((52.52, 13.40), (52.5201, 13.4001)),
            ZoneCause::ZoneChanged
        );
        // From outside to inside: it drove in.
        assert_eq!(
            cause_of_entry((52.50, 13.40), (52.52, 13.40)),
            ZoneCause::Moved
        );
        // A report that lets a filtered zone see the vehicle is the
        // report's; the same status as before is the zone's.
        let filtered = square(
            "free",
            Filter {
                classes: Vec::new(),
                statuses: vec![VehicleStatus::Available],
            },
        );
        let on_trip = Standing {
            status: VehicleStatus::OnTrip,
            ..Standing::from(&vehicle("v", 52.52, 13.40))
        };
        let available = Standing::from(&vehicle("v", 52.52, 13.40));
        let reported = Trigger::new(ZoneCause::Reported, Some(on_trip));
        assert_eq!(reported.cause_of(&filtered, true), ZoneCause::Reported);
        let unchanged = Trigger::new(ZoneCause::Reported, Some(available));
        assert_eq!(unchanged.cause_of(&filtered, true), ZoneCause::ZoneChanged);
    }

    #[test]
    fn a_deleted_zone_lets_its_vehicles_out_with_that_cause() {
        let cells = CellModel::default();
        let zones = Zones::new(cells.index_res(), LIMITS, 10, Arc::new(Metrics::new()));
        zones.mark_loaded();
        let zone = square("sq", Filter::any());
        let id = zone.id().clone();
        zones.apply(vec![(id.clone(), Some(zone))]);
        let mut state = vehicle("v", 52.52, 13.40);
        let (cell, _) = cells.locate(state.position());
        let mut events = Vec::new();
        let mut held = Vec::new();
        let moved = Trigger::new(ZoneCause::Moved, None);
        zones.update(&mut held, &state, cell.0, 1, moved, &mut events);
        state.zones = held;
        assert_eq!(events.len(), 1);
        assert_eq!(events[0].event, ZoneEventKind::Entered);
        zones.apply(vec![(id.clone(), None)]);
        let mut events = Vec::new();
        let mut held = std::mem::take(&mut state.zones);
        zones.update(
            &mut held,
            &state,
            cell.0,
            2,
            Trigger::ZONE_CHANGED,
            &mut events,
        );
        state.zones = held;
        assert!(state.zones.is_empty());
        assert_eq!(events.len(), 1);
        assert_eq!(
            (events[0].event, events[0].cause),
            (ZoneEventKind::Exited, ZoneCause::ZoneDeleted)
        );
    }
}
