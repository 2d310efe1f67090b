//! Zones on a dashboard: the zones near its viewport drawn with their live
//! counts, entered/exited flashes, and the queue of the zone it selects.

use std::collections::{HashMap, HashSet};

use hexfleet_model::{BBox, VehicleStatus, ZoneId};
use hexfleet_protocol::{
    dashboard::{
        QueuedVehicle, StatusCounts, ZoneCount, ZoneCountsUpdate, ZoneFlash, ZoneQueue, ZoneShape,
        ZonesShown,
    },
    zone::ZoneEvent,
};

use crate::zones::{sync::ZoneCounts, StatusTally, ZoneIndex};

/// The most zones one dashboard is sent: the nearest to its view's centre.
const MAX_SHOWN: usize = 200;
/// The most vehicles of a queue one message lists.
const MAX_QUEUED: usize = 500;

#[derive(Default)]
pub(super) struct ZoneWatch {
    /// The viewport, once the dashboard sent one.
    pub bbox: Option<BBox>,
    shown: HashSet<ZoneId>,
    sent: HashMap<ZoneId, StatusCounts>,
    /// The zone whose queue the dashboard follows.
    pub queue: Option<ZoneId>,
}

fn status_counts(tally: &StatusTally) -> StatusCounts {
    let mut counts = StatusCounts::default();
    for status in VehicleStatus::ALL {
        counts.add(status, tally[status as usize]);
    }
    counts
}

impl ZoneWatch {
    /// The zones to draw for the current viewport (the box and as much
    /// again around it), nearest first.
    pub fn shapes(&mut self, index: &ZoneIndex, counts: &ZoneCounts) -> ZonesShown {
        self.shown.clear();
        self.sent.clear();
        let Some(b) = self.bbox else {
            return ZonesShown {
                zones: Vec::new(),
                truncated: false,
            };
        };
        let (north, south, east, west) = (b.north(), b.south(), b.east(), b.west());
        let (dlat, dlon) = (north - south, east - west);
        let (clat, clon) = ((north + south) / 2.0, (east + west) / 2.0);
        let mut near: Vec<(f64, &std::sync::Arc<crate::zones::Zone>)> = index
            .zones()
            .values()
            .filter_map(|z| {
                let r = z.bounds?;
                let overlaps = r.min().y <= north + dlat
                    && r.max().y >= south - dlat
                    && r.min().x <= east + dlon
                    && r.max().x >= west - dlon;
                let c = r.center();
                overlaps.then(|| ((c.y - clat).powi(2) + (c.x - clon).powi(2), z))
            })
            .collect();
        near.sort_by(|a, b| a.0.total_cmp(&b.0).then_with(|| a.1.id().cmp(b.1.id())));
        let truncated = near.len() > MAX_SHOWN;
        let zones = near
            .into_iter()
            .take(MAX_SHOWN)
            .map(|(_, z)| {
                let counts = status_counts(&counts.get(z.id()).copied().unwrap_or_default());
                self.shown.insert(z.id().clone());
                self.sent.insert(z.id().clone(), counts);
                let ring = |r: &geo::LineString<f64>| r.0.iter().map(|c| [c.y, c.x]).collect();
                ZoneShape {
                    id: z.id().to_string(),
                    name: z.spec.name.clone(),
                    kind: z.spec.kind.clone(),
                    polygons: z
                        .spec
                        .geometry
                        .0
                        .iter()
                        .map(|p| {
                            std::iter::once(ring(p.exterior()))
                                .chain(p.interiors().iter().map(ring))
                                .collect()
                        })
                        .collect(),
                    counts,
                }
            })
            .collect();
        ZonesShown { zones, truncated }
    }

    /// The counts of shown zones that changed since sent.
    pub fn changed_counts(&mut self, counts: &ZoneCounts) -> Option<ZoneCountsUpdate> {
        let mut zones = Vec::new();
        for id in &self.shown {
            let now = status_counts(&counts.get(id).copied().unwrap_or_default());
            if self.sent.get(id) != Some(&now) {
                self.sent.insert(id.clone(), now);
                zones.push(ZoneCount {
                    zone: id.to_string(),
                    counts: now,
                });
            }
        }
        (!zones.is_empty()).then_some(ZoneCountsUpdate { zones })
    }

    /// The flash of an event, if its zone is shown.
    pub fn flash(&self, event: &ZoneEvent) -> Option<ZoneFlash> {
        self.shown.contains(&event.zone).then(|| ZoneFlash {
            zone: event.zone.to_string(),
            event: event.event,
            cause: event.cause,
            vehicle: event.vehicle.id.to_string(),
            lat: event.vehicle.lat,
            lon: event.vehicle.lon,
            at_ms: event.at_ms,
        })
    }
}

/// A zone's queue as a dashboard is sent it.
pub(super) fn queue(zone: &ZoneId, states: &[hexfleet_model::VehicleState]) -> ZoneQueue {
    ZoneQueue {
        zone: zone.to_string(),
        vehicles: states
            .iter()
            .take(MAX_QUEUED)
            .map(|s| QueuedVehicle {
                id: s.id.to_string(),
                status: s.status,
                entered_ms: crate::zones::view::entered_ms(s, zone).unwrap_or_default(),
            })
            .collect(),
    }
}
