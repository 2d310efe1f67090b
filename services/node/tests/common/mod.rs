//! What the tests running `hexfleet-node` processes share.

use std::{net::SocketAddr, time::Duration};

use hexfleet_model::{VehicleId, VehicleState};
use hexfleet_node::store::keys;
use hexfleet_testkit::{eventually, RedisServer};

/// How long a node process gets to start, or to show an outcome.
pub const WAIT: Duration = Duration::from_secs(20);

pub fn loopback(port: u16) -> SocketAddr {
    ([127, 0, 0, 1], port).into()
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
    let mut conn = redis.conn();
    let id = VehicleId::new(id).ok()?;
    let shard: Option<String> = redis::cmd("GET")
        .arg(keys::locator(&id))
        .query(&mut conn)
        .ok()?;
    let bytes: Option<Vec<u8>> = redis::cmd("HGET")
        .arg(keys::state(shard?.parse().ok()?))
        .arg(id.as_str())
        .query(&mut conn)
        .ok()?;
    rmp_serde::from_slice(&bytes?).ok()
}
