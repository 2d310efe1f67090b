//! Shard leases: at most one node writes a shard at a time.
//!
//! A lease is the key `hexfleet:lease:{S}` holding `<node id>
//! <epoch>/<instance>` with a TTL; the epoch comes from `INCR` on the
//! shard's epoch key, so every holding has a value never seen before, and
//! the instance (random per process) tells this process's holdings from
//! another's with the same node id. The store's write script checks
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
/// KEYS: lease, epoch. ARGV: node id, TTL ms, instance. Returns the value,
/// or nil.
const ACQUIRE: &str = r#"
local held = redis.call('GET', KEYS[1])
if held and string.sub(held, 1, #ARGV[1] + 1) ~= ARGV[1] .. ' ' then
  return false
end
epoch_floor(KEYS[2], 0)
local value = ARGV[1] .. ' ' .. redis.call('INCR', KEYS[2]) .. '/' .. ARGV[3]
redis.call('SET', KEYS[1], value, 'PX', ARGV[2])
return value
"#;

/// Extends a lease still held with this value. When the lease is gone and
/// no holding was made since ours (the shard's epoch is not past ours), the
/// store lost it, restarting empty or letting it lapse unseen: nobody else
/// can have written the shard, so it is taken again, under a new epoch.
/// A lease held under a later epoch by this very process (the same node
/// id and instance) is its own too: a renewal of it that timed out ran
/// late (the store stalled) and took it back under that value.
/// KEYS: lease, epoch, tombstones. ARGV: value, TTL ms, node id, our
/// epoch, instance. Returns the value now held (the same, or the new one)
/// and how many tombstones another node left for the shard, or nil when
/// the lease is lost.
const RENEW: &str = r#"
local held = redis.call('GET', KEYS[1])
if held == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return {held, redis.call('HLEN', KEYS[3])}
end
if held then
  local id, epoch, instance = string.match(held, '^(.*) (%d+)/(%x+)$')
  if id == ARGV[3] and instance == ARGV[5] and tonumber(epoch) > tonumber(ARGV[4]) then
    redis.call('PEXPIRE', KEYS[1], ARGV[2])
    return {held, redis.call('HLEN', KEYS[3])}
  end
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
local value = ARGV[3] .. ' ' .. redis.call('INCR', KEYS[2]) .. '/' .. ARGV[5]
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

/// Who asks for a lease: a node id, and the process acting as it now.
#[derive(Debug, Clone, Copy)]
pub struct Holder<'a> {
    pub node: &'a str,
    /// This process's instance, in hex (`NodeInfo::instance`).
    pub instance: &'a str,
}

pub async fn acquire(
    conn: &Conn,
    shard: ShardId,
    holder: Holder<'_>,
    ttl: Duration,
) -> Result<Option<String>, StoreError> {
    let mut call = ACQUIRE_SCRIPT.prepare_invoke();
    call.key(keys::lease(shard))
        .key(keys::epoch(shard))
        .arg(holder.node)
        .arg(millis(ttl))
        .arg(holder.instance);
    Ok(conn.invoke(&call).await?)
}

/// What renewing a lease found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Renewal {
    /// Still ours, extended.
    Renewed,
    /// The store had lost it and nobody took it since (or a renewal of
    /// ours that timed out took it back): ours again, under this value.
    Reclaimed(String),
    /// Another holding has been made since: no longer ours.
    Lost,
}

/// The epoch of a lease value `<node id> <epoch>/<instance>` (or, as
/// values were before instances, `<node id> <epoch>`).
pub fn epoch_of(value: &str) -> u64 {
    value
        .rsplit_once(' ')
        .and_then(|(_, e)| e.split('/').next())
        .and_then(|e| e.parse().ok())
        .unwrap_or(0)
}

/// Renews a lease; also says whether another node left tombstones for the
/// shard (removals it could not write before losing it), for the holder
/// to apply.
pub async fn renew(
    conn: &Conn,
    shard: ShardId,
    holder: Holder<'_>,
    value: &str,
    ttl: Duration,
) -> Result<(Renewal, bool), StoreError> {
    let mut call = RENEW_SCRIPT.prepare_invoke();
    call.key(keys::lease(shard))
        .key(keys::epoch(shard))
        .key(keys::tombstones(shard))
        .arg(value)
        .arg(millis(ttl))
        .arg(holder.node)
        .arg(epoch_of(value))
        .arg(holder.instance);
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

    const N0: Holder = Holder {
        node: "n0",
        instance: "a1",
    };
    /// Another process started with the same node id.
    const TWIN: Holder = Holder {
        node: "n0",
        instance: "b2",
    };

    const TTL: Duration = Duration::from_secs(5);

    /// A private Redis where `n0` holds the shard's lease.
    async fn held_by_n0() -> (
        hexfleet_testkit::RedisServer,
        crate::store::redis::RedisStore,
        String,
    ) {
        let redis = hexfleet_testkit::RedisServer::start();
        let store = crate::store::redis::RedisStore::connect(&redis.url())
            .await
            .expect("connect");
        let held = acquire(store.conn(), shard(), N0, TTL)
            .await
            .expect("acquire")
            .expect("a free lease");
        (redis, store, held)
    }

    /// The scripts against a real Redis that loses its data: a value given
    /// before is never given again, to the renewing holder or to another
    /// process of its id.
    #[tokio::test]
    async fn a_store_that_lost_its_data_gives_no_value_twice() {
        let (_redis, store, first) = held_by_n0().await;
        let conn = store.conn();
        let (shard, ttl) = (shard(), TTL);
        // Epochs start from the store's clock, in milliseconds.
        assert!(epoch_of(&first) > 1_700_000_000_000, "{first}");
        assert!(
            first.starts_with("n0 ") && first.ends_with("/a1"),
            "{first}"
        );
        let again = acquire(conn, shard, N0, ttl).await.expect("acquire");
        assert!(again
            .as_deref()
            .is_some_and(|v| epoch_of(v) == epoch_of(&first) + 1));
        let held = again.expect("held");
        let flush = || async {
            let _: () = conn.cmd(&redis::cmd("FLUSHALL")).await.expect("FLUSHALL");
        };
        // Lost with the data: the holder takes it back under a newer epoch.
        flush().await;
        let (renewal, _) = renew(conn, shard, N0, &held, ttl).await.expect("renew");
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
        let twin = acquire(conn, shard, TWIN, ttl)
            .await
            .expect("acquire")
            .expect("a free lease");
        assert_ne!(twin, reclaimed);
        assert_ne!(twin, held);
        // The first one's renewal now finds it another holding's.
        let (renewal, _) = renew(conn, shard, N0, &reclaimed, ttl)
            .await
            .expect("renew");
        assert_eq!(renewal, Renewal::Lost);
        assert!(release(conn, shard, &twin).await.expect("release"));
    }

    /// A renewal that timed out while the store stalled, and ran when it
    /// came back, took the lapsed lease back under a new value the node
    /// never heard of: the node's next renewal, under the old value, finds
    /// it its own; another process of its id would not.
    #[tokio::test]
    async fn a_renewal_that_ran_after_it_timed_out_leaves_the_lease_its_own() {
        let (_redis, store, held) = held_by_n0().await;
        let conn = store.conn();
        let (shard, ttl) = (shard(), TTL);
        let lapse = || async {
            let _: () = conn
                .cmd(redis::cmd("DEL").arg(keys::lease(shard)))
                .await
                .expect("DEL");
        };
        lapse().await;
        // The renewal whose answer never came.
        let (late, _) = renew(conn, shard, N0, &held, ttl).await.expect("renew");
        let Renewal::Reclaimed(unheard) = late else {
            panic!("{late:?}")
        };
        // The next one, under the value the node still holds.
        let (next, _) = renew(conn, shard, N0, &held, ttl).await.expect("renew");
        assert_eq!(next, Renewal::Reclaimed(unheard.clone()));
        // Renewed as ever under it.
        let (after, _) = renew(conn, shard, N0, &unheard, ttl).await.expect("renew");
        assert_eq!(after, Renewal::Renewed);
        // A twin holding the old value is not given it.
        let (twin, _) = renew(conn, shard, TWIN, &held.replace("/a1", "/b2"), ttl)
            .await
            .expect("renew");
        assert_eq!(twin, Renewal::Lost);
    }
}
