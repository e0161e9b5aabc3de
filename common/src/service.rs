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
use crate::traces::{self, Sampling, Traces};
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
    let env = |name: &str| std::env::var(name).ok();
    let traces = match traces::settings(env)
        .and_then(|on| on.map(|b| Ok((b, Sampling::from_env(env)?))).transpose())
        .map_err(anyhow::Error::msg)
        .and_then(|on| on.map(|(b, s)| Traces::otlp(service, b, s)).transpose())
    {
        Ok(traces) => traces,
        Err(err) => {
            eprintln!("error: invalid configuration: {err:#}");
            return ExitCode::from(config::EXIT_BAD_CONFIG);
        }
    };
    telemetry::init(service, log_format, traces.as_ref());
    if let Some(traces) = &traces {
        crate::spans::install(service, traces.tracer(service));
    }
    let code = match run(config, shutdown::on_signals()).await {
        Ok(code) => code,
        Err(err) => {
            tracing::error!(error = format!("{err:#}"), "{service} failed");
            ExitCode::FAILURE
        }
    };
    if let Some(traces) = traces {
        // The export thread may wait on the collector: not on a runtime thread.
        let _ = tokio::task::spawn_blocking(move || traces.shutdown(TRACES_SHUTDOWN)).await;
    }
    code
}

/// The longest a stopping service waits for its queued spans to be sent.
const TRACES_SHUTDOWN: std::time::Duration = std::time::Duration::from_secs(5);

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
