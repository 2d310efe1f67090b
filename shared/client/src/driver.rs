//! The driver client: sends fixes, reports status, tracks acknowledgements.
//!
//! With [`DriverOptions::reconnect`], the client keeps its driver connected
//! to whichever node owns it: a node that hands the driver over says
//! `Redirect` and the next fix goes to the new node; a connection that is
//! lost (a node died, a network change) is made again, after a backoff with
//! jitter, through the node it used or any of the seeds (which redirect it
//! to the owner). Sequence numbers continue across connections.

use std::{
    net::SocketAddr,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc,
    },
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use futures_util::StreamExt;
use hexfleet_protocol::{
    encode_datagram, ClientMsg, ClockReport, DriverReport, ErrorCode, Fix, RejectReason, Role,
    ServerMsg,
};
use parking_lot::Mutex;

use crate::{
    connector::{ClientError, Connector, ControlRead, ControlWrite, Established, Greeting},
    transport::{CloseAs, Conn, Transport},
};

/// A fix as the app knows it; the SDK adds the sequence and, unless given,
/// the time.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct FixInput {
    pub lat: f64,
    pub lon: f64,
    pub heading_deg: f32,
    pub speed_mps: f32,
    pub accuracy_m: f32,
    /// Unix milliseconds in the device's clock; `None` means now. The SDK
    /// puts it in the node's clock (see [`DriverClient::clock_offset_ms`]).
    pub fix_time_ms: Option<i64>,
}

impl FixInput {
    /// A fix at a position, now, standing still, accurate to 5 m.
    pub fn at(lat: f64, lon: f64) -> Self {
        Self {
            lat,
            lon,
            heading_deg: 0.0,
            speed_mps: 0.0,
            accuracy_m: 5.0,
            fix_time_ms: None,
        }
    }
}

/// What the node has said about this driver's fixes so far.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct DriverStats {
    /// The highest sequence the node accepted.
    pub acked_seq: u64,
    /// Rejections the node reported, with their reasons (the node lists up
    /// to 64 per acknowledgement; `rejected_total` counts all).
    pub rejections: Vec<(u64, RejectReason)>,
    pub rejected_total: u64,
    /// What the node adds to this driver's fix times, as its last `Ack`
    /// said: non-zero when the device's clock is off by more than the
    /// node's tolerance even after the SDK's own correction.
    pub node_clock_correction_ms: i64,
}

#[derive(Default)]
struct Shared {
    acked_seq: AtomicU64,
    stats: Mutex<DriverStats>,
    closed: Mutex<Option<(ErrorCode, String)>>,
    /// Where the node said to go.
    redirect: Mutex<Option<SocketAddr>>,
    /// How many `Ack`s answering an `AckNow` arrived, on any connection.
    answers: tokio::sync::watch::Sender<u64>,
}

/// How a driver client keeps its connection.
#[derive(Debug, Clone, Default)]
pub struct DriverOptions {
    /// Follow redirects and reconnect when the connection is lost.
    pub reconnect: bool,
    /// Other nodes to try when the one in use does not answer.
    pub seeds: Vec<SocketAddr>,
    /// For simulations: how far this device's clock is off (milliseconds
    /// added to the machine's clock wherever the SDK reads the device's
    /// time), as phones' clocks often are.
    pub clock_skew_ms: i64,
}

/// The largest offset the SDK applies, either way: a year.
const MAX_CLOCK_OFFSET_MS: u64 = 366 * 24 * 3_600_000;

/// Beyond this (either way), a device's clock is wrong enough for an app
/// to tell its user (see [`DriverClient::clock_offset_ms`]).
pub const CLOCK_WARNING_MS: i64 = 10_000;

/// Attempts to reconnect before giving up; with the backoff (50 ms doubling
/// to 1 s, with jitter) they span about six seconds.
const RECONNECT_ATTEMPTS: u32 = 10;

/// How long a closed connection's control stream may take to be read to
/// its end (its last word: a redirect or a refusal).
const LAST_WORD_GRACE: Duration = Duration::from_secs(1);

/// How long a goodbye waits for the node to confirm it (the node waits up
/// to 2 s for the removal to be written), how many times it is said at
/// most, and the pause before the next (growing with each).
const GOODBYE_WAIT: Duration = Duration::from_secs(3);
const GOODBYE_ATTEMPTS: u32 = 5;
const GOODBYE_PAUSE: Duration = Duration::from_millis(300);

/// After its connection lost a packet, a driver sends its fixes on the
/// control stream instead of as datagrams for this long, as long as QUIC
/// would send a lost one again before the next fix is due. At a fix a
/// second a lost datagram leaves the vehicle a second behind, three lost in
/// a row (one time in 37 at 30 % loss) four seconds, 100 m at city speed;
/// a lost stream frame goes again within about three round trips. Fixes
/// more frequent than that stay datagrams: there a lost one would only hold
/// the newer ones back.
const LOSSY_FOR: Duration = Duration::from_secs(10);

/// How long the node may hold an acknowledgement back (QUIC's default
/// `max_ack_delay`): part of the time a lost packet takes to go again.
const MAX_ACK_DELAY: Duration = Duration::from_millis(25);

/// How fixes fare on the path: whether the next goes as a datagram or on
/// the stream (see [`LOSSY_FOR`]).
#[derive(Debug, Default)]
struct Loss {
    /// The connection's lost packets when last looked at.
    lost: u64,
    /// Until when fixes go on the stream.
    until: Option<Instant>,
    /// When the last fix went out.
    last_fix_at: Option<Instant>,
}

impl Loss {
    /// For a fix going out at `now` on a path with this round trip and
    /// count of lost packets: whether it goes on the stream.
    fn on_stream(&mut self, rtt: Duration, lost: u64, now: Instant) -> bool {
        let since = self.last_fix_at.replace(now);
        if lost > self.lost {
            self.until = Some(now + LOSSY_FOR);
        }
        self.lost = lost;
        let lossy = self.until.is_some_and(|until| now < until);
        // A lost packet is declared so and sent again about a probe
        // timeout after it went: a round trip, four of its variations
        // (taken as two round trips) and the peer's ack delay.
        let resent_within = rtt.saturating_mul(3) + MAX_ACK_DELAY;
        lossy && since.is_some_and(|since| now.duration_since(since) > resent_within)
    }

    /// A new connection counts its losses from zero; the network is the
    /// same, so a lossy one stays lossy.
    fn new_connection(&mut self) {
        self.lost = 0;
    }
}

pub struct DriverClient {
    conn: Conn,
    tx: ControlWrite,
    datagrams: bool,
    next_seq: u64,
    first_seq: u64,
    shared: Arc<Shared>,
    reader: tokio::task::JoinHandle<()>,
    connector: Connector,
    token: String,
    report: DriverReport,
    options: DriverOptions,
    /// The node this connection goes to.
    node: SocketAddr,
    reconnects: u64,
    /// The last fix sent, for [`DriverClient::resume`].
    last_fix: Option<Fix>,
    /// What the SDK adds to device times to put them in node time, as
    /// measured at the last connect.
    clock_offset_ms: i64,
    /// The round trip that was measured over.
    clock_round_trip_ms: u32,
    loss: Loss,
}

pub(crate) fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

impl Connector {
    /// Connects a driver: handshake with its token, then reports the
    /// vehicle's class and status.
    pub async fn driver(
        &self,
        addr: SocketAddr,
        token: &str,
        report: DriverReport,
    ) -> Result<DriverClient, ClientError> {
        self.driver_with(addr, token, report, DriverOptions::default())
            .await
    }

    /// Connects a driver that keeps itself connected as `options` say.
    pub async fn driver_with(
        &self,
        addr: SocketAddr,
        token: &str,
        report: DriverReport,
        options: DriverOptions,
    ) -> Result<DriverClient, ClientError> {
        let (node, established) = self.welcomed(addr, token).await?;
        let shared = Arc::new(Shared::default());
        let clock = measured(&established, options.clock_skew_ms);
        let link = attach(established, &shared, self);
        let mut driver = DriverClient {
            datagrams: link.datagrams,
            conn: link.conn,
            tx: link.tx,
            next_seq: link.resume_seq + 1,
            first_seq: link.resume_seq + 1,
            shared,
            reader: link.reader,
            connector: self.clone(),
            token: token.to_string(),
            report,
            options,
            node,
            reconnects: 0,
            last_fix: None,
            clock_offset_ms: 0,
            clock_round_trip_ms: 0,
            loss: Loss::default(),
        };
        driver.report(report).await?;
        driver.clock(clock).await?;
        Ok(driver)
    }

    /// `Hello` as a driver, redirects followed; the node that welcomed it.
    async fn welcomed(
        &self,
        addr: SocketAddr,
        token: &str,
    ) -> Result<(SocketAddr, Established), ClientError> {
        match self.hello(addr, Role::Driver, token).await? {
            Greeting::Welcome(established) => {
                let node = established.conn.node();
                Ok((node, *established))
            }
            Greeting::Redirect(_) => Err(ClientError::TooManyRedirects),
        }
    }
}

/// The device clock's offset from the node's (node minus device, ms) and
/// the round trip it was measured over, NTP-style: the node's time when it
/// welcomed, against the device's halfway through the `Hello` round trip.
/// `None` from a node that does not say its time.
fn measured(established: &Established, skew_ms: i64) -> Option<(i64, u32)> {
    let node_ms = established.welcome.node_time_ms;
    if node_ms == 0 {
        return None;
    }
    let round_trip_ms = established.round_trip.as_millis() as i64;
    let device_ms = established.welcomed_ms.saturating_add(skew_ms);
    let offset = node_ms.saturating_sub(device_ms.saturating_sub(round_trip_ms / 2));
    // Past a year it is not a clock's offset (the node refuses it too).
    if offset.unsigned_abs() > MAX_CLOCK_OFFSET_MS {
        tracing::warn!(offset_ms = offset, "the node's clock is implausibly far from this device's; fix times left as the device stamps them");
        return None;
    }
    Some((offset, round_trip_ms.clamp(0, u32::MAX as i64) as u32))
}

/// A welcomed connection put to work: its control stream read into
/// `shared`.
struct Link {
    conn: Conn,
    tx: ControlWrite,
    reader: tokio::task::JoinHandle<()>,
    datagrams: bool,
    /// The highest sequence the node already accepted for this driver.
    resume_seq: u64,
}

fn attach(established: Established, shared: &Arc<Shared>, connector: &Connector) -> Link {
    let Established {
        conn,
        tx,
        rx,
        welcome,
        ..
    } = established;
    shared
        .acked_seq
        .fetch_max(welcome.resume_seq, Ordering::Relaxed);
    Link {
        datagrams: welcome.limits.datagrams && conn.datagrams(),
        reader: tokio::spawn(read_control(rx, shared.clone(), connector.clone())),
        conn,
        tx,
        resume_seq: welcome.resume_seq,
    }
}

/// Whether a connection that ended this way is worth making again: not when
/// the node refused the driver itself. An expired token (`token_expired`)
/// is the app's to refresh: it connects again with a new one.
fn worth_retrying(e: &ClientError) -> bool {
    !matches!(
        e,
        ClientError::Refused {
            code: ErrorCode::Unauthorized
                | ErrorCode::TokenExpired
                | ErrorCode::UnsupportedVersion
                | ErrorCode::Superseded
                | ErrorCode::ProtocolViolation
                | ErrorCode::BadRequest,
            ..
        } | ClientError::Certificate { .. }
            | ClientError::Tls(_)
    )
}

async fn read_control(mut rx: ControlRead, shared: Arc<Shared>, connector: Connector) {
    while let Some(msg) = rx.next().await {
        match msg {
            Ok(ServerMsg::Ack(ack)) => {
                shared.acked_seq.fetch_max(ack.seq, Ordering::Relaxed);
                let mut stats = shared.stats.lock();
                stats.acked_seq = stats.acked_seq.max(ack.seq);
                stats.rejected_total = ack.rejected_total;
                stats.node_clock_correction_ms = ack.clock_offset_ms;
                stats
                    .rejections
                    .extend(ack.rejected.iter().map(|r| (r.seq, r.reason)));
                drop(stats);
                if ack.answers_ack_now {
                    shared.answers.send_modify(|n| *n += 1);
                }
            }
            Ok(ServerMsg::Error(e)) => {
                *shared.closed.lock() = Some((e.code, e.reason));
                return;
            }
            Ok(ServerMsg::Redirect(r)) => {
                *shared.redirect.lock() = connector.follow(&r);
                return;
            }
            Ok(_) => {}
            Err(_) => return,
        }
    }
}

impl DriverClient {
    /// Sends a fix with the next sequence number; returns that number.
    /// Datagrams are used when the connection has them (a lost fix is
    /// superseded by the next), except on a path that lost packets lately,
    /// where the control stream sends a lost fix again sooner than the next
    /// one comes (for `LOSSY_FOR`, 10 s, after a loss).
    pub async fn send_fix(&mut self, input: FixInput) -> Result<u64, ClientError> {
        let seq = self.next_seq;
        let device_ms = input.fix_time_ms.unwrap_or_else(|| self.device_now_ms());
        let fix = Fix {
            seq,
            fix_time_ms: device_ms.saturating_add(self.clock_offset_ms),
            lat: input.lat,
            lon: input.lon,
            heading_deg: input.heading_deg,
            speed_mps: input.speed_mps,
            accuracy_m: input.accuracy_m,
        };
        self.send_raw(fix).await?;
        Ok(seq)
    }

    /// Sends a fix exactly as given, sequence included. For tests and the
    /// simulator's deliberately bad fixes; apps use [`send_fix`](Self::send_fix).
    pub async fn send_raw(&mut self, fix: Fix) -> Result<(), ClientError> {
        if self.options.reconnect && self.conn.is_closed() {
            self.reconnect().await?;
        }
        match self.send_once(fix).await {
            // The node closed the connection (a redirect) just before: the
            // fix goes on the next connection.
            Err(_) if self.options.reconnect && self.conn.is_closed() => {
                self.reconnect().await?;
                self.send_once(fix).await
            }
            sent => sent,
        }
    }

    async fn send_once(&mut self, fix: Fix) -> Result<(), ClientError> {
        self.next_seq = self.next_seq.max(fix.seq.saturating_add(1));
        self.last_fix = Some(fix);
        if self.datagrams && !self.fix_on_stream() {
            self.conn.send_datagram(encode_datagram(&fix)?)?;
        } else {
            self.send(ClientMsg::Fix(fix)).await?;
        }
        Ok(())
    }

    /// Whether the next fix goes on the control stream rather than as a
    /// datagram (see [`LOSSY_FOR`]).
    fn fix_on_stream(&mut self) -> bool {
        match self.conn.path() {
            Some((rtt, lost)) => self.loss.on_stream(rtt, lost, Instant::now()),
            None => true,
        }
    }

    /// Connects again: to where the node redirected it, else to the node it
    /// used or a seed, with a backoff and jitter between attempts.
    async fn reconnect(&mut self) -> Result<(), ClientError> {
        // A node that redirects says where before it closes, but the close
        // can be seen here before the reader has taken the `Redirect`: the
        // reader is given the rest of the closed control stream first.
        if self.conn.is_closed() && !self.reader.is_finished() {
            let _ = tokio::time::timeout(LAST_WORD_GRACE, &mut self.reader).await;
        }
        let redirect = self.shared.redirect.lock().take();
        let ended = self.closed_error();
        tracing::debug!(node = %self.node, ?ended, ?redirect, "driver connecting again");
        self.connector.connection_ended(self.node, ended.as_ref());
        // The other nodes first: the one in use may be the one that died.
        let mut targets: Vec<SocketAddr> = Vec::new();
        for seed in &self.options.seeds {
            if *seed != self.node && !targets.contains(seed) {
                targets.push(*seed);
            }
        }
        targets.push(self.node);
        let mut backoff = Duration::from_millis(50);
        let mut last = ClientError::Timeout;
        for attempt in 0..RECONNECT_ATTEMPTS {
            let target = match redirect {
                Some(to) if attempt == 0 => to,
                _ => targets[attempt as usize % targets.len()],
            };
            if attempt > 0 {
                // Jitter: a node's drivers do not all come back at once.
                let jittered = backoff.mul_f64(rand::random_range(0.5..1.5));
                tokio::time::sleep(jittered).await;
                backoff = (backoff * 2).min(Duration::from_secs(1));
            }
            match self.connector.welcomed(target, &self.token).await {
                Ok((node, established)) => {
                    self.install(node, established).await?;
                    return Ok(());
                }
                Err(e) if worth_retrying(&e) => {
                    tracing::debug!(%target, error = %e, "driver reconnect failed");
                    last = e;
                }
                Err(e) => return Err(e),
            }
        }
        Err(last)
    }

    /// Takes over a new connection, continuing the sequence.
    async fn install(
        &mut self,
        node: SocketAddr,
        established: Established,
    ) -> Result<(), ClientError> {
        let clock = measured(&established, self.options.clock_skew_ms);
        self.reader.abort();
        *self.shared.closed.lock() = None;
        let link = attach(established, &self.shared, &self.connector);
        self.reader = link.reader;
        self.datagrams = link.datagrams;
        self.conn = link.conn;
        self.tx = link.tx;
        self.node = node;
        self.loss.new_connection();
        self.next_seq = self.next_seq.max(link.resume_seq + 1);
        self.reconnects += 1;
        let report = self.report;
        self.send(ClientMsg::Driver(report)).await?;
        self.clock(clock).await
    }

    /// Applies a measurement of the device's clock from now on, and tells
    /// the node (its fixes come in node time).
    async fn clock(&mut self, measured: Option<(i64, u32)>) -> Result<(), ClientError> {
        let Some((offset_ms, round_trip_ms)) = measured else {
            return Ok(());
        };
        self.clock_offset_ms = offset_ms;
        self.clock_round_trip_ms = round_trip_ms;
        self.send(ClientMsg::Clock(ClockReport {
            offset_ms,
            round_trip_ms,
        }))
        .await
    }

    /// The device's clock: the machine's, or as far off as a simulation
    /// said.
    fn device_now_ms(&self) -> i64 {
        now_ms().saturating_add(self.options.clock_skew_ms)
    }

    /// How far off the device's clock is from the node's, in milliseconds
    /// (positive when the device is behind): what the SDK measured at
    /// connect (it stamps fixes in node time) and what the node still adds.
    /// Past [`CLOCK_WARNING_MS`] an app may tell its user to set the
    /// phone's clock; fixes are kept right either way.
    pub fn clock_offset_ms(&self) -> i64 {
        let node = self.shared.stats.lock().node_clock_correction_ms;
        self.clock_offset_ms.saturating_add(node)
    }

    /// What the SDK adds to the device's times, and the round trip it was
    /// measured over (its uncertainty is half that).
    pub fn clock_measurement(&self) -> (i64, u32) {
        (self.clock_offset_ms, self.clock_round_trip_ms)
    }

    /// The node this driver is connected to now.
    pub fn node(&self) -> SocketAddr {
        self.node
    }

    /// Resolves once the connection in use has ended: its node died or
    /// handed the driver over, the network went. It borrows nothing, so an
    /// app can wait on it beside its next fix; then [`resume`](Self::resume)
    /// puts its vehicle back on the map at once rather than at that fix.
    pub fn lost(&self) -> impl std::future::Future<Output = ()> + Send + 'static {
        self.conn.ended()
    }

    /// With [`DriverOptions::reconnect`]: connects again now if the
    /// connection has ended (through a redirect, the seeds, with the usual
    /// backoff), and sends the last fix again if the node never
    /// acknowledged it (a fix sent into a connection that was already dead
    /// is lost with it). Nothing to do while connected. Call it whenever
    /// [`lost`](Self::lost) resolves: the node reached may hand the driver
    /// on to its shard's owner, ending this connection too.
    pub async fn resume(&mut self) -> Result<(), ClientError> {
        if !self.conn.is_closed() {
            return Ok(());
        }
        if !self.options.reconnect {
            return Err(self.closed_error().unwrap_or(ClientError::Timeout));
        }
        self.reconnect().await?;
        match self.last_fix {
            Some(fix) if fix.seq > self.acked_seq() => self.send_once(fix).await,
            _ => Ok(()),
        }
    }

    /// How this driver reaches its node now.
    pub fn transport(&self) -> Transport {
        self.conn.transport()
    }

    /// How many times the client connected again (redirects included).
    pub fn reconnects(&self) -> u64 {
        self.reconnects
    }

    /// Sends raw bytes as a datagram. For testing the node's defences.
    pub fn send_datagram_bytes(&self, bytes: bytes::Bytes) -> Result<(), ClientError> {
        self.conn.send_datagram(bytes)
    }

    /// Forces fixes onto the control stream (as when datagrams are
    /// unavailable).
    pub fn use_stream_for_fixes(&mut self) {
        self.datagrams = false;
    }

    /// Whether fixes go out as datagrams.
    pub fn uses_datagrams(&self) -> bool {
        self.datagrams
    }

    /// Reports the vehicle's class and status.
    pub async fn report(&mut self, report: DriverReport) -> Result<(), ClientError> {
        self.report = report;
        if self.options.reconnect && self.conn.is_closed() {
            // The new connection reports it.
            return self.reconnect().await;
        }
        self.send(ClientMsg::Driver(report)).await
    }

    async fn send(&mut self, msg: ClientMsg) -> Result<(), ClientError> {
        match self.tx.send(msg).await {
            Ok(()) => Ok(()),
            Err(e) => Err(self.closed_error().unwrap_or(ClientError::Frame(e))),
        }
    }

    /// Asks the node what it accepted so far, rather than waiting for its
    /// next acknowledgement (every `ack_interval`, 30 s by default): for an
    /// app about to go quiet, or a load run that counts what arrived.
    /// Returns the highest sequence acknowledged once the node answered,
    /// or [`ClientError::Timeout`] if it did not within `within`.
    pub async fn acknowledged(&mut self, within: Duration) -> Result<u64, ClientError> {
        let mut answers = self.shared.answers.subscribe();
        let before = *answers.borrow_and_update();
        self.send(ClientMsg::AckNow).await?;
        let answered = tokio::time::timeout(within, answers.wait_for(|n| *n > before))
            .await
            .is_ok_and(|arrived| arrived.is_ok());
        if answered {
            Ok(self.acked_seq())
        } else {
            Err(ClientError::Timeout)
        }
    }

    /// The highest sequence the node acknowledged.
    pub fn acked_seq(&self) -> u64 {
        self.shared.acked_seq.load(Ordering::Relaxed)
    }

    /// The next sequence number `send_fix` will use.
    pub fn next_seq(&self) -> u64 {
        self.next_seq
    }

    /// The first sequence this connection sent (one above what the node had).
    pub fn first_seq(&self) -> u64 {
        self.first_seq
    }

    pub fn stats(&self) -> DriverStats {
        self.shared.stats.lock().clone()
    }

    /// Where the node said this driver belongs now, if it redirected it.
    pub fn redirected_to(&self) -> Option<SocketAddr> {
        *self.shared.redirect.lock()
    }

    /// Why the node closed this connection, if it did.
    pub fn closed_error(&self) -> Option<ClientError> {
        if let Some((code, reason)) = self.shared.closed.lock().clone() {
            return Some(ClientError::Refused { code, reason });
        }
        self.conn.close_error()
    }

    /// Waits until the node closes the connection, and says why.
    pub async fn closed(&self) -> ClientError {
        let e = self.conn.closed().await;
        self.closed_error().unwrap_or(e)
    }

    /// Signs off: the node removes the vehicle at once. A node that cannot
    /// write the removal (cut from its store) says so (`unavailable`); with
    /// [`DriverOptions::reconnect`] the goodbye is said again through
    /// another node, a few times at most.
    pub async fn goodbye(mut self) -> Result<(), ClientError> {
        for attempt in 0..GOODBYE_ATTEMPTS {
            let last = attempt + 1 == GOODBYE_ATTEMPTS || !self.options.reconnect;
            if attempt > 0 {
                // The shard's next owner may need a lease's time to take
                // over: the attempts are spread over a few seconds.
                tokio::time::sleep(GOODBYE_PAUSE * attempt).await;
            }
            if self.options.reconnect && (attempt > 0 || self.conn.is_closed()) {
                self.reconnect().await?;
            }
            match self.send(ClientMsg::Goodbye).await {
                Ok(()) => {}
                Err(_) if !last => continue,
                Err(e) => return Err(e),
            }
            self.tx.finish();
            // The node closes the connection once the removal is written.
            let _ = tokio::time::timeout(GOODBYE_WAIT, self.conn.closed()).await;
            if !self.reader.is_finished() {
                let _ = tokio::time::timeout(LAST_WORD_GRACE, &mut self.reader).await;
            }
            let refused = self.shared.closed.lock().take();
            match refused {
                Some((ErrorCode::Unavailable, reason)) => {
                    tracing::debug!(%reason, "goodbye not written; saying it through another node");
                    if last {
                        return Err(ClientError::Refused {
                            code: ErrorCode::Unavailable,
                            reason,
                        });
                    }
                }
                _ => break,
            }
        }
        self.conn.close(CloseAs::Goodbye, "goodbye");
        Ok(())
    }

    /// Drops the connection without a goodbye (as a phone losing signal).
    pub fn abandon(self) {
        self.conn.close(CloseAs::Goodbye, "");
    }
}

impl Drop for DriverClient {
    fn drop(&mut self) {
        self.reader.abort();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const RTT: Duration = Duration::from_millis(50);

    #[test]
    fn fixes_go_on_the_stream_only_after_a_loss_and_when_slower_than_a_resend() {
        let start = Instant::now();
        let at = |ms: u64| start + Duration::from_millis(ms);
        let mut loss = Loss::default();
        // No loss yet: datagrams.
        assert!(!loss.on_stream(RTT, 0, at(0)));
        assert!(!loss.on_stream(RTT, 0, at(1_000)));
        // A packet lost: a fix a second goes on the stream from now on.
        assert!(loss.on_stream(RTT, 1, at(2_000)));
        assert!(loss.on_stream(RTT, 1, at(3_000)));
        // Fixes closer together than a resend (3 × 50 + 25 ms) stay
        // datagrams even then.
        assert!(!loss.on_stream(RTT, 1, at(3_100)));
        assert!(loss.on_stream(RTT, 1, at(3_400)));
        // Ten seconds after the last loss, datagrams again.
        assert!(loss.on_stream(RTT, 1, at(11_900)));
        assert!(!loss.on_stream(RTT, 1, at(12_100)));
        // A new connection counts from zero; its first loss counts.
        loss.new_connection();
        assert!(!loss.on_stream(RTT, 0, at(13_000)));
        assert!(loss.on_stream(RTT, 2, at(14_000)));
    }
}
