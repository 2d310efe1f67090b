//! Distances on the sphere.
//!
//! One radius is used everywhere, Redis's own (`GEODIST`, `GEOSEARCH`), so that
//! the memory store, the Redis store and any brute-force check agree on which
//! vehicle is inside a radius.

/// Earth radius in metres as Redis's geo commands use it.
pub const EARTH_RADIUS_M: f64 = 6_372_797.560_856;

/// Great-circle distance in metres between two points given in degrees.
pub fn haversine_m(lat1: f64, lon1: f64, lat2: f64, lon2: f64) -> f64 {
    let (p1, p2) = (lat1.to_radians(), lat2.to_radians());
    let dp = p2 - p1;
    let dl = (lon2 - lon1).to_radians();
    let a = (dp / 2.0).sin().powi(2) + p1.cos() * p2.cos() * (dl / 2.0).sin().powi(2);
    2.0 * EARTH_RADIUS_M * a.sqrt().min(1.0).asin()
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
