//! One generator and two filters in-process over real sockets, with the real RabbitMQ: the
//! generator sends to its source's own filter (rendezvous hashing), waits out a short outage
//! of it, fails over to the other after GENERATOR_FAILOVER_AFTER, and comes home once its
//! filter is back; every acked record is stored, and the only records stored twice are ones
//! the two filters both stored, at most the generator's window.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use flowmesh_common::testkit::{eventually, read_lines};
use flowmesh_filter::testkit::TestFilter;
use flowmesh_generator::config::{Rate, Values};
use flowmesh_generator::link::preference;
use flowmesh_generator::{Application, GeneratorConfig};
use tokio_util::sync::CancellationToken;

/// How many times each seq of `source` is in the records files of `dir`.
fn seqs_in(dir: &Path, source: &str) -> BTreeMap<u64, usize> {
    let mut seqs = BTreeMap::new();
    for path in flowmesh_filter::file_sink::sink_files(dir, "records").unwrap_or_default() {
        for line in read_lines(&path) {
            if line["source"] == source {
                *seqs.entry(line["seq"].as_u64().expect("seq")).or_default() += 1;
            }
        }
    }
    seqs
}

fn free_port() -> std::net::SocketAddr {
    std::net::TcpListener::bind("127.0.0.1:0")
        .expect("bind")
        .local_addr()
        .expect("addr")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_generator_fails_over_to_the_next_filter_and_comes_home_losing_nothing() {
    let source = "failover";
    let (port_a, port_b) = (free_port(), free_port());
    let urls = vec![
        format!("ws://{port_a}/ingest"),
        format!("ws://{port_b}/ingest"),
    ];
    let order = preference(source, &urls);
    let (home_port, away_port) = if order[0] == urls[0] {
        (port_a, port_b)
    } else {
        (port_b, port_a)
    };
    let home_dir = tempfile::tempdir().expect("dir");
    let away_dir = tempfile::tempdir().expect("dir");
    let home_data = home_dir.path().to_path_buf();
    let away_data = away_dir.path().to_path_buf();
    let start = |name: &'static str, port, data: std::path::PathBuf| {
        TestFilter::start(name, move |c| {
            c.listen = port;
            c.data_dir = data;
        })
    };
    let home = start("failover-home", home_port, home_data.clone()).await;
    let away = start("failover-away", away_port, away_data.clone()).await;

    let mut config = GeneratorConfig::for_tests(&urls.join(","));
    config.source = Some(source.to_owned());
    config.rate = Rate::PerSecond(1000.0);
    config.values = "0-90".parse::<Values>().expect("values"); // every record to the file
    config.failover_after = Duration::from_secs(2);
    config.home_check = Duration::from_millis(300);
    config.service.grace = Duration::from_secs(10);
    let window_size = config.window;
    let app = Application::build(config).await.expect("builds");
    let window = app.window();
    let stop = CancellationToken::new();
    let running = tokio::spawn(app.run_until_stopped(stop.clone()));

    // At home.
    eventually("records acked at home", Duration::from_secs(30), || {
        window.counts().acked > 500
    })
    .await;
    assert!(!seqs_in(&home_data, source).is_empty());
    assert!(
        seqs_in(&away_data, source).is_empty(),
        "nothing sent away while home answers"
    );

    // Home goes away: the generator fails over to the other filter, and records flow again.
    home.finish().await;
    let acked_at_loss = window.counts().acked;
    eventually(
        "records acked by the other filter",
        Duration::from_secs(60),
        || !seqs_in(&away_data, source).is_empty() && window.counts().acked > acked_at_loss + 500,
    )
    .await;

    // Home is back (same port, same data directory): the generator returns.
    let away_before = seqs_in(&away_data, source).len();
    let home_again = start("failover-home2", home_port, home_data.clone()).await;
    let home_before = seqs_in(&home_data, source).len();
    eventually(
        "records acked at home again",
        Duration::from_secs(60),
        || seqs_in(&home_data, source).len() > home_before + 500,
    )
    .await;
    let away_after = seqs_in(&away_data, source).len();
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        seqs_in(&away_data, source).len(),
        away_after,
        "nothing more goes to the other filter once home is back"
    );
    assert!(away_after >= away_before);

    stop.cancel();
    let summary = tokio::time::timeout(Duration::from_secs(60), running)
        .await
        .expect("the generator stops")
        .expect("task")
        .expect("ran");
    assert_eq!(summary.counts.in_flight, 0, "everything acked");
    let (at_home, away_seqs) = (seqs_in(&home_data, source), seqs_in(&away_data, source));
    // Each filter stores a record once; every generated one is in one of the two files.
    for (filter, seqs) in [("home", &at_home), ("other", &away_seqs)] {
        let twice: Vec<_> = seqs.iter().filter(|(_, n)| **n > 1).collect();
        assert!(twice.is_empty(), "{filter} stored these twice: {twice:?}");
    }
    for seq in 1..=summary.generated {
        assert!(
            at_home.contains_key(&seq) || away_seqs.contains_key(&seq),
            "seq {seq} was acked but is in neither file"
        );
    }
    let across = at_home
        .keys()
        .filter(|seq| away_seqs.contains_key(seq))
        .count();
    assert!(
        across <= window_size,
        "{across} records in both files: more than the generator's window ({window_size})"
    );
    home_again.finish().await;
    away.finish().await;
}
