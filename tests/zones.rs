//! Zones against a real node and a real Redis: the API refuses bad zones
//! with reasons, vehicles entering and leaving make exactly one event each
//! in the stream (read as a backend does, with a consumer group), the
//! queue keeps the order of entry, and changing or deleting a zone under
//! its vehicles, signing off or being evicted inside one, says so.

use std::time::Duration;

use hexfleet_client::{DriverClient, FixInput};
use hexfleet_model::{VehicleClass, VehicleStatus};
use hexfleet_node::store::redis::zone_events_in;
use hexfleet_protocol::{
    zone::{ZoneCause, ZoneEvent, ZoneEventKind},
    DriverReport, Role,
};
use hexfleet_tests::*;
use serde_json::{json, Value};

const STREAM: &str = "hexfleet:{zones}:events";
const WAIT: Duration = Duration::from_secs(20);

/// A square zone `half` degrees of latitude around (lat, lon), as GeoJSON.
fn square(lat: f64, lon: f64, half: f64, properties: Value) -> Value {
    let (s, n, w, e) = (lat - half, lat + half, lon - half * 1.6, lon + half * 1.6);
    json!({
        "type": "Feature",
        "properties": properties,
        "geometry": {"type": "Polygon", "coordinates": [[[w, s], [e, s], [e, n], [w, n], [w, s]]]},
    })
}

async fn send(
    node: &TestNode,
    method: reqwest::Method,
    path: &str,
    body: Option<String>,
) -> (u16, Value) {
    let mut request = node
        .http
        .request(method, node.url(path))
        .bearer_auth(token(Role::Dashboard, "operator"));
    if let Some(body) = body {
        request = request.body(body);
    }
    let resp = request.send().await.expect("HTTP request");
    let status = resp.status().as_u16();
    let text = resp.text().await.unwrap_or_default();
    (status, serde_json::from_str(&text).unwrap_or(Value::Null))
}

async fn put_zone(node: &TestNode, id: &str, body: &Value) -> (u16, Value) {
    send(
        node,
        reqwest::Method::PUT,
        &format!("/v1/zones/{id}"),
        Some(body.to_string()),
    )
    .await
}

/// A backend reading the event stream through a consumer group.
struct Backend {
    conn: redis::aio::MultiplexedConnection,
}

impl Backend {
    async fn join(redis: &RedisServer) -> Self {
        let client = redis::Client::open(redis.url()).unwrap();
        let mut conn = client.get_multiplexed_async_connection().await.unwrap();
        let _: () = redis::cmd("XGROUP")
            .arg("CREATE")
            .arg(STREAM)
            .arg("backend")
            .arg("$")
            .arg("MKSTREAM")
            .query_async(&mut conn)
            .await
            .unwrap();
        Self { conn }
    }

    /// The events delivered to this consumer since the last read.
    async fn read(&mut self) -> Vec<ZoneEvent> {
        let reply: redis::Value = redis::cmd("XREADGROUP")
            .arg("GROUP")
            .arg("backend")
            .arg("c1")
            .arg("COUNT")
            .arg(1000)
            .arg("STREAMS")
            .arg(STREAM)
            .arg(">")
            .query_async(&mut self.conn)
            .await
            .unwrap();
        zone_events_in(reply)
    }

    /// Reads until `n` events came (and a little longer, to catch extras).
    async fn expect(&mut self, n: usize) -> Vec<(String, ZoneEventKind, String, ZoneCause)> {
        let mut got = Vec::new();
        let deadline = tokio::time::Instant::now() + WAIT;
        while got.len() < n && tokio::time::Instant::now() < deadline {
            got.extend(self.read().await);
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        // Anything doubled would arrive with the rest.
        tokio::time::sleep(Duration::from_millis(500)).await;
        got.extend(self.read().await);
        // One vehicle's events may sit in two shards' outboxes (it crossed
        // between them), which reach the stream in either order: a backend
        // orders them by time.
        got.sort_by(|a, b| {
            (a.at_ms, &a.vehicle.id, &a.zone).cmp(&(b.at_ms, &b.vehicle.id, &b.zone))
        });
        got.into_iter()
            .map(|e| {
                (
                    e.vehicle.id.to_string(),
                    e.event,
                    e.zone.to_string(),
                    e.cause,
                )
            })
            .collect()
    }
}

async fn fix(driver: &mut DriverClient, at: (f64, f64)) {
    let seq = driver.send_fix(FixInput::at(at.0, at.1)).await.unwrap();
    eventually(WAIT, "the fix is acknowledged", async || {
        (driver.acked_seq() >= seq).then_some(())
    })
    .await;
}

fn report(status: VehicleStatus) -> DriverReport {
    DriverReport {
        class: VehicleClass::Economy,
        status,
    }
}

async fn start(redis: &RedisServer) -> TestNode {
    TestNode::start_with(Some(redis), |c| {
        // Vehicles here jump in and out of zones from one fix to the next.
        c.ingest.max_speed_mps = 1.0e6;
    })
    .await
}

#[tokio::test]
async fn bad_zones_are_refused_with_their_reason_and_good_ones_kept() {
    let redis = RedisServer::start();
    let node = start(&redis).await;
    let good = square(
        52.5,
        13.4,
        0.01,
        json!({"name": "Terminal 1", "kind": "airport"}),
    );
    let bowtie = json!({"type": "Feature", "geometry": {"type": "Polygon", "coordinates": [[[13.0, 52.0], [13.01, 52.01], [13.01, 52.0], [13.0, 52.01], [13.0, 52.0]]]}});
    let open = json!({"type": "Feature", "geometry": {"type": "Polygon", "coordinates": [[[13.0, 52.0], [13.01, 52.0], [13.01, 52.01], [13.0, 52.01]]]}});
    let huge = square(52.5, 13.4, 1.0, json!({}));
    let far = square(89.0, 13.4, 0.01, json!({}));
    let line = json!({"type": "Feature", "geometry": {"type": "LineString", "coordinates": [[13.0, 52.0], [13.1, 52.1]]}});
    for (body, reason) in [
        (bowtie, "invalid geometry"),
        (open, "not closed"),
        (huge, "km²; at most"),
        (far, "out of range"),
        (line, "Polygon or a MultiPolygon"),
        (json!("not geojson"), "not a GeoJSON Feature"),
    ] {
        let (status, answer) = put_zone(&node, "bad", &body).await;
        assert_eq!(status, 400, "{body}: {answer}");
        let error = answer["error"].as_str().unwrap_or_default();
        assert!(error.contains(reason), "{error:?} should say {reason:?}");
    }
    let (status, answer) = put_zone(&node, "bad id!", &good).await;
    assert_eq!(status, 400, "{answer}");
    let (status, answer) = put_zone(&node, "t1", &good).await;
    assert_eq!(status, 201, "{answer}");
    assert_eq!(answer["properties"]["name"], "Terminal 1");
    assert!(
        answer["properties"]["cells"].as_u64().unwrap() > 10,
        "{answer}"
    );
    let (status, _) = put_zone(&node, "t1", &good).await;
    assert_eq!(status, 200, "replaced");
    let (status, list) = node.get_json("/v1/zones").await;
    assert_eq!(status, 200);
    assert_eq!(list["features"].as_array().unwrap().len(), 1, "{list}");
    assert_eq!(list["features"][0]["id"], "t1");
    assert_eq!(list["features"][0]["properties"]["counts"]["total"], 0);
    let (status, _) = send(&node, reqwest::Method::DELETE, "/v1/zones/t1", None).await;
    assert_eq!(status, 204);
    let (status, _) = send(&node, reqwest::Method::DELETE, "/v1/zones/t1", None).await;
    assert_eq!(status, 404);
    assert_eq!(node.get_json("/v1/zones/t1").await.0, 404);
    // A node started later reads the zones the store holds.
    put_zone(&node, "t2", &good).await;
    let other = start(&redis).await;
    eventually(WAIT, "a new node has the stored zones", async || {
        (other.get_json("/v1/zones/t2").await.0 == 200).then_some(())
    })
    .await;
    other.stop().await;
    node.stop().await;
}

#[tokio::test]
async fn entries_and_exits_are_in_the_stream_once_each_and_the_queue_keeps_their_order() {
    let redis = RedisServer::start();
    let node = start(&redis).await;
    let mut backend = Backend::join(&redis).await;
    let airport = (52.36, 13.50);
    let (status, answer) = put_zone(
        &node,
        "ber",
        &square(airport.0, airport.1, 0.005, json!({"kind": "airport"})),
    )
    .await;
    assert_eq!(status, 201, "{answer}");
    // A second zone, over the first, that counts only available cars.
    let (status, _) = put_zone(
        &node,
        "ber-ready",
        &square(
            airport.0,
            airport.1,
            0.003,
            json!({"filter": {"statuses": ["available"]}}),
        ),
    )
    .await;
    assert_eq!(status, 201);
    let outside = (airport.0 + 0.02, airport.1);
    let inside = (airport.0 + 0.004, airport.1);
    let mut a = node.driver("cab-a", report(VehicleStatus::Available)).await;
    let mut b = node.driver("cab-b", report(VehicleStatus::Available)).await;
    fix(&mut a, outside).await;
    fix(&mut b, outside).await;
    fix(&mut a, inside).await; // a enters ber
    fix(&mut b, airport).await; // b enters ber and ber-ready
    fix(&mut a, (inside.0 + 0.0001, inside.1)).await; // a moves inside: nothing
    fix(&mut a, outside).await; // a leaves ber
    fix(&mut a, inside).await; // a comes back: behind b
    let got = backend.expect(5).await;
    let expected = [
        ("cab-a", ZoneEventKind::Entered, "ber", ZoneCause::Moved),
        ("cab-b", ZoneEventKind::Entered, "ber", ZoneCause::Moved),
        (
            "cab-b",
            ZoneEventKind::Entered,
            "ber-ready",
            ZoneCause::Moved,
        ),
        ("cab-a", ZoneEventKind::Exited, "ber", ZoneCause::Moved),
        ("cab-a", ZoneEventKind::Entered, "ber", ZoneCause::Moved),
    ];
    assert_eq!(got, owned(&expected));
    let (_, queue) = node.get_json("/v1/zones/ber/vehicles").await;
    let available: Vec<&str> = queue["vehicles"]["available"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v["id"].as_str().unwrap())
        .collect();
    assert_eq!(available, ["cab-b", "cab-a"], "{queue}");
    assert_eq!(queue["counts"]["available"], 2);
    // b takes a trip: out of the zone that counts only available cars.
    b.report(report(VehicleStatus::OnTrip)).await.unwrap();
    let got = backend.expect(1).await;
    assert_eq!(
        got,
        owned(&[(
            "cab-b",
            ZoneEventKind::Exited,
            "ber-ready",
            ZoneCause::Reported
        )])
    );
    let (_, queue) = node.get_json("/v1/zones/ber/vehicles").await;
    assert_eq!(queue["counts"]["on_trip"], 1, "{queue}");
    assert_eq!(queue["vehicles"]["on_trip"][0]["id"], "cab-b");
    // The zone shrinks away from a (north of the centre), still holding b.
    let (status, _) = put_zone(
        &node,
        "ber",
        &square(
            airport.0 - 0.001,
            airport.1,
            0.0015,
            json!({"kind": "airport"}),
        ),
    )
    .await;
    assert_eq!(status, 200);
    let got = backend.expect(1).await;
    assert_eq!(
        got,
        owned(&[(
            "cab-a",
            ZoneEventKind::Exited,
            "ber",
            ZoneCause::ZoneChanged
        )])
    );
    // b signs off inside; the zone it was in is told.
    b.goodbye().await.unwrap();
    let got = backend.expect(1).await;
    assert_eq!(
        got,
        owned(&[("cab-b", ZoneEventKind::Exited, "ber", ZoneCause::SignedOff)])
    );
    // a drives into the smaller zone, then the zone is deleted under it.
    fix(&mut a, airport).await;
    assert_eq!(
        backend.expect(2).await,
        owned(&[
            ("cab-a", ZoneEventKind::Entered, "ber", ZoneCause::Moved),
            (
                "cab-a",
                ZoneEventKind::Entered,
                "ber-ready",
                ZoneCause::Moved
            ),
        ])
    );
    assert_eq!(
        send(&node, reqwest::Method::DELETE, "/v1/zones/ber-ready", None)
            .await
            .0,
        204
    );
    assert_eq!(
        backend.expect(1).await,
        owned(&[(
            "cab-a",
            ZoneEventKind::Exited,
            "ber-ready",
            ZoneCause::ZoneDeleted
        )])
    );
    let text = node.metrics().await;
    assert!(
        text.contains(r#"hexfleet_zone_events_total{event="entered",cause="moved"} 6"#),
        "{text}"
    );
    // Restarted, the node keeps a's membership: no second entry.
    a.abandon();
    node.stop().await;
    let node = start(&redis).await;
    let mut a = node.driver("cab-a", report(VehicleStatus::Available)).await;
    fix(&mut a, (airport.0 + 0.0001, airport.1)).await;
    assert_eq!(backend.expect(0).await, owned(&[]));
    let (_, queue) = node.get_json("/v1/zones/ber/vehicles").await;
    assert_eq!(queue["counts"]["total"], 1, "{queue}");
    // Not heard from past `stale_after`: evicted, and out of the zone.
    let later = now_ms() + 120_000;
    assert_eq!(node.node.sweep_now(later), 1);
    assert_eq!(
        backend.expect(1).await,
        owned(&[("cab-a", ZoneEventKind::Exited, "ber", ZoneCause::Stale)])
    );
    let (_, queue) = node.get_json("/v1/zones/ber/vehicles").await;
    assert_eq!(queue["counts"]["total"], 0, "{queue}");
    a.abandon();
    node.stop().await;
}

fn owned(
    events: &[(&str, ZoneEventKind, &str, ZoneCause)],
) -> Vec<(String, ZoneEventKind, String, ZoneCause)> {
    events
        .iter()
        .map(|(v, k, z, c)| (v.to_string(), *k, z.to_string(), *c))
        .collect()
}
