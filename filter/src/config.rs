//! The filter's settings: every one a `--flag` with an environment variable.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;
use flowmesh_common::args::{BrokerArgs, TokenArgs};
use flowmesh_common::config::{Validate, parse_bytes, parse_duration};

flowmesh_common::service_args!("FILTER", "0.0.0.0:9102");
flowmesh_common::breaker_args!("FILTER", failures = 5, open_wait = "1s");

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

    /// PEM certificate chain: with `--tls-key`, the filter serves `wss://` only.
    #[arg(long, env = "FILTER_TLS_CERT", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,

    /// PEM private key of `--tls-cert`.
    #[arg(long, env = "FILTER_TLS_KEY", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,

    /// Bearer token clients must present on the WebSocket upgrade; none means no check (for a
    /// trusted network only).
    #[command(flatten)]
    pub token: TokenArgs,

    /// After SIGHUP brought a new token from --token-file, how long the one it replaced is
    /// still accepted for new connections (so generators can be switched one by one).
    #[arg(long, env = "FILTER_TOKEN_ROTATION_WINDOW", default_value = "10m", value_parser = parse_duration)]
    pub token_rotation_window: Duration,

    /// Largest WebSocket frame or message accepted (B, KiB, MiB); larger ones close the
    /// connection with code 1009.
    #[arg(long, env = "FILTER_MAX_FRAME_BYTES", default_value = "1MiB", value_parser = parse_bytes)]
    pub max_frame_bytes: u64,

    /// Records in one frame at most; a frame with more is rejected whole (one reject with
    /// `seq: null`, one dead-letter line).
    #[arg(long, env = "FILTER_MAX_BATCH", default_value_t = flowmesh_common::protocol::DEFAULT_MAX_BATCH)]
    pub max_batch: usize,

    /// Invalid records (or non-record frames) one connection may send; past that it is closed
    /// with code 1008.
    #[arg(long, env = "FILTER_MAX_INVALID", default_value_t = 10_000)]
    pub max_invalid: usize,

    /// Open WebSocket connections at most; more get HTTP 503 at the upgrade.
    #[arg(long, env = "FILTER_MAX_CONNECTIONS", default_value_t = 1024)]
    pub max_connections: usize,

    /// Open connections from one peer (an IPv4 address, an IPv6 /64) at most; more get HTTP
    /// 503 at the upgrade. Counted once the token was checked.
    #[arg(long, env = "FILTER_MAX_CONNECTIONS_PER_PEER", default_value_t = 64)]
    pub max_connections_per_peer: usize,

    /// TLS and WebSocket handshakes in progress at most (each may take 5 s); further TCP
    /// connections are closed at once.
    #[arg(long, env = "FILTER_MAX_HANDSHAKES", default_value_t = 256)]
    pub max_handshakes: usize,

    /// Handshakes in progress from one peer (an IPv4 address, an IPv6 /64) at most.
    #[arg(long, env = "FILTER_MAX_HANDSHAKES_PER_PEER", default_value_t = 16)]
    pub max_handshakes_per_peer: usize,

    /// Serve clients without a token on an address other hosts can reach. Without it, the
    /// filter refuses to start on a non-loopback `--listen` with no token set.
    #[arg(long, env = "FILTER_ALLOW_UNAUTHENTICATED")]
    pub allow_unauthenticated: bool,

    /// Longest a write to a client may take; a client that stops reading its answers is
    /// disconnected (1008).
    #[arg(long, env = "FILTER_WRITE_TIMEOUT", default_value = "10s", value_parser = parse_duration)]
    pub write_timeout: Duration,

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

    /// RabbitMQ.
    #[command(flatten)]
    pub broker: BrokerArgs,

    /// Published records awaiting RabbitMQ's confirm at most; more wait (backpressure).
    #[arg(long, env = "FILTER_MAX_UNCONFIRMED", default_value_t = 20_000)]
    pub max_unconfirmed: usize,

    /// Longest wait for RabbitMQ's confirm of a published message (and for the publish itself).
    /// Past it the records count as nacked: the generator sends them again, and the filter's
    /// de-duplication and the writers' idempotence absorb a copy RabbitMQ did keep. Bounds the
    /// wait through a cluster's leader election or a node that stopped answering.
    #[arg(long, env = "FILTER_CONFIRM_TIMEOUT", default_value = "10s", value_parser = parse_duration)]
    pub confirm_timeout: std::time::Duration,

    /// Records per RabbitMQ message at most. 1 (the default): every record is its own
    /// message. Above 1, a frame's consecutive broker-bound records travel packed, one JSON line
    /// each (docs/contracts.md §4), which divides RabbitMQ's per-message cost; both writers read
    /// either kind. At most 10000.
    #[arg(long, env = "FILTER_PUBLISH_PACK", default_value_t = 1)]
    pub publish_pack: usize,

    /// The routes file (TOML, docs/contracts.md §3), reloaded on SIGHUP and when it changes.
    /// Unset: the built-in routes (`value > 90` → RabbitMQ, the rest → the file).
    #[arg(long, env = "FILTER_ROUTES")]
    pub routes: Option<PathBuf>,

    /// Directory of the file sink (`records.jsonl`, its rotations, `dead-letter.jsonl`) and of
    /// `routes.log`.
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

    /// Cap on the dead-letter files together; when reached, invalid records are nacked (or,
    /// without a seq, rejected unrecorded), the dead-letter breaker opens and
    /// `flowmesh_filter_file_full{file="dead-letter"}` is 1 until old files are removed.
    #[arg(long, env = "FILTER_DEAD_LETTER_MAX_BYTES", default_value = "1GiB", value_parser = parse_bytes)]
    pub dead_letter_max_bytes: u64,

    /// Ids of the most recently written records remembered (and reloaded from the files at
    /// startup) so records re-sent after a crash or a lost ack are not written twice. Should
    /// exceed the sum of the generators' in-flight windows; 0 turns the check off.
    #[arg(long, env = "FILTER_DEDUPE_WINDOW", default_value_t = 100_000)]
    pub dedupe_window: usize,

    /// The sinks' breakers (also the `retry_after_ms` of nacks while open).
    #[command(flatten)]
    pub breaker: BreakerArgs,

    /// Probe port, grace, logs.
    #[command(flatten)]
    pub service: ServiceArgs,
}

impl FilterConfig {
    /// The TLS configuration when a certificate and key are configured.
    pub fn tls(
        &self,
    ) -> anyhow::Result<Option<std::sync::Arc<tokio_rustls::rustls::ServerConfig>>> {
        match (&self.tls_cert, &self.tls_key) {
            (Some(cert), Some(key)) => Ok(Some(flowmesh_common::tls::server_config(cert, key)?)),
            _ => Ok(None),
        }
    }
}

impl Validate for FilterConfig {
    fn validate(&self) -> Result<(), String> {
        if self.max_frame_bytes < 1024 {
            return Err("--max-frame-bytes (FILTER_MAX_FRAME_BYTES): must be at least 1KiB".into());
        }
        if self.max_connections == 0 || self.max_connections_per_peer == 0 {
            return Err("--max-connections and --max-connections-per-peer (FILTER_MAX_CONNECTIONS, FILTER_MAX_CONNECTIONS_PER_PEER): must be at least 1".into());
        }
        if self.max_handshakes == 0 || self.max_handshakes_per_peer == 0 {
            return Err("--max-handshakes and --max-handshakes-per-peer (FILTER_MAX_HANDSHAKES, FILTER_MAX_HANDSHAKES_PER_PEER): must be at least 1".into());
        }
        if self.write_timeout.is_zero() {
            return Err("--write-timeout (FILTER_WRITE_TIMEOUT): must be positive".into());
        }
        if self.max_batch == 0 {
            return Err("--max-batch (FILTER_MAX_BATCH): must be at least 1".into());
        }
        if self.max_in_flight == 0 {
            return Err("--max-in-flight (FILTER_MAX_IN_FLIGHT): must be at least 1".into());
        }
        if self.confirm_timeout.is_zero() {
            return Err("--confirm-timeout (FILTER_CONFIRM_TIMEOUT): must be above zero".into());
        }
        if self.max_unconfirmed == 0 {
            return Err("--max-unconfirmed (FILTER_MAX_UNCONFIRMED): must be at least 1".into());
        }
        if !(1..=flowmesh_common::message::MAX_PACKED).contains(&self.publish_pack) {
            return Err(format!(
                "--publish-pack (FILTER_PUBLISH_PACK): must be within 1 ..= {}",
                flowmesh_common::message::MAX_PACKED
            ));
        }
        if self.file_max_bytes < 1024 {
            return Err("--file-max-bytes (FILTER_FILE_MAX_BYTES): must be at least 1KiB".into());
        }
        if self.file_max_age < Duration::from_secs(1) {
            return Err("--file-max-age (FILTER_FILE_MAX_AGE): must be at least 1s".into());
        }
        if self.ping_interval.is_zero() || self.peer_timeout <= self.ping_interval {
            return Err(
                "--peer-timeout (FILTER_PEER_TIMEOUT): must be longer than --ping-interval".into(),
            );
        }
        let token = self.token.resolve()?;
        self.tls().map_err(|e| {
            format!("--tls-cert / --tls-key (FILTER_TLS_CERT, FILTER_TLS_KEY): {e:#}")
        })?;
        if let Some(path) = &self.routes {
            let text = std::fs::read_to_string(path).map_err(|e| {
                format!("--routes (FILTER_ROUTES): reading {}: {e}", path.display())
            })?;
            flowmesh_common::routing::Routes::parse(&text)
                .map_err(|e| format!("--routes (FILTER_ROUTES) {}: {e}", path.display()))?;
        }
        self.broker.validate()?;
        self.breaker.validate()?;
        // As Redis's protected mode: no token, no other host, unless said on purpose.
        if token.is_none() && !self.listen.ip().is_loopback() && !self.allow_unauthenticated {
            return Err(format!(
                "--listen (FILTER_LISTEN) {} can be reached from other hosts and no token is set: set --token-file (FILTER_TOKEN_FILE), listen on 127.0.0.1, or pass --allow-unauthenticated (FILTER_ALLOW_UNAUTHENTICATED=true) on a trusted network",
                self.listen
            ));
        }
        Ok(())
    }
}

impl FilterConfig {
    /// The defaults, with every address on a free loopback port: what tests start from.
    pub fn for_tests(data_dir: PathBuf, amqp_prefix: &str) -> Self {
        let mut config = Self::parse_from(["filter"]);
        config.listen = "127.0.0.1:0".parse().expect("literal address");
        config.service.http_addr = "127.0.0.1:0".parse().expect("literal address");
        config.data_dir = data_dir;
        config.broker = BrokerArgs::for_tests(amqp_prefix);
        config.breaker.shorten_for_tests();
        config
    }
}

flowmesh_common::service_config!(FilterConfig, service);

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> FilterConfig {
        FilterConfig::parse_from(std::iter::once("filter").chain(args.iter().copied()))
    }

    #[test]
    fn without_a_token_the_filter_serves_loopback_only_unless_told_otherwise() {
        let open = parse(&["--listen", "0.0.0.0:8080"]).validate();
        let error = open.expect_err("refused");
        assert!(
            error.contains("FILTER_LISTEN") && error.contains("--allow-unauthenticated"),
            "{error}"
        );
        assert!(parse(&["--listen", "[::]:8080"]).validate().is_err());
        assert!(
            parse(&["--listen", "0.0.0.0:8080", "--allow-unauthenticated"])
                .validate()
                .is_ok()
        );
        assert!(
            parse(&[
                "--listen",
                "0.0.0.0:8080",
                "--token",
                "a-token-of-enough-characters"
            ])
            .validate()
            .is_ok()
        );
        assert!(parse(&["--listen", "127.0.0.1:8080"]).validate().is_ok());
        assert!(parse(&["--listen", "[::1]:8080"]).validate().is_ok());
    }
}
