//! pg-writer against the real RabbitMQ and PostgreSQL: a fresh database and a private topology
//! per test; PostgreSQL and RabbitMQ taken away through proxies this test controls.

use std::time::Duration;

use flowmesh_common::breaker::BreakerState;
use flowmesh_common::record::Record;
use flowmesh_common::testkit::{Proxy, unique_prefix};
use flowmesh_common::topology::{Topology, record_properties};
use flowmesh_filter::testing::{
    amqp_channel, amqp_url, delete_topology, drain_queue, eventually, publish, publish_records,
};
use flowmesh_pg_writer::testing::{TestDb, base_url};
use flowmesh_pg_writer::{Application, PgWriterConfig};
use lapin::BasicProperties;
use lapin::options::QueueDeclareOptions;
use lapin::types::FieldTable;
use sqlx::{PgPool, Row};
use tokio_util::sync::CancellationToken;

struct Running {
    shutdown: CancellationToken,
    task: tokio::task::JoinHandle<anyhow::Result<()>>,
    breaker: flowmesh_common::breaker::Breaker,
}

impl Running {
    async fn start(config: PgWriterConfig) -> Self {
        let app = Application::build(config).await.expect("builds");
        let breaker = app.breaker();
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(app.run_until_stopped(shutdown.clone()));
        Self {
            shutdown,
            task,
            breaker,
        }
    }

    async fn stop(self) {
        self.shutdown.cancel();
        tokio::time::timeout(Duration::from_secs(30), self.task)
            .await
            .expect("stops in time")
            .expect("task")
            .expect("clean stop");
    }
}

fn record(source: &str, seq: u64) -> Record {
    flowmesh_filter::testing::record(source, seq, 91 + (seq % 10) as u8)
}

async fn rows(pool: &PgPool) -> i64 {
    match sqlx::query("select count(*) from records")
        .fetch_one(pool)
        .await
    {
        Ok(row) => row.get(0),
        Err(_) => 0, // the table does not exist before the first migration
    }
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

async fn queue_depth(queue: &str) -> u32 {
    let (connection, channel) = amqp_channel().await;
    let passive = QueueDeclareOptions {
        passive: true,
        ..QueueDeclareOptions::default()
    };
    let depth = channel
        .queue_declare(queue.into(), passive, FieldTable::default())
        .await
        .expect("queue")
        .message_count();
    let _ = connection.close(200, "ok".into()).await;
    depth
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn records_are_inserted_in_batches_with_every_field_and_acked_after_commit() {
    let db = TestDb::create().await;
    let prefix = unique_prefix("pg-batches");
    let topology = Topology::new(&prefix, 5);
    let writer = Running::start(PgWriterConfig::for_tests(&db.url, &prefix)).await;
    let records: Vec<Record> = (1..=1200).map(|seq| record("pg-batches", seq)).collect();
    publish_records(&topology, &records).await;
    let pool = db.pool().await;
    wait_rows(&pool, 1200, Duration::from_secs(60)).await;

    let sample = &records[41];
    let row =
        sqlx::query("select source, seq, ts, value, hash, received_at from records where id = $1")
            .bind(uuid::Uuid::parse_str(&sample.id).expect("uuid"))
            .fetch_one(&pool)
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
    let queue = &topology.queue_for("pg-writer").expect("queue").name;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while queue_depth(queue).await > 0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "messages left unacked"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    writer.stop().await;
    delete_topology(&topology).await;
    db.drop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn duplicate_deliveries_and_records_already_committed_are_inserted_once() {
    let db = TestDb::create().await;
    let prefix = unique_prefix("pg-dupes");
    let topology = Topology::new(&prefix, 5);
    let writer = Running::start(PgWriterConfig::for_tests(&db.url, &prefix)).await;
    let records: Vec<Record> = (1..=50).map(|seq| record("pg-dupes", seq)).collect();
    publish_records(&topology, &records).await;
    let pool = db.pool().await;
    wait_rows(&pool, 50, Duration::from_secs(30)).await;
    // As if the writer had committed and died before acking: everything comes again, twice.
    publish_records(&topology, &records).await;
    publish_records(&topology, &records[..10]).await;
    // One new record behind them: once it is stored, every redelivery before it was handled
    // (a single consumer takes the queue in order).
    publish_records(&topology, &[record("pg-dupes", 51)]).await;
    wait_rows(&pool, 51, Duration::from_secs(30)).await;
    assert_eq!(rows(&pool).await, 51, "redeliveries change nothing");
    writer.stop().await;
    delete_topology(&topology).await;
    db.drop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn poison_messages_go_to_the_dead_letter_queue_and_the_rest_is_stored() {
    let db = TestDb::create().await;
    let prefix = unique_prefix("pg-poison");
    let topology = Topology::new(&prefix, 5);
    let writer = Running::start(PgWriterConfig::for_tests(&db.url, &prefix)).await;
    let good = record("pg-poison", 1);
    let mut bad = serde_json::to_value(record("pg-poison", 2)).expect("json");
    bad["value"] = 250.into();
    publish(
        &topology,
        &topology.exchange,
        vec![
            (b"{not json".to_vec(), BasicProperties::default()),
            (bad.to_string().into_bytes(), BasicProperties::default()),
            (good.to_json().into_bytes(), record_properties(&good)),
        ],
    )
    .await;
    let pool = db.pool().await;
    wait_rows(&pool, 1, Duration::from_secs(30)).await;
    let (connection, channel) = amqp_channel().await;
    let dead = drain_queue(
        &channel,
        &topology.dead_letter_queue.name,
        2,
        Duration::from_secs(20),
    )
    .await;
    let bodies: Vec<String> = dead
        .iter()
        .map(|d| String::from_utf8_lossy(&d.data).into_owned())
        .collect();
    assert_eq!(bodies.len(), 2, "{bodies:?}");
    assert!(bodies.contains(&"{not json".to_owned()));
    let _ = connection.close(200, "ok".into()).await;
    writer.stop().await;
    delete_topology(&topology).await;
    db.drop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgresql_going_away_while_records_flow_loses_nothing() {
    let db = TestDb::create().await;
    let host = base_url()
        .split('@')
        .nth(1)
        .and_then(|s| s.split('/').next())
        .unwrap_or("127.0.0.1:5432")
        .to_owned();
    let upstream = tokio::net::lookup_host(&host)
        .await
        .expect("resolve")
        .next()
        .expect("addr");
    let proxy = Proxy::start(upstream).await.expect("proxy");
    let proxied = db.url.replacen(&host, &proxy.addr().to_string(), 1);
    let prefix = unique_prefix("pg-outage");
    let topology = Topology::new(&prefix, 5);
    let mut config = PgWriterConfig::for_tests(&proxied, &prefix);
    config.prefetch = 50;
    config.batch_max = 50;
    let writer = Running::start(config).await;
    let pool = db.pool().await;
    publish_records(
        &topology,
        &(1..=100)
            .map(|s| record("pg-outage", s))
            .collect::<Vec<_>>(),
    )
    .await;
    wait_rows(&pool, 100, Duration::from_secs(30)).await;

    proxy.cut();
    publish_records(
        &topology,
        &(101..=400)
            .map(|s| record("pg-outage", s))
            .collect::<Vec<_>>(),
    )
    .await;
    let breaker = writer.breaker.clone();
    eventually(
        "the PostgreSQL breaker opens",
        Duration::from_secs(60),
        || breaker.state() == BreakerState::Open,
    )
    .await;
    assert_eq!(rows(&pool).await, 100);
    let queue = topology.queue_for("pg-writer").expect("queue").name.clone();
    // The writer holds at most its prefetch; everything else waits in RabbitMQ.
    assert!(
        queue_depth(&queue).await >= 250,
        "the messages wait in RabbitMQ, not in the writer"
    );

    proxy.heal();
    wait_rows(&pool, 400, Duration::from_secs(60)).await;
    writer.stop().await;
    delete_topology(&topology).await;
    db.drop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rabbitmq_connection_killed_between_commit_and_ack_changes_nothing_on_redelivery() {
    let db = TestDb::create().await;
    let amqp = amqp_url();
    let host = amqp
        .split('@')
        .nth(1)
        .and_then(|s| s.split('/').next())
        .unwrap_or("127.0.0.1:5672")
        .to_owned();
    let upstream = tokio::net::lookup_host(&host)
        .await
        .expect("resolve")
        .next()
        .expect("addr");
    let proxy = Proxy::start(upstream).await.expect("proxy");
    let prefix = unique_prefix("pg-ackcut");
    let topology = Topology::new(&prefix, 5);
    let mut config = PgWriterConfig::for_tests(&db.url, &prefix);
    config.amqp_url = amqp.replacen(&host, &proxy.addr().to_string(), 1);
    config.batch_max = 50;
    let writer = Running::start(config).await;
    let pool = db.pool().await;
    publish_records(
        &topology,
        &(1..=2000)
            .map(|s| record("pg-ackcut", s))
            .collect::<Vec<_>>(),
    )
    .await;
    // Cut the link as soon as commits start: batches committed but not yet acked come again.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while rows(&pool).await == 0 {
        assert!(tokio::time::Instant::now() < deadline, "nothing stored");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    proxy.cut();
    tokio::time::sleep(Duration::from_millis(300)).await;
    proxy.heal();
    wait_rows(&pool, 2000, Duration::from_secs(60)).await;
    let distinct: i64 = sqlx::query("select count(distinct seq) from records")
        .fetch_one(&pool)
        .await
        .expect("q")
        .get(0);
    assert_eq!(distinct, 2000);
    writer.stop().await;
    delete_topology(&topology).await;
    db.drop().await;
}
