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
use hexfleet_model::{Membership, VehicleState, VehicleStatus, ZoneId};
use hexfleet_protocol::zone::{ZoneCause, ZoneEvent, ZoneEventKind};
use parking_lot::RwLock;
use tokio::sync::{broadcast, watch};

use crate::metrics::Metrics;

pub use self::{
    index::{Zone, ZoneIndex},
    spec::{ZoneError, ZoneLimits, ZoneSpec},
};

/// How many events dashboards may lag behind before they miss some.
const EVENTS_BUFFER: usize = 4096;

/// The zones this node knows, and what it needs to keep memberships.
pub struct Zones {
    index: RwLock<Arc<ZoneIndex>>,
    pub limits: ZoneLimits,
    pub max_zones: usize,
    metrics: Arc<Metrics>,
    /// Bumped whenever the zones change (dashboards redraw them).
    changed: watch::Sender<u64>,
    /// Events as the stream has them, for this node's dashboards.
    events: broadcast::Sender<Arc<ZoneEvent>>,
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
            index: RwLock::new(Arc::new(ZoneIndex::new(res))),
            limits,
            max_zones,
            metrics,
            changed: watch::Sender::new(0),
            events: broadcast::channel(EVENTS_BUFFER).0,
        }
    }

    /// The zones now (a snapshot: later changes do not show in it).
    pub fn current(&self) -> Arc<ZoneIndex> {
        self.index.read().clone()
    }

    pub fn watch_changes(&self) -> watch::Receiver<u64> {
        self.changed.subscribe()
    }

    pub fn subscribe_events(&self) -> broadcast::Receiver<Arc<ZoneEvent>> {
        self.events.subscribe()
    }

    /// Shows an event from the stream to this node's dashboards.
    pub fn publish(&self, event: ZoneEvent) {
        // No dashboard listening is fine.
        let _ = self.events.send(Arc::new(event));
    }

    /// Applies zones created, changed (`Some`) or deleted (`None`), already
    /// tiled; returns the ids whose zone changed.
    pub fn apply(&self, changes: Vec<(ZoneId, Option<Arc<Zone>>)>) -> Vec<ZoneId> {
        if changes.is_empty() {
            return Vec::new();
        }
        let mut index = self.index.write();
        let mut zones = index.zones().clone();
        let mut changed = Vec::with_capacity(changes.len());
        for (id, zone) in changes {
            let differs = match (&zone, zones.get(&id)) {
                (Some(new), Some(old)) => new.spec != old.spec,
                (None, None) => false,
                _ => true,
            };
            if !differs {
                continue;
            }
            match zone {
                Some(zone) => zones.insert(id.clone(), zone),
                None => zones.remove(&id),
            };
            changed.push(id);
        }
        if changed.is_empty() {
            return changed;
        }
        let res = index.resolution();
        let cells: usize = zones.values().map(|z| z.cover_len()).sum();
        *index = Arc::new(ZoneIndex::build(zones, res));
        self.metrics.zones.set(index.zones().len() as i64);
        self.metrics.zone_cells.set(cells as i64);
        drop(index);
        self.changed.send_modify(|n| *n += 1);
        changed
    }

    /// A vehicle's memberships now that its state is `state` (indexed in
    /// `cell`), given those it had: entries keep their time, new ones are
    /// timed `now_ms`. Each change is pushed to `events` (with the state
    /// after it) as caused by `cause`, or by the zone's deletion.
    pub fn update(
        &self,
        had: &[Membership],
        state: &VehicleState,
        cell: CellIndex,
        now_ms: i64,
        cause: ZoneCause,
        events: &mut Vec<ZoneEvent>,
    ) -> Vec<Membership> {
        let index = self.index.read();
        if index.is_empty() && had.is_empty() {
            return Vec::new();
        }
        let mut found = Vec::new();
        let tests = index.containing(
            cell,
            state.lat,
            state.lon,
            state.class,
            state.status,
            &mut found,
        );
        if tests > 0 {
            self.metrics.zone_tests.inc_by(tests as u64);
        }
        if found.is_empty() && had.is_empty() {
            return Vec::new();
        }
        let mut now: Vec<Membership> = found
            .iter()
            .map(|zone| Membership {
                zone: zone.id().clone(),
                entered_ms: had
                    .iter()
                    .find(|m| &m.zone == zone.id())
                    .map_or(now_ms, |m| m.entered_ms),
            })
            .collect();
        now.sort_by(|a, b| a.zone.cmp(&b.zone));
        let exited: Vec<(&ZoneId, ZoneCause)> = had
            .iter()
            .filter(|m| !now.iter().any(|n| n.zone == m.zone))
            .map(|m| {
                let cause = if index.get(&m.zone).is_some() {
                    cause
                } else {
                    ZoneCause::ZoneDeleted
                };
                (&m.zone, cause)
            })
            .collect();
        let entered: Vec<&ZoneId> = now
            .iter()
            .filter(|n| !had.iter().any(|m| m.zone == n.zone))
            .map(|n| &n.zone)
            .collect();
        if !exited.is_empty() || !entered.is_empty() {
            let after = VehicleState {
                zones: now.clone(),
                ..state.clone()
            };
            for (zone, cause) in exited {
                events.push(event(ZoneEventKind::Exited, zone, cause, now_ms, &after));
            }
            for zone in entered {
                events.push(event(ZoneEventKind::Entered, zone, cause, now_ms, &after));
            }
        }
        now
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
