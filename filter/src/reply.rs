//! How sinks answer a connection: every record handed to a sink comes back as exactly one ack,
//! nack or reject on the connection it arrived on.
//!
//! The channel back to a connection is unbounded on purpose: a sink must never wait on a slow
//! client. It is still bounded in practice, because each record holds one of the connection's
//! in-flight permits until its answer has been written, and the reader stops at the limit.

use std::time::Duration;

use tokio::sync::mpsc;

pub use flowmesh_common::routing::Destination;

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

/// What to do once a job's lines are committed (or failed to be).
#[derive(Debug)]
pub enum Completion {
    /// Routed records: ack on success, nack on failure.
    Records {
        /// Their seqs, in line order.
        seqs: Vec<u64>,
        /// The connection to answer.
        replier: Replier,
    },
    /// Invalid records: reject once dead-lettered; if that failed, nack those with a seq so
    /// they come back and are dead-lettered later.
    Rejects {
        /// Seq (if any) and reason of each line.
        rejects: Vec<(Option<u64>, String)>,
        /// The connection to answer.
        replier: Replier,
    },
}

impl Completion {
    /// Which sink the job was for, for nack reasons.
    pub fn sink(&self) -> &'static str {
        match self {
            Self::Records { .. } => "file sink",
            Self::Rejects { .. } => "dead-letter file",
        }
    }

    /// The job was stored: ack the records, or send the rejects.
    pub fn stored(self) {
        match self {
            Self::Records { seqs, replier } => replier.ack(seqs, Destination::File),
            Self::Rejects { rejects, replier } => {
                for (seq, error) in rejects {
                    replier.send(Reply::Reject { seq, error });
                }
            }
        }
    }

    /// The job was not stored: nack what can come back, reject what cannot (a frame that was
    /// not a record has nothing to re-send, so its reject stands).
    pub fn not_stored(self, reason: &str, retry_after: Duration) {
        match self {
            Self::Records { seqs, replier } => {
                replier.nack(seqs, Destination::File, reason, retry_after)
            }
            Self::Rejects { rejects, replier } => {
                for (seq, error) in rejects {
                    match seq {
                        Some(seq) => {
                            replier.nack(vec![seq], Destination::File, reason, retry_after)
                        }
                        None => replier.send(Reply::Reject { seq: None, error }),
                    }
                }
            }
        }
    }
}
