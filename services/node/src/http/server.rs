//! The HTTP listeners: what `axum::serve` does, plus the limits it lacks
//! and TLS.
//!
//! - At most `max_connections` connections are open at once (WebSockets
//!   included, for as long as they live); beyond it, new ones wait in the
//!   kernel's accept queue until one closes.
//! - At most `max_connections_per_address` from one IP address (the
//!   cluster's other members exempt); beyond it new ones are closed at once
//!   and counted.
//! - A connection must finish its TLS handshake, and send each request's
//!   headers, within `header_timeout`, so a client trickling bytes (or none)
//!   ties up a connection slot for that long at most.
//! - With TLS, the certificate is the node's reloadable one
//!   ([`crate::tls::Certificates`]): a reload applies to new connections,
//!   and open ones keep going.
//! - At shutdown it stops accepting and lets requests in flight finish.

use std::{
    io,
    net::SocketAddr,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
    time::Duration,
};

use axum::Router;
use hyper::server::conn::http1;
use hyper_util::{
    rt::{TokioIo, TokioTimer},
    service::TowerToHyperService,
};
use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    net::{TcpListener, TcpStream},
    sync::{OwnedSemaphorePermit, Semaphore},
};
use tokio_rustls::TlsAcceptor;
use tokio_util::{sync::CancellationToken, task::TaskTracker};

use crate::{
    metrics::Metrics,
    per_address::{AddressSlot, PerAddress},
};

/// How one listener is served.
pub struct Listener {
    pub listener: TcpListener,
    pub router: Router,
    pub max_connections: usize,
    /// The limit per source address (see [`PerAddress`]).
    pub per_address: Arc<PerAddress>,
    pub header_timeout: Duration,
    /// HTTPS when set.
    pub tls: Option<TlsAcceptor>,
    /// Counts open connections (`http_connections`) and refusals; the
    /// admin listener counts nothing.
    pub metrics: Option<Arc<Metrics>>,
}

/// Serves until `shutdown`, then waits (at most `grace`) for the requests
/// in flight.
pub async fn serve(this: Listener, shutdown: CancellationToken, grace: Duration) {
    let slots = Arc::new(Semaphore::new(this.max_connections));
    let per_address = this.per_address.clone();
    let connections = TaskTracker::new();
    let mut http = http1::Builder::new();
    http.timer(TokioTimer::new())
        .header_read_timeout(this.header_timeout);
    loop {
        let accepted = tokio::select! {
            _ = shutdown.cancelled() => break,
            accepted = accept(&this.listener, &slots) => accepted,
        };
        let Some((stream, peer, permit)) = accepted else {
            continue;
        };
        let Some(address_slot) = per_address.try_acquire(peer.ip()) else {
            if let Some(metrics) = &this.metrics {
                metrics.connection_refused("http_address_limit").inc();
            }
            tracing::debug!(%peer, "HTTP connection refused: too many from this address");
            continue;
        };
        let _ = stream.set_nodelay(true);
        let service = TowerToHyperService::new(this.router.clone());
        let (http, shutdown, tls) = (http.clone(), shutdown.clone(), this.tls.clone());
        let (metrics, handshake_timeout) = (this.metrics.clone(), this.header_timeout);
        connections.spawn(async move {
            let open = Open::new(metrics, permit, address_slot);
            let io: Box<dyn Io> = match tls {
                None => Box::new(stream),
                Some(tls) => {
                    match tokio::time::timeout(handshake_timeout, tls.accept(stream)).await {
                        Ok(Ok(stream)) => Box::new(stream),
                        Ok(Err(e)) => {
                            tracing::debug!(%peer, error = %e, "TLS handshake failed");
                            open.dropped("tls_handshake");
                            return;
                        }
                        Err(_) => {
                            tracing::debug!(%peer, "TLS handshake timed out");
                            open.dropped("tls_timeout");
                            return;
                        }
                    }
                }
            };
            let metrics = open.metrics.clone();
            let io = TokioIo::new(Slotted {
                stream: io,
                _open: open,
            });
            let connection = http.serve_connection(io, service).with_upgrades();
            tokio::pin!(connection);
            let ended = tokio::select! {
                ended = connection.as_mut() => ended,
                _ = shutdown.cancelled() => {
                    // Finish the request in flight, take no more.
                    connection.as_mut().graceful_shutdown();
                    connection.await
                }
            };
            if let Err(e) = ended {
                tracing::debug!(%peer, error = %e, "HTTP connection ended with an error");
                if let Some(m) = metrics {
                    let reason = if e.is_timeout() {
                        "header_timeout"
                    } else {
                        "error"
                    };
                    m.http_dropped(reason).inc();
                }
            }
        });
    }
    connections.close();
    if tokio::time::timeout(grace, connections.wait())
        .await
        .is_err()
    {
        tracing::warn!("HTTP connections still open after {grace:?}");
    }
}

/// Waits for a free slot, then for a connection. Accept errors (out of file
/// descriptors, a connection reset while queued) are logged and skipped.
async fn accept(
    listener: &TcpListener,
    slots: &Arc<Semaphore>,
) -> Option<(TcpStream, SocketAddr, OwnedSemaphorePermit)> {
    // The semaphore is never closed.
    let permit = slots.clone().acquire_owned().await.ok()?;
    match listener.accept().await {
        Ok((stream, peer)) => Some((stream, peer, permit)),
        Err(e) => {
            tracing::warn!(error = %e, "accepting an HTTP connection");
            // Out of descriptors: give closing connections a moment.
            tokio::time::sleep(Duration::from_millis(50)).await;
            None
        }
    }
}

trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

/// What an open connection holds, released when it ends (after an upgrade
/// to a WebSocket too).
struct Open {
    metrics: Option<Arc<Metrics>>,
    _slot: OwnedSemaphorePermit,
    _address: AddressSlot,
}

impl Open {
    fn new(
        metrics: Option<Arc<Metrics>>,
        slot: OwnedSemaphorePermit,
        address: AddressSlot,
    ) -> Self {
        if let Some(m) = &metrics {
            m.http_connections.inc();
        }
        Self {
            metrics,
            _slot: slot,
            _address: address,
        }
    }
}

impl Open {
    fn dropped(&self, reason: &'static str) {
        if let Some(m) = &self.metrics {
            m.http_dropped(reason).inc();
        }
    }
}

impl Drop for Open {
    fn drop(&mut self) {
        if let Some(m) = &self.metrics {
            m.http_connections.dec();
        }
    }
}

/// A connection holding its slots: they free when the connection is
/// dropped.
struct Slotted {
    stream: Box<dyn Io>,
    _open: Open,
}

impl AsyncRead for Slotted {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_read(cx, buf)
    }
}

impl AsyncWrite for Slotted {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }
}
