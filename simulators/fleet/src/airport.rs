//! The airport scenario: a zone over an airport's waiting area, and drivers
//! who drive in, wait in its queue, and leave, sign off inside or come back.
//!
//! A dispatch dashboard watches the airport over WebSocket and records every
//! `entered` and `exited` the node shows it. The summary checks them
//! against what the drivers did: each driver's fixes, replayed through the
//! zone's rectangle, give the events it must cause, in order; the queue the
//! node lists at the end must be the drivers still waiting, in the order
//! they arrived.

use std::{
    collections::HashMap,
    net::SocketAddr,
    sync::Arc,
    time::{Duration, Instant},
};

use anyhow::Context as _;
use futures_util::{SinkExt, StreamExt};
use geo::{Destination, Distance, Haversine, Point};
use hexfleet_client::{Connector, DriverClient, FixInput};
use hexfleet_model::{BBox as ViewBox, VehicleClass, VehicleStatus};
use hexfleet_protocol::{
    dashboard::{DashboardEvent, DashboardRequest, Format, Viewport},
    zone::{ZoneCause, ZoneEventKind},
    DriverReport, Filter, Role,
};
use parking_lot::Mutex;
use rand::{rngs::StdRng, Rng, SeedableRng};
use serde::Serialize;
use tokio_tungstenite::tungstenite::Message;

use crate::{dashboards, fleet::token, latency};

/// The zone's id.
const ZONE: &str = "airport";
/// Half the waiting area's east-west and north-south sides, metres.
const HALF_EW_M: f64 = 400.0;
const HALF_NS_M: f64 = 250.0;
/// How far from the centre drivers come from and go to, metres: outside.
const AWAY_M: f64 = 700.0;
/// Fixes per second, and the speed between waypoints (below any node's
/// plausible maximum).
const FIX_EVERY: Duration = Duration::from_millis(500);
const SPEED_MPS: f64 = 50.0;
/// Arrivals this close may be queued either way (the node times an entry
/// when the fix arrives, the simulator when it sends it).
const QUEUE_TIE: Duration = Duration::from_millis(50);

#[derive(Debug, Clone)]
pub struct Options {
    pub drivers: usize,
    pub center: (f64, f64),
    /// How long each driver waits in the queue, at most (at least a fifth
    /// of it).
    pub max_wait: Duration,
    pub seed: u64,
    /// The airport's size and the drives to it, against the default
    /// (800 × 500 m, drivers from 700 m away).
    pub scale: f64,
}

/// Where the node is.
pub struct Target {
    pub quic: SocketAddr,
    pub http: SocketAddr,
    pub http_tls: Option<(Arc<rustls::ClientConfig>, String)>,
    pub ca: std::path::PathBuf,
    pub server_name: String,
    pub token_secret: String,
}

/// What one driver does after waiting.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Then {
    /// Stays in the queue to the end.
    Stay,
    /// Signs off where it waits.
    SignOff,
    /// Drives away.
    Leave,
    /// Drives away, comes back and waits again (at the back of the queue).
    Return,
}

/// The zone, as a box in degrees.
#[derive(Debug, Clone, Copy)]
struct Area {
    south: f64,
    north: f64,
    west: f64,
    east: f64,
}

impl Area {
    fn around(center: (f64, f64), scale: f64) -> Self {
        let (ns, ew) = (scale * HALF_NS_M, scale * HALF_EW_M);
        Self {
            south: offset(center, -ns, 0.0).0,
            north: offset(center, ns, 0.0).0,
            west: offset(center, 0.0, -ew).1,
            east: offset(center, 0.0, ew).1,
        }
    }

    fn contains(&self, (lat, lon): (f64, f64)) -> bool {
        lat > self.south && lat < self.north && lon > self.west && lon < self.east
    }

    fn feature(&self) -> serde_json::Value {
        let (s, n, w, e) = (self.south, self.north, self.west, self.east);
        serde_json::json!({
            "type": "Feature",
            "properties": {"name": "Airport taxi queue", "kind": "airport"},
            "geometry": {"type": "Polygon", "coordinates": [[[w, s], [e, s], [e, n], [w, n], [w, s]]]},
        })
    }
}

/// The point `north_m` north and `east_m` east of (lat, lon), on the sphere.
fn offset((lat, lon): (f64, f64), north_m: f64, east_m: f64) -> (f64, f64) {
    let bearing = east_m.atan2(north_m).to_degrees();
    let to = Haversine.destination(Point::new(lon, lat), bearing, north_m.hypot(east_m));
    (to.y(), to.x())
}

fn distance_m(a: (f64, f64), b: (f64, f64)) -> f64 {
    Haversine.distance(Point::new(a.1, a.0), Point::new(b.1, b.0))
}

/// One driver's plan: when it starts, its waypoints, waits, and ending.
struct Plan {
    id: String,
    start_after: Duration,
    from: (f64, f64),
    spot: (f64, f64),
    wait: Duration,
    then: Then,
    away: (f64, f64),
    second_spot: (f64, f64),
}

impl Plan {
    fn random(i: usize, options: &Options, rng: &mut StdRng) -> Self {
        let (center, k) = (options.center, options.scale);
        let around = |rng: &mut StdRng| {
            let a = rng.random_range(0.0..std::f64::consts::TAU);
            offset(center, k * AWAY_M * a.sin(), k * AWAY_M * a.cos())
        };
        let inside = |rng: &mut StdRng| {
            offset(
                center,
                rng.random_range(-0.8..0.8) * k * HALF_NS_M,
                rng.random_range(-0.8..0.8) * k * HALF_EW_M,
            )
        };
        let then = match rng.random_range(0..10) {
            0..=3 => Then::Stay,
            4 | 5 => Then::SignOff,
            6 | 7 => Then::Leave,
            _ => Then::Return,
        };
        let wait = options.max_wait.mul_f64(rng.random_range(0.2..1.0));
        Self {
            id: format!("airport-{i}"),
            // Arrivals spread out, so the queue has an order.
            start_after: Duration::from_millis(300 * i as u64),
            from: around(rng),
            spot: inside(rng),
            wait,
            then,
            away: around(rng),
            second_spot: inside(rng),
        }
    }
}

/// What a driver sent: each fix's position and when.
#[derive(Default)]
struct Track {
    fixes: Vec<(Instant, (f64, f64))>,
    signed_off: Option<Instant>,
    /// Still waiting in the queue at the end.
    waiting: bool,
}

/// What the node showed the dashboard.
#[derive(Default)]
struct Seen {
    events: Vec<(Instant, String, ZoneEventKind, ZoneCause)>,
}

#[derive(Debug, Serialize)]
pub struct Summary {
    pub drivers: usize,
    pub expected_entered: usize,
    pub expected_exited: usize,
    pub entered: usize,
    pub exited: usize,
    pub exited_signed_off: usize,
    /// Drivers whose events differ from what they did.
    pub mismatched_drivers: Vec<String>,
    pub queue_expected: Vec<String>,
    pub queue_listed: Vec<String>,
    pub queue_ok: bool,
    /// From the fix that crossed the edge to the event on the dashboard.
    pub event_p50_ms: f64,
    pub event_p99_ms: f64,
    pub ok: bool,
}

impl Summary {
    pub fn print(&self) {
        println!("airport: {} drivers, zone {ZONE:?}", self.drivers);
        println!("  events    expected  shown");
        println!(
            "  entered   {:>8}  {:>5}",
            self.expected_entered, self.entered
        );
        println!(
            "  exited    {:>8}  {:>5}  ({} signed off inside)",
            self.expected_exited, self.exited, self.exited_signed_off
        );
        println!(
            "  drivers whose events differ from what they did: {}",
            self.mismatched_drivers.len()
        );
        println!(
            "  queue at the end: {} waiting, listed in arrival order: {}",
            self.queue_expected.len(),
            if self.queue_ok { "yes" } else { "NO" }
        );
        println!(
            "  crossing fix → dashboard event: p50 {:.1} ms, p99 {:.1} ms",
            self.event_p50_ms, self.event_p99_ms
        );
        println!("  {}", if self.ok { "OK" } else { "MISMATCH" });
    }
}

/// Runs the scenario and checks what the node said against what the
/// drivers did.
pub async fn run(options: Options, target: Target) -> anyhow::Result<Summary> {
    let area = Area::around(options.center, options.scale);
    put_zone(&target, &area).await?;
    let seen = Arc::new(Mutex::new(Seen::default()));
    let watcher = tokio::spawn(watch(
        target.http,
        target.http_tls.clone(),
        target.token_secret.clone(),
        area,
        seen.clone(),
    ));
    // The dashboard first: it must see the first entry.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let mut rng = StdRng::seed_from_u64(options.seed);
    let plans: Vec<Plan> = (0..options.drivers)
        .map(|i| Plan::random(i, &options, &mut rng))
        .collect();
    let connector = Arc::new(Connector::new(&target.ca, &target.server_name)?);
    let started = Instant::now();
    let (planned, mut done_planning) = tokio::sync::mpsc::channel(options.drivers.max(1));
    let end = tokio_util::sync::CancellationToken::new();
    let mut drivers = Vec::new();
    for plan in plans {
        let connector = connector.clone();
        let (quic, secret) = (target.quic, target.token_secret.clone());
        let (planned, end) = (planned.clone(), end.clone());
        drivers.push(tokio::spawn(async move {
            let track = drive(&plan, &connector, quic, &secret, started, planned, end).await;
            (plan.id, track)
        }));
    }
    drop(planned);
    // Every driver through its plan (those waiting go on reporting), and
    // what that caused shown (a flush and a stream read later).
    while done_planning.recv().await.is_some() {}
    tokio::time::sleep(Duration::from_secs(2)).await;
    let queue = queue(&target).await?;
    end.cancel();
    let mut tracks = HashMap::new();
    for d in drivers {
        let (id, track) = d.await?;
        tracks.insert(id, track?);
    }
    watcher.abort();
    let summary = check(&area, &tracks, &seen.lock(), queue);
    Ok(summary)
}

/// Drives one plan, says so on `planned`, and goes on reporting where it
/// waits until `end` if it stays in the queue; returns its track.
async fn drive(
    plan: &Plan,
    connector: &Connector,
    quic: SocketAddr,
    secret: &str,
    started: Instant,
    planned: tokio::sync::mpsc::Sender<()>,
    end: tokio_util::sync::CancellationToken,
) -> anyhow::Result<Track> {
    let (mut track, client) = follow(plan, connector, quic, secret, started).await?;
    let _ = planned.send(()).await;
    drop(planned);
    if let Some(mut d) = client {
        let at = track.fixes.last().map_or(plan.spot, |f| f.1);
        while !end.is_cancelled() {
            if track.waiting {
                send(&mut d, &mut track, at).await?;
            } else {
                end.cancelled().await;
            }
        }
        d.abandon();
    }
    Ok(track)
}

/// Follows one plan; returns its track, and the client unless it signed off.
async fn follow(
    plan: &Plan,
    connector: &Connector,
    quic: SocketAddr,
    secret: &str,
    started: Instant,
) -> anyhow::Result<(Track, Option<DriverClient>)> {
    let report = DriverReport {
        class: VehicleClass::Economy,
        status: VehicleStatus::Available,
    };
    tokio::time::sleep_until((started + plan.start_after).into()).await;
    let token = token(secret, Role::Driver, &plan.id)?;
    let mut d = connector
        .driver(quic, &token, report)
        .await
        .with_context(|| format!("{} connects", plan.id))?;
    let mut track = Track::default();
    send(&mut d, &mut track, plan.from).await?;
    go(&mut d, &mut track, plan.from, plan.spot).await?;
    wait(&mut d, &mut track, plan.spot, plan.wait).await?;
    match plan.then {
        Then::Stay => {
            track.waiting = true;
            return Ok((track, Some(d)));
        }
        Then::SignOff => {
            track.signed_off = Some(Instant::now());
            d.goodbye().await?;
            return Ok((track, None));
        }
        Then::Leave => go(&mut d, &mut track, plan.spot, plan.away).await?,
        Then::Return => {
            go(&mut d, &mut track, plan.spot, plan.away).await?;
            go(&mut d, &mut track, plan.away, plan.second_spot).await?;
            track.waiting = true;
            return Ok((track, Some(d)));
        }
    }
    track.waiting = false;
    Ok((track, Some(d)))
}

async fn send(d: &mut DriverClient, track: &mut Track, at: (f64, f64)) -> anyhow::Result<()> {
    d.send_fix(FixInput {
        speed_mps: SPEED_MPS as f32,
        ..FixInput::at(at.0, at.1)
    })
    .await?;
    track.fixes.push((Instant::now(), at));
    tokio::time::sleep(FIX_EVERY).await;
    Ok(())
}

/// Drives a straight line at [`SPEED_MPS`], a fix every [`FIX_EVERY`].
async fn go(
    d: &mut DriverClient,
    track: &mut Track,
    from: (f64, f64),
    to: (f64, f64),
) -> anyhow::Result<()> {
    let steps = (distance_m(from, to) / (SPEED_MPS * FIX_EVERY.as_secs_f64())).ceil() as usize;
    for k in 1..=steps.max(1) {
        let t = k as f64 / steps.max(1) as f64;
        let at = (from.0 + (to.0 - from.0) * t, from.1 + (to.1 - from.1) * t);
        send(d, track, at).await?;
    }
    Ok(())
}

async fn wait(
    d: &mut DriverClient,
    track: &mut Track,
    at: (f64, f64),
    for_: Duration,
) -> anyhow::Result<()> {
    let until = Instant::now() + for_;
    while Instant::now() < until {
        send(d, track, at).await?;
    }
    Ok(())
}

async fn put_zone(target: &Target, area: &Area) -> anyhow::Result<()> {
    let token = token(&target.token_secret, Role::Dashboard, "airport-operator")?;
    let (client, base) = http(target)?;
    let resp = client
        .put(format!("{base}/v1/zones/{ZONE}"))
        .bearer_auth(token)
        .body(area.feature().to_string())
        .send()
        .await
        .context("PUT the airport zone")?;
    anyhow::ensure!(
        resp.status().is_success(),
        "the node refused the airport zone: {}",
        resp.text().await.unwrap_or_default()
    );
    Ok(())
}

/// The queue the node lists: vehicle ids in order of entry.
async fn queue(target: &Target) -> anyhow::Result<Vec<String>> {
    let token = token(&target.token_secret, Role::Dashboard, "airport-operator")?;
    let (client, base) = http(target)?;
    let body: serde_json::Value = client
        .get(format!("{base}/v1/zones/{ZONE}/vehicles"))
        .bearer_auth(token)
        .send()
        .await?
        .json()
        .await?;
    Ok(body["vehicles"]["available"]
        .as_array()
        .map(|list| {
            list.iter()
                .filter_map(|v| v["id"].as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default())
}

fn http(target: &Target) -> anyhow::Result<(reqwest::Client, String)> {
    Ok(match &target.http_tls {
        None => (reqwest::Client::new(), format!("http://{}", target.http)),
        Some((tls, name)) => (
            reqwest::Client::builder()
                .use_preconfigured_tls((**tls).clone())
                .resolve(name, target.http)
                .build()?,
            format!("https://{name}:{}", target.http.port()),
        ),
    })
}

/// A dashboard over the airport, recording the events it is shown.
async fn watch(
    http: SocketAddr,
    tls: Option<(Arc<rustls::ClientConfig>, String)>,
    secret: String,
    area: Area,
    seen: Arc<Mutex<Seen>>,
) -> anyhow::Result<()> {
    let target = dashboards::Target {
        http,
        tls,
        token_secret: secret.clone(),
        format: Format::Json,
    };
    let token = token(&secret, Role::Dashboard, "airport-dispatch")?;
    let mut ws = dashboards::open(&target, &format!("token={token}")).await?;
    let bbox = ViewBox::new(
        area.south - 0.01,
        area.west - 0.01,
        area.north + 0.01,
        area.east + 0.01,
    )?;
    let viewport = DashboardRequest::Viewport(Viewport {
        id: 1,
        bbox,
        zoom: 14.0,
        filter: Some(Filter::any()),
    });
    ws.send(Message::text(serde_json::to_string(&viewport)?))
        .await?;
    while let Some(message) = ws.next().await {
        let Ok(Message::Text(text)) = message else {
            continue;
        };
        if let Ok(DashboardEvent::ZoneEvent(e)) = serde_json::from_str::<DashboardEvent>(&text) {
            seen.lock()
                .events
                .push((Instant::now(), e.vehicle, e.event, e.cause));
        }
    }
    Ok(())
}

/// The events a track must cause: each crossing of the edge between two
/// fixes, and an exit when it signs off inside.
fn expected(area: &Area, track: &Track) -> Vec<(Instant, ZoneEventKind, ZoneCause)> {
    let mut events = Vec::new();
    let mut inside = false;
    for &(at, position) in &track.fixes {
        let now = area.contains(position);
        if now != inside {
            let kind = if now {
                ZoneEventKind::Entered
            } else {
                ZoneEventKind::Exited
            };
            events.push((at, kind, ZoneCause::Moved));
            inside = now;
        }
    }
    if let (Some(at), true) = (track.signed_off, inside) {
        events.push((at, ZoneEventKind::Exited, ZoneCause::SignedOff));
    }
    events
}

fn check(
    area: &Area,
    tracks: &HashMap<String, Track>,
    seen: &Seen,
    queue_listed: Vec<String>,
) -> Summary {
    let mut by_vehicle: HashMap<&str, Vec<(Instant, ZoneEventKind, ZoneCause)>> = HashMap::new();
    for (at, id, kind, cause) in &seen.events {
        by_vehicle
            .entry(id.as_str())
            .or_default()
            .push((*at, *kind, *cause));
    }
    let mut latency = latency::histogram();
    let (mut expected_entered, mut expected_exited) = (0, 0);
    let mut mismatched = Vec::new();
    let mut arrivals = Vec::new();
    for (id, track) in tracks {
        let want = expected(area, track);
        let got = by_vehicle.remove(id.as_str()).unwrap_or_default();
        expected_entered += want
            .iter()
            .filter(|e| e.1 == ZoneEventKind::Entered)
            .count();
        expected_exited += want.iter().filter(|e| e.1 == ZoneEventKind::Exited).count();
        let kinds = |v: &[(Instant, ZoneEventKind, ZoneCause)]| -> Vec<(ZoneEventKind, ZoneCause)> {
            v.iter().map(|e| (e.1, e.2)).collect()
        };
        if kinds(&want) != kinds(&got) {
            mismatched.push(id.clone());
        } else {
            for (w, g) in want.iter().zip(&got) {
                let _ = latency.record(g.0.saturating_duration_since(w.0).as_micros() as u64);
            }
        }
        if track.waiting {
            if let Some(entry) = want.iter().rev().find(|e| e.1 == ZoneEventKind::Entered) {
                arrivals.push((entry.0, id.clone()));
            }
        }
    }
    // Events of vehicles that are not the scenario's drivers.
    mismatched.extend(by_vehicle.keys().map(|id| id.to_string()));
    mismatched.sort();
    arrivals.sort();
    let arrived: HashMap<&str, Instant> =
        arrivals.iter().map(|(at, id)| (id.as_str(), *at)).collect();
    let queue_expected: Vec<String> = arrivals.iter().map(|(_, id)| id.clone()).collect();
    // In arrival order, but two drivers entering within a few milliseconds
    // of each other may be listed either way.
    let same_set = {
        let (mut a, mut b) = (queue_expected.clone(), queue_listed.clone());
        a.sort();
        b.sort();
        a == b
    };
    let in_order = queue_listed.iter().enumerate().all(|(i, earlier)| {
        queue_listed[i + 1..].iter().all(|later| {
            match (arrived.get(earlier.as_str()), arrived.get(later.as_str())) {
                (Some(e), Some(l)) => *e <= *l + QUEUE_TIE,
                _ => false,
            }
        })
    });
    let queue_ok = same_set && in_order;
    let count = |kind: ZoneEventKind, cause: Option<ZoneCause>| {
        seen.events
            .iter()
            .filter(|e| e.2 == kind && cause.is_none_or(|c| e.3 == c))
            .count()
    };
    let ok = mismatched.is_empty() && queue_ok;
    let ms = |q: f64| latency.value_at_quantile(q) as f64 / 1e3;
    Summary {
        drivers: tracks.len(),
        expected_entered,
        expected_exited,
        entered: count(ZoneEventKind::Entered, None),
        exited: count(ZoneEventKind::Exited, None),
        exited_signed_off: count(ZoneEventKind::Exited, Some(ZoneCause::SignedOff)),
        mismatched_drivers: mismatched,
        queue_expected,
        queue_listed,
        queue_ok,
        event_p50_ms: ms(0.5),
        event_p99_ms: ms(0.99),
        ok,
    }
}
