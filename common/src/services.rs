//! The mesh's services, in one list. Whatever names the services comes from here: the writer
//! queues every service declares ([`crate::topology`]), the services the scripts start and the
//! queues they clean up (`verify --list-services` prints this list for them), and the targets
//! of `prometheus/prometheus.yml` (a test holds that file to this list). A new writer is its
//! crate plus one entry here (docs/development.md, "Adding a service").

/// One service of the mesh.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Service {
    /// Its name: the binary, the compose service, the `service` of its logs and the
    /// Prometheus job (`flowmesh-<name>`).
    pub name: &'static str,
    /// The port of its probe server (`/metrics`, `/health`) by default.
    pub probe_port: u16,
    /// What it does in the mesh.
    pub role: Role,
}

/// What a service does in the mesh.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// Makes records and sends them to the filter.
    Generator,
    /// Takes records over WebSocket and routes them.
    Filter,
    /// Consumes its own queue and stores what it reads.
    Writer {
        /// The store it writes to, as its health component and `verify` name it.
        store: &'static str,
        /// Whether its queue has a single active consumer (records stored in queue order).
        in_order: bool,
    },
}

/// Every service, in the order records flow through them.
pub const SERVICES: &[Service] = &[
    Service {
        name: "generator",
        probe_port: 9101,
        role: Role::Generator,
    },
    Service {
        name: "filter",
        probe_port: 9102,
        role: Role::Filter,
    },
    Service {
        name: "pg-writer",
        probe_port: 9103,
        role: Role::Writer {
            store: "postgresql",
            in_order: false,
        },
    },
    Service {
        name: "mongo-writer",
        probe_port: 9104,
        role: Role::Writer {
            store: "mongodb",
            in_order: true,
        },
    },
];

/// The writers, in list order.
pub fn writers() -> impl Iterator<Item = &'static Service> {
    SERVICES
        .iter()
        .filter(|s| matches!(s.role, Role::Writer { .. }))
}

/// The service called `name`.
pub fn service(name: &str) -> Option<&'static Service> {
    SERVICES.iter().find(|s| s.name == name)
}

/// The list as scripts read it: one line a service, `name probe_port role [store]`.
pub fn listing() -> String {
    SERVICES
        .iter()
        .map(|s| match s.role {
            Role::Generator => format!("{} {} generator\n", s.name, s.probe_port),
            Role::Filter => format!("{} {} filter\n", s.name, s.probe_port),
            Role::Writer { store, .. } => format!("{} {} writer {store}\n", s.name, s.probe_port),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_ports_are_unique_and_the_writers_are_the_writer_services() {
        let names: std::collections::BTreeSet<_> = SERVICES.iter().map(|s| s.name).collect();
        let ports: std::collections::BTreeSet<_> = SERVICES.iter().map(|s| s.probe_port).collect();
        assert_eq!((names.len(), ports.len()), (SERVICES.len(), SERVICES.len()));
        let writers: Vec<_> = writers().map(|s| s.name).collect();
        assert!(
            writers.starts_with(&["pg-writer", "mongo-writer"]),
            "{writers:?}"
        );
        assert!(writers.iter().all(|w| w.ends_with("-writer")));
        assert_eq!(service("filter").map(|s| s.probe_port), Some(9102));
        assert!(listing().contains("mongo-writer 9104 writer mongodb\n"));
    }
}
