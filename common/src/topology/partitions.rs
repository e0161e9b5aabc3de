//! The in-order writer's queue split by source (docs/contracts.md §4, "Partitions").
//!
//! Every publisher sets a record's routing key to its source's *bucket* (two hex digits: the
//! first byte of MD5(source)), whatever the layout. How buckets meet queues is the layout, and
//! only the bindings know it: with one partition, today's queue bound to the fanout exchange
//! (the key is ignored); with `P` partitions, the direct exchange `<prefix>.records.by-source`
//! bound to the fanout exchange, and partition `bucket % P`'s queue bound to it with each of its
//! buckets. A source's records therefore always meet one queue, and a publisher needs no
//! setting to route them.

use lapin::options::{
    ExchangeBindOptions, ExchangeUnbindOptions, QueueBindOptions, QueueDeclareOptions,
    QueueDeleteOptions,
};
use lapin::types::FieldTable;
use lapin::{Channel, Connection};

use super::{QueueDef, Topology, TopologyError};

/// How many buckets the sources hash into: the first byte of MD5(source).
pub const BUCKETS: u16 = 256;
/// The most partitions a layout may have.
pub const MAX_PARTITIONS: u16 = 64;

/// The bucket of a source: the first byte of MD5(source).
pub fn bucket(source: &str) -> u8 {
    md5::compute(source.as_bytes()).0[0]
}

/// The routing key every publisher gives a record of `source`: its bucket in two lowercase
/// hex digits.
pub fn routing_key(source: &str) -> String {
    format!("{:02x}", bucket(source))
}

/// The partition (0-based) that holds `source`'s records when there are `partitions`.
pub fn partition_of(source: &str, partitions: u16) -> u16 {
    u16::from(bucket(source)) % partitions.max(1)
}

/// What a partition queue holds now, as a passive declaration reads it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Occupancy {
    /// Messages ready in the queue.
    pub messages: u32,
    /// Consumers attached.
    pub consumers: u32,
}

impl Topology {
    /// The direct exchange that sends each bucket to its partition (bound to the records
    /// exchange only while there is more than one partition).
    pub fn by_source_exchange(&self) -> String {
        format!("{}.by-source", self.exchange)
    }

    /// The queue of the writer whose records are stored in order (mongo-writer): the one that
    /// is split into partitions.
    pub fn partitioned_queue(&self) -> Option<&QueueDef> {
        self.writer_queues
            .iter()
            .find(|queue| queue.single_active_consumer)
    }

    /// The queue of partition `index`: partition 0 keeps the unsplit queue's name, so one
    /// partition is the topology as it always was.
    pub fn partition_queue(&self, index: u16) -> Option<QueueDef> {
        let mut queue = self.partitioned_queue()?.clone();
        if index > 0 {
            queue.name = format!("{}.{index}", queue.name);
        }
        Some(queue)
    }

    /// The queues of every partition this topology is configured for (one when it does not
    /// lay them out).
    pub fn partition_queues(&self) -> Vec<QueueDef> {
        (0..self.partitions.unwrap_or(1))
            .filter_map(|index| self.partition_queue(index))
            .collect()
    }

    /// The partition queues RabbitMQ holds now, from 0 up to the first missing one.
    pub async fn probe_partitions(
        &self,
        connection: &Connection,
    ) -> Result<Vec<Occupancy>, TopologyError> {
        let passive = QueueDeclareOptions {
            passive: true,
            ..QueueDeclareOptions::default()
        };
        let channel = connection.create_channel().await?;
        let mut found = Vec::new();
        for index in 0..=MAX_PARTITIONS {
            let Some(queue) = self.partition_queue(index) else {
                break;
            };
            match channel
                .queue_declare(queue.name.as_str().into(), passive, FieldTable::default())
                .await
            {
                Ok(declared) => found.push(Occupancy {
                    messages: declared.message_count(),
                    consumers: declared.consumer_count(),
                }),
                // RabbitMQ closes the channel with the answer: it served its purpose.
                Err(err) if is_not_found(&err) => return Ok(found),
                Err(err) => return Err(err.into()),
            }
        }
        let _ = channel.close(200, "probed".into()).await;
        Ok(found)
    }

    /// Lays the partitions out for `wanted`, or checks they are so. A layout of another count
    /// is changed only by a topology allowed to ([`Topology::relayout`]) and only while no
    /// partition queue holds a record or has a consumer: otherwise sources would move between
    /// queues with records of theirs still waiting in the old one.
    pub(super) async fn lay_out_partitions(
        &self,
        connection: &Connection,
        channel: &Channel,
        wanted: u16,
    ) -> Result<(), TopologyError> {
        if self.partitioned_queue().is_none() {
            return Ok(());
        }
        let found = self.probe_partitions(connection).await?;
        let held = found.len() as u16;
        if held != 0 && held != wanted {
            self.may_change(&found, wanted)?;
        }
        self.declare_partition_queues(channel, wanted).await?;
        // New routes first, old ones after: while both stand a record reaches its queue once.
        self.route(channel, wanted).await?;
        if held > 1 && held != wanted {
            self.unroute(channel, held, wanted).await?;
        }
        self.delete_unused(channel, wanted, held).await
    }

    /// Ok when the layout of `found.len()` partitions may become one of `wanted`.
    fn may_change(&self, found: &[Occupancy], wanted: u16) -> Result<(), TopologyError> {
        let held = found.len();
        let queue = self.partition_queue(0).map(|q| q.name).unwrap_or_default();
        if !self.relayout {
            return Err(TopologyError::Layout(format!(
                "RabbitMQ has {held} partition(s) of {queue} and this service is set for {wanted} (MONGO_PARTITIONS): set the same count everywhere; a filter changes the layout once the queues are drained (docs/operations.md)"
            )));
        }
        let busy: Vec<String> = found
            .iter()
            .enumerate()
            .filter(|(_, o)| o.messages > 0 || o.consumers > 0)
            .map(|(i, o)| {
                format!(
                    "partition {i}: {} queued, {} consumers",
                    o.messages, o.consumers
                )
            })
            .collect();
        if !busy.is_empty() {
            return Err(TopologyError::Layout(format!(
                "cannot change {queue} from {held} to {wanted} partition(s) (MONGO_PARTITIONS) while its queues hold records or consumers ({}): sources would move with records of theirs still queued; stop the filters, let the writers drain the queues, stop the writers, then change it (docs/operations.md)",
                busy.join("; ")
            )));
        }
        tracing::warn!(queue = %queue, from = held, to = wanted, "changing the partitions of the in-order writer's queue");
        Ok(())
    }

    fn partition_name(&self, index: u16) -> String {
        self.partition_queue(index)
            .map(|q| q.name)
            .unwrap_or_default()
    }

    async fn declare_partition_queues(
        &self,
        channel: &Channel,
        wanted: u16,
    ) -> Result<(), TopologyError> {
        let options = QueueDeclareOptions {
            durable: true,
            ..QueueDeclareOptions::default()
        };
        for queue in (0..wanted).filter_map(|index| self.partition_queue(index)) {
            channel
                .queue_declare(
                    queue.name.as_str().into(),
                    options,
                    self.queue_arguments(&queue),
                )
                .await?;
        }
        Ok(())
    }

    /// The bindings of `wanted` partitions, then the removal of those of the other kind of
    /// layout (one queue on the fanout exchange, or partitions behind the by-source exchange).
    async fn route(&self, channel: &Channel, wanted: u16) -> Result<(), TopologyError> {
        let exchange = self.exchange.as_str();
        let by_source = self.by_source_exchange();
        if wanted == 1 {
            bind(channel, &self.partition_name(0), exchange, "").await?;
            channel
                .exchange_unbind(
                    by_source.as_str().into(),
                    exchange.into(),
                    "".into(),
                    ExchangeUnbindOptions::default(),
                    FieldTable::default(),
                )
                .await?;
            return Ok(());
        }
        let nowait = QueueBindOptions { nowait: true };
        for key in 0..BUCKETS {
            channel
                .queue_bind(
                    self.partition_name(key % wanted).as_str().into(),
                    by_source.as_str().into(),
                    format!("{key:02x}").into(),
                    nowait,
                    FieldTable::default(),
                )
                .await?;
        }
        channel
            .exchange_bind(
                by_source.as_str().into(),
                exchange.into(),
                "".into(),
                ExchangeBindOptions::default(),
                FieldTable::default(),
            )
            .await?;
        unbind(channel, &self.partition_name(0), exchange, "").await?;
        Ok(())
    }

    /// Removes the bucket bindings of a layout of `held` partitions that `wanted` does not keep.
    async fn unroute(&self, channel: &Channel, held: u16, wanted: u16) -> lapin::Result<()> {
        let by_source = self.by_source_exchange();
        for key in 0..BUCKETS {
            if wanted == 1 || key % held != key % wanted {
                unbind(
                    channel,
                    &self.partition_name(key % held),
                    &by_source,
                    &format!("{key:02x}"),
                )
                .await?;
            }
        }
        Ok(())
    }

    /// Deletes the queues of partitions `wanted..held`. Quorum queues refuse `if-empty`: each
    /// is read once more after its bindings went (nothing can reach it now) and deleted only if
    /// empty; otherwise it stays, and the next declaration refuses until it is drained.
    async fn delete_unused(
        &self,
        channel: &Channel,
        wanted: u16,
        held: u16,
    ) -> Result<(), TopologyError> {
        let passive = QueueDeclareOptions {
            passive: true,
            ..QueueDeclareOptions::default()
        };
        for index in wanted..held.max(wanted) {
            let queue = self.partition_name(index);
            let now = channel
                .queue_declare(queue.as_str().into(), passive, FieldTable::default())
                .await?;
            if now.message_count() > 0 || now.consumer_count() > 0 {
                return Err(TopologyError::Layout(format!(
                    "{queue} took records while the partitions changed: drain it, then declare again"
                )));
            }
            channel
                .queue_delete(queue.as_str().into(), QueueDeleteOptions::default())
                .await?;
        }
        Ok(())
    }
}

async fn bind(channel: &Channel, queue: &str, exchange: &str, key: &str) -> lapin::Result<()> {
    channel
        .queue_bind(
            queue.into(),
            exchange.into(),
            key.into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await
}

async fn unbind(channel: &Channel, queue: &str, exchange: &str, key: &str) -> lapin::Result<()> {
    channel
        .queue_unbind(
            queue.into(),
            exchange.into(),
            key.into(),
            FieldTable::default(),
        )
        .await
}

/// True when RabbitMQ answered 404 (no such queue or exchange).
fn is_not_found(err: &lapin::Error) -> bool {
    matches!(
        err.kind(),
        lapin::ErrorKind::ProtocolError(amqp) if matches!(
            amqp.kind(),
            lapin::protocol::AMQPErrorKind::Soft(lapin::protocol::AMQPSoftError::NOTFOUND)
        )
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_bucket_is_the_first_byte_of_the_sources_md5() {
        // printf gen-1 | md5sum → 5c641ad0…; printf gen-2 | md5sum → 6b53f5db… (contracts §4)
        assert_eq!(routing_key("gen-1"), "5c");
        assert_eq!(routing_key("gen-2"), "6b");
        assert_eq!(bucket("gen-1"), 92);
        assert_eq!(partition_of("gen-1", 1), 0);
        assert_eq!(partition_of("gen-1", 2), 0);
        assert_eq!(partition_of("gen-2", 2), 1);
        assert_eq!(partition_of("gen-1", 3), 2);
    }

    #[test]
    fn sources_spread_over_partitions() {
        for partitions in [2u16, 3, 4] {
            let mut counts = vec![0u32; usize::from(partitions)];
            for n in 0..3000 {
                counts[usize::from(partition_of(&format!("source-{n}"), partitions))] += 1;
            }
            let fair = 3000 / u32::from(partitions);
            assert!(
                counts
                    .iter()
                    .all(|&c| c > fair * 8 / 10 && c < fair * 12 / 10),
                "{partitions}: {counts:?}"
            );
        }
    }
}
