//! The Redis store against a real `redis-server`: what drivers send ends up
//! in the per-shard keys, nearby search is right, stale vehicles go, the
//! memory store answers the same, and an outage loses nothing.

use std::{collections::HashMap, sync::Arc, time::Duration};

use hexfleet_client::{ClientError, FixInput};
use hexfleet_model::{
    geodesy::haversine_m, CellModel, Position, ShardId, VehicleClass, VehicleId, VehicleState,
    VehicleStatus, ZoneId,
};
use hexfleet_node::{
    metrics::Metrics,
    store::{
        keys,
        memory::MemoryStore,
        redis::RedisStore,
        writer::{StoreWriter, Unfenced},
        Batch, NearbyQuery, Removal, ShardBatch, Store, Upsert, Version,
    },
    table::Entry,
};
use hexfleet_protocol::{
    zone::{ZoneCause, ZoneEvent, ZoneEventKind},
    ErrorCode, RejectReason, RemoveReason, Role,
};
use hexfleet_tests::*;
use rand::{rngs::StdRng, Rng, SeedableRng};
use tokio_util::sync::CancellationToken;

const WAIT: Duration = Duration::from_secs(20);
const BERLIN: (f64, f64) = (52.52, 13.405);

fn state(id: &str, lat: f64, lon: f64, seq: u64) -> VehicleState {
    VehicleState {
        id: VehicleId::new(id).unwrap(),
        lat,
        lon,
        heading_deg: 0.0,
        speed_mps: 5.0,
        accuracy_m: 3.0,
        fix_time_ms: now_ms(),
        seq,
        class: VehicleClass::Economy,
        status: VehicleStatus::Available,
        seen_ms: now_ms(),
        zones: Vec::new(),
        clock_offset_ms: 0,
    }
}

fn shard_of(s: &VehicleState) -> ShardId {
    CellModel::default().locate(s.position()).1
}

/// A batch that places each vehicle in its shard (first appearance).
fn placing(states: &[VehicleState]) -> Batch {
    let mut by_shard: HashMap<ShardId, Vec<Upsert>> = HashMap::new();
    for s in states {
        by_shard.entry(shard_of(s)).or_default().push(Upsert {
            state: s.clone(),
            relocated: true,
            seen: true,
        });
    }
    Batch {
        shards: by_shard
            .into_iter()
            .map(|(shard, upserts)| ShardBatch {
                shard,
                upserts,
                removals: vec![],
                fence: None,
                publish: false,
                events: Vec::new(),
            })
            .collect(),
    }
}

fn random_city(rng: &mut StdRng, n: usize, spread_deg: f64) -> Vec<VehicleState> {
    (0..n)
        .map(|i| {
            let lat = BERLIN.0 + rng.random_range(-spread_deg..spread_deg);
            let lon = BERLIN.1 + rng.random_range(-spread_deg..spread_deg) * 1.6;
            state(&format!("v{i}"), lat, lon, 1)
        })
        .collect()
}

#[tokio::test]
async fn two_hundred_drivers_over_quic_end_up_in_redis_at_their_positions() {
    let redis = RedisServer::start();
    let node = TestNode::start(Some(&redis)).await;
    let connector = node.connector();
    let mut rng = StdRng::seed_from_u64(1);
    let mut drivers = Vec::new();
    for i in 0..200 {
        let id = format!("drv-{i}");
        let client = connector
            .driver(node.node.quic_addr, &driver_token(&id), available())
            .await
            .unwrap();
        drivers.push((id, client));
    }
    let mut expected = HashMap::new();
    for (id, client) in &mut drivers {
        let lat = BERLIN.0 + rng.random_range(-0.5..0.5);
        let lon = BERLIN.1 + rng.random_range(-0.8..0.8);
        let seq = client.send_fix(FixInput::at(lat, lon)).await.unwrap();
        expected.insert(id.clone(), (lat, lon, seq));
    }
    for (id, client) in &drivers {
        let seq = expected[id].2;
        eventually(WAIT, "every fix acknowledged", async || {
            (client.acked_seq() == seq).then_some(())
        })
        .await;
    }

    let mut conn = redis.conn();
    eventually(WAIT, "all 200 vehicles in the geo keys", async || {
        let total: usize = expected
            .values()
            .map(|&(lat, lon, _)| shard_of(&state("x", lat, lon, 0)))
            .collect::<std::collections::HashSet<_>>()
            .into_iter()
            .map(|shard| {
                redis::cmd("ZCARD")
                    .arg(keys::geo(shard))
                    .query::<usize>(&mut conn)
                    .unwrap()
            })
            .sum();
        (total == 200).then_some(())
    })
    .await;
    for (id, &(lat, lon, seq)) in &expected {
        let shard = shard_of(&state("x", lat, lon, 0));
        let pos: Vec<Option<(f64, f64)>> = redis::cmd("GEOPOS")
            .arg(keys::geo(shard))
            .arg(id)
            .query(&mut conn)
            .unwrap();
        let (glon, glat) = pos[0].expect("GEOPOS finds the vehicle");
        assert!(
            haversine_m(lat, lon, glat, glon) < 1.0,
            "{id}: sent ({lat}, {lon}), stored ({glat}, {glon})"
        );
        let seen: Option<f64> = redis::cmd("ZSCORE")
            .arg(keys::seen(shard))
            .arg(id)
            .query(&mut conn)
            .unwrap();
        assert!(seen.is_some(), "{id} has a last-seen time");
        let raw: Vec<u8> = redis::cmd("HGET")
            .arg(keys::state(shard))
            .arg(id)
            .query(&mut conn)
            .unwrap();
        let stored: VehicleState = rmp_serde::from_slice(&raw).unwrap();
        assert_eq!(stored.seq, seq);
    }
    node.stop().await;
}

/// Asks for the vehicles within a radius, nearest first: (id, distance).
async fn by_http(
    node: &TestNode,
    lat: f64,
    lon: f64,
    radius: f64,
    limit: usize,
) -> Vec<(String, f64)> {
    let (status, body) = node
        .get_json(&format!(
            "/v1/vehicles?lat={lat}&lon={lon}&radius_m={radius}&limit={limit}"
        ))
        .await;
    assert_eq!(status, 200, "{body}");
    body["vehicles"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| {
            (
                v["id"].as_str().unwrap().to_string(),
                v["distance_m"].as_f64().unwrap(),
            )
        })
        .collect()
}

/// The same, asked of a store, over every shard the circle can touch.
async fn by_store(
    store: &dyn Store,
    lat: f64,
    lon: f64,
    radius: f64,
    limit: usize,
) -> Vec<(String, f64)> {
    let center = Position::new(lat, lon).unwrap();
    let query = NearbyQuery {
        center,
        radius_m: radius,
        limit,
        shards: CellModel::default().shards_within(center, radius),
    };
    store
        .nearby(&query)
        .await
        .unwrap()
        .into_iter()
        .map(|n| (n.state.id.to_string(), n.distance_m))
        .collect()
}

async fn check_nearby_against_brute_force(
    ask: impl AsyncFn(f64, f64, f64, usize) -> Vec<(String, f64)>,
    vehicles: &[VehicleState],
    rng: &mut StdRng,
) {
    // Redis stores positions as 52-bit geohashes (~0.6 m): vehicles within
    // this margin of the radius may fall either way.
    const MARGIN_M: f64 = 2.0;
    for _ in 0..40 {
        let (lat, lon) = (
            BERLIN.0 + rng.random_range(-0.2..0.2),
            BERLIN.1 + rng.random_range(-0.3..0.3),
        );
        let radius = rng.random_range(200.0..15_000.0);
        let got = ask(lat, lon, radius, 1000).await;
        assert!(got.windows(2).all(|w| w[0].1 <= w[1].1), "nearest first");
        let got_ids: std::collections::HashSet<&str> =
            got.iter().map(|(id, _)| id.as_str()).collect();
        for v in vehicles {
            let d = haversine_m(lat, lon, v.lat, v.lon);
            if (d - radius).abs() < MARGIN_M {
                continue;
            }
            assert_eq!(
                got_ids.contains(v.id.as_str()),
                d < radius,
                "{} at {d:.1} m, radius {radius:.1} m",
                v.id
            );
        }
        for (id, d) in &got {
            let v = vehicles.iter().find(|v| v.id.as_str() == id).unwrap();
            assert!((haversine_m(lat, lon, v.lat, v.lon) - d).abs() < MARGIN_M);
        }
        // A limit keeps the nearest.
        let limited = ask(lat, lon, radius, 5).await;
        let limited: Vec<&str> = limited.iter().map(|(id, _)| id.as_str()).collect();
        assert_eq!(limited.len(), got.len().min(5));
        for (i, id) in limited.iter().enumerate() {
            assert!((got[i].1 - got.iter().find(|g| g.0 == *id).unwrap().1).abs() < MARGIN_M);
        }
    }
}

/// What a cluster node asks Redis for the shards of other nodes.
#[tokio::test]
async fn a_nearby_search_of_redis_matches_brute_force_haversine() {
    let redis = RedisServer::start();
    let store = RedisStore::connect(&redis.url()).await.unwrap();
    let mut rng = StdRng::seed_from_u64(2);
    let vehicles = random_city(&mut rng, 3_000, 0.25);
    store.apply(&placing(&vehicles)).await.unwrap();
    let ask = async |lat, lon, radius, limit| by_store(&store, lat, lon, radius, limit).await;
    check_nearby_against_brute_force(ask, &vehicles, &mut rng).await;
}

/// A vehicle left in two shards' geo keys (a node died between writing the
/// shard it went to and leaving the one it left) is found once, as its
/// newest state, and takes no other vehicle's place under a limit.
#[tokio::test]
async fn a_vehicle_stored_in_two_shards_is_found_once_as_its_newest_state() {
    let redis = RedisServer::start();
    let store = RedisStore::connect(&redis.url()).await.unwrap();
    let (west, east) = across_a_shard_boundary(BERLIN);
    let old = state("twice", west.0, west.1, 1);
    let new = state("twice", east.0, east.1, 2);
    // Farther away, on both sides of the boundary.
    let others: Vec<VehicleState> = (1..=4)
        .map(|i| {
            let (lat, lon) = if i % 2 == 0 { west } else { east };
            state(&format!("other-{i}"), lat + f64::from(i) * 0.002, lon, 1)
        })
        .collect();
    store
        .apply(&placing(std::slice::from_ref(&old)))
        .await
        .unwrap();
    store.apply(&placing(&others)).await.unwrap();
    // Written to the shard it went to; its removal from the other, lost.
    store
        .apply(&placing(std::slice::from_ref(&new)))
        .await
        .unwrap();
    assert_eq!(traces_in(&redis, shard_of(&old), "twice"), [true; 3]);
    assert_eq!(traces_in(&redis, shard_of(&new), "twice"), [true; 3]);

    let center = Position::new(west.0, west.1).unwrap();
    for limit in [1, 3, 5, 50] {
        let query = NearbyQuery {
            center,
            radius_m: 2_000.0,
            limit,
            shards: CellModel::default().shards_within(center, 2_000.0),
        };
        let found = store.nearby(&query).await.unwrap();
        let ids: Vec<&str> = found.iter().map(|n| n.state.id.as_str()).collect();
        let mut unique = ids.clone();
        unique.sort_unstable();
        unique.dedup();
        assert_eq!(unique.len(), ids.len(), "limit {limit}: {ids:?}");
        assert_eq!(ids.len(), limit.min(5), "limit {limit}: {ids:?}");
        assert_eq!(ids[0], "twice", "the nearest, at 50 m or less");
        assert_eq!(found[0].state.seq, 2, "as its newest state");
        assert!((found[0].state.lon - east.1).abs() < 1e-9);
    }
}

/// The node's own vehicles: from its memory, whatever its store.
#[tokio::test]
async fn the_nearby_api_answers_from_memory_like_brute_force_haversine() {
    let redis = RedisServer::start();
    for store in [None, Some(&redis)] {
        let node = TestNode::start(store).await;
        let mut rng = StdRng::seed_from_u64(3);
        let vehicles = random_city(&mut rng, 3_000, 0.25);
        let cells = CellModel::default();
        for v in &vehicles {
            let (cell, shard) = cells.locate(Position::new(v.lat, v.lon).unwrap());
            node.node.table.upsert(Entry {
                state: v.clone(),
                cell,
                shard,
            });
        }
        let ask = async |lat, lon, radius, limit| by_http(&node, lat, lon, radius, limit).await;
        check_nearby_against_brute_force(ask, &vehicles, &mut rng).await;
        node.stop().await;
    }
}

#[tokio::test]
async fn stale_vehicles_are_evicted_from_the_table_and_from_redis() {
    let redis = RedisServer::start();
    let node = TestNode::start_with(Some(&redis), |c| {
        c.store.stale_after = Duration::from_secs(1);
        c.store.sweep_interval = Duration::from_millis(100);
    })
    .await;
    let connector = node.connector();
    let mut quiet = connector
        .driver(node.node.quic_addr, &driver_token("drv-quiet"), available())
        .await
        .unwrap();
    let mut chatty = connector
        .driver(
            node.node.quic_addr,
            &driver_token("drv-chatty"),
            available(),
        )
        .await
        .unwrap();
    quiet.send_fix(FixInput::at(52.5, 13.4)).await.unwrap();
    chatty.send_fix(FixInput::at(52.6, 13.3)).await.unwrap();
    let shard = shard_of(&state("x", 52.5, 13.4, 0));
    let mut conn = redis.conn();
    eventually(WAIT, "both vehicles stored", async || {
        let (a, _) = node.get_json("/v1/vehicles/drv-quiet").await;
        let (b, _) = node.get_json("/v1/vehicles/drv-chatty").await;
        (a == 200 && b == 200).then_some(())
    })
    .await;
    // The quiet driver says nothing more; the chatty one keeps going.
    let stop = tokio::time::Instant::now() + Duration::from_secs(3);
    let mut lat = 52.6;
    while tokio::time::Instant::now() < stop {
        lat += 1e-5;
        chatty.send_fix(FixInput::at(lat, 13.3)).await.unwrap();
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    eventually(WAIT, "the quiet vehicle evicted everywhere", async || {
        let (status, _) = node.get_json("/v1/vehicles/drv-quiet").await;
        let pos: Vec<Option<(f64, f64)>> = redis::cmd("GEOPOS")
            .arg(keys::geo(shard))
            .arg("drv-quiet")
            .query(&mut conn)
            .unwrap();
        let in_state: bool = redis::cmd("HEXISTS")
            .arg(keys::state(shard))
            .arg("drv-quiet")
            .query(&mut conn)
            .unwrap();
        let seen: Option<f64> = redis::cmd("ZSCORE")
            .arg(keys::seen(shard))
            .arg("drv-quiet")
            .query(&mut conn)
            .unwrap();
        (status == 404 && pos[0].is_none() && !in_state && seen.is_none()).then_some(())
    })
    .await;
    let (status, _) = node.get_json("/v1/vehicles/drv-chatty").await;
    assert_eq!(
        status, 200,
        "a vehicle that keeps reporting is never evicted"
    );
    assert!(node.metric("hexfleet_vehicles_evicted_total").await >= 1.0);
    node.stop().await;
}

fn shard_batch(shards: &mut HashMap<ShardId, ShardBatch>, shard: ShardId) -> &mut ShardBatch {
    shards.entry(shard).or_insert_with(|| ShardBatch {
        shard,
        upserts: vec![],
        removals: vec![],
        fence: None,
        publish: false,
        events: Vec::new(),
    })
}

/// Random moves (within and across shards), status changes and removals,
/// as the writer would batch them.
fn random_workload(
    rng: &mut StdRng,
    rounds: usize,
) -> (Vec<Batch>, HashMap<VehicleId, VehicleState>) {
    let mut live: HashMap<VehicleId, VehicleState> = HashMap::new();
    let mut batches = Vec::new();
    for round in 0..rounds {
        let mut shards: HashMap<ShardId, ShardBatch> = HashMap::new();
        let mut touched = std::collections::HashSet::new();
        for _ in 0..200 {
            let id = VehicleId::new(&format!("v{}", rng.random_range(0..500))).unwrap();
            if !touched.insert(id.clone()) {
                continue;
            }
            let previous = live.get(&id).cloned();
            if let Some(old) = previous.as_ref().filter(|_| rng.random_bool(0.1)) {
                let shard = shard_of(old);
                shard_batch(&mut shards, shard).removals.push(Removal {
                    id: id.clone(),
                    gone: Some(RemoveReason::Offline),
                    last: Version::of(old),
                });
                live.remove(&id);
                continue;
            }
            // Spread over ~1° so that moves cross shard boundaries.
            let mut s = state(
                id.as_str(),
                BERLIN.0 + rng.random_range(-0.5..0.5),
                BERLIN.1 + rng.random_range(-0.8..0.8),
                round as u64,
            );
            s.status = VehicleStatus::ALL[rng.random_range(0..3)];
            let shard = shard_of(&s);
            let relocated = match &previous {
                Some(old) if shard_of(old) != shard => {
                    let old_shard = shard_of(old);
                    shard_batch(&mut shards, old_shard).removals.push(Removal {
                        id: id.clone(),
                        gone: None,
                        last: Version::of(old),
                    });
                    true
                }
                Some(_) => false,
                None => true,
            };
            shard_batch(&mut shards, shard).upserts.push(Upsert {
                state: s.clone(),
                relocated,
                seen: true,
            });
            live.insert(id, s);
        }
        batches.push(Batch {
            shards: shards.into_values().collect(),
        });
    }
    (batches, live)
}

#[tokio::test]
async fn the_memory_and_redis_stores_agree_on_the_same_workload() {
    let redis = RedisServer::start();
    let on_redis = RedisStore::connect(&redis.url()).await.unwrap();
    let in_memory = MemoryStore::new();
    let mut rng = StdRng::seed_from_u64(4);
    let (batches, live) = random_workload(&mut rng, 30);
    for batch in &batches {
        on_redis.apply(batch).await.unwrap();
        in_memory.apply(batch).await.unwrap();
    }
    for i in 0..500 {
        let id = VehicleId::new(&format!("v{i}")).unwrap();
        let (r, m) = (
            on_redis.vehicle(&id).await.unwrap(),
            in_memory.vehicle(&id).await.unwrap(),
        );
        assert_eq!(r, m, "{id}");
        assert_eq!(m.as_ref(), live.get(&id), "{id}");
    }
    let mut from_redis = on_redis.load_all().await.unwrap();
    let mut from_memory = in_memory.load_all().await.unwrap();
    from_redis.sort_by(|a, b| a.id.cmp(&b.id));
    from_memory.sort_by(|a, b| a.id.cmp(&b.id));
    assert_eq!(from_redis, from_memory);
    assert_eq!(from_memory.len(), live.len());

    let cells = CellModel::default();
    for _ in 0..50 {
        let center = Position::new(
            BERLIN.0 + rng.random_range(-0.4..0.4),
            BERLIN.1 + rng.random_range(-0.6..0.6),
        )
        .unwrap();
        let radius_m = rng.random_range(500.0..20_000.0);
        let query = NearbyQuery {
            center,
            radius_m,
            limit: 10_000,
            shards: cells.shards_within(center, radius_m),
        };
        let ids = |found: Vec<hexfleet_node::store::Nearby>| -> Vec<String> {
            found
                .into_iter()
                .filter(|n| (n.distance_m - radius_m).abs() > 2.0)
                .map(|n| n.state.id.to_string())
                .collect::<std::collections::BTreeSet<_>>()
                .into_iter()
                .collect()
        };
        let (r, m) = (
            on_redis.nearby(&query).await.unwrap(),
            in_memory.nearby(&query).await.unwrap(),
        );
        assert_eq!(ids(r), ids(m));
    }
}

#[tokio::test]
async fn a_node_restarted_on_redis_takes_over_the_vehicles_it_finds() {
    let redis = RedisServer::start();
    let first = TestNode::start(Some(&redis)).await;
    let mut driver = first
        .connector()
        .driver(first.node.quic_addr, &driver_token("drv-p"), available())
        .await
        .unwrap();
    let seq = driver.send_fix(FixInput::at(48.137, 11.575)).await.unwrap();
    eventually(WAIT, "the vehicle stored", async || {
        (first.get_json("/v1/vehicles/drv-p").await.0 == 200).then_some(())
    })
    .await;
    drop(driver);
    first.stop().await;

    let second = TestNode::start(Some(&redis)).await;
    assert_eq!(
        second.node.table.len(),
        1,
        "the new node knows the stored vehicle"
    );
    let (status, v) = second.get_json("/v1/vehicles/drv-p").await;
    assert_eq!((status, v["seq"].as_u64()), (200, Some(seq)));
    // The driver resumes above its stored sequence on the new node.
    let client = second
        .connector()
        .driver(second.node.quic_addr, &driver_token("drv-p"), available())
        .await
        .unwrap();
    assert_eq!(client.first_seq(), seq + 1);
    second.stop().await;
}

#[tokio::test]
async fn a_redis_outage_loses_no_vehicle_and_harms_no_driver() {
    let mut redis = RedisServer::start();
    let node = TestNode::start(Some(&redis)).await;
    let mut driver = node
        .connector()
        .driver(node.node.quic_addr, &driver_token("drv-o"), available())
        .await
        .unwrap();
    driver.send_fix(FixInput::at(41.39, 2.17)).await.unwrap();
    eventually(WAIT, "stored before the outage", async || {
        (node.get_json("/v1/vehicles/drv-o").await.0 == 200).then_some(())
    })
    .await;

    redis.kill();
    // Degraded, not dead: liveness stays up so nothing restarts a node
    // that still serves live positions from memory.
    let (status, body) = node.admin_json("/healthz").await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["status"], "degraded");
    assert_eq!(body["store"]["ok"], false);
    // Ingest goes on while Redis is down.
    let (mut last, t0) = (0, now_ms());
    for i in 0..20 {
        let fix = FixInput {
            fix_time_ms: Some(t0 + i * 200),
            ..FixInput::at(41.39 + i as f64 * 1e-4, 2.17)
        };
        last = driver.send_fix(fix).await.unwrap();
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    eventually(WAIT, "flush failures counted", async || {
        (node.metric("hexfleet_store_flush_errors_total").await > 0.0).then_some(())
    })
    .await;
    // Accepted (the node answers for them from memory) but not
    // acknowledged: an acknowledgement promises the fix is kept.
    let (status, body) = node.get_json("/v1/vehicles/drv-o").await;
    assert_eq!((status, body["seq"].as_u64()), (200, Some(last)), "{body}");
    assert!(driver.acked_seq() < last, "acknowledged during the outage");

    // Redis comes back empty; the writer retries the latest state into it.
    redis.restart();
    let (status, body) = eventually(WAIT, "the latest fix in Redis after recovery", async || {
        let (status, body) = node.get_json("/v1/vehicles/drv-o").await;
        (status == 200 && body["seq"].as_u64() == Some(last)).then_some((status, body))
    })
    .await;
    assert_eq!(status, 200);
    assert!((body["lat"].as_f64().unwrap() - (41.39 + 19e-4)).abs() < 1e-9);
    // Written: now acknowledged.
    assert_eq!(driver.acknowledged(WAIT).await.unwrap(), last);
    assert_eq!(node.admin_json("/healthz").await.0, 200);
    node.stop().await;
}

/// Whether Redis holds any trace of `id` in `shard`: geo, last-seen, state.
fn traces_in(redis: &RedisServer, shard: ShardId, id: &str) -> [bool; 3] {
    let mut conn = redis.conn();
    let mut score = |key: String| -> bool {
        redis::cmd("ZSCORE")
            .arg(key)
            .arg(id)
            .query::<Option<f64>>(&mut conn)
            .unwrap()
            .is_some()
    };
    let (geo, seen) = (score(keys::geo(shard)), score(keys::seen(shard)));
    let state: bool = redis::cmd("HEXISTS")
        .arg(keys::state(shard))
        .arg(id)
        .query(&mut redis.conn())
        .unwrap();
    [geo, seen, state]
}

fn locator(redis: &RedisServer, id: &str) -> Option<String> {
    redis::cmd("GET")
        .arg(keys::locator(&VehicleId::new(id).unwrap()))
        .query(&mut redis.conn())
        .unwrap()
}

#[tokio::test]
async fn one_unwritable_vehicle_costs_only_itself_beside_a_thousand_healthy_ones() {
    let redis = RedisServer::start();
    let store: Arc<dyn Store> = Arc::new(RedisStore::connect(&redis.url()).await.unwrap());
    let metrics = Arc::new(Metrics::new());
    let writer = Arc::new(StoreWriter::new(metrics.clone()));
    let healthy = random_city(&mut StdRng::seed_from_u64(9), 1_000, 0.4);
    let shards: std::collections::HashSet<ShardId> = healthy.iter().map(shard_of).collect();
    assert!(shards.len() > 5, "healthy vehicles in several shards");
    // Staged before the writer runs, so all of it is one flush: a latitude
    // Redis cannot index, in the same shard as healthy vehicles.
    let bad_shard = shard_of(&healthy[0]);
    writer.stage_upsert(bad_shard, state("unwritable", 89.0, 13.4, 1), true);
    for s in &healthy {
        writer.stage_upsert(shard_of(s), s.clone(), true);
    }
    let stop = CancellationToken::new();
    let task = tokio::spawn(writer.clone().run(
        store.clone(),
        Arc::new(Unfenced),
        Duration::from_millis(5),
        stop.clone(),
    ));
    eventually(WAIT, "the refusal counted", async || {
        (metrics.store_refused.get() == 1).then_some(())
    })
    .await;
    for s in &healthy {
        let stored = store.vehicle(&s.id).await.unwrap();
        assert_eq!(stored.as_ref(), Some(s), "{} must land", s.id);
    }
    assert_eq!(traces_in(&redis, bad_shard, "unwritable"), [false; 3]);
    assert_eq!(locator(&redis, "unwritable"), None);
    assert_eq!(metrics.store_flush_errors.get(), 0, "nothing to retry");

    // The writer goes on, and the refused vehicle's next valid state is
    // written whole, locator included, though it is no longer an arrival.
    let later = state("later", BERLIN.0, BERLIN.1, 1);
    writer.stage_upsert(shard_of(&later), later.clone(), true);
    let valid = state("unwritable", 52.5, 13.4, 2);
    writer.stage_upsert(bad_shard, valid.clone(), false);
    eventually(WAIT, "later writes land", async || {
        let later_ok = store.vehicle(&later.id).await.unwrap().is_some();
        let valid_ok = store.vehicle(&valid.id).await.unwrap() == Some(valid.clone());
        (later_ok && valid_ok).then_some(())
    })
    .await;
    assert_eq!(metrics.store_refused.get(), 1);
    stop.cancel();
    task.await.unwrap();
}

#[tokio::test]
async fn a_fix_beyond_the_geo_index_is_rejected_and_every_later_vehicle_is_written() {
    let redis = RedisServer::start();
    let node = TestNode::start(Some(&redis)).await;
    let mut polar = node.driver("drv-polar", available()).await;
    polar
        .send_raw(hexfleet_protocol::Fix {
            seq: 1,
            fix_time_ms: now_ms(),
            lat: 89.0,
            lon: 13.4,
            heading_deg: 0.0,
            speed_mps: 0.0,
            accuracy_m: 5.0,
        })
        .await
        .unwrap();
    eventually(WAIT, "the polar fix rejected", async || {
        let rejections = polar.stats().rejections;
        rejections
            .contains(&(1, RejectReason::OutsideIndex))
            .then_some(())
    })
    .await;
    let mut later = Vec::new();
    for i in 0..20 {
        let mut d = node.driver(&format!("drv-after-{i}"), available()).await;
        d.send_fix(FixInput::at(BERLIN.0 + i as f64 * 1e-3, BERLIN.1))
            .await
            .unwrap();
        later.push(d);
    }
    for i in 0..20 {
        eventually(WAIT, "a later vehicle in Redis", async || {
            let path = format!("/v1/vehicles/drv-after-{i}");
            (node.get_json(&path).await.0 == 200).then_some(())
        })
        .await;
    }
    assert_eq!(
        node.metric("hexfleet_fixes_rejected_total{reason=\"outside_index\"}")
            .await,
        1.0
    );
    assert_eq!(node.metric("hexfleet_store_flush_errors_total").await, 0.0);
    node.stop().await;
}

/// Two points 50 m apart on either side of a shard boundary, east of `from`.
fn across_a_shard_boundary(from: (f64, f64)) -> ((f64, f64), (f64, f64)) {
    let cells = CellModel::default();
    let shard = |p: (f64, f64)| cells.locate(Position::new(p.0, p.1).unwrap()).1;
    let step = 50.0 / 111_320.0 / from.0.to_radians().cos();
    let mut here = from;
    loop {
        let next = (here.0, here.1 + step);
        if shard(next) != shard(here) {
            return (here, next);
        }
        here = next;
    }
}

#[tokio::test]
async fn removals_staged_while_redis_refuses_writes_land_when_it_accepts_them_again() {
    let redis = RedisServer::start();
    let node = TestNode::start(Some(&redis)).await;
    let (before, after) = across_a_shard_boundary(BERLIN);
    let shard = |p: (f64, f64)| {
        CellModel::default()
            .locate(Position::new(p.0, p.1).unwrap())
            .1
    };
    let leaving = node.driver("drv-leaving", available()).await;
    let mut crossing = node.driver("drv-crossing", available()).await;
    let mut staying = node.driver("drv-staying", available()).await;
    let mut leaving = leaving;
    leaving
        .send_fix(FixInput::at(BERLIN.0, BERLIN.1))
        .await
        .unwrap();
    crossing
        .send_fix(FixInput::at(before.0, before.1))
        .await
        .unwrap();
    staying
        .send_fix(FixInput::at(BERLIN.0 + 0.01, BERLIN.1))
        .await
        .unwrap();
    for (id, at) in [
        ("drv-leaving", BERLIN),
        ("drv-crossing", before),
        ("drv-staying", (BERLIN.0 + 0.01, BERLIN.1)),
    ] {
        eventually(WAIT, "stored before Redis refuses writes", async || {
            (traces_in(&redis, shard(at), id) == [true; 3]).then_some(())
        })
        .await;
    }

    // Redis keeps its data but refuses every write (NOREPLICAS).
    let mut admin = redis.conn();
    let refuse = |n: u32| {
        redis::cmd("CONFIG")
            .arg("SET")
            .arg("min-replicas-to-write")
            .arg(n)
            .clone()
    };
    refuse(1).query::<()>(&mut admin).unwrap();
    // Not confirmed while Redis refuses it (a goodbye is confirmed once
    // written); the removal waits in the node and lands later.
    let said = leaving.goodbye().await;
    assert!(
        matches!(
            said,
            Err(ClientError::Refused {
                code: ErrorCode::Unavailable,
                ..
            })
        ),
        "{said:?}"
    );
    tokio::time::sleep(Duration::from_millis(1_100)).await;
    crossing
        .send_fix(FixInput::at(after.0, after.1))
        .await
        .unwrap();
    eventually(WAIT, "the node sees the crossing", async || {
        let entry = node
            .node
            .table
            .get(&VehicleId::new("drv-crossing").unwrap());
        entry.filter(|e| e.shard == shard(after)).map(|_| ())
    })
    .await;
    let errors = node.metric("hexfleet_store_flush_errors_total").await;
    eventually(WAIT, "several flushes refused", async || {
        (node.metric("hexfleet_store_flush_errors_total").await >= errors + 2.0).then_some(())
    })
    .await;
    // Nothing of it reached Redis yet.
    assert_eq!(traces_in(&redis, shard(BERLIN), "drv-leaving"), [true; 3]);
    assert_eq!(traces_in(&redis, shard(before), "drv-crossing"), [true; 3]);

    refuse(0).query::<()>(&mut admin).unwrap();
    eventually(WAIT, "the removals and the move in Redis", async || {
        let gone = traces_in(&redis, shard(BERLIN), "drv-leaving") == [false; 3]
            && locator(&redis, "drv-leaving").is_none();
        let moved = traces_in(&redis, shard(before), "drv-crossing") == [false; 3]
            && traces_in(&redis, shard(after), "drv-crossing") == [true; 3]
            && locator(&redis, "drv-crossing") == Some(shard(after).to_string());
        (gone && moved).then_some(())
    })
    .await;
    assert_eq!(
        traces_in(&redis, shard(BERLIN), "drv-staying"),
        [true; 3],
        "an untouched vehicle stays"
    );
    drop(staying);
    node.stop().await;
}

/// Sends SIGSTOP or SIGCONT to a process.
fn signal(pid: u32, signal: &str) {
    let status = std::process::Command::new("kill")
        .args([signal, &pid.to_string()])
        .status()
        .unwrap();
    assert!(status.success());
}

#[tokio::test]
async fn a_node_starts_while_redis_hangs_serves_from_memory_and_catches_up_when_it_answers() {
    let redis = RedisServer::start();
    preload(&redis, &[state("parked-1", BERLIN.0, BERLIN.1, 3)]).await;
    let pid = redis.pid().unwrap();
    signal(pid, "-STOP");
    // Redis accepts connections (the kernel does) but answers nothing.
    let node = TestNode::start(Some(&redis)).await;
    let (status, body) = node.admin_json("/healthz").await;
    assert_eq!(
        (status, body["status"].as_str()),
        (200, Some("degraded")),
        "{body}"
    );
    assert_eq!(node.metric("hexfleet_store_up").await, 0.0);

    // Live positions flow from memory meanwhile.
    let rider = node
        .connector()
        .rider(
            node.node.quic_addr,
            &token(Role::Rider, "r-1"),
            Default::default(),
        )
        .await
        .unwrap();
    rider.subscribe(hexfleet_client::Subscription::around(
        BERLIN.0, BERLIN.1, 2_000.0,
    ));
    let mut driver = node.driver("drv-live", available()).await;
    driver
        .send_fix(FixInput::at(BERLIN.0 + 0.001, BERLIN.1))
        .await
        .unwrap();
    eventually(
        WAIT,
        "the rider sees the driver while Redis hangs",
        async || {
            rider
                .view()
                .contains_key(&VehicleId::new("drv-live").unwrap())
                .then_some(())
        },
    )
    .await;

    signal(pid, "-CONT");
    eventually(WAIT, "the node writes what it took live", async || {
        (node.get_json("/v1/vehicles/drv-live").await.0 == 200).then_some(())
    })
    .await;
    eventually(WAIT, "and holds what Redis held", async || {
        node.node
            .table
            .get(&VehicleId::new("parked-1").unwrap())
            .map(|_| ())
    })
    .await;
    eventually(WAIT, "the rider sees the parked car", async || {
        rider
            .view()
            .contains_key(&VehicleId::new("parked-1").unwrap())
            .then_some(())
    })
    .await;
    let (_, body) = node.admin_json("/healthz").await;
    assert_eq!(body["status"], "ok");
    assert_eq!(node.metric("hexfleet_store_up").await, 1.0);
    node.stop().await;
}

/// An entry event of vehicle `state` into zone `zone`.
fn entered(state: &VehicleState, zone: &str) -> ZoneEvent {
    ZoneEvent {
        event: ZoneEventKind::Entered,
        zone: ZoneId::new(zone).unwrap(),
        cause: ZoneCause::Moved,
        at_ms: state.seen_ms,
        vehicle: state.clone(),
    }
}

/// Relays every shard's outbox, and counts each event id in the stream.
async fn events_in_stream(store: &RedisStore, shards: &[ShardId]) -> HashMap<String, usize> {
    for &shard in shards {
        store.relay_zone_events(shard).await.unwrap();
    }
    let (_, events) = store.zone_events(Some("0-0"), 100_000).await.unwrap();
    let mut count = HashMap::new();
    for e in events {
        *count.entry(e.id()).or_default() += 1;
    }
    count
}

/// A write whose reply was lost is written again by the writer's retry:
/// the states are the same, and no zone event is added twice.
#[tokio::test]
async fn a_zone_event_in_a_write_done_twice_is_in_the_stream_once() {
    let redis = RedisServer::start();
    let store = RedisStore::connect(&redis.url()).await.unwrap();
    let mut rng = StdRng::seed_from_u64(3);
    let city = random_city(&mut rng, 40, 0.2);
    let mut batch = placing(&city);
    for sb in &mut batch.shards {
        sb.events = sb.upserts.iter().map(|u| entered(&u.state, "z")).collect();
    }
    store.apply(&batch).await.unwrap();
    store.apply(&batch).await.unwrap();
    let shards: Vec<ShardId> = batch.shards.iter().map(|sb| sb.shard).collect();
    let count = events_in_stream(&store, &shards).await;
    assert_eq!(count.len(), city.len());
    assert!(count.values().all(|&n| n == 1), "{count:?}");
}

/// On a Redis Cluster with one master stalled, a flush writes the shards
/// of the others and keeps only the stalled master's for the retry: once
/// it answers again, every zone event is in the stream exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_cluster_master_holds_back_only_its_shards_and_no_event_is_written_twice() {
    let cluster = RedisCluster::start(3);
    let seeds: Vec<String> = cluster.seeds().split(',').map(String::from).collect();
    let store = Arc::new(RedisStore::connect_cluster(&seeds).await.unwrap());
    let metrics = Arc::new(Metrics::new());
    let writer = Arc::new(StoreWriter::new(metrics.clone()));
    let stop = CancellationToken::new();
    let running = tokio::spawn(writer.clone().run(
        store.clone(),
        Arc::new(Unfenced),
        Duration::from_millis(50),
        stop.clone(),
    ));
    let mut rng = StdRng::seed_from_u64(4);
    let mut city = random_city(&mut rng, 60, 0.3);
    let stage = |city: &[VehicleState], zone: &str| {
        for s in city {
            writer.stage_upsert(shard_of(s), s.clone(), true);
            writer.stage_events(shard_of(s), vec![entered(s, zone)]);
        }
    };
    stage(&city, "first");
    writer.flushed().await;
    cluster.servers[0].stall();
    for s in &mut city {
        s.seq += 1;
        s.seen_ms += 1;
    }
    stage(&city, "second");
    // A flush past the store's response timeout: the other masters' shards
    // are written meanwhile.
    eventually(WAIT, "a flush fails on the stalled master", async || {
        (metrics.store_flush_errors.get() > 0).then_some(())
    })
    .await;
    cluster.servers[0].resume();
    let shards: Vec<ShardId> = city.iter().map(shard_of).collect();
    let count = eventually(WAIT, "every event in the stream", async || {
        writer.flushed().await;
        let count = events_in_stream(&store, &shards).await;
        (count.len() == 2 * city.len()).then_some(count)
    })
    .await;
    let twice: Vec<&String> = count
        .iter()
        .filter(|(_, &n)| n > 1)
        .map(|(id, _)| id)
        .collect();
    assert!(twice.is_empty(), "written twice: {twice:?}");
    for s in &city {
        let stored = store.vehicle(&s.id).await.unwrap().unwrap();
        assert_eq!(stored.seq, s.seq);
    }
    stop.cancel();
    running.await.unwrap();
}
