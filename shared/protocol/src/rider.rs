//! What riders send and receive.
//!
//! A rider subscribes on the control stream; everything the node pushes to it
//! travels, in order, on one stream the node opens (announced by an empty
//! update for subscription 0): a [`RiderUpdate`] per flush of the rider's
//! mailbox. The first update after a subscription on a
//! new connection is a snapshot (it replaces the rider's view); every later
//! one carries only changes.
//!
//! Vehicles get a short numeric alias when first added to a rider's view;
//! moved and removed items use the alias. Moved items are packed as fixed
//! 14-byte records (fixed-point coordinates), the bulk of all traffic.

use hexfleet_model::{VehicleClass, VehicleState, VehicleStatus};
use serde::{Deserialize, Serialize};

/// Which vehicles a rider wants to see. An empty list means "any".
///
/// Decoding keeps each class and status once, whatever a client repeats:
/// the fan-out tests a subscriber's filter against every change it watches,
/// so a filter must cost at most one comparison per class and status.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(from = "RawFilter")]
pub struct Filter {
    pub classes: Vec<VehicleClass>,
    pub statuses: Vec<VehicleStatus>,
}

/// A filter as a client sent it.
#[derive(Deserialize)]
struct RawFilter {
    #[serde(default)]
    classes: Vec<VehicleClass>,
    #[serde(default)]
    statuses: Vec<VehicleStatus>,
}

impl From<RawFilter> for Filter {
    fn from(raw: RawFilter) -> Self {
        fn once<T: PartialEq>(values: Vec<T>) -> Vec<T> {
            let mut kept = Vec::new();
            for value in values {
                if !kept.contains(&value) {
                    kept.push(value);
                }
            }
            kept
        }
        Self {
            classes: once(raw.classes),
            statuses: once(raw.statuses),
        }
    }
}

impl Default for Filter {
    /// Available vehicles of any class.
    fn default() -> Self {
        Self {
            classes: Vec::new(),
            statuses: vec![VehicleStatus::Available],
        }
    }
}

impl Filter {
    /// Any vehicle at all.
    pub fn any() -> Self {
        Self {
            classes: Vec::new(),
            statuses: Vec::new(),
        }
    }

    pub fn matches(&self, class: VehicleClass, status: VehicleStatus) -> bool {
        (self.classes.is_empty() || self.classes.contains(&class))
            && (self.statuses.is_empty() || self.statuses.contains(&status))
    }
}

/// Watch the vehicles around a point. Sending it again (the rider moved)
/// replaces the subscription; the node sends only the difference.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Subscribe {
    /// Chosen by the client, increasing; echoed in updates and errors.
    pub id: u32,
    pub lat: f64,
    pub lon: f64,
    pub radius_m: f64,
    pub filter: Filter,
}

/// Why a vehicle left a rider's view.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RemoveReason {
    /// It drove out of the watched cells, or the rider's view moved away.
    LeftView,
    /// Not heard from for too long.
    Stale,
    /// The driver signed off or lost its connection.
    Offline,
    /// It no longer matches the filter (e.g. went `on_trip`).
    Filtered,
}

impl RemoveReason {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::LeftView => "left_view",
            Self::Stale => "stale",
            Self::Offline => "offline",
            Self::Filtered => "filtered",
        }
    }
}

/// A vehicle entering the view, or changing more than its position.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Added {
    pub alias: u32,
    pub state: VehicleState,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Removed {
    pub alias: u32,
    pub reason: RemoveReason,
}

/// One push to a rider. Apply in order: `snapshot` (clear the view),
/// `removed`, `added`, then `moved`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
pub struct RiderUpdate {
    /// The latest subscription this update reflects.
    pub subscription: u32,
    /// This update starts a new view: forget everything shown before.
    pub snapshot: bool,
    pub removed: Vec<Removed>,
    pub added: Vec<Added>,
    /// Packed [`Moved`] records.
    #[serde(with = "serde_bytes")]
    pub moved: Vec<u8>,
}

impl RiderUpdate {
    /// The most an update's body takes besides its items: the version byte,
    /// the array header, the subscription, the snapshot flag, two array
    /// headers and a bin header (23 bytes at most, rounded up). Items fill
    /// the rest of [`MAX_FRAME_LEN`](crate::MAX_FRAME_LEN).
    pub const ENVELOPE_MAX: usize = 32;
}

/// A vehicle that moved: position, heading and speed only.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Moved {
    pub alias: u32,
    pub lat_e7: i32,
    pub lon_e7: i32,
    /// Heading in 1/256 of a turn.
    pub heading: u8,
    /// Speed in half metres per second (saturating at 127.5 m/s).
    pub speed: u8,
}

impl Moved {
    /// Bytes per packed record.
    pub const LEN: usize = 14;

    pub fn new(alias: u32, lat: f64, lon: f64, heading_deg: f32, speed_mps: f32) -> Self {
        Self {
            alias,
            lat_e7: (lat * 1e7).round() as i32,
            lon_e7: (lon * 1e7).round() as i32,
            heading: ((heading_deg.rem_euclid(360.0) / 360.0 * 256.0).round() as u32 % 256) as u8,
            speed: (speed_mps * 2.0).round().clamp(0.0, 255.0) as u8,
        }
    }

    pub fn lat(&self) -> f64 {
        f64::from(self.lat_e7) / 1e7
    }

    pub fn lon(&self) -> f64 {
        f64::from(self.lon_e7) / 1e7
    }

    pub fn heading_deg(&self) -> f32 {
        f32::from(self.heading) * 360.0 / 256.0
    }

    pub fn speed_mps(&self) -> f32 {
        f32::from(self.speed) / 2.0
    }

    pub fn pack(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.alias.to_le_bytes());
        out.extend_from_slice(&self.lat_e7.to_le_bytes());
        out.extend_from_slice(&self.lon_e7.to_le_bytes());
        out.push(self.heading);
        out.push(self.speed);
    }

    /// Unpacks records; `None` if the bytes are not whole records.
    pub fn unpack(bytes: &[u8]) -> Option<Vec<Moved>> {
        if !bytes.len().is_multiple_of(Self::LEN) {
            return None;
        }
        Some(
            bytes
                .chunks_exact(Self::LEN)
                .map(|r| {
                    let word = |i: usize| [r[i], r[i + 1], r[i + 2], r[i + 3]];
                    Moved {
                        alias: u32::from_le_bytes(word(0)),
                        lat_e7: i32::from_le_bytes(word(4)),
                        lon_e7: i32::from_le_bytes(word(8)),
                        heading: r[12],
                        speed: r[13],
                    }
                })
                .collect(),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn moved_records_round_trip_within_their_precision() {
        let m = Moved::new(70_000, -33.868_812_3, 151.209_295_7, 359.9, 13.26);
        let mut buf = Vec::new();
        m.pack(&mut buf);
        Moved::new(1, 0.0, 0.0, 0.0, 0.0).pack(&mut buf);
        assert_eq!(buf.len(), 2 * Moved::LEN);
        let back = Moved::unpack(&buf).unwrap();
        assert_eq!(back[0], m);
        assert!((back[0].lat() + 33.868_812_3).abs() < 1e-7);
        assert!((back[0].lon() - 151.209_295_7).abs() < 1e-7);
        assert_eq!(back[0].heading, 0, "359.9° rounds to north");
        assert_eq!(back[0].speed_mps(), 13.5);
        assert!(Moved::unpack(&buf[..20]).is_none());
    }

    #[test]
    fn the_default_filter_shows_available_vehicles_of_any_class() {
        let f = Filter::default();
        assert!(f.matches(VehicleClass::Xl, VehicleStatus::Available));
        assert!(!f.matches(VehicleClass::Xl, VehicleStatus::OnTrip));
        assert!(Filter::any().matches(VehicleClass::Van, VehicleStatus::OffDuty));
    }

    #[test]
    fn a_frame_of_moved_items_costs_under_16_bytes_an_item() {
        let mut update = RiderUpdate {
            subscription: 3,
            ..RiderUpdate::default()
        };
        for i in 0..100 {
            Moved::new(i, 52.5 + f64::from(i) * 1e-4, 13.4, 90.0, 10.0).pack(&mut update.moved);
        }
        let bytes = crate::encode_datagram(&update).unwrap();
        assert!(bytes.len() + 4 <= 100 * 16, "{} bytes", bytes.len() + 4);
    }

    #[test]
    fn an_update_filled_to_its_item_budget_fits_in_a_frame() {
        let budget = crate::MAX_FRAME_LEN - RiderUpdate::ENVELOPE_MAX;
        let mut update = RiderUpdate {
            subscription: u32::MAX,
            snapshot: true,
            ..RiderUpdate::default()
        };
        let (mut used, mut alias) = (0, u32::MAX);
        let removed = |alias| Removed {
            alias,
            reason: RemoveReason::LeftView,
        };
        while used + crate::encoded_len(&removed(alias)).unwrap() <= budget / 2 {
            used += crate::encoded_len(&removed(alias)).unwrap();
            update.removed.push(removed(alias));
            alias -= 1;
        }
        while used + Moved::LEN <= budget {
            Moved::new(alias, 52.5, 13.4, 90.0, 10.0).pack(&mut update.moved);
            used += Moved::LEN;
        }
        let body = crate::encode_datagram(&update).unwrap();
        assert!(body.len() <= crate::MAX_FRAME_LEN, "{} bytes", body.len());
        assert!(
            body.len() + 64 > crate::MAX_FRAME_LEN,
            "the budget is not wasted"
        );
    }

    #[test]
    fn a_filter_repeating_a_value_ten_thousand_times_decodes_to_it_once() {
        let repeated = format!(
            r#"{{"classes": [{}], "statuses": ["available", "on_trip", "available"]}}"#,
            vec![r#""xl""#; 10_000].join(",")
        );
        let filter: Filter = serde_json::from_str(&repeated).unwrap();
        assert_eq!(filter.classes, vec![VehicleClass::Xl]);
        assert_eq!(
            filter.statuses,
            vec![VehicleStatus::Available, VehicleStatus::OnTrip]
        );
        // Missing lists mean any, and the wire form round-trips.
        let any: Filter = serde_json::from_str("{}").unwrap();
        assert_eq!(any, Filter::any());
        let bytes = rmp_serde::to_vec(&Filter::default()).unwrap();
        assert_eq!(
            rmp_serde::from_slice::<Filter>(&bytes).unwrap(),
            Filter::default()
        );
    }
}
