//! `pg-writer`: configuration → telemetry → build → consume until SIGTERM/SIGINT.

#[tokio::main]
async fn main() -> std::process::ExitCode {
    flowmesh_common::writers::main("pg-writer", flowmesh_pg_writer::build).await
}
