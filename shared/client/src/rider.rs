//! The rider client: subscribes to the vehicles around a point and keeps a
//! local view — what a rider app renders — by applying the node's snapshot
//! and deltas.
//!
//! The connection is kept by a background task. When it drops, the task
//! reconnects, subscribes again with the latest subscription, and the new
//! snapshot replaces the view: no vehicle from before the drop survives
//! unless the node still shows it.

use std::{
    collections::{HashMap, VecDeque},
    net::SocketAddr,
    sync::{
        atomic::{AtomicU32, AtomicU64, Ordering},
        Arc,
    },
    time::Duration,
};

use futures_util::StreamExt;
use hexfleet_model::{VehicleId, VehicleState};
use hexfleet_protocol::{
    ClientMsg, ErrorCode, Filter, Moved, RemoveReason, RiderUpdate, Role, ServerMsg, Subscribe,
    SubscribeError,
};
use parking_lot::Mutex;
use tokio::sync::{mpsc, watch};

use crate::{
    connector::{ClientError, Connector, ControlRead, ControlWrite, Established, Greeting},
    transport::{accept_push, CloseAs, Conn, PushRead, Transport},
};

/// Where a rider looks.
#[derive(Debug, Clone, PartialEq)]
pub struct Subscription {
    pub lat: f64,
    pub lon: f64,
    pub radius_m: f64,
    pub filter: Filter,
}

impl Subscription {
    /// Available vehicles of any class within `radius_m`.
    pub fn around(lat: f64, lon: f64, radius_m: f64) -> Self {
        Self {
            lat,
            lon,
            radius_m,
            filter: Filter::default(),
        }
    }
}

/// One delta as the view applied it.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    Added(VehicleId),
    Moved(VehicleId),
    Removed(VehicleId, RemoveReason),
}

/// How a vehicle came to be applied to the view.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Applied {
    /// Entered the view (or changed more than its position).
    Added,
    /// A new position of a vehicle already in view.
    Moved,
    /// Left the view (its last state is given).
    Removed(RemoveReason),
}

/// Called with each vehicle the view adds, moves or removes, after applying
/// it. It runs on the client's task: it must not block.
pub type Observer = Arc<dyn Fn(&VehicleState, Applied) + Send + Sync>;

#[derive(Clone, Default)]
pub struct RiderOptions {
    /// Reconnect and resubscribe when the connection drops.
    pub reconnect: bool,
    /// Other nodes to try when reconnecting (any node serves any rider).
    pub seeds: Vec<SocketAddr>,
    pub observer: Option<Observer>,
}

/// What the rider received so far.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct RiderStats {
    pub frames: u64,
    /// Bytes of update frames, framing included.
    pub bytes: u64,
    pub added: u64,
    pub moved: u64,
    pub removed: u64,
    pub snapshots: u64,
    pub reconnects: u64,
}

impl std::ops::AddAssign<&RiderStats> for RiderStats {
    /// Sums what several riders received.
    fn add_assign(&mut self, other: &RiderStats) {
        self.frames += other.frames;
        self.bytes += other.bytes;
        self.added += other.added;
        self.moved += other.moved;
        self.removed += other.removed;
        self.snapshots += other.snapshots;
        self.reconnects += other.reconnects;
    }
}

const MAX_EVENTS: usize = 100_000;

#[derive(Default)]
struct ViewState {
    vehicles: HashMap<VehicleId, VehicleState>,
    aliases: HashMap<u32, VehicleId>,
}

struct Shared {
    view: Mutex<ViewState>,
    version: watch::Sender<u32>,
    stats: Mutex<RiderStats>,
    bytes: Arc<AtomicU64>,
    events: Mutex<VecDeque<Event>>,
    refused: Mutex<Vec<SubscribeError>>,
    closed: Mutex<Option<(ErrorCode, String)>>,
    observer: Option<Observer>,
    /// How the link in use reaches the node; `None` while reconnecting.
    transport: watch::Sender<Option<Transport>>,
    /// Set when the background task stops.
    finished: watch::Sender<bool>,
    /// How many subscriptions the node refused so far.
    refusals: watch::Sender<usize>,
}

enum Command {
    Subscribe(Subscribe),
    /// Drop the connection without a goodbye (as a phone losing signal).
    Drop,
    Close,
}

pub struct RiderClient {
    shared: Arc<Shared>,
    commands: mpsc::UnboundedSender<Command>,
    next_id: AtomicU32,
    task: tokio::task::JoinHandle<()>,
}

/// A live connection: control stream both ways, pushes in.
struct Link {
    conn: Conn,
    tx: ControlWrite,
    rx: ControlRead,
    push: PushRead,
}

async fn link(
    connector: &Connector,
    addr: SocketAddr,
    token: &str,
    bytes: &Arc<AtomicU64>,
) -> Result<Link, ClientError> {
    let Greeting::Welcome(established) = connector.hello(addr, Role::Rider, token).await? else {
        return Err(ClientError::TooManyRedirects);
    };
    let Established { conn, tx, rx, .. } = *established;
    let push = accept_push(&conn, bytes).await?;
    Ok(Link { conn, tx, rx, push })
}

impl Connector {
    /// Connects a rider. Nothing is shown until [`RiderClient::subscribe`].
    pub async fn rider(
        &self,
        addr: SocketAddr,
        token: &str,
        options: RiderOptions,
    ) -> Result<RiderClient, ClientError> {
        let bytes = Arc::new(AtomicU64::new(0));
        let first = link(self, addr, token, &bytes).await?;
        let (version, _) = watch::channel(0);
        let shared = Arc::new(Shared {
            view: Mutex::new(ViewState::default()),
            version,
            stats: Mutex::new(RiderStats::default()),
            bytes,
            events: Mutex::new(VecDeque::new()),
            refused: Mutex::new(Vec::new()),
            closed: Mutex::new(None),
            observer: options.observer.clone(),
            transport: watch::Sender::new(Some(first.conn.transport())),
            finished: watch::Sender::new(false),
            refusals: watch::Sender::new(0),
        });
        let (commands, inbox) = mpsc::unbounded_channel();
        let mut targets = vec![addr];
        targets.extend(options.seeds.iter().filter(|s| **s != addr));
        let kept = keep(
            self.clone(),
            targets,
            token.to_string(),
            options.reconnect,
            first,
            shared.clone(),
            inbox,
        );
        let done = shared.clone();
        let task = tokio::spawn(async move {
            kept.await;
            done.transport.send_replace(None);
            done.finished.send_replace(true);
        });
        Ok(RiderClient {
            shared,
            commands,
            next_id: AtomicU32::new(1),
            task,
        })
    }
}

/// Keeps the rider connected: serves one link until it drops, then (with
/// `reconnect`) makes another and subscribes again.
async fn keep(
    connector: Connector,
    targets: Vec<SocketAddr>,
    token: String,
    reconnect: bool,
    mut link_now: Link,
    shared: Arc<Shared>,
    mut inbox: mpsc::UnboundedReceiver<Command>,
) {
    let mut latest: Option<Subscribe> = None;
    // Which of `targets` the link goes to.
    let mut next = 0usize;
    loop {
        if let Some(sub) = &latest {
            if link_now
                .tx
                .send(ClientMsg::Subscribe(sub.clone()))
                .await
                .is_err()
            {
                // Fall through: serving the broken link ends at once.
            }
        }
        let served = serve(&connector, &mut link_now, &shared, &mut inbox, &mut latest).await;
        shared.transport.send_replace(None);
        let mut redirected = match served {
            Ended::ByUs => return,
            Ended::Redirected(to) => Some(to),
            Ended::Dropped if reconnect => None,
            Ended::Dropped => return,
        };
        // The nodes in turn, with jitter so that a dead node's riders do not
        // all come back at once.
        let mut backoff = Duration::from_millis(50);
        link_now = loop {
            if redirected.is_none() {
                tokio::time::sleep(backoff.mul_f64(rand::random_range(0.5..1.5))).await;
            }
            // Where it was redirected, else the next node: the one in use
            // may be the one that died.
            let addr = match redirected.take() {
                Some(to) => to,
                None => {
                    next += 1;
                    targets[next % targets.len()]
                }
            };
            match link(&connector, addr, &token, &shared.bytes).await {
                Ok(l) => break l,
                Err(e) => {
                    tracing::debug!(%addr, error = %e, "rider reconnect failed");
                    backoff = (backoff * 2).min(Duration::from_secs(2));
                }
            }
        };
        shared.stats.lock().reconnects += 1;
        shared
            .transport
            .send_replace(Some(link_now.conn.transport()));
    }
}

enum Ended {
    ByUs,
    Dropped,
    Redirected(SocketAddr),
}

async fn serve(
    connector: &Connector,
    link: &mut Link,
    shared: &Shared,
    inbox: &mut mpsc::UnboundedReceiver<Command>,
    latest: &mut Option<Subscribe>,
) -> Ended {
    loop {
        tokio::select! {
            command = inbox.recv() => match command {
                Some(Command::Subscribe(sub)) => {
                    *latest = Some(sub.clone());
                    if link.tx.send(ClientMsg::Subscribe(sub)).await.is_err() {
                        return Ended::Dropped;
                    }
                }
                Some(Command::Drop) => {
                    link.conn.close(CloseAs::Goodbye, "");
                    return Ended::Dropped;
                }
                Some(Command::Close) | None => {
                    let _ = link.tx.send(ClientMsg::Goodbye).await;
                    let _ = tokio::time::timeout(Duration::from_secs(1), link.conn.closed()).await;
                    link.conn.close(CloseAs::Goodbye, "goodbye");
                    return Ended::ByUs;
                }
            },
            update = link.push.next() => match update {
                Some(Ok(update)) => {
                    if apply(shared, update).is_err() {
                        link.conn.close(CloseAs::Refused(ErrorCode::ProtocolViolation), "undecodable moved records");
                        return Ended::Dropped;
                    }
                }
                _ => return last_word(connector, link, shared).await,
            },
            control = link.rx.next() => match control {
                Some(Ok(msg)) => {
                    if let Some(ended) = on_control(connector, shared, msg) {
                        return ended;
                    }
                }
                _ => {
                    note_close(link, shared);
                    return Ended::Dropped;
                }
            },
        }
    }
}

/// Takes one message of the control stream; `Some` when it ends the link.
fn on_control(connector: &Connector, shared: &Shared, msg: ServerMsg) -> Option<Ended> {
    match msg {
        ServerMsg::SubscribeError(e) => {
            let count = {
                let mut refused = shared.refused.lock();
                refused.push(e);
                refused.len()
            };
            shared.refusals.send_replace(count);
            None
        }
        ServerMsg::Error(e) => {
            *shared.closed.lock() = Some((e.code, e.reason));
            None
        }
        // Served better by the node that owns where it looks.
        ServerMsg::Redirect(r) => Some(match connector.follow(&r) {
            Some(to) => Ended::Redirected(to),
            None => Ended::Dropped,
        }),
        _ => None,
    }
}

/// How a link whose push stream ended turns out. The node ends the push
/// stream as it closes, and says why on the control stream: a refusal, or
/// where the rider belongs. Both streams may end at the same moment (a
/// WebSocket's close frame ends both channels), so the control stream is
/// read to its end before the link counts as dropped: a redirect read
/// there is followed, as if it had come first.
async fn last_word(connector: &Connector, link: &mut Link, shared: &Shared) -> Ended {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(1);
    while let Ok(Some(Ok(msg))) = tokio::time::timeout_at(deadline, link.rx.next()).await {
        if let Some(ended) = on_control(connector, shared, msg) {
            return ended;
        }
    }
    note_close(link, shared);
    Ended::Dropped
}

/// Keeps why the node closed the link, when it says (the push stream or
/// the control stream may be the first to notice the close).
fn note_close(link: &Link, shared: &Shared) {
    if let Some(ClientError::Refused { code, reason }) = link.conn.close_error() {
        let mut closed = shared.closed.lock();
        if closed.is_none() {
            *closed = Some((code, reason));
        }
    }
}

struct Undecodable;

fn apply(shared: &Shared, update: RiderUpdate) -> Result<(), Undecodable> {
    let moved = Moved::unpack(&update.moved).ok_or(Undecodable)?;
    let mut events = Vec::with_capacity(update.added.len() + update.removed.len() + moved.len());
    {
        let mut view = shared.view.lock();
        let ViewState { vehicles, aliases } = &mut *view;
        if update.snapshot {
            // What the app shows goes with the old view: the snapshot adds
            // what the node shows now.
            if let Some(observer) = &shared.observer {
                for state in vehicles.values() {
                    observer(state, Applied::Removed(RemoveReason::LeftView));
                }
            }
            vehicles.clear();
            aliases.clear();
        }
        for r in &update.removed {
            if let Some(id) = aliases.remove(&r.alias) {
                if let Some(state) = vehicles.remove(&id) {
                    if let Some(observer) = &shared.observer {
                        observer(&state, Applied::Removed(r.reason));
                    }
                }
                events.push(Event::Removed(id, r.reason));
            }
        }
        for a in update.added {
            let id = a.state.id.clone();
            if let Some(observer) = &shared.observer {
                observer(&a.state, Applied::Added);
            }
            aliases.insert(a.alias, id.clone());
            vehicles.insert(id.clone(), a.state);
            events.push(Event::Added(id));
        }
        for m in &moved {
            let Some(id) = aliases.get(&m.alias) else {
                continue;
            };
            let Some(v) = vehicles.get_mut(id) else {
                continue;
            };
            v.lat = m.lat();
            v.lon = m.lon();
            v.heading_deg = m.heading_deg();
            v.speed_mps = m.speed_mps();
            if let Some(observer) = &shared.observer {
                observer(v, Applied::Moved);
            }
            events.push(Event::Moved(id.clone()));
        }
    }
    {
        let mut stats = shared.stats.lock();
        stats.frames += 1;
        stats.bytes = shared.bytes.load(Ordering::Relaxed);
        stats.snapshots += u64::from(update.snapshot);
        for e in &events {
            match e {
                Event::Added(_) => stats.added += 1,
                Event::Moved(_) => stats.moved += 1,
                Event::Removed(..) => stats.removed += 1,
            }
        }
    }
    {
        let mut log = shared.events.lock();
        log.extend(events);
        while log.len() > MAX_EVENTS {
            log.pop_front();
        }
    }
    shared.version.send_replace(update.subscription);
    Ok(())
}

impl RiderClient {
    /// Watches the vehicles around a point; replaces any previous
    /// subscription (the node then sends only the difference). Returns the
    /// subscription's id.
    pub fn subscribe(&self, sub: Subscription) -> u32 {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let _ = self.commands.send(Command::Subscribe(Subscribe {
            id,
            lat: sub.lat,
            lon: sub.lon,
            radius_m: sub.radius_m,
            filter: sub.filter,
        }));
        id
    }

    /// Waits until the view reflects subscription `id` (or a later one).
    pub async fn wait_for(&self, id: u32, within: Duration) -> Result<(), ClientError> {
        let mut version = self.shared.version.subscribe();
        let reached = tokio::time::timeout(within, version.wait_for(|v| *v >= id)).await;
        match reached {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(_)) => Err(ClientError::Protocol("the rider task ended".into())),
            Err(_) => Err(ClientError::Timeout),
        }
    }

    /// The vehicles in view now.
    pub fn view(&self) -> HashMap<VehicleId, VehicleState> {
        self.shared.view.lock().vehicles.clone()
    }

    /// The subscription the view reflects.
    pub fn subscription(&self) -> u32 {
        *self.shared.version.borrow()
    }

    pub fn stats(&self) -> RiderStats {
        let mut stats = self.shared.stats.lock().clone();
        stats.bytes = self.shared.bytes.load(Ordering::Relaxed);
        stats
    }

    /// The deltas applied since the last call, oldest first.
    pub fn take_events(&self) -> Vec<Event> {
        self.shared.events.lock().drain(..).collect()
    }

    /// Follows how many subscriptions the node refused so far.
    pub fn watch_refusals(&self) -> watch::Receiver<usize> {
        self.shared.refusals.subscribe()
    }

    /// Subscriptions the node refused, with its reasons.
    pub fn refused(&self) -> Vec<SubscribeError> {
        self.shared.refused.lock().clone()
    }

    /// Why the node closed the connection, if it did.
    pub fn closed_by_node(&self) -> Option<(ErrorCode, String)> {
        self.shared.closed.lock().clone()
    }

    /// How the rider reaches its node now; `None` while it reconnects.
    pub fn transport(&self) -> Option<Transport> {
        *self.shared.transport.borrow()
    }

    /// Follows [`transport`](Self::transport) as it changes.
    pub fn watch_transport(&self) -> watch::Receiver<Option<Transport>> {
        self.shared.transport.subscribe()
    }

    /// Waits until the background task stops (closed, or dropped without
    /// reconnecting).
    pub async fn finished(&self) {
        let mut finished = self.shared.finished.subscribe();
        let _ = finished.wait_for(|f| *f).await;
    }

    /// Whether the background task has stopped (closed, or dropped without
    /// reconnecting).
    pub fn is_finished(&self) -> bool {
        self.task.is_finished()
    }

    /// Drops the connection as a phone losing signal would; with
    /// `reconnect`, the client connects again and resubscribes.
    pub fn drop_connection(&self) {
        let _ = self.commands.send(Command::Drop);
    }

    /// Signs off and stops.
    pub async fn close(self) {
        let _ = self.commands.send(Command::Close);
        let deadline = tokio::time::Instant::now() + Duration::from_secs(2);
        while !self.task.is_finished() && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}

impl Drop for RiderClient {
    fn drop(&mut self) {
        self.task.abort();
    }
}
