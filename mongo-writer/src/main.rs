//! `mongo-writer`: configuration → telemetry → build → consume until SIGTERM/SIGINT.

use std::process::ExitCode;

use flowmesh_mongo_writer::{Application, MongoWriterConfig};

#[tokio::main]
async fn main() -> ExitCode {
    flowmesh_common::service::main(
        "mongo-writer",
        |config: MongoWriterConfig, shutdown| async move {
            Application::build(config)
                .await?
                .run_until_stopped(shutdown)
                .await?;
            Ok(ExitCode::SUCCESS)
        },
    )
    .await
}
