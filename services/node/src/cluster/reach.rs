//! A node cut from the store while its clients still reach it must stop
//! serving before another node can own what it serves, or two nodes serve
//! one shard (split brain) and what the cut one accepts is lost.
//!
//! A node knows when it last renewed each lease, and its membership (the
//! send time of the last renewal that succeeded): Redis set their expiry
//! no earlier, so none can be taken before that time plus `lease_ttl`. When
//! renewals are late, the node asks its peers over HTTP
//! (`GET /v1/cluster/reach`) whether *they* reach those keys:
//!
//! - a key some peer reaches means this node is the one cut from it: at its
//!   deadline ([`deadline`]: last renewed + `lease_ttl` − half a renewal
//!   interval) the node steps down from that shard; if it is the live set's
//!   key, the node's membership is about to expire and the others will own
//!   everything: it serves nothing (every client is refused with
//!   `unavailable` and reconnects through the seeds) until it renews again;
//! - a key no answering peer reaches is down for everyone (Redis stalled, a
//!   Redis Cluster master failing over): nobody can take it over, and the
//!   node keeps serving, taking its leases back when the store returns;
//! - no peer answering at all (this node cut from everything) counts as a
//!   cut: its peers may well be taking over.
//!
//! The cut node acknowledges nothing meanwhile: acknowledgements wait for
//! the store (see `session::driver`).

use std::{
    collections::HashSet,
    time::{Duration, Instant},
};

use futures_util::future::join_all;
use hexfleet_model::ShardId;
use hexfleet_protocol::bus::{NodeInfo, PeerReach};

/// At most this many shards are asked about (or answered for) at once.
pub const MAX_ASKED: usize = 256;

/// At most this many peers' questions are answered at once; more are
/// refused (429): a node asks each peer once a quarter interval, and only
/// while its renewals are late.
pub const ANSWERED_AT_ONCE: usize = 8;

/// What the peers said about the keys asked.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PeersSay {
    /// How many peers answered.
    pub answered: usize,
    /// Whether some peer reached the live set's key.
    pub members: bool,
    /// The shards whose lease key some peer reached.
    pub shards: HashSet<ShardId>,
}

impl PeersSay {
    /// Whether this node is the one cut from a key: some peer reaches it,
    /// or no peer answers at all.
    pub fn cut_from(&self, reached: bool) -> bool {
        self.answered == 0 || reached
    }
}

/// The HTTP client that asks the peers, and opens the WebSockets a
/// driver's session is relayed over (see `session::forward`).
#[derive(Clone)]
pub struct Peers {
    client: reqwest::Client,
    scheme: &'static str,
    /// TLS for peers' WebSockets, trusting what `client` trusts.
    tls: Option<tokio_rustls::TlsConnector>,
}

impl std::fmt::Debug for Peers {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Peers")
            .field("scheme", &self.scheme)
            .field("tls", &self.tls.is_some())
            .finish_non_exhaustive()
    }
}

/// A byte stream to a peer, over TLS or not.
pub trait PeerIo: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send {}
impl<T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send> PeerIo for T {}

/// A WebSocket to a peer's `GET /v1/connect`.
pub type PeerSocket = tokio_tungstenite::WebSocketStream<Box<dyn PeerIo>>;

#[derive(Debug, thiserror::Error)]
pub enum PeerError {
    #[error("connecting to {addr}: {source}")]
    Connect {
        addr: String,
        source: std::io::Error,
    },
    #[error("TLS with {addr}: {reason}")]
    Tls { addr: String, reason: String },
    #[error("WebSocket with {addr}: {reason}")]
    WebSocket { addr: String, reason: String },
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
        let tls = https.then(|| {
            let mut store = rustls::RootCertStore::empty();
            for der in roots {
                if let Err(e) = store.add(der.clone()) {
                    tracing::warn!(error = %e, "a certificate peers' WebSockets cannot be checked against");
                }
            }
            let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
            let config = rustls::ClientConfig::builder_with_provider(provider)
                .with_safe_default_protocol_versions()
                .map(|b| b.with_root_certificates(store).with_no_client_auth());
            match config {
                Ok(mut config) => {
                    config.alpn_protocols = vec![b"http/1.1".to_vec()];
                    Some(tokio_rustls::TlsConnector::from(std::sync::Arc::new(config)))
                }
                Err(e) => {
                    tracing::warn!(error = %e, "TLS for peers' WebSockets");
                    None
                }
            }
        });
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
            tls: tls.flatten(),
        }
    }

    /// Opens a WebSocket to the client endpoint (`GET /v1/connect`) of the
    /// peer whose HTTP API answers at `addr`.
    pub async fn websocket(&self, addr: &str) -> Result<PeerSocket, PeerError> {
        let tcp = tokio::net::TcpStream::connect(addr)
            .await
            .map_err(|source| PeerError::Connect {
                addr: addr.to_string(),
                source,
            })?;
        let _ = tcp.set_nodelay(true);
        let io: Box<dyn PeerIo> = match (self.scheme, &self.tls) {
            ("https", Some(tls)) => {
                let host = addr.rsplit_once(':').map_or(addr, |(host, _)| host);
                let host = host.trim_start_matches('[').trim_end_matches(']');
                let name =
                    rustls::pki_types::ServerName::try_from(host.to_string()).map_err(|e| {
                        PeerError::Tls {
                            addr: addr.to_string(),
                            reason: e.to_string(),
                        }
                    })?;
                let stream = tls.connect(name, tcp).await.map_err(|e| PeerError::Tls {
                    addr: addr.to_string(),
                    reason: e.to_string(),
                })?;
                Box::new(stream)
            }
            _ => Box::new(tcp),
        };
        let scheme = if self.scheme == "https" { "wss" } else { "ws" };
        let url = format!("{scheme}://{addr}{}", hexfleet_protocol::ws::PATH);
        let max = hexfleet_protocol::MAX_FRAME_LEN + 1;
        let config = tokio_tungstenite::tungstenite::protocol::WebSocketConfig::default()
            .max_message_size(Some(max))
            .max_frame_size(Some(max));
        let (socket, _) = tokio_tungstenite::client_async_with_config(url, io, Some(config))
            .await
            .map_err(|e| PeerError::WebSocket {
                addr: addr.to_string(),
                reason: e.to_string(),
            })?;
        Ok(socket)
    }

    /// Asks every peer in `live` but `me` at once which of `shards`' lease
    /// keys, and (with `members`) the live set's key, it reaches.
    pub async fn ask(
        &self,
        me: &str,
        live: &[NodeInfo],
        shards: &[ShardId],
        members: bool,
    ) -> PeersSay {
        let list: Vec<String> = shards
            .iter()
            .take(MAX_ASKED)
            .map(|s| s.to_string())
            .collect();
        let query = format!("shards={}&members={members}", list.join(","));
        let asked = live.iter().filter(|n| n.id != me).map(|peer| {
            let url = format!(
                "{}://{}/v1/cluster/reach?{query}",
                self.scheme,
                peer.peer_http()
            );
            async move {
                let answer = self.client.get(url).send().await.ok()?;
                answer
                    .error_for_status()
                    .ok()?
                    .json::<PeerReach>()
                    .await
                    .ok()
            }
        });
        let mut said = PeersSay::default();
        for reach in join_all(asked).await.into_iter().flatten() {
            said.answered += 1;
            said.members |= reach.members;
            said.shards.extend(
                reach
                    .shards
                    .iter()
                    .filter_map(|s| s.parse::<ShardId>().ok()),
            );
        }
        said
    }
}

/// When renewals of a key count as late, and the peers are asked.
pub fn late_after(renew_interval: Duration) -> Duration {
    renew_interval + renew_interval / 2
}

/// The last moment this node may serve what it last renewed at `renewed`.
pub fn deadline(renewed: Instant, lease_ttl: Duration, renew_interval: Duration) -> Instant {
    renewed + lease_ttl.saturating_sub(renew_interval / 2)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn peers_are_asked_before_the_deadline_and_the_deadline_is_before_the_lease_ends() {
        let (ttl, renew) = (Duration::from_millis(1500), Duration::from_millis(500));
        let renewed = Instant::now();
        let deadline = deadline(renewed, ttl, renew);
        assert!(renewed + late_after(renew) < deadline);
        assert!(deadline < renewed + ttl);
    }

    #[test]
    fn a_key_is_cut_off_when_a_peer_reaches_it_or_no_peer_answers() {
        let silent = PeersSay::default();
        assert!(silent.cut_from(false));
        let answered = PeersSay {
            answered: 2,
            ..PeersSay::default()
        };
        assert!(!answered.cut_from(false));
        assert!(answered.cut_from(true));
    }
}
