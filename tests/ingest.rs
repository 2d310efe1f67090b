//! Driver ingest over real QUIC: acceptance, every rejection reason, and
//! every way a client can misbehave, each confined to that client.

use std::time::Duration;

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use hexfleet_client::{ClientError, FixInput};
use hexfleet_model::{VehicleClass, VehicleId, VehicleStatus};
use hexfleet_protocol::{
    Claims, ClientMsg, DriverReport, ErrorCode, Fix, FrameCodec, Hello, RejectReason, Role,
    ServerMsg,
};
use hexfleet_tests::*;
use tokio_util::codec::{FramedRead, FramedWrite};

const WAIT: Duration = Duration::from_secs(10);

fn fix(seq: u64, t: i64, lat: f64, lon: f64) -> Fix {
    Fix {
        seq,
        fix_time_ms: t,
        lat,
        lon,
        heading_deg: 45.0,
        speed_mps: 8.0,
        accuracy_m: 4.0,
    }
}

async fn vehicle_seq(node: &TestNode, id: &str) -> Option<u64> {
    let (status, body) = node.get_json(&format!("/v1/vehicles/{id}")).await;
    (status == 200).then(|| body["seq"].as_u64().expect("seq"))
}

#[tokio::test]
async fn accepted_fixes_become_the_vehicles_state_and_are_acknowledged() {
    let node = TestNode::start(None).await;
    let mut driver = node
        .connector()
        .driver(node.node.quic_addr, &driver_token("drv-1"), available())
        .await
        .unwrap();
    assert!(driver.uses_datagrams());
    // 11 m apart, 200 ms apart: a plausible drive, sent in a burst.
    let (mut last, t0) = (0, now_ms());
    for i in 0..20 {
        let fix = FixInput {
            fix_time_ms: Some(t0 + i * 200),
            ..FixInput::at(52.52 + i as f64 * 1e-4, 13.405)
        };
        last = driver.send_fix(fix).await.unwrap();
    }
    eventually(WAIT, "the last fix acknowledged", async || {
        (driver.acked_seq() == last).then_some(())
    })
    .await;
    let (status, state) = node.get_json("/v1/vehicles/drv-1").await;
    assert_eq!(status, 200);
    assert_eq!(state["seq"], last);
    assert_eq!(state["class"], "economy");
    assert_eq!(state["status"], "available");
    assert!((state["lat"].as_f64().unwrap() - (52.52 + 19e-4)).abs() < 1e-9);
    node.stop().await;
}

/// Acks are rare (each is a packet a phone wakes for): the first fix is
/// acknowledged at once, later ones when the interval is up, a rejection
/// within a second however long the interval.
#[tokio::test]
async fn fixes_are_acknowledged_at_most_once_an_interval_and_rejections_within_a_second() {
    let node = TestNode::start_with(None, |c| {
        c.ingest.ack_interval = Duration::from_secs(3600);
    })
    .await;
    let mut driver = node
        .connector()
        .driver(node.node.quic_addr, &driver_token("drv-acks"), available())
        .await
        .unwrap();
    let now = now_ms();
    driver
        .send_raw(fix(1, now - 1_000, 52.52, 13.405))
        .await
        .unwrap();
    eventually(WAIT, "the first fix acknowledged at once", async || {
        (driver.acked_seq() == 1).then_some(())
    })
    .await;
    for seq in 2..=5 {
        driver
            .send_raw(fix(
                seq,
                now - 1_000 + seq as i64,
                52.52 + seq as f64 * 1e-5,
                13.405,
            ))
            .await
            .unwrap();
    }
    eventually(WAIT, "the node took the later fixes", async || {
        (vehicle_seq(&node, "drv-acks").await == Some(5)).then_some(())
    })
    .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(driver.acked_seq(), 1, "no Ack before the interval is up");
    // Unless the driver asks; it hears back even when nothing is new.
    assert_eq!(driver.acknowledged(WAIT).await.unwrap(), 5);
    assert_eq!(driver.acknowledged(WAIT).await.unwrap(), 5);

    // Reported within WAIT, not the hour the interval says.
    driver.send_raw(fix(6, now, 0.0, 0.0)).await.unwrap();
    eventually(WAIT, "the rejection reported", async || {
        (driver.stats().rejected_total == 1).then_some(())
    })
    .await;
    assert_eq!(
        driver.acked_seq(),
        5,
        "the Ack with the rejection says what was accepted"
    );
    assert_eq!(driver.stats().rejections, [(6, RejectReason::NullIsland)]);
    node.stop().await;
}

#[tokio::test]
async fn every_rejection_reason_is_reported_to_the_driver_and_counted() {
    let node = TestNode::start(None).await;
    let mut driver = node
        .connector()
        .driver(node.node.quic_addr, &driver_token("drv-bad"), available())
        .await
        .unwrap();
    let now = now_ms();
    driver
        .send_raw(fix(10, now - 1_000, 52.52, 13.405))
        .await
        .unwrap();
    eventually(WAIT, "the good fix acknowledged", async || {
        (driver.acked_seq() == 10).then_some(())
    })
    .await;

    let bad = [
        (
            fix(11, now, f64::NAN, 13.405),
            RejectReason::InvalidCoordinate,
        ),
        (fix(12, now, 52.52, 181.0), RejectReason::InvalidCoordinate),
        (fix(13, now, 0.0, 0.0), RejectReason::NullIsland),
        (
            Fix {
                speed_mps: f32::NAN,
                ..fix(14, now, 52.52, 13.405)
            },
            RejectReason::InvalidField,
        ),
        (
            fix(15, now + 600_000, 52.52, 13.405),
            RejectReason::FromFuture,
        ),
        (fix(16, now - 600_000, 52.52, 13.405), RejectReason::TooOld),
        (fix(10, now, 52.52, 13.405), RejectReason::StaleSeq),
        (
            fix(17, now - 5_000, 52.52, 13.405),
            RejectReason::TimeBackwards,
        ),
        (fix(18, now, 48.85, 2.35), RejectReason::TooFast),
        (fix(19, now, 89.0, 13.405), RejectReason::OutsideIndex),
    ];
    for (f, _) in &bad {
        driver.send_raw(*f).await.unwrap();
    }
    driver
        .send_datagram_bytes(Bytes::from_static(b"\x01\xc1 not a fix"))
        .unwrap();

    let expected = bad.len() + 1;
    let stats = eventually(WAIT, "all rejections reported", async || {
        let s = driver.stats();
        (s.rejections.len() == expected).then_some(s)
    })
    .await;
    for (f, reason) in &bad {
        assert!(
            stats.rejections.contains(&(f.seq, *reason)),
            "{reason:?} for seq {} missing: {stats:?}",
            f.seq
        );
    }
    assert!(stats.rejections.contains(&(0, RejectReason::Malformed)));
    assert_eq!(stats.rejected_total, expected as u64);

    // Counted by reason, and the vehicle still stands where the good fix put it.
    let counted = |reason: RejectReason| {
        format!(
            "hexfleet_fixes_rejected_total{{reason=\"{}\"}}",
            reason.as_str()
        )
    };
    assert_eq!(
        node.metric(&counted(RejectReason::InvalidCoordinate)).await,
        2.0
    );
    for reason in RejectReason::ALL
        .into_iter()
        // Over the fix budget: tests/security.rs.
        .filter(|r| {
            !matches!(
                r,
                RejectReason::InvalidCoordinate | RejectReason::RateLimited
            )
        })
    {
        assert_eq!(node.metric(&counted(reason)).await, 1.0, "{reason:?}");
    }
    assert_eq!(vehicle_seq(&node, "drv-bad").await, Some(10));
    let (_, state) = node.get_json("/v1/vehicles/drv-bad").await;
    assert_eq!(state["lat"], 52.52);
    node.stop().await;
}

async fn expect_refused(
    result: Result<hexfleet_client::DriverClient, ClientError>,
    code: ErrorCode,
) -> String {
    match result {
        Err(ClientError::Refused { code: got, reason }) => {
            assert_eq!(got, code, "{reason}");
            reason
        }
        Err(other) => panic!("expected a refusal with {code:?}, got {other}"),
        Ok(_) => panic!("expected a refusal with {code:?}, got a session"),
    }
}

#[tokio::test]
async fn bad_tokens_are_refused_and_harm_no_one_else() {
    let node = TestNode::start(None).await;
    let connector = node.connector();
    let addr = node.node.quic_addr;
    let mut good = connector
        .driver(addr, &driver_token("drv-good"), available())
        .await
        .unwrap();

    let id = VehicleId::new("drv-x").unwrap();
    let forged = Claims::new(Role::Driver, id.clone(), now_s() + 60).mint(b"not-the-secret-at-all");
    let expired = Claims::new(Role::Driver, id.clone(), now_s() - 1).mint(SECRET.as_bytes());
    let rider = token(Role::Rider, "drv-x");
    let reason = expect_refused(
        connector.driver(addr, &forged, available()).await,
        ErrorCode::Unauthorized,
    )
    .await;
    assert!(reason.contains("signature"), "{reason}");
    let reason = expect_refused(
        connector.driver(addr, &expired, available()).await,
        ErrorCode::Unauthorized,
    )
    .await;
    assert!(reason.contains("expired"), "{reason}");
    let reason = expect_refused(
        connector.driver(addr, &rider, available()).await,
        ErrorCode::Unauthorized,
    )
    .await;
    assert!(reason.contains("role"), "{reason}");
    let reason = expect_refused(
        connector.driver(addr, "", available()).await,
        ErrorCode::Unauthorized,
    )
    .await;
    assert!(reason.contains("no token"), "{reason}");
    expect_refused(
        connector.driver(addr, "hf1.garbage", available()).await,
        ErrorCode::Unauthorized,
    )
    .await;

    let seq = good.send_fix(FixInput::at(40.0, -3.7)).await.unwrap();
    eventually(WAIT, "the good driver still served", async || {
        (good.acked_seq() == seq).then_some(())
    })
    .await;
    assert_eq!(
        node.metric("hexfleet_sessions_refused_total{code=\"unauthorized\"}")
            .await,
        5.0
    );
    node.stop().await;
}

async fn raw_session(
    node: &TestNode,
) -> (
    quinn::Connection,
    FramedWrite<quinn::SendStream, FrameCodec<ServerMsg, ClientMsg>>,
    FramedRead<quinn::RecvStream, FrameCodec<ServerMsg, ClientMsg>>,
) {
    raw_connection(node, 1 << 20).await
}

/// Why the node ended a raw session: from its Error frame, or from the
/// CONNECTION_CLOSE when the frame did not make it first.
async fn refusal(
    conn: &quinn::Connection,
    rx: &mut FramedRead<quinn::RecvStream, FrameCodec<ServerMsg, ClientMsg>>,
) -> (ErrorCode, String) {
    if let Some(Ok(ServerMsg::Error(e))) = rx.next().await {
        return (e.code, e.reason);
    }
    match tokio::time::timeout(WAIT, conn.closed())
        .await
        .expect("the node closes the connection")
    {
        quinn::ConnectionError::ApplicationClosed(c) => (
            ErrorCode::from_close_code(c.error_code.into_inner()).expect("a hexfleet close code"),
            String::from_utf8_lossy(&c.reason).into_owned(),
        ),
        other => panic!("unexpected close: {other}"),
    }
}

async fn close_code(conn: &quinn::Connection) -> Option<ErrorCode> {
    match tokio::time::timeout(WAIT, conn.closed())
        .await
        .expect("the node closes the connection")
    {
        quinn::ConnectionError::ApplicationClosed(c) => {
            ErrorCode::from_close_code(c.error_code.into_inner())
        }
        other => panic!("unexpected close: {other}"),
    }
}

#[tokio::test]
async fn a_malformed_frame_closes_only_that_connection() {
    let node = TestNode::start(None).await;
    let mut good = node
        .connector()
        .driver(node.node.quic_addr, &driver_token("drv-good"), available())
        .await
        .unwrap();

    // Garbage where Hello should be.
    let (conn, mut tx, _rx) = raw_session(&node).await;
    tx.get_mut()
        .write_all(&[0, 0, 0, 3, 1, 0xc1, 0xc1])
        .await
        .unwrap();
    assert_eq!(close_code(&conn).await, Some(ErrorCode::ProtocolViolation));

    // Garbage after a good Hello.
    let (conn, mut tx, mut rx) = raw_session(&node).await;
    tx.send(ClientMsg::Hello(Hello {
        version: 1,
        role: Role::Driver,
        token: driver_token("drv-raw"),
        unreachable: Vec::new(),
    }))
    .await
    .unwrap();
    assert!(matches!(rx.next().await, Some(Ok(ServerMsg::Welcome(_)))));
    tx.get_mut()
        .write_all(&[0, 0, 0, 2, 7, 0x90])
        .await
        .unwrap();
    let (code, reason) = refusal(&conn, &mut rx).await;
    assert_eq!(code, ErrorCode::ProtocolViolation);
    assert!(reason.contains("version"), "{reason}");
    assert_eq!(close_code(&conn).await, Some(ErrorCode::ProtocolViolation));

    // A frame header announcing more than the limit.
    let (conn, mut tx, _rx) = raw_session(&node).await;
    tx.get_mut()
        .write_all(&u32::MAX.to_be_bytes())
        .await
        .unwrap();
    assert_eq!(close_code(&conn).await, Some(ErrorCode::ProtocolViolation));

    // An unknown protocol version.
    let (conn, mut tx, mut rx) = raw_session(&node).await;
    tx.send(ClientMsg::Hello(Hello {
        version: 99,
        role: Role::Driver,
        token: driver_token("drv-v"),
        unreachable: Vec::new(),
    }))
    .await
    .unwrap();
    let (code, reason) = refusal(&conn, &mut rx).await;
    assert_eq!(code, ErrorCode::UnsupportedVersion);
    assert!(reason.contains("99"), "{reason}");

    let seq = good.send_fix(FixInput::at(35.68, 139.76)).await.unwrap();
    eventually(WAIT, "the good driver unaffected", async || {
        (good.acked_seq() == seq).then_some(())
    })
    .await;
    node.stop().await;
}

#[tokio::test]
async fn fixes_fall_back_to_the_control_stream() {
    let node = TestNode::start(None).await;
    let mut driver = node
        .connector()
        .driver(
            node.node.quic_addr,
            &driver_token("drv-stream"),
            available(),
        )
        .await
        .unwrap();
    driver.use_stream_for_fixes();
    let seq = driver.send_fix(FixInput::at(-33.87, 151.21)).await.unwrap();
    eventually(WAIT, "a stream fix acknowledged", async || {
        (driver.acked_seq() == seq).then_some(())
    })
    .await;
    assert_eq!(vehicle_seq(&node, "drv-stream").await, Some(seq));
    node.stop().await;
}

#[tokio::test]
async fn a_reconnecting_driver_resumes_above_its_last_sequence_and_supersedes_the_old_connection() {
    let node = TestNode::start(None).await;
    let connector = node.connector();
    let addr = node.node.quic_addr;
    let mut first = connector
        .driver(addr, &driver_token("drv-r"), available())
        .await
        .unwrap();
    let mut last = 0;
    for _ in 0..5 {
        last = first.send_fix(FixInput::at(52.0, 13.0)).await.unwrap();
    }
    eventually(WAIT, "first session acknowledged", async || {
        (first.acked_seq() == last).then_some(())
    })
    .await;

    let mut second = connector
        .driver(addr, &driver_token("drv-r"), available())
        .await
        .unwrap();
    assert_eq!(second.first_seq(), last + 1);
    match first.closed().await {
        ClientError::Refused { code, .. } => assert_eq!(code, ErrorCode::Superseded),
        other => panic!("expected superseded, got {other}"),
    }
    let seq = second.send_fix(FixInput::at(52.0001, 13.0)).await.unwrap();
    eventually(WAIT, "second session acknowledged", async || {
        (second.acked_seq() == seq).then_some(())
    })
    .await;
    node.stop().await;
}

#[tokio::test]
async fn status_reports_change_the_vehicle_and_goodbye_removes_it() {
    let node = TestNode::start(None).await;
    let mut driver = node
        .connector()
        .driver(
            node.node.quic_addr,
            &driver_token("drv-s"),
            DriverReport {
                class: VehicleClass::Xl,
                status: VehicleStatus::Available,
            },
        )
        .await
        .unwrap();
    driver.send_fix(FixInput::at(51.5, -0.12)).await.unwrap();
    eventually(WAIT, "the vehicle visible as xl", async || {
        let (s, v) = node.get_json("/v1/vehicles/drv-s").await;
        (s == 200 && v["class"] == "xl").then_some(())
    })
    .await;
    driver
        .report(DriverReport {
            class: VehicleClass::Xl,
            status: VehicleStatus::OnTrip,
        })
        .await
        .unwrap();
    eventually(WAIT, "the status change stored", async || {
        let (_, v) = node.get_json("/v1/vehicles/drv-s").await;
        (v["status"] == "on_trip").then_some(())
    })
    .await;
    driver.goodbye().await.unwrap();
    eventually(WAIT, "the vehicle gone after goodbye", async || {
        let (s, _) = node.get_json("/v1/vehicles/drv-s").await;
        (s == 404 && node.node.table.is_empty()).then_some(())
    })
    .await;
    node.stop().await;
}

#[tokio::test]
async fn the_sdk_reaches_a_node_on_ipv6_loopback_and_on_ipv4_with_one_connector() {
    // Both with the same development certificate.
    let certs = tempfile::tempdir().unwrap();
    let v6 = TestNode::start_in(certs.path(), None, |c| {
        c.quic.listen = "[::1]:0".parse().unwrap()
    })
    .await;
    let v4 = TestNode::start_in(certs.path(), None, |_| {}).await;
    assert!(v6.node.quic_addr.is_ipv6());
    // One connector, as an app holds one, talks to both families.
    let connector = v6.connector();
    let mut drivers = Vec::new();
    for (node, id) in [(&v6, "drv-v6"), (&v4, "drv-v4")] {
        let mut d = connector
            .driver(node.node.quic_addr, &driver_token(id), available())
            .await
            .unwrap();
        let seq = d.send_fix(FixInput::at(47.37, 8.54)).await.unwrap();
        eventually(WAIT, "the fix acknowledged", async || {
            (d.acked_seq() == seq).then_some(())
        })
        .await;
        assert_eq!(node.get_json(&format!("/v1/vehicles/{id}")).await.0, 200);
        drivers.push(d);
    }
    v6.stop().await;
    v4.stop().await;
}

#[tokio::test]
async fn lost_connections_are_counted_as_lost_not_as_protocol_violations() {
    let node =
        TestNode::start_with(None, |c| c.quic.idle_timeout = Duration::from_millis(500)).await;
    // Apps killed mid-session: their connections close without a Goodbye.
    for i in 0..10 {
        let mut d = node.driver(&format!("drv-killed-{i}"), available()).await;
        d.send_fix(FixInput::at(52.52, 13.405)).await.unwrap();
        d.abandon();
    }
    // Phones in a tunnel: riders that go silent until the idle timeout.
    let mut silent = Vec::new();
    for i in 0..10 {
        let (conn, mut tx, mut rx) = raw_connection(&node, 64 * 1024).await;
        tx.send(ClientMsg::Hello(Hello {
            version: 1,
            role: Role::Rider,
            token: token(Role::Rider, &format!("rider-tunnel-{i}")),
            unreachable: Vec::new(),
        }))
        .await
        .unwrap();
        assert!(matches!(rx.next().await, Some(Ok(ServerMsg::Welcome(_)))));
        silent.push((conn, tx, rx));
    }
    eventually(WAIT, "all 20 sessions counted as lost", async || {
        (node.metric("hexfleet_sessions_lost_total").await == 20.0).then_some(())
    })
    .await;
    assert_eq!(
        node.metric("hexfleet_sessions_refused_total{code=\"protocol_violation\"}")
            .await,
        0.0
    );
    node.stop().await;
}

#[tokio::test]
async fn a_driver_that_never_reads_its_acknowledgements_is_cut_off_as_a_slow_consumer() {
    let node = TestNode::start_with(None, |c| {
        c.riders.slow_consumer_after = Duration::from_millis(500)
    })
    .await;
    // A 2 KiB window: a few acknowledgements full of rejections fill it.
    let (conn, mut tx, _unread) = raw_connection(&node, 2_048).await;
    tx.send(ClientMsg::Hello(Hello {
        version: 1,
        role: Role::Driver,
        token: driver_token("drv-deaf"),
        unreachable: Vec::new(),
    }))
    .await
    .unwrap();
    let bad = hexfleet_protocol::encode_datagram(&fix(1, now_ms(), f64::NAN, 13.4)).unwrap();
    let flood = {
        let conn = conn.clone();
        tokio::spawn(async move {
            while conn.close_reason().is_none() {
                for _ in 0..64 {
                    let _ = conn.send_datagram(bad.clone());
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        })
    };
    assert_eq!(close_code(&conn).await, Some(ErrorCode::SlowConsumer));
    flood.await.unwrap();
    assert_eq!(
        node.metric("hexfleet_sessions_refused_total{code=\"slow_consumer\"}")
            .await,
        1.0
    );
    node.stop().await;
}
