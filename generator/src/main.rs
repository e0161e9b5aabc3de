//! `generator`: configuration → telemetry → build → run until the count is acked or
//! SIGTERM/SIGINT. Exits 1 when the filter rejected records, or when a counted run stopped
//! before every record was acked.

use std::process::ExitCode;

use flowmesh_generator::{Application, GeneratorConfig};

#[tokio::main]
async fn main() -> ExitCode {
    flowmesh_common::service::main(
        "generator",
        |config: GeneratorConfig, shutdown| async move {
            let counted = config.count.is_some();
            let summary = Application::build(config)
                .await?
                .run_until_stopped(shutdown)
                .await?;
            if summary.counts.rejected > 0 {
                tracing::error!(
                    rejected = summary.counts.rejected,
                    "the filter rejected generated records"
                );
                return Ok(ExitCode::FAILURE);
            }
            if counted && summary.counts.in_flight > 0 {
                tracing::error!(
                    unacked = summary.counts.in_flight,
                    "stopped before every record was acked"
                );
                return Ok(ExitCode::FAILURE);
            }
            Ok(ExitCode::SUCCESS)
        },
    )
    .await
}
