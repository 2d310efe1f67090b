//! The per-fix hot path, stage by stage: validation and location, the
//! vehicle table (with its cell index), staging for the store and a shard's
//! flush as Redis commands, the fan-out of one fix to the
//! subscribers of its cell, and mailbox coalescing; a nearby query answered
//! from the table; what a dashboard costs: its viewport's cover and its
//! density counts; and what zones cost a fix, with 0, 100 and 10,000 zones
//! over a city.

use std::{hint::black_box, sync::Arc, time::Duration};

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use hexfleet_model::{
    BBox, CellModel, Position, VehicleClass, VehicleId, VehicleState, VehicleStatus, ViewportCover,
};
use hexfleet_node::{
    config::{DashboardConfig, IngestConfig},
    fanout::{Density, Index},
    mailbox::{Change, Mailbox},
    metrics::Metrics,
    store::{redis::RedisStore, writer::StoreWriter, ShardBatch, Upsert},
    table::{Entry, VehicleTable},
    validate::{Limits, Validator},
};
use hexfleet_protocol::{Filter, Fix};

const NOW: i64 = 1_800_000_000_000;

fn state(id: &VehicleId, lat: f64) -> VehicleState {
    VehicleState {
        id: id.clone(),
        lat,
        lon: 13.405,
        heading_deg: 90.0,
        speed_mps: 10.0,
        accuracy_m: 4.0,
        fix_time_ms: NOW,
        seq: 1,
        class: VehicleClass::Economy,
        status: VehicleStatus::Available,
        seen_ms: NOW,
        zones: Vec::new(),
        clock_offset_ms: 0,
    }
}

fn validate_and_locate(c: &mut Criterion) {
    let cells = CellModel::default();
    let limits = Limits::new(&IngestConfig::default(), Duration::from_secs(30));
    let mut g = c.benchmark_group("ingest");
    g.throughput(Throughput::Elements(1));
    g.bench_function("validate + cell + shard", |b| {
        let mut validator = Validator::new(limits, None);
        let mut seq = 0u64;
        b.iter(|| {
            seq += 1;
            let fix = Fix {
                seq,
                fix_time_ms: NOW,
                lat: 52.52 + (seq % 100) as f64 * 1e-6,
                lon: 13.405,
                heading_deg: 90.0,
                speed_mps: 10.0,
                accuracy_m: 4.0,
            };
            let valid = validator
                .check(black_box(&fix), NOW)
                .expect("a plausible fix");
            cells.locate(valid.position)
        });
    });
    // The device clock's share of it: one fix's sample and estimate, its
    // 5 s of samples full.
    g.bench_function("device clock: one fix a second, window full", |b| {
        let mut clock = hexfleet_node::device_clock::DeviceClock::new(1_000);
        let mut arrival = NOW;
        b.iter(|| {
            arrival += 1_000;
            clock.observe(black_box(arrival + 3_600_000), arrival)
        });
    });
    // A phone an hour ahead, a fix a second: every fix corrected, the
    // clock's 5 s of samples full.
    g.bench_function("validate a fix from a wrong clock + cell + shard", |b| {
        let mut validator = Validator::new(limits, None);
        let mut seq = 0u64;
        b.iter(|| {
            seq += 1;
            let arrival = NOW + seq as i64 * 1_000;
            let fix = Fix {
                seq,
                fix_time_ms: arrival + 3_600_000,
                lat: 52.52 + (seq % 100) as f64 * 1e-6,
                lon: 13.405,
                heading_deg: 90.0,
                speed_mps: 10.0,
                accuracy_m: 4.0,
            };
            let checked = validator.check(black_box(&fix), arrival);
            checked.map(|valid| cells.locate(valid.position))
        });
    });
    g.finish();
}

fn fan_out(c: &mut Criterion) {
    let cells = CellModel::default();
    let metrics = Metrics::new();
    let mut g = c.benchmark_group("fan-out of one fix");
    g.throughput(Throughput::Elements(1));
    for subscribers in [0u64, 10, 100] {
        let mut index = Index::default();
        let here = Position::new(52.52, 13.405).expect("a valid position");
        let (cell, shard) = cells.locate(here);
        for id in 0..subscribers {
            let watched = cells.neighbourhood(here, 300.0);
            index.subscribe(
                id,
                watched,
                Filter::default(),
                1,
                Arc::new(Mailbox::new()),
                &metrics,
            );
        }
        let vehicle = VehicleId::new("bench").expect("a valid id");
        index.vehicle_changed(state(&vehicle, 52.52), cell, shard, &metrics);
        g.bench_with_input(
            BenchmarkId::from_parameter(format!("{subscribers} subscribers")),
            &subscribers,
            |b, _| {
                let mut step = 0u64;
                b.iter(|| {
                    step += 1;
                    // Moves within the cell: a `moved` for every watcher.
                    let lat = 52.52 + (step % 10) as f64 * 1e-7;
                    index.vehicle_changed(state(&vehicle, lat), cell, shard, &metrics);
                });
            },
        );
    }
    g.finish();
}

/// A table of `n` vehicles spread over a 20 × 20 km city around Berlin.
fn city_table(cells: &CellModel, n: u64) -> VehicleTable {
    let table = VehicleTable::new();
    for i in 0..n {
        let id = VehicleId::new(&format!("v{i}")).expect("a valid id");
        // A scatter that fills the square evenly.
        let (u, v) = (
            (i * 7919 % n) as f64 / n as f64,
            (i * 104_729 % n) as f64 / n as f64,
        );
        let mut s = state(&id, 52.43 + 0.18 * u);
        s.lon = 13.26 + 0.29 * v;
        let (cell, shard) = cells.locate(s.position());
        table.upsert(Entry {
            state: s,
            cell,
            shard,
        });
    }
    table
}

fn table(c: &mut Criterion) {
    let cells = CellModel::default();
    let table = city_table(&cells, 10_000);
    let mut g = c.benchmark_group("vehicle table");
    g.throughput(Throughput::Elements(1));
    let id = VehicleId::new("v42").expect("a valid id");
    g.bench_function("upsert, same cell (10,000 vehicles)", |b| {
        let mut step = 0u64;
        b.iter(|| {
            step += 1;
            let s = state(&id, 52.52 + (step % 10) as f64 * 1e-7);
            let (cell, shard) = cells.locate(s.position());
            table.upsert(black_box(Entry {
                state: s,
                cell,
                shard,
            }))
        });
    });
    g.bench_function("upsert, changing cell (10,000 vehicles)", |b| {
        let mut step = 0u64;
        b.iter(|| {
            step += 1;
            // ~1 km apart: a different index cell every time.
            let s = state(&id, 52.50 + (step % 2) as f64 * 0.01);
            let (cell, shard) = cells.locate(s.position());
            table.upsert(black_box(Entry {
                state: s,
                cell,
                shard,
            }))
        });
    });
    g.finish();

    let mut g = c.benchmark_group("nearby from memory");
    g.throughput(Throughput::Elements(1));
    for radius_m in [1_000.0, 5_000.0] {
        g.bench_function(
            format!("10 nearest within {radius_m} m among 10,000 vehicles"),
            |b| {
                let mut step = 0u64;
                b.iter(|| {
                    step += 1;
                    let center = Position::new(52.48 + (step % 50) as f64 * 0.002, 13.40)
                        .expect("a valid position");
                    let found = table.nearby(&cells, black_box(center), radius_m, 10);
                    assert!(!found.is_empty());
                    found
                });
            },
        );
    }
    g.finish();
}

/// What the store costs the node: staging a fix for the writer, and a
/// shard's flush as the plain commands a single node sends.
fn store(c: &mut Criterion) {
    let cells = CellModel::default();
    let mut g = c.benchmark_group("store");
    g.throughput(Throughput::Elements(1));
    let writer = StoreWriter::new(Arc::new(Metrics::new()));
    let ids: Vec<VehicleId> = (0..10_000)
        .map(|i| VehicleId::new(&format!("v{i}")).expect("a valid id"))
        .collect();
    let (_, shard) = cells.locate(Position::new(52.52, 13.405).expect("a valid position"));
    g.bench_function("stage a fix (10,000 vehicles pending)", |b| {
        let mut step = 0usize;
        b.iter(|| {
            step += 1;
            let s = state(&ids[step % ids.len()], 52.52);
            writer.stage_fix(shard, black_box(s), false, step.is_multiple_of(5));
        });
    });
    let upserts: Vec<Upsert> = ids[..100]
        .iter()
        .enumerate()
        .map(|(i, id)| Upsert {
            state: state(id, 52.52 + i as f64 * 1e-4),
            relocated: false,
            seen: i.is_multiple_of(5),
        })
        .collect();
    let sb = ShardBatch {
        shard,
        upserts,
        removals: Vec::new(),
        fence: None,
        publish: false,
        events: Vec::new(),
    };
    g.throughput(Throughput::Elements(100));
    g.bench_function("a shard's flush of 100 vehicles as a pipeline", |b| {
        b.iter(|| {
            let upserts: Vec<&Upsert> = sb.upserts.iter().collect();
            RedisStore::write_pipeline(black_box(&sb), &upserts).expect("encodable")
        });
    });
    g.finish();
}

fn mailbox(c: &mut Criterion) {
    let mut g = c.benchmark_group("mailbox");
    g.throughput(Throughput::Elements(1));
    let ids: Vec<VehicleId> = (0..1_000)
        .map(|i| VehicleId::new(&format!("v{i}")).expect("a valid id"))
        .collect();
    g.bench_function("push, coalescing into 1,000 pending vehicles", |b| {
        let m = Mailbox::new();
        let mut i = 0usize;
        b.iter(|| {
            i = (i + 1) % ids.len();
            m.push(ids[i].clone(), Change::Moved(state(&ids[i], 52.52)))
        });
    });
    g.bench_function("take 1,000 pending changes", |b| {
        let m = Mailbox::new();
        b.iter(|| {
            for id in &ids {
                m.push(id.clone(), Change::Moved(state(id, 52.52)));
            }
            m.take().map(|d| d.changes.len())
        });
    });
    g.finish();
}

fn dashboard(c: &mut Criterion) {
    let cells = CellModel::default();
    let limits = DashboardConfig::default();
    let mut g = c.benchmark_group("dashboard");
    let viewports = [
        (
            "viewport: 1,500 index cells",
            BBox::new(52.45, 13.30, 52.55, 13.50),
        ),
        (
            "viewport: whole city, counts",
            BBox::new(52.30, 13.00, 52.70, 13.80),
        ),
    ];
    for (name, bbox) in viewports {
        let bbox = bbox.expect("a valid box");
        let cover = cells.viewport(&bbox, limits.max_vehicle_cells, limits.max_density_cells);
        let n = match &cover {
            ViewportCover::Vehicles(c) | ViewportCover::Density { cells: c, .. } => c.len(),
        };
        g.throughput(Throughput::Elements(n as u64));
        g.bench_function(name, |b| {
            b.iter(|| {
                cells.viewport(
                    black_box(&bbox),
                    limits.max_vehicle_cells,
                    limits.max_density_cells,
                )
            })
        });
    }

    // 10,000 vehicles over the city; counts for a whole-city view.
    let metrics = Metrics::new();
    let density = Arc::new(Density::default());
    let mut index = Index::new(density.clone());
    let ids: Vec<VehicleId> = (0..10_000)
        .map(|i| VehicleId::new(&format!("v{i}")).expect("a valid id"))
        .collect();
    let spot = |i: usize, step: usize| {
        let lat = 52.35 + ((i * 7_919 + step * 13) % 3_000) as f64 * 1e-4;
        let lon = 13.05 + ((i * 104_729 + step * 29) % 7_000) as f64 * 1e-4;
        (lat, lon)
    };
    for (i, id) in ids.iter().enumerate() {
        let (lat, lon) = spot(i, 0);
        let (cell, shard) = cells.locate(Position::new(lat, lon).expect("a valid position"));
        index.vehicle_changed(
            VehicleState {
                lon,
                ..state(id, lat)
            },
            cell,
            shard,
            &metrics,
        );
    }
    let city = BBox::new(52.30, 13.00, 52.70, 13.80).expect("a valid box");
    let ViewportCover::Density { cells: coarse, .. } =
        cells.viewport(&city, limits.max_vehicle_cells, limits.max_density_cells)
    else {
        panic!("a whole city is shown as counts");
    };
    g.throughput(Throughput::Elements(coarse.len() as u64));
    g.bench_function("density counts of a whole-city view", |b| {
        b.iter(|| density.counts(black_box(&coarse), &Filter::any()))
    });
    g.throughput(Throughput::Elements(1));
    g.bench_function("a fix that changes index cell (counts kept)", |b| {
        let mut step = 0usize;
        b.iter(|| {
            step += 1;
            let i = step % ids.len();
            let (lat, lon) = spot(i, step);
            let (cell, shard) = cells.locate(Position::new(lat, lon).expect("a valid position"));
            index.vehicle_changed(
                VehicleState {
                    lon,
                    ..state(&ids[i], lat)
                },
                cell,
                shard,
                &metrics,
            );
        });
    });
    g.finish();
}

/// `n` star-shaped zones (radius 150–600 m, some with a hole) over a
/// city of 40 × 33 km, as operators draw venues, depots and airports.
fn city_zones(n: usize, cells: &CellModel) -> Vec<Arc<hexfleet_node::zones::Zone>> {
    use geo::{LineString, MultiPolygon, Polygon};
    use rand::{rngs::StdRng, Rng, SeedableRng};
    let mut rng = StdRng::seed_from_u64(42);
    let ring = |rng: &mut StdRng, lat: f64, lon: f64, r0: f64, r1: f64| {
        use geo::Destination;
        let k = rng.random_range(6..24);
        let mut coords: Vec<(f64, f64)> = (0..k)
            .map(|i| {
                let bearing = i as f64 / k as f64 * 360.0;
                let r = rng.random_range(r0..r1);
                let p = geo::Haversine.destination(geo::Point::new(lon, lat), bearing, r);
                (p.x(), p.y())
            })
            .collect();
        coords.push(coords[0]);
        LineString::from(coords)
    };
    (0..n)
        .map(|i| {
            let (lat, lon) = (rng.random_range(52.35..52.65), rng.random_range(13.1..13.7));
            let r = rng.random_range(150.0..600.0);
            let exterior = ring(&mut rng, lat, lon, 0.5 * r, r);
            let holes = if i % 5 == 0 {
                vec![ring(&mut rng, lat, lon, 0.05 * r, 0.3 * r)]
            } else {
                Vec::new()
            };
            let spec = hexfleet_node::zones::ZoneSpec {
                id: hexfleet_model::ZoneId::new(&format!("z{i}")).unwrap(),
                name: format!("zone {i}"),
                kind: "venue".into(),
                filter: Filter::any(),
                geometry: MultiPolygon::new(vec![Polygon::new(exterior, holes)]),
                area_km2: 0.0,
            };
            Arc::new(hexfleet_node::zones::Zone::new(spec, cells.index_res()).unwrap())
        })
        .collect()
}

fn zones(c: &mut Criterion) {
    use hexfleet_node::zones::{Standing, Trigger, ZoneLimits, Zones};
    use hexfleet_protocol::zone::ZoneCause;
    use rand::{rngs::StdRng, Rng, SeedableRng};
    let cells = CellModel::default();
    let limits = ZoneLimits {
        max_vertices: 10_000,
        max_area_km2: 5_000.0,
    };
    let all = city_zones(10_000, &cells);
    // Vehicles driving about the city: 4,096 positions, each 100 m on
    // from the last, in turn.
    let mut rng = StdRng::seed_from_u64(7);
    let (mut lat, mut lon): (f64, f64) = (52.5, 13.4);
    let moves: Vec<(f64, f64, h3o::CellIndex)> = (0..4096)
        .map(|_| {
            lat = (lat + rng.random_range(-0.0009..0.0009)).clamp(52.35, 52.65);
            lon = (lon + rng.random_range(-0.0015..0.0015)).clamp(13.1, 13.7);
            let (cell, _) = cells.locate(Position::new(lat, lon).unwrap());
            (lat, lon, cell.0)
        })
        .collect();
    let mut g = c.benchmark_group("zones");
    g.throughput(Throughput::Elements(1));
    for n in [0, 100, 10_000] {
        let zones = Zones::new(cells.index_res(), limits, 20_000, Arc::new(Metrics::new()));
        zones.mark_loaded();
        zones.apply(
            all.iter()
                .take(n)
                .map(|z| (z.id().clone(), Some(z.clone())))
                .collect(),
        );
        let id = VehicleId::new("v").unwrap();
        let mut vehicle = state(&id, 52.5);
        let mut i = 0;
        let mut events = Vec::new();
        g.bench_function(
            BenchmarkId::new("memberships of a moving vehicle", n),
            |b| {
                b.iter(|| {
                    let (lat, lon, cell) = moves[i % moves.len()];
                    i += 1;
                    let moved = Trigger::new(ZoneCause::Moved, Some(Standing::from(&vehicle)));
                    (vehicle.lat, vehicle.lon) = (lat, lon);
                    let mut held = std::mem::take(&mut vehicle.zones);
                    zones.update(&mut held, &vehicle, cell, NOW, moved, &mut events);
                    vehicle.zones = held;
                    events.clear();
                })
            },
        );
    }
    let zones = Zones::new(cells.index_res(), limits, 20_000, Arc::new(Metrics::new()));
    zones.apply(
        all.iter()
            .map(|z| (z.id().clone(), Some(z.clone())))
            .collect(),
    );
    let feature = all[0].spec.to_feature().to_string();
    g.bench_function("put one zone among 10,000: parse, tile, index", |b| {
        b.iter(|| {
            let spec = hexfleet_node::zones::ZoneSpec::parse(
                all[0].id().clone(),
                feature.as_bytes(),
                limits,
            )
            .unwrap();
            let zone = Arc::new(hexfleet_node::zones::Zone::new(spec, cells.index_res()).unwrap());
            // Replacing it with itself changes nothing: out, then in.
            zones.apply(vec![(zone.id().clone(), None)]);
            black_box(zones.apply(vec![(zone.id().clone(), Some(zone))]));
        })
    });
    g.finish();
}

criterion_group!(
    benches,
    validate_and_locate,
    table,
    store,
    fan_out,
    mailbox,
    dashboard,
    zones
);
criterion_main!(benches);
