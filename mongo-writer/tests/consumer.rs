//! mongo-writer against the real RabbitMQ with the in-memory store (no MongoDB can run on every
//! machine): nesting in queue order, a restart in the middle of a nested group, an unreachable
//! store that holds the messages in RabbitMQ, and poison messages dead-lettered.

use std::time::Duration;

use flowmesh_common::breaker::BreakerState;
use flowmesh_common::record::Record;
use flowmesh_common::testkit::unique_prefix;
use flowmesh_common::topology::{Topology, record_properties};
use flowmesh_filter::testing::{
    amqp_channel, delete_topology, drain_queue, eventually, publish, publish_records,
};
use flowmesh_mongo_writer::nesting::nests;
use flowmesh_mongo_writer::store::MemoryStore;
use flowmesh_mongo_writer::{Application, MongoWriterConfig};
use lapin::BasicProperties;
use tokio_util::sync::CancellationToken;

/// A valid record whose hash is above "99" (`high`) or not.
fn record(seq: u64, high: bool) -> Record {
    flowmesh_filter::testing::record_where("mongo-test", seq, 95, |hash| nests(hash) == high)
}

struct Writer {
    shutdown: CancellationToken,
    task: tokio::task::JoinHandle<anyhow::Result<()>>,
    breaker: flowmesh_common::breaker::Breaker,
}

async fn start(prefix: &str, memory: &MemoryStore, max_nest: usize) -> Writer {
    let mut config = MongoWriterConfig::for_tests(prefix);
    config.store = flowmesh_mongo_writer::config::StoreKind::Memory;
    config.max_nest = max_nest;
    let app = Application::build(config)
        .await
        .expect("builds")
        .with_memory_store(memory.clone());
    let breaker = app.breaker();
    let shutdown = CancellationToken::new();
    let task = tokio::spawn(app.run_until_stopped(shutdown.clone()));
    Writer {
        shutdown,
        task,
        breaker,
    }
}

impl Writer {
    async fn stop(self) {
        self.shutdown.cancel();
        tokio::time::timeout(Duration::from_secs(30), self.task)
            .await
            .expect("stops")
            .expect("task")
            .expect("clean");
    }
}

fn stored(memory: &MemoryStore) -> usize {
    memory.groups().iter().map(|g| g.records.len()).sum()
}

fn shape(memory: &MemoryStore) -> Vec<(bool, Vec<u64>)> {
    memory
        .groups()
        .iter()
        .map(|g| (g.nested, g.records.iter().map(|r| r.seq).collect()))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn records_are_nested_in_the_order_the_queue_delivers_them() {
    let prefix = unique_prefix("mongo-order");
    let topology = Topology::new(&prefix, 5);
    let memory = MemoryStore::new();
    let writer = start(&prefix, &memory, 3).await;
    let pattern = [
        false, true, true, true, true, false, true, false, false, true, true,
    ];
    let records: Vec<Record> = pattern
        .iter()
        .enumerate()
        .map(|(i, high)| record(i as u64 + 1, *high))
        .collect();
    publish_records(&topology, &records).await;
    eventually("all stored", Duration::from_secs(30), || {
        stored(&memory) == records.len()
    })
    .await;
    assert_eq!(
        shape(&memory),
        vec![
            (false, vec![1]),
            (true, vec![2, 3, 4]),
            (true, vec![5]),
            (false, vec![6]),
            (true, vec![7]),
            (false, vec![8]),
            (false, vec![9]),
            (true, vec![10, 11]),
        ]
    );
    writer.stop().await;
    delete_topology(&topology).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_in_the_middle_of_a_nested_group_continues_the_same_group() {
    let prefix = unique_prefix("mongo-restart");
    let topology = Topology::new(&prefix, 5);
    let memory = MemoryStore::new();
    let first = start(&prefix, &memory, 100).await;
    let records: Vec<Record> = (1..=10).map(|seq| record(seq, true)).collect();
    publish_records(&topology, &records[..5]).await;
    eventually("first half stored", Duration::from_secs(30), || {
        stored(&memory) == 5
    })
    .await;
    first.stop().await;
    // A new process: it knows nothing but what the store holds.
    let second = start(&prefix, &memory, 100).await;
    // Redeliveries of the first half come first and must not duplicate anything; the single
    // active consumer takes the queue in order, so once record 10 is stored they were handled.
    publish_records(&topology, &records[..2]).await;
    publish_records(&topology, &records[5..]).await;
    eventually("second half stored", Duration::from_secs(30), || {
        stored(&memory) == 10
    })
    .await;
    assert_eq!(shape(&memory), vec![(true, (1..=10).collect())]);
    second.stop().await;
    delete_topology(&topology).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_store_opens_the_breaker_and_nothing_is_lost_when_it_returns() {
    let prefix = unique_prefix("mongo-down");
    let topology = Topology::new(&prefix, 5);
    let memory = MemoryStore::new();
    memory.set_failing(true);
    let writer = start(&prefix, &memory, 100).await;
    let records: Vec<Record> = (1..=40).map(|seq| record(seq, seq % 3 != 0)).collect();
    publish_records(&topology, &records).await;
    let breaker = writer.breaker.clone();
    eventually("the breaker opens", Duration::from_secs(30), || {
        breaker.state() == BreakerState::Open
    })
    .await;
    memory.set_failing(false);
    eventually("everything stored", Duration::from_secs(60), || {
        stored(&memory) == 40
    })
    .await;
    writer.stop().await;
    delete_topology(&topology).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn poison_messages_are_dead_lettered_and_do_not_break_the_nesting() {
    let prefix = unique_prefix("mongo-poison");
    let topology = Topology::new(&prefix, 5);
    let memory = MemoryStore::new();
    let writer = start(&prefix, &memory, 100).await;
    let a = record(1, true);
    let b = record(2, true);
    publish(
        &topology,
        &topology.exchange,
        vec![
            (a.to_json().into_bytes(), record_properties(&a)),
            (b"garbage".to_vec(), BasicProperties::default()),
            (b.to_json().into_bytes(), record_properties(&b)),
        ],
    )
    .await;
    eventually("both stored", Duration::from_secs(30), || {
        stored(&memory) == 2
    })
    .await;
    assert_eq!(shape(&memory), vec![(true, vec![1, 2])]);
    let (connection, channel) = amqp_channel().await;
    let dead = drain_queue(
        &channel,
        &topology.dead_letter_queue.name,
        1,
        Duration::from_secs(20),
    )
    .await;
    assert_eq!(dead.len(), 1);
    assert_eq!(dead[0].data, b"garbage");
    let _ = connection.close(200, "ok".into()).await;
    writer.stop().await;
    delete_topology(&topology).await;
}
