//! Shard leases: at most one node writes a shard at a time.
//!
//! A lease is the key `hexfleet:lease:{S}` holding `<node id> <epoch>` with
//! a TTL; the epoch comes from `INCR` on the shard's epoch key, so every
//! holding has a value never seen before. The store's write script checks
//! that value (fencing), so a node that lost its lease without knowing it
//! writes nothing.

use std::{sync::LazyLock, time::Duration};

use hexfleet_model::ShardId;
use redis::Script;

use crate::store::{keys, redis::Conn, StoreError};

/// Takes a free lease (or one an earlier process of this node id left).
/// KEYS: lease, epoch. ARGV: node id, TTL ms. Returns the value, or nil.
const ACQUIRE: &str = r#"
local held = redis.call('GET', KEYS[1])
if held and string.sub(held, 1, #ARGV[1] + 1) ~= ARGV[1] .. ' ' then
  return false
end
local value = ARGV[1] .. ' ' .. redis.call('INCR', KEYS[2])
redis.call('SET', KEYS[1], value, 'PX', ARGV[2])
return value
"#;

/// Extends a lease still held with this value. KEYS: lease. ARGV: value,
/// TTL ms. Returns 1, or 0 when it is no longer this holding.
const RENEW: &str = r#"
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return 1
end
return 0
"#;

/// Gives a lease up, if it is still this holding. KEYS: lease. ARGV: value.
const RELEASE: &str = r#"
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
"#;

static ACQUIRE_SCRIPT: LazyLock<Script> = LazyLock::new(|| Script::new(ACQUIRE));
static RENEW_SCRIPT: LazyLock<Script> = LazyLock::new(|| Script::new(RENEW));
static RELEASE_SCRIPT: LazyLock<Script> = LazyLock::new(|| Script::new(RELEASE));

fn millis(ttl: Duration) -> u64 {
    ttl.as_millis().max(1) as u64
}

pub async fn acquire(
    conn: &Conn,
    shard: ShardId,
    node: &str,
    ttl: Duration,
) -> Result<Option<String>, StoreError> {
    let mut call = ACQUIRE_SCRIPT.prepare_invoke();
    call.key(keys::lease(shard))
        .key(keys::epoch(shard))
        .arg(node)
        .arg(millis(ttl));
    Ok(conn.invoke(&call).await?)
}

pub async fn renew(
    conn: &Conn,
    shard: ShardId,
    value: &str,
    ttl: Duration,
) -> Result<bool, StoreError> {
    let mut call = RENEW_SCRIPT.prepare_invoke();
    call.key(keys::lease(shard)).arg(value).arg(millis(ttl));
    Ok(conn.invoke::<i64>(&call).await? == 1)
}

pub async fn release(conn: &Conn, shard: ShardId, value: &str) -> Result<bool, StoreError> {
    let mut call = RELEASE_SCRIPT.prepare_invoke();
    call.key(keys::lease(shard)).arg(value);
    Ok(conn.invoke::<i64>(&call).await? == 1)
}
