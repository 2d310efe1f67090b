//! The hexfleet client SDK: what a driver app embeds to stream its position
//! to a node over QUIC, and what a rider app embeds to show the vehicles
//! around it moving live. The simulator and the tests use exactly this code.
//!
//! ```no_run
//! # async fn example(token: String) -> Result<(), hexfleet_client::ClientError> {
//! use hexfleet_client::{Connector, FixInput};
//! use hexfleet_model::{VehicleClass, VehicleStatus};
//! use hexfleet_protocol::DriverReport;
//!
//! let connector = Connector::dev()?; // trusts the node's development certificate
//! let report = DriverReport { class: VehicleClass::Economy, status: VehicleStatus::Available };
//! let mut driver = connector.driver("127.0.0.1:4433".parse().unwrap(), &token, report).await?;
//! driver.send_fix(FixInput::at(52.52, 13.405)).await?;
//! # Ok(()) }
//! ```

mod connector;
mod driver;
mod rider;
mod transport;

pub use connector::{
    https_config, ClientError, Connector, TransportPolicy, DEFAULT_QUIC_TIMEOUT,
    DEFAULT_REMEMBER_FOR,
};
pub use driver::{DriverClient, DriverOptions, DriverStats, FixInput, CLOCK_WARNING_MS};
pub use rider::{Applied, Event, Observer, RiderClient, RiderOptions, RiderStats, Subscription};
pub use transport::Transport;
