//! `filter`: configuration → telemetry → build → serve until SIGTERM/SIGINT.

use std::process::ExitCode;

use flowmesh_filter::{Application, FilterConfig};

#[tokio::main]
async fn main() -> ExitCode {
    flowmesh_common::service::main("filter", |config: FilterConfig, shutdown| async move {
        Application::build(config)
            .await?
            .run_until_stopped(shutdown)
            .await?;
        Ok(ExitCode::SUCCESS)
    })
    .await
}
