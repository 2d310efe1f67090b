//! The rider: watches the vehicles around a point and tells the app each
//! one added, moved and removed, in the order the node sent them.

use std::{
    collections::HashMap,
    sync::{mpsc as std_mpsc, Arc},
};

use hexfleet_client::{Applied, RiderClient, RiderOptions, Subscription};
use hexfleet_model::VehicleState;
use hexfleet_protocol::{Filter, RemoveReason};
use parking_lot::Mutex;
use tokio::{sync::mpsc, time::Instant};

use crate::{
    runtime::{fresh_token, runtime, Backoff, Coalesce, Dispatcher, Handle},
    ConnectionState, MobileError, NodeConfig, Target, TokenProvider, VehicleClass, VehicleStatus,
};

/// A vehicle in the rider's view.
#[derive(Debug, Clone, PartialEq, uniffi::Record)]
pub struct Vehicle {
    pub id: String,
    pub lat: f64,
    pub lon: f64,
    pub heading_deg: f32,
    pub speed_mps: f32,
    pub vehicle_class: VehicleClass,
    pub status: VehicleStatus,
}

impl From<&VehicleState> for Vehicle {
    fn from(s: &VehicleState) -> Self {
        Self {
            id: s.id.to_string(),
            lat: s.lat,
            lon: s.lon,
            heading_deg: s.heading_deg,
            speed_mps: s.speed_mps,
            vehicle_class: s.class.into(),
            status: s.status.into(),
        }
    }
}

/// Why a vehicle left the view.
#[derive(Debug, Clone, Copy, PartialEq, Eq, uniffi::Enum)]
pub enum RemovalReason {
    /// It drove out of the watched area, or the watch moved away.
    LeftView,
    /// Not heard from for too long.
    Stale,
    /// The driver signed off or lost its connection.
    Offline,
    /// It no longer matches the filter (e.g. went on a trip).
    Filtered,
}

impl From<RemoveReason> for RemovalReason {
    fn from(r: RemoveReason) -> Self {
        match r {
            RemoveReason::LeftView => Self::LeftView,
            RemoveReason::Stale => Self::Stale,
            RemoveReason::Offline => Self::Offline,
            RemoveReason::Filtered => Self::Filtered,
        }
    }
}

/// Where the rider looks, and what it wants to see.
#[derive(Debug, Clone, PartialEq, uniffi::Record)]
pub struct Watch {
    pub lat: f64,
    pub lon: f64,
    pub radius_m: f64,
    /// Empty: every class.
    pub classes: Vec<VehicleClass>,
    /// Empty: every status.
    pub statuses: Vec<VehicleStatus>,
}

/// Available vehicles of any class within `radius_m` of a point.
#[uniffi::export]
pub fn watch_around(lat: f64, lon: f64, radius_m: f64) -> Watch {
    Watch {
        lat,
        lon,
        radius_m,
        classes: Vec::new(),
        statuses: vec![VehicleStatus::Available],
    }
}

impl Watch {
    fn subscription(&self) -> Result<Subscription, MobileError> {
        let place = self.lat.is_finite()
            && self.lon.is_finite()
            && (-90.0..=90.0).contains(&self.lat)
            && (-180.0..=180.0).contains(&self.lon);
        if !(place && self.radius_m.is_finite() && self.radius_m > 0.0) {
            return Err(MobileError::InvalidArgument {
                reason: format!(
                    "a watch needs a place and a radius above 0, not ({}, {}) and {}",
                    self.lat, self.lon, self.radius_m
                ),
            });
        }
        Ok(Subscription {
            lat: self.lat,
            lon: self.lon,
            radius_m: self.radius_m,
            filter: Filter {
                classes: self.classes.iter().map(|&c| c.into()).collect(),
                statuses: self.statuses.iter().map(|&s| s.into()).collect(),
            },
        })
    }
}

/// Hears the rider's view change, and its connection.
#[uniffi::export(callback_interface)]
pub trait RiderListener: Send + Sync {
    fn on_added(&self, vehicle: Vehicle);
    fn on_moved(&self, vehicle: Vehicle);
    fn on_removed(&self, vehicle: Vehicle, reason: RemovalReason);
    fn on_state(&self, state: ConnectionState);
    /// The node refused a watch (e.g. a radius over its limit).
    fn on_watch_refused(&self, error: MobileError);
}

enum Call {
    Added(Vehicle),
    Moved(Vehicle),
    Removed(Vehicle, RemovalReason),
    State(ConnectionState),
    Refused(MobileError),
}

impl Coalesce for Call {
    fn vehicle(&self) -> Option<(&str, bool)> {
        match self {
            Call::Moved(v) => Some((&v.id, true)),
            Call::Added(v) | Call::Removed(v, _) => Some((&v.id, false)),
            Call::State(_) | Call::Refused(_) => None,
        }
    }
}

enum Command {
    Watch(Subscription),
    Pause,
    Resume,
    Network(String),
    Close(std_mpsc::Sender<()>),
}

/// A rider app's live view of the vehicles around it.
#[derive(uniffi::Object)]
pub struct Rider {
    handle: Handle<Command>,
    view: Arc<Mutex<HashMap<String, Vehicle>>>,
    connector: hexfleet_client::Connector,
}

/// What a rider's connection cost so far.
#[derive(Debug, Clone, Default, PartialEq, uniffi::Record)]
pub struct RiderStats {
    /// UDP datagrams the SDK sent and received: each wakes the radio.
    pub udp_datagrams_sent: u64,
    pub udp_datagrams_received: u64,
    pub vehicles: u64,
}

#[uniffi::export]
impl Rider {
    /// Connects a rider with `token` and waits for the node's welcome.
    /// Nothing is shown until [`watch`](Self::watch).
    #[uniffi::constructor]
    pub fn connect(
        node: NodeConfig,
        token: String,
        tokens: Box<dyn TokenProvider>,
        listener: Box<dyn RiderListener>,
    ) -> Result<Arc<Self>, MobileError> {
        let target = Target::new(&node)?;
        let view: Arc<Mutex<HashMap<String, Vehicle>>> = Arc::default();
        let (calls, finished) = {
            let view = view.clone();
            Dispatcher::new("rider", move |call| match call {
                Call::Added(v) => {
                    view.lock().insert(v.id.clone(), v.clone());
                    listener.on_added(v);
                }
                Call::Moved(v) => {
                    view.lock().insert(v.id.clone(), v.clone());
                    listener.on_moved(v);
                }
                Call::Removed(v, reason) => {
                    view.lock().remove(&v.id);
                    listener.on_removed(v, reason);
                }
                Call::State(state) => listener.on_state(state),
                Call::Refused(e) => listener.on_watch_refused(e),
            })
        };
        let (commands, inbox) = mpsc::unbounded_channel();
        let (first_tx, first_rx) = std_mpsc::channel();
        let connector = target.connector.clone();
        let supervisor = Supervisor {
            target,
            token,
            tokens: Arc::new(tokens),
            calls,
            watch: None,
            client: None,
        };
        runtime().spawn(supervisor.run(inbox, first_tx));
        let handle = Handle::started(commands, finished, first_rx)?;
        Ok(Arc::new(Self {
            handle,
            view,
            connector,
        }))
    }

    /// Watches around a point; a later watch replaces it (the node sends
    /// only the difference).
    pub fn watch(&self, watch: Watch) -> Result<(), MobileError> {
        let subscription = watch.subscription()?;
        self.command(Command::Watch(subscription))
    }

    pub fn stats(&self) -> RiderStats {
        let (sent, received) = self.connector.udp_datagrams();
        RiderStats {
            udp_datagrams_sent: sent,
            udp_datagrams_received: received,
            vehicles: self.view.lock().len() as u64,
        }
    }

    /// The vehicles in view, as the listener has been told them.
    pub fn vehicles(&self) -> Vec<Vehicle> {
        self.view.lock().values().cloned().collect()
    }

    /// The app went to the background: the connection is closed (no
    /// packets at all) until `resume`, which shows the view afresh.
    pub fn pause(&self) -> Result<(), MobileError> {
        self.command(Command::Pause)
    }

    pub fn resume(&self) -> Result<(), MobileError> {
        self.command(Command::Resume)
    }

    /// The device moved to another network (a Wi-Fi name, a carrier).
    pub fn set_network(&self, network: String) -> Result<(), MobileError> {
        self.command(Command::Network(network))
    }

    /// Signs off; waits up to three seconds for the node to take it.
    pub fn close(&self) {
        self.handle.close(Command::Close);
    }
}

impl Rider {
    fn command(&self, command: Command) -> Result<(), MobileError> {
        self.handle.send(command)
    }
}

struct Supervisor {
    target: Target,
    token: String,
    tokens: Arc<Box<dyn TokenProvider>>,
    calls: Dispatcher<Call>,
    watch: Option<Subscription>,
    client: Option<RiderClient>,
}

impl Supervisor {
    async fn run(
        mut self,
        mut inbox: mpsc::UnboundedReceiver<Command>,
        first: std_mpsc::Sender<Result<(), MobileError>>,
    ) {
        let mut first = Some(first);
        let mut paused = false;
        let mut backoff = Backoff::new();
        let mut retry_at: Option<Instant> = None;
        let mut refused_seen = 0;
        loop {
            if self.client.is_none() && !paused && retry_at.is_none_or(|at| at <= Instant::now()) {
                retry_at = None;
                match self.connect().await {
                    Ok(()) => {
                        backoff.reset();
                        refused_seen = 0;
                        if let Some(first) = first.take() {
                            let _ = first.send(Ok(()));
                        }
                    }
                    Err(e) => {
                        if let Some(first) = first.take() {
                            let _ = first.send(Err(e));
                            return;
                        }
                        if !e.transient() {
                            self.calls
                                .send(Call::State(ConnectionState::Closed { error: Some(e) }));
                            return;
                        }
                        self.calls.send(Call::State(ConnectionState::Reconnecting {
                            reason: e.to_string(),
                        }));
                        retry_at = Some(backoff.next_at());
                    }
                }
                continue;
            }
            let client = self.client.as_ref();
            tokio::select! {
                command = inbox.recv() => match command {
                    Some(Command::Watch(subscription)) => {
                        if let Some(client) = &self.client {
                            client.subscribe(subscription.clone());
                        }
                        self.watch = Some(subscription);
                    }
                    Some(Command::Pause) => {
                        paused = true;
                        self.drop_view().await;
                        self.calls.send(Call::State(ConnectionState::Paused));
                    }
                    Some(Command::Resume) => paused = false,
                    Some(Command::Network(network)) => self.target.connector.set_network(&network),
                    Some(Command::Close(done)) => {
                        self.drop_view().await;
                        self.calls.send(Call::State(ConnectionState::Closed { error: None }));
                        let _ = done.send(());
                        return;
                    }
                    None => {
                        self.drop_view().await;
                        return;
                    }
                },
                _ = finished(client) => {
                    let why = self.client.as_ref().and_then(|c| c.closed_by_node());
                    self.drop_view().await;
                    let why = match why {
                        Some((code, reason)) => MobileError::from(hexfleet_client::ClientError::Refused { code, reason }),
                        None => MobileError::Unreachable { reason: "the connection was lost".into() },
                    };
                    if let MobileError::TokenExpired { .. } = why {
                        match fresh_token(&self.tokens, why.clone()).await {
                            Ok(token) => self.token = token,
                            Err(e) => {
                                self.calls.send(Call::State(ConnectionState::Closed { error: Some(e) }));
                                return;
                            }
                        }
                    } else if !why.transient() && !matches!(why, MobileError::Unreachable { .. }) {
                        self.calls.send(Call::State(ConnectionState::Closed { error: Some(why) }));
                        return;
                    }
                    self.calls.send(Call::State(ConnectionState::Reconnecting { reason: why.to_string() }));
                }
                _ = sleep_until(retry_at) => {}
                refused = refusals(client, refused_seen) => {
                    refused_seen += refused.len();
                    for r in refused {
                        let e = MobileError::from(hexfleet_client::ClientError::Refused { code: r.code, reason: r.reason });
                        self.calls.send(Call::Refused(e));
                    }
                }
            }
        }
    }

    async fn connect(&mut self) -> Result<(), MobileError> {
        let mut refreshed = false;
        loop {
            let calls = self.calls.clone();
            let options = RiderOptions {
                reconnect: false,
                seeds: Vec::new(),
                observer: Some(Arc::new(move |state: &VehicleState, how: Applied| {
                    let vehicle = Vehicle::from(state);
                    calls.send(match how {
                        Applied::Added => Call::Added(vehicle),
                        Applied::Moved => Call::Moved(vehicle),
                        Applied::Removed(reason) => Call::Removed(vehicle, reason.into()),
                    });
                })),
            };
            let connector = &self.target.connector;
            match connector
                .rider(self.target.quic, &self.token, options)
                .await
                .map_err(MobileError::from)
            {
                Ok(client) => {
                    if let Some(watch) = &self.watch {
                        client.subscribe(watch.clone());
                    }
                    if let Some(transport) = client.transport() {
                        self.calls.send(Call::State(ConnectionState::Connected {
                            transport: transport.into(),
                        }));
                    }
                    self.client = Some(client);
                    return Ok(());
                }
                Err(e @ (MobileError::Unauthorized { .. } | MobileError::TokenExpired { .. }))
                    if !refreshed =>
                {
                    refreshed = true;
                    self.token = fresh_token(&self.tokens, e).await?;
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// Ends the client in use; the app hears every vehicle it showed go.
    async fn drop_view(&mut self) {
        if let Some(client) = self.client.take() {
            for state in client.view().values() {
                self.calls
                    .send(Call::Removed(Vehicle::from(state), RemovalReason::LeftView));
            }
            client.close().await;
        }
    }
}

async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

async fn finished(client: Option<&RiderClient>) {
    match client {
        Some(client) => client.finished().await,
        None => std::future::pending().await,
    }
}

/// Watches the node refused since `seen`, as they come.
async fn refusals(
    client: Option<&RiderClient>,
    seen: usize,
) -> Vec<hexfleet_protocol::SubscribeError> {
    let Some(client) = client else {
        return std::future::pending().await;
    };
    let mut count = client.watch_refusals();
    if count.wait_for(|n| *n > seen).await.is_err() {
        return std::future::pending().await;
    }
    client.refused().get(seen..).unwrap_or_default().to_vec()
}
