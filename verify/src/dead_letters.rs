//! The dead-letter queue as an operator sees it: list what is in `flowmesh.dead-letter` (with
//! why and where from), replay chosen messages into `flowmesh.records` once the cause is fixed,
//! and purge.

use std::time::Duration;

use anyhow::Context;
use flowmesh_common::record::Record;
use flowmesh_common::topology::{Topology, record_properties};
use lapin::message::BasicGetMessage;
use lapin::options::{
    BasicAckOptions, BasicGetOptions, BasicPublishOptions, ConfirmSelectOptions, QueuePurgeOptions,
};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{Channel, Connection, ConnectionProperties};

/// One dead-lettered message.
#[derive(Debug, Clone)]
pub struct DeadLetter {
    /// `message_id` (the record id for records).
    pub id: String,
    /// Why it was dead-lettered (`rejected`, `delivery_limit`, …) and from which queue.
    pub reason: String,
    /// The queue it came from.
    pub origin: String,
    /// The body as text.
    pub body: String,
}

/// A connection to the broker with the topology declared.
pub struct Broker {
    connection: Connection,
    channel: Channel,
    topology: Topology,
}

impl Broker {
    /// Connects and declares the topology (idempotent).
    pub async fn connect(url: &str, topology: Topology) -> anyhow::Result<Self> {
        let connection = Connection::connect(url, ConnectionProperties::default())
            .await
            .context("connecting to RabbitMQ")?;
        let channel = connection.create_channel().await?;
        topology.declare(&channel).await?;
        Ok(Self {
            connection,
            channel,
            topology,
        })
    }

    /// Takes every message (unacked): they return to the queue unless acked before close.
    async fn take_all(&self) -> anyhow::Result<Vec<BasicGetMessage>> {
        let mut all = Vec::new();
        while let Some(message) = self
            .channel
            .basic_get(
                self.topology.dead_letter_queue.name.as_str().into(),
                BasicGetOptions::default(),
            )
            .await?
        {
            all.push(message);
        }
        Ok(all)
    }

    /// Lists the dead letters without removing them.
    pub async fn list(self) -> anyhow::Result<Vec<DeadLetter>> {
        let letters = self.take_all().await?.iter().map(describe).collect();
        self.close().await;
        Ok(letters)
    }

    /// Replays the messages whose id is in `ids` (all when `ids` is empty) into the records
    /// exchange, with publisher confirms; each is removed from the dead-letter queue only after
    /// its confirm. Returns (replayed, skipped because still not a valid record).
    pub async fn replay(self, ids: &[String]) -> anyhow::Result<(usize, Vec<String>)> {
        self.channel
            .confirm_select(ConfirmSelectOptions::default())
            .await?;
        let mut replayed = 0;
        let mut invalid = Vec::new();
        for message in self.take_all().await? {
            let letter = describe(&message);
            if !ids.is_empty() && !ids.contains(&letter.id) {
                continue;
            }
            let record = match Record::from_json(&letter.body) {
                Ok(record) => record,
                Err(err) => {
                    invalid.push(format!("{} ({err})", letter.id));
                    continue;
                }
            };
            let confirm = self
                .channel
                .basic_publish(
                    self.topology.exchange.as_str().into(),
                    "".into(),
                    BasicPublishOptions {
                        mandatory: true,
                        ..BasicPublishOptions::default()
                    },
                    record.to_json().as_bytes(),
                    record_properties(&record),
                )
                .await?
                .await?;
            if !confirm.is_ack() || confirm.take_message().is_some() {
                anyhow::bail!("RabbitMQ did not accept the replay of {}", letter.id);
            }
            message.delivery.ack(BasicAckOptions::default()).await?;
            replayed += 1;
        }
        self.close().await;
        Ok((replayed, invalid))
    }

    /// Empties the dead-letter queue; returns how many messages were removed.
    pub async fn purge(self) -> anyhow::Result<u32> {
        let purged = self
            .channel
            .queue_purge(
                self.topology.dead_letter_queue.name.as_str().into(),
                QueuePurgeOptions::default(),
            )
            .await?;
        self.close().await;
        Ok(purged)
    }

    async fn close(self) {
        // Closing the channel returns every message taken and not acked.
        let _ = tokio::time::timeout(
            Duration::from_secs(5),
            self.channel.close(200, "done".into()),
        )
        .await;
        let _ = self.connection.close(200, "done".into()).await;
    }
}

fn describe(message: &BasicGetMessage) -> DeadLetter {
    let properties = &message.delivery.properties;
    let id = properties
        .message_id()
        .as_ref()
        .map(|s| s.to_string())
        .unwrap_or_default();
    let headers = properties.headers().clone().unwrap_or_default();
    let (mut reason, mut origin) = (String::from("unknown"), String::new());
    if let Some(AMQPValue::FieldArray(deaths)) = headers.inner().get("x-death")
        && let Some(AMQPValue::FieldTable(first)) = deaths.as_slice().first()
    {
        reason = text(first, "reason").unwrap_or(reason);
        origin = text(first, "queue").unwrap_or_default();
    }
    DeadLetter {
        id,
        reason,
        origin,
        body: String::from_utf8_lossy(&message.delivery.data).into_owned(),
    }
}

fn text(table: &FieldTable, key: &str) -> Option<String> {
    match table.inner().get(key) {
        Some(AMQPValue::LongString(s)) => Some(s.to_string()),
        Some(AMQPValue::ShortString(s)) => Some(s.to_string()),
        _ => None,
    }
}
