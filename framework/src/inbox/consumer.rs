//! The inbox consumer loop: deduplicate by message id, apply in the same transaction, store the
//! Kafka offset only after that transaction committed; retry what may succeed later,
//! dead-letter what cannot, and park the later messages of a dead-lettered key.

use std::sync::Arc;

use rdkafka::consumer::{CommitMode, Consumer, StreamConsumer};
use tokio_util::sync::CancellationToken;

use super::apply::{Applier, Failure, Outcome, Record};
use super::config::{InboxConfig, InboxStats};
use super::dead_letters::DeadLetterStore;
use super::handler::Handler;
use super::retention;
use crate::codec::AvroCodec;
use crate::config::KafkaConfig;
use crate::contract::ReaderSchemas;
use crate::db::PgPool;
use crate::error::{Error, Result};
use crate::outbox::sleep_or_shutdown;

/// What finally happened to one record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Done {
    Applied,
    Duplicate,
    DeadLettered,
    Parked,
}

/// Reads topics through the inbox and hands each new message to a [`Handler`].
pub struct InboxConsumer<H> {
    consumer: StreamConsumer,
    applier: Applier<H>,
    dead_letters: DeadLetterStore,
    config: InboxConfig,
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
            .setting("enable.auto.offset.store")
            .is_some_and(|v| v != "false")
        {
            return Err(Error::Config(
                "enable.auto.offset.store must stay false: offsets are stored after the inbox commit".into(),
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
        let dead_letter_topic = match &config.dead_letter_topic {
            Some(topic) => Some((crate::kafka::durable_producer(kafka)?, topic.clone())),
            None => None,
        };
        Ok(Self {
            consumer,
            applier: Applier {
                pool: pool.clone(),
                codec,
                handler,
                readers: None,
                consumer: config.consumer_name().to_owned(),
                handler_timeout: config.handler_timeout,
            },
            dead_letters: DeadLetterStore {
                pool,
                consumer: config.consumer_name().to_owned(),
                consumer_version: config.consumer_version.clone(),
                topic: dead_letter_topic,
            },
            config,
            stats: Arc::default(),
        })
    }

    /// Decodes into the consumer's own reader schemas (its contract): values are resolved from
    /// the writer's schema into the reader's, so fields the producer adds are ignored. A message
    /// of a type with no reader schema, or one that cannot be resolved, is a permanent failure.
    #[must_use]
    pub fn with_reader_schemas(mut self, readers: ReaderSchemas) -> Self {
        self.applier.readers = Some(readers);
        self
    }

    /// Shared counters, readable while the consumer runs.
    pub fn stats(&self) -> Arc<InboxStats> {
        Arc::clone(&self.stats)
    }

    /// Consumes until `shutdown` is cancelled, then commits the stored offsets and leaves the
    /// group. A message being processed when shutdown comes is either committed (and its offset
    /// stored) or left for redelivery: never half applied. Expired inbox rows are cleaned in the
    /// background meanwhile.
    pub async fn run(self, shutdown: CancellationToken) -> Result<()> {
        let cleaner = tokio::spawn(clean_periodically(
            self.applier.pool.clone(),
            self.config.clone(),
            Arc::clone(&self.stats),
            shutdown.child_token(),
        ));
        let mut receive_failures = 0u32;
        'consume: loop {
            let received = tokio::select! {
                () = shutdown.cancelled() => break,
                r = self.consumer.recv() => r,
            };
            let first = match received {
                Ok(m) => {
                    receive_failures = 0;
                    Record::from_kafka(&m)
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
            // Gather what is already waiting, up to a batch.
            let mut batch = vec![first];
            while batch.len() < self.config.batch_size {
                match tokio::time::timeout(self.config.batch_linger, self.consumer.recv()).await {
                    Ok(Ok(m)) => batch.push(Record::from_kafka(&m)),
                    _ => break,
                }
            }
            let mut next = 0;
            while next < batch.len() {
                let Some(done) = self.process_from(&batch[next..], &shutdown).await else {
                    // Shutdown came while a message was still failing: it and the rest of the
                    // batch are left for redelivery.
                    break 'consume;
                };
                for record in &batch[next..next + done] {
                    // A rebalance while the batch was gathered may have taken the partition
                    // away: its new owner gets the message again and the inbox skips it.
                    if let Err(e) =
                        self.consumer
                            .store_offset(&record.topic, record.partition, record.offset)
                    {
                        tracing::warn!(error = %e, topic = record.topic, partition = record.partition,
                            offset = record.offset, "offset not stored (partition revoked?); the message will be redelivered and deduplicated");
                    }
                }
                next += done;
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
        shutdown.cancel();
        if let Err(e) = cleaner.await {
            tracing::warn!(error = %e, "inbox cleaner task failed");
        }
        Ok(())
    }

    /// Finishes the leading records of `records`: a batch of those whose keys are not blocked,
    /// or (when the first is blocked or fails) that one record on its own, retried, parked or
    /// dead-lettered. Returns how many leading records are done; `None` on shutdown.
    async fn process_from(
        &self,
        records: &[Record],
        shutdown: &CancellationToken,
    ) -> Option<usize> {
        let keys: Vec<String> = records.iter().filter_map(Record::key_text).collect();
        let blocked = match self.dead_letters.blocked_keys(&keys).await {
            Ok(blocked) => blocked,
            Err(e) => {
                tracing::warn!(error = %e, "could not check for parked keys; taking messages one by one");
                keys.into_iter().collect()
            }
        };
        let run = records
            .iter()
            .take_while(|r| r.key_text().is_none_or(|k| !blocked.contains(&k)))
            .count();
        if run > 0 {
            let applied = self.applier.apply_batch(&records[..run]).await;
            for outcome in &applied.outcomes {
                let counter = match outcome {
                    Outcome::Applied => &self.stats.applied,
                    Outcome::Duplicate => &self.stats.duplicates,
                };
                InboxStats::add(counter, 1);
            }
            if !applied.outcomes.is_empty() {
                return Some(applied.outcomes.len());
            }
        }
        // The first record is blocked or failed in the batch: handle it alone.
        let first_blocked = records[0].key_text().is_some_and(|k| blocked.contains(&k));
        self.process(&records[0], first_blocked, shutdown)
            .await
            .map(|_| 1)
    }

    /// Processes one record until it is applied, found duplicate, parked or dead-lettered;
    /// `None` when shutdown interrupted it first.
    async fn process(
        &self,
        record: &Record,
        blocked: bool,
        shutdown: &CancellationToken,
    ) -> Option<Done> {
        let mut attempt = 0u32;
        loop {
            attempt += 1;
            let failure = match self.try_once(record, blocked).await {
                Ok(done) => {
                    let counter = match done {
                        Done::Applied => &self.stats.applied,
                        Done::Duplicate => &self.stats.duplicates,
                        Done::DeadLettered => &self.stats.dead_lettered,
                        Done::Parked => &self.stats.parked,
                    };
                    InboxStats::add(counter, 1);
                    return Some(done);
                }
                Err(failure) => failure,
            };
            if !failure.retryable || attempt >= self.config.max_attempts {
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
            InboxStats::add(&self.stats.retries, 1);
            let delay = self.config.backoff.delay(attempt);
            tracing::warn!(kind = failure.kind, error = %failure.error, attempt, ?delay,
                topic = record.topic, partition = record.partition, offset = record.offset, "message failed; retrying");
            if sleep_or_shutdown(delay, shutdown).await {
                return None;
            }
        }
    }

    /// `blocked`: the batch check found an open dead letter for the record's key. Parking
    /// re-checks under the key's lock, so a key unblocked by a redrive meanwhile is applied.
    async fn try_once(&self, record: &Record, blocked: bool) -> Result<Done, Failure> {
        if let Some(key) = record.key_text().filter(|_| blocked)
            && self
                .dead_letters
                .park(record, &key)
                .await
                .map_err(|e| Failure::from_error("database", &e))?
        {
            tracing::info!(
                key,
                topic = record.topic,
                partition = record.partition,
                offset = record.offset,
                "message parked behind a dead letter of its key"
            );
            return Ok(Done::Parked);
        }
        match self.applier.apply(record).await? {
            Outcome::Applied => Ok(Done::Applied),
            Outcome::Duplicate => Ok(Done::Duplicate),
        }
    }

    /// Records a dead letter, retrying until it is stored (and published, when a dead-letter
    /// topic is set) or shutdown comes; the offset moves on only once it is safe.
    async fn dead_letter_until_stored(
        &self,
        record: &Record,
        failure: &Failure,
        attempts: u32,
        shutdown: &CancellationToken,
    ) -> Option<Done> {
        let mut write_attempt = 0u32;
        loop {
            write_attempt += 1;
            match self
                .dead_letters
                .record_dead(record, failure, attempts)
                .await
            {
                Ok(()) => {
                    tracing::error!(kind = failure.kind, error = %failure.error,
                        topic = record.topic, partition = record.partition, offset = record.offset, "message dead-lettered");
                    InboxStats::add(&self.stats.dead_lettered, 1);
                    return Some(Done::DeadLettered);
                }
                Err(e) => {
                    tracing::warn!(error = %e, "could not record the dead letter; the offset stays");
                    if sleep_or_shutdown(self.config.backoff.delay(write_attempt), shutdown).await {
                        return None;
                    }
                }
            }
        }
    }
}

async fn clean_periodically(
    pool: PgPool,
    config: InboxConfig,
    stats: Arc<InboxStats>,
    shutdown: CancellationToken,
) {
    while !sleep_or_shutdown(config.cleanup_interval, &shutdown).await {
        match retention::delete_expired(
            &pool,
            config.consumer_name(),
            config.retention,
            retention::BATCH,
        )
        .await
        {
            Ok(0) => {}
            Ok(n) => {
                tracing::info!(deleted = n, "expired inbox rows deleted");
                InboxStats::add(&stats.cleaned, n);
            }
            Err(e) => tracing::warn!(error = %e, "inbox cleanup failed; will try again"),
        }
    }
}
