//! Fuzz targets for everything the protocol decodes from the network: the
//! frame decoder (both directions), datagrams, the messages inside them,
//! the riders' packed moves, the bus between nodes, dashboard requests
//! (JSON and MessagePack) and tokens.
//!
//! Each is a bolero target. In `cargo test` it runs a few thousand random
//! inputs as a property test; for a long run on the stable toolchain:
//!
//! ```text
//! BOLERO_RANDOM_TEST_TIME_MS=120000 cargo test --release -p hexfleet-protocol --test fuzz
//! ```
//!
//! Every input that once failed is kept below as a regression test.

use bytes::BytesMut;
use hexfleet_model::VehicleId;
use hexfleet_protocol::{
    bus::ShardChanges,
    dashboard::Format,
    decode_datagram, encode_datagram,
    rider::{Moved, RiderUpdate},
    Claims, ClientMsg, Fix, FrameCodec, Hello, Role, ServerMsg, Subscribe, Verifier, MAX_FRAME_LEN,
};
use tokio_util::codec::{Decoder, Encoder};

/// Feeds `bytes` to a decoder in two pieces, as a network delivers them,
/// and decodes until it needs more or fails. Never panics; a frame that
/// decodes is never larger than the limit.
fn decode_all<T: serde::de::DeserializeOwned>(bytes: &[u8]) {
    let split = bytes.first().map_or(0, |b| *b as usize % (bytes.len() + 1));
    let mut codec = FrameCodec::<T, ()>::default();
    let mut buf = BytesMut::new();
    for piece in [&bytes[..split], &bytes[split..]] {
        buf.extend_from_slice(piece);
        loop {
            let before = buf.len();
            match codec.decode(&mut buf) {
                Ok(Some(_)) => assert!(before - buf.len() <= MAX_FRAME_LEN + 4),
                Ok(None) => break,
                Err(_) => return,
            }
        }
    }
}

#[test]
fn client_frames() {
    bolero::check!()
        .with_max_len(8 * 1024)
        .for_each(|bytes: &[u8]| decode_all::<ClientMsg>(bytes));
}

#[test]
fn server_frames_and_rider_updates() {
    bolero::check!()
        .with_max_len(8 * 1024)
        .for_each(|bytes: &[u8]| {
            decode_all::<ServerMsg>(bytes);
            decode_all::<RiderUpdate>(bytes);
            let _ = Moved::unpack(bytes);
        });
}

#[test]
fn datagrams() {
    bolero::check!()
        .with_max_len(2 * 1024)
        .for_each(|bytes: &[u8]| {
            let _ = decode_datagram::<Fix>(bytes);
        });
}

/// Valid frames of every client message, with bytes changed: the decoder
/// meets inputs close to real ones, deep inside the message bodies.
#[test]
fn mutated_client_messages() {
    let expires = 1_900_000_000;
    let token = Claims::new(Role::Driver, VehicleId::new("drv-1").unwrap(), expires).mint(b"k");
    let messages = [
        ClientMsg::Hello(Hello {
            version: 1,
            role: Role::Driver,
            token,
            unreachable: Vec::new(),
        }),
        ClientMsg::Fix(Fix {
            seq: 7,
            fix_time_ms: 1_800_000_000_000,
            lat: 52.5,
            lon: 13.4,
            heading_deg: 90.0,
            speed_mps: 8.0,
            accuracy_m: 4.0,
        }),
        ClientMsg::Subscribe(Subscribe {
            id: 3,
            lat: 52.5,
            lon: 13.4,
            radius_m: 800.0,
            filter: Default::default(),
        }),
        ClientMsg::Goodbye,
        ClientMsg::AckNow,
        ClientMsg::Clock(hexfleet_protocol::ClockReport {
            offset_ms: -3_600_000,
            round_trip_ms: 40,
        }),
    ];
    let encoded: Vec<BytesMut> = messages
        .iter()
        .map(|m| {
            let mut buf = BytesMut::new();
            FrameCodec::<(), ClientMsg>::default()
                .encode(m.clone(), &mut buf)
                .unwrap();
            buf
        })
        .collect();
    bolero::check!()
        .with_type::<(u8, Vec<(u16, u8)>)>()
        .for_each(|(which, edits)| {
            let mut bytes = encoded[*which as usize % encoded.len()].to_vec();
            for (at, value) in edits {
                let at = *at as usize % bytes.len();
                bytes[at] = *value;
            }
            decode_all::<ClientMsg>(&bytes);
            // As a datagram, past the length prefix.
            let _ = decode_datagram::<Fix>(&bytes[4.min(bytes.len())..]);
        });
}

#[test]
fn bus_messages() {
    bolero::check!()
        .with_max_len(8 * 1024)
        .for_each(|bytes: &[u8]| {
            let _ = ShardChanges::decode_message(bytes);
        });
}

#[test]
fn dashboard_requests_in_json_and_msgpack() {
    bolero::check!()
        .with_max_len(4 * 1024)
        .for_each(|bytes: &[u8]| {
            let _ = Format::Json.decode(bytes);
            let _ = Format::MsgPack.decode(bytes);
        });
}

/// JSON shaped like requests, with random field values: the fields'
/// own checks (a bounding box, a zoom) meet values beyond their ranges.
#[test]
fn dashboard_requests_with_any_numbers() {
    bolero::check!()
        .with_type::<(f64, f64, f64, f64, f64, u32)>()
        .for_each(|(south, west, north, east, zoom, id)| {
            let text = format!(
                r#"{{"type":"viewport","id":{id},"bbox":{{"south":{south},"west":{west},"north":{north},"east":{east}}},"zoom":{zoom}}}"#
            );
            let _ = Format::Json.decode(text.as_bytes());
            let packed = rmp_serde::to_vec_named(&serde_json::json!({
                "type": "viewport", "id": id, "zoom": zoom,
                "bbox": {"south": south, "west": west, "north": north, "east": east},
            }))
            .unwrap();
            let _ = Format::MsgPack.decode(&packed);
        });
}

#[test]
fn tokens() {
    let verifier = Verifier::with_secret(b"fuzz-secret-0123456789");
    bolero::check!()
        .with_max_len(4 * 1024)
        .for_each(|bytes: &[u8]| {
            let text = String::from_utf8_lossy(bytes);
            let _ = verifier.verify(&text, 1_800_000_000);
        });
}

/// Tokens whose three parts are base64 of arbitrary bytes, so the JSON
/// and signature checks behind the base64 are reached.
#[test]
fn tokens_with_any_header_and_body() {
    use base64::{engine::general_purpose::URL_SAFE_NO_PAD, Engine};
    let verifier = Verifier::with_secret(b"fuzz-secret-0123456789");
    bolero::check!()
        .with_type::<(Vec<u8>, Vec<u8>, Vec<u8>)>()
        .for_each(|(header, body, signature)| {
            let token = format!(
                "{}.{}.{}",
                URL_SAFE_NO_PAD.encode(header),
                URL_SAFE_NO_PAD.encode(body),
                URL_SAFE_NO_PAD.encode(signature)
            );
            let _ = verifier.verify(&token, 1_800_000_000);
            let header = format!(
                r#"{{"alg":"HS256","kid":{:?}}}"#,
                String::from_utf8_lossy(header)
            );
            let token = format!(
                "{}.{}.{}",
                URL_SAFE_NO_PAD.encode(header),
                URL_SAFE_NO_PAD.encode(body),
                URL_SAFE_NO_PAD.encode(signature)
            );
            let _ = verifier.verify(&token, 1_800_000_000);
        });
}

#[test]
fn encoded_datagrams_round_trip() {
    bolero::check!()
        .with_type::<(u64, i64, f64, f64, f32, f32, f32)>()
        .for_each(
            |&(seq, fix_time_ms, lat, lon, heading_deg, speed_mps, accuracy_m)| {
                let fix = Fix {
                    seq,
                    fix_time_ms,
                    lat,
                    lon,
                    heading_deg,
                    speed_mps,
                    accuracy_m,
                };
                let bytes = encode_datagram(&fix).unwrap();
                let back: Fix = decode_datagram(&bytes).unwrap();
                assert_eq!(back.seq, fix.seq);
                assert_eq!(back.lat.to_bits(), fix.lat.to_bits());
            },
        );
}
