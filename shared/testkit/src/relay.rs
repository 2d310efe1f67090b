//! A TCP relay on loopback that a test can cut and heal: a partition
//! between one process and a server while everything else still reaches
//! both.
//!
//! While cut, the relay forwards nothing either way and sends no FIN or
//! RST: both ends see silence, as across a real partition, and the bytes
//! already sent are delivered when it heals (as TCP's retransmissions
//! would). Connections made while cut are accepted and stay silent too.

use std::{
    net::SocketAddr,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc,
    },
};

use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
    sync::watch,
    task::JoinHandle,
};

/// Relays connections to `target` until dropped.
pub struct TcpRelay {
    addr: SocketAddr,
    cut: watch::Sender<bool>,
    relayed: Arc<AtomicU64>,
    accept: JoinHandle<()>,
}

impl TcpRelay {
    /// Listens on a free loopback port and relays to `target`.
    pub async fn start(target: SocketAddr) -> std::io::Result<Self> {
        let listener = TcpListener::bind(("127.0.0.1", 0)).await?;
        let addr = listener.local_addr()?;
        let (cut, _) = watch::channel(false);
        let relayed = Arc::new(AtomicU64::new(0));
        let accept = tokio::spawn({
            let (cut, relayed) = (cut.clone(), relayed.clone());
            async move {
                while let Ok((client, _)) = listener.accept().await {
                    let (cut, relayed) = (cut.subscribe(), relayed.clone());
                    tokio::spawn(async move {
                        let mut open = cut.clone();
                        if open.wait_for(|cut| !cut).await.is_err() {
                            return;
                        }
                        let Ok(server) = TcpStream::connect(target).await else {
                            return;
                        };
                        let (cr, cw) = client.into_split();
                        let (sr, sw) = server.into_split();
                        let up = pump(cr, sw, cut.clone(), relayed.clone());
                        let down = pump(sr, cw, cut, relayed);
                        tokio::join!(up, down);
                    });
                }
            }
        });
        Ok(Self {
            addr,
            cut,
            relayed,
            accept,
        })
    }

    /// Where clients connect instead of the target.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Stops forwarding, both ways.
    pub fn cut(&self) {
        self.cut.send_replace(true);
    }

    /// Forwards again, what waited first.
    pub fn heal(&self) {
        self.cut.send_replace(false);
    }

    /// Bytes forwarded so far, both ways.
    pub fn relayed(&self) -> u64 {
        self.relayed.load(Ordering::Relaxed)
    }
}

impl Drop for TcpRelay {
    fn drop(&mut self) {
        self.accept.abort();
    }
}

/// Copies `from` to `to`, holding each read while the relay is cut.
async fn pump(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    mut cut: watch::Receiver<bool>,
    relayed: Arc<AtomicU64>,
) {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        if cut.wait_for(|cut| !cut).await.is_err() {
            break;
        }
        if to.write_all(&buf[..n]).await.is_err() {
            break;
        }
        relayed.fetch_add(n as u64, Ordering::Relaxed);
    }
    let _ = to.shutdown().await;
}
