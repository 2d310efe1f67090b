//! End-to-end latency: from a driver creating a fix to a rider applying it.
//!
//! Drivers and riders share this process and its clock. Each driver notes
//! where it reported and when, for its last few fixes; a rider that applies a
//! vehicle at exactly one of those positions (as the wire carries it, 1e-7°)
//! records how long that fix took. A fix that was coalesced away is never
//! applied and not measured; a late one still is, however late.

use std::{
    collections::VecDeque,
    time::{Duration, Instant},
};

use dashmap::DashMap;
use hdrhistogram::Histogram;
use hexfleet_model::{VehicleId, VehicleState};
use parking_lot::Mutex;

/// Fixes remembered per vehicle: enough to match a rider that lags a few
/// fixes behind.
const REMEMBERED: usize = 16;

pub struct LatencyBook {
    sent: DashMap<VehicleId, VecDeque<(i32, i32, Instant)>>,
    histogram: Mutex<Histogram<u64>>,
}

/// Latency percentiles in milliseconds.
#[derive(Debug, Clone, Copy, Default, serde::Serialize)]
pub struct Percentiles {
    pub samples: u64,
    pub p50: f64,
    pub p90: f64,
    pub p99: f64,
    pub p999: f64,
    pub max: f64,
}

/// A histogram of latencies in microseconds, 1 µs to 60 s, 3 significant
/// digits.
pub fn histogram() -> Histogram<u64> {
    // These bounds are valid.
    Histogram::new_with_bounds(1, 60_000_000, 3).expect("valid histogram bounds")
}

pub fn record(h: &mut Histogram<u64>, waited: Duration) {
    let _ = h.record(waited.as_micros().clamp(1, 60_000_000) as u64);
}

impl Percentiles {
    /// Percentiles in milliseconds of a histogram in microseconds.
    pub fn of(h: &Histogram<u64>) -> Self {
        let ms = |q: f64| h.value_at_quantile(q) as f64 / 1e3;
        Self {
            samples: h.len(),
            p50: ms(0.5),
            p90: ms(0.9),
            p99: ms(0.99),
            p999: ms(0.999),
            max: h.max() as f64 / 1e3,
        }
    }
}

fn e7(degrees: f64) -> i32 {
    (degrees * 1e7).round() as i32
}

impl Default for LatencyBook {
    fn default() -> Self {
        Self {
            sent: DashMap::new(),
            histogram: Mutex::new(histogram()),
        }
    }
}

impl LatencyBook {
    /// A driver is about to send a fix at this position.
    pub fn sent(&self, id: &VehicleId, lat: f64, lon: f64) {
        let mut recent = self.sent.entry(id.clone()).or_default();
        if recent.len() == REMEMBERED {
            recent.pop_front();
        }
        recent.push_back((e7(lat), e7(lon), Instant::now()));
    }

    /// How long ago a driver sent this position of this vehicle, if it is
    /// one of its recent fixes.
    pub fn since_sent(&self, id: &VehicleId, lat: f64, lon: f64) -> Option<Duration> {
        let (lat, lon) = (e7(lat), e7(lon));
        let recent = self.sent.get(id)?;
        let found = recent.iter().rev().find(|(a, b, _)| (*a, *b) == (lat, lon));
        found.map(|(_, _, at)| at.elapsed())
    }

    /// A rider applied a move of this vehicle.
    pub fn applied(&self, state: &VehicleState) {
        if let Some(waited) = self.since_sent(&state.id, state.lat, state.lon) {
            record(&mut self.histogram.lock(), waited);
        }
    }

    pub fn percentiles(&self) -> Percentiles {
        Percentiles::of(&self.histogram.lock())
    }

    /// Starts a new measurement window (e.g. after the ramp-up).
    pub fn reset(&self) {
        self.histogram.lock().reset();
    }
}
