//! Drivers and riders over WebSocket, for networks that drop UDP: the SDK
//! races a WebSocket beside QUIC after a short QUIC timeout, remembers it per network and
//! tries QUIC again later; the node holds WebSocket sessions to the same
//! protocol, limits and validation as QUIC ones (the riders' model-based
//! test runs over both, in tests/riders.rs).

use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use hexfleet_client::{Connector, FixInput, Transport, DEFAULT_QUIC_TIMEOUT};
use hexfleet_protocol::{
    ws::{self, Channel},
    ClientMsg, ErrorCode, Hello, Role, ServerMsg, PROTOCOL_VERSION,
};
use hexfleet_tests::*;
use tokio_tungstenite::tungstenite::{protocol::frame::coding::CloseCode, Message};

const WAIT: Duration = Duration::from_secs(10);

/// A node serving HTTPS (where the fallback goes, as in production), and a
/// connector on a network that drops UDP.
async fn blocked() -> (TestNode, Connector) {
    let node = TestNode::start_with(None, |c| c.http.tls = true).await;
    let connector = node
        .connector()
        .with_fallback(DEFAULT_QUIC_TIMEOUT, Duration::from_millis(500));
    connector.set_https_address(node.node.quic_addr, node.node.http_addr);
    connector.set_network("corporate-wifi");
    connector.simulate_udp_blocked(true);
    (node, connector)
}

#[tokio::test]
async fn a_client_whose_udp_is_blocked_falls_back_remembers_it_and_tries_quic_again_later() {
    let (node, connector) = blocked().await;

    let started = Instant::now();
    let mut first = connector
        .driver(node.node.quic_addr, &driver_token("ws-1"), available())
        .await
        .expect("the driver connects over WebSocket");
    let fell_back = started.elapsed();
    assert_eq!(first.transport(), Transport::WebSocket);
    assert!(connector.remembers_websocket());
    let seq = first.send_fix(FixInput::at(59.33, 18.06)).await.unwrap();
    eventually(WAIT, "the fix acknowledged over WebSocket", async || {
        (first.acked_seq() >= seq).then_some(())
    })
    .await;

    // The same network again: straight to WebSocket, no QUIC timeout.
    let started = Instant::now();
    let second = connector
        .driver(node.node.quic_addr, &driver_token("ws-2"), available())
        .await
        .unwrap();
    let remembered = started.elapsed();
    assert_eq!(second.transport(), Transport::WebSocket);
    println!("fallback to WebSocket: {fell_back:?} (QUIC alone for {DEFAULT_QUIC_TIMEOUT:?}); remembered: {remembered:?}");

    // UDP comes back and the memory expires: QUIC is tried first again.
    connector.simulate_udp_blocked(false);
    eventually(WAIT, "the memory of the network expires", async || {
        (!connector.remembers_websocket()).then_some(())
    })
    .await;
    let third = connector
        .driver(node.node.quic_addr, &driver_token("ws-3"), available())
        .await
        .unwrap();
    assert_eq!(third.transport(), Transport::Quic);
    assert_eq!(node.metric("hexfleet_websocket_sessions_total").await, 2.0);
    first.goodbye().await.unwrap();
    node.stop().await;
}

#[tokio::test]
async fn a_rider_over_websocket_sees_a_quic_driver_move() {
    let (node, connector) = blocked().await;
    let rider = connector
        .rider(
            node.node.quic_addr,
            &token(Role::Rider, "ws-rider"),
            hexfleet_client::RiderOptions::default(),
        )
        .await
        .unwrap();
    assert_eq!(rider.transport(), Some(Transport::WebSocket));
    let id = rider.subscribe(hexfleet_client::Subscription::around(59.33, 18.06, 800.0));
    rider.wait_for(id, WAIT).await.unwrap();
    let mut driver = node.driver("quic-driver", available()).await;
    assert_eq!(driver.transport(), Transport::Quic);
    for step in 0..5 {
        driver
            .send_fix(FixInput::at(59.33, 18.06 + f64::from(step) * 1e-4))
            .await
            .unwrap();
    }
    eventually(WAIT, "the driver's last position in view", async || {
        rider
            .view()
            .values()
            .any(|v| (v.lon - (18.06 + 4e-4)).abs() < 1e-6)
            .then_some(())
    })
    .await;
    assert!(rider.stats().bytes > 0);
    driver.goodbye().await.unwrap();
    eventually(WAIT, "the driver gone from view", async || {
        rider.view().is_empty().then_some(())
    })
    .await;
    rider.close().await;
    node.stop().await;
}

/// A raw WebSocket to a node's `/v1/connect` (plain HTTP: the node is a
/// test node).
async fn raw(
    node: &TestNode,
) -> tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>> {
    let url = format!("ws://{}{}", node.node.http_addr, ws::PATH);
    tokio_tungstenite::connect_async(url).await.unwrap().0
}

/// Reads until the node closes; returns the close code and the `Error`
/// frame sent before it, if any.
async fn closed_with(
    socket: &mut tokio_tungstenite::WebSocketStream<
        tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>,
    >,
) -> (Option<u16>, Option<ErrorCode>) {
    let mut error = None;
    let read = async {
        while let Some(Ok(message)) = socket.next().await {
            match message {
                Message::Binary(bytes) => {
                    if let Ok(ServerMsg::Error(e)) = ws::decode(Channel::Control, &bytes) {
                        error = Some(e.code);
                    }
                }
                Message::Close(frame) => return frame.map(|f| u16::from(f.code)),
                _ => {}
            }
        }
        None
    };
    let code = tokio::time::timeout(WAIT, read)
        .await
        .expect("the node closes");
    (code, error)
}

fn hello(role: Role, token: String) -> Message {
    let hello = ClientMsg::Hello(Hello {
        version: PROTOCOL_VERSION,
        role,
        token,
        unreachable: Vec::new(),
    });
    Message::Binary(ws::encode(Channel::Control, &hello).unwrap().into())
}

#[tokio::test]
async fn bad_websocket_input_gets_a_code_and_a_reason_and_is_counted() {
    let node =
        TestNode::start_with(None, |c| c.quic.handshake_timeout = Duration::from_secs(1)).await;
    let refused = async |code: &str| {
        node.metric(&format!(
            "hexfleet_sessions_refused_total{{code=\"{code}\"}}"
        ))
        .await
    };

    // Text is not part of the protocol.
    let mut socket = raw(&node).await;
    socket.send(Message::text("{\"hello\":1}")).await.unwrap();
    let (code, error) = closed_with(&mut socket).await;
    assert_eq!(code, Some(u16::from(CloseCode::Protocol)));
    assert_eq!(error, Some(ErrorCode::ProtocolViolation));

    // A channel that does not exist.
    let mut socket = raw(&node).await;
    socket
        .send(Message::Binary(vec![7, 1, 0xc0].into()))
        .await
        .unwrap();
    assert_eq!(
        closed_with(&mut socket).await.1,
        Some(ErrorCode::ProtocolViolation)
    );

    // A message over the frame limit.
    let mut socket = raw(&node).await;
    let huge = vec![0u8; hexfleet_protocol::MAX_FRAME_LEN + 100];
    let _ = socket.send(Message::Binary(huge.into())).await;
    assert_eq!(
        closed_with(&mut socket).await.1,
        Some(ErrorCode::ProtocolViolation)
    );
    eventually(WAIT, "three protocol violations counted", async || {
        (refused("protocol_violation").await >= 3.0).then_some(())
    })
    .await;

    // A forged token, and a dashboard's token: refused with their reasons.
    let mut socket = raw(&node).await;
    socket
        .send(hello(Role::Driver, "not-a-token".into()))
        .await
        .unwrap();
    let (code, error) = closed_with(&mut socket).await;
    assert_eq!(code, Some(4401));
    assert_eq!(error, Some(ErrorCode::Unauthorized));
    let mut socket = raw(&node).await;
    socket
        .send(hello(Role::Dashboard, token(Role::Dashboard, "ops")))
        .await
        .unwrap();
    assert_eq!(
        closed_with(&mut socket).await.1,
        Some(ErrorCode::BadRequest)
    );

    // A driver that says nothing: closed when the handshake time is up.
    let mut socket = raw(&node).await;
    assert_eq!(
        closed_with(&mut socket).await.1,
        Some(ErrorCode::ProtocolViolation)
    );
    assert_eq!(refused("unauthorized").await, 1.0);
    assert_eq!(refused("bad_request").await, 1.0);

    // A flood of fixes over WebSocket meets the same budget as over QUIC.
    let mut socket = raw(&node).await;
    socket
        .send(hello(Role::Driver, driver_token("flood")))
        .await
        .unwrap();
    let now = now_ms();
    for seq in 1..=400u64 {
        let fix = ClientMsg::Fix(hexfleet_protocol::Fix {
            seq,
            fix_time_ms: now,
            lat: 59.33,
            lon: 18.06,
            heading_deg: 0.0,
            speed_mps: 0.0,
            accuracy_m: 5.0,
        });
        let message = ws::encode(Channel::Control, &fix).unwrap();
        socket.send(Message::Binary(message.into())).await.unwrap();
    }
    eventually(
        WAIT,
        "fixes over the budget refused and counted",
        async || {
            let limited = node
                .metric("hexfleet_fixes_rejected_total{reason=\"rate_limited\"}")
                .await;
            (limited >= 100.0).then_some(())
        },
    )
    .await;
    drop(socket);

    // And none of it touched a good client.
    let mut driver = node.driver("bystander", available()).await;
    let seq = driver.send_fix(FixInput::at(59.33, 18.06)).await.unwrap();
    eventually(WAIT, "the bystander's fix acknowledged", async || {
        (driver.acked_seq() >= seq).then_some(())
    })
    .await;
    node.stop().await;
}

#[tokio::test]
async fn a_websocket_session_lives_on_pings_and_a_silent_one_is_taken_for_gone() {
    let quick = |c: &mut hexfleet_node::config::Config| {
        c.quic.idle_timeout = Duration::from_secs(1);
        c.ingest.offline_grace = Duration::from_millis(200);
    };
    let node = TestNode::start_with(None, |c| {
        quick(c);
        c.http.tls = true;
    })
    .await;
    // An SDK client that says nothing for three idle timeouts: its pings
    // keep the session.
    let connector = node
        .connector()
        .with_transport(hexfleet_client::TransportPolicy::WebSocketOnly)
        .with_liveness(Duration::from_millis(200), Duration::from_secs(1));
    connector.set_https_address(node.node.quic_addr, node.node.http_addr);
    let mut driver = connector
        .driver(node.node.quic_addr, &driver_token("quiet"), available())
        .await
        .unwrap();
    assert_eq!(driver.transport(), Transport::WebSocket);
    let seq = driver.send_fix(FixInput::at(59.33, 18.06)).await.unwrap();
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert!(
        driver.closed_error().is_none(),
        "{:?}",
        driver.closed_error()
    );
    let later = driver.send_fix(FixInput::at(59.33, 18.0601)).await.unwrap();
    eventually(
        WAIT,
        "a fix after the quiet spell acknowledged",
        async || (driver.acked_seq() >= later && later > seq).then_some(()),
    )
    .await;
    assert_eq!(node.metric("hexfleet_sessions_lost_total").await, 0.0);

    driver.goodbye().await.unwrap();
    node.stop().await;

    // A raw client that says Hello and then nothing, not even a pong.
    let node = TestNode::start_with(None, quick).await;
    let mut socket = raw(&node).await;
    socket
        .send(hello(Role::Rider, token(Role::Rider, "mute")))
        .await
        .unwrap();
    eventually(WAIT, "the mute session lost", async || {
        (node.metric("hexfleet_sessions_lost_total").await == 1.0).then_some(())
    })
    .await;
    assert_eq!(node.metric("hexfleet_connections").await, 0.0);
    drop(socket);
    node.stop().await;
}

/// A TCP relay to `to` that can freeze: nothing passes either way, as when
/// a node hangs or a path goes dark without a reset.
async fn relay(
    to: std::net::SocketAddr,
) -> (std::net::SocketAddr, tokio::sync::watch::Sender<bool>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (frozen, _) = tokio::sync::watch::channel(false);
    let freeze = frozen.clone();
    tokio::spawn(async move {
        while let Ok((inbound, _)) = listener.accept().await {
            let Ok(outbound) = tokio::net::TcpStream::connect(to).await else {
                continue;
            };
            let (ri, wi) = inbound.into_split();
            let (ro, wo) = outbound.into_split();
            for (mut from, mut to) in [
                (
                    Box::new(ri) as Box<dyn tokio::io::AsyncRead + Send + Unpin>,
                    Box::new(wo) as Box<dyn tokio::io::AsyncWrite + Send + Unpin>,
                ),
                (Box::new(ro), Box::new(wi)),
            ] {
                let mut frozen = freeze.subscribe();
                tokio::spawn(async move {
                    use tokio::io::{AsyncReadExt, AsyncWriteExt};
                    let mut buf = vec![0u8; 16 * 1024];
                    loop {
                        let n = match from.read(&mut buf).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => n,
                        };
                        // Frozen: hold everything, forever.
                        if frozen.wait_for(|f| !*f).await.is_err() {
                            return;
                        }
                        if to.write_all(&buf[..n]).await.is_err() {
                            return;
                        }
                    }
                });
            }
        }
    });
    (addr, frozen)
}

#[tokio::test]
async fn a_websocket_client_takes_a_silent_node_for_gone() {
    let node = TestNode::start_with(None, |c| c.http.tls = true).await;
    let (via, frozen) = relay(node.node.http_addr).await;
    let connector = node
        .connector()
        .with_transport(hexfleet_client::TransportPolicy::WebSocketOnly)
        .with_liveness(Duration::from_millis(200), Duration::from_secs(1));
    connector.set_https_address(node.node.quic_addr, via);
    let driver = connector
        .driver(
            node.node.quic_addr,
            &driver_token("behind-a-relay"),
            available(),
        )
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert!(driver.closed_error().is_none(), "alive while the path is");
    frozen.send_replace(true);
    let started = Instant::now();
    let why = tokio::time::timeout(WAIT, driver.closed())
        .await
        .expect("the silent node noticed");
    println!("silent node noticed after {:?}: {why}", started.elapsed());
    assert!(why.to_string().contains("silent"), "{why}");
    node.stop().await;
}
