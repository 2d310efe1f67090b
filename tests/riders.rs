//! Riders over real QUIC: snapshots, the right delta for the right rider,
//! slow consumers, bad input, reconnects, and a model-based check that every
//! rider's view ends equal to the truth.

use std::{collections::HashMap, time::Duration};

use futures_util::{SinkExt, StreamExt};
use h3o::{CellIndex, LatLng, Resolution};
use hexfleet_client::{
    ClientError, DriverClient, Event, FixInput, RiderClient, RiderOptions, Subscription, Transport,
};
use hexfleet_model::{CellModel, Position, VehicleClass, VehicleId, VehicleStatus};
use hexfleet_node::config::Config;
use hexfleet_protocol::{
    ClientMsg, DriverReport, ErrorCode, Filter, Hello, RemoveReason, Role, ServerMsg, Subscribe,
};
use hexfleet_tests::*;
use rand::{rngs::StdRng, Rng, SeedableRng};

const WAIT: Duration = Duration::from_secs(10);

fn quick(c: &mut Config) {
    c.store.stale_after = Duration::from_millis(1_500);
    c.store.sweep_interval = Duration::from_millis(100);
    c.ingest.offline_grace = Duration::from_millis(300);
    c.riders.slow_consumer_after = Duration::from_millis(500);
}

async fn rider(node: &TestNode, name: &str) -> RiderClient {
    node.connector()
        .rider(
            node.node.quic_addr,
            &token(Role::Rider, name),
            RiderOptions::default(),
        )
        .await
        .unwrap()
}

async fn driver(node: &TestNode, name: &str, report: DriverReport) -> DriverClient {
    node.driver(name, report).await
}

async fn subscribe(r: &RiderClient, sub: Subscription) {
    let id = r.subscribe(sub);
    r.wait_for(id, WAIT).await.unwrap();
}

fn center(cell: CellIndex) -> (f64, f64) {
    let ll = LatLng::from(cell);
    (ll.lat(), ll.lng())
}

/// Waits until `rider`'s view satisfies `check`.
async fn view_where(
    rider: &RiderClient,
    what: &str,
    check: impl Fn(&HashMap<VehicleId, hexfleet_model::VehicleState>) -> bool,
) {
    eventually(WAIT, what, async || check(&rider.view()).then_some(())).await;
}

#[tokio::test]
async fn a_rider_gets_a_snapshot_then_sees_vehicles_move() {
    let node = TestNode::start(None).await;
    let mut d = driver(&node, "drv-1", available()).await;
    let seq = d.send_fix(FixInput::at(52.52, 13.405)).await.unwrap();
    eventually(WAIT, "fix accepted", async || {
        (d.acked_seq() == seq).then_some(())
    })
    .await;

    let r = rider(&node, "rider-1").await;
    subscribe(&r, Subscription::around(52.52, 13.405, 1_000.0)).await;
    let view = r.view();
    assert_eq!(view.len(), 1);
    assert_eq!(
        view[&VehicleId::new("drv-1").unwrap()].class,
        VehicleClass::Economy
    );
    assert_eq!(r.stats().snapshots, 1);

    d.send_fix(FixInput {
        heading_deg: 90.0,
        speed_mps: 8.0,
        ..FixInput::at(52.5203, 13.405)
    })
    .await
    .unwrap();
    view_where(&r, "the move applied", |v| {
        v.values().any(|s| (s.lat - 52.5203).abs() < 1e-6)
    })
    .await;
    let events = r.take_events();
    assert_eq!(
        events,
        vec![
            Event::Added(VehicleId::new("drv-1").unwrap()),
            Event::Moved(VehicleId::new("drv-1").unwrap())
        ]
    );
    let moved = &r.view()[&VehicleId::new("drv-1").unwrap()];
    assert!((moved.heading_deg - 90.0).abs() < 1.5 && (moved.speed_mps - 8.0).abs() < 0.5);
    node.stop().await;
}

/// Two adjacent index cells A and B, and rider positions whose neighbourhoods
/// contain A only, B only, both, and neither.
struct Crossing {
    a: (f64, f64),
    b: (f64, f64),
    only_a: (f64, f64),
    only_b: (f64, f64),
    both: (f64, f64),
    far: (f64, f64),
}

fn crossing() -> Crossing {
    let a = LatLng::new(48.8566, 2.3522)
        .unwrap()
        .to_cell(Resolution::Nine);
    let ring: Vec<CellIndex> = a
        .grid_disk::<Vec<_>>(1)
        .into_iter()
        .filter(|c| *c != a)
        .collect();
    let b = ring[0];
    let beyond = |from: CellIndex, other: CellIndex| {
        from.grid_disk::<Vec<_>>(1)
            .into_iter()
            .find(|c| c.grid_distance(other).is_ok_and(|d| d == 2))
            .expect("a neighbour two steps from the other cell")
    };
    Crossing {
        a: center(a),
        b: center(b),
        only_a: center(beyond(a, b)),
        only_b: center(beyond(b, a)),
        both: center(a),
        far: (48.90, 2.45),
    }
}

/// The smallest subscription: the rider's cell and its ring.
fn watch(at: (f64, f64)) -> Subscription {
    Subscription {
        filter: Filter::any(),
        ..Subscription::around(at.0, at.1, 1.0)
    }
}

#[tokio::test]
async fn crossing_a_cell_edge_tells_each_rider_what_it_means_for_its_view() {
    let node = TestNode::start_with(None, quick).await;
    let x = crossing();
    let cells = CellModel::default();
    let watched = |at: (f64, f64)| cells.neighbourhood(Position::new(at.0, at.1).unwrap(), 1.0);
    let cell_of = |p: (f64, f64)| cells.locate(Position::new(p.0, p.1).unwrap()).0 .0;
    assert!(
        watched(x.only_a).contains(&cell_of(x.a)) && !watched(x.only_a).contains(&cell_of(x.b))
    );
    assert!(
        watched(x.only_b).contains(&cell_of(x.b)) && !watched(x.only_b).contains(&cell_of(x.a))
    );
    assert!(watched(x.both).contains(&cell_of(x.a)) && watched(x.both).contains(&cell_of(x.b)));

    let mut d = driver(&node, "drv-x", available()).await;
    let t0 = now_ms() - 10_000;
    d.send_fix(FixInput {
        fix_time_ms: Some(t0),
        ..FixInput::at(x.a.0, x.a.1)
    })
    .await
    .unwrap();
    let riders = [
        ("only-a", rider(&node, "only-a").await, x.only_a),
        ("only-b", rider(&node, "only-b").await, x.only_b),
        ("both", rider(&node, "both").await, x.both),
        ("far", rider(&node, "far").await, x.far),
    ];
    for (_, r, at) in &riders {
        subscribe(r, watch(*at)).await;
    }
    let id = VehicleId::new("drv-x").unwrap();
    view_where(&riders[0].1, "only-a sees the vehicle in A", |v| {
        v.contains_key(&id)
    })
    .await;
    for (_, r, _) in &riders {
        r.take_events();
    }

    let seq = d.send_fix(FixInput::at(x.b.0, x.b.1)).await.unwrap();
    eventually(WAIT, "the crossing accepted", async || {
        (d.acked_seq() == seq).then_some(())
    })
    .await;
    view_where(&riders[1].1, "only-b sees the vehicle arrive", |v| {
        v.contains_key(&id)
    })
    .await;
    view_where(&riders[0].1, "only-a sees it leave", |v| {
        !v.contains_key(&id)
    })
    .await;
    view_where(&riders[2].1, "both sees it in B", |v| {
        v.get(&id).is_some_and(|s| (s.lat - x.b.0).abs() < 1e-6)
    })
    .await;
    tokio::time::sleep(Duration::from_millis(200)).await;

    let events: HashMap<&str, Vec<Event>> = riders
        .iter()
        .map(|(n, r, _)| (*n, r.take_events()))
        .collect();
    assert_eq!(
        events["only-a"],
        vec![Event::Removed(id.clone(), RemoveReason::LeftView)]
    );
    assert_eq!(events["only-b"], vec![Event::Added(id.clone())]);
    assert_eq!(events["both"], vec![Event::Moved(id.clone())]);
    assert_eq!(
        events["far"],
        vec![],
        "a rider not watching either cell hears nothing"
    );
    node.stop().await;
}

#[tokio::test]
async fn staleness_sign_off_disconnect_and_filter_changes_are_removals_with_their_reasons() {
    let node = TestNode::start_with(None, quick).await;
    let (lat, lon) = (40.4168, -3.7038);
    let any = rider(&node, "r-any").await;
    let available_only = rider(&node, "r-avail").await;
    subscribe(
        &any,
        Subscription {
            filter: Filter::any(),
            ..Subscription::around(lat, lon, 2_000.0)
        },
    )
    .await;
    subscribe(&available_only, Subscription::around(lat, lon, 2_000.0)).await;

    let mut quiet = driver(&node, "quiet", available()).await;
    let polite = driver(&node, "polite", available()).await;
    let mut vanishing = driver(&node, "vanishing", available()).await;
    let mut busy = driver(&node, "busy", available()).await;
    let mut polite = polite;
    for (d, dlat) in [
        (&mut quiet, 0.0),
        (&mut vanishing, 0.001),
        (&mut busy, 0.002),
    ] {
        d.send_fix(FixInput::at(lat + dlat, lon)).await.unwrap();
    }
    polite
        .send_fix(FixInput::at(lat - 0.001, lon))
        .await
        .unwrap();
    view_where(&any, "all four in view", |v| v.len() == 4).await;
    view_where(&available_only, "all four in view", |v| v.len() == 4).await;
    any.take_events();
    available_only.take_events();

    busy.report(DriverReport {
        class: VehicleClass::Economy,
        status: VehicleStatus::OnTrip,
    })
    .await
    .unwrap();
    polite.goodbye().await.unwrap();
    vanishing.abandon();
    // `quiet` simply stops sending and goes stale; `busy` keeps reporting.
    let keep_busy = async {
        for i in 0..30 {
            busy.send_fix(FixInput::at(lat + 0.002 + i as f64 * 1e-6, lon))
                .await
                .unwrap();
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    };
    keep_busy.await;
    let id = |s: &str| VehicleId::new(s).unwrap();
    let removals = |events: Vec<Event>| -> HashMap<VehicleId, RemoveReason> {
        events
            .into_iter()
            .filter_map(|e| match e {
                Event::Removed(id, r) => Some((id, r)),
                _ => None,
            })
            .collect()
    };
    let seen_by_any = removals(any.take_events());
    assert_eq!(seen_by_any.get(&id("quiet")), Some(&RemoveReason::Stale));
    assert_eq!(seen_by_any.get(&id("polite")), Some(&RemoveReason::Offline));
    assert_eq!(
        seen_by_any.get(&id("vanishing")),
        Some(&RemoveReason::Offline)
    );
    assert_eq!(
        seen_by_any.get(&id("busy")),
        None,
        "an on-trip vehicle still matches `any`"
    );
    assert_eq!(any.view()[&id("busy")].status, VehicleStatus::OnTrip);

    let seen_by_available = removals(available_only.take_events());
    assert_eq!(
        seen_by_available.get(&id("busy")),
        Some(&RemoveReason::Filtered)
    );
    assert_eq!(seen_by_available.len(), 4);
    assert!(available_only.view().is_empty());
    node.stop().await;
}

#[tokio::test]
async fn moving_the_subscription_sends_only_the_difference() {
    let node = TestNode::start(None).await;
    let mut near = driver(&node, "near", available()).await;
    let mut between = driver(&node, "between", available()).await;
    let mut far = driver(&node, "far", available()).await;
    near.send_fix(FixInput::at(51.50, -0.12)).await.unwrap();
    between.send_fix(FixInput::at(51.50, -0.105)).await.unwrap();
    far.send_fix(FixInput::at(51.50, -0.09)).await.unwrap();
    let r = rider(&node, "walker").await;
    subscribe(&r, Subscription::around(51.50, -0.12, 1_300.0)).await;
    view_where(&r, "near and between", |v| v.len() == 2).await;
    r.take_events();
    let frames_before = r.stats().frames;

    subscribe(&r, Subscription::around(51.50, -0.09, 1_300.0)).await;
    view_where(&r, "between and far", |v| {
        v.len() == 2 && v.contains_key(&VehicleId::new("far").unwrap())
    })
    .await;
    let mut events = r.take_events();
    events.sort_by_key(|e| format!("{e:?}"));
    assert_eq!(
        events,
        vec![
            Event::Added(VehicleId::new("far").unwrap()),
            Event::Removed(VehicleId::new("near").unwrap(), RemoveReason::LeftView)
        ]
    );
    assert_eq!(
        r.stats().snapshots,
        1,
        "a moved subscription is a difference, not a snapshot"
    );
    assert!(r.stats().frames > frames_before);
    node.stop().await;
}

#[tokio::test]
async fn a_rider_that_stops_reading_is_cut_off_without_slowing_anyone_else() {
    let node = TestNode::start_with(None, quick).await;
    let (lat, lon) = (35.68, 139.76);
    let mut drivers = Vec::new();
    for i in 0..40 {
        drivers.push(driver(&node, &format!("d{i}"), available()).await);
    }
    let reader = rider(&node, "reader").await;
    subscribe(&reader, Subscription::around(lat, lon, 3_000.0)).await;

    // A rider that subscribes and then never reads its updates.
    let (conn, mut tx, mut rx) = raw_connection(&node, 2_048).await;
    tx.send(ClientMsg::Hello(Hello {
        version: 1,
        role: Role::Rider,
        token: token(Role::Rider, "sleeper"),
        unreachable: Vec::new(),
    }))
    .await
    .unwrap();
    assert!(matches!(rx.next().await, Some(Ok(ServerMsg::Welcome(_)))));
    let sub = Subscribe {
        id: 1,
        lat,
        lon,
        radius_m: 3_000.0,
        filter: Filter::default(),
    };
    tx.send(ClientMsg::Subscribe(sub)).await.unwrap();
    let _unread = conn.accept_uni().await.unwrap();

    let mut rng = StdRng::seed_from_u64(9);
    let mut last = Vec::new();
    let started = tokio::time::Instant::now();
    while started.elapsed() < Duration::from_secs(3) {
        last.clear();
        for d in &mut drivers {
            last.push(
                d.send_fix(FixInput::at(lat + rng.random_range(-0.0002..0.0002), lon))
                    .await
                    .unwrap(),
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let closed = tokio::time::timeout(WAIT, conn.closed())
        .await
        .expect("the sleeper is disconnected");
    match closed {
        quinn::ConnectionError::ApplicationClosed(c) => {
            assert_eq!(
                ErrorCode::from_close_code(c.error_code.into_inner()),
                Some(ErrorCode::SlowConsumer)
            );
        }
        other => panic!("unexpected close: {other}"),
    }
    assert_eq!(
        node.metric("hexfleet_sessions_refused_total{code=\"slow_consumer\"}")
            .await,
        1.0
    );
    assert!(
        node.metric("hexfleet_mailbox_coalesced_total").await > 0.0,
        "the blocked mailbox coalesced instead of growing"
    );
    // Ingest and the other rider kept going.
    for (d, seq) in drivers.iter().zip(&last) {
        eventually(WAIT, "every fix acknowledged", async || {
            (d.acked_seq() == *seq).then_some(())
        })
        .await;
    }
    view_where(&reader, "the reading rider sees all 40", |v| v.len() == 40).await;
    assert!(reader.closed_by_node().is_none());
    node.stop().await;
}

#[tokio::test]
async fn bad_rider_input_gets_a_clear_error_and_harms_no_one() {
    let node = TestNode::start(None).await;
    let mut d = driver(&node, "d", available()).await;
    d.send_fix(FixInput::at(-23.55, -46.63)).await.unwrap();
    let good = rider(&node, "good").await;
    subscribe(&good, Subscription::around(-23.55, -46.63, 500.0)).await;

    let bad = rider(&node, "bad").await;
    let nan = bad.subscribe(Subscription::around(f64::NAN, -46.63, 500.0));
    let huge = bad.subscribe(Subscription::around(-23.55, -46.63, 1e7));
    let negative = bad.subscribe(Subscription::around(-23.55, -46.63, -5.0));
    eventually(WAIT, "three refusals", async || {
        (bad.refused().len() == 3).then_some(())
    })
    .await;
    let refused: HashMap<u32, String> = bad
        .refused()
        .into_iter()
        .map(|e| {
            assert_eq!(e.code, ErrorCode::BadRequest);
            (e.id, e.reason)
        })
        .collect();
    assert!(refused[&nan].contains("latitude"), "{}", refused[&nan]);
    assert!(refused[&huge].contains("radius_m"), "{}", refused[&huge]);
    assert!(refused[&negative].contains("radius_m"));
    // The connection stays usable.
    subscribe(&bad, Subscription::around(-23.55, -46.63, 500.0)).await;
    assert_eq!(bad.view().len(), 1);

    // A driver's token does not make a rider.
    let as_rider = node
        .connector()
        .rider(
            node.node.quic_addr,
            &driver_token("d"),
            RiderOptions::default(),
        )
        .await;
    assert!(matches!(
        as_rider,
        Err(ClientError::Refused {
            code: ErrorCode::Unauthorized,
            ..
        })
    ));

    // Garbage on a rider's control stream closes that connection only.
    let (conn, mut tx, mut rx) = raw_connection(&node, 1 << 20).await;
    tx.send(ClientMsg::Hello(Hello {
        version: 1,
        role: Role::Rider,
        token: token(Role::Rider, "g"),
        unreachable: Vec::new(),
    }))
    .await
    .unwrap();
    assert!(matches!(rx.next().await, Some(Ok(ServerMsg::Welcome(_)))));
    tx.get_mut()
        .write_all(&[0, 0, 0, 3, 1, 0xc1, 0xc1])
        .await
        .unwrap();
    match tokio::time::timeout(WAIT, conn.closed()).await.unwrap() {
        quinn::ConnectionError::ApplicationClosed(c) => {
            assert_eq!(
                ErrorCode::from_close_code(c.error_code.into_inner()),
                Some(ErrorCode::ProtocolViolation)
            );
        }
        other => panic!("unexpected close: {other}"),
    }
    // A rider may not send fixes.
    let (conn, mut tx, mut rx) = raw_connection(&node, 1 << 20).await;
    tx.send(ClientMsg::Hello(Hello {
        version: 1,
        role: Role::Rider,
        token: token(Role::Rider, "h"),
        unreachable: Vec::new(),
    }))
    .await
    .unwrap();
    assert!(matches!(rx.next().await, Some(Ok(ServerMsg::Welcome(_)))));
    tx.send(ClientMsg::Goodbye).await.unwrap();
    let _ = tokio::time::timeout(WAIT, conn.closed()).await.unwrap();

    let seq = d.send_fix(FixInput::at(-23.5501, -46.63)).await.unwrap();
    eventually(WAIT, "the driver unaffected", async || {
        (d.acked_seq() == seq).then_some(())
    })
    .await;
    view_where(&good, "the good rider unaffected", |v| {
        v.values().any(|s| (s.lat + 23.5501).abs() < 1e-6)
    })
    .await;
    assert!(good.closed_by_node().is_none());
    node.stop().await;
}

#[tokio::test]
async fn a_rider_that_reconnects_keeps_no_ghosts() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_udp_port();
    let at_port = move |c: &mut Config| c.quic.listen = ([127, 0, 0, 1], port).into();
    let first = TestNode::start_in(dir.path(), None, at_port).await;
    let mut staying = driver(&first, "staying", available()).await;
    let mut leaving = driver(&first, "leaving", available()).await;
    staying.send_fix(FixInput::at(41.9, 12.5)).await.unwrap();
    leaving.send_fix(FixInput::at(41.9005, 12.5)).await.unwrap();
    let r = first
        .connector()
        .rider(
            first.node.quic_addr,
            &token(Role::Rider, "r"),
            RiderOptions {
                reconnect: true,
                ..Default::default()
            },
        )
        .await
        .unwrap();
    subscribe(&r, Subscription::around(41.9, 12.5, 1_000.0)).await;
    view_where(&r, "both vehicles", |v| v.len() == 2).await;

    // The node goes away; a new one (empty memory store) takes its place,
    // and only one driver comes back.
    drop((staying, leaving));
    first.stop().await;
    let second = TestNode::start_in(dir.path(), None, at_port).await;
    let mut back = driver(&second, "staying", available()).await;
    back.send_fix(FixInput::at(41.9001, 12.5)).await.unwrap();
    view_where(&r, "only the vehicle that came back", |v| {
        v.len() == 1
            && v.get(&VehicleId::new("staying").unwrap())
                .is_some_and(|s| (s.lat - 41.9001).abs() < 1e-6)
    })
    .await;
    assert!(r.stats().reconnects >= 1);
    assert!(r.stats().snapshots >= 2);
    second.stop().await;
}

// ---- model-based ---------------------------------------------------------

struct SimDriver {
    name: String,
    client: Option<DriverClient>,
    pos: (f64, f64),
    report: DriverReport,
    /// Still sending fixes (a connected driver that is not sending goes stale).
    active: bool,
}

struct SimRider {
    client: RiderClient,
    sub: Subscription,
}

fn random_sub(rng: &mut StdRng, origin: (f64, f64)) -> Subscription {
    let filter = match rng.random_range(0..3) {
        0 => Filter::any(),
        1 => Filter::default(),
        _ => Filter {
            classes: vec![VehicleClass::Economy, VehicleClass::Xl],
            statuses: vec![],
        },
    };
    Subscription {
        lat: origin.0 + rng.random_range(-0.006..0.006),
        lon: origin.1 + rng.random_range(-0.009..0.009),
        radius_m: rng.random_range(200.0..1_200.0),
        filter,
    }
}

fn random_report(rng: &mut StdRng) -> DriverReport {
    DriverReport {
        class: VehicleClass::ALL[rng.random_range(0..VehicleClass::ALL.len())],
        status: VehicleStatus::ALL[rng.random_range(0..VehicleStatus::ALL.len())],
    }
}

/// How the model's clients reach the node.
#[derive(Clone, Copy, PartialEq)]
enum Via {
    Quic,
    /// From a network that drops UDP: QUIC never connects, and the clients
    /// fall back to WebSocket on the node's HTTPS port.
    UdpBlocked,
}

async fn model_based(redis: Option<&RedisServer>, seed: u64, via: Via) {
    let node = TestNode::start_with(redis, |c| {
        quick(c);
        // The fallback goes to the HTTPS port, as in production.
        c.http.tls = via == Via::UdpBlocked;
    })
    .await;
    let connector = node.connector();
    if via == Via::UdpBlocked {
        connector.simulate_udp_blocked(true);
        connector.set_https_address(node.node.quic_addr, node.node.http_addr);
    }
    let transport = match via {
        Via::Quic => Transport::Quic,
        Via::UdpBlocked => Transport::WebSocket,
    };
    let driver = async |name: &str, report: DriverReport| {
        let client = connector
            .driver(node.node.quic_addr, &driver_token(name), report)
            .await
            .expect("the driver connects");
        assert_eq!(client.transport(), transport);
        client
    };
    let rider = async |name: &str| {
        let client = connector
            .rider(
                node.node.quic_addr,
                &token(Role::Rider, name),
                RiderOptions::default(),
            )
            .await
            .expect("the rider connects");
        assert_eq!(client.transport(), Some(transport));
        client
    };
    let origin = (59.33, 18.06);
    let mut rng = StdRng::seed_from_u64(seed);
    let mut drivers = Vec::new();
    for i in 0..16 {
        let report = random_report(&mut rng);
        let name = format!("m{i}");
        let client = driver(&name, report).await;
        let pos = (
            origin.0 + rng.random_range(-0.008..0.008),
            origin.1 + rng.random_range(-0.012..0.012),
        );
        drivers.push(SimDriver {
            name,
            client: Some(client),
            pos,
            report,
            active: true,
        });
    }
    let mut riders = Vec::new();
    for i in 0..6 {
        let client = rider(&format!("mr{i}")).await;
        let sub = random_sub(&mut rng, origin);
        client.subscribe(sub.clone());
        riders.push(SimRider { client, sub });
    }

    for _round in 0..40 {
        for d in &mut drivers {
            let roll: f64 = rng.random();
            match (&mut d.client, d.active) {
                (Some(client), true) if roll < 0.75 => {
                    // Up to 35 m per step: within the jitter allowance.
                    d.pos.0 += rng.random_range(-0.0003..0.0003);
                    d.pos.1 += rng.random_range(-0.0003..0.0003);
                    client
                        .send_fix(FixInput::at(d.pos.0, d.pos.1))
                        .await
                        .unwrap();
                }
                (Some(client), true) if roll < 0.82 => {
                    d.report = random_report(&mut rng);
                    client.report(d.report).await.unwrap();
                }
                (Some(_), true) if roll < 0.85 => {
                    if let Some(c) = d.client.take() {
                        c.abandon();
                    }
                }
                (Some(_), true) if roll < 0.88 => d.active = false,
                (Some(client), false) if roll < 0.15 => {
                    d.active = true;
                    client
                        .send_fix(FixInput::at(d.pos.0, d.pos.1))
                        .await
                        .unwrap();
                }
                (None, _) if roll < 0.15 => {
                    let mut client = driver(&d.name, d.report).await;
                    client
                        .send_fix(FixInput::at(d.pos.0, d.pos.1))
                        .await
                        .unwrap();
                    d.client = Some(client);
                    d.active = true;
                }
                _ => {}
            }
        }
        for r in &mut riders {
            let roll: f64 = rng.random();
            if roll < 0.08 {
                r.sub = random_sub(&mut rng, origin);
                r.client.subscribe(r.sub.clone());
            } else if roll < 0.10 {
                // The rider's app restarts.
                let name = format!("mr-re{}", rng.random::<u32>());
                let fresh = rider(&name).await;
                fresh.subscribe(r.sub.clone());
                r.client = fresh;
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // Settle: active drivers keep reporting where they are; everything else
    // goes stale or offline.
    for _ in 0..12 {
        for d in drivers.iter_mut().filter(|d| d.active) {
            if let Some(client) = &mut d.client {
                client
                    .send_fix(FixInput::at(d.pos.0, d.pos.1))
                    .await
                    .unwrap();
            }
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }

    let cells = CellModel::default();
    let live: Vec<&SimDriver> = drivers
        .iter()
        .filter(|d| d.active && d.client.is_some())
        .collect();
    for (i, r) in riders.iter().enumerate() {
        let watched =
            cells.neighbourhood(Position::new(r.sub.lat, r.sub.lon).unwrap(), r.sub.radius_m);
        let expected: HashMap<String, (f64, f64, DriverReport)> = live
            .iter()
            .filter(|d| {
                watched.contains(&cells.locate(Position::new(d.pos.0, d.pos.1).unwrap()).0 .0)
            })
            .filter(|d| r.sub.filter.matches(d.report.class, d.report.status))
            .map(|d| (d.name.clone(), (d.pos.0, d.pos.1, d.report)))
            .collect();
        let converged = async || {
            let view = r.client.view();
            let same = view.len() == expected.len()
                && expected.iter().all(|(name, (lat, lon, report))| {
                    view.get(&VehicleId::new(name).unwrap()).is_some_and(|s| {
                        (s.lat - lat).abs() < 2e-7
                            && (s.lon - lon).abs() < 2e-7
                            && s.class == report.class
                            && s.status == report.status
                    })
                });
            same.then_some(())
        };
        if tokio::time::timeout(WAIT, async {
            loop {
                if converged().await.is_some() {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
        .await
        .is_err()
        {
            let mut got: Vec<String> = r.client.view().keys().map(|k| k.to_string()).collect();
            got.sort();
            let mut want: Vec<&String> = expected.keys().collect();
            want.sort();
            panic!("rider {i} ({:?}) sees {got:?}, expected {want:?}", r.sub);
        }
    }
    node.stop().await;
}

#[tokio::test]
async fn every_riders_view_ends_equal_to_the_brute_force_answer_in_memory() {
    model_based(None, 21, Via::Quic).await;
}

#[tokio::test]
async fn clients_whose_udp_is_blocked_fall_back_to_websocket_and_every_view_ends_equal_too() {
    model_based(None, 21, Via::UdpBlocked).await;
}

#[tokio::test]
async fn every_riders_view_ends_equal_to_the_brute_force_answer_on_redis() {
    let redis = RedisServer::start();
    model_based(Some(&redis), 22, Via::Quic).await;
}

#[tokio::test]
async fn a_rider_with_five_thousand_vehicles_in_view_moves_away_and_its_view_ends_empty() {
    let redis = RedisServer::start();
    let vienna = (48.2082, 16.3738);
    preload(&redis, &parked_fleet("v", vienna, 5_000, 0.006)).await;
    let node = TestNode::start(Some(&redis)).await;
    let r = rider(&node, "far-traveller").await;
    subscribe(&r, Subscription::around(vienna.0, vienna.1, 2_000.0)).await;
    view_where(&r, "all 5,000 in view", |v| v.len() == 5_000).await;
    r.take_events();

    // 30 km north: every one of them leaves the view at once.
    subscribe(&r, Subscription::around(vienna.0 + 0.27, vienna.1, 2_000.0)).await;
    view_where(&r, "the view exactly empty", |v| v.is_empty()).await;
    let removed = r
        .take_events()
        .into_iter()
        .filter(|e| matches!(e, Event::Removed(_, RemoveReason::LeftView)))
        .count();
    assert_eq!(removed, 5_000);
    assert!(r.closed_by_node().is_none(), "{:?}", r.closed_by_node());
    assert!(!r.is_finished(), "the session stays up");
    assert_eq!(
        node.metric("hexfleet_sessions_refused_total{code=\"internal\"}")
            .await,
        0.0
    );

    // Back again: a snapshot of all of them, then the session still works.
    subscribe(&r, Subscription::around(vienna.0, vienna.1, 2_000.0)).await;
    view_where(&r, "all 5,000 back", |v| v.len() == 5_000).await;
    node.stop().await;
}
