//! What the zones hold now, the same on any node: counts by status and each
//! zone's queue (its vehicles in order of entry). This node's vehicles come
//! from its table; in a cluster, counts come from what the other nodes
//! share every second, and a queue reads the other nodes' shards of the
//! zone from the store.

use std::collections::HashSet;

use hexfleet_model::{ShardId, VehicleState, ZoneId};

use super::{
    sync::{decode_counts, local_counts, merged, ShardCounts, ZoneCounts},
    Zone,
};
use crate::{
    cluster::Cluster,
    ingest::Ingest,
    store::{Store, StoreError},
};

/// Live counts per zone, by status, over the whole fleet.
pub async fn counts(
    ingest: &Ingest,
    store: &dyn Store,
    cluster: Option<&Cluster>,
) -> Result<ZoneCounts, StoreError> {
    let mine = local_counts(ingest);
    let Some(cluster) = cluster else {
        return Ok(merged(&[("", mine)], |_| None));
    };
    let others: Vec<String> = cluster
        .live()
        .nodes
        .into_keys()
        .filter(|id| id != cluster.node_id())
        .collect();
    let shared = store.zone_counts(&others).await?;
    let mut reports: Vec<(&str, ShardCounts)> = vec![(cluster.node_id(), mine)];
    for (node, bytes) in others.iter().zip(shared) {
        if let Some(counts) = bytes.as_deref().and_then(decode_counts) {
            reports.push((node, counts));
        }
    }
    Ok(merged(&reports, |shard| cluster.owner(shard).map(|n| n.id)))
}

/// [`counts`], computed at most once a second for all who ask.
pub async fn shared_counts(
    zones: &super::Zones,
    ingest: &Ingest,
    store: &dyn Store,
    cluster: Option<&Cluster>,
) -> Result<std::sync::Arc<ZoneCounts>, StoreError> {
    if let Some(counts) = zones.fresh_counts() {
        return Ok(counts);
    }
    let counts = std::sync::Arc::new(counts(ingest, store, cluster).await?);
    zones.keep_counts(counts.clone());
    Ok(counts)
}

/// The vehicles in a zone, in order of entry (earliest first; a vehicle
/// that left and came back is behind those that stayed).
pub async fn queue(
    ingest: &Ingest,
    store: &dyn Store,
    cluster: Option<&Cluster>,
    zone: &Zone,
) -> Result<Vec<VehicleState>, StoreError> {
    let id = zone.id();
    let res = ingest.cells.index_res();
    let inside = |s: &VehicleState| s.zones.iter().any(|m| &m.zone == id);
    let mut found = ingest.table.in_cells(zone.cells(res), inside);
    if let Some(cluster) = cluster {
        let shards: HashSet<ShardId> = zone
            .cells(res)
            .map(|c| ingest.cells.shard_of(hexfleet_model::IndexCell(c)))
            .filter(|s| !cluster.owns(*s))
            .collect();
        let mine: HashSet<_> = found.iter().map(|s| s.id.clone()).collect();
        for shard in shards {
            for state in store.load_shard(shard).await? {
                if inside(&state) && !mine.contains(&state.id) {
                    found.push(state);
                }
            }
        }
    }
    let entered = |s: &VehicleState| {
        s.zones
            .iter()
            .find(|m| &m.zone == id)
            .map_or(i64::MAX, |m| m.entered_ms)
    };
    found.sort_by(|a, b| entered(a).cmp(&entered(b)).then_with(|| a.id.cmp(&b.id)));
    Ok(found)
}

/// When `state` entered `zone`.
pub fn entered_ms(state: &VehicleState, zone: &ZoneId) -> Option<i64> {
    state
        .zones
        .iter()
        .find(|m| &m.zone == zone)
        .map(|m| m.entered_ms)
}
