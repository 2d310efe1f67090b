//! Encoding and decoding what travels most: fix datagrams and rider updates.

use bytes::BytesMut;
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use hexfleet_protocol::{decode_datagram, encode_datagram, Fix, FrameCodec, Moved, RiderUpdate};
use std::hint::black_box;
use tokio_util::codec::{Decoder, Encoder};

fn fix() -> Fix {
    Fix {
        seq: 123_456,
        fix_time_ms: 1_800_000_000_000,
        lat: 52.520_008,
        lon: 13.404_954,
        heading_deg: 87.5,
        speed_mps: 11.2,
        accuracy_m: 4.0,
    }
}

fn update(moved: u32) -> RiderUpdate {
    let mut u = RiderUpdate {
        subscription: 7,
        ..RiderUpdate::default()
    };
    for i in 0..moved {
        Moved::new(i, 52.5 + f64::from(i) * 1e-5, 13.4, 90.0, 10.0).pack(&mut u.moved);
    }
    u
}

fn datagrams(c: &mut Criterion) {
    let mut g = c.benchmark_group("fix datagram");
    g.throughput(Throughput::Elements(1));
    g.bench_function("encode", |b| b.iter(|| encode_datagram(black_box(&fix()))));
    let bytes = encode_datagram(&fix()).expect("a fix encodes");
    g.bench_function("decode", |b| {
        b.iter(|| decode_datagram::<Fix>(black_box(&bytes)))
    });
    g.finish();
}

fn rider_updates(c: &mut Criterion) {
    let mut g = c.benchmark_group("rider update frame");
    for moved in [1u32, 100] {
        g.throughput(Throughput::Elements(u64::from(moved)));
        g.bench_with_input(BenchmarkId::new("encode", moved), &moved, |b, &n| {
            let mut codec = FrameCodec::<(), RiderUpdate>::default();
            let mut buf = BytesMut::with_capacity(4096);
            b.iter(|| {
                buf.clear();
                codec
                    .encode(update(n), &mut buf)
                    .expect("an update encodes");
            });
        });
        g.bench_with_input(
            BenchmarkId::new("decode + unpack", moved),
            &moved,
            |b, &n| {
                let mut codec = FrameCodec::<RiderUpdate, RiderUpdate>::default();
                let mut frame = BytesMut::new();
                codec
                    .encode(update(n), &mut frame)
                    .expect("an update encodes");
                b.iter(|| {
                    let mut buf = frame.clone();
                    let u = codec
                        .decode(&mut buf)
                        .expect("decodes")
                        .expect("a whole frame");
                    Moved::unpack(&u.moved).expect("whole records").len()
                });
            },
        );
    }
    g.finish();
}

criterion_group!(benches, datagrams, rider_updates);
criterion_main!(benches);
