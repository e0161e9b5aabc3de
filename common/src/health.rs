//! Health of a service as `/health`, `/health/live` and `/health/ready` report it (docs/contracts.md §7).
//!
//! Components are closures evaluated on every request, so health is never a stale copy of the
//! truth: a breaker reports its state at the moment it is asked.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use serde::Serialize;
use serde_json::{Map, Value};

/// The status of one component or of the whole service.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum ComponentStatus {
    /// Working.
    Up,
    /// Working with reduced capacity (a breaker probing, an optional part down).
    Degraded,
    /// Not working.
    Down,
}

/// One component's report.
#[derive(Debug, Clone, Serialize)]
pub struct Component {
    /// Its status.
    pub status: ComponentStatus,
    /// Free-form facts: breaker state, connection state, paths.
    pub details: Map<String, Value>,
}

impl Component {
    /// A component with no details.
    pub fn new(status: ComponentStatus) -> Self {
        Self {
            status,
            details: Map::new(),
        }
    }

    /// Adds details from a JSON object (other JSON values are ignored).
    pub fn with_details(mut self, details: Value) -> Self {
        if let Value::Object(map) = details {
            self.details.extend(map);
        }
        self
    }
}

type Probe = Arc<dyn Fn() -> Component + Send + Sync>;

struct Entry {
    name: String,
    /// A required component that is DOWN makes the service DOWN and not ready.
    required: bool,
    probe: Probe,
}

/// The whole-service report served at `/health`.
#[derive(Debug, Clone, Serialize)]
pub struct HealthReport {
    /// UP, DEGRADED or DOWN.
    pub status: ComponentStatus,
    /// Each component by name.
    pub components: Map<String, Value>,
}

/// The registry of a service's components. Cheap to clone; clones share the registry.
#[derive(Clone, Default)]
pub struct Health {
    entries: Arc<std::sync::RwLock<Vec<Entry>>>,
    draining: Arc<AtomicBool>,
}

impl Health {
    /// An empty registry: UP and ready.
    pub fn new() -> Self {
        Self::default()
    }

    /// Registers a component the service cannot do its job without.
    pub fn require(
        &self,
        name: impl Into<String>,
        probe: impl Fn() -> Component + Send + Sync + 'static,
    ) {
        self.add(name.into(), true, Arc::new(probe));
    }

    /// Registers a component whose failure degrades but does not stop the service.
    pub fn optional(
        &self,
        name: impl Into<String>,
        probe: impl Fn() -> Component + Send + Sync + 'static,
    ) {
        self.add(name.into(), false, Arc::new(probe));
    }

    fn add(&self, name: String, required: bool, probe: Probe) {
        let mut entries = self.entries.write().unwrap_or_else(|e| e.into_inner());
        entries.retain(|entry| entry.name != name);
        entries.push(Entry {
            name,
            required,
            probe,
        });
    }

    /// Marks the service as shutting down: it stays live but is no longer ready.
    pub fn set_draining(&self) {
        self.draining.store(true, Ordering::SeqCst);
    }

    /// Evaluates every component now.
    pub fn report(&self) -> HealthReport {
        let entries = self.entries.read().unwrap_or_else(|e| e.into_inner());
        let mut status = ComponentStatus::Up;
        let mut components = Map::new();
        for entry in entries.iter() {
            let component = (entry.probe)();
            status = match (component.status, entry.required) {
                (ComponentStatus::Down, true) => ComponentStatus::Down,
                (ComponentStatus::Up, _) => status,
                _ if status == ComponentStatus::Down => status,
                _ => ComponentStatus::Degraded,
            };
            components.insert(
                entry.name.clone(),
                serde_json::to_value(&component).unwrap_or(Value::Null),
            );
        }
        if self.draining.load(Ordering::SeqCst) {
            let mut details = Map::new();
            details.insert("draining".into(), Value::Bool(true));
            components.insert(
                "lifecycle".into(),
                serde_json::to_value(Component {
                    status: ComponentStatus::Down,
                    details,
                })
                .unwrap_or(Value::Null),
            );
            status = ComponentStatus::Down;
        }
        HealthReport { status, components }
    }

    /// True when the service can do its job now: no required component is DOWN.
    pub fn is_ready(&self) -> bool {
        self.report().status != ComponentStatus::Down
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_required_component_down_makes_the_service_down_and_an_optional_one_only_degrades() {
        use ComponentStatus::{Degraded, Down, Up};
        // (required "db", optional "cache") → (service status, ready)
        for (db, cache, status, ready) in [
            (Down, Up, Down, false),
            (Up, Down, Degraded, true),
            (Up, Up, Up, true),
        ] {
            let health = Health::new();
            health.require("db", move || Component::new(db));
            health.optional("cache", move || Component::new(cache));
            assert_eq!(health.report().status, status, "db {db:?}, cache {cache:?}");
            assert_eq!(health.is_ready(), ready, "db {db:?}, cache {cache:?}");
        }
    }

    #[test]
    fn draining_makes_the_service_not_ready() {
        let health = Health::new();
        assert!(health.is_ready());
        health.set_draining();
        assert!(!health.is_ready());
    }

    #[test]
    fn the_report_has_the_spec_shape() {
        let health = Health::new();
        health.require("db", || {
            Component::new(ComponentStatus::Up).with_details(serde_json::json!({"state": "closed"}))
        });
        let json = serde_json::to_value(health.report()).expect("json");
        assert_eq!(json["status"], "UP");
        assert_eq!(json["components"]["db"]["status"], "UP");
        assert_eq!(json["components"]["db"]["details"]["state"], "closed");
    }
}

/// A dependency's reachability, refreshed in the background so health answers instantly.
#[derive(Debug, Clone, Default)]
pub struct Reachability {
    up: Arc<AtomicBool>,
    /// Since when checks have failed (set at the first check; none while up).
    down_since: Arc<std::sync::Mutex<Option<std::time::Instant>>>,
}

impl Reachability {
    /// Starts checking with `check` every `every` until `stop` fires.
    pub fn spawn<F, Fut>(
        every: std::time::Duration,
        stop: tokio_util::sync::CancellationToken,
        check: F,
    ) -> Self
    where
        F: Fn() -> Fut + Send + 'static,
        Fut: std::future::Future<Output = bool> + Send,
    {
        let this = Self::default();
        let state = this.clone();
        tokio::spawn(async move {
            loop {
                let up =
                    tokio::time::timeout(every.max(std::time::Duration::from_secs(1)), check())
                        .await
                        .unwrap_or(false);
                state.up.store(up, Ordering::SeqCst);
                {
                    let mut since = state.down_since.lock().unwrap_or_else(|e| e.into_inner());
                    match (up, since.is_some()) {
                        (false, false) => *since = Some(std::time::Instant::now()),
                        (true, _) => *since = None,
                        _ => {}
                    }
                }
                tokio::select! {
                    _ = stop.cancelled() => break,
                    _ = tokio::time::sleep(every) => {}
                }
            }
        });
        this
    }

    /// How long checks have been failing, if they are.
    pub fn down_for(&self) -> Option<std::time::Duration> {
        self.down_since
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .map(|since| since.elapsed())
    }

    /// True when the last check succeeded.
    pub fn is_up(&self) -> bool {
        self.up.load(Ordering::SeqCst)
    }
}
