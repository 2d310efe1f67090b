//! Messages. Clients open one bidirectional control stream per connection and
//! send [`ClientMsg`]s on it; the node answers with [`ServerMsg`]s. Driver
//! fixes travel as QUIC datagrams where the peer supports them (a lost fix
//! never delays a newer one), else as `ClientMsg::Fix` on the control stream.

use hexfleet_model::{VehicleClass, VehicleStatus};
use serde::{Deserialize, Serialize};

/// Who is connecting. The token must have been minted for the same role.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    Driver,
    Rider,
    Dashboard,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Driver => "driver",
            Self::Rider => "rider",
            Self::Dashboard => "dashboard",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "driver" => Some(Self::Driver),
            "rider" => Some(Self::Rider),
            "dashboard" => Some(Self::Dashboard),
            _ => None,
        }
    }
}

/// The first message on the control stream.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Hello {
    pub version: u16,
    pub role: Role,
    pub token: String,
    /// Nodes' QUIC addresses this client was redirected to lately and
    /// could not connect to within its timeout (a node its clients cannot
    /// reach, though its peers can). A node that would redirect the client
    /// to one of them keeps it and forwards its fixes to that node instead.
    /// At most [`MAX_UNREACHABLE_REPORTED`] are read.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub unreachable: Vec<String>,
}

/// How many unreachable nodes a `Hello` may name (a cluster's own nodes;
/// more are ignored).
pub const MAX_UNREACHABLE_REPORTED: usize = 8;

/// One GPS fix from a driver's device.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Fix {
    /// Per-driver sequence number; strictly increasing.
    pub seq: u64,
    /// When the device took the fix, Unix milliseconds.
    pub fix_time_ms: i64,
    pub lat: f64,
    pub lon: f64,
    /// Degrees clockwise from north, in [0, 360).
    pub heading_deg: f32,
    pub speed_mps: f32,
    /// Horizontal accuracy radius in metres.
    pub accuracy_m: f32,
}

/// What the driver reports about the vehicle, on connect and on every change.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct DriverReport {
    pub class: VehicleClass,
    pub status: VehicleStatus,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum ClientMsg {
    Hello(Hello),
    Driver(DriverReport),
    /// The stream fallback for fixes, when datagrams are unavailable.
    Fix(Fix),
    /// A rider's subscription (new or replacing the previous one).
    Subscribe(crate::Subscribe),
    /// A clean sign-off: the node removes the vehicle at once.
    Goodbye,
    /// A driver asks for an `Ack` now rather than at the next acknowledgement
    /// interval: what the node accepted so far, before the app goes quiet
    /// (to the background, or at the end of a load run). Counted against
    /// the connection's fix budget.
    AckNow,
    /// The client measured its device's clock `offset_ms` off the node's
    /// (what it adds to device times) and stamps its fixes in node time.
    Clock(ClockReport),
}

/// A client's measurement of its device's clock.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClockReport {
    /// Node time minus device time, milliseconds.
    pub offset_ms: i64,
    /// The round trip it was measured over (its uncertainty is half this).
    pub round_trip_ms: u32,
}

/// Limits the node holds the client to.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Limits {
    pub max_frame_len: u32,
    /// Whether the node accepts fixes as datagrams on this connection.
    pub datagrams: bool,
    /// How often, at most, the node acknowledges fixes.
    pub ack_interval_ms: u32,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Welcome {
    pub node: String,
    pub version: u16,
    /// The highest sequence this node already accepted for this driver, so a
    /// reconnecting client continues above it.
    pub resume_seq: u64,
    pub limits: Limits,
    /// The node's clock as it sent this (Unix milliseconds): with the times
    /// the client sent `Hello` and received this, its offset from the
    /// node's clock, NTP-style. Zero from a node that does not say.
    #[serde(default)]
    pub node_time_ms: i64,
}

/// The shard of the driver is owned by another node: connect there.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Redirect {
    /// The QUIC address of the owner.
    pub addr: String,
    pub shard: String,
    /// The owner's HTTPS address, where a client whose UDP is blocked
    /// connects over WebSocket ([`crate::ws`]). Empty when unknown.
    #[serde(default)]
    pub https: String,
}

/// Why a connection is closed. Sent in an `Error` frame, and used as the QUIC
/// application close code.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    /// A frame did not decode, was too large, or came out of order.
    ProtocolViolation,
    UnsupportedVersion,
    /// The token is missing, malformed, forged, expired or for another role.
    Unauthorized,
    /// A request the node understood but refuses (e.g. a radius over the cap).
    BadRequest,
    /// The client did not read fast enough and fell too far behind.
    SlowConsumer,
    /// The node is at its connection limit.
    Overloaded,
    ShuttingDown,
    /// The same driver connected again; this older connection is closed.
    Superseded,
    Internal,
    /// Requests came faster than the connection's budget: refused (in a
    /// `SubscribeError`), and, when it goes on, the connection is closed.
    RateLimited,
    /// This node cannot serve the client's shard right now (its ownership
    /// is changing hands): reconnect, after a short backoff, to any node.
    Unavailable,
    /// The session's token expired: connect again with a fresh one.
    TokenExpired,
}

impl ErrorCode {
    pub const ALL: [ErrorCode; 12] = [
        Self::ProtocolViolation,
        Self::UnsupportedVersion,
        Self::Unauthorized,
        Self::BadRequest,
        Self::SlowConsumer,
        Self::Overloaded,
        Self::ShuttingDown,
        Self::Internal,
        Self::Superseded,
        Self::RateLimited,
        Self::Unavailable,
        Self::TokenExpired,
    ];

    /// The QUIC application close code.
    pub fn close_code(self) -> u32 {
        match self {
            Self::ProtocolViolation => 1,
            Self::UnsupportedVersion => 2,
            Self::Unauthorized => 3,
            Self::BadRequest => 4,
            Self::SlowConsumer => 5,
            Self::Overloaded => 6,
            Self::ShuttingDown => 7,
            Self::Internal => 8,
            Self::Superseded => 9,
            Self::RateLimited => 10,
            Self::Unavailable => 11,
            Self::TokenExpired => 12,
        }
    }

    /// The WebSocket close code a dashboard connection is closed with:
    /// the standard one where there is one, else 4000 + the HTTP status
    /// that says the same (4401, 4408, 4429).
    pub const fn websocket_close_code(self) -> u16 {
        match self {
            Self::ProtocolViolation | Self::UnsupportedVersion => 1002,
            Self::Unauthorized => 4401,
            Self::BadRequest => 1008,
            Self::SlowConsumer => 4408,
            Self::Overloaded => 1013,
            Self::ShuttingDown => 1001,
            Self::Internal => 1011,
            Self::Superseded => 4409,
            Self::RateLimited => 4429,
            Self::Unavailable => 4503,
            Self::TokenExpired => 4401,
        }
    }

    pub fn from_close_code(code: u64) -> Option<Self> {
        Self::ALL
            .into_iter()
            .find(|c| u64::from(c.close_code()) == code)
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::ProtocolViolation => "protocol_violation",
            Self::UnsupportedVersion => "unsupported_version",
            Self::Unauthorized => "unauthorized",
            Self::BadRequest => "bad_request",
            Self::SlowConsumer => "slow_consumer",
            Self::Overloaded => "overloaded",
            Self::ShuttingDown => "shutting_down",
            Self::Internal => "internal",
            Self::Superseded => "superseded",
            Self::RateLimited => "rate_limited",
            Self::Unavailable => "unavailable",
            Self::TokenExpired => "token_expired",
        }
    }
}

/// The close code of a connection that ended with a `Redirect`.
pub const REDIRECT_CLOSE_CODE: u32 = 100;
/// The close code of a clean `Goodbye`.
pub const GOODBYE_CLOSE_CODE: u32 = 0;

/// How a connection ends, as either transport says it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CloseAs {
    Goodbye,
    Redirected,
    Refused(ErrorCode),
}

impl CloseAs {
    /// The QUIC application close code.
    pub fn quic_code(self) -> u32 {
        match self {
            Self::Goodbye => GOODBYE_CLOSE_CODE,
            Self::Redirected => REDIRECT_CLOSE_CODE,
            Self::Refused(code) => code.close_code(),
        }
    }

    /// The WebSocket close code ([`crate::ws`]).
    pub fn websocket_code(self) -> u16 {
        match self {
            Self::Goodbye => crate::ws::GOODBYE_CLOSE_CODE,
            Self::Redirected => crate::ws::REDIRECT_CLOSE_CODE,
            Self::Refused(code) => code.websocket_close_code(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ErrorFrame {
    pub code: ErrorCode,
    pub reason: String,
}

/// Why a fix was not accepted. The vehicle's state is untouched by it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RejectReason {
    /// The datagram did not decode as a fix.
    Malformed,
    /// Latitude or longitude is NaN, infinite or out of range.
    InvalidCoordinate,
    /// Exactly (0, 0): a device that has no fix yet.
    NullIsland,
    /// Heading, speed or accuracy is NaN or out of range.
    InvalidField,
    /// Taken further in the future than clock skew explains.
    FromFuture,
    /// Taken too long ago to describe where the vehicle is.
    TooOld,
    /// The sequence is not above the highest accepted one (a duplicate or a
    /// replay).
    StaleSeq,
    /// The fix time is before the last accepted fix's time.
    TimeBackwards,
    /// Reaching it from the last accepted fix needs a speed no vehicle has.
    TooFast,
    /// Beyond the latitudes the geo index holds (±85.05112878°, see
    /// `hexfleet_model::MAX_INDEXED_LAT`). Last, so the wire values of the
    /// others do not change.
    OutsideIndex,
    /// Sent faster than the connection's fix budget (`ingest.fixes`):
    /// dropped, not stored. Last, so the wire values of the others stay.
    RateLimited,
}

impl RejectReason {
    pub const ALL: [RejectReason; 11] = [
        Self::Malformed,
        Self::InvalidCoordinate,
        Self::NullIsland,
        Self::InvalidField,
        Self::FromFuture,
        Self::TooOld,
        Self::StaleSeq,
        Self::TimeBackwards,
        Self::TooFast,
        Self::OutsideIndex,
        Self::RateLimited,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Malformed => "malformed",
            Self::InvalidCoordinate => "invalid_coordinate",
            Self::OutsideIndex => "outside_index",
            Self::NullIsland => "null_island",
            Self::InvalidField => "invalid_field",
            Self::FromFuture => "from_future",
            Self::TooOld => "too_old",
            Self::StaleSeq => "stale_seq",
            Self::TimeBackwards => "time_backwards",
            Self::TooFast => "too_fast",
            Self::RateLimited => "rate_limited",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Rejection {
    pub seq: u64,
    pub reason: RejectReason,
}

/// Acknowledges fixes: `seq` is the highest sequence accepted and written to
/// the store so far (a promise the fix is kept), and
/// `rejected` lists the fixes refused since the previous `Ack` (at most
/// [`MAX_REJECTIONS_PER_ACK`]; `rejected_total` counts them all).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Ack {
    pub seq: u64,
    pub rejected: Vec<Rejection>,
    pub rejected_total: u64,
    /// What the node adds to this driver's fix times to put them in its
    /// own clock (zero when the device's clock, or the client's own
    /// correction, is right within `ingest.clock_tolerance`). Sent at once
    /// when it changes: an app may warn its user that the phone's clock is
    /// wrong.
    #[serde(default)]
    pub clock_offset_ms: i64,
    /// This `Ack` answers an `AckNow` (others come on the node's own
    /// schedule, and may cross an `AckNow` on the way).
    #[serde(default)]
    pub answers_ack_now: bool,
}

pub const MAX_REJECTIONS_PER_ACK: usize = 64;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum ServerMsg {
    Welcome(Welcome),
    Redirect(Redirect),
    Error(ErrorFrame),
    Ack(Ack),
    /// A subscription was refused; the connection and any previous
    /// subscription stay as they were.
    SubscribeError(SubscribeError),
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SubscribeError {
    pub id: u32,
    pub code: ErrorCode,
    pub reason: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_error_code_round_trips_through_its_quic_close_code() {
        for code in ErrorCode::ALL {
            assert_eq!(
                ErrorCode::from_close_code(code.close_code().into()),
                Some(code)
            );
        }
    }

    #[test]
    fn websocket_close_codes_are_standard_or_the_applications_own() {
        for code in ErrorCode::ALL {
            let ws = code.websocket_close_code();
            assert!(
                (1000..=1014).contains(&ws) || (4000..=4999).contains(&ws),
                "{code:?}: {ws}"
            );
        }
        assert_eq!(ErrorCode::Unauthorized.websocket_close_code(), 4401);
        assert_eq!(ErrorCode::SlowConsumer.websocket_close_code(), 4408);
        assert_eq!(ErrorCode::RateLimited.websocket_close_code(), 4429);
    }
}
