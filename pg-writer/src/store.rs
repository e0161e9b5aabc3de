//! The PostgreSQL side: embedded migrations, one set-based, idempotent INSERT per batch, and
//! the read-back `verify` uses.

use std::str::FromStr;
use std::time::Duration;

use anyhow::Context;
use flowmesh_common::record::Provenance;
use flowmesh_common::record::{Record, format_timestamp, parse_timestamp};
use flowmesh_common::writers::consumer::{
    Contended, Misconfigured, Permanent, RecordStore, StoreReport,
};
use flowmesh_common::writers::traced::StoreTarget;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{PgPool, Row};

/// The migrations in `pg-writer/migrations`, compiled into the binary.
pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations");

/// One statement for the whole batch: arrays in, `on conflict do nothing` for redeliveries.
/// `unnest` yields the arrays in order, so the rows are inserted (and their index entries
/// locked) in the order [`Columns::of`] gives them: by id.
const INSERT: &str = "
    insert into records (id, source, seq, ts, value, hash, route, routes_version)
    select * from unnest($1::uuid[], $2::text[], $3::int8[], $4::timestamptz[], $5::int2[], $6::text[], $7::text[], $8::text[])
    on conflict (id) do nothing";

/// A batch as the INSERT's eight arrays, one per column, sorted by id: the statement takes the
/// whole batch in one round trip.
///
/// **One lock order for every writer.** An insert locks each row's key as it goes, and a row
/// another open transaction inserted makes it wait for that one. Two pg-writers consuming one
/// queue get overlapping batches (a redelivery of what the other holds, a record the generator
/// sent twice); were each batch inserted in arrival order, one could hold `a` and wait for `b`
/// while the other holds `b` and waits for `a`, and PostgreSQL would abort one of them. Sorted
/// by id, every batch takes its locks in the same order, so waits never form a cycle.
pub struct Columns<'a> {
    ids: Vec<uuid::Uuid>,
    sources: Vec<&'a str>,
    seqs: Vec<i64>,
    times: Vec<chrono::DateTime<chrono::Utc>>,
    values: Vec<i16>,
    hashes: Vec<&'a str>,
    routes: Vec<Option<&'a str>>,
    versions: Vec<Option<&'a str>>,
}

impl<'a> Columns<'a> {
    /// The columns of `records`. Validation upstream guarantees every field converts; a failure
    /// here is a bug, not bad input.
    pub fn of(records: &'a [Record]) -> anyhow::Result<Self> {
        let mut columns = Self {
            ids: Vec::with_capacity(records.len()),
            sources: Vec::with_capacity(records.len()),
            seqs: Vec::with_capacity(records.len()),
            times: Vec::with_capacity(records.len()),
            values: Vec::with_capacity(records.len()),
            hashes: Vec::with_capacity(records.len()),
            routes: Vec::with_capacity(records.len()),
            versions: Vec::with_capacity(records.len()),
        };
        let mut sorted = records
            .iter()
            .map(|record| {
                Ok((
                    uuid::Uuid::parse_str(&record.id).context("record id")?,
                    record,
                ))
            })
            .collect::<anyhow::Result<Vec<_>>>()?;
        sorted.sort_unstable_by_key(|(id, _)| *id);
        for (id, record) in sorted {
            columns.ids.push(id);
            columns.sources.push(&record.source);
            columns
                .seqs
                .push(i64::try_from(record.seq).context("record seq")?);
            columns
                .times
                .push(parse_timestamp(&record.timestamp).context("record timestamp")?);
            columns.values.push(i16::from(record.value));
            columns.hashes.push(&record.hash);
            let provenance = record.provenance.as_ref();
            columns
                .routes
                .push(provenance.and_then(|p| p.route.as_deref()));
            columns
                .versions
                .push(provenance.map(|p| p.version.as_str()));
        }
        Ok(columns)
    }

    /// `query` (whose `$1`…`$8` are id, source, seq, ts, value, hash, route and routes version
    /// arrays) with the columns bound.
    pub fn bind(
        self,
        query: sqlx::query::Query<'a, sqlx::Postgres, sqlx::postgres::PgArguments>,
    ) -> sqlx::query::Query<'a, sqlx::Postgres, sqlx::postgres::PgArguments> {
        query
            .bind(self.ids)
            .bind(self.sources)
            .bind(self.seqs)
            .bind(self.times)
            .bind(self.values)
            .bind(self.hashes)
            .bind(self.routes)
            .bind(self.versions)
    }
}

/// Reads back every stored record of `source` (for `verify`), `ts` formatted as the record's
/// timestamp. No table yet means nothing was ever written: an empty list.
pub async fn records_of(pool: &PgPool, source: &str) -> anyhow::Result<Vec<Record>> {
    let rows =
        sqlx::query("select id::text as id, seq, ts, value, hash, route, routes_version from records where source = $1")
            .bind(source)
            .fetch_all(pool)
            .await;
    let rows = match rows {
        Ok(rows) => rows,
        Err(sqlx::Error::Database(err)) if err.code().as_deref() == Some("42P01") => Vec::new(),
        Err(err) => return Err(err).context("reading the records table"),
    };
    rows.iter()
        .map(|row| {
            let ts: chrono::DateTime<chrono::Utc> = row.try_get("ts")?;
            let value: i16 = row.try_get("value")?;
            let seq: i64 = row.try_get("seq")?;
            let route: Option<String> = row.try_get("route")?;
            let version: Option<String> = row.try_get("routes_version")?;
            Ok(Record {
                id: row.try_get("id")?,
                source: source.to_owned(),
                seq: u64::try_from(seq).unwrap_or_default(),
                timestamp: format_timestamp(ts),
                value: u8::try_from(value).unwrap_or(u8::MAX),
                hash: row.try_get("hash")?,
                traceparent: None,
                provenance: version.map(|version| Provenance { version, route }),
            })
        })
        .collect()
}

/// A lazily connecting pool: the writer starts (and reports not ready) while PostgreSQL is down.
///
/// `deadline` is the writer's store deadline. PostgreSQL is told to give up on a statement a
/// little before it (`statement_timeout`), so a lock that is never released ends in a clean
/// error on a connection that stays usable; a wait for a free connection is shorter still.
pub fn pool(url: &str, size: u32, deadline: Duration) -> anyhow::Result<PgPool> {
    let statement_timeout = deadline.mul_f64(0.8).as_millis().max(1);
    let options = PgConnectOptions::from_str(url)
        .context("parsing DATABASE_URL")?
        .options([("statement_timeout", statement_timeout.to_string())]);
    Ok(PgPoolOptions::new()
        .max_connections(size)
        .acquire_timeout(deadline.mul_f64(0.5).min(Duration::from_secs(5)))
        .connect_lazy_with(options))
}

/// SQLSTATEs that blame the writer's configuration, not a record: insufficient_privilege,
/// invalid_catalog_name (no such database), invalid_password, invalid_authorization_specification.
const MISCONFIGURED_STATES: &[&str] = &["42501", "3D000", "28P01", "28000"];

/// SQLSTATEs by which PostgreSQL aborts a transaction to settle a conflict with another one:
/// serialization_failure and deadlock_detected.
const CONTENDED_STATES: &[&str] = &["40001", "40P01"];

/// A transaction aborted to settle a conflict with another writer is [`Contended`] (retried at
/// once, not a failure of the database); a configuration PostgreSQL refuses is [`Misconfigured`] (retried, nothing dead-lettered, one
/// error line); data PostgreSQL refuses for good (SQLSTATE class 22, data exception, or 23,
/// integrity constraint violation, such as a check constraint someone added) is [`Permanent`]:
/// the consumer splits the batch and dead-letters only the rows at fault. Anything else stays an
/// ordinary failure, retried through the breaker.
fn classify(err: sqlx::Error, what: &str) -> anyhow::Error {
    let state = match &err {
        sqlx::Error::Database(db) => db.code().map(|code| code.into_owned()),
        _ => None,
    };
    match state {
        Some(state) if CONTENDED_STATES.contains(&state.as_str()) => anyhow::Error::new(Contended(
            format!("{what}: PostgreSQL error {state}: {err}"),
        )),
        Some(state) if MISCONFIGURED_STATES.contains(&state.as_str()) => anyhow::Error::new(
            Misconfigured(format!("{what}: PostgreSQL error {state}: {err}")),
        ),
        Some(state) if state.starts_with("22") || state.starts_with("23") => anyhow::Error::new(
            Permanent(format!("{what}: PostgreSQL error {state}: {err}")),
        ),
        _ => anyhow::Error::new(err).context(what.to_owned()),
    }
}

/// Runs the embedded migrations (idempotent).
pub async fn migrate(pool: &PgPool) -> anyhow::Result<()> {
    match MIGRATOR.run(pool).await {
        Ok(()) => Ok(()),
        Err(sqlx::migrate::MigrateError::Execute(err)) => Err(classify(err, "running migrations")),
        Err(err) => Err(anyhow::Error::new(err).context("running migrations")),
    }
}

/// Stores records in the `records` table.
#[derive(Debug, Clone)]
pub struct PgStore {
    pool: PgPool,
    migrated: bool,
    /// How long one insert may wait for PostgreSQL's answer on its connection.
    deadline: Duration,
}

impl PgStore {
    /// A store over `pool` whose inserts give up after `deadline`; migrations run before the
    /// first batch.
    pub fn new(pool: PgPool, deadline: Duration) -> Self {
        Self {
            pool,
            migrated: false,
            deadline,
        }
    }
}

impl RecordStore for PgStore {
    fn target(&self) -> StoreTarget {
        StoreTarget {
            system: "postgresql",
            operation: "INSERT",
            collection: "records".to_owned(),
        }
    }

    async fn store(&mut self, records: &[Record]) -> anyhow::Result<StoreReport> {
        if !self.migrated {
            migrate(&self.pool).await?;
            self.migrated = true;
        }
        let columns = Columns::of(records)?;
        let mut connection = self
            .pool
            .acquire()
            .await
            .map_err(|e| classify(e, "taking a connection"))?;
        let insert = columns.bind(sqlx::query(INSERT)).execute(&mut *connection);
        let result = match tokio::time::timeout(self.deadline, insert).await {
            Ok(result) => result.map_err(|e| classify(e, "inserting a batch"))?,
            Err(_) => {
                // No answer at all (a frozen server, a dead link): this connection is closed
                // rather than returned, where testing it would wait for the answer too.
                connection.close_on_drop();
                anyhow::bail!(
                    "inserting a batch: PostgreSQL did not answer within {} ms",
                    self.deadline.as_millis()
                );
            }
        };
        let stored = result.rows_affected();
        Ok(StoreReport {
            stored,
            duplicates: records.len() as u64 - stored,
        })
    }
}
