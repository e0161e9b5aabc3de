//! `dead-letters` against the real RabbitMQ: list leaves the queue as it is, replay puts a fixed
//! record back into the flow after its confirm, purge empties the queue.

use std::time::Duration;

use flowmesh_common::record::Record;
use flowmesh_common::testkit::unique_prefix;
use flowmesh_common::topology::{Topology, record_properties};
use flowmesh_filter::testing::{amqp_channel, amqp_url, delete_topology, drain_queue, publish};
use flowmesh_verify::dead_letters::Broker;
use lapin::BasicProperties;

async fn dead_letter(topology: &Topology, body: &[u8], properties: BasicProperties) {
    publish(
        topology,
        &topology.dead_letter_exchange,
        vec![(body.to_vec(), properties)],
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_letters_are_listed_replayed_after_a_fix_and_purged() {
    let prefix = unique_prefix("dlq");
    let topology = Topology::new(&prefix, 5);
    let record = Record::new("dlq", 1, chrono::Utc::now(), 97, None);
    dead_letter(
        &topology,
        record.to_json().as_bytes(),
        record_properties(&record),
    )
    .await;
    dead_letter(
        &topology,
        b"still garbage",
        BasicProperties::default().with_message_id("junk".into()),
    )
    .await;

    let listed = Broker::connect(&amqp_url(), topology.clone())
        .await
        .expect("connect")
        .list()
        .await
        .expect("list");
    assert_eq!(listed.len(), 2);
    let again = Broker::connect(&amqp_url(), topology.clone())
        .await
        .expect("connect")
        .list()
        .await
        .expect("list");
    assert_eq!(again.len(), 2, "listing does not consume");

    let (replayed, kept) = Broker::connect(&amqp_url(), topology.clone())
        .await
        .expect("connect")
        .replay(&[])
        .await
        .expect("replay");
    assert_eq!(replayed, 1);
    assert_eq!(kept.len(), 1, "an invalid body is not replayed");
    let (connection, channel) = amqp_channel().await;
    for queue in &topology.writer_queues {
        let got = drain_queue(&channel, &queue.name, 1, Duration::from_secs(10)).await;
        assert_eq!(got.len(), 1, "{}", queue.name);
        assert_eq!(got[0].data, record.to_json().into_bytes());
    }
    let _ = connection.close(200, "ok".into()).await;

    let purged = Broker::connect(&amqp_url(), topology.clone())
        .await
        .expect("connect")
        .purge()
        .await
        .expect("purge");
    assert_eq!(purged, 1);
    let left = Broker::connect(&amqp_url(), topology.clone())
        .await
        .expect("connect")
        .list()
        .await
        .expect("list");
    assert!(left.is_empty());
    delete_topology(&topology).await;
}
