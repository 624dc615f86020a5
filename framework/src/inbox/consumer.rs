//! The inbox consumer loop: deduplicate by message id, apply in the same transaction, store the
//! Kafka offset only after that transaction committed; retry what may succeed later,
//! dead-letter what cannot, and park the later messages of a dead-lettered key.

use std::collections::HashSet;
use std::sync::Arc;

use rdkafka::consumer::{CommitMode, Consumer, StreamConsumer};
use tokio_util::sync::CancellationToken;

use super::apply::Record;
use super::config::{InboxConfig, InboxStats};
use super::handler::Handler;
use super::pipeline::{Pipeline, Progress, Transport};
use crate::codec::AvroCodec;
use crate::config::{ClientKind, KafkaConfig};
use crate::contract::ReaderSchemas;
use crate::db::PgPool;
use crate::error::{Error, Result};
use crate::outbox::sleep_or_shutdown;

/// How far [`InboxConsumer::apply_and_store`] got with a batch.
enum Applied {
    /// Every record was applied or found duplicate.
    All,
    /// Every record is finished, some of them dead-lettered or parked.
    AllWithDeadLetters,
    /// Shutdown stopped it; the rest of the batch is left for redelivery.
    Stopped,
}

/// How often librdkafka reports statistics (and so consumer lag) when metrics are on.
const LAG_INTERVAL_MS: &str = "5000";

/// Records each assigned partition's consumer lag (`ferrybox.inbox.lag`) from librdkafka's
/// statistics.
pub(crate) struct LagContext {
    group: String,
}

impl rdkafka::ClientContext for LagContext {
    fn stats(&self, statistics: rdkafka::Statistics) {
        let Some(m) = crate::metrics::instruments() else {
            return;
        };
        for (topic, t) in &statistics.topics {
            for (partition, p) in &t.partitions {
                // -1: the internal unassigned partition, or a lag not known yet.
                if *partition < 0 || p.consumer_lag < 0 {
                    continue;
                }
                m.consumer_lag.record(
                    p.consumer_lag,
                    &[
                        opentelemetry::KeyValue::new("messaging.system", "kafka"),
                        opentelemetry::KeyValue::new("messaging.destination.name", topic.clone()),
                        opentelemetry::KeyValue::new(
                            "messaging.destination.partition.id",
                            partition.to_string(),
                        ),
                        opentelemetry::KeyValue::new(
                            "messaging.consumer.group.name",
                            self.group.clone(),
                        ),
                    ],
                );
            }
        }
    }
}

impl rdkafka::consumer::ConsumerContext for LagContext {}

/// Reads topics through the inbox and hands each new message to a [`Handler`].
pub struct InboxConsumer<H> {
    consumer: StreamConsumer<LagContext>,
    pipeline: Pipeline<H>,
}

impl<H> std::fmt::Debug for InboxConsumer<H> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("InboxConsumer")
            .field("config", &self.pipeline.config)
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
            .setting(ClientKind::Consumer, "enable.auto.offset.store")
            .is_some_and(|v| v != "false")
        {
            return Err(Error::Config(
                "enable.auto.offset.store must stay false: offsets are stored after the inbox commit".into(),
            ));
        }
        let mut client = kafka.client_config_with_defaults(
            ClientKind::Consumer,
            &[
                ("enable.auto.commit", "true"),
                ("auto.offset.reset", "earliest"),
                ("enable.partition.eof", "false"),
            ],
        );
        client
            .set("group.id", &config.group_id)
            .set("enable.auto.offset.store", "false");
        if let Some(instance) = config.instance_id()
            && kafka
                .setting(ClientKind::Consumer, "group.instance.id")
                .is_none()
        {
            client.set("group.instance.id", instance);
        }
        // Lag per partition comes from librdkafka's statistics, when metrics are on.
        if crate::metrics::instruments().is_some()
            && kafka
                .setting(ClientKind::Consumer, "statistics.interval.ms")
                .is_none()
        {
            client.set("statistics.interval.ms", LAG_INTERVAL_MS);
        }
        let consumer: StreamConsumer<LagContext> = client.create_with_context(LagContext {
            group: config.group_id.clone(),
        })?;
        let topics: Vec<&str> = config.topics.iter().map(String::as_str).collect();
        consumer.subscribe(&topics)?;
        let dead_letter_topic = match &config.dead_letter_topic {
            Some(topic) => Some((crate::kafka::durable_producer(kafka)?, topic.clone())),
            None => None,
        };
        Ok(Self {
            consumer,
            pipeline: Pipeline::new(
                pool,
                codec,
                handler,
                config,
                Transport::Kafka(kafka.clone()),
                dead_letter_topic,
            ),
        })
    }

    /// Decodes into the consumer's own reader schemas (its contract): values are resolved from
    /// the writer's schema into the reader's, so fields the producer adds are ignored. A message
    /// of a type with no reader schema, or one that cannot be resolved, is a permanent failure.
    #[must_use]
    pub fn with_reader_schemas(mut self, readers: ReaderSchemas) -> Self {
        self.pipeline.applier.readers = Some(readers);
        self
    }

    /// Raises alerts through `alerter` (for example when dead letters cannot be stored and a
    /// partition waits on it); without it they are only logged.
    #[must_use]
    pub fn with_alerter(mut self, alerter: crate::alert::Alerter) -> Self {
        self.pipeline.alerter = alerter;
        self
    }

    /// Shared counters, readable while the consumer runs.
    pub fn stats(&self) -> Arc<InboxStats> {
        Arc::clone(&self.pipeline.stats)
    }

    /// Consumes until `shutdown` is cancelled, then commits the stored offsets and leaves the
    /// group. A message being processed when shutdown comes is either committed (and its offset
    /// stored) or left for redelivery: never half applied. Expired inbox rows are cleaned in the
    /// background meanwhile.
    pub async fn run(self, shutdown: CancellationToken) -> Result<()> {
        let cleaner = self.pipeline.spawn_cleaner(&shutdown);
        let mut receive_failures = 0u32;
        let mut fatal = None;
        let mut batch = self
            .gather(&shutdown, &mut receive_failures, &mut fatal)
            .await;
        let mut checked = None;
        // The next batch is gathered, and its keys checked against open dead letters, while
        // this one is applied: receiving and copying records is the consumer's work, applying
        // them the database's.
        while let Some(records) = batch.take() {
            let gather_next = async {
                let next = self
                    .gather(&shutdown, &mut receive_failures, &mut fatal)
                    .await;
                let blocked = match &next {
                    Some(records) => self.pipeline.blocked_keys(records).await,
                    None => None,
                };
                (next, blocked)
            };
            let (applied, (next, blocked)) = tokio::join!(
                self.apply_and_store(&records, checked.take(), &shutdown),
                gather_next
            );
            match applied {
                Applied::All => checked = blocked,
                // A dead letter or parked message in this batch may block keys of the next
                // one that its check (made meanwhile) did not see: look again then.
                Applied::AllWithDeadLetters => {}
                Applied::Stopped => break,
            }
            batch = next;
        }
        self.finish(cleaner, &shutdown).await;
        match fatal {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }

    /// Receives the next batch: waits for one record, then takes what is already waiting, up
    /// to `batch_size`. `None` on shutdown, or when the client failed for good (fenced by
    /// another instance with its `group.instance.id`, a fatal librdkafka error): then `fatal`
    /// says why, and the consumer stops, so a supervised service fails readiness and exits.
    async fn gather(
        &self,
        shutdown: &CancellationToken,
        receive_failures: &mut u32,
        fatal: &mut Option<Error>,
    ) -> Option<Vec<Record>> {
        let config = &self.pipeline.config;
        let first = loop {
            let received = tokio::select! {
                () = shutdown.cancelled() => return None,
                r = self.consumer.recv() => r,
            };
            match received {
                Ok(m) => {
                    *receive_failures = 0;
                    break Record::from_kafka(&m);
                }
                Err(e) => {
                    if let Some((code, reason)) = self.consumer.client().fatal_error() {
                        *fatal = Some(Error::Kafka(
                            rdkafka::error::KafkaError::MessageConsumptionFatal(code),
                        ));
                        tracing::error!(error = %e, reason, "the kafka consumer failed for good");
                        return None;
                    }
                    if !Error::Kafka(e.clone()).is_retryable() {
                        tracing::error!(error = %e, "kafka receive failed for good");
                        *fatal = Some(Error::Kafka(e));
                        return None;
                    }
                    *receive_failures += 1;
                    tracing::warn!(error = %e, "kafka receive failed");
                    if sleep_or_shutdown(config.backoff.delay(*receive_failures), shutdown).await {
                        return None;
                    }
                }
            }
        };
        let mut batch = Vec::with_capacity(config.batch_size);
        batch.push(first);
        while batch.len() < config.batch_size {
            match tokio::time::timeout(config.batch_linger, self.consumer.recv()).await {
                Ok(Ok(m)) => batch.push(Record::from_kafka(&m)),
                _ => break,
            }
        }
        Some(batch)
    }

    /// Finishes every record of `batch` in order (applied, duplicate, parked or dead-lettered)
    /// and stores each one's offset once it is. `checked`: the batch's blocked keys, if known.
    async fn apply_and_store(
        &self,
        batch: &[Record],
        mut checked: Option<HashSet<String>>,
        shutdown: &CancellationToken,
    ) -> Applied {
        let mut next = 0;
        let mut outcome = Applied::All;
        while next < batch.len() {
            let progress = self
                .pipeline
                .process_from(&batch[next..], checked.take(), shutdown)
                .await;
            let done = match progress {
                Progress::Done { count, by_applier } => {
                    if !by_applier {
                        outcome = Applied::AllWithDeadLetters;
                    }
                    count
                }
                // Shutdown came while a message was still failing: it and the rest of the
                // batch are left for redelivery. (Kafka consumers dead-letter, never halt.)
                Progress::Shutdown | Progress::Halted(_) => return Applied::Stopped,
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
        outcome
    }

    /// Commits the stored offsets, leaves the group and waits for the cleaner.
    async fn finish(self, cleaner: tokio::task::JoinHandle<()>, shutdown: &CancellationToken) {
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
    }
}
