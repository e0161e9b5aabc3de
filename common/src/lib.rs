//! What two or more flowmesh services share: the record and its rules, the WebSocket protocol,
//! configuration conventions, telemetry, the HTTP probe port, circuit breakers, retry policies,
//! the RabbitMQ topology and shutdown handling.

pub mod breaker;
pub mod config;
pub mod consumer;
pub mod health;
pub mod http;
pub mod metrics;
pub mod protocol;
pub mod record;
pub mod retry;
pub mod service;
pub mod shutdown;
pub mod telemetry;
pub mod topology;

#[cfg(feature = "testkit")]
pub mod testkit;

pub use record::Record;
