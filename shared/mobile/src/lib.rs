//! hexfleet for mobile apps: the driver and rider clients behind a surface
//! that UniFFI turns into Kotlin, Swift and Python.
//!
//! - [`Driver`]: the app hands it every location the OS gives; the SDK
//!   decides what to send ([`ReportingPolicy`]: faster moving or on a trip,
//!   slower parked, within the app's bounds), keeps the connection through
//!   signal loss (the latest location, or the whole track, is sent on
//!   reconnect), pauses in the background and sends one fresh fix at once
//!   on resume.
//! - [`Rider`]: watches the vehicles around a point; a [`RiderListener`]
//!   hears each one added, moved and removed.
//! - Both reach the node over QUIC, or over a WebSocket on its HTTPS port
//!   where UDP is blocked ([`Transport`]), tell a listener how their
//!   connection is doing ([`ConnectionState`]), and ask the app's
//!   [`TokenProvider`] for a fresh token when theirs expires.
//!
//! Everything runs on the SDK's own runtime (two threads). Listeners are
//! called on one dispatch thread per client, in order, never on the
//! runtime: a slow callback delays only that client's later callbacks.

mod driver;
mod rider;
mod runtime;

use std::{net::SocketAddr, path::PathBuf, time::Duration};

use hexfleet_client::{ClientError, Connector, TransportPolicy};
use hexfleet_protocol::ErrorCode;

pub use driver::{
    reporting_policy, Driver, DriverListener, DriverStats, Location, PauseMode, ReportingPolicy,
    MAX_TRACK,
};
pub use rider::{watch_around, RemovalReason, Rider, RiderListener, RiderStats, Vehicle, Watch};

uniffi::setup_scaffolding!();

/// What went wrong, by kind; `reason` says exactly what.
#[derive(Debug, Clone, PartialEq, thiserror::Error, uniffi::Error)]
pub enum MobileError {
    /// An argument the SDK cannot use (an address, a coordinate, a path).
    #[error("invalid argument: {reason}")]
    InvalidArgument { reason: String },
    /// The certificate to trust could not be read.
    #[error("certificate: {reason}")]
    Certificate { reason: String },
    /// The node refused the token (forged, for another role, unknown key).
    #[error("unauthorized: {reason}")]
    Unauthorized { reason: String },
    /// The token expired and the [`TokenProvider`] gave no fresh one.
    #[error("token expired: {reason}")]
    TokenExpired { reason: String },
    /// Requests came faster than the node allows.
    #[error("rate limited: {reason}")]
    RateLimited { reason: String },
    /// The node refused or ended the session for another reason (`code` is
    /// the protocol's error code, e.g. `superseded`, `shutting_down`).
    #[error("refused ({code}): {reason}")]
    Refused { code: String, reason: String },
    /// No node answered, over QUIC or WebSocket.
    #[error("unreachable: {reason}")]
    Unreachable { reason: String },
    /// The node sent something this SDK does not understand.
    #[error("protocol: {reason}")]
    Protocol { reason: String },
    /// The client was closed.
    #[error("closed")]
    Closed,
}

impl From<ClientError> for MobileError {
    fn from(e: ClientError) -> Self {
        match e {
            ClientError::Refused { code, reason } => match code {
                ErrorCode::Unauthorized => MobileError::Unauthorized { reason },
                ErrorCode::TokenExpired => MobileError::TokenExpired { reason },
                ErrorCode::RateLimited => MobileError::RateLimited { reason },
                code => MobileError::Refused {
                    code: code.as_str().to_string(),
                    reason,
                },
            },
            ClientError::Certificate { path, reason } => MobileError::Certificate {
                reason: format!("{path}: {reason}"),
            },
            ClientError::Tls(reason) => MobileError::Certificate { reason },
            // A node at its connection limit refuses new ones at once.
            ClientError::Connection(quinn::ConnectionError::ConnectionClosed(close))
                if close.error_code == quinn::TransportErrorCode::CONNECTION_REFUSED =>
            {
                MobileError::Refused {
                    code: ErrorCode::Overloaded.as_str().to_string(),
                    reason: close.to_string(),
                }
            }
            ClientError::Protocol(reason) => MobileError::Protocol { reason },
            ClientError::Frame(e) => MobileError::Protocol {
                reason: e.to_string(),
            },
            e => MobileError::Unreachable {
                reason: e.to_string(),
            },
        }
    }
}

impl MobileError {
    /// Whether connecting again, later, may help (not for a refused token
    /// or a bad argument).
    fn transient(&self) -> bool {
        match self {
            MobileError::Unreachable { .. } | MobileError::Protocol { .. } => true,
            MobileError::Refused { code, .. } => {
                matches!(
                    code.as_str(),
                    "shutting_down" | "unavailable" | "overloaded" | "internal" | "slow_consumer"
                )
            }
            _ => false,
        }
    }
}

/// How a client reaches its node.
#[derive(Debug, Clone, Copy, PartialEq, Eq, uniffi::Enum)]
pub enum Transport {
    Quic,
    /// A WebSocket on the node's HTTPS port, where UDP is blocked.
    WebSocket,
}

impl From<hexfleet_client::Transport> for Transport {
    fn from(t: hexfleet_client::Transport) -> Self {
        match t {
            hexfleet_client::Transport::Quic => Transport::Quic,
            hexfleet_client::Transport::WebSocket => Transport::WebSocket,
        }
    }
}

/// Which transports to use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, uniffi::Enum)]
pub enum TransportChoice {
    /// QUIC, falling back to WebSocket where UDP is blocked.
    Auto,
    QuicOnly,
    WebSocketOnly,
}

/// How a client's connection is doing.
#[derive(Debug, Clone, PartialEq, uniffi::Enum)]
pub enum ConnectionState {
    Connecting,
    Connected {
        transport: Transport,
    },
    /// The connection was lost; the SDK connects again, with a backoff.
    Reconnecting {
        reason: String,
    },
    /// Paused by the app ([`Driver::pause`], [`Rider::pause`]).
    Paused,
    /// Closed for good: by the app (`error` is `None`) or by an error
    /// connecting again cannot fix.
    Closed {
        error: Option<MobileError>,
    },
}

/// Gives the SDK a fresh token when the one in use expires. Called on the
/// SDK's blocking pool, never on its runtime: it may take its time (a
/// request to the app's backend). `None`: no token, the client closes with
/// `TokenExpired`.
#[uniffi::export(callback_interface)]
pub trait TokenProvider: Send + Sync {
    fn fresh_token(&self) -> Option<String>;
}

/// Where the node is and how to reach it.
#[derive(Debug, Clone, uniffi::Record)]
pub struct NodeConfig {
    /// The node's QUIC address, `ip:port`.
    pub quic_address: String,
    /// Its HTTPS address for the WebSocket fallback; `None`: the same
    /// address (a node serving both on 443).
    pub https_address: Option<String>,
    /// The certificate (PEM or DER) to trust for the node.
    pub ca_cert_path: String,
    /// The name the node's certificate is for.
    pub server_name: String,
    pub transport: TransportChoice,
    /// How long QUIC has alone before a WebSocket is tried beside it
    /// (whichever connects first is used).
    pub quic_timeout_ms: u64,
    /// How often an idle connection is kept alive, and after how long a
    /// silent node is taken for gone (the SDK's defaults are 20 s and 45 s:
    /// three packets a minute when idle).
    pub keep_alive_ms: u64,
    pub idle_timeout_ms: u64,
    /// The network the device is on (a Wi-Fi name, a carrier): which
    /// transport worked is remembered per network. Change it with
    /// `set_network` when the device moves.
    pub network: String,
}

/// A configuration with the SDK's defaults for a node at `quic_address`.
#[uniffi::export]
pub fn node_config(quic_address: String, ca_cert_path: String) -> NodeConfig {
    NodeConfig {
        quic_address,
        https_address: None,
        ca_cert_path,
        server_name: hexfleet_protocol::dev::DEV_SERVER_NAME.to_string(),
        transport: TransportChoice::Auto,
        quic_timeout_ms: hexfleet_client::DEFAULT_QUIC_TIMEOUT.as_millis() as u64,
        keep_alive_ms: 20_000,
        idle_timeout_ms: 45_000,
        network: String::new(),
    }
}

/// A vehicle's class, as the node knows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, uniffi::Enum)]
pub enum VehicleClass {
    Economy,
    Comfort,
    Xl,
    Premium,
    Van,
}

/// A vehicle's status.
#[derive(Debug, Clone, Copy, PartialEq, Eq, uniffi::Enum)]
pub enum VehicleStatus {
    Available,
    OnTrip,
    OffDuty,
}

impl From<VehicleClass> for hexfleet_model::VehicleClass {
    fn from(c: VehicleClass) -> Self {
        match c {
            VehicleClass::Economy => Self::Economy,
            VehicleClass::Comfort => Self::Comfort,
            VehicleClass::Xl => Self::Xl,
            VehicleClass::Premium => Self::Premium,
            VehicleClass::Van => Self::Van,
        }
    }
}

impl From<hexfleet_model::VehicleClass> for VehicleClass {
    fn from(c: hexfleet_model::VehicleClass) -> Self {
        match c {
            hexfleet_model::VehicleClass::Economy => Self::Economy,
            hexfleet_model::VehicleClass::Comfort => Self::Comfort,
            hexfleet_model::VehicleClass::Xl => Self::Xl,
            hexfleet_model::VehicleClass::Premium => Self::Premium,
            hexfleet_model::VehicleClass::Van => Self::Van,
        }
    }
}

impl From<VehicleStatus> for hexfleet_model::VehicleStatus {
    fn from(s: VehicleStatus) -> Self {
        match s {
            VehicleStatus::Available => Self::Available,
            VehicleStatus::OnTrip => Self::OnTrip,
            VehicleStatus::OffDuty => Self::OffDuty,
        }
    }
}

impl From<hexfleet_model::VehicleStatus> for VehicleStatus {
    fn from(s: hexfleet_model::VehicleStatus) -> Self {
        match s {
            hexfleet_model::VehicleStatus::Available => Self::Available,
            hexfleet_model::VehicleStatus::OnTrip => Self::OnTrip,
            hexfleet_model::VehicleStatus::OffDuty => Self::OffDuty,
        }
    }
}

/// The node as a configuration names it: its QUIC address and a connector
/// set up to reach it.
struct Target {
    quic: SocketAddr,
    connector: Connector,
}

impl Target {
    fn new(config: &NodeConfig) -> Result<Self, MobileError> {
        let invalid = |what: &str, value: &str| MobileError::InvalidArgument {
            reason: format!("{what} must be ip:port, not {value:?}"),
        };
        let quic: SocketAddr = config
            .quic_address
            .parse()
            .map_err(|_| invalid("quic_address", &config.quic_address))?;
        let policy = match config.transport {
            TransportChoice::Auto => TransportPolicy::Auto,
            TransportChoice::QuicOnly => TransportPolicy::QuicOnly,
            TransportChoice::WebSocketOnly => TransportPolicy::WebSocketOnly,
        };
        let ms = Duration::from_millis;
        if config.keep_alive_ms == 0 || config.idle_timeout_ms <= config.keep_alive_ms {
            return Err(MobileError::InvalidArgument {
                reason: "keep_alive_ms must be above 0 and below idle_timeout_ms".into(),
            });
        }
        let connector = Connector::new(&PathBuf::from(&config.ca_cert_path), &config.server_name)?
            .with_liveness(ms(config.keep_alive_ms), ms(config.idle_timeout_ms))
            .with_transport(policy)
            .with_fallback(
                ms(config.quic_timeout_ms.max(1)),
                hexfleet_client::DEFAULT_REMEMBER_FOR,
            );
        if let Some(https) = &config.https_address {
            let https = https.parse().map_err(|_| invalid("https_address", https))?;
            connector.set_https_address(quic, https);
        }
        connector.set_network(&config.network);
        Ok(Self { quic, connector })
    }
}
