//! The Redis store, on one Redis server or a Redis Cluster.
//!
//! A flush is one pipeline per shard — `GEOADD`, `ZADD` (last seen) and
//! `HSET` (state) each carrying every vehicle of the shard, then the
//! matching `ZREM`/`HDEL`s — and the shards' pipelines are sent concurrently
//! on one multiplexed connection. All keys of a pipeline share the shard's
//! hash tag, so on a cluster each pipeline goes to one slot.
//!
//! A command Redis refuses for its content costs only the vehicles it
//! carried that Redis refuses: the shard is then rewritten one vehicle at a
//! time to find them (see [`RedisStore::write_shard`]). Errors that say Redis
//! cannot write at all are returned, and the writer retries.

use std::collections::HashMap;

use async_trait::async_trait;
use futures_util::future::try_join_all;
use hexfleet_model::{ShardId, VehicleId, VehicleState};
use redis::{
    aio::ConnectionManager, cluster_async::ClusterConnection, FromRedisValue, Pipeline,
    ServerError, ToRedisArgs, Value,
};

use super::{
    keys, nearest_first, Batch, Nearby, NearbyQuery, Refused, ShardBatch, Store, StoreError,
};

#[derive(Clone)]
enum Conn {
    Single(ConnectionManager),
    Cluster(ClusterConnection),
}

impl Conn {
    async fn query<T: FromRedisValue>(&self, pipe: &Pipeline) -> redis::RedisResult<T> {
        match self {
            Conn::Single(c) => pipe.query_async(&mut c.clone()).await,
            Conn::Cluster(c) => pipe.query_async(&mut c.clone()).await,
        }
    }

    async fn cmd<T: FromRedisValue>(&self, cmd: &redis::Cmd) -> redis::RedisResult<T> {
        match self {
            Conn::Single(c) => cmd.query_async(&mut c.clone()).await,
            Conn::Cluster(c) => cmd.query_async(&mut c.clone()).await,
        }
    }
}

pub struct RedisStore {
    conn: Conn,
}

impl RedisStore {
    /// Connects to one Redis server. The connection reconnects by itself
    /// after a failure; commands sent meanwhile fail and are retried by the
    /// writer.
    pub async fn connect(url: &str) -> Result<Self, StoreError> {
        let client = redis::Client::open(url)?;
        let conn = client.get_connection_manager().await?;
        Ok(Self::with(Conn::Single(conn)))
    }

    /// Connects to a Redis Cluster through any of its nodes.
    pub async fn connect_cluster(seeds: &[String]) -> Result<Self, StoreError> {
        let client = redis::cluster::ClusterClient::new(seeds.to_vec())?;
        let conn = client.get_async_connection().await?;
        Ok(Self::with(Conn::Cluster(conn)))
    }

    fn with(conn: Conn) -> Self {
        Self { conn }
    }

    /// One shard's flush: the removals, then one variadic `GEOADD`, `ZADD`
    /// and `HSET` carrying every upsert. Errors come back per command, so a
    /// refusal can be told from a failure to reach Redis.
    fn shard_pipeline(sb: &ShardBatch) -> Result<Pipeline, StoreError> {
        let mut pipe = redis::pipe();
        pipe.ignore_errors();
        if !sb.removals.is_empty() {
            let ids: Vec<&str> = sb.removals.iter().map(|r| r.id.as_str()).collect();
            remove_from_shard(&mut pipe, sb.shard, ids.as_slice());
        }
        if !sb.upserts.is_empty() {
            let mut geoadd = redis::cmd("GEOADD");
            let mut zadd = redis::cmd("ZADD");
            let mut hset = redis::cmd("HSET");
            geoadd.arg(keys::geo(sb.shard));
            zadd.arg(keys::seen(sb.shard));
            hset.arg(keys::state(sb.shard));
            for u in &sb.upserts {
                let s = &u.state;
                geoadd.arg(s.lon).arg(s.lat).arg(s.id.as_str());
                zadd.arg(s.seen_ms).arg(s.id.as_str());
                hset.arg(s.id.as_str()).arg(rmp_serde::to_vec(s)?);
            }
            pipe.add_command(geoadd);
            pipe.add_command(zadd);
            pipe.add_command(hset);
        }
        Ok(pipe)
    }

    /// Writes one shard's changes. When Redis refuses a command for its
    /// content (a position it cannot index, a key of the wrong type), the
    /// shard is written again one vehicle at a time to find who it refuses.
    async fn write_shard(&self, sb: &ShardBatch) -> Result<Vec<Refused>, StoreError> {
        let replies: Vec<Value> = self.conn.query(&Self::shard_pipeline(sb)?).await?;
        match worst(&replies) {
            None => Ok(Vec::new()),
            Some(Verdict::Retry(e)) => Err(StoreError::Redis(e.into())),
            Some(Verdict::Refused(_)) => self.write_shard_one_by_one(sb).await,
        }
    }

    /// Each vehicle's commands on their own, in one pipeline; the vehicles
    /// Redis refuses are reported, and whatever of theirs did land is
    /// removed, so no vehicle is left half-written.
    async fn write_shard_one_by_one(&self, sb: &ShardBatch) -> Result<Vec<Refused>, StoreError> {
        // A removal (remove_from_shard) and an upsert each send three commands.
        const PER_VEHICLE: usize = 3;
        let mut pipe = redis::pipe();
        pipe.ignore_errors();
        for r in &sb.removals {
            let id = r.id.as_str();
            remove_from_shard(&mut pipe, sb.shard, id);
        }
        for u in &sb.upserts {
            let s = &u.state;
            let id = s.id.as_str();
            pipe.cmd("GEOADD")
                .arg(keys::geo(sb.shard))
                .arg(s.lon)
                .arg(s.lat)
                .arg(id);
            pipe.cmd("ZADD")
                .arg(keys::seen(sb.shard))
                .arg(s.seen_ms)
                .arg(id);
            pipe.cmd("HSET")
                .arg(keys::state(sb.shard))
                .arg(id)
                .arg(rmp_serde::to_vec(s)?);
        }
        let replies: Vec<Value> = self.conn.query(&pipe).await?;
        let changes = sb
            .removals
            .iter()
            .map(|r| (&r.id, false))
            .chain(sb.upserts.iter().map(|u| (&u.state.id, u.relocated)));
        let mut refused = Vec::new();
        for ((id, relocated), replies) in changes.zip(replies.chunks(PER_VEHICLE)) {
            match worst(replies) {
                None => {}
                Some(Verdict::Retry(e)) => return Err(StoreError::Redis(e.into())),
                Some(Verdict::Refused(e)) => refused.push(Refused {
                    shard: sb.shard,
                    id: id.clone(),
                    relocated,
                    reason: e.to_string(),
                }),
            }
        }
        if !refused.is_empty() {
            let ids: Vec<&str> = refused.iter().map(|r| r.id.as_str()).collect();
            let mut undo = redis::pipe();
            remove_from_shard(&mut undo, sb.shard, ids.as_slice());
            self.conn.query::<()>(&undo).await?;
        }
        Ok(refused)
    }

    /// Locators live in their own slots: on a cluster each is its own
    /// command; on one server they share a pipeline. They change only when a
    /// vehicle appears, crosses a shard or is forgotten.
    async fn write_locators(&self, batch: &Batch, refused: &[Refused]) -> Result<(), StoreError> {
        let mut cmds = Vec::new();
        for sb in &batch.shards {
            for r in sb.removals.iter().filter(|r| r.forget) {
                let mut cmd = redis::cmd("DEL");
                cmd.arg(keys::locator(&r.id));
                cmds.push(cmd);
            }
        }
        let was_refused = |shard: ShardId, id: &VehicleId| {
            refused.iter().any(|r| r.shard == shard && &r.id == id)
        };
        for sb in &batch.shards {
            for u in sb
                .upserts
                .iter()
                .filter(|u| u.relocated && !was_refused(sb.shard, &u.state.id))
            {
                let mut cmd = redis::cmd("SET");
                cmd.arg(keys::locator(&u.state.id))
                    .arg(sb.shard.to_string());
                cmds.push(cmd);
            }
        }
        if cmds.is_empty() {
            return Ok(());
        }
        match &self.conn {
            Conn::Single(_) => {
                let mut pipe = redis::pipe();
                for cmd in cmds {
                    pipe.add_command(cmd).ignore();
                }
                self.conn.query::<()>(&pipe).await?;
            }
            Conn::Cluster(_) => {
                try_join_all(cmds.iter().map(|cmd| self.conn.cmd::<()>(cmd))).await?;
            }
        }
        Ok(())
    }

    /// Registers shards that gained a vehicle, so a node taking over finds
    /// them. Only relocations can add a shard, and they are rare.
    async fn register_shards(&self, batch: &Batch) -> Result<(), StoreError> {
        let gained: Vec<String> = batch
            .shards
            .iter()
            .filter(|sb| sb.upserts.iter().any(|u| u.relocated))
            .map(|sb| sb.shard.to_string())
            .collect();
        if gained.is_empty() {
            return Ok(());
        }
        self.conn
            .cmd::<()>(redis::cmd("SADD").arg(keys::SHARDS).arg(&gained))
            .await?;
        Ok(())
    }

    async fn states(
        &self,
        shard: ShardId,
        ids: &[String],
    ) -> Result<Vec<Option<VehicleState>>, StoreError> {
        let raw: Vec<Option<Vec<u8>>> = self
            .conn
            .cmd(redis::cmd("HMGET").arg(keys::state(shard)).arg(ids))
            .await?;
        raw.into_iter()
            .zip(ids)
            .map(|(bytes, id)| bytes.map(|b| decode(id, &b)).transpose())
            .collect()
    }
}

/// Removes vehicles (one id, or many) from every key of a shard: the geo
/// index, the last-seen set and the state hash, one command each.
fn remove_from_shard<Ids: ToRedisArgs + Copy>(pipe: &mut Pipeline, shard: ShardId, ids: Ids) {
    pipe.cmd("ZREM").arg(keys::geo(shard)).arg(ids);
    pipe.cmd("ZREM").arg(keys::seen(shard)).arg(ids);
    pipe.cmd("HDEL").arg(keys::state(shard)).arg(ids);
}

/// What a command's error reply means for the change that sent it.
enum Verdict {
    /// Redis will not take this value (`ERR`, `WRONGTYPE`): drop the change.
    Refused(ServerError),
    /// Redis cannot take anything right now (`LOADING`, `OOM`, `READONLY`,
    /// `NOREPLICAS`, `MASTERDOWN`, `TRYAGAIN`, …): retry it later.
    Retry(ServerError),
}

/// The most serious error among some replies: anything to retry outweighs
/// a refusal.
fn worst(replies: &[Value]) -> Option<Verdict> {
    let mut verdict = None;
    for reply in replies {
        if let Value::ServerError(e) = reply {
            if matches!(e.code(), "ERR" | "WRONGTYPE") {
                verdict.get_or_insert(Verdict::Refused(e.clone()));
            } else {
                return Some(Verdict::Retry(e.clone()));
            }
        }
    }
    verdict
}

fn decode(id: &str, bytes: &[u8]) -> Result<VehicleState, StoreError> {
    rmp_serde::from_slice(bytes).map_err(|source| StoreError::Corrupt {
        id: id.to_string(),
        source,
    })
}

#[async_trait]
impl Store for RedisStore {
    fn kind(&self) -> &'static str {
        match self.conn {
            Conn::Single(_) => "redis",
            Conn::Cluster(_) => "redis-cluster",
        }
    }

    async fn apply(&self, batch: &Batch) -> Result<Vec<Refused>, StoreError> {
        let refused: Vec<Refused> =
            try_join_all(batch.shards.iter().map(|sb| self.write_shard(sb)))
                .await?
                .into_iter()
                .flatten()
                .collect();
        self.write_locators(batch, &refused).await?;
        self.register_shards(batch).await?;
        Ok(refused)
    }

    async fn vehicle(&self, id: &VehicleId) -> Result<Option<VehicleState>, StoreError> {
        let shard: Option<String> = self
            .conn
            .cmd(redis::cmd("GET").arg(keys::locator(id)))
            .await?;
        let Some(shard) = shard.and_then(|s| s.parse::<ShardId>().ok()) else {
            return Ok(None);
        };
        let ids = [id.to_string()];
        Ok(self.states(shard, &ids).await?.into_iter().flatten().next())
    }

    async fn nearby(&self, query: &NearbyQuery) -> Result<Vec<Nearby>, StoreError> {
        let searches = query.shards.iter().map(|&shard| async move {
            let mut cmd = redis::cmd("GEOSEARCH");
            cmd.arg(keys::geo(shard))
                .arg("FROMLONLAT")
                .arg(query.center.lon())
                .arg(query.center.lat())
                .arg("BYRADIUS")
                .arg(query.radius_m)
                .arg("m")
                .arg("ASC")
                .arg("COUNT")
                .arg(query.limit)
                .arg("WITHDIST");
            let hits: Vec<(String, f64)> = self.conn.cmd(&cmd).await?;
            Ok::<_, StoreError>(hits.into_iter().map(move |(id, d)| (shard, id, d)))
        });
        let mut hits: Vec<(ShardId, String, f64)> = try_join_all(searches)
            .await?
            .into_iter()
            .flatten()
            .collect();
        hits.sort_by(|a, b| a.2.total_cmp(&b.2));
        hits.truncate(query.limit);

        let mut by_shard: HashMap<ShardId, (Vec<String>, Vec<f64>)> = HashMap::new();
        for (shard, id, distance) in hits {
            let (ids, distances) = by_shard.entry(shard).or_default();
            ids.push(id);
            distances.push(distance);
        }
        let fetches = by_shard
            .iter()
            .map(|(&shard, (ids, distances))| async move {
                let states = self.states(shard, ids).await?;
                Ok::<_, StoreError>(
                    states
                        .into_iter()
                        .zip(distances.iter())
                        // A vehicle removed between the two reads is skipped.
                        .filter_map(|(state, &distance_m)| {
                            state.map(|state| Nearby { state, distance_m })
                        })
                        .collect::<Vec<_>>(),
                )
            });
        let found = try_join_all(fetches).await?.into_iter().flatten().collect();
        Ok(nearest_first(found, query.limit))
    }

    async fn load_all(&self) -> Result<Vec<VehicleState>, StoreError> {
        let shards: Vec<String> = self
            .conn
            .cmd(redis::cmd("SMEMBERS").arg(keys::SHARDS))
            .await?;
        let loads =
            shards
                .iter()
                .filter_map(|s| s.parse::<ShardId>().ok())
                .map(|shard| async move {
                    let raw: HashMap<String, Vec<u8>> = self
                        .conn
                        .cmd(redis::cmd("HGETALL").arg(keys::state(shard)))
                        .await?;
                    raw.iter()
                        .map(|(id, b)| decode(id, b))
                        .collect::<Result<Vec<_>, _>>()
                });
        Ok(try_join_all(loads).await?.into_iter().flatten().collect())
    }

    async fn ping(&self) -> Result<(), StoreError> {
        self.conn.cmd::<String>(&redis::cmd("PING")).await?;
        Ok(())
    }
}
