//! The tasks that keep zones moving between the store and the node.
//!
//! - [`follow_zones`]: reads the zones changed since the version this node
//!   has (every `zones.poll_interval`), tiles them off the runtime's
//!   threads, applies them, and gives the vehicles in them their
//!   memberships again.
//! - [`relay_events`]: moves events from the shards' outboxes to the
//!   stream, right after a flush wrote them, and sweeps every shard now and
//!   then for what a node that died left behind.
//! - [`show_events`]: reads the stream on, for this node's dashboards: every
//!   node shows every event, whichever node wrote it.
//! - [`share_counts`]: in a cluster, leaves this node's live counts per zone
//!   in the store for the others.

use std::{collections::HashMap, sync::Arc, time::Duration};

use hexfleet_model::{ShardId, VehicleState, ZoneId};
use tokio_util::sync::CancellationToken;

use super::{tally, Zone, ZoneSpec, Zones};
use crate::{
    clock, cluster::Cluster, ingest::Ingest, metrics::Metrics, store::writer::StoreWriter,
    store::Store,
};

/// Follows the store's zones until shutdown, from `version` (what
/// [`catch_up`] reached at the start).
pub async fn follow_zones(
    store: Arc<dyn Store>,
    zones: Arc<Zones>,
    ingest: Arc<Ingest>,
    mut version: u64,
    interval: Duration,
    shutdown: CancellationToken,
) {
    let mut ticker = tokio::time::interval(interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = ticker.tick() => {}
            _ = shutdown.cancelled() => return,
        }
        if let Err(e) = catch_up(store.as_ref(), &zones, &ingest, &mut version).await {
            tracing::warn!(error = %e, "reading zone changes; retrying");
        }
    }
}

/// Applies every zone change since `version` (paging, so a thousand zones
/// put at once apply in one pass), tiled off the runtime's threads, and
/// gives the vehicles in changed zones their memberships again. Once it has
/// succeeded, the zones are known ([`Zones::mark_loaded`]).
pub async fn catch_up(
    store: &dyn Store,
    zones: &Zones,
    ingest: &Ingest,
    version: &mut u64,
) -> Result<(), crate::store::StoreError> {
    loop {
        let changes = store.zone_changes(*version).await?;
        if changes.zones.is_empty() {
            zones.mark_loaded();
            return Ok(());
        }
        *version = changes.version;
        let res = ingest.cells.index_res();
        let limits = zones.limits;
        let tiled = tokio::task::spawn_blocking(move || {
            changes
                .zones
                .into_iter()
                .map(|(id, feature)| {
                    let zone = feature.and_then(|f| tile(&id, &f, limits, res));
                    (id, zone)
                })
                .collect::<Vec<_>>()
        })
        .await
        .map_err(|e| crate::store::StoreError::Unwritable(format!("tiling zones: {e}")))?;
        let changed = zones.apply(tiled);
        if !changed.is_empty() && zones.is_loaded() {
            let looked = ingest.rezone(&changed);
            tracing::info!(
                zones = changed.len(),
                vehicles = looked,
                version = *version,
                "zones changed"
            );
        }
    }
}

/// A stored zone, parsed and tiled; `None` (logged) if it no longer passes,
/// which only a hand-edited store or a tightened limit can cause.
fn tile(
    id: &ZoneId,
    feature: &str,
    limits: super::ZoneLimits,
    res: h3o::Resolution,
) -> Option<Arc<Zone>> {
    let zone = ZoneSpec::parse(id.clone(), feature.as_bytes(), limits)
        .and_then(|spec| Zone::new(spec, res));
    match zone {
        Ok(zone) => Some(Arc::new(zone)),
        Err(e) => {
            tracing::warn!(zone = %id, error = %e, "a stored zone is not valid here; ignored");
            None
        }
    }
}

/// How often every shard's outbox is looked at, for events a node that
/// stopped left there.
const SWEEP_EVERY: Duration = Duration::from_secs(5);

/// Moves zone events from the shards' outboxes to the stream until
/// shutdown (and once more after).
pub async fn relay_events(
    store: Arc<dyn Store>,
    writer: Arc<StoreWriter>,
    cluster: Option<Arc<Cluster>>,
    metrics: Arc<Metrics>,
    shutdown: CancellationToken,
) {
    let mut sweep = tokio::time::interval(SWEEP_EVERY);
    sweep.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let stopping = tokio::select! {
            _ = writer.outboxes_written().notified() => false,
            _ = sweep.tick() => {
                // This node's shards: each outbox is swept by its owner.
                let owned = |s: &ShardId| cluster.as_ref().is_none_or(|c| c.owns(*s));
                match store.shards().await {
                    Ok(shards) => shards.into_iter().filter(owned).for_each(|s| writer.relay(s)),
                    Err(e) => tracing::debug!(error = %e, "listing shards to sweep their outboxes"),
                }
                false
            }
            _ = shutdown.cancelled() => true,
        };
        for shard in writer.take_outboxes() {
            match store.relay_zone_events(shard).await {
                Ok(events) => {
                    let now = clock::now_ms();
                    for e in &events {
                        metrics.zone_event(e.event.as_str(), e.cause.as_str()).inc();
                        let waited = now.saturating_sub(e.at_ms).max(0);
                        metrics
                            .zone_event_delay_seconds
                            .observe(waited as f64 / 1e3);
                    }
                }
                Err(e) => {
                    metrics.zone_relay_errors.inc();
                    tracing::warn!(%shard, error = %e, "relaying zone events; retrying");
                    // Left in the outbox: the next sweep moves them.
                }
            }
        }
        if stopping {
            return;
        }
    }
}

/// How often the stream is read for dashboards.
const SHOW_EVERY: Duration = Duration::from_millis(100);

/// Reads the event stream on and shows each event to this node's
/// dashboards, until shutdown.
pub async fn show_events(store: Arc<dyn Store>, zones: Arc<Zones>, shutdown: CancellationToken) {
    let mut cursor: Option<String> = None;
    let mut ticker = tokio::time::interval(SHOW_EVERY);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = ticker.tick() => {}
            _ = shutdown.cancelled() => return,
        }
        // Nobody watching: nothing to read; whoever comes sees from then on.
        if !zones.has_listeners() {
            cursor = None;
            continue;
        }
        loop {
            match store.zone_events(cursor.as_deref(), 1000).await {
                Ok((next, events)) => {
                    let more = events.len() == 1000;
                    cursor = Some(next);
                    for event in events {
                        zones.publish(event);
                    }
                    if !more {
                        break;
                    }
                }
                Err(e) => {
                    tracing::debug!(error = %e, "reading zone events");
                    break;
                }
            }
        }
    }
}

/// Live counts per zone, by status.
pub type ZoneCounts = HashMap<ZoneId, super::StatusTally>;

/// A node's counts per shard it keeps vehicles in.
pub type ShardCounts = HashMap<ShardId, ZoneCounts>;

/// How often a node shares its counts, and how long they last.
pub const COUNTS_EVERY: Duration = Duration::from_secs(1);
const COUNTS_TTL: Duration = Duration::from_secs(3);

/// What a node leaves in the store: its counts per shard, so that a shard
/// two nodes count at once is counted once (see [`merged`]). Shards by
/// their H3 index.
#[derive(Debug, Default, serde::Serialize, serde::Deserialize)]
struct Shared {
    shards: Vec<(u64, ZoneCounts)>,
}

/// This node's counts per shard, from its own vehicles.
pub fn local_counts(ingest: &Ingest) -> ShardCounts {
    let mut states: HashMap<ShardId, Vec<VehicleState>> = HashMap::new();
    ingest.table.each_entry(|e| {
        if !e.state.zones.is_empty() {
            states.entry(e.shard).or_default().push(e.state.clone());
        }
    });
    states
        .into_iter()
        .map(|(shard, states)| (shard, tally(&states)))
        .collect()
}

/// Counts over shards, each counted once: by the node `owner` names for it
/// when that node counted it, otherwise by the node that counted the most
/// vehicles there. Two nodes count a shard at once when one went silent
/// (its last shared counts still hold its vehicles) and the node that will
/// own the shard already took its drivers in, and for a moment in a
/// hand-off.
pub fn merged(
    reports: &[(&str, ShardCounts)],
    owner: impl Fn(ShardId) -> Option<String>,
) -> ZoneCounts {
    let size = |counts: &ZoneCounts| -> u64 {
        counts
            .values()
            .flat_map(|tally| tally.iter())
            .map(|n| u64::from(*n))
            .sum()
    };
    let mut by_shard: HashMap<ShardId, Vec<(&str, &ZoneCounts)>> = HashMap::new();
    for (node, shards) in reports {
        for (shard, counts) in shards {
            by_shard.entry(*shard).or_default().push((node, counts));
        }
    }
    let mut total = ZoneCounts::new();
    for (shard, counted) in by_shard {
        let owner = owner(shard);
        let chosen = counted
            .iter()
            .find(|(node, _)| owner.as_deref() == Some(*node))
            .or_else(|| counted.iter().max_by_key(|(_, counts)| size(counts)));
        if let Some((_, counts)) = chosen {
            add(&mut total, counts);
        }
    }
    total
}

fn add(into: &mut ZoneCounts, counts: &ZoneCounts) {
    for (zone, tally) in counts {
        let mine = into.entry(zone.clone()).or_default();
        for (a, b) in mine.iter_mut().zip(tally) {
            *a += b;
        }
    }
}

/// Leaves this node's counts in the store every second, until shutdown.
pub async fn share_counts(
    store: Arc<dyn Store>,
    ingest: Arc<Ingest>,
    node: String,
    shutdown: CancellationToken,
) {
    let mut ticker = tokio::time::interval(COUNTS_EVERY);
    loop {
        tokio::select! {
            _ = ticker.tick() => {}
            _ = shutdown.cancelled() => return,
        }
        let shared = Shared {
            shards: local_counts(&ingest)
                .into_iter()
                .map(|(shard, counts)| (u64::from(shard.0), counts))
                .collect(),
        };
        let Ok(bytes) = rmp_serde::to_vec(&shared) else {
            continue;
        };
        if let Err(e) = store.put_zone_counts(&node, &bytes, COUNTS_TTL).await {
            tracing::debug!(error = %e, "sharing zone counts");
        }
    }
}

/// The counts another node shared, per shard; `None` if they do not
/// decode.
pub fn decode_counts(bytes: &[u8]) -> Option<ShardCounts> {
    let Ok(shared) = rmp_serde::from_slice::<Shared>(bytes) else {
        tracing::warn!("a node's shared zone counts do not decode");
        return None;
    };
    Some(
        shared
            .shards
            .into_iter()
            .filter_map(|(shard, counts)| {
                let cell = h3o::CellIndex::try_from(shard).ok()?;
                Some((ShardId(cell), counts))
            })
            .collect(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shard(lon: f64) -> ShardId {
        let cell = h3o::LatLng::new(59.9, lon)
            .expect("a position")
            .to_cell(h3o::Resolution::Five);
        ShardId(cell)
    }

    /// Counts of one zone: `available` vehicles available.
    fn counts(available: u32) -> ZoneCounts {
        let mut tally = crate::zones::StatusTally::default();
        tally[hexfleet_model::VehicleStatus::Available as usize] = available;
        HashMap::from([(ZoneId::new("airport").expect("an id"), tally)])
    }

    fn available(total: &ZoneCounts) -> u32 {
        total.values().map(|t| t.iter().sum::<u32>()).sum()
    }

    #[test]
    fn a_shard_two_nodes_count_is_counted_once_by_its_owner() {
        let (a, b) = (shard(10.0), shard(11.0));
        // n1 went silent with 5 vehicles in `a` and 2 in `b`; n2, which
        // owns `a` now, took 3 of them in already; n3 counts 4 in `b`,
        // which n1 still owns.
        let reports = [
            ("n1", HashMap::from([(a, counts(5)), (b, counts(2))])),
            ("n2", HashMap::from([(a, counts(3))])),
            ("n3", HashMap::from([(b, counts(4))])),
        ];
        let owner = |s: ShardId| Some(if s == a { "n2" } else { "n1" }.to_string());
        assert_eq!(available(&merged(&reports, owner)), 3 + 2);
        // An owner that counted nothing there: the largest count stands.
        let nobody = |_| Some("n9".to_string());
        assert_eq!(available(&merged(&reports, nobody)), 5 + 4);
        // One node alone: all of it.
        assert_eq!(available(&merged(&reports[..1], |_| None)), 7);
    }

    #[test]
    fn shared_counts_go_through_the_store_and_back() {
        let a = shard(10.0);
        let shared = Shared {
            shards: vec![(u64::from(a.0), counts(2))],
        };
        let bytes = rmp_serde::to_vec(&shared).expect("encodes");
        let back = decode_counts(&bytes).expect("decodes");
        assert_eq!(back.get(&a).map(available), Some(2));
        assert!(decode_counts(b"not counts").is_none());
    }
}
