//! A synthetic street network and vehicles that drive on it.
//!
//! The city is a grid of streets `block_m` apart inside its bounding box,
//! with a diagonal avenue every few blocks. A vehicle drives from one random
//! intersection to the next along the streets (diagonally where an avenue
//! allows), at a plausible speed for each leg (3–20 m/s), and now and then
//! stops at an intersection (lights, pick-ups). What it reports carries GPS
//! noise; where it is does not.

use rand::Rng;
use rand_distr::{Distribution, Normal};

use crate::movement::BBox;

const METRES_PER_DEGREE: f64 = 111_320.0;
const MIN_SPEED_MPS: f64 = 3.0;
const MAX_SPEED_MPS: f64 = 20.0;
/// Every this many blocks a diagonal avenue crosses the grid.
const AVENUE_EVERY: i64 = 4;
/// Chance of stopping at an intersection, and for how long (seconds).
const STOP_CHANCE: f64 = 0.15;
const STOP_SECONDS: std::ops::Range<f64> = 3.0..25.0;

/// The street grid of a city.
#[derive(Debug, Clone, Copy)]
pub struct City {
    pub bbox: BBox,
    pub block_m: f64,
    origin: (f64, f64),
    /// Degrees per block, north and east.
    step: (f64, f64),
    /// Intersections along each axis.
    size: (i64, i64),
}

impl City {
    pub fn new(bbox: BBox, block_m: f64) -> Self {
        let block_m = block_m.max(20.0);
        let cos_lat = bbox.center().0.to_radians().cos().max(0.01);
        let step = (
            block_m / METRES_PER_DEGREE,
            block_m / (METRES_PER_DEGREE * cos_lat),
        );
        let size = (
            (((bbox.max_lat - bbox.min_lat) / step.0) as i64).max(1),
            (((bbox.max_lon - bbox.min_lon) / step.1) as i64).max(1),
        );
        Self {
            bbox,
            block_m,
            origin: (bbox.min_lat, bbox.min_lon),
            step,
            size,
        }
    }

    fn random_node(&self, rng: &mut impl Rng) -> (i64, i64) {
        (
            rng.random_range(0..=self.size.0),
            rng.random_range(0..=self.size.1),
        )
    }

    fn position(&self, node: (f64, f64)) -> (f64, f64) {
        (
            self.origin.0 + node.0 * self.step.0,
            self.origin.1 + node.1 * self.step.1,
        )
    }
}

/// One vehicle's motion on the grid, in grid units (blocks).
#[derive(Debug, Clone)]
pub struct Car {
    city: City,
    at: (f64, f64),
    /// Remaining waypoints of the current leg (intersections), nearest last.
    route: Vec<(i64, i64)>,
    pub speed_mps: f64,
    pub heading_deg: f64,
    stopped_for: f64,
    noise: Normal<f64>,
}

/// Where a car says it is.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Report {
    pub lat: f64,
    pub lon: f64,
    pub heading_deg: f32,
    pub speed_mps: f32,
}

impl Car {
    pub fn new(city: City, gps_noise_m: f64, rng: &mut impl Rng) -> Self {
        let start = city.random_node(rng);
        let mut car = Self {
            city,
            at: (start.0 as f64, start.1 as f64),
            route: Vec::new(),
            speed_mps: 0.0,
            heading_deg: 0.0,
            stopped_for: 0.0,
            // A non-negative, finite deviation always makes a distribution.
            noise: Normal::new(0.0, gps_noise_m.max(0.0)).expect("a valid normal distribution"),
        };
        car.plan(rng);
        car
    }

    /// Whether the car just finished a leg (the caller may change status).
    pub fn arrived(&self) -> bool {
        self.route.is_empty()
    }

    /// Plans a route to a new random intersection.
    pub fn plan(&mut self, rng: &mut impl Rng) {
        let dest = self.city.random_node(rng);
        let mut at = (self.at.0.round() as i64, self.at.1.round() as i64);
        let mut route = Vec::new();
        while at != dest {
            let (dy, dx) = ((dest.0 - at.0).signum(), (dest.1 - at.1).signum());
            // On an avenue, cut diagonally while both directions remain.
            let on_avenue = (at.0 - at.1).rem_euclid(AVENUE_EVERY) == 0;
            at = if on_avenue && dy != 0 && dx != 0 && dy == dx {
                (at.0 + dy, at.1 + dx)
            } else if dy != 0 && (dx == 0 || rng.random_bool(0.5)) {
                (at.0 + dy, at.1)
            } else {
                (at.0, at.1 + dx)
            };
            route.push(at);
        }
        route.reverse();
        self.route = route;
        self.speed_mps = rng.random_range(MIN_SPEED_MPS..MAX_SPEED_MPS);
    }

    /// Advances `dt_s` seconds.
    pub fn step(&mut self, mut dt_s: f64, rng: &mut impl Rng) {
        while dt_s > 0.0 {
            if self.stopped_for > 0.0 {
                let waited = self.stopped_for.min(dt_s);
                self.stopped_for -= waited;
                dt_s -= waited;
                continue;
            }
            let Some(&next) = self.route.last() else {
                return;
            };
            let (ny, nx) = (next.0 as f64 - self.at.0, next.1 as f64 - self.at.1);
            let blocks = ny.hypot(nx);
            let reach = self.speed_mps * dt_s / self.city.block_m;
            if reach < blocks {
                self.at.0 += ny * reach / blocks;
                self.at.1 += nx * reach / blocks;
                self.heading_deg = nx.atan2(ny).to_degrees().rem_euclid(360.0) % 360.0;
                return;
            }
            self.at = (next.0 as f64, next.1 as f64);
            dt_s -= blocks * self.city.block_m / self.speed_mps;
            self.route.pop();
            if rng.random_bool(STOP_CHANCE) {
                self.stopped_for = rng.random_range(STOP_SECONDS);
            }
        }
    }

    fn moving(&self) -> bool {
        self.stopped_for <= 0.0 && !self.route.is_empty()
    }

    /// Where the car is, exactly.
    pub fn position(&self) -> (f64, f64) {
        let p = self.city.position(self.at);
        (
            p.0.clamp(self.city.bbox.min_lat, self.city.bbox.max_lat),
            p.1.clamp(self.city.bbox.min_lon, self.city.bbox.max_lon),
        )
    }

    /// What its GPS says: the position with noise, heading and speed.
    pub fn report(&self, rng: &mut impl Rng) -> Report {
        let (lat, lon) = self.position();
        let cos_lat = lat.to_radians().cos().max(0.01);
        let north = self.noise.sample(rng);
        let east = self.noise.sample(rng);
        Report {
            lat: lat + north / METRES_PER_DEGREE,
            lon: lon + east / (METRES_PER_DEGREE * cos_lat),
            heading_deg: self.heading_deg as f32,
            speed_mps: if self.moving() {
                self.speed_mps as f32
            } else {
                0.0
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use rand::{rngs::StdRng, SeedableRng};

    use super::*;

    #[test]
    fn cars_drive_on_streets_at_plausible_speeds_inside_the_city() {
        let mut rng = StdRng::seed_from_u64(3);
        let city = City::new(BBox::BERLIN, 200.0);
        for _ in 0..40 {
            let mut car = Car::new(city, 0.0, &mut rng);
            let mut stops = 0;
            for _ in 0..1_000 {
                let before = car.position();
                car.step(1.0, &mut rng);
                if car.arrived() {
                    car.plan(&mut rng);
                }
                let after = car.position();
                let moved =
                    hexfleet_model::geodesy::haversine_m(before.0, before.1, after.0, after.1);
                assert!(moved <= MAX_SPEED_MPS * 1.05, "{moved} m in one second");
                stops += usize::from(moved < 0.01);
                assert!((city.bbox.min_lat..=city.bbox.max_lat).contains(&after.0));
                assert!((city.bbox.min_lon..=city.bbox.max_lon).contains(&after.1));
                let r = car.report(&mut rng);
                assert!((0.0..360.0).contains(&r.heading_deg));
            }
            assert!(stops > 0, "cars stop now and then");
        }
    }

    #[test]
    fn gps_noise_scatters_reports_around_the_true_position() {
        let mut rng = StdRng::seed_from_u64(4);
        let car = Car::new(City::new(BBox::BERLIN, 200.0), 5.0, &mut rng);
        let (lat, lon) = car.position();
        let mean_error: f64 = (0..1_000)
            .map(|_| {
                let r = car.report(&mut rng);
                hexfleet_model::geodesy::haversine_m(lat, lon, r.lat, r.lon)
            })
            .sum::<f64>()
            / 1_000.0;
        assert!((3.0..10.0).contains(&mean_error), "{mean_error}");
    }
}
