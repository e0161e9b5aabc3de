//! Circuit breakers: failsafe's state machine, plus the state tracking and metrics failsafe lacks.
//!
//! failsafe has no state getter, so an [`Instrument`] hook mirrors every transition into an atomic
//! that `/health` and the `flowmesh_circuit_breaker_state` gauge read. Callers that pipeline work
//! (many publishes in flight) use [`Breaker::permit`] / [`Breaker::record`] instead of wrapping one
//! future, because one "call" there is one confirmed batch, not one awaited future.

use std::sync::Arc;
use std::sync::atomic::{AtomicU8, Ordering};
use std::time::Duration;

use failsafe::failure_policy::{ConsecutiveFailures, consecutive_failures};
use failsafe::{Config, Instrument, StateMachine};
use serde_json::json;

use crate::health::{Component, ComponentStatus, Reachability};
use crate::metrics as m;

/// A breaker's state as operators know it from Resilience4j.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BreakerState {
    /// Calls flow.
    Closed,
    /// Calls are refused until the open wait has passed.
    Open,
    /// The open wait has passed; the next calls decide between closed and open.
    HalfOpen,
}

impl BreakerState {
    const ALL: [BreakerState; 3] = [Self::Closed, Self::Open, Self::HalfOpen];

    /// The label value used in metrics and health (`closed`, `open`, `half_open`).
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Closed => "closed",
            Self::Open => "open",
            Self::HalfOpen => "half_open",
        }
    }

    fn from_u8(raw: u8) -> Self {
        match raw {
            1 => Self::Open,
            2 => Self::HalfOpen,
            _ => Self::Closed,
        }
    }
}

/// How a breaker judges its dependency.
#[derive(Debug, Clone)]
pub struct BreakerSettings {
    /// Consecutive failed calls that open the breaker.
    pub failure_threshold: u32,
    /// First open wait; each re-opening without a success in between doubles it (with jitter).
    pub open_wait: Duration,
    /// Longest open wait.
    pub max_open_wait: Duration,
}

impl Default for BreakerSettings {
    fn default() -> Self {
        Self {
            failure_threshold: 5,
            open_wait: Duration::from_secs(1),
            max_open_wait: Duration::from_secs(30),
        }
    }
}

/// Exponential open waits with equal jitter: half the wait fixed, half random.
///
/// failsafe's own jittered backoffs only accept whole seconds; tests need shorter waits.
#[derive(Debug, Clone)]
pub struct OpenWaits {
    next: Duration,
    max: Duration,
}

impl Iterator for OpenWaits {
    type Item = Duration;

    fn next(&mut self) -> Option<Duration> {
        let current = self.next.min(self.max);
        self.next = (self.next * 2).min(self.max);
        let half = current / 2;
        let jitter = half.mul_f64(fastrand::f64());
        Some(half + jitter)
    }
}

#[derive(Clone)]
struct Hooks {
    name: &'static str,
    state: Arc<AtomicU8>,
}

impl Hooks {
    fn set(&self, new: BreakerState) {
        let old = BreakerState::from_u8(self.state.swap(new as u8, Ordering::SeqCst));
        for state in BreakerState::ALL {
            metrics::gauge!(m::BREAKER_STATE, "breaker" => self.name, "state" => state.as_str())
                .set(if state == new { 1.0 } else { 0.0 });
        }
        if old != new {
            metrics::counter!(m::BREAKER_TRANSITIONS, "breaker" => self.name, "state" => new.as_str())
                .increment(1);
            match new {
                BreakerState::Open => tracing::warn!(breaker = self.name, "circuit breaker opened"),
                BreakerState::HalfOpen => {
                    tracing::info!(breaker = self.name, "circuit breaker half-open: probing")
                }
                BreakerState::Closed => {
                    tracing::info!(breaker = self.name, "circuit breaker closed")
                }
            }
        }
    }
}

impl Instrument for Hooks {
    fn on_call_rejected(&self) {
        metrics::counter!(m::BREAKER_NOT_PERMITTED, "breaker" => self.name).increment(1);
    }
    fn on_open(&self) {
        self.set(BreakerState::Open);
    }
    fn on_half_open(&self) {
        self.set(BreakerState::HalfOpen);
    }
    fn on_closed(&self) {
        self.set(BreakerState::Closed);
    }
}

/// A named circuit breaker guarding one dependency. Cheap to clone; clones share state.
#[derive(Clone)]
pub struct Breaker {
    name: &'static str,
    machine: StateMachine<ConsecutiveFailures<OpenWaits>, Hooks>,
    state: Arc<AtomicU8>,
    settings: Arc<BreakerSettings>,
}

impl std::fmt::Debug for Breaker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Breaker")
            .field("name", &self.name)
            .field("state", &self.state())
            .finish()
    }
}

impl Breaker {
    /// A closed breaker named `name` (a bounded label: one per guarded dependency).
    pub fn new(name: &'static str, settings: BreakerSettings) -> Self {
        let state = Arc::new(AtomicU8::new(BreakerState::Closed as u8));
        let hooks = Hooks {
            name,
            state: state.clone(),
        };
        let waits = OpenWaits {
            next: settings.open_wait,
            max: settings.max_open_wait.max(settings.open_wait),
        };
        let machine = Config::new()
            .failure_policy(consecutive_failures(
                settings.failure_threshold.max(1),
                waits,
            ))
            .instrument(hooks)
            .build();
        // Make the series exist from the start, so dashboards show zero instead of nothing.
        for outcome in ["success", "failure"] {
            metrics::counter!(m::BREAKER_CALLS, "breaker" => name, "outcome" => outcome)
                .absolute(0);
        }
        metrics::counter!(m::BREAKER_NOT_PERMITTED, "breaker" => name).absolute(0);
        for state in BreakerState::ALL {
            metrics::counter!(m::BREAKER_TRANSITIONS, "breaker" => name, "state" => state.as_str())
                .absolute(0);
        }
        Self {
            name,
            machine,
            state,
            settings: Arc::new(settings),
        }
    }

    /// The breaker's name.
    pub fn name(&self) -> &'static str {
        self.name
    }

    /// The current state. An open breaker whose wait has passed reports `Open` until the next
    /// [`permit`](Self::permit) moves it to half-open.
    pub fn state(&self) -> BreakerState {
        BreakerState::from_u8(self.state.load(Ordering::SeqCst))
    }

    /// Asks to make a call. `false` means the breaker is open: do not call; it was counted.
    pub fn permit(&self) -> bool {
        self.machine.is_call_permitted()
    }

    /// Records the outcome of a permitted call.
    pub fn record(&self, success: bool) {
        let outcome = if success { "success" } else { "failure" };
        metrics::counter!(m::BREAKER_CALLS, "breaker" => self.name, "outcome" => outcome)
            .increment(1);
        if success {
            self.machine.on_success();
        } else {
            self.machine.on_error();
        }
    }

    /// Forces the breaker open now, as when the dependency's connection is known to be gone.
    /// Not a call: `flowmesh_circuit_breaker_calls_total` does not count it.
    pub fn trip(&self) {
        for _ in 0..self.settings.failure_threshold.max(1) {
            if self.state() == BreakerState::Open {
                break;
            }
            self.machine.on_error();
        }
    }

    /// Closes the breaker now, forgetting the failures it counted: the dependency it guarded
    /// was replaced by another (a generator moving to another filter), which it has not judged.
    pub fn reset(&self) {
        self.machine.reset();
    }

    /// How long a refused caller should wait before trying again (the first open wait).
    pub fn retry_after(&self) -> Duration {
        self.settings.open_wait
    }

    /// A connection guarded by this breaker as a health component: DOWN while disconnected,
    /// else the breaker's view; details hold both.
    pub fn link_component(&self, connected: bool) -> Component {
        let mut component = self.component();
        if !connected {
            component.status = ComponentStatus::Down;
        }
        component
            .details
            .insert("connected".into(), connected.into());
        component
    }

    /// The breaker as a health component: closed → UP, half-open → DEGRADED, open → DOWN.
    pub fn component(&self) -> Component {
        let state = self.state();
        let status = match state {
            BreakerState::Closed => ComponentStatus::Up,
            BreakerState::HalfOpen => ComponentStatus::Degraded,
            BreakerState::Open => ComponentStatus::Down,
        };
        Component::new(status).with_details(json!({
            "state": state.as_str(),
            "failure_threshold": self.settings.failure_threshold,
            "open_wait_ms": self.settings.open_wait.as_millis() as u64,
        }))
    }

    /// This breaker's component combined with a reachability check: DOWN while unreachable
    /// (also before the first check has answered) or while the breaker is open.
    pub fn component_with(&self, reachability: &Reachability) -> Component {
        let reachable = reachability.is_up();
        let mut component = self.component();
        component
            .details
            .insert("reachable".into(), serde_json::Value::Bool(reachable));
        if !reachable {
            component.status = ComponentStatus::Down;
        }
        component
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fast() -> BreakerSettings {
        BreakerSettings {
            failure_threshold: 3,
            open_wait: Duration::from_millis(40),
            max_open_wait: Duration::from_millis(40),
        }
    }

    #[test]
    fn opens_after_the_threshold_of_consecutive_failures_and_refuses_calls() {
        let breaker = Breaker::new("test_opens", fast());
        for _ in 0..2 {
            assert!(breaker.permit());
            breaker.record(false);
        }
        assert_eq!(breaker.state(), BreakerState::Closed);
        breaker.record(false);
        assert_eq!(breaker.state(), BreakerState::Open);
        assert!(!breaker.permit());
        assert_eq!(breaker.component().status, ComponentStatus::Down);
    }

    /// Waits until the open wait is over and a probe is let through. The open wait is at most
    /// 40 ms; this polls with a generous deadline instead of one sleep.
    fn wait_for_probe(breaker: &Breaker) {
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while !breaker.permit() {
            assert!(std::time::Instant::now() < deadline, "never half-opened");
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    #[test]
    fn a_success_resets_the_failure_count() {
        let breaker = Breaker::new("test_resets", fast());
        breaker.record(false);
        breaker.record(false);
        breaker.record(true);
        breaker.record(false);
        breaker.record(false);
        assert_eq!(breaker.state(), BreakerState::Closed);
    }

    #[test]
    fn after_the_open_wait_a_probe_is_let_through_and_its_success_closes_the_breaker() {
        let breaker = Breaker::new("test_half_open", fast());
        breaker.trip();
        assert_eq!(breaker.state(), BreakerState::Open);
        wait_for_probe(&breaker);
        assert_eq!(breaker.state(), BreakerState::HalfOpen);
        breaker.record(true);
        assert_eq!(breaker.state(), BreakerState::Closed);
    }

    #[test]
    fn a_failed_probe_opens_the_breaker_again() {
        let breaker = Breaker::new("test_reopen", fast());
        breaker.trip();
        wait_for_probe(&breaker);
        breaker.record(false);
        assert_eq!(breaker.state(), BreakerState::Open);
    }

    #[test]
    fn open_waits_grow_to_the_cap_and_keep_at_least_half_of_each_step() {
        let mut waits = OpenWaits {
            next: Duration::from_millis(100),
            max: Duration::from_millis(400),
        };
        let got: Vec<Duration> = (0..5).filter_map(|_| waits.next()).collect();
        for (wait, step) in got.iter().zip([100u64, 200, 400, 400, 400]) {
            assert!(
                *wait >= Duration::from_millis(step / 2) && *wait <= Duration::from_millis(step)
            );
        }
    }
}
