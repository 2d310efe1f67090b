//! Per-connection request budgets. A rider's `Subscribe` and a dashboard's
//! `viewport`, `filter` and `find` each cost the node real work (a cover of
//! thousands of cells, a snapshot), so no connection may ask faster than its
//! budget: a token bucket refills at `per_second` up to `burst`; a request
//! with no token left is refused with an error, and a connection refused
//! `close_after` times within [`ABUSE_WINDOW`] is closed. Honest clients,
//! which send a request when their rider moves or their user pans, never
//! come near it.

use std::time::{Duration, Instant};

use serde::Deserialize;

/// The refusals that close a connection are counted over this window.
pub const ABUSE_WINDOW: Duration = Duration::from_secs(10);

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RequestLimits {
    /// Requests a connection may make per second, sustained.
    pub per_second: f64,
    /// Requests a connection may make at once after being quiet.
    pub burst: u32,
    /// Refusals within 10 s that close the connection (`rate_limited`).
    pub close_after: u32,
}

impl RequestLimits {
    /// Why a request over budget is refused; `what` names the requests.
    pub fn refusal(&self, what: &str) -> String {
        format!("more than {} {what} a second", self.per_second)
    }

    /// Why a connection that kept going over budget is closed.
    pub fn closing(&self, what: &str) -> String {
        format!(
            "{what} refused {} times in {ABUSE_WINDOW:?}",
            self.close_after
        )
    }
}

/// What to do with one request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    Allow,
    /// Over budget: answer with an error, do no work.
    Refuse,
    /// Over budget for too long: close the connection.
    Close,
}

#[derive(Debug)]
pub struct RequestBudget {
    limits: RequestLimits,
    tokens: f64,
    refilled: Instant,
    refusals: u32,
    window_start: Instant,
}

impl RequestBudget {
    pub fn new(limits: &RequestLimits, now: Instant) -> Self {
        Self {
            tokens: f64::from(limits.burst),
            limits: limits.clone(),
            refilled: now,
            refusals: 0,
            window_start: now,
        }
    }

    /// Takes one request out of the budget.
    pub fn spend(&mut self, now: Instant) -> Verdict {
        let elapsed = now.saturating_duration_since(self.refilled).as_secs_f64();
        self.tokens =
            (self.tokens + elapsed * self.limits.per_second).min(f64::from(self.limits.burst));
        self.refilled = now;
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            return Verdict::Allow;
        }
        if now.saturating_duration_since(self.window_start) > ABUSE_WINDOW {
            (self.window_start, self.refusals) = (now, 0);
        }
        self.refusals += 1;
        if self.refusals >= self.limits.close_after {
            Verdict::Close
        } else {
            Verdict::Refuse
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits() -> RequestLimits {
        RequestLimits {
            per_second: 10.0,
            burst: 5,
            close_after: 20,
        }
    }

    #[test]
    fn a_burst_is_allowed_then_requests_are_refused_until_tokens_refill() {
        let t0 = Instant::now();
        let mut b = RequestBudget::new(&limits(), t0);
        for _ in 0..5 {
            assert_eq!(b.spend(t0), Verdict::Allow);
        }
        assert_eq!(b.spend(t0), Verdict::Refuse);
        // 100 ms later one token is back.
        let t1 = t0 + Duration::from_millis(100);
        assert_eq!(b.spend(t1), Verdict::Allow);
        assert_eq!(b.spend(t1), Verdict::Refuse);
    }

    #[test]
    fn a_steady_client_within_its_rate_is_never_refused() {
        let t0 = Instant::now();
        let mut b = RequestBudget::new(&limits(), t0);
        for i in 0..1_000u64 {
            let now = t0 + Duration::from_millis(100 * i);
            assert_eq!(b.spend(now), Verdict::Allow, "request {i}");
        }
    }

    #[test]
    fn a_flood_is_closed_after_close_after_refusals_and_old_refusals_are_forgiven() {
        let t0 = Instant::now();
        let mut b = RequestBudget::new(&limits(), t0);
        let verdicts: Vec<Verdict> = (0..100).map(|_| b.spend(t0)).collect();
        let first_close = verdicts.iter().position(|v| *v == Verdict::Close);
        assert_eq!(first_close, Some(5 + 19));

        let mut b = RequestBudget::new(&limits(), t0);
        for _ in 0..5 + 19 {
            b.spend(t0);
        }
        // Past the window, the count starts again.
        let later = t0 + ABUSE_WINDOW + Duration::from_millis(1);
        let mut verdicts = Vec::new();
        for _ in 0..50 {
            verdicts.push(b.spend(later));
        }
        assert_eq!(verdicts.iter().filter(|v| **v == Verdict::Allow).count(), 5);
        assert_eq!(verdicts[5], Verdict::Refuse);
    }
}
