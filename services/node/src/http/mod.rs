//! The node's HTTP APIs (axum).
//!
//! - The public API ([`router`]): vehicle queries, answered from this
//!   node's memory for the vehicles it holds and from the store for those
//!   of other nodes, so they answer the same on any node of a Redis-backed
//!   cluster; and the cluster's membership and ownership (`/v1/cluster`). Every request needs
//!   `Authorization: Bearer <token>` with a role that may read positions
//!   (`dashboard`); others get 401.
//! - The admin API ([`admin_router`]), on its own listener: `/metrics`,
//!   `/healthz` (details), `/livez` (the process serves: liveness) and
//!   `/readyz` (started and not shutting down: readiness). It answers from
//!   early in the start, so a cluster node waiting for Redis is live but
//!   not ready. No tokens, so
//!   Prometheus and probes need none; keep it off the public network.
//!
//! [`server`] is the listener that serves them, with its limits and TLS.

pub mod server;
mod zones;

use std::{
    collections::{HashMap, HashSet},
    sync::Arc,
};

use axum::{
    extract::{MatchedPath, Path, Query, Request, State},
    http::{header, StatusCode},
    middleware::{self, Next},
    response::{IntoResponse, Response},
    routing::get,
    Json, Router,
};
use hexfleet_model::{CellModel, Position, ShardId, VehicleId, VehicleState, MAX_INDEXED_LAT};
use hexfleet_protocol::Role;
use serde::{Deserialize, Serialize};
use serde_json::json;
use tokio_util::sync::CancellationToken;

use crate::{
    auth::Auth,
    clock,
    cluster::Cluster,
    config::HttpConfig,
    metrics::{self, Metrics},
    store::{nearest_first, NearbyQuery, Store},
    table::VehicleTable,
};

#[derive(Clone)]
pub struct Api {
    pub node_id: Arc<str>,
    pub store: Arc<dyn Store>,
    /// This node's vehicles: the nearby API answers for its shards from it.
    pub table: Arc<VehicleTable>,
    pub cells: CellModel,
    pub metrics: Arc<Metrics>,
    pub limits: HttpConfig,
    pub cluster: Option<Arc<Cluster>>,
    pub auth: Arc<Auth>,
    /// Cancelled when the node starts shutting down (`/readyz` turns 503).
    pub shutdown: CancellationToken,
    /// Set once the node has started: a cluster node waits for Redis to
    /// join, live but not ready.
    pub ready: Arc<std::sync::atomic::AtomicBool>,
    pub zones: Arc<crate::zones::Zones>,
    /// Where zone changes re-place the vehicles this node holds.
    pub ingest: Arc<crate::ingest::Ingest>,
}

/// The public API; every route needs a reader's token.
pub fn router(api: Api) -> Router {
    Router::new()
        .route("/v1/vehicles", get(nearby))
        .route("/v1/vehicles/{id}", get(vehicle))
        .route("/v1/cluster", get(cluster))
        .route("/v1/zones", get(zones::list))
        .route(
            "/v1/zones/{id}",
            get(zones::get).put(zones::put).delete(zones::delete),
        )
        .route("/v1/zones/{id}/vehicles", get(zones::vehicles))
        .route_layer(middleware::from_fn_with_state(api.clone(), require_reader))
        // Peers ask it without a token: it tells only whether this node
        // reaches its store (see `cluster::reach`).
        .route("/v1/cluster/reach", get(reach))
        .fallback(|| async { ApiError::new(StatusCode::NOT_FOUND, "no such endpoint") })
        .with_state(api)
}

/// The admin API: metrics and probes, no tokens.
pub fn admin_router(api: Api) -> Router {
    Router::new()
        .route("/healthz", get(healthz))
        .route("/livez", get(|| async { "ok" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .fallback(|| async { ApiError::new(StatusCode::NOT_FOUND, "no such endpoint") })
        .with_state(api)
}

/// Counts every answer by route pattern and status (`http_requests`).
pub async fn count_requests(
    State(metrics): State<Arc<Metrics>>,
    request: Request,
    next: Next,
) -> Response {
    let route = request
        .extensions()
        .get::<MatchedPath>()
        .map_or_else(|| "unmatched".to_string(), |p| p.as_str().to_string());
    let response = next.run(request).await;
    metrics
        .http_request(&route, response.status().as_u16())
        .inc();
    response
}

/// Lets a request through only with `Authorization: Bearer <token>` for a
/// role that may read positions.
async fn require_reader(State(api): State<Api>, request: Request, next: Next) -> Response {
    let token = request
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    let refused = match token {
        None => "a token is required: Authorization: Bearer <token>".to_string(),
        Some(token) => match api.auth.verify_for(token, Role::Dashboard, clock::now_s()) {
            Ok(_) => return next.run(request).await,
            Err(e) => format!("token refused: {e}"),
        },
    };
    let mut response = ApiError::new(StatusCode::UNAUTHORIZED, refused).into_response();
    response.headers_mut().insert(
        header::WWW_AUTHENTICATE,
        header::HeaderValue::from_static("Bearer realm=\"hexfleet\""),
    );
    response
}

/// How long `/healthz` waits for the store's answer.
const PING_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(1);

async fn readyz(State(api): State<Api>) -> Response {
    if api.shutdown.is_cancelled() {
        (StatusCode::SERVICE_UNAVAILABLE, "shutting down").into_response()
    } else if !api.ready.load(std::sync::atomic::Ordering::Acquire) {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            "starting: joining the cluster through Redis",
        )
            .into_response()
    } else {
        "ready".into_response()
    }
}

/// An error answer: a status and a JSON body `{"error": "..."}`.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    message: String,
}

impl ApiError {
    fn new(status: StatusCode, message: impl Into<String>) -> Self {
        Self {
            status,
            message: message.into(),
        }
    }

    fn bad_request(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, message)
    }

    fn store(e: crate::store::StoreError) -> Self {
        Self::new(
            StatusCode::SERVICE_UNAVAILABLE,
            format!("store unavailable: {e}"),
        )
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.status, Json(json!({ "error": self.message }))).into_response()
    }
}

/// The node's health in detail. A store that does not answer makes the
/// node `degraded`, not dead: it keeps serving live positions from memory
/// and rewrites them when the store is back, so the status stays 200 and
/// an orchestrator does not restart a node that is doing its job.
async fn healthz(State(api): State<Api>) -> Response {
    // A probe must not wait on a store that hangs.
    let store = match tokio::time::timeout(PING_TIMEOUT, api.store.ping()).await {
        Ok(answer) => answer.map_err(|e| e.to_string()),
        Err(_) => Err(format!("no answer within {PING_TIMEOUT:?}")),
    };
    api.metrics.store_up.set(i64::from(store.is_ok()));
    let status = StatusCode::OK;
    let body = json!({
        "node": &*api.node_id,
        "status": if store.is_ok() { "ok" } else { "degraded" },
        "store": {
            "kind": api.store.kind(),
            "ok": store.is_ok(),
            "error": store.err(),
        },
    });
    (status, Json(body)).into_response()
}

async fn metrics(State(api): State<Api>) -> Response {
    (
        [(header::CONTENT_TYPE, metrics::CONTENT_TYPE)],
        api.metrics.render(),
    )
        .into_response()
}

async fn vehicle(
    State(api): State<Api>,
    Path(id): Path<String>,
) -> Result<Json<VehicleState>, ApiError> {
    let id = VehicleId::new(&id).map_err(|e| ApiError::bad_request(e.to_string()))?;
    if let Some(entry) = api.table.get(&id) {
        return Ok(Json(entry.state));
    }
    match api.store.vehicle(&id).await.map_err(ApiError::store)? {
        Some(state) => Ok(Json(state)),
        None => Err(ApiError::new(
            StatusCode::NOT_FOUND,
            format!("no live vehicle {id}"),
        )),
    }
}

#[derive(Serialize)]
struct NearbyItem {
    #[serde(flatten)]
    state: VehicleState,
    distance_m: f64,
}

#[derive(Serialize)]
struct NearbyAnswer {
    count: usize,
    vehicles: Vec<NearbyItem>,
}

/// Which of the shards' lease keys (and the live set's key) this node
/// reaches, for a peer whose own renewals are late.
#[derive(Deserialize)]
struct ReachQuery {
    #[serde(default)]
    shards: String,
    #[serde(default)]
    members: bool,
}

async fn reach(
    State(api): State<Api>,
    Query(q): Query<ReachQuery>,
) -> Result<Json<hexfleet_protocol::bus::PeerReach>, ApiError> {
    let Some(cluster) = &api.cluster else {
        return Err(ApiError::new(
            StatusCode::NOT_FOUND,
            "this node is not in a cluster",
        ));
    };
    let mut shards = Vec::new();
    for s in q.shards.split(',').filter(|s| !s.is_empty()) {
        let shard = s
            .parse::<ShardId>()
            .map_err(|e| ApiError::bad_request(format!("shard {s:?}: {e}")))?;
        shards.push(shard);
    }
    if shards.len() > crate::cluster::reach::MAX_ASKED {
        return Err(ApiError::bad_request(format!(
            "at most {} shards at once",
            crate::cluster::reach::MAX_ASKED
        )));
    }
    match cluster.reach(&shards, q.members).await {
        Some(reach) => Ok(Json(reach)),
        None => Err(ApiError::new(
            StatusCode::TOO_MANY_REQUESTS,
            "too many reach questions at once; ask again shortly",
        )),
    }
}

/// Reads a required or optional numeric parameter with a clear complaint.
fn number(
    params: &HashMap<String, String>,
    name: &str,
    default: Option<f64>,
) -> Result<f64, ApiError> {
    match params.get(name) {
        Some(raw) => raw
            .parse::<f64>()
            .ok()
            .filter(|v| v.is_finite())
            .ok_or_else(|| {
                ApiError::bad_request(format!("{name} must be a finite number, not {raw:?}"))
            }),
        None => default.ok_or_else(|| ApiError::bad_request(format!("{name} is required"))),
    }
}

async fn nearby(
    State(api): State<Api>,
    Query(params): Query<HashMap<String, String>>,
) -> Result<Json<NearbyAnswer>, ApiError> {
    const DEFAULT_LIMIT: f64 = 50.0;
    let lat = number(&params, "lat", None)?;
    let lon = number(&params, "lon", None)?;
    let radius_m = number(&params, "radius_m", None)?;
    let limit = number(&params, "limit", Some(DEFAULT_LIMIT))?;
    let center = Position::new(lat, lon).map_err(|e| ApiError::bad_request(e.to_string()))?;
    if !center.is_indexable() {
        return Err(ApiError::bad_request(format!(
            "lat must be within ±{MAX_INDEXED_LAT}°, the range the geo index holds"
        )));
    }
    let max_radius = api.limits.max_nearby_radius_m;
    if !(radius_m > 0.0 && radius_m <= max_radius) {
        return Err(ApiError::bad_request(format!(
            "radius_m must be in (0, {max_radius}]"
        )));
    }
    let max_limit = api.limits.max_nearby_limit;
    if !(limit >= 1.0 && limit <= max_limit as f64 && limit.fract() == 0.0) {
        return Err(ApiError::bad_request(format!(
            "limit must be a whole number in [1, {max_limit}]"
        )));
    }
    let limit = limit as usize;
    // This node's own shards are answered from memory; only the shards of
    // other nodes in a cluster (if any reach the circle) from the store.
    let remote: Vec<ShardId> = match &api.cluster {
        Some(cluster) => api
            .cells
            .shards_within(center, radius_m + cluster.handoff_distance_m())
            .into_iter()
            .filter(|&s| !cluster.owns(s))
            .collect(),
        None => Vec::new(),
    };
    let mut found = api.table.nearby(&api.cells, center, radius_m, limit);
    if !remote.is_empty() {
        let query = NearbyQuery {
            center,
            radius_m,
            limit,
            shards: remote,
        };
        let stored = api.store.nearby(&query).await.map_err(ApiError::store)?;
        // A vehicle handed over a moment ago may be in both.
        let here: HashSet<VehicleId> = found.iter().map(|n| n.state.id.clone()).collect();
        found.extend(stored.into_iter().filter(|n| !here.contains(&n.state.id)));
        found = nearest_first(found, limit);
    }
    let vehicles: Vec<NearbyItem> = found
        .into_iter()
        .map(|n| NearbyItem {
            state: n.state,
            distance_m: n.distance_m,
        })
        .collect();
    Ok(Json(NearbyAnswer {
        count: vehicles.len(),
        vehicles,
    }))
}

/// The live nodes, the shards each holds (and the peers whose client
/// address each one's probes fail to reach), those silent (not renewing:
/// their shards' drivers go to their successors), those unreachable for
/// clients (no client is sent there; their drivers' fixes are forwarded)
/// and those away (unreachable past `cluster.unreachable_handoff`: they own
/// nothing), and, for `?lat=&lon=`, the shard there and the node that owns
/// it.
async fn cluster(
    State(api): State<Api>,
    Query(params): Query<HashMap<String, String>>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let at = match (params.get("lat"), params.get("lon")) {
        (None, None) => None,
        _ => {
            let lat = number(&params, "lat", None)?;
            let lon = number(&params, "lon", None)?;
            let p = Position::new(lat, lon).map_err(|e| ApiError::bad_request(e.to_string()))?;
            Some(p)
        }
    };
    let Some(cluster) = &api.cluster else {
        let shard = at.map(|p| api.cells.locate(p).1.to_string());
        return Ok(Json(json!({
            "node": &*api.node_id,
            "clustered": false,
            "nodes": [{ "id": &*api.node_id, "shards": "all" }],
            "owner": shard.map(|shard| json!({ "shard": shard, "node": &*api.node_id })),
        })));
    };
    let live = cluster.live();
    let owner = at.map(|p| {
        let shard = api.cells.locate(p).1;
        let node = live.owner(shard);
        json!({
            "shard": shard.to_string(),
            "node": node.map(|n| n.id.clone()),
            "quic": node.map(|n| n.quic.clone()),
            "http": node.map(|n| n.http.clone()),
        })
    });
    Ok(Json(json!({
        "node": &*api.node_id,
        "clustered": true,
        "nodes": live.nodes.values().collect::<Vec<_>>(),
        "silent": live.silent,
        "unreachable": live.unreachable,
        "away": live.away,
        "owner": owner,
    })))
}
