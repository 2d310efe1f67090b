//! The node's HTTP API: health, metrics, and clear JSON errors for bad
//! queries.

use std::time::Duration;

use hexfleet_client::FixInput;
use hexfleet_tests::*;

#[tokio::test]
async fn healthz_reports_the_node_and_its_store() {
    let redis = RedisServer::start();
    let node = TestNode::start(Some(&redis)).await;
    let (status, body) = node.admin_json("/healthz").await;
    assert_eq!(status, 200);
    assert_eq!(body["node"], "test-node");
    assert_eq!(body["store"]["kind"], "redis");
    assert_eq!(body["store"]["ok"], true);
    node.stop().await;

    let node = TestNode::start(None).await;
    let (_, body) = node.admin_json("/healthz").await;
    assert_eq!(body["store"]["kind"], "memory");
    node.stop().await;
}

#[tokio::test]
async fn metrics_count_connections_fixes_and_flushes() {
    let node = TestNode::start(None).await;
    let mut driver = node
        .connector()
        .driver(node.node.quic_addr, &driver_token("drv-m"), available())
        .await
        .unwrap();
    let seq = driver.send_fix(FixInput::at(59.33, 18.06)).await.unwrap();
    eventually(
        std::time::Duration::from_secs(10),
        "the fix flushed",
        async || {
            (node.get_json("/v1/vehicles/drv-m").await.0 == 200 && driver.acked_seq() == seq)
                .then_some(())
        },
    )
    .await;
    let text = node.metrics().await;
    for series in [
        "hexfleet_connections 1",
        "hexfleet_connections_accepted_total 1",
        "hexfleet_fixes_accepted_total 1",
        "hexfleet_store_flush_seconds_count",
        "hexfleet_store_flush_batch_size_count",
    ] {
        assert!(text.contains(series), "{series} missing from:\n{text}");
    }
    node.stop().await;
}

#[tokio::test]
async fn bad_queries_get_a_400_with_a_json_reason() {
    let node = TestNode::start(None).await;
    let cases = [
        ("/v1/vehicles?lon=1&radius_m=10", "lat is required"),
        (
            "/v1/vehicles?lat=abc&lon=1&radius_m=10",
            "lat must be a finite number",
        ),
        (
            "/v1/vehicles?lat=NaN&lon=1&radius_m=10",
            "lat must be a finite number",
        ),
        ("/v1/vehicles?lat=91&lon=1&radius_m=10", "latitude"),
        ("/v1/vehicles?lat=89&lon=1&radius_m=10", "geo index"),
        ("/v1/vehicles?lat=1&lon=-200&radius_m=10", "longitude"),
        ("/v1/vehicles?lat=1&lon=1&radius_m=0", "radius_m"),
        ("/v1/vehicles?lat=1&lon=1&radius_m=1e9", "radius_m"),
        ("/v1/vehicles?lat=1&lon=1&radius_m=10&limit=0", "limit"),
        ("/v1/vehicles?lat=1&lon=1&radius_m=10&limit=2.5", "limit"),
        ("/v1/vehicles/not%20an%20id", "invalid vehicle id"),
    ];
    for (path, needle) in cases {
        let (status, body) = node.get_json(path).await;
        assert_eq!(status, 400, "{path}: {body}");
        let error = body["error"].as_str().unwrap();
        assert!(
            error.contains(needle),
            "{path}: {error:?} should mention {needle:?}"
        );
    }
    let (status, body) = node.get_json("/v1/vehicles/nobody").await;
    assert_eq!(status, 404);
    assert!(body["error"].as_str().unwrap().contains("nobody"));
    let (status, _) = node.get_json("/v1/nothing-here").await;
    assert_eq!(status, 404);
    let (status, body) = node.get_json("/v1/vehicles?lat=1&lon=1&radius_m=10").await;
    assert_eq!((status, body["count"].as_u64()), (200, Some(0)));
    node.stop().await;
}

/// Reads until the node closes the connection; true if it does within WAIT.
async fn closed_by_node(stream: &mut tokio::net::TcpStream) -> bool {
    use tokio::io::AsyncReadExt;
    let mut buf = [0u8; 1024];
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        match tokio::time::timeout_at(deadline, stream.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => return true,
            Ok(Ok(_)) => continue,
            Err(_) => return false,
        }
    }
}

#[tokio::test]
async fn a_client_that_withholds_or_trickles_its_headers_is_cut_off() {
    use tokio::io::AsyncWriteExt;
    let node =
        TestNode::start_with(None, |c| c.http.header_timeout = Duration::from_millis(300)).await;
    let mut silent = tokio::net::TcpStream::connect(node.node.http_addr)
        .await
        .unwrap();
    let mut trickler = tokio::net::TcpStream::connect(node.node.http_addr)
        .await
        .unwrap();
    let trickle = async {
        trickler
            .write_all(b"GET /healthz HTTP/1.1\r\n")
            .await
            .unwrap();
        for _ in 0..200 {
            if trickler.write_all(b"X: y\r\n").await.is_err() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        closed_by_node(&mut trickler).await
    };
    let (silent_closed, trickler_closed) = tokio::join!(closed_by_node(&mut silent), trickle);
    assert!(silent_closed, "a connection that sends nothing is closed");
    assert!(trickler_closed, "a connection trickling headers is closed");
    // Others are served as ever.
    assert_eq!(node.admin_json("/healthz").await.0, 200);
    node.stop().await;
}

#[tokio::test]
async fn connections_beyond_the_cap_wait_until_one_closes() {
    let node = TestNode::start_with(None, |c| c.http.max_connections = 1).await;
    let idle = tokio::net::TcpStream::connect(node.node.http_addr)
        .await
        .unwrap();
    // The one slot is taken: a request on a new connection is not served.
    let waiting = reqwest::Client::new()
        .get(node.url("/"))
        .timeout(Duration::from_millis(500))
        .send()
        .await;
    assert!(waiting.is_err(), "served beyond the cap: {waiting:?}");
    drop(idle);
    eventually(
        Duration::from_secs(20),
        "served once the slot frees",
        async || {
            let fresh = reqwest::Client::new();
            let resp = fresh.get(node.url("/")).send().await.ok()?;
            (resp.status() == 200).then_some(())
        },
    )
    .await;
    node.stop().await;
}

#[tokio::test]
async fn metrics_are_openmetrics_under_their_own_content_type_and_parse_with_their_types() {
    use openmetrics_parser::{openmetrics::parse_openmetrics, OpenMetricsType};
    let node = TestNode::start(None).await;
    // Something in every kind of metric: a session, a fix, a rejection.
    let mut driver = node.driver("drv-om", available()).await;
    let seq = driver.send_fix(FixInput::at(59.33, 18.06)).await.unwrap();
    driver.send_fix(FixInput::at(0.0, 0.0)).await.unwrap();
    eventually(Duration::from_secs(10), "both fixes answered", async || {
        let s = driver.stats();
        (s.acked_seq == seq && s.rejected_total == 1).then_some(())
    })
    .await;
    let resp = node
        .http
        .get(node.admin_url("/metrics"))
        .send()
        .await
        .unwrap();
    let content_type = resp.headers()["content-type"].to_str().unwrap().to_string();
    assert_eq!(
        content_type,
        "application/openmetrics-text; version=1.0.0; charset=utf-8"
    );
    let text = resp.text().await.unwrap();
    let parsed = parse_openmetrics(&text).unwrap_or_else(|e| panic!("{e:?} in:\n{text}"));
    let kind = |name: &str| {
        parsed
            .families
            .get(name)
            .map(|f| f.family_type)
            .unwrap_or_else(|| panic!("{name} missing"))
    };
    assert_eq!(kind("hexfleet_fixes_accepted"), OpenMetricsType::Counter);
    assert_eq!(kind("hexfleet_fixes_rejected"), OpenMetricsType::Counter);
    assert_eq!(kind("hexfleet_sessions_lost"), OpenMetricsType::Counter);
    assert_eq!(kind("hexfleet_connections"), OpenMetricsType::Gauge);
    assert_eq!(
        kind("hexfleet_store_flush_seconds"),
        OpenMetricsType::Histogram
    );
    node.stop().await;
}
