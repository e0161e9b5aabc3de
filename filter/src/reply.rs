//! How sinks answer a connection: every record handed to a sink comes back as exactly one ack,
//! nack or reject on the connection it arrived on.
//!
//! The channel back to a connection is unbounded on purpose: a sink must never wait on a slow
//! client. It is still bounded in practice, because each record holds one of the connection's
//! in-flight permits until its answer has been written, and the reader stops at the limit.

use std::time::Duration;

use tokio::sync::mpsc;

/// Where a record was routed, for metrics and logs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Destination {
    /// RabbitMQ.
    Broker,
    /// The JSON Lines file.
    File,
}

impl Destination {
    /// The metric label value.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Broker => "broker",
            Self::File => "file",
        }
    }
}

/// One answer for one or more records of a connection.
#[derive(Debug)]
pub enum Reply {
    /// Stored durably.
    Ack {
        /// The stored records' seqs.
        seqs: Vec<u64>,
        /// Where they went.
        destination: Destination,
    },
    /// Not stored; the client should send them again later.
    Nack {
        /// The refused records' seqs.
        seqs: Vec<u64>,
        /// Where they were meant to go.
        destination: Destination,
        /// Why, for the client's logs.
        reason: String,
        /// When to try again.
        retry_after: Duration,
    },
    /// Invalid; dead-lettered (or at least counted) and never to be sent again.
    Reject {
        /// The record's seq, when it had one.
        seq: Option<u64>,
        /// Why it is invalid.
        error: String,
    },
}

impl Reply {
    /// How many records (in-flight permits) this answer settles.
    pub fn records(&self) -> usize {
        match self {
            Self::Ack { seqs, .. } | Self::Nack { seqs, .. } => seqs.len(),
            Self::Reject { .. } => 1,
        }
    }
}

/// The sending side of a connection's answers. Sending to a closed connection is not an error:
/// the client will re-send whatever it did not hear about.
#[derive(Debug, Clone)]
pub struct Replier(mpsc::UnboundedSender<Reply>);

impl Replier {
    /// Wraps a connection's answer channel.
    pub fn new(sender: mpsc::UnboundedSender<Reply>) -> Self {
        Self(sender)
    }

    /// Sends one answer.
    pub fn send(&self, reply: Reply) {
        let _ = self.0.send(reply);
    }

    /// Acks `seqs` stored at `destination`.
    pub fn ack(&self, seqs: Vec<u64>, destination: Destination) {
        if !seqs.is_empty() {
            self.send(Reply::Ack { seqs, destination });
        }
    }

    /// Nacks `seqs` meant for `destination`.
    pub fn nack(
        &self,
        seqs: Vec<u64>,
        destination: Destination,
        reason: impl Into<String>,
        retry_after: Duration,
    ) {
        if !seqs.is_empty() {
            self.send(Reply::Nack {
                seqs,
                destination,
                reason: reason.into(),
                retry_after,
            });
        }
    }
}
