//! The state of one vehicle, as stored in the vehicle table and the store,
//! served by the HTTP API and (later) pushed to riders.

use std::fmt;

use serde::{Deserialize, Serialize};

use crate::{VehicleId, ZoneId};

/// The highest latitude, north or south, that hexfleet indexes. Redis's geo
/// index (like every Web Mercator map) holds latitudes only within
/// ±85.05112878°: beyond it `GEOADD` refuses the member. Fixes beyond it are
/// rejected at validation (`outside_index`), so nothing the node accepts is
/// something its store cannot hold, whichever store it runs on.
pub const MAX_INDEXED_LAT: f64 = 85.051_128_78;

/// A WGS84 position in degrees. Constructed only through [`Position::new`], so
/// a `Position` is always finite and in range.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Position {
    lat: f64,
    lon: f64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum PositionError {
    #[error("latitude must be a finite number in [-90, 90]")]
    Latitude,
    #[error("longitude must be a finite number in [-180, 180]")]
    Longitude,
}

impl Position {
    pub fn new(lat: f64, lon: f64) -> Result<Self, PositionError> {
        if !(lat.is_finite() && (-90.0..=90.0).contains(&lat)) {
            return Err(PositionError::Latitude);
        }
        if !(lon.is_finite() && (-180.0..=180.0).contains(&lon)) {
            return Err(PositionError::Longitude);
        }
        Ok(Self { lat, lon })
    }

    pub fn lat(self) -> f64 {
        self.lat
    }

    /// Whether the store's geo index can hold this position
    /// (|lat| ≤ [`MAX_INDEXED_LAT`]).
    pub fn is_indexable(self) -> bool {
        self.lat.abs() <= MAX_INDEXED_LAT
    }

    pub fn lon(self) -> f64 {
        self.lon
    }

    pub fn distance_m(self, other: Position) -> f64 {
        crate::geodesy::haversine_m(self.lat, self.lon, other.lat, other.lon)
    }
}

/// What kind of vehicle it is; riders filter on it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum VehicleClass {
    Economy,
    Comfort,
    Xl,
    Premium,
    Van,
}

impl VehicleClass {
    pub const ALL: [VehicleClass; 5] = [
        Self::Economy,
        Self::Comfort,
        Self::Xl,
        Self::Premium,
        Self::Van,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Economy => "economy",
            Self::Comfort => "comfort",
            Self::Xl => "xl",
            Self::Premium => "premium",
            Self::Van => "van",
        }
    }
}

/// What the driver is doing; only `available` vehicles are offered to riders
/// by default.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum VehicleStatus {
    Available,
    OnTrip,
    OffDuty,
}

impl VehicleStatus {
    pub const ALL: [VehicleStatus; 3] = [Self::Available, Self::OnTrip, Self::OffDuty];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Available => "available",
            Self::OnTrip => "on_trip",
            Self::OffDuty => "off_duty",
        }
    }
}

impl fmt::Display for VehicleClass {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl fmt::Display for VehicleStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The latest accepted fix of a vehicle together with what the driver reported
/// about it. This is what the store keeps per vehicle (as MessagePack) and what
/// `GET /v1/vehicles/{id}` returns (as JSON).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct VehicleState {
    pub id: VehicleId,
    pub lat: f64,
    pub lon: f64,
    pub heading_deg: f32,
    pub speed_mps: f32,
    pub accuracy_m: f32,
    /// When the device took the fix (Unix milliseconds, device clock).
    pub fix_time_ms: i64,
    /// The driver's sequence number of this fix.
    pub seq: u64,
    pub class: VehicleClass,
    pub status: VehicleStatus,
    /// When a node last heard from the vehicle (Unix milliseconds, node
    /// clock). Staleness is judged on this, not on the device's clock.
    pub seen_ms: i64,
    /// The zones the vehicle is in, by zone id, each with when it entered.
    /// Kept with the state so that whichever node holds the vehicle next
    /// (a hand-off, a failover) continues from it: an entry is announced
    /// once. States stored before zones existed still decode.
    #[serde(default)]
    pub zones: Vec<Membership>,
    /// How far the device's clock is off, in milliseconds: what was added
    /// to its fix times to put them in node time (the client's own
    /// measurement and the node's correction together; positive when the
    /// device is behind). Last, and left out when zero, so states stored
    /// before it existed still decode.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub clock_offset_ms: i64,
}

fn is_zero(ms: &i64) -> bool {
    *ms == 0
}

/// A vehicle's presence in a zone.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Membership {
    pub zone: ZoneId,
    /// When it entered (node clock, Unix ms): its place in the zone's queue.
    pub entered_ms: i64,
}

impl VehicleState {
    pub fn position(&self) -> Position {
        // A state is only ever built from a validated fix.
        Position {
            lat: self.lat,
            lon: self.lon,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn positions_refuse_nan_and_out_of_range() {
        assert!(Position::new(45.0, 7.0).is_ok());
        assert!(Position::new(90.0, -180.0).is_ok());
        assert_eq!(Position::new(f64::NAN, 0.0), Err(PositionError::Latitude));
        assert_eq!(Position::new(90.1, 0.0), Err(PositionError::Latitude));
        assert_eq!(
            Position::new(0.0, f64::INFINITY),
            Err(PositionError::Longitude)
        );
        assert_eq!(Position::new(0.0, -180.5), Err(PositionError::Longitude));
    }
}
