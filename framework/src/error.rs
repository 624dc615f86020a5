//! Error types shared by the framework's pieces.
//!
//! Each error says whether trying again can help ([`Error::is_retryable`]), so callers can
//! tell a broker or database outage from a bug or bad data.

use std::time::Duration;

/// A boxed error from user code (handlers) or a dependency.
pub type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// Everything that can go wrong inside Ferrybox.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A database query failed.
    #[error("database error: {0}")]
    Database(#[from] diesel::result::Error),

    /// No database connection could be had from the pool.
    #[error("database pool error: {0}")]
    Pool(String),

    /// Running the framework's migrations failed.
    #[error("migration failed: {0}")]
    Migration(String),

    /// The Kafka client reported an error.
    #[error("kafka error: {0}")]
    Kafka(#[from] rdkafka::error::KafkaError),

    /// A Kafka topic is missing or not as configured.
    #[error("topic {topic}: {reason}")]
    Topic {
        /// The topic's name.
        topic: String,
        /// What is wrong with it.
        reason: String,
    },

    /// Encoding or decoding a message failed.
    #[error(transparent)]
    Codec(#[from] crate::codec::CodecError),

    /// Configuration is invalid.
    #[error("invalid configuration: {0}")]
    Config(String),

    /// `enqueue` was called on a connection with no open transaction, which would commit the
    /// message apart from the business change.
    #[error("outbox enqueue needs an open transaction: call it inside `conn.transaction(..)`")]
    NotInTransaction,

    /// A background task panicked or was cancelled.
    #[error("background task failed: {0}")]
    Task(String),

    /// An operation did not finish in time.
    #[error("timed out after {0:?}")]
    Timeout(Duration),

    /// A call to another service (the event feed, a snapshot, an alert webhook) failed in a way
    /// that may pass: connection refused, timeout, a 5xx answer.
    #[error("http request failed: {0}")]
    Http(String),

    /// The pulled event feed cannot go on without an operator: undecodable data (when the
    /// consumer halts on it), a gap, or a position the producer no longer has.
    #[error("feed halted at position {position}: {reason}")]
    FeedHalted {
        /// The consumer's position (the last message it finished).
        position: i64,
        /// Why it stopped.
        reason: String,
    },

    /// A snapshot is malformed or not a Ferrybox snapshot.
    #[error("invalid snapshot: {0}")]
    Snapshot(String),
}

impl Error {
    /// Whether the same operation may succeed if tried again later.
    pub fn is_retryable(&self) -> bool {
        match self {
            Error::Database(e) => database_error_is_retryable(e),
            Error::Pool(_)
            | Error::Kafka(_)
            | Error::Timeout(_)
            | Error::Task(_)
            | Error::Http(_) => true,
            Error::Codec(e) => e.is_retryable(),
            Error::Migration(_)
            | Error::Topic { .. }
            | Error::Config(_)
            | Error::NotInTransaction
            | Error::FeedHalted { .. }
            | Error::Snapshot(_) => false,
        }
    }
}

/// Serialization failures, deadlocks and lost connections are worth retrying; constraint
/// violations and bad SQL are not.
pub(crate) fn database_error_is_retryable(e: &diesel::result::Error) -> bool {
    use diesel::result::{DatabaseErrorKind, Error as D};
    match e {
        D::DatabaseError(kind, _) => matches!(
            kind,
            DatabaseErrorKind::SerializationFailure
                | DatabaseErrorKind::ClosedConnection
                | DatabaseErrorKind::UnableToSendCommand
        ),
        D::BrokenTransactionManager | D::RollbackErrorOnCommit { .. } => true,
        _ => false,
    }
}

/// Shorthand for results in this crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;
