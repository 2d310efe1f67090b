//! The dashboard page: static files compiled into the binary, so a node
//! serves its own dashboard with no CDN and no internet.

use std::sync::Arc;

use axum::{http::header, response::IntoResponse, routing::get, Router};

use super::Dashboards;

const INDEX_HTML: &str = include_str!("../../web/index.html");
const APP_JS: &str = include_str!("../../web/app.js");
const STYLE_CSS: &str = include_str!("../../web/style.css");

pub(super) fn router() -> Router<Arc<Dashboards>> {
    Router::new()
        .route("/", get(|| file("text/html; charset=utf-8", INDEX_HTML)))
        .route(
            "/app.js",
            get(|| file("text/javascript; charset=utf-8", APP_JS)),
        )
        .route(
            "/style.css",
            get(|| file("text/css; charset=utf-8", STYLE_CSS)),
        )
}

async fn file(content_type: &'static str, body: &'static str) -> impl IntoResponse {
    (
        [
            (header::CONTENT_TYPE, content_type),
            // The page changes with the node: never serve a stale one.
            (header::CACHE_CONTROL, "no-cache"),
        ],
        body,
    )
}
