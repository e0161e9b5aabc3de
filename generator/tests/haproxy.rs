//! The shipped HAProxy configuration (`haproxy/haproxy.cfg`, Debian's haproxy) in front of two
//! filters, with the real RabbitMQ: a client's WebSocket is balanced onto one filter by its
//! address, and when that filter goes away the client's reconnect lands on the other; nothing
//! acked is lost and no filter stores a record twice.

use std::net::SocketAddr;
use std::time::Duration;

use flowmesh_common::testkit::eventually;
use flowmesh_filter::testkit::{TestFilter, assert_stored_by_filters, file_seqs, free_addrs};
use flowmesh_generator::config::{Rate, Values};
use flowmesh_generator::{Application, GeneratorConfig};
use tokio_util::sync::CancellationToken;

const CONFIG: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../haproxy/haproxy.cfg");

/// HAProxy in front of the two filters, listening on the address it returns; stopped when
/// dropped. A port taken by another test between its choice and HAProxy's bind makes HAProxy
/// exit at once ("cannot bind socket"): it is started again on another port.
async fn haproxy(filters: [SocketAddr; 2]) -> (tokio::process::Child, SocketAddr) {
    for _ in 0..5 {
        let [listen] = free_addrs();
        let mut child = tokio::process::Command::new("haproxy")
            .args(["-db", "-f", CONFIG])
            .env("FILTERS_LISTEN", listen.to_string())
            .env("FILTER_1", filters[0].to_string())
            .env("FILTER_2", filters[1].to_string())
            .kill_on_drop(true)
            .spawn()
            .expect("haproxy runs (Debian's haproxy package; scripts/deps.sh installs it)");
        if listening(&mut child, listen).await {
            return (child, listen);
        }
    }
    panic!("HAProxy could not bind a free port in five tries");
}

/// Whether `child` listens on `listen`: something accepts there and HAProxy still runs a
/// moment later (had another process held the port, HAProxy would have exited).
async fn listening(child: &mut tokio::process::Child, listen: SocketAddr) -> bool {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while tokio::time::Instant::now() < deadline {
        if child.try_wait().expect("haproxy's status").is_some() {
            return false;
        }
        if tokio::net::TcpStream::connect(listen).await.is_ok() {
            tokio::time::sleep(Duration::from_millis(300)).await;
            return child.try_wait().expect("haproxy's status").is_none();
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("HAProxy neither listened on {listen} nor exited within 20 s");
}

#[test]
fn the_configuration_is_valid_and_keeps_an_idle_websocket_longer_than_the_peer_timeout() {
    let check = std::process::Command::new("haproxy")
        .args(["-c", "-f", CONFIG])
        .env("FILTERS_LISTEN", "127.0.0.1:8080")
        .env("FILTER_1", "127.0.0.1:8081")
        .env("FILTER_2", "127.0.0.1:8082")
        .output()
        .expect("haproxy runs (Debian's haproxy package; scripts/deps.sh installs it)");
    assert!(
        check.status.success(),
        "haproxy -c: {}",
        String::from_utf8_lossy(&check.stderr)
    );
    let text = std::fs::read_to_string(CONFIG).expect("config");
    let setting = |name: &str| {
        text.lines()
            .map(str::trim)
            .find_map(|line| line.strip_prefix(name))
            .unwrap_or_else(|| panic!("no `{name}` in the configuration"))
            .trim()
            .to_owned()
    };
    assert_eq!(setting("balance"), "source");
    assert_eq!(setting("hash-type"), "consistent");
    // Both ends ping every 10 s and give up after 30 s of silence: the tunnel must outlast it.
    let tunnel =
        flowmesh_common::config::parse_duration(&setting("timeout tunnel")).expect("duration");
    assert!(
        tunnel > Duration::from_secs(30),
        "timeout tunnel {tunnel:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_behind_haproxy_reaches_one_filter_and_the_other_when_it_goes_away() {
    let source = "haproxy";
    let [port_1, port_2] = free_addrs();
    let (dir_1, dir_2) = (
        tempfile::tempdir().expect("dir"),
        tempfile::tempdir().expect("dir"),
    );
    let (data_1, data_2) = (dir_1.path().to_path_buf(), dir_2.path().to_path_buf());
    let filter_1 = {
        let data = data_1.clone();
        TestFilter::start("haproxy-1", move |c| {
            c.listen = port_1;
            c.data_dir = data;
        })
        .await
    };
    let filter_2 = {
        let data = data_2.clone();
        TestFilter::start("haproxy-2", move |c| {
            c.listen = port_2;
            c.data_dir = data;
        })
        .await
    };
    let (_haproxy, listen) = haproxy([port_1, port_2]).await;

    let mut config = GeneratorConfig::for_tests(&format!("ws://{listen}/ingest"));
    config.source = Some(source.to_owned());
    config.rate = Rate::PerSecond(1000.0);
    config.values = "0-90".parse::<Values>().expect("values");
    config.service.grace = Duration::from_secs(10);
    let app = Application::build(config).await.expect("builds");
    let window = app.window();
    let stop = CancellationToken::new();
    let running = tokio::spawn(app.run_until_stopped(stop.clone()));
    eventually(
        "records acked through HAProxy",
        Duration::from_secs(60),
        || window.counts().acked > 1000,
    )
    .await;

    // One client address, one filter.
    let (in_1, in_2) = (file_seqs(&data_1, source), file_seqs(&data_2, source));
    assert!(
        in_1.is_empty() != in_2.is_empty(),
        "one filter takes the client: {} and {} records",
        in_1.len(),
        in_2.len()
    );
    let (chosen, other, other_data) = if in_1.is_empty() {
        (filter_2, filter_1, data_1.clone())
    } else {
        (filter_1, filter_2, data_2.clone())
    };

    // Its filter goes away: the reconnect reaches the other one through HAProxy.
    chosen.finish().await;
    let acked = window.counts().acked;
    eventually(
        "records acked by the other filter",
        Duration::from_secs(60),
        || !file_seqs(&other_data, source).is_empty() && window.counts().acked > acked + 1000,
    )
    .await;

    stop.cancel();
    let summary = tokio::time::timeout(Duration::from_secs(60), running)
        .await
        .expect("the generator stops")
        .expect("task")
        .expect("ran");
    assert_eq!(summary.counts.in_flight, 0, "everything acked");
    assert_stored_by_filters(
        &[("filter-1", &data_1), ("filter-2", &data_2)],
        source,
        summary.generated,
    );
    other.finish().await;
}
