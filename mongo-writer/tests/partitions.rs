//! mongo-writer's queue split by source (docs/contracts.md §4 "Partitions") on the real
//! RabbitMQ: where each source's records go, what a change of the count needs, and writers that
//! share the partitions (one each, and one standing by for all) nesting every source exactly.

use std::collections::BTreeMap;
use std::time::Duration;

use flowmesh_common::record::Record;
use flowmesh_common::testkit::{
    TestWriter, amqp_channel, delete_topology, drain_dead_letters, eventually, publish,
    publish_records, queue_depth, unique_prefix,
};
use flowmesh_common::topology::{Topology, TopologyError, partition_of};
use flowmesh_mongo_writer::groups::Groups;
use flowmesh_mongo_writer::nesting::nests;
use flowmesh_mongo_writer::store::MemoryStore;
use flowmesh_mongo_writer::{MongoWriterConfig, build_with};
use lapin::BasicProperties;

const SOURCES: usize = 12;

fn sources() -> Vec<String> {
    (0..SOURCES).map(|n| format!("part-src-{n}")).collect()
}

/// `per_source` records of every source, interleaved, each source's hashes alternating in
/// runs so that its groups nest.
fn records(per_source: u64) -> Vec<Record> {
    let mut all = Vec::new();
    for seq in 1..=per_source {
        for (n, source) in sources().iter().enumerate() {
            let high = !(seq + n as u64).is_multiple_of(5);
            all.push(flowmesh_common::testkit::record_where(
                source,
                seq,
                95,
                |hash| nests(hash) == high,
            ));
        }
    }
    all
}

/// The groups the nesting rule gives one source's records in order: (nested, seqs).
fn expected_groups(records: &[&Record], max_nest: usize) -> Vec<(bool, Vec<u64>)> {
    let mut groups: Vec<(bool, Vec<u64>)> = Vec::new();
    let mut previous_high = false;
    for record in records {
        let high = nests(&record.hash);
        match groups.last_mut() {
            Some((true, seqs)) if high && previous_high && seqs.len() < max_nest => {
                seqs.push(record.seq)
            }
            _ => groups.push((high, vec![record.seq])),
        }
        previous_high = high;
    }
    groups
}

async fn declare(topology: &Topology) -> Result<(), TopologyError> {
    let (connection, _channel) = amqp_channel().await;
    let declared = topology.declare(&connection).await;
    let _ = connection.close(200, "ok".into()).await;
    declared
}

fn partitioned(prefix: &str, partitions: u16, relayout: bool) -> Topology {
    Topology::new(prefix, 5).with_partitions(Some(partitions), relayout)
}

/// Empties every partition queue of `topology` (as writers draining them would).
async fn purge_partitions(channel: &lapin::Channel, topology: &Topology) {
    for queue in topology.partition_queues() {
        channel
            .queue_purge(
                queue.name.as_str().into(),
                lapin::options::QueuePurgeOptions::default(),
            )
            .await
            .expect("purge");
    }
}

async fn depth_of_partition(topology: &Topology, index: u16) -> u32 {
    queue_depth(&topology.partition_queue(index).expect("partition").name).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_sources_records_meet_one_partition_and_a_keyless_one_is_dead_lettered() {
    let prefix = unique_prefix("parts-route");
    let topology = partitioned(&prefix, 3, true);
    declare(&topology)
        .await
        .expect("a fresh broker takes any layout");
    let records = records(10);
    publish_records(&topology, &records).await;
    for index in 0..3 {
        let expected = records
            .iter()
            .filter(|r| partition_of(&r.source, 3) == index)
            .count() as u32;
        assert!(expected > 0, "the sources reach every partition");
        assert_eq!(
            depth_of_partition(&topology, index).await,
            expected,
            "partition {index}"
        );
    }
    let pg = topology
        .queue_for("pg-writer")
        .expect("pg queue")
        .name
        .clone();
    assert_eq!(
        queue_depth(&pg).await as usize,
        records.len(),
        "pg-writer takes every record"
    );
    // A message without its source's key (an older publisher) is dead-lettered, not dropped.
    publish(
        &topology,
        &topology.exchange,
        vec![(b"{}".to_vec(), BasicProperties::default())],
    )
    .await;
    let letters = drain_dead_letters(&topology, 1, Duration::from_secs(10)).await;
    assert_eq!(
        letters.len(),
        1,
        "the key-less message is in the dead-letter queue"
    );
    delete_topology(&topology).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_count_changes_only_when_the_queues_are_drained_and_only_by_a_filter() {
    let prefix = unique_prefix("parts-change");
    let two = partitioned(&prefix, 2, true);
    declare(&two).await.expect("declared with two");
    publish_records(&two, &records(2)).await;

    let refused = declare(&partitioned(&prefix, 3, true)).await;
    let why = refused
        .expect_err("refused while the queues hold records")
        .to_string();
    assert!(
        why.contains("cannot change") && why.contains("queued"),
        "{why}"
    );
    let refused = declare(&partitioned(&prefix, 3, false)).await;
    let why = refused
        .expect_err("a writer never changes the layout")
        .to_string();
    assert!(why.contains("set the same count"), "{why}");
    declare(&two).await.expect("the same count is always fine");

    // Drained but with a writer attached: still refused.
    let (connection, channel) = amqp_channel().await;
    purge_partitions(&channel, &two).await;
    let _consumer = channel
        .basic_consume(
            two.partition_queue(1)
                .expect("partition")
                .name
                .as_str()
                .into(),
            "standing-writer".into(),
            lapin::options::BasicConsumeOptions::default(),
            lapin::types::FieldTable::default(),
        )
        .await
        .expect("consume");
    let refused = declare(&partitioned(&prefix, 3, true)).await;
    let why = refused
        .expect_err("refused while a writer consumes")
        .to_string();
    assert!(why.contains("partition 1: 0 queued, 1 consumers"), "{why}");
    let _ = connection.close(200, "ok".into()).await;

    // Drained and nobody consuming: the filter's count wins.
    let three = partitioned(&prefix, 3, true);
    declare(&three).await.expect("drained: changed to three");
    let records = records(6);
    publish_records(&three, &records).await;
    for index in 0..3 {
        let expected = records
            .iter()
            .filter(|r| partition_of(&r.source, 3) == index)
            .count() as u32;
        assert_eq!(
            depth_of_partition(&three, index).await,
            expected,
            "partition {index}"
        );
    }

    // Back to one: drained again, the extra queues go and partition 0 takes everything.
    let (connection, channel) = amqp_channel().await;
    purge_partitions(&channel, &three).await;
    let _ = connection.close(200, "ok".into()).await;
    let one = partitioned(&prefix, 1, true);
    declare(&one).await.expect("drained: changed to one");
    assert_eq!(
        one.probe_partitions(&amqp_channel().await.0)
            .await
            .expect("probe")
            .len(),
        1,
        "the queues of partitions 1 and 2 are gone"
    );
    publish_records(&one, &records).await;
    assert_eq!(depth_of_partition(&one, 0).await as usize, records.len());
    let letters = drain_dead_letters(&one, 0, Duration::from_millis(500)).await;
    assert!(
        letters.is_empty(),
        "nothing was unroutable: {}",
        letters.len()
    );
    delete_topology(&three).await;
}

/// Every source's records stored once, in the groups the nesting rule gives them in order.
fn assert_nested_exactly(records: &[Record], memory: &MemoryStore) {
    let mut by_source: BTreeMap<String, Vec<&Record>> = BTreeMap::new();
    for record in records {
        by_source
            .entry(record.source.clone())
            .or_default()
            .push(record);
    }
    let groups = memory.groups();
    for (source, records) in &by_source {
        let mut stored: Vec<(bool, Vec<u64>)> = groups
            .iter()
            .filter(|g| &g.source == source)
            .map(|g| (g.nested, g.records.iter().map(|r| r.seq).collect()))
            .collect();
        stored.sort_by_key(|(_, seqs)| seqs[0]);
        assert_eq!(stored, expected_groups(records, 4), "{source}");
    }
}

fn stored(memory: &MemoryStore) -> usize {
    memory.groups().iter().map(|g| g.records.len()).sum()
}

async fn writer(prefix: &str, memory: &MemoryStore, partitions: &str) -> TestWriter {
    let mut config = MongoWriterConfig::for_tests(prefix);
    config.store = flowmesh_mongo_writer::config::StoreKind::Memory;
    config.max_nest = 4;
    config.writer.broker.mongo_partitions = 2;
    config.partitions = partitions.into();
    let groups = Groups::Memory(memory.clone());
    let writer = TestWriter::start(build_with(config, groups).await.expect("builds"));
    writer.wait_connected().await;
    writer
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writers_sharing_two_partitions_nest_every_source_exactly_through_a_takeover() {
    let prefix = unique_prefix("parts-writers");
    let topology = partitioned(&prefix, 2, true);
    declare(&topology).await.expect("declared with two");
    let memory = MemoryStore::new();
    // One writer per partition, and one standing by for both.
    let first = writer(&prefix, &memory, "0").await;
    let second = writer(&prefix, &memory, "1").await;
    let standby = writer(&prefix, &memory, "all").await;
    let records = records(40);
    let (early, late) = records.split_at(records.len() / 2);
    publish_records(&topology, early).await;
    eventually("the first half stored", Duration::from_secs(30), || {
        memory
            .groups()
            .iter()
            .map(|g| g.records.len())
            .sum::<usize>()
            == early.len()
    })
    .await;
    // The active consumer of partition 0 goes; the one standing by takes its place.
    first.stop().await;
    publish_records(&topology, late).await;
    eventually("everything stored", Duration::from_secs(30), || {
        memory
            .groups()
            .iter()
            .map(|g| g.records.len())
            .sum::<usize>()
            == records.len()
    })
    .await;

    assert_nested_exactly(&records, &memory);
    second.stop().await;
    standby.finish().await;
}

/// A writer whose database fails keeps its partitions: cancelled, its consumer would let the
/// writer standing by store the records after the batch it still retries, and that batch would
/// land after them. Nothing is stored while it fails; once it works, every source is nested
/// exactly as the rule gives it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_writer_whose_store_fails_keeps_its_partitions_from_the_one_standing_by() {
    let prefix = unique_prefix("parts-failing");
    let topology = partitioned(&prefix, 2, true);
    declare(&topology).await.expect("declared with two");
    let memory = MemoryStore::new();
    let switch = std::env::temp_dir().join(format!("{prefix}-store-fails"));
    let _ = std::fs::remove_file(&switch);
    // The first writer is active on both partitions (it subscribed first); its store fails
    // while the switch file exists. The other stands by, its store working.
    let first = writer(
        &prefix,
        &memory.clone().failing_while_exists(switch.clone()),
        "all",
    )
    .await;
    let standby = writer(&prefix, &memory, "all").await;
    let records = records(40);
    let (early, late) = records.split_at(records.len() / 2);
    publish_records(&topology, early).await;
    eventually("the first half stored", Duration::from_secs(30), || {
        stored(&memory) == early.len()
    })
    .await;
    std::fs::write(&switch, b"").expect("switch on");
    publish_records(&topology, late).await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(
        stored(&memory),
        early.len(),
        "nothing is stored while the active writer's store fails"
    );
    std::fs::remove_file(&switch).expect("switch off");
    eventually("everything stored", Duration::from_secs(30), || {
        stored(&memory) == records.len()
    })
    .await;
    assert_nested_exactly(&records, &memory);
    first.stop().await;
    standby.finish().await;
}
