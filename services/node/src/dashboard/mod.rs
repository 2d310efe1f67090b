//! Dispatch dashboards: the page at `/` and its live feed at `GET /v1/ws`.
//!
//! A dashboard authenticates with a dashboard-role token (`?token=` — a
//! browser cannot set headers on a WebSocket — or `Authorization: Bearer`).
//! A socket without a valid one is accepted and closed at once with
//! `unauthorized` (4401) and the reason, which a browser can show; a
//! refused upgrade would only say "failed".

mod page;
mod session;
mod zones;

use std::{collections::HashMap, sync::Arc, time::Duration};

use axum::{
    extract::{
        ws::{CloseFrame, Message, WebSocket, WebSocketUpgrade},
        Query, State,
    },
    http::{header, HeaderMap, StatusCode},
    response::{IntoResponse, Response},
    routing::get,
    Json, Router,
};
use hexfleet_model::CellModel;
use hexfleet_protocol::{dashboard::Format, ErrorCode, Role};
use serde_json::json;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::{
    clock, config::DashboardConfig, fanout::FanOut, metrics::Metrics, table::VehicleTable,
};

const READ_BUFFER: usize = 4 * 1024;

/// What every dashboard connection of a node shares.
pub struct Dashboards {
    pub node_id: String,
    pub cells: CellModel,
    pub fanout: Arc<FanOut>,
    pub table: Arc<VehicleTable>,
    pub config: DashboardConfig,
    pub slow_consumer_after: Duration,
    pub auth: Arc<crate::auth::Auth>,
    pub metrics: Arc<Metrics>,
    pub shutdown: CancellationToken,
    /// Where `find` looks for vehicles this node does not hold.
    pub store: Arc<dyn crate::store::Store>,
    /// In a cluster, a dashboard showing counts has the shards under its
    /// viewport replicated here.
    pub clustered: bool,
    /// Zones drawn on the map, with their counts, queues and events.
    pub zones: Arc<crate::zones::Zones>,
    pub ingest: Arc<crate::ingest::Ingest>,
    pub cluster: Option<Arc<crate::cluster::Cluster>>,
}

pub fn router(dashboards: Arc<Dashboards>) -> Router {
    Router::new()
        .route("/v1/ws", get(upgrade))
        .merge(page::router())
        .with_state(dashboards)
}

async fn upgrade(
    State(dashboards): State<Arc<Dashboards>>,
    Query(params): Query<HashMap<String, String>>,
    headers: HeaderMap,
    ws: WebSocketUpgrade,
) -> Response {
    let format = match params.get("format").map(String::as_str) {
        None | Some("json") => Format::Json,
        Some("msgpack") => Format::MsgPack,
        Some(other) => {
            let error = format!("format must be json or msgpack, not {other:?}");
            return (StatusCode::BAD_REQUEST, Json(json!({ "error": error }))).into_response();
        }
    };
    let bearer = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    let token = params.get("token").map(String::as_str).or(bearer);
    let authorized = match token {
        None => Err("a dashboard token is required (?token=...)".to_string()),
        Some(token) => dashboards
            .auth
            .verify_for(token, Role::Dashboard, clock::now_s())
            .map_err(|e| format!("dashboard token refused: {e}")),
    };
    let max = dashboards.config.max_message_bytes;
    ws.max_message_size(max)
        .max_frame_size(max)
        // tungstenite reads through a 128 KiB buffer by default, allocated
        // per connection; requests are small.
        .read_buffer_size(READ_BUFFER)
        .write_buffer_size(0)
        .on_upgrade(move |socket| async move {
            match authorized {
                Ok(claims) => {
                    let expiry = crate::session::Expiry::at(claims.expires_at);
                    let span = tracing::info_span!("dashboard", id = %claims.subject);
                    session::serve(socket, format, dashboards, expiry)
                        .instrument(span)
                        .await
                }
                Err(reason) => {
                    dashboards.metrics.dashboard_error("unauthorized").inc();
                    close_with(socket, ErrorCode::Unauthorized, reason).await;
                }
            }
        })
}

/// Closes a socket with a code and reason, without waiting long for a peer
/// that does not read.
async fn close_with(mut socket: WebSocket, code: ErrorCode, reason: String) {
    let frame = CloseFrame {
        code: code.websocket_close_code(),
        reason: reason.into(),
    };
    let _ = tokio::time::timeout(
        Duration::from_secs(1),
        socket.send(Message::Close(Some(frame))),
    )
    .await;
}
