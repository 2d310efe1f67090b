//! The dashboard page in a real headless Chromium, driven over WebDriver
//! (Debian's `chromium` and `chromium-driver`; `scripts/test.sh` installs
//! them): the live map draws the fleet, follows it as it moves, and finds a
//! vehicle by id, shows counts when zoomed out, and reconnects to a node
//! that comes back. Screenshots are saved to `target/dashboard-browser.png`
//! and `target/dashboard-browser-density.png`.

use std::{
    os::unix::process::CommandExt,
    path::PathBuf,
    process::{Child, Command, Stdio},
    time::Duration,
};

use fantoccini::{Client, ClientBuilder, Locator};
use hexfleet_client::{DriverOptions, FixInput};
use hexfleet_model::{VehicleClass, VehicleStatus};
use hexfleet_protocol::{DriverReport, Role};
use hexfleet_tests::*;
use serde_json::{json, Value};
use tokio_util::sync::CancellationToken;

const WAIT: Duration = Duration::from_secs(20);
const FLEET: usize = 40;

/// A `chromedriver` of the test's own, on a free port.
struct ChromeDriver {
    child: Child,
    port: u16,
}

fn binary(env: &str, default: &str) -> PathBuf {
    let path = std::env::var_os(env).map_or_else(|| PathBuf::from(default), PathBuf::from);
    assert!(
        path.exists(),
        "{} not found: install Debian's chromium and chromium-driver (scripts/test.sh does), or set {env}",
        path.display()
    );
    path
}

impl ChromeDriver {
    fn start() -> Self {
        let port = free_tcp_port();
        let child = Command::new(binary("HEXFLEET_CHROMEDRIVER", "/usr/bin/chromedriver"))
            .arg(format!("--port={port}"))
            .arg("--log-level=WARNING")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            // Its own process group, with the browsers it starts: a failed
            // test kills them all rather than leaving Chromium running.
            .process_group(0)
            .spawn()
            .expect("chromedriver starts");
        Self { child, port }
    }

    async fn browser(&self, profile: &std::path::Path) -> Client {
        let chromium = binary("HEXFLEET_CHROMIUM", "/usr/bin/chromium");
        let options = json!({
            "binary": chromium,
            "args": [
                "--headless=new",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-dev-shm-usage",
                "--disable-quic",
                "--no-first-run",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--window-size=1280,800",
                format!("--user-data-dir={}", profile.display()),
            ],
        });
        let mut capabilities = serde_json::Map::new();
        capabilities.insert("browserName".into(), json!("chrome"));
        capabilities.insert("goog:chromeOptions".into(), options);
        let url = format!("http://127.0.0.1:{}", self.port);
        // chromedriver takes a moment to listen.
        eventually(WAIT, "chromedriver opens a session", async || {
            let connector = hyper_util::client::legacy::connect::HttpConnector::new();
            ClientBuilder::new(connector)
                .capabilities(capabilities.clone())
                .connect(&url)
                .await
                .ok()
        })
        .await
    }
}

impl Drop for ChromeDriver {
    fn drop(&mut self) {
        let group = format!("-{}", self.child.id());
        let _ = Command::new("kill").args(["-KILL", "--", &group]).status();
        let _ = self.child.wait();
    }
}

/// Drivers on a small grid, all creeping east until `stop` (or a minute).
async fn moving_fleet(node: &TestNode, stop: CancellationToken) -> tokio::task::JoinHandle<()> {
    let mut drivers = Vec::new();
    for i in 0..FLEET {
        let status = match i % 4 {
            0 | 1 => VehicleStatus::Available,
            2 => VehicleStatus::OnTrip,
            _ => VehicleStatus::OffDuty,
        };
        let report = DriverReport {
            class: VehicleClass::ALL[i % VehicleClass::ALL.len()],
            status,
        };
        let (row, col) = ((i / 8) as f64, (i % 8) as f64);
        let position = (52.515 + row * 0.002, 13.395 + col * 0.002);
        // veh-6's phone clock is an hour ahead (the SDK corrects it).
        let options = DriverOptions {
            clock_skew_ms: if i == 6 { 3_600_000 } else { 0 },
            ..Default::default()
        };
        let id = format!("veh-{i}");
        let driver = node
            .connector()
            .driver_with(node.node.quic_addr, &driver_token(&id), report, options)
            .await
            .expect("the driver connects");
        drivers.push((driver, position));
    }
    tokio::spawn(async move {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
        let mut tick = tokio::time::interval(Duration::from_millis(250));
        while !stop.is_cancelled() && tokio::time::Instant::now() < deadline {
            tick.tick().await;
            for (driver, (lat, lon)) in &mut drivers {
                *lon += 0.00005;
                let fix = FixInput {
                    heading_deg: 90.0,
                    speed_mps: 13.6,
                    ..FixInput::at(*lat, *lon)
                };
                let _ = driver.send_fix(fix).await;
            }
        }
    })
}

/// A fleet moving on a node, and the dashboard page open on it.
struct PageOnFleet {
    stop: CancellationToken,
    fleet: tokio::task::JoinHandle<()>,
    client: Client,
    _chromedriver: ChromeDriver,
    _profile: tempfile::TempDir,
}

/// Starts a moving fleet on `node`, waits until it is live, and opens the
/// dashboard page on it in a fresh Chromium.
async fn page_on_fleet(node: &TestNode) -> PageOnFleet {
    let stop = CancellationToken::new();
    let fleet = moving_fleet(node, stop.clone()).await;
    eventually(WAIT, "the fleet is live", async || {
        (node.node.table.len() == FLEET).then_some(())
    })
    .await;
    let chromedriver = ChromeDriver::start();
    let profile = tempfile::tempdir().unwrap();
    let client = chromedriver.browser(profile.path()).await;
    let page = node.url(&format!("/?token={}", token(Role::Dashboard, "browser")));
    client.goto(&page).await.unwrap();
    PageOnFleet {
        stop,
        fleet,
        client,
        _chromedriver: chromedriver,
        _profile: profile,
    }
}

/// Evaluates a JavaScript expression in the page.
async fn js(client: &Client, expression: &str) -> Value {
    client
        .execute(&format!("return {expression};"), vec![])
        .await
        .expect("the script runs")
}

async fn rendered(client: &Client) -> (u64, String) {
    let v = js(
        client,
        "[document.getElementById('rendered-count').dataset.count, document.getElementById('rendered-count').dataset.digest]",
    )
    .await;
    let count = v[0].as_str().and_then(|s| s.parse().ok()).unwrap_or(0);
    (count, v[1].as_str().unwrap_or_default().to_string())
}

async fn text(client: &Client, id: &str) -> String {
    js(
        client,
        &format!("document.getElementById('{id}').textContent"),
    )
    .await
    .as_str()
    .unwrap_or_default()
    .to_string()
}

/// Saves what the page shows to `target/<name>`.
async fn screenshot(client: &Client, name: &str) {
    let png = client.screenshot().await.unwrap();
    let target = std::env::var_os("CARGO_TARGET_DIR").map_or_else(
        || PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target"),
        PathBuf::from,
    );
    std::fs::create_dir_all(&target).unwrap();
    std::fs::write(target.join(name), png).unwrap();
}

/// Clicks the page's zoom-out button `times` times.
async fn zoom_out(client: &Client, times: usize) {
    for _ in 0..times {
        client
            .find(Locator::Id("zoom-out"))
            .await
            .unwrap()
            .click()
            .await
            .unwrap();
    }
}

#[tokio::test]
async fn the_dashboard_draws_the_live_fleet_and_finds_a_vehicle() {
    let node = TestNode::start(None).await;
    let PageOnFleet {
        stop,
        fleet,
        client,
        _chromedriver,
        _profile,
    } = page_on_fleet(&node).await;

    // The page fits the fleet on connect and draws every vehicle.
    let (_, first_digest) = eventually(WAIT, "every vehicle drawn", async || {
        let (count, digest) = rendered(&client).await;
        (count == FLEET as u64).then_some((count, digest))
    })
    .await;
    assert_eq!(text(&client, "connection").await, "live");
    assert_eq!(text(&client, "total").await, FLEET.to_string());
    assert_eq!(text(&client, "mode").await, "vehicles");

    // Vehicles move on the map.
    eventually(WAIT, "vehicles drawn somewhere new", async || {
        let (count, digest) = rendered(&client).await;
        (count > 0 && digest != first_digest).then_some(())
    })
    .await;

    // Search a vehicle by id: the side panel shows its details.
    let search = client.find(Locator::Id("search-input")).await.unwrap();
    search.send_keys("veh-6").await.unwrap();
    client
        .find(Locator::Css("#search button"))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
    eventually(WAIT, "veh-6's details", async || {
        let shown = text(&client, "detail-id").await == "veh-6"
            && text(&client, "detail-class").await == "comfort"
            && text(&client, "detail-status").await == "on trip"
            && text(&client, "detail-clock").await == "60 min ahead"
            && text(&client, "search-result").await.starts_with("veh-6");
        shown.then_some(())
    })
    .await;
    let details_visible = js(&client, "!document.getElementById('details').hidden").await;
    assert_eq!(details_visible, json!(true));
    // Followed and zoomed in, it stays drawn.
    eventually(WAIT, "veh-6 in view", async || {
        let (count, _) = rendered(&client).await;
        (count >= 1).then_some(())
    })
    .await;

    // Back out to the whole fleet for the picture.
    client
        .execute(
            "document.getElementById('follow').click(); return null;",
            vec![],
        )
        .await
        .unwrap();
    zoom_out(&client, 2).await;
    eventually(WAIT, "the fleet drawn again", async || {
        let (count, _) = rendered(&client).await;
        (count == FLEET as u64).then_some(())
    })
    .await;
    screenshot(&client, "dashboard-browser.png").await;

    // Zoomed out to the region: counts per cell, shaded, same totals.
    zoom_out(&client, 4).await;
    eventually(WAIT, "counts per cell for the whole fleet", async || {
        let synced = js(
            &client,
            "document.getElementById('rendered-count').dataset.synced",
        )
        .await;
        let density = text(&client, "mode").await.starts_with("counts per cell");
        let all = text(&client, "total").await == FLEET.to_string();
        (synced == json!("true") && density && all).then_some(())
    })
    .await;
    screenshot(&client, "dashboard-browser-density.png").await;

    // The node goes away: the page says so and keeps trying; a node on the
    // same address takes over and the page is live again, with its view.
    stop.cancel();
    let _ = fleet.await;
    let http = node.node.http_addr;
    node.stop().await;
    eventually(WAIT, "the page notices", async || {
        let state = js(
            &client,
            "document.getElementById('connection').dataset.state",
        )
        .await;
        (state == json!("reconnecting")).then_some(())
    })
    .await;
    let again = TestNode::start_with(None, |c| c.http.listen = http).await;
    eventually(WAIT, "live again, with the new node's view", async || {
        let state = js(
            &client,
            "document.getElementById('connection').dataset.state",
        )
        .await;
        let (count, _) = rendered(&client).await;
        (state == json!("live") && count == 0).then_some(())
    })
    .await;

    client.close().await.unwrap();
    again.stop().await;
}

#[tokio::test]
async fn the_dashboard_draws_zones_with_their_counts_queue_and_flashes() {
    // A car here drives into the zone faster than any would.
    let node = TestNode::start_with(None, |c| c.ingest.max_speed_mps = 1.0e6).await;
    // A depot over the grid's first two rows (16 vehicles), wide enough to
    // hold them as they creep east.
    let depot = json!({"type": "Feature", "properties": {"name": "Depot", "kind": "depot"},
    "geometry": {"type": "Polygon", "coordinates": [[
        [13.39, 52.5135], [13.45, 52.5135], [13.45, 52.5175], [13.39, 52.5175], [13.39, 52.5135]
    ]]}});
    let put = node
        .http
        .put(node.url("/v1/zones/depot"))
        .bearer_auth(token(Role::Dashboard, "operator"))
        .body(depot.to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(put.status().as_u16(), 201);
    let PageOnFleet {
        stop,
        fleet,
        client,
        _chromedriver,
        _profile,
    } = page_on_fleet(&node).await;
    // Drawn on the map, listed with its live count.
    eventually(WAIT, "the depot drawn and counted", async || {
        let drawn = js(
            &client,
            "document.getElementById('zone-list').dataset.drawn",
        )
        .await;
        let listed = js(
            &client,
            "(document.querySelector('#zone-list li[data-zone=depot]') || {}).textContent || ''",
        )
        .await;
        let listed = listed.as_str().unwrap_or_default().to_string();
        (drawn == json!("1") && listed.contains("Depot") && listed.contains("16 ·")).then_some(())
    })
    .await;
    // Selected: its queue, in order of entry.
    client
        .find(Locator::Css("#zone-list li[data-zone=depot]"))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
    eventually(WAIT, "the depot's queue", async || {
        let n = js(
            &client,
            "document.querySelectorAll('#queue-list li').length",
        )
        .await;
        let title = text(&client, "queue-zone").await;
        (n == json!(16) && title == "Depot").then_some(())
    })
    .await;
    // A car drives in: the map flashes, the count goes up.
    let mut late = node.driver("late-car", available()).await;
    late.send_fix(FixInput::at(52.525, 13.40)).await.unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    late.send_fix(FixInput::at(52.5165, 13.40)).await.unwrap();
    eventually(WAIT, "a flash and a new count", async || {
        let flashes = js(
            &client,
            "document.getElementById('zone-list').dataset.flashes",
        )
        .await;
        let flashes: u64 = flashes.as_str().and_then(|f| f.parse().ok()).unwrap_or(0);
        let listed = js(
            &client,
            "(document.querySelector('#zone-list li[data-zone=depot]') || {}).textContent || ''",
        )
        .await;
        (flashes >= 1 && listed.as_str().unwrap_or_default().contains("17 ·")).then_some(())
    })
    .await;
    screenshot(&client, "dashboard-browser-zones.png").await;
    stop.cancel();
    let _ = fleet.await;
    client.close().await.unwrap();
    node.stop().await;
}
