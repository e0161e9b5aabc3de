//! pg-writer against the real RabbitMQ and PostgreSQL: a fresh database and a private topology
//! per test; PostgreSQL and RabbitMQ taken away through proxies this test controls.

use std::time::Duration;

use flowmesh_common::breaker::BreakerState;
use flowmesh_common::message;
use flowmesh_common::record::Record;
use flowmesh_common::testkit::{
    TestWriter, amqp_url, drain_dead_letters, eventually, proxy_url, publish, publish_records,
    queue_depth, unique_prefix,
};
use flowmesh_common::topology::{Topology, record_properties};
use flowmesh_pg_writer::PgWriterConfig;
use flowmesh_pg_writer::testkit::{TestDb, rows};
use lapin::BasicProperties;
use sqlx::{PgPool, Row};

/// One test's world: a fresh database and a private topology.
struct Case {
    name: &'static str,
    db: TestDb,
    pool: PgPool,
    prefix: String,
    topology: Topology,
}

impl Case {
    async fn new(name: &'static str) -> Self {
        let db = TestDb::create().await;
        let pool = db.pool().await;
        let prefix = unique_prefix(name);
        let topology = Topology::new(&prefix, 5);
        Self {
            name,
            db,
            pool,
            prefix,
            topology,
        }
    }

    /// The test defaults for a writer on this case's database and topology.
    fn config(&self) -> PgWriterConfig {
        PgWriterConfig::for_tests(&self.db.url, &self.prefix)
    }

    async fn start(&self, config: PgWriterConfig) -> TestWriter {
        TestWriter::start(flowmesh_pg_writer::build(config).await.expect("builds"))
    }

    /// Records `seqs` of this case's source, all bound for the broker.
    fn records(&self, seqs: std::ops::RangeInclusive<u64>) -> Vec<Record> {
        seqs.map(|seq| record(self.name, seq)).collect()
    }

    fn queue(&self) -> String {
        self.topology
            .queue_for("pg-writer")
            .expect("queue")
            .name
            .clone()
    }

    /// Waits (20 s at most) until the writer's queue holds nothing: every message acked.
    async fn wait_all_acked(&self) {
        let queue = self.queue();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        while queue_depth(&queue).await > 0 {
            assert!(
                tokio::time::Instant::now() < deadline,
                "messages left unacked"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    async fn finish(self, writer: TestWriter) {
        writer.finish().await;
        self.db.drop().await;
    }
}

fn record(source: &str, seq: u64) -> Record {
    flowmesh_common::testkit::record(source, seq, 91 + (seq % 10) as u8)
}

async fn wait_rows(pool: &PgPool, expected: i64, within: Duration) {
    let deadline = tokio::time::Instant::now() + within;
    loop {
        let count = rows(pool).await;
        if count == expected {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "expected {expected} rows, have {count}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn records_are_inserted_in_batches_with_every_field_and_acked_after_commit() {
    let case = Case::new("pg-batches").await;
    let writer = case.start(case.config()).await;
    let mut records = case.records(1..=1200);
    // Even seqs as a filter with routes sends them (provenance in the headers); odd ones as an
    // older filter did (none).
    for record in records.iter_mut().filter(|r| r.seq % 2 == 0) {
        record.provenance = Some(flowmesh_common::record::Provenance {
            version: "0123456789ab".into(),
            route: Some("hot".into()),
        });
    }
    publish_records(&case.topology, &records).await;
    let pool = &case.pool;
    wait_rows(pool, 1200, Duration::from_secs(60)).await;

    let sample = &records[41];
    let row =
        sqlx::query("select source, seq, ts, value, hash, received_at from records where id = $1")
            .bind(uuid::Uuid::parse_str(&sample.id).expect("uuid"))
            .fetch_one(pool)
            .await
            .expect("row");
    assert_eq!(row.get::<String, _>("source"), "pg-batches");
    assert_eq!(row.get::<i64, _>("seq"), 42);
    let ts: chrono::DateTime<chrono::Utc> = row.get("ts");
    assert_eq!(
        flowmesh_common::record::format_timestamp(ts),
        sample.timestamp
    );
    assert_eq!(row.get::<i16, _>("value"), i16::from(sample.value));
    assert_eq!(row.get::<String, _>("hash"), sample.hash);
    let read_back = flowmesh_pg_writer::store::records_of(pool, "pg-batches")
        .await
        .expect("read back");
    assert_eq!(read_back.len(), 1200);
    for stored in &read_back {
        let sent = &records[stored.seq as usize - 1];
        assert_eq!(stored.provenance, sent.provenance, "seq {}", stored.seq);
    }
    case.wait_all_acked().await;
    case.finish(writer).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn packed_messages_store_every_record_with_the_message_s_provenance_and_are_acked() {
    let case = Case::new("pg-packed").await;
    let writer = case.start(case.config()).await;
    let mut records = case.records(1..=1205);
    for record in &mut records {
        record.provenance = Some(flowmesh_common::record::Provenance {
            version: "0123456789ab".into(),
            route: Some(if record.seq <= 600 { "hot" } else { "warm" }.into()),
        });
    }
    // As the filter packs them: runs of at most 100 of one provenance; the last one alone.
    let mut messages: Vec<_> = records[..600]
        .chunks(100)
        .chain(records[600..1200].chunks(100))
        .map(message::encode)
        .collect();
    messages.extend(records[1200..].chunks(1).map(message::encode));
    publish(&case.topology, &case.topology.exchange, messages).await;
    wait_rows(&case.pool, 1205, Duration::from_secs(60)).await;
    let read_back = flowmesh_pg_writer::store::records_of(&case.pool, "pg-packed")
        .await
        .expect("read back");
    assert_eq!(read_back.len(), 1205);
    for stored in &read_back {
        let sent = &records[stored.seq as usize - 1];
        assert_eq!(stored.id, sent.id);
        assert_eq!(stored.provenance, sent.provenance, "seq {}", stored.seq);
    }
    case.wait_all_acked().await;
    case.finish(writer).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn duplicate_deliveries_and_records_already_committed_are_inserted_once() {
    let case = Case::new("pg-dupes").await;
    let writer = case.start(case.config()).await;
    let records = case.records(1..=50);
    publish_records(&case.topology, &records).await;
    wait_rows(&case.pool, 50, Duration::from_secs(30)).await;
    // As if the writer had committed and died before acking: everything comes again, twice.
    publish_records(&case.topology, &records).await;
    publish_records(&case.topology, &records[..10]).await;
    // One new record behind them: once it is stored, every redelivery before it was handled
    // (a single consumer takes the queue in order).
    publish_records(&case.topology, &case.records(51..=51)).await;
    wait_rows(&case.pool, 51, Duration::from_secs(30)).await;
    assert_eq!(rows(&case.pool).await, 51, "redeliveries change nothing");
    case.finish(writer).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn poison_messages_go_to_the_dead_letter_queue_and_the_rest_is_stored() {
    let case = Case::new("pg-poison").await;
    let topology = &case.topology;
    let writer = case.start(case.config()).await;
    let good = record("pg-poison", 1);
    let mut bad = serde_json::to_value(record("pg-poison", 2)).expect("json");
    bad["value"] = 250.into();
    publish(
        topology,
        &topology.exchange,
        vec![
            (b"{not json".to_vec(), BasicProperties::default()),
            (bad.to_string().into_bytes(), BasicProperties::default()),
            (good.to_json().into_bytes(), record_properties(&good)),
        ],
    )
    .await;
    wait_rows(&case.pool, 1, Duration::from_secs(30)).await;
    let dead = drain_dead_letters(topology, 2, Duration::from_secs(20)).await;
    let bodies: Vec<String> = dead
        .iter()
        .map(|d| String::from_utf8_lossy(&d.data).into_owned())
        .collect();
    assert_eq!(bodies.len(), 2, "{bodies:?}");
    assert!(bodies.contains(&"{not json".to_owned()));
    case.finish(writer).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgresql_going_away_while_records_flow_loses_nothing() {
    let case = Case::new("pg-outage").await;
    let (proxy, proxied) = proxy_url(&case.db.url).await;
    let mut config = PgWriterConfig::for_tests(&proxied, &case.prefix);
    config.writer.consumer.prefetch = 50;
    config.writer.consumer.batch_max = 50;
    let writer = case.start(config).await;
    let pool = &case.pool;
    publish_records(&case.topology, &case.records(1..=100)).await;
    wait_rows(pool, 100, Duration::from_secs(30)).await;

    proxy.cut();
    publish_records(&case.topology, &case.records(101..=400)).await;
    let breaker = writer.breaker.clone();
    eventually(
        "the PostgreSQL breaker opens",
        Duration::from_secs(60),
        || breaker.state() == BreakerState::Open,
    )
    .await;
    assert_eq!(rows(pool).await, 100);
    // The writer holds at most its prefetch; everything else waits in RabbitMQ.
    assert!(
        queue_depth(&case.queue()).await >= 250,
        "the messages wait in RabbitMQ, not in the writer"
    );

    proxy.heal();
    wait_rows(pool, 400, Duration::from_secs(60)).await;
    case.finish(writer).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rabbitmq_connection_killed_between_commit_and_ack_changes_nothing_on_redelivery() {
    let case = Case::new("pg-ackcut").await;
    let (proxy, proxied) = proxy_url(&amqp_url()).await;
    let mut config = case.config();
    config.writer.broker.url = proxied.as_str().into();
    config.writer.consumer.batch_max = 50;
    let writer = case.start(config).await;
    let pool = &case.pool;
    publish_records(&case.topology, &case.records(1..=2000)).await;
    // Cut the link as soon as commits start: batches committed but not yet acked come again.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while rows(pool).await == 0 {
        assert!(tokio::time::Instant::now() < deadline, "nothing stored");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    proxy.cut();
    tokio::time::sleep(Duration::from_millis(300)).await;
    proxy.heal();
    wait_rows(pool, 2000, Duration::from_secs(60)).await;
    let distinct: i64 = sqlx::query("select count(distinct seq) from records")
        .fetch_one(pool)
        .await
        .expect("q")
        .get(0);
    assert_eq!(distinct, 2000);
    case.finish(writer).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restarts_during_a_postgresql_outage_take_nothing_from_the_queue_and_dead_letter_nothing() {
    let case = Case::new("pg-restarts").await;
    let (proxy, proxied) = proxy_url(&case.db.url).await;
    // A low delivery limit: with writers that held messages through their restarts, the third
    // restart would dead-letter them.
    let config = || {
        let mut config = PgWriterConfig::for_tests(&proxied, &case.prefix);
        config.writer.broker.delivery_limit = 2;
        config
    };
    let topology = config().writer.broker.topology();
    let writer = case.start(config()).await;
    publish_records(&topology, &case.records(1..=100)).await;
    wait_rows(&case.pool, 100, Duration::from_secs(30)).await;

    proxy.cut();
    publish_records(&topology, &case.records(101..=400)).await;
    let breaker = writer.breaker.clone();
    eventually("the breaker opens", Duration::from_secs(60), || {
        breaker.state() == BreakerState::Open
    })
    .await;
    writer.stop().await;
    for _ in 0..5 {
        let writer = case.start(config()).await;
        // Connected to RabbitMQ, but consuming nothing while PostgreSQL is away.
        writer.wait_connected().await;
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert_eq!(queue_depth(&case.queue()).await, 300, "nothing was taken");
        writer.stop().await;
    }

    proxy.heal();
    let writer = case.start(config()).await;
    wait_rows(&case.pool, 400, Duration::from_secs(60)).await;
    let dead = drain_dead_letters(&topology, 0, Duration::from_secs(1)).await;
    assert!(dead.is_empty(), "{} records were dead-lettered", dead.len());
    case.finish(writer).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_database_url_with_sslmode_require_stores_over_tls() {
    let case = Case::new("pg-tls").await;
    let url = format!("{}?sslmode=require", case.db.url);
    let pool = PgPool::connect(&url).await.expect("TLS connection");
    let encrypted: bool = sqlx::query("select ssl from pg_stat_ssl where pid = pg_backend_pid()")
        .fetch_one(&pool)
        .await
        .expect("pg_stat_ssl")
        .get(0);
    assert!(encrypted, "the connection is encrypted");
    pool.close().await;
    let writer = case
        .start(PgWriterConfig::for_tests(&url, &case.prefix))
        .await;
    publish_records(&case.topology, &case.records(1..=10)).await;
    wait_rows(&case.pool, 10, Duration::from_secs(30)).await;
    case.finish(writer).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frozen_postgresql_costs_a_deadline_not_the_writer_and_loses_nothing() {
    let case = Case::new("pg-frozen").await;
    let (proxy, proxied) = proxy_url(&case.db.url).await;
    let config = || {
        let mut config = PgWriterConfig::for_tests(&proxied, &case.prefix);
        config.writer.consumer.store_timeout = Duration::from_secs(2);
        config.writer.service.grace = Duration::from_secs(6);
        config
    };
    let writer = case.start(config()).await;
    publish_records(&case.topology, &case.records(1..=100)).await;
    wait_rows(&case.pool, 100, Duration::from_secs(30)).await;

    // The server takes the connection's bytes and never answers: without a deadline the
    // insert in hand would wait for ever and the breaker would never learn of it.
    proxy.freeze();
    publish_records(&case.topology, &case.records(101..=300)).await;
    let breaker = writer.breaker.clone();
    eventually(
        "store calls end at their deadline and open the breaker",
        Duration::from_secs(60),
        || breaker.state() == BreakerState::Open,
    )
    .await;
    proxy.thaw();
    wait_rows(&case.pool, 300, Duration::from_secs(60)).await;
    case.wait_all_acked().await;

    // Stopped while frozen mid-insert, the writer still ends within its grace period.
    proxy.freeze();
    publish_records(&case.topology, &case.records(301..=320)).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let stopping = std::time::Instant::now();
    writer.stop().await;
    let took = stopping.elapsed();
    assert!(
        took < Duration::from_secs(6 + 2),
        "the writer took {took:?} to stop during a freeze (grace 6 s)"
    );
    proxy.thaw();
    let writer = case.start(config()).await;
    wait_rows(&case.pool, 320, Duration::from_secs(60)).await;
    case.wait_all_acked().await;
    let dead = drain_dead_letters(&case.topology, 0, Duration::from_secs(1)).await;
    assert!(dead.is_empty(), "{} records were dead-lettered", dead.len());
    case.finish(writer).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stopping_a_writer_in_a_backlog_costs_its_messages_no_delivery_attempt() {
    let case = Case::new("pg-stops").await;
    // A low delivery limit: a stop that returned what the writer had been handed would
    // dead-letter healthy records by the third stop.
    let config = || {
        let mut config = case.config();
        config.writer.broker.delivery_limit = 2;
        config.writer.consumer.batch_max = 10;
        config.writer.consumer.prefetch = 500;
        config
    };
    let topology = config().writer.broker.topology();
    let total = 20_000;
    publish_records(&topology, &case.records(1..=total)).await;
    for _ in 0..6 {
        let writer = case.start(config()).await;
        let before = rows(&case.pool).await;
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        while rows(&case.pool).await <= before {
            assert!(tokio::time::Instant::now() < deadline, "nothing stored");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        writer.stop().await;
    }
    let writer = case.start(config()).await;
    wait_rows(&case.pool, total as i64, Duration::from_secs(120)).await;
    let dead = drain_dead_letters(&topology, 0, Duration::from_secs(1)).await;
    assert!(dead.is_empty(), "{} records were dead-lettered", dead.len());
    case.finish(writer).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_row_postgresql_refuses_for_good_is_dead_lettered_alone_and_its_batch_stored() {
    let case = Case::new("pg-refused").await;
    flowmesh_pg_writer::store::migrate(&case.pool)
        .await
        .expect("migrations");
    // A rule someone added to the table that one record breaks.
    sqlx::query("alter table records add constraint not_seven check (seq <> 7)")
        .execute(&case.pool)
        .await
        .expect("constraint");
    let records = case.records(1..=20);
    publish_records(&case.topology, &records).await;
    let writer = case.start(case.config()).await;
    wait_rows(&case.pool, 19, Duration::from_secs(30)).await;
    let dead = drain_dead_letters(&case.topology, 1, Duration::from_secs(20)).await;
    let bodies: Vec<String> = dead
        .iter()
        .map(|d| String::from_utf8_lossy(&d.data).into_owned())
        .collect();
    assert_eq!(bodies, vec![records[6].to_json()], "only seq 7, alone");
    case.wait_all_acked().await;
    assert_eq!(writer.breaker.state(), BreakerState::Closed);
    case.finish(writer).await;
}
