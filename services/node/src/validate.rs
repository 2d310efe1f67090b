//! Fix validation: the first stage after the session. Every fix is untrusted;
//! a fix either becomes a [`ValidFix`] or is rejected with a reason. A
//! rejection changes nothing: the driver's last accepted fix stays the
//! reference for the next one.
//!
//! Each driver session owns its [`Validator`], so validation takes no lock.
//!
//! Speed is checked against two references. The last accepted fix bounds one
//! step: `jitter_m + max_speed_mps × Δt`. An *anchor* — an accepted fix at
//! least [`ANCHOR_SPAN_MS`] older than the newest — bounds a run of steps the
//! same way, so the jitter allowance is granted once per anchor, never once
//! per fix: a chain of fixes carrying one time (or a millisecond apart) cannot
//! walk a vehicle further than one allowance, however many there are. Over
//! any stretch of time a vehicle can appear to move at most
//! `max_speed_mps` plus one `jitter_m` per anchor span.

use hexfleet_model::Position;
use hexfleet_protocol::{Fix, RejectReason};

use crate::{config::IngestConfig, device_clock::DeviceClock};

/// A fix that passed validation; its position is known to be valid and its
/// time is in node time.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ValidFix {
    pub fix: Fix,
    pub position: Position,
    /// How far off the device's clock is (see [`VehicleState`]'s field).
    ///
    /// [`VehicleState`]: hexfleet_model::VehicleState
    pub clock_offset_ms: i64,
}

/// The limits a fix is held to, taken from configuration.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub max_speed_mps: f64,
    pub jitter_m: f64,
    pub max_future_ms: i64,
    pub max_age_ms: i64,
    pub clock_tolerance_ms: i64,
    /// After this long without an accepted fix, the next one is not checked
    /// for speed: the vehicle went stale and may reappear anywhere.
    pub stale_after_ms: i64,
}

impl Limits {
    pub fn new(ingest: &IngestConfig, stale_after: std::time::Duration) -> Self {
        Self {
            max_speed_mps: ingest.max_speed_mps,
            jitter_m: ingest.jitter_m,
            max_future_ms: ingest.max_future.as_millis() as i64,
            max_age_ms: ingest.max_age.as_millis() as i64,
            clock_tolerance_ms: ingest.clock_tolerance.as_millis() as i64,
            stale_after_ms: stale_after.as_millis() as i64,
        }
    }
}

/// The last accepted fix of one driver.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LastFix {
    pub seq: u64,
    pub fix_time_ms: i64,
    pub position: Position,
}

#[derive(Debug, Clone)]
pub struct Validator {
    limits: Limits,
    last: Option<LastFix>,
    /// The reference a run of quick fixes is measured from (see the module
    /// docs); it moves to the newest accepted fix once that is at least
    /// [`ANCHOR_SPAN_MS`] younger.
    anchor: Option<LastFix>,
    /// The device's clock as its fixes tell it; fix times are corrected by
    /// it before they are checked.
    clock: DeviceClock,
    /// Whether `last`, and `anchor`, were taken in this session before the
    /// clock's offset was known, as the device stamped them (an anchor from
    /// an earlier session is in node time already).
    taken_as_stamped: bool,
    anchor_as_stamped: bool,
    /// The offset the client said it applied itself (its fixes are in
    /// node time already, give or take).
    reported_offset_ms: i64,
    /// The device's whole offset as an earlier session found it.
    assumed_offset_ms: Option<i64>,
}

/// How long the anchor holds before it moves up to the newest accepted fix.
/// Longer spans grant the jitter allowance less often (an apparent speed of at
/// most `max_speed_mps + jitter_m / 5 s`, 80 m/s with the defaults); shorter
/// ones forgive slow GPS drift sooner.
pub const ANCHOR_SPAN_MS: i64 = 5_000;

/// The fastest any road vehicle reports of itself, m/s; beyond it the speed
/// field is nonsense rather than fast.
const MAX_REPORTED_SPEED_MPS: f32 = 150.0;
/// A device reporting worse accuracy than this has no real fix.
const MAX_ACCURACY_M: f32 = 10_000.0;

impl Validator {
    /// `last` seeds the validator with what the node already accepted for
    /// this driver (a reconnect), so sequences cannot go back across sessions.
    pub fn new(limits: Limits, last: Option<LastFix>) -> Self {
        Self {
            limits,
            last,
            anchor: last,
            clock: DeviceClock::new(limits.clock_tolerance_ms),
            taken_as_stamped: false,
            anchor_as_stamped: false,
            reported_offset_ms: 0,
            assumed_offset_ms: None,
        }
    }

    pub fn last(&self) -> Option<LastFix> {
        self.last
    }

    /// How far off the device's clock is: what the client applied and
    /// what this node adds.
    pub fn clock_offset_ms(&self) -> i64 {
        self.reported_offset_ms
            .saturating_add(self.clock.correction_ms())
    }

    /// What this node adds to the device's fix times.
    pub fn clock_correction_ms(&self) -> i64 {
        self.clock.correction_ms()
    }

    /// The client says it stamps its fixes in node time, having measured
    /// its clock `offset_ms` off.
    pub fn reported_offset(&mut self, offset_ms: i64) {
        self.reported_offset_ms = offset_ms;
        if let Some(total) = self.assumed_offset_ms {
            self.clock.assume(total.saturating_sub(offset_ms));
        }
    }

    /// The device's clock was `total_ms` off in an earlier session (its
    /// vehicle's state says): assumed until this session's fixes say.
    pub fn assume_offset(&mut self, total_ms: i64) {
        self.assumed_offset_ms = Some(total_ms);
        self.clock
            .assume(total_ms.saturating_sub(self.reported_offset_ms));
    }

    /// Checks a fix against the driver's last accepted one and the node's
    /// clock (`now_ms`, Unix milliseconds). On success the fix becomes the
    /// new reference.
    pub fn check(&mut self, fix: &Fix, now_ms: i64) -> Result<ValidFix, RejectReason> {
        let observed = self.clock.observe(fix.fix_time_ms, now_ms);
        if let Some(from) = observed.changed_from.filter(|_| observed.first) {
            // What this session took before the offset was known is put in
            // node time too, so the next fix is not "back in time".
            let by = observed.correction_ms.saturating_sub(from);
            let stamped = [
                (&mut self.last, self.taken_as_stamped),
                (&mut self.anchor, self.anchor_as_stamped),
            ];
            for (reference, as_stamped) in stamped {
                if let Some(reference) = reference.as_mut().filter(|_| as_stamped) {
                    reference.fix_time_ms = reference.fix_time_ms.saturating_add(by);
                }
            }
        }
        let mut corrected = Fix {
            fix_time_ms: fix.fix_time_ms.saturating_add(observed.correction_ms),
            ..*fix
        };
        if let Some(last) = self.last {
            // Corrected by an offset an earlier session found (a driver
            // handed over, back after a lost connection), a fix is only as
            // close to that session's last one as the two sessions'
            // measurements agree: a fix sent again after a redirect, its
            // stamp made with the first connection's measurement, may come
            // out a few milliseconds before itself. Within the tolerance it
            // is taken at the last fix's time, so times stay in order.
            let behind = last.fix_time_ms.saturating_sub(corrected.fix_time_ms);
            let assumed = !self.clock.confirmed() && self.assumed_offset_ms.is_some();
            if assumed && behind > 0 && behind <= self.limits.clock_tolerance_ms {
                corrected.fix_time_ms = last.fix_time_ms;
            }
        }
        let fix = &corrected;
        let position =
            Position::new(fix.lat, fix.lon).map_err(|_| RejectReason::InvalidCoordinate)?;
        if !position.is_indexable() {
            return Err(RejectReason::OutsideIndex);
        }
        if fix.lat == 0.0 && fix.lon == 0.0 {
            return Err(RejectReason::NullIsland);
        }
        let heading_ok = fix.heading_deg.is_finite() && (0.0..360.0).contains(&fix.heading_deg);
        let speed_ok =
            fix.speed_mps.is_finite() && (0.0..=MAX_REPORTED_SPEED_MPS).contains(&fix.speed_mps);
        let accuracy_ok =
            fix.accuracy_m.is_finite() && (0.0..=MAX_ACCURACY_M).contains(&fix.accuracy_m);
        if !(heading_ok && speed_ok && accuracy_ok) {
            return Err(RejectReason::InvalidField);
        }
        if fix.fix_time_ms > now_ms.saturating_add(self.limits.max_future_ms) {
            return Err(RejectReason::FromFuture);
        }
        if fix.fix_time_ms < now_ms.saturating_sub(self.limits.max_age_ms) {
            return Err(RejectReason::TooOld);
        }
        let mut fresh_start = true;
        if let Some(last) = self.last {
            if fix.seq <= last.seq {
                return Err(RejectReason::StaleSeq);
            }
            if fix.fix_time_ms < last.fix_time_ms {
                return Err(RejectReason::TimeBackwards);
            }
            // After stale_after without a fix, the vehicle may be anywhere.
            fresh_start = fix.fix_time_ms - last.fix_time_ms >= self.limits.stale_after_ms;
            if !fresh_start {
                let anchor = self.anchor.unwrap_or(last);
                if !self.reachable(last, fix.fix_time_ms, position)
                    || !self.reachable(anchor, fix.fix_time_ms, position)
                {
                    return Err(RejectReason::TooFast);
                }
            }
        }
        let accepted = LastFix {
            seq: fix.seq,
            fix_time_ms: fix.fix_time_ms,
            position,
        };
        let anchor_expired = self
            .anchor
            .is_none_or(|a| fix.fix_time_ms - a.fix_time_ms >= ANCHOR_SPAN_MS);
        let as_stamped = !self.clock.confirmed();
        if fresh_start || anchor_expired {
            self.anchor = Some(accepted);
            self.anchor_as_stamped = as_stamped;
        }
        self.last = Some(accepted);
        self.taken_as_stamped = as_stamped;
        Ok(ValidFix {
            fix: *fix,
            position,
            clock_offset_ms: self.clock_offset_ms(),
        })
    }

    /// Whether a vehicle at `from` can be at `to` by `time_ms`: at most one
    /// jitter allowance plus the distance at the speed limit.
    fn reachable(&self, from: LastFix, time_ms: i64, to: Position) -> bool {
        let dt_s = (time_ms - from.fix_time_ms) as f64 / 1000.0;
        let allowed = self.limits.jitter_m + self.limits.max_speed_mps * dt_s;
        to.distance_m(from.position) <= allowed
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW: i64 = 1_800_000_000_000;

    fn limits() -> Limits {
        Limits::new(&IngestConfig::default(), std::time::Duration::from_secs(30))
    }

    fn fix(seq: u64, t: i64, lat: f64, lon: f64) -> Fix {
        Fix {
            seq,
            fix_time_ms: t,
            lat,
            lon,
            heading_deg: 90.0,
            speed_mps: 10.0,
            accuracy_m: 5.0,
        }
    }

    fn seeded() -> Validator {
        let mut v = Validator::new(limits(), None);
        v.check(&fix(10, NOW - 1_000, 52.5, 13.4), NOW).unwrap();
        v
    }

    #[test]
    fn once_the_clock_is_known_fixes_taken_as_stamped_move_to_node_time_but_an_earlier_sessions_anchor_does_not(
    ) {
        let l = limits();
        let (max, jitter) = (l.max_speed_mps, l.jitter_m);
        // North of the start by `m` metres.
        let north = |m: f64| 52.5 + m / 111_195.0;
        // The earlier session's last fix, in node time, a second ago.
        let earlier = LastFix {
            seq: 10,
            fix_time_ms: NOW - 1_000,
            position: Position::new(52.5, 13.4).unwrap(),
        };
        let mut v = Validator::new(l, Some(earlier));
        // The phone is 3 s ahead: its first fix here is taken as stamped
        // (nothing tells yet), its second confirms the offset.
        let ahead = 3_000;
        let first = fix(11, NOW + ahead, north(max * 2.6), 13.4);
        v.check(&first, NOW).expect("taken as stamped");
        // 2 s after the earlier fix, in truth: further than 2 s at the
        // limit allows, though not further than 5 s would (the earlier fix
        // wrongly moved 3 s back with the first one).
        let second = fix(12, NOW + 1_000 + ahead, north(max * 3.5 + jitter), 13.4);
        assert_eq!(
            v.check(&second, NOW + 1_000),
            Err(RejectReason::TooFast),
            "the anchor stays in node time"
        );
        assert_eq!(v.clock_correction_ms(), -ahead);
        // The first fix moved to node time: the next second's step is fine.
        let third = fix(13, NOW + 2_000 + ahead, north(max * 3.0), 13.4);
        let valid = v.check(&third, NOW + 2_000).expect("a step at the limit");
        assert_eq!(valid.fix.fix_time_ms, NOW + 2_000);
    }

    #[test]
    fn a_fix_sent_again_to_a_node_that_assumed_the_offset_is_not_back_in_time_by_a_measurement_error(
    ) {
        // The first node corrected the phone's clock by +60 001 ms and left
        // the fix (in node time) for the next; the SDK's measurements on
        // the two connections differ by a millisecond.
        let note = LastFix {
            seq: 1,
            fix_time_ms: NOW,
            position: Position::new(52.5, 13.4).unwrap(),
        };
        let stamped = NOW - 60_001;
        let mut v = Validator::new(limits(), Some(note));
        v.assume_offset(60_001);
        v.reported_offset(1);
        let again = fix(2, stamped, 52.5, 13.4);
        let valid = v.check(&again, NOW + 30).expect("kept");
        assert_eq!(
            valid.fix.fix_time_ms, NOW,
            "at the last fix's time, in order"
        );
        // Seconds back is back in time still.
        let mut v = Validator::new(limits(), Some(note));
        v.assume_offset(60_001);
        let back = fix(2, stamped - 2_000, 52.5, 13.4);
        assert_eq!(v.check(&back, NOW + 30), Err(RejectReason::TimeBackwards));
    }

    #[test]
    fn a_plausible_sequence_of_fixes_is_accepted() {
        let mut v = Validator::new(limits(), None);
        for i in 0..10u64 {
            let f = fix(
                i + 1,
                NOW - 10_000 + i as i64 * 1_000,
                52.5 + i as f64 * 0.0001,
                13.4,
            );
            assert!(v.check(&f, NOW).is_ok(), "fix {i}");
        }
        assert_eq!(v.last().unwrap().seq, 10);
    }

    #[test]
    fn each_bad_fix_is_rejected_with_its_reason() {
        let cases = [
            (
                fix(11, NOW, f64::NAN, 13.4),
                RejectReason::InvalidCoordinate,
            ),
            (fix(11, NOW, 91.0, 13.4), RejectReason::InvalidCoordinate),
            (fix(11, NOW, 89.0, 13.4), RejectReason::OutsideIndex),
            (fix(11, NOW, -85.06, 13.4), RejectReason::OutsideIndex),
            (
                fix(11, NOW, 52.5, f64::INFINITY),
                RejectReason::InvalidCoordinate,
            ),
            (fix(11, NOW, 0.0, 0.0), RejectReason::NullIsland),
            (
                Fix {
                    heading_deg: f32::NAN,
                    ..fix(11, NOW, 52.5, 13.4)
                },
                RejectReason::InvalidField,
            ),
            (
                Fix {
                    heading_deg: 360.0,
                    ..fix(11, NOW, 52.5, 13.4)
                },
                RejectReason::InvalidField,
            ),
            (
                Fix {
                    speed_mps: -1.0,
                    ..fix(11, NOW, 52.5, 13.4)
                },
                RejectReason::InvalidField,
            ),
            (
                Fix {
                    accuracy_m: f32::INFINITY,
                    ..fix(11, NOW, 52.5, 13.4)
                },
                RejectReason::InvalidField,
            ),
            (fix(11, NOW + 60_000, 52.5, 13.4), RejectReason::FromFuture),
            (fix(11, NOW - 600_000, 52.5, 13.4), RejectReason::TooOld),
            (fix(10, NOW, 52.5, 13.4), RejectReason::StaleSeq),
            (fix(3, NOW, 52.5, 13.4), RejectReason::StaleSeq),
            (
                fix(11, NOW - 2_000, 52.5, 13.4),
                RejectReason::TimeBackwards,
            ),
            (fix(11, NOW, 53.5, 13.4), RejectReason::TooFast),
        ];
        for (bad, reason) in cases {
            let mut v = seeded();
            let before = v.last();
            assert_eq!(v.check(&bad, NOW), Err(reason), "{bad:?}");
            assert_eq!(v.last(), before, "a rejection must not move the reference");
        }
    }

    #[test]
    fn a_vehicle_back_after_going_stale_may_reappear_anywhere() {
        let mut v = Validator::new(limits(), None);
        v.check(&fix(1, NOW - 29_000, 52.5, 13.4), NOW - 29_000)
            .unwrap();
        // 28 s later, 100 km away: impossible while live...
        assert_eq!(
            v.check(&fix(2, NOW - 1_000, 53.4, 13.4), NOW),
            Err(RejectReason::TooFast)
        );
        // ...but fine once the last accepted fix is older than stale_after.
        assert!(v
            .check(&fix(3, NOW + 1_500, 53.4, 13.4), NOW + 2_000)
            .is_ok());
    }

    #[test]
    fn jitter_is_tolerated_between_fixes_taken_at_the_same_time() {
        let mut v = seeded();
        assert!(v.check(&fix(11, NOW - 1_000, 52.5002, 13.4), NOW).is_ok());
    }

    /// A point `metres` north of 52.5° N, 13.4° E.
    fn north(metres: f64) -> f64 {
        52.5 + metres / 111_226.0
    }

    /// Sends 200 fixes, each 49 m north of the one before and `step_ms`
    /// later; returns how many were accepted and how far the vehicle got.
    fn walk_a_chain(step_ms: i64) -> (usize, f64) {
        let mut v = Validator::new(limits(), None);
        let t = NOW - 1_000;
        v.check(&fix(1, t, north(0.0), 13.4), NOW).unwrap();
        let accepted = (1..=200u64)
            .filter(|&i| {
                let f = fix(1 + i, t + i as i64 * step_ms, north(49.0 * i as f64), 13.4);
                v.check(&f, NOW).is_ok()
            })
            .count();
        let start = Position::new(north(0.0), 13.4).unwrap();
        (accepted, v.last().unwrap().position.distance_m(start))
    }

    #[test]
    fn a_chain_of_fixes_at_one_time_cannot_walk_a_vehicle_further_than_one_allowance() {
        let (accepted, reached) = walk_a_chain(0);
        assert_eq!(accepted, 1, "only the first 49 m step is within one jitter");
        assert!(
            reached <= limits().jitter_m,
            "moved {reached} m in zero time"
        );
    }

    #[test]
    fn a_chain_of_fixes_a_millisecond_apart_cannot_either() {
        let (_, reached) = walk_a_chain(1);
        // 200 ms at 70 m/s is 14 m; with one jitter allowance, 64 m at most.
        assert!(
            reached <= limits().jitter_m + 14.0,
            "moved {reached} m in 200 ms"
        );
    }

    #[test]
    fn gps_jitter_while_standing_and_two_fixes_in_one_millisecond_are_accepted() {
        let mut v = Validator::new(limits(), None);
        let start = NOW - 600_000 / 20;
        // A parked car for 25 s: its fixes wander up to 20 m around the spot.
        for i in 0..25i64 {
            let wobble = [0.0, 18.0, -20.0, 7.0, -12.0][i as usize % 5];
            let f = fix(i as u64 + 1, start + i * 1_000, north(wobble), 13.4);
            assert!(v.check(&f, start + i * 1_000 + 50).is_ok(), "fix {i}");
        }
        // Two fixes in one millisecond, a few metres apart.
        let t = start + 25_000;
        assert!(v.check(&fix(26, t, north(3.0), 13.4), t).is_ok());
        assert!(v.check(&fix(27, t, north(5.0), 13.4), t).is_ok());
    }

    #[test]
    fn an_honest_drive_at_highway_speed_is_accepted_for_minutes() {
        let mut v = Validator::new(limits(), None);
        let start = NOW - 20_000;
        // 35 m/s with fixes every second and ±15 m of noise.
        for i in 0..20i64 {
            let noise = [0.0, 15.0, -15.0, 5.0][i as usize % 4];
            let f = fix(
                i as u64 + 1,
                start + i * 1_000,
                north(35.0 * i as f64 + noise),
                13.4,
            );
            assert!(v.check(&f, NOW).is_ok(), "fix {i}");
        }
    }
}
