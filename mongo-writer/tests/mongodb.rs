//! The real MongoDB driver against the server at `MONGODB_URL` (`scripts/test.sh` starts one),
//! and the differential test: the same operations on MongoDB and on the in-memory twin must
//! leave identical documents. Only a `MONGODB_URL` set empty on purpose skips them.

use std::time::Duration;

use flowmesh_common::record::Record;
use flowmesh_common::testkit::{
    TestWriter, drain_dead_letters, eventually, publish_records, unique_prefix,
};
use flowmesh_common::topology::Topology;
use flowmesh_common::writers::consumer::RecordStore;
use flowmesh_mongo_writer::MongoWriterConfig;
use flowmesh_mongo_writer::mongo::{self, MongoStore, from_document};
use flowmesh_mongo_writer::nesting::{Append, GroupDoc, Op, nests};
use flowmesh_mongo_writer::store::{Conflict, GroupStore, MemoryStore, NestingStore};
use flowmesh_mongo_writer::testkit::Crashing;
use futures_util::TryStreamExt;
use mongodb::bson::doc;

fn mongodb_url() -> Option<String> {
    match std::env::var("MONGODB_URL") {
        Ok(url) if !url.is_empty() => Some(url),
        Ok(_) => {
            eprintln!("SKIPPED: MONGODB_URL is empty, so the real-MongoDB tests did not run");
            None
        }
        Err(_) => Some("mongodb://127.0.0.1:27017".into()),
    }
}

/// Every group of `database.records` in write order (by `wseq`), each checked: its `count` and
/// `first_seq` agree with its records.
async fn groups_in_write_order(client: &mongodb::Client, database: &str) -> Vec<GroupDoc> {
    let collection = client
        .database(database)
        .collection::<mongodb::bson::Document>("records");
    let mut cursor = collection
        .find(doc! {})
        .sort(doc! {"wseq": 1})
        .await
        .expect("find");
    let mut groups = Vec::new();
    while let Some(doc) = cursor.try_next().await.expect("next") {
        let (group, count) = from_document(&doc).expect("decode");
        assert_eq!(count as usize, group.records.len(), "count matches records");
        assert_eq!(
            doc.get_i64("first_seq").expect("first_seq"),
            group.records[0].seq as i64
        );
        groups.push(group);
    }
    groups
}

fn record(seq: u64, high: bool) -> Record {
    flowmesh_common::testkit::record_where("mongo-real", seq, 95, |hash| nests(hash) == high)
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

    let shape: Vec<(bool, Vec<u64>)> = groups_in_write_order(&client, &database)
        .await
        .iter()
        .map(|group| (group.nested, group.records.iter().map(|r| r.seq).collect()))
        .collect();
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_that_meet_a_changed_store_are_conflicts_in_mongodb_and_in_the_twin_alike() {
    let Some(url) = mongodb_url() else { return };
    let client = mongo::client(&url).await.expect("client");
    let database = format!("flowmesh_test_{}", uuid::Uuid::new_v4().simple());
    let now = chrono::Utc::now();
    let records: Vec<Record> = (1..=8).map(|seq| record(seq, true)).collect();
    let group = |seqs: &[u64], wseq: u64| {
        let mut doc = GroupDoc::new(records[seqs[0] as usize - 1].clone(), wseq, now);
        doc.records.extend(
            seqs[1..]
                .iter()
                .map(|&seq| records[seq as usize - 1].clone()),
        );
        doc
    };
    let append = |id: u64, seen: (usize, u64), seqs: &[u64], wseq: u64| {
        Op::Append(Append {
            id: records[id as usize - 1].id.clone(),
            seen,
            records: seqs
                .iter()
                .map(|&s| records[s as usize - 1].clone())
                .collect(),
            wseq,
            at: now,
        })
    };
    // What another writer wrote first: group 3 holds seqs 3 and 4, at wseq 1.
    let earlier = [Op::Insert(group(&[3, 4], 1))];
    let refused: [&[Op]; 6] = [
        // Its `_id` is taken (the ops before it stay written).
        &[Op::Insert(group(&[1, 2], 2)), Op::Insert(group(&[3], 3))],
        // A record id is stored already, in another group.
        &[Op::Insert(group(&[4, 5], 4))],
        // The write sequence is taken.
        &[Op::Insert(group(&[6], 1))],
        // An append planned from an older state of the group (one record, wseq 0).
        &[append(3, (1, 0), &[5], 5)],
        // An append that would reuse a write sequence.
        &[append(3, (2, 1), &[5], 2)],
        // An append to a group that does not exist.
        &[append(7, (1, 9), &[8], 6)],
    ];
    let mut real = MongoStore::new(&client, &database, "records");
    let mut twin = MemoryStore::new();
    real.apply(&earlier).await.expect("apply to MongoDB");
    twin.apply(&earlier).await.expect("apply to the twin");
    for ops in refused {
        for (store, err) in [
            ("MongoDB", real.apply(ops).await.expect_err("refused")),
            ("the twin", twin.apply(ops).await.expect_err("refused")),
        ] {
            assert!(
                err.downcast_ref::<Conflict>().is_some(),
                "{store}: {ops:?} is a conflict, not {err:#}"
            );
        }
    }
    // The append planned from the group as it is goes through.
    let fits = [append(3, (2, 1), &[5], 7)];
    real.apply(&fits).await.expect("apply to MongoDB");
    twin.apply(&fits).await.expect("apply to the twin");
    let collection = real.collection().await.expect("collection");
    let mut cursor = collection.find(doc! {}).await.expect("find");
    let mut in_mongodb = Vec::new();
    while let Some(doc) = cursor.try_next().await.expect("next") {
        in_mongodb.push(essence(&from_document(&doc).expect("decode").0));
    }
    let mut in_memory: Vec<_> = twin.groups().iter().map(essence).collect();
    in_mongodb.sort();
    in_memory.sort();
    assert_eq!(in_mongodb.len(), 2, "groups 1 and 3, nothing else");
    assert_eq!(in_mongodb, in_memory, "the twin agrees with MongoDB");
    client.database(&database).drop().await.expect("drop");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_writers_over_one_mongodb_never_overfill_a_group_or_tie_a_write_sequence() {
    let Some(url) = mongodb_url() else { return };
    let client = mongo::client(&url).await.expect("client");
    let database = format!("flowmesh_test_{}", uuid::Uuid::new_v4().simple());
    let records: Vec<Record> = (1..=130).map(|seq| record(seq, true)).collect();
    // Two writers take turns on one queue (a single-active-consumer hand-over and back), each
    // remembering the open group as it last saw it: A stores 95 records in one group, B the
    // next 10 (filling it to 100 and starting another), then A 10 more from its stale memory
    // of a 95-record group, then B the rest, then A replays some.
    let mut a = NestingStore::new(MongoStore::new(&client, &database, "records"), 100);
    let mut b = NestingStore::new(MongoStore::new(&client, &database, "records"), 100);
    a.store(&records[..95]).await.expect("A stores 95");
    b.store(&records[95..105]).await.expect("B stores 10");
    a.store(&records[105..115]).await.expect("A stores 10 more");
    b.store(&records[115..]).await.expect("B stores the rest");
    a.store(&records[100..120]).await.expect("A replays 20");

    let groups = groups_in_write_order(&client, &database).await;
    let sizes: Vec<usize> = groups.iter().map(|g| g.records.len()).collect();
    assert_eq!(sizes, vec![100, 30], "as one writer would have nested them");
    let seqs: Vec<u64> = groups
        .iter()
        .flat_map(|g| g.records.iter().map(|r| r.seq))
        .collect();
    assert_eq!(
        seqs,
        (1..=130).collect::<Vec<_>>(),
        "every record once, in order"
    );
    let mut wseqs: Vec<u64> = groups.iter().map(|g| g.wseq).collect();
    wseqs.dedup();
    assert_eq!(
        wseqs.len(),
        groups.len(),
        "no two groups share a write sequence"
    );
    client.database(&database).drop().await.expect("drop");
}

type Provenance = Option<(String, Option<String>)>;
/// A group as the two stores must agree on it: ids, order, provenance of every record, wseq.
type Essence = (String, String, bool, Vec<(String, Provenance)>, u64);

fn essence(group: &GroupDoc) -> Essence {
    (
        group.id.clone(),
        group.source.clone(),
        group.nested,
        group
            .records
            .iter()
            .map(|r| {
                let provenance = r
                    .provenance
                    .as_ref()
                    .map(|p| (p.version.clone(), p.route.clone()));
                (r.id.clone(), provenance)
            })
            .collect(),
        group.wseq,
    )
}

/// One scripted run: interleaved sources, random batches, crashes during the writes and
/// between write and ack (the batch comes again), restarts, and duplicates from upstream.
async fn scripted<G: GroupStore + Clone + Sync>(store: G, seed: u64, records: &[Record]) {
    let mut rng = fastrand::Rng::with_seed(seed);
    let max_nest = 3;
    let crashing = Crashing::new(store);
    let mut writer = NestingStore::new(crashing.clone(), max_nest);
    let mut acked = 0;
    while acked < records.len() {
        let end = (acked + rng.usize(1..12)).min(records.len());
        let crash_in_writes = rng.u8(..10) == 0;
        let crash_before_ack = rng.u8(..10) == 0;
        if crash_in_writes {
            crashing.crash_next_apply_after(Some(rng.usize(0..4)));
        }
        let stored = writer.store(&records[acked..end]).await.is_ok();
        if stored && !crash_before_ack {
            acked = end;
        } else if rng.bool() {
            // A restarted writer: nothing remembered.
            writer = NestingStore::new(crashing.clone(), max_nest);
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mongodb_and_the_in_memory_twin_leave_identical_documents_for_the_same_operations() {
    let Some(url) = mongodb_url() else { return };
    let client = mongo::client(&url).await.expect("client");
    for seed in [1u64, 2, 3, 4] {
        let mut rng = fastrand::Rng::with_seed(seed);
        let mut records: Vec<Record> = (1..=150u64)
            .map(|seq| {
                let source = ["s1", "s2", "s3"][rng.usize(..3)];
                let high = rng.u8(..3) != 0;
                let mut record =
                    flowmesh_common::testkit::record_where(source, seq, 95, |h| nests(h) == high);
                // Records routed under two versions, and some of no recorded version.
                record.provenance = match rng.u8(..3) {
                    0 => None,
                    1 => Some(flowmesh_common::record::Provenance {
                        version: "0123456789ab".into(),
                        route: Some("hot".into()),
                    }),
                    _ => Some(flowmesh_common::record::Provenance {
                        version: "ba9876543210".into(),
                        route: Some("high-hash".into()),
                    }),
                };
                record
            })
            .collect();
        // Delivery order is not id order (re-sends, several generators, replayed dead
        // letters): shuffle, so a tie broken by id would pick another group than the queue did.
        rng.shuffle(&mut records);
        // Duplicates from upstream: a few records delivered again later.
        for _ in 0..8 {
            let from = rng.usize(..records.len());
            let to = rng.usize(from..records.len());
            let copy = records[from].clone();
            records.insert(to, copy);
        }
        let database = format!("flowmesh_test_{}", uuid::Uuid::new_v4().simple());
        let real = MongoStore::new(&client, &database, "records");
        let twin = MemoryStore::new();
        scripted(real.clone(), seed, &records).await;
        scripted(twin.clone(), seed, &records).await;

        let collection = real.collection().await.expect("collection");
        let mut cursor = collection.find(doc! {}).await.expect("find");
        let mut in_mongodb = Vec::new();
        while let Some(doc) = cursor.try_next().await.expect("next") {
            let (group, count) = from_document(&doc).expect("decode");
            assert_eq!(
                count as usize,
                group.records.len(),
                "count matches the records"
            );
            in_mongodb.push(essence(&group));
        }
        let mut in_memory: Vec<_> = twin.groups().iter().map(essence).collect();
        in_mongodb.sort();
        in_memory.sort();
        assert_eq!(
            in_mongodb, in_memory,
            "seed {seed}: the twin differs from MongoDB"
        );
        client.database(&database).drop().await.expect("drop");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_mongodb_refuses_for_good_is_dead_lettered_and_the_writer_goes_on() {
    let Some(url) = mongodb_url() else { return };
    let id = uuid::Uuid::new_v4().simple().to_string();
    let app = format!("flowmesh-test-{id}");
    let database = format!("flowmesh_test_{id}");
    let client = mongo::client(&url).await.expect("client");
    // The next insert of this test's writer (and of no other client) fails as a document too
    // large (BSONObjectTooLarge, 10334), which no retry can fix.
    client
        .database("admin")
        .run_command(doc! {
            "configureFailPoint": "failCommand",
            "mode": {"times": 1},
            "data": {"failCommands": ["insert"], "errorCode": 10334, "appName": &app},
        })
        .await
        .expect("failpoint armed (the server needs --enable-test-commands)");
    let prefix = unique_prefix("mongo-permanent");
    let topology = Topology::new(&prefix, 5);
    let mut config = MongoWriterConfig::for_tests(&prefix);
    let separator = if url.contains('?') { '&' } else { '?' };
    let base = url.trim_end_matches('/');
    config.mongodb_url = format!("{base}/{separator}appName={app}").as_str().into();
    config.mongodb_database = database.clone();
    let writer = TestWriter::start(flowmesh_mongo_writer::build(config).await.expect("builds"));

    let refused = record(1, false);
    publish_records(&topology, std::slice::from_ref(&refused)).await;
    let dead = drain_dead_letters(&topology, 1, Duration::from_secs(30)).await;
    assert_eq!(
        dead.len(),
        1,
        "the refused batch reached the dead-letter queue"
    );
    assert_eq!(String::from_utf8_lossy(&dead[0].data), refused.to_json());
    let headers = dead[0].properties.headers().clone().unwrap_or_default();
    let reason = match headers
        .inner()
        .get(flowmesh_common::topology::HEADER_DEAD_LETTER_REASON)
    {
        Some(lapin::types::AMQPValue::LongString(text)) => text.to_string(),
        other => panic!("no reason on the dead letter: {other:?}"),
    };
    assert!(reason.contains("10334"), "{reason}");

    // The writer goes on: the next record is stored, the refused one is not.
    let next = record(2, false);
    publish_records(&topology, std::slice::from_ref(&next)).await;
    let collection = client
        .database(&database)
        .collection::<mongodb::bson::Document>("records");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while collection
        .count_documents(doc! {"_id": &next.id})
        .await
        .unwrap_or(0)
        == 0
    {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the next record was not stored"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(
        collection
            .count_documents(doc! {"_id": &refused.id})
            .await
            .expect("count"),
        0
    );
    let breaker = writer.breaker.clone();
    eventually("the breaker stays closed", Duration::from_secs(5), || {
        breaker.state() == flowmesh_common::breaker::BreakerState::Closed
    })
    .await;
    writer.finish().await;
    client.database(&database).drop().await.expect("drop");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_index_that_blocks_the_writer_s_own_makes_it_not_ready_and_dead_letters_nothing() {
    let Some(url) = mongodb_url() else { return };
    let id = uuid::Uuid::new_v4().simple().to_string();
    let database = format!("flowmesh_test_{id}");
    let client = mongo::client(&url).await.expect("client");
    let collection = client
        .database(&database)
        .collection::<mongodb::bson::Document>("records");
    // Someone took the name of the writer's unique index for an index of other keys.
    collection
        .create_index(
            mongodb::IndexModel::builder()
                .keys(doc! {"source": 1})
                .options(
                    mongodb::options::IndexOptions::builder()
                        .name("records.id_1".to_owned())
                        .build(),
                )
                .build(),
        )
        .await
        .expect("the other index");
    let prefix = unique_prefix("mongo-misconfigured");
    let topology = Topology::new(&prefix, 5);
    let mut config = MongoWriterConfig::for_tests(&prefix);
    config.mongodb_url = url.as_str().into();
    config.mongodb_database = database.clone();
    let writer = TestWriter::start(flowmesh_mongo_writer::build(config).await.expect("builds"));
    let records: Vec<Record> = (1..=5).map(|seq| record(seq, seq % 2 == 0)).collect();
    publish_records(&topology, &records).await;
    let breaker = writer.breaker.clone();
    eventually(
        "the writer is not ready (its breaker opens)",
        Duration::from_secs(30),
        || breaker.state() == flowmesh_common::breaker::BreakerState::Open,
    )
    .await;
    let (status, _) =
        flowmesh_common::http::get(writer.http_addr, "/health/ready", Duration::from_secs(5))
            .await
            .expect("ready probe");
    assert_eq!(status, 503, "not ready while the database refuses it");
    let dead = drain_dead_letters(&topology, 0, Duration::from_secs(2)).await;
    assert!(dead.is_empty(), "{} records were dead-lettered", dead.len());

    // The operator removes the conflicting index: everything is stored.
    collection.drop_index("records.id_1").await.expect("drop");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    let stored = || async {
        let groups = groups_in_write_order(&client, &database).await;
        groups.iter().map(|g| g.records.len()).sum::<usize>()
    };
    while stored().await < 5 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "not stored after the fix"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    writer.finish().await;
    client.database(&database).drop().await.expect("drop");
}

/// Two mongo-writers on one single-active-consumer queue, the hand-over forced at its worst: the
/// active writer's insert is frozen on the wire, its RabbitMQ link is cut (RabbitMQ hands its
/// messages and the queue to the other writer, which stores everything), and only then do the
/// frozen writes reach MongoDB. The fence refuses them: every record once, and the layout is
/// exactly what one writer storing the queue in order would have made.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forced_hand_over_between_two_mongo_writers_leaves_the_layout_one_writer_makes() {
    use flowmesh_common::testkit::proxy_url;

    let Some(url) = mongodb_url() else { return };
    let database = format!("flowmesh_test_{}", uuid::Uuid::new_v4().simple());
    let client = mongo::client(&url).await.expect("client");
    let prefix = unique_prefix("mongo-hand-over");
    let topology = Topology::new(&prefix, 5);
    let max_nest = 5;
    let config = |mongodb: &str, amqp: &str| {
        let mut config = MongoWriterConfig::for_tests(&prefix);
        config.mongodb_url = mongodb.into();
        config.mongodb_database = database.clone();
        config.max_nest = max_nest;
        config.writer.broker.url = amqp.into();
        config
    };
    // Mostly nesting records, so groups fill and close all along.
    let records: Vec<Record> = (1..=400u64).map(|seq| record(seq, seq % 7 != 0)).collect();
    let (mongo_proxy, mongo_proxied) = proxy_url(&url).await;
    let (amqp_proxy, amqp_proxied) = proxy_url(&flowmesh_common::testkit::amqp_url()).await;

    // A alone first, so it is the active consumer; then B waits behind it.
    let a = TestWriter::start(
        flowmesh_mongo_writer::build(config(&mongo_proxied, &amqp_proxied))
            .await
            .expect("builds"),
    );
    publish_records(&topology, &records[..100]).await;
    let collection = client
        .database(&database)
        .collection::<mongodb::bson::Document>("records");
    let stored = || async {
        let groups = groups_in_write_order(&client, &database).await;
        groups.iter().map(|g| g.records.len()).sum::<usize>()
    };
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while stored().await < 100 {
        assert!(tokio::time::Instant::now() < deadline, "A stored nothing");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let b = TestWriter::start(
        flowmesh_mongo_writer::build(config(&url, &flowmesh_common::testkit::amqp_url()))
            .await
            .expect("builds"),
    );
    b.wait_connected().await;

    // A's next writes stop on the wire; A takes a batch and is stuck in its store call.
    mongo_proxy.freeze();
    publish_records(&topology, &records[100..]).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    // A's link goes: RabbitMQ returns what A holds and makes B active.
    amqp_proxy.cut();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while stored().await < records.len() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "B did not take over"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Now A's frozen writes arrive, planned before B wrote anything of them.
    mongo_proxy.thaw();
    amqp_proxy.heal();
    tokio::time::sleep(Duration::from_secs(3)).await;

    let groups = groups_in_write_order(&client, &database).await;
    let mut wseqs: Vec<i64> = Vec::new();
    let mut cursor = collection.find(doc! {}).await.expect("find");
    while let Some(doc) = cursor.try_next().await.expect("next") {
        wseqs.push(doc.get_i64("wseq").expect("wseq"));
    }
    let distinct: std::collections::BTreeSet<i64> = wseqs.iter().copied().collect();
    assert_eq!(distinct.len(), wseqs.len(), "no two groups share a wseq");
    let shape: Vec<(bool, Vec<u64>)> = groups
        .iter()
        .map(|g| (g.nested, g.records.iter().map(|r| r.seq).collect()))
        .collect();
    // One writer storing the queue in order.
    let mut expected: Vec<(bool, Vec<u64>)> = Vec::new();
    for record in &records {
        let high = nests(&record.hash);
        match expected.last_mut() {
            Some((true, seqs)) if high && seqs.len() < max_nest => seqs.push(record.seq),
            _ => expected.push((high, vec![record.seq])),
        }
    }
    assert_eq!(shape, expected, "the layout one writer makes");
    let dead = drain_dead_letters(&topology, 0, Duration::from_secs(1)).await;
    assert!(dead.is_empty(), "{} dead-lettered", dead.len());
    b.finish().await;
    a.stop().await;
    client.database(&database).drop().await.expect("drop");
}
