//! `mongo-writer`: configuration → telemetry → build → consume until SIGTERM/SIGINT.

#[tokio::main]
async fn main() -> std::process::ExitCode {
    flowmesh_common::writers::main("mongo-writer", flowmesh_mongo_writer::build).await
}
