//! A node alive to the store and to its peers may still be one its clients
//! cannot reach: a broken load-balancer target, a firewall rule, one zone's
//! ingress down. Every other signal says it is fine, so its peers look the
//! way its clients would: each node dials every peer's *advertised* QUIC
//! address (the one clients get in redirects) every `probe_interval`, a
//! handshake under its own ALPN ([`hexfleet_protocol::PROBE_ALPN`]) that the
//! peer answers and closes, with no session.
//!
//! Three failures in a row and this node announces the peer as unreached
//! in its membership ([`NodeInfo::unreached`], with how long), until a probe
//! gets through again. The verdict is the cluster's, not one prober's: every
//! node reads the same announcements and judges alike
//! ([`membership::judged`](super::membership::judged)).
//!
//! The probe checks a path, not an identity: it sends nothing and reads
//! nothing, so it accepts whatever certificate the address presents (its
//! handshake signature still checked).

use std::{
    collections::{BTreeMap, HashMap},
    net::SocketAddr,
    sync::Arc,
    time::{Duration, Instant},
};

use futures_util::future::join_all;
use hexfleet_protocol::bus::NodeInfo;
use rustls::{
    client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier},
    crypto::{verify_tls13_signature, CryptoProvider},
    pki_types::{CertificateDer, ServerName, UnixTime},
    DigitallySignedStruct, SignatureScheme,
};

/// Failed probes in a row before a peer counts as unreached: one lost
/// handshake on a lossy path is not an outage.
pub const FAILURES: u32 = 3;

/// The code and reason a node closes a probe with.
pub const CLOSE_CODE: u32 = 0;
pub const CLOSE_REASON: &[u8] = b"probe answered";

#[derive(Debug, thiserror::Error)]
pub enum ProbeError {
    #[error("the probe's TLS configuration: {0}")]
    Tls(String),
    #[error("binding the probe's UDP socket: {0}")]
    Bind(std::io::Error),
}

/// How one peer's probes have gone lately.
#[derive(Debug, Clone, Copy, Default)]
struct Record {
    failures: u32,
    /// When the current run of failures started.
    failing_since: Option<Instant>,
    /// The round trip the last answered probe measured: the next starts
    /// from it. From QUIC's default (333 ms) a lost handshake packet goes
    /// again only after a second, as long as a probe waits, so on a lossy
    /// path one lost packet would fail the probe.
    rtt: Option<Duration>,
}

/// Bounds on the round trip a probe starts from.
const MIN_INITIAL_RTT: Duration = Duration::from_millis(10);
const MAX_INITIAL_RTT: Duration = Duration::from_secs(1);

/// Dials peers' client addresses and keeps what it found.
pub struct Prober {
    endpoint: quinn::Endpoint,
    config: quinn::ClientConfig,
    timeout: Duration,
    records: parking_lot::Mutex<HashMap<String, Record>>,
}

impl std::fmt::Debug for Prober {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Prober")
            .field("timeout", &self.timeout)
            .finish_non_exhaustive()
    }
}

/// What one round of probes found.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Round {
    pub answered: usize,
    pub failed: usize,
}

impl Prober {
    /// A prober on its own UDP socket (bound on the unspecified address
    /// of `family`'s kind, so the kernel routes it as it would a client's).
    pub fn new(timeout: Duration, family: SocketAddr) -> Result<Self, ProbeError> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut crypto = rustls::ClientConfig::builder_with_provider(provider.clone())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(|e| ProbeError::Tls(e.to_string()))?
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(AnyCertificate(provider)))
            .with_no_client_auth();
        crypto.alpn_protocols = vec![hexfleet_protocol::PROBE_ALPN.to_vec()];
        let crypto = quinn::crypto::rustls::QuicClientConfig::try_from(crypto)
            .map_err(|e| ProbeError::Tls(e.to_string()))?;
        let config = quinn::ClientConfig::new(Arc::new(crypto));
        let bind: SocketAddr = match family {
            SocketAddr::V4(_) => (std::net::Ipv4Addr::UNSPECIFIED, 0).into(),
            SocketAddr::V6(_) => (std::net::Ipv6Addr::UNSPECIFIED, 0).into(),
        };
        let endpoint = quinn::Endpoint::client(bind).map_err(ProbeError::Bind)?;
        Ok(Self {
            endpoint,
            config,
            timeout,
            records: parking_lot::Mutex::default(),
        })
    }

    /// Dials one address, its handshake starting from `rtt` when one was
    /// measured: the round trip, if the handshake completed within the
    /// timeout.
    async fn dial(&self, addr: SocketAddr, rtt: Option<Duration>) -> Option<Duration> {
        let mut config = self.config.clone();
        let mut transport = quinn::TransportConfig::default();
        if let Ok(idle) = quinn::IdleTimeout::try_from(self.timeout) {
            transport.max_idle_timeout(Some(idle));
        }
        if let Some(rtt) = rtt {
            transport.initial_rtt(rtt.clamp(MIN_INITIAL_RTT, MAX_INITIAL_RTT));
        }
        config.transport_config(Arc::new(transport));
        let connecting = match self.endpoint.connect_with(config, addr, "probe") {
            Ok(connecting) => connecting,
            Err(e) => {
                tracing::debug!(%addr, error = %e, "a probe could not start");
                return None;
            }
        };
        match tokio::time::timeout(self.timeout, connecting).await {
            Ok(Ok(conn)) => {
                let rtt = conn.rtt();
                conn.close(CLOSE_CODE.into(), b"probed");
                Some(rtt)
            }
            Ok(Err(e)) => {
                tracing::debug!(%addr, error = %e, "a probe's handshake failed");
                None
            }
            Err(_) => None,
        }
    }

    /// Probes every peer in `live` but `me` at once and records what it
    /// found.
    pub async fn round(&self, me: &str, live: &[NodeInfo]) -> Round {
        let peers: Vec<(String, Option<SocketAddr>)> = live
            .iter()
            .filter(|n| n.id != me)
            .map(|n| (n.id.clone(), n.quic.parse().ok()))
            .collect();
        let rtts: HashMap<String, Duration> = self
            .records
            .lock()
            .iter()
            .filter_map(|(id, r)| Some((id.clone(), r.rtt?)))
            .collect();
        let results = join_all(peers.iter().map(|(id, addr)| {
            let rtt = rtts.get(id).copied();
            async move {
                let answered = match addr {
                    Some(addr) => self.dial(*addr, rtt).await,
                    // An address no client could dial either.
                    None => None,
                };
                (id.clone(), answered)
            }
        }))
        .await;
        let now = Instant::now();
        let mut records = self.records.lock();
        records.retain(|id, _| peers.iter().any(|(p, _)| p == id));
        let mut round = Round::default();
        for (id, answered) in results {
            let record = records.entry(id.clone()).or_default();
            if let Some(rtt) = answered {
                round.answered += 1;
                if record.failures >= FAILURES {
                    tracing::info!(node = %id, "a peer's client address answers again");
                }
                *record = Record {
                    rtt: Some(rtt),
                    ..Record::default()
                };
            } else {
                round.failed += 1;
                record.failures += 1;
                record.failing_since.get_or_insert(now);
                if record.failures == FAILURES {
                    tracing::warn!(node = %id, "a peer's client address does not answer: announcing it unreached");
                }
            }
        }
        round
    }

    /// The peers this node announces as unreached, each with how long its
    /// probes have failed.
    pub fn unreached(&self) -> BTreeMap<String, u64> {
        let now = Instant::now();
        self.records
            .lock()
            .iter()
            .filter(|(_, r)| r.failures >= FAILURES)
            .filter_map(|(id, r)| {
                let since = r.failing_since?;
                Some((
                    id.clone(),
                    now.saturating_duration_since(since).as_millis() as u64,
                ))
            })
            .collect()
    }
}

/// Accepts any certificate: a probe tests the path to an address, and sends
/// nothing over it. The handshake's signature is still checked.
#[derive(Debug)]
struct AnyCertificate(Arc<CryptoProvider>);

impl ServerCertVerifier for AnyCertificate {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Err(rustls::Error::General("probes speak TLS 1.3 only".into()))
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn an_address_nobody_answers_is_unreached_after_three_failures_in_a_row() {
        // A bound UDP socket that never answers: every handshake times out.
        let silent = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let addr = silent.local_addr().unwrap();
        let prober = Prober::new(Duration::from_millis(100), addr).unwrap();
        let peer = NodeInfo {
            id: "b".into(),
            quic: addr.to_string(),
            http: String::new(),
            shards: Vec::new(),
            instance: 1,
            peer_http: String::new(),
            unreached: BTreeMap::new(),
        };
        let live = [peer];
        for round in 1..=FAILURES {
            let found = prober.round("a", &live).await;
            assert_eq!(
                found,
                Round {
                    answered: 0,
                    failed: 1
                }
            );
            let unreached = prober.unreached();
            assert_eq!(
                unreached.contains_key("b"),
                round == FAILURES,
                "round {round}"
            );
        }
        // A peer that leaves the live set is forgotten.
        prober.round("a", &[]).await;
        assert!(prober.unreached().is_empty());
    }
}
