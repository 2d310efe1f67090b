//! Every Redis key hexfleet uses, and nothing else names one.
//!
//! All keys of a shard carry the hash tag `{<shard cell hex>}`, so a shard
//! lives in one Redis Cluster slot and a flush for it is one pipeline.

use hexfleet_model::{ShardId, VehicleId};

/// Geo index of a shard: member = vehicle id, score = geohash of its position.
pub fn geo(shard: ShardId) -> String {
    format!("hexfleet:geo:{{{shard}}}")
}

/// Last-seen sorted set of a shard: member = vehicle id, score = Unix ms.
pub fn seen(shard: ShardId) -> String {
    format!("hexfleet:seen:{{{shard}}}")
}

/// State hash of a shard: field = vehicle id, value = MessagePack state.
pub fn state(shard: ShardId) -> String {
    format!("hexfleet:state:{{{shard}}}")
}

/// A shard's lease: `<node id> <epoch>` while a node owns the shard, with
/// a TTL. The store writes a shard only for the holder of this exact value.
pub fn lease(shard: ShardId) -> String {
    format!("hexfleet:lease:{{{shard}}}")
}

/// A shard's lease epoch, incremented by every new holder, so two holdings
/// of one shard by one node still differ.
pub fn epoch(shard: ShardId) -> String {
    format!("hexfleet:epoch:{{{shard}}}")
}

/// Removals left for a shard's holder by a node that lost the shard before
/// it could write them (field = vehicle id, value = `<seq> <seen_ms>
/// <reason or ->`), with a TTL; checked with every lease renewal.
pub fn tombstones(shard: ShardId) -> String {
    format!("hexfleet:gone:{{{shard}}}")
}

/// The sequence number of a shard's last bus batch.
pub fn bus_seq(shard: ShardId) -> String {
    format!("hexfleet:busseq:{{{shard}}}")
}

/// The bus channel of a shard (sharded pub/sub: same slot as its keys).
pub fn bus_channel(shard: ShardId) -> String {
    format!("hexfleet:bus:{{{shard}}}")
}

/// The shard a bus channel belongs to.
pub fn bus_channel_shard(channel: &str) -> Option<ShardId> {
    channel
        .strip_prefix("hexfleet:bus:{")?
        .strip_suffix('}')?
        .parse()
        .ok()
}

/// The live nodes: member = node id, score = when its membership expires
/// (Redis clock, ms). With [`NODES`], in one slot.
pub const MEMBERS: &str = "hexfleet:members:{cluster}";

/// What each live node announces (JSON `NodeInfo`), by node id.
pub const NODES: &str = "hexfleet:nodes:{cluster}";

/// Which process (its random instance number) holds each live node id, so
/// a second process started with the same id is refused. Same slot.
pub const INSTANCES: &str = "hexfleet:instances:{cluster}";

/// Bumped whenever a node joins, leaves or expires, so the others read the
/// live set at once rather than at their next renewal. Same slot.
pub const MEMBERS_VERSION: &str = "hexfleet:members-version:{cluster}";

/// A driver's last state, left by the node that handed it over for the
/// node it was handed to.
pub fn handoff(id: &VehicleId) -> String {
    format!("hexfleet:handoff:{{{id}}}")
}

/// The set of shards that have ever held a vehicle, for a node taking over.
pub const SHARDS: &str = "hexfleet:shards";

/// Which shard a vehicle is in, for lookups by id. Written only when a
/// vehicle appears in or crosses into a shard, not per fix.
pub fn locator(id: &VehicleId) -> String {
    format!("hexfleet:loc:{{{id}}}")
}

/// A shard's zone events not yet moved to [`ZONE_EVENTS`] (a stream, in
/// the shard's slot, so an event is written with the state it records).
pub fn outbox(shard: ShardId) -> String {
    format!("hexfleet:outbox:{{{shard}}}")
}

/// The ids of a shard's zone events written in the last hour (a sorted
/// set scored by the event's time), so a retried write adds none twice.
pub fn event_ids(shard: ShardId) -> String {
    format!("hexfleet:evids:{{{shard}}}")
}

/// Every zone event, for backends (consumer groups): a stream of entries
/// with the fields of `ZoneEvent::fields`. The zone keys share a slot.
pub const ZONE_EVENTS: &str = "hexfleet:{zones}:events";

/// Per shard, the last outbox entry moved to [`ZONE_EVENTS`], so none is
/// moved twice.
pub const ZONE_RELAYED: &str = "hexfleet:{zones}:relayed";

/// The zones' GeoJSON Features, by zone id.
pub const ZONE_DEFS: &str = "hexfleet:{zones}:defs";

/// Each zone's version (its last change; deleted zones stay, without a
/// Feature), so a node reads only what changed.
pub const ZONE_VERSIONS: &str = "hexfleet:{zones}:versions";

/// The zones' version counter.
pub const ZONE_VERSION: &str = "hexfleet:{zones}:version";

/// A node's live zone counts, expiring with the node.
pub fn zone_counts(node: &str) -> String {
    format!("hexfleet:{{zones}}:counts:{node}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_shards_keys_share_one_hash_tag() {
        let shard: ShardId = "85283473fffffff".parse().unwrap();
        for key in [
            geo(shard),
            seen(shard),
            state(shard),
            lease(shard),
            epoch(shard),
            bus_seq(shard),
            bus_channel(shard),
        ] {
            assert!(key.ends_with("{85283473fffffff}"), "{key}");
        }
        assert_eq!(bus_channel_shard(&bus_channel(shard)), Some(shard));
    }
}
