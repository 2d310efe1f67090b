//! A phone's habits, each by what the node sees: the adaptive rate (parked,
//! moving, on a trip), pause and resume, and a signal loss (the latest
//! location only, or the whole track when the app asks for it).

use std::{
    sync::{Arc, Mutex},
    time::Duration,
};

use hexfleet_mobile::{
    node_config, reporting_policy, ConnectionState, Driver, DriverListener, Location, NodeConfig,
    PauseMode, ReportingPolicy, TokenProvider, TransportChoice, VehicleClass, VehicleStatus,
};
use hexfleet_tests::{driver_token, eventually, TestNode};

const WAIT: Duration = Duration::from_secs(10);
const ORIGIN: (f64, f64) = (59.33, 18.06);

struct Tokens(String);

impl TokenProvider for Tokens {
    fn fresh_token(&self) -> Option<String> {
        Some(driver_token(&self.0))
    }
}

#[derive(Clone, Default)]
struct States(Arc<Mutex<Vec<ConnectionState>>>);

impl DriverListener for States {
    fn on_state(&self, state: ConnectionState) {
        self.0.lock().expect("not poisoned").push(state);
    }
}

impl States {
    fn saw(&self, check: impl Fn(&ConnectionState) -> bool) -> bool {
        self.0.lock().expect("not poisoned").iter().any(check)
    }
}

fn config(node: &TestNode) -> NodeConfig {
    node_config(
        node.node.quic_addr.to_string(),
        node.cert().display().to_string(),
    )
}

fn at(lon_step: u32, speed_mps: f32) -> Location {
    Location {
        lat: ORIGIN.0,
        lon: ORIGIN.1 + f64::from(lon_step) * 1e-5,
        heading_deg: 90.0,
        speed_mps,
        accuracy_m: 5.0,
        time_ms: 0,
    }
}

fn connect(
    node: &TestNode,
    id: &str,
    config: NodeConfig,
    policy: ReportingPolicy,
) -> (Arc<Driver>, States) {
    let states = States::default();
    let driver = Driver::connect(
        config,
        driver_token(id),
        Box::new(Tokens(id.to_string())),
        VehicleClass::Economy,
        VehicleStatus::Available,
        policy,
        Box::new(states.clone()),
    )
    .expect("the driver connects");
    let _ = node;
    (driver, states)
}

async fn accepted(node: &TestNode) -> f64 {
    node.metric("hexfleet_fixes_accepted_total").await
}

/// The vehicle's longitude as the node holds it.
async fn lon_on_node(node: &TestNode, id: &str) -> Option<f64> {
    let (status, body) = node.get_json(&format!("/v1/vehicles/{id}")).await;
    (status == 200).then(|| body["lon"].as_f64()).flatten()
}

/// Reports a location every 50 ms (a phone's GPS at 20 Hz) for `period`,
/// from `step` on; returns the next step.
async fn report_for(driver: &Driver, mut step: u32, speed: f32, period: Duration) -> u32 {
    let until = tokio::time::Instant::now() + period;
    while tokio::time::Instant::now() < until {
        driver.report_location(at(step, speed)).unwrap();
        step += 1;
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    step
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_rate_follows_the_vehicle_within_the_apps_bounds() {
    let node = TestNode::start(None).await;
    let policy = ReportingPolicy {
        min_interval_ms: 100,
        max_interval_ms: 1_000,
        distance_m: 10.0,
        keep_track: false,
    };
    let (driver, _) = connect(&node, "adaptive", config(&node), policy);
    let window = Duration::from_secs(3);
    let mut counts = Vec::new();
    let mut step = 0;
    for (what, speed, status) in [
        ("parked", 0.0, VehicleStatus::Available),
        ("moving at 25 m/s", 25.0, VehicleStatus::Available),
        ("on a trip, crawling", 1.0, VehicleStatus::OnTrip),
    ] {
        driver.set_status(status).unwrap();
        let before = accepted(&node).await;
        step = report_for(&driver, step, speed, window).await;
        // What the SDK sent by now, all taken.
        let sent = driver.stats().fixes_sent;
        eventually(WAIT, "every fix sent taken", async || {
            (accepted(&node).await >= sent as f64).then_some(())
        })
        .await;
        let count = accepted(&node).await - before;
        println!("{what}: {count} fixes in {window:?} of 60 locations");
        counts.push(count);
    }
    // Parked: one at once, then one a second at most (the app's bound).
    assert!(counts[0] <= 1.0 + 3.0 + 1.0, "parked: {counts:?}");
    // Moving: one per 10 m, 400 ms apart; on a trip: the fastest, 100 ms.
    assert!(counts[0] < counts[1] && counts[1] < counts[2], "{counts:?}");
    assert!(
        counts[2] <= 31.0,
        "never faster than the app's bound: {counts:?}"
    );
    driver.close();
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_paused_driver_sends_nothing_and_resumes_with_one_fresh_fix_at_once() {
    let node = TestNode::start_with(None, |c| {
        c.ingest.offline_grace = Duration::from_millis(300);
    })
    .await;
    let policy = ReportingPolicy {
        min_interval_ms: 100,
        max_interval_ms: 5_000,
        ..reporting_policy()
    };
    let (driver, states) = connect(&node, "pauser", config(&node), policy);
    driver.set_status(VehicleStatus::OnTrip).unwrap();
    let step = report_for(&driver, 0, 10.0, Duration::from_millis(500)).await;
    eventually(WAIT, "the driver on the node", async || {
        lon_on_node(&node, "pauser").await
    })
    .await;

    // Keeping the connection: the OS still gives locations, none is sent.
    driver.pause(PauseMode::KeepConnection).unwrap();
    let sent = driver.stats().fixes_sent;
    eventually(WAIT, "what was sent before the pause taken", async || {
        (accepted(&node).await >= sent as f64).then_some(())
    })
    .await;
    let before = accepted(&node).await;
    let step = report_for(&driver, step, 10.0, Duration::from_millis(800)).await;
    assert_eq!(accepted(&node).await, before, "nothing sent while paused");
    assert_eq!(driver.stats().fixes_sent, sent);

    // Resume: the latest location goes out at once, alone.
    driver.resume().unwrap();
    let latest = at(step - 1, 10.0).lon;
    eventually(WAIT, "the latest location on the node", async || {
        let lon = lon_on_node(&node, "pauser").await?;
        ((lon - latest).abs() < 1e-7).then_some(())
    })
    .await;
    assert_eq!(accepted(&node).await, before + 1.0, "one fresh fix");

    // Disconnecting: the node sees the session end and, after its grace,
    // the vehicle go offline; resuming connects and shows it again.
    driver.pause(PauseMode::Disconnect).unwrap();
    eventually(WAIT, "the vehicle gone offline", async || {
        lon_on_node(&node, "pauser").await.is_none().then_some(())
    })
    .await;
    let step = report_for(&driver, step, 10.0, Duration::from_millis(200)).await;
    driver.resume().unwrap();
    let latest = at(step - 1, 10.0).lon;
    eventually(
        WAIT,
        "back on the node at its latest location",
        async || {
            let lon = lon_on_node(&node, "pauser").await?;
            ((lon - latest).abs() < 1e-7).then_some(())
        },
    )
    .await;
    assert!(states.saw(|s| matches!(s, ConnectionState::Paused)));
    assert_eq!(driver.stats().reconnects, 0, "a pause is not a loss");
    driver.close();
    node.stop().await;
}

/// A driver on QUIC only, that notices a lost connection within half a
/// second, through a tunnel: `(accepted while in it, last longitude)`.
async fn through_a_tunnel(keep_track: bool) -> (f64, f64, f64) {
    let node = TestNode::start(None).await;
    let mut config = config(&node);
    config.transport = TransportChoice::QuicOnly;
    config.keep_alive_ms = 100;
    config.idle_timeout_ms = 500;
    let policy = ReportingPolicy {
        min_interval_ms: 100,
        max_interval_ms: 5_000,
        distance_m: 30.0,
        keep_track,
    };
    let id = if keep_track { "tracked" } else { "latest" };
    let (driver, states) = connect(&node, id, config, policy);
    driver.set_status(VehicleStatus::OnTrip).unwrap();
    driver.report_location(at(0, 10.0)).unwrap();
    eventually(WAIT, "the first fix on the node", async || {
        lon_on_node(&node, id).await
    })
    .await;
    let before = accepted(&node).await;

    driver.simulate_signal_loss(true);
    eventually(WAIT, "the loss noticed", async || {
        states
            .saw(|s| matches!(s, ConnectionState::Reconnecting { .. }))
            .then_some(())
    })
    .await;
    // Five locations in the tunnel, 300 ms apart.
    for step in 1..=5 {
        driver.report_location(at(step * 3, 10.0)).unwrap();
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    assert_eq!(accepted(&node).await, before, "nothing arrives in a tunnel");
    driver.simulate_signal_loss(false);
    let last = at(15, 10.0).lon;
    eventually(WAIT, "the last location on the node", async || {
        let lon = lon_on_node(&node, id).await?;
        ((lon - last).abs() < 1e-7).then_some(())
    })
    .await;
    let after = accepted(&node).await - before;
    let rejected = node
        .metric("hexfleet_fixes_rejected_total{reason=\"stale_seq\"}")
        .await;
    driver.close();
    node.stop().await;
    (after, last, rejected)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_a_signal_loss_only_the_latest_location_is_sent() {
    let (accepted, _, rejected) = through_a_tunnel(false).await;
    assert_eq!(accepted, 1.0, "only the latest");
    assert_eq!(rejected, 0.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_a_signal_loss_the_whole_track_is_sent_when_the_app_asks() {
    let (accepted, _, rejected) = through_a_tunnel(true).await;
    assert_eq!(accepted, 5.0, "every location of the tunnel, in order");
    assert_eq!(rejected, 0.0);
}
