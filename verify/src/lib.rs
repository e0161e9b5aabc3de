//! `verify`: proves, for one run, that every record of a `source` is stored exactly once and in
//! the right place — where the routes version recorded for it (`flowmesh_common::routing`, the
//! versions the filter logged in `routes.log`) sends it: the file sink, or PostgreSQL and MongoDB
//! — with matching hashes and MongoDB groups that follow the nesting rule.

pub mod dead_letters;
pub mod reconcile;

use std::path::{Path, PathBuf};

use anyhow::Context;
use clap::Parser;
use flowmesh_common::config::Validate;
use flowmesh_common::record::Provenance;
use flowmesh_common::record::Record;
use flowmesh_common::routing::Routes;
use futures_util::TryStreamExt;
use mongodb::bson::doc;

pub use reconcile::{Held, Observed, Report, Rules, reconcile};

/// flowmesh verify: reconciles the file sink, PostgreSQL and MongoDB for one source and exits 0
/// only when every record is stored exactly once in the right place.
#[derive(Debug, Clone, Parser)]
#[command(name = "verify", version, about, long_about = None)]
pub struct VerifyConfig {
    /// The `source` to check (the generator's `--source`).
    #[arg(long, env = "VERIFY_SOURCE")]
    pub source: String,

    /// How many records the source generated (seqs 1..=N); default: the highest seq found.
    #[arg(long, env = "VERIFY_EXPECTED")]
    pub expected: Option<u64>,

    /// The filter's data directory (holding `records*.jsonl`); with several filters, each
    /// one's, separated by commas. A record in two of them (a generator's failover re-sent it)
    /// is reported apart, not as a fault; twice in one is a fault.
    #[arg(
        long = "data-dir",
        env = "FILTER_DATA_DIR",
        default_value = "var/filter",
        value_delimiter = ','
    )]
    pub data_dirs: Vec<PathBuf>,

    /// PostgreSQL.
    #[command(flatten)]
    pub postgres: flowmesh_pg_writer::config::PostgresArgs,

    /// MongoDB URL. Unset: the local server is checked when it answers, and skipped (the
    /// report says so) when it does not; empty: MongoDB is skipped.
    #[arg(long, env = "MONGODB_URL", hide_env_values = true)]
    pub mongodb_url: Option<flowmesh_common::config::SecretUrl>,

    /// MongoDB database.
    #[arg(long, env = "MONGODB_DATABASE", default_value = "flowmesh")]
    pub mongodb_database: String,

    /// MongoDB collection.
    #[arg(long, env = "MONGODB_COLLECTION", default_value = "records")]
    pub mongodb_collection: String,

    /// Print one JSON object instead of the table (for scripts such as the chaos suite).
    #[arg(long)]
    pub json: bool,

    /// The writer's `max_nest`, for the group checks.
    #[arg(long, env = "MONGO_WRITER_MAX_NEST", default_value_t = flowmesh_mongo_writer::nesting::DEFAULT_MAX_NEST)]
    pub max_nest: usize,
}

impl Validate for VerifyConfig {
    fn validate(&self) -> Result<(), String> {
        flowmesh_common::record::validate_source(&self.source)
            .map_err(|e| format!("--source (VERIFY_SOURCE): {e}"))?;
        self.postgres.validate()?;
        if self.max_nest == 0 {
            return Err("--max-nest (MONGO_WRITER_MAX_NEST): must be at least 1".into());
        }
        Ok(())
    }
}

/// Where MongoDB is looked for when `MONGODB_URL` is not set.
const LOCAL_MONGODB: &str = "mongodb://127.0.0.1:27017";

/// Reads what every store holds for the source: the file sink, then each writer's store of
/// the one list (`flowmesh_common::services`).
pub async fn observe(config: &VerifyConfig) -> anyhow::Result<Observed> {
    let mut observed = Observed::default();
    for (instance, dir) in config.data_dirs.iter().enumerate() {
        let records = read_file_sink(config, dir)?;
        observed
            .file_instance
            .extend(std::iter::repeat_n(instance, records.len()));
        observed.file.extend(records);
    }
    for (store, held) in &mut observed.stores {
        *held = read_store(config, store).await?;
    }
    Ok(observed)
}

/// What the store called `store` holds for the source (`None`: not checked). Each writer's
/// store has its reader here.
async fn read_store(config: &VerifyConfig, store: &str) -> anyhow::Result<Option<Held>> {
    match store {
        "postgresql" => Ok(Some(Held::Records(read_postgres(config).await?))),
        "mongodb" => Ok(match config.mongodb_url.as_ref().map(|url| url.expose()) {
            Some("") => None,
            Some(url) => Some(Held::Groups(read_mongo(config, url).await?)),
            None => match read_mongo(config, LOCAL_MONGODB).await {
                Ok(groups) => Some(Held::Groups(groups)),
                Err(err) => {
                    eprintln!(
                        "verify: no MongoDB answers at {LOCAL_MONGODB} ({err:#}); skipping it"
                    );
                    None
                }
            },
        }),
        other => anyhow::bail!("verify has no reader for the store {other}"),
    }
}

fn read_file_sink(config: &VerifyConfig, data_dir: &Path) -> anyhow::Result<Vec<Record>> {
    let mut records = Vec::new();
    let files = match flowmesh_filter::file_sink::sink_files(data_dir, "records") {
        Ok(files) => files,
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => Vec::new(),
        Err(err) => {
            return Err(err).with_context(|| format!("listing {}", data_dir.display()));
        }
    };
    for path in files {
        let version = flowmesh_filter::file_sink::file_version(data_dir, "records", &path)
            .with_context(|| format!("reading the routes version of {}", path.display()))?
            .unwrap_or_else(Routes::builtin_version);
        let text = std::fs::read_to_string(&path)
            .with_context(|| format!("reading {}", path.display()))?;
        for (n, line) in text.lines().enumerate() {
            // A line that is not a record is reported, not skipped.
            let mut record: Record = serde_json::from_str(line)
                .with_context(|| format!("{} line {} is not a record", path.display(), n + 1))?;
            if record.source == config.source {
                record.provenance = Some(Provenance {
                    version: version.clone(),
                    route: None,
                });
                records.push(record);
            }
        }
    }
    Ok(records)
}

async fn read_postgres(config: &VerifyConfig) -> anyhow::Result<Vec<Record>> {
    let pool = sqlx::PgPool::connect(config.postgres.database_url.expose())
        .await
        .context("connecting to PostgreSQL")?;
    let records = flowmesh_pg_writer::store::records_of(&pool, &config.source).await;
    pool.close().await;
    records
}

async fn read_mongo(
    config: &VerifyConfig,
    url: &str,
) -> anyhow::Result<Vec<(flowmesh_mongo_writer::nesting::GroupDoc, i64)>> {
    let client = flowmesh_mongo_writer::mongo::client(url).await?;
    let collection = client
        .database(&config.mongodb_database)
        .collection::<mongodb::bson::Document>(&config.mongodb_collection);
    let mut cursor = collection
        .find(doc! {"source": &config.source})
        .await
        .context("reading MongoDB groups")?;
    let mut groups = Vec::new();
    while let Some(doc) = cursor.try_next().await.context("reading MongoDB groups")? {
        groups.push(flowmesh_mongo_writer::mongo::from_document(&doc)?);
    }
    Ok(groups)
}

/// Runs a whole verification: observe, reconcile, and the report.
pub async fn verify(config: &VerifyConfig) -> anyhow::Result<Report> {
    let observed = observe(config).await?;
    let mut versions = std::collections::HashMap::new();
    for dir in &config.data_dirs {
        versions.extend(flowmesh_filter::live_routes::applied_versions(dir)?);
    }
    let rules = Rules {
        max_nest: config.max_nest,
        ..Rules::with_routes(versions.into_values())
    };
    Ok(reconcile(&config.source, config.expected, &observed, rules))
}
