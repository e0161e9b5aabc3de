//! The MongoDB implementation of [`GroupStore`] through the official driver.
//!
//! Documents: `{_id, nested, records, count, first_seq, last_seq, created_at, updated_at}` in
//! database `flowmesh`, collection `records`. Appends are guarded (`records.id $nin`) so a
//! redelivered record is never pushed twice, and consecutive appends to one group arrive as
//! one `$push` with `$each`.

use std::collections::HashSet;
use std::time::Duration;

use anyhow::Context;
use futures_util::TryStreamExt;
use mongodb::bson::{self, Bson, Document, doc};
use mongodb::error::{ErrorKind, WriteFailure};
use mongodb::options::ClientOptions;
use mongodb::{Client, Collection, IndexModel};

use crate::nesting::{GroupDoc, Op, OpenGroup};
use crate::store::GroupStore;
use flowmesh_common::record::Record;

/// Default database.
pub const DEFAULT_DATABASE: &str = "flowmesh";
/// Default collection.
pub const DEFAULT_COLLECTION: &str = "records";

/// Groups in a MongoDB collection.
#[derive(Debug, Clone)]
pub struct MongoStore {
    collection: Collection<Document>,
    indexed: bool,
}

/// A client that fails fast (5 s server selection) instead of hanging while MongoDB is away.
pub async fn client(url: &str) -> anyhow::Result<Client> {
    let mut options = ClientOptions::parse(url)
        .await
        .context("parsing MONGODB_URL")?;
    options.app_name = Some("flowmesh-mongo-writer".into());
    options.server_selection_timeout = Some(Duration::from_secs(5));
    options.connect_timeout = Some(Duration::from_secs(5));
    Client::with_options(options).context("creating the MongoDB client")
}

impl MongoStore {
    /// A store over `database.collection` of `client`.
    pub fn new(client: &Client, database: &str, collection: &str) -> Self {
        Self {
            collection: client.database(database).collection(collection),
            indexed: false,
        }
    }

    /// The collection (for `verify` and tests).
    pub fn collection(&self) -> &Collection<Document> {
        &self.collection
    }

    async fn ensure_indexes(&mut self) -> anyhow::Result<()> {
        if !self.indexed {
            for keys in [
                doc! {"records.id": 1},
                doc! {"updated_at": -1},
                doc! {"records.source": 1, "records.seq": 1},
            ] {
                self.collection
                    .create_index(IndexModel::builder().keys(keys).build())
                    .await
                    .context("creating indexes")?;
            }
            self.indexed = true;
        }
        Ok(())
    }

    async fn append(
        &self,
        id: &str,
        records: &[Record],
        at: chrono::DateTime<chrono::Utc>,
    ) -> anyhow::Result<()> {
        if records.is_empty() {
            return Ok(());
        }
        let ids: Vec<&str> = records.iter().map(|r| r.id.as_str()).collect();
        let last_seq = records.last().map(|r| r.seq as i64).unwrap_or_default();
        let pushed = bson::to_bson(records).context("encoding records")?;
        self.collection
            .update_one(
                doc! {"_id": id, "records.id": {"$nin": ids}},
                doc! {
                    "$push": {"records": {"$each": pushed}},
                    "$inc": {"count": records.len() as i64},
                    "$set": {"last_seq": last_seq, "updated_at": bson_time(at)},
                },
            )
            .await
            .context("appending to a group")?;
        Ok(())
    }
}

impl GroupStore for MongoStore {
    async fn last_group(&mut self) -> anyhow::Result<Option<OpenGroup>> {
        self.ensure_indexes().await?;
        let last = self
            .collection
            .find_one(doc! {})
            .sort(doc! {"updated_at": -1, "_id": -1})
            .projection(doc! {"nested": 1, "count": 1, "updated_at": 1})
            .await
            .context("finding the open group")?;
        Ok(last.map(|doc| OpenGroup {
            id: doc.get_str("_id").unwrap_or_default().to_owned(),
            nested: doc.get_bool("nested").unwrap_or(false),
            count: integer(&doc, "count") as usize,
            updated_at: doc
                .get_datetime("updated_at")
                .map(chrono_time)
                .unwrap_or_default(),
        }))
    }

    async fn stored_ids(&mut self, ids: &[String]) -> anyhow::Result<HashSet<String>> {
        self.ensure_indexes().await?;
        let wanted: HashSet<&str> = ids.iter().map(String::as_str).collect();
        let mut cursor = self
            .collection
            .find(doc! {"records.id": {"$in": ids}})
            .projection(doc! {"records.id": 1})
            .await
            .context("looking up stored ids")?;
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

    async fn apply(&mut self, ops: &[Op]) -> anyhow::Result<()> {
        self.ensure_indexes().await?;
        for op in ops {
            match op {
                Op::Insert(group) => {
                    let inserted = self.collection.insert_one(to_document(group)?).await;
                    match inserted {
                        Ok(_) => {}
                        Err(err) if is_duplicate_key(&err) => {
                            // Already created by an earlier attempt: add whatever it lacks.
                            self.append(&group.id, &group.records[1..], group.updated_at)
                                .await?;
                        }
                        Err(err) => return Err(err).context("inserting a group"),
                    }
                }
                Op::Append { id, records, at } => self.append(id, records, *at).await?,
            }
        }
        Ok(())
    }
}

fn is_duplicate_key(err: &mongodb::error::Error) -> bool {
    matches!(err.kind.as_ref(), ErrorKind::Write(WriteFailure::WriteError(e)) if e.code == 11000)
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
        "nested": group.nested,
        "records": bson::to_bson(&group.records).context("encoding records")?,
        "count": group.records.len() as i64,
        "first_seq": group.records.first().map(|r| r.seq as i64).unwrap_or_default(),
        "last_seq": group.records.last().map(|r| r.seq as i64).unwrap_or_default(),
        "created_at": bson_time(group.created_at),
        "updated_at": bson_time(group.updated_at),
    })
}

/// A MongoDB document back as a group (for `verify`).
pub fn from_document(doc: &Document) -> anyhow::Result<(GroupDoc, i64)> {
    let records: Vec<Record> = bson::from_bson(Bson::Array(
        doc.get_array("records").context("records")?.clone(),
    ))
    .context("decoding records")?;
    let group = GroupDoc {
        id: doc.get_str("_id").context("_id")?.to_owned(),
        nested: doc.get_bool("nested").context("nested")?,
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

fn bson_time(at: chrono::DateTime<chrono::Utc>) -> bson::DateTime {
    bson::DateTime::from_millis(at.timestamp_millis())
}

fn chrono_time(at: &bson::DateTime) -> chrono::DateTime<chrono::Utc> {
    chrono::DateTime::from_timestamp_millis(at.timestamp_millis()).unwrap_or_default()
}
