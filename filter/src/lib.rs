//! The flowmesh filter: a WebSocket server that validates records and routes them to RabbitMQ
//! or a JSON Lines file (by `flowmesh_common::routing`), answering each with an ack, nack or
//! reject.

/// The service's name: its metrics' and spans' `service`.
pub const SERVICE: &str = "filter";

pub mod admission;
pub mod broker;
pub mod config;
pub mod dispatch;
pub mod file_sink;
pub mod ingest;
pub mod live_routes;
pub mod reply;
pub mod startup;
pub mod transport;

pub use config::FilterConfig;
pub use startup::Application;

#[cfg(feature = "testkit")]
pub mod testkit;
