//! mongo-writer's settings: every one a `--flag` with an environment variable.

use std::net::SocketAddr;
use std::time::Duration;

use clap::Parser;
use flowmesh_common::breaker::BreakerSettings;
use flowmesh_common::config::{Validate, parse_duration};
use flowmesh_common::telemetry::LogFormat;

/// Where groups are stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum StoreKind {
    /// MongoDB at `MONGODB_URL`.
    Mongodb,
    /// In this process's memory: for demos and tests without MongoDB; lost on exit.
    Memory,
}

/// flowmesh mongo-writer: consumes records from its RabbitMQ queue (single active consumer) and
/// stores them in MongoDB, nesting consecutive records whose hash is above "99" in one document.
#[derive(Debug, Clone, Parser)]
#[command(name = "mongo-writer", version, about, long_about = None)]
pub struct MongoWriterConfig {
    /// MongoDB URL.
    #[arg(
        long,
        env = "MONGODB_URL",
        default_value = "mongodb://127.0.0.1:27017",
        hide_env_values = true
    )]
    pub mongodb_url: String,

    /// MongoDB database.
    #[arg(long, env = "MONGODB_DATABASE", default_value = "flowmesh")]
    pub mongodb_database: String,

    /// MongoDB collection of groups.
    #[arg(long, env = "MONGODB_COLLECTION", default_value = "records")]
    pub mongodb_collection: String,

    /// `mongodb`, or `memory` to run without MongoDB (nothing survives a restart).
    #[arg(
        long,
        env = "MONGO_WRITER_STORE",
        value_enum,
        default_value = "mongodb"
    )]
    pub store: StoreKind,

    /// Fault injection for the chaos suite, with `--store memory` only: while a file exists at
    /// this path, the in-memory store fails every call (as an unreachable MongoDB would).
    #[arg(long, env = "MONGO_WRITER_MEMORY_FAIL_WHILE")]
    pub memory_fail_while: Option<std::path::PathBuf>,

    /// Records in one nested document at most.
    #[arg(long, env = "MONGO_WRITER_MAX_NEST", default_value_t = 100)]
    pub max_nest: usize,

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
    #[arg(long, env = "MONGO_WRITER_PREFETCH", default_value_t = 1000)]
    pub prefetch: u16,

    /// Records per batch at most.
    #[arg(long, env = "MONGO_WRITER_BATCH_MAX", default_value_t = 500)]
    pub batch_max: usize,

    /// How long a batch waits for more records after its first.
    #[arg(long, env = "MONGO_WRITER_LINGER", default_value = "20ms", value_parser = parse_duration)]
    pub linger: Duration,

    /// Consecutive failed batches that open the MongoDB breaker.
    #[arg(long, env = "MONGO_WRITER_BREAKER_FAILURES", default_value_t = 3)]
    pub breaker_failures: u32,

    /// First open wait of the breaker; doubles (jittered) up to the max.
    #[arg(long, env = "MONGO_WRITER_BREAKER_OPEN_WAIT", default_value = "1s", value_parser = parse_duration)]
    pub breaker_open_wait: Duration,

    /// Longest open wait of the breaker.
    #[arg(long, env = "MONGO_WRITER_BREAKER_MAX_OPEN_WAIT", default_value = "30s", value_parser = parse_duration)]
    pub breaker_max_open_wait: Duration,

    /// Address of the HTTP port serving /metrics and /health.
    #[arg(long, env = "MONGO_WRITER_HTTP_ADDR", default_value = "0.0.0.0:9104")]
    pub http_addr: SocketAddr,

    /// Time allowed to finish the batch in hand on SIGTERM/SIGINT.
    #[arg(long, env = "MONGO_WRITER_GRACE", default_value = "20s", value_parser = parse_duration)]
    pub grace: Duration,

    /// Log format.
    #[arg(long, env = "LOG_FORMAT", value_enum, default_value = "json")]
    pub log_format: LogFormat,

    /// Probe this writer's own `/health/ready` on `--http-addr` and exit 0 when ready.
    #[arg(long)]
    pub probe_ready: bool,
}

impl MongoWriterConfig {
    /// The MongoDB breaker's settings.
    pub fn breaker(&self) -> BreakerSettings {
        BreakerSettings {
            failure_threshold: self.breaker_failures,
            open_wait: self.breaker_open_wait,
            max_open_wait: self.breaker_max_open_wait,
        }
    }

    /// The defaults with a loopback HTTP port 0 and a private prefix: what tests start from.
    pub fn for_tests(amqp_prefix: &str) -> Self {
        let mut config = Self::parse_from(["mongo-writer"]);
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

impl Validate for MongoWriterConfig {
    fn validate(&self) -> Result<(), String> {
        if !self.mongodb_url.starts_with("mongodb://")
            && !self.mongodb_url.starts_with("mongodb+srv://")
        {
            return Err(
                "--mongodb-url (MONGODB_URL): must start with mongodb:// or mongodb+srv://".into(),
            );
        }
        if !self.amqp_url.starts_with("amqp://") && !self.amqp_url.starts_with("amqps://") {
            return Err("--amqp-url (AMQP_URL): must start with amqp:// or amqps://".into());
        }
        if self.max_nest == 0 {
            return Err("--max-nest (MONGO_WRITER_MAX_NEST): must be at least 1".into());
        }
        if self.prefetch == 0 || self.batch_max == 0 || self.batch_max > usize::from(self.prefetch)
        {
            return Err(
                "--batch-max (MONGO_WRITER_BATCH_MAX): must be between 1 and --prefetch".into(),
            );
        }
        if self.breaker_failures == 0 {
            return Err(
                "--breaker-failures (MONGO_WRITER_BREAKER_FAILURES): must be at least 1".into(),
            );
        }
        if self.breaker_open_wait.is_zero() || self.breaker_max_open_wait < self.breaker_open_wait {
            return Err("--breaker-open-wait (MONGO_WRITER_BREAKER_OPEN_WAIT): must be positive and at most the max".into());
        }
        Ok(())
    }
}

flowmesh_common::service_config!(MongoWriterConfig);
