//! Reloads the certificate, its key and the token keys without a restart:
//! at once on SIGHUP, and when one of their files changes (checked every
//! `tls.reload_interval`; a Kubernetes Secret or cert-manager renewal
//! replaces the files under a running node). Connections already open keep
//! going; new handshakes and tokens see the new material. A reload that
//! fails (a half-written file, a key that does not match) keeps what was
//! loaded, logs why and is counted, and is tried again on the next change.

use std::{path::PathBuf, sync::Arc, time::Duration, time::SystemTime};

use tokio_util::sync::CancellationToken;

use crate::{auth::Auth, metrics::Metrics, tls::Certificates};

pub struct Reloader {
    pub auth: Arc<Auth>,
    pub certificates: Arc<Certificates>,
    pub metrics: Arc<Metrics>,
    pub interval: Duration,
}

/// What a file looked like when last read: its modification time and size
/// (`None`: missing).
type Stamp = Option<(SystemTime, u64)>;

fn stamp(path: &PathBuf) -> Stamp {
    let meta = std::fs::metadata(path).ok()?;
    Some((meta.modified().ok()?, meta.len()))
}

fn stamps(files: &[PathBuf]) -> Vec<Stamp> {
    files.iter().map(stamp).collect()
}

impl Reloader {
    pub async fn run(self, shutdown: CancellationToken) {
        #[cfg(unix)]
        let mut hangup = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())
        {
            Ok(signal) => Some(signal),
            Err(e) => {
                tracing::warn!(error = %e, "cannot listen for SIGHUP; reloading on file changes only");
                None
            }
        };
        let tls_files = self.certificates.files();
        let auth_files = self.auth.files();
        let (mut tls_seen, mut auth_seen) = (stamps(&tls_files), stamps(&auth_files));
        let mut tick = tokio::time::interval(self.interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let forced = tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tick.tick() => false,
                Some(()) = async {
                    #[cfg(unix)]
                    if let Some(signal) = hangup.as_mut() {
                        return signal.recv().await;
                    }
                    std::future::pending().await
                } => true,
            };
            if forced {
                tracing::info!("SIGHUP: reloading the certificate and token keys");
            }
            let (tls_now, auth_now) = (stamps(&tls_files), stamps(&auth_files));
            if forced || tls_now != tls_seen {
                tls_seen = tls_now;
                self.reload_tls();
            }
            if forced || auth_now != auth_seen {
                auth_seen = auth_now;
                self.reload_auth();
            }
        }
    }

    fn reload_tls(&self) {
        match self.certificates.reload() {
            Ok(()) => {
                tracing::info!("reloaded the TLS certificate");
                self.metrics.reload("tls", true).inc();
            }
            Err(e) => {
                tracing::error!(error = %e, "reloading the TLS certificate failed; keeping the one loaded");
                self.metrics.reload("tls", false).inc();
            }
        }
    }

    fn reload_auth(&self) {
        match self.auth.reload() {
            Ok(kids) => {
                tracing::info!(?kids, "reloaded the token keys");
                self.metrics.reload("auth", true).inc();
            }
            Err(e) => {
                tracing::error!(error = %e, "reloading the token keys failed; keeping the ones loaded");
                self.metrics.reload("auth", false).inc();
            }
        }
    }
}
