//! Shard leases: at most one node writes a shard at a time.
//!
//! A lease is the key `hexfleet:lease:{S}` holding `<node id> <epoch>` with
//! a TTL; the epoch comes from `INCR` on the shard's epoch key, so every
//! holding has a value never seen before. The store's write script checks
//! that value (fencing), so a node that lost its lease without knowing it
//! writes nothing. A store that lost the epoch key (it restarted empty)
//! starts it again from its clock in milliseconds, not from 0: a value
//! given before is not given again, even to another process with the same
//! node id, which would otherwise pass the fence with a stale lease.

use std::{sync::LazyLock, time::Duration};

use hexfleet_model::ShardId;
use redis::Script;

use crate::store::{keys, redis::Conn, StoreError};

/// Sets an epoch key that is missing, or behind `floor`, to the store's
/// clock in milliseconds (or `floor`, if ahead of it).
const EPOCH_FLOOR: &str = r#"
local function epoch_floor(key, floor)
  local epoch = tonumber(redis.call('GET', key) or '0')
  if epoch >= floor and epoch > 0 then
    return
  end
  local t = redis.call('TIME')
  local ms = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
  redis.call('SET', key, string.format('%d', math.max(ms, floor)))
end
"#;

/// Takes a free lease (or one an earlier process of this node id left).
/// KEYS: lease, epoch. ARGV: node id, TTL ms. Returns the value, or nil.
const ACQUIRE: &str = r#"
local held = redis.call('GET', KEYS[1])
if held and string.sub(held, 1, #ARGV[1] + 1) ~= ARGV[1] .. ' ' then
  return false
end
epoch_floor(KEYS[2], 0)
local value = ARGV[1] .. ' ' .. redis.call('INCR', KEYS[2])
redis.call('SET', KEYS[1], value, 'PX', ARGV[2])
return value
"#;

/// Extends a lease still held with this value. When the lease is gone and
/// no holding was made since ours (the shard's epoch is not past ours), the
/// store lost it, restarting empty or letting it lapse unseen: nobody else
/// can have written the shard, so it is taken again, under a new epoch.
/// KEYS: lease, epoch, tombstones. ARGV: value, TTL ms, node id, our
/// epoch. Returns the value now held (the same, or the new one) and how
/// many tombstones another node left for the shard, or nil when the lease
/// is lost.
const RENEW: &str = r#"
local held = redis.call('GET', KEYS[1])
if held == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return {held, redis.call('HLEN', KEYS[3])}
end
if held then
  return false
end
local ours = tonumber(ARGV[4])
local epoch = tonumber(redis.call('GET', KEYS[2]) or '0')
if epoch > ours then
  return false
end
-- Behind ours: the epoch restarted with the store; values never seen
-- before continue from its clock.
epoch_floor(KEYS[2], ours)
local value = ARGV[3] .. ' ' .. redis.call('INCR', KEYS[2])
redis.call('SET', KEYS[1], value, 'PX', ARGV[2])
return {value, redis.call('HLEN', KEYS[3])}
"#;

/// Gives a lease up, if it is still this holding, and moves the epoch on,
/// so a renewal of it still in flight finds it lost rather than taking it
/// again. KEYS: lease, epoch. ARGV: value.
const RELEASE: &str = r#"
if redis.call('GET', KEYS[1]) == ARGV[1] then
  -- The epoch first: a server out of memory refuses it, and then nothing
  -- was released.
  redis.call('INCR', KEYS[2])
  redis.call('DEL', KEYS[1])
  return 1
end
return 0
"#;

static ACQUIRE_SCRIPT: LazyLock<Script> =
    LazyLock::new(|| Script::new(&format!("{EPOCH_FLOOR}{ACQUIRE}")));
static RENEW_SCRIPT: LazyLock<Script> =
    LazyLock::new(|| Script::new(&format!("{EPOCH_FLOOR}{RENEW}")));
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

/// What renewing a lease found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Renewal {
    /// Still ours, extended.
    Renewed,
    /// The store had lost it and nobody took it since: ours again, under
    /// this new value.
    Reclaimed(String),
    /// Another holding has been made since: no longer ours.
    Lost,
}

/// The epoch of a lease value `<node id> <epoch>`.
fn epoch_of(value: &str) -> u64 {
    value
        .rsplit_once(' ')
        .and_then(|(_, e)| e.parse().ok())
        .unwrap_or(0)
}

/// Renews a lease; also says whether another node left tombstones for the
/// shard (removals it could not write before losing it), for the holder
/// to apply.
pub async fn renew(
    conn: &Conn,
    shard: ShardId,
    node: &str,
    value: &str,
    ttl: Duration,
) -> Result<(Renewal, bool), StoreError> {
    let mut call = RENEW_SCRIPT.prepare_invoke();
    call.key(keys::lease(shard))
        .key(keys::epoch(shard))
        .key(keys::tombstones(shard))
        .arg(value)
        .arg(millis(ttl))
        .arg(node)
        .arg(epoch_of(value));
    Ok(match conn.invoke::<Option<(String, u64)>>(&call).await? {
        Some((held, tombs)) if held == value => (Renewal::Renewed, tombs > 0),
        Some((reclaimed, tombs)) => (Renewal::Reclaimed(reclaimed), tombs > 0),
        None => (Renewal::Lost, false),
    })
}

pub async fn release(conn: &Conn, shard: ShardId, value: &str) -> Result<bool, StoreError> {
    let mut call = RELEASE_SCRIPT.prepare_invoke();
    call.key(keys::lease(shard))
        .key(keys::epoch(shard))
        .arg(value);
    Ok(conn.invoke::<i64>(&call).await? == 1)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shard() -> ShardId {
        let cell = h3o::LatLng::new(52.52, 13.40)
            .expect("a valid point")
            .to_cell(h3o::Resolution::Five);
        ShardId(cell)
    }

    /// The scripts against a real Redis that loses its data: a value given
    /// before is never given again, to the renewing holder or to another
    /// process of its id.
    #[tokio::test]
    async fn a_store_that_lost_its_data_gives_no_value_twice() {
        let redis = hexfleet_testkit::RedisServer::start();
        let store = crate::store::redis::RedisStore::connect(&redis.url())
            .await
            .expect("connect");
        let conn = store.conn();
        let ttl = Duration::from_secs(5);
        let shard = shard();
        let first = acquire(conn, shard, "n0", ttl)
            .await
            .expect("acquire")
            .expect("a free lease");
        // Epochs start from the store's clock, in milliseconds.
        assert!(epoch_of(&first) > 1_700_000_000_000, "{first}");
        let again = acquire(conn, shard, "n0", ttl).await.expect("acquire");
        assert!(again
            .as_deref()
            .is_some_and(|v| epoch_of(v) == epoch_of(&first) + 1));
        let held = again.expect("held");
        let flush = || async {
            let _: () = conn.cmd(&redis::cmd("FLUSHALL")).await.expect("FLUSHALL");
        };
        // Lost with the data: the holder takes it back under a newer epoch.
        flush().await;
        let (renewal, _) = renew(conn, shard, "n0", &held, ttl).await.expect("renew");
        let Renewal::Reclaimed(reclaimed) = renewal else {
            panic!("{renewal:?}")
        };
        assert!(
            epoch_of(&reclaimed) > epoch_of(&held),
            "{reclaimed} after {held}"
        );
        // Lost again: another process of the same id acquires it, and is
        // not given the value the first one holds.
        flush().await;
        let twin = acquire(conn, shard, "n0", ttl)
            .await
            .expect("acquire")
            .expect("a free lease");
        assert_ne!(twin, reclaimed);
        assert_ne!(twin, held);
        // The first one's renewal now finds it another holding's.
        let (renewal, _) = renew(conn, shard, "n0", &reclaimed, ttl)
            .await
            .expect("renew");
        assert_eq!(renewal, Renewal::Lost);
        assert!(release(conn, shard, &twin).await.expect("release"));
    }
}
