//! What the node (and Redis) spend per operation: CPU time read from the
//! kernel and Redis at the start and end of a steady window, divided by the
//! operations the node counted in it. Unlike a throughput, this does not
//! depend on who else is on the machine (the simulator shares its cores).

use std::{net::SocketAddr, time::Instant};

use anyhow::Context as _;
use serde::Serialize;

/// CPU time (user + system) of a process, in microseconds, from
/// `/proc/PID/stat` (clock ticks; 100 per second on Linux).
pub fn process_cpu_us(pid: u32) -> anyhow::Result<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .with_context(|| format!("reading /proc/{pid}/stat"))?;
    // The command may hold spaces and parentheses: fields start after the
    // last ')'. utime and stime are fields 14 and 15 (1-based), so the 12th
    // and 13th after it.
    let rest = stat
        .rsplit_once(')')
        .map(|(_, rest)| rest)
        .context("malformed /proc/PID/stat")?;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| -> anyhow::Result<f64> {
        fields
            .get(i)
            .and_then(|v| v.parse::<f64>().ok())
            .context("utime/stime in /proc/PID/stat")
    };
    Ok((ticks(11)? + ticks(12)?) * 1e6 / USER_HZ)
}

/// Linux reports process times in `USER_HZ` ticks, 100 per second on every
/// architecture (whatever the kernel's own tick rate).
const USER_HZ: f64 = 100.0;

/// Redis's own CPU time (user + system, all threads), in microseconds, from
/// `INFO cpu`: works for any Redis, not only one this process started.
pub async fn redis_cpu_us(redis: &redis::Client) -> anyhow::Result<f64> {
    // Under the heaviest phases the machine is full and Redis busy: wait
    // longer than the client's defaults (1 s to connect, 0.5 s to answer).
    let patient = Some(std::time::Duration::from_secs(10));
    let config = redis::AsyncConnectionConfig::new()
        .set_connection_timeout(patient)
        .set_response_timeout(patient);
    let mut conn = redis
        .get_multiplexed_async_connection_with_config(&config)
        .await?;
    let info: String = redis::cmd("INFO").arg("cpu").query_async(&mut conn).await?;
    let field = |name: &str| -> f64 {
        info.lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(':')?.trim().parse().ok())
            .unwrap_or(0.0)
    };
    Ok((field("used_cpu_user") + field("used_cpu_sys")) * 1e6)
}

/// The node's counters that operations are counted by.
#[derive(Debug, Clone, Copy, Default)]
pub struct Counters {
    pub fixes: f64,
    pub delta_items: f64,
    pub delta_frames: f64,
    pub datagrams_in: f64,
    pub datagrams_out: f64,
    pub bytes_in: f64,
    pub bytes_out: f64,
    pub nearby: f64,
}

impl Counters {
    pub fn parse(text: &str) -> Self {
        let sum = |prefix: &str, with: &str| -> f64 {
            text.lines()
                .filter(|l| l.starts_with(prefix) && l.contains(with))
                .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
                .sum()
        };
        Self {
            fixes: sum("hexfleet_fixes_accepted_total", ""),
            delta_items: sum("hexfleet_delta_items_total", ""),
            delta_frames: sum("hexfleet_delta_frames_total", ""),
            datagrams_in: sum("hexfleet_udp_datagrams_total", "\"received\""),
            datagrams_out: sum("hexfleet_udp_datagrams_total", "\"sent\""),
            bytes_in: sum("hexfleet_udp_bytes_total", "\"received\""),
            bytes_out: sum("hexfleet_udp_bytes_total", "\"sent\""),
            nearby: sum(
                "hexfleet_http_requests_total",
                "route=\"/v1/vehicles\",status=\"200\"",
            ),
        }
    }
}

/// One reading of everything a window needs.
#[derive(Debug, Clone, Copy)]
pub struct Reading {
    at: Instant,
    node_cpu_us: f64,
    redis_cpu_us: f64,
    counters: Counters,
    rss_kib: u64,
}

/// Where to read from.
pub struct Probe {
    pub node_pid: u32,
    pub admin: SocketAddr,
    pub redis: Option<redis::Client>,
    pub http: reqwest::Client,
}

impl Probe {
    pub async fn read(&self) -> anyhow::Result<Reading> {
        let text = self
            .http
            .get(format!("http://{}/metrics", self.admin))
            .send()
            .await?
            .text()
            .await?;
        let redis_cpu_us = match &self.redis {
            Some(r) => redis_cpu_us(r).await?,
            None => 0.0,
        };
        Ok(Reading {
            at: Instant::now(),
            node_cpu_us: process_cpu_us(self.node_pid)?,
            redis_cpu_us,
            counters: Counters::parse(&text),
            rss_kib: crate::bench::rss_kib(self.node_pid)?,
        })
    }
}

/// What happened between two readings.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct Window {
    pub secs: f64,
    /// Node CPU time, µs per second of wall time (1e6 = one core busy).
    pub node_cpu_us_per_s: f64,
    pub redis_cpu_us_per_s: f64,
    pub fixes_per_s: f64,
    pub delta_items_per_s: f64,
    pub delta_frames_per_s: f64,
    pub nearby_per_s: f64,
    pub datagrams_in_per_s: f64,
    pub datagrams_out_per_s: f64,
    pub bytes_in_per_s: f64,
    pub bytes_out_per_s: f64,
    pub rss_kib: u64,
}

impl Window {
    pub fn between(a: &Reading, b: &Reading) -> Self {
        let secs = b.at.duration_since(a.at).as_secs_f64().max(1e-9);
        let rate = |f: fn(&Counters) -> f64| (f(&b.counters) - f(&a.counters)).max(0.0) / secs;
        Self {
            secs,
            node_cpu_us_per_s: (b.node_cpu_us - a.node_cpu_us) / secs,
            redis_cpu_us_per_s: (b.redis_cpu_us - a.redis_cpu_us) / secs,
            fixes_per_s: rate(|c| c.fixes),
            delta_items_per_s: rate(|c| c.delta_items),
            delta_frames_per_s: rate(|c| c.delta_frames),
            nearby_per_s: rate(|c| c.nearby),
            datagrams_in_per_s: rate(|c| c.datagrams_in),
            datagrams_out_per_s: rate(|c| c.datagrams_out),
            bytes_in_per_s: rate(|c| c.bytes_in),
            bytes_out_per_s: rate(|c| c.bytes_out),
            rss_kib: b.rss_kib,
        }
    }

    /// Node CPU µs per accepted fix, all of the node's work counted.
    pub fn node_us_per_fix(&self) -> f64 {
        self.node_cpu_us_per_s / self.fixes_per_s.max(1e-9)
    }

    pub fn redis_us_per_fix(&self) -> f64 {
        self.redis_cpu_us_per_s / self.fixes_per_s.max(1e-9)
    }

    /// UDP datagrams on the wire per fix, both directions.
    pub fn datagrams_per_fix(&self) -> f64 {
        (self.datagrams_in_per_s + self.datagrams_out_per_s) / self.fixes_per_s.max(1e-9)
    }

    pub fn bytes_per_fix(&self) -> (f64, f64) {
        let f = self.fixes_per_s.max(1e-9);
        (self.bytes_in_per_s / f, self.bytes_out_per_s / f)
    }

    /// Node CPU left once the fixes' own cost (`us_per_fix`, measured with
    /// nothing else going on) is taken out, µs per second.
    pub fn beyond_fixes(&self, us_per_fix: f64) -> f64 {
        (self.node_cpu_us_per_s - self.fixes_per_s * us_per_fix).max(0.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counters_sum_the_series_of_a_family() {
        let text = "hexfleet_fixes_accepted_total 10\n\
                    hexfleet_delta_items_total{kind=\"added\"} 3\n\
                    hexfleet_delta_items_total{kind=\"moved\"} 4\n\
                    hexfleet_udp_datagrams_total{direction=\"received\"} 12\n\
                    hexfleet_udp_datagrams_total{direction=\"sent\"} 8\n\
                    hexfleet_http_requests_total{route=\"/v1/vehicles\",status=\"200\"} 5\n\
                    hexfleet_http_requests_total{route=\"/v1/vehicles\",status=\"400\"} 1\n";
        let c = Counters::parse(text);
        assert_eq!(c.fixes, 10.0);
        assert_eq!(c.delta_items, 7.0);
        assert_eq!((c.datagrams_in, c.datagrams_out), (12.0, 8.0));
        assert_eq!(c.nearby, 5.0);
    }

    #[test]
    fn this_process_has_spent_some_cpu() {
        let spin = Instant::now();
        while spin.elapsed().as_millis() < 30 {
            std::hint::black_box(0);
        }
        let us = process_cpu_us(std::process::id()).unwrap();
        assert!(us > 0.0, "{us}");
    }
}
