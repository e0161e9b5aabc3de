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

/// The settings `main` needs, declared per service by [`service_args!`](crate::service_args).
pub trait ServiceArgs {
    /// The service's own HTTP port.
    fn http_addr(&self) -> SocketAddr;
    /// The log format asked for.
    fn log_format(&self) -> LogFormat;
    /// True when the process should only probe its running twin's readiness.
    fn probe_ready(&self) -> bool;
}

/// A service's whole configuration, as `main` sees it.
pub trait ServiceConfig: Parser + Validate + Send + 'static {
    /// The service's probe-port settings.
    fn service_args(&self) -> &dyn ServiceArgs;
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
    let args = config.service_args();
    let (probe_ready, addr, log_format) = (args.probe_ready(), args.http_addr(), args.log_format());
    if probe_ready {
        return tokio::task::spawn_blocking(move || http::probe_ready_exit_code(addr))
            .await
            .unwrap_or(ExitCode::FAILURE);
    }
    telemetry::init(service, log_format);
    match run(config, shutdown::on_signals()).await {
        Ok(code) => code,
        Err(err) => {
            tracing::error!(error = format!("{err:#}"), "{service} failed");
            ExitCode::FAILURE
        }
    }
}

/// Implements [`ServiceConfig`] for a config struct whose field `$($field).+` (`service`, or
/// `writer.service`) holds the `ServiceArgs` that [`service_args!`](crate::service_args) declared.
#[macro_export]
macro_rules! service_config {
    ($config:ty, $($field:ident).+) => {
        impl $crate::service::ServiceConfig for $config {
            fn service_args(&self) -> &dyn $crate::service::ServiceArgs {
                &self.$($field).+
            }
        }
    };
}
