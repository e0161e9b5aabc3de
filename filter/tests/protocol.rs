//! docs/contracts.md §2 over a real socket: a hand-written client against an in-process filter that talks to
//! the real RabbitMQ.

use std::time::Duration;

use flowmesh_common::protocol::ServerMessage;
use flowmesh_common::record::Record;
use flowmesh_common::routing::{Destination, Routes};
use flowmesh_common::testkit::record;
use flowmesh_filter::testkit::{RawClient, TestFilter};

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
    let to_broker = batch
        .iter()
        .filter(|r| Routes::builtin().destination(r) == Destination::Broker)
        .count();
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
    let filter = TestFilter::start("nack", |c| {
        c.breaker.breaker_open_wait = Duration::from_secs(30)
    })
    .await;
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
        c.token.value = Some("s3cret-of-24-characters".parse().expect("secret"))
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
    let mut client = RawClient::connect(&filter.url(), Some("s3cret-of-24-characters"))
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
    let filter = TestFilter::start("health", |c| {
        c.breaker.breaker_open_wait = Duration::from_secs(30)
    })
    .await;
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frame_of_half_a_million_items_gets_one_reject_and_one_short_dead_letter_line() {
    let filter = TestFilter::start("bigframe", |_| {}).await;
    filter.wait_connected().await;
    let mut client = RawClient::connect(&filter.url(), None)
        .await
        .expect("connect");
    // 1 MiB of `[0,0,0,…]`: about 524 000 items, far over FILTER_MAX_BATCH.
    let frame = format!("[{}]", vec!["0"; 524_000].join(","));
    assert!(frame.len() <= 1 << 20);
    client.send_text(frame).await;
    match client.next().await {
        Ok(ServerMessage::Reject { seq: None, error }) => {
            assert!(error.contains("more than the limit"), "{error}");
            assert!(error.len() < 400, "the error echoes a bounded excerpt");
        }
        other => panic!("expected one reject for the whole frame, got {other:?}"),
    }
    // The connection is still good.
    client.send_text(record("bigframe", 1, 5).to_json()).await;
    client.expect_acks(&[1]).await;
    let dead_letter = filter.dir.path().join("dead-letter.jsonl");
    let size = std::fs::metadata(&dead_letter)
        .expect("dead-letter file")
        .len();
    assert!(
        size < 2048,
        "one short dead-letter line, not the frame: {size} bytes"
    );
    assert_eq!(filter.dead_letters().len(), 1);
    filter.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_that_sends_too_many_invalid_records_is_closed_with_1008() {
    let filter = TestFilter::start("flood", |c| c.max_invalid = 50).await;
    filter.wait_connected().await;
    let mut client = RawClient::connect(&filter.url(), None)
        .await
        .expect("connect");
    let mut bad = serde_json::to_value(record("flood", 1, 5)).expect("json");
    bad["value"] = 250.into();
    let frame = serde_json::to_string(&vec![bad; 60]).expect("json");
    client.send_text(frame).await;
    let closed = loop {
        match client.next().await {
            Ok(ServerMessage::Reject { .. }) => continue,
            Err(code) => break code,
            Ok(other) => panic!("unexpected {other:?}"),
        }
    };
    assert_eq!(closed, Some(1008));
    // Others are unaffected.
    let mut other = RawClient::connect(&filter.url(), None)
        .await
        .expect("connect");
    other.send_text(record("flood", 2, 5).to_json()).await;
    other.expect_acks(&[2]).await;
    filter.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_over_the_limit_get_503_and_a_freed_place_is_given_again() {
    let filter = TestFilter::start("limits", |c| c.max_connections_per_peer = 2).await;
    filter.wait_connected().await;
    let first = RawClient::connect(&filter.url(), None)
        .await
        .expect("first");
    let mut second = RawClient::connect(&filter.url(), None)
        .await
        .expect("second");
    match RawClient::connect(&filter.url(), None).await {
        Err(tokio_tungstenite::tungstenite::Error::Http(response)) => {
            assert_eq!(response.status(), 503);
        }
        Err(other) => panic!("expected HTTP 503, got {other}"),
        Ok(_) => panic!("a third connection from one peer must be refused"),
    }
    // The admitted ones work; closing one frees its place.
    second.send_text(record("limits", 1, 5).to_json()).await;
    second.expect_acks(&[1]).await;
    drop(first);
    let mut again = None;
    for _ in 0..100 {
        if let Ok(client) = RawClient::connect(&filter.url(), None).await {
            again = Some(client);
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let mut again = again.expect("a freed place is given again");
    again.send_text(record("limits", 2, 5).to_json()).await;
    again.expect_acks(&[2]).await;
    let metrics = get_body(filter.http_addr, "/metrics").await;
    assert!(
        metrics.contains(
            r#"flowmesh_filter_connections_refused_total{reason="max_connections_per_peer"}"#
        ),
        "the refusal is counted"
    );
    filter.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_stops_reading_its_answers_is_disconnected() {
    use futures_util::SinkExt;
    use tokio_tungstenite::tungstenite::Message;
    let filter = TestFilter::start("stall", |c| {
        c.write_timeout = Duration::from_millis(500);
        c.max_invalid = usize::MAX;
    })
    .await;
    filter.wait_connected().await;
    // A tiny receive buffer, and a client that never reads: the filter's answers back up.
    let socket = tokio::net::TcpSocket::new_v4().expect("socket");
    socket.set_recv_buffer_size(4096).expect("rcvbuf");
    let stream = socket.connect(filter.ws_addr).await.expect("connect");
    let (mut ws, _) = tokio_tungstenite::client_async(filter.url(), stream)
        .await
        .expect("upgrade");
    let frame = format!("[{}]", vec!["{}"; 2000].join(","));
    let http = filter.http_addr;
    let sending = tokio::spawn(async move {
        for _ in 0..50 {
            if ws.send(Message::Text(frame.clone().into())).await.is_err() {
                break;
            }
        }
        ws
    });
    // Well inside the peer timeout (30 s): only the write timeout can explain a disconnect.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    let mut seen_open = false;
    loop {
        let metrics = get_body(http, "/metrics").await;
        seen_open |= metrics.contains("flowmesh_filter_connections 1");
        if seen_open && metrics.contains("flowmesh_filter_connections 0") {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the stalled client was never disconnected"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    sending.abort();
    filter.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_that_never_finish_a_handshake_or_show_a_wrong_token_hold_no_session_place() {
    const TOKEN: &str = "a-token-of-enough-characters";
    let filter = TestFilter::start("places", |c| {
        c.max_connections_per_peer = 2;
        c.max_handshakes_per_peer = 4;
        c.token.value = Some(TOKEN.parse().expect("secret"));
    })
    .await;
    filter.wait_connected().await;
    let url = filter.url();
    // Two TCP connections that never say a word, and two upgrades with a wrong token.
    let mut idle = Vec::new();
    for _ in 0..2 {
        idle.push(
            tokio::net::TcpStream::connect(filter.ws_addr)
                .await
                .expect("tcp"),
        );
    }
    for _ in 0..2 {
        match RawClient::connect(&url, Some("a-wrong-token-of-enough-length")).await {
            Err(tokio_tungstenite::tungstenite::Error::Http(response)) => {
                assert_eq!(response.status(), 401)
            }
            other => panic!("expected 401, got {:?}", other.map(|_| "a session")),
        }
    }
    // Both session places are free for clients with the token; a third gets 503.
    let mut first = RawClient::connect(&url, Some(TOKEN)).await.expect("first");
    let _second = RawClient::connect(&url, Some(TOKEN)).await.expect("second");
    match RawClient::connect(&url, Some(TOKEN)).await {
        Err(tokio_tungstenite::tungstenite::Error::Http(response)) => {
            assert_eq!(response.status(), 503)
        }
        other => panic!("expected 503, got {:?}", other.map(|_| "a session")),
    }
    first.send_text(record("places", 1, 5).to_json()).await;
    first.expect_acks(&[1]).await;

    // Handshakes are bounded too: with four silent connections from this peer, a fifth is
    // closed before anything is read; a silent one is given up after the handshake deadline.
    for _ in 0..2 {
        idle.push(
            tokio::net::TcpStream::connect(filter.ws_addr)
                .await
                .expect("tcp"),
        );
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    let mut fifth = tokio::net::TcpStream::connect(filter.ws_addr)
        .await
        .expect("tcp");
    let mut byte = [0u8; 1];
    let read = tokio::time::timeout(
        Duration::from_secs(2),
        tokio::io::AsyncReadExt::read(&mut fifth, &mut byte),
    )
    .await;
    assert!(
        matches!(read, Ok(Ok(0)) | Ok(Err(_))),
        "the fifth handshake is closed at once: {read:?}"
    );
    let read = tokio::time::timeout(
        Duration::from_secs(10),
        tokio::io::AsyncReadExt::read(&mut idle[0], &mut byte),
    )
    .await;
    assert!(
        matches!(read, Ok(Ok(0)) | Ok(Err(_))),
        "a silent handshake is closed at its deadline: {read:?}"
    );
    let metrics = get_body(filter.http_addr, "/metrics").await;
    assert!(
        metrics.contains(r#"flowmesh_filter_connections_refused_total{reason="max_handshakes"}"#),
        "the refused handshake is counted"
    );
    filter.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_sighup_a_rotated_token_file_lets_the_new_token_in_and_the_old_one_for_its_window() {
    const OLD: &str = "the-old-token-of-enough-length";
    const NEW: &str = "the-new-token-of-enough-length";
    let dir = tempfile::tempdir().expect("dir");
    let path = dir.path().join("token");
    std::fs::write(&path, OLD).expect("token");
    let file = path.clone();
    let filter = TestFilter::start("rotate", move |c| {
        c.token.file = Some(file);
        c.token_rotation_window = Duration::from_secs(2);
    })
    .await;
    filter.wait_connected().await;
    let url = filter.url();
    // Accepting connections: the filter listens for SIGHUP by now.
    RawClient::connect(&url, Some(OLD))
        .await
        .expect("old token");
    assert!(
        RawClient::connect(&url, Some(NEW)).await.is_err(),
        "not yet"
    );

    std::fs::write(&path, format!("{NEW}\n")).expect("token");
    let hangup = std::process::Command::new("kill")
        .args(["-HUP", &std::process::id().to_string()])
        .status()
        .expect("kill");
    assert!(hangup.success());
    let mut admitted = false;
    for _ in 0..100 {
        if RawClient::connect(&url, Some(NEW)).await.is_ok() {
            admitted = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(admitted, "the new token is accepted after SIGHUP");
    RawClient::connect(&url, Some(OLD))
        .await
        .expect("the old token within the rotation window");
    tokio::time::sleep(Duration::from_millis(2200)).await;
    match RawClient::connect(&url, Some(OLD)).await {
        Err(tokio_tungstenite::tungstenite::Error::Http(response)) => {
            assert_eq!(response.status(), 401)
        }
        other => panic!("expected 401, got {:?}", other.map(|_| "a session")),
    }
    filter.finish().await;
}
