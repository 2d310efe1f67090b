//! What the tests running `hexfleet-node` processes share.

use std::{
    net::SocketAddr,
    path::Path,
    process::{Child, Command},
    time::{Duration, Instant},
};

use hexfleet_model::{VehicleId, VehicleState};
use hexfleet_node::store::keys;
use hexfleet_testkit::{eventually, RedisServer};

/// How long a node process gets to start, or to show an outcome.
pub const WAIT: Duration = Duration::from_secs(20);

pub fn loopback(port: u16) -> SocketAddr {
    ([127, 0, 0, 1], port).into()
}

/// Where a node process listens, as it bound its listeners.
#[derive(Debug, Clone, Copy)]
pub struct Listening {
    pub quic: SocketAddr,
    pub http: SocketAddr,
    pub admin: SocketAddr,
}

/// Has `command` (a node) listen on loopback ports of its own choosing and
/// write its log to `log`; [`listening`] then says which ports.
pub fn on_chosen_ports<'c>(command: &'c mut Command, log: &Path) -> &'c mut Command {
    let any = loopback(0).to_string();
    let file = std::fs::File::create(log).expect("the node's log file");
    let copy = file.try_clone().expect("the node's log file, again");
    command
        .args(["--quic-listen", &any])
        .args(["--http-listen", &any])
        .args(["--admin-listen", &any])
        .stdout(copy)
        .stderr(file)
}

/// The addresses a node started with port 0 bound, from its `listening`
/// log line (written to `log`). Ports chosen by the node itself cannot be
/// taken by anyone between a probe and the bind, as a port found free
/// beforehand can (another test's server, or any client's outgoing
/// connection, may get it first). Panics with the log if the node exits
/// first or says nothing within [`WAIT`].
pub async fn listening(child: &mut Child, log: &Path) -> Listening {
    let deadline = Instant::now() + WAIT;
    loop {
        let text = std::fs::read_to_string(log).unwrap_or_default();
        if let Some(line) = text.lines().find(|l| l.contains(" listening ")) {
            let field = |name: &str| -> SocketAddr {
                let value = line
                    .split_whitespace()
                    .find_map(|word| word.strip_prefix(name)?.strip_prefix('='))
                    .unwrap_or_else(|| panic!("{name} in {line:?}"));
                value.parse().unwrap_or_else(|e| panic!("{name}: {e}"))
            };
            return Listening {
                quic: field("quic_addr"),
                http: field("http_addr"),
                admin: field("admin_addr"),
            };
        }
        if let Ok(Some(status)) = child.try_wait() {
            panic!("the node exited ({status}) before listening:\n{text}");
        }
        assert!(
            Instant::now() < deadline,
            "the node is not listening:\n{text}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Waits until the node whose admin listener is `admin` answers `/healthz`.
pub async fn healthy(admin: SocketAddr) {
    eventually(WAIT, "the node answers /healthz", async || {
        let resp = reqwest::get(format!("http://{admin}/healthz")).await.ok()?;
        (resp.status() == 200).then_some(())
    })
    .await;
}

/// The state Redis holds for a vehicle, found through its locator.
pub fn stored(redis: &RedisServer, id: &str) -> Option<VehicleState> {
    stored_in(&mut redis.conn(), id)
}

/// The same, through any connection (one server's, or a Redis Cluster's).
pub fn stored_in(conn: &mut dyn redis::ConnectionLike, id: &str) -> Option<VehicleState> {
    let id = VehicleId::new(id).ok()?;
    let shard: Option<String> = redis::cmd("GET").arg(keys::locator(&id)).query(conn).ok()?;
    let bytes: Option<Vec<u8>> = redis::cmd("HGET")
        .arg(keys::state(shard?.parse().ok()?))
        .arg(id.as_str())
        .query(conn)
        .ok()?;
    rmp_serde::from_slice(&bytes?).ok()
}
