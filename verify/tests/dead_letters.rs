//! `dead-letters` against the real RabbitMQ: list leaves the queue as it is, replay puts a fixed
//! record back into the queue it died in after its confirm (a dry run changes nothing), purge
//! empties the queue; a packed message is replayed packed.

use std::time::Duration;

use flowmesh_common::message;
use flowmesh_common::record::Record;
use flowmesh_common::testkit::unique_prefix;
use flowmesh_common::testkit::{amqp_channel, amqp_url, delete_topology, drain_queue, publish};
use flowmesh_common::topology::{Topology, record_properties};
use flowmesh_verify::dead_letters::{Action, Broker, Selection, Target};
use lapin::BasicProperties;
use lapin::types::AMQPValue;

/// A broker handle on the test's topology.
async fn broker(topology: &Topology) -> Broker {
    Broker::connect(&amqp_url(), topology.clone())
        .await
        .expect("connect")
}

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
    let mut record = Record::new("dlq", 1, chrono::Utc::now(), 97, None);
    record.provenance = Some(flowmesh_common::record::Provenance {
        version: "0123456789ab".into(),
        route: Some("hot".into()),
    });
    // As pg-writer dead-letters a record it could not store: the record's own headers (its
    // provenance among them) and the queue it came from.
    let pg_queue = topology.queue_for("pg-writer").expect("queue").name.clone();
    let mut headers = record_properties(&record)
        .headers()
        .clone()
        .unwrap_or_default();
    headers.insert(
        flowmesh_common::topology::HEADER_DEAD_LETTER_QUEUE.into(),
        AMQPValue::LongString(pg_queue.as_str().into()),
    );
    dead_letter(
        &topology,
        record.to_json().as_bytes(),
        record_properties(&record).with_headers(headers),
    )
    .await;
    dead_letter(
        &topology,
        b"still garbage",
        BasicProperties::default().with_message_id("junk".into()),
    )
    .await;

    let listed = broker(&topology).await.list().await.expect("list");
    assert_eq!(listed.len(), 2);
    let again = broker(&topology).await.list().await.expect("list");
    assert_eq!(again.len(), 2, "listing does not consume");

    let replay = |dry_run| {
        let topology = topology.clone();
        async move {
            broker(&topology)
                .await
                .replay(&Selection::All, Target::Origin, dry_run)
                .await
                .expect("replay")
        }
    };
    let planned = replay(true).await;
    assert_eq!(planned.len(), 2);
    assert!(
        planned
            .iter()
            .any(|o| o.action == Action::WouldReplay && o.to == pg_queue)
    );
    let again = broker(&topology).await.list().await.expect("list");
    assert_eq!(again.len(), 2, "a dry run changes nothing");

    let outcomes = replay(false).await;
    let replayed: Vec<_> = outcomes
        .iter()
        .filter(|o| o.action == Action::Replayed)
        .collect();
    assert_eq!(replayed.len(), 1);
    assert_eq!(replayed[0].to, pg_queue, "back to the queue it died in");
    assert!(
        outcomes
            .iter()
            .any(|o| matches!(&o.action, Action::Kept(_)) && o.id == "junk"),
        "an invalid body is not replayed"
    );
    let (connection, channel) = amqp_channel().await;
    for queue in &topology.writer_queues {
        let got = drain_queue(&channel, &queue.name, 1, Duration::from_secs(3)).await;
        if queue.name == pg_queue {
            assert_eq!(got.len(), 1, "{}", queue.name);
            assert_eq!(got[0].data, record.to_json().into_bytes());
            assert_eq!(
                flowmesh_common::topology::provenance_of(&got[0].properties),
                record.provenance,
                "a replay keeps the record's provenance"
            );
        } else {
            assert!(
                got.is_empty(),
                "the other writer gets nothing: {}",
                queue.name
            );
        }
    }
    let _ = connection.close(200, "ok".into()).await;

    let purged = broker(&topology).await.purge().await.expect("purge");
    assert_eq!(purged, 1);
    let left = broker(&topology).await.list().await.expect("list");
    assert!(left.is_empty());
    delete_topology(&topology).await;
}

/// Each listing returns every dead letter to the queue unacked, which raises its delivery count:
/// on a queue with RabbitMQ 4's default limit (20) the 21st listing would drop it for good.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn listing_the_dead_letters_more_often_than_any_default_delivery_limit_keeps_them() {
    let prefix = unique_prefix("dlq-list");
    let topology = Topology::new(&prefix, 5);
    dead_letter(
        &topology,
        b"kept",
        BasicProperties::default().with_message_id("kept".into()),
    )
    .await;
    for listing in 1..=25 {
        let listed = broker(&topology).await.list().await.expect("list");
        assert_eq!(
            listed.iter().map(|l| l.id.as_str()).collect::<Vec<_>>(),
            ["kept"],
            "listing {listing}"
        );
    }
    delete_topology(&topology).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_packed_dead_letter_is_replayed_packed_and_of_one_with_bad_lines_only_the_records() {
    let prefix = unique_prefix("dlq-packed");
    let topology = Topology::new(&prefix, 5);
    let mut records: Vec<Record> = (1..=3)
        .map(|seq| Record::new("dlq-packed", seq, chrono::Utc::now(), 95, None))
        .collect();
    for record in &mut records {
        record.provenance = Some(flowmesh_common::record::Provenance {
            version: "0123456789ab".into(),
            route: Some("hot".into()),
        });
    }
    // As RabbitMQ dead-letters a packed message past its delivery limit: whole, as published.
    let (body, properties) = message::encode(&records);
    dead_letter(&topology, &body, properties.clone()).await;
    let with_bad_line = format!("{}\nnot a record", records[0].to_json());
    dead_letter(
        &topology,
        with_bad_line.as_bytes(),
        properties.clone().with_message_id("half".into()),
    )
    .await;
    dead_letter(
        &topology,
        b"junk one\njunk two",
        properties.with_message_id("junk".into()),
    )
    .await;

    let outcomes = broker(&topology)
        .await
        .replay(&Selection::All, Target::Fanout, false)
        .await
        .expect("replay");
    let summary: Vec<(&str, bool, usize)> = outcomes
        .iter()
        .map(|o| (o.id.as_str(), o.action == Action::Replayed, o.kept_lines))
        .collect();
    assert_eq!(
        summary,
        vec![
            (records[0].id.as_str(), true, 0),
            ("half", true, 1),
            ("junk", false, 0)
        ],
        "{outcomes:?}"
    );
    let (connection, channel) = amqp_channel().await;
    for queue in &topology.writer_queues {
        let got = drain_queue(&channel, &queue.name, 2, Duration::from_secs(3)).await;
        assert_eq!(got.len(), 2, "{}", queue.name);
        for (message, want) in got.iter().zip([&records[..], &records[..1]]) {
            let decoded = message::decode(&message.properties, &message.data).expect("records");
            // One record goes as a plain record message, more as a packed one.
            assert_eq!(message::is_packed(&message.properties), want.len() > 1);
            assert_eq!(decoded.records, want, "the records and their provenance");
        }
    }
    // Left: the all-bad message as it was, and the bad line of "half" alone, with its reason.
    let left = drain_queue(
        &channel,
        &topology.dead_letter_queue.name,
        2,
        Duration::from_secs(3),
    )
    .await;
    let _ = connection.close(200, "ok".into()).await;
    let bodies: Vec<&[u8]> = left.iter().map(|d| d.data.as_slice()).collect();
    assert_eq!(
        bodies,
        vec![&b"junk one\njunk two"[..], &b"not a record"[..]]
    );
    let reason = left[1].properties.headers().as_ref().and_then(|h| {
        h.inner()
            .get(flowmesh_common::topology::HEADER_DEAD_LETTER_REASON)
            .cloned()
    });
    assert!(
        matches!(&reason, Some(AMQPValue::LongString(text)) if text.to_string().contains("line 2")),
        "{reason:?}"
    );
    delete_topology(&topology).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_redelivered_past_the_delivery_limit_reaches_the_dead_letter_queue_with_its_reason()
 {
    use futures_util::StreamExt;
    use lapin::options::{BasicConsumeOptions, BasicNackOptions};
    use lapin::types::FieldTable;

    let prefix = unique_prefix("dlq-limit");
    let topology = Topology::new(&prefix, 2);
    let record = Record::new("dlq-limit", 1, chrono::Utc::now(), 99, None);
    publish(
        &topology,
        &topology.exchange,
        vec![(record.to_json().into_bytes(), record_properties(&record))],
    )
    .await;
    // A consumer that always gives the message back, as a writer whose database keeps failing
    // and that crashes before acking would.
    let (connection, channel) = amqp_channel().await;
    let queue = topology.queue_for("pg-writer").expect("queue").name.clone();
    let mut consumer = channel
        .basic_consume(
            queue.as_str().into(),
            "returner".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .expect("consume");
    let mut returned = 0;
    while let Ok(Some(Ok(delivery))) =
        tokio::time::timeout(Duration::from_secs(3), consumer.next()).await
    {
        delivery
            .nack(BasicNackOptions {
                requeue: true,
                ..BasicNackOptions::default()
            })
            .await
            .expect("nack");
        returned += 1;
        assert!(returned < 20, "the delivery limit never applied");
    }
    let _ = connection.close(200, "ok".into()).await;
    assert!(returned >= 2, "delivered {returned} times");

    let letters = broker(&topology).await.list().await.expect("list");
    assert_eq!(letters.len(), 1);
    assert_eq!(letters[0].id, record.id);
    assert_eq!(letters[0].reason, "delivery_limit");
    assert_eq!(letters[0].origin, queue);
    delete_topology(&topology).await;
}

#[test]
fn replay_and_purge_act_on_everything_only_when_told_to() {
    for args in [&["replay"][..], &["purge"], &["replay", "some-id", "--all"]] {
        let status = std::process::Command::new(env!("CARGO_BIN_EXE_dead-letters"))
            .args(args)
            .stderr(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .status()
            .expect("runs");
        assert_eq!(status.code(), Some(2), "{args:?} must be refused");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cluster_s_list_is_tried_node_by_node_until_one_answers() {
    let topology = Topology::new(&unique_prefix("dl-nodes"), 5);
    // A node that is not there: a port reserved, then freed.
    let gone = std::net::TcpListener::bind("127.0.0.1:0")
        .expect("bind")
        .local_addr()
        .expect("addr");
    let list = format!("amqp://guest:guest@{gone}/%2f,{}", amqp_url());
    let broker = Broker::connect(&list, topology.clone()).await;
    assert!(
        broker.is_ok(),
        "the second node answers: {:?}",
        broker.err()
    );
    let only_gone = format!("amqp://guest:secret@{gone}/%2f");
    let err = Broker::connect(&only_gone, topology.clone())
        .await
        .err()
        .expect("no node answers");
    let text = format!("{err:#}");
    assert!(
        text.contains(&gone.to_string()) && !text.contains("secret"),
        "{text}"
    );
    delete_topology(&topology).await;
}
