//! The real MongoDB driver, run whenever `MONGODB_URL` names a MongoDB (docker compose starts
//! one). Without it these tests print that they were SKIPPED and pass: the same semantics are
//! covered against the in-memory store by the property tests and `consumer.rs`.

use flowmesh_common::consumer::RecordStore;
use flowmesh_common::record::Record;
use flowmesh_mongo_writer::mongo::{self, MongoStore, from_document};
use flowmesh_mongo_writer::nesting::nests;
use flowmesh_mongo_writer::store::NestingStore;
use futures_util::TryStreamExt;
use mongodb::bson::doc;

fn mongodb_url() -> Option<String> {
    match std::env::var("MONGODB_URL") {
        Ok(url) if !url.is_empty() => Some(url),
        _ => {
            eprintln!("SKIPPED: MONGODB_URL is not set, so the real-MongoDB tests did not run");
            None
        }
    }
}

fn record(seq: u64, high: bool) -> Record {
    flowmesh_filter::testing::record_where("mongo-real", seq, 95, |hash| nests(hash) == high)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn groups_are_written_recovered_and_never_duplicated_in_a_real_mongodb() {
    let Some(url) = mongodb_url() else { return };
    let client = mongo::client(&url).await.expect("client");
    let database = format!("flowmesh_test_{}", uuid::Uuid::new_v4().simple());
    let records: Vec<Record> = [false, true, true, true, false, true]
        .iter()
        .enumerate()
        .map(|(i, high)| record(i as u64 + 1, *high))
        .collect();

    let mut first = NestingStore::new(MongoStore::new(&client, &database, "records"), 2);
    first.store(&records[..3]).await.expect("store");
    // A restarted writer, a redelivered prefix, then the rest.
    let mut second = NestingStore::new(MongoStore::new(&client, &database, "records"), 2);
    let report = second.store(&records[..4]).await.expect("store");
    assert_eq!((report.stored, report.duplicates), (1, 3));
    second.store(&records[3..]).await.expect("store");

    let collection = client
        .database(&database)
        .collection::<mongodb::bson::Document>("records");
    let mut cursor = collection
        .find(doc! {})
        .sort(doc! {"updated_at": 1})
        .await
        .expect("find");
    let mut shape = Vec::new();
    while let Some(doc) = cursor.try_next().await.expect("next") {
        let (group, count) = from_document(&doc).expect("decode");
        assert_eq!(count as usize, group.records.len());
        assert_eq!(
            doc.get_i64("first_seq").expect("first_seq"),
            group.records[0].seq as i64
        );
        shape.push((
            group.nested,
            group.records.iter().map(|r| r.seq).collect::<Vec<_>>(),
        ));
    }
    assert_eq!(
        shape,
        vec![
            (false, vec![1]),
            (true, vec![2, 3]),
            (true, vec![4]),
            (false, vec![5]),
            (true, vec![6])
        ]
    );
    client
        .database(&database)
        .drop()
        .await
        .expect("drop test database");
}
