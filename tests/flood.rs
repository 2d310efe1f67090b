//! One connection flooding requests costs everyone else nothing: a rider
//! sending 20,000 `Subscribe`s, a driver asking 20,000 times for an
//! acknowledgement and a dashboard sending 20,000 viewports, at once, while
//! an honest rider watches a moving vehicle. The flooders are
//! refused, then cut off with `rate_limited`; the honest rider's deltas stay
//! prompt and the node's memory stays put.
//!
//! Alone in its test binary, so the process's memory is this test's own.

use std::time::Duration;

use futures_util::SinkExt;
use hexfleet_client::FixInput;
use hexfleet_protocol::{dashboard::close, ClientMsg, ErrorCode, Filter, Hello, Role, Subscribe};
use hexfleet_tests::{dashboard::DashboardSocket, *};
use serde_json::json;

const WAIT: Duration = Duration::from_secs(20);
const FLOOD: usize = 20_000;
const MADRID: (f64, f64) = (40.4168, -3.7038);

/// Resident memory of this process (the embedded node and the clients).
fn rss_bytes() -> u64 {
    let statm = std::fs::read_to_string("/proc/self/statm").expect("/proc/self/statm");
    let pages: u64 = statm
        .split_whitespace()
        .nth(1)
        .and_then(|p| p.parse().ok())
        .expect("resident pages");
    pages * 4096
}

/// Where the flooders connect, from their own runtime.
struct Target {
    http_addr: std::net::SocketAddr,
    quic_addr: std::net::SocketAddr,
    cert: std::path::PathBuf,
}

/// A client of `role` that sends `FLOOD` of what `request` makes as fast as
/// QUIC takes them; returns how its connection was closed.
async fn quic_flood(
    node: &Target,
    role: Role,
    request: impl Fn(usize) -> ClientMsg,
) -> Option<ErrorCode> {
    let (conn, mut tx, _rx) = raw_connection_to(node.quic_addr, &node.cert, 1 << 20).await;
    tx.send(ClientMsg::Hello(Hello {
        version: 1,
        role,
        token: token(role, "flooder"),
        unreachable: Vec::new(),
    }))
    .await
    .unwrap();
    for i in 0..FLOOD {
        if tx.send(request(i)).await.is_err() {
            break;
        }
    }
    match tokio::time::timeout(WAIT, conn.closed()).await {
        Ok(quinn::ConnectionError::ApplicationClosed(c)) => {
            ErrorCode::from_close_code(c.error_code.into_inner())
        }
        _ => None,
    }
}

/// A rider that sends `FLOOD` subscriptions.
async fn rider_flood(node: &Target) -> Option<ErrorCode> {
    quic_flood(node, Role::Rider, |i| {
        ClientMsg::Subscribe(Subscribe {
            id: i as u32,
            lat: MADRID.0 + (i % 100) as f64 * 1e-4,
            lon: MADRID.1,
            radius_m: 5_000.0,
            filter: Filter::any(),
        })
    })
    .await
}

/// A driver that asks `FLOOD` times for an acknowledgement.
async fn ack_flood(node: &Target) -> Option<ErrorCode> {
    quic_flood(node, Role::Driver, |_| ClientMsg::AckNow).await
}

/// A dashboard that sends `FLOOD` wide viewports; returns its close code.
async fn dashboard_flood(node: &Target) -> u16 {
    let query = format!("token={}", token(Role::Dashboard, "flooder"));
    let mut socket = DashboardSocket::connect_to(node.http_addr, &query)
        .await
        .unwrap();
    for i in 0..FLOOD {
        let d = 0.01 + (i % 100) as f64 * 1e-4;
        let viewport = json!({
            "type": "viewport",
            "id": i,
            "bbox": { "south": MADRID.0 - d, "west": MADRID.1 - d, "north": MADRID.0 + d, "east": MADRID.1 + d },
            "zoom": 14,
        });
        if let Some(code) = socket.closed_already() {
            return code;
        }
        if socket.try_send(viewport).await.is_err() {
            break;
        }
    }
    socket.closed().await.0
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_connection_flooding_requests_costs_everyone_else_nothing() {
    let node = TestNode::start(None).await;
    let clock = FixClock::default();
    let honest = node.timing_rider("honest", MADRID, 1_000.0, &clock).await;
    let mut driver = node.driver("moving", available()).await;
    let rss_before = rss_bytes();

    // The flooders run on a runtime of their own, as remote clients would:
    // a client that never yields must not starve the node's runtime in a
    // way no real client could.
    let floods = {
        let (http_addr, quic_addr, cert) = (node.node.http_addr, node.node.quic_addr, node.cert());
        std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            runtime.block_on(async move {
                let target = Target {
                    http_addr,
                    quic_addr,
                    cert,
                };
                tokio::join!(
                    rider_flood(&target),
                    ack_flood(&target),
                    dashboard_flood(&target)
                )
            })
        })
    };
    for i in 0..150 {
        let lat = MADRID.0 + 1e-4 + i as f64 * 1e-6;
        clock.sent(lat, i);
        driver.send_fix(FixInput::at(lat, MADRID.1)).await.unwrap();
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let (rider_closed, driver_closed, dashboard_closed) = floods.join().unwrap();

    assert_eq!(rider_closed, Some(ErrorCode::RateLimited));
    assert_eq!(driver_closed, Some(ErrorCode::RateLimited));
    assert_eq!(dashboard_closed, close::RATE_LIMITED);
    let grown = rss_bytes().saturating_sub(rss_before);
    let delays = clock.sorted();
    assert!(delays.len() >= 100, "{} deltas seen", delays.len());
    let p99 = delays[delays.len() * 99 / 100];
    println!(
        "honest rider: {} deltas, p50 {} ms, p99 {p99} ms, max {} ms; node process grew {} KiB",
        delays.len(),
        delays[delays.len() / 2],
        delays[delays.len() - 1],
        grown / 1024
    );
    assert!(p99 <= 50, "p99 {p99} ms");
    assert!(grown < 48 << 20, "memory grew {} MiB", grown >> 20);
    assert!(honest.closed_by_node().is_none());
    for role in ["rider", "driver", "dashboard"] {
        let series = format!("hexfleet_requests_rate_limited_total{{role=\"{role}\"}}");
        assert!(node.metric(&series).await > 0.0, "{series}");
    }
    assert_eq!(
        node.metric("hexfleet_sessions_refused_total{code=\"rate_limited\"}")
            .await,
        2.0
    );
    assert_eq!(
        node.metric("hexfleet_dashboard_errors_total{reason=\"rate_limited\"}")
            .await,
        1.0
    );
    node.stop().await;
}
