//! Zone events: a vehicle entered or left an operator's zone.
//!
//! The node writes each one to a Redis Stream (`hexfleet:{zones}:events`,
//! one entry per event, its fields those of [`ZoneEvent::fields`]) and shows
//! it to dashboards as JSON. Exactly one `entered` per entry, across the
//! cluster: the vehicle's memberships travel with its state.

use hexfleet_model::{VehicleState, ZoneId};
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ZoneEventKind {
    Entered,
    Exited,
}

impl ZoneEventKind {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Entered => "entered",
            Self::Exited => "exited",
        }
    }
}

/// What made the membership change.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ZoneCause {
    /// A fix moved the vehicle across the zone's edge.
    Moved,
    /// The driver reported a class or status the zone's filter treats
    /// differently.
    Reported,
    /// The driver signed off (or went offline past its grace).
    SignedOff,
    /// The vehicle was not heard from for too long and was evicted.
    Stale,
    /// The zone was created or changed under the vehicle.
    ZoneChanged,
    /// The zone was deleted.
    ZoneDeleted,
}

impl ZoneCause {
    pub const ALL: [Self; 6] = [
        Self::Moved,
        Self::Reported,
        Self::SignedOff,
        Self::Stale,
        Self::ZoneChanged,
        Self::ZoneDeleted,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Moved => "moved",
            Self::Reported => "reported",
            Self::SignedOff => "signed_off",
            Self::Stale => "stale",
            Self::ZoneChanged => "zone_changed",
            Self::ZoneDeleted => "zone_deleted",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|c| c.as_str() == s)
    }
}

/// One entry into, or exit from, a zone.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ZoneEvent {
    pub event: ZoneEventKind,
    pub zone: ZoneId,
    pub cause: ZoneCause,
    /// When it happened (node clock, Unix ms): the fix's arrival, the
    /// sign-off, the eviction or the zone's change.
    pub at_ms: i64,
    /// The vehicle as it was then (its memberships after the event).
    pub vehicle: VehicleState,
}

#[derive(Debug, thiserror::Error)]
pub enum ZoneEventError {
    #[error("zone event field {0} is missing")]
    Missing(&'static str),
    #[error("zone event field {field} is invalid: {reason}")]
    Invalid { field: &'static str, reason: String },
}

impl ZoneEvent {
    /// How many fields a stream entry of an event has.
    pub const FIELDS: usize = 7;

    /// The event's id: the same for every copy of one event (a retried
    /// write, a relay run twice), so the store and consumers keep it once.
    /// A vehicle's fix (its sequence) and the time it was applied name the
    /// change; the zone and the kind name the event of it.
    pub fn id(&self) -> String {
        format!(
            "{}/{}/{}/{}/{}",
            self.vehicle.id,
            self.zone,
            self.event.as_str(),
            self.vehicle.seq,
            self.at_ms
        )
    }

    /// The event as a stream entry's fields: flat strings a consumer reads
    /// without decoding, and the vehicle's state as JSON.
    pub fn fields(&self) -> [(&'static str, String); Self::FIELDS] {
        [
            ("id", self.id()),
            ("event", self.event.as_str().to_string()),
            ("zone", self.zone.to_string()),
            ("vehicle", self.vehicle.id.to_string()),
            ("cause", self.cause.as_str().to_string()),
            ("at_ms", self.at_ms.to_string()),
            (
                "state",
                // A state always encodes: plain numbers, strings and enums.
                serde_json::to_string(&self.vehicle).unwrap_or_default(),
            ),
        ]
    }

    /// Reads an event back from a stream entry's fields.
    pub fn from_fields<'a>(
        fields: impl IntoIterator<Item = (&'a str, &'a [u8])>,
    ) -> Result<Self, ZoneEventError> {
        let (mut event, mut zone, mut cause, mut at_ms, mut state) = (None, None, None, None, None);
        for (name, value) in fields {
            let text = std::str::from_utf8(value).unwrap_or("");
            match name {
                "event" => event = Some(text),
                "zone" => zone = Some(text),
                "cause" => cause = Some(text),
                "at_ms" => at_ms = Some(text),
                "state" => state = Some(value),
                _ => {}
            }
        }
        let invalid =
            |field: &'static str, reason: String| ZoneEventError::Invalid { field, reason };
        let event = match event.ok_or(ZoneEventError::Missing("event"))? {
            "entered" => ZoneEventKind::Entered,
            "exited" => ZoneEventKind::Exited,
            other => return Err(invalid("event", other.to_string())),
        };
        let zone = ZoneId::new(zone.ok_or(ZoneEventError::Missing("zone"))?)
            .map_err(|e| invalid("zone", e.to_string()))?;
        let cause = cause.ok_or(ZoneEventError::Missing("cause"))?;
        let cause = ZoneCause::parse(cause).ok_or_else(|| invalid("cause", cause.to_string()))?;
        let at_ms = at_ms
            .ok_or(ZoneEventError::Missing("at_ms"))?
            .parse()
            .map_err(|e: std::num::ParseIntError| invalid("at_ms", e.to_string()))?;
        let vehicle = serde_json::from_slice(state.ok_or(ZoneEventError::Missing("state"))?)
            .map_err(|e| invalid("state", e.to_string()))?;
        Ok(Self {
            event,
            zone,
            cause,
            at_ms,
            vehicle,
        })
    }
}

#[cfg(test)]
mod tests {
    use hexfleet_model::{VehicleClass, VehicleId, VehicleStatus};

    use super::*;

    #[test]
    fn an_event_reads_back_from_its_stream_fields() {
        let event = ZoneEvent {
            event: ZoneEventKind::Entered,
            zone: ZoneId::new("airport").unwrap(),
            cause: ZoneCause::Moved,
            at_ms: 1_700_000_000_123,
            vehicle: VehicleState {
                id: VehicleId::new("car-1").unwrap(),
                lat: 52.5,
                lon: 13.4,
                heading_deg: 90.0,
                speed_mps: 3.0,
                accuracy_m: 4.0,
                fix_time_ms: 1_700_000_000_000,
                seq: 7,
                class: VehicleClass::Economy,
                status: VehicleStatus::Available,
                seen_ms: 1_700_000_000_123,
                zones: vec![hexfleet_model::Membership {
                    zone: ZoneId::new("airport").unwrap(),
                    entered_ms: 1_700_000_000_123,
                }],
                clock_offset_ms: 0,
            },
        };
        let fields = event.fields();
        let back = ZoneEvent::from_fields(fields.iter().map(|(k, v)| (*k, v.as_bytes()))).unwrap();
        assert_eq!(back, event);
        assert_eq!(
            fields[0],
            ("id", "car-1/airport/entered/7/1700000000123".into())
        );
        let broken = fields.iter().map(|(k, v)| {
            (
                *k,
                if *k == "cause" {
                    &b"teleported"[..]
                } else {
                    v.as_bytes()
                },
            )
        });
        assert!(ZoneEvent::from_fields(broken).is_err());
    }
}
