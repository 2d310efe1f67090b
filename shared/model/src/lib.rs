//! hexfleet's domain model, shared by the node, the client SDK and the simulator.
//!
//! - [`ids`]: typed identifiers ([`VehicleId`], [`IndexCell`], [`ShardId`]).
//! - [`cells`]: the H3 cell model — where a position is indexed, which shard
//!   owns it, and which cells a radius covers.
//! - [`vehicle`]: the state of one vehicle as the system stores and shows it.
//! - [`viewport`]: the cells a map viewport covers, and when it shows counts
//!   instead of vehicles.
//! - [`geodesy`]: distances on the sphere, the one place that defines them.

pub mod cells;
pub mod geodesy;
pub mod ids;
pub mod vehicle;
pub mod viewport;

pub use cells::{CellModel, CellModelError};
pub use ids::{IndexCell, InvalidVehicleId, InvalidZoneId, ShardId, VehicleId, ZoneId};
pub use vehicle::{
    Membership, Position, PositionError, VehicleClass, VehicleState, VehicleStatus, MAX_INDEXED_LAT,
};
pub use viewport::{BBox, BBoxError, ViewportCover};
