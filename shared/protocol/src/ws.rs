//! Drivers and riders over WebSocket, for networks that drop UDP (some
//! corporate Wi-Fi, some carriers), where QUIC never connects.
//!
//! The session is the same as over QUIC: the same messages, limits and
//! validation. A client opens `GET` [`PATH`] on the node's HTTPS port and
//! exchanges binary messages, each one frame: a [`Channel`] byte, then a
//! frame body as on a QUIC stream (version byte and MessagePack, at most
//! [`MAX_FRAME_LEN`](crate::MAX_FRAME_LEN) bytes). The control channel
//! carries what the QUIC control stream carries, both ways; the updates
//! channel carries what a rider's push stream carries, node to client.
//! Fixes go on the control channel (`ClientMsg::Fix`), as on a QUIC
//! connection without datagrams.
//!
//! The node closes a socket with the code of [`ErrorCode::websocket_close_code`]
//! after an `Error` frame that says exactly why; a redirect closes with
//! [`REDIRECT_CLOSE_CODE`], a goodbye with 1000.

use serde::{de::DeserializeOwned, Serialize};

use crate::{
    codec::{decode_body, encode_body},
    ErrorCode, FrameError, MAX_FRAME_LEN,
};

/// Where drivers and riders connect over WebSocket.
pub const PATH: &str = "/v1/connect";

/// The close code of a socket that ended with a `Redirect` (4000 + HTTP's
/// 307).
pub const REDIRECT_CLOSE_CODE: u16 = 4307;
/// The close code of a clean `Goodbye`.
pub const GOODBYE_CLOSE_CODE: u16 = 1000;

/// Which stream of a QUIC session a WebSocket message stands for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Channel {
    /// The control stream: `ClientMsg` in, `ServerMsg` out.
    Control = 0,
    /// A rider's push stream: `RiderUpdate`s out.
    Updates = 1,
}

/// One WebSocket message: the channel byte and a frame body.
pub fn encode<T: Serialize>(channel: Channel, item: &T) -> Result<Vec<u8>, FrameError> {
    let body = encode_body(item)?;
    if body.len() > MAX_FRAME_LEN {
        return Err(FrameError::TooLong);
    }
    let mut message = Vec::with_capacity(body.len() + 1);
    message.push(channel as u8);
    message.extend_from_slice(&body);
    Ok(message)
}

/// The channel of a message and the body it carries, undecoded.
pub fn channel_of(message: &[u8]) -> Result<(Channel, &[u8]), FrameError> {
    match message.split_first() {
        None => Err(FrameError::Empty),
        Some((0, body)) => Ok((Channel::Control, body)),
        Some((1, body)) => Ok((Channel::Updates, body)),
        Some((&other, _)) => Err(FrameError::UnknownChannel(other)),
    }
}

/// Decodes a message expected on `channel`.
pub fn decode<T: DeserializeOwned>(channel: Channel, message: &[u8]) -> Result<T, FrameError> {
    let (on, body) = channel_of(message)?;
    if on != channel {
        return Err(FrameError::UnknownChannel(on as u8));
    }
    if body.len() > MAX_FRAME_LEN {
        return Err(FrameError::TooLong);
    }
    decode_body(body)
}

/// The error a WebSocket close code stands for, where it names one (codes
/// two errors share name the first, e.g. 4401 `unauthorized`): the `Error`
/// frame before the close says exactly which.
pub fn error_of_close(code: u16) -> Option<ErrorCode> {
    ErrorCode::ALL
        .into_iter()
        .find(|c| c.websocket_close_code() == code)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{ClientMsg, RiderUpdate, ServerMsg};

    #[test]
    fn messages_round_trip_on_their_channel_only() {
        let m = encode(Channel::Control, &ClientMsg::Goodbye).unwrap();
        assert_eq!(m[0], 0);
        assert_eq!(
            decode::<ClientMsg>(Channel::Control, &m).unwrap(),
            ClientMsg::Goodbye
        );
        assert!(matches!(
            decode::<RiderUpdate>(Channel::Updates, &m),
            Err(FrameError::UnknownChannel(0))
        ));
        let u = encode(Channel::Updates, &RiderUpdate::default()).unwrap();
        assert_eq!(
            decode::<RiderUpdate>(Channel::Updates, &u).unwrap(),
            RiderUpdate::default()
        );
    }

    #[test]
    fn garbage_is_an_error_not_a_panic() {
        assert!(matches!(channel_of(&[]), Err(FrameError::Empty)));
        assert!(matches!(
            channel_of(&[7, 1]),
            Err(FrameError::UnknownChannel(7))
        ));
        assert!(decode::<ServerMsg>(Channel::Control, &[0, 1, 0xc1]).is_err());
        let huge = vec![0u8; MAX_FRAME_LEN + 2];
        assert!(matches!(
            decode::<ServerMsg>(Channel::Control, &huge),
            Err(FrameError::TooLong)
        ));
    }

    #[test]
    fn close_codes_name_the_error_where_they_can() {
        assert_eq!(error_of_close(4401), Some(ErrorCode::Unauthorized));
        assert_eq!(error_of_close(4408), Some(ErrorCode::SlowConsumer));
        assert_eq!(error_of_close(1000), None);
        assert_eq!(error_of_close(REDIRECT_CLOSE_CODE), None);
    }
}
