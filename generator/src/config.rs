//! The generator's settings: every one a `--flag` with an environment variable.

use std::str::FromStr;
use std::time::Duration;

use clap::Parser;
use flowmesh_common::args::TokenArgs;
use flowmesh_common::config::{Validate, parse_bytes, parse_duration};
use flowmesh_common::record::validate_source;

flowmesh_common::service_args!("GENERATOR", "0.0.0.0:9101");
flowmesh_common::breaker_args!("GENERATOR", failures = 3, open_wait = "2s");

/// How fast records are made.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Rate {
    /// This many records per second (fractions allowed: `0.5` is one every two seconds).
    PerSecond(f64),
    /// As fast as the in-flight window allows.
    Max,
}

impl FromStr for Rate {
    type Err = String;
    fn from_str(text: &str) -> Result<Self, Self::Err> {
        if text.eq_ignore_ascii_case("max") {
            return Ok(Self::Max);
        }
        match text.parse::<f64>() {
            Ok(rate) if rate.is_finite() && rate > 0.0 => Ok(Self::PerSecond(rate)),
            _ => Err(format!(
                "{text:?} is not a positive number of records per second or `max`"
            )),
        }
    }
}

/// The range record values are drawn from, uniformly: `LO-HI`, both inclusive, within 0–100.
/// `91-100` makes only broker-bound records and `0-90` only file-bound ones (under the default
/// routing), which isolates one hop of the filter for a benchmark.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Values {
    /// Smallest value made.
    pub low: u8,
    /// Largest value made.
    pub high: u8,
}

impl Values {
    /// Every value of the contract (0–100).
    pub const ALL: Self = Self { low: 0, high: 100 };
}

impl FromStr for Values {
    type Err = String;
    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let bad = || format!("{text:?} is not a range LO-HI with 0 <= LO <= HI <= 100");
        let (low, high) = text.split_once('-').ok_or_else(bad)?;
        let low: u8 = low.trim().parse().map_err(|_| bad())?;
        let high: u8 = high.trim().parse().map_err(|_| bad())?;
        if low > high || high > 100 {
            return Err(bad());
        }
        Ok(Self { low, high })
    }
}

/// flowmesh generator: makes records (timestamp, random value 0–100, MD5-derived hash) and
/// pushes them over WebSocket to the filter; nothing is forgotten until the filter acks it.
#[derive(Debug, Clone, Parser)]
#[command(name = "generator", version, about, long_about = None)]
pub struct GeneratorConfig {
    /// WebSocket URL of the filter's intake; several filters' URLs separated by commas. Of
    /// several, each source prefers one by rendezvous hashing (its home) and fails over to the
    /// next in its order (see GENERATOR_FAILOVER_AFTER).
    #[arg(long, env = "FILTER_URL", default_value = "ws://127.0.0.1:8080/ingest")]
    pub filter_url: String,

    /// With several filters: how long the generator keeps trying a filter it lost before it
    /// fails over to the next (a filter restarted within it has its dedupe window back, so
    /// waiting costs no duplicates).
    #[arg(long, env = "GENERATOR_FAILOVER_AFTER", default_value = "10s", value_parser = parse_duration)]
    pub failover_after: Duration,

    /// With several filters: while away from its own filter, how often the generator checks
    /// whether it answers again (and then returns to it).
    #[arg(long, env = "GENERATOR_HOME_CHECK", default_value = "5s", value_parser = parse_duration)]
    pub home_check: Duration,

    /// PEM file of CA certificates to trust for a `wss://` filter, besides the system's roots.
    #[arg(long, env = "FILTER_CA_FILE")]
    pub ca_file: Option<std::path::PathBuf>,

    /// Bearer token sent on the WebSocket upgrade.
    #[command(flatten)]
    pub token: TokenArgs,

    /// Records per second (e.g. `5`, `0.5`, `20000`) or `max`.
    #[arg(long, env = "GENERATOR_RATE", default_value = "5")]
    pub rate: Rate,

    /// Range of the values made, `LO-HI` (inclusive, within 0–100). The default is every
    /// value; a narrower range sends traffic to one destination only (e.g. `91-100`).
    #[arg(long, env = "GENERATOR_VALUES", default_value = "0-100")]
    pub values: Values,

    /// Stop after the record with this seq (with a spool, a restarted run continues toward the
    /// same total), wait until every one is acked, and exit 0.
    #[arg(long, env = "GENERATOR_COUNT")]
    pub count: Option<u64>,

    /// Seed of the value sequence: the same seed gives the same values.
    #[arg(long, env = "GENERATOR_SEED")]
    pub seed: Option<u64>,

    /// Name of this generator instance in every record (`[A-Za-z0-9._-]`, 1–64 chars). Default:
    /// `gen-` and 8 random hex chars, so two runs never share a `seq` sequence.
    #[arg(long, env = "GENERATOR_SOURCE")]
    pub source: Option<String>,

    /// Directory of the crash-safe spool. When set, every record is logged before it is sent,
    /// and a restart (even after `kill -9`) re-sends what was never acked and continues the
    /// `seq` sequence of the same source.
    #[arg(long, env = "GENERATOR_SPOOL_DIR")]
    pub spool_dir: Option<std::path::PathBuf>,

    /// Generated records not yet acked at most; when full, generation pauses.
    #[arg(long, env = "GENERATOR_WINDOW", default_value_t = 10_000)]
    pub window: usize,

    /// Records per WebSocket frame at most (frames fill up only when records queue up).
    #[arg(long, env = "GENERATOR_BATCH_MAX", default_value_t = 500)]
    pub batch_max: usize,

    /// Largest frame sent; must not exceed the filter's limit.
    #[arg(long, env = "GENERATOR_MAX_FRAME_BYTES", default_value = "1MiB", value_parser = parse_bytes)]
    pub max_frame_bytes: u64,

    /// How often the generator pings the filter.
    #[arg(long, env = "GENERATOR_PING_INTERVAL", default_value = "10s", value_parser = parse_duration)]
    pub ping_interval: Duration,

    /// A filter silent for this long is considered dead; the generator reconnects.
    #[arg(long, env = "GENERATOR_PEER_TIMEOUT", default_value = "30s", value_parser = parse_duration)]
    pub peer_timeout: Duration,

    /// The filter link's breaker (opened by consecutive failed connection attempts).
    #[command(flatten)]
    pub breaker: BreakerArgs,

    /// Probe port, grace (for in-flight records to be acked), logs.
    #[command(flatten)]
    pub service: ServiceArgs,
}

impl GeneratorConfig {
    /// The defaults with a loopback HTTP port 0, pointed at `filter_url`: what tests start from.
    pub fn for_tests(filter_url: &str) -> Self {
        let mut config = Self::parse_from(["generator"]);
        config.filter_url = filter_url.to_owned();
        config.service.http_addr = "127.0.0.1:0".parse().expect("literal address");
        config.breaker.shorten_for_tests();
        config
    }
}

impl GeneratorConfig {
    /// The filter URLs of `FILTER_URL`, in the order given (blanks around commas ignored).
    pub fn filter_urls(&self) -> Vec<String> {
        self.filter_url
            .split(',')
            .map(str::trim)
            .filter(|url| !url.is_empty())
            .map(str::to_owned)
            .collect()
    }

    /// TLS for `wss://` filter URLs (none when every one is `ws://`).
    pub fn tls(&self) -> anyhow::Result<Option<std::sync::Arc<rustls::ClientConfig>>> {
        if self
            .filter_urls()
            .iter()
            .any(|url| url.starts_with("wss://"))
        {
            Ok(Some(flowmesh_common::tls::client_config(
                self.ca_file.as_deref(),
            )?))
        } else {
            Ok(None)
        }
    }
}

impl Validate for GeneratorConfig {
    fn validate(&self) -> Result<(), String> {
        for url in self.filter_urls() {
            if !url.starts_with("ws://") && !url.starts_with("wss://") {
                return Err(format!(
                    "--filter-url (FILTER_URL): {url:?} must start with ws:// or wss:// (several URLs are separated by commas)"
                ));
            }
        }
        if self.filter_urls().is_empty() {
            return Err("--filter-url (FILTER_URL): no URL given".into());
        }
        if let Some(source) = &self.source {
            validate_source(source).map_err(|e| format!("--source (GENERATOR_SOURCE): {e}"))?;
        }
        if self.count == Some(0) {
            return Err("--count (GENERATOR_COUNT): must be at least 1".into());
        }
        if self.window == 0 {
            return Err("--window (GENERATOR_WINDOW): must be at least 1".into());
        }
        if self.batch_max == 0 {
            return Err("--batch-max (GENERATOR_BATCH_MAX): must be at least 1".into());
        }
        if self.max_frame_bytes < 1024 {
            return Err(
                "--max-frame-bytes (GENERATOR_MAX_FRAME_BYTES): must be at least 1KiB".into(),
            );
        }
        if self.ping_interval.is_zero() || self.peer_timeout <= self.ping_interval {
            return Err(
                "--peer-timeout (GENERATOR_PEER_TIMEOUT): must be longer than --ping-interval"
                    .into(),
            );
        }
        self.token.resolve()?;
        self.tls()
            .map_err(|e| format!("--ca-file (FILTER_CA_FILE): {e:#}"))?;
        self.breaker.validate()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use flowmesh_common::config::parse_from;

    #[test]
    fn rates_are_positive_numbers_or_max() {
        assert_eq!("max".parse::<Rate>(), Ok(Rate::Max));
        assert_eq!("0.5".parse::<Rate>(), Ok(Rate::PerSecond(0.5)));
        assert!("0".parse::<Rate>().is_err());
        assert!("-3".parse::<Rate>().is_err());
        assert!("fast".parse::<Rate>().is_err());
    }

    #[test]
    fn value_ranges_are_inclusive_and_within_the_contract() {
        assert_eq!("0-100".parse::<Values>(), Ok(Values::ALL));
        assert_eq!(
            "91-100".parse::<Values>(),
            Ok(Values { low: 91, high: 100 })
        );
        assert_eq!("7-7".parse::<Values>(), Ok(Values { low: 7, high: 7 }));
        for bad in ["", "5", "9-3", "0-101", "-1-5", "a-b", "0-100-2"] {
            assert!(bad.parse::<Values>().is_err(), "{bad:?}");
        }
    }

    #[test]
    fn bad_configuration_exits_with_code_two() {
        let bad = [
            vec!["generator", "--rate", "fast"],
            vec!["generator", "--source", "has space"],
            vec!["generator", "--filter-url", "http://x"],
            vec!["generator", "--count", "0"],
            vec!["generator", "--window", "0"],
            vec!["generator", "--values", "50-20"],
        ];
        for args in bad {
            let code = parse_from::<GeneratorConfig, _, _>(args.clone()).expect_err("bad config");
            assert_eq!(code, std::process::ExitCode::from(2), "{args:?}");
        }
        assert!(
            parse_from::<GeneratorConfig, _, _>(["generator", "--rate", "max", "--count", "10"])
                .is_ok()
        );
    }
}

flowmesh_common::service_config!(GeneratorConfig, service);
