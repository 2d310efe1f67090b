//! Who gets in, as whom, for how long, and how much: JWTs with rotating
//! keys, roles, expiry, the fix budget, connection limits, QUIC Retry, and
//! HTTPS/WSS with a certificate reloaded under open connections.

use std::{path::Path, sync::Arc, time::Duration};

use futures_util::{SinkExt, StreamExt};
use hexfleet_client::{ClientError, Connector, FixInput};
use hexfleet_model::VehicleId;
use hexfleet_protocol::{
    dev::DEV_SERVER_NAME, token::hs256_jwks, Claims, ErrorCode, Role, SigningKey,
};
use hexfleet_tests::*;
use tokio_tungstenite::tungstenite::Message;

const WAIT: Duration = Duration::from_secs(20);

fn signed(role: Role, id: &str, kid: &str, secret: &[u8], ttl_s: u64) -> String {
    let now = now_s();
    Claims::new(role, VehicleId::new(id).unwrap(), now + ttl_s)
        .issued(now)
        .sign(&SigningKey::hs256(secret).with_kid(kid))
        .unwrap()
}

fn refused_code(result: Result<impl Sized, ClientError>) -> ErrorCode {
    match result {
        Err(ClientError::Refused { code, .. }) => code,
        Err(other) => panic!("expected a refusal, got {other}"),
        Ok(_) => panic!("expected a refusal, got a session"),
    }
}

/// Writes `text` to `path` whole (a rename), as a secret mount updates.
fn replace(path: &Path, text: &[u8]) {
    let tmp = path.with_extension("new");
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

#[tokio::test]
async fn keys_rotate_on_a_live_node_old_and_new_accepted_during_the_rotation() {
    let dir = tempfile::tempdir().unwrap();
    let keys = dir.path().join("jwks.json");
    let (old, new) = (
        b"old-key-0123456789abcdef".as_slice(),
        b"new-key-0123456789abcdef".as_slice(),
    );
    std::fs::write(&keys, hs256_jwks(&[("2026-10", old)])).unwrap();
    let node = TestNode::start_with(None, |c| {
        c.auth.jwks = Some(keys.clone());
        c.tls.reload_interval = Duration::from_millis(100);
    })
    .await;
    let connect = |token: String| {
        let (connector, addr) = (node.connector(), node.node.quic_addr);
        async move { connector.driver(addr, &token, available()).await }
    };
    let old_token = signed(Role::Driver, "drv-k", "2026-10", old, 3600);
    let new_token = signed(Role::Driver, "drv-k", "2026-11", new, 3600);
    connect(old_token.clone())
        .await
        .expect("the old key is accepted");
    assert_eq!(
        refused_code(connect(new_token.clone()).await),
        ErrorCode::Unauthorized
    );

    // The rotation starts: both keys are published.
    replace(
        &keys,
        hs256_jwks(&[("2026-10", old), ("2026-11", new)]).as_bytes(),
    );
    eventually(WAIT, "the new key is accepted", async || {
        connect(new_token.clone()).await.ok().map(|_| ())
    })
    .await;
    connect(old_token.clone())
        .await
        .expect("the old key still is");

    // A broken file keeps the keys loaded, and says so.
    replace(&keys, b"{ not json");
    eventually(WAIT, "the failed reload counted", async || {
        (node
            .metric("hexfleet_reloads_total{what=\"auth\",result=\"failed\"}")
            .await
            >= 1.0)
            .then_some(())
    })
    .await;
    connect(new_token.clone())
        .await
        .expect("keys kept after a bad file");

    // The rotation ends: the old key is withdrawn.
    replace(&keys, hs256_jwks(&[("2026-11", new)]).as_bytes());
    eventually(WAIT, "the old key is refused", async || {
        connect(old_token.clone()).await.is_err().then_some(())
    })
    .await;
    connect(new_token).await.expect("the new key stays");
    // The shared secret still verifies tokens without a kid.
    connect(driver_token("drv-k"))
        .await
        .expect("no kid: the default key");
    node.stop().await;
}

#[tokio::test]
async fn each_role_may_do_only_its_part() {
    let node = TestNode::start(None).await;
    let (connector, addr) = (node.connector(), node.node.quic_addr);
    // A rider's or a dashboard's token cannot publish.
    for role in [Role::Rider, Role::Dashboard] {
        let refused = connector
            .driver(addr, &token(role, "x-1"), available())
            .await;
        assert_eq!(refused_code(refused), ErrorCode::Unauthorized, "{role:?}");
    }
    // A driver's token publishes its own vehicle, the token's subject.
    let mut driver = node.driver("drv-own", available()).await;
    let seq = driver.send_fix(FixInput::at(59.33, 18.06)).await.unwrap();
    eventually(WAIT, "the fix acknowledged", async || {
        (driver.acked_seq() == seq).then_some(())
    })
    .await;
    assert_eq!(node.get_json("/v1/vehicles/drv-own").await.0, 200);
    assert_eq!(node.node.table.len(), 1);

    // The HTTP API reads positions for a dashboard's token only.
    let get = |path: &str, token: Option<String>| {
        let request = node.http.get(node.url(path));
        let request = match token {
            Some(t) => request.bearer_auth(t),
            None => request,
        };
        async move { request.send().await.unwrap() }
    };
    let none = get("/v1/vehicles/drv-own", None).await;
    assert_eq!(none.status(), 401);
    assert!(none.headers().contains_key("www-authenticate"));
    for role in [Role::Driver, Role::Rider] {
        let resp = get("/v1/vehicles/drv-own", Some(token(role, "x-1"))).await;
        assert_eq!(resp.status(), 401, "{role:?}");
    }
    let forged = format!("{}x", token(Role::Dashboard, "ops"));
    assert_eq!(get("/v1/cluster", Some(forged)).await.status(), 401);
    assert_eq!(
        get("/v1/cluster", Some(token(Role::Dashboard, "ops")))
            .await
            .status(),
        200
    );
    // Metrics and probes are on the admin listener, not the public one.
    assert_eq!(get("/metrics", None).await.status(), 404);
    for path in ["/metrics", "/healthz", "/livez", "/readyz"] {
        let resp = node.http.get(node.admin_url(path)).send().await.unwrap();
        assert_eq!(resp.status(), 200, "{path}");
    }
    let refused = node
        .metric("hexfleet_http_requests_total{route=\"/v1/vehicles/{id}\",status=\"401\"}")
        .await;
    assert_eq!(refused, 3.0);
    // A driver's token does not open a dashboard.
    let mut ws =
        dashboard::DashboardSocket::connect(&node, &format!("token={}", token(Role::Driver, "d")))
            .await
            .unwrap();
    assert_eq!(ws.closed().await.0, 4401);
    node.stop().await;
}

#[tokio::test]
async fn a_session_ends_when_its_token_expires() {
    let node = TestNode::start(None).await;
    let short = |role, id| {
        let now = now_s();
        Claims::new(role, VehicleId::new(id).unwrap(), now + 2)
            .issued(now)
            .mint(SECRET.as_bytes())
    };
    let connector = node.connector();
    let driver = connector
        .driver(
            node.node.quic_addr,
            &short(Role::Driver, "drv-exp"),
            available(),
        )
        .await
        .unwrap();
    let rider = connector
        .rider(
            node.node.quic_addr,
            &short(Role::Rider, "rdr-exp"),
            hexfleet_client::RiderOptions::default(),
        )
        .await
        .unwrap();
    let mut ws = dashboard::DashboardSocket::connect(
        &node,
        &format!("token={}", short(Role::Dashboard, "dash-exp")),
    )
    .await
    .unwrap();
    let started = std::time::Instant::now();
    let closed = tokio::time::timeout(WAIT, driver.closed()).await.unwrap();
    assert!(
        matches!(
            closed,
            ClientError::Refused {
                code: ErrorCode::TokenExpired,
                ..
            }
        ),
        "{closed}"
    );
    let waited = started.elapsed();
    assert!(waited < Duration::from_secs(5), "closed after {waited:?}");
    let (code, reason) = ws.closed().await;
    assert_eq!(code, 4401);
    assert!(reason.contains("expired"), "{reason}");
    eventually(WAIT, "the rider closed too", async || {
        rider
            .closed_by_node()
            .filter(|(code, _)| *code == ErrorCode::TokenExpired)
            .map(|_| ())
    })
    .await;
    assert_eq!(
        node.metric("hexfleet_sessions_refused_total{code=\"token_expired\"}")
            .await,
        2.0
    );
    node.stop().await;
}

#[tokio::test]
async fn fixes_beyond_the_budget_are_dropped_and_counted_and_persistent_abuse_closes() {
    let node = TestNode::start_with(None, |c| {
        c.ingest.fixes.per_second = 5.0;
        c.ingest.fixes.burst = 10;
        c.ingest.fixes.close_after = 40;
    })
    .await;
    let mut driver = node.driver("drv-flood", available()).await;
    let t0 = now_ms();
    let mut i = 0;
    let mut send = async |n: i64, driver: &mut hexfleet_client::DriverClient| {
        for _ in 0..n {
            let fix = FixInput {
                fix_time_ms: Some(t0 + i),
                ..FixInput::at(59.33 + i as f64 * 1e-6, 18.06)
            };
            i += 1;
            if driver.send_fix(fix).await.is_err() {
                return;
            }
        }
    };
    send(30, &mut driver).await;
    eventually(WAIT, "the excess counted", async || {
        let rejected = node
            .metric("hexfleet_fixes_rejected_total{reason=\"rate_limited\"}")
            .await;
        (rejected >= 15.0 && driver.stats().rejected_total >= 15).then_some(())
    })
    .await;
    let accepted = node.metric("hexfleet_fixes_accepted_total").await;
    assert!((10.0..=13.0).contains(&accepted), "accepted {accepted}");
    // Going on past close_after refusals closes the connection.
    send(60, &mut driver).await;
    let closed = tokio::time::timeout(WAIT, driver.closed()).await.unwrap();
    assert!(
        matches!(
            closed,
            ClientError::Refused {
                code: ErrorCode::RateLimited,
                ..
            }
        ),
        "{closed}"
    );
    node.stop().await;
}

#[tokio::test]
async fn connections_from_one_address_are_capped_and_a_handshake_flood_meets_retry() {
    let node = TestNode::start_with(None, |c| {
        c.quic.max_connections_per_address = 2;
        // Every handshake must prove its address first.
        c.quic.retry_above_handshakes = 0;
    })
    .await;
    let first = node.driver("drv-a1", available()).await;
    let _second = node.driver("drv-a2", available()).await;
    let third = node
        .connector()
        .driver(node.node.quic_addr, &driver_token("drv-a3"), available())
        .await;
    assert!(third.is_err(), "a third connection from one address got in");
    assert_eq!(
        node.metric("hexfleet_connections_refused_total{reason=\"address_limit\"}")
            .await,
        1.0
    );
    assert!(node.metric("hexfleet_handshakes_retried_total").await >= 2.0);
    first.goodbye().await.unwrap();
    eventually(WAIT, "a slot frees when a connection ends", async || {
        node.connector()
            .driver(node.node.quic_addr, &driver_token("drv-a3"), available())
            .await
            .ok()
            .map(|_| ())
    })
    .await;
    node.stop().await;
}

/// A self-signed certificate for localhost, written as PEM files.
fn certificate(dir: &Path, name: &str) -> (std::path::PathBuf, std::path::PathBuf, Vec<u8>) {
    let made = rcgen::generate_simple_self_signed(vec!["localhost".into()]).unwrap();
    let (cert, key) = (
        dir.join(format!("{name}.pem")),
        dir.join(format!("{name}.key")),
    );
    std::fs::write(&cert, made.cert.pem()).unwrap();
    std::fs::write(&key, made.signing_key.serialize_pem()).unwrap();
    (cert, key, made.cert.der().to_vec())
}

fn trusting(der: &[u8]) -> Arc<rustls::ClientConfig> {
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(rustls::pki_types::CertificateDer::from(der.to_vec()))
        .unwrap();
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    Arc::new(
        rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth(),
    )
}

fn https(der: &[u8]) -> reqwest::Client {
    reqwest::Client::builder()
        .use_preconfigured_tls((*trusting(der)).clone())
        .timeout(Duration::from_secs(5))
        .build()
        .unwrap()
}

#[tokio::test]
async fn https_and_wss_serve_the_configured_certificate_and_a_reload_drops_no_connection() {
    let dir = tempfile::tempdir().unwrap();
    let (cert, key, der_a) = certificate(dir.path(), "a");
    let node = TestNode::start_with(None, |c| {
        c.http.tls = true;
        c.tls.cert = Some(cert.clone());
        c.tls.key = Some(key.clone());
        c.tls.reload_interval = Duration::from_millis(100);
    })
    .await;
    let port = node.node.http_addr.port();
    let reader = token(Role::Dashboard, "ops");
    let url = format!("https://localhost:{port}/v1/cluster");
    let resp = https(&der_a)
        .get(&url)
        .bearer_auth(&reader)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    // Plain HTTP on the HTTPS port gets nowhere.
    let plain = reqwest::Client::new()
        .get(format!("http://127.0.0.1:{port}/v1/cluster"))
        .timeout(Duration::from_secs(5))
        .send()
        .await;
    assert!(plain.map_or(true, |r| !r.status().is_success()));

    // A WSS dashboard, open across the reload.
    let tcp = tokio::net::TcpStream::connect(node.node.http_addr)
        .await
        .unwrap();
    let tls = tokio_rustls::TlsConnector::from(trusting(&der_a))
        .connect("localhost".try_into().unwrap(), tcp)
        .await
        .unwrap();
    let (mut ws, _) = tokio_tungstenite::client_async(
        format!("wss://localhost:{port}/v1/ws?token={reader}"),
        tls,
    )
    .await
    .unwrap();
    let hello = ws.next().await.unwrap().unwrap();
    assert!(hello.to_text().unwrap().contains("hello"), "{hello:?}");

    // The certificate is renewed under the running node.
    let (new_cert, new_key, der_b) = certificate(dir.path(), "b");
    replace(&key, &std::fs::read(&new_key).unwrap());
    replace(&cert, &std::fs::read(&new_cert).unwrap());
    eventually(WAIT, "new handshakes get the new certificate", async || {
        let resp = https(&der_b)
            .get(&url)
            .bearer_auth(&reader)
            .send()
            .await
            .ok()?;
        (resp.status() == 200).then_some(())
    })
    .await;
    assert!(
        https(&der_a)
            .get(&url)
            .bearer_auth(&reader)
            .send()
            .await
            .is_err(),
        "the old certificate is still served"
    );
    // QUIC uses the same certificate.
    Connector::new(&new_cert, DEV_SERVER_NAME)
        .unwrap()
        .driver(node.node.quic_addr, &driver_token("drv-tls"), available())
        .await
        .expect("QUIC with the new certificate");
    // The socket opened before the reload still works.
    let viewport = serde_json::json!({"type": "viewport", "id": 1,
        "bbox": {"south": 59.3, "west": 18.0, "north": 59.4, "east": 18.1}, "zoom": 15});
    ws.send(Message::text(viewport.to_string())).await.unwrap();
    let answer = tokio::time::timeout(WAIT, ws.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert!(answer.is_text(), "{answer:?}");
    assert!(
        node.metric("hexfleet_reloads_total{what=\"tls\",result=\"ok\"}")
            .await
            >= 1.0
    );
    node.stop().await;
}

#[tokio::test]
async fn a_websocket_ping_flood_is_closed_like_a_request_flood() {
    let node = TestNode::start_with(None, |c| {
        c.dashboard.requests.per_second = 5.0;
        c.dashboard.requests.burst = 10;
        c.dashboard.requests.close_after = 50;
    })
    .await;
    let url = format!(
        "ws://{}/v1/ws?token={}",
        node.node.http_addr,
        token(Role::Dashboard, "pinger")
    );
    let (mut ws, _) = tokio_tungstenite::connect_async(url).await.unwrap();
    let (mut sent, deadline) = (0, std::time::Instant::now() + WAIT);
    let closed = loop {
        if sent < 10_000 && ws.send(Message::Ping(vec![1u8; 8].into())).await.is_ok() {
            sent += 1;
        }
        match tokio::time::timeout(Duration::from_millis(1), ws.next()).await {
            Ok(Some(Ok(Message::Close(frame)))) => break frame.map(|f| u16::from(f.code)),
            Ok(None | Some(Err(_))) => break None,
            _ if std::time::Instant::now() > deadline => break None,
            _ => {}
        }
    };
    assert_eq!(closed, Some(4429), "after {sent} pings");
    assert!(sent < 1_000, "closed only after {sent} pings");
    node.stop().await;
}

#[tokio::test]
async fn a_websocket_message_over_the_limit_closes_the_socket_with_a_reason() {
    let node = TestNode::start(None).await;
    let query = format!("token={}", token(Role::Dashboard, "big"));
    let mut socket = dashboard::DashboardSocket::connect(&node, &query)
        .await
        .unwrap();
    let big = format!(r#"{{"type":"find","id":"{}"}}"#, "x".repeat(20 * 1024));
    socket.send_text(&big).await;
    let (code, reason) = socket.closed().await;
    assert_eq!(code, 1009, "{reason}");
    assert!(
        node.metric("hexfleet_dashboard_errors_total{reason=\"too_big\"}")
            .await
            >= 1.0
    );
    node.stop().await;
}
