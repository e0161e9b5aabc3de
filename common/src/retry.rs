//! Retry policies on backon: exponential backoff with jitter, always bounded in delay, and in
//! attempts wherever giving up is the right answer.

use std::time::Duration;

use backon::ExponentialBuilder;

/// Reconnect policy for a link that must come back: 100 ms doubling to 10 s, jittered, forever.
/// Callers stop it through cancellation, not by running out of attempts.
pub fn reconnect() -> ExponentialBuilder {
    ExponentialBuilder::default()
        .with_min_delay(Duration::from_millis(100))
        .with_max_delay(Duration::from_secs(10))
        .with_factor(2.0)
        .with_jitter()
        .without_max_times()
}

/// Retry policy for one operation: `times` attempts after the first, `min` doubling to `max`,
/// jittered.
pub fn bounded(times: usize, min: Duration, max: Duration) -> ExponentialBuilder {
    ExponentialBuilder::default()
        .with_min_delay(min)
        .with_max_delay(max)
        .with_factor(2.0)
        .with_jitter()
        .with_max_times(times)
}

#[cfg(test)]
mod tests {
    use super::*;
    use backon::BackoffBuilder;

    #[test]
    fn reconnect_delays_are_capped_and_never_end() {
        let delays: Vec<Duration> = reconnect().build().take(40).collect();
        assert_eq!(delays.len(), 40);
        // Jitter adds up to one more delay on top of the capped one.
        assert!(delays.iter().all(|d| *d <= Duration::from_secs(20)));
    }

    #[test]
    fn bounded_retries_stop_after_their_attempts() {
        let delays: Vec<Duration> =
            bounded(3, Duration::from_millis(10), Duration::from_millis(50))
                .build()
                .collect();
        assert_eq!(delays.len(), 3);
    }
}
