//! Framing. A frame body is one version byte followed by a MessagePack value.
//! On streams, bodies are length-delimited (4-byte big-endian length) and a
//! body longer than [`MAX_FRAME_LEN`] is an error before any of it is
//! buffered; in datagrams the body stands alone.

use std::{io, marker::PhantomData};

use bytes::{BufMut, Bytes, BytesMut};
use serde::{de::DeserializeOwned, Serialize};
use tokio_util::codec::{Decoder, Encoder, LengthDelimitedCodec};

/// The version byte every frame body starts with.
pub const WIRE_VERSION: u8 = 1;

/// The hard upper bound of a frame body on a stream.
pub const MAX_FRAME_LEN: usize = 16 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    #[error("frame of more than {MAX_FRAME_LEN} bytes")]
    TooLong,
    #[error("empty frame")]
    Empty,
    #[error("unknown wire version {0}")]
    UnknownVersion(u8),
    #[error("frame does not decode: {0}")]
    Decode(#[from] rmp_serde::decode::Error),
    #[error("message does not encode: {0}")]
    Encode(#[from] rmp_serde::encode::Error),
    #[error("unknown channel {0}")]
    UnknownChannel(u8),
    #[error("i/o: {0}")]
    Io(io::Error),
}

impl From<io::Error> for FrameError {
    fn from(e: io::Error) -> Self {
        // LengthDelimitedCodec reports an oversized frame as InvalidData.
        if e.kind() == io::ErrorKind::InvalidData {
            FrameError::TooLong
        } else {
            FrameError::Io(e)
        }
    }
}

/// Decodes `In` and encodes `Out` as length-delimited, versioned MessagePack.
/// The client uses `FrameCodec<ServerMsg, ClientMsg>`, the node the reverse.
pub struct FrameCodec<In, Out> {
    frames: LengthDelimitedCodec,
    _types: PhantomData<fn(Out) -> In>,
}

impl<In, Out> Default for FrameCodec<In, Out> {
    fn default() -> Self {
        Self {
            frames: LengthDelimitedCodec::builder()
                .max_frame_length(MAX_FRAME_LEN)
                .new_codec(),
            _types: PhantomData,
        }
    }
}

impl<In: DeserializeOwned, Out> Decoder for FrameCodec<In, Out> {
    type Item = In;
    type Error = FrameError;

    fn decode(&mut self, src: &mut BytesMut) -> Result<Option<In>, FrameError> {
        match self.frames.decode(src)? {
            Some(body) => decode_body(&body).map(Some),
            None => Ok(None),
        }
    }
}

impl<In, Out: Serialize> Encoder<Out> for FrameCodec<In, Out> {
    type Error = FrameError;

    fn encode(&mut self, item: Out, dst: &mut BytesMut) -> Result<(), FrameError> {
        let body = encode_body(&item)?;
        if body.len() > MAX_FRAME_LEN {
            return Err(FrameError::TooLong);
        }
        self.frames.encode(body, dst)?;
        Ok(())
    }
}

pub(crate) fn encode_body<T: Serialize>(item: &T) -> Result<Bytes, FrameError> {
    let mut body = BytesMut::with_capacity(64).writer();
    body.get_mut().put_u8(WIRE_VERSION);
    rmp_serde::encode::write(&mut body, item)?;
    Ok(body.into_inner().freeze())
}

pub(crate) fn decode_body<T: DeserializeOwned>(body: &[u8]) -> Result<T, FrameError> {
    match body.split_first() {
        None => Err(FrameError::Empty),
        Some((&WIRE_VERSION, rest)) => Ok(rmp_serde::from_slice(rest)?),
        Some((&other, _)) => Err(FrameError::UnknownVersion(other)),
    }
}

/// How many bytes `item` takes as MessagePack inside a frame body, counted
/// without allocating. Senders that pack many items into one frame cut it by
/// this, so a frame never outgrows [`MAX_FRAME_LEN`].
pub fn encoded_len<T: Serialize>(item: &T) -> Result<usize, FrameError> {
    struct Count(usize);
    impl io::Write for Count {
        fn write(&mut self, bytes: &[u8]) -> io::Result<usize> {
            self.0 += bytes.len();
            Ok(bytes.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }
    let mut count = Count(0);
    rmp_serde::encode::write(&mut count, item)?;
    Ok(count.0)
}

/// Encodes a message as a datagram body.
pub fn encode_datagram<T: Serialize>(item: &T) -> Result<Bytes, FrameError> {
    encode_body(item)
}

/// Decodes a datagram body.
pub fn decode_datagram<T: DeserializeOwned>(body: &[u8]) -> Result<T, FrameError> {
    decode_body(body)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{ClientMsg, Fix, Hello, Role};

    type NodeSide = FrameCodec<ClientMsg, ClientMsg>;

    fn fix() -> Fix {
        Fix {
            seq: 7,
            fix_time_ms: 1_700_000_000_000,
            lat: 52.52,
            lon: 13.405,
            heading_deg: 90.0,
            speed_mps: 8.5,
            accuracy_m: 4.0,
        }
    }

    #[test]
    fn messages_round_trip_through_frames() {
        let mut codec = NodeSide::default();
        let mut buf = BytesMut::new();
        let hello = ClientMsg::Hello(Hello {
            version: 1,
            role: Role::Driver,
            token: "t".into(),
            unreachable: Vec::new(),
        });
        codec.encode(hello.clone(), &mut buf).unwrap();
        codec.encode(ClientMsg::Fix(fix()), &mut buf).unwrap();
        assert_eq!(codec.decode(&mut buf).unwrap(), Some(hello));
        assert_eq!(codec.decode(&mut buf).unwrap(), Some(ClientMsg::Fix(fix())));
        assert_eq!(codec.decode(&mut buf).unwrap(), None);
    }

    #[test]
    fn a_partial_frame_waits_for_the_rest() {
        let mut codec = NodeSide::default();
        let mut full = BytesMut::new();
        codec.encode(ClientMsg::Goodbye, &mut full).unwrap();
        let mut buf = BytesMut::from(&full[..full.len() - 1]);
        assert_eq!(codec.decode(&mut buf).unwrap(), None);
        buf.extend_from_slice(&full[full.len() - 1..]);
        assert_eq!(codec.decode(&mut buf).unwrap(), Some(ClientMsg::Goodbye));
    }

    #[test]
    fn an_oversized_frame_is_refused_from_its_header() {
        let mut codec = NodeSide::default();
        let mut buf = BytesMut::new();
        buf.put_u32((MAX_FRAME_LEN + 1) as u32);
        assert!(matches!(codec.decode(&mut buf), Err(FrameError::TooLong)));
    }

    #[test]
    fn garbage_and_unknown_versions_are_errors_not_panics() {
        let mut codec = NodeSide::default();
        let mut buf = BytesMut::new();
        buf.put_u32(3);
        buf.put_slice(&[WIRE_VERSION, 0xc1, 0xff]);
        assert!(matches!(codec.decode(&mut buf), Err(FrameError::Decode(_))));

        let mut buf = BytesMut::new();
        buf.put_u32(2);
        buf.put_slice(&[9, 0xc0]);
        assert!(matches!(
            codec.decode(&mut buf),
            Err(FrameError::UnknownVersion(9))
        ));

        let mut buf = BytesMut::new();
        buf.put_u32(0);
        assert!(matches!(codec.decode(&mut buf), Err(FrameError::Empty)));
    }

    #[test]
    fn a_fix_datagram_is_small_and_round_trips() {
        let body = encode_datagram(&fix()).unwrap();
        assert!(body.len() <= 48, "{} bytes", body.len());
        assert_eq!(decode_datagram::<Fix>(&body).unwrap(), fix());
        assert!(decode_datagram::<Fix>(b"\x01nonsense").is_err());
    }
}
