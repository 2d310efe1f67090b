//! Node-to-node messages: what a shard's owner publishes on the bus (Redis
//! sharded pub/sub, one channel per shard) and what the nodes announce about
//! themselves in the membership registry.
//!
//! A bus message is `<seq> <MessagePack ShardChanges>`: the owner's write
//! script numbers each shard's batches in Redis (`INCR`), atomically with
//! the write, so a replica that sees `seq` jump knows it missed a batch and
//! reads the shard again.

use std::collections::BTreeMap;

use hexfleet_model::{VehicleId, VehicleState};
use serde::{Deserialize, Serialize};

use crate::RemoveReason;

/// One flush of one shard, as its owner wrote it to Redis.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ShardChanges {
    pub upserts: Vec<VehicleState>,
    pub removals: Vec<ShardRemoval>,
}

/// A vehicle that left a shard.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ShardRemoval {
    pub id: VehicleId,
    /// Why it is gone; `None` when it only moved to another shard (crossed
    /// a boundary, or was handed to another node), where it will show up.
    pub gone: Option<RemoveReason>,
}

#[derive(Debug, thiserror::Error)]
pub enum BusError {
    #[error("a bus message must start with its sequence number and a space")]
    NoSequence,
    #[error("bus message body: {0}")]
    Body(#[from] rmp_serde::decode::Error),
    #[error("bus message body: {0}")]
    Encode(#[from] rmp_serde::encode::Error),
}

impl NodeInfo {
    /// Where peers reach this node's HTTP API.
    pub fn peer_http(&self) -> &str {
        match self.peer_http.is_empty() {
            true => &self.http,
            false => &self.peer_http,
        }
    }
}

impl ShardChanges {
    pub fn is_empty(&self) -> bool {
        self.upserts.is_empty() && self.removals.is_empty()
    }

    /// The body the write script prefixes with `<seq> `.
    pub fn encode(&self) -> Result<Vec<u8>, BusError> {
        Ok(rmp_serde::to_vec(self)?)
    }

    /// Splits a published message into its sequence number and changes.
    pub fn decode_message(message: &[u8]) -> Result<(u64, ShardChanges), BusError> {
        let space = message
            .iter()
            .position(|&b| b == b' ')
            .ok_or(BusError::NoSequence)?;
        let seq = std::str::from_utf8(&message[..space])
            .ok()
            .and_then(|s| s.parse().ok())
            .ok_or(BusError::NoSequence)?;
        Ok((seq, rmp_serde::from_slice(&message[space + 1..])?))
    }
}

/// What a node tells a peer that asks which parts of the store it reaches
/// (`GET /v1/cluster/reach?shards=…&members=…`): a node whose own renewals
/// are late tells its own cut from a store (or a Redis Cluster master) that
/// is down for everyone by asking its peers.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PeerReach {
    pub id: String,
    pub instance: u64,
    /// Whether it reached the live set's key, when asked.
    pub members: bool,
    /// The shards (of those asked) whose lease key it reached.
    pub shards: Vec<String>,
}

/// What a node announces in the membership registry.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NodeInfo {
    pub id: String,
    /// Where clients reach its QUIC endpoint (the address in a `Redirect`).
    pub quic: String,
    /// Where clients reach its HTTP API (and WebSocket fallback): the
    /// HTTPS address in a `Redirect`.
    pub http: String,
    /// Where its peers reach its HTTP API (their reach questions, relayed
    /// drivers' sessions), when not `http` (a node behind a load balancer
    /// its peers bypass). Empty: `http`.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub peer_http: String,
    /// The shards whose lease it holds, as H3 cell hex strings.
    #[serde(default)]
    pub shards: Vec<String>,
    /// Changes each time the process starts: tells a restarted node from
    /// another process using the same id.
    pub instance: u64,
    /// The peers whose client-facing QUIC address this node's probes have
    /// failed to reach, each with how long it has failed (ms, as of this
    /// announcement): what makes the cluster judge a node unreachable for
    /// its clients.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub unreached: BTreeMap<String, u64>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_message_carries_its_sequence_before_the_changes() {
        let changes = ShardChanges {
            upserts: Vec::new(),
            removals: vec![ShardRemoval {
                id: VehicleId::new("v1").unwrap(),
                gone: None,
            }],
        };
        let mut message = b"42 ".to_vec();
        message.extend(changes.encode().unwrap());
        let (seq, decoded) = ShardChanges::decode_message(&message).unwrap();
        assert_eq!((seq, decoded), (42, changes));
        assert!(ShardChanges::decode_message(b"x").is_err());
        assert!(ShardChanges::decode_message(b"x \x90").is_err());
    }
}
