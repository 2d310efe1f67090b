//! Where vehicles are persisted and searched: one [`Store`] trait, two
//! implementations.
//!
//! - [`memory::MemoryStore`]: in-process, the embedded single-node default.
//! - [`redis::RedisStore`]: the production store, on one Redis or a Redis
//!   Cluster, laid out as in DESIGN.md (per-shard hash tags, geo set,
//!   last-seen set, state hash).
//!
//! The node never writes one fix at a time: the [`writer::StoreWriter`]
//! stages changes (latest wins per vehicle) and flushes them as one
//! [`Batch`] per interval, grouped by shard.

pub mod keys;
pub mod memory;
pub mod redis;
pub mod writer;

use std::{
    collections::{hash_map::Entry, HashMap},
    sync::Arc,
    time::Duration,
};

use async_trait::async_trait;
use hexfleet_model::{Position, ShardId, VehicleId, VehicleState, ZoneId};
use hexfleet_protocol::{zone::ZoneEvent, RemoveReason};

/// A vehicle written to a shard.
#[derive(Debug, Clone, PartialEq)]
pub struct Upsert {
    pub state: VehicleState,
    /// The vehicle is new to this shard (first seen, or crossed into it):
    /// the store must record where to find it by id.
    pub relocated: bool,
    /// The last-seen index (what a sweep of the store reads) must be
    /// written too: it is kept to [`SEEN_RESOLUTION_MS`], not to every fix.
    pub seen: bool,
}

/// How fresh the store's last-seen index is kept: a vehicle's entry is
/// rewritten when its fixes cross into a new period of this length (or it
/// arrives in a shard), so a driver at 1 Hz costs the index one write per
/// period instead of one per fix. Far below `store.stale_after`.
pub const SEEN_RESOLUTION_MS: i64 = 5_000;

/// Whether a fix seen at `now_ms`, after one seen at `before_ms`, must
/// rewrite the last-seen index.
pub fn seen_due(before_ms: i64, now_ms: i64) -> bool {
    before_ms.div_euclid(SEEN_RESOLUTION_MS) != now_ms.div_euclid(SEEN_RESOLUTION_MS)
}

/// How many zone events the stream keeps (Redis trims it to about this
/// many, `MAXLEN ~`): consumers that fall further behind miss the oldest.
pub const ZONE_STREAM_LEN: usize = 100_000;

/// How new a vehicle's state is: its driver's sequence number, then when
/// a node last heard from it. Of two states of one vehicle the greater is
/// the newer (a driver that reconnects keeps counting, so the sequence
/// decides; the time breaks ties between copies of one fix).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Version {
    pub seq: u64,
    pub seen_ms: i64,
}

impl Version {
    pub fn of(state: &VehicleState) -> Self {
        Self {
            seq: state.seq,
            seen_ms: state.seen_ms,
        }
    }
}

/// A vehicle removed from a shard.
#[derive(Debug, Clone, PartialEq)]
pub struct Removal {
    pub id: VehicleId,
    /// Why the vehicle is gone (stale, signed off): the store forgets it
    /// entirely. `None` when it only moved to another shard or node.
    pub gone: Option<RemoveReason>,
    /// The version of the state removed: a node that holds the vehicle at
    /// this version or older (it loaded what the remover never got to
    /// delete) lets it go; a newer one is the driver's since.
    pub last: Version,
}

impl Removal {
    pub fn forget(&self) -> bool {
        self.gone.is_some()
    }
}

/// The changes to one shard in one flush.
#[derive(Debug, Clone, PartialEq)]
pub struct ShardBatch {
    pub shard: ShardId,
    pub upserts: Vec<Upsert>,
    pub removals: Vec<Removal>,
    /// The shard lease this node holds, in a cluster: the store writes only
    /// while the lease is still this one (fencing).
    pub fence: Option<Arc<str>>,
    /// Publish the changes on the shard's bus channel, for other nodes.
    pub publish: bool,
    /// Zone events of the shard's vehicles, in order: written to the
    /// shard's outbox in the same atomic write as the states that record
    /// them, or not at all.
    pub events: Vec<ZoneEvent>,
}

/// What a flush did besides writing.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Applied {
    /// Changes refused for their content, each costing its own vehicle.
    pub refused: Vec<Refused>,
    /// Shards whose lease is no longer this node's: nothing of theirs was
    /// written.
    pub fenced: Vec<ShardId>,
    /// Shards the store could not write now (their server is away, on a
    /// Redis Cluster), with why: nothing of theirs was written, and they
    /// are tried again; the others' writes stand.
    pub failed: Vec<(ShardId, String)>,
}

impl Applied {
    /// Whether the shard's changes were written (or refused for content).
    pub fn written(&self, shard: ShardId) -> bool {
        !self.fenced.contains(&shard) && !self.failed.iter().any(|(s, _)| *s == shard)
    }
}

/// One flush: the changes to every shard touched since the previous one.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Batch {
    pub shards: Vec<ShardBatch>,
}

impl Batch {
    pub fn len(&self) -> usize {
        self.shards
            .iter()
            .map(|s| s.upserts.len() + s.removals.len() + s.events.len())
            .sum()
    }

    pub fn is_empty(&self) -> bool {
        self.shards.is_empty()
    }
}

/// A vehicle's change that the store refused for its content (a value it
/// cannot hold), not for being unreachable. It costs that one change: the
/// rest of the flush is written, and it is not retried.
#[derive(Debug, Clone, PartialEq)]
pub struct Refused {
    pub shard: ShardId,
    pub id: VehicleId,
    /// Whether the refused change was the vehicle's arrival in the shard
    /// (its locator was not written either).
    pub relocated: bool,
    pub reason: String,
}

/// A nearby search: vehicles within `radius_m` of `center` in the given
/// shards (the caller computes which shards the circle can touch).
#[derive(Debug, Clone)]
pub struct NearbyQuery {
    pub center: Position,
    pub radius_m: f64,
    pub limit: usize,
    pub shards: Vec<ShardId>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Nearby {
    pub state: VehicleState,
    pub distance_m: f64,
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("redis: {0}")]
    Redis(#[from] ::redis::RedisError),
    #[error("stored state of {id} does not decode: {source}")]
    Corrupt {
        id: String,
        source: rmp_serde::decode::Error,
    },
    #[error("state does not encode: {0}")]
    Encode(#[from] rmp_serde::encode::Error),
    #[error("redis cannot write now: {0}")]
    Unwritable(String),
    #[error("bus message: {0}")]
    Bus(#[from] hexfleet_protocol::bus::BusError),
}

impl StoreError {
    /// Whether trying again later may succeed: Redis unreachable, loading,
    /// timing out or refusing writes, rather than a bad URL or bad data.
    pub fn is_transient(&self) -> bool {
        match self {
            Self::Redis(e) => {
                unanswered(e)
                    || e.is_cluster_error()
                    || matches!(
                        e.kind(),
                        ::redis::ErrorKind::Server(_)
                            | ::redis::ErrorKind::ClusterConnectionNotFound
                    )
            }
            Self::Unwritable(_) => true,
            Self::Corrupt { .. } | Self::Encode(_) | Self::Bus(_) => false,
        }
    }
}

/// Whether Redis gave no answer at all (unreachable, dropped, timed out),
/// rather than an error reply: a node that gets a reply talks to Redis.
pub fn unanswered(e: &::redis::RedisError) -> bool {
    e.is_io_error() || e.is_timeout() || e.is_connection_dropped() || e.is_connection_refusal()
}

#[async_trait]
pub trait Store: Send + Sync + 'static {
    /// `memory`, `redis` or `redis-cluster`.
    fn kind(&self) -> &'static str;

    /// Writes one flush and returns the changes it refused for their
    /// content, each costing only its own vehicle, the shards it did not
    /// write because their lease is no longer the one given, and those it
    /// could not write now. On error (the store is unreachable, or busy)
    /// nothing is assumed written; the writer retries the changes (merged
    /// under newer ones). A retry writes a zone event already written once
    /// at most.
    async fn apply(&self, batch: &Batch) -> Result<Applied, StoreError>;

    /// Every vehicle of one shard, for a node taking it over.
    async fn load_shard(&self, shard: ShardId) -> Result<Vec<VehicleState>, StoreError>;

    /// Every vehicle of one shard and the sequence number of the last bus
    /// batch they reflect, read at one instant: where a replica starts.
    async fn snapshot_shard(&self, shard: ShardId) -> Result<(u64, Vec<VehicleState>), StoreError>;

    /// Leaves a vehicle's last state for the node its driver is handed to
    /// (the fix history its validator continues from), for `ttl`.
    async fn hand_over(&self, state: &VehicleState, ttl: Duration) -> Result<(), StoreError>;

    /// The state a node handing a driver over left for it, if any.
    async fn handed_over(&self, id: &VehicleId) -> Result<Option<VehicleState>, StoreError>;

    /// The latest state of a vehicle, wherever it is.
    async fn vehicle(&self, id: &VehicleId) -> Result<Option<VehicleState>, StoreError>;

    /// Vehicles within the radius, nearest first, at most `limit`.
    async fn nearby(&self, query: &NearbyQuery) -> Result<Vec<Nearby>, StoreError>;

    /// Every vehicle the store holds, for a node taking over its shards.
    async fn load_all(&self) -> Result<Vec<VehicleState>, StoreError>;

    /// Whether the store answers.
    async fn ping(&self) -> Result<(), StoreError>;

    /// Moves a shard's pending zone events from its outbox to the event
    /// stream, each exactly once however many nodes try at once, and
    /// returns those it moved.
    async fn relay_zone_events(&self, shard: ShardId) -> Result<Vec<ZoneEvent>, StoreError>;

    /// The zone events in the stream after `cursor` (`None`: from its
    /// current end), at most `count`, and the cursor to read on from.
    async fn zone_events(
        &self,
        cursor: Option<&str>,
        count: usize,
    ) -> Result<(String, Vec<ZoneEvent>), StoreError>;

    /// Creates or replaces a zone (its GeoJSON Feature, already checked),
    /// unless that would make more than `max_zones`. Returns the zones'
    /// new version, or `None` when there are too many zones.
    async fn put_zone(
        &self,
        id: &ZoneId,
        feature: &str,
        max_zones: usize,
    ) -> Result<Option<u64>, StoreError>;

    /// Deletes a zone; `false` when there was none.
    async fn delete_zone(&self, id: &ZoneId) -> Result<bool, StoreError>;

    /// The zones changed since version `since` (`None`: deleted), and the
    /// version they bring the reader to.
    async fn zone_changes(&self, since: u64) -> Result<ZoneChanges, StoreError>;

    /// Leaves this node's live zone counts for the others, for `ttl`.
    async fn put_zone_counts(
        &self,
        node: &str,
        counts: &[u8],
        ttl: Duration,
    ) -> Result<(), StoreError>;

    /// The zone counts each of the given nodes left, in their order
    /// (`None` where they expired or were never left).
    async fn zone_counts(&self, nodes: &[String]) -> Result<Vec<Option<Vec<u8>>>, StoreError>;

    /// Every shard that ever held a vehicle.
    async fn shards(&self) -> Result<Vec<ShardId>, StoreError>;

    /// The shard each vehicle is in now, by its locator (`None`: no
    /// locator, as for a vehicle signed off): a copy found in another shard
    /// is a leftover of a move whose removal was never written.
    async fn locate(&self, ids: &[VehicleId]) -> Result<Vec<Option<ShardId>>, StoreError>;

    /// The sequence number of each shard's last bus batch (0: none), for
    /// replicas checking that they missed none.
    async fn bus_seqs(&self, shards: &[ShardId]) -> Result<Vec<u64>, StoreError>;

    /// Leaves removals this node could not write (it lost the shard's lease
    /// before they were written) for the shard's holder, for `ttl`. Each is
    /// kept per vehicle, the newest winning; nothing of the shard itself is
    /// changed (that needs its lease).
    async fn leave_tombstones(
        &self,
        shard: ShardId,
        removals: &[Removal],
        ttl: Duration,
    ) -> Result<(), StoreError>;

    /// Takes the removals another node left for a shard (they are gone from
    /// the store once read): its holder applies them.
    async fn take_tombstones(&self, shard: ShardId) -> Result<Vec<Removal>, StoreError>;
}

/// A tombstone as the store keeps it: `<seq> <seen_ms> <reason or ->`.
pub(crate) fn tombstone_value(r: &Removal) -> String {
    let reason = r.gone.map_or("-", RemoveReason::as_str);
    format!("{} {} {reason}", r.last.seq, r.last.seen_ms)
}

/// A tombstone read back; `None` when it does not parse (it is skipped).
pub(crate) fn parse_tombstone(id: &str, value: &str) -> Option<Removal> {
    let mut parts = value.split(' ');
    let seq = parts.next()?.parse().ok()?;
    let seen_ms = parts.next()?.parse().ok()?;
    let gone = match parts.next()? {
        "-" => None,
        reason => Some(serde_json::from_value(serde_json::Value::String(reason.into())).ok()?),
    };
    Some(Removal {
        id: VehicleId::new(id).ok()?,
        gone,
        last: Version { seq, seen_ms },
    })
}

/// What changed among the zones since a version.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ZoneChanges {
    pub version: u64,
    /// Each changed zone's GeoJSON Feature, or `None` when it was deleted.
    pub zones: Vec<(ZoneId, Option<String>)>,
}

/// Each vehicle once, as its newest state (highest sequence, then last
/// heard): a read over several shards can meet a vehicle twice, in the
/// shard it left and the one it went to: for a moment at every crossing
/// into another node's shard (the old copy stays until the new node has
/// written it), and when a node died between the two writes.
pub(crate) fn each_vehicle_once(found: impl IntoIterator<Item = Nearby>) -> Vec<Nearby> {
    let mut newest: HashMap<VehicleId, Nearby> = HashMap::new();
    for n in found {
        match newest.entry(n.state.id.clone()) {
            Entry::Occupied(mut held) => {
                if Version::of(&n.state) > Version::of(&held.get().state) {
                    held.insert(n);
                }
            }
            Entry::Vacant(slot) => {
                slot.insert(n);
            }
        }
    }
    newest.into_values().collect()
}

/// Keeps the `limit` nearest of `found`, nearest first.
pub(crate) fn nearest_first(mut found: Vec<Nearby>, limit: usize) -> Vec<Nearby> {
    found.sort_by(|a, b| {
        a.distance_m
            .total_cmp(&b.distance_m)
            .then_with(|| a.state.id.cmp(&b.state.id))
    });
    found.truncate(limit);
    found
}
