//! Distances on the sphere.
//!
//! One radius is used everywhere, Redis's own (`GEODIST`, `GEOSEARCH`), so that
//! the memory store, the Redis store and any brute-force check agree on which
//! vehicle is inside a radius. The formula is `geo`'s haversine; only the
//! radius is ours (`geo::Haversine` uses the GRS80 mean radius, 6,371,008.8 m,
//! which would put a vehicle 28 cm inside a 100 m radius here and outside
//! it in Redis).

use geo::{Distance, HaversineMeasure, Point};

/// Earth radius in metres as Redis's geo commands use it.
pub const EARTH_RADIUS_M: f64 = 6_372_797.560_856;

/// The sphere Redis measures on.
pub const REDIS_SPHERE: HaversineMeasure = HaversineMeasure::new(EARTH_RADIUS_M);

/// Great-circle distance in metres between two points given in degrees.
pub fn haversine_m(lat1: f64, lon1: f64, lat2: f64, lon2: f64) -> f64 {
    REDIS_SPHERE.distance(Point::new(lon1, lat1), Point::new(lon2, lat2))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_degree_of_latitude_is_about_111_km() {
        let d = haversine_m(0.0, 0.0, 1.0, 0.0);
        assert!((d - 111_226.0).abs() < 5.0, "{d}");
    }

    #[test]
    fn distance_is_symmetric_and_zero_to_itself() {
        assert_eq!(haversine_m(48.85, 2.35, 48.85, 2.35), 0.0);
        let a = haversine_m(48.85, 2.35, 52.52, 13.40);
        let b = haversine_m(52.52, 13.40, 48.85, 2.35);
        assert!((a - b).abs() < 1e-6);
    }
}
