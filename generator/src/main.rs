//! `generator`: parse config → init telemetry → build → run until the count is acked or
//! SIGTERM/SIGINT.

use std::process::ExitCode;

use flowmesh_common::{config, http, shutdown, telemetry};
use flowmesh_generator::{Application, GeneratorConfig};

#[tokio::main]
async fn main() -> ExitCode {
    let config: GeneratorConfig = match config::parse() {
        Ok(config) => config,
        Err(code) => return code,
    };
    if config.probe_ready {
        return tokio::task::spawn_blocking(move || http::probe_ready_exit_code(config.http_addr))
            .await
            .unwrap_or(ExitCode::FAILURE);
    }
    telemetry::init("generator", config.log_format);
    let counted = config.count.is_some();
    let app = match Application::build(config).await {
        Ok(app) => app,
        Err(err) => {
            tracing::error!(error = format!("{err:#}"), "generator failed to start");
            return ExitCode::FAILURE;
        }
    };
    match app.run_until_stopped(shutdown::on_signals()).await {
        Ok(summary) if summary.counts.rejected > 0 => {
            tracing::error!(
                rejected = summary.counts.rejected,
                "the filter rejected generated records"
            );
            ExitCode::FAILURE
        }
        Ok(summary) if counted && summary.counts.in_flight > 0 => {
            tracing::error!(
                unacked = summary.counts.in_flight,
                "stopped before every record was acked"
            );
            ExitCode::FAILURE
        }
        Ok(_) => ExitCode::SUCCESS,
        Err(err) => {
            tracing::error!(error = format!("{err:#}"), "generator failed");
            ExitCode::FAILURE
        }
    }
}
