//! Whether a service's connection to a dependency is established: one type for every link (the
//! generator's WebSocket to the filter, the filter's and the writers' RabbitMQ connections), read
//! by health and exported as `flowmesh_connection_up{link}`.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::breaker::Breaker;
use crate::health::{Component, ComponentStatus};
use crate::metrics as m;

/// The state of one link. Cheap to clone; clones share the state. Starts disconnected.
#[derive(Debug, Clone)]
pub struct LinkStatus {
    link: &'static str,
    connected: Arc<AtomicBool>,
    /// When the state last changed.
    since: Arc<Mutex<Instant>>,
    /// The node (`host:port`) of the last connection, for RabbitMQ links.
    node: Arc<Mutex<Option<String>>>,
}

impl LinkStatus {
    /// A disconnected link labelled `link` (`filter`, `amqp`) in metrics.
    pub fn new(link: &'static str) -> Self {
        let status = Self {
            link,
            connected: Arc::new(AtomicBool::new(false)),
            since: Arc::new(Mutex::new(Instant::now())),
            node: Arc::new(Mutex::new(None)),
        };
        status.set_connected(false);
        metrics::counter!(m::RECONNECTS, "link" => link).absolute(0);
        status
    }

    /// True while the connection is established.
    pub fn is_connected(&self) -> bool {
        self.connected.load(Ordering::SeqCst)
    }

    /// Records that the connection came up or went away.
    pub fn set_connected(&self, up: bool) {
        if self.connected.swap(up, Ordering::SeqCst) != up {
            *self.since.lock().unwrap_or_else(|e| e.into_inner()) = Instant::now();
        }
        metrics::gauge!(m::CONNECTION_UP, "link" => self.link).set(if up { 1.0 } else { 0.0 });
    }

    /// Records that the link is connected to RabbitMQ `node` (`host:port`): the metric says so,
    /// and a log line when it moved from another node.
    pub fn set_node(&self, node: &str) {
        let mut current = self.node.lock().unwrap_or_else(|e| e.into_inner());
        match current.as_deref() {
            Some(old) if old == node => {}
            Some(old) => {
                tracing::warn!(
                    link = self.link,
                    from = old,
                    to = node,
                    "moved to another RabbitMQ node"
                );
                metrics::gauge!(m::AMQP_NODE, "link" => self.link, "node" => old.to_owned())
                    .set(0.0);
            }
            None => {}
        }
        metrics::gauge!(m::AMQP_NODE, "link" => self.link, "node" => node.to_owned()).set(1.0);
        *current = Some(node.to_owned());
    }

    /// The node of the last connection, if this link has one.
    pub fn node(&self) -> Option<String> {
        self.node.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// How long the link has been down, if it is.
    pub fn down_for(&self) -> Option<Duration> {
        (!self.is_connected()).then(|| {
            self.since
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .elapsed()
        })
    }

    /// Counts an attempt to connect again after the first.
    pub fn count_reconnect(&self) {
        metrics::counter!(m::RECONNECTS, "link" => self.link).increment(1);
    }

    /// Health: UP while connected, else DOWN.
    pub fn component(&self) -> Component {
        let up = self.is_connected();
        Component::new(if up {
            ComponentStatus::Up
        } else {
            ComponentStatus::Down
        })
        .with_details(serde_json::json!({"connected": up}))
    }

    /// Health of a link guarded by `breaker`: DOWN while disconnected, else the breaker's view.
    pub fn guarded_by(&self, breaker: &Breaker) -> Component {
        let mut component = breaker.link_component(self.is_connected());
        if let Some(node) = self.node() {
            component.details.insert("node".into(), node.into());
        }
        component
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_link_is_down_until_connected_and_clones_share_its_state() {
        let link = LinkStatus::new("test");
        let seen = link.clone();
        assert_eq!(seen.component().status, ComponentStatus::Down);
        link.set_connected(true);
        assert!(seen.is_connected());
        assert_eq!(seen.component().status, ComponentStatus::Up);
    }

    #[test]
    fn the_node_of_a_link_shows_in_its_health() {
        let link = LinkStatus::new("test_node");
        let breaker = Breaker::new("test_node", Default::default());
        assert!(!link.guarded_by(&breaker).details.contains_key("node"));
        link.set_node("rabbitmq-1:5672");
        link.set_node("rabbitmq-2:5672");
        link.set_connected(true);
        let component = link.guarded_by(&breaker);
        assert_eq!(component.details["node"], "rabbitmq-2:5672");
    }
}
