//! What the SDK sends and receives per minute, by what a phone does: each
//! packet wakes its radio. A driver with the SDK's defaults (fixes every
//! 12 s parked, about every 30 m moving, every second on a trip; a
//! keep-alive every 20 s when nothing else is sent) against an embedded
//! node, its GPS reporting every second; then a rider watching a quiet
//! street, and one watching a moving car.
//!
//! `cargo run -p hexfleet-mobile --example radio -- [SECONDS per phase, default 120]`

use std::time::Duration;

use hexfleet_mobile::{
    node_config, reporting_policy, watch_around, ConnectionState, Driver, DriverListener, Location,
    PauseMode, RemovalReason, Rider, RiderListener, TokenProvider, Vehicle, VehicleClass,
    VehicleStatus,
};
use hexfleet_tests::{driver_token, token, TestNode};

struct Tokens;

impl TokenProvider for Tokens {
    fn fresh_token(&self) -> Option<String> {
        None
    }
}

struct Quiet;

impl DriverListener for Quiet {
    fn on_state(&self, _: ConnectionState) {}
}

impl RiderListener for Quiet {
    fn on_added(&self, _: Vehicle) {}
    fn on_moved(&self, _: Vehicle) {}
    fn on_removed(&self, _: Vehicle, _: RemovalReason) {}
    fn on_state(&self, _: ConnectionState) {}
    fn on_watch_refused(&self, _: hexfleet_mobile::MobileError) {}
}

const ORIGIN: (f64, f64) = (59.33, 18.06);

#[tokio::main]
async fn main() {
    let seconds: u64 = std::env::args()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(120);
    let phase = Duration::from_secs(seconds);
    let per_minute = 60.0 / phase.as_secs_f64();
    // The node's defaults (a test node acknowledges fixes every 100 ms).
    let defaults = hexfleet_node::config::Config::default();
    let node = TestNode::start_with(None, |c| c.ingest = defaults.ingest).await;
    let config = node_config(
        node.node.quic_addr.to_string(),
        node.cert().display().to_string(),
    );
    let driver = Driver::connect(
        config.clone(),
        driver_token("radio"),
        Box::new(Tokens),
        VehicleClass::Economy,
        VehicleStatus::Available,
        reporting_policy(),
        Box::new(Quiet),
    )
    .expect("the driver connects");
    println!("| phone state | datagrams sent/min | received/min | fixes/min |");
    println!("|---|---|---|---|");
    let mut lon = ORIGIN.1;
    for (state, speed, status, pause) in [
        (
            "driver parked, just connected (the handshake's tail, path MTU probes)",
            0.0f32,
            VehicleStatus::Available,
            None,
        ),
        (
            "driver parked (GPS 1 Hz)",
            0.0,
            VehicleStatus::Available,
            None,
        ),
        (
            "driver moving, 12 m/s",
            12.0,
            VehicleStatus::Available,
            None,
        ),
        ("driver on a trip", 12.0, VehicleStatus::OnTrip, None),
        (
            "driver in the background, connection kept",
            0.0,
            VehicleStatus::Available,
            Some(PauseMode::KeepConnection),
        ),
        (
            "driver in the background, disconnected",
            0.0,
            VehicleStatus::Available,
            Some(PauseMode::Disconnect),
        ),
    ] {
        driver.set_status(status).unwrap();
        if let Some(mode) = pause {
            driver.pause(mode).unwrap();
        }
        // Let the change settle (a close, a resume's fix) before counting.
        tokio::time::sleep(Duration::from_secs(5)).await;
        let before = driver.stats();
        let until = tokio::time::Instant::now() + phase;
        while tokio::time::Instant::now() < until {
            lon += f64::from(speed) / 111_000.0 / 0.51;
            let location = Location {
                lat: ORIGIN.0,
                lon,
                heading_deg: 90.0,
                speed_mps: speed,
                accuracy_m: 5.0,
                time_ms: 0,
            };
            driver.report_location(location).unwrap();
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
        let after = driver.stats();
        println!(
            "| {state} | {:.1} | {:.1} | {:.1} |",
            (after.udp_datagrams_sent - before.udp_datagrams_sent) as f64 * per_minute,
            (after.udp_datagrams_received - before.udp_datagrams_received) as f64 * per_minute,
            (after.fixes_sent - before.fixes_sent) as f64 * per_minute,
        );
        if pause.is_some() {
            driver.resume().unwrap();
        }
    }
    driver.close();

    // Riders: a quiet street, then a car driving by once a second.
    let rider = Rider::connect(
        config.clone(),
        token(hexfleet_protocol::Role::Rider, "radio-rider"),
        Box::new(Tokens),
        Box::new(Quiet),
    )
    .expect("the rider connects");
    rider
        .watch(watch_around(ORIGIN.0, ORIGIN.1, 1_000.0))
        .unwrap();
    let car = Driver::connect(
        config,
        driver_token("radio-car"),
        Box::new(Tokens),
        VehicleClass::Economy,
        VehicleStatus::Available,
        hexfleet_mobile::ReportingPolicy {
            min_interval_ms: 1_000,
            max_interval_ms: 1_000,
            ..reporting_policy()
        },
        Box::new(Quiet),
    )
    .expect("the car connects");
    car.pause(PauseMode::Disconnect).unwrap();
    // West of the rider, driving east through its view.
    let mut car_lon = ORIGIN.1 - 0.006;
    for (state, moving) in [
        ("rider, nothing moving in view", false),
        ("rider, one car moving in view", true),
    ] {
        if moving {
            car.resume().unwrap();
        }
        tokio::time::sleep(Duration::from_secs(2)).await;
        let before = rider.stats();
        let until = tokio::time::Instant::now() + phase;
        while tokio::time::Instant::now() < until {
            if moving {
                car_lon += 12.0 / 111_000.0 / 0.51;
                car.report_location(Location {
                    lat: ORIGIN.0,
                    lon: car_lon,
                    heading_deg: 90.0,
                    speed_mps: 12.0,
                    accuracy_m: 5.0,
                    time_ms: 0,
                })
                .unwrap();
            }
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
        let after = rider.stats();
        println!(
            "| {state} | {:.1} | {:.1} | |",
            (after.udp_datagrams_sent - before.udp_datagrams_sent) as f64 * per_minute,
            (after.udp_datagrams_received - before.udp_datagrams_received) as f64 * per_minute,
        );
    }
    car.close();
    rider.close();
    node.stop().await;
}
