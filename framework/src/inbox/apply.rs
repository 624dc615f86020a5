//! Applying one message through the inbox: decode, resolve into the reader schema, then in one
//! transaction record its id and run the handler. Shared by the consumer loop and redrive.

use std::collections::BTreeMap;
use std::time::Duration;

use diesel::prelude::*;
use diesel_async::{AsyncConnection, RunQueryDsl};
use rdkafka::message::{BorrowedMessage, Headers, Message};

use super::handler::{Handler, HandlerError, ReceivedMessage};
use super::schema::ferrybox_inbox;
use crate::codec::AvroCodec;
use crate::contract::ReaderSchemas;
use crate::db::{self, PgPool};
use crate::error::Error;
use crate::message::IncomingMessage;

/// A Kafka record as the inbox keeps it: origin, key, headers and bytes.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Record {
    pub(crate) topic: String,
    pub(crate) partition: i32,
    pub(crate) offset: i64,
    pub(crate) key: Option<Vec<u8>>,
    pub(crate) headers: BTreeMap<String, String>,
    pub(crate) payload: Option<Vec<u8>>,
}

impl Record {
    pub(crate) fn from_kafka(m: &BorrowedMessage<'_>) -> Self {
        let headers = m
            .headers()
            .map(|hs| {
                hs.iter()
                    .map(|h| {
                        (
                            h.key.to_owned(),
                            h.value
                                .map(|v| String::from_utf8_lossy(v).into_owned())
                                .unwrap_or_default(),
                        )
                    })
                    .collect()
            })
            .unwrap_or_default();
        Self {
            topic: m.topic().to_owned(),
            partition: m.partition(),
            offset: m.offset(),
            key: m.key().map(<[u8]>::to_vec),
            headers,
            payload: m.payload().map(<[u8]>::to_vec),
        }
    }

    /// The key as text, if it has one.
    pub(crate) fn key_text(&self) -> Option<String> {
        self.key
            .as_deref()
            .map(|k| String::from_utf8_lossy(k).into_owned())
    }
}

/// What happened to one message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Outcome {
    Applied,
    Duplicate,
}

/// Why a message was not applied, before the retry policy looks at it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Failure {
    pub(crate) kind: &'static str,
    pub(crate) error: String,
    pub(crate) retryable: bool,
}

impl Failure {
    fn permanent(kind: &'static str, error: impl Into<String>) -> Self {
        Self {
            kind,
            error: error.into(),
            retryable: false,
        }
    }

    fn from_handler(e: &HandlerError) -> Self {
        Self {
            kind: if e.is_retryable() {
                "handler_retryable"
            } else {
                "handler"
            },
            error: e.to_string(),
            retryable: e.is_retryable(),
        }
    }

    pub(crate) fn from_error(kind: &'static str, e: &Error) -> Self {
        Self {
            kind,
            error: e.to_string(),
            retryable: e.is_retryable(),
        }
    }
}

/// Everything needed to apply a message.
pub(crate) struct Applier<H> {
    pub(crate) pool: PgPool,
    pub(crate) codec: AvroCodec,
    pub(crate) handler: H,
    pub(crate) readers: Option<ReaderSchemas>,
    pub(crate) consumer: String,
    pub(crate) handler_timeout: Duration,
}

impl<H: Handler> Applier<H> {
    /// Applies `record` once: `Duplicate` when its id is already in the inbox.
    pub(crate) async fn apply(&self, record: &Record) -> Result<Outcome, Failure> {
        let envelope = IncomingMessage::from_parts(
            &record.topic,
            record.partition,
            record.offset,
            record.key.as_deref(),
            record.headers.clone(),
            record.payload.as_deref(),
        )
        .map_err(|e| Failure::permanent("envelope", e.to_string()))?;
        // Decode before the transaction: a registry lookup is a network call, and no lock may be
        // held across one.
        let decoded = self
            .codec
            .decode(&envelope.payload)
            .await
            .map_err(|e| Failure::from_error("decode", &Error::Codec(e)))?;
        let value = match &self.readers {
            None => decoded.value,
            Some(readers) if !readers.knows(&envelope.message_type) => {
                return Err(Failure::permanent(
                    "unknown_type",
                    format!(
                        "no reader schema for message type {}",
                        envelope.message_type
                    ),
                ));
            }
            Some(readers) => readers
                .resolve(&envelope.message_type, decoded.value)
                .map_err(|e| Failure::permanent("schema_resolution", e))?,
        };
        let message = ReceivedMessage { envelope, value };
        let mut conn = db::connection(&self.pool)
            .await
            .map_err(|e| Failure::from_error("database", &e))?;
        let (consumer, timeout) = (self.consumer.as_str(), self.handler_timeout);
        let result: Result<Outcome, HandlerError> = conn
            .transaction(async |tx| {
                let inserted = diesel::insert_into(ferrybox_inbox::table)
                    .values((
                        ferrybox_inbox::consumer.eq(consumer),
                        ferrybox_inbox::message_id.eq(message.envelope.id.0),
                        ferrybox_inbox::message_type.eq(&message.envelope.message_type),
                        ferrybox_inbox::topic.eq(&message.envelope.topic),
                        ferrybox_inbox::kafka_partition.eq(message.envelope.partition),
                        ferrybox_inbox::kafka_offset.eq(message.envelope.offset),
                    ))
                    .on_conflict_do_nothing()
                    .execute(tx)
                    .await?;
                if inserted == 0 {
                    return Ok(Outcome::Duplicate);
                }
                match tokio::time::timeout(timeout, self.handler.handle(tx, &message)).await {
                    Ok(result) => result.map(|()| Outcome::Applied),
                    Err(_) => Err(HandlerError::retryable(format!(
                        "handler timed out after {timeout:?}"
                    ))),
                }
            })
            .await;
        result.map_err(|e| Failure::from_handler(&e))
    }
}
