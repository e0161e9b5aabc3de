//! The generator and the filter in-process over a real socket, with the real RabbitMQ: every
//! record acked once and stored in exactly one place, nacks re-sent, outages waited out, and
//! graceful shutdowns that lose nothing acked.

use std::collections::BTreeMap;
use std::time::Duration;

use flowmesh_common::record::Record;
use flowmesh_common::routing::{Destination, Routes};
use flowmesh_common::testkit::{amqp_channel, drain_queue, eventually, read_lines};
use flowmesh_filter::testkit::TestFilter;
use flowmesh_generator::config::Rate;
use flowmesh_generator::{Application, GeneratorConfig, Summary};
use tokio_util::sync::CancellationToken;

fn generator(url: &str, source: &str, count: Option<u64>) -> GeneratorConfig {
    let mut config = GeneratorConfig::for_tests(url);
    config.source = Some(source.to_owned());
    config.rate = Rate::Max;
    config.count = count;
    config.seed = Some(42);
    config
}

async fn run(config: GeneratorConfig) -> Summary {
    Application::run_to_end(config, Duration::from_secs(120))
        .await
        .expect("the generator ran to its end")
}

/// Checks that the generator had `count` records acked and that each is stored exactly once
/// (seqs 1..=count, one queue); stops the filter.
async fn stored_once_each(filter: TestFilter, summary: &Summary, count: u64) {
    assert_eq!(summary.counts.acked, count);
    placement(&filter, 1).await.assert_exactly_once(1..=count);
    filter.finish().await;
}

/// A generator running until `stop` fires.
struct Running {
    window: std::sync::Arc<flowmesh_generator::window::Window>,
    link: flowmesh_common::link::LinkStatus,
    stop: CancellationToken,
    task: tokio::task::JoinHandle<anyhow::Result<Summary>>,
}

impl Running {
    /// Starts a generator on `config` and waits until more than `acked` of its records are
    /// acked.
    async fn until_acked(config: GeneratorConfig, acked: u64) -> Self {
        let app = Application::build(config).await.expect("builds");
        let window = app.window();
        let link = app.link();
        let stop = CancellationToken::new();
        let task = tokio::spawn(app.run_until_stopped(stop.clone()));
        eventually("some records acked", Duration::from_secs(30), || {
            window.counts().acked > acked
        })
        .await;
        Self {
            window,
            link,
            stop,
            task,
        }
    }
}

/// Where each seq ended up: (times in the file, times in each writer queue).
struct Placement {
    file: BTreeMap<u64, (u8, usize)>,
    queues: Vec<BTreeMap<u64, (u8, usize)>>,
}

async fn placement(filter: &TestFilter, expected_in_queues: usize) -> Placement {
    let mut file = BTreeMap::new();
    for line in filter.file_records() {
        let record: Record = serde_json::from_value(line).expect("file lines are records");
        file.entry(record.seq).or_insert((record.value, 0)).1 += 1;
    }
    let (connection, channel) = amqp_channel().await;
    let mut queues = Vec::new();
    for queue in &filter.topology.writer_queues {
        let mut seen = BTreeMap::new();
        for delivery in drain_queue(
            &channel,
            &queue.name,
            expected_in_queues,
            Duration::from_secs(30),
        )
        .await
        {
            let record: Record =
                serde_json::from_slice(&delivery.data).expect("messages are records");
            seen.entry(record.seq).or_insert((record.value, 0)).1 += 1;
        }
        queues.push(seen);
    }
    let _ = connection.close(200, "ok".into()).await;
    Placement { file, queues }
}

/// Where the built-in routes send a record of this `value` (they read nothing else).
fn builtin_destination(value: u8) -> Destination {
    Routes::builtin().destination(&flowmesh_common::testkit::record("any", 1, value))
}

impl Placement {
    /// Asserts every seq in `seqs` is stored exactly where its value says, exactly once.
    fn assert_exactly_once(&self, seqs: impl IntoIterator<Item = u64>) {
        self.assert_placed(seqs, false);
    }

    /// Like [`assert_exactly_once`], but a queue may hold a re-sent record twice (at-least-once:
    /// the writers absorb it); the file never may.
    fn assert_placed(&self, seqs: impl IntoIterator<Item = u64>, queue_repeats_allowed: bool) {
        for seq in seqs {
            match self.file.get(&seq) {
                Some((value, times)) => {
                    assert!(
                        builtin_destination(*value) == Destination::File,
                        "seq {seq} (value {value}) must not be in the file"
                    );
                    assert_eq!(*times, 1, "seq {seq} is in the file {times} times");
                    for queue in &self.queues {
                        assert!(
                            !queue.contains_key(&seq),
                            "seq {seq} is in the file and a queue"
                        );
                    }
                }
                None => {
                    for queue in &self.queues {
                        let (value, times) = queue
                            .get(&seq)
                            .unwrap_or_else(|| panic!("seq {seq} is missing"));
                        assert!(
                            builtin_destination(*value) == Destination::Broker,
                            "seq {seq} (value {value}) must not be in a queue"
                        );
                        if !queue_repeats_allowed {
                            assert_eq!(*times, 1, "seq {seq} is in a queue {times} times");
                        }
                    }
                }
            }
        }
    }

    fn broker_count(&self) -> usize {
        self.queues.first().map_or(0, BTreeMap::len)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn twenty_thousand_records_are_each_acked_once_and_stored_exactly_where_their_value_says() {
    let filter = TestFilter::start("mesh", |_| {}).await;
    let summary = run(generator(&filter.url(), "mesh", Some(20_000))).await;
    assert_eq!(summary.generated, 20_000);
    assert_eq!(summary.counts.acked, 20_000);
    assert_eq!(summary.counts.in_flight, 0);
    let expected_broker = (20_000 - filter.file_records().len()).max(1);
    let placed = placement(&filter, expected_broker).await;
    placed.assert_exactly_once(1..=20_000);
    assert_eq!(
        placed.file.len() + placed.broker_count(),
        20_000,
        "nothing extra"
    );
    // About 10 / 101 of uniform values 0..=100 are above 90.
    let share = placed.broker_count() as f64 / 20_000.0;
    assert!((0.06..0.14).contains(&share), "broker share {share}");
    filter.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn records_nacked_by_an_open_breaker_are_resent_until_acked() {
    let filter = TestFilter::start("resend", |c| {
        c.breaker.breaker_open_wait = Duration::from_millis(300)
    })
    .await;
    filter.wait_connected().await;
    filter.file_breaker.trip();
    let summary = run(generator(&filter.url(), "resend", Some(200))).await;
    stored_once_each(filter, &summary, 200).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_filter_that_is_not_there_yet_is_waited_out_and_then_gets_everything() {
    // Reserve a port, then free it: nothing listens there until the filter starts.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .expect("bind")
        .local_addr()
        .expect("addr");
    let url = format!("ws://{port}/ingest");
    let app = Application::build(generator(&url, "late", Some(500)))
        .await
        .expect("builds");
    let breaker = app.breaker();
    let running = tokio::spawn(app.run_until_stopped(CancellationToken::new()));
    eventually(
        "the generator's breaker opens",
        Duration::from_secs(30),
        || breaker.state() == flowmesh_common::breaker::BreakerState::Open,
    )
    .await;
    let filter = TestFilter::start("late", |c| c.listen = port).await;
    let summary = tokio::time::timeout(Duration::from_secs(120), running)
        .await
        .expect("finishes")
        .expect("task")
        .expect("ran");
    stored_once_each(filter, &summary, 500).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_generator_stopped_mid_stream_drains_its_window_and_everything_it_made_is_stored() {
    let filter = TestFilter::start("genstop", |_| {}).await;
    let mut config = generator(&filter.url(), "genstop", None);
    config.rate = Rate::PerSecond(2000.0);
    let running = Running::until_acked(config, 500).await;
    running.stop.cancel();
    let summary = running.task.await.expect("task").expect("ran");
    assert_eq!(
        summary.counts.in_flight, 0,
        "the grace period was enough to drain"
    );
    let generated = summary.generated;
    stored_once_each(filter, &summary, generated).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_filter_shut_down_mid_stream_loses_nothing_it_acked() {
    let filter = TestFilter::start("filterstop", |_| {}).await;
    // The run is cut short, so its broker-bound records are acked (and its queues declared)
    // only if the publisher is connected before records flow.
    filter.wait_connected().await;
    let mut config = generator(&filter.url(), "filterstop", None);
    config.rate = Rate::PerSecond(3000.0);
    config.service.grace = Duration::from_secs(1);
    let Running {
        window,
        link,
        stop,
        task: running,
    } = Running::until_acked(config, 1000).await;
    filter.stop().await;
    eventually(
        "the generator loses the filter",
        Duration::from_secs(30),
        || !link.is_connected(),
    )
    .await;
    stop.cancel();
    let summary = tokio::time::timeout(Duration::from_secs(60), running)
        .await
        .expect("generator stops")
        .expect("task")
        .expect("ran");
    let unacked: std::collections::BTreeSet<u64> = window.unacked().into_iter().collect();
    let acked: Vec<u64> = (1..=summary.generated)
        .filter(|s| !unacked.contains(s))
        .collect();
    assert_eq!(acked.len() as u64, summary.counts.acked);
    assert!(!acked.is_empty());
    let placed = placement(&filter, 1).await;
    // Every acked record is stored exactly once; unacked ones may or may not have been.
    placed.assert_exactly_once(acked);
    filter.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_generator_killed_mid_run_resumes_from_its_spool_and_loses_nothing() {
    let filter = TestFilter::start("spool", |_| {}).await;
    let spool = tempfile::tempdir().expect("spool dir");
    let mut config = generator(&filter.url(), "spool", Some(6000));
    config.rate = Rate::PerSecond(4000.0);
    config.spool_dir = Some(spool.path().to_path_buf());
    let app = Application::build(config.clone()).await.expect("builds");
    let window = app.window();
    let running = tokio::spawn(app.run_until_stopped(CancellationToken::new()));
    eventually("some records acked", Duration::from_secs(30), || {
        window.counts().acked > 1500
    })
    .await;
    // The nearest thing to kill -9 in-process: the task stops at once, nothing is drained.
    running.abort();
    let _ = running.await;
    assert!(window.counts().in_flight > 0 || window.counts().acked < 6000);

    // The restart knows its source from the spool and continues the same sequence.
    config.source = None;
    let summary = run(config).await;
    assert_eq!(summary.source, "spool");
    assert_eq!(summary.counts.in_flight, 0);
    let expected_broker = 1;
    let placed = placement(&filter, expected_broker).await;
    // Nothing is missing; re-sent records are not written to the file twice. The queues may
    // carry a re-sent record twice: the writers store it once (see pg-writer's tests).
    placed.assert_placed(1..=6000, true);
    assert_eq!(placed.file.len() + placed.broker_count(), 6000);
    filter.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_filter_restarted_on_the_same_directory_does_not_write_resent_records_twice() {
    let dir = tempfile::tempdir().expect("dir");
    let data = dir.path().to_path_buf();
    let first = TestFilter::start("refile", |c| c.data_dir = data.clone()).await;
    let summary = run(generator(&first.url(), "refile", Some(500))).await;
    assert_eq!(summary.counts.acked, 500);
    let lines = read_lines(&data.join("records.jsonl")).len();
    assert!(lines > 0);
    first.finish().await;
    // Everything comes again (as after a crash between the file commit and the acks).
    let second = TestFilter::start("refile2", |c| c.data_dir = data.clone()).await;
    let mut client = flowmesh_filter::testkit::RawClient::connect(&second.url(), None)
        .await
        .expect("connect");
    let again: Vec<Record> = read_lines(&data.join("records.jsonl"))
        .into_iter()
        .map(|v| serde_json::from_value(v).expect("record"))
        .collect();
    client
        .send_text(serde_json::to_string(&again).expect("json"))
        .await;
    client
        .expect_acks(&again.iter().map(|r| r.seq).collect::<Vec<_>>())
        .await;
    assert_eq!(read_lines(&data.join("records.jsonl")).len(), lines);
    second.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_sighup_a_generator_presents_its_rotated_token_from_its_next_connection() {
    const OLD: &str = "the-old-token-of-enough-length";
    const NEW: &str = "the-new-token-of-enough-length";
    let dir = tempfile::tempdir().expect("dir");
    let (ours, theirs) = (
        dir.path().join("generator-token"),
        dir.path().join("filter-token"),
    );
    std::fs::write(&ours, OLD).expect("token");
    std::fs::write(&theirs, OLD).expect("token");
    let file = theirs.clone();
    let first = TestFilter::start("rotate-gen", move |c| {
        c.token.file = Some(file);
        c.token_rotation_window = Duration::ZERO;
    })
    .await;
    first.wait_connected().await;
    let address = first.ws_addr;
    let mut config = generator(&first.url(), "rotate-gen", Some(3_000));
    config.rate = Rate::PerSecond(300.0);
    config.token.file = Some(ours.clone());
    let generator = tokio::spawn(run(config));
    // Both sides listen for SIGHUP once running; then the token files change and both are told.
    tokio::time::sleep(Duration::from_secs(1)).await;
    std::fs::write(&ours, NEW).expect("token");
    std::fs::write(&theirs, NEW).expect("token");
    let hangup = std::process::Command::new("kill")
        .args(["-HUP", &std::process::id().to_string()])
        .status()
        .expect("kill");
    assert!(hangup.success());
    tokio::time::sleep(Duration::from_millis(300)).await;
    // A filter on the same address that knows only the new token: the generator's next
    // connection must present it.
    first.finish().await;
    let file = theirs.clone();
    let second = TestFilter::start("rotate-gen", move |c| {
        c.listen = address;
        c.token.file = Some(file);
    })
    .await;
    let summary = generator.await.expect("generator task");
    assert_eq!(
        summary.counts.acked, 3_000,
        "every record acked, after the rotation too"
    );
    second.finish().await;
}
