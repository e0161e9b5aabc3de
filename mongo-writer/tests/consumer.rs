//! mongo-writer against the real RabbitMQ with the in-memory store (no MongoDB can run on every
//! machine): nesting in queue order, a restart in the middle of a nested group, an unreachable
//! store that holds the messages in RabbitMQ, poison messages dead-lettered, packed messages
//! (with bad lines among them), and one failed
//! store call in the middle of a backlog.

use std::time::Duration;

use flowmesh_common::breaker::BreakerState;
use flowmesh_common::message;
use flowmesh_common::record::Record;
use flowmesh_common::testkit::unique_prefix;
use flowmesh_common::testkit::{
    TestWriter, drain_dead_letters, eventually, publish, publish_records, queue_depth,
};
use flowmesh_common::topology::{HEADER_DEAD_LETTER_REASON, Topology, record_properties};
use flowmesh_mongo_writer::groups::Groups;
use flowmesh_mongo_writer::nesting::nests;
use flowmesh_mongo_writer::store::MemoryStore;
use flowmesh_mongo_writer::{MongoWriterConfig, build_with};
use lapin::BasicProperties;
use lapin::types::AMQPValue;

/// A valid record whose hash is above "99" (`high`) or not.
fn record(seq: u64, high: bool) -> Record {
    flowmesh_common::testkit::record_where("mongo-test", seq, 95, |hash| nests(hash) == high)
}

async fn start(prefix: &str, memory: &MemoryStore, max_nest: usize) -> TestWriter {
    let mut config = MongoWriterConfig::for_tests(prefix);
    config.store = flowmesh_mongo_writer::config::StoreKind::Memory;
    config.max_nest = max_nest;
    let groups = Groups::Memory(memory.clone());
    TestWriter::start(build_with(config, groups).await.expect("builds"))
}

/// Lets the store work again and waits until it holds `count` records; then stops the writer.
async fn heal_and_expect_all(memory: &MemoryStore, count: usize, writer: TestWriter) {
    memory.set_failing(false);
    eventually("everything stored", Duration::from_secs(60), || {
        stored(memory) == count
    })
    .await;
    writer.finish().await;
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
    writer.finish().await;
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
    second.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_store_opens_the_breaker_and_nothing_is_lost_when_it_returns() {
    let prefix = unique_prefix("mongo-down");
    let topology = Topology::new(&prefix, 5);
    let memory = MemoryStore::new();
    let writer = start(&prefix, &memory, 100).await;
    let records: Vec<Record> = (1..=40).map(|seq| record(seq, seq % 3 != 0)).collect();
    publish_records(&topology, &records[..10]).await;
    eventually("the first records stored", Duration::from_secs(30), || {
        stored(&memory) == 10
    })
    .await;
    memory.set_failing(true);
    publish_records(&topology, &records[10..]).await;
    let breaker = writer.breaker.clone();
    eventually("the breaker opens", Duration::from_secs(30), || {
        breaker.state() == BreakerState::Open
    })
    .await;
    heal_and_expect_all(&memory, 40, writer).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_writer_started_while_its_store_is_down_takes_nothing_until_it_is_back() {
    let prefix = unique_prefix("mongo-gate");
    let topology = Topology::new(&prefix, 5);
    let queue = topology
        .queue_for("mongo-writer")
        .expect("queue")
        .name
        .clone();
    let memory = MemoryStore::new();
    memory.set_failing(true);
    let records: Vec<Record> = (1..=40).map(|seq| record(seq, seq % 3 != 0)).collect();
    publish_records(&topology, &records).await;
    let writer = start(&prefix, &memory, 100).await;
    writer.wait_connected().await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        queue_depth(&queue).await,
        40,
        "nothing was taken from the queue"
    );
    heal_and_expect_all(&memory, 40, writer).await;
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
    let dead = drain_dead_letters(&topology, 1, Duration::from_secs(20)).await;
    assert_eq!(dead.len(), 1);
    assert_eq!(dead[0].data, b"garbage");
    writer.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn packed_messages_nest_like_their_records_sent_alone_and_only_bad_lines_are_dead_lettered() {
    let prefix = unique_prefix("mongo-packed");
    let topology = Topology::new(&prefix, 5);
    let memory = MemoryStore::new();
    let writer = start(&prefix, &memory, 100).await;
    let pattern = [true, true, false, true, true, true, false, true];
    let r: Vec<Record> = pattern
        .iter()
        .enumerate()
        .map(|(i, high)| record(i as u64 + 1, *high))
        .collect();
    let (_, packed) = message::encode(&r[..2]);
    let partly_bad = format!("{}\nnot a record\n{}", r[3].to_json(), r[4].to_json());
    publish(
        &topology,
        &topology.exchange,
        vec![
            message::encode(&r[..3]),
            (partly_bad.into_bytes(), packed.clone()),
            (b"junk one\njunk two".to_vec(), packed),
            message::encode(&r[5..6]),
            message::encode(&r[6..]),
        ],
    )
    .await;
    eventually("the valid records stored", Duration::from_secs(30), || {
        stored(&memory) == r.len()
    })
    .await;
    // Exactly what the same records give one message each, in the same order.
    assert_eq!(
        shape(&memory),
        vec![
            (true, vec![1, 2]),
            (false, vec![3]),
            (true, vec![4, 5, 6]),
            (false, vec![7]),
            (true, vec![8]),
        ]
    );
    let mut dead = drain_dead_letters(&topology, 2, Duration::from_secs(20)).await;
    // The bad line first (a message without a record is dead-lettered at once, a bad line once
    // its message's records are stored, so their order depends on the batches).
    dead.sort_by(|a, b| b.data.cmp(&a.data));
    let bodies: Vec<&[u8]> = dead.iter().map(|d| d.data.as_slice()).collect();
    assert_eq!(
        bodies,
        vec![&b"not a record"[..], &b"junk one\njunk two"[..]]
    );
    let header = |d: &lapin::message::Delivery, key: &str| {
        d.properties
            .headers()
            .as_ref()
            .and_then(|h| h.inner().get(key).cloned())
    };
    assert_eq!(
        header(&dead[0], message::HEADER_RECORDS),
        Some(AMQPValue::LongLongInt(1)),
        "the dead letter counts its own lines"
    );
    match header(&dead[0], HEADER_DEAD_LETTER_REASON) {
        Some(AMQPValue::LongString(reason)) => {
            assert!(reason.to_string().contains("line 2"), "{reason}")
        }
        other => panic!("no reason: {other:?}"),
    }
    let (_, metrics) =
        flowmesh_common::http::get(writer.http_addr, "/metrics", Duration::from_secs(5))
            .await
            .expect("metrics");
    let counted =
        r#"flowmesh_writer_records_total{writer="mongo-writer",outcome="dead_lettered"} 3"#;
    assert!(
        metrics.lines().any(|line| line == counted),
        "one bad line and a whole message of two counted: {metrics}"
    );
    writer.stop().await;
    assert_eq!(
        queue_depth(&topology.queue_for("mongo-writer").expect("queue").name).await,
        0,
        "every message acked, the partly bad one too"
    );
    flowmesh_common::testkit::delete_topology(&topology).await;
}

/// A consumer run on its own (no writer shell) with `store`: the store counts as answering (the
/// gate is open) and its breaker has the defaults.
struct Consuming {
    shutdown: tokio_util::sync::CancellationToken,
    task: tokio::task::JoinHandle<()>,
    breaker: flowmesh_common::breaker::Breaker,
    link: flowmesh_common::link::LinkStatus,
}

impl Consuming {
    /// Consumes `topology`'s mongo-writer queue through `url` (one node or several, tried in
    /// order), `batch_max` records a batch at most, waiting `linger` for more.
    fn start<S: flowmesh_common::writers::consumer::RecordStore>(
        url: String,
        topology: &Topology,
        store: S,
        batch_max: usize,
        linger: Duration,
    ) -> Self {
        use flowmesh_common::breaker::{Breaker, BreakerSettings};
        use flowmesh_common::writers::consumer::{self, ConsumerProgress, ConsumerSettings};
        let settings = ConsumerSettings {
            nodes: flowmesh_common::nodes::Nodes::in_order(&url).expect("AMQP URL"),
            topology: topology.clone(),
            writer: "mongo-writer",
            partition: None,
            prefetch: 500,
            batch_max,
            linger,
            store_timeout: Duration::from_secs(10),
        };
        let shutdown = tokio_util::sync::CancellationToken::new();
        let breaker = Breaker::new("mongodb", BreakerSettings::default());
        let link = flowmesh_common::link::LinkStatus::new("amqp");
        let task = tokio::spawn(consumer::run(
            settings,
            store,
            breaker.clone(),
            link.clone(),
            std::sync::Arc::new(|| true),
            std::sync::Arc::new(ConsumerProgress::default()),
            shutdown.clone(),
        ));
        Self {
            shutdown,
            task,
            breaker,
            link,
        }
    }

    async fn stop(self) {
        self.shutdown.cancel();
        self.task.await.expect("consumer ends");
    }
}

/// Wraps the writer's store (in memory, nesting up to 100) with a check that sees each call's
/// records first and may fail the call, after `delay` (the time a database takes; RabbitMQ
/// keeps delivering up to the prefetch meanwhile).
struct Hooked<F> {
    inner: flowmesh_mongo_writer::store::NestingStore<Groups>,
    delay: Duration,
    check: F,
}

impl<F> Hooked<F> {
    fn new(memory: &MemoryStore, delay: Duration, check: F) -> Self {
        let inner =
            flowmesh_mongo_writer::store::NestingStore::new(Groups::Memory(memory.clone()), 100);
        Self {
            inner,
            delay,
            check,
        }
    }
}

impl<F> flowmesh_common::writers::consumer::RecordStore for Hooked<F>
where
    F: FnMut(&[Record]) -> anyhow::Result<()> + Send + 'static,
{
    async fn store(
        &mut self,
        records: &[Record],
    ) -> anyhow::Result<flowmesh_common::writers::consumer::StoreReport> {
        let checked = (self.check)(records);
        tokio::time::sleep(self.delay).await;
        checked?;
        self.inner.store(records).await
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_store_failure_in_a_backlog_retries_that_batch_first_and_keeps_queue_order() {
    use std::sync::{Arc, Mutex};

    let prefix = unique_prefix("mongo-backlog");
    let topology = Topology::new(&prefix, 5);
    let memory = MemoryStore::new();
    let count = 600u64;
    let records: Vec<Record> = (1..=count).map(|seq| record(seq, seq % 3 != 0)).collect();
    // A backlog, so the consumer has deliveries in hand while it stores.
    publish_records(&topology, &records).await;

    let calls = Arc::new(Mutex::new(Vec::new()));
    let fail_at = 3;
    // Notes each call's seqs and fails one call once (an outage of one attempt).
    let noted = calls.clone();
    let probe = Hooked::new(
        &memory,
        Duration::from_millis(50),
        move |records: &[Record]| {
            let mut calls = noted.lock().expect("calls");
            calls.push(records.iter().map(|r| r.seq).collect::<Vec<u64>>());
            if calls.len() - 1 == fail_at {
                anyhow::bail!("the database went away for one attempt");
            }
            Ok(())
        },
    );
    let queue = topology
        .queue_for("mongo-writer")
        .expect("queue")
        .name
        .clone();
    let consuming = Consuming::start(
        flowmesh_common::testkit::amqp_url(),
        &topology,
        probe,
        50,
        Duration::ZERO,
    );
    eventually("everything stored", Duration::from_secs(60), || {
        stored(&memory) == count as usize
    })
    .await;
    consuming.stop().await;

    let calls = calls.lock().expect("calls").clone();
    assert!(
        calls.len() > fail_at + 1,
        "the failure came before the end: {calls:?}"
    );
    // The failed batch is tried again before anything else.
    assert_eq!(calls[fail_at], calls[fail_at + 1]);
    let stored_in_order: Vec<u64> = calls
        .iter()
        .enumerate()
        .filter(|(i, _)| *i != fail_at)
        .flat_map(|(_, seqs)| seqs.iter().copied())
        .collect();
    assert_eq!(stored_in_order, (1..=count).collect::<Vec<_>>());
    // Nested exactly as a writer storing them one by one in queue order would.
    let expected: Vec<(bool, Vec<u64>)> = {
        let mut groups: Vec<(bool, Vec<u64>)> = Vec::new();
        for seq in 1..=count {
            let high = seq % 3 != 0;
            match groups.last_mut() {
                Some((true, seqs)) if high && seqs.len() < 100 => seqs.push(seq),
                _ => groups.push((high, vec![seq])),
            }
        }
        groups
    };
    assert_eq!(shape(&memory), expected);
    // Everything acked: nothing came back to the queue when the consumer closed.
    assert_eq!(queue_depth(&queue).await, 0);
    flowmesh_common::testkit::delete_topology(&topology).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_record_refused_for_good_is_dead_lettered_alone_and_the_rest_of_its_batch_is_stored() {
    let prefix = unique_prefix("mongo-split");
    let topology = Topology::new(&prefix, 5);
    let memory = MemoryStore::new();
    let records: Vec<Record> = (1..=40).map(|seq| record(seq, seq % 4 != 0)).collect();
    // One backlog, so they come as one batch: 1–20 a message each, 21–40 packed by ten.
    let mut messages: Vec<_> = records[..20]
        .iter()
        .map(|r| (r.to_json().into_bytes(), record_properties(r)))
        .collect();
    messages.extend(records[20..].chunks(10).map(message::encode));
    publish(&topology, &topology.exchange, messages).await;

    let refused = vec![7, 26];
    // Refuses for good (as a document validation failure would) every call holding a refused
    // seq.
    let bad = refused.clone();
    let store = Hooked::new(
        &memory,
        Duration::ZERO,
        move |records: &[Record]| match records.iter().find(|r| bad.contains(&r.seq)) {
            Some(record) => Err(flowmesh_common::writers::consumer::Permanent(format!(
                "document failed validation (seq {})",
                record.seq
            ))
            .into()),
            None => Ok(()),
        },
    );
    let queue = topology
        .queue_for("mongo-writer")
        .expect("queue")
        .name
        .clone();
    let consuming = Consuming::start(
        flowmesh_common::testkit::amqp_url(),
        &topology,
        store,
        100,
        Duration::from_millis(200),
    );
    let breaker = consuming.breaker.clone();
    eventually("every other record stored", Duration::from_secs(60), || {
        stored(&memory) == 38
    })
    .await;
    let dead = drain_dead_letters(&topology, 2, Duration::from_secs(20)).await;
    let bodies: Vec<String> = dead
        .iter()
        .map(|d| String::from_utf8_lossy(&d.data).into_owned())
        .collect();
    let expected: Vec<String> = refused
        .iter()
        .map(|&seq| records[seq as usize - 1].to_json())
        .collect();
    assert_eq!(bodies, expected, "only the refused records, each alone");
    consuming.stop().await;
    assert_eq!(
        breaker.state(),
        BreakerState::Closed,
        "the database never failed"
    );
    let kept = stored_seqs_sorted(&memory);
    let all_but_refused: Vec<u64> = (1..=40).filter(|s| !refused.contains(s)).collect();
    assert_eq!(kept, all_but_refused);
    assert_eq!(queue_depth(&queue).await, 0, "every message settled");
    flowmesh_common::testkit::delete_topology(&topology).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_line_of_a_packed_message_is_dead_lettered_once_however_often_its_message_returns() {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

    let prefix = unique_prefix("mongo-badline-once");
    let topology = Topology::new(&prefix, 5);
    let memory = MemoryStore::new();
    let r: Vec<Record> = (1..=2).map(|seq| record(seq, true)).collect();
    let (_, packed) = message::encode(&r);
    let partly_bad = format!("{}\nnot a record\n{}", r[0].to_json(), r[1].to_json());
    publish(
        &topology,
        &topology.exchange,
        vec![(partly_bad.into_bytes(), packed)],
    )
    .await;
    let (proxy, proxied) =
        flowmesh_common::testkit::proxy_url(&flowmesh_common::testkit::amqp_url()).await;
    let works = Arc::new(AtomicBool::new(false));
    let calls = Arc::new(AtomicUsize::new(0));
    // Every call fails (as a database away would) until `works` is set.
    let (working, counted) = (works.clone(), calls.clone());
    let store = Hooked::new(&memory, Duration::ZERO, move |_: &[Record]| {
        counted.fetch_add(1, Ordering::SeqCst);
        if !working.load(Ordering::SeqCst) {
            anyhow::bail!("the database is away");
        }
        Ok(())
    });
    let consuming = Consuming::start(proxied, &topology, store, 100, Duration::ZERO);
    // Three times: the message is taken, its store fails, the connection is lost (RabbitMQ
    // returns the message), and it is taken again by the next session.
    for round in 1..=3 {
        let before = calls.load(Ordering::SeqCst);
        eventually("the batch is tried", Duration::from_secs(30), || {
            calls.load(Ordering::SeqCst) > before
        })
        .await;
        proxy.cut();
        tokio::time::sleep(Duration::from_millis(300)).await;
        proxy.heal();
        if round < 3 {
            // The session learns of the loss at its next AMQP call: let one batch through so
            // it acks (and fails), then fail again.
            works.store(true, Ordering::SeqCst);
            tokio::time::sleep(Duration::from_millis(50)).await;
            works.store(false, Ordering::SeqCst);
        }
    }
    works.store(true, Ordering::SeqCst);
    eventually("the valid records stored", Duration::from_secs(60), || {
        stored(&memory) == 2
    })
    .await;
    let dead = drain_dead_letters(&topology, 1, Duration::from_secs(5)).await;
    let bodies: Vec<&[u8]> = dead.iter().map(|d| d.data.as_slice()).collect();
    assert_eq!(bodies, vec![&b"not a record"[..]], "the bad line, once");
    consuming.stop().await;
    flowmesh_common::testkit::delete_topology(&topology).await;
}

/// The writer's store, except that a batch holding `poison` "crashes the writer": the link to
/// RabbitMQ is cut (everything in hand goes back to the queue, its delivery count raised) and
/// nothing is stored. Every call's seqs are noted.
struct Crashing {
    inner: flowmesh_mongo_writer::store::NestingStore<Groups>,
    proxy: std::sync::Arc<flowmesh_common::testkit::Proxy>,
    poison: u64,
    calls: std::sync::Arc<std::sync::Mutex<Vec<Vec<u64>>>>,
}

impl flowmesh_common::writers::consumer::RecordStore for Crashing {
    async fn store(
        &mut self,
        records: &[Record],
    ) -> anyhow::Result<flowmesh_common::writers::consumer::StoreReport> {
        let seqs: Vec<u64> = records.iter().map(|r| r.seq).collect();
        let crash = seqs.contains(&self.poison);
        self.calls.lock().expect("calls").push(seqs);
        if crash {
            self.proxy.cut();
            tokio::time::sleep(Duration::from_millis(300)).await;
            self.proxy.heal();
            // The session is gone: its ack cannot reach RabbitMQ, which has the batch back.
            return Ok(flowmesh_common::writers::consumer::StoreReport::default());
        }
        self.inner.store(records).await
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_that_keeps_ending_sessions_reaches_the_delivery_limit_alone() {
    use std::sync::{Arc, Mutex};

    let prefix = unique_prefix("mongo-suspect");
    let topology = Topology::new(&prefix, 5);
    let memory = MemoryStore::new();
    let count = 40u64;
    let poison = 7u64;
    let records: Vec<Record> = (1..=count).map(|seq| record(seq, false)).collect();
    publish_records(&topology, &records).await;
    let (proxy, proxied) =
        flowmesh_common::testkit::proxy_url(&flowmesh_common::testkit::amqp_url()).await;
    let calls = Arc::new(Mutex::new(Vec::new()));
    let store = Crashing {
        inner: flowmesh_mongo_writer::store::NestingStore::new(Groups::Memory(memory.clone()), 100),
        proxy: Arc::new(proxy),
        poison,
        calls: calls.clone(),
    };
    let consuming = Consuming::start(proxied, &topology, store, 50, Duration::ZERO);
    eventually(
        "everything but the poison stored",
        Duration::from_secs(120),
        || stored(&memory) == count as usize - 1,
    )
    .await;
    let dead = drain_dead_letters(&topology, 1, Duration::from_secs(30)).await;
    consuming.stop().await;
    let dead_seqs: Vec<u64> = dead
        .iter()
        .map(|d| {
            Record::from_json(std::str::from_utf8(&d.data).expect("UTF-8"))
                .expect("a record")
                .seq
        })
        .collect();
    assert_eq!(dead_seqs, vec![poison], "only the poison is dead-lettered");
    // Once the poison had come back twice, it was in hand alone whenever it ended a session.
    let calls = calls.lock().expect("calls").clone();
    let with_poison: Vec<&Vec<u64>> = calls.iter().filter(|c| c.contains(&poison)).collect();
    assert_eq!(
        with_poison.len(),
        6,
        "delivered 6 times (limit 5): {calls:?}"
    );
    for call in &with_poison[2..] {
        assert_eq!(call.as_slice(), [poison], "taken alone: {calls:?}");
    }
    flowmesh_common::testkit::delete_topology(&topology).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_writer_that_loses_its_node_moves_to_the_next_of_its_list_and_stores_everything() {
    let prefix = unique_prefix("mongo-nodes");
    let topology = Topology::new(&prefix, 5);
    let memory = MemoryStore::new();
    // Two "nodes": two ways to the one RabbitMQ here, each of which can be cut on its own.
    let (first, first_url) =
        flowmesh_common::testkit::proxy_url(&flowmesh_common::testkit::amqp_url()).await;
    let (second, second_url) =
        flowmesh_common::testkit::proxy_url(&flowmesh_common::testkit::amqp_url()).await;
    let records: Vec<Record> = (1..=200).map(|seq| record(seq, seq % 2 == 0)).collect();
    publish_records(&topology, &records[..100]).await;
    let store = Hooked::new(&memory, Duration::ZERO, |_: &[Record]| Ok(()));
    let list = format!("{first_url},{second_url}");
    let consuming = Consuming::start(list, &topology, store, 50, Duration::ZERO);
    eventually("the first half stored", Duration::from_secs(30), || {
        stored(&memory) == 100
    })
    .await;
    assert_eq!(consuming.link.node(), Some(first.addr().to_string()));
    // The first node goes away for good; the writer moves to the second.
    first.cut();
    eventually(
        "the writer on the second node",
        Duration::from_secs(30),
        || {
            consuming.link.is_connected()
                && consuming.link.node() == Some(second.addr().to_string())
        },
    )
    .await;
    publish_records(&topology, &records[100..]).await;
    eventually("everything stored", Duration::from_secs(30), || {
        stored(&memory) == 200
    })
    .await;
    consuming.stop().await;
    assert_eq!(
        shape(&memory).iter().map(|(_, s)| s.len()).sum::<usize>(),
        200
    );
    assert_eq!(stored_seqs_sorted(&memory), (1..=200).collect::<Vec<u64>>());
    flowmesh_common::testkit::delete_topology(&topology).await;
}

fn stored_seqs_sorted(memory: &MemoryStore) -> Vec<u64> {
    let mut seqs: Vec<u64> = memory
        .groups()
        .iter()
        .flat_map(|g| g.records.iter().map(|r| r.seq))
        .collect();
    seqs.sort_unstable();
    seqs
}

/// A writer alone on its single-active-consumer queue re-subscribes whenever the records per
/// message change (its window is counted in messages), each time holding what RabbitMQ already
/// handed it past the batch. Its own cancelled consumer still counts on the queue then; taken
/// for another writer's, it would return all of that unstored (`handed_over`) again and again,
/// until the delivery limit dead-lettered healthy records. Alone, it hands nothing over: every
/// record is stored once, in queue order, and nothing is dead-lettered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_writer_alone_hands_nothing_back_when_its_window_changes_under_a_backlog() {
    let prefix = unique_prefix("mongo-window");
    let topology = Topology::new(&prefix, 5);
    let memory = MemoryStore::new();
    // Singles, then packs of 100, twice over: the window goes from 2 000 messages to 20 and back.
    let parts = [(1500, 1), (1000, 100), (1500, 1), (1000, 100)];
    let total: usize = parts.iter().map(|(records, _)| records).sum();
    let records: Vec<Record> = (1..=total as u64)
        .map(|seq| flowmesh_common::testkit::record("mongo-window", seq, 95))
        .collect();
    let mut messages = Vec::new();
    let mut at = 0;
    for (count, pack) in parts {
        messages.extend(records[at..at + count].chunks(pack).map(message::encode));
        at += count;
    }
    // A backlog first, so that every consumer the writer opens is handed a full window.
    publish(&topology, &topology.exchange, messages).await;
    let writer = start(&prefix, &memory, 100).await;
    eventually("the backlog stored", Duration::from_secs(90), || {
        stored(&memory) == total
    })
    .await;
    let (_, metrics) =
        flowmesh_common::http::get(writer.http_addr, "/metrics", Duration::from_secs(5))
            .await
            .expect("metrics");
    let handed_over: Vec<&str> = metrics
        .lines()
        .filter(|line| line.contains(r#"outcome="handed_over""#))
        .collect();
    assert!(
        handed_over.is_empty(),
        "alone, yet handed over: {handed_over:?}"
    );
    writer.stop().await;
    let seqs: Vec<u64> = memory
        .groups()
        .iter()
        .flat_map(|g| g.records.iter().map(|r| r.seq))
        .collect();
    assert_eq!(
        seqs,
        (1..=total as u64).collect::<Vec<u64>>(),
        "queue order"
    );
    let dead = drain_dead_letters(&topology, 0, Duration::from_secs(1)).await;
    assert!(dead.is_empty(), "{} messages dead-lettered", dead.len());
    flowmesh_common::testkit::delete_topology(&topology).await;
}
