//! The node's wall clock, in the unit the protocol and the store use.

use std::time::{SystemTime, UNIX_EPOCH};

/// Unix time in milliseconds.
pub fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// Unix time in seconds.
pub fn now_s() -> u64 {
    (now_ms() / 1000).max(0) as u64
}

/// `fut`, given up after `after` if it is still waiting then: what
/// `tokio::time::timeout` does, but the timer is armed only when `fut` does
/// not finish at its first poll. A write with room in its buffer, the
/// common case on a hot path, then costs no timer entry.
pub async fn timeout_if_blocked<F: std::future::Future>(
    after: std::time::Duration,
    fut: F,
) -> Result<F::Output, tokio::time::error::Elapsed> {
    let mut fut = std::pin::pin!(fut);
    match futures_util::poll!(fut.as_mut()) {
        std::task::Poll::Ready(out) => Ok(out),
        std::task::Poll::Pending => tokio::time::timeout(after, fut).await,
    }
}
