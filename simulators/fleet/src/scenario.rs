//! Scenarios: what a simulation run does, as a TOML file in
//! `simulators/scenarios/` or built from command-line flags.

use std::{path::Path, time::Duration};

use serde::Deserialize;

use crate::movement::BBox;

#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Scenario {
    pub name: String,
    /// How long the run lasts.
    #[serde(with = "humantime_serde")]
    pub duration: Duration,
    pub seed: u64,
    pub city: CityPlan,
    pub drivers: DriverPlan,
    pub riders: RiderPlan,
    pub dashboards: DashboardPlan,
    /// Every client drops its connection and reconnects at once, this long
    /// into the run.
    #[serde(with = "humantime_serde")]
    pub reconnect_storm_at: Option<Duration>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct CityPlan {
    /// `[min_lat, min_lon, max_lat, max_lon]`
    pub bbox: [f64; 4],
    /// Distance between parallel streets, metres.
    pub block_m: f64,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DriverPlan {
    pub count: usize,
    /// Fixes per driver per second.
    pub rate_hz: f64,
    /// Standard deviation of GPS noise, metres.
    pub gps_noise_m: f64,
    /// Share of fixes that are deliberately bad (null island, teleports,
    /// duplicates, time going backwards), to exercise validation.
    pub bad_fix_share: f64,
    /// Share of drivers whose phone's clock is off (20 s ahead, 60 s
    /// behind, an hour ahead or a day behind, at random), stamping their
    /// fixes with it: the node puts them in its own clock.
    pub wrong_clock_share: f64,
    /// Chance per driver per minute of going off duty for a while.
    pub off_duty_per_minute: f64,
    /// Sign off at the end rather than just disconnect.
    pub goodbye: bool,
}

/// Dispatch dashboards over WebSocket: half watch the whole city, half a
/// district.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DashboardPlan {
    pub count: usize,
    /// MessagePack frames instead of JSON.
    pub msgpack: bool,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RiderPlan {
    pub count: usize,
    pub radius_m: f64,
    /// Share of riders who walk and re-subscribe as they go.
    pub walking_share: f64,
    /// How long a rider stays before leaving (a new one takes its place).
    #[serde(with = "humantime_serde")]
    pub lifetime: Option<Duration>,
    /// Put the riders around a point on a shard boundary (within this many
    /// metres), where their views span two shards.
    pub at_shard_boundary_m: Option<f64>,
}

impl Default for Scenario {
    fn default() -> Self {
        Self {
            name: "custom".into(),
            duration: Duration::from_secs(30),
            seed: 1,
            city: CityPlan::default(),
            drivers: DriverPlan::default(),
            riders: RiderPlan::default(),
            dashboards: DashboardPlan::default(),
            reconnect_storm_at: None,
        }
    }
}

impl Default for CityPlan {
    fn default() -> Self {
        let b = BBox::BERLIN;
        Self {
            bbox: [b.min_lat, b.min_lon, b.max_lat, b.max_lon],
            block_m: 200.0,
        }
    }
}

impl Default for DriverPlan {
    fn default() -> Self {
        Self {
            count: 100,
            rate_hz: 1.0,
            gps_noise_m: 3.0,
            bad_fix_share: 0.0,
            wrong_clock_share: 0.0,
            off_duty_per_minute: 0.02,
            goodbye: false,
        }
    }
}

impl Default for RiderPlan {
    fn default() -> Self {
        Self {
            count: 0,
            radius_m: 1_000.0,
            walking_share: 0.2,
            lifetime: None,
            at_shard_boundary_m: None,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ScenarioError {
    #[error("reading {0}: {1}")]
    Read(String, std::io::Error),
    #[error("parsing {0}: {1}")]
    Parse(String, Box<toml::de::Error>),
    #[error("{0}")]
    Invalid(String),
}

impl Scenario {
    pub fn from_file(path: &Path) -> Result<Self, ScenarioError> {
        let name = path.display().to_string();
        let text =
            std::fs::read_to_string(path).map_err(|e| ScenarioError::Read(name.clone(), e))?;
        let scenario: Scenario =
            toml::from_str(&text).map_err(|e| ScenarioError::Parse(name, Box::new(e)))?;
        scenario.check()?;
        Ok(scenario)
    }

    pub fn bbox(&self) -> BBox {
        let [min_lat, min_lon, max_lat, max_lon] = self.city.bbox;
        BBox {
            min_lat,
            min_lon,
            max_lat,
            max_lon,
        }
    }

    pub fn check(&self) -> Result<(), ScenarioError> {
        let invalid = |m: &str| Err(ScenarioError::Invalid(m.into()));
        let b = self.city.bbox;
        if format!("{},{},{},{}", b[0], b[1], b[2], b[3])
            .parse::<BBox>()
            .is_err()
        {
            return invalid(
                "city.bbox must be [min_lat, min_lon, max_lat, max_lon] in range with min < max",
            );
        }
        if !(self.drivers.rate_hz > 0.0 && self.drivers.rate_hz <= 100.0) {
            return invalid("drivers.rate_hz must be in (0, 100]");
        }
        if !(0.0..=1.0).contains(&self.drivers.bad_fix_share)
            || !(0.0..=1.0).contains(&self.drivers.wrong_clock_share)
            || !(0.0..=1.0).contains(&self.riders.walking_share)
        {
            return invalid("shares must be in [0, 1]");
        }
        if self.drivers.count == 0 && self.riders.count == 0 && self.dashboards.count == 0 {
            return invalid("a scenario needs drivers, riders or dashboards");
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_shipped_scenario_parses_and_is_valid() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../scenarios");
        let mut seen = 0;
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.extension().is_some_and(|e| e == "toml") {
                Scenario::from_file(&path).unwrap_or_else(|e| panic!("{e}"));
                seen += 1;
            }
        }
        assert!(seen >= 5, "{seen} scenarios");
    }

    #[test]
    fn nonsense_is_refused_with_a_reason() {
        assert!(toml::from_str::<Scenario>("[drivers]\ncoutn = 3").is_err());
        let s: Scenario = toml::from_str("[drivers]\nrate_hz = 0.0").unwrap();
        assert!(s.check().is_err());
    }
}
