//! Routes from a file, reloaded live (docs/contracts.md §3), against the real RabbitMQ: frames
//! keep flowing while SIGHUPs and file edits arrive, nothing is lost or written twice, every
//! frame is routed under one version, and a file that does not validate changes nothing.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::time::Duration;

use flowmesh_common::record::Record;
use flowmesh_common::routing::{Destination, Routes};
use flowmesh_common::testkit::{amqp_channel, drain_queue, eventually, record};
use flowmesh_common::topology::provenance_of;
use flowmesh_filter::file_sink::{file_version, sink_files};
use flowmesh_filter::live_routes::{Reload, applied_versions};
use flowmesh_filter::testkit::{RawClient, TestFilter};

const HOT: &str = "[[route]]\nname = \"hot\"\nwhen = \"value > 80 || hash >= 'f0'\"\nto = \"broker\"\n\n[[route]]\nname = \"rest\"\nto = \"file\"\n";
const LOW: &str = "[[route]]\nname = \"low\"\nwhen = \"value < 10\"\nto = \"broker\"\n\n[[route]]\nname = \"rest\"\nto = \"file\"\n";
const BROKEN: &str = "[[route]]\nname = \"low\"\nwhen = \"value <\"\nto = \"broker\"\n";

/// Replaces the routes file the way an editor or a deploy does: a new file renamed over it.
fn install(path: &Path, text: &str) {
    let temporary = path.with_extension("tmp");
    std::fs::write(&temporary, text).expect("write routes");
    std::fs::rename(&temporary, path).expect("install routes");
}

fn hangup() {
    let status = std::process::Command::new("kill")
        .args(["-HUP", &std::process::id().to_string()])
        .status()
        .expect("kill runs");
    assert!(status.success());
}

/// Every record in the records files with the version of its file.
fn stored_file(dir: &Path) -> Vec<(Record, String)> {
    let builtin = Routes::builtin_version();
    sink_files(dir, "records")
        .expect("list")
        .iter()
        .flat_map(|path| {
            let version = file_version(dir, "records", path)
                .expect("version")
                .unwrap_or_else(|| builtin.clone());
            std::fs::read_to_string(path)
                .expect("read")
                .lines()
                .map(|line| (Record::from_json(line).expect("a record"), version.clone()))
                .collect::<Vec<_>>()
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reloads_under_load_route_every_frame_under_one_version_and_lose_nothing() {
    let routes_dir = tempfile::tempdir().expect("dir");
    let path = routes_dir.path().join("routes.toml");
    install(&path, HOT);
    let routes_path = path.clone();
    let filter = TestFilter::start("routes-reload", move |c| c.routes = Some(routes_path)).await;
    filter.wait_connected().await;
    let hot = filter.routes.current();
    assert_eq!(hot.names(), ["hot", "rest"]);

    // Reloads while frames flow: file edits (seen by the watcher), SIGHUPs, and a broken file.
    let edits = {
        let path = path.clone();
        tokio::spawn(async move {
            for round in 0..12 {
                tokio::time::sleep(Duration::from_millis(60)).await;
                install(&path, if round % 2 == 0 { LOW } else { HOT });
                if round % 3 == 0 {
                    hangup();
                }
                if round == 7 {
                    tokio::time::sleep(Duration::from_millis(60)).await;
                    install(&path, BROKEN);
                    hangup();
                }
            }
        })
    };
    let frames = 60u64;
    let per_frame = 50u64;
    let mut client = RawClient::connect(&filter.url(), None)
        .await
        .expect("connect");
    for frame in 0..frames {
        let batch: Vec<_> = (1..=per_frame)
            .map(|i| {
                let seq = frame * per_frame + i;
                record("reload", seq, ((seq * 37) % 101) as u8)
            })
            .collect();
        client
            .send_text(serde_json::to_string(&batch).expect("json"))
            .await;
        let seqs: Vec<u64> = batch.iter().map(|r| r.seq).collect();
        client.expect_acks(&seqs).await;
        tokio::time::sleep(Duration::from_millis(15)).await;
    }
    edits.await.expect("edits ran");
    // The last edit installs HOT; wait for it, then check a broken file is refused.
    eventually("the last edit is in force", Duration::from_secs(10), || {
        filter.routes.current().version() == hot.version()
    })
    .await;
    install(&path, BROKEN);
    assert!(
        matches!(filter.routes.reload("test"), Reload::Invalid(why) if why.contains("route \"low\""))
    );
    assert_eq!(filter.routes.current().version(), hot.version());

    // Where each record is and under which version.
    let total = (frames * per_frame) as usize;
    let file = stored_file(filter.dir.path());
    let (connection, channel) = amqp_channel().await;
    let queue = &filter.topology.queue_for("pg-writer").expect("queue").name;
    let deliveries =
        drain_queue(&channel, queue, total - file.len(), Duration::from_secs(30)).await;
    let _ = connection.close(200, "done".into()).await;
    let mut placed: BTreeMap<u64, (Destination, String, Record)> = BTreeMap::new();
    let mut stored = 0;
    for (r, version) in file {
        stored += 1;
        let seq = r.seq;
        assert!(
            placed
                .insert(seq, (Destination::File, version, r))
                .is_none(),
            "seq {seq} twice"
        );
    }
    for delivery in &deliveries {
        stored += 1;
        let r = Record::from_json(std::str::from_utf8(&delivery.data).expect("utf-8"))
            .expect("a record");
        let provenance = provenance_of(&delivery.properties).expect("provenance headers");
        let versions = applied_versions(filter.dir.path()).expect("routes.log");
        let routes = &versions[&provenance.version];
        assert_eq!(
            provenance.route.as_deref(),
            Some(routes.choose(&r).route.name())
        );
        assert!(
            placed
                .insert(r.seq, (Destination::Broker, provenance.version, r.clone()))
                .is_none(),
            "seq {} twice",
            r.seq
        );
    }
    assert_eq!(stored, total, "lost or duplicated records");
    assert_eq!(
        placed.keys().copied().collect::<Vec<_>>(),
        (1..=total as u64).collect::<Vec<_>>()
    );

    // Every record is where its version sends it, and every frame has one version.
    let versions = applied_versions(filter.dir.path()).expect("routes.log");
    let mut used = BTreeSet::new();
    for frame in 0..frames {
        let of_frame: BTreeSet<&String> = (1..=per_frame)
            .map(|i| &placed[&(frame * per_frame + i)].1)
            .collect();
        assert_eq!(
            of_frame.len(),
            1,
            "frame {frame} was routed under {of_frame:?}"
        );
        used.extend(of_frame);
    }
    for (seq, (at, version, r)) in &placed {
        let routes = versions
            .get(version)
            .expect("every version used is in routes.log");
        assert_eq!(routes.destination(r), *at, "seq {seq} under {version}");
    }
    assert!(used.len() >= 2, "the run crossed versions: {used:?}");
    filter.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_invalid_routes_file_at_start_is_a_configuration_error_and_health_shows_the_routes() {
    use clap::Parser as _;
    use flowmesh_common::config::Validate as _;
    let dir = tempfile::tempdir().expect("dir");
    let path = dir.path().join("routes.toml");
    install(&path, BROKEN);
    let mut config = flowmesh_filter::FilterConfig::parse_from(["filter"]);
    config.routes = Some(path.clone());
    let error = config.validate().expect_err("refused");
    assert!(
        error.contains("FILTER_ROUTES") && error.contains("route \"low\""),
        "{error}"
    );

    install(&path, LOW);
    let routes_path = path.clone();
    let filter = TestFilter::start("routes-health", move |c| c.routes = Some(routes_path)).await;
    let health = http_get(filter.http_addr, "/health").await;
    let routes = &health["components"]["routes"]["details"];
    assert_eq!(
        routes["version"],
        Routes::parse(LOW).expect("parses").version()
    );
    assert_eq!(routes["routes"], serde_json::json!(["low", "rest"]));
    let metrics = http_text(filter.http_addr, "/metrics").await;
    let version = format!(
        "flowmesh_filter_routes_version{{version=\"{}\"}} 1",
        Routes::parse(LOW).expect("parses").version()
    );
    assert!(metrics.contains(&version), "{metrics}");
    install(&path, BROKEN);
    hangup();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let metrics = http_text(filter.http_addr, "/metrics").await;
        if metrics.contains("flowmesh_filter_routes_reloads_total{outcome=\"invalid\"} 1")
            || metrics.contains("flowmesh_filter_routes_reloads_total{outcome=\"invalid\"} 2")
        {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no invalid reload counted: {metrics}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(filter.routes.current().names(), ["low", "rest"]);
    let log = std::fs::read_to_string(filter.dir.path().join("routes.log")).expect("routes.log");
    assert_eq!(
        log.lines().count(),
        1,
        "only applied versions are logged: {log}"
    );
    filter.finish().await;
}

async fn http_text(addr: std::net::SocketAddr, path: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(addr).await.expect("connect");
    stream
        .write_all(
            format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes(),
        )
        .await
        .expect("write");
    let mut response = String::new();
    stream.read_to_string(&mut response).await.expect("read");
    response
        .split_once("\r\n\r\n")
        .map(|(_, body)| body.to_owned())
        .unwrap_or_default()
}

async fn http_get(addr: std::net::SocketAddr, path: &str) -> serde_json::Value {
    serde_json::from_str(&http_text(addr, path).await).expect("json")
}
