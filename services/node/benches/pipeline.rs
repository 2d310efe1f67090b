//! The per-fix hot path, stage by stage: validation and location, the
//! fan-out of one fix to the subscribers of its cell, and mailbox coalescing.

use std::{hint::black_box, sync::Arc, time::Duration};

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use hexfleet_model::{CellModel, Position, VehicleClass, VehicleId, VehicleState, VehicleStatus};
use hexfleet_node::{
    config::IngestConfig,
    fanout::Index,
    mailbox::{Change, Mailbox},
    metrics::Metrics,
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
        let (cell, _) = cells.locate(here);
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
        index.vehicle_changed(state(&vehicle, 52.52), cell, &metrics);
        g.bench_with_input(
            BenchmarkId::from_parameter(format!("{subscribers} subscribers")),
            &subscribers,
            |b, _| {
                let mut step = 0u64;
                b.iter(|| {
                    step += 1;
                    // Moves within the cell: a `moved` for every watcher.
                    let lat = 52.52 + (step % 10) as f64 * 1e-7;
                    index.vehicle_changed(state(&vehicle, lat), cell, &metrics);
                });
            },
        );
    }
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

criterion_group!(benches, validate_and_locate, fan_out, mailbox);
criterion_main!(benches);
