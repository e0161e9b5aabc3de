//! The RabbitMQ topology of docs/contracts.md §4, from one definition, and the message properties every
//! publisher uses.
//!
//! Names derive from a prefix (`flowmesh` in production) so tests can declare a fresh, isolated
//! copy of the whole topology per test.

use lapin::options::{ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions};
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use lapin::{BasicProperties, Channel, ExchangeKind};

use crate::record::Record;

pub mod partitions;

pub use partitions::{partition_of, routing_key};

/// Why the topology could not be declared.
#[derive(Debug)]
pub enum TopologyError {
    /// RabbitMQ refused or the connection failed.
    Amqp(lapin::Error),
    /// The partitions RabbitMQ holds are not the ones configured, and may not change now.
    Layout(String),
}

impl std::fmt::Display for TopologyError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Amqp(err) => err.fmt(f),
            Self::Layout(why) => f.write_str(why),
        }
    }
}

impl std::error::Error for TopologyError {}

impl From<lapin::Error> for TopologyError {
    fn from(err: lapin::Error) -> Self {
        Self::Amqp(err)
    }
}

/// The production prefix.
pub const DEFAULT_PREFIX: &str = "flowmesh";
/// Default `x-delivery-limit` of the writer queues.
pub const DEFAULT_DELIVERY_LIMIT: u32 = 5;
/// `x-delivery-limit` of the dead-letter queue: one that no listing will ever reach. The queue
/// cannot go without one: RabbitMQ 4 gives every quorum queue a limit of 20 by default, and the
/// dead-letter queue (no dead-letter exchange of its own) would drop a message returned that
/// often, as 21 listings by `dead-letters` do. `-1`, RabbitMQ 4's "no limit", means a limit of 0
/// to RabbitMQ 3, so the one value both read alike is the largest.
pub const DEAD_LETTER_DELIVERY_LIMIT: i64 = i32::MAX as i64;

/// AMQP header carrying the record's `source`.
pub const HEADER_SOURCE: &str = "source";
/// AMQP header carrying the record's `seq`.
pub const HEADER_SEQ: &str = "seq";
/// AMQP header carrying the W3C `traceparent`.
pub const HEADER_TRACEPARENT: &str = "traceparent";
/// AMQP header carrying the route that sent the record to RabbitMQ.
pub const HEADER_ROUTE: &str = "x-flowmesh-route";
/// AMQP header carrying the routes version in force when the record was routed.
pub const HEADER_ROUTES_VERSION: &str = "x-flowmesh-routes-version";
/// Header a writer puts on a message it dead-letters itself: why.
pub const HEADER_DEAD_LETTER_REASON: &str = "x-flowmesh-reason";
/// Header a writer puts on a message it dead-letters itself: the queue it came from.
pub const HEADER_DEAD_LETTER_QUEUE: &str = "x-flowmesh-queue";
/// Content type of every record message.
pub const CONTENT_TYPE_JSON: &str = "application/json";

/// One queue of the topology.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QueueDef {
    /// Full queue name.
    pub name: String,
    /// The consumer it feeds (`pg-writer`, `mongo-writer`), or none for the dead-letter queue.
    pub consumer: Option<&'static str>,
    /// A quorum queue (replicated on every node of a cluster). A queue with a consumer also
    /// has a delivery limit and dead-letters past it.
    pub quorum: bool,
    /// Only one consumer at a time (order matters for nesting).
    pub single_active_consumer: bool,
}

/// Every exchange and queue flowmesh uses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Topology {
    /// Fanout exchange the filter publishes records to.
    pub exchange: String,
    /// Fanout dead-letter exchange.
    pub dead_letter_exchange: String,
    /// Quorum queue bound to the dead-letter exchange (it keeps what it holds while a node of
    /// a cluster is away; it dead-letters nothing itself).
    pub dead_letter_queue: QueueDef,
    /// One quorum queue per writer, bound to the records exchange.
    pub writer_queues: Vec<QueueDef>,
    /// `x-delivery-limit` of the writer queues.
    pub delivery_limit: u32,
    /// The prefix every name starts with (`flowmesh`).
    pub prefix: String,
    /// How many partitions the in-order writer's queue has (§4 "Partitions"), for the
    /// services that lay them out or consume them; `None` leaves them alone (pg-writer,
    /// `dead-letters`: a publisher needs no count, the routing key is the source's bucket).
    pub partitions: Option<u16>,
    /// Whether declaring may change a layout of another count (the filter does, once the
    /// queues are drained); otherwise another count is an error.
    pub relayout: bool,
}

impl Topology {
    /// The topology under `prefix` (`flowmesh` → `flowmesh.records`, …).
    pub fn new(prefix: &str, delivery_limit: u32) -> Self {
        let exchange = format!("{prefix}.records");
        // Each writer of the list has its own queue.
        let writer_queues = crate::services::writers()
            .map(|writer| QueueDef {
                name: format!("{exchange}.{}", writer.name),
                consumer: Some(writer.name),
                quorum: true,
                single_active_consumer: matches!(
                    writer.role,
                    crate::services::Role::Writer { in_order: true, .. }
                ),
            })
            .collect();
        Self {
            exchange,
            dead_letter_exchange: format!("{prefix}.dlx"),
            dead_letter_queue: QueueDef {
                name: format!("{prefix}.dead-letter"),
                consumer: None,
                quorum: true,
                single_active_consumer: false,
            },
            writer_queues,
            delivery_limit,
            prefix: prefix.to_string(),
            partitions: Some(1),
            relayout: false,
        }
    }

    /// This topology with the in-order writer's queue in `partitions` (`None`: leave them
    /// alone), changing another layout only when `relayout`.
    pub fn with_partitions(mut self, partitions: Option<u16>, relayout: bool) -> Self {
        self.partitions = partitions;
        self.relayout = relayout;
        self
    }

    /// The queue a writer consumes.
    pub fn queue_for(&self, consumer: &str) -> Option<&QueueDef> {
        self.writer_queues
            .iter()
            .find(|queue| queue.consumer == Some(consumer))
    }

    /// The declared arguments of a queue.
    pub fn queue_arguments(&self, queue: &QueueDef) -> FieldTable {
        let mut args = FieldTable::default();
        if queue.quorum {
            args.insert(
                "x-queue-type".into(),
                AMQPValue::LongString("quorum".into()),
            );
        }
        if queue.quorum && queue.consumer.is_some() {
            args.insert(
                "x-delivery-limit".into(),
                AMQPValue::LongLongInt(i64::from(self.delivery_limit)),
            );
            args.insert(
                "x-dead-letter-exchange".into(),
                AMQPValue::LongString(self.dead_letter_exchange.as_str().into()),
            );
        } else if queue.quorum {
            args.insert(
                "x-delivery-limit".into(),
                AMQPValue::LongLongInt(DEAD_LETTER_DELIVERY_LIMIT),
            );
        }
        if queue.single_active_consumer {
            args.insert("x-single-active-consumer".into(), AMQPValue::Boolean(true));
        }
        args
    }

    /// Declares everything, idempotently, on a channel of its own. Safe to run from every
    /// service at every start. The in-order writer's partitions are laid out (or checked) only
    /// when [`Topology::partitions`] is set.
    pub async fn declare(&self, connection: &lapin::Connection) -> Result<(), TopologyError> {
        let channel = connection.create_channel().await?;
        let durable = ExchangeDeclareOptions {
            durable: true,
            ..ExchangeDeclareOptions::default()
        };
        for exchange in [&self.exchange, &self.dead_letter_exchange] {
            channel
                .exchange_declare(
                    exchange.as_str().into(),
                    ExchangeKind::Fanout,
                    durable,
                    FieldTable::default(),
                )
                .await?;
        }
        // A record whose key no partition is bound to is dead-lettered, never dropped.
        let mut by_source = FieldTable::default();
        by_source.insert(
            "alternate-exchange".into(),
            AMQPValue::LongString(self.dead_letter_exchange.as_str().into()),
        );
        channel
            .exchange_declare(
                self.by_source_exchange().as_str().into(),
                ExchangeKind::Direct,
                durable,
                by_source,
            )
            .await?;
        let queue_options = QueueDeclareOptions {
            durable: true,
            ..QueueDeclareOptions::default()
        };
        let bindings = self
            .writer_queues
            .iter()
            .filter(|queue| !queue.single_active_consumer)
            .map(|queue| (queue, &self.exchange))
            .chain(std::iter::once((
                &self.dead_letter_queue,
                &self.dead_letter_exchange,
            )));
        for (queue, exchange) in bindings {
            channel
                .queue_declare(
                    queue.name.as_str().into(),
                    queue_options,
                    self.queue_arguments(queue),
                )
                .await?;
            channel
                .queue_bind(
                    queue.name.as_str().into(),
                    exchange.as_str().into(),
                    ShortString::from(""),
                    QueueBindOptions::default(),
                    FieldTable::default(),
                )
                .await?;
        }
        if let Some(partitions) = self.partitions {
            self.lay_out_partitions(connection, &channel, partitions)
                .await?;
        }
        let _ = channel.close(200, "declared".into()).await;
        Ok(())
    }

    /// Deletes everything (tests clean up their private topologies with it).
    pub async fn delete(&self, channel: &Channel) -> lapin::Result<()> {
        use lapin::options::{ExchangeDeleteOptions, QueueDeleteOptions};
        let partitions = (1..partitions::MAX_PARTITIONS).filter_map(|i| self.partition_queue(i));
        for queue in self
            .writer_queues
            .iter()
            .cloned()
            .chain(partitions)
            .chain(std::iter::once(self.dead_letter_queue.clone()))
        {
            channel
                .queue_delete(queue.name.as_str().into(), QueueDeleteOptions::default())
                .await?;
        }
        let by_source = self.by_source_exchange();
        for exchange in [&self.exchange, &self.dead_letter_exchange, &by_source] {
            channel
                .exchange_delete(exchange.as_str().into(), ExchangeDeleteOptions::default())
                .await?;
        }
        Ok(())
    }
}

/// The properties of a record message: JSON, persistent, `message_id` = record id, and the
/// `source`, `seq` and `traceparent` headers, and the record's provenance
/// (`x-flowmesh-route`, `x-flowmesh-routes-version`) when it has one.
pub fn record_properties(record: &Record) -> BasicProperties {
    let mut headers = FieldTable::default();
    headers.insert(
        HEADER_SOURCE.into(),
        AMQPValue::LongString(LongString::from(record.source.as_str())),
    );
    headers.insert(HEADER_SEQ.into(), AMQPValue::LongLongInt(record.seq as i64));
    if let Some(traceparent) = &record.traceparent {
        headers.insert(
            HEADER_TRACEPARENT.into(),
            AMQPValue::LongString(LongString::from(traceparent.as_str())),
        );
    }
    if let Some(provenance) = &record.provenance {
        headers.insert(
            HEADER_ROUTES_VERSION.into(),
            AMQPValue::LongString(LongString::from(provenance.version.as_str())),
        );
        if let Some(route) = &provenance.route {
            headers.insert(
                HEADER_ROUTE.into(),
                AMQPValue::LongString(LongString::from(route.as_str())),
            );
        }
    }
    BasicProperties::default()
        .with_content_type(CONTENT_TYPE_JSON.into())
        .with_delivery_mode(2)
        .with_message_id(record.id.as_str().into())
        .with_headers(headers)
}

/// The provenance the filter put in a message's headers, if it put any.
pub fn provenance_of(properties: &BasicProperties) -> Option<crate::record::Provenance> {
    let headers = properties.headers().as_ref()?;
    let text = |key: &str| match headers.inner().get(key) {
        Some(AMQPValue::LongString(s)) => Some(String::from_utf8_lossy(s.as_bytes()).into_owned()),
        Some(AMQPValue::ShortString(s)) => Some(s.as_str().to_owned()),
        _ => None,
    };
    Some(crate::record::Provenance {
        version: text(HEADER_ROUTES_VERSION)?,
        route: text(HEADER_ROUTE),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn production_names_are_those_of_the_spec() {
        let topology = Topology::new(DEFAULT_PREFIX, DEFAULT_DELIVERY_LIMIT);
        assert_eq!(topology.exchange, "flowmesh.records");
        assert_eq!(topology.dead_letter_exchange, "flowmesh.dlx");
        assert_eq!(topology.dead_letter_queue.name, "flowmesh.dead-letter");
        let pg = topology.queue_for("pg-writer").expect("pg queue");
        let mongo = topology.queue_for("mongo-writer").expect("mongo queue");
        assert_eq!(pg.name, "flowmesh.records.pg-writer");
        assert_eq!(mongo.name, "flowmesh.records.mongo-writer");
        assert!(!pg.single_active_consumer);
        assert!(mongo.single_active_consumer);
        let args = topology.queue_arguments(mongo);
        let get = |key: &str| args.inner().get(key).cloned();
        assert_eq!(get("x-delivery-limit"), Some(AMQPValue::LongLongInt(5)));
        assert_eq!(
            get("x-single-active-consumer"),
            Some(AMQPValue::Boolean(true))
        );
    }

    #[test]
    fn the_dead_letter_queue_is_replicated_and_dead_letters_nothing_itself() {
        let topology = Topology::new(DEFAULT_PREFIX, DEFAULT_DELIVERY_LIMIT);
        let args = topology.queue_arguments(&topology.dead_letter_queue);
        let keys: Vec<_> = args.inner().keys().map(|k| k.as_str()).collect();
        assert_eq!(keys, ["x-delivery-limit", "x-queue-type"]);
        assert_eq!(
            args.inner().get("x-queue-type"),
            Some(&AMQPValue::LongString("quorum".into()))
        );
        // Not RabbitMQ 4's default of 20, and not -1 (a limit of 0 to RabbitMQ 3).
        assert_eq!(
            args.inner().get("x-delivery-limit"),
            Some(&AMQPValue::LongLongInt(i64::from(i32::MAX)))
        );
    }
}
