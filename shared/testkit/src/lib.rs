//! What hexfleet's tests and its benchmark start for themselves.
//!
//! - [`RedisServer`]: a private `redis-server` on a free loopback port, in a
//!   temporary directory, killed when dropped: no shared Redis, no fixed
//!   ports, nothing left running.
//! - [`RedisCluster`]: several `cluster-enabled` servers joined by
//!   `redis-cli --cluster create`, masters only.
//! - [`free_tcp_port`], [`free_udp_port`]: ports to bind on loopback.
//! - [`eventually`]: wait for an outcome instead of sleeping a guessed time.
//! - [`TcpRelay`]: a partition between one process and a server, made and
//!   healed on demand.

mod relay;

pub use relay::{TcpRelay, UdpRelay};

use std::{
    net::{TcpListener, UdpSocket},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

#[derive(Debug, thiserror::Error)]
pub enum TestkitError {
    #[error("spawning redis-server (install the Debian package redis-server): {0}")]
    Spawn(std::io::Error),
    #[error("redis-server exited: {0}")]
    Exited(std::process::ExitStatus),
    #[error("redis-server did not answer PING in 10 s")]
    NoAnswer,
    #[error("a temporary directory: {0}")]
    TempDir(std::io::Error),
    #[error("a free port: {0}")]
    Port(std::io::Error),
    #[error("port {0} was taken by another server")]
    PortTaken(u16),
    #[error("redis-cli --cluster create: {0}")]
    ClusterCreate(String),
    #[error("redis: {0}")]
    Redis(redis::RedisError),
    #[error("moving a slot: {0}")]
    Slot(String),
}

/// A master of a Redis Cluster and the slot ranges it serves.
struct SlotMaster {
    id: String,
    port: u16,
    slots: Vec<(u16, u16)>,
}

/// A `redis-server` of its own, on a free port, in a temp directory.
pub struct RedisServer {
    child: Option<Child>,
    pub port: u16,
    dir: tempfile::TempDir,
}

/// A free TCP port on 127.0.0.1.
pub fn free_tcp_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("the OS hands out a free port")
}

/// A free UDP port on 127.0.0.1.
pub fn free_udp_port() -> u16 {
    UdpSocket::bind("127.0.0.1:0")
        .and_then(|s| s.local_addr())
        .map(|a| a.port())
        .expect("the OS hands out a free port")
}

impl RedisServer {
    /// Starts one, or panics saying why (for tests).
    pub fn start() -> Self {
        Self::try_start().unwrap_or_else(|e| panic!("could not start redis-server: {e}"))
    }

    /// Starts one. A free port can be taken between the probe and Redis
    /// binding it, so a few ports are tried.
    pub fn try_start() -> Result<Self, TestkitError> {
        let mut last_error = TestkitError::NoAnswer;
        for _ in 0..5 {
            let port = TcpListener::bind("127.0.0.1:0")
                .and_then(|l| l.local_addr())
                .map_err(TestkitError::Port)?
                .port();
            let mut server = Self {
                child: None,
                port,
                dir: tempfile::tempdir().map_err(TestkitError::TempDir)?,
            };
            match server.spawn() {
                Ok(()) => return Ok(server),
                Err(e @ TestkitError::Spawn(_)) => return Err(e),
                Err(e) => last_error = e,
            }
        }
        Err(last_error)
    }

    fn spawn(&mut self) -> Result<(), TestkitError> {
        self.spawn_with(&[])
    }

    fn spawn_with(&mut self, extra: &[&str]) -> Result<(), TestkitError> {
        let child = Command::new("redis-server")
            .args(extra)
            .args([
                "--port",
                &self.port.to_string(),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
            ])
            .arg("--dir")
            .arg(self.dir.path())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(TestkitError::Spawn)?;
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Ok(mut conn) = redis::Client::open(self.url()).and_then(|c| c.get_connection()) {
                // The server answering must be this one, not another that
                // took the port between the probe and this server's bind
                // (this one then exits): its working directory is ours.
                let dir: redis::RedisResult<(String, String)> =
                    redis::cmd("CONFIG").arg("GET").arg("dir").query(&mut conn);
                match dir {
                    Ok((_, dir)) if same_dir(&dir, self.dir.path()) => return Ok(()),
                    Ok(_) => return Err(TestkitError::PortTaken(self.port)),
                    Err(_) => {}
                }
            }
            if let Some(Ok(Some(status))) = self.child.as_mut().map(|c| c.try_wait()) {
                return Err(TestkitError::Exited(status));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Err(TestkitError::NoAnswer)
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// The server's process id, for faults (SIGSTOP/SIGCONT).
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Kills the server (a crash, for fault tests).
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts it again on the same port, empty.
    /// Stalls the server with its data kept (SIGSTOP): connections stay
    /// open and nothing is answered until [`RedisServer::resume`].
    pub fn stall(&self) {
        self.signal("-STOP");
    }

    /// Lets a stalled server answer again (SIGCONT).
    pub fn resume(&self) {
        self.signal("-CONT");
    }

    fn signal(&self, signal: &str) {
        let pid = self.pid().expect("the server runs");
        let status = Command::new("kill")
            .args([signal, &pid.to_string()])
            .status()
            .expect("kill runs");
        assert!(status.success(), "kill {signal} {pid}");
    }

    pub fn restart(&mut self) {
        self.kill();
        self.spawn().expect("redis-server restarts");
    }

    /// A synchronous connection for checking what a node wrote.
    pub fn conn(&self) -> redis::Connection {
        redis::Client::open(self.url())
            .and_then(|c| c.get_connection())
            .expect("connect to the test redis")
    }
}

fn same_dir(a: &str, b: &std::path::Path) -> bool {
    let canonical = |p: &std::path::Path| std::fs::canonicalize(p).unwrap_or_else(|_| p.into());
    canonical(std::path::Path::new(a)) == canonical(b)
}

/// A Redis Cluster of its own: `masters` servers with `cluster-enabled
/// yes`, their slots spread by `redis-cli --cluster create`.
pub struct RedisCluster {
    pub servers: Vec<RedisServer>,
}

impl RedisCluster {
    /// Starts one and waits until every slot is served, or panics.
    pub fn start(masters: usize) -> Self {
        Self::try_start(masters).unwrap_or_else(|e| panic!("could not start a Redis Cluster: {e}"))
    }

    pub fn try_start(masters: usize) -> Result<Self, TestkitError> {
        Self::try_start_with(masters, 0)
    }

    /// Starts one with a replica per master, failing a dead master over
    /// within about a second (`cluster-node-timeout` 1000 ms), and waits
    /// until every slot is served and every replica in sync, or panics.
    pub fn start_with_replicas(masters: usize) -> Self {
        Self::try_start_with(masters, 1)
            .unwrap_or_else(|e| panic!("could not start a Redis Cluster with replicas: {e}"))
    }

    fn try_start_with(masters: usize, replicas: usize) -> Result<Self, TestkitError> {
        let mut servers = Vec::new();
        for _ in 0..masters * (1 + replicas) {
            let port = free_tcp_port();
            let mut server = RedisServer {
                child: None,
                port,
                dir: tempfile::tempdir().map_err(TestkitError::TempDir)?,
            };
            let conf = server.dir.path().join("nodes.conf");
            let conf = conf.to_string_lossy().into_owned();
            server.spawn_with(&[
                "--cluster-enabled",
                "yes",
                "--cluster-config-file",
                &conf,
                "--cluster-node-timeout",
                "1000",
            ])?;
            servers.push(server);
        }
        let addrs: Vec<String> = servers
            .iter()
            .map(|s| format!("127.0.0.1:{}", s.port))
            .collect();
        let out = Command::new("redis-cli")
            .arg("--cluster")
            .arg("create")
            .args(&addrs)
            .args(["--cluster-replicas", &replicas.to_string(), "--cluster-yes"])
            .output()
            .map_err(TestkitError::Spawn)?;
        if !out.status.success() {
            return Err(TestkitError::ClusterCreate(
                String::from_utf8_lossy(&out.stdout).into_owned(),
            ));
        }
        let cluster = Self { servers };
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if cluster.servers.iter().all(|s| {
                let mut conn = s.conn();
                let info: String = redis::cmd("CLUSTER")
                    .arg("INFO")
                    .query(&mut conn)
                    .unwrap_or_default();
                info.contains("cluster_state:ok")
            }) && cluster.replicas_in_sync() == masters * replicas
            {
                return Ok(cluster);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Err(TestkitError::NoAnswer)
    }

    /// How many replicas have finished their first sync with a master.
    fn replicas_in_sync(&self) -> usize {
        self.servers
            .iter()
            .filter(|s| {
                let info = replication(s);
                info.contains("role:slave") && info.contains("master_link_status:up")
            })
            .count()
    }

    /// The live servers that are masters now (failovers promote replicas).
    pub fn masters(&mut self) -> Vec<&mut RedisServer> {
        self.servers
            .iter_mut()
            .filter(|s| s.child.is_some() && replication(s).contains("role:master"))
            .collect()
    }

    /// Asks a replica to take its master's place (`CLUSTER FAILOVER`, the
    /// operator's planned switch-over); returns its port.
    pub fn fail_over(&mut self) -> Option<u16> {
        let replica = self
            .servers
            .iter()
            .find(|s| s.child.is_some() && replication(s).contains("role:slave"))?;
        redis::cmd("CLUSTER")
            .arg("FAILOVER")
            .query::<()>(&mut replica.conn())
            .ok()?;
        Some(replica.port)
    }

    /// Whether the server on `port` is a master now.
    pub fn is_master(&self, port: u16) -> bool {
        self.servers
            .iter()
            .any(|s| s.port == port && s.child.is_some() && replication(s).contains("role:master"))
    }

    /// Whether every live server says every slot is served (after a
    /// failover: once a replica has taken the dead master's slots).
    pub fn serving(&self) -> bool {
        self.servers.iter().filter(|s| s.child.is_some()).all(|s| {
            let info: String = redis::cmd("CLUSTER")
                .arg("INFO")
                .query(&mut s.conn())
                .unwrap_or_default();
            info.contains("cluster_state:ok")
        })
    }

    /// Moves hash slot `slot` to another master with its keys, the way
    /// `redis-cli --cluster reshard` does it (`SETSLOT IMPORTING` and
    /// `MIGRATING`, `MIGRATE` in batches, then `SETSLOT NODE` everywhere),
    /// while clients go on using it (they follow `ASK` and `MOVED`).
    /// Returns the ports it moved from and to.
    pub fn move_slot(&self, slot: u16) -> Result<(u16, u16), TestkitError> {
        let masters = self.slot_masters()?;
        let from = masters
            .iter()
            .find(|m| m.slots.iter().any(|&(lo, hi)| lo <= slot && slot <= hi))
            .ok_or_else(|| TestkitError::Slot(format!("no master serves slot {slot}")))?;
        let to = masters
            .iter()
            .find(|m| m.id != from.id)
            .ok_or_else(|| TestkitError::Slot("no other master to move a slot to".into()))?;
        let server = |port: u16| {
            self.servers
                .iter()
                .find(|s| s.port == port)
                .ok_or_else(|| TestkitError::Slot(format!("no server of this cluster on {port}")))
        };
        let (mut src, mut dst) = (server(from.port)?.conn(), server(to.port)?.conn());
        let setslot = |conn: &mut redis::Connection, how: &str, id: &str| {
            redis::cmd("CLUSTER")
                .arg("SETSLOT")
                .arg(slot)
                .arg(how)
                .arg(id)
                .query::<()>(conn)
                .map_err(TestkitError::Redis)
        };
        setslot(&mut dst, "IMPORTING", &from.id)?;
        setslot(&mut src, "MIGRATING", &to.id)?;
        loop {
            let keys: Vec<String> = redis::cmd("CLUSTER")
                .arg("GETKEYSINSLOT")
                .arg(slot)
                .arg(100)
                .query(&mut src)
                .map_err(TestkitError::Redis)?;
            if keys.is_empty() {
                break;
            }
            redis::cmd("MIGRATE")
                .arg("127.0.0.1")
                .arg(to.port)
                .arg("")
                .arg(0)
                .arg(5000)
                .arg("KEYS")
                .arg(&keys)
                .query::<()>(&mut src)
                .map_err(TestkitError::Redis)?;
        }
        setslot(&mut dst, "NODE", &to.id)?;
        setslot(&mut src, "NODE", &to.id)?;
        for other in masters.iter().filter(|m| m.id != from.id && m.id != to.id) {
            setslot(&mut server(other.port)?.conn(), "NODE", &to.id)?;
        }
        Ok((from.port, to.port))
    }

    /// The masters and their slot ranges, as `CLUSTER NODES` on a live
    /// master says.
    fn slot_masters(&self) -> Result<Vec<SlotMaster>, TestkitError> {
        let server = self
            .servers
            .iter()
            .find(|s| s.child.is_some() && replication(s).contains("role:master"))
            .ok_or(TestkitError::NoAnswer)?;
        let nodes: String = redis::cmd("CLUSTER")
            .arg("NODES")
            .query(&mut server.conn())
            .map_err(TestkitError::Redis)?;
        Ok(nodes
            .lines()
            .filter_map(|line| {
                let fields: Vec<&str> = line.split_whitespace().collect();
                let flags = fields.get(2)?;
                if !flags.contains("master") || flags.contains("fail") {
                    return None;
                }
                let port = fields.get(1)?.split(['@', ':']).nth(1)?.parse().ok()?;
                let slots = fields
                    .get(8..)
                    .unwrap_or_default()
                    .iter()
                    .filter(|f| !f.starts_with('['))
                    .filter_map(|range| {
                        let (lo, hi) = range.split_once('-').unwrap_or((range, range));
                        Some((lo.parse().ok()?, hi.parse().ok()?))
                    })
                    .collect();
                Some(SlotMaster {
                    id: fields.first()?.to_string(),
                    port,
                    slots,
                })
            })
            .collect())
    }

    /// The hash slot of `key`.
    pub fn slot_of(&self, key: &str) -> Result<u16, TestkitError> {
        let server = self
            .servers
            .iter()
            .find(|s| s.child.is_some())
            .ok_or(TestkitError::NoAnswer)?;
        redis::cmd("CLUSTER")
            .arg("KEYSLOT")
            .arg(key)
            .query(&mut server.conn())
            .map_err(TestkitError::Redis)
    }

    /// A cluster client's connection (it follows `MOVED` and `ASK`), for a
    /// test to look at what the cluster holds.
    pub fn conn(&self) -> redis::cluster::ClusterConnection {
        let seeds: Vec<String> = self
            .servers
            .iter()
            .filter(|s| s.child.is_some())
            .map(RedisServer::url)
            .collect();
        redis::cluster::ClusterClient::new(seeds)
            .and_then(|client| client.get_connection())
            .expect("a connection to the Redis Cluster")
    }

    /// The seed list a cluster client takes: every server, comma-separated.
    pub fn seeds(&self) -> String {
        self.servers
            .iter()
            .map(RedisServer::url)
            .collect::<Vec<_>>()
            .join(",")
    }
}

/// A server's `INFO replication` (empty if it does not answer).
fn replication(server: &RedisServer) -> String {
    redis::cmd("INFO")
        .arg("replication")
        .query(&mut server.conn())
        .unwrap_or_default()
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Polls `check` until it returns `Some`, or panics after `within`. Tests
/// wait for outcomes this way rather than sleeping a guessed time.
pub async fn eventually<T>(
    within: Duration,
    what: &str,
    mut check: impl AsyncFnMut() -> Option<T>,
) -> T {
    let deadline = Instant::now() + within;
    loop {
        if let Some(v) = check().await {
            return v;
        }
        if Instant::now() > deadline {
            panic!("timed out after {within:?} waiting for: {what}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
