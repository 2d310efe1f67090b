//! The hostile-client table: what the worst clients send, over real
//! sockets, one case after another, while an honest driver moves a car in
//! front of an honest rider. Each attack gets a clear error or a drop,
//! counted in the node's metrics, and the honest rider's fix→view delay
//! stays within [`BOUND_MS`] at the 99th percentile during every case.
//!
//! The attackers run on a runtime of their own (another thread), as remote
//! clients would; the table is printed (`--nocapture`) for the record.
//!
//! A dashboard that never reads is in tests/dashboard.rs
//! (`a_dashboard_that_stops_reading_is_cut_off_and_others_are_unaffected`),
//! a rider that never reads in tests/riders.rs, request floods in
//! tests/flood.rs.

use std::{
    net::SocketAddr,
    path::PathBuf,
    sync::Arc,
    time::{Duration, Instant},
};

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use hexfleet_client::FixInput;
use hexfleet_protocol::{encode_datagram, ClientMsg, ClockReport, ErrorCode, Fix, Hello, Role};
use hexfleet_tests::*;
use tokio::io::AsyncWriteExt;

/// The honest rider's fix→view delay, p99, during any attack. Generous
/// for a debug build on two shared cores; the figures measured are
/// printed, and far below it.
const BOUND_MS: u128 = 150;
const WAIT: Duration = Duration::from_secs(20);
const LISBON: (f64, f64) = (38.7223, -9.1393);

/// Where the attackers go.
#[derive(Clone)]
struct Target {
    quic: SocketAddr,
    http: SocketAddr,
    cert: PathBuf,
    /// QUIC Initial packets, each opening a handshake, made before the
    /// table runs: what an attacker spends making them is not the node's.
    initials: Arc<Vec<Vec<u8>>>,
}

fn close_code(closed: quinn::ConnectionError) -> String {
    match closed {
        quinn::ConnectionError::ApplicationClosed(c) => {
            match ErrorCode::from_close_code(c.error_code.into_inner()) {
                Some(code) => format!("closed {}", code.as_str()),
                None => format!("closed {}", c.error_code),
            }
        }
        other => format!("ended: {other}"),
    }
}

async fn hello(tx: &mut RawWrite, role: Role, token: String) {
    tx.send(ClientMsg::Hello(Hello {
        version: 1,
        role,
        token,
        unreachable: Vec::new(),
    }))
    .await
    .unwrap();
}

async fn garbage_before_hello(t: Target) -> String {
    let (conn, mut tx, _rx) = raw_connection_to(t.quic, &t.cert, 1 << 16).await;
    let garbage: Vec<u8> = (0..4096u32).map(|i| (i * 7919 % 251) as u8).collect();
    let _ = tx.get_mut().write_all(&garbage).await;
    close_code(tokio::time::timeout(WAIT, conn.closed()).await.unwrap())
}

async fn hello_twice(t: Target) -> String {
    let (conn, mut tx, mut rx) = raw_connection_to(t.quic, &t.cert, 1 << 16).await;
    hello(&mut tx, Role::Driver, driver_token("twice")).await;
    let _welcome = rx.next().await;
    hello(&mut tx, Role::Driver, driver_token("twice")).await;
    close_code(tokio::time::timeout(WAIT, conn.closed()).await.unwrap())
}

async fn a_second_stream(t: Target) -> String {
    let (conn, mut tx, mut rx) = raw_connection_to(t.quic, &t.cert, 1 << 16).await;
    hello(&mut tx, Role::Driver, driver_token("streams")).await;
    let _welcome = rx.next().await;
    // The node grants one bidirectional stream and no unidirectional one:
    // a second cannot even be opened.
    let bi = tokio::time::timeout(Duration::from_millis(500), conn.open_bi()).await;
    let uni = tokio::time::timeout(Duration::from_millis(500), conn.open_uni()).await;
    assert!(bi.is_err() && uni.is_err(), "a second stream opened");
    "no stream credit: cannot be opened".into()
}

/// Clock reports no clock could make, and a flood of them.
async fn impossible_clocks(t: Target) -> String {
    let (conn, mut tx, mut rx) = raw_connection_to(t.quic, &t.cert, 1 << 16).await;
    hello(&mut tx, Role::Driver, driver_token("clock-flood")).await;
    let _welcome = rx.next().await;
    for _ in 0..5_000 {
        let report = ClockReport {
            offset_ms: 3_600_000,
            round_trip_ms: 1,
        };
        if tx.send(ClientMsg::Clock(report)).await.is_err() {
            break;
        }
    }
    let (conn2, mut tx2, mut rx2) = raw_connection_to(t.quic, &t.cert, 1 << 16).await;
    hello(&mut tx2, Role::Driver, driver_token("clock-min")).await;
    let _welcome = rx2.next().await;
    let report = ClockReport {
        offset_ms: i64::MIN,
        round_trip_ms: u32::MAX,
    };
    let _ = tx2.send(ClientMsg::Clock(report)).await;
    let impossible = close_code(tokio::time::timeout(WAIT, conn2.closed()).await.unwrap());
    let flood = close_code(tokio::time::timeout(WAIT, conn.closed()).await.unwrap());
    format!("i64::MIN: {impossible}; 5,000 reports: {flood}")
}

async fn an_oversized_frame(t: Target) -> String {
    let (conn, mut tx, mut rx) = raw_connection_to(t.quic, &t.cert, 1 << 16).await;
    hello(&mut tx, Role::Driver, driver_token("big-frame")).await;
    let _welcome = rx.next().await;
    // A length prefix of 1 GB, and some of its "body".
    let _ = tx.get_mut().write_all(&(1u32 << 30).to_be_bytes()).await;
    let _ = tx.get_mut().write_all(&[0u8; 64 * 1024]).await;
    close_code(tokio::time::timeout(WAIT, conn.closed()).await.unwrap())
}

async fn oversized_and_malformed_datagrams(t: Target) -> String {
    let (conn, mut tx, mut rx) = raw_connection_to(t.quic, &t.cert, 1 << 16).await;
    hello(&mut tx, Role::Driver, driver_token("bad-datagrams")).await;
    let _welcome = rx.next().await;
    let max = conn.max_datagram_size().unwrap();
    let too_big = conn.send_datagram(Bytes::from(vec![1u8; max + 1]));
    assert!(
        too_big.is_err(),
        "a datagram over the peer's limit was sent"
    );
    for i in 0..1_000u32 {
        let junk = Bytes::from(vec![(i % 256) as u8; max]);
        if conn.send_datagram(junk).is_err() {
            break;
        }
        if i % 50 == 0 {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    conn.close(0u32.into(), b"");
    "over the limit: refused by QUIC; malformed: rejected".into()
}

async fn a_datagram_flood(t: Target) -> String {
    let (conn, mut tx, mut rx) = raw_connection_to(t.quic, &t.cert, 1 << 16).await;
    hello(&mut tx, Role::Driver, driver_token("flooder")).await;
    let _welcome = rx.next().await;
    let t0 = now_ms();
    for seq in 1..=20_000u64 {
        let fix = Fix {
            seq,
            fix_time_ms: t0 + seq as i64,
            lat: LISBON.0 - 0.01,
            lon: LISBON.1,
            heading_deg: 0.0,
            speed_mps: 1.0,
            accuracy_m: 5.0,
        };
        if conn.send_datagram(encode_datagram(&fix).unwrap()).is_err() {
            break;
        }
        if seq % 200 == 0 {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    }
    close_code(tokio::time::timeout(WAIT, conn.closed()).await.unwrap())
}

/// Real QUIC Initial packets, each opening a handshake: captured from a
/// client connecting to a socket that never answers.
async fn initials(cert: &std::path::Path, count: usize) -> Vec<Vec<u8>> {
    let sink = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let sink_addr = sink.local_addr().unwrap();
    let mut client = quinn::Endpoint::client(([127, 0, 0, 1], 0).into()).unwrap();
    client.set_default_client_config(quic_client_config(cert, 1 << 16));
    let mut pending = Vec::new();
    let mut initials = Vec::with_capacity(count);
    let mut buf = vec![0u8; 2048];
    while initials.len() < count {
        pending.push(client.connect(sink_addr, "localhost").unwrap());
        let (n, _) = sink.recv_from(&mut buf).await.unwrap();
        initials.push(buf[..n].to_vec());
    }
    drop(pending);
    client.close(0u32.into(), b"");
    initials
}

/// Handshakes the client never finishes: the Initials sent to the node, and
/// whatever it answers left unanswered.
async fn half_open_handshakes(t: Target) -> String {
    let attacker = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let mut buf = vec![0u8; 2048];
    for (i, initial) in t.initials.iter().enumerate() {
        let _ = attacker.send_to(initial, t.quic).await;
        if i % 100 == 0 {
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    }
    // What came back: handshakes and Retry packets, never answered.
    let mut replies = 0;
    while let Ok(Ok(_)) =
        tokio::time::timeout(Duration::from_millis(300), attacker.recv_from(&mut buf)).await
    {
        replies += 1;
    }
    format!(
        "{} Initials, {replies} replies, none answered",
        t.initials.len()
    )
}

async fn wrong_forged_and_expired_tokens(t: Target) -> String {
    let expired = hexfleet_protocol::Claims::new(
        Role::Driver,
        hexfleet_model::VehicleId::new("late").unwrap(),
        now_s() - 10,
    )
    .mint(SECRET.as_bytes());
    let forged = hexfleet_protocol::Claims::new(
        Role::Driver,
        hexfleet_model::VehicleId::new("forged").unwrap(),
        now_s() + 3600,
    )
    .mint(b"not-the-secret-0123456789");
    let mut outcomes = Vec::new();
    for (role, token) in [
        (Role::Driver, token(Role::Rider, "rider-as-driver")),
        (Role::Driver, forged),
        (Role::Driver, expired),
    ] {
        let (conn, mut tx, _rx) = raw_connection_to(t.quic, &t.cert, 1 << 16).await;
        hello(&mut tx, role, token).await;
        outcomes.push(close_code(
            tokio::time::timeout(WAIT, conn.closed()).await.unwrap(),
        ));
    }
    outcomes.dedup();
    outcomes.join(", ")
}

async fn slowloris_http(t: Target) -> String {
    let mut tricklers = Vec::new();
    for _ in 0..50 {
        let mut s = tokio::net::TcpStream::connect(t.http).await.unwrap();
        s.write_all(b"GET /v1/cluster HTTP/1.1\r\n").await.unwrap();
        tricklers.push(s);
    }
    let started = Instant::now();
    let mut cut = vec![false; tricklers.len()];
    for round in 0..100 {
        for (s, cut) in tricklers.iter_mut().zip(&mut cut) {
            if !*cut
                && s.write_all(format!("X-{round}: y\r\n").as_bytes())
                    .await
                    .is_err()
            {
                *cut = true;
            }
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
        if cut.iter().all(|c| *c) {
            break;
        }
    }
    let cut = cut.iter().filter(|c| **c).count();
    format!(
        "{cut} of 50 cut off within {:.1} s",
        started.elapsed().as_secs_f64()
    )
}

async fn slowloris_websockets(t: Target) -> String {
    // Sockets upgraded, then silent: each holds a slot until the
    // per-address limit refuses more.
    let query = format!("token={}", token(Role::Dashboard, "idle"));
    let mut held = Vec::new();
    let mut refused = 0;
    for _ in 0..120 {
        match tokio::time::timeout(
            Duration::from_secs(2),
            dashboard::DashboardSocket::connect_to(t.http, &query),
        )
        .await
        {
            Ok(Ok(socket)) => held.push(socket),
            _ => refused += 1,
        }
    }
    let outcome = format!("{} held, {refused} refused", held.len());
    drop(held);
    outcome
}

/// Runs an attack on its own runtime and thread while the honest pair
/// carries on; returns what the attacker saw and the honest delays.
async fn during(
    attack: impl FnOnce(Target) -> std::pin::Pin<Box<dyn std::future::Future<Output = String> + Send>>
        + Send
        + 'static,
    target: Target,
    honest: &mut Honest,
) -> (String, Vec<u128>) {
    honest.clock.clear();
    let attacker = std::thread::spawn(move || {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        runtime.block_on(attack(target))
    });
    // At least a second of honest traffic, and as long as the attack lasts.
    let started = Instant::now();
    while !attacker.is_finished() || started.elapsed() < Duration::from_secs(1) {
        honest.step().await;
    }
    for _ in 0..5 {
        honest.step().await;
    }
    let outcome = attacker.join().unwrap();
    (outcome, honest.clock.sorted())
}

/// An honest driver moving a car in front of an honest rider, each fix
/// timed from its sending to its arrival in the rider's view.
struct Honest {
    driver: hexfleet_client::DriverClient,
    clock: FixClock,
    step: u64,
}

impl Honest {
    async fn step(&mut self) {
        self.step += 1;
        let lat = LISBON.0 + 1e-4 + (self.step % 10_000) as f64 * 1e-6;
        self.clock.sent(lat, self.step);
        self.driver
            .send_fix(FixInput::at(lat, LISBON.1))
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

type Attack = fn(Target) -> std::pin::Pin<Box<dyn std::future::Future<Output = String> + Send>>;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_worst_clients_get_an_error_or_a_drop_counted_and_cost_the_others_nothing() {
    let node = TestNode::start_with(None, |c| {
        c.http.header_timeout = Duration::from_secs(1);
        c.http.max_connections_per_address = 100;
        c.quic.handshake_timeout = Duration::from_secs(2);
        c.quic.retry_above_handshakes = 64;
        c.ingest.fixes.per_second = 100.0;
        c.ingest.fixes.burst = 200;
        c.ingest.fixes.close_after = 2_000;
    })
    .await;
    let clock = FixClock::default();
    let rider = node.timing_rider("honest", LISBON, 1_000.0, &clock).await;
    let mut honest = Honest {
        driver: node.driver("honest-car", available()).await,
        clock,
        step: 0,
    };
    let target = Target {
        quic: node.node.quic_addr,
        http: node.node.http_addr,
        cert: node.cert(),
        initials: Arc::new(initials(&node.cert(), 3_000).await),
    };

    let cases: Vec<(&str, Attack, &str)> = vec![
        (
            "garbage before Hello",
            |t| Box::pin(garbage_before_hello(t)),
            "hexfleet_sessions_refused_total{code=\"protocol_violation\"}",
        ),
        (
            "Hello twice",
            |t| Box::pin(hello_twice(t)),
            "hexfleet_sessions_refused_total{code=\"protocol_violation\"}",
        ),
        ("a second stream", |t| Box::pin(a_second_stream(t)), ""),
        (
            "an oversized frame",
            |t| Box::pin(an_oversized_frame(t)),
            "hexfleet_sessions_refused_total{code=\"protocol_violation\"}",
        ),
        (
            "impossible clock reports, and 5,000 of them",
            |t| Box::pin(impossible_clocks(t)),
            "hexfleet_sessions_refused_total{code=\"bad_request\"}",
        ),
        (
            "oversized and malformed datagrams",
            |t| Box::pin(oversized_and_malformed_datagrams(t)),
            "hexfleet_fixes_rejected_total{reason=\"malformed\"}",
        ),
        (
            "a datagram flood (20,000 fixes)",
            |t| Box::pin(a_datagram_flood(t)),
            "hexfleet_fixes_rejected_total{reason=\"rate_limited\"}",
        ),
        (
            "3,000 half-open handshakes",
            |t| Box::pin(half_open_handshakes(t)),
            "hexfleet_handshakes_retried_total",
        ),
        (
            "wrong role, forged, expired tokens",
            |t| Box::pin(wrong_forged_and_expired_tokens(t)),
            "hexfleet_sessions_refused_total{code=\"unauthorized\"}",
        ),
        (
            "slowloris HTTP (50 connections)",
            |t| Box::pin(slowloris_http(t)),
            "hexfleet_http_connections_dropped_total{reason=\"header_timeout\"}",
        ),
        (
            "slowloris WebSocket (120 sockets)",
            |t| Box::pin(slowloris_websockets(t)),
            "hexfleet_connections_refused_total{reason=\"http_address_limit\"}",
        ),
    ];
    let mut table = vec![
        "| attack | what the attacker saw | counted | honest rider p50 / p99 / max |".to_string(),
        "|---|---|---|---|".to_string(),
    ];
    let mut worst = Vec::new();
    for (name, attack, counter) in cases {
        let (outcome, delays) = during(attack, target.clone(), &mut honest).await;
        // Refused by the transport itself: nothing reaches the node to count.
        let counted = if counter.is_empty() {
            "nothing reaches the node".to_string()
        } else {
            let n = eventually(Duration::from_secs(5), counter, async || {
                let n = node.metric(counter).await;
                (n > 0.0).then_some(n)
            })
            .await;
            format!("`{counter}` = {n}")
        };
        assert!(
            delays.len() >= 20,
            "{name}: only {} deltas seen",
            delays.len()
        );
        let (p50, p99, max) = (
            delays[delays.len() / 2],
            delays[delays.len() * 99 / 100],
            delays[delays.len() - 1],
        );
        table.push(format!(
            "| {name} | {outcome} | {counted} | {p50} / {p99} / {max} ms |"
        ));
        worst.push((name, p99));
    }
    println!("{}", table.join("\n"));
    // The expected outcomes, beyond being counted.
    for (name, p99) in worst {
        assert!(
            p99 <= BOUND_MS,
            "{name}: the honest rider's p99 was {p99} ms"
        );
    }
    assert!(rider.closed_by_node().is_none());
    assert!(
        node.metric("hexfleet_sessions_refused_total{code=\"unauthorized\"}")
            .await
            >= 3.0
    );
    // The datagram flood's connection and the clock reports' flood.
    assert_eq!(
        node.metric("hexfleet_sessions_refused_total{code=\"rate_limited\"}")
            .await,
        2.0
    );
    node.stop().await;
}
