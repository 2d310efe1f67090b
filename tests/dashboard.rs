//! Dashboards over a real WebSocket: viewport snapshots and deltas, panning
//! (only the difference), density mode and back, live filters, bad requests
//! answered without dropping the connection, and tokens.

use std::time::Duration;

use hexfleet_client::{DriverClient, FixInput};
use hexfleet_model::{VehicleClass, VehicleStatus};
use hexfleet_node::config::Config;
use hexfleet_protocol::{
    dashboard::{close, DashboardEvent, ViewMode},
    DriverReport, ErrorCode, RemoveReason, Role,
};
use hexfleet_tests::{dashboard::DashboardSocket, *};
use serde_json::json;

const WAIT: Duration = Duration::from_secs(10);

fn report(class: VehicleClass, status: VehicleStatus) -> DriverReport {
    DriverReport { class, status }
}

/// A driver that has one accepted fix at `(lat, lon)`.
async fn parked(node: &TestNode, id: &str, lat: f64, lon: f64, r: DriverReport) -> DriverClient {
    let mut d = node.driver(id, r).await;
    let seq = d.send_fix(FixInput::at(lat, lon)).await.unwrap();
    eventually(WAIT, "the fix is accepted", async || {
        (d.acked_seq() == seq).then_some(())
    })
    .await;
    d
}

async fn dashboard(node: &TestNode) -> DashboardSocket {
    let query = format!("token={}", token(Role::Dashboard, "dispatch-1"));
    let mut socket = DashboardSocket::connect(node, &query).await.unwrap();
    let hello = socket.next().await;
    assert!(matches!(hello, DashboardEvent::Hello(_)), "{hello:?}");
    socket
}

fn viewport(id: u32, south: f64, west: f64, north: f64, east: f64) -> serde_json::Value {
    json!({
        "type": "viewport",
        "id": id,
        "bbox": { "south": south, "west": west, "north": north, "east": east },
        "zoom": 15,
    })
}

/// Waits for the vehicle update that reflects subscription `id`.
async fn update_for(
    socket: &mut DashboardSocket,
    id: u32,
) -> hexfleet_protocol::dashboard::VehicleUpdate {
    match socket
        .until(
            "the update for the viewport",
            |e| matches!(e, DashboardEvent::Update(u) if u.subscription == id),
        )
        .await
    {
        DashboardEvent::Update(u) => u,
        _ => unreachable!(),
    }
}

#[tokio::test]
async fn a_viewport_gets_its_vehicles_then_sees_them_move() {
    let node = TestNode::start(None).await;
    let economy = report(VehicleClass::Economy, VehicleStatus::Available);
    let mut a = parked(&node, "veh-a", 52.5200, 13.4000, economy).await;
    let _b = parked(&node, "veh-b", 52.5210, 13.4020, economy).await;
    let _far = parked(&node, "veh-far", 52.6000, 13.6000, economy).await;

    let mut socket = dashboard(&node).await;
    socket.send(viewport(1, 52.51, 13.39, 52.53, 13.41)).await;
    let view = socket
        .until("the view", |e| matches!(e, DashboardEvent::View(_)))
        .await;
    let DashboardEvent::View(view) = view else {
        unreachable!()
    };
    assert_eq!(view.mode, ViewMode::Vehicles);
    assert_eq!(view.resolution, 9);

    let snapshot = update_for(&mut socket, 1).await;
    // Every cell is outlined, once (the view asserts "once").
    assert!(view.cells.iter().all(|c| socket.view.outlined[c] >= 5));
    assert!(snapshot.snapshot);
    let mut ids: Vec<_> = snapshot.added.iter().map(|s| s.id.to_string()).collect();
    ids.sort();
    assert_eq!(ids, ["veh-a", "veh-b"]);

    a.send_fix(FixInput::at(52.5203, 13.4004)).await.unwrap();
    let moved = socket
        .until(
            "veh-a moves",
            |e| matches!(e, DashboardEvent::Update(u) if u.moved.iter().any(|m| m.id == "veh-a")),
        )
        .await;
    let DashboardEvent::Update(moved) = moved else {
        unreachable!()
    };
    assert!(!moved.snapshot);
    let m = moved.moved.iter().find(|m| m.id == "veh-a").unwrap();
    assert!((m.lat - 52.5203).abs() < 1e-9 && (m.lon - 13.4004).abs() < 1e-9);
    node.stop().await;
}

#[tokio::test]
async fn panning_sends_only_the_difference() {
    let node = TestNode::start(None).await;
    let r = report(VehicleClass::Comfort, VehicleStatus::Available);
    let _west = parked(&node, "veh-west", 52.52, 13.380, r).await;
    let _middle = parked(&node, "veh-middle", 52.52, 13.400, r).await;
    let _east = parked(&node, "veh-east", 52.52, 13.420, r).await;

    let mut socket = dashboard(&node).await;
    socket.send(viewport(1, 52.51, 13.37, 52.53, 13.405)).await;
    let first = update_for(&mut socket, 1).await;
    assert_eq!(first.added.len(), 2);
    let mut cells_seen: std::collections::HashSet<String> =
        socket.view.cells.iter().cloned().collect();

    // Pan east: the west vehicle leaves, the east one enters, the middle
    // one is not sent again.
    socket.send(viewport(2, 52.51, 13.395, 52.53, 13.43)).await;
    let diff = update_for(&mut socket, 2).await;
    assert!(!diff.snapshot);
    let removed: Vec<_> = diff
        .removed
        .iter()
        .map(|r| (r.id.as_str(), r.reason))
        .collect();
    assert_eq!(removed, [("veh-west", RemoveReason::LeftView)]);
    let added: Vec<_> = diff.added.iter().map(|s| s.id.to_string()).collect();
    assert_eq!(added, ["veh-east"]);
    assert!(diff.moved.is_empty());
    let mut shown: Vec<_> = socket.view.vehicles.keys().cloned().collect();
    shown.sort();
    assert_eq!(shown, ["veh-east", "veh-middle"]);
    // Cells seen before are not outlined again (the view asserts it); new
    // ones are.
    cells_seen.extend(socket.view.cells.iter().cloned());
    assert_eq!(socket.view.outlined.len(), cells_seen.len());
    node.stop().await;
}

fn few_cells(c: &mut Config) {
    c.dashboard.max_vehicle_cells = 40;
    c.dashboard.density_interval = Duration::from_millis(50);
}

#[tokio::test]
async fn a_wide_viewport_shows_counts_and_zooming_in_shows_vehicles_again() {
    let node = TestNode::start_with(None, few_cells).await;
    let mut drivers = Vec::new();
    for i in 0..6 {
        let status = if i < 4 {
            VehicleStatus::Available
        } else {
            VehicleStatus::OnTrip
        };
        let lat = 52.50 + f64::from(i) * 0.01;
        let d = parked(
            &node,
            &format!("veh-{i}"),
            lat,
            13.40,
            report(VehicleClass::Xl, status),
        )
        .await;
        drivers.push(d);
    }

    let mut socket = dashboard(&node).await;
    socket.send(viewport(1, 52.40, 13.20, 52.70, 13.60)).await;
    socket
        .until_view("counts for all six", |v| {
            v.mode == Some(ViewMode::Density) && v.counted().total() == 6
        })
        .await;
    assert!(socket.view.resolution < 9);
    let counted = socket.view.counted();
    assert_eq!(
        (counted.available, counted.on_trip, counted.off_duty),
        (4, 2, 0)
    );
    assert!(socket.view.vehicles.is_empty());
    assert!(socket
        .view
        .cells
        .iter()
        .all(|c| socket.view.outlined.contains_key(c)));

    // Counts follow the vehicles: one signs off.
    drivers.remove(0).goodbye().await.unwrap();
    socket
        .until_view("five counted", |v| v.counted().total() == 5)
        .await;

    // Zoom in around two vehicles: vehicle mode, with a snapshot.
    socket.send(viewport(2, 52.515, 13.39, 52.525, 13.41)).await;
    let snapshot = update_for(&mut socket, 2).await;
    assert!(snapshot.snapshot);
    assert_eq!(socket.view.mode, Some(ViewMode::Vehicles));
    let mut shown: Vec<_> = socket.view.vehicles.keys().cloned().collect();
    shown.sort();
    assert_eq!(shown, ["veh-2"]);
    assert!(socket.view.counts.is_empty());
    node.stop().await;
}

#[tokio::test]
async fn a_filter_change_removes_and_adds_live_in_both_modes() {
    let node = TestNode::start_with(None, few_cells).await;
    let _free = parked(
        &node,
        "veh-free",
        52.52,
        13.40,
        report(VehicleClass::Economy, VehicleStatus::Available),
    )
    .await;
    let _busy = parked(
        &node,
        "veh-busy",
        52.5205,
        13.4005,
        report(VehicleClass::Premium, VehicleStatus::OnTrip),
    )
    .await;

    let mut socket = dashboard(&node).await;
    socket
        .send(viewport(1, 52.515, 13.395, 52.525, 13.405))
        .await;
    update_for(&mut socket, 1).await;
    assert_eq!(socket.view.vehicles.len(), 2);

    socket
        .send(json!({"type": "filter", "id": 2, "filter": {"statuses": ["available"]}}))
        .await;
    let filtered = update_for(&mut socket, 2).await;
    let removed: Vec<_> = filtered
        .removed
        .iter()
        .map(|r| (r.id.as_str(), r.reason))
        .collect();
    assert_eq!(removed, [("veh-busy", RemoveReason::Filtered)]);

    socket
        .send(json!({"type": "filter", "id": 3, "filter": {"classes": ["premium"]}}))
        .await;
    let swapped = update_for(&mut socket, 3).await;
    assert_eq!(swapped.removed.len(), 1);
    assert_eq!(swapped.added.len(), 1);
    assert_eq!(
        socket.view.vehicles.keys().collect::<Vec<_>>(),
        ["veh-busy"]
    );

    // Density mode honours the filter too.
    socket.send(viewport(4, 52.40, 13.20, 52.70, 13.60)).await;
    socket
        .until_view("one premium counted", |v| {
            v.mode == Some(ViewMode::Density) && v.subscription == 4 && v.counted().total() == 1
        })
        .await;
    socket
        .send(json!({"type": "filter", "id": 5, "filter": {}}))
        .await;
    socket
        .until_view("both counted", |v| {
            v.subscription == 5 && v.counted().total() == 2
        })
        .await;
    node.stop().await;
}

#[tokio::test]
async fn bad_requests_get_an_error_and_the_connection_stays() {
    let node = TestNode::start(None).await;
    let _d = parked(&node, "veh-1", 52.52, 13.40, available()).await;
    let mut socket = dashboard(&node).await;

    let bad: [(&str, &str); 5] = [
        ("{not json", "invalid JSON"),
        (r#"{"type":"teleport"}"#, "unknown variant"),
        (
            r#"{"type":"viewport","id":1,"bbox":{"south":53,"west":13,"north":52,"east":14},"zoom":12}"#,
            "inverted",
        ),
        (
            r#"{"type":"viewport","id":1,"bbox":{"south":52,"west":13,"north":53,"east":14},"zoom":99}"#,
            "zoom",
        ),
        (r#"{"type":"find","id":"no spaces allowed"}"#, "find"),
    ];
    for (request, complaint) in bad {
        socket.send_text(request).await;
        match socket.next().await {
            DashboardEvent::Error(e) => {
                assert_eq!(e.code, ErrorCode::BadRequest);
                assert!(e.reason.contains(complaint), "{request}: {}", e.reason);
            }
            other => panic!("{request}: expected an error, got {other:?}"),
        }
    }
    socket.send_binary(vec![0xc1, 0x00]).await;
    let event = socket.next().await;
    assert!(
        matches!(event, DashboardEvent::Error(ref e) if e.reason.contains("MessagePack")),
        "{event:?}"
    );

    // Still served.
    socket.send(viewport(7, 52.51, 13.39, 52.53, 13.41)).await;
    let snapshot = update_for(&mut socket, 7).await;
    assert_eq!(snapshot.added.len(), 1);
    socket.send(json!({"type": "find", "id": "veh-1"})).await;
    let found = socket
        .until("found", |e| matches!(e, DashboardEvent::Found(_)))
        .await;
    let DashboardEvent::Found(found) = found else {
        unreachable!()
    };
    assert_eq!(found.vehicle.unwrap().id.to_string(), "veh-1");
    socket
        .send(json!({"type": "find", "id": "veh-unknown"}))
        .await;
    let missing = socket
        .until("not found", |e| matches!(e, DashboardEvent::Found(_)))
        .await;
    assert!(matches!(missing, DashboardEvent::Found(ref f) if f.vehicle.is_none()));
    assert!(
        node.metric("hexfleet_dashboard_errors_total{reason=\"bad_request\"}")
            .await
            >= 6.0
    );
    node.stop().await;
}

#[tokio::test]
async fn msgpack_dashboards_get_binary_frames_with_the_same_events() {
    let node = TestNode::start(None).await;
    let _d = parked(&node, "veh-1", 52.52, 13.40, available()).await;
    let query = format!(
        "token={}&format=msgpack",
        token(Role::Dashboard, "dispatch-2")
    );
    let mut socket = DashboardSocket::connect(&node, &query).await.unwrap();
    assert!(matches!(socket.next().await, DashboardEvent::Hello(_)));
    // Requests may be MessagePack too.
    let request =
        rmp_serde::to_vec_named(&hexfleet_protocol::dashboard::DashboardRequest::Viewport(
            serde_json::from_value(viewport(1, 52.51, 13.39, 52.53, 13.41)).unwrap(),
        ))
        .unwrap();
    socket.send_binary(request).await;
    let snapshot = update_for(&mut socket, 1).await;
    assert_eq!(snapshot.added[0].id.to_string(), "veh-1");
    node.stop().await;
}

#[tokio::test]
async fn a_socket_without_a_dashboard_token_is_closed_with_unauthorized() {
    let node = TestNode::start(None).await;
    let cases = [
        String::new(),
        "token=eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiJ4In0.forged".to_string(),
        format!("token={}", token(Role::Rider, "rider-1")),
    ];
    for query in cases {
        let mut socket = DashboardSocket::connect(&node, &query).await.unwrap();
        let (code, reason) = socket.closed().await;
        assert_eq!(code, close::UNAUTHORIZED, "{query}");
        assert!(reason.contains("token"), "{query}: {reason}");
    }
    let query = format!("format=xml&token={}", token(Role::Dashboard, "d"));
    match DashboardSocket::connect(&node, &query).await {
        Err(tokio_tungstenite::tungstenite::Error::Http(resp)) => assert_eq!(resp.status(), 400),
        other => panic!("an unknown format must be refused, got {:?}", other.err()),
    }
    assert!(
        node.metric("hexfleet_dashboard_errors_total{reason=\"unauthorized\"}")
            .await
            >= 3.0
    );
    node.stop().await;
}

#[tokio::test]
async fn a_dashboard_that_stops_reading_is_cut_off_and_others_are_unaffected() {
    let node = TestNode::start_with(None, |c| {
        c.riders.slow_consumer_after = Duration::from_millis(300);
    })
    .await;
    let _d = parked(&node, "veh-1", 52.52, 13.40, available()).await;
    let query = format!("token={}", token(Role::Dashboard, "stalled"));
    let mut stalled = DashboardSocket::connect_small_buffer(&node, &query)
        .await
        .unwrap();
    // Wide viewports, each somewhere new (about 1,500 cells, each outlined:
    // ~350 KB to send per request), never read: the node's writes block.
    let cut_off = async || {
        node.metric("hexfleet_dashboard_errors_total{reason=\"slow_consumer\"}")
            .await
            >= 1.0
    };
    for i in 0..150 {
        let west = -170.0 + f64::from(i) * 2.0;
        let request = viewport(i, 52.45, west, 52.55, west + 0.2);
        if stalled.try_send(request).await.is_err() || (i % 5 == 0 && cut_off().await) {
            break;
        }
    }
    eventually(WAIT, "the stalled dashboard cut off", async || {
        cut_off().await.then_some(())
    })
    .await;
    eventually(WAIT, "its socket released", async || {
        (node.metric("hexfleet_dashboards").await == 0.0).then_some(())
    })
    .await;

    let mut other = dashboard(&node).await;
    other.send(viewport(1, 52.51, 13.39, 52.53, 13.41)).await;
    assert_eq!(update_for(&mut other, 1).await.added.len(), 1);
    node.stop().await;
}

#[tokio::test]
async fn hello_says_where_the_fleet_is_and_which_tiles_to_draw() {
    let node = TestNode::start_with(None, |c| {
        c.dashboard.tile_url = "http://127.0.0.1:9/{z}/{x}/{y}.png".into();
    })
    .await;
    let _a = parked(&node, "veh-a", 52.50, 13.30, available()).await;
    let _b = parked(&node, "veh-b", 52.55, 13.45, available()).await;
    let query = format!("token={}", token(Role::Dashboard, "dispatch-3"));
    let mut socket = DashboardSocket::connect(&node, &query).await.unwrap();
    let DashboardEvent::Hello(hello) = socket.next().await else {
        panic!("hello first");
    };
    assert_eq!(hello.node, "test-node");
    assert_eq!(
        hello.tile_url.as_deref(),
        Some("http://127.0.0.1:9/{z}/{x}/{y}.png")
    );
    let bounds = hello.fleet_bounds.expect("two vehicles have bounds");
    assert_eq!(
        (bounds.south(), bounds.west(), bounds.north(), bounds.east()),
        (52.50, 13.30, 52.55, 13.45)
    );
    assert!((hello.server_time_ms - now_ms()).abs() < 60_000);
    node.stop().await;
}

#[tokio::test]
async fn the_page_and_its_assets_are_served_by_the_node() {
    let node = TestNode::start(None).await;
    for (path, kind, marker) in [
        ("/", "text/html", "rendered-count"),
        ("/app.js", "text/javascript", "/v1/ws"),
        ("/style.css", "text/css", "#panel"),
    ] {
        let resp = node.http.get(node.url(path)).send().await.unwrap();
        assert_eq!(resp.status(), 200, "{path}");
        let content_type = resp.headers()["content-type"].to_str().unwrap().to_string();
        assert!(content_type.starts_with(kind), "{path}: {content_type}");
        assert!(resp.text().await.unwrap().contains(marker), "{path}");
    }
    node.stop().await;
}

#[tokio::test]
async fn a_dashboard_with_five_thousand_vehicles_in_view_pans_away_and_its_view_ends_empty() {
    let redis = RedisServer::start();
    let vienna = (48.2082, 16.3738);
    preload(&redis, &parked_fleet("v", vienna, 5_000, 0.006)).await;
    let node = TestNode::start(Some(&redis)).await;
    let mut socket = dashboard(&node).await;
    let (s, w, n, e) = (
        vienna.0 - 0.01,
        vienna.1 - 0.01,
        vienna.0 + 0.01,
        vienna.1 + 0.01,
    );
    socket.send(viewport(1, s, w, n, e)).await;
    socket
        .until_view("all 5,000 shown", |v| {
            v.subscription == 1 && v.vehicles.len() == 5_000
        })
        .await;
    socket.send(viewport(2, s + 0.27, w, n + 0.27, e)).await;
    socket
        .until_view("the view exactly empty", |v| {
            v.subscription == 2 && v.vehicles.is_empty()
        })
        .await;
    // Still connected: a find is answered.
    socket.send(json!({ "type": "find", "id": "v7" })).await;
    socket
        .until("the find answered", |e| {
            matches!(e, DashboardEvent::Found(_))
        })
        .await;
    node.stop().await;
}
