//! The filter's settings: every one a `--flag` with an environment variable.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;
use flowmesh_common::breaker::BreakerSettings;
use flowmesh_common::config::{Secret, Validate, parse_bytes, parse_duration};
use flowmesh_common::telemetry::LogFormat;

/// When a record written to the file sink counts as stored (and is acked).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Durability {
    /// After the group commit's bytes reached the OS (`write` + `flush`): survives a crash of
    /// the filter, not of the machine.
    Flush,
    /// After the group commit was `fsync`ed: survives a power loss.
    Fsync,
}

/// flowmesh filter: validates records arriving over WebSocket and routes `value > 90` to
/// RabbitMQ and the rest to a JSON Lines file, acking only what is durably stored.
#[derive(Debug, Clone, Parser)]
#[command(name = "filter", version, about, long_about = None)]
pub struct FilterConfig {
    /// Address of the WebSocket server (path `/ingest`).
    #[arg(long, env = "FILTER_LISTEN", default_value = "0.0.0.0:8080")]
    pub listen: SocketAddr,

    /// Address of the HTTP port serving /metrics and /health.
    #[arg(long, env = "FILTER_HTTP_ADDR", default_value = "0.0.0.0:9102")]
    pub http_addr: SocketAddr,

    /// Bearer token clients must present on the WebSocket upgrade; none means no check.
    #[arg(long, env = "FILTER_TOKEN", hide_env_values = true)]
    pub token: Option<Secret>,

    /// Largest WebSocket frame or message accepted (B, KiB, MiB); larger ones close the
    /// connection with code 1009.
    #[arg(long, env = "FILTER_MAX_FRAME_BYTES", default_value = "1MiB", value_parser = parse_bytes)]
    pub max_frame_bytes: u64,

    /// Records of one connection received but not yet answered. When reached, the filter
    /// stops reading that connection (TCP backpressure).
    #[arg(long, env = "FILTER_MAX_IN_FLIGHT", default_value_t = 10_000)]
    pub max_in_flight: usize,

    /// How often the filter pings each client.
    #[arg(long, env = "FILTER_PING_INTERVAL", default_value = "10s", value_parser = parse_duration)]
    pub ping_interval: Duration,

    /// A client silent for this long is considered dead and disconnected.
    #[arg(long, env = "FILTER_PEER_TIMEOUT", default_value = "30s", value_parser = parse_duration)]
    pub peer_timeout: Duration,

    /// RabbitMQ URL.
    #[arg(
        long,
        env = "AMQP_URL",
        default_value = "amqp://guest:guest@127.0.0.1:5672/%2f",
        hide_env_values = true
    )]
    pub amqp_url: String,

    /// Prefix of every exchange and queue name (`flowmesh` → `flowmesh.records`, …).
    #[arg(long, env = "AMQP_PREFIX", default_value = "flowmesh")]
    pub amqp_prefix: String,

    /// `x-delivery-limit` declared on the writer queues.
    #[arg(long, env = "AMQP_DELIVERY_LIMIT", default_value_t = 5)]
    pub delivery_limit: u32,

    /// Published records awaiting RabbitMQ's confirm at most; more wait (backpressure).
    #[arg(long, env = "FILTER_MAX_UNCONFIRMED", default_value_t = 20_000)]
    pub max_unconfirmed: usize,

    /// Directory of the file sink (`records.jsonl`, its rotations, `dead-letter.jsonl`).
    #[arg(long, env = "FILTER_DATA_DIR", default_value = "var/filter")]
    pub data_dir: PathBuf,

    /// Rotate `records.jsonl` when it reaches this size.
    #[arg(long, env = "FILTER_FILE_MAX_BYTES", default_value = "64MiB", value_parser = parse_bytes)]
    pub file_max_bytes: u64,

    /// Rotate `records.jsonl` when it is this old.
    #[arg(long, env = "FILTER_FILE_MAX_AGE", default_value = "1h", value_parser = parse_duration)]
    pub file_max_age: Duration,

    /// When a record in the file counts as stored: `flush` (reached the OS) or `fsync`
    /// (reached the disk; group-committed).
    #[arg(long, env = "FILTER_DURABILITY", value_enum, default_value = "fsync")]
    pub durability: Durability,

    /// Ids of the most recently written records remembered (and reloaded from the files at
    /// startup) so records re-sent after a crash or a lost ack are not written twice. Should
    /// exceed the sum of the generators' in-flight windows; 0 turns the check off.
    #[arg(long, env = "FILTER_DEDUPE_WINDOW", default_value_t = 100_000)]
    pub dedupe_window: usize,

    /// Consecutive failures that open a sink's circuit breaker.
    #[arg(long, env = "FILTER_BREAKER_FAILURES", default_value_t = 5)]
    pub breaker_failures: u32,

    /// First open wait of a breaker (also the `retry_after_ms` of nacks); doubles up to the max.
    #[arg(long, env = "FILTER_BREAKER_OPEN_WAIT", default_value = "1s", value_parser = parse_duration)]
    pub breaker_open_wait: Duration,

    /// Longest open wait of a breaker.
    #[arg(long, env = "FILTER_BREAKER_MAX_OPEN_WAIT", default_value = "30s", value_parser = parse_duration)]
    pub breaker_max_open_wait: Duration,

    /// Time allowed to drain on SIGTERM/SIGINT before exiting anyway.
    #[arg(long, env = "FILTER_GRACE", default_value = "20s", value_parser = parse_duration)]
    pub grace: Duration,

    /// Log format.
    #[arg(long, env = "LOG_FORMAT", value_enum, default_value = "json")]
    pub log_format: LogFormat,

    /// Probe this filter's own `/health/ready` on `--http-addr` and exit 0 when ready (for
    /// container healthchecks).
    #[arg(long)]
    pub probe_ready: bool,
}

impl FilterConfig {
    /// The breaker settings both sinks use.
    pub fn breaker(&self) -> BreakerSettings {
        BreakerSettings {
            failure_threshold: self.breaker_failures,
            open_wait: self.breaker_open_wait,
            max_open_wait: self.breaker_max_open_wait,
        }
    }
}

impl Validate for FilterConfig {
    fn validate(&self) -> Result<(), String> {
        if self.max_frame_bytes < 1024 {
            return Err("--max-frame-bytes (FILTER_MAX_FRAME_BYTES): must be at least 1KiB".into());
        }
        if self.max_in_flight == 0 {
            return Err("--max-in-flight (FILTER_MAX_IN_FLIGHT): must be at least 1".into());
        }
        if self.max_unconfirmed == 0 {
            return Err("--max-unconfirmed (FILTER_MAX_UNCONFIRMED): must be at least 1".into());
        }
        if !self.amqp_url.starts_with("amqp://") && !self.amqp_url.starts_with("amqps://") {
            return Err("--amqp-url (AMQP_URL): must start with amqp:// or amqps://".into());
        }
        if self.amqp_prefix.is_empty() {
            return Err("--amqp-prefix (AMQP_PREFIX): must not be empty".into());
        }
        if self.delivery_limit == 0 {
            return Err("--delivery-limit (AMQP_DELIVERY_LIMIT): must be at least 1".into());
        }
        if self.file_max_bytes < 1024 {
            return Err("--file-max-bytes (FILTER_FILE_MAX_BYTES): must be at least 1KiB".into());
        }
        if self.file_max_age < Duration::from_secs(1) {
            return Err("--file-max-age (FILTER_FILE_MAX_AGE): must be at least 1s".into());
        }
        if self.breaker_failures == 0 {
            return Err("--breaker-failures (FILTER_BREAKER_FAILURES): must be at least 1".into());
        }
        if self.breaker_open_wait.is_zero() || self.breaker_max_open_wait < self.breaker_open_wait {
            return Err(
                "--breaker-open-wait (FILTER_BREAKER_OPEN_WAIT): must be positive and at most --breaker-max-open-wait"
                    .into(),
            );
        }
        if self.ping_interval.is_zero() || self.peer_timeout <= self.ping_interval {
            return Err(
                "--peer-timeout (FILTER_PEER_TIMEOUT): must be longer than --ping-interval".into(),
            );
        }
        Ok(())
    }
}

impl FilterConfig {
    /// The defaults, with every address on a free loopback port: what tests start from.
    pub fn for_tests(data_dir: PathBuf, amqp_prefix: &str) -> Self {
        let mut config = Self::parse_from(["filter"]);
        config.listen = "127.0.0.1:0".parse().expect("literal address");
        config.http_addr = "127.0.0.1:0".parse().expect("literal address");
        config.data_dir = data_dir;
        config.amqp_prefix = amqp_prefix.to_owned();
        if let Ok(url) = std::env::var("AMQP_URL") {
            config.amqp_url = url;
        }
        config.breaker_open_wait = Duration::from_millis(300);
        config.breaker_max_open_wait = Duration::from_secs(1);
        config
    }
}

flowmesh_common::service_config!(FilterConfig);
