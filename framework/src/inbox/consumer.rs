//! The inbox consumer loop: deduplicate by message id, apply in the same transaction, and
//! store the Kafka offset only after that transaction committed.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use diesel::prelude::*;
use diesel_async::{AsyncConnection, RunQueryDsl};
use rdkafka::consumer::{CommitMode, Consumer, StreamConsumer};
use rdkafka::message::{BorrowedMessage, Headers, Message};
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;

use super::handler::{Handler, HandlerError, ReceivedMessage};
use super::schema::{ferrybox_dead_letters, ferrybox_inbox};
use crate::codec::AvroCodec;
use crate::config::{Backoff, KafkaConfig, duration_ms};
use crate::contract::ReaderSchemas;
use crate::db::{self, PgPool};
use crate::error::{Error, Result};
use crate::message::IncomingMessage;
use crate::outbox::sleep_or_shutdown;

/// How the inbox consumer reads and retries.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct InboxConfig {
    /// The Kafka consumer group.
    pub group_id: String,
    /// Topics to read.
    pub topics: Vec<String>,
    /// The name this consumer's rows carry in the inbox table; defaults to the group id.
    pub consumer_name: Option<String>,
    /// Attempts for a retryable failure before the message is dead-lettered.
    pub max_attempts: u32,
    /// Delay between attempts.
    pub backoff: Backoff,
    /// The longest a handler may run before its attempt counts as a retryable failure; keeps a
    /// slow handler from pushing the consumer out of its group.
    #[serde(with = "duration_ms", rename = "handler_timeout_ms")]
    pub handler_timeout: Duration,
}

impl Default for InboxConfig {
    fn default() -> Self {
        Self {
            group_id: String::new(),
            topics: Vec::new(),
            consumer_name: None,
            max_attempts: 10,
            backoff: Backoff::default(),
            handler_timeout: Duration::from_secs(30),
        }
    }
}

impl InboxConfig {
    /// Checks the settings make sense.
    pub fn validate(&self) -> Result<()> {
        if self.group_id.is_empty() {
            return Err(Error::Config("inbox.group_id is empty".into()));
        }
        if self.topics.is_empty() {
            return Err(Error::Config("inbox.topics is empty".into()));
        }
        if self.max_attempts == 0 {
            return Err(Error::Config(
                "inbox.max_attempts must be at least 1".into(),
            ));
        }
        Ok(())
    }

    fn consumer_name(&self) -> &str {
        self.consumer_name.as_deref().unwrap_or(&self.group_id)
    }
}

/// Counters of what the consumer did since it started.
#[derive(Debug, Default)]
pub struct InboxStats {
    applied: AtomicU64,
    duplicates: AtomicU64,
    retries: AtomicU64,
    dead_lettered: AtomicU64,
}

/// A point-in-time copy of [`InboxStats`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct InboxStatsSnapshot {
    /// Messages whose handler ran and committed.
    pub applied: u64,
    /// Messages skipped because their id was already in the inbox.
    pub duplicates: u64,
    /// Failed attempts that were retried.
    pub retries: u64,
    /// Messages recorded as dead letters.
    pub dead_lettered: u64,
}

impl InboxStats {
    /// The current counts.
    pub fn snapshot(&self) -> InboxStatsSnapshot {
        InboxStatsSnapshot {
            applied: AtomicU64::load(&self.applied, Ordering::Relaxed),
            duplicates: AtomicU64::load(&self.duplicates, Ordering::Relaxed),
            retries: AtomicU64::load(&self.retries, Ordering::Relaxed),
            dead_lettered: AtomicU64::load(&self.dead_lettered, Ordering::Relaxed),
        }
    }
}

/// What happened to one message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Outcome {
    Applied,
    Duplicate,
    DeadLettered,
}

/// A failure to process one message, before the retry policy looks at it.
#[derive(Debug)]
struct Failure {
    kind: &'static str,
    error: String,
    retryable: bool,
}

impl Failure {
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

    fn from_error(kind: &'static str, e: &Error) -> Self {
        Self {
            kind,
            error: e.to_string(),
            retryable: e.is_retryable(),
        }
    }
}

/// Reads topics through the inbox and hands each new message to a [`Handler`].
pub struct InboxConsumer<H> {
    pool: PgPool,
    consumer: StreamConsumer,
    codec: AvroCodec,
    handler: H,
    config: InboxConfig,
    readers: Option<ReaderSchemas>,
    stats: Arc<InboxStats>,
}

impl<H> std::fmt::Debug for InboxConsumer<H> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("InboxConsumer")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

impl<H: Handler> InboxConsumer<H> {
    /// A consumer subscribed to `config.topics` in group `config.group_id`.
    ///
    /// Offsets are stored by Ferrybox after each commit (`enable.auto.offset.store=false`) and
    /// committed in the background; a pass-through setting that re-enables automatic offset
    /// storing is refused.
    pub fn new(
        pool: PgPool,
        kafka: &KafkaConfig,
        codec: AvroCodec,
        handler: H,
        config: InboxConfig,
    ) -> Result<Self> {
        kafka.validate()?;
        config.validate()?;
        if kafka
            .settings
            .iter()
            .any(|(k, v)| k.replace('_', ".") == "enable.auto.offset.store" && v != "false")
        {
            return Err(Error::Config(
                "enable.auto.offset.store must stay false: offsets are stored after the inbox commit"
                    .into(),
            ));
        }
        let mut client = kafka.client_config_with_defaults(&[
            ("enable.auto.commit", "true"),
            ("auto.offset.reset", "earliest"),
            ("enable.partition.eof", "false"),
        ]);
        client
            .set("group.id", &config.group_id)
            .set("enable.auto.offset.store", "false");
        let consumer: StreamConsumer = client.create()?;
        let topics: Vec<&str> = config.topics.iter().map(String::as_str).collect();
        consumer.subscribe(&topics)?;
        Ok(Self {
            pool,
            consumer,
            codec,
            handler,
            config,
            readers: None,
            stats: Arc::default(),
        })
    }

    /// Decodes into the consumer's own reader schemas (its contract): values are resolved from
    /// the writer's schema into the reader's, so fields the producer adds are ignored. A message
    /// of a type with no reader schema, or one that cannot be resolved, is a permanent failure.
    #[must_use]
    pub fn with_reader_schemas(mut self, readers: ReaderSchemas) -> Self {
        self.readers = Some(readers);
        self
    }

    /// Shared counters, readable while the consumer runs.
    pub fn stats(&self) -> Arc<InboxStats> {
        Arc::clone(&self.stats)
    }

    /// Consumes until `shutdown` is cancelled, then commits the stored offsets and leaves the
    /// group. A message being processed when shutdown comes is either committed (and its offset
    /// stored) or left for redelivery: never half applied.
    pub async fn run(self, shutdown: CancellationToken) -> Result<()> {
        let mut receive_failures = 0u32;
        loop {
            let received = tokio::select! {
                () = shutdown.cancelled() => break,
                r = self.consumer.recv() => r,
            };
            let message = match received {
                Ok(m) => {
                    receive_failures = 0;
                    m
                }
                Err(e) => {
                    receive_failures += 1;
                    tracing::warn!(error = %e, "kafka receive failed");
                    if sleep_or_shutdown(self.config.backoff.delay(receive_failures), &shutdown)
                        .await
                    {
                        break;
                    }
                    continue;
                }
            };
            match self.process(&message, &shutdown).await {
                Some(outcome) => {
                    tracing::debug!(
                        ?outcome,
                        topic = message.topic(),
                        partition = message.partition(),
                        offset = message.offset(),
                        "message done"
                    );
                    self.consumer.store_offset_from_message(&message)?;
                }
                // Shutdown came while the message was still failing: leave it for redelivery.
                None => break,
            }
        }
        match self.consumer.commit_consumer_state(CommitMode::Sync) {
            Ok(())
            | Err(rdkafka::error::KafkaError::ConsumerCommit(
                rdkafka::types::RDKafkaErrorCode::NoOffset,
            )) => {}
            Err(e) => {
                tracing::warn!(error = %e, "final offset commit failed; uncommitted messages will be redelivered and deduplicated")
            }
        }
        self.consumer.unsubscribe();
        Ok(())
    }

    /// Processes one record until it is applied, found duplicate or dead-lettered; `None` when
    /// shutdown interrupted the retries.
    async fn process(
        &self,
        record: &BorrowedMessage<'_>,
        shutdown: &CancellationToken,
    ) -> Option<Outcome> {
        let mut attempt = 0u32;
        loop {
            attempt += 1;
            let failure = match self.try_once(record).await {
                Ok(outcome) => {
                    let counter = match outcome {
                        Outcome::Applied => &self.stats.applied,
                        Outcome::Duplicate => &self.stats.duplicates,
                        Outcome::DeadLettered => &self.stats.dead_lettered,
                    };
                    counter.fetch_add(1, Ordering::Relaxed);
                    return Some(outcome);
                }
                Err(failure) => failure,
            };
            let exhausted = attempt >= self.config.max_attempts;
            if !failure.retryable || exhausted {
                let failure = if failure.retryable {
                    Failure {
                        kind: "retries_exhausted",
                        ..failure
                    }
                } else {
                    failure
                };
                return self
                    .dead_letter_until_stored(record, &failure, attempt, shutdown)
                    .await;
            }
            self.stats.retries.fetch_add(1, Ordering::Relaxed);
            let delay = self.config.backoff.delay(attempt);
            tracing::warn!(kind = failure.kind, error = %failure.error, attempt, ?delay,
                topic = record.topic(), partition = record.partition(), offset = record.offset(),
                "message failed; retrying");
            if sleep_or_shutdown(delay, shutdown).await {
                return None;
            }
        }
    }

    async fn try_once(&self, record: &BorrowedMessage<'_>) -> Result<Outcome, Failure> {
        let envelope = IncomingMessage::from_parts(
            record.topic(),
            record.partition(),
            record.offset(),
            record.key(),
            headers_of(record),
            record.payload(),
        )
        .map_err(|e| Failure {
            kind: "envelope",
            error: e.to_string(),
            retryable: false,
        })?;
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
                return Err(Failure {
                    kind: "unknown_type",
                    error: format!(
                        "no reader schema for message type {}",
                        envelope.message_type
                    ),
                    retryable: false,
                });
            }
            Some(readers) => readers
                .resolve(&envelope.message_type, decoded.value)
                .map_err(|error| Failure {
                    kind: "schema_resolution",
                    error,
                    retryable: false,
                })?,
        };
        let message = ReceivedMessage { envelope, value };
        let mut conn = db::connection(&self.pool)
            .await
            .map_err(|e| Failure::from_error("database", &e))?;
        let consumer = self.config.consumer_name();
        let timeout = self.config.handler_timeout;
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

    /// Records a dead letter, retrying the write until it is stored or shutdown comes; the
    /// offset moves on only once the record is safe.
    async fn dead_letter_until_stored(
        &self,
        record: &BorrowedMessage<'_>,
        failure: &Failure,
        attempts: u32,
        shutdown: &CancellationToken,
    ) -> Option<Outcome> {
        let mut write_attempt = 0u32;
        loop {
            write_attempt += 1;
            match self.dead_letter(record, failure, attempts).await {
                Ok(()) => {
                    tracing::error!(kind = failure.kind, error = %failure.error,
                        topic = record.topic(), partition = record.partition(), offset = record.offset(),
                        "message dead-lettered");
                    self.stats.dead_lettered.fetch_add(1, Ordering::Relaxed);
                    return Some(Outcome::DeadLettered);
                }
                Err(e) => {
                    tracing::warn!(error = %e, "could not record dead letter; offset stays");
                    if sleep_or_shutdown(self.config.backoff.delay(write_attempt), shutdown).await {
                        return None;
                    }
                }
            }
        }
    }

    async fn dead_letter(
        &self,
        record: &BorrowedMessage<'_>,
        failure: &Failure,
        attempts: u32,
    ) -> Result<()> {
        let headers = headers_of(record);
        let message_id = headers
            .get(crate::message::headers::ID)
            .and_then(|v| v.parse::<uuid::Uuid>().ok());
        let key = record
            .key()
            .map(|k| String::from_utf8_lossy(k).into_owned());
        let headers = serde_json::to_value(&headers).unwrap_or_default();
        let mut conn = db::connection(&self.pool).await?;
        diesel::insert_into(ferrybox_dead_letters::table)
            .values((
                ferrybox_dead_letters::consumer.eq(self.config.consumer_name()),
                ferrybox_dead_letters::message_id.eq(message_id),
                ferrybox_dead_letters::message_key.eq(key),
                ferrybox_dead_letters::topic.eq(record.topic()),
                ferrybox_dead_letters::kafka_partition.eq(record.partition()),
                ferrybox_dead_letters::kafka_offset.eq(record.offset()),
                ferrybox_dead_letters::headers.eq(headers),
                ferrybox_dead_letters::payload.eq(record.payload()),
                ferrybox_dead_letters::error_kind.eq(failure.kind),
                ferrybox_dead_letters::error.eq(&failure.error),
                ferrybox_dead_letters::attempts.eq(i32::try_from(attempts).unwrap_or(i32::MAX)),
            ))
            .on_conflict_do_nothing()
            .execute(&mut conn)
            .await?;
        Ok(())
    }
}

/// A record's headers as text; values that are not UTF-8 are kept lossily.
fn headers_of(record: &BorrowedMessage<'_>) -> BTreeMap<String, String> {
    record
        .headers()
        .map(|headers| {
            headers
                .iter()
                .map(|h| {
                    let value = h
                        .value
                        .map(|v| String::from_utf8_lossy(v).into_owned())
                        .unwrap_or_default();
                    (h.key.to_owned(), value)
                })
                .collect()
        })
        .unwrap_or_default()
}
