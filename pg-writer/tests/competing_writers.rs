//! Several pg-writers on one queue, against the real RabbitMQ and PostgreSQL: overlapping
//! batches take their row locks in one order (by id), and a transaction PostgreSQL aborts to
//! settle a conflict (deadlock, serialization failure) is retried without counting as a failure
//! of the database and without dead-lettering anything.

use std::time::Duration;

use flowmesh_common::breaker::BreakerState;
use flowmesh_common::message;
use flowmesh_common::record::Record;
use flowmesh_common::testkit::{
    TestWriter, drain_dead_letters, publish, queue_depth, unique_prefix,
};
use flowmesh_common::topology::Topology;
use flowmesh_common::writers::consumer::RecordStore;
use flowmesh_pg_writer::PgWriterConfig;
use flowmesh_pg_writer::store::{PgStore, migrate};
use flowmesh_pg_writer::testkit::{TestDb, rows};
use sqlx::Row;

fn record(source: &str, seq: u64) -> Record {
    flowmesh_common::testkit::record(source, seq, 91 + (seq % 10) as u8)
}

/// The value of `counter` (summed over its labels) in the writer's `/metrics`.
async fn counter(writer: &TestWriter, counter: &str) -> f64 {
    let (_, body) =
        flowmesh_common::http::get(writer.http_addr, "/metrics", Duration::from_secs(5))
            .await
            .expect("/metrics answers");
    body.lines()
        .filter(|line| line.starts_with(counter))
        .filter_map(|line| line.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// Three stores insert the same ids at once, each batch in a different order (forward,
/// reversed, shuffled). Inserted in arrival order, the batches would wait on each other's rows
/// in a cycle and PostgreSQL would abort one (a store error here: the store itself does not
/// retry); sorted by id, they never do.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_stores_inserting_the_same_ids_in_opposite_orders_never_deadlock() {
    let db = TestDb::create().await;
    let admin = db.pool().await;
    migrate(&admin).await.expect("migrations");
    let deadline = Duration::from_secs(30);
    let mut stores: Vec<PgStore> = Vec::new();
    for _ in 0..3 {
        stores.push(PgStore::new(db.pool().await, deadline));
    }
    let rounds = 20u64;
    let per_round = 400u64;
    for round in 0..rounds {
        let records: Vec<Record> = (1..=per_round)
            .map(|seq| record("pg-compete", round * per_round + seq))
            .collect();
        let forward = records.clone();
        let mut reversed = records.clone();
        reversed.reverse();
        let mut shuffled = records.clone();
        fastrand::shuffle(&mut shuffled);
        let [a, b, c] = &mut stores[..] else {
            unreachable!("three stores")
        };
        let (ra, rb, rc) = tokio::join!(a.store(&forward), b.store(&reversed), c.store(&shuffled));
        let mut stored = 0;
        for (which, result) in [("forward", ra), ("reversed", rb), ("shuffled", rc)] {
            let report = result
                .unwrap_or_else(|err| panic!("round {round}: the {which} batch failed: {err:#}"));
            assert_eq!(report.stored + report.duplicates, per_round);
            stored += report.stored;
        }
        assert_eq!(stored, per_round, "round {round}: each record stored once");
    }
    assert_eq!(rows(&admin).await, (rounds * per_round) as i64);
    drop(stores);
    admin.close().await;
    db.drop().await;
}

/// A deadlock the writer cannot avoid (another session holds a row of its batch and then waits
/// for one the writer inserted): PostgreSQL aborts the writer's insert, which is retried once
/// the other session is gone, counted as a conflict and not as a failure; the breaker stays
/// closed and nothing is dead-lettered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deadlock_with_another_session_is_retried_not_failed_nor_dead_lettered() {
    let db = TestDb::create().await;
    let pool = db.pool().await;
    migrate(&pool).await.expect("migrations");
    let prefix = unique_prefix("pg-deadlock");
    let topology = Topology::new(&prefix, 5);
    let writer = TestWriter::start(
        flowmesh_pg_writer::build(PgWriterConfig::for_tests(&db.url, &prefix))
            .await
            .expect("builds"),
    );
    writer.wait_connected().await;

    // Two records; the writer inserts them in id order, `low` first.
    let mut pair = [record("pg-deadlock", 1), record("pg-deadlock", 2)];
    pair.sort_by(|a, b| a.id.cmp(&b.id));
    let (low, high) = (pair[0].clone(), pair[1].clone());

    // Another session takes `high` first. Its own deadlock check waits a minute, so the
    // writer's (one second, PostgreSQL's default) is the one that finds the cycle.
    let mut other = pool.begin().await.expect("begin");
    sqlx::query("set local deadlock_timeout = '60s'")
        .execute(&mut *other)
        .await
        .expect("set deadlock_timeout");
    insert(&mut other, &high)
        .await
        .expect("the other session inserts high");

    // The writer's batch: `low` is inserted, `high` waits for the other session.
    publish(
        &topology,
        &topology.exchange,
        vec![message::encode(&[high.clone(), low.clone()])],
    )
    .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    // Now the other session waits for `low`, which the writer holds: a cycle. The writer is
    // aborted (40P01), which releases `low`, so this insert goes through.
    insert(&mut other, &low)
        .await
        .expect("the other session's insert of low completes once the writer is aborted");
    let conflicts = counter(&writer, "flowmesh_writer_store_conflicts_total").await;
    assert!(
        conflicts >= 1.0,
        "the writer's insert was aborted as a deadlock ({conflicts} conflicts counted)"
    );
    other.rollback().await.expect("rollback");

    // The writer's retry stores both.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while rows(&pool).await < 2 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the batch was not stored after the deadlock"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let queue = topology.queue_for("pg-writer").expect("queue").name.clone();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while queue_depth(&queue).await > 0 {
        assert!(tokio::time::Instant::now() < deadline, "left unacked");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(writer.breaker.state(), BreakerState::Closed);
    assert_eq!(
        counter(&writer, "flowmesh_writer_store_failures_total").await,
        0.0,
        "a lost conflict is not a failure of the database"
    );
    assert!(
        drain_dead_letters(&topology, 0, Duration::from_secs(1))
            .await
            .is_empty()
    );
    writer.finish().await;
    pool.close().await;
    db.drop().await;
}

/// Three pg-writers consume one queue whose messages carry the same records three times over,
/// packed in runs of 300, each run once forward, once reversed and once shuffled, one after the
/// other: with one message in hand each, the three writers store the same ids at the same time
/// in opposite orders (what redeliveries after a writer's crash, or a generator's resends, can
/// do). Every record is stored once, nothing is dead-lettered, and no writer counts a single
/// failed store: no conflict was left to the breaker.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_pg_writers_on_one_queue_with_overlapping_redeliveries_store_each_record_once() {
    let db = TestDb::create().await;
    let pool = db.pool().await;
    migrate(&pool).await.expect("migrations");
    let prefix = unique_prefix("pg-three");
    let topology = Topology::new(&prefix, 5);
    let total = 9000u64;
    let records: Vec<Record> = (1..=total).map(|seq| record("pg-three", seq)).collect();
    let mut messages = Vec::new();
    for run in records.chunks(300) {
        let mut reversed = run.to_vec();
        reversed.reverse();
        let mut shuffled = run.to_vec();
        fastrand::shuffle(&mut shuffled);
        messages.push(message::encode(run));
        messages.push(message::encode(&reversed));
        messages.push(message::encode(&shuffled));
    }
    publish(&topology, &topology.exchange, messages).await;

    let mut writers = Vec::new();
    for _ in 0..3 {
        let mut config = PgWriterConfig::for_tests(&db.url, &prefix);
        config.writer.consumer.prefetch = 1;
        writers.push(TestWriter::start(
            flowmesh_pg_writer::build(config).await.expect("builds"),
        ));
    }
    let queue = topology.queue_for("pg-writer").expect("queue").name.clone();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
    while queue_depth(&queue).await > 0 || rows(&pool).await < total as i64 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "not drained: {} queued, {} rows",
            queue_depth(&queue).await,
            rows(&pool).await
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(rows(&pool).await, total as i64, "each record stored once");
    let distinct: i64 = sqlx::query("select count(distinct seq) from records")
        .fetch_one(&pool)
        .await
        .expect("count")
        .get(0);
    assert_eq!(distinct, total as i64);
    for (i, writer) in writers.iter().enumerate() {
        assert_eq!(
            counter(writer, "flowmesh_writer_store_failures_total").await,
            0.0,
            "writer {i} counted a failed store"
        );
        assert_eq!(writer.breaker.state(), BreakerState::Closed, "writer {i}");
    }
    assert!(
        drain_dead_letters(&topology, 0, Duration::from_secs(1))
            .await
            .is_empty()
    );
    let last = writers.pop().expect("three");
    for writer in writers {
        writer.stop().await;
    }
    last.finish().await;
    pool.close().await;
    db.drop().await;
}

async fn insert(
    tx: &mut sqlx::Transaction<'_, sqlx::Postgres>,
    record: &Record,
) -> sqlx::Result<()> {
    sqlx::query(
        "insert into records (id, source, seq, ts, value, hash) values ($1::uuid, $2, $3, now(), $4, $5)",
    )
    .bind(&record.id)
    .bind(&record.source)
    .bind(record.seq as i64)
    .bind(i16::from(record.value))
    .bind(&record.hash)
    .execute(&mut **tx)
    .await
    .map(|_| ())
}
