//! pg-writer's settings: every one a `--flag` with an environment variable.

use clap::Parser;
use flowmesh_common::config::{SecretUrl, Validate, require_scheme};

flowmesh_common::writer_args!("PG_WRITER", "0.0.0.0:9103");

/// flowmesh pg-writer: consumes records from its RabbitMQ queue and stores them idempotently
/// in PostgreSQL, acking each batch after its commit.
#[derive(Debug, Clone, Parser)]
#[command(name = "pg-writer", version, about, long_about = None)]
pub struct PgWriterConfig {
    /// PostgreSQL.
    #[command(flatten)]
    pub postgres: PostgresArgs,

    /// Connections in the pool at most.
    #[arg(long, env = "PG_WRITER_POOL_SIZE", default_value_t = 4)]
    pub pool_size: u32,

    /// RabbitMQ, queue reading, the database breaker, probe port and grace.
    #[command(flatten)]
    pub writer: WriterArgs,
}

/// Where PostgreSQL is: the writer's and `verify`'s one flag for it.
#[derive(Debug, Clone, clap::Args)]
pub struct PostgresArgs {
    /// PostgreSQL URL.
    #[arg(
        long,
        env = "DATABASE_URL",
        default_value = "postgres://postgres:postgres@127.0.0.1:5432/flowmesh",
        hide_env_values = true
    )]
    pub database_url: SecretUrl,
}

impl PostgresArgs {
    /// Checks the URL's scheme.
    pub fn validate(&self) -> Result<(), String> {
        require_scheme(
            "--database-url (DATABASE_URL)",
            self.database_url.expose(),
            &["postgres://", "postgresql://"],
        )
    }
}

impl PgWriterConfig {
    /// The defaults with a loopback HTTP port 0: what tests start from.
    pub fn for_tests(database_url: &str, amqp_prefix: &str) -> Self {
        let mut config = Self::parse_from(["pg-writer"]);
        config.postgres.database_url = database_url.into();
        config.writer.prepare_for_tests(amqp_prefix);
        config
    }
}

impl Validate for PgWriterConfig {
    fn validate(&self) -> Result<(), String> {
        self.postgres.validate()?;
        if self.pool_size == 0 {
            return Err("--pool-size (PG_WRITER_POOL_SIZE): must be at least 1".into());
        }
        self.writer.validate()
    }
}

flowmesh_common::service_config!(PgWriterConfig, writer.service);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn printing_the_configuration_shows_no_password() {
        let config = PgWriterConfig::parse_from([
            "pg-writer",
            "--database-url",
            "postgres://u:hunter2@db:5432/flowmesh",
            "--amqp-url",
            "amqp://guest:s3cr3t/x@mq:5672/%2f",
        ]);
        let printed = format!("{config:?}");
        assert!(
            !printed.contains("hunter2") && !printed.contains("s3cr3t"),
            "{printed}"
        );
        assert_eq!(
            config.postgres.database_url.expose(),
            "postgres://u:hunter2@db:5432/flowmesh"
        );
    }
}
