//! The bus, receiving side: replicas of other nodes' shards.
//!
//! A node replicates exactly the shards its riders and dashboards watch
//! ([`FanOut::needed_shards`]) that it does not hold itself. For each, it
//! subscribes to the shard's channel, then reads a snapshot (states and the
//! bus sequence they reflect, in one script), then applies the owner's
//! batches in sequence order: a batch at or below the replica's sequence is
//! old news; one beyond the next means batches were missed, and the shard
//! is read again. A batch under sequence 0 is one the store refused for
//! want of memory: shown at once, the sequence left where it is. The
//! replica's vehicles go to the fan-out like local ones, so a rider sees
//! the same view whichever node it is connected to.
//!
//! On a Redis Cluster the channels are sharded (`SSUBSCRIBE`, one slot with
//! the shard's keys); on one server, plain pub/sub does the same job.
//!
//! A replica does not trust silence. Redis drops a sharded subscription
//! when the slot moves or fails over (an `sunsubscribe` push): the shard
//! is subscribed again and read again. Every [`BUS_CHECK`] the bus
//! connection is pinged (a half-open one is remade, and every replica read
//! again), and each replica's sequence is compared with the one its owner
//! last wrote: a batch written before the previous check and still not
//! received was lost (the last message of a quiet shard, which no later
//! batch would reveal as a gap), and the shard is read again.

use std::{
    collections::{HashMap, HashSet},
    sync::Arc,
    time::Duration,
};

use hexfleet_model::{Position, ShardId, VehicleId, VehicleState};
use hexfleet_protocol::{bus::ShardChanges, RemoveReason};
use redis::{PushInfo, PushKind, Value};
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;

use crate::{
    clock,
    config::{StoreConfig, StoreKind},
    fanout::{FanOut, Shards},
    metrics::Metrics,
    store::{keys, Store, StoreError},
};

/// A subscription connection for bus channels.
enum BusConn {
    Single(redis::aio::ConnectionManager),
    Cluster(redis::cluster_async::ClusterConnection),
}

impl BusConn {
    async fn open(
        config: &StoreConfig,
        pushes: mpsc::UnboundedSender<PushInfo>,
    ) -> Result<Self, StoreError> {
        Ok(match config.kind {
            StoreKind::RedisCluster => {
                let client = redis::cluster::ClusterClientBuilder::new(config.redis_seeds())
                    .use_protocol(redis::ProtocolVersion::RESP3)
                    .push_sender(pushes)
                    .build()?;
                BusConn::Cluster(client.get_async_connection().await?)
            }
            _ => {
                let info =
                    redis::IntoConnectionInfo::into_connection_info(config.redis_url.as_str())?;
                let settings = info
                    .redis_settings()
                    .clone()
                    .set_protocol(redis::ProtocolVersion::RESP3);
                let info = info.set_redis_settings(settings);
                let client = redis::Client::open(info)?;
                let manager = redis::aio::ConnectionManagerConfig::new()
                    .set_push_sender(pushes)
                    .set_automatic_resubscription();
                BusConn::Single(client.get_connection_manager_with_config(manager).await?)
            }
        })
    }

    async fn subscribe(&mut self, channel: &str) -> redis::RedisResult<()> {
        match self {
            BusConn::Single(c) => c.subscribe(channel).await,
            BusConn::Cluster(c) => c.ssubscribe(channel).await,
        }
    }

    async fn unsubscribe(&mut self, channel: &str) -> redis::RedisResult<()> {
        match self {
            BusConn::Single(c) => c.unsubscribe(channel).await,
            BusConn::Cluster(c) => c.sunsubscribe(channel).await,
        }
    }

    async fn ping(&mut self) -> redis::RedisResult<()> {
        let ping = redis::cmd("PING");
        match self {
            BusConn::Single(c) => ping.query_async(c).await,
            BusConn::Cluster(c) => ping.query_async(c).await,
        }
    }
}

/// How often the bus connection is pinged and each replica's sequence is
/// compared with its owner's.
pub const BUS_CHECK: Duration = Duration::from_secs(2);

/// One replicated shard.
#[derive(Default)]
struct Replica {
    /// The sequence of the last batch applied (or of the snapshot).
    seq: u64,
    /// Whether the bus connection is subscribed to the shard's channel.
    subscribed: bool,
    /// The owner's sequence as of the previous check: batches up to it
    /// must have arrived by the next one.
    owner_seq: u64,
    vehicles: HashMap<VehicleId, VehicleState>,
}

pub struct Replicas {
    store: Arc<dyn Store>,
    fanout: Arc<FanOut>,
    cells: hexfleet_model::CellModel,
    metrics: Arc<Metrics>,
    replicas: HashMap<ShardId, Replica>,
}

impl Replicas {
    pub fn new(
        store: Arc<dyn Store>,
        fanout: Arc<FanOut>,
        cells: hexfleet_model::CellModel,
        metrics: Arc<Metrics>,
    ) -> Self {
        Self {
            store,
            fanout,
            cells,
            metrics,
            replicas: HashMap::new(),
        }
    }

    /// Keeps the replicas this node needs until shutdown.
    pub async fn run(
        mut self,
        config: StoreConfig,
        mut needed: watch::Receiver<Shards>,
        mut held: watch::Receiver<Shards>,
        shutdown: CancellationToken,
    ) {
        let (pushes_tx, mut pushes) = mpsc::unbounded_channel();
        let mut conn = loop {
            match BusConn::open(&config, pushes_tx.clone()).await {
                Ok(conn) => break conn,
                Err(e) => {
                    tracing::warn!(error = %e, "connecting to the bus; retrying");
                    tokio::select! {
                        _ = shutdown.cancelled() => return,
                        _ = tokio::time::sleep(std::time::Duration::from_secs(1)) => {}
                    }
                }
            }
        };
        // Replicas that must be read again (a gap, a reconnection, a failed read).
        let mut stale: HashSet<ShardId> = HashSet::new();
        let mut retry = tokio::time::interval(std::time::Duration::from_millis(500));
        let mut check = tokio::time::interval(BUS_CHECK);
        check.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = needed.changed() => {}
                _ = held.changed() => {}
                _ = check.tick() => {
                    self.check(&mut conn, &config, &pushes_tx, &mut stale).await;
                    if stale.is_empty() {
                        continue;
                    }
                }
                push = pushes.recv() => {
                    let Some(push) = push else { return };
                    self.on_push(push, &mut stale);
                    if stale.is_empty() {
                        continue;
                    }
                }
                _ = retry.tick() => {}
            }
            let desired: HashSet<ShardId> = {
                let (needed, held) = (needed.borrow_and_update(), held.borrow_and_update());
                needed.difference(&held).copied().collect()
            };
            let held_now = held.borrow().clone();
            self.reconcile(&mut conn, &desired, &held_now, &mut stale)
                .await;
        }
    }

    async fn reconcile(
        &mut self,
        conn: &mut BusConn,
        desired: &HashSet<ShardId>,
        held: &HashSet<ShardId>,
        stale: &mut HashSet<ShardId>,
    ) {
        let gone: Vec<ShardId> = self
            .replicas
            .keys()
            .filter(|s| !desired.contains(s))
            .copied()
            .collect();
        for shard in gone {
            if let Err(e) = conn.unsubscribe(&keys::bus_channel(shard)).await {
                tracing::warn!(%shard, error = %e, "unsubscribing from a shard's bus");
            }
            let replica = self.replicas.remove(&shard).unwrap_or_default();
            stale.remove(&shard);
            // Taken over here: the table has its vehicles now. Otherwise
            // nobody watches it any more.
            if !held.contains(&shard) {
                for id in replica.vehicles.into_keys() {
                    self.fanout
                        .vehicle_removed(id, RemoveReason::LeftView, shard);
                }
            }
        }
        for &shard in desired {
            if self.replicas.contains_key(&shard) && !stale.contains(&shard) {
                continue;
            }
            if !self.replicas.get(&shard).is_some_and(|r| r.subscribed) {
                if let Err(e) = conn.subscribe(&keys::bus_channel(shard)).await {
                    tracing::warn!(%shard, error = %e, "subscribing to a shard's bus; retrying");
                    continue;
                }
                self.replicas.entry(shard).or_default().subscribed = true;
            }
            match self.store.snapshot_shard(shard).await {
                Ok((seq, states)) => {
                    self.snapshot(shard, seq, states).await;
                    stale.remove(&shard);
                }
                Err(e) => {
                    tracing::warn!(%shard, error = %e, "reading a replicated shard; retrying");
                    self.replicas.entry(shard).or_default();
                    stale.insert(shard);
                }
            }
        }
        self.metrics.replicas.set(self.replicas.len() as i64);
    }

    /// Starts (or restarts) a replica from what the store holds. A vehicle
    /// the replica had and the store no longer holds there left while the
    /// replica was not listening: for another shard (its locator says
    /// where: in transit, shown again from there) or for good (no locator:
    /// signed off or evicted, removed at once).
    async fn snapshot(&mut self, shard: ShardId, seq: u64, states: Vec<VehicleState>) {
        let fresh: HashMap<VehicleId, VehicleState> =
            states.into_iter().map(|s| (s.id.clone(), s)).collect();
        let left: Vec<VehicleId> = self
            .replicas
            .get(&shard)
            .map(|r| {
                r.vehicles
                    .keys()
                    .filter(|id| !fresh.contains_key(*id))
                    .cloned()
                    .collect()
            })
            .unwrap_or_default();
        let located = match self.store.locate(&left).await {
            Ok(located) => located,
            // Unknown: in transit, until a replica or its node shows it.
            Err(_) => vec![Some(shard); left.len()],
        };
        for (id, at) in left.into_iter().zip(located) {
            match at {
                Some(_) => self.fanout.vehicle_in_transit(id, shard),
                None => self
                    .fanout
                    .vehicle_removed(id, RemoveReason::Offline, shard),
            }
        }
        let replica = self.replicas.entry(shard).or_default();
        for state in fresh.values() {
            if let Some(position) = indexable(state) {
                let (cell, _) = self.cells.locate(position);
                self.fanout.vehicle_changed(state.clone(), cell, shard);
            }
        }
        replica.vehicles = fresh;
        replica.seq = seq;
    }

    /// Pings the bus, and reads again the replicas that missed a batch
    /// (see the module notes). A bus that does not answer while the store
    /// does is half-open: it is made again, and every replica read again.
    /// When neither answers, Redis is away (stalled, or cut off): what it
    /// will send when it is back is still in order, so nothing is read
    /// again for that (a snapshot cannot tell a vehicle signed off from one
    /// gone to another shard, and would show it in transit meanwhile).
    async fn check(
        &mut self,
        conn: &mut BusConn,
        config: &StoreConfig,
        pushes: &mpsc::UnboundedSender<PushInfo>,
        stale: &mut HashSet<ShardId>,
    ) {
        if self.replicas.is_empty() {
            return;
        }
        let alive = tokio::time::timeout(BUS_CHECK / 2, conn.ping()).await;
        if !matches!(alive, Ok(Ok(()))) {
            let store = tokio::time::timeout(BUS_CHECK / 2, self.store.ping()).await;
            if !matches!(store, Ok(Ok(()))) {
                tracing::debug!("neither the bus nor the store answers; waiting for Redis");
                return;
            }
            tracing::warn!("the bus connection does not answer while the store does; connecting again, subscribing and reading every replica again");
            match BusConn::open(config, pushes.clone()).await {
                Ok(fresh) => *conn = fresh,
                Err(e) => tracing::warn!(error = %e, "connecting to the bus again; retrying"),
            }
            self.metrics.bus_resnapshots.inc();
            self.lost_all(stale);
            return;
        }
        let shards: Vec<ShardId> = self
            .replicas
            .keys()
            .filter(|s| !stale.contains(s))
            .copied()
            .collect();
        let owners = match self.store.bus_seqs(&shards).await {
            Ok(seqs) => seqs,
            Err(e) => {
                tracing::debug!(error = %e, "reading the replicated shards' sequences");
                return;
            }
        };
        for (shard, owner_seq) in shards.into_iter().zip(owners) {
            let Some(replica) = self.replicas.get_mut(&shard) else {
                continue;
            };
            if replica.seq < replica.owner_seq {
                tracing::info!(%shard, have = replica.seq, written = replica.owner_seq, "a shard's batch never arrived; reading it again");
                self.metrics.bus_resnapshots.inc();
                stale.insert(shard);
            }
            replica.owner_seq = owner_seq;
        }
    }

    /// The bus connection was lost (or may have been): every replica must
    /// be subscribed and read again.
    fn lost_all(&mut self, stale: &mut HashSet<ShardId>) {
        for (shard, replica) in &mut self.replicas {
            replica.subscribed = false;
            stale.insert(*shard);
        }
    }

    fn on_push(&mut self, push: PushInfo, stale: &mut HashSet<ShardId>) {
        match push.kind {
            PushKind::Message | PushKind::SMessage => {}
            PushKind::Disconnection => {
                // Batches may have been missed meanwhile.
                self.lost_all(stale);
                return;
            }
            PushKind::Unsubscribe | PushKind::SUnsubscribe => {
                // Redis dropped a subscription (a slot moved or failed
                // over), or we did (then the replica is gone already).
                let channel = match push.data.first() {
                    Some(Value::BulkString(channel)) => std::str::from_utf8(channel).ok(),
                    _ => None,
                };
                let shard = channel.and_then(keys::bus_channel_shard);
                if let Some(replica) = shard.and_then(|s| self.replicas.get_mut(&s)) {
                    replica.subscribed = false;
                    stale.extend(shard);
                    tracing::info!(shard = ?shard, "the store dropped a shard's subscription; subscribing and reading it again");
                }
                return;
            }
            _ => return,
        }
        let [Value::BulkString(channel), Value::BulkString(message)] = push.data.as_slice() else {
            return;
        };
        let Some(shard) = std::str::from_utf8(channel)
            .ok()
            .and_then(keys::bus_channel_shard)
        else {
            return;
        };
        let (seq, changes) = match ShardChanges::decode_message(message) {
            Ok(decoded) => decoded,
            Err(e) => {
                tracing::warn!(%shard, error = %e, "a bus message does not decode; reading the shard again");
                stale.insert(shard);
                return;
            }
        };
        let Some(replica) = self.replicas.get_mut(&shard) else {
            return;
        };
        // Sequence 0: a batch the store could not write (out of memory),
        // shown now; written, it comes again under its own sequence.
        let unwritten = seq == 0;
        if stale.contains(&shard) || (seq <= replica.seq && !unwritten) {
            return;
        }
        if !unwritten && seq != replica.seq + 1 {
            tracing::debug!(%shard, have = replica.seq, got = seq, "a gap in a shard's bus; reading it again");
            self.metrics.bus_resnapshots.inc();
            stale.insert(shard);
            return;
        }
        if !unwritten {
            replica.seq = seq;
        }
        self.metrics.bus_batches.inc();
        let now = clock::now_ms();
        for removal in changes.removals {
            replica.vehicles.remove(&removal.id);
            match removal.gone {
                Some(reason) => self.fanout.vehicle_removed(removal.id, reason, shard),
                None => self.fanout.vehicle_in_transit(removal.id, shard),
            }
        }
        for state in changes.upserts {
            let Some(position) = indexable(&state) else {
                continue;
            };
            let waited_ms = now.saturating_sub(state.seen_ms).max(0);
            self.metrics
                .bus_delay_seconds
                .observe(waited_ms as f64 / 1e3);
            let (cell, _) = self.cells.locate(position);
            replica.vehicles.insert(state.id.clone(), state.clone());
            self.fanout.vehicle_changed(state, cell, shard);
        }
    }
}

fn indexable(state: &VehicleState) -> Option<Position> {
    Position::new(state.lat, state.lon)
        .ok()
        .filter(|p| p.is_indexable())
}
