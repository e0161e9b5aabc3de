//! `pg-writer`: configuration → telemetry → build → consume until SIGTERM/SIGINT.

use std::process::ExitCode;

use flowmesh_pg_writer::{Application, PgWriterConfig};

#[tokio::main]
async fn main() -> ExitCode {
    flowmesh_common::service::main("pg-writer", |config: PgWriterConfig, shutdown| async move {
        Application::build(config)
            .await?
            .run_until_stopped(shutdown)
            .await?;
        Ok(ExitCode::SUCCESS)
    })
    .await
}
