//! **Writers only**: the framework pg-writer and mongo-writer (and any writer to come) are built
//! on, which the generator and the filter never use. [`consumer`] reads a writer's queue into
//! batches and stores them through a [`consumer::RecordStore`], acking after the commit; the
//! shell ([`Writer`] over a [`Database`]) adds the probe port, health, the database's breaker,
//! the grace period and shutdown. A writer crate is its configuration plus a `Database`.

pub mod consumer;
mod shell;
pub mod traced;

pub use shell::{Database, Writer, WriterSettings, main};
