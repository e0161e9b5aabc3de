//! What two or more flowmesh services share: the record and its rules, the WebSocket protocol,
//! configuration conventions, telemetry, the HTTP probe port, circuit breakers, retry policies,
//! the RabbitMQ topology and shutdown handling.

#[cfg(feature = "service")]
pub mod args;
#[cfg(feature = "service")]
pub mod breaker;
#[cfg(feature = "service")]
pub mod config;
#[cfg(feature = "service")]
pub mod health;
#[cfg(feature = "service")]
pub mod http;
#[cfg(feature = "service")]
pub mod link;
#[cfg(feature = "service")]
pub mod message;
#[cfg(feature = "service")]
pub mod metrics;
#[cfg(feature = "service")]
pub mod nodes;
#[cfg(feature = "service")]
pub mod progress;
pub mod protocol;
pub mod record;
#[cfg(feature = "service")]
pub mod retry;
#[cfg(feature = "service")]
pub mod routing;
#[cfg(feature = "service")]
pub mod service;
#[cfg(feature = "service")]
pub mod services;
#[cfg(feature = "service")]
pub mod shutdown;
#[cfg(feature = "service")]
pub mod spans;
#[cfg(feature = "service")]
pub mod telemetry;
#[cfg(feature = "service")]
pub mod tls;
#[cfg(feature = "service")]
pub mod token;
#[cfg(feature = "service")]
pub mod topology;
#[cfg(feature = "service")]
pub mod traces;
#[cfg(feature = "service")]
pub mod writers;

#[cfg(feature = "testkit")]
#[cfg(feature = "service")]
pub mod testkit;

pub use record::Record;
