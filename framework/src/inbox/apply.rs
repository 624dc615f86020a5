//! Applying one message through the inbox: decode, resolve into the reader schema, then in one
//! transaction record its id and run the handler. Shared by the consumer loop and redrive.

use std::collections::{BTreeMap, HashSet};
use std::time::Duration;

use diesel::prelude::*;
use diesel_async::{AsyncConnection, AsyncPgConnection, RunQueryDsl};
use rdkafka::message::{BorrowedMessage, Message};

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
        let headers = crate::kafka::headers_map(m);
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
            kind: match e {
                HandlerError::Panicked(_) => "panic",
                e if e.is_retryable() => "handler_retryable",
                _ => "handler",
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
    /// For a feed consumer: the feed whose position (the records' `offset`) is stored in the
    /// same transaction as the messages it applied.
    pub(crate) checkpoint: Option<String>,
}

/// What a batch did: the leading records it finished, and the failure that stopped it.
#[derive(Debug, Default)]
pub(crate) struct BatchApplied {
    /// One outcome per leading record finished (committed), in order.
    pub(crate) outcomes: Vec<Outcome>,
    /// Why the record right after those was not applied; `None` when all were.
    pub(crate) failure: Option<Failure>,
}

impl<H: Handler> Applier<H> {
    /// Applies `record` once: `Duplicate` when its id is already in the inbox.
    pub(crate) async fn apply(&self, record: &Record) -> Result<Outcome, Failure> {
        let mut batch = self.apply_batch(std::slice::from_ref(record)).await;
        match (batch.outcomes.pop(), batch.failure) {
            (Some(outcome), None) => Ok(outcome),
            (_, Some(failure)) => Err(failure),
            (None, None) => Err(Failure::permanent("internal", "empty batch result")),
        }
    }

    /// Decodes a record and resolves it into the reader schema.
    pub(crate) async fn prepare(&self, record: &Record) -> Result<ReceivedMessage, Failure> {
        let envelope = IncomingMessage::from_parts(
            &record.topic,
            record.partition,
            record.offset,
            record.key.as_deref(),
            record.headers.clone(),
            record.payload.as_deref(),
        )
        .map_err(|e| Failure::permanent("envelope", e.to_string()))?;
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
        Ok(ReceivedMessage { envelope, value })
    }

    /// Applies the leading records of `records` in one transaction: one statement records every
    /// id in the inbox, the handler runs (each under a savepoint) only for ids that are new, and
    /// the first failure ends the batch: the records before it commit, it and the ones after do
    /// not. Decoding happens before the transaction: a registry lookup is a network call, and
    /// no lock may be held across one.
    pub(crate) async fn apply_batch(&self, records: &[Record]) -> BatchApplied {
        let mut messages = Vec::with_capacity(records.len());
        let mut failure = None;
        for record in records {
            match self.prepare(record).await {
                Ok(m) => messages.push(m),
                Err(f) => {
                    failure = Some(f);
                    break;
                }
            }
        }
        if messages.is_empty() {
            return BatchApplied {
                outcomes: Vec::new(),
                failure,
            };
        }
        let mut conn = match db::connection(&self.pool).await {
            Ok(c) => c,
            Err(e) => {
                return BatchApplied {
                    outcomes: Vec::new(),
                    failure: Some(Failure::from_error("database", &e)),
                };
            }
        };
        let result = conn
            .transaction::<_, diesel::result::Error, _>(async |tx| {
                self.apply_prepared(tx, records, &messages).await
            })
            .await;
        match result {
            Ok((outcomes, handler_failure)) => BatchApplied {
                outcomes,
                failure: handler_failure.or(failure),
            },
            Err(e) => BatchApplied {
                outcomes: Vec::new(),
                failure: Some(Failure::from_handler(&HandlerError::from(e))),
            },
        }
    }

    /// Applies `messages` (prepared from the leading records of `records`) in `tx`: records
    /// their ids, runs the handler for the new ones (as a batch, then one by one to isolate a
    /// failure) and moves the feed position. Returns the leading outcomes that may commit and
    /// the handler failure that ended them, if any; `tx` is the caller's transaction.
    pub(crate) async fn apply_prepared(
        &self,
        tx: &mut AsyncPgConnection,
        records: &[Record],
        messages: &[ReceivedMessage],
    ) -> Result<(Vec<Outcome>, Option<Failure>), diesel::result::Error> {
        let consumer = self.consumer.as_str();
        // Cancels the handler's statement if it runs over its limit; one per transaction.
        let cancel = tx.cancel_token();
        let mut new = record_ids(tx, consumer, messages).await?;
        // Which messages are new (a second copy of an id within the batch is a duplicate).
        let fresh: Vec<bool> = messages
            .iter()
            .map(|m| new.remove(&m.envelope.id.0))
            .collect();
        let fresh_messages: Vec<&ReceivedMessage> = messages
            .iter()
            .zip(&fresh)
            .filter(|(_, f)| **f)
            .map(|(m, _)| m)
            .collect();
        let as_batch = fresh_messages.is_empty()
            || self
                .handle_in_savepoint(tx, &cancel, Handling::Batch(&fresh_messages))
                .await
                .is_ok();
        let outcomes: Vec<Outcome> = fresh
            .iter()
            .map(|f| {
                if *f {
                    Outcome::Applied
                } else {
                    Outcome::Duplicate
                }
            })
            .collect();
        if as_batch {
            self.store_position(tx, &records[..outcomes.len()]).await?;
            return Ok((outcomes, None));
        }
        // The batch failed: apply one by one to find the failing message.
        for (i, message) in messages.iter().enumerate() {
            if !fresh[i] {
                continue;
            }
            if let Err(e) = self
                .handle_in_savepoint(tx, &cancel, Handling::One(message))
                .await
            {
                // This message and the new ones after it stay unapplied: forget their ids.
                let unapplied: Vec<uuid::Uuid> = messages[i..]
                    .iter()
                    .zip(&fresh[i..])
                    .filter(|(_, f)| **f)
                    .map(|(m, _)| m.envelope.id.0)
                    .collect();
                diesel::delete(
                    ferrybox_inbox::table
                        .filter(ferrybox_inbox::consumer.eq(consumer))
                        .filter(ferrybox_inbox::message_id.eq_any(unapplied)),
                )
                .execute(tx)
                .await?;
                self.store_position(tx, &records[..i]).await?;
                return Ok((outcomes[..i].to_vec(), Some(Failure::from_handler(&e))));
            }
        }
        self.store_position(tx, &records[..outcomes.len()]).await?;
        Ok((outcomes, None))
    }

    /// Records how long a handler call took, when metrics are on.
    fn record_duration(&self, started: std::time::Instant, ok: bool) {
        if let Some(m) = crate::metrics::instruments() {
            let mut attrs = vec![
                opentelemetry::KeyValue::new("messaging.operation.name", "process"),
                opentelemetry::KeyValue::new(
                    "messaging.consumer.group.name",
                    self.consumer.clone(),
                ),
            ];
            if !ok {
                attrs.push(opentelemetry::KeyValue::new("error.type", "handler"));
            }
            m.process_duration
                .record(started.elapsed().as_secs_f64(), &attrs);
        }
    }

    /// Moves the feed position (when this applier keeps one) to the last of `finished`.
    async fn store_position(
        &self,
        tx: &mut AsyncPgConnection,
        finished: &[Record],
    ) -> Result<(), diesel::result::Error> {
        match (&self.checkpoint, finished.last()) {
            (Some(feed), Some(last)) => {
                crate::feed::store_position(tx, &self.consumer, feed, last.offset).await
            }
            _ => Ok(()),
        }
    }

    /// Runs the handler on `handling` under a savepoint of `tx`, within the handler time limit,
    /// and records how long it took. A panic is caught and becomes
    /// [`HandlerError::Panicked`]; a handler over its limit has its statement cancelled on the
    /// server (see [`within_limit`]) and the attempt counts as a retryable failure.
    async fn handle_in_savepoint(
        &self,
        tx: &mut AsyncPgConnection,
        cancel: &tokio_postgres::CancelToken,
        handling: Handling<'_>,
    ) -> Result<(), HandlerError> {
        use futures::FutureExt as _;
        let limit = self.handler_timeout;
        let started = std::time::Instant::now();
        let result = tx
            .transaction::<_, HandlerError, _>(async |savepoint| {
                let (what, work) = match handling {
                    // Calls inside the futures, so a handler that panics before it returns
                    // its future is caught too.
                    Handling::Batch(messages) => (
                        "batch handler",
                        async move { self.handler.handle_batch(savepoint, messages).await }.boxed(),
                    ),
                    Handling::One(message) => (
                        "handler",
                        tracing::Instrument::instrument(
                            async move { self.handler.handle(savepoint, message).await },
                            message.span(),
                        )
                        .boxed(),
                    ),
                };
                let work = std::panic::AssertUnwindSafe(work).catch_unwind();
                match within_limit(work, limit, cancel).await {
                    Ok(Ok(handled)) => handled,
                    Ok(Err(panic)) => Err(HandlerError::Panicked(crate::health::panic_text(
                        panic.as_ref(),
                    ))),
                    Err(stopped) => Err(HandlerError::retryable(format!(
                        "{what} exceeded its time limit of {limit:?}; {stopped}"
                    ))),
                }
            })
            .await;
        self.record_duration(started, result.is_ok());
        result
    }
}

/// How long a handler over its limit gets, after its statement was cancelled, to notice and
/// return.
const CANCEL_GRACE: Duration = Duration::from_secs(5);

/// Runs `work` for at most `limit`. Past it, the statement the handler is running is cancelled
/// on the server (dropping the future alone would leave it running there, with the savepoint's
/// rollback queued behind it), and the handler gets [`CANCEL_GRACE`] to return its error;
/// `Err` says what was done.
async fn within_limit<F: std::future::Future>(
    work: F,
    limit: Duration,
    cancel: &tokio_postgres::CancelToken,
) -> Result<F::Output, &'static str> {
    let mut work = std::pin::pin!(work);
    if let Ok(done) = tokio::time::timeout(limit, &mut work).await {
        return Ok(done);
    }
    cancel_statement(cancel).await;
    if tokio::time::timeout(CANCEL_GRACE, &mut work).await.is_ok() {
        return Err("its statement was cancelled on the server");
    }
    // Still going (it was between statements at the first cancel, and started another):
    // cancel what runs now, so the savepoint's rollback does not queue behind it.
    cancel_statement(cancel).await;
    Err("it did not return after its statement was cancelled and was dropped")
}

async fn cancel_statement(cancel: &tokio_postgres::CancelToken) {
    if let Err(e) = cancel.cancel_query(tokio_postgres::NoTls).await {
        tracing::warn!(error = %e, "could not cancel the handler's statement");
    }
}

/// What [`Applier::handle_in_savepoint`] hands the handler.
#[derive(Clone, Copy)]
enum Handling<'a> {
    /// The new messages of a batch, to `handle_batch`.
    Batch(&'a [&'a ReceivedMessage]),
    /// One message, to `handle`, inside its span.
    One(&'a ReceivedMessage),
}

/// The statement the inbox records a batch's message ids with, in the applying transaction:
/// binds consumer, then arrays of message ids, types, topics, partitions and offsets; returns
/// the ids that were not recorded yet. Public for benchmarks that measure what it costs.
pub const RECORD_IDS_SQL: &str = "INSERT INTO ferrybox_inbox \
       (consumer, message_id, message_type, topic, kafka_partition, kafka_offset) \
     SELECT $1, * FROM unnest($2::uuid[], $3::text[], $4::text[], $5::int[], $6::bigint[]) \
     ON CONFLICT DO NOTHING RETURNING message_id";

#[derive(QueryableByName)]
struct NewId {
    #[diesel(sql_type = diesel::sql_types::Uuid)]
    message_id: uuid::Uuid,
}

/// Records the batch's ids in the inbox in one statement; returns the ids that were not there
/// yet. One fixed statement whatever the batch size (arrays, not a VALUES list per row), so it
/// is prepared once per connection.
async fn record_ids(
    tx: &mut AsyncPgConnection,
    consumer: &str,
    messages: &[ReceivedMessage],
) -> Result<HashSet<uuid::Uuid>, diesel::result::Error> {
    use diesel::sql_types::{Array, BigInt, Integer, Text, Uuid};
    let envelopes = messages.iter().map(|m| &m.envelope);
    let new: Vec<NewId> = crate::db::prepared(
        diesel::sql_query(RECORD_IDS_SQL)
            .bind::<Text, _>(consumer)
            .bind::<Array<Uuid>, _>(envelopes.clone().map(|e| e.id.0).collect::<Vec<_>>())
            .bind::<Array<Text>, _>(
                envelopes
                    .clone()
                    .map(|e| e.message_type.as_str())
                    .collect::<Vec<_>>(),
            )
            .bind::<Array<Text>, _>(
                envelopes
                    .clone()
                    .map(|e| e.topic.as_str())
                    .collect::<Vec<_>>(),
            )
            .bind::<Array<Integer>, _>(envelopes.clone().map(|e| e.partition).collect::<Vec<_>>())
            .bind::<Array<BigInt>, _>(envelopes.map(|e| e.offset).collect::<Vec<_>>()),
    )
    .load(tx)
    .await?;
    Ok(new.into_iter().map(|n| n.message_id).collect())
}
