//! The flowmesh mongo-writer: consumes its RabbitMQ queue (single active consumer, so in order)
//! and stores records in MongoDB, nesting consecutive records whose hash is above "99" into one
//! document.

pub mod config;
pub mod groups;
pub mod mongo;
pub mod nesting;
pub mod startup;
pub mod store;

pub use config::MongoWriterConfig;
pub use startup::{Application, build, build_with};

#[cfg(any(test, feature = "testkit"))]
pub mod testkit;
