//! The filter against the real RabbitMQ: topology, message properties, and a broker that goes
//! away and comes back (through a proxy this test cuts, so the shared broker keeps running).

use std::time::Duration;

use flowmesh_common::protocol::ServerMessage;
use flowmesh_common::record::Record;
use flowmesh_common::testkit::{
    amqp_channel, amqp_url, drain_queue, eventually, proxy_url, record,
};
use flowmesh_filter::testkit::{RawClient, TestFilter};
use lapin::options::QueueDeclareOptions;
use lapin::types::{AMQPValue, FieldTable};

/// The arguments docs/contracts.md §4 requires, written out by hand rather than taken from `Topology`.
fn spec_arguments(prefix_dlx: &str, single_active: bool) -> FieldTable {
    let mut args = FieldTable::default();
    args.insert(
        "x-queue-type".into(),
        AMQPValue::LongString("quorum".into()),
    );
    args.insert("x-delivery-limit".into(), AMQPValue::LongLongInt(5));
    args.insert(
        "x-dead-letter-exchange".into(),
        AMQPValue::LongString(prefix_dlx.into()),
    );
    if single_active {
        args.insert("x-single-active-consumer".into(), AMQPValue::Boolean(true));
    }
    args
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_queues_of_the_spec_exist_with_their_arguments() {
    let filter = TestFilter::start("topology", |_| {}).await;
    filter.wait_connected().await;
    let topology = filter.topology.clone();
    let durable = QueueDeclareOptions {
        durable: true,
        ..QueueDeclareOptions::default()
    };
    for (queue, single) in [("pg-writer", false), ("mongo-writer", true)] {
        let name = format!("{}.{queue}", topology.exchange);
        // Re-declaring with identical arguments succeeds only if the queue has exactly these.
        let (connection, channel) = amqp_channel().await;
        channel
            .queue_declare(
                name.as_str().into(),
                durable,
                spec_arguments(&topology.dead_letter_exchange, single),
            )
            .await
            .unwrap_or_else(|e| panic!("{name} lacks the contract arguments: {e}"));
        // And a different delivery limit is refused, so the check above can fail.
        let mut other = spec_arguments(&topology.dead_letter_exchange, single);
        other.insert("x-delivery-limit".into(), AMQPValue::LongLongInt(6));
        let refused = channel
            .queue_declare(name.as_str().into(), durable, other)
            .await;
        assert!(
            refused.is_err(),
            "{name}: a mismatching declaration must be refused"
        );
        let _ = connection.close(200, "ok".into()).await;
    }
    let (connection, channel) = amqp_channel().await;
    let passive = QueueDeclareOptions {
        passive: true,
        ..QueueDeclareOptions::default()
    };
    channel
        .queue_declare(
            topology.dead_letter_queue.name.as_str().into(),
            passive,
            FieldTable::default(),
        )
        .await
        .expect("the dead-letter queue exists");
    let _ = connection.close(200, "ok".into()).await;
    filter.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn published_messages_carry_the_properties_and_headers_of_the_spec_in_both_queues() {
    let filter = TestFilter::start("properties", |_| {}).await;
    filter.wait_connected().await;
    let mut client = RawClient::connect(&filter.url(), None)
        .await
        .expect("connect");
    let sent = record("props", 1, 97);
    client.send_text(sent.to_json()).await;
    client.expect_acks(&[1]).await;

    let (connection, channel) = amqp_channel().await;
    for queue in &filter.topology.writer_queues {
        let got = drain_queue(&channel, &queue.name, 1, Duration::from_secs(10)).await;
        assert_eq!(got.len(), 1, "{}", queue.name);
        let delivery = &got[0];
        let body: Record = serde_json::from_slice(&delivery.data).expect("body is the record");
        assert_eq!(body, sent);
        let props = &delivery.properties;
        assert_eq!(
            props.content_type().as_ref().map(|s| s.as_str()),
            Some("application/json")
        );
        assert_eq!(*props.delivery_mode(), Some(2));
        assert_eq!(
            props.message_id().as_ref().map(|s| s.as_str()),
            Some(sent.id.as_str())
        );
        let headers = props.headers().as_ref().expect("headers").inner();
        assert_eq!(headers.get("seq"), Some(&AMQPValue::LongLongInt(1)));
        let text = |key: &str| match headers.get(key) {
            Some(AMQPValue::LongString(s)) => s.to_string(),
            other => panic!("header {key}: {other:?}"),
        };
        assert_eq!(text("source"), "props");
        assert_eq!(Some(text("traceparent")), sent.traceparent);
    }
    let _ = connection.close(200, "ok".into()).await;
    filter.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_packing_on_a_frame_s_broker_records_travel_packed_in_runs_of_at_most_the_pack() {
    let filter = TestFilter::start("packed", |c| c.publish_pack = 3).await;
    filter.wait_connected().await;
    let mut client = RawClient::connect(&filter.url(), None)
        .await
        .expect("connect");
    // Seven broker-bound records with a file-bound one among them, in one frame.
    let sent: Vec<Record> = (1..=8)
        .map(|seq| record("packed", seq, if seq == 4 { 10 } else { 95 }))
        .collect();
    let frame: Vec<String> = sent.iter().map(Record::to_json).collect();
    client.send_text(format!("[{}]", frame.join(","))).await;
    client.expect_acks(&(1..=8).collect::<Vec<_>>()).await;
    // A frame of one record is a record message, packing or not.
    let alone = record("packed", 9, 99);
    client.send_text(alone.to_json()).await;
    client.expect_acks(&[9]).await;

    let broker_bound: Vec<&Record> = sent.iter().filter(|r| r.value > 90).collect();
    let (connection, channel) = amqp_channel().await;
    for queue in &filter.topology.writer_queues {
        let got = drain_queue(&channel, &queue.name, 4, Duration::from_secs(10)).await;
        let shapes: Vec<(String, usize)> = got
            .iter()
            .map(|d| {
                let kind = d.properties.content_type().as_ref().map(|s| s.to_string());
                let lines = d.data.split(|&b| b == b'\n').count();
                (kind.unwrap_or_default(), lines)
            })
            .collect();
        let packed = || "application/x-ndjson".to_string();
        let json = || "application/json".to_string();
        assert_eq!(
            shapes,
            vec![(packed(), 3), (packed(), 3), (json(), 1), (json(), 1)],
            "{}",
            queue.name
        );
        let mut lines = Vec::new();
        for delivery in &got[..2] {
            let props = &delivery.properties;
            assert_eq!(*props.delivery_mode(), Some(2));
            let text = String::from_utf8(delivery.data.clone()).expect("utf-8");
            let first: Record = serde_json::from_str(text.lines().next().expect("a line"))
                .expect("a line is a record");
            assert_eq!(
                props.message_id().as_ref().map(|s| s.as_str()),
                Some(first.id.as_str())
            );
            let headers = props.headers().as_ref().expect("headers").inner();
            assert_eq!(
                headers.get("x-flowmesh-records"),
                Some(&AMQPValue::LongLongInt(3))
            );
            assert!(headers.contains_key("x-flowmesh-routes-version"));
            assert!(!headers.contains_key("seq"), "seq is per line");
            lines.extend(text.lines().map(str::to_owned));
        }
        let last: Record = serde_json::from_slice(&got[2].data).expect("a record body");
        let expected: Vec<String> = broker_bound.iter().map(|r| r.to_json()).collect();
        assert_eq!(lines, expected[..6], "in frame order, each line the record");
        assert_eq!(&last, broker_bound[6]);
        let single: Record = serde_json::from_slice(&got[3].data).expect("a record body");
        assert_eq!(single, alone);
    }
    let _ = connection.close(200, "ok".into()).await;
    filter.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broker_that_goes_away_opens_the_breaker_nacks_records_and_everything_flows_when_it_returns()
 {
    let (proxy, proxied) = proxy_url(&amqp_url()).await;
    let filter = TestFilter::start("outage", |c| c.broker.url = proxied.as_str().into()).await;
    filter.wait_connected().await;
    let mut client = connected_and_one_acked(&filter, "outage").await;

    proxy.cut();
    let broker = filter.broker.clone();
    let breaker = filter.broker_breaker.clone();
    eventually(
        "the filter notices the lost connection",
        Duration::from_secs(30),
        || !broker.is_connected(),
    )
    .await;
    // Records for the broker are nacked, never acked, while it is away.
    let mut seq = 2;
    let nacked = loop {
        client.send_text(record("outage", seq, 95).to_json()).await;
        match client.next().await {
            Ok(ServerMessage::Nack {
                seqs,
                retry_after_ms,
                ..
            }) => {
                assert_eq!(seqs, vec![seq]);
                assert!(retry_after_ms > 0);
            }
            other => panic!("expected a nack while the broker is away, got {other:?}"),
        }
        seq += 1;
        if breaker.state() == flowmesh_common::breaker::BreakerState::Open {
            break seq - 1;
        }
        assert!(seq < 50, "the breaker never opened");
    };
    // File-bound records still flow.
    client.send_text(record("outage", 100, 3).to_json()).await;
    client.expect_acks(&[100]).await;

    proxy.heal();
    eventually("the filter reconnects", Duration::from_secs(60), || {
        broker.is_connected()
    })
    .await;
    // The nacked records, sent again, are now acked (the client's job is to re-send).
    let resend: Vec<Record> = (2..=nacked).map(|s| record("outage", s, 95)).collect();
    send_until_acked(
        &mut client,
        serde_json::to_string(&resend).expect("json"),
        resend.len(),
    )
    .await;
    let (connection, channel) = amqp_channel().await;
    let queue = &filter.topology.writer_queues[0].name;
    let got = drain_queue(&channel, queue, resend.len() + 1, Duration::from_secs(10)).await;
    let mut seqs = seqs_of(&got);
    seqs.sort_unstable();
    seqs.dedup();
    assert_eq!(
        seqs,
        (1..=nacked).collect::<Vec<_>>(),
        "every acked record is in the queue"
    );
    let _ = connection.close(200, "ok".into()).await;
    filter.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_filter_that_loses_its_node_moves_to_the_next_of_its_list_and_acks_again() {
    // Two "nodes": two ways to the one RabbitMQ here, each of which can be cut on its own.
    let (a, a_url) = proxy_url(&amqp_url()).await;
    let (b, b_url) = proxy_url(&amqp_url()).await;
    let list = format!("{a_url},{b_url}");
    let filter = TestFilter::start("nodes", |c| c.broker.url = list.as_str().into()).await;
    filter.wait_connected().await;
    let link = filter.broker.clone();
    // The list is shuffled: whichever node the filter took first is the one to lose.
    let (lost, other) = if link.node() == Some(a.addr().to_string()) {
        (&a, &b)
    } else {
        (&b, &a)
    };
    assert_eq!(link.node(), Some(lost.addr().to_string()));
    let mut client = connected_and_one_acked(&filter, "nodes").await;

    lost.cut();
    eventually(
        "the filter on the other node",
        Duration::from_secs(30),
        || link.is_connected() && link.node() == Some(other.addr().to_string()),
    )
    .await;
    // A broker-bound record is acked again (sent until it is: the breaker may be waiting out
    // a failure seen while the node went away).
    send_until_acked(&mut client, record("nodes", 2, 99).to_json(), 1).await;
    let (_connection, channel) = amqp_channel().await;
    let queue = filter.topology.writer_queues[0].name.clone();
    let got = drain_queue(&channel, &queue, 2, Duration::from_secs(10)).await;
    assert_eq!(seqs_of(&got), [1, 2]);
    filter.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_confirm_that_does_not_come_in_time_is_a_nack_and_the_record_is_acked_when_sent_again() {
    let (proxy, proxied) = proxy_url(&amqp_url()).await;
    let filter = TestFilter::start("confirm-deadline", |c| {
        c.broker.url = proxied.as_str().into();
        c.confirm_timeout = Duration::from_secs(1);
    })
    .await;
    filter.wait_connected().await;
    let mut client = RawClient::connect(&filter.url(), None)
        .await
        .expect("connect");
    // RabbitMQ stops answering (a node frozen, a leader election): no confirm comes back.
    proxy.freeze();
    let sent = tokio::time::Instant::now();
    client.send_text(record("deadline", 1, 99).to_json()).await;
    match client.next().await {
        Ok(ServerMessage::Nack { seqs, reason, .. }) => {
            assert_eq!(seqs, vec![1]);
            assert!(reason.contains("no confirm within"), "{reason}");
        }
        other => panic!("expected a nack past the deadline, got {other:?}"),
    }
    assert!(
        sent.elapsed() >= Duration::from_secs(1),
        "not before the deadline"
    );
    proxy.thaw();
    // Sent again, as the generator would, it is acked (after the breaker's wait, if it opened).
    send_until_acked(&mut client, record("deadline", 1, 99).to_json(), 1).await;
    filter.finish().await;
}

/// Sends `frame` (of `count` records) until the filter acks all of them: it nacks while the
/// breaker waits out its open period; anything else fails the test. Gives up after 30 s.
async fn send_until_acked(client: &mut RawClient, frame: String, count: usize) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        client.send_text(frame.clone()).await;
        match client.next().await {
            Ok(ServerMessage::Ack { seqs }) if seqs.len() == count => return,
            Ok(ServerMessage::Ack { seqs }) => panic!("partial ack {seqs:?}"),
            Ok(ServerMessage::Nack { .. }) => {
                assert!(tokio::time::Instant::now() < deadline, "never acked");
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            other => panic!("unexpected {other:?}"),
        }
    }
}

/// The seqs of the records in `deliveries` (one record a message), in order.
fn seqs_of(deliveries: &[lapin::message::Delivery]) -> Vec<u64> {
    deliveries
        .iter()
        .map(|d| {
            serde_json::from_slice::<Record>(&d.data)
                .expect("a record")
                .seq
        })
        .collect()
}

/// A client of `filter` whose first broker-bound record (`source`, seq 1) was acked: the
/// broker path works before the test's fault.
async fn connected_and_one_acked(filter: &TestFilter, source: &str) -> RawClient {
    let mut client = RawClient::connect(&filter.url(), None)
        .await
        .expect("connect");
    client.send_text(record(source, 1, 99).to_json()).await;
    client.expect_acks(&[1]).await;
    client
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_two_partitions_each_source_meets_its_own_and_packs_never_mix_partitions() {
    use flowmesh_common::topology::{partition_of, routing_key};
    let filter = TestFilter::start("partitions", |c| {
        c.publish_pack = 4;
        c.broker.mongo_partitions = 2;
    })
    .await;
    filter.wait_connected().await;
    let mut client = RawClient::connect(&filter.url(), None)
        .await
        .expect("connect");
    // gen-1 is in partition 0 and gen-2 in partition 1 (contracts §4); one frame mixes them.
    assert_eq!((partition_of("gen-1", 2), partition_of("gen-2", 2)), (0, 1));
    let sent: Vec<Record> = (1..=12)
        .map(|seq| record(if seq % 3 == 0 { "gen-2" } else { "gen-1" }, seq, 95))
        .collect();
    let frame: Vec<String> = sent.iter().map(Record::to_json).collect();
    client.send_text(format!("[{}]", frame.join(","))).await;
    client.expect_acks(&(1..=12).collect::<Vec<_>>()).await;

    let (connection, channel) = amqp_channel().await;
    for index in 0..2u16 {
        let queue = filter
            .topology
            .partition_queue(index)
            .expect("partition")
            .name;
        let wanted: Vec<u64> = sent
            .iter()
            .filter(|r| partition_of(&r.source, 2) == index)
            .map(|r| r.seq)
            .collect();
        // Runs break where the bucket changes: [1,2] [3] [4,5] [6] … four messages each.
        let got = drain_queue(&channel, &queue, 4, Duration::from_secs(10)).await;
        assert_eq!(got.len(), 4, "{queue}");
        let mut seqs = Vec::new();
        for delivery in &got {
            assert_eq!(
                delivery.routing_key.as_str(),
                routing_key(if index == 0 { "gen-1" } else { "gen-2" }),
                "published with its source's bucket"
            );
            for line in delivery.data.split(|&b| b == b'\n') {
                let record: Record = serde_json::from_slice(line).expect("a record");
                assert_eq!(partition_of(&record.source, 2), index, "{queue}");
                seqs.push(record.seq);
            }
        }
        assert_eq!(
            seqs, wanted,
            "{queue}: its sources' records, in order, once"
        );
    }
    let pg = filter
        .topology
        .queue_for("pg-writer")
        .expect("queue")
        .name
        .clone();
    let all = drain_queue(&channel, &pg, 8, Duration::from_secs(10)).await;
    let lines: usize = all
        .iter()
        .map(|d| d.data.split(|&b| b == b'\n').count())
        .sum();
    assert_eq!(lines, 12, "pg-writer's queue takes every record");
    let _ = connection.close(200, "ok".into()).await;
    filter.finish().await;
}
