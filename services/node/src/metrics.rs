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
    registry::{Metric, Registry},
};

type Labels = [(&'static str, &'static str); 1];
type Labels2 = [(&'static str, &'static str); 2];
/// HTTP requests by route (the matched pattern, so ids do not multiply
/// series) and status.
type HttpLabels = [(&'static str, String); 2];

/// The content type of [`Metrics::render`]'s output.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

pub struct Metrics {
    registry: Registry,
    pub connections: Gauge,
    pub connections_accepted: Counter,
    pub websocket_sessions: Counter,
    refused: Family<Labels, Counter>,
    pub sessions_lost: Counter,
    pub sessions_goodbye: Counter,
    rate_limited: Family<Labels, Counter>,
    pub subscriptions_replaced: Counter,
    pub fixes_accepted: Counter,
    rejected: [Counter; RejectReason::ALL.len()],
    pub fixes_time_corrected: Counter,
    pub device_clock_offset_seconds: Histogram,
    pub vehicles: Gauge<i64, std::sync::atomic::AtomicI64>,
    pub vehicles_evicted: Counter,
    pub store_flush_seconds: Histogram,
    pub store_flush_batch_size: Histogram,
    pub store_flush_errors: Counter,
    pub store_refused: Counter,
    pub store_pending: Gauge<u64, AtomicU64>,
    pub store_fenced: Counter,
    pub store_foreign_dropped: Counter,
    pub store_tombstones_left: Counter,
    pub store_tombstones_applied: Counter,
    pub sessions_redirected: Counter,
    pub handoffs: Counter,
    pub cluster_nodes: Gauge,
    pub cluster_silent: Gauge,
    pub cluster_unreachable: Gauge,
    pub unreachable_for_clients: Gauge,
    peer_probes: Family<Labels, Counter>,
    pub probes_answered: Counter,
    pub peers_unreached: Gauge,
    pub clients_report_unreachable: Counter,
    pub drivers_forwarded: Counter,
    pub forwarded_sessions: Gauge,
    pub fixes_relayed: Counter,
    forward_ended: Family<Labels, Counter>,
    pub shards_held: Gauge,
    pub shards_taken_over: Counter,
    pub shards_released: Counter,
    pub cluster_cut_off: Counter,
    pub shards_reclaimed: Counter,
    pub replicas: Gauge,
    pub bus_batches: Counter,
    pub bus_resnapshots: Counter,
    pub bus_delay_seconds: Histogram,
    pub subscribers: Gauge,
    pub subscribed_cells: Gauge,
    pub mailbox_coalesced: Counter,
    pub mailbox_depth: Histogram,
    delta_items: [Counter; 3],
    pub delta_frames: Counter,
    pub delta_delay_seconds: Histogram,
    pub dashboards: Gauge,
    dashboard_errors: Family<Labels, Counter>,
    pub density_cells_sent: Counter,
    sessions: Family<Labels, Gauge>,
    pub handshakes: Gauge,
    connections_refused: Family<Labels, Counter>,
    pub handshakes_retried: Counter,
    http_requests: Family<HttpLabels, Counter>,
    pub http_connections: Gauge,
    http_dropped: Family<Labels, Counter>,
    reloads: Family<Labels2, Counter>,
    /// QUIC's UDP datagrams (each GSO/GRO segment counted) and bytes, by
    /// direction: `[received, sent]`.
    pub udp_datagrams: [Counter; 2],
    pub udp_bytes: [Counter; 2],
    pub store_up: Gauge,
    pub zones: Gauge<i64, std::sync::atomic::AtomicI64>,
    pub zone_cells: Gauge<i64, std::sync::atomic::AtomicI64>,
    pub zone_tests: Counter,
    zone_events: Family<Labels2, Counter>,
    pub zone_event_delay_seconds: Histogram,
    pub zone_events_dropped: Counter,
    pub zone_relay_errors: Counter,
}

/// The kinds of delta item, as counted.
#[derive(Debug, Clone, Copy)]
pub enum DeltaKind {
    Added = 0,
    Moved = 1,
    Removed = 2,
}

/// Registers `metric` under `name` and hands it back.
fn registered<M: Metric + Clone>(registry: &mut Registry, name: &str, help: &str, metric: M) -> M {
    registry.register(name, help, metric.clone());
    metric
}

/// One counter of `family` per value of its label, resolved once, so the
/// hot path counts with one atomic add and no label lookup.
fn labelled<const N: usize>(
    family: Family<Labels, Counter>,
    label: &'static str,
    values: [&'static str; N],
) -> [Counter; N] {
    values.map(|value| family.get_or_create_owned(&[(label, value)]))
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut r = Registry::with_prefix("hexfleet");
        // Fields are registered in the order written, which is the order
        // /metrics lists them in.
        Self {
            connections: registered(
                &mut r,
                "connections",
                "Open driver and rider connections (QUIC, or WebSocket where UDP is blocked)",
                Gauge::default(),
            ),
            connections_accepted: registered(
                &mut r,
                "connections_accepted",
                "Driver and rider connections accepted: QUIC handshakes completed and WebSockets opened",
                Counter::default(),
            ),
            websocket_sessions: registered(
                &mut r,
                "websocket_sessions",
                "Driver and rider connections over WebSocket, from clients whose UDP is blocked",
                Counter::default(),
            ),
            refused: registered(
                &mut r,
                "sessions_refused",
                "Sessions closed with an error, by error code",
                Family::default(),
            ),
            sessions_lost: registered(
                &mut r,
                "sessions_lost",
                "Sessions whose connection went away without a Goodbye: closed or reset by the peer, or idle past the timeout",
                Counter::default(),
            ),
            sessions_goodbye: registered(
                &mut r,
                "sessions_goodbye",
                "Sessions the client ended with a Goodbye",
                Counter::default(),
            ),
            rate_limited: registered(
                &mut r,
                "requests_rate_limited",
                "Requests refused because their connection was over its request budget, by role",
                Family::default(),
            ),
            subscriptions_replaced: registered(
                &mut r,
                "subscriptions_replaced",
                "Subscription changes replaced by a newer one from the same connection before the fan-out applied them",
                Counter::default(),
            ),
            fixes_accepted: registered(&mut r, "fixes_accepted", "Driver fixes accepted", Counter::default()),
            rejected: labelled(
                registered(&mut r, "fixes_rejected", "Driver fixes rejected, by reason", Family::default()),
                "reason",
                RejectReason::ALL.map(RejectReason::as_str),
            ),
            fixes_time_corrected: registered(
                &mut r,
                "fixes_time_corrected",
                "Driver fixes whose time was put in node time, their device's clock being off by more than ingest.clock_tolerance",
                Counter::default(),
            ),
            device_clock_offset_seconds: registered(
                &mut r,
                "device_clock_offset_seconds",
                "How far off drivers' device clocks are (either way), once per session and on each change",
                Histogram::new([0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0, 300.0, 3_600.0, 86_400.0]),
            ),
            vehicles: registered(&mut r, "vehicles", "Live vehicles in this node's table", Gauge::default()),
            vehicles_evicted: registered(
                &mut r,
                "vehicles_evicted",
                "Vehicles evicted after not being heard from for stale_after",
                Counter::default(),
            ),
            store_flush_seconds: registered(
                &mut r,
                "store_flush_seconds",
                "Time to write one flush to the store",
                Histogram::new(exponential_buckets(0.000_1, 2.0, 16)),
            ),
            store_flush_batch_size: registered(
                &mut r,
                "store_flush_batch_size",
                "Vehicle changes written per flush",
                Histogram::new(exponential_buckets(1.0, 2.0, 18)),
            ),
            store_flush_errors: registered(
                &mut r,
                "store_flush_errors",
                "Flushes the store refused; their changes are retried",
                Counter::default(),
            ),
            store_refused: registered(
                &mut r,
                "store_refused",
                "Vehicle changes the store refused for their content; dropped, the rest of their flush written",
                Counter::default(),
            ),
            store_pending: registered(
                &mut r,
                "store_pending",
                "Vehicle changes waiting for the next flush",
                Gauge::default(),
            ),
            store_fenced: registered(
                &mut r,
                "store_fenced",
                "Shard flushes refused because the shard's lease was not the one held (their changes wait until the lease is checked)",
                Counter::default(),
            ),
            store_tombstones_left: registered(
                &mut r,
                "store_tombstones_left",
                "Removals this node could not write (the shard had passed to another node), left in the store for the shard's holder",
                Counter::default(),
            ),
            store_tombstones_applied: registered(
                &mut r,
                "store_tombstones_applied",
                "Vehicles this node let go because another node removed them before losing their shard",
                Counter::default(),
            ),
            store_foreign_dropped: registered(
                &mut r,
                "store_foreign_dropped",
                "Staged changes dropped because their shard belongs to another node",
                Counter::default(),
            ),
            sessions_redirected: registered(
                &mut r,
                "sessions_redirected",
                "Sessions sent to the node that owns their shard",
                Counter::default(),
            ),
            handoffs: registered(
                &mut r,
                "handoffs",
                "Drivers handed to another node (crossed into its shard, or their shard moved)",
                Counter::default(),
            ),
            cluster_nodes: registered(&mut r, "cluster_nodes", "Live nodes this node sees", Gauge::default()),
            cluster_silent: registered(
                &mut r,
                "cluster_silent_nodes",
                "Live nodes that have not renewed their membership for 1.5 renewal intervals while this node has: their shards' drivers go to their successors",
                Gauge::default(),
            ),
            cluster_unreachable: registered(
                &mut r,
                "cluster_unreachable_nodes",
                "Live nodes most of their peers cannot reach at their client (QUIC) address: no client is redirected there; their drivers' fixes are forwarded",
                Gauge::default(),
            ),
            unreachable_for_clients: registered(
                &mut r,
                "cluster_unreachable_for_clients",
                "1 while this node's peers cannot reach its client address (its clients probably cannot either)",
                Gauge::default(),
            ),
            peer_probes: registered(
                &mut r,
                "peer_probes",
                "Probes of peers' client addresses, by outcome: answered, failed",
                Family::default(),
            ),
            probes_answered: registered(
                &mut r,
                "probes_answered",
                "Peers' probes of this node's client address answered",
                Counter::default(),
            ),
            peers_unreached: registered(
                &mut r,
                "peers_unreached",
                "Peers whose client address this node's last three probes or more failed to reach",
                Gauge::default(),
            ),
            clients_report_unreachable: registered(
                &mut r,
                "clients_report_unreachable",
                "Clients that said they could not connect to a node they were redirected to",
                Counter::default(),
            ),
            drivers_forwarded: registered(
                &mut r,
                "drivers_forwarded",
                "Driver sessions kept here and relayed to their shard's owner, which its client cannot reach",
                Counter::default(),
            ),
            forwarded_sessions: registered(
                &mut r,
                "forwarded_sessions",
                "Driver sessions being relayed to their shard's owner now",
                Gauge::default(),
            ),
            fixes_relayed: registered(
                &mut r,
                "fixes_relayed",
                "Fixes relayed driver sessions passed on to their shard's owner",
                Counter::default(),
            ),
            forward_ended: registered(
                &mut r,
                "forward_ended",
                "Relayed driver sessions ended, by how: goodbye, lost (the client), redirected, refused, owner_unavailable (the owner could not take it, or its side ended)",
                Family::default(),
            ),
            shards_held: registered(&mut r, "shards_held", "Shard leases this node holds", Gauge::default()),
            shards_taken_over: registered(
                &mut r,
                "shards_taken_over",
                "Shard leases acquired (and their vehicles loaded from the store)",
                Counter::default(),
            ),
            shards_released: registered(
                &mut r,
                "shards_released",
                "Shard leases given up or lost",
                Counter::default(),
            ),
            cluster_cut_off: registered(
                &mut r,
                "cluster_cut_off",
                "Times this node stopped serving its shards, cut from the store while its peers reached it",
                Counter::default(),
            ),
            shards_reclaimed: registered(
                &mut r,
                "shards_reclaimed",
                "Shard leases the store had lost (a restart) and nobody took since, held again with the shard's vehicles kept",
                Counter::default(),
            ),
            replicas: registered(&mut r, "replicas", "Remote shards replicated from the bus", Gauge::default()),
            bus_batches: registered(&mut r, "bus_batches", "Bus batches applied to replicas", Counter::default()),
            bus_resnapshots: registered(
                &mut r,
                "bus_resnapshots",
                "Replicas read again from the store after a gap in their bus sequence",
                Counter::default(),
            ),
            bus_delay_seconds: registered(
                &mut r,
                "bus_delay_seconds",
                "From a fix reaching its owner node to its change applied to a replica here",
                Histogram::new(exponential_buckets(0.000_5, 2.0, 14)),
            ),
            subscribers: registered(&mut r, "subscribers", "Riders and dashboards subscribed", Gauge::default()),
            subscribed_cells: registered(
                &mut r,
                "subscribed_cells",
                "Cells watched, summed over subscribers",
                Gauge::default(),
            ),
            mailbox_coalesced: registered(
                &mut r,
                "mailbox_coalesced",
                "Changes folded into one already waiting in a subscriber's mailbox",
                Counter::default(),
            ),
            mailbox_depth: registered(
                &mut r,
                "mailbox_depth",
                "Changes waiting in a subscriber's mailbox when its writer took them: how far behind subscribers run",
                Histogram::new(exponential_buckets(1.0, 4.0, 9)),
            ),
            delta_items: labelled(
                registered(&mut r, "delta_items", "Delta items sent to subscribers, by kind", Family::default()),
                "kind",
                ["added", "moved", "removed"],
            ),
            udp_datagrams: labelled(
                registered(&mut r, "udp_datagrams", "QUIC UDP datagrams, by direction (each segment of a batch counted)", Family::default()),
                "direction",
                ["received", "sent"],
            ),
            udp_bytes: labelled(
                registered(&mut r, "udp_bytes", "QUIC UDP payload bytes, by direction", Family::default()),
                "direction",
                ["received", "sent"],
            ),
            delta_frames: registered(&mut r, "delta_frames", "Update frames sent to subscribers", Counter::default()),
            delta_delay_seconds: registered(
                &mut r,
                "delta_delay_seconds",
                "From a fix reaching the node to its delta written to a subscriber's stream",
                Histogram::new(exponential_buckets(0.000_5, 2.0, 14)),
            ),
            dashboards: registered(&mut r, "dashboards", "Dashboard WebSocket connections open", Gauge::default()),
            dashboard_errors: registered(
                &mut r,
                "dashboard_errors",
                "Dashboard requests answered with an error, or sockets closed, by reason",
                Family::default(),
            ),
            density_cells_sent: registered(
                &mut r,
                "density_cells_sent",
                "Per-cell counts sent to dashboards in density mode",
                Counter::default(),
            ),
            sessions: registered(
                &mut r,
                "sessions",
                "Open sessions past Hello, by role",
                Family::default(),
            ),
            handshakes: registered(
                &mut r,
                "handshakes",
                "QUIC handshakes in progress",
                Gauge::default(),
            ),
            connections_refused: registered(
                &mut r,
                "connections_refused",
                "Connections refused before a session, by limit: node_limit, address_limit, handshake_limit (QUIC), http_address_limit",
                Family::default(),
            ),
            handshakes_retried: registered(
                &mut r,
                "handshakes_retried",
                "QUIC Initials answered with a Retry (address validation under load)",
                Counter::default(),
            ),
            http_requests: registered(
                &mut r,
                "http_requests",
                "HTTP requests answered, by route and status",
                Family::default(),
            ),
            http_connections: registered(
                &mut r,
                "http_connections",
                "Open HTTP connections on the public listener, WebSockets included",
                Gauge::default(),
            ),
            http_dropped: registered(
                &mut r,
                "http_connections_dropped",
                "HTTP connections the node ended, by reason: header_timeout (slow or silent client), tls_handshake, tls_timeout, error",
                Family::default(),
            ),
            reloads: registered(
                &mut r,
                "reloads",
                "Reloads of the certificate (what=tls) and token keys (what=auth), by result",
                Family::default(),
            ),
            store_up: registered(
                &mut r,
                "store_up",
                "1 while the store answers, 0 while it does not (the node keeps serving from memory)",
                Gauge::default(),
            ),
            zones: registered(&mut r, "zones", "Zones this node applies", Gauge::default()),
            zone_cells: registered(
                &mut r,
                "zone_cells",
                "Cells the zone index holds (edge cells, and compacted inside cells)",
                Gauge::default(),
            ),
            zone_tests: registered(
                &mut r,
                "zone_tests",
                "Exact point-in-polygon tests made for fixes in zones' edge cells",
                Counter::default(),
            ),
            zone_events: registered(
                &mut r,
                "zone_events",
                "Zone events this node moved to the event stream, by event and cause (summed over the nodes: each event once)",
                Family::default(),
            ),
            zone_event_delay_seconds: registered(
                &mut r,
                "zone_event_delay_seconds",
                "From the fix (or change) that caused a zone event to the event in the stream",
                Histogram::new(exponential_buckets(0.000_5, 2.0, 14)),
            ),
            zone_events_dropped: registered(
                &mut r,
                "zone_events_dropped",
                "Zone events dropped: too many waiting for the store, or their shard had passed to another node (which recounts)",
                Counter::default(),
            ),
            zone_relay_errors: registered(
                &mut r,
                "zone_relay_errors",
                "Failed attempts to move events from a shard's outbox to the stream (retried)",
                Counter::default(),
            ),
            registry: r,
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

    /// Open sessions of `role` (a gauge: inc when it starts, dec when it ends).
    pub fn sessions(&self, role: Role) -> Gauge {
        self.sessions
            .get_or_create_owned(&[("role", role.as_str())])
    }

    pub fn probes(&self, answered: bool) -> Counter {
        let outcome = if answered { "answered" } else { "failed" };
        self.peer_probes
            .get_or_create_owned(&[("outcome", outcome)])
    }

    pub fn forward_ended(&self, how: &'static str) -> Counter {
        self.forward_ended.get_or_create_owned(&[("how", how)])
    }

    pub fn connection_refused(&self, reason: &'static str) -> Counter {
        self.connections_refused
            .get_or_create_owned(&[("reason", reason)])
    }

    pub fn http_request(&self, route: &str, status: u16) -> Counter {
        self.http_requests
            .get_or_create_owned(&[("route", route.to_string()), ("status", status.to_string())])
    }

    pub fn http_dropped(&self, reason: &'static str) -> Counter {
        self.http_dropped.get_or_create_owned(&[("reason", reason)])
    }

    /// Zone events moved to the stream, by event and cause.
    pub fn zone_event(&self, event: &'static str, cause: &'static str) -> Counter {
        self.zone_events
            .get_or_create_owned(&[("event", event), ("cause", cause)])
    }

    pub fn reload(&self, what: &'static str, ok: bool) -> Counter {
        let result = if ok { "ok" } else { "failed" };
        self.reloads
            .get_or_create_owned(&[("what", what), ("result", result)])
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
    fn every_metric_the_grafana_dashboard_plots_exists() {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../../deploy/grafana/hexfleet.json");
        let dashboard = std::fs::read_to_string(path).unwrap();
        // A labelled family shows once it has a series.
        let m = Metrics::new();
        m.sessions(Role::Driver).inc();
        m.connection_refused("address_limit").inc();
        m.http_request("/v1/cluster", 200).inc();
        m.http_dropped("header_timeout").inc();
        m.reload("tls", true).inc();
        m.refused(ErrorCode::SlowConsumer).inc();
        m.rate_limited(Role::Rider).inc();
        m.dashboard_error("slow_consumer").inc();
        let exposed = m.render();
        let mut plotted = 0;
        for (at, _) in dashboard.match_indices("hexfleet_") {
            let name: String = dashboard[at..]
                .chars()
                .take_while(|c| c.is_ascii_lowercase() || *c == '_')
                .collect();
            let family = ["_total", "_bucket", "_count", "_sum"]
                .iter()
                .find_map(|suffix| name.strip_suffix(suffix))
                .unwrap_or(&name);
            assert!(
                exposed.contains(&format!("# TYPE {family} ")),
                "the dashboard plots {name}, which the node does not expose"
            );
            plotted += 1;
        }
        assert!(plotted > 20, "{plotted} metrics plotted");
    }

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
