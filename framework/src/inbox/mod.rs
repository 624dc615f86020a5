//! The consumer side: an [`InboxConsumer`] reads Kafka, deduplicates by message id in the
//! consumer's database, runs the [`Handler`] for new messages in the same transaction, and
//! stores offsets only after that transaction commits.

mod consumer;
mod handler;
pub(crate) mod schema;

pub use consumer::{InboxConfig, InboxConsumer, InboxStats, InboxStatsSnapshot};
pub use handler::{Handler, HandlerError, ReceivedMessage};
