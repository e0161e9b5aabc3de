//! The flowmesh pg-writer: consumes its RabbitMQ queue and stores records in PostgreSQL with
//! one idempotent, set-based INSERT per batch, acking after commit.

pub mod config;
pub mod startup;
pub mod store;

pub use config::PgWriterConfig;
pub use startup::{Application, build};

#[cfg(feature = "testkit")]
pub mod testkit;
