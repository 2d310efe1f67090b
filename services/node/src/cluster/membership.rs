//! Membership: each node announces itself in Redis with a lease (a score in
//! a sorted set, in Redis's own clock, so nodes' clocks need not agree),
//! renews it every `renew_interval`, and reads the live set in the same
//! call. Every node therefore knows the live set within one renewal.
//!
//! Shard ownership follows by rendezvous (highest random weight) hashing of
//! the shard over the live node ids: every node computes the same owner with
//! no coordination, and a node joining or leaving moves only its own share.

use std::{
    collections::{BTreeMap, BTreeSet},
    sync::LazyLock,
    time::{Duration, Instant},
};

use hexfleet_model::ShardId;
use hexfleet_protocol::bus::NodeInfo;
use redis::Script;
use xxhash_rust::xxh3::{xxh3_64, xxh3_64_with_seed};

use crate::store::{keys, redis::Conn, StoreError};

/// Renews this node's membership and returns whether it was absent (just
/// joined, or the store lost it), the members' version, Redis's time, every
/// member's expiry (id, score) and then every live node's id and info; a
/// node joining or expiring bumps the version. When
/// a live member already uses the id with another instance (a second
/// process started with the same id, or this one stalled past its TTL and
/// was replaced), nothing is written and `{'taken', its info}` comes back:
/// the check and the claim are one atomic step.
/// KEYS: members, nodes, version, instances. ARGV: id, info (JSON), TTL in
/// ms, instance.
const RENEW: &str = r#"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local holder = redis.call('HGET', KEYS[4], ARGV[1])
local score = redis.call('ZSCORE', KEYS[1], ARGV[1])
if holder and holder ~= ARGV[4] and score and tonumber(score) > now then
  return {'taken', redis.call('HGET', KEYS[2], ARGV[1]) or ''}
end
-- This node's own renewal first: a store refusing writes (out of memory)
-- fails the script here, before it removed anyone.
local was = score and tonumber(score) > now
redis.call('HSET', KEYS[4], ARGV[1], ARGV[4])
redis.call('ZADD', KEYS[1], now + tonumber(ARGV[3]), ARGV[1])
redis.call('HSET', KEYS[2], ARGV[1], ARGV[2])
local joined = 0
if not was then
  joined = 1
end
local expired = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now)
for _, id in ipairs(expired) do
  redis.call('HDEL', KEYS[2], id)
  redis.call('HDEL', KEYS[4], id)
end
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
if joined > 0 or #expired > 0 then
  redis.call('INCR', KEYS[3])
end
local scores = redis.call('ZRANGE', KEYS[1], 0, -1, 'WITHSCORES')
local out = {tostring(joined), tostring(redis.call('GET', KEYS[3]) or '0'), tostring(now), tostring(#scores)}
for _, v in ipairs(scores) do table.insert(out, v) end
for _, v in ipairs(redis.call('HGETALL', KEYS[2])) do table.insert(out, v) end
return out
"#;

/// Leaves the live set, if this instance is the one in it.
/// KEYS: members, nodes, version, instances. ARGV: id, instance.
const LEAVE: &str = r#"
if redis.call('HGET', KEYS[4], ARGV[1]) ~= ARGV[2] then
  return 0
end
redis.call('ZREM', KEYS[1], ARGV[1])
redis.call('HDEL', KEYS[2], ARGV[1])
redis.call('HDEL', KEYS[4], ARGV[1])
redis.call('INCR', KEYS[3])
return 1
"#;

/// The members' version, Redis's time and every member's expiry (id,
/// score): a look between renewals at who has renewed since.
/// KEYS: members, version.
const LOOK: &str = r#"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local out = {tostring(redis.call('GET', KEYS[2]) or '0'), tostring(now)}
for _, v in ipairs(redis.call('ZRANGE', KEYS[1], 0, -1, 'WITHSCORES')) do
  table.insert(out, v)
end
return out
"#;

static RENEW_SCRIPT: LazyLock<Script> = LazyLock::new(|| Script::new(RENEW));
static LOOK_SCRIPT: LazyLock<Script> = LazyLock::new(|| Script::new(LOOK));
static LEAVE_SCRIPT: LazyLock<Script> = LazyLock::new(|| Script::new(LEAVE));

/// The live nodes, by id.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct LiveSet {
    pub nodes: BTreeMap<String, NodeInfo>,
    /// Members that have not renewed for a while, while this node has: still
    /// live (their leases run on), but owning nothing new. Their drivers,
    /// reconnecting elsewhere, go to the node that will own their shards
    /// once they expire, which takes them into memory at once.
    pub silent: BTreeSet<String>,
    /// Members their peers judge unreachable for clients ([`judged`]): no
    /// node redirects a client there; a driver whose shard one of them
    /// owns is kept by the node it reached, which forwards its fixes.
    pub unreachable: BTreeSet<String>,
    /// Those unreachable for longer than the cluster waits
    /// (`cluster.unreachable_handoff`): they own nothing, and hand their
    /// shards to reachable nodes, until their peers reach them again.
    pub away: BTreeSet<String>,
}

/// What a renewal found.
#[derive(Debug, Clone)]
pub struct Renewed {
    pub live: LiveSet,
    /// This node was not in the live set: it just joined, or the store lost
    /// it (a restart) or let it lapse (this node stalled past its TTL).
    pub was_absent: bool,
    /// The members' version this live set is as of.
    pub version: u64,
    /// How long each member's membership runs on, as of the renewal (in
    /// Redis's clock; negative once lapsed and not yet removed).
    pub expires_in_ms: BTreeMap<String, i64>,
}

/// What renewing this node's membership found.
#[derive(Debug, Clone)]
pub enum Membership {
    Renewed(Renewed),
    /// A live member uses this node's id with another instance: this one
    /// must not act as that node.
    Taken(NodeInfo),
}

impl LiveSet {
    /// The owner of a shard among the live nodes that are not silent: the
    /// node whose id hashes highest with it.
    pub fn owner(&self, shard: ShardId) -> Option<&NodeInfo> {
        self.owning()
            .max_by_key(|node| (weight(&node.id, shard), &node.id))
    }

    /// The members that own shards: the live ones neither silent nor away.
    fn owning(&self) -> impl Iterator<Item = &NodeInfo> {
        self.nodes
            .values()
            .filter(|node| !self.silent.contains(&node.id) && !self.away.contains(&node.id))
    }

    /// Whether clients can be sent to the node whose client address is
    /// `quic` (as far as its peers' probes say).
    pub fn reachable_at(&self, quic: &str) -> bool {
        !self
            .nodes
            .values()
            .any(|n| n.quic == quic && self.unreachable.contains(&n.id))
    }

    /// Whether the same nodes own shards (their shards may differ).
    pub fn same_owners(&self, other: &LiveSet) -> bool {
        self.owning()
            .map(|n| &n.id)
            .eq(other.owning().map(|n| &n.id))
    }
}

/// What a node knows of the others' renewals, in its own clock.
pub struct Heard<'a> {
    /// When each member last renewed, as of the last look.
    pub at: &'a BTreeMap<String, Instant>,
    /// Since when this node's own renewals have gone through without a
    /// late one.
    pub since: Instant,
    /// When the store last answered a look.
    pub looked: Instant,
}

/// The members (other than `me`) silent as of the last look: they had not
/// renewed for `late` while this node did. Judged only as of a look the
/// store answered, and only over time this node itself was renewing, so a
/// store that stalls for everyone makes nobody silent.
pub fn silent(live: &LiveSet, me: &str, heard: &Heard, late: Duration) -> BTreeSet<String> {
    live.nodes
        .keys()
        .filter(|id| *id != me)
        .filter(|id| {
            let last = heard
                .at
                .get(*id)
                .map_or(heard.since, |at| (*at).max(heard.since));
            heard.looked.saturating_duration_since(last) >= late
        })
        .cloned()
        .collect()
}

/// The members judged unreachable for clients, and those of them judged
/// so for at least `hand_off_after`, from what each member announces of its
/// probes ([`NodeInfo::unreached`]). Every node reads the same
/// announcements, so every node comes to the same verdict within a
/// renewal. A member is judged by the others that are not silent, and a
/// verdict needs most of them (at least one): a prober whose own outbound
/// path is broken does not take a healthy node out alone. A prober that
/// reaches none of two or more peers is not counted at all: it is the one
/// cut off, more likely than all of them.
pub fn judged(live: &LiveSet, hand_off_after: Duration) -> (BTreeSet<String>, BTreeSet<String>) {
    let after = hand_off_after.as_millis() as u64;
    let judges: Vec<&NodeInfo> = live
        .nodes
        .values()
        .filter(|n| !live.silent.contains(&n.id))
        .filter(|n| {
            let peers = live.nodes.len().saturating_sub(1);
            let reached_none = peers >= 2
                && live
                    .nodes
                    .keys()
                    .filter(|id| **id != n.id)
                    .all(|id| n.unreached.contains_key(id));
            !reached_none
        })
        .collect();
    let (mut unreachable, mut away) = (BTreeSet::new(), BTreeSet::new());
    for id in live.nodes.keys() {
        let others: Vec<&&NodeInfo> = judges.iter().filter(|j| j.id != *id).collect();
        let most = others.len() / 2 + 1;
        let failing: Vec<u64> = others
            .iter()
            .filter_map(|j| j.unreached.get(id).copied())
            .collect();
        if others.is_empty() || failing.len() < most {
            continue;
        }
        unreachable.insert(id.clone());
        if failing.iter().filter(|ms| **ms >= after).count() >= most {
            away.insert(id.clone());
        }
    }
    (unreachable, away)
}

/// A node's weight for a shard: xxh3 (a stable, specified hash) of the
/// shard, seeded by the node id's hash.
pub fn weight(node: &str, shard: ShardId) -> u64 {
    xxh3_64_with_seed(&u64::from(shard.0).to_le_bytes(), xxh3_64(node.as_bytes()))
}

/// Renews `me` for `ttl_ms` and reads the live set, unless another
/// instance holds the id.
pub async fn renew(conn: &Conn, me: &NodeInfo, ttl_ms: u64) -> Result<Membership, StoreError> {
    let info = serde_json::to_string(me).expect("NodeInfo always serializes");
    let mut call = RENEW_SCRIPT.prepare_invoke();
    call.key(keys::MEMBERS)
        .key(keys::NODES)
        .key(keys::MEMBERS_VERSION)
        .key(keys::INSTANCES)
        .arg(&me.id)
        .arg(info)
        .arg(ttl_ms)
        .arg(me.instance.to_string());
    let raw: Vec<String> = conn.invoke(&call).await?;
    if raw.first().is_some_and(|first| first == "taken") {
        let other = raw
            .get(1)
            .and_then(|json| serde_json::from_str::<NodeInfo>(json).ok())
            .unwrap_or_else(|| NodeInfo {
                id: me.id.clone(),
                quic: "unknown".into(),
                http: "unknown".into(),
                shards: Vec::new(),
                instance: 0,
                peer_http: String::new(),
                unreached: Default::default(),
            });
        return Ok(Membership::Taken(other));
    }
    let number = |i: usize| raw.get(i).and_then(|v| v.parse::<i64>().ok());
    let was_absent = raw.first().is_some_and(|joined| joined != "0");
    let version = number(1).unwrap_or(0) as u64;
    let scored = number(3).unwrap_or(0).max(0) as usize;
    let expires_in_ms = expiries(number(2), raw.get(4..4 + scored));
    let nodes = raw
        .get(4 + scored..)
        .unwrap_or_default()
        .chunks_exact(2)
        .filter_map(|pair| {
            let (id, json) = (pair[0].clone(), &pair[1]);
            match serde_json::from_str::<NodeInfo>(json) {
                Ok(info) => Some((id, info)),
                Err(e) => {
                    tracing::warn!(node = %id, error = %e, "a member's info does not parse; ignored");
                    None
                }
            }
        })
        .collect();
    Ok(Membership::Renewed(Renewed {
        live: LiveSet {
            nodes,
            ..LiveSet::default()
        },
        was_absent,
        version,
        expires_in_ms,
    }))
}

/// Each member's time left, from Redis's time and the members' scores (as
/// Redis prints doubles).
fn expiries(now: Option<i64>, scores: Option<&[String]>) -> BTreeMap<String, i64> {
    let now = now.unwrap_or(0);
    scores
        .unwrap_or_default()
        .chunks_exact(2)
        .filter_map(|pair| {
            let expiry = pair[1].parse::<f64>().ok()? as i64;
            Some((pair[0].clone(), expiry - now))
        })
        .collect()
}

/// What a look between renewals finds.
#[derive(Debug, Clone)]
pub struct Look {
    /// The members' version: it changes whenever a node joins, leaves or
    /// expires.
    pub version: u64,
    /// How long each member's membership runs on (see [`Renewed`]).
    pub expires_in_ms: BTreeMap<String, i64>,
}

/// Reads the members' version and how long each membership runs on, in
/// one step: cheap enough for every acquire tick.
pub async fn look(conn: &Conn) -> Result<Look, StoreError> {
    let mut call = LOOK_SCRIPT.prepare_invoke();
    call.key(keys::MEMBERS).key(keys::MEMBERS_VERSION);
    let raw: Vec<String> = conn.invoke(&call).await?;
    let number = |i: usize| raw.get(i).and_then(|v| v.parse::<i64>().ok());
    Ok(Look {
        version: number(0).unwrap_or(0) as u64,
        expires_in_ms: expiries(number(1), raw.get(2..)),
    })
}

/// Leaves the live set at once (a graceful shutdown), unless another
/// instance holds the id by now.
pub async fn leave(conn: &Conn, me: &NodeInfo) -> Result<(), StoreError> {
    let mut call = LEAVE_SCRIPT.prepare_invoke();
    call.key(keys::MEMBERS)
        .key(keys::NODES)
        .key(keys::MEMBERS_VERSION)
        .key(keys::INSTANCES)
        .arg(&me.id)
        .arg(me.instance.to_string());
    conn.invoke::<i64>(&call).await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(id: &str) -> NodeInfo {
        NodeInfo {
            id: id.into(),
            quic: format!("{id}:quic"),
            http: String::new(),
            shards: Vec::new(),
            instance: 0,
            peer_http: String::new(),
            unreached: Default::default(),
        }
    }

    fn live(ids: &[&str]) -> LiveSet {
        LiveSet {
            nodes: ids.iter().map(|id| (id.to_string(), node(id))).collect(),
            ..LiveSet::default()
        }
    }

    fn shards() -> Vec<ShardId> {
        let cell: h3o::CellIndex = "85283473fffffff".parse().unwrap();
        cell.grid_disk::<Vec<_>>(12)
            .into_iter()
            .map(ShardId)
            .collect()
    }

    #[test]
    fn shards_spread_over_the_nodes_and_a_node_leaving_moves_only_its_own() {
        let three = live(&["a", "b", "c"]);
        let two = live(&["a", "c"]);
        let all = shards();
        let mut per_node = BTreeMap::<String, usize>::new();
        for &shard in &all {
            let owner = three.owner(shard).unwrap().id.clone();
            let after = two.owner(shard).unwrap().id.clone();
            if owner != "b" {
                assert_eq!(owner, after, "{shard} moved though its owner stayed");
            }
            *per_node.entry(owner).or_default() += 1;
        }
        // 469 shards over three nodes: each gets a fair share.
        for (node, count) in per_node {
            assert!((100..=220).contains(&count), "{node} owns {count}");
        }
    }

    #[test]
    fn a_silent_members_shards_go_where_they_will_go_when_it_expires_and_no_other_moves() {
        let mut three = live(&["a", "b", "c"]);
        let two = live(&["a", "c"]);
        let before = three.clone();
        three.silent.insert("b".into());
        assert!(three.same_owners(&two) && !three.same_owners(&before));
        for shard in shards() {
            assert_eq!(three.owner(shard).unwrap().id, two.owner(shard).unwrap().id);
        }
    }

    #[test]
    fn a_member_is_silent_only_once_it_missed_renewals_this_node_made() {
        let late = Duration::from_millis(750);
        let t0 = Instant::now();
        let ms = |n: u64| t0 + Duration::from_millis(n);
        let live = live(&["a", "b", "c"]);
        // b renewed at 0 and not since; c at 600; this node (a) throughout.
        let at: BTreeMap<String, Instant> =
            [("b".to_string(), ms(0)), ("c".to_string(), ms(600))].into();
        let look = |since: u64, looked: u64| Heard {
            at: &at,
            since: ms(since),
            looked: ms(looked),
        };
        let none = BTreeSet::new();
        let b: BTreeSet<String> = ["b".to_string()].into();
        assert_eq!(
            silent(&live, "a", &look(0, 700), late),
            none,
            "not yet late"
        );
        assert_eq!(
            silent(&live, "a", &look(0, 800), late),
            b,
            "b missed, c did not"
        );
        // The store stalled until 1200 for everyone: this node's renewals
        // start again then, and nobody is silent for a missed renewal that
        // nobody could make.
        assert_eq!(silent(&live, "a", &look(1200, 1300), late), none);
        assert_eq!(
            silent(&live, "a", &look(1200, 1950), late),
            b.union(&["c".to_string()].into()).cloned().collect()
        );
        // Never this node itself, whatever its record says.
        assert!(!silent(&live, "b", &look(0, 5000), late).contains("b"));
    }

    #[test]
    fn a_node_most_peers_cannot_reach_is_unreachable_and_owns_nothing_once_it_lasts() {
        let bound = Duration::from_secs(5);
        let mut three = live(&["a", "b", "c"]);
        let say = |live: &mut LiveSet, who: &str, of: &str, ms: u64| {
            let node = live.nodes.get_mut(who).unwrap();
            node.unreached.insert(of.into(), ms);
        };
        let none = BTreeSet::new();
        let b: BTreeSet<String> = ["b".to_string()].into();
        // One of b's two peers is not most of them.
        say(&mut three, "a", "b", 9000);
        assert_eq!(judged(&three, bound), (none.clone(), none.clone()));
        // Both: unreachable, and not yet long enough to hand off.
        say(&mut three, "c", "b", 1000);
        assert_eq!(judged(&three, bound), (b.clone(), none.clone()));
        let before = three.clone();
        say(&mut three, "c", "b", 6000);
        let (unreachable, away) = judged(&three, bound);
        assert_eq!((&unreachable, &away), (&b, &b));
        three.unreachable = unreachable;
        three.away = away;
        assert!(!three.reachable_at("b:quic"));
        assert!(three.reachable_at("a:quic"));
        // b's shards go where they would go without it; no other moves.
        let two = live(&["a", "c"]);
        for shard in shards() {
            assert_eq!(three.owner(shard).unwrap().id, two.owner(shard).unwrap().id);
            let was = before.owner(shard).unwrap().id.clone();
            if was != "b" {
                assert_eq!(three.owner(shard).unwrap().id, was);
            }
        }
        // A prober that reaches none of its peers is the one cut off: its
        // say counts for nothing.
        let mut cut = live(&["a", "b", "c"]);
        say(&mut cut, "a", "b", 9000);
        say(&mut cut, "a", "c", 9000);
        assert_eq!(judged(&cut, bound), (none.clone(), none.clone()));
        // Two nodes: the one peer's say is all there is.
        let mut pair = live(&["a", "b"]);
        say(&mut pair, "a", "b", 9000);
        assert_eq!(judged(&pair, bound), (b.clone(), b.clone()));
        // A silent member judges nobody.
        let mut silent = live(&["a", "b", "c"]);
        say(&mut silent, "a", "b", 9000);
        silent.silent.insert("c".into());
        assert_eq!(judged(&silent, bound), (b.clone(), b));
    }

    #[test]
    fn every_node_computes_the_same_owner_whatever_order_it_learnt_them_in() {
        let a = live(&["n1", "n2", "n3"]);
        let b = live(&["n3", "n1", "n2"]);
        for shard in shards() {
            assert_eq!(a.owner(shard).unwrap().id, b.owner(shard).unwrap().id);
        }
        assert!(LiveSet::default().owner(shards()[0]).is_none());
    }
}
