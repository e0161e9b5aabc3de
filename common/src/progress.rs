//! Progress lines: every `--progress-every` (`LOG_PROGRESS_EVERY`, default 30 s; 0 turns them
//! off) each service logs one `info` line with what a person tailing its logs wants to know —
//! what it did since the last line and in total, its rate, what it holds, the state of each
//! breaker and link — and, during an outage, what is waiting and for how long.

use std::future::Future;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

/// A running total and its value at the last line, for "since the last line" and a rate.
#[derive(Debug, Default, Clone, Copy)]
pub struct Tally {
    last: u64,
}

impl Tally {
    /// How much `total` grew since the last call.
    pub fn since(&mut self, total: u64) -> u64 {
        let delta = total.saturating_sub(self.last);
        self.last = total;
        delta
    }
}

/// Per second, rounded to one decimal.
pub fn rate(count: u64, over: Duration) -> f64 {
    let seconds = over.as_secs_f64();
    if seconds <= 0.0 {
        0.0
    } else {
        (count as f64 / seconds * 10.0).round() / 10.0
    }
}

/// Calls `line` every `every` until `stop` fires (never when `every` is zero). `line` gets the
/// time since its last call and logs the line itself.
pub fn spawn<F, Fut>(every: Duration, stop: CancellationToken, mut line: F)
where
    F: FnMut(Duration) -> Fut + Send + 'static,
    Fut: Future<Output = ()> + Send,
{
    if every.is_zero() {
        return;
    }
    tokio::spawn(async move {
        let mut ticker = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut last = tokio::time::Instant::now();
        loop {
            tokio::select! {
                _ = stop.cancelled() => break,
                _ = ticker.tick() => {}
            }
            let now = tokio::time::Instant::now();
            line(now - last).await;
            last = now;
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_tally_counts_what_happened_since_the_last_line() {
        let mut tally = Tally::default();
        assert_eq!(tally.since(10), 10);
        assert_eq!(tally.since(25), 15);
        assert_eq!(tally.since(25), 0);
        assert_eq!(rate(15, Duration::from_secs(30)), 0.5);
    }

    #[tokio::test]
    async fn lines_come_at_the_interval_and_stop_with_the_token() {
        let every = Duration::from_millis(300);
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        let stop = CancellationToken::new();
        let started = tokio::time::Instant::now();
        spawn(every, stop.clone(), move |since| {
            let tx = tx.clone();
            async move {
                let _ = tx.send(since);
            }
        });
        for _ in 0..2 {
            let since = rx.recv().await.expect("a line");
            assert!(since > Duration::ZERO);
        }
        // Ticks at the interval: a timer never fires early (a busy machine may make it late).
        assert!(started.elapsed() >= every * 2, "{:?}", started.elapsed());
        stop.cancel();
        tokio::time::sleep(every * 3).await;
        assert!(rx.try_recv().is_err(), "no line after stop");
    }
}
