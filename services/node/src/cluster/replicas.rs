//! The bus, receiving side: replicas of other nodes' shards.
//!
//! A node replicates exactly the shards its riders and dashboards watch
//! ([`FanOut::needed_shards`]) that it does not hold itself. For each, it
//! subscribes to the shard's channel, then reads a snapshot (states and the
//! bus sequence they reflect, in one script), then applies the owner's
//! batches in sequence order: a batch at or below the replica's sequence is
//! old news; one beyond the next means batches were missed, and the shard
//! is read again. The replica's vehicles go to the fan-out like local ones,
//! so a rider sees the same view whichever node it is connected to.
//!
//! On a Redis Cluster the channels are sharded (`SSUBSCRIBE`, one slot with
//! the shard's keys); on one server, plain pub/sub does the same job.

use std::{
    collections::{HashMap, HashSet},
    sync::Arc,
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
}

/// One replicated shard.
#[derive(Default)]
struct Replica {
    /// The sequence of the last batch applied (or of the snapshot).
    seq: u64,
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
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = needed.changed() => {}
                _ = held.changed() => {}
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
            if !self.replicas.contains_key(&shard) {
                if let Err(e) = conn.subscribe(&keys::bus_channel(shard)).await {
                    tracing::warn!(%shard, error = %e, "subscribing to a shard's bus; retrying");
                    continue;
                }
            }
            match self.store.snapshot_shard(shard).await {
                Ok((seq, states)) => {
                    self.snapshot(shard, seq, states);
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

    /// Starts (or restarts) a replica from what the store holds.
    fn snapshot(&mut self, shard: ShardId, seq: u64, states: Vec<VehicleState>) {
        let replica = self.replicas.entry(shard).or_default();
        let fresh: HashMap<VehicleId, VehicleState> =
            states.into_iter().map(|s| (s.id.clone(), s)).collect();
        for id in replica.vehicles.keys() {
            if !fresh.contains_key(id) {
                // It left while we were not listening: maybe for another shard.
                self.fanout.vehicle_in_transit(id.clone(), shard);
            }
        }
        for state in fresh.values() {
            if let Some(position) = indexable(state) {
                let (cell, _) = self.cells.locate(position);
                self.fanout.vehicle_changed(state.clone(), cell, shard);
            }
        }
        replica.vehicles = fresh;
        replica.seq = seq;
    }

    fn on_push(&mut self, push: PushInfo, stale: &mut HashSet<ShardId>) {
        match push.kind {
            PushKind::Message | PushKind::SMessage => {}
            PushKind::Disconnection => {
                // Batches may have been missed meanwhile.
                stale.extend(self.replicas.keys().copied());
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
        if stale.contains(&shard) || seq <= replica.seq {
            return;
        }
        if seq != replica.seq + 1 {
            tracing::debug!(%shard, have = replica.seq, got = seq, "a gap in a shard's bus; reading it again");
            self.metrics.bus_resnapshots.inc();
            stale.insert(shard);
            return;
        }
        replica.seq = seq;
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
