//! The RabbitMQ nodes a client may connect to: `AMQP_URL` holds one URL or several separated by
//! commas (the nodes of one cluster). Each process shuffles the list once, so that clients
//! spread over the nodes, and every connection attempt takes the next node of its order: a
//! client that loses its node tries the next one first, and a list of one behaves as one URL.

use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use crate::telemetry::redact_url;

/// The nodes of `AMQP_URL`, in this process's order. Clones share the rotation.
#[derive(Clone)]
pub struct Nodes {
    nodes: Arc<[Node]>,
    next: Arc<AtomicUsize>,
}

/// One node: its URL (which may hold a password) and the `host:port` that names it in logs,
/// metrics and `/health`.
#[derive(Clone, PartialEq, Eq)]
pub struct Node {
    url: String,
    name: String,
}

impl Node {
    /// The URL itself, for the one place that connects with it.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// `host:port`, nothing secret.
    pub fn name(&self) -> &str {
        &self.name
    }
}

impl fmt::Debug for Node {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.name)
    }
}

impl Nodes {
    /// The nodes of `list` in the order written (tests), or an error naming the entry at fault.
    pub fn in_order(list: &str) -> Result<Self, String> {
        let nodes = list
            .split(',')
            .map(str::trim)
            .map(|url| {
                let parsed =
                    url::Url::parse(url).map_err(|e| format!("{}: {e}", redact_url(url)))?;
                if !matches!(parsed.scheme(), "amqp" | "amqps") {
                    return Err(format!(
                        "{}: must start with amqp:// or amqps://",
                        redact_url(url)
                    ));
                }
                let host = parsed
                    .host_str()
                    .filter(|h| !h.is_empty())
                    .ok_or_else(|| format!("{}: no host", redact_url(url)))?;
                let port = parsed.port().unwrap_or(match parsed.scheme() {
                    "amqps" => 5671,
                    _ => 5672,
                });
                Ok(Node {
                    url: url.to_owned(),
                    name: format!("{host}:{port}"),
                })
            })
            .collect::<Result<Vec<_>, String>>()?;
        Ok(Self {
            nodes: nodes.into(),
            next: Arc::new(AtomicUsize::new(0)),
        })
    }

    /// The nodes of `list` shuffled: what every service uses, so that clients spread.
    pub fn shuffled(list: &str) -> Result<Self, String> {
        let ordered = Self::in_order(list)?;
        let mut nodes = ordered.nodes.to_vec();
        fastrand::shuffle(&mut nodes);
        Ok(Self {
            nodes: nodes.into(),
            ..ordered
        })
    }

    /// The node the next connection attempt goes to.
    pub fn next(&self) -> Node {
        let at = self.next.fetch_add(1, Ordering::Relaxed) % self.nodes.len();
        self.nodes[at].clone()
    }

    /// The names of every node, in this process's order.
    pub fn names(&self) -> Vec<&str> {
        self.nodes.iter().map(Node::name).collect()
    }
}

impl fmt::Debug for Nodes {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_list().entries(self.names()).finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_url_is_a_list_of_one_and_every_attempt_goes_to_it() {
        let nodes = Nodes::shuffled("amqp://guest:secret@rabbit/%2f").expect("parses");
        assert_eq!(nodes.names(), ["rabbit:5672"]);
        for _ in 0..3 {
            assert_eq!(nodes.next().url(), "amqp://guest:secret@rabbit/%2f");
        }
    }

    #[test]
    fn each_attempt_takes_the_next_node_and_clones_share_the_turn() {
        let nodes = Nodes::in_order("amqp://a:1, amqp://b:2,amqps://c").expect("parses");
        assert_eq!(nodes.names(), ["a:1", "b:2", "c:5671"]);
        let other = nodes.clone();
        let names: Vec<String> = (0..4)
            .map(|i| {
                let node = if i % 2 == 0 {
                    nodes.next()
                } else {
                    other.next()
                };
                node.name().to_owned()
            })
            .collect();
        assert_eq!(names, ["a:1", "b:2", "c:5671", "a:1"]);
    }

    #[test]
    fn a_shuffle_keeps_every_node_once() {
        let list = "amqp://a,amqp://b,amqp://c,amqp://d";
        let nodes = Nodes::shuffled(list).expect("parses");
        let mut names = nodes.names();
        names.sort_unstable();
        assert_eq!(names, ["a:5672", "b:5672", "c:5672", "d:5672"]);
    }

    #[test]
    fn a_bad_entry_is_named_without_its_password() {
        let err = Nodes::in_order("amqp://a,http://u:secret@b").expect_err("refused");
        assert!(err.contains("amqp://") && !err.contains("secret"), "{err}");
        assert!(Nodes::in_order("amqp://a,").is_err(), "an empty entry");
    }
}
