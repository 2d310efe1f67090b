//! Fuzz targets for what the node does with decoded input: a fix of any
//! values through validation into the cell index, and a dashboard's
//! viewport of any numbers into a cover. (Decoding itself is fuzzed in
//! hexfleet-protocol's tests/fuzz.rs.) bolero targets: a property test in
//! `cargo test`; a long run with
//! `BOLERO_RANDOM_TEST_TIME_MS=120000 cargo test --release -p hexfleet-node --test fuzz`.

use hexfleet_model::{CellModel, Position};
use hexfleet_node::{
    config::IngestConfig,
    validate::{LastFix, Limits, Validator},
};
use hexfleet_protocol::{
    dashboard::{DashboardRequest, Format},
    Fix,
};

const NOW_MS: i64 = 1_800_000_000_000;

/// Whatever the numbers, a fix is refused with a reason or accepted with a
/// position the index and Redis can hold (GEOADD refuses latitudes beyond
/// ±85.05°).
#[test]
fn fixes_of_any_values() {
    let limits = Limits::new(&IngestConfig::default(), std::time::Duration::from_secs(30));
    let cells = CellModel::default();
    let last = LastFix {
        seq: 10,
        fix_time_ms: NOW_MS - 1_000,
        position: Position::new(52.52, 13.405).unwrap(),
    };
    bolero::check!()
        .with_type::<(bool, u64, i64, f64, f64, f32, f32, f32)>()
        .for_each(
            |&(seeded, seq, dt, lat, lon, heading_deg, speed_mps, accuracy_m)| {
                let fix = Fix {
                    seq,
                    fix_time_ms: NOW_MS.saturating_add(dt % 120_000),
                    lat,
                    lon,
                    heading_deg,
                    speed_mps,
                    accuracy_m,
                };
                let mut validator = Validator::new(limits, seeded.then_some(last));
                if let Ok(valid) = validator.check(&fix, NOW_MS) {
                    let p = valid.position;
                    assert!(p.lat().is_finite() && p.lon().is_finite());
                    assert!(p.lat().abs() <= hexfleet_model::MAX_INDEXED_LAT, "{p:?}");
                    assert!((-180.0..=180.0).contains(&p.lon()), "{p:?}");
                    assert!(fix.heading_deg.is_finite() && fix.speed_mps.is_finite());
                    let _ = cells.locate(p);
                }
            },
        );
}

/// A viewport of any numbers is refused when it decodes to nothing
/// sensible, and covered within the cell budget when it does.
#[test]
fn viewports_of_any_numbers() {
    let cells = CellModel::default();
    bolero::check!()
        .with_type::<(f64, f64, f64, f64)>()
        .with_iterations(300)
        .for_each(|&(south, west, north, east)| {
            let text = serde_json::json!({
                "type": "viewport", "id": 1, "zoom": 12,
                "bbox": {"south": south, "west": west, "north": north, "east": east},
            })
            .to_string();
            if let Ok(DashboardRequest::Viewport(v)) = Format::Json.decode(text.as_bytes()) {
                match cells.viewport(&v.bbox, 2_000, 800) {
                    hexfleet_model::ViewportCover::Vehicles(c) => assert!(c.len() <= 2_000),
                    hexfleet_model::ViewportCover::Density { cells, .. } => {
                        assert!(cells.len() <= 800 || cells.len() == 122)
                    }
                }
            }
        });
}
