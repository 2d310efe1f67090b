//! One dashboard connection: requests in, the view of its viewport out.
//!
//! In vehicle mode the dashboard is a fan-out subscriber like a rider, with
//! a latest-wins [`Mailbox`] drained whenever the socket is free to write.
//! In density mode it reads [`Density`](crate::fanout::Density) counts on a
//! timer and sends the cells whose counts changed. Either way a write that
//! stays blocked for `slow_consumer_after` closes the socket with
//! `slow_consumer` (4408).

use std::{collections::HashSet, sync::Arc, time::Instant};

use axum::extract::ws::{CloseFrame, Message, WebSocket};
use futures_util::{stream::SplitSink, SinkExt, StreamExt};
use h3o::CellIndex;
use hexfleet_model::{VehicleId, ViewportCover, ZoneId};
use hexfleet_protocol::{
    dashboard::{
        CellCount, CellOutline, DashboardError, DashboardEvent, DashboardMoved, DashboardRemoved,
        DashboardRequest, DensityUpdate, Format, Found, Hello, Outlines, StatusCounts,
        VehicleUpdate, View, ViewMode, Viewport, MAX_ZOOM,
    },
    zone::ZoneEvent,
    ErrorCode, Filter, Role,
};

use super::{zones::ZoneWatch, Dashboards};
use crate::{
    budget::{RequestBudget, Verdict},
    clock,
    fanout::SubscriberId,
    mailbox::{frames, Delta, Drained, Mailbox},
    metrics::DeltaKind,
    zones::{
        sync::{ZoneCounts, COUNTS_EVERY},
        view,
    },
};

/// Items per message. The WebSocket keeps a write buffer as large as the
/// largest message it ever wrote, for as long as it lives: messages of a few
/// KB keep an open dashboard cheap (27 KiB of node memory, not 178).
const MAX_ITEMS_PER_MESSAGE: usize = 50;
const MAX_OUTLINES_PER_MESSAGE: usize = 32;
const MAX_CELLS_PER_MESSAGE: usize = 120;
/// How long a closing node waits for the client's side of the closing
/// handshake.
const CLOSE_GRACE: std::time::Duration = std::time::Duration::from_secs(1);
/// Outlines a connection remembers having sent; past this it forgets (and
/// sends again) rather than grow without bound while a user pans forever.
const MAX_OUTLINES_REMEMBERED: usize = 50_000;

enum Mode {
    /// No viewport yet.
    Idle,
    Vehicles {
        cells: Vec<CellIndex>,
        mailbox: Arc<Mailbox>,
    },
    Density {
        cells: Vec<CellIndex>,
        /// What the dashboard was last told, per cell of `cells`.
        sent: Vec<StatusCounts>,
        /// The density generation `sent` reflects (`None`: must re-read).
        generation: Option<u64>,
    },
}

/// Why a connection ends.
enum End {
    /// The peer is gone, or said goodbye: nobody to tell.
    Gone,
    /// The node closes the socket, with this code and reason.
    Close(ErrorCode, String),
    /// A message over `dashboard.max_message_bytes`: closed with 1009.
    TooBig(String),
}

/// The WebSocket close code for a message too big to take.
const TOO_BIG: u16 = 1009;

struct Session {
    dashboards: Arc<Dashboards>,
    format: Format,
    sink: SplitSink<WebSocket, Message>,
    id: SubscriberId,
    /// The latest viewport or filter request, echoed in what reflects it.
    subscription: u32,
    filter: Filter,
    mode: Mode,
    /// Vehicles the dashboard has been sent and not told are gone.
    shown: HashSet<VehicleId>,
    outlined: HashSet<CellIndex>,
    budget: RequestBudget,
    zones: ZoneWatch,
}

/// A dashboard showing counts over more shards than this sees only those of
/// the shards this node holds or already replicates for someone else: 64
/// shards at the default resolution are ~16,000 km², a metropolitan area,
/// and each one replicated costs a snapshot and a channel's traffic, which
/// a dashboard panning fast must not multiply without bound.
const MAX_REPLICATED_SHARDS: usize = 64;

pub(super) async fn serve(
    socket: WebSocket,
    format: Format,
    dashboards: Arc<Dashboards>,
    expiry: crate::session::Expiry,
) {
    dashboards.metrics.dashboards.inc();
    let (sink, mut stream) = socket.split();
    let mut session = Session {
        id: dashboards.fanout.new_subscriber_id(),
        dashboards: dashboards.clone(),
        format,
        sink,
        subscription: 0,
        filter: Filter::any(),
        mode: Mode::Idle,
        shown: HashSet::new(),
        outlined: HashSet::new(),
        budget: RequestBudget::new(&dashboards.config.requests, Instant::now()),
        zones: ZoneWatch::default(),
    };
    let mut zones_changed = dashboards.zones.watch_changes();
    let mut zone_events = dashboards.zones.subscribe_events();
    let mut zone_timer = tokio::time::interval(COUNTS_EVERY);
    zone_timer.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut density_timer = tokio::time::interval(dashboards.config.density_interval);
    density_timer.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let hello = DashboardEvent::Hello(Hello {
        node: dashboards.node_id.clone(),
        server_time_ms: clock::now_ms(),
        tile_url: Some(dashboards.config.tile_url.clone()).filter(|u| !u.is_empty()),
        fleet_bounds: dashboards.table.bounds(),
        max_vehicle_cells: dashboards.config.max_vehicle_cells,
        max_density_cells: dashboards.config.max_density_cells,
    });
    let mut outcome = session.send(&hello).await;
    let expired = expiry.passed();
    tokio::pin!(expired);
    while outcome.is_ok() {
        let mailbox = match &session.mode {
            Mode::Vehicles { mailbox, .. } => Some(mailbox.clone()),
            _ => None,
        };
        let in_density = matches!(session.mode, Mode::Density { .. });
        outcome = tokio::select! {
            message = stream.next() => match message {
                Some(Ok(Message::Text(text))) => session.request(Format::Json, text.as_bytes()).await,
                Some(Ok(Message::Binary(bytes))) => session.request(Format::MsgPack, &bytes).await,
                // Pings are answered by the socket itself, each with a pong:
                // they share the requests' budget.
                Some(Ok(Message::Ping(_) | Message::Pong(_))) => session.control_frame(),
                // tungstenite refuses a message over the limit before reading
                // it, with a capacity error ("Space limit exceeded").
                Some(Err(e)) if crate::session::too_big(&e) => Err(End::TooBig(e.to_string())),
                Some(Ok(Message::Close(_)) | Err(_)) | None => Err(End::Gone),
            },
            _ = ready(mailbox.as_deref()) => match mailbox.and_then(|m| m.take()) {
                Some(drained) => {
                    dashboards.metrics.mailbox_depth.observe(drained.changes.len() as f64);
                    session.vehicles(drained).await
                }
                None => Ok(()),
            },
            _ = density_timer.tick(), if in_density => session.density(false).await,
            _ = zones_changed.changed() => session.send_zones().await,
            event = zone_events.recv() => match event {
                Ok(event) => session.zone_event(&event).await,
                // A dashboard that fell behind misses some flashes: the
                // counts that follow are right.
                Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => Ok(()),
                Err(tokio::sync::broadcast::error::RecvError::Closed) => Err(End::Gone),
            },
            _ = zone_timer.tick() => session.zone_counts().await,
            refusal = &mut expired => Err(End::Close(refusal.code, refusal.reason)),
            _ = dashboards.shutdown.cancelled() => Err(End::Close(ErrorCode::ShuttingDown, "the node is shutting down".into())),
        };
    }
    if matches!(session.mode, Mode::Vehicles { .. }) {
        dashboards.fanout.unsubscribe(session.id);
    }
    dashboards.metrics.dashboards.dec();
    let closing = match outcome {
        Err(End::Close(code, reason)) => Some((code.websocket_close_code(), code.as_str(), reason)),
        Err(End::TooBig(reason)) => Some((TOO_BIG, "too_big", reason)),
        _ => None,
    };
    if let Some((code, name, reason)) = closing {
        // Every close the node makes is logged and counted by its reason.
        dashboards.metrics.dashboard_error(name).inc();
        if name == ErrorCode::Internal.as_str() {
            tracing::warn!(code = name, %reason, "closing dashboard");
        } else {
            tracing::info!(code = name, %reason, "closing dashboard");
        }
        let frame = CloseFrame {
            code,
            reason: reason.into(),
        };
        // The closing handshake: send ours, then read (and drop) what the
        // client still sends until its own close. Closing the TCP connection
        // with unread data would reset it, and the reset would destroy our
        // close frame before the client reads it.
        let _ = tokio::time::timeout(CLOSE_GRACE, async {
            if session.sink.send(Message::Close(Some(frame))).await.is_ok() {
                while let Some(Ok(message)) = stream.next().await {
                    if matches!(message, Message::Close(_)) {
                        break;
                    }
                }
            }
        })
        .await;
    }
}

async fn ready(mailbox: Option<&Mailbox>) {
    match mailbox {
        Some(m) => m.ready().await,
        None => std::future::pending().await,
    }
}

impl Session {
    async fn send(&mut self, event: &DashboardEvent) -> Result<(), End> {
        let bytes = match self.format.encode(event) {
            Ok(bytes) => bytes,
            Err(e) => {
                tracing::error!(error = %e, "encoding a dashboard event");
                return Err(End::Close(ErrorCode::Internal, "internal error".into()));
            }
        };
        let message = match self.format {
            Format::Json => match String::from_utf8(bytes) {
                Ok(text) => Message::Text(text.into()),
                // serde_json writes UTF-8; this is not reached.
                Err(_) => return Err(End::Close(ErrorCode::Internal, "internal error".into())),
            },
            Format::MsgPack => Message::Binary(bytes.into()),
        };
        let after = self.dashboards.slow_consumer_after;
        match crate::clock::timeout_if_blocked(after, self.sink.send(message)).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(_)) => Err(End::Gone),
            Err(_) => Err(End::Close(
                ErrorCode::SlowConsumer,
                format!("updates blocked for more than {after:?}"),
            )),
        }
    }

    /// Answers a request with an error event; the connection stays.
    async fn refuse(&mut self, code: ErrorCode, reason: String) -> Result<(), End> {
        if code == ErrorCode::BadRequest {
            self.dashboards.metrics.dashboard_error("bad_request").inc();
        }
        let error = DashboardEvent::Error(DashboardError { code, reason });
        self.send(&error).await
    }

    /// Answers a bad request with an error event; the connection stays.
    async fn bad_request(&mut self, reason: String) -> Result<(), End> {
        self.refuse(ErrorCode::BadRequest, reason).await
    }

    /// A ping or pong costs a budget token like a request. Over budget it is
    /// let be (the socket has answered it already), but it counts towards
    /// closing the connection, so a ping flood ends like a request flood.
    fn control_frame(&mut self) -> Result<(), End> {
        match self.budget.spend(Instant::now()) {
            Verdict::Allow | Verdict::Refuse => Ok(()),
            Verdict::Close => {
                self.dashboards.metrics.rate_limited(Role::Dashboard).inc();
                let reason = self.dashboards.config.requests.closing("messages");
                Err(End::Close(ErrorCode::RateLimited, reason))
            }
        }
    }

    async fn request(&mut self, format: Format, bytes: &[u8]) -> Result<(), End> {
        let limits = &self.dashboards.config.requests;
        match self.budget.spend(Instant::now()) {
            Verdict::Allow => {}
            Verdict::Refuse => {
                self.dashboards.metrics.rate_limited(Role::Dashboard).inc();
                let reason = limits.refusal("requests");
                return self.refuse(ErrorCode::RateLimited, reason).await;
            }
            Verdict::Close => {
                self.dashboards.metrics.rate_limited(Role::Dashboard).inc();
                let reason = limits.closing("requests");
                return Err(End::Close(ErrorCode::RateLimited, reason));
            }
        }
        match format.decode(bytes) {
            Ok(DashboardRequest::Viewport(viewport)) => self.viewport(viewport).await,
            Ok(DashboardRequest::Filter { id, filter }) => self.filter(id, filter).await,
            Ok(DashboardRequest::Find { id }) => self.find(id).await,
            Ok(DashboardRequest::Queue { zone }) => self.follow_queue(zone).await,
            Err(e) => self.bad_request(e.to_string()).await,
        }
    }

    async fn viewport(&mut self, viewport: Viewport) -> Result<(), End> {
        if !(viewport.zoom.is_finite() && (0.0..=MAX_ZOOM).contains(&viewport.zoom)) {
            return self
                .bad_request(format!(
                    "zoom must be in [0, {MAX_ZOOM}], not {}",
                    viewport.zoom
                ))
                .await;
        }
        self.subscription = viewport.id;
        if let Some(filter) = viewport.filter {
            self.filter = filter;
        }
        self.zones.bbox = Some(viewport.bbox);
        self.send_zones().await?;
        let (cells, bbox) = (self.dashboards.cells, viewport.bbox);
        let (max_vehicle_cells, max_density_cells) = (
            self.dashboards.config.max_vehicle_cells,
            self.dashboards.config.max_density_cells,
        );
        // Covering a wide box takes milliseconds: not on a runtime worker
        // that QUIC sessions share.
        let covered = tokio::task::spawn_blocking(move || {
            cells.viewport(&bbox, max_vehicle_cells, max_density_cells)
        })
        .await;
        let cover = match covered {
            Ok(cover) => cover,
            Err(e) => {
                tracing::error!(error = %e, "covering a viewport");
                return Err(End::Close(ErrorCode::Internal, "internal error".into()));
            }
        };
        match cover {
            ViewportCover::Vehicles(cells) => {
                let resolution = self.dashboards.cells.index_res();
                self.view(ViewMode::Vehicles, resolution, &cells).await?;
                // From another mode: a fresh mailbox, so nothing meant for
                // an older subscription reaches this one, and a snapshot.
                let mailbox = match &self.mode {
                    Mode::Vehicles { mailbox, .. } => mailbox.clone(),
                    _ => Arc::new(Mailbox::new()),
                };
                self.dashboards.fanout.subscribe(
                    self.id,
                    cells.clone(),
                    self.filter.clone(),
                    self.subscription,
                    mailbox.clone(),
                );
                self.mode = Mode::Vehicles { cells, mailbox };
                Ok(())
            }
            ViewportCover::Density { resolution, cells } => {
                if self.dashboards.clustered {
                    // Counts of other nodes' shards come from their replicas.
                    match self
                        .dashboards
                        .cells
                        .shards_under(&cells, MAX_REPLICATED_SHARDS)
                    {
                        Some(shards) => self.dashboards.fanout.replicate(self.id, shards),
                        None => self.dashboards.fanout.unsubscribe(self.id),
                    }
                } else if matches!(self.mode, Mode::Vehicles { .. }) {
                    self.dashboards.fanout.unsubscribe(self.id);
                }
                self.shown.clear();
                self.view(ViewMode::Density, resolution, &cells).await?;
                self.mode = Mode::Density {
                    sent: vec![StatusCounts::default(); cells.len()],
                    cells,
                    generation: None,
                };
                self.density(true).await
            }
        }
    }

    async fn filter(&mut self, id: u32, filter: Filter) -> Result<(), End> {
        self.subscription = id;
        self.filter = filter;
        match &mut self.mode {
            Mode::Idle => Ok(()),
            Mode::Vehicles { cells, mailbox } => {
                self.dashboards.fanout.subscribe(
                    self.id,
                    cells.clone(),
                    self.filter.clone(),
                    id,
                    mailbox.clone(),
                );
                Ok(())
            }
            // Every count may change: a fresh snapshot.
            Mode::Density { .. } => self.density(true).await,
        }
    }

    /// The counts of the whole fleet's zones, shared by the node's
    /// dashboards (computed once a second at most).
    async fn fleet_zone_counts(&self) -> Arc<ZoneCounts> {
        let d = &self.dashboards;
        view::shared_counts(&d.zones, &d.ingest, d.store.as_ref(), d.cluster.as_deref())
            .await
            .unwrap_or_else(|e| {
                tracing::debug!(error = %e, "zone counts for a dashboard");
                Arc::default()
            })
    }

    /// Draws the zones near the viewport (none before one is set).
    async fn send_zones(&mut self) -> Result<(), End> {
        if self.dashboards.zones.is_empty() && self.zones.bbox.is_none() {
            return Ok(());
        }
        let counts = self.fleet_zone_counts().await;
        let shown = self.zones.shapes(&self.dashboards.zones.read(), &counts);
        self.send(&DashboardEvent::Zones(shown)).await
    }

    async fn zone_event(&mut self, event: &ZoneEvent) -> Result<(), End> {
        match self.zones.flash(event) {
            Some(flash) => self.send(&DashboardEvent::ZoneEvent(flash)).await,
            None => Ok(()),
        }
    }

    /// Counts that changed, and the followed queue.
    async fn zone_counts(&mut self) -> Result<(), End> {
        if self.dashboards.zones.is_empty() {
            return Ok(());
        }
        let counts = self.fleet_zone_counts().await;
        if let Some(update) = self.zones.changed_counts(&counts) {
            self.send(&DashboardEvent::ZoneCounts(update)).await?;
        }
        self.send_queue().await
    }

    async fn follow_queue(&mut self, zone: String) -> Result<(), End> {
        if zone.is_empty() {
            self.zones.queue = None;
            return Ok(());
        }
        match ZoneId::new(&zone) {
            Ok(id) if self.dashboards.zones.get(&id).is_some() => {
                self.zones.queue = Some(id);
                self.send_queue().await
            }
            Ok(id) => self.bad_request(format!("queue: no zone {id}")).await,
            Err(e) => self.bad_request(format!("queue: {e}")).await,
        }
    }

    async fn send_queue(&mut self) -> Result<(), End> {
        let Some(id) = self.zones.queue.clone() else {
            return Ok(());
        };
        let Some(zone) = self.dashboards.zones.get(&id) else {
            self.zones.queue = None;
            return Ok(());
        };
        let d = &self.dashboards;
        let states =
            match view::queue(&d.ingest, d.store.as_ref(), d.cluster.as_deref(), &zone).await {
                Ok(states) => states,
                Err(e) => {
                    tracing::debug!(error = %e, "a zone's queue for a dashboard");
                    return Ok(());
                }
            };
        let queue = super::zones::queue(&id, &states);
        self.send(&DashboardEvent::Queue(queue)).await
    }

    async fn find(&mut self, id: String) -> Result<(), End> {
        let vehicle_id = match VehicleId::new(&id) {
            Ok(vehicle_id) => vehicle_id,
            Err(e) => return self.bad_request(format!("find: {e}")).await,
        };
        // This node's own vehicles first; any other from the store, which
        // holds the whole fleet.
        let vehicle = match self.dashboards.table.get(&vehicle_id) {
            Some(entry) => Some(entry.state),
            None => self
                .dashboards
                .store
                .vehicle(&vehicle_id)
                .await
                .unwrap_or_else(|e| {
                    tracing::warn!(error = %e, "find: reading the store");
                    None
                }),
        };
        self.send(&DashboardEvent::Found(Found { id, vehicle }))
            .await
    }

    /// Tells the dashboard how its viewport is shown, with the outlines of
    /// cells it has not been sent before.
    async fn view(
        &mut self,
        mode: ViewMode,
        resolution: h3o::Resolution,
        cells: &[CellIndex],
    ) -> Result<(), End> {
        if self.outlined.len() + cells.len() > MAX_OUTLINES_REMEMBERED {
            self.outlined.clear();
        }
        let view = View {
            subscription: self.subscription,
            mode,
            resolution: u8::from(resolution),
            cells: cells.iter().map(ToString::to_string).collect(),
        };
        self.send(&DashboardEvent::View(view)).await?;
        let new: Vec<CellIndex> = cells
            .iter()
            .copied()
            .filter(|c| self.outlined.insert(*c))
            .collect();
        for chunk in new.chunks(MAX_OUTLINES_PER_MESSAGE) {
            let outlines = chunk
                .iter()
                .map(|c| CellOutline {
                    cell: c.to_string(),
                    boundary: c.boundary().iter().map(|v| [v.lat(), v.lng()]).collect(),
                })
                .collect();
            self.send(&DashboardEvent::Outlines(Outlines { outlines }))
                .await?;
        }
        Ok(())
    }

    /// Sends what a mailbox held, in messages of bounded size.
    async fn vehicles(&mut self, drained: Drained) -> Result<(), End> {
        if drained.reset {
            self.shown.clear();
        }
        let mut deltas = Vec::with_capacity(drained.changes.len());
        for (id, change) in drained.changes {
            let shown = self.shown.contains(&id);
            let Some(delta) = Delta::of(id, change, shown) else {
                continue;
            };
            match &delta {
                Delta::Added(id, _) => {
                    self.shown.insert(id.clone());
                }
                Delta::Removed(id, _) => {
                    self.shown.remove(id);
                }
                Delta::Moved(..) => {}
            }
            deltas.push((delta, 1));
        }
        let metrics = self.dashboards.metrics.clone();
        for (i, deltas) in frames(deltas, MAX_ITEMS_PER_MESSAGE)
            .into_iter()
            .enumerate()
        {
            let mut update = VehicleUpdate {
                subscription: drained.version,
                snapshot: drained.reset && i == 0,
                ..VehicleUpdate::default()
            };
            for delta in deltas {
                let kind = match delta {
                    Delta::Removed(id, reason) => {
                        let id = id.to_string();
                        update.removed.push(DashboardRemoved { id, reason });
                        DeltaKind::Removed
                    }
                    Delta::Moved(_, state) => {
                        update.moved.push(DashboardMoved::from(&state));
                        DeltaKind::Moved
                    }
                    Delta::Added(_, state) => {
                        update.added.push(state);
                        DeltaKind::Added
                    }
                };
                metrics.delta_items(kind).inc();
            }
            self.send(&DashboardEvent::Update(update)).await?;
            metrics.delta_frames.inc();
        }
        Ok(())
    }

    /// Sends the counts of cells that changed since last sent (all of them
    /// for a snapshot), if any did.
    async fn density(&mut self, snapshot: bool) -> Result<(), End> {
        let Mode::Density {
            cells,
            sent,
            generation,
        } = &mut self.mode
        else {
            return Ok(());
        };
        let density = self.dashboards.fanout.density();
        let now = density.generation();
        if !snapshot && *generation == Some(now) {
            return Ok(());
        }
        *generation = Some(now);
        let counts = density.counts(cells, &self.filter);
        let mut changed = Vec::new();
        for ((cell, before), counts) in cells.iter().zip(sent.iter_mut()).zip(counts) {
            if snapshot || *before != counts {
                changed.push(CellCount {
                    cell: cell.to_string(),
                    counts,
                });
            }
            *before = counts;
        }
        if changed.is_empty() && !snapshot {
            return Ok(());
        }
        self.dashboards
            .metrics
            .density_cells_sent
            .inc_by(changed.len() as u64);
        let subscription = self.subscription;
        let mut first = snapshot;
        // A snapshot with no cells still says "nothing here".
        let chunks: Vec<&[CellCount]> = if changed.is_empty() {
            vec![&[]]
        } else {
            changed.chunks(MAX_CELLS_PER_MESSAGE).collect()
        };
        for chunk in chunks {
            let update = DensityUpdate {
                subscription,
                snapshot: std::mem::take(&mut first),
                cells: chunk.to_vec(),
            };
            self.send(&DashboardEvent::Density(update)).await?;
        }
        Ok(())
    }
}
