//! Typed identifiers. Each is validated once, at the edge, and trusted inside.

use std::{fmt, str::FromStr, sync::Arc};

use h3o::CellIndex;
use serde::{Deserialize, Serialize};

/// The longest vehicle id accepted. Ids appear in Redis members and keys and on
/// the wire, so they are kept short.
pub const MAX_VEHICLE_ID_LEN: usize = 64;

/// A vehicle's id. A driver drives one vehicle at a time and authenticates as
/// that vehicle, so the driver id on a token *is* the vehicle id.
///
/// Only ASCII letters, digits, `-`, `_` and `:` are allowed (1 to 64 of them):
/// the id is safe to embed in Redis keys, in tokens (which use `.` as a
/// separator), in URLs and in logs without escaping.
///
/// Cloning is cheap (a reference count), which matters on the hot path.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct VehicleId(Arc<str>);

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid vehicle id: must be 1 to {MAX_VEHICLE_ID_LEN} characters of A-Z a-z 0-9 - _ :")]
pub struct InvalidVehicleId;

impl VehicleId {
    pub fn new(id: &str) -> Result<Self, InvalidVehicleId> {
        let valid_len = (1..=MAX_VEHICLE_ID_LEN).contains(&id.len());
        let valid_chars = id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b':'));
        if valid_len && valid_chars {
            Ok(Self(Arc::from(id)))
        } else {
            Err(InvalidVehicleId)
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl FromStr for VehicleId {
    type Err = InvalidVehicleId;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::new(s)
    }
}

impl TryFrom<String> for VehicleId {
    type Error = InvalidVehicleId;
    fn try_from(s: String) -> Result<Self, Self::Error> {
        Self::new(&s)
    }
}

impl From<VehicleId> for String {
    fn from(id: VehicleId) -> Self {
        id.0.to_string()
    }
}

impl fmt::Display for VehicleId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for VehicleId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "VehicleId({})", self.0)
    }
}

/// The longest zone id accepted (the same rules as a vehicle id: it is
/// embedded in URLs, Redis stream entries and logs).
pub const MAX_ZONE_ID_LEN: usize = MAX_VEHICLE_ID_LEN;

/// An operator's zone (a geofence): an airport queue, a service area.
/// The same characters as a [`VehicleId`], 1 to 64 of them.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct ZoneId(Arc<str>);

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid zone id: must be 1 to {MAX_ZONE_ID_LEN} characters of A-Z a-z 0-9 - _ :")]
pub struct InvalidZoneId;

impl ZoneId {
    pub fn new(id: &str) -> Result<Self, InvalidZoneId> {
        // The rules of a vehicle id, checked in one place.
        VehicleId::new(id)
            .map(|v| Self(v.0))
            .map_err(|_| InvalidZoneId)
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl TryFrom<String> for ZoneId {
    type Error = InvalidZoneId;
    fn try_from(s: String) -> Result<Self, Self::Error> {
        Self::new(&s)
    }
}

impl From<ZoneId> for String {
    fn from(id: ZoneId) -> Self {
        id.0.to_string()
    }
}

impl fmt::Display for ZoneId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for ZoneId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ZoneId({})", self.0)
    }
}

/// The cell a fix is indexed in, at the index resolution (default 9).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct IndexCell(pub CellIndex);

/// A shard: a coarse cell (default resolution 5), always the `parent()` of an
/// [`IndexCell`]. All of a shard's Redis keys share its hash tag.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ShardId(pub CellIndex);

impl fmt::Display for IndexCell {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

impl fmt::Display for ShardId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

impl FromStr for ShardId {
    type Err = h3o::error::InvalidCellIndex;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        s.parse().map(Self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vehicle_ids_accept_plain_ids_and_refuse_the_rest() {
        for good in ["drv-1", "a", "fleet:42_b", &"x".repeat(64)] {
            assert!(VehicleId::new(good).is_ok(), "{good}");
        }
        for bad in [
            "",
            "has space",
            "dot.ted",
            "ünicode",
            "a{b}",
            &"x".repeat(65),
        ] {
            assert_eq!(VehicleId::new(bad), Err(InvalidVehicleId), "{bad}");
        }
    }

    #[test]
    fn shard_ids_round_trip_through_their_hex_form() {
        let cell = h3o::LatLng::new(52.52, 13.405)
            .unwrap()
            .to_cell(h3o::Resolution::Five);
        let shard = ShardId(cell);
        assert_eq!(shard.to_string().parse::<ShardId>().unwrap(), shard);
    }
}
