//! Flags that several binaries share, as types flattened into each configuration
//! (`#[command(flatten)]`) and validated once.
//!
//! [`BrokerArgs`] has the same environment variables everywhere. The other groups carry the
//! service's own prefix (`PG_WRITER_GRACE`, `FILTER_HTTP_ADDR`, …), which clap can only take as
//! a literal, so each service declares its copy with a macro: [`service_args!`](crate::service_args),
//! [`breaker_args!`](crate::breaker_args) and [`consumer_args!`](crate::consumer_args).

use std::path::PathBuf;

use clap::Args;

use crate::config::{Secret, SecretUrl};
use crate::topology::Topology;

/// Shortest bearer token accepted: shorter ones are guessable.
pub const MIN_TOKEN_CHARS: usize = 16;

/// The bearer token of the WebSocket hop, the same on both sides: `FILTER_TOKEN`, or better
/// `FILTER_TOKEN_FILE` (Docker-secrets style; a flag or a variable shows in `ps` and `env`).
#[derive(Debug, Clone, Default, Args)]
pub struct TokenArgs {
    /// Bearer token of the WebSocket upgrade (prefer --token-file).
    #[arg(long = "token", env = "FILTER_TOKEN", hide_env_values = true)]
    pub value: Option<Secret>,

    /// File holding the bearer token (surrounding whitespace is ignored).
    #[arg(long = "token-file", env = "FILTER_TOKEN_FILE")]
    pub file: Option<PathBuf>,
}

impl TokenArgs {
    /// The token, from the value or the file; none when neither is set. An empty or short
    /// token, an unreadable file, or both set is an error naming the setting.
    pub fn resolve(&self) -> Result<Option<Secret>, String> {
        let token = match (&self.value, &self.file) {
            (Some(_), Some(_)) => {
                return Err("--token (FILTER_TOKEN) and --token-file (FILTER_TOKEN_FILE): set one, not both".into());
            }
            (Some(value), None) => value.expose().to_owned(),
            (None, Some(path)) => std::fs::read_to_string(path)
                .map_err(|e| {
                    format!(
                        "--token-file (FILTER_TOKEN_FILE): cannot read {}: {e}",
                        path.display()
                    )
                })?
                .trim()
                .to_owned(),
            (None, None) => return Ok(None),
        };
        if token.chars().count() < MIN_TOKEN_CHARS {
            return Err(format!(
                "--token / --token-file (FILTER_TOKEN, FILTER_TOKEN_FILE): the token must have at least {MIN_TOKEN_CHARS} characters"
            ));
        }
        Ok(Some(token.parse().unwrap_or_else(|never| match never {})))
    }
}

/// How to reach RabbitMQ and which names to use there: `AMQP_URL`, `AMQP_PREFIX`,
/// `AMQP_DELIVERY_LIMIT`, for every binary that talks to it.
#[derive(Debug, Clone, Args)]
pub struct BrokerArgs {
    /// RabbitMQ URL, or the URLs of a cluster's nodes separated by commas (each process
    /// connects to one, in a shuffled order, and moves to the next when it loses it).
    #[arg(
        long = "amqp-url",
        env = "AMQP_URL",
        default_value = "amqp://guest:guest@127.0.0.1:5672/%2f",
        hide_env_values = true
    )]
    pub url: SecretUrl,

    /// Prefix of every exchange and queue name (`flowmesh` → `flowmesh.records`, …).
    #[arg(long = "amqp-prefix", env = "AMQP_PREFIX", default_value = "flowmesh")]
    pub prefix: String,

    /// `x-delivery-limit` declared on the writer queues.
    #[arg(long, env = "AMQP_DELIVERY_LIMIT", default_value_t = 5)]
    pub delivery_limit: u32,

    /// Partitions of mongo-writer's queue, by source (the same count for every filter and
    /// mongo-writer; changing it is an operation: docs/operations.md).
    #[arg(
        long,
        env = "MONGO_PARTITIONS",
        default_value_t = 1,
        value_parser = clap::value_parser!(u16).range(1..=i64::from(crate::topology::partitions::MAX_PARTITIONS))
    )]
    pub mongo_partitions: u16,
}

impl BrokerArgs {
    /// The topology these names describe.
    pub fn topology(&self) -> Topology {
        Topology::new(&self.prefix, self.delivery_limit)
            .with_partitions(Some(self.mongo_partitions), false)
    }

    /// The topology a writer declares: its own queue; the partitions only for the writer that
    /// consumes them.
    pub fn topology_for_writer(&self, writer: &str) -> Topology {
        let topology = self.topology();
        let partitioned = topology
            .partitioned_queue()
            .is_some_and(|queue| queue.consumer == Some(writer));
        if partitioned {
            topology
        } else {
            topology.with_partitions(None, false)
        }
    }

    /// Tests: the defaults with `AMQP_URL` from the environment and a private prefix.
    pub fn for_tests(prefix: &str) -> Self {
        Self {
            url: std::env::var("AMQP_URL")
                .unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".into())
                .as_str()
                .into(),
            prefix: prefix.to_owned(),
            delivery_limit: 5,
            mongo_partitions: 1,
        }
    }

    /// The nodes of `AMQP_URL`, shuffled for this process.
    pub fn nodes(&self) -> anyhow::Result<crate::nodes::Nodes> {
        crate::nodes::Nodes::shuffled(self.url.expose())
            .map_err(|e| anyhow::anyhow!("--amqp-url (AMQP_URL): {e}"))
    }

    /// Checks the settings, naming the one at fault.
    pub fn validate(&self) -> Result<(), String> {
        crate::nodes::Nodes::in_order(self.url.expose())
            .map_err(|e| format!("--amqp-url (AMQP_URL): {e}"))?;
        if self.prefix.is_empty() {
            return Err("--amqp-prefix (AMQP_PREFIX): must not be empty".into());
        }
        if self.delivery_limit == 0 {
            return Err("--delivery-limit (AMQP_DELIVERY_LIMIT): must be at least 1".into());
        }
        Ok(())
    }
}

/// Declares `ServiceArgs`: the probe port, grace period and log format of one service, with
/// its environment prefix and default port.
#[macro_export]
macro_rules! service_args {
    ($prefix:literal, $http_addr:literal) => {
        /// The probe port, grace period and log format.
        #[derive(Debug, Clone, clap::Args)]
        pub struct ServiceArgs {
            /// Address of the HTTP port serving /metrics and /health.
            #[arg(long, env = concat!($prefix, "_HTTP_ADDR"), default_value = $http_addr)]
            pub http_addr: std::net::SocketAddr,

            /// Time allowed to drain on SIGTERM/SIGINT before exiting anyway.
            #[arg(long, env = concat!($prefix, "_GRACE"), default_value = "20s",
                                                  value_parser = $crate::config::parse_duration)]
            pub grace: std::time::Duration,

            /// Log format.
            #[arg(long, env = "LOG_FORMAT", value_enum, default_value = "json")]
            pub log_format: $crate::telemetry::LogFormat,

            /// How often to log a progress line (`0`: never).
            #[arg(long, env = "LOG_PROGRESS_EVERY", default_value = "30s",
                  value_parser = $crate::config::parse_interval)]
            pub progress_every: std::time::Duration,

            /// Probe this service's own `/health/ready` on `--http-addr` and exit 0 when ready
            /// (for container healthchecks).
            #[arg(long)]
            pub probe_ready: bool,
        }

        impl $crate::service::ServiceArgs for ServiceArgs {
            fn http_addr(&self) -> std::net::SocketAddr {
                self.http_addr
            }
            fn log_format(&self) -> $crate::telemetry::LogFormat {
                self.log_format
            }
            fn probe_ready(&self) -> bool {
                self.probe_ready
            }
        }
    };
}

/// Declares `BreakerArgs`: one service's circuit-breaker settings, with its environment prefix
/// and defaults.
#[macro_export]
macro_rules! breaker_args {
    ($prefix:literal, failures = $failures:literal, open_wait = $open_wait:literal) => {
        /// Circuit-breaker settings.
        #[derive(Debug, Clone, clap::Args)]
        pub struct BreakerArgs {
            /// Consecutive failures that open a breaker.
            #[arg(long, env = concat!($prefix, "_BREAKER_FAILURES"), default_value_t = $failures)]
            pub breaker_failures: u32,

            /// First open wait of a breaker; doubles (jittered) up to the max.
            #[arg(long, env = concat!($prefix, "_BREAKER_OPEN_WAIT"), default_value = $open_wait,
                                                  value_parser = $crate::config::parse_duration)]
            pub breaker_open_wait: std::time::Duration,

            /// Longest open wait of a breaker.
            #[arg(long, env = concat!($prefix, "_BREAKER_MAX_OPEN_WAIT"), default_value = "30s",
                                                  value_parser = $crate::config::parse_duration)]
            pub breaker_max_open_wait: std::time::Duration,
        }

        impl BreakerArgs {
            /// The settings as the breaker takes them.
            pub fn settings(&self) -> $crate::breaker::BreakerSettings {
                $crate::breaker::BreakerSettings {
                    failure_threshold: self.breaker_failures,
                    open_wait: self.breaker_open_wait,
                    max_open_wait: self.breaker_max_open_wait,
                }
            }

            /// Short waits, so tests see a breaker close again quickly.
            pub fn shorten_for_tests(&mut self) {
                self.breaker_open_wait = std::time::Duration::from_millis(200);
                self.breaker_max_open_wait = std::time::Duration::from_secs(1);
            }

            /// Checks the settings, naming the one at fault.
            pub fn validate(&self) -> Result<(), String> {
                if self.breaker_failures == 0 {
                    return Err(concat!(
                        "--breaker-failures (",
                        $prefix,
                        "_BREAKER_FAILURES): must be at least 1"
                    )
                    .into());
                }
                if self.breaker_open_wait.is_zero()
                    || self.breaker_max_open_wait < self.breaker_open_wait
                {
                    return Err(concat!(
                        "--breaker-open-wait (",
                        $prefix,
                        "_BREAKER_OPEN_WAIT): must be positive and at most --breaker-max-open-wait"
                    )
                    .into());
                }
                Ok(())
            }
        }
    };
}

/// Declares `ConsumerArgs`: how one writer reads its queue (prefetch, batch size, linger), with
/// its environment prefix.
#[macro_export]
macro_rules! consumer_args {
    ($prefix:literal) => {
        /// How the writer reads its queue.
        #[derive(Debug, Clone, clap::Args)]
        pub struct ConsumerArgs {
            /// Records RabbitMQ may hand this writer at once, unacked (bounds its memory and
            /// what a session end returns). Counted in records, not messages: the writer
            /// opens its consumer for as many messages as hold this many records.
            #[arg(long, env = concat!($prefix, "_PREFETCH"), default_value_t = 2000)]
            pub prefetch: u32,

            /// Records per batch stored at most.
            #[arg(long, env = concat!($prefix, "_BATCH_MAX"), default_value_t = 1000)]
            pub batch_max: usize,

            /// How long a batch may wait for more records after its first. The default, 0,
            /// batches adaptively: a batch takes what has already arrived and is stored at
            /// once, so an idle stream's record is written immediately and, under load, the
            /// records that arrive while one batch is stored make up the next.
            #[arg(long, env = concat!($prefix, "_LINGER"), default_value = "0s",
                                                  value_parser = $crate::config::parse_duration)]
            pub linger: std::time::Duration,

            /// Deadline of one store call (a batch written to the database). Past it the call
            /// counts as a failure of the database: the breaker counts it, the batch stays in
            /// hand, unacked, and is tried again (the stores are idempotent). It must be well
            /// under the grace period, so a frozen database cannot hold a stopping writer.
            #[arg(long, env = concat!($prefix, "_STORE_TIMEOUT"), default_value = "10s",
                                                  value_parser = $crate::config::parse_duration)]
            pub store_timeout: std::time::Duration,
        }

        impl ConsumerArgs {
            /// Checks the settings, naming the one at fault.
            pub fn validate(&self) -> Result<(), String> {
                if self.store_timeout < std::time::Duration::from_millis(100) {
                    return Err(concat!(
                        "--store-timeout (",
                        $prefix,
                        "_STORE_TIMEOUT): must be at least 100ms"
                    )
                    .into());
                }
                if self.prefetch == 0
                    || self.batch_max == 0
                    || self.batch_max > self.prefetch as usize
                {
                    return Err(concat!(
                        "--batch-max (",
                        $prefix,
                        "_BATCH_MAX): must be between 1 and --prefetch (",
                        $prefix,
                        "_PREFETCH)"
                    )
                    .into());
                }
                Ok(())
            }
        }
    };
}

/// Declares `WriterArgs`: everything a writer shares with every other writer (RabbitMQ, how the
/// queue is read, the database breaker, probe port and grace), with its environment prefix and
/// default probe address. Flatten it into the writer's configuration.
#[macro_export]
macro_rules! writer_args {
    ($prefix:literal, $http_addr:literal) => {
        $crate::service_args!($prefix, $http_addr);
        $crate::breaker_args!($prefix, failures = 3, open_wait = "1s");
        $crate::consumer_args!($prefix);

        /// The settings every writer has.
        #[derive(Debug, Clone, clap::Args)]
        pub struct WriterArgs {
            /// RabbitMQ.
            #[command(flatten)]
            pub broker: $crate::args::BrokerArgs,
            /// How the queue is read.
            #[command(flatten)]
            pub consumer: ConsumerArgs,
            /// The database's breaker.
            #[command(flatten)]
            pub breaker: BreakerArgs,
            /// Probe port, grace, logs.
            #[command(flatten)]
            pub service: ServiceArgs,
        }

        impl WriterArgs {
            /// The shell's settings for the writer of database `D`.
            pub fn settings<D: $crate::writers::Database>(
                &self,
            ) -> anyhow::Result<$crate::writers::WriterSettings> {
                Ok($crate::writers::WriterSettings {
                    consumer: $crate::writers::consumer::ConsumerSettings {
                        nodes: self.broker.nodes()?,
                        topology: self.broker.topology_for_writer(D::WRITER),
                        writer: D::WRITER,
                        partition: None,
                        prefetch: self.consumer.prefetch,
                        batch_max: self.consumer.batch_max,
                        linger: self.consumer.linger,
                        store_timeout: self.consumer.store_timeout,
                    },
                    breaker: (D::BREAKER, self.breaker.settings()),
                    http_addr: self.service.http_addr,
                    grace: self.service.grace,
                    progress_every: self.service.progress_every,
                    partitions: Vec::new(),
                })
            }

            /// Tests: a private AMQP prefix, a free loopback probe port, short breaker waits.
            pub fn prepare_for_tests(&mut self, amqp_prefix: &str) {
                self.broker = $crate::args::BrokerArgs::for_tests(amqp_prefix);
                self.service.http_addr = std::net::SocketAddr::from(([127, 0, 0, 1], 0));
                self.breaker.shorten_for_tests();
            }

            /// Checks the settings, naming the one at fault.
            pub fn validate(&self) -> Result<(), String> {
                self.broker.validate()?;
                self.consumer.validate()?;
                if self.consumer.store_timeout >= self.service.grace {
                    return Err(concat!(
                        "--store-timeout (",
                        $prefix,
                        "_STORE_TIMEOUT): must be shorter than --grace (",
                        $prefix,
                        "_GRACE), so a stuck store call cannot outlast a stop"
                    )
                    .into());
                }
                self.breaker.validate()
            }
        }
    };
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_token_comes_from_its_value_or_its_file_and_must_be_long_enough() {
        let none = TokenArgs::default();
        assert_eq!(none.resolve(), Ok(None));
        let short = TokenArgs {
            value: Some("short".parse().expect("secret")),
            file: None,
        };
        assert!(short.resolve().is_err());
        let empty = TokenArgs {
            value: Some("".parse().expect("secret")),
            file: None,
        };
        assert!(empty.resolve().is_err());
        let dir = tempfile::tempdir().expect("dir");
        let path = dir.path().join("token");
        std::fs::write(&path, "  a-token-of-enough-characters\n").expect("write");
        let from_file = TokenArgs {
            value: None,
            file: Some(path.clone()),
        };
        let token = from_file.resolve().expect("valid").expect("some");
        assert_eq!(token.expose(), "a-token-of-enough-characters");
        let both = TokenArgs {
            value: Some("a-token-of-enough-characters".parse().expect("secret")),
            file: Some(path),
        };
        assert!(both.resolve().is_err());
        let missing = TokenArgs {
            value: None,
            file: Some(dir.path().join("absent")),
        };
        assert!(missing.resolve().is_err_and(|e| e.contains("cannot read")));
    }
}
