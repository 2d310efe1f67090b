//! The Redis store, on one Redis server or a Redis Cluster.
//!
//! A flush is one script call per shard ([`WRITE_SHARD`]): the `ZREM`/`HDEL`s
//! of the removals, then one variadic `GEOADD` and `HSET` (state) carrying
//! every upsert and a `ZADD` (last seen) for those due one, and, in a cluster, the batch published on
//! the shard's bus channel with the next sequence number. The shards' calls
//! are sent concurrently on one multiplexed connection. All keys (and the
//! channel) of a call share the shard's hash tag, so on a cluster each call
//! goes to one slot.
//!
//! In a cluster the script first checks the shard's lease: a node that lost
//! it (paused past its TTL, partitioned) writes nothing, and learns so
//! (fencing).
//!
//! A command Redis refuses for its content costs only the vehicles it
//! carried that Redis refuses: the shard is then rewritten one vehicle at a
//! time to find them (see [`RedisStore::write_shard`]). Errors that say Redis
//! cannot write at all are returned, and the writer retries.

use std::{
    collections::{HashMap, HashSet},
    sync::{Arc, LazyLock},
    time::Duration,
};

use async_trait::async_trait;
use futures_util::future::{join_all, try_join_all};
use hexfleet_model::{ShardId, VehicleId, VehicleState, ZoneId};
use hexfleet_protocol::{
    bus::{ShardChanges, ShardRemoval},
    zone::ZoneEvent,
};
use redis::{
    aio::ConnectionManager, cluster_async::ClusterConnection, FromRedisValue, Pipeline, Script,
    ScriptInvocation, ToRedisArgs, Value,
};

use super::{
    each_vehicle_once, keys, nearest_first, parse_tombstone, tombstone_value, Applied, Batch,
    Nearby, NearbyQuery, Refused, Removal, ShardBatch, Store, StoreError, Upsert, ZoneChanges,
};

/// Writes one shard's changes, fenced by its lease, and publishes them.
///
/// KEYS: lease, geo, seen, state, bus seq, zone event outbox, ids of the
/// zone events written. ARGV: the
/// lease value the writer holds (empty: not fenced), the publish command
/// (`SPUBLISH`, `PUBLISH` or empty), the channel, the bus body; then four
/// lists, each a count and its items laid out as the command takes them, so
/// each command is `unpack(ARGV, from, to)` with no per-vehicle work in Lua:
/// the removed ids; the upserts (lon, lat, id triples for `GEOADD`, then id,
/// state pairs for `HSET`); the last-seen entries (ms, id pairs for `ZADD`);
/// the zone events (seven field, value pairs each for `XADD`, the event's
/// id first and its time sixth), which land with the states that record
/// them or not at all, and once: an event whose id was written in the last
/// hour (a retry of a write whose reply was lost) is skipped.
///
/// Returns `{seq, replies}`: the bus sequence number given (0: none) and,
/// per command, 1 or its error as `!<error>` (`pcall`; an error nested in a
/// reply would fail the whole call), so a refusal costs only what it
/// carried. Commands carry at most 1,000 vehicles each, well within Lua's
/// limit on arguments.
pub const WRITE_SHARD: &str = r#"
if ARGV[1] ~= '' then
  local held = redis.call('GET', KEYS[1])
  if held ~= ARGV[1] then
    return redis.error_reply('FENCED the lease is now ' .. tostring(held))
  end
end
-- A script is not undone when a command in it fails, and a server out of
-- memory still takes removals: a command that needs memory and changes
-- nothing goes first, so such a server refuses the whole write (OOM)
-- before any of it lands, events apart from their states.
redis.call('INCRBY', KEYS[5], 0)
local out = {}
local function run(cmd, key, first, n, stride)
  for done = 0, n - 1, 1000 do
    local from = first + done * stride
    local to = first + math.min(n, done + 1000) * stride - 1
    local reply = redis.pcall(cmd, key, unpack(ARGV, from, to))
    if type(reply) == 'table' and reply.err then
      out[#out + 1] = '!' .. reply.err
    else
      out[#out + 1] = 1
    end
  end
end
local nrem = tonumber(ARGV[5])
if nrem > 0 then
  run('ZREM', KEYS[2], 6, nrem, 1)
  run('ZREM', KEYS[3], 6, nrem, 1)
  run('HDEL', KEYS[4], 6, nrem, 1)
end
local at = 6 + nrem
local nup = tonumber(ARGV[at])
if nup > 0 then
  run('GEOADD', KEYS[2], at + 1, nup, 3)
  run('HSET', KEYS[4], at + 1 + 3 * nup, nup, 2)
end
at = at + 1 + 5 * nup
local nseen = tonumber(ARGV[at])
if nseen > 0 then
  run('ZADD', KEYS[3], at + 1, nseen, 2)
end
at = at + 1 + 2 * nseen
local nev = tonumber(ARGV[at])
local newest = nil
for k = 0, nev - 1 do
  local from = at + 1 + k * 14
  local at_ms = tonumber(ARGV[from + 11])
  if redis.call('ZADD', KEYS[7], 'NX', at_ms, ARGV[from + 1]) == 1 then
    redis.call('XADD', KEYS[6], 'MAXLEN', '~', 100000, '*', unpack(ARGV, from, from + 13))
  end
  newest = math.max(newest or at_ms, at_ms)
end
if newest then
  redis.call('ZREMRANGEBYSCORE', KEYS[7], '-inf', newest - 3600000)
end
local seq = 0
if ARGV[2] ~= '' then
  seq = redis.call('INCR', KEYS[5])
  redis.call(ARGV[2], ARGV[3], seq .. ' ' .. ARGV[4])
end
return {seq, out}
"#;

/// A shard's states and the bus sequence they reflect, read at one instant.
/// KEYS: state, bus seq.
const SNAPSHOT_SHARD: &str = r#"
return {tonumber(redis.call('GET', KEYS[2]) or '0'), redis.call('HGETALL', KEYS[1])}
"#;

/// Moves a shard's outbox entries to the zone event stream, skipping those
/// already moved: the relay may run twice (a retry, two nodes while a shard
/// changes hands), the stream gets each entry once.
///
/// KEYS: the event stream, the relayed marks. ARGV: the shard, the stream's
/// length bound, the entry count, then per entry its outbox id and
/// fourteen field/value strings. Returns the outbox ids moved.
const RELAY_EVENTS: &str = r#"
local function after(a, b)
  local a1, a2 = string.match(a, '(%d+)-(%d+)')
  local b1, b2 = string.match(b, '(%d+)-(%d+)')
  a1, a2, b1, b2 = tonumber(a1), tonumber(a2), tonumber(b1), tonumber(b2)
  return a1 > b1 or (a1 == b1 and a2 > b2)
end
local last = redis.call('HGET', KEYS[2], ARGV[1]) or '0-0'
local moved = {}
local n = tonumber(ARGV[3])
for k = 0, n - 1 do
  local at = 4 + k * 15
  local id = ARGV[at]
  if after(id, last) then
    redis.call('XADD', KEYS[1], 'MAXLEN', '~', ARGV[2], '*', unpack(ARGV, at + 1, at + 14))
    last = id
    moved[#moved + 1] = id
  end
end
redis.call('HSET', KEYS[2], ARGV[1], last)
return moved
"#;

/// Creates or replaces a zone, unless there would be too many.
/// KEYS: defs, versions, version counter. ARGV: id, Feature, max zones.
/// Returns the new version, or -1.
const PUT_ZONE: &str = r#"
if redis.call('HEXISTS', KEYS[1], ARGV[1]) == 0 and redis.call('HLEN', KEYS[1]) >= tonumber(ARGV[3]) then
  return -1
end
local v = redis.call('INCR', KEYS[3])
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
redis.call('ZADD', KEYS[2], v, ARGV[1])
return v
"#;

/// Deletes a zone (its version stays, without a Feature: a tombstone).
/// KEYS as [`PUT_ZONE`]. ARGV: id. Returns the new version, or 0.
/// Deletes a vehicle's locator (`KEYS[1]`) if it still names shard
/// `ARGV[1]`.
const FORGET_LOCATOR: &str = r#"
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
"#;

const DELETE_ZONE: &str = r#"
if redis.call('HDEL', KEYS[1], ARGV[1]) == 0 then
  return 0
end
local v = redis.call('INCR', KEYS[3])
redis.call('ZADD', KEYS[2], v, ARGV[1])
return v
"#;

/// Up to 500 zones changed since a version, oldest change first, with their
/// Features (false: deleted). KEYS: defs, versions. ARGV: the version.
const ZONE_CHANGES: &str = r#"
local page = redis.call('ZRANGEBYSCORE', KEYS[2], '(' .. ARGV[1], '+inf', 'WITHSCORES', 'LIMIT', 0, 500)
local out = {}
for i = 1, #page, 2 do
  out[#out + 1] = page[i]
  out[#out + 1] = page[i + 1]
  out[#out + 1] = redis.call('HGET', KEYS[1], page[i]) or ''
end
return out
"#;

static RELAY_SCRIPT: LazyLock<Script> = LazyLock::new(|| Script::new(RELAY_EVENTS));
static PUT_ZONE_SCRIPT: LazyLock<Script> = LazyLock::new(|| Script::new(PUT_ZONE));
static DELETE_ZONE_SCRIPT: LazyLock<Script> = LazyLock::new(|| Script::new(DELETE_ZONE));
static ZONE_CHANGES_SCRIPT: LazyLock<Script> = LazyLock::new(|| Script::new(ZONE_CHANGES));

static WRITE_SCRIPT: LazyLock<Script> = LazyLock::new(|| Script::new(WRITE_SHARD));
static SNAPSHOT_SCRIPT: LazyLock<Script> = LazyLock::new(|| Script::new(SNAPSHOT_SHARD));

/// A connection to one Redis server or a Redis Cluster, shared by the store
/// and the cluster's membership and leases.
#[derive(Clone)]
pub enum Conn {
    Single(ConnectionManager),
    Cluster(Arc<HealingCluster>),
}

/// A Redis Cluster connection made again when it stops answering. After a
/// planned `CLUSTER FAILOVER` the client's slot refresh can wedge, every
/// command then timing out while the cluster itself is fine (seen here in
/// about one run in four of `a_manual_redis_cluster_failover_…`): a few
/// timeouts in a row and a new connection replaces it.
pub struct HealingCluster {
    client: redis::cluster::ClusterClient,
    conn: parking_lot::RwLock<ClusterConnection>,
    /// Bumped each time the connection is made again: commands waiting on
    /// the old one fail at once rather than wait out their timeout (a
    /// renewal stuck there for 5 s let the node's membership lapse).
    remade: tokio::sync::watch::Sender<u64>,
    timeouts_in_a_row: std::sync::atomic::AtomicU32,
    remaking: std::sync::atomic::AtomicBool,
}

/// Timeouts in a row after which a cluster connection is made again.
const WEDGED_AFTER: u32 = 3;
/// How often a cluster connection is pinged, and how long the answer may
/// take: a wedged client is noticed within a few of these.
const PROBE_EVERY: Duration = Duration::from_millis(250);
/// Probes unanswered in a row after which it is made again.
const PROBES_MISSED: u32 = 2;

impl HealingCluster {
    fn current(&self) -> ClusterConnection {
        self.conn.read().clone()
    }

    /// Runs `op` on the current connection. If the connection is made
    /// again meanwhile, the command fails at once (`ConnectionAborted`, not
    /// counted as a timeout): the caller tries again on the new one, as
    /// after any failure. Its effect may still land, as after a timeout.
    async fn run<T, F, Fut>(self: &Arc<Self>, op: F) -> redis::RedisResult<T>
    where
        F: FnOnce(ClusterConnection) -> Fut,
        Fut: std::future::Future<Output = redis::RedisResult<T>>,
    {
        let mut remade = self.remade.subscribe();
        let result = tokio::select! {
            result = op(self.current()) => result,
            _ = remade.changed() => Err(std::io::Error::new(
                std::io::ErrorKind::ConnectionAborted,
                "the Redis Cluster connection was made again while this command waited",
            )
            .into()),
        };
        self.observe(&result);
        result
    }

    /// Counts timeouts in a row; past [`WEDGED_AFTER`], makes the
    /// connection again (once at a time, in the background).
    fn observe<T>(self: &Arc<Self>, result: &redis::RedisResult<T>) {
        use std::sync::atomic::Ordering::Relaxed;
        match result {
            Err(e) if e.is_timeout() => {
                let n = self.timeouts_in_a_row.fetch_add(1, Relaxed) + 1;
                if n >= WEDGED_AFTER {
                    self.start_remaking();
                }
            }
            Ok(_) => self.timeouts_in_a_row.store(0, Relaxed),
            Err(_) => {}
        }
    }

    /// Pings the connection every [`PROBE_EVERY`] while the store lives;
    /// [`PROBES_MISSED`] unanswered in a row make it again. The redis-rs
    /// cluster client can wedge in a slot refresh that never ends (seen
    /// here after `CLUSTER FAILOVER` and while slots move): every command
    /// then waits out its response timeout, for good. Commands alone would
    /// notice after [`WEDGED_AFTER`] of those (about 5 s, long enough for a
    /// node to be taken for cut off); the probe notices in well under a
    /// second. A store that is down for everyone fails the probe too: the
    /// connection is then made again in the background until it answers,
    /// which costs nothing while it is down.
    async fn probe(this: std::sync::Weak<Self>) {
        let mut tick = tokio::time::interval(PROBE_EVERY);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut missed = 0;
        loop {
            tick.tick().await;
            let Some(healing) = this.upgrade() else {
                return;
            };
            let ping = redis::cmd("PING");
            let mut conn = healing.current();
            let answered =
                tokio::time::timeout(PROBE_EVERY, ping.query_async::<()>(&mut conn)).await;
            missed = match answered {
                Err(_) => missed + 1,
                Ok(_) => 0,
            };
            if missed >= PROBES_MISSED && healing.start_remaking() {
                tracing::debug!(missed, "the Redis Cluster connection does not answer pings");
                missed = 0;
            }
        }
    }

    /// Makes the connection again in the background, unless that is under
    /// way already; whether it started now.
    fn start_remaking(self: &Arc<Self>) -> bool {
        use std::sync::atomic::Ordering::Relaxed;
        if self.remaking.swap(true, Relaxed) {
            return false;
        }
        tokio::spawn(self.clone().remake());
        true
    }

    async fn remake(self: Arc<Self>) {
        use std::sync::atomic::Ordering::Relaxed;
        let made = tokio::time::timeout(RESPONSE_TIMEOUT, self.client.get_async_connection()).await;
        match made {
            Ok(Ok(conn)) => {
                *self.conn.write() = conn;
                self.timeouts_in_a_row.store(0, Relaxed);
                self.remade.send_modify(|made| *made += 1);
                tracing::warn!("the Redis Cluster connection stopped answering; made it again");
            }
            Ok(Err(e)) => {
                tracing::warn!(error = %e, "making the Redis Cluster connection again; trying later")
            }
            Err(_) => {
                tracing::warn!("making the Redis Cluster connection again timed out; trying later")
            }
        }
        self.remaking.store(false, Relaxed);
    }
}

impl Conn {
    /// Runs a script (EVALSHA, loading it where it is missing).
    pub async fn invoke<T: FromRedisValue>(
        &self,
        invocation: &ScriptInvocation<'_>,
    ) -> redis::RedisResult<T> {
        match self {
            Conn::Single(c) => invocation.invoke_async(&mut c.clone()).await,
            Conn::Cluster(h) => {
                h.run(|mut c| async move { invocation.invoke_async(&mut c).await })
                    .await
            }
        }
    }

    pub fn is_cluster(&self) -> bool {
        matches!(self, Conn::Cluster(_))
    }

    pub async fn query<T: FromRedisValue>(&self, pipe: &Pipeline) -> redis::RedisResult<T> {
        match self {
            Conn::Single(c) => pipe.query_async(&mut c.clone()).await,
            Conn::Cluster(h) => {
                h.run(|mut c| async move { pipe.query_async(&mut c).await })
                    .await
            }
        }
    }

    pub async fn cmd<T: FromRedisValue>(&self, cmd: &redis::Cmd) -> redis::RedisResult<T> {
        match self {
            Conn::Single(c) => cmd.query_async(&mut c.clone()).await,
            Conn::Cluster(h) => {
                h.run(|mut c| async move { cmd.query_async(&mut c).await })
                    .await
            }
        }
    }
}

pub struct RedisStore {
    conn: Conn,
}

/// How long connecting to Redis may take before the attempt fails.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(1);
/// How long a Redis command may take before it fails: far above any
/// command's time (a flush is a few milliseconds), far below a stall.
const RESPONSE_TIMEOUT: Duration = Duration::from_secs(5);

impl RedisStore {
    /// Connects to one Redis server. The connection reconnects by itself
    /// after a failure; commands sent meanwhile fail and are retried by the
    /// writer.
    ///
    /// The connection is made on first use and remade whenever it breaks,
    /// so a node starts, and keeps serving from memory, while Redis is
    /// down. A command gets its answer within [`RESPONSE_TIMEOUT`] or fails,
    /// so a Redis that hangs (paused, swapping) stalls nothing for long.
    pub async fn connect(url: &str) -> Result<Self, StoreError> {
        let client = redis::Client::open(url)?;
        // One quick attempt per reconnection: the callers (the writer, the
        // cluster's renewals) retry on their own schedules, and a command
        // must fail fast while Redis is down rather than wait out a
        // reconnection backoff.
        let config = redis::aio::ConnectionManagerConfig::new()
            .set_connection_timeout(Some(CONNECT_TIMEOUT))
            .set_response_timeout(Some(RESPONSE_TIMEOUT))
            .set_number_of_retries(1)
            .set_max_delay(Duration::from_millis(100));
        let conn = redis::aio::ConnectionManager::new_lazy_with_config(client, config)?;
        Ok(Self::with(Conn::Single(conn)))
    }

    /// Connects to a Redis Cluster through any of its nodes. It must answer
    /// once, to tell its slots; the node waits for that, retrying.
    pub async fn connect_cluster(seeds: &[String]) -> Result<Self, StoreError> {
        let client = redis::cluster::ClusterClient::builder(seeds.to_vec())
            .connection_timeout(CONNECT_TIMEOUT)
            .response_timeout(RESPONSE_TIMEOUT)
            .retries(2)
            .max_retry_wait(200)
            .build()?;
        let conn = client.get_async_connection().await?;
        let healing = Arc::new(HealingCluster {
            client,
            conn: parking_lot::RwLock::new(conn),
            remade: tokio::sync::watch::Sender::new(0),
            timeouts_in_a_row: Default::default(),
            remaking: Default::default(),
        });
        tokio::spawn(HealingCluster::probe(Arc::downgrade(&healing)));
        Ok(Self::with(Conn::Cluster(healing)))
    }

    fn with(conn: Conn) -> Self {
        Self { conn }
    }

    /// The connection, for the cluster's membership and leases.
    pub fn conn(&self) -> &Conn {
        &self.conn
    }

    /// `GET` of each key, in order: one `MGET` on one server; on a cluster,
    /// where each key may be in a slot of its own, one `GET` each.
    async fn get_each<T: FromRedisValue>(&self, keys: &[String]) -> Result<Vec<T>, StoreError> {
        if keys.is_empty() {
            return Ok(Vec::new());
        }
        Ok(match &self.conn {
            Conn::Single(_) => self.conn.cmd(redis::cmd("MGET").arg(keys)).await?,
            Conn::Cluster(_) => {
                let gets: Vec<redis::Cmd> = keys
                    .iter()
                    .map(|k| {
                        let mut get = redis::cmd("GET");
                        get.arg(k);
                        get
                    })
                    .collect();
                try_join_all(gets.iter().map(|get| self.conn.cmd(get))).await?
            }
        })
    }

    /// The command that publishes on a shard's channel: sharded pub/sub on
    /// a cluster, so the message travels only within the shard's slot; on
    /// one server, plain pub/sub does the same job.
    fn publish_command(&self) -> &'static str {
        if self.conn.is_cluster() {
            "SPUBLISH"
        } else {
            "PUBLISH"
        }
    }

    /// One call of [`WRITE_SHARD`] for some of a shard's changes.
    fn write_call<'a>(
        sb: &ShardBatch,
        publish: Option<(&str, &[u8])>,
        removals: impl ExactSizeIterator<Item = &'a VehicleId>,
        upserts: &[&Upsert],
        events: &[ZoneEvent],
    ) -> Result<ScriptInvocation<'static>, StoreError> {
        let mut call = WRITE_SCRIPT.prepare_invoke();
        call.key(keys::lease(sb.shard))
            .key(keys::geo(sb.shard))
            .key(keys::seen(sb.shard))
            .key(keys::state(sb.shard))
            .key(keys::bus_seq(sb.shard))
            .key(keys::outbox(sb.shard))
            .key(keys::event_ids(sb.shard));
        let (command, body) = publish.unwrap_or(("", b""));
        call.arg(sb.fence.as_deref().unwrap_or(""))
            .arg(command)
            .arg(keys::bus_channel(sb.shard))
            .arg(body);
        call.arg(removals.len());
        for id in removals {
            call.arg(id.as_str());
        }
        call.arg(upserts.len());
        for u in upserts {
            call.arg(u.state.lon)
                .arg(u.state.lat)
                .arg(u.state.id.as_str());
        }
        for u in upserts {
            call.arg(u.state.id.as_str())
                .arg(rmp_serde::to_vec(&u.state)?);
        }
        call.arg(upserts.iter().filter(|u| u.seen).count());
        for u in upserts.iter().filter(|u| u.seen) {
            call.arg(u.state.seen_ms).arg(u.state.id.as_str());
        }
        call.arg(events.len());
        for event in events {
            for (field, value) in event.fields() {
                call.arg(field).arg(value);
            }
        }
        Ok(call)
    }

    /// What [`WRITE_SHARD`] does for an unfenced shard without a bus, as
    /// plain commands; every reply comes back, errors included. Public for
    /// the benchmarks.
    pub fn write_pipeline(sb: &ShardBatch, upserts: &[&Upsert]) -> Result<Pipeline, StoreError> {
        const CHUNK: usize = 1000;
        let mut pipe = redis::pipe();
        pipe.ignore_errors();
        for chunk in sb.removals.chunks(CHUNK) {
            let ids: Vec<&str> = chunk.iter().map(|r| r.id.as_str()).collect();
            remove_from_shard(&mut pipe, sb.shard, &ids[..]);
        }
        for chunk in upserts.chunks(CHUNK) {
            let geo = pipe.cmd("GEOADD").arg(keys::geo(sb.shard));
            for u in chunk {
                geo.arg(u.state.lon)
                    .arg(u.state.lat)
                    .arg(u.state.id.as_str());
            }
            let state = pipe.cmd("HSET").arg(keys::state(sb.shard));
            for u in chunk {
                state
                    .arg(u.state.id.as_str())
                    .arg(rmp_serde::to_vec(&u.state)?);
            }
        }
        let seen: Vec<&&Upsert> = upserts.iter().filter(|u| u.seen).collect();
        for chunk in seen.chunks(CHUNK) {
            let zadd = pipe.cmd("ZADD").arg(keys::seen(sb.shard));
            for u in chunk {
                zadd.arg(u.state.seen_ms).arg(u.state.id.as_str());
            }
        }
        Ok(pipe)
    }

    /// The bus batch of a shard's changes.
    fn bus_body(sb: &ShardBatch) -> Result<Vec<u8>, StoreError> {
        let changes = ShardChanges {
            upserts: sb.upserts.iter().map(|u| u.state.clone()).collect(),
            removals: sb
                .removals
                .iter()
                .map(|r| ShardRemoval {
                    id: r.id.clone(),
                    gone: r.gone,
                })
                .collect(),
        };
        Ok(changes.encode()?)
    }

    /// Writes one shard's changes. When Redis refuses a command for its
    /// content (a position it cannot index, a key of the wrong type), the
    /// shard is written again one vehicle at a time to find who it refuses.
    async fn write_shard(&self, sb: &ShardBatch) -> Result<ShardWrite, StoreError> {
        let body = if sb.publish {
            Self::bus_body(sb)?
        } else {
            Vec::new()
        };
        let publish = sb
            .publish
            .then_some((self.publish_command(), body.as_slice()));
        let upserts: Vec<&Upsert> = sb.upserts.iter().collect();
        let replies = if sb.fence.is_none() && publish.is_none() && sb.events.is_empty() {
            // Nothing to check first and nothing to publish: plain commands
            // in one pipeline, without the script's cost per call (most of
            // Redis's time when batches are small).
            let pipe = Self::write_pipeline(sb, &upserts)?;
            self.conn.query::<Vec<Value>>(&pipe).await?
        } else {
            let removals = sb.removals.iter().map(|r| &r.id);
            let call = Self::write_call(sb, publish, removals, &upserts, &sb.events)?;
            match self.conn.invoke::<(u64, Vec<Value>)>(&call).await {
                Ok((_seq, replies)) => replies,
                Err(e) if e.code() == Some("FENCED") => return Ok(ShardWrite::Fenced),
                Err(e) if e.code() == Some("OOM") => {
                    if let Some((command, body)) = publish {
                        self.preview(command, sb.shard, body).await;
                    }
                    return Err(e.into());
                }
                Err(e) => return Err(e.into()),
            }
        };
        match worst(&replies) {
            None => Ok(ShardWrite::Written(Vec::new())),
            Some(Verdict::Retry(e)) => Err(StoreError::Unwritable(e)),
            Some(Verdict::Refused(_)) => self.write_shard_one_by_one(sb).await,
        }
    }

    /// Publishes a shard's batch that Redis refused to write for want of
    /// memory (`maxmemory` reached under `noeviction`: it still answers
    /// reads, publishes, and takes commands that free memory), under
    /// sequence 0: replicas show it at once without taking it for written
    /// (see `cluster::replicas`), so riders elsewhere see the shard move
    /// while the writer retries. Only the lease holder gets this far: the
    /// script checked the lease before any write failed.
    async fn preview(&self, command: &str, shard: ShardId, body: &[u8]) {
        let mut message = b"0 ".to_vec();
        message.extend_from_slice(body);
        let published = self
            .conn
            .cmd::<i64>(
                redis::cmd(command)
                    .arg(keys::bus_channel(shard))
                    .arg(message),
            )
            .await;
        if let Err(e) = published {
            tracing::debug!(%shard, error = %e, "publishing an unwritten batch");
        }
    }

    /// Each vehicle's change in a call of its own; the vehicles Redis
    /// refuses are reported, and whatever of theirs did land is removed, so
    /// no vehicle is left half-written.
    async fn write_shard_one_by_one(&self, sb: &ShardBatch) -> Result<ShardWrite, StoreError> {
        // The events first, on their own: they are never what Redis refuses.
        if !sb.events.is_empty() {
            let call = Self::write_call(sb, None, std::iter::empty(), &[], &sb.events)?;
            match self.conn.invoke::<(u64, Vec<Value>)>(&call).await {
                Ok(_) => {}
                Err(e) if e.code() == Some("FENCED") => return Ok(ShardWrite::Fenced),
                Err(e) => return Err(e.into()),
            }
        }
        let mut calls = Vec::new();
        for r in &sb.removals {
            let call = Self::write_call(sb, None, std::iter::once(&r.id), &[], &[])?;
            calls.push(call);
        }
        for u in &sb.upserts {
            let call = Self::write_call(sb, None, std::iter::empty(), &[u], &[])?;
            calls.push(call);
        }
        let results = futures_util::future::join_all(
            calls
                .iter()
                .map(|call| self.conn.invoke::<(u64, Vec<Value>)>(call)),
        )
        .await;
        let changes = sb
            .removals
            .iter()
            .map(|r| (&r.id, false))
            .chain(sb.upserts.iter().map(|u| (&u.state.id, u.relocated)));
        let mut refused = Vec::new();
        for ((id, relocated), result) in changes.zip(results) {
            let replies: Vec<Value> = match result {
                Ok((_, replies)) => replies,
                Err(e) if e.code() == Some("FENCED") => return Ok(ShardWrite::Fenced),
                Err(e) => return Err(e.into()),
            };
            match worst(&replies) {
                None => {}
                Some(Verdict::Retry(e)) => return Err(StoreError::Unwritable(e)),
                Some(Verdict::Refused(e)) => refused.push(Refused {
                    shard: sb.shard,
                    id: id.clone(),
                    relocated,
                    reason: e,
                }),
            }
        }
        if !refused.is_empty() {
            let ids: Vec<&str> = refused.iter().map(|r| r.id.as_str()).collect();
            let mut undo = redis::pipe();
            remove_from_shard(&mut undo, sb.shard, ids.as_slice());
            self.conn.query::<()>(&undo).await?;
        }
        Ok(ShardWrite::Written(refused))
    }

    /// Moves up to [`RELAY_BATCH`] entries of a shard's outbox to the event
    /// stream; returns how many it read and the events it moved.
    async fn relay_page(&self, shard: ShardId) -> Result<(usize, Vec<ZoneEvent>), StoreError> {
        let raw: Value = self
            .conn
            .cmd(
                redis::cmd("XRANGE")
                    .arg(keys::outbox(shard))
                    .arg("-")
                    .arg("+")
                    .arg("COUNT")
                    .arg(RELAY_BATCH),
            )
            .await?;
        let entries = stream_entries(raw);
        if entries.is_empty() {
            return Ok((0, Vec::new()));
        }
        let mut call = RELAY_SCRIPT.prepare_invoke();
        call.key(keys::ZONE_EVENTS)
            .key(keys::ZONE_RELAYED)
            .arg(shard.to_string())
            .arg(super::ZONE_STREAM_LEN)
            .arg(entries.len());
        for (id, fields) in &entries {
            call.arg(id.as_str());
            // The pairs as written; an entry with others is not ours.
            for k in 0..ZoneEvent::FIELDS {
                match fields.get(k) {
                    Some((name, value)) => call.arg(name.as_str()).arg(value.as_slice()),
                    None => call.arg("").arg(""),
                };
            }
        }
        let moved: Vec<String> = self.conn.invoke(&call).await?;
        let ids: Vec<&str> = entries.iter().map(|(id, _)| id.as_str()).collect();
        self.conn
            .cmd::<()>(redis::cmd("XDEL").arg(keys::outbox(shard)).arg(&ids))
            .await?;
        let moved: HashSet<String> = moved.into_iter().collect();
        let events = entries
            .iter()
            .filter(|(id, _)| moved.contains(id))
            .filter_map(|(id, fields)| {
                ZoneEvent::from_fields(fields.iter().map(|(k, v)| (k.as_str(), v.as_slice())))
                    .inspect_err(|e| tracing::warn!(%shard, id, error = %e, "an outbox entry does not decode"))
                    .ok()
            })
            .collect();
        Ok((entries.len(), events))
    }

    /// Locators live in their own slots: on a cluster each is its own
    /// command; on one server they share a pipeline. They change only when a
    /// vehicle appears, crosses a shard or is forgotten.
    async fn write_locators(&self, batch: &Batch, applied: &Applied) -> Result<(), StoreError> {
        let refused = &applied.refused;
        let mut cmds = Vec::new();
        let written = |sb: &&ShardBatch| applied.written(sb.shard);
        for sb in batch.shards.iter().filter(written) {
            for r in sb.removals.iter().filter(|r| r.forget()) {
                // Only a locator still naming this shard: the vehicle may
                // have been written elsewhere since (a driver that arrived
                // at another node as its copy here was let go).
                let mut cmd = redis::cmd("EVAL");
                cmd.arg(FORGET_LOCATOR)
                    .arg(1)
                    .arg(keys::locator(&r.id))
                    .arg(sb.shard.to_string());
                cmds.push(cmd);
            }
        }
        let was_refused = |shard: ShardId, id: &VehicleId| {
            refused.iter().any(|r| r.shard == shard && &r.id == id)
        };
        for sb in batch.shards.iter().filter(written) {
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
    async fn register_shards(&self, batch: &Batch, applied: &Applied) -> Result<(), StoreError> {
        let gained: Vec<String> = batch
            .shards
            .iter()
            .filter(|sb| applied.written(sb.shard) && sb.upserts.iter().any(|u| u.relocated))
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

/// How one shard's write went.
enum ShardWrite {
    /// Written, but for the changes refused for their content.
    Written(Vec<Refused>),
    /// Not written: the shard's lease is no longer the one given.
    Fenced,
}

/// What a command's error reply means for the change that sent it.
enum Verdict {
    /// Redis will not take this value (`ERR`, `WRONGTYPE`): drop the change.
    Refused(String),
    /// Redis cannot take anything right now (`LOADING`, `OOM`, `READONLY`,
    /// `NOREPLICAS`, `MASTERDOWN`, `TRYAGAIN`, …): retry it later.
    Retry(String),
}

/// The most serious error among the write script's replies (`!<error>`) or
/// a pipeline's: anything to retry outweighs a refusal.
fn worst(replies: &[Value]) -> Option<Verdict> {
    let mut verdict = None;
    for reply in replies {
        let error = match reply {
            Value::BulkString(bytes) => match bytes.strip_prefix(b"!") {
                Some(error) => String::from_utf8_lossy(error).into_owned(),
                None => continue,
            },
            // A pipeline's own error replies.
            Value::ServerError(e) => match e.details() {
                Some(details) => format!("{} {details}", e.code()),
                None => e.code().to_string(),
            },
            _ => continue,
        };
        let code = error.split(' ').next().unwrap_or_default();
        if matches!(code, "ERR" | "WRONGTYPE") {
            verdict.get_or_insert(Verdict::Refused(error));
        } else {
            return Some(Verdict::Retry(error));
        }
    }
    verdict
}

/// How many outbox entries one relay call moves.
const RELAY_BATCH: usize = 500;

/// A stream entry: its id and its field/value pairs.
type StreamEntry = (String, Vec<(String, Vec<u8>)>);

/// The entries of an `XRANGE` reply.
fn stream_entries(reply: Value) -> Vec<StreamEntry> {
    let Value::Array(entries) = reply else {
        return Vec::new();
    };
    let text = |v: &Value| match v {
        Value::BulkString(b) => Some(String::from_utf8_lossy(b).into_owned()),
        Value::SimpleString(s) => Some(s.clone()),
        _ => None,
    };
    entries
        .into_iter()
        .filter_map(|entry| {
            let Value::Array(parts) = entry else {
                return None;
            };
            let [id, Value::Array(fields)] = parts.as_slice() else {
                return None;
            };
            let pairs = fields
                .chunks_exact(2)
                .filter_map(|kv| match (&kv[0], &kv[1]) {
                    (k, Value::BulkString(v)) => Some((text(k)?, v.clone())),
                    _ => None,
                })
                .collect();
            Some((text(id)?, pairs))
        })
        .collect()
}

/// The zone events in a reply to `XRANGE`, or to `XREAD`/`XREADGROUP`
/// (entries by stream), in order; entries that are not zone events are
/// skipped. Public for the tests and tools that read the stream as a
/// backend does.
pub fn zone_events_in(reply: Value) -> Vec<ZoneEvent> {
    let by_stream = |item: &Value| match item {
        Value::Array(parts) => matches!(
            parts.as_slice(),
            [_, Value::Array(entries)] if entries.iter().all(|e| matches!(e, Value::Array(_)))
                && !entries.is_empty()
        ),
        _ => false,
    };
    let entries: Vec<StreamEntry> = match reply {
        Value::Array(items) if items.iter().all(by_stream) && !items.is_empty() => items
            .into_iter()
            .flat_map(|item| match item {
                Value::Array(mut parts) => stream_entries(parts.swap_remove(1)),
                _ => Vec::new(),
            })
            .collect(),
        Value::Map(streams) => streams
            .into_iter()
            .flat_map(|(_, entries)| stream_entries(entries))
            .collect(),
        reply => stream_entries(reply),
    };
    events_of(&entries)
}

/// The zone events among stream entries.
fn events_of(entries: &[StreamEntry]) -> Vec<ZoneEvent> {
    entries
        .iter()
        .filter_map(|(_, fields)| {
            ZoneEvent::from_fields(fields.iter().map(|(k, v)| (k.as_str(), v.as_slice()))).ok()
        })
        .collect()
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

    async fn apply(&self, batch: &Batch) -> Result<Applied, StoreError> {
        // Each shard on its own: on a Redis Cluster one master away fails
        // only the shards it serves.
        let writes = join_all(batch.shards.iter().map(|sb| self.write_shard(sb))).await;
        let mut applied = Applied::default();
        for (sb, write) in batch.shards.iter().zip(writes) {
            match write {
                Ok(ShardWrite::Written(refused)) => applied.refused.extend(refused),
                Ok(ShardWrite::Fenced) => applied.fenced.push(sb.shard),
                Err(e) => applied.failed.push((sb.shard, e.to_string())),
            }
        }
        if applied.failed.len() == batch.shards.len() {
            let (_, why) = applied.failed.swap_remove(0);
            return Err(StoreError::Unwritable(why));
        }
        self.write_locators(batch, &applied).await?;
        self.register_shards(batch, &applied).await?;
        Ok(applied)
    }

    async fn load_shard(&self, shard: ShardId) -> Result<Vec<VehicleState>, StoreError> {
        let raw: HashMap<String, Vec<u8>> = self
            .conn
            .cmd(redis::cmd("HGETALL").arg(keys::state(shard)))
            .await?;
        raw.iter().map(|(id, b)| decode(id, b)).collect()
    }

    async fn snapshot_shard(&self, shard: ShardId) -> Result<(u64, Vec<VehicleState>), StoreError> {
        let mut call = SNAPSHOT_SCRIPT.prepare_invoke();
        call.key(keys::state(shard)).key(keys::bus_seq(shard));
        let (seq, raw): (u64, HashMap<String, Vec<u8>>) = self.conn.invoke(&call).await?;
        let states = raw
            .iter()
            .map(|(id, b)| decode(id, b))
            .collect::<Result<_, _>>()?;
        Ok((seq, states))
    }

    async fn hand_over(&self, state: &VehicleState, ttl: Duration) -> Result<(), StoreError> {
        let mut cmd = redis::cmd("SET");
        cmd.arg(keys::handoff(&state.id))
            .arg(rmp_serde::to_vec(state)?)
            .arg("PX")
            .arg(ttl.as_millis().max(1) as u64);
        self.conn.cmd::<()>(&cmd).await?;
        Ok(())
    }

    async fn handed_over(&self, id: &VehicleId) -> Result<Option<VehicleState>, StoreError> {
        let bytes: Option<Vec<u8>> = self
            .conn
            .cmd(redis::cmd("GET").arg(keys::handoff(id)))
            .await?;
        bytes.map(|b| decode(id.as_str(), &b)).transpose()
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
        // The nearest `limit` vehicles, each counted once: a vehicle in two
        // shards' geo keys (left by a node that died between writing its
        // new shard and leaving its old one) must not take another's place.
        let cut = {
            let mut ids = HashSet::with_capacity(query.limit + 1);
            hits.iter()
                .position(|(_, id, _)| ids.insert(id.as_str()) && ids.len() > query.limit)
                .unwrap_or(hits.len())
        };
        hits.truncate(cut);

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
        let found = try_join_all(fetches).await?.into_iter().flatten();
        Ok(nearest_first(each_vehicle_once(found), query.limit))
    }

    async fn load_all(&self) -> Result<Vec<VehicleState>, StoreError> {
        let shards: Vec<String> = self
            .conn
            .cmd(redis::cmd("SMEMBERS").arg(keys::SHARDS))
            .await?;
        let loads = shards
            .iter()
            .filter_map(|s| s.parse::<ShardId>().ok())
            .map(|shard| self.load_shard(shard));
        Ok(try_join_all(loads).await?.into_iter().flatten().collect())
    }

    async fn relay_zone_events(&self, shard: ShardId) -> Result<Vec<ZoneEvent>, StoreError> {
        let mut moved = Vec::new();
        // A page at a time, until the outbox is empty.
        loop {
            let (read, page) = self.relay_page(shard).await?;
            moved.extend(page);
            if read < RELAY_BATCH {
                return Ok(moved);
            }
        }
    }

    async fn zone_events(
        &self,
        cursor: Option<&str>,
        count: usize,
    ) -> Result<(String, Vec<ZoneEvent>), StoreError> {
        let Some(cursor) = cursor else {
            let raw: Value = self
                .conn
                .cmd(
                    redis::cmd("XREVRANGE")
                        .arg(keys::ZONE_EVENTS)
                        .arg("+")
                        .arg("-")
                        .arg("COUNT")
                        .arg(1),
                )
                .await?;
            let last = stream_entries(raw).pop().map(|(id, _)| id);
            return Ok((last.unwrap_or_else(|| "0-0".to_string()), Vec::new()));
        };
        let raw: Value = self
            .conn
            .cmd(
                redis::cmd("XRANGE")
                    .arg(keys::ZONE_EVENTS)
                    .arg(format!("({cursor}"))
                    .arg("+")
                    .arg("COUNT")
                    .arg(count),
            )
            .await?;
        let entries = stream_entries(raw);
        let next = entries
            .last()
            .map_or_else(|| cursor.to_string(), |(id, _)| id.clone());
        Ok((next, events_of(&entries)))
    }

    async fn put_zone(
        &self,
        id: &ZoneId,
        feature: &str,
        max_zones: usize,
    ) -> Result<Option<u64>, StoreError> {
        let mut call = PUT_ZONE_SCRIPT.prepare_invoke();
        call.key(keys::ZONE_DEFS)
            .key(keys::ZONE_VERSIONS)
            .key(keys::ZONE_VERSION)
            .arg(id.as_str())
            .arg(feature)
            .arg(max_zones);
        let version: i64 = self.conn.invoke(&call).await?;
        Ok(u64::try_from(version).ok())
    }

    async fn delete_zone(&self, id: &ZoneId) -> Result<bool, StoreError> {
        let mut call = DELETE_ZONE_SCRIPT.prepare_invoke();
        call.key(keys::ZONE_DEFS)
            .key(keys::ZONE_VERSIONS)
            .key(keys::ZONE_VERSION)
            .arg(id.as_str());
        let version: u64 = self.conn.invoke(&call).await?;
        Ok(version > 0)
    }

    async fn zone_changes(&self, since: u64) -> Result<ZoneChanges, StoreError> {
        let mut call = ZONE_CHANGES_SCRIPT.prepare_invoke();
        call.key(keys::ZONE_DEFS)
            .key(keys::ZONE_VERSIONS)
            .arg(since);
        let flat: Vec<String> = self.conn.invoke(&call).await?;
        let mut changes = ZoneChanges {
            version: since,
            zones: Vec::new(),
        };
        for triple in flat.chunks_exact(3) {
            let Ok(id) = ZoneId::new(&triple[0]) else {
                tracing::warn!(id = %triple[0], "a stored zone has an invalid id; skipped");
                continue;
            };
            changes.version = changes.version.max(triple[1].parse().unwrap_or(since));
            let feature = Some(triple[2].clone()).filter(|f| !f.is_empty());
            changes.zones.push((id, feature));
        }
        Ok(changes)
    }

    async fn put_zone_counts(
        &self,
        node: &str,
        counts: &[u8],
        ttl: Duration,
    ) -> Result<(), StoreError> {
        let ttl_ms = u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX).max(1);
        self.conn
            .cmd::<()>(
                redis::cmd("SET")
                    .arg(keys::zone_counts(node))
                    .arg(counts)
                    .arg("PX")
                    .arg(ttl_ms),
            )
            .await?;
        Ok(())
    }

    async fn zone_counts(&self, nodes: &[String]) -> Result<Vec<Option<Vec<u8>>>, StoreError> {
        if nodes.is_empty() {
            return Ok(Vec::new());
        }
        let keys: Vec<String> = nodes.iter().map(|n| keys::zone_counts(n)).collect();
        Ok(self.conn.cmd(redis::cmd("MGET").arg(&keys)).await?)
    }

    async fn shards(&self) -> Result<Vec<ShardId>, StoreError> {
        let raw: Vec<String> = self
            .conn
            .cmd(redis::cmd("SMEMBERS").arg(keys::SHARDS))
            .await?;
        Ok(raw.iter().filter_map(|s| s.parse().ok()).collect())
    }

    async fn locate(&self, ids: &[VehicleId]) -> Result<Vec<Option<ShardId>>, StoreError> {
        let keys: Vec<String> = ids.iter().map(keys::locator).collect();
        let found: Vec<Option<String>> = self.get_each(&keys).await?;
        Ok(found
            .into_iter()
            .map(|shard| shard.and_then(|s| s.parse().ok()))
            .collect())
    }

    async fn bus_seqs(&self, shards: &[ShardId]) -> Result<Vec<u64>, StoreError> {
        let keys: Vec<String> = shards.iter().map(|&s| keys::bus_seq(s)).collect();
        let seqs: Vec<Option<u64>> = self.get_each(&keys).await?;
        Ok(seqs.into_iter().map(Option::unwrap_or_default).collect())
    }

    async fn leave_tombstones(
        &self,
        shard: ShardId,
        removals: &[Removal],
        ttl: Duration,
    ) -> Result<(), StoreError> {
        if removals.is_empty() {
            return Ok(());
        }
        let key = keys::tombstones(shard);
        let mut hset = redis::cmd("HSET");
        hset.arg(&key);
        for r in removals {
            hset.arg(r.id.as_str()).arg(tombstone_value(r));
        }
        let mut pipe = redis::pipe();
        pipe.atomic()
            .add_command(hset)
            .ignore()
            .cmd("PEXPIRE")
            .arg(&key)
            .arg(ttl.as_millis().max(1) as u64)
            .ignore();
        self.conn.query::<()>(&pipe).await?;
        Ok(())
    }

    async fn take_tombstones(&self, shard: ShardId) -> Result<Vec<Removal>, StoreError> {
        let key = keys::tombstones(shard);
        let mut pipe = redis::pipe();
        pipe.atomic()
            .cmd("HGETALL")
            .arg(&key)
            .cmd("DEL")
            .arg(&key)
            .ignore();
        let (raw,): (HashMap<String, String>,) = self.conn.query(&pipe).await?;
        Ok(raw
            .iter()
            .filter_map(|(id, value)| {
                let parsed = parse_tombstone(id, value);
                if parsed.is_none() {
                    tracing::warn!(%shard, vehicle = %id, value, "a tombstone does not parse; skipped");
                }
                parsed
            })
            .collect())
    }

    async fn ping(&self) -> Result<(), StoreError> {
        self.conn.cmd::<String>(&redis::cmd("PING")).await?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use hexfleet_model::{Membership, VehicleClass, VehicleId, VehicleStatus, ZoneId};

    use super::*;

    fn state() -> VehicleState {
        VehicleState {
            id: VehicleId::new("car-1").unwrap(),
            lat: 52.5,
            lon: 13.4,
            heading_deg: 90.0,
            speed_mps: 3.0,
            accuracy_m: 4.0,
            fix_time_ms: 1_800_000_000_000,
            seq: 7,
            class: VehicleClass::Economy,
            status: VehicleStatus::Available,
            seen_ms: 1_800_000_000_100,
            zones: Vec::new(),
            clock_offset_ms: 0,
        }
    }

    #[test]
    fn states_stored_by_every_version_decode() {
        // Before zones: the first ten fields only.
        let fields = (
            "car-1",
            52.5,
            13.4,
            90.0f32,
            3.0f32,
            4.0f32,
            1_800_000_000_000i64,
            7u64,
            VehicleClass::Economy,
            VehicleStatus::Available,
            1_800_000_000_100i64,
        );
        let old = rmp_serde::to_vec(&fields).unwrap();
        assert_eq!(decode("car-1", &old).unwrap(), state());
        // With zones, with and without a clock offset.
        let mut zoned = state();
        zoned.zones.push(Membership {
            zone: ZoneId::new("airport").unwrap(),
            entered_ms: 1_800_000_000_050,
        });
        for state in [
            state(),
            zoned.clone(),
            VehicleState {
                clock_offset_ms: -3_600_000,
                ..zoned
            },
        ] {
            let bytes = rmp_serde::to_vec(&state).unwrap();
            assert_eq!(decode("car-1", &bytes).unwrap(), state);
        }
    }
}
