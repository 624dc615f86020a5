//! Applying one message through the inbox: decode, resolve into the reader schema, then in one
//! transaction record its id and run the handler. Shared by the consumer loop and redrive.

use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;
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
    /// Moved into [`Record::decoded`]'s envelope when the record is decoded ahead: read them
    /// with [`Record::headers`] and [`Record::payload`].
    headers: BTreeMap<String, String>,
    payload: Option<Vec<u8>>,
    /// The record decoded ahead of its batch (see [`Decoder::decode`]), if it was.
    pub(crate) decoded: Option<Arc<ReceivedMessage>>,
}

impl Record {
    pub(crate) fn new(
        topic: String,
        partition: i32,
        offset: i64,
        key: Option<Vec<u8>>,
        headers: BTreeMap<String, String>,
        payload: Option<Vec<u8>>,
    ) -> Self {
        Self {
            topic,
            partition,
            offset,
            key,
            headers,
            payload,
            decoded: None,
        }
    }

    pub(crate) fn from_kafka(m: &BorrowedMessage<'_>) -> Self {
        Self::new(
            m.topic().to_owned(),
            m.partition(),
            m.offset(),
            m.key().map(<[u8]>::to_vec),
            crate::kafka::headers_map(m),
            m.payload().map(<[u8]>::to_vec),
        )
    }

    /// The record's headers (its decoded envelope's, once decoded ahead: they were moved
    /// there, not copied).
    pub(crate) fn headers(&self) -> &BTreeMap<String, String> {
        self.decoded
            .as_ref()
            .map_or(&self.headers, |m| &m.envelope.headers)
    }

    /// The record's payload (its decoded envelope's, once decoded ahead).
    pub(crate) fn payload(&self) -> Option<&[u8]> {
        match &self.decoded {
            Some(m) => Some(&m.envelope.payload),
            None => self.payload.as_deref(),
        }
    }

    /// The key as text, if it has one.
    pub(crate) fn key_text(&self) -> Option<String> {
        self.key
            .as_deref()
            .map(|k| String::from_utf8_lossy(k).into_owned())
    }
}

/// A message numbered past the next one of its source, topic and partition: the numbers
/// `from_seq..=to_seq` never arrived. Nothing of that partition after it is applied until the
/// gap is repaired or skipped.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Gap {
    pub(crate) source: String,
    pub(crate) topic: String,
    pub(crate) partition: i32,
    pub(crate) from_seq: i64,
    pub(crate) to_seq: i64,
    /// The offset of the message after the gap, where the partition resumes.
    pub(crate) offset: i64,
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
    /// Not a failure of the message: the gap before it (its partition halts).
    pub(crate) gap: Option<Box<Gap>>,
}

impl Failure {
    fn permanent(kind: &'static str, error: impl Into<String>) -> Self {
        Self {
            kind,
            error: error.into(),
            retryable: false,
            gap: None,
        }
    }

    fn gap(gap: Gap) -> Self {
        Self {
            kind: "gap",
            error: format!(
                "numbers {}..={} of {} on {}/{} never arrived",
                gap.from_seq, gap.to_seq, gap.source, gap.topic, gap.partition
            ),
            retryable: false,
            gap: Some(Box::new(gap)),
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
            gap: None,
        }
    }

    pub(crate) fn from_error(kind: &'static str, e: &Error) -> Self {
        Self {
            kind,
            error: e.to_string(),
            retryable: e.is_retryable(),
            gap: None,
        }
    }
}

/// Decodes records ahead of their batch, where they are received (see
/// [`Applier::decoder`]): the apply takes them as they are.
pub(crate) struct Decoder {
    codec: AvroCodec,
    readers: Option<ReaderSchemas>,
}

impl Decoder {
    /// Decodes each of `records` in place. A record that does not decode is left as it is; it
    /// fails again, with its reason, when applied.
    pub(crate) async fn decode(&self, records: &mut [Record]) {
        for record in records {
            // The headers and the payload move into the envelope (and back when the record
            // does not decode).
            let headers = std::mem::take(&mut record.headers);
            let payload = record.payload.take();
            match decode_owned(&self.codec, self.readers.as_ref(), record, headers, payload).await {
                Ok(message) => record.decoded = Some(Arc::new(message)),
                Err((_, headers, payload)) => {
                    record.headers = headers;
                    record.payload = payload;
                }
            }
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
    /// How messages are deduplicated.
    pub(crate) dedup: Dedup,
}

/// How the inbox knows a message is a duplicate (`inbox.dedup`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Dedup {
    /// By the producer's numbers where a message carries them (every message a Ferrybox log
    /// relay publishes, see [`crate::outbox::SEQ_HEADER`]): one row per source, topic and
    /// partition holds the last number applied, written in the applying transaction; a
    /// message numbered past the next one is a gap, and halts its partition. Messages without
    /// numbers (other producers, the polling relay) are deduplicated by id. A feed consumer's
    /// messages are numbered by their feed position, kept in the same transaction.
    #[default]
    Sequence,
    /// By message id only: one inbox row per message, whoever produced it.
    Id,
}

/// How a message of a batch is deduplicated, once its number was looked at.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Verdict {
    /// The next number of its partition: applied.
    Next,
    /// At or below the last number applied: skipped.
    Duplicate,
    /// Carries no number (or the inbox deduplicates by id, or it is redriven from the dead
    /// letters, whose number was used when it was dead-lettered): its id decides.
    ById,
}

/// A message's source, topic, partition and number, when it carries them.
fn numbered(message: &ReceivedMessage) -> Option<(&str, i64)> {
    let headers = &message.envelope.headers;
    let source = headers.get(crate::outbox::SOURCE_HEADER)?;
    let seq = headers
        .get(crate::outbox::SEQ_HEADER)?
        .parse::<i64>()
        .ok()?;
    (seq > 0).then_some((source.as_str(), seq))
}

/// (source, topic, partition), borrowed from the batch's messages.
type SeqKey<'a> = (&'a str, &'a str, i32);

fn seq_key<'a>(message: &'a ReceivedMessage, source: &'a str) -> SeqKey<'a> {
    (
        source,
        message.envelope.topic.as_str(),
        message.envelope.partition,
    )
}

/// What a batch did: the leading records it finished, and the failure that stopped it.
#[derive(Debug, Default)]
pub(crate) struct BatchApplied {
    /// One outcome per leading record finished (committed), in order.
    pub(crate) outcomes: Vec<Outcome>,
    /// Why the record right after those was not applied; `None` when all were.
    pub(crate) failure: Option<Failure>,
    /// The record right after those is numbered past the next number: the gap before it.
    pub(crate) gap: Option<Gap>,
}

impl<H: Handler> Applier<H> {
    /// Applies `record` once: `Duplicate` when its id is already in the inbox.
    /// A record numbered past the next one fails with its [`Failure::gap`].
    pub(crate) async fn apply(&self, record: &Record) -> Result<Outcome, Failure> {
        let mut batch = self.apply_batch(std::slice::from_ref(record)).await;
        match (batch.outcomes.pop(), batch.failure, batch.gap) {
            (_, _, Some(gap)) => Err(Failure::gap(gap)),
            (Some(outcome), None, None) => Ok(outcome),
            (_, Some(failure), None) => Err(failure),
            (None, None, None) => Err(Failure::permanent("internal", "empty batch result")),
        }
    }

    /// What decodes records ahead of their batch, on the receiving task.
    pub(crate) fn decoder(&self) -> Decoder {
        Decoder {
            codec: self.codec.clone(),
            readers: self.readers.clone(),
        }
    }

    /// Decodes a record and resolves it into the reader schema (or takes what
    /// [`Decoder::decode`] made of it ahead).
    pub(crate) async fn prepare(&self, record: &Record) -> Result<Arc<ReceivedMessage>, Failure> {
        if let Some(message) = &record.decoded {
            return Ok(Arc::clone(message));
        }
        decode(&self.codec, self.readers.as_ref(), record)
            .await
            .map(Arc::new)
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
                gap: None,
            };
        }
        let mut conn = match db::connection(&self.pool).await {
            Ok(c) => c,
            Err(e) => {
                return BatchApplied {
                    outcomes: Vec::new(),
                    failure: Some(Failure::from_error("database", &e)),
                    gap: None,
                };
            }
        };
        // Optimistically first: the handler runs on the whole batch straight in the
        // transaction (no savepoint around it, two round trips fewer). When it fails, that
        // transaction is rolled back and the batch is applied again the careful way, where a
        // failing message is isolated under savepoints and the ones before it commit.
        let optimistic = conn
            .transaction::<_, Attempt, _>(async |tx| {
                self.apply_optimistic(tx, records, &messages).await
            })
            .await;
        let result = match optimistic {
            Ok(prepared) => Ok(prepared),
            Err(Attempt::Database(e)) => Err(e),
            Err(Attempt::Handler(e)) => {
                tracing::debug!(error = %e, "the batch failed as a whole; applying it message by message");
                conn.transaction::<_, diesel::result::Error, _>(async |tx| {
                    self.apply_prepared(tx, records, &messages, false).await
                })
                .await
            }
        };
        match result {
            Ok(Prepared {
                outcomes,
                failure: handler_failure,
                gap: Some(gap),
            }) => BatchApplied {
                outcomes,
                failure: handler_failure,
                gap: Some(gap),
            },
            Ok(Prepared {
                outcomes,
                failure: handler_failure,
                gap: None,
            }) => BatchApplied {
                outcomes,
                failure: handler_failure.or(failure),
                gap: None,
            },
            Err(e) => BatchApplied {
                outcomes: Vec::new(),
                failure: Some(Failure::from_handler(&HandlerError::from(e))),
                gap: None,
            },
        }
    }

    /// Applies `messages` (prepared from the leading records of `records`) in `tx`: looks
    /// their numbers up (the batch ends before a gap), records the ids of those without, runs
    /// the handler for the new ones (as a batch, then one by one to isolate a failure), and
    /// moves the numbers and the feed position. Returns the leading outcomes that may commit,
    /// the handler failure that ended them and the gap that did, if any; `tx` is the caller's
    /// transaction.
    pub(crate) async fn apply_prepared(
        &self,
        tx: &mut AsyncPgConnection,
        records: &[Record],
        messages: &[Arc<ReceivedMessage>],
        redrive: bool,
    ) -> Result<Prepared, diesel::result::Error> {
        let consumer = self.consumer.as_str();
        // Cancels the handler's statement if it runs over its limit; one per transaction.
        let cancel = tx.cancel_token();
        let Admitted {
            verdicts,
            gap,
            fresh,
        } = self.admit(tx, messages, redrive).await?;
        let messages = &messages[..verdicts.len()];
        let fresh_messages = fresh_of(messages, &fresh);
        let as_batch = fresh_messages.is_empty()
            || self
                .handle_in_savepoint(tx, &cancel, Handling::Batch(&fresh_messages))
                .await
                .is_ok();
        let outcomes = outcomes_of(&fresh);
        if as_batch {
            self.store_position(tx, &records[..outcomes.len()]).await?;
            store_numbers(tx, consumer, messages, &verdicts).await?;
            return Ok(Prepared {
                outcomes,
                failure: None,
                gap,
            });
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
                store_numbers(tx, consumer, &messages[..i], &verdicts[..i]).await?;
                return Ok(Prepared {
                    outcomes: outcomes[..i].to_vec(),
                    failure: Some(Failure::from_handler(&e)),
                    gap: None,
                });
            }
        }
        self.store_position(tx, &records[..outcomes.len()]).await?;
        store_numbers(tx, consumer, messages, &verdicts).await?;
        Ok(Prepared {
            outcomes,
            failure: None,
            gap,
        })
    }

    /// [`Applier::apply_prepared`] without its savepoints: the handler runs on the batch's new
    /// messages straight in `tx`; when it fails, `Err(Attempt::Handler)` asks the caller to
    /// roll `tx` back (it is aborted anyway when a statement failed).
    async fn apply_optimistic(
        &self,
        tx: &mut AsyncPgConnection,
        records: &[Record],
        messages: &[Arc<ReceivedMessage>],
    ) -> Result<Prepared, Attempt> {
        let cancel = tx.cancel_token();
        let Admitted {
            verdicts,
            gap,
            fresh,
        } = self.admit(tx, messages, false).await?;
        let messages = &messages[..verdicts.len()];
        let fresh_messages = fresh_of(messages, &fresh);
        if !fresh_messages.is_empty() {
            self.handle_guarded(tx, &cancel, Handling::Batch(&fresh_messages))
                .await
                .map_err(Attempt::Handler)?;
        }
        let outcomes = outcomes_of(&fresh);
        self.store_position(tx, &records[..outcomes.len()]).await?;
        store_numbers(tx, &self.consumer, messages, &verdicts).await?;
        Ok(Prepared {
            outcomes,
            failure: None,
            gap,
        })
    }

    /// Which of `messages` are new: their numbers looked up (the batch ends before a gap) and
    /// the ids of those without recorded, in `tx`.
    async fn admit(
        &self,
        tx: &mut AsyncPgConnection,
        messages: &[Arc<ReceivedMessage>],
        redrive: bool,
    ) -> Result<Admitted, diesel::result::Error> {
        let (verdicts, gap) = if redrive {
            (vec![Verdict::ById; messages.len()], None)
        } else {
            self.number(tx, messages).await?
        };
        let messages = &messages[..verdicts.len()];
        let by_id: Vec<&ReceivedMessage> = messages
            .iter()
            .zip(&verdicts)
            .filter(|(_, v)| **v == Verdict::ById)
            .map(|(m, _)| &**m)
            .collect();
        let mut new = record_ids(tx, &self.consumer, &by_id).await?;
        // Which messages are new (a second copy of an id within the batch is a duplicate).
        let fresh = messages
            .iter()
            .zip(&verdicts)
            .map(|(m, v)| match v {
                Verdict::Next => true,
                Verdict::Duplicate => false,
                Verdict::ById => new.remove(&m.envelope.id.0),
            })
            .collect();
        Ok(Admitted {
            verdicts,
            gap,
            fresh,
        })
    }

    /// How each of `messages` is deduplicated: by its number (locking its partition's row, so
    /// two instances never apply one number twice), or by id. Stops at the first message
    /// numbered past the next one, and returns its gap: the verdicts cover the messages before
    /// it.
    async fn number(
        &self,
        tx: &mut AsyncPgConnection,
        messages: &[Arc<ReceivedMessage>],
    ) -> Result<(Vec<Verdict>, Option<Gap>), diesel::result::Error> {
        // A feed consumer's records are numbered by the feed: its position, kept in this
        // transaction, is the last applied number (the feed's own contiguity check finds gaps).
        if let (Some(feed), Dedup::Sequence) = (&self.checkpoint, self.dedup) {
            let position = lock_position(tx, &self.consumer, feed).await?;
            let verdicts = messages
                .iter()
                .map(|m| {
                    if m.envelope.offset <= position {
                        Verdict::Duplicate
                    } else {
                        Verdict::Next
                    }
                })
                .collect();
            return Ok((verdicts, None));
        }
        let numbers: Vec<Option<(&str, i64)>> = messages
            .iter()
            .map(|m| match self.dedup {
                Dedup::Sequence => numbered(m),
                Dedup::Id => None,
            })
            .collect();
        let mut keys: Vec<SeqKey<'_>> = messages
            .iter()
            .zip(&numbers)
            .filter_map(|(m, n)| n.map(|(source, _)| seq_key(m, source)))
            .collect();
        keys.sort_unstable();
        keys.dedup();
        let mut last = lock_numbers(tx, &self.consumer, &keys).await?;
        let mut verdicts = Vec::with_capacity(messages.len());
        for (message, number) in messages.iter().zip(numbers) {
            let Some((source, seq)) = number else {
                verdicts.push(Verdict::ById);
                continue;
            };
            let key = seq_key(message, source);
            let applied = last.get(&key).copied().unwrap_or(0);
            if seq <= applied {
                verdicts.push(Verdict::Duplicate);
            } else if seq == applied + 1 {
                last.insert(key, seq);
                verdicts.push(Verdict::Next);
            } else {
                let gap = Gap {
                    source: key.0.to_owned(),
                    topic: key.1.to_owned(),
                    partition: key.2,
                    from_seq: applied + 1,
                    to_seq: seq - 1,
                    offset: message.envelope.offset,
                };
                return Ok((verdicts, Some(gap)));
            }
        }
        Ok((verdicts, None))
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

    /// [`Applier::handle_guarded`] under a savepoint of `tx`: a failure rolls back only the
    /// handler's own writes.
    async fn handle_in_savepoint(
        &self,
        tx: &mut AsyncPgConnection,
        cancel: &tokio_postgres::CancelToken,
        handling: Handling<'_>,
    ) -> Result<(), HandlerError> {
        tx.transaction::<_, HandlerError, _>(async |savepoint| {
            self.handle_guarded(savepoint, cancel, handling).await
        })
        .await
    }

    /// Runs the handler on `handling` in `conn` as it is (the caller gives it a savepoint, or
    /// rolls the whole transaction back when it fails), within the handler time limit, and
    /// records how long it took. A panic is caught and becomes [`HandlerError::Panicked`]; a
    /// handler over its limit has its statement cancelled on the server (see
    /// [`within_limit`]) and the attempt counts as a retryable failure.
    async fn handle_guarded(
        &self,
        conn: &mut AsyncPgConnection,
        cancel: &tokio_postgres::CancelToken,
        handling: Handling<'_>,
    ) -> Result<(), HandlerError> {
        use futures::FutureExt as _;
        let limit = self.handler_timeout;
        let started = std::time::Instant::now();
        let (what, work) = match handling {
            // Calls inside the futures, so a handler that panics before it returns its future
            // is caught too.
            Handling::Batch(messages) => (
                "batch handler",
                async move { self.handler.handle_batch(conn, messages).await }.boxed(),
            ),
            Handling::One(message) => (
                "handler",
                tracing::Instrument::instrument(
                    async move { self.handler.handle(conn, message).await },
                    message.span(),
                )
                .boxed(),
            ),
        };
        let work = std::panic::AssertUnwindSafe(work).catch_unwind();
        let result = match within_limit(work, limit, cancel).await {
            Ok(Ok(handled)) => handled,
            Ok(Err(panic)) => Err(HandlerError::Panicked(crate::health::panic_text(
                panic.as_ref(),
            ))),
            Err(stopped) => Err(HandlerError::retryable(format!(
                "{what} exceeded its time limit of {limit:?}; {stopped}"
            ))),
        };
        self.record_duration(started, result.is_ok());
        result
    }
}

/// Decodes `record` with `codec` and resolves it into `readers`' schema, when given.
async fn decode(
    codec: &AvroCodec,
    readers: Option<&ReaderSchemas>,
    record: &Record,
) -> Result<ReceivedMessage, Failure> {
    decode_owned(
        codec,
        readers,
        record,
        record.headers.clone(),
        record.payload.clone(),
    )
    .await
    .map_err(|(failure, _, _)| failure)
}

/// A record that did not decode: why, and its headers and payload, handed back.
type Undecoded = (Failure, BTreeMap<String, String>, Option<Vec<u8>>);

/// [`decode`] with `record`'s headers and payload given as they are, moved into the envelope.
async fn decode_owned(
    codec: &AvroCodec,
    readers: Option<&ReaderSchemas>,
    record: &Record,
    headers: BTreeMap<String, String>,
    payload: Option<Vec<u8>>,
) -> Result<ReceivedMessage, Undecoded> {
    let envelope = IncomingMessage::from_owned_parts(
        &record.topic,
        record.partition,
        record.offset,
        record.key.as_deref(),
        headers,
        payload,
    )
    .map_err(|refused| {
        (
            Failure::permanent("envelope", refused.0.to_string()),
            refused.1,
            refused.2,
        )
    })?;
    let give_back = |failure: Failure, envelope: IncomingMessage| {
        (failure, envelope.headers, Some(envelope.payload))
    };
    let decoded = match codec.decode(&envelope.payload).await {
        Ok(decoded) => decoded,
        Err(e) => {
            return Err(give_back(
                Failure::from_error("decode", &Error::Codec(e)),
                envelope,
            ));
        }
    };
    let value = match readers {
        None => decoded.value,
        Some(readers) if !readers.knows(&envelope.message_type) => {
            let failure = Failure::permanent(
                "unknown_type",
                format!(
                    "no reader schema for message type {}",
                    envelope.message_type
                ),
            );
            return Err(give_back(failure, envelope));
        }
        Some(readers) => match readers.resolve(&envelope.message_type, decoded.value) {
            Ok(value) => value,
            Err(e) => {
                return Err(give_back(
                    Failure::permanent("schema_resolution", e),
                    envelope,
                ));
            }
        },
    };
    Ok(ReceivedMessage { envelope, value })
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

/// Where a record stands among its partition's numbers, for one finished without being
/// applied (dead-lettered or parked): see [`claim_number`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Claim {
    /// It carries no number (or the inbox deduplicates by id).
    Unnumbered,
    /// It was the next number, and now counts as used in the caller's transaction.
    Next,
    /// At or below the last number used: finished already (by another instance).
    Duplicate,
    /// Numbered past the next one.
    Gap(Gap),
}

/// Uses `record`'s number, in `tx`, for a record finished without being applied (a dead
/// letter, a parked message), so the messages after it are not taken for a gap.
pub(crate) async fn claim_number(
    tx: &mut AsyncPgConnection,
    consumer: &str,
    dedup: Dedup,
    record: &Record,
) -> Result<Claim, diesel::result::Error> {
    let number = record
        .headers()
        .get(crate::outbox::SOURCE_HEADER)
        .zip(record.headers().get(crate::outbox::SEQ_HEADER))
        .and_then(|(source, seq)| Some((source, seq.parse::<i64>().ok()?)))
        .filter(|(_, seq)| *seq > 0 && dedup == Dedup::Sequence);
    let Some((source, seq)) = number else {
        return Ok(Claim::Unnumbered);
    };
    let key = (source.as_str(), record.topic.as_str(), record.partition);
    let last = lock_numbers(tx, consumer, std::slice::from_ref(&key))
        .await?
        .get(&key)
        .copied()
        .unwrap_or(0);
    if seq <= last {
        return Ok(Claim::Duplicate);
    }
    if seq > last + 1 {
        return Ok(Claim::Gap(Gap {
            source: key.0.to_owned(),
            topic: key.1.to_owned(),
            partition: key.2,
            from_seq: last + 1,
            to_seq: seq - 1,
            offset: record.offset,
        }));
    }
    diesel::sql_query(
        "UPDATE ferrybox_inbox_sequences SET last_seq = $5, updated_at = now() \
         WHERE consumer = $1 AND source = $2 AND topic = $3 AND kafka_partition = $4",
    )
    .bind::<diesel::sql_types::Text, _>(consumer)
    .bind::<diesel::sql_types::Text, _>(&key.0)
    .bind::<diesel::sql_types::Text, _>(&key.1)
    .bind::<diesel::sql_types::Integer, _>(key.2)
    .bind::<diesel::sql_types::BigInt, _>(seq)
    .execute(tx)
    .await?;
    Ok(Claim::Next)
}

/// What [`Applier::apply_prepared`] did: the leading outcomes that may commit, the handler
/// failure that ended them, or the gap that did.
#[derive(Debug)]
pub(crate) struct Prepared {
    pub(crate) outcomes: Vec<Outcome>,
    pub(crate) failure: Option<Failure>,
    pub(crate) gap: Option<Gap>,
}

/// The statement that locks a batch's partitions' rows of numbers (making those not seen yet,
/// at 0) and returns their last applied numbers: binds consumer, then arrays of sources,
/// topics and partitions. The no-op update locks a row that exists. Public for benchmarks
/// that measure what it costs.
#[cfg_attr(not(feature = "test-util"), allow(unreachable_pub))]
pub const LOCK_NUMBERS_SQL: &str = "INSERT INTO ferrybox_inbox_sequences \
       (consumer, source, topic, kafka_partition, last_seq) \
     SELECT $1, s, t, p, 0 FROM unnest($2::text[], $3::text[], $4::int[]) AS u(s, t, p) \
     ON CONFLICT (consumer, source, topic, kafka_partition) \
     DO UPDATE SET last_seq = ferrybox_inbox_sequences.last_seq \
     RETURNING source, topic, kafka_partition, last_seq";

/// The statement that moves each partition's last applied number: binds consumer, then arrays
/// of sources, topics, partitions and numbers. Public for benchmarks.
#[cfg_attr(not(feature = "test-util"), allow(unreachable_pub))]
pub const STORE_NUMBERS_SQL: &str = "UPDATE ferrybox_inbox_sequences AS s \
     SET last_seq = u.q, updated_at = now() \
     FROM unnest($2::text[], $3::text[], $4::int[], $5::bigint[]) AS u(s, t, p, q) \
     WHERE s.consumer = $1 AND s.source = u.s AND s.topic = u.t AND s.kafka_partition = u.p";

#[derive(QueryableByName)]
struct Position {
    #[diesel(sql_type = diesel::sql_types::BigInt)]
    position: i64,
}

/// A feed consumer's stored position (0 before its first message), its row locked until `tx`
/// ends.
async fn lock_position(
    tx: &mut AsyncPgConnection,
    consumer: &str,
    feed: &str,
) -> Result<i64, diesel::result::Error> {
    use diesel::sql_types::Text;
    let row: Position = crate::db::prepared(
        diesel::sql_query(
            "INSERT INTO ferrybox_feed_positions (consumer, feed, position) VALUES ($1, $2, 0) \
             ON CONFLICT (consumer, feed) DO UPDATE \
             SET position = ferrybox_feed_positions.position RETURNING position",
        )
        .bind::<Text, _>(consumer)
        .bind::<Text, _>(feed),
    )
    .get_result(tx)
    .await?;
    Ok(row.position)
}

#[derive(QueryableByName)]
struct LastNumber {
    #[diesel(sql_type = diesel::sql_types::Text)]
    source: String,
    #[diesel(sql_type = diesel::sql_types::Text)]
    topic: String,
    #[diesel(sql_type = diesel::sql_types::Integer)]
    kafka_partition: i32,
    #[diesel(sql_type = diesel::sql_types::BigInt)]
    last_seq: i64,
}

/// The last number applied for each of `keys` (0 for a source not seen yet), with their rows
/// locked until `tx` ends; one statement. `keys` are distinct.
async fn lock_numbers<'a>(
    tx: &mut AsyncPgConnection,
    consumer: &str,
    keys: &[SeqKey<'a>],
) -> Result<std::collections::HashMap<SeqKey<'a>, i64>, diesel::result::Error> {
    use diesel::sql_types::{Array, Integer, Text};
    if keys.is_empty() {
        return Ok(std::collections::HashMap::new());
    }
    // The no-op update locks a row that exists and returns its number; a new one is made at 0.
    let rows: Vec<LastNumber> = crate::db::prepared(
        diesel::sql_query(LOCK_NUMBERS_SQL)
            .bind::<Text, _>(consumer)
            .bind::<Array<Text>, _>(keys.iter().map(|k| k.0).collect::<Vec<_>>())
            .bind::<Array<Text>, _>(keys.iter().map(|k| k.1).collect::<Vec<_>>())
            .bind::<Array<Integer>, _>(keys.iter().map(|k| k.2).collect::<Vec<_>>()),
    )
    .load(tx)
    .await?;
    // A handful of keys (a batch's partitions): matched to their rows by looking.
    Ok(keys
        .iter()
        .map(|&key| {
            let row = rows
                .iter()
                .find(|r| (r.source.as_str(), r.topic.as_str(), r.kafka_partition) == key);
            (key, row.map_or(0, |r| r.last_seq))
        })
        .collect())
}

/// Moves each partition's last applied number to the highest of `messages` judged
/// [`Verdict::Next`]; one statement, none when there is nothing numbered.
async fn store_numbers(
    tx: &mut AsyncPgConnection,
    consumer: &str,
    messages: &[Arc<ReceivedMessage>],
    verdicts: &[Verdict],
) -> Result<(), diesel::result::Error> {
    use diesel::sql_types::{Array, BigInt, Integer, Text};
    let mut last: std::collections::BTreeMap<(&str, &str, i32), i64> =
        std::collections::BTreeMap::new();
    for (message, verdict) in messages.iter().zip(verdicts) {
        if *verdict == Verdict::Next
            && let Some((source, seq)) = numbered(message)
        {
            last.insert(
                (source, &message.envelope.topic, message.envelope.partition),
                seq,
            );
        }
    }
    if last.is_empty() {
        return Ok(());
    }
    crate::db::prepared(
        diesel::sql_query(STORE_NUMBERS_SQL)
            .bind::<Text, _>(consumer)
            .bind::<Array<Text>, _>(last.keys().map(|k| k.0).collect::<Vec<_>>())
            .bind::<Array<Text>, _>(last.keys().map(|k| k.1).collect::<Vec<_>>())
            .bind::<Array<Integer>, _>(last.keys().map(|k| k.2).collect::<Vec<_>>())
            .bind::<Array<BigInt>, _>(last.values().copied().collect::<Vec<_>>()),
    )
    .execute(tx)
    .await?;
    Ok(())
}

/// Why an optimistic attempt at a batch ([`Applier::apply_optimistic`]) was rolled back.
enum Attempt {
    /// The database failed.
    Database(diesel::result::Error),
    /// The handler failed on the batch: apply it again message by message.
    Handler(HandlerError),
}

impl From<diesel::result::Error> for Attempt {
    fn from(e: diesel::result::Error) -> Self {
        Self::Database(e)
    }
}

/// Which of a batch's messages are new, from [`Applier::admit`].
struct Admitted {
    /// How each leading message is deduplicated (up to a gap).
    verdicts: Vec<Verdict>,
    /// The gap that ended the batch, if one did.
    gap: Option<Gap>,
    /// Whether each of those messages is new.
    fresh: Vec<bool>,
}

/// The new ones of `messages`.
fn fresh_of<'a>(messages: &'a [Arc<ReceivedMessage>], fresh: &[bool]) -> Vec<&'a ReceivedMessage> {
    messages
        .iter()
        .zip(fresh)
        .filter(|(_, f)| **f)
        .map(|(m, _)| &**m)
        .collect()
}

/// Each message's outcome when the batch commits: applied when new, else a duplicate.
fn outcomes_of(fresh: &[bool]) -> Vec<Outcome> {
    fresh
        .iter()
        .map(|f| {
            if *f {
                Outcome::Applied
            } else {
                Outcome::Duplicate
            }
        })
        .collect()
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
/// binds consumer, then arrays of message ids, types, topics, partitions and offsets, then the
/// newest id generation as the caller last saw it; returns the ids that were not recorded yet.
/// Public for benchmarks that measure what it costs.
///
/// The ids go into the newest generation (see [`super::retention::expire`]); an id in an older
/// one is skipped, and the newest one's key catches the rest, concurrent inserts included.
/// The generation is a bind, so the plan leaves the newest partition out of the look into the
/// older ones (whatever the statistics of a partition that was empty when the statement was
/// planned); it is checked against the table in the same statement, which reads it after
/// taking its lock on `ferrybox_inbox` (a statement's relations are locked before its
/// snapshot is taken), a lock that opening a new generation holds: when it is not the newest
/// any more, nothing is recorded and one row with a NULL id gives the newest, to try again
/// with. The transaction runs at READ COMMITTED, as the inbox's do.
#[cfg_attr(not(feature = "test-util"), allow(unreachable_pub))]
pub const RECORD_IDS_SQL: &str = "WITH g AS (SELECT max(generation) AS newest FROM ferrybox_inbox_generations), \
     recorded AS ( \
       INSERT INTO ferrybox_inbox \
         (consumer, message_id, message_type, topic, kafka_partition, kafka_offset, generation) \
       SELECT $1, u.*, $7 \
       FROM unnest($2::uuid[], $3::text[], $4::text[], $5::int[], $6::bigint[]) \
            AS u(message_id, message_type, topic, kafka_partition, kafka_offset), g \
       WHERE g.newest = $7 \
         AND NOT EXISTS (SELECT 1 FROM ferrybox_inbox AS i \
                         WHERE i.consumer = $1 AND i.message_id = u.message_id \
                           AND i.generation < $7) \
       ON CONFLICT DO NOTHING RETURNING message_id) \
     SELECT message_id, $7 AS generation FROM recorded \
     UNION ALL SELECT NULL, newest FROM g WHERE newest IS DISTINCT FROM $7";

#[derive(QueryableByName)]
struct NewId {
    #[diesel(sql_type = diesel::sql_types::Nullable<diesel::sql_types::Uuid>)]
    message_id: Option<uuid::Uuid>,
    #[diesel(sql_type = diesel::sql_types::Nullable<diesel::sql_types::Integer>)]
    generation: Option<i32>,
}

/// The newest id generation as this process last saw it: a hint [`RECORD_IDS_SQL`] checks
/// (a stale one costs a second try of the statement, never a wrong answer).
static NEWEST_GENERATION: std::sync::atomic::AtomicI32 = std::sync::atomic::AtomicI32::new(0);

/// Records the batch's ids in the inbox in one statement; returns the ids that were not there
/// yet. One fixed statement whatever the batch size (arrays, not a VALUES list per row), so it
/// is prepared once per connection.
async fn record_ids(
    tx: &mut AsyncPgConnection,
    consumer: &str,
    messages: &[&ReceivedMessage],
) -> Result<HashSet<uuid::Uuid>, diesel::result::Error> {
    use diesel::sql_types::{Array, BigInt, Integer, Text, Uuid};
    if messages.is_empty() {
        return Ok(HashSet::new());
    }
    let envelopes = messages.iter().map(|m| &m.envelope);
    let ids = envelopes.clone().map(|e| e.id.0).collect::<Vec<_>>();
    let types = envelopes
        .clone()
        .map(|e| e.message_type.as_str())
        .collect::<Vec<_>>();
    let topics = envelopes
        .clone()
        .map(|e| e.topic.as_str())
        .collect::<Vec<_>>();
    let partitions = envelopes.clone().map(|e| e.partition).collect::<Vec<_>>();
    let offsets = envelopes.map(|e| e.offset).collect::<Vec<_>>();
    use std::sync::atomic::Ordering::Relaxed;
    let mut generation = std::sync::atomic::AtomicI32::load(&NEWEST_GENERATION, Relaxed);
    loop {
        let rows: Vec<NewId> = crate::db::prepared(
            diesel::sql_query(RECORD_IDS_SQL)
                .bind::<Text, _>(consumer)
                .bind::<Array<Uuid>, _>(&ids)
                .bind::<Array<Text>, _>(&types)
                .bind::<Array<Text>, _>(&topics)
                .bind::<Array<Integer>, _>(&partitions)
                .bind::<Array<BigInt>, _>(&offsets)
                .bind::<Integer, _>(generation),
        )
        .load(tx)
        .await?;
        match rows.iter().find(|r| r.message_id.is_none()) {
            // Not the newest (a new one opened, or another database): again, with the newest.
            Some(stale) => {
                let newest = stale.generation.unwrap_or(0);
                if newest == generation {
                    return Err(diesel::result::Error::QueryBuilderError(
                        "the inbox has no id generation: run the framework's migrations".into(),
                    ));
                }
                generation = newest;
                NEWEST_GENERATION.store(newest, Relaxed);
            }
            None => return Ok(rows.into_iter().filter_map(|r| r.message_id).collect()),
        }
    }
}
