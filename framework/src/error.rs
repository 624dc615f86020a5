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

    /// The relay's publisher did not take a message, in a way that may pass (the broker away,
    /// a failed producer): it is sent again.
    #[error("message to {topic} not published: {reason}")]
    NotPublished {
        /// The message's topic.
        topic: String,
        /// What the publisher said.
        reason: String,
    },

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

    /// The logical replication stream the log relay reads failed (a lost connection, a slot
    /// another process streams, a message that could not be decoded). Retried on a new
    /// stream, which resumes from the slot's confirmed position.
    #[error("replication: {0}")]
    Replication(String),
    /// A gap in a producer's numbers could not be repaired from its sent log yet (the
    /// producer away, the numbers no longer kept): tried again.
    #[error("repairing a gap: {0}")]
    Repair(String),

    /// The database cannot serve the log relay as it is set up (`wal_level`, privileges, the
    /// publication, free slots): what to change is in the message.
    #[error("the database is not set up for the log relay: {0}")]
    ReplicationSetup(String),
}

impl Error {
    /// Whether the same operation may succeed if tried again later.
    pub fn is_retryable(&self) -> bool {
        match self {
            Error::Database(e) => database_error_is_retryable(e),
            Error::Kafka(e) => kafka_error_is_retryable(e),
            Error::Pool(_)
            | Error::Timeout(_)
            | Error::Task(_)
            | Error::Http(_)
            | Error::NotPublished { .. }
            | Error::Replication(_)
            | Error::Repair(_) => true,
            Error::Codec(e) => e.is_retryable(),
            Error::Migration(_)
            | Error::Topic { .. }
            | Error::Config(_)
            | Error::NotInTransaction
            | Error::FeedHalted { .. }
            | Error::Snapshot(_)
            | Error::ReplicationSetup(_) => false,
        }
    }
}

/// The SQLSTATE of a database error, when the server sent one.
///
/// diesel-async maps only a handful of SQLSTATEs to a [`DatabaseErrorKind`] and every other
/// one (deadlock, lock and statement timeouts, an administrator's shutdown, ...) to `Unknown`,
/// without keeping the code. For those that matter to retrying, the code is recovered from
/// the server's primary message, which PostgreSQL words identically in every version (in
/// English unless the server's `lc_messages` says otherwise; [`crate::db::pool`] asks for
/// English messages on each connection where the role may).
///
/// [`DatabaseErrorKind`]: diesel::result::DatabaseErrorKind
pub fn sqlstate(e: &diesel::result::Error) -> Option<&'static str> {
    use diesel::result::{DatabaseErrorKind as K, Error as D};
    let D::DatabaseError(kind, info) = e else {
        return None;
    };
    Some(match kind {
        K::UniqueViolation => "23505",
        K::ForeignKeyViolation => "23503",
        K::NotNullViolation => "23502",
        K::CheckViolation => "23514",
        K::RestrictViolation => "23001",
        K::ExclusionViolation => "23P01",
        K::SerializationFailure => "40001",
        K::ReadOnlyTransaction => "25006",
        // No SQLSTATE: the connection failed or the command never reached the server.
        K::ClosedConnection | K::UnableToSendCommand => return None,
        _ => return sqlstate_from_message(info.message()),
    })
}

/// PostgreSQL's primary messages (`errmsg`) for the SQLSTATEs worth retrying, with the
/// prefix each starts with.
const RETRYABLE_MESSAGES: &[(&str, &str)] = &[
    ("deadlock detected", "40P01"),
    ("canceling statement due to lock timeout", "55P03"),
    ("could not obtain lock on", "55P03"),
    ("canceling statement due to statement timeout", "57014"),
    ("canceling statement due to user request", "57014"),
    (
        "terminating connection due to administrator command",
        "57P01",
    ),
    (
        "terminating connection because of crash of another server process",
        "57P02",
    ),
    ("the database system is starting up", "57P03"),
    ("the database system is shutting down", "57P03"),
    ("the database system is in recovery mode", "57P03"),
    (
        "terminating connection due to idle-in-transaction timeout",
        "25P03",
    ),
    ("sorry, too many clients already", "53300"),
    ("remaining connection slots are reserved", "53300"),
    ("could not serialize access", "40001"),
    ("out of memory", "53200"),
    ("could not extend file", "53100"),
];

fn sqlstate_from_message(message: &str) -> Option<&'static str> {
    RETRYABLE_MESSAGES
        .iter()
        .find(|(prefix, _)| message.starts_with(prefix))
        .map(|(_, code)| *code)
}

/// Whether a statement that failed with SQLSTATE `code` may succeed if tried again: the
/// transaction-rollback class (serialization failure, deadlock), resource exhaustion, a
/// connection lost or refused, a lock or statement timeout, a server shutting down.
/// Constraint violations, bad SQL, permissions and data errors are permanent.
pub fn sqlstate_is_retryable(code: &str) -> bool {
    matches!(code.get(..2), Some("08" | "40" | "53" | "57" | "58"))
        || matches!(code, "55P03" | "25P03" | "55006")
}

/// Serialization failures, deadlocks, timeouts and lost connections are worth retrying;
/// constraint violations and bad SQL are not. Classified by SQLSTATE ([`sqlstate`]).
pub(crate) fn database_error_is_retryable(e: &diesel::result::Error) -> bool {
    use diesel::result::{DatabaseErrorKind, Error as D};
    match e {
        D::DatabaseError(DatabaseErrorKind::ClosedConnection, _)
        | D::DatabaseError(DatabaseErrorKind::UnableToSendCommand, _) => true,
        D::DatabaseError(..) => sqlstate(e).is_some_and(sqlstate_is_retryable),
        D::BrokenTransactionManager | D::RollbackErrorOnCommit { .. } => true,
        _ => false,
    }
}

/// Whether the error is about the producer's own state (fatally failed, fenced, its
/// idempotence sequence broken), which a new producer gets past, rather than about a message
/// or the broker.
pub(crate) fn kafka_producer_failed(e: &rdkafka::error::KafkaError) -> bool {
    use rdkafka::types::RDKafkaErrorCode as C;
    matches!(
        e.rdkafka_error_code(),
        Some(
            C::Fatal
                | C::Fenced
                | C::ProducerFenced
                | C::InvalidProducerEpoch
                | C::OutOfOrderSequenceNumber
        )
    )
}

/// Whether a Kafka operation may succeed if tried again: librdkafka's own verdict where it
/// gives one (transactional errors carry a retriable and a fatal flag), otherwise by error
/// code. Authorization, authentication, configuration, a record the broker will never take
/// (too large, invalid) and a fatal producer state are permanent; outages, timeouts, leader
/// changes and too few in-sync replicas are not.
pub(crate) fn kafka_error_is_retryable(e: &rdkafka::error::KafkaError) -> bool {
    use rdkafka::error::KafkaError as K;
    use rdkafka::types::RDKafkaErrorCode as C;
    match e {
        K::Transaction(e) => e.is_retriable() && !e.is_fatal(),
        K::ClientConfig(..) | K::ClientCreation(_) | K::Nul(_) | K::Subscription(_) => false,
        K::MessageConsumptionFatal(_) => false,
        _ if kafka_producer_failed(e) => false,
        _ => !matches!(
            e.rdkafka_error_code(),
            Some(
                C::MessageSizeTooLarge
                    | C::InvalidMessageSize
                    | C::MessageBatchTooLarge
                    | C::InvalidRecord
                    | C::InvalidTopic
                    | C::InvalidRequiredAcks
                    | C::InvalidRequest
                    | C::InvalidConfig
                    | C::InvalidArgument
                    | C::InvalidPartitions
                    | C::InvalidReplicationFactor
                    | C::InvalidGroupId
                    | C::InvalidSessionTimeout
                    | C::InvalidTimestamp
                    | C::PolicyViolation
                    | C::TopicAuthorizationFailed
                    | C::GroupAuthorizationFailed
                    | C::ClusterAuthorizationFailed
                    | C::TransactionalIdAuthorizationFailed
                    | C::SaslAuthenticationFailed
                    | C::Authentication
                    | C::UnsupportedSASLMechanism
                    | C::IllegalSASLState
                    | C::UnsupportedVersion
                    | C::UnsupportedForMessageFormat
                    | C::UnsupportedCompressionType
                    | C::UnsupportedFeature
                    | C::NotImplemented
                    | C::KeySerialization
                    | C::ValueSerialization
                    | C::FencedInstanceId
            )
        ),
    }
}

/// Shorthand for results in this crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

#[cfg(test)]
mod tests {
    use super::*;
    use rdkafka::error::KafkaError;
    use rdkafka::types::RDKafkaErrorCode as C;

    #[test]
    fn sqlstates_are_classified_by_class() {
        for code in [
            "40001", "40P01", "55P03", "57014", "57P01", "08006", "53300", "25P03",
        ] {
            assert!(sqlstate_is_retryable(code), "{code}");
        }
        for code in [
            "23505", "23503", "42601", "42P01", "42501", "22P02", "P0001", "XX000",
        ] {
            assert!(!sqlstate_is_retryable(code), "{code}");
        }
    }

    #[test]
    fn server_messages_give_their_sqlstate() {
        assert_eq!(sqlstate_from_message("deadlock detected"), Some("40P01"));
        assert_eq!(
            sqlstate_from_message("canceling statement due to statement timeout"),
            Some("57014")
        );
        assert_eq!(
            sqlstate_from_message("could not obtain lock on row in relation \"t\""),
            Some("55P03")
        );
        assert_eq!(sqlstate_from_message("syntax error at or near \"x\""), None);
    }

    #[test]
    fn kafka_errors_follow_their_code() {
        let retryable = [
            KafkaError::MessageProduction(C::MessageTimedOut),
            KafkaError::MessageProduction(C::NotEnoughReplicas),
            KafkaError::MessageProduction(C::LeaderNotAvailable),
            KafkaError::MessageProduction(C::AllBrokersDown),
            KafkaError::MessageProduction(C::QueueFull),
            KafkaError::MetadataFetch(C::OperationTimedOut),
        ];
        for e in &retryable {
            assert!(Error::Kafka(e.clone()).is_retryable(), "{e}");
        }
        let permanent = [
            KafkaError::MessageProduction(C::MessageSizeTooLarge),
            KafkaError::MessageProduction(C::TopicAuthorizationFailed),
            KafkaError::MessageProduction(C::Fatal),
            KafkaError::MessageProduction(C::InvalidRecord),
            KafkaError::ClientCreation("bad".into()),
        ];
        for e in &permanent {
            assert!(!Error::Kafka(e.clone()).is_retryable(), "{e}");
        }
    }
}
