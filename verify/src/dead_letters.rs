//! The dead-letter queue as an operator sees it: list what is in `flowmesh.dead-letter` (with
//! why and where from), replay chosen messages into `flowmesh.records` once the cause is fixed,
//! and purge.

use std::time::Duration;

use anyhow::Context;
use flowmesh_common::message;
use flowmesh_common::record::Record;
use flowmesh_common::topology::{
    self, HEADER_DEAD_LETTER_QUEUE, HEADER_DEAD_LETTER_REASON, Topology,
};
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

/// Which dead letters to act on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Selection {
    /// Every one (`--all`).
    All,
    /// Those with these message ids (record ids).
    Ids(Vec<String>),
}

/// Where replayed messages go.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Target {
    /// Back to the queue each died in.
    Origin,
    /// The records exchange: every writer's queue.
    Fanout,
}

/// What happened (or, in a dry run, would happen) to one dead letter.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outcome {
    /// Its message id.
    pub id: String,
    /// The queue or exchange it went (would go) to.
    pub to: String,
    /// What was done.
    pub action: Action,
    /// Lines of a packed message that are still not records: they stay (would stay) in the
    /// dead-letter queue as a message of their own while its valid records are replayed.
    pub kept_lines: usize,
}

/// What was done with a dead letter.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Published (confirmed) and removed from the dead-letter queue.
    Replayed,
    /// A dry run: it would be replayed.
    WouldReplay,
    /// Left in the dead-letter queue, and why.
    Kept(String),
}

impl Outcome {
    fn kept(letter: &DeadLetter, why: &str) -> Self {
        Self {
            id: letter.id.clone(),
            to: String::new(),
            action: Action::Kept(why.to_owned()),
            kept_lines: 0,
        }
    }
}

/// `text` with control characters escaped (`\u{1b}`), so a hostile body cannot drive the
/// terminal it is listed on.
pub fn printable(text: &str) -> String {
    text.chars()
        .map(|c| {
            if c.is_control() {
                c.escape_unicode().to_string()
            } else {
                c.to_string()
            }
        })
        .collect()
}

/// A connection to the broker with the topology declared.
pub struct Broker {
    connection: Connection,
    channel: Channel,
    topology: Topology,
}

impl Broker {
    /// Connects to the first node of `url` (one URL or a cluster's, separated by commas) that
    /// answers, and declares the topology (idempotent).
    pub async fn connect(url: &str, topology: Topology) -> anyhow::Result<Self> {
        let nodes = flowmesh_common::nodes::Nodes::in_order(url)
            .map_err(|e| anyhow::anyhow!("AMQP_URL: {e}"))?;
        let mut failures = Vec::new();
        let mut connection = None;
        for _ in 0..nodes.names().len() {
            let node = nodes.next();
            match Connection::connect(node.url(), ConnectionProperties::default()).await {
                Ok(connected) => {
                    connection = Some(connected);
                    break;
                }
                Err(err) => failures.push(format!("{}: {err}", node.name())),
            }
        }
        let connection = connection.with_context(|| {
            format!(
                "connecting to RabbitMQ: no node answered ({})",
                failures.join("; ")
            )
        })?;
        let channel = connection.create_channel().await?;
        topology.declare(&connection).await?;
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

    /// Replays the chosen dead letters, each confirmed by RabbitMQ before it is removed from
    /// the dead-letter queue. By default a message goes back to the queue it died in (from
    /// `x-flowmesh-queue` or `x-death`), so a record one writer could not store is not stored
    /// twice by the other; [`Target::Fanout`] publishes to the records exchange (both writers).
    /// With `dry_run`, nothing is published or removed: the outcomes say what would happen.
    pub async fn replay(
        self,
        selection: &Selection,
        target: Target,
        dry_run: bool,
    ) -> anyhow::Result<Vec<Outcome>> {
        self.channel
            .confirm_select(ConfirmSelectOptions::default())
            .await?;
        // A letter may come from any partition of the in-order writer's queue.
        let partitions: Vec<String> = (1..flowmesh_common::topology::partitions::MAX_PARTITIONS)
            .filter_map(|i| self.topology.partition_queue(i))
            .map(|q| q.name)
            .collect();
        let writer_queues: Vec<&str> = self
            .topology
            .writer_queues
            .iter()
            .map(|q| q.name.as_str())
            .chain(partitions.iter().map(String::as_str))
            .collect();
        let mut outcomes = Vec::new();
        for message in self.take_all().await? {
            let letter = describe(&message);
            if let Selection::Ids(ids) = selection
                && !ids.contains(&letter.id)
            {
                continue;
            }
            let (exchange, routing_key) = match self.destination(target, &letter, &writer_queues) {
                Ok(destination) => destination,
                Err(why) => {
                    outcomes.push(Outcome::kept(&letter, why));
                    continue;
                }
            };
            let to = if routing_key.is_empty() {
                exchange.clone()
            } else {
                routing_key.clone()
            };
            let (records, invalid) = match replayable(&message) {
                Ok(decoded) => decoded,
                Err(why) => {
                    outcomes.push(Outcome::kept(&letter, &why));
                    continue;
                }
            };
            let action = if dry_run {
                Action::WouldReplay
            } else {
                if !invalid.is_empty() {
                    self.dead_letter_lines(&message, &letter, &invalid).await?;
                }
                self.republish(&exchange, &routing_key, &records, &letter)
                    .await?;
                message.delivery.ack(BasicAckOptions::default()).await?;
                Action::Replayed
            };
            outcomes.push(Outcome {
                id: letter.id,
                to,
                action,
                kept_lines: invalid.len(),
            });
        }
        self.close().await;
        Ok(outcomes)
    }

    /// Where a replay of `letter` goes: (exchange, routing key), or why it stays.
    fn destination(
        &self,
        target: Target,
        letter: &DeadLetter,
        writer_queues: &[&str],
    ) -> Result<(String, String), &'static str> {
        match target {
            Target::Fanout => Ok((self.topology.exchange.clone(), String::new())),
            Target::Origin if writer_queues.contains(&letter.origin.as_str()) => {
                Ok((String::new(), letter.origin.clone()))
            }
            Target::Origin => Err("the queue it died in is unknown (use --fanout)"),
        }
    }

    /// Publishes `records` (confirmed, mandatory) as one message; an error when RabbitMQ did
    /// not take it.
    async fn republish(
        &self,
        exchange: &str,
        routing_key: &str,
        records: &[Record],
        letter: &DeadLetter,
    ) -> anyhow::Result<()> {
        let options = BasicPublishOptions {
            mandatory: true,
            ..BasicPublishOptions::default()
        };
        // Through the records exchange, each record goes with its source's bucket as its key
        // (§4 "Partitions"): a message of several buckets is replayed as one per bucket.
        let by_bucket = routing_key.is_empty() && !exchange.is_empty();
        for run in records.chunk_by(|a, b| {
            !by_bucket || topology::routing_key(&a.source) == topology::routing_key(&b.source)
        }) {
            let key = if by_bucket {
                topology::routing_key(&run[0].source)
            } else {
                routing_key.to_owned()
            };
            let (body, properties) = message::encode(run);
            let confirm = self
                .channel
                .basic_publish(
                    exchange.into(),
                    key.as_str().into(),
                    options,
                    &body,
                    properties,
                )
                .await?
                .await?;
            if !confirm.is_ack() || confirm.take_message().is_some() {
                anyhow::bail!("RabbitMQ did not accept the replay of {}", letter.id);
            }
        }
        Ok(())
    }

    /// Publishes (confirmed) the `invalid` lines of dead letter `message` to the dead-letter
    /// exchange as a message of their own, with why each is not a record, before the message
    /// itself is replayed and removed: the bad lines stay dead-lettered, once.
    async fn dead_letter_lines(
        &self,
        message: &BasicGetMessage,
        letter: &DeadLetter,
        invalid: &[message::InvalidLine],
    ) -> anyhow::Result<()> {
        let body: Vec<&str> = invalid.iter().map(|bad| bad.text.as_str()).collect();
        let reasons: Vec<String> = invalid
            .iter()
            .map(|bad| format!("line {}: {}", bad.line, bad.reason))
            .collect();
        let mut headers = message
            .delivery
            .properties
            .headers()
            .clone()
            .unwrap_or_default();
        headers.insert(
            HEADER_DEAD_LETTER_REASON.into(),
            AMQPValue::LongString(format!("not a valid record: {}", reasons.join("; ")).into()),
        );
        headers.insert(
            HEADER_DEAD_LETTER_QUEUE.into(),
            AMQPValue::LongString(letter.origin.as_str().into()),
        );
        headers.insert(
            message::HEADER_RECORDS.into(),
            AMQPValue::LongLongInt(invalid.len() as i64),
        );
        let properties = message.delivery.properties.clone().with_headers(headers);
        let confirm = self
            .channel
            .basic_publish(
                self.topology.dead_letter_exchange.as_str().into(),
                "".into(),
                BasicPublishOptions::default(),
                body.join("\n").as_bytes(),
                properties,
            )
            .await?
            .await?;
        if !confirm.is_ack() {
            anyhow::bail!(
                "RabbitMQ did not accept the bad lines of {} back into the dead-letter queue",
                letter.id
            );
        }
        Ok(())
    }

    /// How many messages the dead-letter queue holds now.
    pub async fn count(self) -> anyhow::Result<u32> {
        let passive = lapin::options::QueueDeclareOptions {
            passive: true,
            ..lapin::options::QueueDeclareOptions::default()
        };
        let queue = self
            .channel
            .queue_declare(
                self.topology.dead_letter_queue.name.as_str().into(),
                passive,
                FieldTable::default(),
            )
            .await?;
        self.close().await;
        Ok(queue.message_count())
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
    // A writer that dead-lettered the message itself says why, and from where, in its headers.
    if let Some(why) = text(&headers, HEADER_DEAD_LETTER_REASON) {
        reason = why;
    }
    if let Some(queue) = text(&headers, HEADER_DEAD_LETTER_QUEUE) {
        origin = queue;
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

/// The records of a dead letter that a replay can send, with its lines that are still not
/// records; or why nothing of it can be replayed. A replay keeps the provenance the filter gave
/// it (it is judged by that version), and a packed message stays packed.
fn replayable(
    message: &BasicGetMessage,
) -> Result<(Vec<Record>, Vec<message::InvalidLine>), String> {
    match message::decode(&message.delivery.properties, &message.delivery.data) {
        Ok(decoded) if !decoded.records.is_empty() => Ok((decoded.records, decoded.invalid)),
        Ok(decoded) => {
            let bad = &decoded.invalid[0];
            Err(format!(
                "line {} is still not a valid record: {}",
                bad.line, bad.reason
            ))
        }
        Err(err) => Err(format!("still not a valid record: {err}")),
    }
}
