//! A device's clock, as its fixes' arrivals tell it. Phones' clocks are
//! often off (set by hand, a time zone applied twice, days without network
//! time); a fix stamped by one would be refused as from the future or too
//! old, and its vehicle would never appear. So each driver session works out
//! its device's offset and puts fix times in the node's clock.
//!
//! Each fix gives a sample: its arrival (node clock) minus its fix time
//! (device clock) is the device's offset plus how long the fix took to get
//! here. The smallest sample over the last [`WINDOW_MS`] is the offset plus
//! the shortest trip. It is believed once at least two samples that agree
//! with it (within the tolerance) arrived at least [`CONFIRM_SPAN_MS`]
//! apart: a burst of fixes buffered while offline arrives all at once and
//! never confirms an offset, so its fixes stay as old as they are (history,
//! never the live position). An offset within the tolerance is no offset:
//! it cannot be told from the trip.
//!
//! A clock that jumps ahead is believed again a second later; one that
//! jumps back only once the samples from before the jump left the window,
//! and its fixes are refused meanwhile (too old, or back in time).

use std::collections::VecDeque;

/// How long samples are kept.
pub const WINDOW_MS: i64 = 5_000;

/// How far apart in arrival two agreeing samples must be to confirm an
/// offset: a bit less than one second, the usual interval between fixes.
pub const CONFIRM_SPAN_MS: i64 = 800;

/// The largest offset believed: a clock further off than a year is not a
/// clock, and its fixes are refused as they come.
pub const MAX_OFFSET_MS: i64 = 366 * 24 * 3_600_000;

/// Whether `ms` is at most `bound` either way (whatever `ms` a client
/// sent: `i64::MIN` has no absolute value).
pub fn within(ms: i64, bound: i64) -> bool {
    ms.unsigned_abs() <= bound.unsigned_abs()
}

/// Fixes arriving this close together make one sample (the least
/// delayed), and samples are kept [`MAX_SAMPLES`] at most: the work per fix
/// is bounded whatever the rate of fixes, and a fast sender still spans
/// the window.
const SAMPLE_EVERY_MS: i64 = 100;
const MAX_SAMPLES: usize = (WINDOW_MS / SAMPLE_EVERY_MS) as usize + 2;

#[derive(Debug, Clone, Copy)]
struct Sample {
    arrival_ms: i64,
    /// Arrival minus fix time.
    delay_ms: i64,
}

/// The clock estimate of one driver session.
#[derive(Debug, Clone)]
pub struct DeviceClock {
    tolerance_ms: i64,
    samples: VecDeque<Sample>,
    /// What is added to a fix time now.
    correction_ms: i64,
    /// Whether this session's fixes ever confirmed an offset (before, the
    /// correction is zero or what an earlier session found).
    confirmed: bool,
}

/// What a fix's arrival changed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Observed {
    /// What to add to this fix's time.
    pub correction_ms: i64,
    /// The correction changed with this fix, from this.
    pub changed_from: Option<i64>,
    /// It is the first confirmed estimate of this session (fixes accepted
    /// before were taken as they came).
    pub first: bool,
}

impl DeviceClock {
    pub fn new(tolerance_ms: i64) -> Self {
        Self {
            tolerance_ms: tolerance_ms.max(0),
            samples: VecDeque::new(),
            correction_ms: 0,
            confirmed: false,
        }
    }

    /// What is added to fix times now.
    pub fn correction_ms(&self) -> i64 {
        self.correction_ms
    }

    /// Starts from what an earlier session of the same device found (a
    /// driver handed over, or back after a lost connection), until this
    /// session's fixes confirm an offset of their own.
    pub fn assume(&mut self, correction_ms: i64) {
        if !self.confirmed && within(correction_ms, MAX_OFFSET_MS) {
            self.correction_ms = self.applied(correction_ms);
        }
    }

    /// The correction an offset makes: none within the tolerance.
    fn applied(&self, offset_ms: i64) -> i64 {
        match within(offset_ms, self.tolerance_ms) {
            true => 0,
            false => offset_ms,
        }
    }

    /// Whether an offset (perhaps none) was ever confirmed.
    pub fn confirmed(&self) -> bool {
        self.confirmed
    }

    /// Notes a fix stamped `fix_time_ms` by the device that arrived at
    /// `arrival_ms` (node clock); returns the correction for it.
    pub fn observe(&mut self, fix_time_ms: i64, arrival_ms: i64) -> Observed {
        let delay_ms = arrival_ms.saturating_sub(fix_time_ms);
        match self.samples.back_mut() {
            Some(last) if arrival_ms.saturating_sub(last.arrival_ms) < SAMPLE_EVERY_MS => {
                last.delay_ms = last.delay_ms.min(delay_ms);
            }
            _ => self.push(arrival_ms, delay_ms),
        }
        self.estimate()
    }

    fn push(&mut self, arrival_ms: i64, delay_ms: i64) {
        while self
            .samples
            .front()
            .is_some_and(|s| s.arrival_ms < arrival_ms.saturating_sub(WINDOW_MS))
            || self.samples.len() >= MAX_SAMPLES
        {
            self.samples.pop_front();
        }
        self.samples.push_back(Sample {
            arrival_ms,
            delay_ms,
        });
    }

    /// The correction the samples confirm, if they do; else the last.
    fn estimate(&mut self) -> Observed {
        let unchanged = Observed {
            correction_ms: self.correction_ms,
            changed_from: None,
            first: false,
        };
        let Some(least) = self.samples.iter().map(|s| s.delay_ms).min() else {
            return unchanged;
        };
        let agreeing = self
            .samples
            .iter()
            .filter(|s| s.delay_ms <= least.saturating_add(self.tolerance_ms));
        let (first_at, last_at) = agreeing.fold((i64::MAX, i64::MIN), |(a, b), s| {
            (a.min(s.arrival_ms), b.max(s.arrival_ms))
        });
        if last_at.saturating_sub(first_at) < CONFIRM_SPAN_MS || !within(least, MAX_OFFSET_MS) {
            return unchanged;
        }
        let correction = self.applied(least);
        let first = !self.confirmed;
        self.confirmed = true;
        if correction == self.correction_ms {
            return Observed { first, ..unchanged };
        }
        let from = std::mem::replace(&mut self.correction_ms, correction);
        Observed {
            correction_ms: correction,
            changed_from: Some(from),
            first,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW: i64 = 1_800_000_000_000;
    const TOLERANCE: i64 = 1_000;

    /// A device `skew_ms` ahead sending a fix a second for `secs` seconds,
    /// each arriving `trip_ms` after it was taken; the corrections applied.
    fn run(clock: &mut DeviceClock, from: i64, secs: i64, skew_ms: i64, trip_ms: i64) -> Vec<i64> {
        (0..secs)
            .map(|i| {
                let taken = from + i * 1_000;
                clock
                    .observe(taken + skew_ms, taken + trip_ms)
                    .correction_ms
            })
            .collect()
    }

    #[test]
    fn a_right_clock_is_left_alone() {
        let mut clock = DeviceClock::new(TOLERANCE);
        assert!(run(&mut clock, NOW, 10, 0, 80).iter().all(|&c| c == 0));
        // Network delay varying up to seconds does not make an offset.
        for (i, trip) in [900, 50, 2_000, 120].into_iter().enumerate() {
            let taken = NOW + 10_000 + i as i64 * 1_000;
            assert_eq!(clock.observe(taken, taken + trip).correction_ms, 0);
        }
    }

    #[test]
    fn a_wrong_clock_is_corrected_from_the_second_fix() {
        for skew in [20_000, -60_000, 3_600_000, -86_400_000] {
            let mut clock = DeviceClock::new(TOLERANCE);
            let corrections = run(&mut clock, NOW, 5, skew, 80);
            assert_eq!(corrections[0], 0, "one fix confirms nothing ({skew})");
            // Corrected to the arrival of the quickest fix: node time,
            // give or take the trip.
            assert!(
                corrections[1..].iter().all(|&c| c == 80 - skew),
                "{skew}: {corrections:?}"
            );
        }
    }

    #[test]
    fn fixes_buffered_offline_and_sent_at_once_stay_as_old_as_they_are() {
        let mut clock = DeviceClock::new(TOLERANCE);
        // Ten minutes of a fix a second, arriving within 30 ms.
        for i in 0..600 {
            let taken = NOW + i * 1_000;
            let arrival = NOW + 600_000 + i / 20;
            assert_eq!(clock.observe(taken, arrival).correction_ms, 0);
        }
        // Then live: still no offset.
        assert!(run(&mut clock, NOW + 601_000, 5, 0, 60)
            .iter()
            .all(|&c| c == 0));
    }

    #[test]
    fn a_clock_that_jumps_is_followed_ahead_at_once_and_back_after_the_window() {
        let mut clock = DeviceClock::new(TOLERANCE);
        run(&mut clock, NOW, 5, 0, 50);
        // A minute ahead: the old correction for one fix, then the new.
        let ahead = run(&mut clock, NOW + 5_000, 3, 60_000, 50);
        assert_eq!(ahead, vec![0, -59_950, -59_950]);
        // Back to right: the minute-ahead samples hold until they leave the
        // window (its fixes are refused meanwhile as too old).
        let back = run(&mut clock, NOW + 8_000, 8, 0, 50);
        assert_eq!(back[0], -59_950);
        assert_eq!(*back.last().unwrap(), 0, "{back:?}");
        let held = back.iter().take_while(|&&c| c != 0).count() as i64;
        assert!(held * 1_000 <= WINDOW_MS + 1_000, "{back:?}");
    }

    #[test]
    fn an_earlier_sessions_offset_holds_until_this_sessions_fixes_confirm_one() {
        let mut clock = DeviceClock::new(TOLERANCE);
        clock.assume(-3_600_000);
        // Its first fix is taken at once.
        assert_eq!(
            clock.observe(NOW + 3_600_000, NOW + 50).correction_ms,
            -3_600_000
        );
        // The next confirms this session's own measure.
        let corrections = run(&mut clock, NOW + 1_000, 2, 3_600_000, 50);
        assert_eq!(corrections, vec![-3_599_950, -3_599_950]);
        clock.assume(0);
        assert_eq!(
            clock.correction_ms(),
            -3_599_950,
            "a confirmed offset stays"
        );
    }

    #[test]
    fn a_time_no_clock_could_show_is_never_believed() {
        for stamp in [i64::MIN, i64::MAX, 0, NOW + 2 * MAX_OFFSET_MS] {
            let mut clock = DeviceClock::new(TOLERANCE);
            for i in 0..10 {
                let observed = clock.observe(stamp, NOW + i * 1_000);
                assert_eq!(observed.correction_ms, 0, "{stamp}");
            }
            clock.assume(stamp);
            assert_eq!(clock.correction_ms(), 0);
        }
    }

    #[test]
    fn a_flood_of_fixes_keeps_the_work_bounded() {
        let mut clock = DeviceClock::new(TOLERANCE);
        for i in 0..10_000 {
            clock.observe(NOW + i, NOW + i + 30);
        }
        assert!(clock.samples.len() <= MAX_SAMPLES);
    }
}
