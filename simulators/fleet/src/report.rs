//! The end-of-run summary: a table for people, JSON for machines.

use std::{collections::BTreeMap, sync::atomic::Ordering, time::Duration};

use serde::Serialize;

use crate::{
    dashboards::{DashboardStats, ViewSummary},
    fleet::{FleetStats, Outcome},
    latency::{LatencyBook, Percentiles},
    scenario::Scenario,
};

#[derive(Debug, Serialize)]
pub struct Summary {
    pub scenario: String,
    pub node: String,
    pub seconds: f64,
    pub drivers: Clients,
    pub riders: Clients,
    pub handshake_ms: Option<Spread>,
    pub fixes: Fixes,
    pub deltas: Deltas,
    pub latency_ms: Percentiles,
    pub dashboards: Option<Dashboards>,
    pub errors: Errors,
}

/// Dashboards watching the whole city (counts) and a district (vehicles).
#[derive(Debug, Serialize)]
pub struct Dashboards {
    pub city: ViewSummary,
    pub district: ViewSummary,
    pub errors: u64,
    pub last_error: Option<String>,
}

#[derive(Debug, Serialize)]
pub struct Clients {
    pub configured: usize,
    pub connected: u64,
}

#[derive(Debug, Serialize)]
pub struct Spread {
    pub p50: f64,
    pub p99: f64,
    pub max: f64,
}

#[derive(Debug, Serialize)]
pub struct Fixes {
    pub sent: u64,
    pub sent_per_s: f64,
    pub accepted: u64,
    pub accepted_per_s: f64,
    pub deliberately_bad: u64,
    pub rejected: u64,
    pub rejected_by_reason: BTreeMap<String, u64>,
    /// Sent but neither accepted nor rejected as the node last said (each
    /// driver asks it at the end of the run): lost on the way.
    pub unacknowledged: u64,
}

#[derive(Debug, Serialize)]
pub struct Deltas {
    pub items: u64,
    pub items_per_s: f64,
    pub added: u64,
    pub moved: u64,
    pub removed: u64,
    pub frames: u64,
    pub bytes: u64,
    pub bytes_per_item: f64,
    pub snapshots: u64,
    pub rider_reconnects: u64,
}

#[derive(Debug, Serialize)]
pub struct Errors {
    pub connect: u64,
    pub send: u64,
    pub driver_reconnects: u64,
    pub last: Option<String>,
}

impl Summary {
    pub fn new(
        scenario: &Scenario,
        node: &str,
        stats: &FleetStats,
        book: &LatencyBook,
        dashboards: Option<&DashboardStats>,
        outcome: &Outcome,
        elapsed: Duration,
    ) -> Self {
        let secs = elapsed.as_secs_f64().max(1e-9);
        let sent = stats.sent.load(Ordering::Relaxed);
        let r = &outcome.riders;
        let items = r.added + r.moved + r.removed;
        Self {
            scenario: scenario.name.clone(),
            node: node.to_string(),
            seconds: secs,
            drivers: Clients {
                configured: scenario.drivers.count,
                connected: stats.connected.load(Ordering::Relaxed),
            },
            riders: Clients {
                configured: scenario.riders.count,
                connected: stats.riders_connected.load(Ordering::Relaxed),
            },
            handshake_ms: stats.connect_percentiles().map(|(p50, p99, max)| Spread {
                p50,
                p99,
                max,
            }),
            fixes: Fixes {
                sent,
                sent_per_s: sent as f64 / secs,
                accepted: outcome.accepted,
                accepted_per_s: outcome.accepted as f64 / secs,
                deliberately_bad: stats.bad_sent.load(Ordering::Relaxed),
                rejected: outcome.rejected,
                rejected_by_reason: outcome
                    .rejected_by_reason
                    .iter()
                    .map(|(reason, n)| (reason.as_str().to_string(), *n))
                    .collect(),
                unacknowledged: sent.saturating_sub(outcome.accepted + outcome.rejected),
            },
            deltas: Deltas {
                items,
                items_per_s: items as f64 / secs,
                added: r.added,
                moved: r.moved,
                removed: r.removed,
                frames: r.frames,
                bytes: r.bytes,
                bytes_per_item: r.bytes as f64 / items.max(1) as f64,
                snapshots: r.snapshots,
                rider_reconnects: r.reconnects,
            },
            latency_ms: book.percentiles(),
            dashboards: dashboards.map(|d| Dashboards {
                city: ViewSummary::of(&d.city, secs),
                district: ViewSummary::of(&d.district, secs),
                errors: d.errors.load(Ordering::Relaxed),
                last_error: d.last_error.lock().clone(),
            }),
            errors: Errors {
                connect: stats.connect_errors.load(Ordering::Relaxed),
                send: stats.send_errors.load(Ordering::Relaxed),
                driver_reconnects: stats.reconnects.load(Ordering::Relaxed),
                last: stats.last_error(),
            },
        }
    }

    pub fn print(&self) {
        let f = &self.fixes;
        let d = &self.deltas;
        let l = &self.latency_ms;
        println!();
        println!(
            "{} against {} for {:.1} s",
            self.scenario, self.node, self.seconds
        );
        println!("| | |");
        println!("|---|---|");
        println!(
            "| drivers | {} connected of {} |",
            self.drivers.connected, self.drivers.configured
        );
        if let Some(h) = &self.handshake_ms {
            println!(
                "| handshake | p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms |",
                h.p50, h.p99, h.max
            );
        }
        println!(
            "| fixes sent | {} ({:.0}/s), {} deliberately bad |",
            f.sent, f.sent_per_s, f.deliberately_bad
        );
        println!(
            "| accepted | {} ({:.0}/s, {:.2}% of sent) |",
            f.accepted,
            f.accepted_per_s,
            100.0 * f.accepted as f64 / f.sent.max(1) as f64
        );
        let reasons: Vec<String> = f
            .rejected_by_reason
            .iter()
            .map(|(r, n)| format!("{r} {n}"))
            .collect();
        println!(
            "| rejected | {} ({}) |",
            f.rejected,
            if reasons.is_empty() {
                "none".into()
            } else {
                reasons.join(", ")
            }
        );
        println!("| unacknowledged | {} |", f.unacknowledged);
        if self.riders.configured > 0 {
            println!(
                "| riders | {} at a time, {} sessions in all (riders leave and new ones come) |",
                self.riders.configured, self.riders.connected
            );
            println!(
                "| latency, fix created → rider applied | p50 {:.2} ms, p90 {:.2} ms, p99 {:.2} ms, p99.9 {:.2} ms, max {:.2} ms ({} samples) |",
                l.p50, l.p90, l.p99, l.p999, l.max, l.samples
            );
            println!(
                "| delta items | {} ({:.0}/s): {} added, {} moved, {} removed; {} frames, {} snapshots |",
                d.items, d.items_per_s, d.added, d.moved, d.removed, d.frames, d.snapshots
            );
            println!(
                "| wire | {:.1} bytes per delta item (a moved item is a {}-byte record) |",
                d.bytes_per_item,
                hexfleet_protocol::Moved::LEN
            );
        }
        if let Some(dash) = &self.dashboards {
            for (name, v) in [
                ("city (counts)", &dash.city),
                ("district (vehicles)", &dash.district),
            ] {
                println!(
                    "| dashboards, {name} | {} connected; {:.0} messages/s, {:.0} items/s in all; {:.1} KB/s each, {:.1} bytes per item |",
                    v.connected, v.messages_per_s, v.items_per_s, v.bytes_per_s / 1e3, v.bytes_per_item
                );
            }
            let l = &dash.district.latency_ms;
            println!(
                "| latency, fix created → dashboard received | p50 {:.2} ms, p90 {:.2} ms, p99 {:.2} ms, p99.9 {:.2} ms, max {:.2} ms ({} samples) |",
                l.p50, l.p90, l.p99, l.p999, l.max, l.samples
            );
            if dash.errors > 0 {
                println!(
                    "| dashboard errors | {} (last: {}) |",
                    dash.errors,
                    dash.last_error.as_deref().unwrap_or("-")
                );
            }
        }
        println!(
            "| errors | {} connect, {} send; {} driver and {} rider reconnects |",
            self.errors.connect,
            self.errors.send,
            self.errors.driver_reconnects,
            d.rider_reconnects
        );
        if let Some(e) = &self.errors.last {
            println!("| last error | {e} |");
        }
    }
}
