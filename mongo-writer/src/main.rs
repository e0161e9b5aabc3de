//! `mongo-writer`: parse config → init telemetry → build → consume until SIGTERM/SIGINT.

use std::process::ExitCode;

use flowmesh_common::{config, http, shutdown, telemetry};
use flowmesh_mongo_writer::{Application, MongoWriterConfig};

#[tokio::main]
async fn main() -> ExitCode {
    let config: MongoWriterConfig = match config::parse() {
        Ok(config) => config,
        Err(code) => return code,
    };
    if config.probe_ready {
        return tokio::task::spawn_blocking(move || http::probe_ready_exit_code(config.http_addr))
            .await
            .unwrap_or(ExitCode::FAILURE);
    }
    telemetry::init("mongo-writer", config.log_format);
    let app = match Application::build(config).await {
        Ok(app) => app,
        Err(err) => {
            tracing::error!(error = format!("{err:#}"), "mongo-writer failed to start");
            return ExitCode::FAILURE;
        }
    };
    match app.run_until_stopped(shutdown::on_signals()).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            tracing::error!(error = format!("{err:#}"), "mongo-writer failed");
            ExitCode::FAILURE
        }
    }
}
