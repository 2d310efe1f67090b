//! The hexfleet wire protocol (QUIC, ALPN `hexfleet/1`).
//!
//! - [`messages`]: every message a client and a node exchange.
//! - [`codec`]: how messages become bytes — versioned MessagePack bodies,
//!   length-delimited on streams, bare in datagrams, with a hard size limit.
//! - [`rider`]: what riders subscribe to and are pushed.
//! - [`dashboard`]: what dashboards exchange over WebSocket.
//! - [`token`]: JSON Web Tokens that bind a role to a subject until they
//!   expire, and the verifier that checks them by key id.
//! - [`bus`]: what nodes tell each other through Redis.
//! - [`zone`]: entries into and exits from operators' zones.
//! - [`ws`]: drivers' and riders' sessions over WebSocket, where UDP is
//!   blocked.

pub mod bus;
pub mod codec;
pub mod dashboard;
pub mod dev;
pub mod messages;
pub mod rider;
pub mod token;
pub mod ws;
pub mod zone;

pub use codec::{
    decode_datagram, encode_datagram, encoded_len, FrameCodec, FrameError, MAX_FRAME_LEN,
    WIRE_VERSION,
};
pub use jsonwebtoken::Algorithm;
pub use messages::*;
pub use rider::{Added, Filter, Moved, RemoveReason, Removed, RiderUpdate, Subscribe};
pub use token::{Claims, KeyError, SigningKey, TokenError, Verifier};

/// The ALPN protocol id of hexfleet over QUIC.
pub const ALPN: &[u8] = b"hexfleet/1";

/// The ALPN protocol id of a node probing whether a peer's client-facing
/// QUIC address answers: the peer completes the handshake and closes at
/// once, with no session.
pub const PROBE_ALPN: &[u8] = b"hexfleet-probe/1";

/// The session protocol version a client announces in `Hello`.
pub const PROTOCOL_VERSION: u16 = 1;
