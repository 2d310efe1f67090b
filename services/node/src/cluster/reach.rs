//! A node cut from the store while its clients still reach it must stop
//! serving its shards before another node can own them, or two nodes serve
//! one shard (split brain) and what the cut one accepts is lost.
//!
//! A node knows when it last reached the store: the send time of its last
//! complete renewal (membership and every lease). Redis set those leases'
//! expiry no earlier, so none of them can be taken before that time plus
//! `lease_ttl`. When renewals are late, the node asks its peers over HTTP
//! (`GET /v1/cluster/reach`) whether *they* reach the store:
//!
//! - a peer that renewed within the last [`healthy`] does: this node is the
//!   one cut off, and at its deadline (last reached + `lease_ttl` − half a
//!   renewal interval) it stops serving every shard (fixes are refused
//!   with `unavailable`, drivers reconnect through the seeds), before any
//!   peer can hold one of them;
//! - peers that do not (Redis stalled or down for everyone) mean nobody
//!   can take a shard over: the node keeps serving, and takes its leases
//!   back when the store returns;
//! - no peer answering (this node cut from everything) is treated as a cut:
//!   peers may well be taking its shards.
//!
//! The cut node acknowledges nothing meanwhile: acknowledgements wait for
//! the store (see `session::driver`).

use std::time::{Duration, Instant};

use futures_util::future::join_all;
use hexfleet_protocol::bus::{NodeInfo, PeerReach};

/// How the peers answered about the store.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PeersSay {
    /// At least one reaches it: this node is the one cut off.
    Reached,
    /// Every peer that answered is cut too: the store is away for all.
    NotReached,
    /// None answered (or there are none to ask).
    Silent,
}

/// The HTTP client that asks the peers.
#[derive(Debug, Clone)]
pub struct Peers {
    client: reqwest::Client,
    scheme: &'static str,
}

impl Peers {
    /// A client for peers serving HTTPS with a certificate this node trusts
    /// (`roots`: its own chain; the nodes of a cluster share one, or its
    /// CA), or plain HTTP.
    pub fn new(
        https: bool,
        roots: &[rustls::pki_types::CertificateDer<'static>],
        timeout: Duration,
    ) -> Self {
        let mut builder = reqwest::Client::builder()
            .timeout(timeout)
            .connect_timeout(timeout);
        if https {
            for der in roots {
                match reqwest::Certificate::from_der(der) {
                    Ok(cert) => builder = builder.add_root_certificate(cert),
                    Err(e) => {
                        tracing::warn!(error = %e, "a certificate peers cannot be checked against")
                    }
                }
            }
        }
        let client = builder.build().unwrap_or_else(|e| {
            tracing::warn!(error = %e, "building the peers' HTTP client; using the default one");
            reqwest::Client::new()
        });
        Peers {
            client,
            scheme: if https { "https" } else { "http" },
        }
    }

    /// Asks every peer in `live` but `me` at once; `reached` tells when a
    /// peer's answer says it reaches the store.
    pub async fn ask(&self, me: &str, live: Vec<NodeInfo>, healthy: Duration) -> PeersSay {
        let asked = live.iter().filter(|n| n.id != me).map(|peer| async move {
            let url = format!("{}://{}/v1/cluster/reach", self.scheme, peer.http);
            let answer = self.client.get(url).send().await.ok()?;
            let reach: PeerReach = answer.error_for_status().ok()?.json().await.ok()?;
            Some(
                reach
                    .store_reached_ms_ago
                    .is_some_and(|ago| Duration::from_millis(ago) < healthy),
            )
        });
        let answers: Vec<bool> = join_all(asked).await.into_iter().flatten().collect();
        if answers.iter().any(|&reached| reached) {
            PeersSay::Reached
        } else if answers.is_empty() {
            PeersSay::Silent
        } else {
            PeersSay::NotReached
        }
    }
}

/// How recently a node that reaches the store has renewed: it renews every
/// `renew_interval`. A store stalled for everyone leaves every peer at
/// least `lease_ttl − renew_interval` behind by the deadline, which the
/// configuration keeps past this (`lease_ttl ≥ 3 × renew_interval`).
pub fn healthy(renew_interval: Duration) -> Duration {
    renew_interval + renew_interval / 4
}

/// The last moment this node may serve its shards, having last reached
/// the store at `reached`.
pub fn deadline(reached: Instant, lease_ttl: Duration, renew_interval: Duration) -> Instant {
    reached + lease_ttl.saturating_sub(renew_interval / 2)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_peer_renewing_on_time_reaches_the_store_and_one_stalled_with_us_does_not() {
        let (ttl, renew) = (Duration::from_millis(1500), Duration::from_millis(500));
        let reached = Instant::now();
        let at_deadline = deadline(reached, ttl, renew) - reached;
        assert_eq!(at_deadline, Duration::from_millis(1250));
        // A peer that renewed up to one interval after us, then stalled
        // with the store, is this far behind at our deadline.
        let stalled_peer = at_deadline - renew;
        assert!(stalled_peer >= healthy(renew));
        // A peer renewing on time is never further behind than an interval.
        assert!(renew < healthy(renew));
    }
}
