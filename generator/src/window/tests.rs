//! The window never forgets an unacked record and never queues one twice.

use super::*;
use flowmesh_common::record::parse_timestamp;

fn record(seq: u64) -> Record {
    let at = parse_timestamp("2026-11-22T04:00:00.123Z").expect("ts");
    Record::new("w", seq, at, 50, None)
}

fn seqs(batch: &Batch) -> Vec<u64> {
    batch.iter().map(|(seq, _)| *seq).collect()
}

#[tokio::test]
async fn records_are_sent_in_order_and_forgotten_only_when_acked() {
    let window = Window::new(10);
    for seq in 1..=3 {
        window.push(&record(seq), Default::default()).await;
    }
    assert_eq!(seqs(&window.take_batch(10, 1 << 20)), vec![1, 2, 3]);
    assert!(
        window.take_batch(10, 1 << 20).is_empty(),
        "nothing is sent twice unasked"
    );
    window.ack(&[1, 3]);
    assert_eq!(
        window.counts(),
        WindowCounts {
            acked: 2,
            rejected: 0,
            in_flight: 1
        }
    );
}

#[tokio::test]
async fn a_reconnect_requeues_every_unacked_record_once() {
    let window = Window::new(10);
    for seq in 1..=4 {
        window.push(&record(seq), Default::default()).await;
    }
    let _ = window.take_batch(2, 1 << 20);
    window.ack(&[2]);
    window.requeue_all();
    window.requeue_all();
    assert_eq!(seqs(&window.take_batch(10, 1 << 20)), vec![1, 3, 4]);
}

#[tokio::test]
async fn a_nacked_record_comes_back_after_its_retry_delay() {
    let window = Window::new(10);
    window.push(&record(1), Default::default()).await;
    let _ = window.take_batch(10, 1 << 20);
    let delay = Duration::from_millis(500);
    let nacked = tokio::time::Instant::now();
    window.nack(&[1], delay);
    assert!(window.take_batch(10, 1 << 20).is_empty() || nacked.elapsed() >= delay);
    tokio::time::sleep(delay + Duration::from_millis(1)).await;
    assert_eq!(seqs(&window.take_batch(10, 1 << 20)), vec![1]);
}

#[tokio::test]
async fn a_rejected_record_is_forgotten_and_counted() {
    let window = Window::new(10);
    window.push(&record(1), Default::default()).await;
    window.reject(1);
    assert_eq!(
        window.counts(),
        WindowCounts {
            acked: 0,
            rejected: 1,
            in_flight: 0
        }
    );
}

#[tokio::test]
async fn a_full_window_pauses_push_until_an_ack_frees_room() {
    let window = std::sync::Arc::new(Window::new(2));
    window.push(&record(1), Default::default()).await;
    window.push(&record(2), Default::default()).await;
    let pusher = {
        let window = window.clone();
        tokio::spawn(async move { window.push(&record(3), Default::default()).await })
    };
    tokio::task::yield_now().await;
    assert!(!pusher.is_finished());
    window.ack(&[1]);
    let waited = tokio::time::timeout(Duration::from_secs(5), pusher)
        .await
        .expect("push resumed")
        .expect("task");
    assert!(waited);
    assert_eq!(window.counts().in_flight, 2);
}

#[tokio::test]
async fn batches_respect_the_byte_limit_but_always_carry_one_record() {
    let window = Window::new(10);
    for seq in 1..=3 {
        window.push(&record(seq), Default::default()).await;
    }
    let batch = window.take_batch(10, 10);
    assert_eq!(seqs(&batch), vec![1]);
}
