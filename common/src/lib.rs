//! What two or more flowmesh services share: the record and its rules, the WebSocket protocol,
//! configuration conventions, telemetry, the HTTP probe port, circuit breakers, retry policies,
//! the RabbitMQ topology and shutdown handling.

pub mod args;
pub mod breaker;
pub mod config;
pub mod health;
pub mod http;
pub mod link;
pub mod message;
pub mod metrics;
pub mod nodes;
pub mod progress;
pub mod protocol;
pub mod record;
pub mod retry;
pub mod routing;
pub mod service;
pub mod services;
pub mod shutdown;
pub mod spans;
pub mod telemetry;
pub mod tls;
pub mod token;
pub mod topology;
pub mod traces;
pub mod writers;

#[cfg(feature = "testkit")]
pub mod testkit;

pub use record::Record;
