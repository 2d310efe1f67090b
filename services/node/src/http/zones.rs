//! `/v1/zones`: operators' zones (GeoJSON), their live counts and queues.
//!
//! - `PUT /v1/zones/{id}`: a GeoJSON Feature (Polygon or MultiPolygon,
//!   holes allowed; properties `name`, `kind`, `filter`). 400 with the
//!   reason for a zone that is not valid; 409 when the cluster holds its
//!   maximum of zones. Applied on this node at once, on the others within
//!   `zones.poll_interval`.
//! - `GET /v1/zones`: every zone, as a FeatureCollection, with its counts.
//! - `GET /v1/zones/{id}`, `DELETE /v1/zones/{id}`.
//! - `GET /v1/zones/{id}/vehicles`: the zone's vehicles by status, each
//!   list in order of entry (the airport queue), and the counts.

use std::sync::Arc;

use axum::{
    body::Bytes,
    extract::{Path, State},
    http::StatusCode,
    response::{IntoResponse, Response},
    Json,
};
use hexfleet_model::{VehicleStatus, ZoneId};
use serde_json::{json, Value};

use super::{Api, ApiError};
use crate::zones::{
    sync::ZoneCounts,
    view::{self, entered_ms},
    StatusTally, Zone, ZoneSpec,
};

/// How long a `PUT` waits for its turn to be checked and tiled.
const TILING_WAIT: std::time::Duration = std::time::Duration::from_secs(10);

fn zone_id(raw: &str) -> Result<ZoneId, ApiError> {
    ZoneId::new(raw).map_err(|e| ApiError::bad_request(e.to_string()))
}

fn counts_json(tally: &StatusTally) -> Value {
    let mut counts = serde_json::Map::new();
    for status in VehicleStatus::ALL {
        counts.insert(status.as_str().into(), tally[status as usize].into());
    }
    counts.insert("total".into(), tally.iter().sum::<u32>().into());
    Value::Object(counts)
}

/// A zone's Feature with its cover size and counts in its properties.
fn feature(zone: &Zone, counts: &ZoneCounts) -> Value {
    let mut feature = zone.spec.to_feature();
    if let Some(properties) = feature["properties"].as_object_mut() {
        properties.insert("area_km2".into(), zone.spec.area_km2.into());
        let tally = counts.get(zone.id()).copied().unwrap_or_default();
        properties.insert("counts".into(), counts_json(&tally));
    }
    feature
}

async fn counts(api: &Api) -> Result<ZoneCounts, ApiError> {
    view::counts(&api.ingest, api.store.as_ref(), api.cluster.as_deref())
        .await
        .map_err(ApiError::store)
}

pub(super) async fn put(
    State(api): State<Api>,
    Path(id): Path<String>,
    body: Bytes,
) -> Result<Response, ApiError> {
    let id = zone_id(&id)?;
    let limits = api.zones.limits;
    let res = api.cells.index_res();
    // Validation and tiling cost up to a second for the largest zone: off
    // the runtime, and a few at a time.
    let _turn = tokio::time::timeout(TILING_WAIT, api.zones.tiling.acquire())
        .await
        .ok()
        .and_then(Result::ok)
        .ok_or_else(|| {
            ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "busy checking other zones: try again",
            )
        })?;
    let tiled = tokio::task::spawn_blocking(move || {
        ZoneSpec::parse(id, &body, limits).and_then(|spec| Zone::new(spec, res))
    })
    .await
    .map_err(|_| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "tiling the zone failed"))?;
    let zone = Arc::new(tiled.map_err(|e| ApiError::bad_request(e.to_string()))?);
    let stored = zone.spec.to_feature().to_string();
    let version = api
        .store
        .put_zone(zone.id(), &stored, api.zones.max_zones)
        .await
        .map_err(ApiError::store)?;
    if version.is_none() {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            format!(
                "the cluster holds its maximum of {} zones: delete one first",
                api.zones.max_zones
            ),
        ));
    }
    let existed = api.zones.get(zone.id()).is_some();
    let changed = api
        .zones
        .apply(vec![(zone.id().clone(), Some(zone.clone()))]);
    api.ingest.rezone(&changed);
    let status = if existed {
        StatusCode::OK
    } else {
        StatusCode::CREATED
    };
    let mut answer = feature(&zone, &counts(&api).await.unwrap_or_default());
    answer["properties"]["cells"] = zone.cover_len().into();
    Ok((status, Json(answer)).into_response())
}

pub(super) async fn list(State(api): State<Api>) -> Result<Json<Value>, ApiError> {
    let counts = counts(&api).await?;
    let mut zones: Vec<Arc<Zone>> = api.zones.read().zones().values().cloned().collect();
    zones.sort_by(|a, b| a.id().cmp(b.id()));
    let features: Vec<Value> = zones.iter().map(|z| feature(z, &counts)).collect();
    Ok(Json(
        json!({"type": "FeatureCollection", "features": features}),
    ))
}

fn known(api: &Api, id: &ZoneId) -> Result<Arc<Zone>, ApiError> {
    api.zones
        .get(id)
        .ok_or_else(|| ApiError::new(StatusCode::NOT_FOUND, format!("no zone {id}")))
}

pub(super) async fn get(
    State(api): State<Api>,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let zone = known(&api, &zone_id(&id)?)?;
    Ok(Json(feature(&zone, &counts(&api).await?)))
}

pub(super) async fn delete(
    State(api): State<Api>,
    Path(id): Path<String>,
) -> Result<StatusCode, ApiError> {
    let id = zone_id(&id)?;
    if !api.store.delete_zone(&id).await.map_err(ApiError::store)? {
        return Err(ApiError::new(
            StatusCode::NOT_FOUND,
            format!("no zone {id}"),
        ));
    }
    let changed = api.zones.apply(vec![(id, None)]);
    api.ingest.rezone(&changed);
    Ok(StatusCode::NO_CONTENT)
}

pub(super) async fn vehicles(
    State(api): State<Api>,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let zone = known(&api, &zone_id(&id)?)?;
    let queue = view::queue(
        &api.ingest,
        api.store.as_ref(),
        api.cluster.as_deref(),
        &zone,
    )
    .await
    .map_err(ApiError::store)?;
    let mut tally = StatusTally::default();
    let mut by_status = serde_json::Map::new();
    for status in VehicleStatus::ALL {
        by_status.insert(status.as_str().into(), Value::Array(Vec::new()));
    }
    for state in &queue {
        tally[state.status as usize] += 1;
        let item = json!({
            "id": state.id.as_str(),
            "entered_ms": entered_ms(state, zone.id()),
            "lat": state.lat,
            "lon": state.lon,
            "class": state.class,
            "seen_ms": state.seen_ms,
        });
        if let Some(Value::Array(list)) = by_status.get_mut(state.status.as_str()) {
            list.push(item);
        }
    }
    Ok(Json(json!({
        "zone": zone.id().as_str(),
        "name": zone.spec.name,
        "counts": counts_json(&tally),
        "vehicles": by_status,
    })))
}
