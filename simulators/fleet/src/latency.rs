//! End-to-end latency: from a driver creating a fix to a rider applying it.
//!
//! Drivers and riders share this process and its clock. Each driver notes
//! where it reported and when, for its last few fixes; a rider that applies a
//! vehicle at exactly one of those positions (as the wire carries it, 1e-7°)
//! records how long that fix took. A fix that was coalesced away is never
//! applied and not measured; a late one still is, however late.

use std::{collections::VecDeque, time::Instant};

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

fn e7(degrees: f64) -> i32 {
    (degrees * 1e7).round() as i32
}

impl Default for LatencyBook {
    fn default() -> Self {
        Self {
            sent: DashMap::new(),
            // 1 µs to 60 s, 3 significant digits; these bounds are valid.
            histogram: Mutex::new(
                Histogram::new_with_bounds(1, 60_000_000, 3).expect("valid histogram bounds"),
            ),
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

    /// A rider applied a move of this vehicle.
    pub fn applied(&self, state: &VehicleState) {
        let (lat, lon) = (e7(state.lat), e7(state.lon));
        let at = {
            let Some(recent) = self.sent.get(&state.id) else {
                return;
            };
            let found = recent.iter().rev().find(|(a, b, _)| (*a, *b) == (lat, lon));
            let Some(&(_, _, at)) = found else { return };
            at
        };
        let micros = at.elapsed().as_micros().clamp(1, 60_000_000) as u64;
        let _ = self.histogram.lock().record(micros);
    }

    pub fn percentiles(&self) -> Percentiles {
        let h = self.histogram.lock();
        let ms = |q: f64| h.value_at_quantile(q) as f64 / 1e3;
        Percentiles {
            samples: h.len(),
            p50: ms(0.5),
            p90: ms(0.9),
            p99: ms(0.99),
            p999: ms(0.999),
            max: h.max() as f64 / 1e3,
        }
    }

    /// Starts a new measurement window (e.g. after the ramp-up).
    pub fn reset(&self) {
        self.histogram.lock().reset();
    }
}
