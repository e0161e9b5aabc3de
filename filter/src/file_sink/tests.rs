//! The file sink on a real file system: acks after the bytes are in the file, rotation by size
//! and by age, the durability modes, failure → nack, and repair of a torn last line.

use std::time::Duration;

use flowmesh_common::breaker::{Breaker, BreakerSettings};
use tokio::sync::mpsc;

use super::*;
use crate::reply::{Destination, Replier, Reply};

fn config(dir: &Path, max_bytes: u64, max_age: Duration, durability: Durability) -> FileSinkConfig {
    FileSinkConfig {
        dir: dir.to_path_buf(),
        stem: "records",
        max_bytes,
        max_age,
        durability,
        dedupe_window: 1000,
        max_total_bytes: None,
    }
}

/// Files of up to 1 MiB, rotated after `max_age`, each write flushed (not fsynced).
fn flushing(dir: &Path, max_age: Duration) -> FileSinkConfig {
    config(dir, 1 << 20, max_age, Durability::Flush)
}

/// A sink on `config` with a breaker of the default settings.
fn started(config: FileSinkConfig) -> (FileSink, tokio::task::JoinHandle<()>) {
    FileSink::start(config, breaker())
}

fn breaker() -> Breaker {
    Breaker::new("test_file_sink", BreakerSettings::default())
}

async fn write(sink: &FileSink, seqs: std::ops::RangeInclusive<u64>) -> Reply {
    write_under(sink, seqs, None).await
}

async fn write_under(
    sink: &FileSink,
    seqs: std::ops::RangeInclusive<u64>,
    version: Option<&str>,
) -> Reply {
    let (tx, mut rx) = mpsc::unbounded_channel();
    let seqs: Vec<u64> = seqs.collect();
    let lines = seqs
        .iter()
        .map(|s| format!(r#"{{"id":"id-{s}","seq":{s}}}"#))
        .collect();
    let keys = seqs.iter().map(|s| id_key(&format!("id-{s}"))).collect();
    sink.submit(FileJob {
        lines,
        keys,
        version: version.map(str::to_owned),
        spans: Vec::new(),
        completion: Completion::Records {
            seqs,
            replier: Replier::new(tx),
        },
    })
    .await
    .expect("sink running");
    tokio::time::timeout(Duration::from_secs(10), rx.recv())
        .await
        .expect("answer within 10 s")
        .expect("answer")
}

fn all_seqs(dir: &Path) -> Vec<u64> {
    sink_files(dir, "records")
        .expect("list")
        .iter()
        .flat_map(|path| {
            fs::read_to_string(path)
                .expect("read")
                .lines()
                .map(|l| {
                    serde_json::from_str::<serde_json::Value>(l).expect("json")["seq"]
                        .as_u64()
                        .expect("seq")
                })
                .collect::<Vec<_>>()
        })
        .collect()
}

#[tokio::test]
async fn an_ack_comes_only_after_the_lines_are_in_the_file_in_both_durability_modes() {
    for durability in [Durability::Flush, Durability::Fsync] {
        let dir = tempfile::tempdir().expect("dir");
        let (sink, _task) = started(config(
            dir.path(),
            1 << 20,
            Duration::from_secs(3600),
            durability,
        ));
        match write(&sink, 1..=3).await {
            Reply::Ack { seqs, destination } => {
                assert_eq!(seqs, vec![1, 2, 3]);
                assert_eq!(destination, Destination::File);
            }
            other => panic!("{other:?}"),
        }
        // Read back the moment the ack arrived: the bytes are already there.
        assert_eq!(all_seqs(dir.path()), vec![1, 2, 3], "{durability:?}");
    }
}

#[tokio::test]
async fn the_file_rotates_by_size_and_no_line_is_lost_or_split() {
    let dir = tempfile::tempdir().expect("dir");
    let (sink, _task) = started(config(
        dir.path(),
        1024,
        Duration::from_secs(3600),
        Durability::Flush,
    ));
    for chunk in 0..20u64 {
        let first = chunk * 10 + 1;
        assert!(matches!(
            write(&sink, first..=first + 9).await,
            Reply::Ack { .. }
        ));
    }
    let files = sink_files(dir.path(), "records").expect("list");
    assert!(files.len() > 2, "expected rotations, got {files:?}");
    for rotated in &files[..files.len() - 1] {
        let name = rotated.file_name().and_then(|n| n.to_str()).expect("name");
        assert!(
            name.starts_with("records.") && name.ends_with("Z.jsonl") || name.contains("Z-"),
            "{name}"
        );
    }
    assert_eq!(all_seqs(dir.path()), (1..=200).collect::<Vec<_>>());
}

#[tokio::test]
async fn an_idle_file_rotates_by_age() {
    let dir = tempfile::tempdir().expect("dir");
    let (sink, _task) = started(flushing(dir.path(), Duration::from_millis(200)));
    assert!(matches!(write(&sink, 1..=1).await, Reply::Ack { .. }));
    // The idle check runs every second; allow generously for a busy machine.
    let active = dir.path().join("records.jsonl");
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    while active.exists() {
        assert!(std::time::Instant::now() < deadline, "never rotated by age");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(sink_files(dir.path(), "records").expect("list").len(), 1);
    assert_eq!(all_seqs(dir.path()), vec![1]);
}

#[tokio::test]
async fn a_file_system_failure_nacks_and_the_sink_recovers_when_it_is_fixed() {
    let base = tempfile::tempdir().expect("dir");
    let dir = base.path().join("sink");
    // A plain file where the directory should be: every open fails (even for root).
    fs::write(&dir, b"in the way").expect("block");
    let breaker = breaker();
    let (sink, _task) = FileSink::start(
        config(&dir, 1 << 20, Duration::from_secs(3600), Durability::Fsync),
        breaker.clone(),
    );
    match write(&sink, 1..=2).await {
        Reply::Nack { seqs, .. } => assert_eq!(seqs, vec![1, 2]),
        other => panic!("expected a nack, got {other:?}"),
    }
    fs::remove_file(&dir).expect("unblock");
    assert!(matches!(write(&sink, 3..=4).await, Reply::Ack { .. }));
    assert_eq!(
        all_seqs(&dir),
        vec![3, 4],
        "nothing of the failed commit reached the file"
    );
}

#[tokio::test]
async fn a_torn_last_line_left_by_a_crash_is_cut_before_appending() {
    let dir = tempfile::tempdir().expect("dir");
    fs::write(
        dir.path().join("records.jsonl"),
        "{\"seq\":1}\n{\"seq\":2}\n{\"se",
    )
    .expect("seed");
    let (sink, _task) = started(flushing(dir.path(), Duration::from_secs(3600)));
    assert!(matches!(write(&sink, 3..=3).await, Reply::Ack { .. }));
    assert_eq!(all_seqs(dir.path()), vec![1, 2, 3]);
}

#[tokio::test]
async fn records_sent_again_are_acked_but_not_written_twice_even_after_a_restart() {
    let dir = tempfile::tempdir().expect("dir");
    let cfg = || flushing(dir.path(), Duration::from_secs(3600));
    let (sink, task) = started(cfg());
    assert!(matches!(write(&sink, 1..=5).await, Reply::Ack { .. }));
    assert!(matches!(write(&sink, 4..=6).await, Reply::Ack { .. }));
    drop(sink);
    task.await.expect("sink stops");
    // A new process (the old one crashed): it reloads the ids from the file.
    let (sink, _task) = started(cfg());
    match write(&sink, 3..=8).await {
        Reply::Ack { seqs, .. } => assert_eq!(
            seqs,
            vec![3, 4, 5, 6, 7, 8],
            "re-sent records are still acked"
        ),
        other => panic!("{other:?}"),
    }
    assert_eq!(all_seqs(dir.path()), (1..=8).collect::<Vec<_>>());
}

#[tokio::test]
async fn a_restart_remembers_exactly_the_newest_ids_across_rotated_files() {
    let dir = tempfile::tempdir().expect("dir");
    // Lines are 22 to 24 bytes: rotating at 100 bytes spreads 1..=20 over several files.
    let cfg = || FileSinkConfig {
        dedupe_window: 7,
        ..config(
            dir.path(),
            100,
            Duration::from_secs(3600),
            Durability::Flush,
        )
    };
    let (sink, task) = started(cfg());
    for seq in 1..=20 {
        assert!(matches!(write(&sink, seq..=seq).await, Reply::Ack { .. }));
    }
    drop(sink);
    task.await.expect("sink stops");
    assert!(sink_files(dir.path(), "records").expect("list").len() > 3);
    // A new process remembers 14..=20 (the window's 7 newest, spread over files): re-sent, they
    // are dropped; 13 was forgotten, so it is written again.
    let (sink, _task) = started(cfg());
    assert!(matches!(write(&sink, 14..=20).await, Reply::Ack { .. }));
    assert_eq!(all_seqs(dir.path()), (1..=20).collect::<Vec<_>>());
    assert!(matches!(write(&sink, 13..=13).await, Reply::Ack { .. }));
    let mut expected: Vec<u64> = (1..=20).collect();
    expected.push(13);
    assert_eq!(all_seqs(dir.path()), expected);
}

#[test]
fn the_last_ids_of_a_file_are_read_one_line_at_a_time_skipping_what_is_not_a_record() {
    let text = "{\"id\":\"a\"}\nnot json\n{\"seq\":1}\n{\"id\":\"b\",\"x\":[1]}\n{\"id\":\"c\"}\n{\"id\":\"d\"";
    let ids = last_ids(text.as_bytes(), 2);
    assert_eq!(
        Vec::from(ids),
        vec![id_key("b"), id_key("c")],
        "torn last line skipped"
    );
    let ids = last_ids(text.as_bytes(), 10);
    assert_eq!(Vec::from(ids), vec![id_key("a"), id_key("b"), id_key("c")]);
    assert!(last_ids(text.as_bytes(), 0).is_empty());
}

#[tokio::test]
async fn files_at_their_size_cap_refuse_writes_until_old_files_are_removed() {
    let dir = tempfile::tempdir().expect("dir");
    let mut capped = config(
        dir.path(),
        200,
        Duration::from_secs(3600),
        Durability::Fsync,
    );
    // Lines of `write` are 22 to 24 bytes: 30 of them (rotated every 200 bytes) take about
    // 700, so 20 more would pass the cap.
    capped.max_total_bytes = Some(1000);
    let (sink, _task) = started(capped);
    for seqs in [1..=10, 11..=20, 21..=30] {
        assert!(matches!(write(&sink, seqs).await, Reply::Ack { .. }));
    }
    match write(&sink, 31..=50).await {
        Reply::Nack { seqs, reason, .. } => {
            assert_eq!(seqs.len(), 20);
            assert!(reason.contains("cap of 1000 bytes"), "{reason}");
        }
        other => panic!("expected a nack at the cap, got {other:?}"),
    }
    assert_eq!(
        all_seqs(dir.path()).len(),
        30,
        "nothing past the cap was written"
    );
    // The operator removes the rotated files: room again.
    for path in sink_files(dir.path(), "records").expect("files") {
        if path.file_name() != Some(std::ffi::OsStr::new("records.jsonl")) {
            fs::remove_file(path).expect("remove");
        }
    }
    assert!(matches!(write(&sink, 31..=50).await, Reply::Ack { .. }));
}

#[tokio::test]
async fn each_file_holds_one_routes_version_named_in_it() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cfg = config(
        dir.path(),
        1 << 20,
        Duration::from_secs(3600),
        Durability::Fsync,
    );
    let (sink, task) = started(cfg.clone());
    assert!(matches!(
        write_under(&sink, 1..=10, Some("aaaaaaaaaaaa")).await,
        Reply::Ack { .. }
    ));
    assert!(matches!(
        write_under(&sink, 11..=20, Some("aaaaaaaaaaaa")).await,
        Reply::Ack { .. }
    ));
    assert!(matches!(
        write_under(&sink, 21..=30, Some("bbbbbbbbbbbb")).await,
        Reply::Ack { .. }
    ));
    drop(sink);
    task.await.expect("sink task");
    // A restarted sink knows the active file's version: the same version appends to it.
    let (sink, task) = started(cfg);
    assert!(matches!(
        write_under(&sink, 31..=40, Some("bbbbbbbbbbbb")).await,
        Reply::Ack { .. }
    ));
    drop(sink);
    task.await.expect("sink task");

    let files = sink_files(dir.path(), "records").expect("list");
    assert_eq!(files.len(), 2, "{files:?}");
    let versions: Vec<Option<String>> = files
        .iter()
        .map(|f| file_version(dir.path(), "records", f).expect("version"))
        .collect();
    assert_eq!(
        versions,
        [
            Some("aaaaaaaaaaaa".to_owned()),
            Some("bbbbbbbbbbbb".to_owned())
        ]
    );
    assert!(files[0].to_string_lossy().ends_with(".aaaaaaaaaaaa.jsonl"));
    assert_eq!(all_seqs(dir.path()), (1..=40).collect::<Vec<_>>());
    let lines = |path: &Path| fs::read_to_string(path).expect("read").lines().count();
    assert_eq!((lines(&files[0]), lines(&files[1])), (20, 20));
}

#[test]
fn names_without_a_version_are_files_of_no_recorded_version() {
    let dir = Path::new("/nonexistent");
    let version = |name: &str| file_version(dir, "records", &dir.join(name)).expect("version");
    assert_eq!(version("records.20261201T101010.123Z-000.jsonl"), None);
    assert_eq!(
        version("records.20261201T101010.123Z-004.0123456789ab.jsonl").as_deref(),
        Some("0123456789ab")
    );
    assert_eq!(version("records.jsonl"), None);
}
