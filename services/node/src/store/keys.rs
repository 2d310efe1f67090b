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

/// The set of shards that have ever held a vehicle, for a node taking over.
pub const SHARDS: &str = "hexfleet:shards";

/// Which shard a vehicle is in, for lookups by id. Written only when a
/// vehicle appears in or crosses into a shard, not per fix.
pub fn locator(id: &VehicleId) -> String {
    format!("hexfleet:loc:{{{id}}}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_shards_keys_share_one_hash_tag() {
        let shard: ShardId = "85283473fffffff".parse().unwrap();
        for key in [geo(shard), seen(shard), state(shard)] {
            assert!(key.ends_with("{85283473fffffff}"), "{key}");
        }
    }
}
