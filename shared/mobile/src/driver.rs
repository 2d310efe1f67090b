//! The driver: what the app reports, what the SDK sends, and when.
//!
//! Every packet wakes the phone's radio, so the SDK sends a fix only as
//! often as the vehicle's movement needs ([`ReportingPolicy`]): on a trip
//! at the fastest rate the app allows; moving, about once per
//! `distance_m` travelled; parked, at the slowest rate (which must stay
//! under the node's `store.stale_after`, 30 s by default, or the vehicle is
//! dropped as stale). Between sends it keeps only the latest location.

use std::{
    collections::VecDeque,
    net::SocketAddr,
    sync::{mpsc as std_mpsc, Arc},
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use hexfleet_client::{ClientError, DriverClient, DriverOptions, FixInput};
use hexfleet_model::VehicleStatus as ModelStatus;
use hexfleet_protocol::DriverReport;
use parking_lot::Mutex;
use tokio::{sync::mpsc, time::Instant};

use crate::{
    runtime::{fresh_token, runtime, Backoff, Dispatcher, Handle},
    ConnectionState, MobileError, NodeConfig, Target, TokenProvider, Transport, VehicleClass,
    VehicleStatus,
};

/// A location as the phone's OS gives it.
#[derive(Debug, Clone, Copy, PartialEq, uniffi::Record)]
pub struct Location {
    pub lat: f64,
    pub lon: f64,
    /// Degrees clockwise from north.
    pub heading_deg: f32,
    pub speed_mps: f32,
    pub accuracy_m: f32,
    /// When the OS took it, Unix milliseconds; 0: now.
    pub time_ms: i64,
}

/// How often the SDK sends, within the app's bounds.
#[derive(Debug, Clone, Copy, PartialEq, uniffi::Record)]
pub struct ReportingPolicy {
    /// The fastest: on a trip, or moving fast.
    pub min_interval_ms: u64,
    /// The slowest: parked. Keep it under the node's `stale_after` (30 s by
    /// default) with room for a lost packet.
    pub max_interval_ms: u64,
    /// Moving, a fix about every this many metres.
    pub distance_m: f64,
    /// While the connection is lost, keep every location (up to
    /// [`MAX_TRACK`]) and send them all on reconnect, in order; otherwise
    /// only the latest is sent. The node takes fixes up to its `max_age`
    /// (30 s by default) old.
    pub keep_track: bool,
}

/// Locations kept while the connection is lost, with `keep_track`.
pub const MAX_TRACK: usize = 600;

/// The SDK's defaults: every 1 s on a trip, about every 30 m moving, every
/// 12 s parked; the latest location only after a signal loss.
#[uniffi::export]
pub fn reporting_policy() -> ReportingPolicy {
    ReportingPolicy {
        min_interval_ms: 1_000,
        max_interval_ms: 12_000,
        distance_m: 30.0,
        keep_track: false,
    }
}

impl ReportingPolicy {
    fn check(&self) -> Result<(), MobileError> {
        if self.min_interval_ms == 0
            || self.max_interval_ms < self.min_interval_ms
            || !(self.distance_m.is_finite() && self.distance_m > 0.0)
        {
            return Err(MobileError::InvalidArgument {
                reason: format!(
                    "the reporting policy needs 0 < min_interval_ms <= max_interval_ms and distance_m > 0, not {self:?}"
                ),
            });
        }
        Ok(())
    }

    /// How long after the last fix sent the next one is due, for a vehicle
    /// reporting `location` with `status`.
    pub(crate) fn interval(&self, location: &Location, status: ModelStatus) -> Duration {
        let (min, max) = (self.min_interval_ms as f64, self.max_interval_ms as f64);
        if status == ModelStatus::OnTrip {
            return Duration::from_millis(self.min_interval_ms);
        }
        let speed = f64::from(location.speed_mps);
        // Parked (or no speed, NaN included): the slowest rate.
        if speed.is_nan() || speed < 0.5 {
            return Duration::from_millis(self.max_interval_ms);
        }
        let ms = (self.distance_m / speed * 1e3).clamp(min, max);
        Duration::from_millis(ms as u64)
    }
}

/// What the app does when it goes to the background.
#[derive(Debug, Clone, Copy, PartialEq, Eq, uniffi::Enum)]
pub enum PauseMode {
    /// Stop sending fixes; keep the connection (a keep-alive every 20 s).
    /// The node drops the vehicle as stale after `stale_after`.
    KeepConnection,
    /// Stop sending and close the connection: no packets at all. The node
    /// shows the vehicle for `offline_grace`, then removes it (offline).
    Disconnect,
}

/// Hears how the driver's connection is doing.
#[uniffi::export(callback_interface)]
pub trait DriverListener: Send + Sync {
    fn on_state(&self, state: ConnectionState);
}

/// What the driver did so far.
#[derive(Debug, Clone, Default, PartialEq, uniffi::Record)]
pub struct DriverStats {
    /// Locations the app reported.
    pub locations: u64,
    /// Fixes sent to the node.
    pub fixes_sent: u64,
    /// The highest sequence the node accepted.
    pub acked_seq: u64,
    /// Fixes the node refused (with reasons in its acknowledgements).
    pub rejected: u64,
    pub reconnects: u64,
    pub transport: Option<Transport>,
    /// UDP datagrams the SDK sent and received: each wakes the radio.
    pub udp_datagrams_sent: u64,
    pub udp_datagrams_received: u64,
    /// Locations waiting for the connection to come back.
    pub buffered: u64,
    /// How far off the phone's clock is from the node's, in milliseconds
    /// (positive when the phone is behind). The SDK puts fix times in the
    /// node's clock either way; past `CLOCK_WARNING_MS` (10 s) an app may
    /// tell its user to set the phone's clock.
    pub clock_offset_ms: i64,
}

enum Command {
    Location(Location),
    Status(ModelStatus),
    Class(hexfleet_model::VehicleClass),
    Policy(ReportingPolicy),
    Pause(PauseMode),
    Resume,
    Network(String),
    Close(std_mpsc::Sender<()>),
}

/// A driver app's connection to hexfleet.
#[derive(uniffi::Object)]
pub struct Driver {
    handle: Handle<Command>,
    stats: Arc<Mutex<DriverStats>>,
    connector: hexfleet_client::Connector,
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

#[uniffi::export]
impl Driver {
    /// Connects a driver with `token` (the app's driver token) and waits
    /// for the node's welcome, over QUIC or, where UDP is blocked,
    /// WebSocket. Call it off the UI thread. Errors are typed: a refused
    /// token is `Unauthorized`, no node `Unreachable`.
    #[uniffi::constructor]
    pub fn connect(
        node: NodeConfig,
        token: String,
        tokens: Box<dyn TokenProvider>,
        vehicle_class: VehicleClass,
        status: VehicleStatus,
        policy: ReportingPolicy,
        listener: Box<dyn DriverListener>,
    ) -> Result<Arc<Self>, MobileError> {
        policy.check()?;
        let target = Target::new(&node)?;
        let (commands, inbox) = mpsc::unbounded_channel();
        let stats = Arc::new(Mutex::new(DriverStats::default()));
        let (first_tx, first_rx) = std_mpsc::channel();
        let connector = target.connector.clone();
        let (states, finished) = Dispatcher::new("driver", move |state| listener.on_state(state));
        let supervisor = Supervisor {
            node: target.quic,
            target,
            token,
            tokens: Arc::new(tokens),
            report: DriverReport {
                class: vehicle_class.into(),
                status: status.into(),
            },
            policy,
            states,
            stats: stats.clone(),
            client: None,
            pending: None,
            track: VecDeque::new(),
            last_sent: None,
            last_location: None,
            due: None,
            send_now: true,
            paused: None,
            ended: false,
        };
        runtime().spawn(supervisor.run(inbox, first_tx));
        let handle = Handle::started(commands, finished, first_rx)?;
        Ok(Arc::new(Self {
            handle,
            stats,
            connector,
        }))
    }

    /// Hands the SDK a location from the OS (as often as it comes); the
    /// SDK sends what the policy calls for.
    pub fn report_location(&self, location: Location) -> Result<(), MobileError> {
        if !(location.lat.is_finite()
            && location.lon.is_finite()
            && (-90.0..=90.0).contains(&location.lat)
            && (-180.0..=180.0).contains(&location.lon))
        {
            return Err(MobileError::InvalidArgument {
                reason: format!("no such place: ({}, {})", location.lat, location.lon),
            });
        }
        self.command(Command::Location(location))
    }

    /// The vehicle's status; `OnTrip` reports at the fastest rate.
    pub fn set_status(&self, status: VehicleStatus) -> Result<(), MobileError> {
        self.command(Command::Status(status.into()))
    }

    /// The vehicle's class, as riders filter on it.
    pub fn set_vehicle_class(&self, vehicle_class: VehicleClass) -> Result<(), MobileError> {
        self.command(Command::Class(vehicle_class.into()))
    }

    pub fn set_policy(&self, policy: ReportingPolicy) -> Result<(), MobileError> {
        policy.check()?;
        self.command(Command::Policy(policy))
    }

    /// The app went to the background: no more fixes until `resume`.
    pub fn pause(&self, mode: PauseMode) -> Result<(), MobileError> {
        self.command(Command::Pause(mode))
    }

    /// Back in the foreground: the latest location goes out at once (or
    /// the next one, if the latest is too old for the node).
    pub fn resume(&self) -> Result<(), MobileError> {
        self.command(Command::Resume)
    }

    /// The device moved to another network (a Wi-Fi name, a carrier).
    pub fn set_network(&self, network: String) -> Result<(), MobileError> {
        self.command(Command::Network(network))
    }

    /// Drops every QUIC packet, both ways, as in a tunnel (`false`: out of
    /// it), to see what the app and the node do through a signal loss.
    /// For tests and demos.
    pub fn simulate_signal_loss(&self, lost: bool) {
        self.connector.simulate_udp_blocked(lost);
    }

    pub fn stats(&self) -> DriverStats {
        self.stats.lock().clone()
    }

    /// Signs off: the node removes the vehicle at once. Waits up to three
    /// seconds for the node to take it.
    pub fn close(&self) {
        self.handle.close(Command::Close);
    }
}

impl Driver {
    fn command(&self, command: Command) -> Result<(), MobileError> {
        self.handle.send(command)
    }
}

/// Keeps the driver connected and decides what to send when.
struct Supervisor {
    target: Target,
    /// Where to connect: the configured node, or where it redirected.
    node: SocketAddr,
    token: String,
    tokens: Arc<Box<dyn TokenProvider>>,
    report: DriverReport,
    policy: ReportingPolicy,
    states: Dispatcher<ConnectionState>,
    stats: Arc<Mutex<DriverStats>>,
    client: Option<DriverClient>,
    /// The latest location not yet sent.
    pending: Option<Location>,
    /// Every location since the connection was lost (with `keep_track`).
    track: VecDeque<Location>,
    last_sent: Option<Instant>,
    /// The last location sent, with its sequence: sent again on a new
    /// connection when the node never took it (it went into a connection
    /// that was already dying).
    last_location: Option<(u64, Location)>,
    /// When the pending location is due.
    due: Option<Instant>,
    /// The next location goes out at once (after a resume or a reconnect).
    send_now: bool,
    paused: Option<PauseMode>,
    /// Closed for good (no fresh token).
    ended: bool,
}

/// A fix older than this on resume is not sent: the node would refuse it
/// as too old (`ingest.max_age`, 30 s by default).
const FRESH_FOR: Duration = Duration::from_secs(25);

impl Supervisor {
    async fn run(
        mut self,
        mut inbox: mpsc::UnboundedReceiver<Command>,
        first: std_mpsc::Sender<Result<(), MobileError>>,
    ) {
        let mut first = Some(first);
        let mut backoff = Backoff::new();
        let mut retry_at: Option<Instant> = None;
        loop {
            let wants_connection = self.client.is_none()
                && self.paused != Some(PauseMode::Disconnect)
                && retry_at.is_none_or(|at| at <= Instant::now());
            if wants_connection {
                retry_at = None;
                match self.connect().await {
                    Ok(()) => {
                        backoff.reset();
                        if let Some(first) = first.take() {
                            let _ = first.send(Ok(()));
                        }
                        self.connected().await;
                    }
                    Err(e) => {
                        if let Some(first) = first.take() {
                            let _ = first.send(Err(e));
                            return;
                        }
                        if !e.transient() {
                            self.states.send(ConnectionState::Closed { error: Some(e) });
                            return;
                        }
                        self.states.send(ConnectionState::Reconnecting {
                            reason: e.to_string(),
                        });
                        retry_at = Some(backoff.next_at());
                    }
                }
                continue;
            }
            let client = self.client.as_ref();
            tokio::select! {
                command = inbox.recv() => match command {
                    Some(Command::Close(done)) => {
                        if let Some(client) = self.client.take() {
                            let _ = client.goodbye().await;
                        }
                        self.states.send(ConnectionState::Closed { error: None });
                        let _ = done.send(());
                        return;
                    }
                    None => {
                        if let Some(client) = self.client.take() {
                            let _ = client.goodbye().await;
                        }
                        return;
                    }
                    Some(command) => self.command(command).await,
                },
                _ = sleep_until(self.due) => {
                    self.due = None;
                    self.send_pending().await;
                }
                _ = sleep_until(retry_at) => {}
                lost = closed(client) => self.lost(lost).await,
            }
            self.publish();
            if self.ended {
                return;
            }
        }
    }

    /// Connects (where the node last said to go), asking the app for a
    /// fresh token once when the node refuses the one in use.
    async fn connect(&mut self) -> Result<(), MobileError> {
        let mut refreshed = false;
        loop {
            let options = DriverOptions {
                reconnect: false,
                seeds: Vec::new(),
                ..Default::default()
            };
            let connected = self
                .target
                .connector
                .driver_with(self.node, &self.token, self.report, options)
                .await;
            match connected.map_err(MobileError::from) {
                Ok(client) => {
                    self.client = Some(client);
                    return Ok(());
                }
                Err(e @ (MobileError::Unauthorized { .. } | MobileError::TokenExpired { .. }))
                    if !refreshed =>
                {
                    refreshed = true;
                    self.token = fresh_token(&self.tokens, e).await?;
                }
                Err(e) => {
                    // A node that is gone may have moved the driver: start
                    // again from the configured one.
                    self.node = self.target.quic;
                    return Err(e);
                }
            }
        }
    }

    /// A new connection: say so, and send what waited for it.
    async fn connected(&mut self) {
        if let Some(client) = &self.client {
            self.states.send(ConnectionState::Connected {
                transport: client.transport().into(),
            });
        }
        self.send_now = true;
        if let (Some(client), Some((seq, location))) = (&self.client, self.last_location) {
            // The node accepted up to `first_seq - 1` of this driver.
            let lost = seq >= client.first_seq();
            if lost && self.pending.is_none() && self.track.is_empty() {
                self.pending = Some(location);
            }
        }
        let track: Vec<Location> = self.track.drain(..).collect();
        if !track.is_empty() && self.paused.is_none() {
            for location in track {
                self.send(location).await;
            }
            self.pending = None;
            self.send_now = false;
        } else if self.paused.is_none() {
            self.send_pending().await;
        }
        self.publish();
    }

    async fn command(&mut self, command: Command) {
        match command {
            Command::Location(mut location) => {
                self.stats.lock().locations += 1;
                if location.time_ms == 0 {
                    location.time_ms = now_ms();
                }
                if self.client.is_none() && self.policy.keep_track && self.paused.is_none() {
                    if self.track.len() == MAX_TRACK {
                        self.track.pop_front();
                    }
                    self.track.push_back(location);
                }
                self.pending = Some(location);
                if self.client.is_some() && self.paused.is_none() {
                    self.send_pending().await;
                }
            }
            Command::Class(class) => {
                self.report.class = class;
                self.send_report().await;
            }
            Command::Status(status) => {
                self.report.status = status;
                self.send_report().await;
                // A trip starts: the rate changes at once.
                if self.pending.is_some() && self.paused.is_none() {
                    self.send_pending().await;
                }
            }
            Command::Policy(policy) => self.policy = policy,
            Command::Pause(mode) => {
                self.paused = Some(mode);
                self.due = None;
                if mode == PauseMode::Disconnect {
                    if let Some(client) = self.client.take() {
                        client.abandon();
                    }
                }
                self.states.send(ConnectionState::Paused);
            }
            Command::Resume => {
                self.paused = None;
                self.send_now = true;
                if let Some(client) = &self.client {
                    self.states.send(ConnectionState::Connected {
                        transport: client.transport().into(),
                    });
                    self.send_pending().await;
                }
                // Disconnected: the loop connects, then sends.
            }
            Command::Network(network) => self.target.connector.set_network(&network),
            Command::Close(_) => {}
        }
    }

    /// Tells the node the vehicle's class and status.
    async fn send_report(&mut self) {
        if let Some(client) = &mut self.client {
            if client.report(self.report).await.is_err() {
                self.drop_client("reporting the vehicle failed");
            }
        }
    }

    /// Sends the pending location if it is due; otherwise arms the timer.
    async fn send_pending(&mut self) {
        let Some(location) = self.pending else {
            return;
        };
        let now = Instant::now();
        if self.send_now {
            let age = now_ms().saturating_sub(location.time_ms);
            if location.time_ms != 0 && age > FRESH_FOR.as_millis() as i64 {
                // Too old for the node: the next location goes at once.
                self.pending = None;
                return;
            }
        }
        let due = match self.last_sent {
            Some(at) if !self.send_now => at + self.policy.interval(&location, self.report.status),
            _ => now,
        };
        if due > now {
            self.due = Some(due);
            return;
        }
        self.pending = None;
        self.send_now = false;
        self.send(location).await;
    }

    async fn send(&mut self, location: Location) {
        let Some(client) = &mut self.client else {
            self.pending = Some(location);
            return;
        };
        let fix = FixInput {
            lat: location.lat,
            lon: location.lon,
            heading_deg: location.heading_deg,
            speed_mps: location.speed_mps,
            accuracy_m: location.accuracy_m,
            fix_time_ms: (location.time_ms != 0).then_some(location.time_ms),
        };
        match client.send_fix(fix).await {
            Ok(seq) => {
                self.last_location = Some((seq, location));
                self.last_sent = Some(Instant::now());
                self.stats.lock().fixes_sent += 1;
            }
            Err(e) => {
                // Sent again on the next connection.
                self.pending = Some(location);
                self.drop_client(&e.to_string());
            }
        }
    }

    fn drop_client(&mut self, why: &str) {
        if let Some(client) = self.client.take() {
            client.abandon();
            self.states.send(ConnectionState::Reconnecting {
                reason: why.to_string(),
            });
        }
    }

    /// The connection ended: follow a redirect, refresh an expired token,
    /// or connect again.
    async fn lost(&mut self, why: ClientError) {
        let Some(client) = self.client.take() else {
            return;
        };
        self.stats.lock().reconnects += 1;
        if let Some(to) = client.redirected_to() {
            // Handed to another node: go there at once.
            self.node = to;
            return;
        }
        let why = MobileError::from(client.closed_error().unwrap_or(why));
        if let MobileError::TokenExpired { .. } = why {
            match fresh_token(&self.tokens, why.clone()).await {
                Ok(token) => self.token = token,
                Err(e) => {
                    self.states.send(ConnectionState::Closed { error: Some(e) });
                    self.ended = true;
                    return;
                }
            }
        }
        self.states.send(ConnectionState::Reconnecting {
            reason: why.to_string(),
        });
    }

    fn publish(&self) {
        let mut stats = self.stats.lock();
        let (sent, received) = self.target.connector.udp_datagrams();
        stats.udp_datagrams_sent = sent;
        stats.udp_datagrams_received = received;
        stats.buffered = self.track.len() as u64;
        stats.transport = self.client.as_ref().map(|c| c.transport().into());
        if let Some(client) = &self.client {
            stats.acked_seq = client.acked_seq();
            stats.rejected = client.stats().rejected_total;
            stats.clock_offset_ms = client.clock_offset_ms();
        }
    }
}

async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

async fn closed(client: Option<&DriverClient>) -> ClientError {
    match client {
        Some(client) => client.closed().await,
        None => std::future::pending().await,
    }
}
