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
    target: Arc<std::sync::Mutex<Option<SocketAddr>>>,
    cut: watch::Sender<bool>,
    relayed: Arc<AtomicU64>,
    accept: JoinHandle<()>,
}

impl TcpRelay {
    /// Listens on a free loopback port and relays to `target`.
    pub async fn start(target: SocketAddr) -> std::io::Result<Self> {
        let relay = Self::start_unbound().await?;
        relay.set_target(target);
        Ok(relay)
    }

    /// Listens on a free loopback port; connections made before it has a
    /// target ([`TcpRelay::set_target`]) are dropped.
    pub async fn start_unbound() -> std::io::Result<Self> {
        let listener = TcpListener::bind(("127.0.0.1", 0)).await?;
        let addr = listener.local_addr()?;
        let (cut, _) = watch::channel(false);
        let relayed = Arc::new(AtomicU64::new(0));
        let target: Arc<std::sync::Mutex<Option<SocketAddr>>> = Arc::default();
        let accept = tokio::spawn({
            let (cut, relayed, target) = (cut.clone(), relayed.clone(), target.clone());
            async move {
                while let Ok((client, _)) = listener.accept().await {
                    let (cut, relayed) = (cut.subscribe(), relayed.clone());
                    let Some(target) = target.lock().ok().and_then(|t| *t) else {
                        continue;
                    };
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
            target,
            cut,
            relayed,
            accept,
        })
    }

    pub fn set_target(&self, target: SocketAddr) {
        if let Ok(mut t) = self.target.lock() {
            *t = Some(target);
        }
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

/// A UDP relay on loopback in front of a QUIC endpoint, which a test can
/// cut (both ways, or one way), heal, or make lossy: a node's client-facing
/// address failing while the node itself, its store and its peers are fine
/// (a broken load-balancer target, a firewall rule, a lossy NIC queue).
///
/// Each client source gets its own upstream socket, so the endpoint sees
/// one peer per client, as it would through a NAT.
pub struct UdpRelay {
    addr: SocketAddr,
    state: Arc<UdpState>,
    task: JoinHandle<()>,
}

struct UdpState {
    target: std::sync::Mutex<Option<SocketAddr>>,
    /// Of every 1000 datagrams toward the target (inbound to it) and back
    /// from it (outbound), how many are dropped.
    drop_inbound: std::sync::atomic::AtomicU32,
    drop_outbound: std::sync::atomic::AtomicU32,
    forwarded: AtomicU64,
    dropped: AtomicU64,
    /// Which datagrams are dropped: each independently, as on a lossy
    /// link, from a fixed seed (a regular pattern would fall in step with a
    /// client's own rhythm and spare or hit the same packet every time).
    draws: std::sync::Mutex<rand::rngs::StdRng>,
}

/// The seed of every relay's losses: a run's drops are the same each time
/// for the same traffic.
const LOSS_SEED: u64 = 0x6865_7866_6c65_6574;

impl UdpState {
    fn drops(&self, permille: &std::sync::atomic::AtomicU32) -> bool {
        let permille = permille.load(Ordering::Relaxed);
        if permille == 0 {
            return false;
        }
        let dropped = permille >= 1000
            || match self.draws.lock() {
                Ok(mut draws) => rand::Rng::random_range(&mut *draws, 0..1000) < permille,
                Err(_) => false,
            };
        if dropped {
            self.dropped.fetch_add(1, Ordering::Relaxed);
        }
        dropped
    }
}

impl UdpRelay {
    /// Listens on a free loopback port; relays nothing until given its
    /// target ([`UdpRelay::set_target`]: an endpoint started with this
    /// address as its advertised one learns its own port after).
    pub async fn start() -> std::io::Result<Self> {
        let listener = Arc::new(tokio::net::UdpSocket::bind(("127.0.0.1", 0)).await?);
        let addr = listener.local_addr()?;
        let state = Arc::new(UdpState {
            target: std::sync::Mutex::new(None),
            drop_inbound: 0.into(),
            drop_outbound: 0.into(),
            forwarded: AtomicU64::new(0),
            dropped: AtomicU64::new(0),
            draws: std::sync::Mutex::new(rand::SeedableRng::seed_from_u64(LOSS_SEED)),
        });
        let task = tokio::spawn(relay_udp(listener, state.clone()));
        Ok(Self { addr, state, task })
    }

    /// Where clients send instead of the target.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn set_target(&self, target: SocketAddr) {
        if let Ok(mut t) = self.state.target.lock() {
            *t = Some(target);
        }
    }

    /// Drops every datagram, both ways.
    pub fn cut(&self) {
        self.set_loss(1.0, 1.0);
    }

    /// Forwards everything again.
    pub fn heal(&self) {
        self.set_loss(0.0, 0.0);
    }

    /// Drops this share of datagrams toward the target (`inbound`) and
    /// back from it (`outbound`): 1.0 cuts that way.
    pub fn set_loss(&self, inbound: f64, outbound: f64) {
        let permille = |share: f64| (share.clamp(0.0, 1.0) * 1000.0).round() as u32;
        let state = &self.state;
        state
            .drop_inbound
            .store(permille(inbound), Ordering::Relaxed);
        state
            .drop_outbound
            .store(permille(outbound), Ordering::Relaxed);
    }

    /// Datagrams forwarded and dropped so far, both ways.
    pub fn counts(&self) -> (u64, u64) {
        let state = &self.state;
        (
            state.forwarded.load(Ordering::Relaxed),
            state.dropped.load(Ordering::Relaxed),
        )
    }
}

impl Drop for UdpRelay {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// The relay's loop: each client's datagrams go out of its own upstream
/// socket, and what comes back to that socket goes to the client.
async fn relay_udp(listener: Arc<tokio::net::UdpSocket>, state: Arc<UdpState>) {
    let mut upstreams: std::collections::HashMap<SocketAddr, Arc<tokio::net::UdpSocket>> =
        std::collections::HashMap::new();
    let mut returns = tokio::task::JoinSet::new();
    let mut buf = vec![0u8; 65_536];
    loop {
        let Ok((n, client)) = listener.recv_from(&mut buf).await else {
            return;
        };
        let target = state.target.lock().ok().and_then(|t| *t);
        let Some(target) = target else { continue };
        if state.drops(&state.drop_inbound) {
            continue;
        }
        let upstream = match upstreams.get(&client) {
            Some(upstream) => upstream.clone(),
            None => {
                let Ok(socket) = tokio::net::UdpSocket::bind(("127.0.0.1", 0)).await else {
                    continue;
                };
                if socket.connect(target).await.is_err() {
                    continue;
                }
                let socket = Arc::new(socket);
                upstreams.insert(client, socket.clone());
                let (back, listener, state) = (socket.clone(), listener.clone(), state.clone());
                returns.spawn(async move {
                    let mut buf = vec![0u8; 65_536];
                    while let Ok(n) = back.recv(&mut buf).await {
                        if state.drops(&state.drop_outbound) {
                            continue;
                        }
                        if listener.send_to(&buf[..n], client).await.is_ok() {
                            state.forwarded.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                });
                socket
            }
        };
        if upstream.send(&buf[..n]).await.is_ok() {
            state.forwarded.fetch_add(1, Ordering::Relaxed);
        }
    }
}
