//! The node's metrics, exposed at `GET /metrics` in the OpenMetrics text
//! format (what `prometheus-client` writes), under OpenMetrics' own content
//! type, so Prometheus parses it as such and keeps every metric's type. Each node has its own registry (no global recorder), so several
//! nodes can be embedded in one process, as tests and the demo do.
//!
//! Hot-path metrics are plain atomics resolved once at start: counting a fix
//! is one atomic add, never a label lookup.

use std::sync::atomic::AtomicU64;

use hexfleet_protocol::{ErrorCode, RejectReason, Role};
use prometheus_client::{
    encoding::text::encode,
    metrics::{
        counter::Counter,
        family::Family,
        gauge::Gauge,
        histogram::{exponential_buckets, Histogram},
    },
    registry::Registry,
};

type Labels = [(&'static str, &'static str); 1];

/// The content type of [`Metrics::render`]'s output.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

pub struct Metrics {
    registry: Registry,
    pub connections: Gauge,
    pub connections_accepted: Counter,
    refused: Family<Labels, Counter>,
    pub sessions_lost: Counter,
    pub sessions_goodbye: Counter,
    rate_limited: Family<Labels, Counter>,
    pub subscriptions_replaced: Counter,
    pub fixes_accepted: Counter,
    rejected: [Counter; RejectReason::ALL.len()],
    pub vehicles: Gauge<i64, std::sync::atomic::AtomicI64>,
    pub vehicles_evicted: Counter,
    pub store_flush_seconds: Histogram,
    pub store_flush_batch_size: Histogram,
    pub store_flush_errors: Counter,
    pub store_refused: Counter,
    pub store_pending: Gauge<u64, AtomicU64>,
    pub subscribers: Gauge,
    pub subscribed_cells: Gauge,
    pub mailbox_coalesced: Counter,
    delta_items: [Counter; 3],
    pub delta_frames: Counter,
    pub delta_delay_seconds: Histogram,
    pub dashboards: Gauge,
    dashboard_errors: Family<Labels, Counter>,
    pub density_cells_sent: Counter,
}

/// The kinds of delta item, as counted.
#[derive(Debug, Clone, Copy)]
pub enum DeltaKind {
    Added = 0,
    Moved = 1,
    Removed = 2,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("hexfleet");
        let connections = Gauge::default();
        registry.register("connections", "Open QUIC connections", connections.clone());
        let connections_accepted = Counter::default();
        registry.register(
            "connections_accepted",
            "QUIC connections that completed the handshake",
            connections_accepted.clone(),
        );
        let refused = Family::<Labels, Counter>::default();
        registry.register(
            "sessions_refused",
            "Sessions closed with an error, by error code",
            refused.clone(),
        );
        let sessions_lost = Counter::default();
        registry.register(
            "sessions_lost",
            "Sessions whose connection went away without a Goodbye: closed or reset by the peer, or idle past the timeout",
            sessions_lost.clone(),
        );
        let sessions_goodbye = Counter::default();
        registry.register(
            "sessions_goodbye",
            "Sessions the client ended with a Goodbye",
            sessions_goodbye.clone(),
        );
        let rate_limited = Family::<Labels, Counter>::default();
        registry.register(
            "requests_rate_limited",
            "Requests refused because their connection was over its request budget, by role",
            rate_limited.clone(),
        );
        let subscriptions_replaced = Counter::default();
        registry.register(
            "subscriptions_replaced",
            "Subscription changes replaced by a newer one from the same connection before the fan-out applied them",
            subscriptions_replaced.clone(),
        );
        let fixes_accepted = Counter::default();
        registry.register(
            "fixes_accepted",
            "Driver fixes accepted",
            fixes_accepted.clone(),
        );
        let rejected_family = Family::<Labels, Counter>::default();
        registry.register(
            "fixes_rejected",
            "Driver fixes rejected, by reason",
            rejected_family.clone(),
        );
        let rejected = RejectReason::ALL
            .map(|r| rejected_family.get_or_create_owned(&[("reason", r.as_str())]));
        let vehicles = Gauge::default();
        registry.register(
            "vehicles",
            "Live vehicles in this node's table",
            vehicles.clone(),
        );
        let vehicles_evicted = Counter::default();
        registry.register(
            "vehicles_evicted",
            "Vehicles evicted after not being heard from for stale_after",
            vehicles_evicted.clone(),
        );
        let store_flush_seconds = Histogram::new(exponential_buckets(0.000_1, 2.0, 16));
        registry.register(
            "store_flush_seconds",
            "Time to write one flush to the store",
            store_flush_seconds.clone(),
        );
        let store_flush_batch_size = Histogram::new(exponential_buckets(1.0, 2.0, 18));
        registry.register(
            "store_flush_batch_size",
            "Vehicle changes written per flush",
            store_flush_batch_size.clone(),
        );
        let store_flush_errors = Counter::default();
        registry.register(
            "store_flush_errors",
            "Flushes the store refused; their changes are retried",
            store_flush_errors.clone(),
        );
        let store_refused = Counter::default();
        registry.register(
            "store_refused",
            "Vehicle changes the store refused for their content; dropped, the rest of their flush written",
            store_refused.clone(),
        );
        let store_pending = Gauge::default();
        registry.register(
            "store_pending",
            "Vehicle changes waiting for the next flush",
            store_pending.clone(),
        );
        let subscribers = Gauge::default();
        registry.register(
            "subscribers",
            "Riders and dashboards subscribed",
            subscribers.clone(),
        );
        let subscribed_cells = Gauge::default();
        registry.register(
            "subscribed_cells",
            "Cells watched, summed over subscribers",
            subscribed_cells.clone(),
        );
        let mailbox_coalesced = Counter::default();
        registry.register(
            "mailbox_coalesced",
            "Changes folded into one already waiting in a subscriber's mailbox",
            mailbox_coalesced.clone(),
        );
        let delta_family = Family::<Labels, Counter>::default();
        registry.register(
            "delta_items",
            "Delta items sent to subscribers, by kind",
            delta_family.clone(),
        );
        let delta_items =
            ["added", "moved", "removed"].map(|k| delta_family.get_or_create_owned(&[("kind", k)]));
        let delta_frames = Counter::default();
        registry.register(
            "delta_frames",
            "Update frames sent to subscribers",
            delta_frames.clone(),
        );
        let delta_delay_seconds = Histogram::new(exponential_buckets(0.000_5, 2.0, 14));
        registry.register(
            "delta_delay_seconds",
            "From a fix reaching the node to its delta written to a subscriber's stream",
            delta_delay_seconds.clone(),
        );
        let dashboards = Gauge::default();
        registry.register(
            "dashboards",
            "Dashboard WebSocket connections open",
            dashboards.clone(),
        );
        let dashboard_errors = Family::<Labels, Counter>::default();
        registry.register(
            "dashboard_errors",
            "Dashboard requests answered with an error, or sockets closed, by reason",
            dashboard_errors.clone(),
        );
        let density_cells_sent = Counter::default();
        registry.register(
            "density_cells_sent",
            "Per-cell counts sent to dashboards in density mode",
            density_cells_sent.clone(),
        );
        Self {
            registry,
            dashboards,
            dashboard_errors,
            density_cells_sent,
            delta_delay_seconds,
            subscribers,
            subscribed_cells,
            mailbox_coalesced,
            delta_items,
            delta_frames,
            connections,
            connections_accepted,
            refused,
            sessions_lost,
            sessions_goodbye,
            rate_limited,
            subscriptions_replaced,
            fixes_accepted,
            rejected,
            vehicles,
            vehicles_evicted,
            store_flush_seconds,
            store_flush_batch_size,
            store_flush_errors,
            store_refused,
            store_pending,
        }
    }

    pub fn rejected(&self, reason: RejectReason) -> &Counter {
        &self.rejected[reason as usize]
    }

    pub fn delta_items(&self, kind: DeltaKind) -> &Counter {
        &self.delta_items[kind as usize]
    }

    /// Dashboard requests refused and sockets closed, by reason: `bad_request`,
    /// `unauthorized`, `slow_consumer`.
    pub fn dashboard_error(&self, reason: &'static str) -> Counter {
        self.dashboard_errors
            .get_or_create_owned(&[("reason", reason)])
    }

    /// Requests refused for being over budget, by role.
    pub fn rate_limited(&self, role: Role) -> Counter {
        self.rate_limited
            .get_or_create_owned(&[("role", role.as_str())])
    }

    pub fn refused(&self, code: ErrorCode) -> Counter {
        self.refused.get_or_create_owned(&[("code", code.as_str())])
    }

    /// The OpenMetrics text exposition of every metric.
    pub fn render(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = encode(&mut out, &self.registry);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rejections_are_counted_under_their_reason() {
        let m = Metrics::new();
        m.rejected(RejectReason::TooFast).inc();
        m.rejected(RejectReason::TooFast).inc();
        m.rejected(RejectReason::NullIsland).inc();
        let text = m.render();
        assert!(
            text.contains("hexfleet_fixes_rejected_total{reason=\"too_fast\"} 2"),
            "{text}"
        );
        assert!(text.contains("hexfleet_fixes_rejected_total{reason=\"null_island\"} 1"));
        assert!(text.contains("hexfleet_fixes_rejected_total{reason=\"stale_seq\"} 0"));
    }
}
