//! How simulated vehicles move: from one random destination to the next
//! inside a city's bounding box, at a plausible speed, heading where they go.

use rand::Rng;

/// A city's bounding box in degrees.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct BBox {
    pub min_lat: f64,
    pub min_lon: f64,
    pub max_lat: f64,
    pub max_lon: f64,
}

impl BBox {
    /// Berlin, the default city.
    pub const BERLIN: BBox = BBox {
        min_lat: 52.38,
        min_lon: 13.20,
        max_lat: 52.62,
        max_lon: 13.62,
    };

    pub fn center(&self) -> (f64, f64) {
        (
            (self.min_lat + self.max_lat) / 2.0,
            (self.min_lon + self.max_lon) / 2.0,
        )
    }

    pub fn random_point(&self, rng: &mut impl Rng) -> (f64, f64) {
        (
            rng.random_range(self.min_lat..self.max_lat),
            rng.random_range(self.min_lon..self.max_lon),
        )
    }
}

impl std::str::FromStr for BBox {
    type Err = String;

    /// `min_lat,min_lon,max_lat,max_lon`
    fn from_str(s: &str) -> Result<Self, String> {
        let v: Vec<f64> = s
            .split(',')
            .map(|p| p.trim().parse::<f64>().map_err(|e| format!("{p:?}: {e}")))
            .collect::<Result<_, _>>()?;
        let [min_lat, min_lon, max_lat, max_lon] = v[..] else {
            return Err("expected min_lat,min_lon,max_lat,max_lon".into());
        };
        let ok = (-90.0..=90.0).contains(&min_lat)
            && (-90.0..=90.0).contains(&max_lat)
            && (-180.0..=180.0).contains(&min_lon)
            && (-180.0..=180.0).contains(&max_lon)
            && min_lat < max_lat
            && min_lon < max_lon;
        if !ok {
            return Err("the box must be in range with min < max".into());
        }
        Ok(Self {
            min_lat,
            min_lon,
            max_lat,
            max_lon,
        })
    }
}

const METRES_PER_DEGREE: f64 = 111_320.0;
const MIN_SPEED_MPS: f64 = 3.0;
const MAX_SPEED_MPS: f64 = 20.0;

/// One vehicle's motion.
#[derive(Debug, Clone)]
pub struct Mover {
    pub lat: f64,
    pub lon: f64,
    /// Degrees clockwise from north.
    pub heading_deg: f64,
    pub speed_mps: f64,
    dest: (f64, f64),
    bbox: BBox,
}

impl Mover {
    pub fn new(bbox: BBox, rng: &mut impl Rng) -> Self {
        let (lat, lon) = bbox.random_point(rng);
        let mut m = Self {
            lat,
            lon,
            heading_deg: 0.0,
            speed_mps: 0.0,
            dest: (lat, lon),
            bbox,
        };
        m.new_leg(rng);
        m
    }

    fn new_leg(&mut self, rng: &mut impl Rng) {
        self.dest = self.bbox.random_point(rng);
        self.speed_mps = rng.random_range(MIN_SPEED_MPS..MAX_SPEED_MPS);
    }

    /// Advances `dt_s` seconds.
    pub fn step(&mut self, dt_s: f64, rng: &mut impl Rng) {
        let cos_lat = self.lat.to_radians().cos().max(0.01);
        let north_m = (self.dest.0 - self.lat) * METRES_PER_DEGREE;
        let east_m = (self.dest.1 - self.lon) * METRES_PER_DEGREE * cos_lat;
        let remaining = north_m.hypot(east_m);
        let travel = self.speed_mps * dt_s;
        if remaining <= travel {
            (self.lat, self.lon) = self.dest;
            self.new_leg(rng);
            return;
        }
        let f = travel / remaining;
        self.lat += north_m * f / METRES_PER_DEGREE;
        self.lon += east_m * f / (METRES_PER_DEGREE * cos_lat);
        self.heading_deg = east_m.atan2(north_m).to_degrees().rem_euclid(360.0);
        if self.heading_deg >= 360.0 {
            self.heading_deg = 0.0;
        }
    }
}

#[cfg(test)]
mod tests {
    use rand::{rngs::StdRng, SeedableRng};

    use super::*;

    #[test]
    fn vehicles_stay_in_the_box_and_never_exceed_a_plausible_speed() {
        let mut rng = StdRng::seed_from_u64(5);
        let bbox = BBox::BERLIN;
        for _ in 0..50 {
            let mut m = Mover::new(bbox, &mut rng);
            for _ in 0..2_000 {
                let before = (m.lat, m.lon);
                m.step(1.0, &mut rng);
                let moved = hexfleet_model::geodesy::haversine_m(before.0, before.1, m.lat, m.lon);
                assert!(moved <= MAX_SPEED_MPS * 1.01, "{moved} m in 1 s");
                assert!((bbox.min_lat..=bbox.max_lat).contains(&m.lat));
                assert!((bbox.min_lon..=bbox.max_lon).contains(&m.lon));
                assert!((0.0..360.0).contains(&m.heading_deg));
            }
        }
    }

    #[test]
    fn a_bbox_parses_from_four_numbers() {
        assert_eq!("52.38,13.2,52.62,13.62".parse::<BBox>(), Ok(BBox::BERLIN));
        assert!("1,2,3".parse::<BBox>().is_err());
        assert!("5,5,1,1".parse::<BBox>().is_err());
    }
}
