//! Fix validation: the first stage after the session. Every fix is untrusted;
//! a fix either becomes a [`ValidFix`] or is rejected with a reason. A
//! rejection changes nothing: the driver's last accepted fix stays the
//! reference for the next one.
//!
//! Each driver session owns its [`Validator`], so validation takes no lock.

use hexfleet_model::Position;
use hexfleet_protocol::{Fix, RejectReason};

use crate::config::IngestConfig;

/// A fix that passed validation; its position is known to be valid.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ValidFix {
    pub fix: Fix,
    pub position: Position,
}

/// The limits a fix is held to, taken from configuration.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub max_speed_mps: f64,
    pub jitter_m: f64,
    pub max_future_ms: i64,
    pub max_age_ms: i64,
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
}

/// The fastest any road vehicle reports of itself, m/s; beyond it the speed
/// field is nonsense rather than fast.
const MAX_REPORTED_SPEED_MPS: f32 = 150.0;
/// A device reporting worse accuracy than this has no real fix.
const MAX_ACCURACY_M: f32 = 10_000.0;

impl Validator {
    /// `last` seeds the validator with what the node already accepted for
    /// this driver (a reconnect), so sequences cannot go back across sessions.
    pub fn new(limits: Limits, last: Option<LastFix>) -> Self {
        Self { limits, last }
    }

    pub fn last(&self) -> Option<LastFix> {
        self.last
    }

    /// Checks a fix against the driver's last accepted one and the node's
    /// clock (`now_ms`, Unix milliseconds). On success the fix becomes the
    /// new reference.
    pub fn check(&mut self, fix: &Fix, now_ms: i64) -> Result<ValidFix, RejectReason> {
        let position =
            Position::new(fix.lat, fix.lon).map_err(|_| RejectReason::InvalidCoordinate)?;
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
        if let Some(last) = self.last {
            if fix.seq <= last.seq {
                return Err(RejectReason::StaleSeq);
            }
            let dt_ms = fix.fix_time_ms - last.fix_time_ms;
            if dt_ms < 0 {
                return Err(RejectReason::TimeBackwards);
            }
            if dt_ms < self.limits.stale_after_ms {
                let allowed =
                    self.limits.jitter_m + self.limits.max_speed_mps * dt_ms as f64 / 1000.0;
                if position.distance_m(last.position) > allowed {
                    return Err(RejectReason::TooFast);
                }
            }
        }
        self.last = Some(LastFix {
            seq: fix.seq,
            fix_time_ms: fix.fix_time_ms,
            position,
        });
        Ok(ValidFix {
            fix: *fix,
            position,
        })
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
}
