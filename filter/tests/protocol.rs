//! SPEC §2 over a real socket: a hand-written client against an in-process filter that talks to
//! the real RabbitMQ.

use std::time::Duration;

use flowmesh_common::protocol::ServerMessage;
use flowmesh_common::record::Record;
use flowmesh_filter::testing::{RawClient, TestFilter, record};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_single_record_and_a_batch_frame_are_each_acked_once_per_record() {
    let filter = TestFilter::start("acks", |_| {}).await;
    filter.wait_connected().await;
    let mut client = RawClient::connect(&filter.url(), None)
        .await
        .expect("connect");

    client.send_text(record("acks", 1, 10).to_json()).await;
    client.expect_acks(&[1]).await;

    let batch: Vec<Record> = (2..=101)
        .map(|seq| record("acks", seq, (seq % 101) as u8))
        .collect();
    let frame = serde_json::to_string(&batch).expect("json");
    client.send_text(frame).await;
    client.expect_acks(&(2..=101).collect::<Vec<_>>()).await;

    let in_file = filter.file_records().len();
    let to_broker = batch.iter().filter(|r| r.value > 90).count();
    assert_eq!(in_file + to_broker, 101);
    filter.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_invalid_record_is_rejected_with_its_seq_and_dead_lettered_with_the_reason() {
    let filter = TestFilter::start("reject", |_| {}).await;
    filter.wait_connected().await;
    let mut client = RawClient::connect(&filter.url(), None)
        .await
        .expect("connect");

    let mut bad: serde_json::Value =
        serde_json::from_str(&record("reject", 7, 50).to_json()).expect("json");
    bad["hash"] = "zz".into();
    client.send_text(bad.to_string()).await;
    match client.next().await {
        Ok(ServerMessage::Reject {
            seq: Some(7),
            error,
        }) => assert!(error.contains("`hash`"), "{error}"),
        other => panic!("expected a reject of seq 7, got {other:?}"),
    }
    let dead = filter.dead_letters();
    assert_eq!(dead.len(), 1);
    assert_eq!(dead[0]["seq"], 7);
    assert_eq!(dead[0]["field"], "hash");
    assert!(dead[0]["raw"].as_str().expect("raw").contains("\"zz\""));
    assert!(
        filter.file_records().is_empty(),
        "an invalid record is never routed"
    );
    filter.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn frames_that_are_not_records_are_rejected_with_a_null_seq() {
    let filter = TestFilter::start("garbage", |_| {}).await;
    filter.wait_connected().await;
    let mut client = RawClient::connect(&filter.url(), None)
        .await
        .expect("connect");
    client.send_text("this is not json").await;
    client.send_text("42").await;
    client.send_binary(vec![1, 2, 3]).await;
    for _ in 0..3 {
        match client.next().await {
            Ok(ServerMessage::Reject { seq: None, .. }) => {}
            other => panic!("expected a reject with a null seq, got {other:?}"),
        }
    }
    // The connection still works after garbage.
    client.send_text(record("garbage", 1, 5).to_json()).await;
    client.expect_acks(&[1]).await;
    assert_eq!(filter.dead_letters().len(), 3);
    filter.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_open_file_breaker_nacks_with_retry_after_and_nothing_is_stored() {
    let filter = TestFilter::start("nack", |c| c.breaker_open_wait = Duration::from_secs(30)).await;
    filter.wait_connected().await;
    filter.file_breaker.trip();
    let mut client = RawClient::connect(&filter.url(), None)
        .await
        .expect("connect");
    client.send_text(record("nack", 1, 20).to_json()).await;
    match client.next().await {
        Ok(ServerMessage::Nack {
            seqs,
            retry_after_ms,
            reason,
        }) => {
            assert_eq!(seqs, vec![1]);
            assert_eq!(retry_after_ms, 30_000);
            assert!(reason.contains("breaker"), "{reason}");
        }
        other => panic!("expected a nack, got {other:?}"),
    }
    // A broker-bound record is unaffected by the file breaker.
    client.send_text(record("nack", 2, 95).to_json()).await;
    client.expect_acks(&[2]).await;
    assert!(filter.file_records().is_empty());
    filter.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_oversized_frame_closes_the_connection_with_1009() {
    let filter = TestFilter::start("oversized", |c| c.max_frame_bytes = 4096).await;
    let mut client = RawClient::connect(&filter.url(), None)
        .await
        .expect("connect");
    client
        .send_text(format!("[{}]", "1,".repeat(4000) + "1"))
        .await;
    assert_eq!(client.next().await.expect_err("closed"), Some(1009));
    filter.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_or_wrong_token_is_refused_with_401_and_the_right_one_is_accepted() {
    let filter = TestFilter::start("token", |c| {
        c.token = Some("s3cret".parse().expect("secret"))
    })
    .await;
    for token in [None, Some("wrong")] {
        match RawClient::connect(&filter.url(), token).await {
            Err(tokio_tungstenite::tungstenite::Error::Http(response)) => {
                assert_eq!(response.status(), 401)
            }
            Err(other) => panic!("expected HTTP 401, got {other}"),
            Ok(_) => panic!("connection with token {token:?} must be refused"),
        }
    }
    let mut client = RawClient::connect(&filter.url(), Some("s3cret"))
        .await
        .expect("accepted");
    client.send_text(record("token", 1, 1).to_json()).await;
    client.expect_acks(&[1]).await;
    filter.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_path_is_404() {
    let filter = TestFilter::start("path", |_| {}).await;
    let url = format!("ws://{}/elsewhere", filter.ws_addr);
    match RawClient::connect(&url, None).await {
        Err(tokio_tungstenite::tungstenite::Error::Http(response)) => {
            assert_eq!(response.status(), 404)
        }
        other => panic!("expected 404, got {:?}", other.err()),
    }
    filter.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_reports_each_breaker_and_readiness_follows_the_file_breaker() {
    let filter =
        TestFilter::start("health", |c| c.breaker_open_wait = Duration::from_secs(30)).await;
    filter.wait_connected().await;
    let get = |path: &'static str| {
        let addr = filter.http_addr;
        async move {
            flowmesh_common::http::probe(addr, path, Duration::from_secs(5))
                .await
                .expect("probe")
        }
    };
    assert_eq!(get("/health/ready").await, 200);
    assert_eq!(get("/health/live").await, 200);
    filter.file_breaker.trip();
    assert_eq!(get("/health/ready").await, 503);
    assert_eq!(
        get("/health/live").await,
        200,
        "liveness never checks dependencies"
    );
    let body = get_body(filter.http_addr, "/health").await;
    let json: serde_json::Value = serde_json::from_str(&body).expect("health JSON");
    assert_eq!(json["status"], "DOWN");
    assert_eq!(json["components"]["file"]["details"]["state"], "open");
    assert_eq!(json["components"]["rabbitmq"]["details"]["state"], "closed");
    let metrics = get_body(filter.http_addr, "/metrics").await;
    assert!(
        metrics.contains(r#"flowmesh_circuit_breaker_state{breaker="filter_file",state="open"} 1"#),
        "{metrics}"
    );
    filter.finish().await;
}

async fn get_body(addr: std::net::SocketAddr, path: &str) -> String {
    flowmesh_common::http::get(addr, path, Duration::from_secs(5))
        .await
        .expect("GET")
        .1
}
