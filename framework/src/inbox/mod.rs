//! The consumer side: an [`InboxConsumer`] reads Kafka, deduplicates by message id in the
//! consumer's database, runs the [`Handler`] for new messages in the same transaction, and
//! stores offsets only after that transaction commits. Messages that cannot be applied become
//! [`DeadLetters`], later messages of their key are parked behind them, and an operator
//! redrives them after a fix. [`Routes`] routes messages by type to a [`TypedHandler`] each.

pub(crate) mod apply;
mod config;
mod consumer;
mod dead_letters;
mod gaps;
mod handler;
pub(crate) mod pipeline;
mod retention;
mod routes;
pub(crate) mod schema;

pub use apply::Dedup;
/// The inbox's own statements, for benchmarks that measure what they cost (feature
/// `test-util`).
#[cfg(feature = "test-util")]
pub use apply::{LOCK_NUMBERS_SQL, RECORD_IDS_SQL, STORE_NUMBERS_SQL};
pub use config::{InboxConfig, InboxStats, InboxStatsSnapshot};
pub use consumer::InboxConsumer;
pub use dead_letters::{
    DeadLetter, DeadLetterCounts, DeadLetterFilter, DeadLetters, RedriveReport, dlq_headers,
};
pub use gaps::{GapRecord, Gaps};
pub use handler::{Handler, HandlerError, ReceivedMessage};
pub use retention::{
    Expired, GenerationStatus, Horizon, expire, generation_span, generations, kafka_horizon,
};
pub use routes::{Routes, TypedHandler, UnknownTypes};
