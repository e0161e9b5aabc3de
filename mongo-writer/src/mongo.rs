//! The MongoDB implementation of [`GroupStore`] through the official driver.
//!
//! Documents: `{_id, source, nested, records, count, first_seq, last_seq, wseq, created_at,
//! updated_at}` in database `flowmesh`, collection `records`, written with `j: true`. An
//! append is a compare-and-set on the group's count and write sequence, and what the unique
//! indexes or the compare-and-set refuse is a [`Conflict`] (the batch is planned again). Errors
//! the MongoDB manual names as permanent for a document (validation, a document too large) are
//! [`Permanent`], so the record is dead-lettered instead of retried forever; errors that blame
//! the configuration (authorization, an index conflict) are [`Misconfigured`]: retried, nothing
//! dead-lettered.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use futures_util::TryStreamExt;
use mongodb::action::Action as _;
use mongodb::bson::{self, Bson, Document, doc};
use mongodb::error::{ErrorKind, WriteFailure};
use mongodb::options::{ClientOptions, IndexOptions, WriteConcern};
use mongodb::{Client, Collection, IndexModel};
use tokio::sync::OnceCell;

use crate::nesting::{Append, GroupDoc, Op, OpenGroup};
use crate::store::{Conflict, GroupStore};
use flowmesh_common::record::Record;
use flowmesh_common::writers::consumer::{Misconfigured, Permanent};

/// Default database.
pub const DEFAULT_DATABASE: &str = "flowmesh";
/// Default collection.
pub const DEFAULT_COLLECTION: &str = "records";

/// Groups in a MongoDB collection.
#[derive(Debug, Clone)]
pub struct MongoStore {
    /// The client's database and collection, once the URL could be resolved.
    handle: Arc<OnceCell<Handle>>,
    /// What to connect to when `handle` is still empty (a `mongodb+srv://` URL whose DNS did
    /// not answer at startup): URL, database, collection.
    target: Arc<(String, String, String)>,
    indexed: bool,
    /// `maxTimeMS` of every read and `wtimeout` of every write: the server gives up on a read
    /// slower than this, and answers a write whose write concern it cannot meet in time with
    /// an error rather than waiting (a little under the writer's store deadline, which bounds
    /// every call from outside as well).
    read_deadline: Option<Duration>,
}

#[derive(Debug)]
struct Handle {
    database: mongodb::Database,
    collection: Collection<Document>,
}

impl Handle {
    fn new(client: &Client, database: &str, collection: &str) -> Self {
        Self::on(client.database(database), collection, None)
    }

    /// `collection` of `database`, its writes acknowledged once in the journal (an ack to
    /// RabbitMQ follows a durable write), waiting for that at most `deadline` (`wtimeout`).
    /// The URL's `w` is kept: `w=majority` on a replica set waits for a majority's journals.
    fn on(database: mongodb::Database, collection: &str, deadline: Option<Duration>) -> Self {
        let w = database.write_concern().and_then(|c| c.w.clone());
        let concern = WriteConcern::builder()
            .w(w)
            .journal(true)
            .w_timeout(deadline)
            .build();
        let durable = mongodb::options::CollectionOptions::builder()
            .write_concern(concern)
            .build();
        Self {
            collection: database.collection_with_options(collection, durable),
            database,
        }
    }
}

/// A client that fails fast (5 s server selection) instead of hanging while MongoDB is away.
pub async fn client(url: &str) -> anyhow::Result<Client> {
    let mut options = ClientOptions::parse(url)
        .await
        .context("parsing MONGODB_URL")?;
    // An `appName` in the URL wins (tests aim failpoints at one client with it).
    if options.app_name.is_none() {
        options.app_name = Some("flowmesh-mongo-writer".into());
    }
    options.server_selection_timeout = Some(Duration::from_secs(5));
    options.connect_timeout = Some(Duration::from_secs(5));
    Client::with_options(options).context("creating the MongoDB client")
}

impl MongoStore {
    /// A store over `database.collection` of `client`.
    pub fn new(client: &Client, database: &str, collection: &str) -> Self {
        Self {
            handle: Arc::new(OnceCell::new_with(Some(Handle::new(
                client, database, collection,
            )))),
            target: Arc::new((String::new(), database.into(), collection.into())),
            indexed: false,
            read_deadline: None,
        }
    }

    /// A store over `database.collection` at `url`. A `mongodb+srv://` URL whose DNS does not
    /// answer yet is resolved again on each use, so the writer runs (not ready) until it does;
    /// any other URL that does not parse is an error now.
    pub async fn connect(url: &str, database: &str, collection: &str) -> anyhow::Result<Self> {
        match client(url).await {
            Ok(client) => Ok(Self::new(&client, database, collection)),
            Err(err) if url.starts_with("mongodb+srv://") => {
                tracing::warn!(url = %flowmesh_common::telemetry::redact_url(url), error = format!("{err:#}"), "cannot resolve MongoDB yet; will retry");
                Ok(Self {
                    handle: Arc::new(OnceCell::new()),
                    target: Arc::new((url.into(), database.into(), collection.into())),
                    indexed: false,
                    read_deadline: None,
                })
            }
            Err(err) => Err(err),
        }
    }

    async fn handle(&self) -> anyhow::Result<&Handle> {
        self.handle
            .get_or_try_init(|| async {
                let (url, database, collection) = &*self.target;
                let database = client(url).await?.database(database);
                Ok(Handle::on(database, collection, self.read_deadline))
            })
            .await
    }

    async fn coll(&self) -> anyhow::Result<&Collection<Document>> {
        Ok(&self.handle().await?.collection)
    }

    /// This store with every call bounded on the server by `deadline`: `maxTimeMS` on reads,
    /// `wtimeout` on the write concern of writes.
    pub fn with_deadline(mut self, deadline: Duration) -> Self {
        self.read_deadline = Some(deadline);
        if let Some(handle) = self.handle.get() {
            let (_, _, collection) = &*self.target;
            let handle = Handle::on(handle.database.clone(), collection, Some(deadline));
            self.handle = Arc::new(OnceCell::new_with(Some(handle)));
        }
        self
    }

    /// The write concern of this store's writes.
    pub async fn write_concern(&self) -> anyhow::Result<Option<WriteConcern>> {
        Ok(self.coll().await?.write_concern().cloned())
    }

    /// True when MongoDB answers a ping now.
    pub async fn ping(&self) -> bool {
        match self.handle().await {
            Ok(handle) => handle.database.run_command(doc! {"ping": 1}).await.is_ok(),
            Err(_) => false,
        }
    }

    /// The collection (for tests).
    pub async fn collection(&self) -> anyhow::Result<Collection<Document>> {
        Ok(self.coll().await?.clone())
    }

    async fn ensure_indexes(&mut self) -> anyhow::Result<()> {
        if !self.indexed {
            let collection = self.coll().await?.clone();
            replace_plain_indexes(&collection).await?;
            for (keys, unique) in INDEXES {
                let options = IndexOptions::builder().unique(unique).build();
                collection
                    .create_index(IndexModel::builder().keys(keys()).options(options).build())
                    .await
                    .map_err(|e| classify(e, "creating indexes"))?;
            }
            self.indexed = true;
        }
        Ok(())
    }

    /// Appends `records` to group `id` as operation `wseq`, only if the group still holds
    /// `seen.0` records at write sequence `seen.1`: a compare-and-set on the group's state.
    /// Anything else (another writer got there first, an earlier attempt of this batch did, the
    /// group is gone) is a [`Conflict`].
    async fn append(&self, append: &Append) -> anyhow::Result<()> {
        let Append {
            id,
            seen,
            records,
            wseq,
            at,
        } = append;
        if records.is_empty() {
            return Ok(());
        }
        let ids: Vec<&str> = records.iter().map(|r| r.id.as_str()).collect();
        let last_seq = records.last().map(|r| r.seq as i64).unwrap_or_default();
        let pushed = records_bson(records)?;
        let result = self.coll().await?
            .update_one(
                doc! {
                    "_id": id,
                    "count": seen.0 as i64,
                    "wseq": seen.1 as i64,
                    "records.id": {"$nin": ids},
                },
                doc! {
                    "$push": {"records": {"$each": pushed}},
                    "$inc": {"count": records.len() as i64},
                    "$set": {"last_seq": last_seq, "wseq": *wseq as i64, "updated_at": bson_time(*at)},
                },
            )
            .await
            .map_err(|e| classify(e, "appending to a group"))?;
        if result.matched_count == 1 {
            Ok(())
        } else {
            Err(Conflict(format!(
                "group {id} is no longer at {} records and write sequence {}",
                seen.0, seen.1
            ))
            .into())
        }
    }
}

impl GroupStore for MongoStore {
    fn collection_name(&self) -> String {
        self.target.2.clone()
    }

    async fn last_group(&mut self, source: &str) -> anyhow::Result<Option<OpenGroup>> {
        self.ensure_indexes().await?;
        let last = self
            .coll()
            .await?
            .find_one(doc! {"source": source})
            .sort(doc! {"wseq": -1})
            .projection(doc! {"nested": 1, "count": 1, "wseq": 1})
            .optional(self.read_deadline, |find, d| find.max_time(d))
            .await
            .map_err(|e| classify(e, "finding the open group"))?;
        Ok(last.map(|doc| OpenGroup {
            id: doc.get_str("_id").unwrap_or_default().to_owned(),
            nested: doc.get_bool("nested").unwrap_or(false),
            count: integer(&doc, "count") as usize,
            wseq: integer(&doc, "wseq").max(0) as u64,
        }))
    }

    async fn max_wseq(&mut self) -> anyhow::Result<u64> {
        self.ensure_indexes().await?;
        let last = self
            .coll()
            .await?
            .find_one(doc! {})
            .sort(doc! {"wseq": -1})
            .projection(doc! {"wseq": 1})
            .optional(self.read_deadline, |find, d| find.max_time(d))
            .await
            .map_err(|e| classify(e, "finding the last write sequence"))?;
        Ok(last.map_or(0, |doc| integer(&doc, "wseq").max(0) as u64))
    }

    async fn stored_ids(&mut self, ids: &[String]) -> anyhow::Result<HashSet<String>> {
        self.ensure_indexes().await?;
        let wanted: HashSet<&str> = ids.iter().map(String::as_str).collect();
        let mut cursor = self
            .coll()
            .await?
            .find(doc! {"records.id": {"$in": ids}})
            .projection(doc! {"records.id": 1})
            .optional(self.read_deadline, |find, d| find.max_time(d))
            .await
            .map_err(|e| classify(e, "looking up stored ids"))?;
        let mut found = HashSet::new();
        while let Some(doc) = cursor.try_next().await.context("reading stored ids")? {
            for record in doc
                .get_array("records")
                .map(|a| a.as_slice())
                .unwrap_or_default()
            {
                if let Some(id) = record.as_document().and_then(|r| r.get_str("id").ok())
                    && wanted.contains(id)
                {
                    found.insert(id.to_owned());
                }
            }
        }
        Ok(found)
    }

    async fn prepare(&mut self) -> anyhow::Result<()> {
        self.ensure_indexes().await
    }

    async fn apply(&mut self, ops: &[Op]) -> anyhow::Result<()> {
        self.ensure_indexes().await?;
        let mut rest = ops;
        while let Some(op) = rest.first() {
            match op {
                Op::Insert(_) => {
                    // A run of new groups goes in one ordered `insert_many`: one round trip
                    // instead of one per group, and the same order and outcome.
                    let run = rest
                        .iter()
                        .take_while(|op| matches!(op, Op::Insert(_)))
                        .count();
                    let groups: Vec<&GroupDoc> = rest[..run]
                        .iter()
                        .filter_map(|op| match op {
                            Op::Insert(group) => Some(group),
                            Op::Append(_) => None,
                        })
                        .collect();
                    self.insert_groups(&groups).await?;
                    rest = &rest[run..];
                }
                Op::Append(append) => {
                    self.append(append).await?;
                    rest = &rest[1..];
                }
            }
        }
        Ok(())
    }
}

/// The collection's indexes and whether each is unique. `records.id`, unique: no record in two
/// groups (de-duplication, and part of the fence between writers); `{source, wseq}`: a
/// source's open group (exactly the recovery query); `{wseq}`, unique: the highest write
/// sequence, and no two groups written as one operation.
const INDEXES: [(fn() -> Document, bool); 3] = [
    (|| doc! {"records.id": 1}, true),
    (|| doc! {"source": 1, "wseq": -1}, false),
    (|| doc! {"wseq": -1}, true),
];

/// Drops the indexes that earlier versions created on the same keys without `unique` (under
/// MongoDB's default name), so the unique ones can take their place: MongoDB refuses a second
/// index on the same keys with other options. Any other index is left alone.
async fn replace_plain_indexes(collection: &Collection<Document>) -> anyhow::Result<()> {
    let mut existing = match collection.list_indexes().await {
        Ok(existing) => existing,
        // No collection yet (MongoDB answers NamespaceNotFound): no index to replace.
        Err(err) if server_code(&err) == Some(NAMESPACE_NOT_FOUND) => return Ok(()),
        Err(err) => return Err(classify(err, "listing indexes")),
    };
    let mut plain = Vec::new();
    while let Some(index) = existing
        .try_next()
        .await
        .map_err(|e| classify(e, "listing indexes"))?
    {
        let unique = index
            .options
            .as_ref()
            .and_then(|o| o.unique)
            .unwrap_or(false);
        let name = index.options.as_ref().and_then(|o| o.name.clone());
        let wanted_unique = INDEXES
            .iter()
            .any(|(keys, unique)| *unique && keys() == index.keys);
        if wanted_unique && !unique && name.as_deref() == Some(&default_index_name(&index.keys)) {
            plain.extend(name);
        }
    }
    for name in plain {
        tracing::info!(index = %name, "replacing an index of an earlier version by its unique form");
        collection
            .drop_index(name)
            .await
            .map_err(|e| classify(e, "dropping a replaced index"))?;
    }
    Ok(())
}

/// The name MongoDB gives an index of `keys` when none is given (`records.id_1`, `wseq_-1`).
fn default_index_name(keys: &Document) -> String {
    keys.iter()
        .map(|(key, order)| format!("{key}_{order}"))
        .collect::<Vec<_>>()
        .join("_")
}

impl MongoStore {
    /// Inserts `groups` in one ordered `insert_many`. A duplicate key (the `_id`, a record id or
    /// the write sequence is taken: another writer or an earlier attempt wrote first) is a
    /// [`Conflict`]; the groups before it stay inserted.
    async fn insert_groups(&self, groups: &[&GroupDoc]) -> anyhow::Result<()> {
        let documents = groups
            .iter()
            .map(|group| to_document(group))
            .collect::<anyhow::Result<Vec<_>>>()?;
        self.coll()
            .await?
            .insert_many(documents)
            .await
            .map_err(|e| classify(e, "inserting groups"))?;
        Ok(())
    }
}

/// A unique index refused a write: the fence between writers (see [`Conflict`]).
const DUPLICATE_KEY: i32 = 11000;

/// The collection (or database) does not exist.
const NAMESPACE_NOT_FOUND: i32 = 26;

/// Server error codes that no retry can fix for the records written (MongoDB manual, error
/// codes): BadValue, FailedToParse, TypeMismatch, InvalidLength, DocumentValidationFailure,
/// BSONObjectTooLarge, KeyTooLong.
const PERMANENT_CODES: &[i32] = &[2, 9, 14, 16, 121, 10334, 17280];

/// Server error codes that say the database refuses this writer's configuration, whatever the
/// records: Unauthorized, AuthenticationFailed, CannotCreateIndex, IndexOptionsConflict,
/// IndexKeySpecsConflict (an index someone made on the keys this writer needs).
const MISCONFIGURED_CODES: &[i32] = &[13, 18, 67, 85, 86];

/// Sorts `err` by cause: a unique index's refusal is a [`Conflict`] (planned again), a
/// configuration the database refuses is [`Misconfigured`] (retried, nothing dead-lettered), a
/// code that says retrying cannot help the records is [`Permanent`] (the consumer dead-letters
/// the records at fault); anything else (network, server selection, retryable labels, a
/// failpoint) stays transient and goes through the breaker and retries.
fn classify(err: mongodb::error::Error, what: &str) -> anyhow::Error {
    if matches!(err.kind.as_ref(), ErrorKind::Authentication { .. }) {
        return anyhow::Error::new(Misconfigured(format!("{what}: {err}")));
    }
    match server_code(&err) {
        Some(DUPLICATE_KEY) => anyhow::Error::new(Conflict(format!("{what}: {err}"))),
        Some(code) if MISCONFIGURED_CODES.contains(&code) => anyhow::Error::new(Misconfigured(
            format!("{what}: MongoDB error {code}: {err}"),
        )),
        Some(code)
            if PERMANENT_CODES.contains(&code) && !err.contains_label("RetryableWriteError") =>
        {
            anyhow::Error::new(Permanent(format!("{what}: MongoDB error {code}: {err}")))
        }
        _ => anyhow::Error::new(err).context(what.to_owned()),
    }
}

/// The server's error code of `err`, when the server answered with one.
fn server_code(err: &mongodb::error::Error) -> Option<i32> {
    match err.kind.as_ref() {
        ErrorKind::Write(WriteFailure::WriteError(e)) => Some(e.code),
        ErrorKind::Write(WriteFailure::WriteConcernError(e)) => Some(e.code),
        ErrorKind::Command(e) => Some(e.code),
        ErrorKind::InsertMany(e) => e
            .write_errors
            .as_deref()
            .and_then(|errors| errors.first())
            .map(|e| e.code)
            .or(e.write_concern_error.as_ref().map(|e| e.code)),
        _ => None,
    }
}

fn integer(doc: &Document, key: &str) -> i64 {
    match doc.get(key) {
        Some(Bson::Int32(n)) => i64::from(*n),
        Some(Bson::Int64(n)) => *n,
        Some(Bson::Double(n)) => *n as i64,
        _ => 0,
    }
}

/// A group as its MongoDB document.
pub fn to_document(group: &GroupDoc) -> anyhow::Result<Document> {
    Ok(doc! {
        "_id": &group.id,
        "source": &group.source,
        "nested": group.nested,
        "records": records_bson(&group.records)?,
        "count": group.records.len() as i64,
        "first_seq": group.records.first().map(|r| r.seq as i64).unwrap_or_default(),
        "last_seq": group.records.last().map(|r| r.seq as i64).unwrap_or_default(),
        "wseq": group.wseq as i64,
        "created_at": bson_time(group.created_at),
        "updated_at": bson_time(group.updated_at),
    })
}

/// A MongoDB document back as a group (for `verify`).
pub fn from_document(doc: &Document) -> anyhow::Result<(GroupDoc, i64)> {
    let records = doc
        .get_array("records")
        .context("records")?
        .iter()
        .map(record_from_bson)
        .collect::<anyhow::Result<Vec<Record>>>()?;
    let group = GroupDoc {
        id: doc.get_str("_id").context("_id")?.to_owned(),
        source: doc.get_str("source").context("source")?.to_owned(),
        nested: doc.get_bool("nested").context("nested")?,
        wseq: integer(doc, "wseq").max(0) as u64,
        records,
        created_at: doc
            .get_datetime("created_at")
            .map(chrono_time)
            .unwrap_or_default(),
        updated_at: doc
            .get_datetime("updated_at")
            .map(chrono_time)
            .unwrap_or_default(),
    };
    Ok((group, integer(doc, "count")))
}

/// Field of a stored record element: the route that sent it to RabbitMQ.
pub const FIELD_ROUTE: &str = "route";
/// Field of a stored record element: the routes version in force when it was routed.
pub const FIELD_ROUTES_VERSION: &str = "routes_version";

/// Records as the elements of a group's `records` array: each record's fields, then its
/// provenance (`route`, `routes_version`) when it has one.
fn records_bson(records: &[Record]) -> anyhow::Result<Bson> {
    records
        .iter()
        .map(|record| {
            let mut element = bson::to_document(record).context("encoding a record")?;
            if let Some(provenance) = &record.provenance {
                if let Some(route) = &provenance.route {
                    element.insert(FIELD_ROUTE, route.as_str());
                }
                element.insert(FIELD_ROUTES_VERSION, provenance.version.as_str());
            }
            Ok(Bson::Document(element))
        })
        .collect::<anyhow::Result<Vec<Bson>>>()
        .map(Bson::Array)
}

/// One element of a group's `records` array back as a record with its provenance.
fn record_from_bson(element: &Bson) -> anyhow::Result<Record> {
    let mut element = element
        .as_document()
        .context("a records element is not a document")?
        .clone();
    let route = element
        .remove(FIELD_ROUTE)
        .and_then(|v| v.as_str().map(str::to_owned));
    let version = element
        .remove(FIELD_ROUTES_VERSION)
        .and_then(|v| v.as_str().map(str::to_owned));
    let mut record: Record = bson::from_document(element).context("decoding a record")?;
    record.provenance =
        version.map(|version| flowmesh_common::record::Provenance { version, route });
    Ok(record)
}

fn bson_time(at: chrono::DateTime<chrono::Utc>) -> bson::DateTime {
    bson::DateTime::from_millis(at.timestamp_millis())
}

fn chrono_time(at: &bson::DateTime) -> chrono::DateTime<chrono::Utc> {
    chrono::DateTime::from_timestamp_millis(at.timestamp_millis()).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_deadline_bounds_the_write_concern_of_writes_and_keeps_them_journaled() {
        // The client connects lazily: no server is needed to read its options.
        let client = client("mongodb://127.0.0.1:1").await.expect("client");
        let plain = MongoStore::new(&client, "flowmesh", "records");
        let concern = plain.write_concern().await.expect("handle").expect("set");
        assert_eq!((concern.journal, concern.w_timeout), (Some(true), None));

        let bounded = plain.with_deadline(Duration::from_secs(8));
        let concern = bounded.write_concern().await.expect("handle").expect("set");
        assert_eq!(
            (concern.journal, concern.w_timeout),
            (Some(true), Some(Duration::from_secs(8)))
        );
        assert_eq!(bounded.read_deadline, Some(Duration::from_secs(8)));
    }

    #[tokio::test]
    async fn the_url_s_w_is_kept_beside_the_journal_so_a_replica_set_can_ask_for_a_majority() {
        let client = client("mongodb://127.0.0.1:1/?w=majority")
            .await
            .expect("client");
        let store = MongoStore::new(&client, "flowmesh", "records");
        let bounded = store.clone().with_deadline(Duration::from_secs(8));
        for concern in [store.write_concern(), bounded.write_concern()] {
            let concern = concern.await.expect("handle").expect("set");
            assert_eq!(
                (concern.w, concern.journal),
                (Some(mongodb::options::Acknowledgment::Majority), Some(true))
            );
        }
    }
}
