//! One generator and two filters in-process over real sockets, with the real RabbitMQ: the
//! generator sends to its source's own filter (rendezvous hashing), waits out a short outage
//! of it, fails over to the other after GENERATOR_FAILOVER_AFTER, and comes home once its
//! filter is back; every acked record is stored, and the only records stored twice are ones
//! the two filters both stored, at most the generator's window.

use std::time::Duration;

use flowmesh_common::testkit::eventually;
use flowmesh_filter::testkit::{TestFilter, assert_stored_by_filters, file_seqs, free_addrs};
use flowmesh_generator::config::{Rate, Values};
use flowmesh_generator::link::preference;
use flowmesh_generator::{Application, GeneratorConfig};
use tokio_util::sync::CancellationToken;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_generator_fails_over_to_the_next_filter_and_comes_home_losing_nothing() {
    let source = "failover";
    let [port_a, port_b] = free_addrs();
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
    // A breaker that, once open, waits longer than the failover takes: it guards the filter in
    // use, so it must not hold the move to the next one.
    config.breaker.breaker_open_wait = Duration::from_secs(20);
    config.breaker.breaker_max_open_wait = Duration::from_secs(30);
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
    assert!(!file_seqs(&home_data, source).is_empty());
    assert!(
        file_seqs(&away_data, source).is_empty(),
        "nothing sent away while home answers"
    );

    // Home goes away: the generator fails over to the other filter, and records flow again.
    home.finish().await;
    let acked_at_loss = window.counts().acked;
    // GENERATOR_FAILOVER_AFTER (2 s) and a reconnect, well before the breaker's 20 s.
    eventually(
        "records acked by the other filter within 12 s",
        Duration::from_secs(12),
        || !file_seqs(&away_data, source).is_empty() && window.counts().acked > acked_at_loss + 500,
    )
    .await;

    // Home is back (same port, same data directory): the generator returns.
    let away_before = file_seqs(&away_data, source).len();
    let home_again = start("failover-home2", home_port, home_data.clone()).await;
    let home_before = file_seqs(&home_data, source).len();
    eventually(
        "records acked at home again",
        Duration::from_secs(60),
        || file_seqs(&home_data, source).len() > home_before + 500,
    )
    .await;
    let away_after = file_seqs(&away_data, source).len();
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        file_seqs(&away_data, source).len(),
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
    let across = assert_stored_by_filters(
        &[("home", &home_data), ("the other filter", &away_data)],
        source,
        summary.generated,
    );
    assert!(
        across <= window_size,
        "{across} records in both files: more than the generator's window ({window_size})"
    );
    home_again.finish().await;
    away.finish().await;
}
