//! Simulated dispatch dashboards: real WebSocket clients of `GET /v1/ws`.
//! Half watch the whole city (per-cell counts), half a district of a few
//! kilometres (every vehicle, live). Each measures what it receives, and
//! district watchers how long a fix took from the driver to the dashboard.

use std::{
    net::SocketAddr,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc,
    },
};

use futures_util::{SinkExt, StreamExt};
use hdrhistogram::Histogram;
use hexfleet_model::VehicleId;
use hexfleet_protocol::{
    dashboard::{DashboardEvent, DashboardRequest, Format, Viewport},
    Filter, Role,
};
use parking_lot::Mutex;
use rand::{rngs::StdRng, Rng, SeedableRng};
use serde::Serialize;
use tokio_tungstenite::tungstenite::Message;
use tokio_util::sync::CancellationToken;

use crate::{
    fleet::token,
    latency::{self, LatencyBook, Percentiles},
    movement::BBox,
};

/// Side of the district a vehicle-view dashboard watches, in degrees of
/// latitude (about 2.2 km).
const DISTRICT_DEG: f64 = 0.02;

/// What the dashboards of one kind (city or district) received.
pub struct ViewStats {
    pub connected: AtomicU64,
    pub messages: AtomicU64,
    pub bytes: AtomicU64,
    /// Vehicle items (added, moved, removed) or density cells.
    pub items: AtomicU64,
    /// Fix sent by a driver → shown on a dashboard.
    pub latency: Mutex<Histogram<u64>>,
}

impl Default for ViewStats {
    fn default() -> Self {
        Self {
            connected: AtomicU64::default(),
            messages: AtomicU64::default(),
            bytes: AtomicU64::default(),
            items: AtomicU64::default(),
            latency: Mutex::new(latency::histogram()),
        }
    }
}

#[derive(Default)]
pub struct DashboardStats {
    pub city: ViewStats,
    pub district: ViewStats,
    pub errors: AtomicU64,
    pub last_error: Mutex<Option<String>>,
}

impl DashboardStats {
    fn failed(&self, error: impl ToString) {
        self.errors.fetch_add(1, Ordering::Relaxed);
        *self.last_error.lock() = Some(error.to_string());
    }

    /// Starts a new measurement window.
    pub fn reset(&self) {
        for v in [&self.city, &self.district] {
            v.messages.store(0, Ordering::Relaxed);
            v.bytes.store(0, Ordering::Relaxed);
            v.items.store(0, Ordering::Relaxed);
            v.latency.lock().reset();
        }
    }
}

/// One kind of dashboard in the summary.
#[derive(Debug, Serialize)]
pub struct ViewSummary {
    pub connected: u64,
    pub messages_per_s: f64,
    /// Per dashboard.
    pub bytes_per_s: f64,
    pub items_per_s: f64,
    pub bytes_per_item: f64,
    pub latency_ms: Percentiles,
}

impl ViewSummary {
    pub fn of(v: &ViewStats, seconds: f64) -> Self {
        let connected = v.connected.load(Ordering::Relaxed);
        let (messages, bytes, items) = (
            v.messages.load(Ordering::Relaxed) as f64,
            v.bytes.load(Ordering::Relaxed) as f64,
            v.items.load(Ordering::Relaxed) as f64,
        );
        Self {
            connected,
            messages_per_s: messages / seconds,
            bytes_per_s: bytes / seconds / connected.max(1) as f64,
            items_per_s: items / seconds,
            bytes_per_item: bytes / items.max(1.0),
            latency_ms: Percentiles::of(&v.latency.lock()),
        }
    }
}

/// How the dashboards reach the node.
pub struct Target {
    pub http: SocketAddr,
    pub token_secret: String,
    pub format: Format,
    /// WSS with this TLS configuration and server name; plain WS without.
    pub tls: Option<(Arc<rustls::ClientConfig>, String)>,
}

pub trait Io: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send {}
impl<T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send> Io for T {}

/// The WebSocket a dashboard reads, over TLS or not.
pub type Socket = tokio_tungstenite::WebSocketStream<Box<dyn Io>>;

/// Opens `/v1/ws?{query}` on the target: WSS when it has TLS, else WS.
pub async fn open(target: &Target, query: &str) -> anyhow::Result<Socket> {
    let tcp = tokio::net::TcpStream::connect(target.http).await?;
    tcp.set_nodelay(true)?;
    let (url, stream): (String, Box<dyn Io>) = match &target.tls {
        None => (format!("ws://{}/v1/ws?{query}", target.http), Box::new(tcp)),
        Some((tls, name)) => {
            let server = rustls::pki_types::ServerName::try_from(name.clone())?;
            let stream = tokio_rustls::TlsConnector::from(tls.clone())
                .connect(server, tcp)
                .await?;
            let url = format!("wss://{name}:{}/v1/ws?{query}", target.http.port());
            (url, Box::new(stream))
        }
    };
    Ok(tokio_tungstenite::client_async(url, stream).await?.0)
}

/// Runs `count` dashboards over `city` until `stop`.
pub async fn watch(
    count: usize,
    target: Arc<Target>,
    city: BBox,
    seed: u64,
    stats: Arc<DashboardStats>,
    book: Arc<LatencyBook>,
    stop: CancellationToken,
) {
    let mut tasks = tokio::task::JoinSet::new();
    for n in 0..count {
        let mut rng = StdRng::seed_from_u64(seed ^ (n as u64).wrapping_mul(0x9e37_79b9));
        let wide = n % 2 == 0;
        let bbox = if wide {
            city
        } else {
            let lat = rng.random_range(city.min_lat..city.max_lat - DISTRICT_DEG);
            let lon = rng.random_range(city.min_lon..city.max_lon - DISTRICT_DEG * 1.6);
            BBox {
                min_lat: lat,
                min_lon: lon,
                max_lat: lat + DISTRICT_DEG,
                max_lon: lon + DISTRICT_DEG * 1.6,
            }
        };
        let (target, stats, book, stop) =
            (target.clone(), stats.clone(), book.clone(), stop.clone());
        tasks.spawn(async move {
            let outcome = tokio::select! {
                outcome = dashboard(n, &target, bbox, wide, &stats, &book) => outcome,
                _ = stop.cancelled() => Ok(()),
            };
            if let Err(e) = outcome {
                stats.failed(e);
            }
        });
    }
    while tasks.join_next().await.is_some() {}
}

async fn dashboard(
    n: usize,
    target: &Target,
    bbox: BBox,
    wide: bool,
    stats: &DashboardStats,
    book: &LatencyBook,
) -> anyhow::Result<()> {
    let token = token(
        &target.token_secret,
        Role::Dashboard,
        &format!("sim-dispatch-{n}"),
    )?;
    let format = match target.format {
        Format::Json => "json",
        Format::MsgPack => "msgpack",
    };
    let mut ws = open(target, &format!("format={format}&token={token}")).await?;
    let view = if wide { &stats.city } else { &stats.district };
    view.connected.fetch_add(1, Ordering::Relaxed);
    let request = DashboardRequest::Viewport(Viewport {
        id: 1,
        bbox: hexfleet_model::BBox::new(bbox.min_lat, bbox.min_lon, bbox.max_lat, bbox.max_lon)?,
        zoom: if wide { 11.0 } else { 15.0 },
        filter: Some(Filter::any()),
    });
    ws.send(Message::text(serde_json::to_string(&request)?))
        .await?;
    while let Some(message) = ws.next().await {
        let (bytes, event): (usize, DashboardEvent) = match message? {
            Message::Text(text) => (text.len(), serde_json::from_str(&text)?),
            Message::Binary(bytes) => (bytes.len(), rmp_serde::from_slice(&bytes)?),
            Message::Close(frame) => anyhow::bail!("dashboard closed by the node: {frame:?}"),
            _ => continue,
        };
        view.messages.fetch_add(1, Ordering::Relaxed);
        view.bytes.fetch_add(bytes as u64, Ordering::Relaxed);
        match event {
            DashboardEvent::Update(u) => {
                let items = u.added.len() + u.moved.len() + u.removed.len();
                view.items.fetch_add(items as u64, Ordering::Relaxed);
                let mut latency = view.latency.lock();
                for m in &u.moved {
                    let Ok(id) = VehicleId::new(&m.id) else {
                        continue;
                    };
                    if let Some(waited) = book.since_sent(&id, m.lat, m.lon) {
                        latency::record(&mut latency, waited);
                    }
                }
            }
            DashboardEvent::Density(d) => {
                view.items
                    .fetch_add(d.cells.len() as u64, Ordering::Relaxed);
            }
            DashboardEvent::Error(e) => anyhow::bail!("the node refused a request: {}", e.reason),
            _ => {}
        }
    }
    anyhow::bail!("the dashboard's connection was lost")
}
