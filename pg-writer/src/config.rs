//! pg-writer's settings: every one a `--flag` with an environment variable.

use std::net::SocketAddr;
use std::time::Duration;

use clap::Parser;
use flowmesh_common::breaker::BreakerSettings;
use flowmesh_common::config::{Validate, parse_duration};
use flowmesh_common::telemetry::LogFormat;

/// flowmesh pg-writer: consumes records from its RabbitMQ queue and stores them idempotently
/// in PostgreSQL, acking each batch after its commit.
#[derive(Debug, Clone, Parser)]
#[command(name = "pg-writer", version, about, long_about = None)]
pub struct PgWriterConfig {
    /// PostgreSQL URL.
    #[arg(
        long,
        env = "DATABASE_URL",
        default_value = "postgres://postgres:postgres@127.0.0.1:5432/flowmesh",
        hide_env_values = true
    )]
    pub database_url: String,

    /// Connections in the pool at most.
    #[arg(long, env = "PG_WRITER_POOL_SIZE", default_value_t = 4)]
    pub pool_size: u32,

    /// RabbitMQ URL.
    #[arg(
        long,
        env = "AMQP_URL",
        default_value = "amqp://guest:guest@127.0.0.1:5672/%2f",
        hide_env_values = true
    )]
    pub amqp_url: String,

    /// Prefix of every exchange and queue name.
    #[arg(long, env = "AMQP_PREFIX", default_value = "flowmesh")]
    pub amqp_prefix: String,

    /// `x-delivery-limit` declared on the writer queues.
    #[arg(long, env = "AMQP_DELIVERY_LIMIT", default_value_t = 5)]
    pub delivery_limit: u32,

    /// Unacked messages RabbitMQ hands this writer at once (bounds its memory).
    #[arg(long, env = "PG_WRITER_PREFETCH", default_value_t = 1000)]
    pub prefetch: u16,

    /// Records per INSERT at most.
    #[arg(long, env = "PG_WRITER_BATCH_MAX", default_value_t = 500)]
    pub batch_max: usize,

    /// How long a batch waits for more records after its first (keeps latency low at low rates).
    #[arg(long, env = "PG_WRITER_LINGER", default_value = "20ms", value_parser = parse_duration)]
    pub linger: Duration,

    /// Consecutive failed batches that open the PostgreSQL breaker.
    #[arg(long, env = "PG_WRITER_BREAKER_FAILURES", default_value_t = 3)]
    pub breaker_failures: u32,

    /// First open wait of the breaker; doubles (jittered) up to the max.
    #[arg(long, env = "PG_WRITER_BREAKER_OPEN_WAIT", default_value = "1s", value_parser = parse_duration)]
    pub breaker_open_wait: Duration,

    /// Longest open wait of the breaker.
    #[arg(long, env = "PG_WRITER_BREAKER_MAX_OPEN_WAIT", default_value = "30s", value_parser = parse_duration)]
    pub breaker_max_open_wait: Duration,

    /// Address of the HTTP port serving /metrics and /health.
    #[arg(long, env = "PG_WRITER_HTTP_ADDR", default_value = "0.0.0.0:9103")]
    pub http_addr: SocketAddr,

    /// Time allowed to finish the batch in hand on SIGTERM/SIGINT.
    #[arg(long, env = "PG_WRITER_GRACE", default_value = "20s", value_parser = parse_duration)]
    pub grace: Duration,

    /// Log format.
    #[arg(long, env = "LOG_FORMAT", value_enum, default_value = "json")]
    pub log_format: LogFormat,

    /// Probe this writer's own `/health/ready` on `--http-addr` and exit 0 when ready.
    #[arg(long)]
    pub probe_ready: bool,
}

impl PgWriterConfig {
    /// The PostgreSQL breaker's settings.
    pub fn breaker(&self) -> BreakerSettings {
        BreakerSettings {
            failure_threshold: self.breaker_failures,
            open_wait: self.breaker_open_wait,
            max_open_wait: self.breaker_max_open_wait,
        }
    }

    /// The defaults with a loopback HTTP port 0: what tests start from.
    pub fn for_tests(database_url: &str, amqp_prefix: &str) -> Self {
        let mut config = Self::parse_from(["pg-writer"]);
        config.database_url = database_url.to_owned();
        config.amqp_prefix = amqp_prefix.to_owned();
        config.http_addr = "127.0.0.1:0".parse().expect("literal address");
        if let Ok(url) = std::env::var("AMQP_URL") {
            config.amqp_url = url;
        }
        config.breaker_open_wait = Duration::from_millis(200);
        config.breaker_max_open_wait = Duration::from_secs(1);
        config
    }
}

impl Validate for PgWriterConfig {
    fn validate(&self) -> Result<(), String> {
        if !self.database_url.starts_with("postgres://")
            && !self.database_url.starts_with("postgresql://")
        {
            return Err(
                "--database-url (DATABASE_URL): must start with postgres:// or postgresql://"
                    .into(),
            );
        }
        if !self.amqp_url.starts_with("amqp://") && !self.amqp_url.starts_with("amqps://") {
            return Err("--amqp-url (AMQP_URL): must start with amqp:// or amqps://".into());
        }
        if self.pool_size == 0 {
            return Err("--pool-size (PG_WRITER_POOL_SIZE): must be at least 1".into());
        }
        if self.prefetch == 0 || self.batch_max == 0 {
            return Err("--prefetch and --batch-max (PG_WRITER_PREFETCH, PG_WRITER_BATCH_MAX): must be at least 1".into());
        }
        if self.batch_max > usize::from(self.prefetch) {
            return Err("--batch-max (PG_WRITER_BATCH_MAX): must not exceed --prefetch".into());
        }
        if self.breaker_failures == 0 {
            return Err(
                "--breaker-failures (PG_WRITER_BREAKER_FAILURES): must be at least 1".into(),
            );
        }
        if self.breaker_open_wait.is_zero() || self.breaker_max_open_wait < self.breaker_open_wait {
            return Err("--breaker-open-wait (PG_WRITER_BREAKER_OPEN_WAIT): must be positive and at most the max".into());
        }
        Ok(())
    }
}

flowmesh_common::service_config!(PgWriterConfig);
