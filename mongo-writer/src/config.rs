//! mongo-writer's settings: every one a `--flag` with an environment variable.

use clap::Parser;
use flowmesh_common::config::{SecretUrl, Validate, require_scheme};

use crate::nesting::MAX_NEST_LIMIT;

flowmesh_common::writer_args!("MONGO_WRITER", "0.0.0.0:9104");

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
    pub mongodb_url: SecretUrl,

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
    #[arg(long, env = "MONGO_WRITER_MAX_NEST", default_value_t = crate::nesting::DEFAULT_MAX_NEST)]
    pub max_nest: usize,

    /// The partitions of the queue (contracts §4 "Partitions") this writer consumes: `all`, or
    /// their numbers separated by commas (`0,2`). Each has a single active consumer, so
    /// writers given the same partition stand by for each other.
    #[arg(long, env = "MONGO_WRITER_PARTITIONS", default_value = "all")]
    pub partitions: String,

    /// RabbitMQ, queue reading, the database breaker, probe port and grace.
    #[command(flatten)]
    pub writer: WriterArgs,
}

impl MongoWriterConfig {
    /// The defaults with a loopback HTTP port 0 and a private prefix: what tests start from.
    pub fn for_tests(amqp_prefix: &str) -> Self {
        let mut config = Self::parse_from(["mongo-writer"]);
        config.writer.prepare_for_tests(amqp_prefix);
        config
    }
}

impl Validate for MongoWriterConfig {
    fn validate(&self) -> Result<(), String> {
        require_scheme(
            "--mongodb-url (MONGODB_URL)",
            self.mongodb_url.expose(),
            &["mongodb://", "mongodb+srv://"],
        )?;
        if self.max_nest == 0 || self.max_nest > MAX_NEST_LIMIT {
            return Err(format!(
                "--max-nest (MONGO_WRITER_MAX_NEST): must be between 1 and {MAX_NEST_LIMIT} (a group must stay far below MongoDB's 16 MiB document limit)"
            ));
        }
        self.consumed_partitions()?;
        self.writer.validate()
    }
}

impl MongoWriterConfig {
    /// The partitions this writer consumes, from `--partitions` and `MONGO_PARTITIONS`.
    pub fn consumed_partitions(&self) -> Result<Vec<u16>, String> {
        let count = self.writer.broker.mongo_partitions;
        if self.partitions.trim() == "all" {
            return Ok((0..count).collect());
        }
        let mut given = Vec::new();
        for part in self.partitions.split(',').map(str::trim) {
            match part.parse::<u16>() {
                Ok(index) if index < count => {
                    if !given.contains(&index) {
                        given.push(index);
                    }
                }
                _ => {
                    return Err(format!(
                        "--partitions (MONGO_WRITER_PARTITIONS): {part:?} is not a partition: give `all` or numbers from 0 to {} (MONGO_PARTITIONS is {count})",
                        count - 1
                    ));
                }
            }
        }
        if given.is_empty() {
            return Err(
                "--partitions (MONGO_WRITER_PARTITIONS): give `all` or at least one partition"
                    .into(),
            );
        }
        given.sort_unstable();
        Ok(given)
    }
}

flowmesh_common::service_config!(MongoWriterConfig, writer.service);
