//! What dispatch dashboards send and receive over WebSocket (`GET /v1/ws`).
//!
//! JSON text frames by default; MessagePack binary frames (maps with field
//! names, so any MessagePack library reads them) when the socket is opened
//! with `?format=msgpack`. Requests are read in either form.
//!
//! A dashboard watches a [`Viewport`]. When the viewport covers few enough
//! index cells the node shows every vehicle: a snapshot, then `added`,
//! `moved` and `removed` deltas, as riders get. When it covers more, the
//! node shows [`DensityUpdate`]s instead: per-cell counts by status at a
//! coarser resolution. Each [`View`] says which; [`Outlines`] that follow
//! it draw the cells the connection has not been sent before.
//!
//! Messages are kept to a few tens of KB: big snapshots and outline sets
//! come in several messages, so neither side buffers a huge one.

use hexfleet_model::{BBox, VehicleState, VehicleStatus};
use serde::{Deserialize, Serialize};

use crate::{Filter, RemoveReason};

/// WebSocket close codes the node uses, each an [`ErrorCode`]'s
/// ([`ErrorCode::websocket_close_code`]); 4000–4999 are the application's.
pub mod close {
    use crate::ErrorCode;

    /// The token is missing, malformed, forged, expired or not a dashboard's.
    pub const UNAUTHORIZED: u16 = ErrorCode::Unauthorized.websocket_close_code();
    /// The dashboard did not read fast enough.
    pub const SLOW_CONSUMER: u16 = ErrorCode::SlowConsumer.websocket_close_code();
    /// The dashboard kept sending requests over its budget.
    pub const RATE_LIMITED: u16 = ErrorCode::RateLimited.websocket_close_code();
    /// The node is shutting down (the standard "going away").
    pub const GOING_AWAY: u16 = ErrorCode::ShuttingDown.websocket_close_code();
    /// The node failed (the standard "internal error").
    pub const INTERNAL: u16 = ErrorCode::Internal.websocket_close_code();
}

/// The wire form of a dashboard connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Format {
    #[default]
    Json,
    #[serde(rename = "msgpack")]
    MsgPack,
}

#[derive(Debug, thiserror::Error)]
pub enum DashboardCodecError {
    #[error("invalid JSON request: {0}")]
    Json(#[from] serde_json::Error),
    #[error("invalid MessagePack request: {0}")]
    MsgPack(#[from] rmp_serde::decode::Error),
    #[error("encoding: {0}")]
    Encode(#[from] rmp_serde::encode::Error),
}

impl Format {
    /// Encodes an event: UTF-8 JSON for [`Format::Json`], else MessagePack.
    pub fn encode(self, event: &DashboardEvent) -> Result<Vec<u8>, DashboardCodecError> {
        Ok(match self {
            Self::Json => serde_json::to_vec(event)?,
            Self::MsgPack => rmp_serde::to_vec_named(event)?,
        })
    }

    /// Decodes a request in this format.
    pub fn decode(self, bytes: &[u8]) -> Result<DashboardRequest, DashboardCodecError> {
        Ok(match self {
            Self::Json => serde_json::from_slice(bytes)?,
            Self::MsgPack => rmp_serde::from_slice(bytes)?,
        })
    }
}

/// What a dashboard asks for.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum DashboardRequest {
    /// Watch this part of the map (replaces the previous viewport).
    Viewport(Viewport),
    /// Show only these vehicles, keeping the viewport.
    Filter { id: u32, filter: Filter },
    /// Where is this vehicle, wherever it is?
    Find { id: String },
    /// The queue of this zone (its vehicles in order of entry), now and
    /// then as it changes; an empty id stops it.
    Queue { zone: String },
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Viewport {
    /// Chosen by the dashboard, increasing; echoed in what reflects it.
    pub id: u32,
    pub bbox: BBox,
    /// The map's zoom level, as the dashboard's map counts it (0–24).
    pub zoom: f64,
    /// Omitted: keep the current filter (at first: every vehicle).
    #[serde(default)]
    pub filter: Option<Filter>,
}

/// The map zooms a viewport may say it is at.
pub const MAX_ZOOM: f64 = 24.0;

/// What the node tells a dashboard.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum DashboardEvent {
    Hello(Hello),
    View(View),
    Outlines(Outlines),
    Update(VehicleUpdate),
    Density(DensityUpdate),
    Found(Found),
    Error(DashboardError),
    /// The zones near the viewport, drawn on the map (sent at the start,
    /// when the viewport moves and when zones change).
    Zones(ZonesShown),
    /// Live counts of the zones shown, those that changed.
    ZoneCounts(ZoneCountsUpdate),
    /// A vehicle entered or left a zone shown.
    ZoneEvent(ZoneFlash),
    /// The queue of the zone asked for.
    Queue(ZoneQueue),
}

/// Zones to draw. Replaces those shown before.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ZonesShown {
    pub zones: Vec<ZoneShape>,
    /// More zones are near the viewport than a dashboard is sent.
    pub truncated: bool,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ZoneShape {
    pub id: String,
    pub name: String,
    pub kind: String,
    /// Polygons, each as rings (the exterior, then holes) of `[lat, lon]`.
    pub polygons: Vec<Vec<Vec<[f64; 2]>>>,
    pub counts: StatusCounts,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ZoneCountsUpdate {
    pub zones: Vec<ZoneCount>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ZoneCount {
    pub zone: String,
    #[serde(flatten)]
    pub counts: StatusCounts,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ZoneFlash {
    pub zone: String,
    pub event: crate::zone::ZoneEventKind,
    pub cause: crate::zone::ZoneCause,
    pub vehicle: String,
    pub lat: f64,
    pub lon: f64,
    pub at_ms: i64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ZoneQueue {
    pub zone: String,
    /// In order of entry, earliest first.
    pub vehicles: Vec<QueuedVehicle>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct QueuedVehicle {
    pub id: String,
    pub status: VehicleStatus,
    pub entered_ms: i64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Hello {
    pub node: String,
    /// The node's clock (Unix ms), to judge fix ages against.
    pub server_time_ms: i64,
    /// A raster tile URL template (`{z}/{x}/{y}`) for the map background.
    pub tile_url: Option<String>,
    /// Where the node's vehicles are, for a first view.
    pub fleet_bounds: Option<BBox>,
    pub max_vehicle_cells: usize,
    pub max_density_cells: usize,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ViewMode {
    Vehicles,
    Density,
}

/// How the node shows the latest viewport. Updates that follow reflect it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct View {
    pub subscription: u32,
    pub mode: ViewMode,
    /// The H3 resolution of `cells`.
    pub resolution: u8,
    /// The cells in view (H3 strings).
    pub cells: Vec<String>,
}

/// Outlines of cells this connection has not been sent before.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Outlines {
    pub outlines: Vec<CellOutline>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CellOutline {
    pub cell: String,
    /// `[lat, lon]` vertices in degrees.
    pub boundary: Vec<[f64; 2]>,
}

/// Vehicle deltas. Apply `snapshot` (clear), `removed`, `added`, `moved`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
pub struct VehicleUpdate {
    pub subscription: u32,
    pub snapshot: bool,
    pub removed: Vec<DashboardRemoved>,
    pub added: Vec<VehicleState>,
    pub moved: Vec<DashboardMoved>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DashboardRemoved {
    pub id: String,
    pub reason: RemoveReason,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DashboardMoved {
    pub id: String,
    pub lat: f64,
    pub lon: f64,
    pub heading_deg: f32,
    pub speed_mps: f32,
    pub fix_time_ms: i64,
    pub seen_ms: i64,
}

impl From<&VehicleState> for DashboardMoved {
    fn from(s: &VehicleState) -> Self {
        Self {
            id: s.id.to_string(),
            lat: s.lat,
            lon: s.lon,
            heading_deg: s.heading_deg,
            speed_mps: s.speed_mps,
            fix_time_ms: s.fix_time_ms,
            seen_ms: s.seen_ms,
        }
    }
}

/// Per-cell counts. A snapshot lists every cell in view (in several
/// messages, the first marked `snapshot`); later updates list only cells
/// whose counts changed (all zero: now empty).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
pub struct DensityUpdate {
    pub subscription: u32,
    pub snapshot: bool,
    pub cells: Vec<CellCount>,
}

/// Vehicles in one cell that match the filter, by status.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct StatusCounts {
    pub available: u32,
    pub on_trip: u32,
    pub off_duty: u32,
}

impl StatusCounts {
    pub fn add(&mut self, status: VehicleStatus, n: u32) {
        match status {
            VehicleStatus::Available => self.available += n,
            VehicleStatus::OnTrip => self.on_trip += n,
            VehicleStatus::OffDuty => self.off_duty += n,
        }
    }

    pub fn total(&self) -> u32 {
        self.available + self.on_trip + self.off_duty
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CellCount {
    pub cell: String,
    #[serde(flatten)]
    pub counts: StatusCounts,
}

/// The answer to `find`: the vehicle's latest state, if it is live.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Found {
    pub id: String,
    pub vehicle: Option<VehicleState>,
}

/// A request the node could not act on. The connection stays open.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DashboardError {
    pub code: crate::ErrorCode,
    pub reason: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_read_as_json_and_as_msgpack() {
        let json = r#"{"type":"viewport","id":3,"bbox":{"south":52.5,"west":13.3,"north":52.6,"east":13.5},"zoom":13,"filter":{"statuses":["available"]}}"#;
        let request = Format::Json.decode(json.as_bytes()).unwrap();
        let DashboardRequest::Viewport(v) = &request else {
            panic!("{request:?}");
        };
        assert_eq!(v.id, 3);
        assert_eq!(
            v.filter.as_ref().unwrap().statuses,
            vec![VehicleStatus::Available]
        );
        assert!(v.filter.as_ref().unwrap().classes.is_empty());
        let packed = rmp_serde::to_vec_named(&request).unwrap();
        assert_eq!(Format::MsgPack.decode(&packed).unwrap(), request);
    }

    #[test]
    fn bad_requests_say_what_is_wrong() {
        let inverted =
            r#"{"type":"viewport","id":1,"bbox":{"south":2,"west":0,"north":1,"east":1},"zoom":3}"#;
        let e = Format::Json.decode(inverted.as_bytes()).unwrap_err();
        assert!(e.to_string().contains("inverted"), "{e}");
        let e = Format::Json.decode(br#"{"type":"teleport"}"#).unwrap_err();
        assert!(e.to_string().contains("unknown variant"), "{e}");
        assert!(Format::Json.decode(b"{not json").is_err());
    }

    #[test]
    fn events_round_trip_in_both_formats() {
        let event = DashboardEvent::Density(DensityUpdate {
            subscription: 2,
            snapshot: true,
            cells: vec![CellCount {
                cell: "871f1d489ffffff".into(),
                counts: StatusCounts {
                    available: 3,
                    on_trip: 1,
                    off_duty: 0,
                },
            }],
        });
        for format in [Format::Json, Format::MsgPack] {
            let bytes = format.encode(&event).unwrap();
            let back: DashboardEvent = match format {
                Format::Json => serde_json::from_slice(&bytes).unwrap(),
                Format::MsgPack => rmp_serde::from_slice(&bytes).unwrap(),
            };
            assert_eq!(back, event);
        }
        let json = String::from_utf8(Format::Json.encode(&event).unwrap()).unwrap();
        assert!(json.starts_with(r#"{"type":"density""#), "{json}");
        assert!(json.contains(r#""available":3"#), "{json}");
    }
}
