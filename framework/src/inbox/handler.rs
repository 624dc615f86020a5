//! What a consumer implements: a [`Handler`] that applies one message inside the inbox
//! transaction, and the [`HandlerError`] that says whether a failure is worth retrying.

use std::future::Future;

use apache_avro::types::Value;
use diesel_async::AsyncPgConnection;
use serde::de::DeserializeOwned;

use crate::error::{BoxError, database_error_is_retryable};
use crate::message::IncomingMessage;

/// A message handed to a [`Handler`]: its envelope and its decoded Avro value.
#[derive(Debug, Clone, PartialEq)]
pub struct ReceivedMessage {
    /// Id, type, key, entity version, origin and headers.
    pub envelope: IncomingMessage,
    /// The payload: decoded with the writer's schema and, when the consumer has reader schemas
    /// (its contract, `with_reader_schemas`), resolved into the reader's.
    pub value: Value,
}

impl ReceivedMessage {
    /// The span to process this message in: a child of the trace it carries (see
    /// [`telemetry`](crate::telemetry)); a disabled span when traces are off.
    pub fn span(&self) -> tracing::Span {
        crate::telemetry::message_span(
            &self.envelope.message_type,
            &self.envelope.topic,
            &self.envelope.id.to_string(),
            &self.envelope.headers,
        )
    }

    /// Deserializes the payload into `T`; a mismatch is a permanent error.
    pub fn body<T: DeserializeOwned>(&self) -> Result<T, HandlerError> {
        apache_avro::from_value::<T>(&self.value).map_err(|e| {
            HandlerError::permanent(format!(
                "{} payload does not fit the consumer's type: {e}",
                self.envelope.message_type
            ))
        })
    }
}

/// Why a handler did not apply a message.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum HandlerError {
    /// Trying again later may work (a dependency is down, a lock timed out). The partition
    /// waits and the message is retried with backoff.
    #[error("retryable: {0}")]
    Retryable(#[source] BoxError),
    /// Trying again cannot work (bad data, unknown type, a bug). The message is dead-lettered
    /// and the consumer moves on.
    #[error("permanent: {0}")]
    Permanent(#[source] BoxError),
    /// The handler panicked: a bug, treated as a permanent failure of this message (it is
    /// dead-lettered with the panic's text and its key parked, or, for a feed consumer that
    /// halts on permanent failures, halts it), never as a dead consumer task.
    #[error("handler panicked: {0}")]
    Panicked(String),
}

impl HandlerError {
    /// A failure worth retrying.
    pub fn retryable(e: impl Into<BoxError>) -> Self {
        Self::Retryable(e.into())
    }

    /// A failure not worth retrying.
    pub fn permanent(e: impl Into<BoxError>) -> Self {
        Self::Permanent(e.into())
    }

    /// Whether this failure is worth retrying.
    pub fn is_retryable(&self) -> bool {
        matches!(self, Self::Retryable(_))
    }
}

impl From<diesel::result::Error> for HandlerError {
    fn from(e: diesel::result::Error) -> Self {
        if database_error_is_retryable(&e) {
            Self::Retryable(e.into())
        } else {
            Self::Permanent(e.into())
        }
    }
}

/// Applies messages to the consumer's own tables.
///
/// `handle` runs inside the inbox transaction on `conn`: whatever it writes commits together
/// with the message id, or not at all. It runs only for message ids the inbox has not seen.
/// Messages arrive in batches; implement [`Handler::handle_batch`] too when a batch can be
/// written faster than one message at a time.
///
/// ```
/// use diesel_async::AsyncPgConnection;
/// use ferrybox::inbox::{Handler, HandlerError, ReceivedMessage};
///
/// struct Audit;
///
/// impl Handler for Audit {
///     async fn handle(
///         &self,
///         _conn: &mut AsyncPgConnection,
///         message: &ReceivedMessage,
///     ) -> Result<(), HandlerError> {
///         match message.envelope.message_type.as_str() {
///             "com.example.AccountOpened" => Ok(()),
///             other => Err(HandlerError::permanent(format!("unknown message type {other}"))),
///         }
///     }
/// }
/// ```
pub trait Handler: Send + Sync + 'static {
    /// Applies one message.
    fn handle(
        &self,
        conn: &mut AsyncPgConnection,
        message: &ReceivedMessage,
    ) -> impl Future<Output = Result<(), HandlerError>> + Send;

    /// Applies several new messages, in order, in one go. The default calls
    /// [`Handler::handle`] for each, inside the message's [span](ReceivedMessage::span);
    /// override it to write a whole batch in one statement: decode every message first (a
    /// message that does not decode fails the batch, and is then set apart as below), then
    /// bind one array per column and write them with `unnest` (auth-service's `UserEvents` is
    /// the reference: a version-guarded upsert of a whole batch, with the same outcome as its
    /// messages one by one). One statement per batch instead of one per message is most of
    /// what a consumer can save on the database.
    ///
    /// It runs in the applying transaction: when it fails, the consumer rolls that transaction
    /// back and applies the batch again, the messages one by one, each under its own
    /// savepoint, to find and isolate the failing one (the ones before it commit).
    fn handle_batch(
        &self,
        conn: &mut AsyncPgConnection,
        messages: &[&ReceivedMessage],
    ) -> impl Future<Output = Result<(), HandlerError>> + Send {
        async move {
            for message in messages {
                tracing::Instrument::instrument(self.handle(conn, message), message.span()).await?;
            }
            Ok(())
        }
    }
}
