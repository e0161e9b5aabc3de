//! The flowmesh generator: makes records at a chosen rate and pushes them over WebSocket to the
//! filter, keeping every one in a bounded window until the filter acks it.

/// The service's name: its metrics' and spans' `service`.
pub const SERVICE: &str = "generator";

pub mod config;
pub mod link;
pub mod source;
pub mod spool;
pub mod startup;
pub mod window;

pub use config::GeneratorConfig;
pub use startup::{Application, Summary};
