//! Faults a node meets in production, with real sockets: a phone changing
//! networks mid-session (QUIC connection migration), a lossy path, and
//! every client of a node coming back at once (a reconnect storm after a
//! restart).

use std::{
    sync::{
        atomic::{AtomicBool, AtomicUsize, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use hexfleet_client::{DriverOptions, FixInput, TransportPolicy};
use hexfleet_model::VehicleId;
use hexfleet_tests::*;

const WAIT: Duration = Duration::from_secs(30);
const OSLO: (f64, f64) = (59.9139, 10.7522);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_phone_changing_networks_keeps_its_session_and_its_car_never_leaves_view() {
    let node = TestNode::start(None).await;
    let clock = FixClock::default();
    let rider = Arc::new(node.timing_rider("watcher", OSLO, 1_000.0, &clock).await);

    // The phone's own connector: its socket is what moves.
    let phone = node.connector();
    let mut driver = phone
        .driver(node.node.quic_addr, &driver_token("phone"), available())
        .await
        .unwrap();
    let id = VehicleId::new("phone").unwrap();
    // Watch, every few milliseconds, that the car stays in view once seen.
    let (seen, gaps, done) = (
        Arc::new(AtomicBool::new(false)),
        Arc::new(AtomicUsize::new(0)),
        Arc::new(AtomicBool::new(false)),
    );
    let watch = {
        let (rider, seen, gaps, done, id) = (
            rider.clone(),
            seen.clone(),
            gaps.clone(),
            done.clone(),
            id.clone(),
        );
        tokio::spawn(async move {
            while !done.load(Ordering::Relaxed) {
                let visible = rider.view().contains_key(&id);
                if visible {
                    seen.store(true, Ordering::Relaxed);
                } else if seen.load(Ordering::Relaxed) {
                    gaps.fetch_add(1, Ordering::Relaxed);
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
    };
    let before = phone.local_addrs();
    let (mut last, mut moved_at) = (0, 0);
    for step in 0..100u64 {
        if step == 50 {
            let after = phone.rebind().unwrap();
            assert_ne!(before, after, "the phone's address changed");
            moved_at = step;
        }
        let lat = OSLO.0 + 1e-4 + step as f64 * 1e-6;
        clock.sent(lat, step);
        last = driver.send_fix(FixInput::at(lat, OSLO.1)).await.unwrap();
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    eventually(WAIT, "every fix acknowledged", async || {
        (driver.acked_seq() == last).then_some(())
    })
    .await;
    eventually(WAIT, "the last fix in view", async || {
        clock
            .seen()
            .iter()
            .any(|(step, _)| *step == 99)
            .then_some(())
    })
    .await;
    done.store(true, Ordering::Relaxed);
    watch.await.unwrap();

    assert_eq!(driver.reconnects(), 0, "the driver reconnected");
    assert!(driver.closed_error().is_none());
    assert_eq!(gaps.load(Ordering::Relaxed), 0, "the car left view");
    assert_eq!(
        node.metric("hexfleet_connections_accepted_total").await,
        2.0
    );
    assert_eq!(node.metric("hexfleet_sessions_lost_total").await, 0.0);
    let delays = clock.seen();
    let around: Vec<u128> = delays
        .iter()
        .filter(|(step, _)| step.abs_diff(moved_at) <= 5)
        .map(|(_, d)| *d)
        .collect();
    let worst = delays.iter().map(|(_, d)| *d).max().unwrap_or(0);
    println!(
        "migration: {} of 100 fixes seen by the rider; around the move {around:?} ms; worst {worst} ms",
        delays.len()
    );
    // Moves that coalesce in the rider's mailbox are not seen one by one;
    // most are.
    assert!(delays.len() >= 80, "{} fixes seen", delays.len());
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_a_path_losing_a_third_of_its_packets_a_drivers_fixes_all_arrive_once_it_sees_the_loss()
{
    let node = TestNode::start(None).await;
    let path = hexfleet_testkit::UdpRelay::start().await.unwrap();
    path.set_target(node.node.quic_addr);
    let phone = node.connector();
    let mut driver = phone
        .driver(path.addr(), &driver_token("lossy"), available())
        .await
        .unwrap();
    assert!(driver.uses_datagrams());
    path.set_loss(0.3, 0.3);
    // Datagrams until the connection has lost a packet (keep-alives
    // included), a fix on the control stream from then on: a fix every
    // 100 ms is slower than a retransmission on loopback.
    const FIXES: u64 = 40;
    let mut last = 0;
    for step in 0..FIXES {
        let lat = OSLO.0 + step as f64 * 1e-5;
        last = driver.send_fix(FixInput::at(lat, OSLO.1)).await.unwrap();
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let acked = driver.acknowledged(WAIT).await.unwrap();
    assert_eq!(acked, last, "the last fix arrived");
    let accepted = node.metric("hexfleet_fixes_accepted_total").await as u64;
    let (_, dropped) = path.counts();
    println!("lossy path: {accepted} of {FIXES} fixes accepted, {dropped} datagrams dropped");
    assert!(dropped >= 20, "the path lost packets: {dropped}");
    // At 30 % loss as datagrams alone, about 12 of the 40 would be lost;
    // only those sent before the first loss was detected may be.
    assert!(
        accepted >= FIXES - 4,
        "{accepted} of {FIXES} fixes accepted"
    );
    assert_eq!(driver.stats().rejected_total, 0, "a fix arrived twice");
    assert_eq!(driver.reconnects(), 0);
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reconnect_storm_after_a_restart_is_paced_and_everyone_is_back() {
    const DRIVERS: usize = 1_000;
    let dir = tempfile::tempdir().unwrap();
    let first = TestNode::start_in(dir.path(), None, |_| {}).await;
    let quic = first.node.quic_addr;
    // QUIC's own pacing is measured: a WebSocket raced beside a handshake
    // slowed by the storm (the SDK's default after 500 ms) would make a
    // second connection of the same driver, whichever wins.
    let connector = first.connector().with_transport(TransportPolicy::QuicOnly);
    let options = DriverOptions {
        reconnect: true,
        seeds: vec![quic],
        ..Default::default()
    };
    let mut drivers = Vec::with_capacity(DRIVERS);
    for chunk in 0..DRIVERS / 50 {
        let connecting = (0..50).map(|i| {
            let (connector, options) = (connector.clone(), options.clone());
            async move {
                let id = format!("storm-{}", chunk * 50 + i);
                connector
                    .driver_with(quic, &driver_token(&id), available(), options)
                    .await
                    .unwrap()
            }
        });
        drivers.extend(futures_util::future::join_all(connecting).await);
    }
    let mut rng_lat = 0.0;
    for d in &mut drivers {
        rng_lat += 1e-5;
        d.send_fix(FixInput::at(OSLO.0 + rng_lat, OSLO.1))
            .await
            .unwrap();
    }
    eventually(WAIT, "all connected", async || {
        (first.metric("hexfleet_connections").await == DRIVERS as f64).then_some(())
    })
    .await;

    // The node restarts on the same address; every phone comes back at once.
    first.stop().await;
    let second = TestNode::start_in(dir.path(), None, |c| {
        c.quic.listen = quic;
        c.quic.retry_above_handshakes = 100;
    })
    .await;
    let started = Instant::now();
    let back = drivers.into_iter().enumerate().map(|(i, mut d)| {
        tokio::spawn(async move {
            let lat = OSLO.0 + (i + 1) as f64 * 1e-5 + 1e-4;
            d.send_fix(FixInput::at(lat, OSLO.1)).await.map(|_| d)
        })
    });
    let back = futures_util::future::join_all(back).await;
    let sent = started.elapsed();
    let failed = back.iter().filter(|r| !matches!(r, Ok(Ok(_)))).count();
    assert_eq!(failed, 0, "drivers that did not come back");
    eventually(WAIT, "everyone connected to the new node", async || {
        (second.metric("hexfleet_connections").await == DRIVERS as f64).then_some(())
    })
    .await;
    let took = started.elapsed();
    let retried = second.metric("hexfleet_handshakes_retried_total").await;
    println!(
        "reconnect storm: {DRIVERS} drivers back in {} ms (every first fix sent within {} ms); {retried} handshakes paced with a Retry",
        took.as_millis(),
        sent.as_millis()
    );
    assert_eq!(
        second.metric("hexfleet_connections_accepted_total").await,
        DRIVERS as f64
    );
    second.stop().await;
}

/// One phone of the clocks test: how its clock is off, and who corrects it.
struct Phone {
    id: &'static str,
    /// Device clock minus true time, ms.
    skew_ms: i64,
    /// The SDK reads the device's clock (and corrects it at connect); else
    /// the app stamps fixes itself with the wrong clock, and only the node
    /// can tell.
    sdk_clock: bool,
}

/// Phones' clocks are often off; their vehicles are on the map anyway, from
/// their second fix, with fix times in node time: the SDK measures its
/// offset at connect, and the node works out the offset of a client that
/// does not from its fixes' arrivals. The app is told. A clock that jumps
/// mid-run is followed; a burst of fixes buffered while offline stays as
/// old as it is.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn phones_whose_clocks_are_wrong_are_on_the_map_with_fix_times_in_node_time() {
    let node = TestNode::start(None).await;
    let phones = [
        Phone {
            id: "right",
            skew_ms: 0,
            sdk_clock: false,
        },
        Phone {
            id: "ahead-20s",
            skew_ms: 20_000,
            sdk_clock: false,
        },
        Phone {
            id: "behind-60s",
            skew_ms: -60_000,
            sdk_clock: false,
        },
        Phone {
            id: "ahead-1h",
            skew_ms: 3_600_000,
            sdk_clock: false,
        },
        Phone {
            id: "behind-1d",
            skew_ms: -86_400_000,
            sdk_clock: false,
        },
        Phone {
            id: "sdk-ahead-1h",
            skew_ms: 3_600_000,
            sdk_clock: true,
        },
        Phone {
            id: "sdk-behind-60s",
            skew_ms: -60_000,
            sdk_clock: true,
        },
    ];
    let mut drivers = Vec::new();
    for (i, phone) in phones.iter().enumerate() {
        let options = DriverOptions {
            clock_skew_ms: if phone.sdk_clock { phone.skew_ms } else { 0 },
            ..Default::default()
        };
        let driver = node
            .connector()
            .driver_with(
                node.node.quic_addr,
                &driver_token(phone.id),
                available(),
                options,
            )
            .await
            .expect("the driver connects");
        drivers.push((phone, driver, (OSLO.0 + i as f64 * 0.001, OSLO.1)));
    }
    // A fix a second, each stamped by its phone's clock.
    for step in 0..3 {
        for (phone, driver, at) in &mut drivers {
            let mut fix = FixInput::at(at.0 + step as f64 * 0.0001, at.1);
            if !phone.sdk_clock {
                fix.fix_time_ms = Some(now_ms() + phone.skew_ms);
            }
            driver.send_fix(fix).await.unwrap();
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    for (phone, driver, _) in &mut drivers {
        let acked = driver.acknowledged(Duration::from_secs(5)).await.unwrap();
        assert!(
            acked >= 2,
            "{}: on the map from its second fix, not {acked}: {:?}",
            phone.id,
            driver.stats()
        );
        let (status, state) = node.get_json(&format!("/v1/vehicles/{}", phone.id)).await;
        assert_eq!(status, 200, "{}: {state}", phone.id);
        let fix_time = state["fix_time_ms"].as_i64().unwrap();
        assert!(
            (now_ms() - fix_time).abs() < 3_000,
            "{}: its fix time is in node time: {state}",
            phone.id
        );
        // What the device's clock is off by, as the node and the app see it.
        let offset = state["clock_offset_ms"].as_i64().unwrap_or(0);
        assert!(
            (offset + phone.skew_ms).abs() < 1_000,
            "{}: offset {offset}: {state}",
            phone.id
        );
        assert!(
            (driver.clock_offset_ms() + phone.skew_ms).abs() < 1_000,
            "{}: the app is told {} ms",
            phone.id,
            driver.clock_offset_ms()
        );
    }
    let corrected = node.metric("hexfleet_fixes_time_corrected_total").await;
    assert!(
        corrected >= 8.0,
        "the node corrected the raw phones' fixes: {corrected}"
    );
    let offsets = node
        .metric("hexfleet_device_clock_offset_seconds_count")
        .await;
    assert!(offsets >= 6.0, "each wrong clock counted: {offsets}");

    // A clock set a minute ahead mid-run: refused for a fix, then followed,
    // its fix times still in node time and in order.
    let (_, right, at) = drivers.iter_mut().find(|(p, ..)| p.id == "right").unwrap();
    let before = right.stats().rejected_total;
    let mut times = Vec::new();
    for step in 0..4 {
        let mut fix = FixInput::at(at.0 + 0.0004 + step as f64 * 0.0001, at.1);
        fix.fix_time_ms = Some(now_ms() + 60_000);
        right.send_fix(fix).await.unwrap();
        tokio::time::sleep(Duration::from_secs(1)).await;
        let (_, state) = node.get_json("/v1/vehicles/right").await;
        times.push(state["fix_time_ms"].as_i64().unwrap());
    }
    right.acknowledged(Duration::from_secs(5)).await.unwrap();
    let (_, state) = node.get_json("/v1/vehicles/right").await;
    assert_eq!(state["seq"], 7, "followed after the jump: {state}");
    assert!((now_ms() - state["fix_time_ms"].as_i64().unwrap()).abs() < 3_000);
    assert!(
        times.windows(2).all(|w| w[0] <= w[1]),
        "in order: {times:?}"
    );
    assert!(
        right.stats().rejected_total - before <= 1,
        "{:?}",
        right.stats()
    );

    // Ten fixes buffered while offline, sent at once, then a live one: the
    // old ones are not made live, and nothing is corrected.
    let mut late = node.driver("tunnel", available()).await;
    // On the control stream, so the `AckNow` below comes after them.
    late.use_stream_for_fixes();
    let now = now_ms();
    for i in 0..10 {
        let mut fix = FixInput::at(OSLO.0 - 0.01 + i as f64 * 0.0001, OSLO.1);
        fix.fix_time_ms = Some(now - 20_000 + i * 1_000);
        late.send_fix(fix).await.unwrap();
    }
    let mut live = FixInput::at(OSLO.0 - 0.01 + 0.0011, OSLO.1);
    live.fix_time_ms = Some(now_ms());
    late.send_fix(live).await.unwrap();
    let acked = late.acknowledged(Duration::from_secs(5)).await.unwrap();
    assert_eq!(acked, 11, "{:?}", late.stats());
    let (_, state) = node.get_json("/v1/vehicles/tunnel").await;
    // Only what the SDK measured at connect (a millisecond, here).
    let offset = state["clock_offset_ms"].as_i64().unwrap_or(0);
    assert!(offset.abs() < 100, "{state}");
    assert_eq!(late.stats().node_clock_correction_ms, 0);
    assert!((now_ms() - state["fix_time_ms"].as_i64().unwrap()).abs() < 2_000);
    node.stop().await;
}
