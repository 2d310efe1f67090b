//! Many nodes acting as one, with Redis as the only coordinator.
//!
//! - [`membership`]: who is live (a lease per node), and who owns a shard
//!   (rendezvous hashing over the live ids);
//! - [`leases`]: a per-shard lease confirms ownership, so at most one node
//!   writes a shard at a time, and fences a node that lost it;
//! - [`replicas`]: the bus — other nodes' shards this node's riders and
//!   dashboards watch, kept from a snapshot and the owners' batches.
//!
//! [`Cluster`] is the router the sessions ask ("is this shard mine? whose
//! is it?"), the [`Fences`] the store writer writes under, and the task
//! that renews, acquires and gives up leases. Ownership changes in two
//! steps: rendezvous hashing says who *should* own a shard as soon as the
//! live set changes; the lease says who *does*. A node gives a shard up by
//! redirecting its drivers, flushing, and releasing the lease; the new
//! owner acquires it and loads the shard's vehicles from the store. A node
//! that dies gives nothing up: its leases expire after `lease_ttl`.

pub mod leases;
pub mod membership;
pub mod ownership;
pub mod probe;
pub mod reach;
pub mod replicas;

use std::{
    collections::{BTreeMap, BTreeSet, HashSet},
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc,
    },
    time::Duration,
};

use futures_util::future::join_all;
use hexfleet_model::{ShardId, VehicleId, VehicleState};
use hexfleet_protocol::{bus::NodeInfo, Redirect};
use parking_lot::{Mutex, RwLock};
use tokio::sync::{watch, Notify};
use tokio_util::sync::CancellationToken;

use self::{
    leases::Renewal,
    membership::{Heard, LiveSet, Membership},
    ownership::{Ownership, Renewed},
};
use crate::{
    config::ClusterConfig,
    fanout::Shards,
    ingest::Ingest,
    metrics::Metrics,
    store::{
        keys,
        redis::Conn,
        writer::{Fence, Fences, StoreWriter},
        Store, StoreError,
    },
};

/// How often shards this node should own but has no lease for are tried.
const ACQUIRE_INTERVAL: Duration = Duration::from_millis(100);

#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("node id {id:?} is used by a live node ({quic}); give every node its own id")]
    IdTaken { id: String, quic: String },
}

impl ClusterError {
    /// Whether joining again later may succeed (the store did not answer),
    /// rather than never (the id is taken).
    pub fn is_transient(&self) -> bool {
        matches!(self, Self::Store(e) if e.is_transient())
    }
}

pub struct Cluster {
    /// This node's id (fixed; `me` carries it too, with what changes).
    id: String,
    /// This process's instance, in hex: it tells its lease values from
    /// those of another process with the same id (see [`leases`]).
    instance: String,
    me: RwLock<NodeInfo>,
    conn: Conn,
    config: ClusterConfig,
    live: RwLock<LiveSet>,
    /// Which shards this node holds, wants, and lost (see [`ownership`]).
    ownership: Mutex<Ownership>,
    held: watch::Sender<Shards>,
    /// Bumped whenever what [`Cluster::owns`] answers may have changed, so
    /// sessions re-check their driver's shard only then.
    changes: watch::Sender<u64>,
    /// The members' version as of the last read of the live set.
    members_seen: AtomicU64,
    /// Whether this node has been in the live set since it joined.
    registered: AtomicBool,
    /// Until then, no new shard is taken: the store lost the live set (it
    /// restarted empty), and the other nodes have not all said they are
    /// here again, so ownership computed now would be wrong.
    settling_until: Mutex<Option<tokio::time::Instant>>,
    /// Members the store lost with this node's membership, counted as live
    /// while settling (see [`Cluster::presume`]).
    presumed: Mutex<BTreeMap<String, NodeInfo>>,
    wake: Notify,
    /// Cancelled when the node leaves: renewals stop.
    leaving: CancellationToken,
    /// Cancelled when another process holds this node's id: the node stops.
    replaced: CancellationToken,
    /// When the last membership renewal that succeeded was sent: this
    /// node's membership does not expire before that plus `lease_ttl`.
    reached: Mutex<std::time::Instant>,
    /// When each member last renewed its membership, as of the last read of
    /// the live set (this node's clock).
    heard: Mutex<BTreeMap<String, std::time::Instant>>,
    /// Since when this node's own renewals have gone through without a
    /// late one: a member is silent only if it did not renew while this
    /// node did (a store that stalled for everyone makes nobody silent).
    heard_since: Mutex<std::time::Instant>,
    /// When the store last answered a read of the members' renewal times:
    /// silence is judged as of then, never from time passing alone (a
    /// store that stalls stops everyone's renewals, and its answers too).
    looked: Mutex<std::time::Instant>,
    /// Set while this node is cut from the live set's key and its peers are
    /// not: it serves nothing (see [`reach`]).
    cut_off: AtomicBool,
    peers: reach::Peers,
    /// Dials the peers' client addresses (see [`probe`]); `None` when its
    /// socket could not be made (then this node judges nobody).
    prober: Option<probe::Prober>,
    /// Wakes the prober early: a client said it could not reach a node.
    probe_now: Notify,
    /// Peers' reach questions answered at once, at most.
    reach_slots: tokio::sync::Semaphore,
    store: Arc<dyn Store>,
    writer: Arc<StoreWriter>,
    ingest: Arc<Ingest>,
    metrics: Arc<Metrics>,
}

impl Cluster {
    /// Joins the live set. Refuses an id a live node already uses.
    #[allow(clippy::too_many_arguments)]
    pub async fn join(
        me: NodeInfo,
        conn: Conn,
        config: ClusterConfig,
        store: Arc<dyn Store>,
        writer: Arc<StoreWriter>,
        ingest: Arc<Ingest>,
        metrics: Arc<Metrics>,
        peers: reach::Peers,
    ) -> Result<Arc<Cluster>, ClusterError> {
        let sent = std::time::Instant::now();
        let ttl = config.lease_ttl.as_millis() as u64;
        let renewed = match membership::renew(&conn, &me, ttl).await? {
            Membership::Renewed(renewed) => renewed,
            Membership::Taken(other) => {
                return Err(ClusterError::IdTaken {
                    id: me.id,
                    quic: other.quic,
                })
            }
        };
        let received = std::time::Instant::now();
        let heard = heard_at(&renewed.expires_in_ms, received, config.lease_ttl);
        let (live, version) = (renewed.live, renewed.version);
        metrics.cluster_nodes.set(live.nodes.len() as i64);
        tracing::info!(nodes = ?live.nodes.keys().collect::<Vec<_>>(), "joined the cluster");
        let prober = match me.quic.parse::<std::net::SocketAddr>() {
            Ok(family) => probe::Prober::new(config.probe_timeout, family)
                .map_err(
                    |e| tracing::warn!(error = %e, "peers' client addresses will not be probed"),
                )
                .ok(),
            Err(_) => None,
        };
        let ownership = Ownership::new(config.lease_ttl, config.renew_interval);
        let cluster = Arc::new(Cluster {
            id: me.id.clone(),
            instance: format!("{:x}", me.instance),
            me: RwLock::new(me),
            conn,
            config,
            live: RwLock::new(live),
            ownership: Mutex::new(ownership),
            held: watch::Sender::new(Shards::default()),
            changes: watch::Sender::new(0),
            members_seen: AtomicU64::new(version),
            registered: AtomicBool::new(true),
            settling_until: Mutex::new(None),
            presumed: Mutex::default(),
            wake: Notify::new(),
            leaving: CancellationToken::new(),
            replaced: CancellationToken::new(),
            reached: Mutex::new(sent),
            heard: Mutex::new(heard),
            heard_since: Mutex::new(sent),
            looked: Mutex::new(received),
            cut_off: AtomicBool::new(false),
            peers,
            prober,
            probe_now: Notify::new(),
            reach_slots: tokio::sync::Semaphore::new(reach::ANSWERED_AT_ONCE),
            store,
            writer,
            ingest,
            metrics,
        });
        cluster.want_stored_shards().await?;
        Ok(cluster)
    }

    pub fn node_id(&self) -> &str {
        &self.id
    }

    /// Who this node is, to the lease scripts.
    fn holder(&self) -> leases::Holder<'_> {
        leases::Holder {
            node: &self.id,
            instance: &self.instance,
        }
    }

    /// The live nodes as this node last read them.
    pub fn live(&self) -> LiveSet {
        self.live.read().clone()
    }

    /// The shards whose lease this node holds.
    pub fn held_shards(&self) -> watch::Receiver<Shards> {
        self.held.subscribe()
    }

    /// The node that should own `shard` now.
    pub fn owner(&self, shard: ShardId) -> Option<NodeInfo> {
        self.live.read().owner(shard).cloned()
    }

    /// Whether drivers of `shard` belong here: this node should own it and
    /// is not giving it up.
    pub fn owns(&self, shard: ShardId) -> bool {
        let mine = self
            .live
            .read()
            .owner(shard)
            .is_some_and(|owner| owner.id == self.id);
        mine && !self.cut_off.load(Ordering::Relaxed) && self.ownership.lock().serves(shard)
    }

    /// Whether this node holds `shard`'s lease or is about to (its writes
    /// there may still land).
    pub fn may_write(&self, shard: ShardId) -> bool {
        self.ownership.lock().holds(shard) || self.owns(shard)
    }

    /// Where a client of `shard` should go, if not here.
    pub fn redirect_for(&self, shard: ShardId) -> Option<Redirect> {
        if self.owns(shard) {
            return None;
        }
        let owner = self.owner(shard)?;
        (owner.id != self.id).then(|| Redirect {
            addr: owner.quic,
            https: owner.http,
            shard: shard.to_string(),
        })
    }

    /// The peers' HTTP and WebSocket client.
    pub fn peers(&self) -> &reach::Peers {
        &self.peers
    }

    /// Whether clients can be sent to the node at `quic` (its peers reach
    /// its client address; see [`probe`]).
    pub fn reachable_at(&self, quic: &str) -> bool {
        self.live.read().reachable_at(quic)
    }

    /// Whether a client may be redirected to the node at `quic`: its peers
    /// reach it, and the client did not say it cannot (`unreachable`, from
    /// its `Hello`).
    pub fn may_redirect_to(&self, quic: &str, unreachable: &[String]) -> bool {
        self.reachable_at(quic) && !unreachable.iter().any(|a| a == quic)
    }

    /// Where the peers reach the HTTP API of the node whose client address
    /// is `quic`.
    pub fn peer_http_at(&self, quic: &str) -> Option<String> {
        let live = self.live.read();
        let node = live.nodes.values().find(|n| n.quic == quic)?;
        Some(node.peer_http().to_string())
    }

    /// The IP addresses the other live members advertise (client and peer
    /// addresses given as IP literals; host names are not looked up).
    pub fn member_addresses(&self) -> BTreeSet<std::net::IpAddr> {
        let live = self.live.read();
        live.nodes
            .values()
            .filter(|n| n.id != self.id)
            .flat_map(|n| [n.quic.as_str(), n.http.as_str(), n.peer_http()])
            .filter_map(|a| a.parse::<std::net::SocketAddr>().ok())
            .map(|a| a.ip())
            .collect()
    }

    /// Keeps `limit` exempting the other members' addresses (see
    /// [`crate::per_address`]) as the live set changes.
    pub async fn exempt_members(
        self: Arc<Self>,
        limit: Arc<crate::per_address::PerAddress>,
        shutdown: CancellationToken,
    ) {
        let mut changes = self.watch_changes();
        let mut exempt = BTreeSet::new();
        loop {
            let members = self.member_addresses();
            if members != exempt {
                tracing::debug!(?members, "the cluster's members' addresses are not limited");
                limit.set_exempt(members.iter().copied());
                exempt = members;
            }
            // Looked at when ownership changes, and at every renewal's
            // pace (a member may move without changing who owns what).
            tokio::select! {
                _ = shutdown.cancelled() => return,
                changed = changes.changed() => if changed.is_err() { return },
                _ = tokio::time::sleep(self.config.renew_interval) => {}
            }
        }
    }

    /// A client could not connect to the node at `quic`: counted, and the
    /// peers probed at once rather than at the next round.
    pub fn client_reports_unreachable(&self, quic: &str) {
        let live = self.live.read();
        let Some(node) = live
            .nodes
            .values()
            .find(|n| n.quic == quic && n.id != self.id)
        else {
            return;
        };
        self.metrics.clients_report_unreachable.inc();
        tracing::debug!(node = %node.id, "a client could not reach a node it was sent to");
        drop(live);
        self.probe_now.notify_one();
    }

    /// Whether this node serves nothing, cut from the store (see [`reach`]).
    pub fn is_cut_off(&self) -> bool {
        self.cut_off.load(Ordering::Relaxed)
    }

    /// What this node tells a peer asking which of `shards`' lease keys,
    /// and (with `members`) the live set's key, it reaches now. The question
    /// needs no token, so what it costs is bounded: only shards some live
    /// node announces are looked at (others are answered unreached), and a
    /// few questions at a time (`None`: too many now).
    pub async fn reach(
        &self,
        shards: &[ShardId],
        members: bool,
    ) -> Option<hexfleet_protocol::bus::PeerReach> {
        let _slot = self.reach_slots.try_acquire().ok()?;
        let announced: HashSet<String> = self
            .live
            .read()
            .nodes
            .values()
            .flat_map(|n| n.shards.iter().cloned())
            .collect();
        let shards: Vec<ShardId> = shards
            .iter()
            .copied()
            .filter(|s| announced.contains(&s.to_string()))
            .collect();
        // Well within the asking peer's patience (a quarter interval).
        let within = self.config.renew_interval / 8;
        Some(self.reach_within(&shards, members, within, false).await)
    }

    /// Which of the keys this node reaches within `within`. `any_answer`:
    /// an error answer (a Redis Cluster failing over says `CLUSTERDOWN` or
    /// `TRYAGAIN`) counts as reaching it: this node talks to Redis, so it is
    /// not the one cut off. For a peer only a real answer counts.
    async fn reach_within(
        &self,
        shards: &[ShardId],
        members: bool,
        within: Duration,
        any_answer: bool,
    ) -> hexfleet_protocol::bus::PeerReach {
        let reaches = |key: String| async move {
            let mut cmd = redis::cmd("EXISTS");
            cmd.arg(key);
            let exists = self.conn.cmd::<bool>(&cmd);
            match tokio::time::timeout(within, exists).await {
                Ok(Ok(_)) => true,
                Ok(Err(e)) => any_answer && !crate::store::unanswered(&e),
                Err(_) => false,
            }
        };
        let (members, shards) = futures_util::join!(
            async {
                match members {
                    true => reaches(keys::MEMBERS.to_string()).await,
                    false => false,
                }
            },
            join_all(
                shards
                    .iter()
                    .take(reach::MAX_ASKED)
                    .map(|&shard| async move {
                        reaches(keys::lease(shard)).await.then(|| shard.to_string())
                    })
            )
        );
        let me = self.me.read();
        hexfleet_protocol::bus::PeerReach {
            id: me.id.clone(),
            instance: me.instance,
            members,
            shards: shards.into_iter().flatten().collect(),
        }
    }

    /// Changes whenever ownership may have: the live set, a lease held,
    /// given up or lost.
    pub fn changes(&self) -> u64 {
        *self.changes.borrow()
    }

    /// Wakes whoever watches it whenever [`Cluster::changes`] moves.
    pub fn watch_changes(&self) -> watch::Receiver<u64> {
        self.changes.subscribe()
    }

    fn changed(&self) {
        self.changes.send_modify(|c| *c += 1);
    }

    /// How far a driver may go past the edge of its shard before it is
    /// handed over.
    pub fn handoff_distance_m(&self) -> f64 {
        self.config.handoff_distance_m
    }

    /// How long a handed-over driver's last state waits for its new node.
    pub fn handoff_ttl(&self) -> Duration {
        self.config.lease_ttl * 10
    }

    /// Shards in the store that this node should own: wanted at once, so a
    /// node joining (or taking over from a dead one) loads them.
    async fn want_stored_shards(&self) -> Result<(), StoreError> {
        let stored: Vec<String> = self
            .conn
            .cmd(redis::cmd("SMEMBERS").arg(keys::SHARDS))
            .await?;
        let me = self.node_id();
        let live = self.live.read().clone();
        let mut ownership = self.ownership.lock();
        for shard in stored.iter().filter_map(|s| s.parse::<ShardId>().ok()) {
            if live.owner(shard).is_some_and(|o| o.id == me) {
                ownership.want(shard);
            }
        }
        Ok(())
    }

    /// Renews membership and leases, acquires wanted shards and gives up
    /// the ones that moved, until shutdown; then only renews, until it
    /// leaves (once the node's last changes are written): a final flush
    /// that waits for sessions to end must still find its leases held.
    pub async fn run(self: Arc<Self>, shutdown: CancellationToken) {
        let stop = self.leaving.clone();
        let replaced = self.replaced.clone();
        // Its own task: a renewal to a store that does not answer waits for
        // its timeout, longer than a lease.
        tokio::spawn(self.clone().guard_reach(stop.clone()));
        tokio::spawn(self.clone().probe_peers(stop.clone()));
        let mut renew = tokio::time::interval(self.config.renew_interval);
        renew.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut acquire = tokio::time::interval(ACQUIRE_INTERVAL);
        acquire.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => break,
                _ = stop.cancelled() => return,
                _ = replaced.cancelled() => {
                    // Stop serving as this id at once, then shut the node
                    // down: its leases are the other process's now.
                    self.step_down_all();
                    shutdown.cancel();
                    break;
                }
                _ = renew.tick() => self.renew().await,
                _ = acquire.tick() => {
                    self.notice_members().await;
                    self.notice_silence().await;
                    // A check that failed (the store not answering yet) is
                    // tried again here: its shard's changes wait on it.
                    self.check_suspects().await;
                    self.acquire_wanted().await;
                    self.let_go_of_handed().await
                }
                _ = self.wake.notified() => {
                    self.check_suspects().await;
                    self.acquire_wanted().await
                }
            }
        }
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = renew.tick() => self.renew_leases().await,
                _ = self.wake.notified() => self.check_suspects().await,
            }
        }
    }

    /// Leaves the live set and gives every lease up, once the writer has
    /// written the last changes.
    pub async fn leave(&self) {
        self.leaving.cancel();
        let me = self.me.read().clone();
        if let Err(e) = membership::leave(&self.conn, &me).await {
            tracing::warn!(error = %e, "leaving the live set; it expires by itself");
        }
        let holdings = self.ownership.lock().drain();
        join_all(
            holdings
                .iter()
                .map(|(shard, value)| leases::release(&self.conn, *shard, value)),
        )
        .await;
        tracing::info!(released = holdings.len(), "left the cluster");
    }

    fn publish_held(&self) {
        self.changed();
        let held = self.ownership.lock().held();
        self.metrics.shards_held.set(held.len() as i64);
        self.me.write().shards = held.iter().map(|s| s.to_string()).collect();
        self.held.send_replace(Arc::new(held));
    }

    /// Notes who has renewed since the last look (so a member that stops
    /// is seen silent within an acquire tick of it), and reads the live set
    /// at once when the members' version moved (a node joined, left or
    /// expired), rather than at the next renewal: a node shutting down
    /// hands its shards over within one acquire tick.
    async fn notice_members(self: &Arc<Self>) {
        match membership::look(&self.conn).await {
            Ok(look) => {
                let received = std::time::Instant::now();
                self.heard_from(&look.expires_in_ms, received);
                if look.version != self.members_seen.load(Ordering::Relaxed) {
                    self.renew().await
                }
            }
            Err(e) => tracing::debug!(error = %e, "reading the members' version"),
        }
    }

    async fn renew(self: &Arc<Self>) {
        let sent = std::time::Instant::now();
        let me = self.me.read().clone();
        let ttl = self.config.lease_ttl;
        match membership::renew(&self.conn, &me, ttl.as_millis() as u64).await {
            Ok(Membership::Taken(other)) => {
                tracing::error!(
                    id = %me.id,
                    other = %other.quic,
                    "another process holds this node's id (this one stalled past its membership and was replaced, or the same id was given twice): stopping, so only one acts as this node"
                );
                self.replaced.cancel();
            }
            Ok(Membership::Renewed(membership::Renewed {
                mut live,
                was_absent,
                version,
                expires_in_ms,
            })) => {
                let received = std::time::Instant::now();
                let previous = std::mem::replace(&mut *self.reached.lock(), sent);
                if sent.saturating_duration_since(previous)
                    >= reach::late_after(self.config.renew_interval)
                {
                    *self.heard_since.lock() = sent;
                }
                self.heard_from(&expires_in_ms, received);
                self.members_seen.store(version, Ordering::Relaxed);
                if was_absent && self.registered.load(Ordering::Relaxed) {
                    self.rejoined(&live);
                }
                self.presume(&mut live);
                live.silent = self.silent(&live);
                self.judge(&mut live);
                self.metrics.cluster_nodes.set(live.nodes.len() as i64);
                self.set_live(live).await;
            }
            Err(e) => tracing::warn!(error = %e, "renewing membership"),
        }
        self.renew_leases().await;
    }

    /// This node's membership had lapsed: it stalled (or was cut off) past
    /// it, or the store lost the live set or let every membership lapse (a
    /// restart, a failover or a stall longer than the lease). Only in the
    /// second case are members missing that were there before, and
    /// ownership computed now would be wrong: then no new shard is taken
    /// for one lease, the missing members counted in meanwhile (see
    /// [`Cluster::presume`]). A node that only stalled takes its shards back
    /// at once: the others' leases on them go as they hand them over.
    fn rejoined(&self, live: &LiveSet) {
        let ttl = self.config.lease_ttl;
        let old = self.live.read().clone();
        let missing: Vec<&String> = old
            .nodes
            .keys()
            .filter(|id| **id != self.id && !old.silent.contains(*id))
            .filter(|id| !live.nodes.contains_key(*id))
            .collect();
        if missing.is_empty() {
            tracing::warn!("this node's membership had lapsed (it stalled or was cut off past it) while every other member stayed: joining again, taking its shards back as they are handed over");
            return;
        }
        tracing::warn!(
            ?missing,
            "the store had lost this node's membership and others' (it restarted empty, failed over, or stalled past them): taking no new shard for {ttl:?}, and counting the missing members in, until every live node has said so again"
        );
        *self.presumed.lock() = missing
            .into_iter()
            .filter_map(|id| old.nodes.get(id).map(|n| (id.clone(), n.clone())))
            .collect();
        *self.settling_until.lock() = Some(tokio::time::Instant::now() + ttl);
    }

    /// While settling, members the store lost count as live (those that do
    /// not say so again soon turn silent, like any other): ownership stays
    /// where it was rather than collapsing onto whoever renewed first.
    fn presume(&self, live: &mut LiveSet) {
        let settling = self
            .settling_until
            .lock()
            .is_some_and(|t| tokio::time::Instant::now() < t);
        let mut presumed = self.presumed.lock();
        if !settling {
            presumed.clear();
            return;
        }
        for (id, node) in presumed.iter() {
            live.nodes.entry(id.clone()).or_insert_with(|| node.clone());
        }
    }

    /// Notes each member's last renewal from a read the store answered at
    /// `received`.
    fn heard_from(&self, expires_in_ms: &BTreeMap<String, i64>, received: std::time::Instant) {
        *self.heard.lock() = heard_at(expires_in_ms, received, self.config.lease_ttl);
        *self.looked.lock() = received;
    }

    /// Members silent as of the last look (see [`LiveSet::silent`]): they
    /// had not renewed for [`reach::late_after`] while this node did.
    fn silent(&self, live: &LiveSet) -> BTreeSet<String> {
        membership::silent(
            live,
            &self.id,
            &Heard {
                at: &self.heard.lock(),
                since: *self.heard_since.lock(),
                looked: *self.looked.lock(),
            },
            reach::late_after(self.config.renew_interval),
        )
    }

    /// Looks again at which members are silent, as of the last look at
    /// their renewal times (every acquire tick). While this node's own view
    /// is late (it has not renewed for a while either), what it says
    /// stands.
    async fn notice_silence(self: &Arc<Self>) {
        let now = std::time::Instant::now();
        let late = reach::late_after(self.config.renew_interval);
        if now.saturating_duration_since(*self.reached.lock()) >= late {
            return;
        }
        let mut live = self.live.read().clone();
        let silent = self.silent(&live);
        if silent == live.silent {
            return;
        }
        live.silent = silent;
        self.judge(&mut live);
        self.set_live(live).await;
    }

    /// Who is unreachable for clients, and who for long enough to own
    /// nothing, as the members' announcements say (see [`probe`]).
    fn judge(&self, live: &mut LiveSet) {
        (live.unreachable, live.away) = membership::judged(live, self.config.unreachable_handoff);
    }

    /// Probes the peers' client addresses every `probe_interval` (or at
    /// once when a client says it could not reach one), and announces the
    /// ones that do not answer at the next renewal.
    async fn probe_peers(self: Arc<Self>, stop: CancellationToken) {
        let Some(prober) = &self.prober else { return };
        let every = self.config.probe_interval;
        let mut tick = tokio::time::interval(every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        // Clients' reports wake the prober early, but no oftener than this:
        // a client that keeps naming nodes costs the peers nothing more.
        let mut early_from = tokio::time::Instant::now();
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tick.tick() => {}
                _ = self.probe_now.notified(), if tokio::time::Instant::now() >= early_from => {}
            }
            early_from = tokio::time::Instant::now() + every / 2;
            let live: Vec<NodeInfo> = self.live.read().nodes.values().cloned().collect();
            let round = prober.round(&self.id, &live).await;
            self.metrics.probes(true).inc_by(round.answered as u64);
            self.metrics.probes(false).inc_by(round.failed as u64);
            let unreached = prober.unreached();
            self.metrics.peers_unreached.set(unreached.len() as i64);
            self.me.write().unreached = unreached;
        }
    }

    /// Takes a new view of the live set; when the nodes that own shards
    /// changed, gives up and wants shards accordingly.
    async fn set_live(self: &Arc<Self>, live: LiveSet) {
        let old = std::mem::replace(&mut *self.live.write(), live.clone());
        self.metrics.cluster_silent.set(live.silent.len() as i64);
        self.metrics
            .cluster_unreachable
            .set(live.unreachable.len() as i64);
        self.metrics
            .unreachable_for_clients
            .set(i64::from(live.unreachable.contains(&self.id)));
        for id in live.unreachable.difference(&old.unreachable) {
            match *id == self.id {
                true => tracing::warn!("this node's peers cannot reach its client address: its clients probably cannot either; the other nodes keep them and forward their fixes here"),
                false => tracing::warn!(node = %id, "a member's client address is unreachable: its drivers are kept where they connect and their fixes forwarded to it"),
            }
        }
        for id in live.away.difference(&old.away) {
            tracing::warn!(node = %id, "a member has been unreachable for clients for {:?}: its shards go to reachable nodes", self.config.unreachable_handoff);
        }
        for id in old.unreachable.difference(&live.unreachable) {
            if live.nodes.contains_key(id) {
                tracing::info!(node = %id, "a member's client address is reachable again");
            }
        }
        for id in live.silent.difference(&old.silent) {
            let heard = self.heard.lock().get(id).map(|at| at.elapsed());
            tracing::warn!(node = %id, silent_ms = heard.map(|d| d.as_millis() as u64), "a member has stopped renewing: its shards' drivers go to the nodes that will own them when its lease runs out, which take them in at once");
        }
        for id in old.silent.difference(&live.silent) {
            if live.nodes.contains_key(id) {
                tracing::info!(node = %id, "a silent member renewed again: its shards are its own again");
            }
        }
        if !live.same_owners(&old) {
            tracing::info!(nodes = ?live.nodes.keys().collect::<Vec<_>>(), silent = ?live.silent, "the nodes that own shards changed");
            self.rebalance().await;
        }
    }

    /// Watches how long ago each lease and the membership were last
    /// renewed; past their deadline, steps down from what the peers say
    /// this node is cut from (see [`reach`]); serves again once it renews
    /// its membership.
    async fn guard_reach(self: Arc<Self>, stop: CancellationToken) {
        let (ttl, every) = (self.config.lease_ttl, self.config.renew_interval);
        let late_after = reach::late_after(every);
        let mut tick = tokio::time::interval(ACQUIRE_INTERVAL);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut said: Option<(reach::PeersSay, std::time::Instant)> = None;
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tick.tick() => {}
            }
            let now = std::time::Instant::now();
            let reached = *self.reached.lock();
            let members_late = now - reached >= late_after;
            if self.is_cut_off() && !members_late {
                self.cut_off.store(false, Ordering::Relaxed);
                self.changed();
                self.wake.notify_one();
                tracing::warn!("the store answers again: serving again, as the leases say");
            }
            let late = self.ownership.lock().late(now);
            let members_late = members_late && !self.is_cut_off();
            if late.is_empty() && !members_late {
                said = None;
                continue;
            }
            let live: Vec<NodeInfo> = self.live.read().nodes.values().cloned().collect();
            if live.iter().all(|n| n.id == self.id) {
                // Alone: nobody can take anything over.
                continue;
            }
            if said
                .as_ref()
                .is_none_or(|(_, at)| at.elapsed() >= every / 4)
            {
                let shards: Vec<ShardId> = late.iter().map(|(s, _)| *s).collect();
                let answer = self.peers.ask(&self.id, &live, &shards, members_late).await;
                said = Some((answer, std::time::Instant::now()));
            }
            let Some((peers, _)) = &said else { continue };
            let now = std::time::Instant::now();
            let members_due = members_late
                && now >= reach::deadline(reached, ttl, every)
                && peers.cut_from(peers.members);
            let peers_cut = |shard: ShardId| peers.cut_from(peers.shards.contains(&shard));
            let due: Vec<(ShardId, std::time::Instant)> = late
                .into_iter()
                .filter(|(shard, at)| now >= reach::deadline(*at, ttl, every) && peers_cut(*shard))
                .collect();
            if !members_due && due.is_empty() {
                continue;
            }
            // Only a renewal late for its own reasons (the store just came
            // back, a Redis Cluster client still finding a promoted
            // replica): this node reaches the keys too, and its next
            // renewal says whether they are still its.
            let shards: Vec<ShardId> = due.iter().map(|(s, _)| *s).collect();
            let mine = self
                .reach_within(&shards, members_due, every / 4, true)
                .await;
            let now = std::time::Instant::now();
            if members_due && !mine.members {
                self.stop_serving(peers, now - reached);
                continue;
            }
            let live = self.live.read().clone();
            let cut = self.ownership.lock().cut_from(
                now,
                peers_cut,
                |shard| mine.shards.contains(&shard.to_string()),
                |shard| live.owner(shard).is_some_and(|o| o.id == self.id),
            );
            for (shard, _) in cut {
                let late_ms = due
                    .iter()
                    .find(|(s, _)| *s == shard)
                    .map(|(_, at)| (now - *at).as_millis() as u64);
                tracing::error!(%shard, answered = peers.answered, late_ms, "cut from the shard's lease while the peers reach it: stepping down before it can expire elsewhere");
                self.metrics.cluster_cut_off.inc();
                self.stepped_down(shard);
            }
        }
    }

    /// Cut from the live set's key while the peers are not (or none
    /// answers): this node's membership is about to expire, and the others
    /// will own everything. Every shard is given up here before its lease
    /// can expire elsewhere (its removals wait as tombstones for the store)
    /// and every client is refused, to reconnect through the seeds.
    fn stop_serving(&self, peers: &reach::PeersSay, since: Duration) {
        self.cut_off.store(true, Ordering::Relaxed);
        let shards = self.step_down_all();
        self.changed();
        self.metrics.cluster_cut_off.inc();
        tracing::error!(
            shards,
            answered = peers.answered,
            since_ms = since.as_millis() as u64,
            "cut from the store while the peers reach it: serving nothing before this node's leases can expire elsewhere; clients are refused until the store answers again"
        );
    }

    /// Renews every lease held; steps down from those lost, and applies
    /// the tombstones other nodes left for the others.
    async fn renew_leases(self: &Arc<Self>) {
        let ttl = self.config.lease_ttl;
        let holdings = self.ownership.lock().to_renew();
        let me = self.holder();
        let sent = std::time::Instant::now();
        // Each renewal noted as it returns: on a Redis Cluster one failing
        // master must not make the others' leases look late.
        join_all(holdings.iter().map(|(shard, value)| async move {
            let result = leases::renew(&self.conn, *shard, me, value, ttl).await;
            match result {
                Ok((renewal, tombstones)) => {
                    let kept = self.renewal_answered(*shard, value, sent, renewal);
                    if tombstones && kept {
                        self.apply_tombstones(*shard).await;
                    }
                }
                Err(e) => tracing::warn!(%shard, error = %e, "renewing a shard lease"),
            }
        }))
        .await;
    }

    /// Carries out what a renewal of `shard` under `value`, sent at `sent`,
    /// found. Says whether the shard is still held.
    fn renewal_answered(
        &self,
        shard: ShardId,
        value: &str,
        sent: std::time::Instant,
        renewal: Renewal,
    ) -> bool {
        let ours = self.should_own(shard);
        let new = match &renewal {
            Renewal::Reclaimed(new) => Some(new.clone()),
            _ => None,
        };
        // Bound first: the arms take the lock again.
        let renewed = self
            .ownership
            .lock()
            .renewed(shard, value, sent, renewal, ours);
        match renewed {
            Renewed::Kept => {}
            Renewed::Reclaimed => {
                tracing::warn!(%shard, value = new.as_deref().unwrap_or_default(), "the store had lost the shard's lease (it restarted, or stalled past it) and nobody took it since: holding it again, keeping its vehicles and writing what waited");
                self.reclaimed(shard);
            }
            Renewed::SteppedDown => {
                tracing::warn!(%shard, "the shard's lease is another node's; stepping down");
                self.stepped_down(shard);
                return false;
            }
        }
        self.ownership.lock().holds(shard)
    }

    /// After the live set changed: gives up the shards that moved away, and
    /// wants the ones that moved here.
    async fn rebalance(self: &Arc<Self>) {
        let live = self.live.read().clone();
        let moved = self
            .ownership
            .lock()
            .rebalance(|shard| live.owner(shard).is_some_and(|o| o.id == self.id));
        self.changed();
        for shard in moved {
            let cluster = self.clone();
            tokio::spawn(async move { cluster.give_up(shard).await });
        }
        if let Err(e) = self.want_stored_shards().await {
            tracing::warn!(error = %e, "reading the stored shards");
        }
        self.wake.notify_one();
    }

    fn should_own(&self, shard: ShardId) -> bool {
        let me = self.node_id();
        self.live.read().owner(shard).is_some_and(|o| o.id == me)
    }

    /// Hands a shard to its new owner: its drivers are redirected as they
    /// next report (sessions see it is no longer ours), what they sent is
    /// written, then the lease goes, and whatever is left leaves the table.
    /// A flush that fails keeps the lease (renewed as ever) until one
    /// succeeds: the new owner must not load the shard without those
    /// changes. If the lease is lost meanwhile, stepping down has already
    /// let the shard go; if it is reclaimed under a new value, that value
    /// is released.
    async fn give_up(&self, shard: ShardId) {
        tracing::info!(%shard, "handing the shard to its new owner");
        let deadline = tokio::time::Instant::now() + self.config.renew_interval;
        while tokio::time::Instant::now() < deadline
            && self.ingest.table.shard_counts().contains_key(&shard)
        {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let still_ours = || self.ownership.lock().releasing(shard).is_some();
        if !self.writer.written(shard, still_ours).await {
            tracing::info!(%shard, "the shard was lost while its last changes were written; nothing to release");
            return;
        }
        let Some(value) = self.ownership.lock().releasing(shard) else {
            return;
        };
        match leases::release(&self.conn, shard, &value).await {
            Ok(_) => {}
            Err(e) => tracing::warn!(%shard, error = %e, "releasing a lease; it expires by itself"),
        }
        if self.ownership.lock().released(shard, &value) {
            self.let_go(shard);
        }
    }

    /// Lets go of the copies of vehicles handed off as they crossed whose
    /// new node never took them: the copy goes; the vehicle too if the
    /// store's locator still names the shard (its driver arrived nowhere).
    async fn let_go_of_handed(&self) {
        let due = self.ingest.handed_due(std::time::Instant::now());
        if due.is_empty() {
            return;
        }
        let ids: Vec<VehicleId> = due.iter().map(|(id, _)| id.clone()).collect();
        let located = match self.store.locate(&ids).await {
            Ok(located) => located,
            Err(e) => {
                tracing::warn!(error = %e, "reading handed-off vehicles' locators; trying again");
                self.ingest.handed.lock().extend(due);
                return;
            }
        };
        for ((id, handed), at) in due.into_iter().zip(located) {
            let arrived = at != Some(handed.shard);
            tracing::debug!(vehicle = %id, shard = %handed.shard, arrived, "letting a handed-off vehicle's copy go");
            self.ingest.let_go(id, handed, arrived);
        }
    }

    /// Checks the leases of shards whose write was fenced: another node's
    /// now (step down), or lost by the store with nobody holding it since
    /// (hold it again, keep the vehicles).
    async fn check_suspects(self: &Arc<Self>) {
        let suspects = self.ownership.lock().take_suspects();
        let me = self.holder();
        for (shard, value) in suspects {
            let sent = std::time::Instant::now();
            match leases::renew(&self.conn, shard, me, &value, self.config.lease_ttl).await {
                Ok((renewal, _)) => {
                    self.renewal_answered(shard, &value, sent, renewal);
                }
                Err(e) => {
                    tracing::warn!(%shard, error = %e, "checking a fenced shard's lease; trying again");
                    self.ownership.lock().check_again(shard);
                }
            }
        }
    }

    /// A shard held again under a new value (the writer's next flush is
    /// fenced by it): every vehicle of the shard is written again, as the
    /// store may have lost them too.
    fn reclaimed(&self, shard: ShardId) {
        self.metrics.shards_reclaimed.inc();
        self.changed();
        for entry in self.ingest.table.entries() {
            if entry.shard == shard {
                self.writer.stage_upsert(shard, entry.state, true);
            }
        }
    }

    /// Steps down from every shard held; returns how many.
    fn step_down_all(&self) -> usize {
        let live = self.live.read().clone();
        let shards = self
            .ownership
            .lock()
            .step_down_all(|shard| live.owner(shard).is_some_and(|o| o.id == self.id));
        for shard in &shards {
            self.stepped_down(*shard);
        }
        shards.len()
    }

    /// This node lost a shard it thought it held: it writes nothing more
    /// there and forgets the shard's vehicles (the new owner has them). The
    /// removals it could not write are left to the new owner as tombstones.
    fn stepped_down(&self, shard: ShardId) {
        self.changed();
        self.writer.discard(shard);
        self.let_go(shard);
    }

    /// A shard no longer held: its vehicles leave the table.
    fn let_go(&self, shard: ShardId) {
        let released = self.ingest.release_shard(shard);
        self.metrics.shards_released.inc();
        tracing::info!(%shard, vehicles = released, "gave up the shard");
        self.publish_held();
    }

    /// Takes the removals another node left for a shard this node holds,
    /// and applies them to its vehicles.
    async fn apply_tombstones(&self, shard: ShardId) {
        match self.store.take_tombstones(shard).await {
            Ok(removals) if !removals.is_empty() => {
                let applied = self.ingest.apply_tombstones(shard, &removals);
                tracing::info!(%shard, left = removals.len(), applied, "applied the removals another node left for this shard");
            }
            Ok(_) => {}
            Err(e) => {
                tracing::warn!(%shard, error = %e, "reading the shard's tombstones; trying at the next renewal")
            }
        }
    }

    /// Whether new shards wait (see `settling_until`).
    fn settling(&self) -> bool {
        let mut until = self.settling_until.lock();
        match *until {
            Some(t) if tokio::time::Instant::now() < t => true,
            Some(_) => {
                *until = None;
                false
            }
            None => false,
        }
    }

    async fn acquire_wanted(self: &Arc<Self>) {
        if self.settling() {
            return;
        }
        let wanted = self.ownership.lock().wanted();
        if wanted.is_empty() {
            return;
        }
        let me = self.holder();
        let ttl = self.config.lease_ttl;
        let sent = std::time::Instant::now();
        let results = join_all(
            wanted
                .iter()
                .map(|&shard| leases::acquire(&self.conn, shard, me, ttl)),
        )
        .await;
        for (shard, result) in wanted.into_iter().zip(results) {
            match result {
                Ok(Some(value)) => self.took(shard, value.into(), sent).await,
                Ok(None) => {}
                Err(e) => tracing::warn!(%shard, error = %e, "acquiring a shard lease"),
            }
        }
    }

    /// Splits a shard's stored vehicles into those that are in it and the
    /// leftovers of moves: vehicles whose locator names another shard. When
    /// the locators cannot be read, all are taken (a leftover then goes
    /// stale in time).
    async fn leftovers(
        &self,
        shard: ShardId,
        states: Vec<VehicleState>,
    ) -> (Vec<VehicleState>, Vec<VehicleState>) {
        let ids: Vec<VehicleId> = states.iter().map(|s| s.id.clone()).collect();
        match self.store.locate(&ids).await {
            Ok(located) => {
                let (mut here, mut moved) = (Vec::new(), Vec::new());
                for (state, at) in states.into_iter().zip(located) {
                    // A vehicle this node holds already is its own to place
                    // (its locator may be behind this node's pending write).
                    let held = self.ingest.table.get(&state.id).is_some();
                    match at {
                        Some(at) if at != shard && !held => moved.push(state),
                        _ => here.push(state),
                    }
                }
                (here, moved)
            }
            Err(e) => {
                tracing::warn!(%shard, error = %e, "reading the locators of a shard taken over; taking every vehicle");
                (states, Vec::new())
            }
        }
    }

    /// A lease acquired: the shard's stored vehicles become this node's
    /// (those it does not already hold with a newer fix).
    async fn took(&self, shard: ShardId, value: Arc<str>, sent: std::time::Instant) {
        let states = match self.store.load_shard(shard).await {
            Ok(states) => states,
            Err(e) => {
                tracing::warn!(%shard, error = %e, "loading a shard taken over; trying again");
                let _ = leases::release(&self.conn, shard, &value).await;
                return;
            }
        };
        if !self.should_own(shard) {
            let _ = leases::release(&self.conn, shard, &value).await;
            self.ownership.lock().not_taken(shard);
            return;
        }
        let (states, leftovers) = self.leftovers(shard, states).await;
        self.ownership.lock().took(shard, value, sent);
        let taken = self.ingest.take_over(shard, states);
        // Copies of vehicles that moved on (their removal from here was
        // never written: their node died between the two writes).
        for state in &leftovers {
            self.writer.stage_removal(shard, state, None);
        }
        if !leftovers.is_empty() {
            tracing::info!(%shard, leftovers = leftovers.len(), "removed copies of vehicles that had moved to other shards");
        }
        // Removals its last holder could not write before losing it.
        self.apply_tombstones(shard).await;
        // Zone events its last holder wrote but did not relay.
        self.writer.relay(shard);
        self.metrics.shards_taken_over.inc();
        tracing::info!(%shard, vehicles = taken, "took the shard over");
        self.publish_held();
    }
}

/// When each member last renewed, in this node's clock: a read `received`
/// said its membership runs on for `expires_in_ms`, and a renewal gives it
/// `ttl` (the cluster's nodes share one).
fn heard_at(
    expires_in_ms: &BTreeMap<String, i64>,
    received: std::time::Instant,
    ttl: Duration,
) -> BTreeMap<String, std::time::Instant> {
    expires_in_ms
        .iter()
        .map(|(id, &ms)| {
            let since_renewal = ttl.saturating_sub(Duration::from_millis(ms.max(0) as u64));
            let at = received.checked_sub(since_renewal).unwrap_or(received);
            (id.clone(), at)
        })
        .collect()
}

impl Fences for Cluster {
    fn fence(&self, shard: ShardId) -> Fence {
        let (fence, wanted) = self
            .ownership
            .lock()
            .fence(shard, || self.should_own(shard));
        if wanted {
            self.wake.notify_one();
        }
        fence
    }

    fn fenced(&self, shard: ShardId) {
        let now = std::time::Instant::now();
        if self.ownership.lock().fenced(shard, now) {
            self.wake.notify_one();
        }
    }

    fn publishes(&self) -> bool {
        true
    }
}
