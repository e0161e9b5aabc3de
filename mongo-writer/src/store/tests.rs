//! Property tests: for any stream, any batching, any crash between write and ack (even in the
//! middle of a batch's writes), any restart and any duplicate, every record lands in exactly one
//! group exactly once, the groups follow the rule, and the result equals a clean run's.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use proptest::prelude::*;

use super::*;
use crate::nesting::nests;

/// The planner tests' record, from source "p".
fn rec(seq: u64, hash: &str) -> Record {
    Record {
        source: "p".into(),
        ..crate::nesting::tests::rec(seq, hash)
    }
}

type Flaky = crate::testkit::Crashing<MemoryStore>;

#[derive(Debug, Clone)]
struct Step {
    batch: usize,
    /// Crash during the writes, after this many operations.
    crash_in_writes: Option<usize>,
    /// Crash after the writes but before the ack.
    crash_before_ack: bool,
    /// Restart the writer (lose its memory) after a crash.
    restart: bool,
}

fn step() -> impl Strategy<Value = Step> {
    (
        1usize..25,
        prop::option::weighted(0.2, 0usize..6),
        prop::bool::weighted(0.2),
        any::<bool>(),
    )
        .prop_map(|(batch, crash_in_writes, crash_before_ack, restart)| Step {
            batch,
            crash_in_writes,
            crash_before_ack,
            restart,
        })
}

/// One of three sources, so streams interleave them.
fn source() -> impl Strategy<Value = &'static str> {
    prop::sample::select(vec!["p", "q", "r"])
}

fn hash() -> impl Strategy<Value = &'static str> {
    prop::sample::select(vec!["00", "42", "90", "99", "9a", "9f", "a0", "c3", "ff"])
}

/// A stream of records; `dups` re-deliver earlier records later (at-least-once from upstream).
fn stream() -> impl Strategy<Value = Vec<Record>> {
    (
        prop::collection::vec((hash(), source()), 0..200),
        prop::collection::vec((0usize..200, 0usize..200), 0..10),
    )
        .prop_map(|(hashes, dups)| {
            let mut records: Vec<Record> = hashes
                .iter()
                .enumerate()
                .map(|(i, (h, source))| Record {
                    source: (*source).to_owned(),
                    ..rec(i as u64 + 1, h)
                })
                .collect();
            for (from, to) in dups {
                if from < records.len() && to <= records.len() && from < to {
                    let copy = records[from].clone();
                    records.insert(to, copy);
                }
            }
            records
        })
}

fn run<F: Future>(future: F) -> F::Output {
    tokio::runtime::Builder::new_current_thread()
        .build()
        .expect("runtime")
        .block_on(future)
}

/// Feeds `records` like a queue would: batches, crashes, redelivery from the first unacked.
async fn deliver(records: &[Record], steps: &[Step], max_nest: usize) -> Vec<GroupDoc> {
    let flaky = Flaky::default();
    let mut writer = NestingStore::new(flaky.clone(), max_nest);
    let mut acked = 0;
    let mut steps = steps.iter().cycle().take(steps.len() * 4 + 1);
    while acked < records.len() {
        let step = steps.next().cloned().unwrap_or(Step {
            batch: 50,
            crash_in_writes: None,
            crash_before_ack: false,
            restart: false,
        });
        let end = (acked + step.batch).min(records.len());
        flaky.crash_next_apply_after(step.crash_in_writes);
        let result = writer.store(&records[acked..end]).await;
        let crashed = result.is_err() || step.crash_before_ack;
        if !crashed {
            acked = end;
        } else if step.restart {
            writer = NestingStore::new(flaky.clone(), max_nest);
        }
    }
    flaky.inner.groups()
}

fn shape(groups: &[GroupDoc]) -> Vec<(String, bool, Vec<String>)> {
    let mut shape: Vec<_> = groups
        .iter()
        .map(|g| {
            (
                g.id.clone(),
                g.nested,
                g.records.iter().map(|r| r.id.clone()).collect(),
            )
        })
        .collect();
    shape.sort();
    shape
}

/// The rule of docs/contracts.md §6, checked per source against the stream with repeats
/// removed; no group mixes sources.
fn check_rule(records: &[Record], groups: &[GroupDoc], max_nest: usize) {
    for group in groups {
        assert!(
            group.records.iter().all(|r| r.source == group.source),
            "group {} mixes sources",
            group.id
        );
    }
    let sources: HashSet<&str> = records.iter().map(|r| r.source.as_str()).collect();
    for source in sources {
        let records: Vec<Record> = records
            .iter()
            .filter(|r| r.source == source)
            .cloned()
            .collect();
        let groups: Vec<GroupDoc> = groups
            .iter()
            .filter(|g| g.source == source)
            .cloned()
            .collect();
        check_source(&records, &groups, max_nest);
    }
}

/// The rule over one source's records and groups.
fn check_source(records: &[Record], groups: &[GroupDoc], max_nest: usize) {
    let mut first = HashSet::new();
    let unique: Vec<&Record> = records
        .iter()
        .filter(|r| first.insert(r.id.clone()))
        .collect();
    let position: HashMap<&str, usize> = unique
        .iter()
        .enumerate()
        .map(|(i, r)| (r.id.as_str(), i))
        .collect();
    let mut group_of = vec![usize::MAX; unique.len()];
    for (g, group) in groups.iter().enumerate() {
        assert!(!group.records.is_empty());
        assert_eq!(
            group.id, group.records[0].id,
            "a group is named after its first record"
        );
        let start = position[group.records[0].id.as_str()];
        for (offset, record) in group.records.iter().enumerate() {
            let at = position[record.id.as_str()];
            assert_eq!(
                at,
                start + offset,
                "a group holds consecutive records of the stream"
            );
            assert_eq!(
                group_of[at],
                usize::MAX,
                "record {} stored twice",
                record.seq
            );
            group_of[at] = g;
            assert_eq!(
                nests(&record.hash),
                group.nested,
                "record {} in the wrong kind of group",
                record.seq
            );
        }
        if group.nested {
            assert!(group.records.len() <= max_nest, "max_nest exceeded");
        } else {
            assert_eq!(group.records.len(), 1, "a plain group holds one record");
        }
    }
    assert!(
        group_of.iter().all(|g| *g != usize::MAX),
        "a record is missing"
    );
    assert_eq!(
        groups.iter().map(|g| g.records.len()).sum::<usize>(),
        unique.len(),
        "a group holds a record of another source"
    );
    for i in 1..unique.len() {
        if nests(&unique[i - 1].hash) && nests(&unique[i].hash) && group_of[i - 1] != group_of[i] {
            assert_eq!(
                groups[group_of[i - 1]].records.len(),
                max_nest,
                "a nested run was split early"
            );
        }
    }
}

/// A store shared by two writers: before each call it lets the other writer run a few turns
/// (as `turns` says, cycling), so their reads and writes interleave at every await point.
#[derive(Debug, Clone)]
struct Yielding {
    inner: MemoryStore,
    turns: Arc<Mutex<(Vec<u8>, usize)>>,
}

impl Yielding {
    async fn pause(&self) {
        let turns = {
            let mut turns = self.turns.lock().unwrap_or_else(|e| e.into_inner());
            let (list, at) = &mut *turns;
            *at += 1;
            list[*at % list.len()]
        };
        for _ in 0..turns {
            tokio::task::yield_now().await;
        }
    }
}

impl GroupStore for Yielding {
    async fn last_group(&mut self, source: &str) -> anyhow::Result<Option<OpenGroup>> {
        self.pause().await;
        self.inner.last_group(source).await
    }
    async fn max_wseq(&mut self) -> anyhow::Result<u64> {
        self.pause().await;
        self.inner.max_wseq().await
    }
    async fn stored_ids(&mut self, ids: &[String]) -> anyhow::Result<HashSet<String>> {
        self.pause().await;
        self.inner.stored_ids(ids).await
    }
    async fn apply(&mut self, ops: &[Op]) -> anyhow::Result<()> {
        // Each operation on its own, so the other writer can act between two of them.
        for op in ops {
            self.pause().await;
            self.inner.apply(std::slice::from_ref(op)).await?;
        }
        Ok(())
    }
}

/// Two writers on one queue at once, as a single-active-consumer hand-over leaves them: each
/// takes the next window of the stream from the first unacked record (`back` records before it
/// again, `batch` after it), stores it and acks it, over one shared store.
async fn two_writers(
    records: &[Record],
    windows: &[(usize, usize)],
    turns: Vec<u8>,
    max_nest: usize,
) -> Vec<GroupDoc> {
    let store = MemoryStore::new();
    let shared = Yielding {
        inner: store.clone(),
        turns: Arc::new(Mutex::new((turns, 0))),
    };
    let acked = std::cell::Cell::new(0usize);
    let taken = std::cell::Cell::new(0usize);
    let writer = || async {
        let mut writer = NestingStore::new(shared.clone(), max_nest);
        let mut rounds = 0;
        while acked.get() < records.len() {
            rounds += 1;
            assert!(rounds < 10_000, "the writers made no progress");
            let (back, batch) = windows[taken.get() % windows.len()];
            taken.set(taken.get() + 1);
            let start = acked.get().saturating_sub(back);
            let end = (acked.get() + batch).min(records.len());
            if writer.store(&records[start..end]).await.is_ok() {
                acked.set(acked.get().max(end));
            }
            tokio::task::yield_now().await;
        }
    };
    tokio::join!(writer(), writer());
    store.groups()
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, .. ProptestConfig::default() })]

    #[test]
    fn two_writers_interleaved_at_random_write_what_one_clean_writer_writes(
        records in stream(),
        windows in prop::collection::vec((0usize..6, 1usize..30), 1..20),
        turns in prop::collection::vec(0u8..4, 1..20),
        max_nest in 1usize..7,
    ) {
        let clean = run(deliver(&records, &[Step { batch: 1000, crash_in_writes: None, crash_before_ack: false, restart: false }], max_nest));
        let both = run(two_writers(&records, &windows, turns, max_nest));
        check_rule(&records, &both, max_nest);
        prop_assert_eq!(shape(&both), shape(&clean));
        let mut wseqs: Vec<u64> = both.iter().map(|g| g.wseq).collect();
        wseqs.sort_unstable();
        wseqs.dedup();
        prop_assert_eq!(wseqs.len(), both.len(), "two groups share a write sequence");
    }

    #[test]
    fn every_record_lands_in_exactly_one_group_whatever_the_crashes_and_replays(
        records in stream(),
        steps in prop::collection::vec(step(), 1..30),
        max_nest in 1usize..7,
    ) {
        let clean = run(deliver(&records, &[Step { batch: 1000, crash_in_writes: None, crash_before_ack: false, restart: false }], max_nest));
        check_rule(&records, &clean, max_nest);
        let chaotic = run(deliver(&records, &steps, max_nest));
        check_rule(&records, &chaotic, max_nest);
        prop_assert_eq!(shape(&chaotic), shape(&clean));
    }

    #[test]
    fn batch_boundaries_never_change_the_grouping(
        records in stream(),
        sizes in prop::collection::vec(1usize..40, 1..10),
        max_nest in 1usize..7,
    ) {
        let steps: Vec<Step> = sizes.into_iter().map(|batch| Step { batch, crash_in_writes: None, crash_before_ack: false, restart: false }).collect();
        let batched = run(deliver(&records, &steps, max_nest));
        let single = run(deliver(&records, &[Step { batch: 1, crash_in_writes: None, crash_before_ack: false, restart: false }], max_nest));
        prop_assert_eq!(shape(&batched), shape(&single));
    }
}

#[tokio::test]
async fn a_restarted_writer_continues_the_open_group_it_finds_in_the_store() {
    let store = MemoryStore::new();
    let mut first = NestingStore::new(store.clone(), 100);
    first
        .store(&[rec(1, "aa"), rec(2, "bb")])
        .await
        .expect("store");
    let mut second = NestingStore::new(store.clone(), 100);
    second.store(&[rec(3, "cc")]).await.expect("store");
    let groups = store.groups();
    assert_eq!(groups.len(), 1);
    assert_eq!(groups[0].records.len(), 3);
}

#[tokio::test]
async fn a_failing_store_reports_the_error_and_stores_nothing() {
    let store = MemoryStore::new();
    store.set_failing(true);
    let mut writer = NestingStore::new(store.clone(), 100);
    assert!(writer.store(&[rec(1, "aa")]).await.is_err());
    store.set_failing(false);
    let report = writer.store(&[rec(1, "aa")]).await.expect("store");
    assert_eq!(report.stored, 1);
    assert_eq!(store.groups().len(), 1);
}
