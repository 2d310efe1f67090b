//! The area a simulation plays in.

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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_bbox_parses_from_four_numbers() {
        assert_eq!("52.38,13.2,52.62,13.62".parse::<BBox>(), Ok(BBox::BERLIN));
        assert!("1,2,3".parse::<BBox>().is_err());
        assert!("5,5,1,1".parse::<BBox>().is_err());
    }
}
