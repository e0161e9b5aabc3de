//! The `main` every service shares: parse and validate the configuration (exit 2 on bad
//! settings), answer `--probe-ready` for container healthchecks, start telemetry, then run until
//! SIGTERM/SIGINT.

use std::future::Future;
use std::net::SocketAddr;
use std::process::ExitCode;

use clap::Parser;
use tokio_util::sync::CancellationToken;

use crate::config::{self, Validate};
use crate::telemetry::{self, LogFormat};
use crate::{http, shutdown};

/// What `main` needs to know of a service's configuration.
pub trait ServiceConfig: Parser + Validate + Send + 'static {
    /// The service's own HTTP port.
    fn http_addr(&self) -> SocketAddr;
    /// The log format asked for.
    fn log_format(&self) -> LogFormat;
    /// True when the process should only probe its running twin's readiness.
    fn probe_ready(&self) -> bool;
}

/// Runs a service: `run` gets the configuration and the shutdown token and returns the exit code.
pub async fn main<C, F, Fut>(service: &'static str, run: F) -> ExitCode
where
    C: ServiceConfig,
    F: FnOnce(C, CancellationToken) -> Fut,
    Fut: Future<Output = anyhow::Result<ExitCode>>,
{
    let config: C = match config::parse() {
        Ok(config) => config,
        Err(code) => return code,
    };
    if config.probe_ready() {
        let addr = config.http_addr();
        return tokio::task::spawn_blocking(move || http::probe_ready_exit_code(addr))
            .await
            .unwrap_or(ExitCode::FAILURE);
    }
    telemetry::init(service, config.log_format());
    match run(config, shutdown::on_signals()).await {
        Ok(code) => code,
        Err(err) => {
            tracing::error!(error = format!("{err:#}"), "{service} failed");
            ExitCode::FAILURE
        }
    }
}

/// Implements [`ServiceConfig`] for a config struct with `http_addr`, `log_format` and
/// `probe_ready` fields.
#[macro_export]
macro_rules! service_config {
    ($config:ty) => {
        impl $crate::service::ServiceConfig for $config {
            fn http_addr(&self) -> std::net::SocketAddr {
                self.http_addr
            }
            fn log_format(&self) -> $crate::telemetry::LogFormat {
                self.log_format
            }
            fn probe_ready(&self) -> bool {
                self.probe_ready
            }
        }
    };
}
