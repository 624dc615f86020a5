//! The inbox consumer loop: deduplicate by message id, apply in the same transaction, store the
//! Kafka offset only after that transaction committed; retry what may succeed later,
//! dead-letter what cannot, and park the later messages of a dead-lettered key.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use rdkafka::consumer::{CommitMode, Consumer, StreamConsumer};
use tokio_util::sync::CancellationToken;

use super::apply::{Decoder, Gap, Record};
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

/// How a repair try ended.
enum Repair {
    /// The gap is filled or skipped: the partition resumes.
    Resumed,
    /// Not yet; numbers from `next` on are still missing.
    Waiting { next: i64 },
}

/// An instant no timer reaches (for a branch that is off).
fn far_future() -> tokio::time::Instant {
    tokio::time::Instant::now() + std::time::Duration::from_secs(86_400 * 365)
}

/// How often librdkafka reports statistics (and so consumer lag) when metrics are on.
const LAG_INTERVAL_MS: &str = "5000";

/// Partitions sought back to the message after their gap (see [`InboxConsumer::resume`]), by
/// the offset sought: records of theirs received before the seek (a batch or more ahead, past
/// that offset) are still on their way and are dropped, until the first record at or before the
/// offset arrives, or the partition is revoked.
type Resuming = Arc<std::sync::Mutex<HashMap<(String, i32), i64>>>;

/// Records each assigned partition's consumer lag (`ferrybox.inbox.lag`) from librdkafka's
/// statistics, and forgets a revoked partition's resume (its next records, whenever they come,
/// start from the committed offset).
pub(crate) struct LagContext {
    group: String,
    resuming: Resuming,
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

impl rdkafka::consumer::ConsumerContext for LagContext {
    fn pre_rebalance(
        &self,
        _: &rdkafka::consumer::BaseConsumer<Self>,
        rebalance: &rdkafka::consumer::Rebalance<'_>,
    ) {
        if let rdkafka::consumer::Rebalance::Revoke(revoked) = rebalance {
            let mut resuming = self
                .resuming
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            for p in revoked.elements() {
                resuming.remove(&(p.topic().to_owned(), p.partition()));
            }
        }
    }
}

/// Reads topics through the inbox and hands each new message to a [`Handler`].
pub struct InboxConsumer<H> {
    /// Shared with the receiving task (see [`receive`]); librdkafka's client is thread-safe.
    consumer: Arc<StreamConsumer<LagContext>>,
    pipeline: Pipeline<H>,
    /// Partitions halted at a gap in their numbers (see [`super::gaps`]).
    halted: std::sync::Mutex<HashMap<(String, i32), Halt>>,
    /// Partitions resumed after their gap, shared with the client's context.
    resuming: Resuming,
    /// Woken when a partition halts, so a receive waiting for records also waits for its
    /// repair.
    halt_added: tokio::sync::Notify,
    http: reqwest::Client,
}

/// A partition halted at a gap, until it is repaired or skipped.
#[derive(Debug, Clone)]
struct Halt {
    id: i64,
    gap: Gap,
    /// The first number not repaired yet.
    next: i64,
    /// When to try again.
    due: tokio::time::Instant,
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
        let resuming = Resuming::default();
        let consumer: StreamConsumer<LagContext> = client.create_with_context(LagContext {
            group: config.group_id.clone(),
            resuming: Arc::clone(&resuming),
        })?;
        let topics: Vec<&str> = config.topics.iter().map(String::as_str).collect();
        consumer.subscribe(&topics)?;
        let dead_letter_topic = match &config.dead_letter_topic {
            Some(topic) => Some((crate::kafka::durable_producer(kafka)?, topic.clone())),
            None => None,
        };
        Ok(Self {
            consumer: Arc::new(consumer),
            halted: std::sync::Mutex::default(),
            resuming,
            halt_added: tokio::sync::Notify::new(),
            http: reqwest::Client::builder()
                .timeout(std::time::Duration::from_secs(30))
                .build()
                .map_err(|e| Error::Config(format!("http client: {e}")))?,
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

    /// Decodes with `contract`'s reader schemas (see [`InboxConsumer::with_reader_schemas`]),
    /// after checking that the contract is about a topic this consumer consumes: a contract of
    /// another topic is an [`Error::Config`], not a consumer that silently decodes with the
    /// writer's schemas. Embed the contract with [`crate::contract!`].
    pub fn with_contract(self, contract: &crate::contract::ConsumerContract) -> Result<Self> {
        let topic = contract.topic.clone();
        self.with_contract_as(contract, &topic)
    }

    /// [`InboxConsumer::with_contract`] for a deployment that names the contract's topic
    /// `topic` (a per-environment prefix, a test's own topic): `topic` must be one this consumer
    /// consumes.
    pub fn with_contract_as(
        self,
        contract: &crate::contract::ConsumerContract,
        topic: &str,
    ) -> Result<Self> {
        let topics = &self.pipeline.config.topics;
        if !topics.iter().any(|t| t == topic) {
            return Err(Error::Config(format!(
                "{}'s contract {} reads topic {:?}{}, but this consumer consumes {topics:?}: \
                 point the contract or inbox.topics at the same topic",
                contract.consumer,
                contract.path.display(),
                contract.topic,
                if topic == contract.topic {
                    String::new()
                } else {
                    format!(" (deployed as {topic:?})")
                }
            )));
        }
        if topic != contract.topic {
            tracing::info!(
                contract = %contract.path.display(),
                topic,
                "the contract's topic {} is deployed as {topic}",
                contract.topic
            );
        }
        Ok(self.with_reader_schemas(ReaderSchemas::from_contract(contract)))
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
        // Receiving, copying and decoding records is the consumer's own work; applying them
        // the database's. A task of its own (another core) does the first, a batch or two
        // ahead, while this one applies.
        let receiving = shutdown.child_token();
        let (batches, mut received) = tokio::sync::mpsc::channel(1);
        let receiver = tokio::spawn(receive(
            Arc::clone(&self.consumer),
            self.pipeline.applier.decoder(),
            self.pipeline.config.clone(),
            batches,
            receiving.clone(),
        ));
        let mut fatal = None;
        let mut batch = self.next_batch(&mut received, &shutdown, &mut fatal).await;
        let mut checked = None;
        // The next batch is taken, and its keys checked against open dead letters, while this
        // one is applied.
        while let Some(records) = batch.take() {
            self.repair_due(&shutdown).await;
            let next_batch = async {
                let next = self.next_batch(&mut received, &shutdown, &mut fatal).await;
                let blocked = match &next {
                    Some(records) => self.pipeline.blocked_keys(records).await,
                    None => None,
                };
                (next, blocked)
            };
            let (applied, (next, blocked)) = tokio::join!(
                self.apply_and_store(&records, checked.take(), &shutdown),
                next_batch
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
        // What was received ahead and not applied is received again after the restart.
        receiving.cancel();
        drop(received);
        if let Err(e) = receiver.await {
            tracing::warn!(error = %e, "the receiving task failed");
        }
        self.finish(cleaner, &shutdown).await;
        match fatal {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }

    /// The next batch from the receiving task. `None` on shutdown, or when the client failed
    /// for good (fenced by another instance with its `group.instance.id`, a fatal librdkafka
    /// error): then `fatal` says why, and the consumer stops, so a supervised service fails
    /// readiness and exits. An empty batch when a halted partition's repair is due.
    async fn next_batch(
        &self,
        received: &mut tokio::sync::mpsc::Receiver<Result<Vec<Record>>>,
        shutdown: &CancellationToken,
        fatal: &mut Option<Error>,
    ) -> Option<Vec<Record>> {
        loop {
            // Registered before looking, so a halt added in between still wakes this.
            let halt_added = self.halt_added.notified();
            let mut halt_added = std::pin::pin!(halt_added);
            halt_added.as_mut().enable();
            let repair_due = self.next_repair();
            tokio::select! {
                () = shutdown.cancelled() => return None,
                batch = received.recv() => return match batch {
                    Some(Ok(batch)) => Some(batch),
                    Some(Err(e)) => {
                        *fatal = Some(e);
                        None
                    }
                    // The receiving task stops with shutdown (and may be seen stopped first);
                    // without shutdown, it failed.
                    None if shutdown.is_cancelled() => None,
                    None => {
                        *fatal = Some(Error::Task("the receiving task ended".into()));
                        None
                    }
                },
                () = halt_added => {}
                // A halted partition's repair is due: an empty batch lets the loop try it.
                () = tokio::time::sleep_until(repair_due.unwrap_or_else(far_future)), if repair_due.is_some() => {
                    return Some(Vec::new());
                }
            }
        }
    }

    /// Finishes every record of `batch` in order (applied, duplicate, parked or dead-lettered)
    /// and stores each one's offset once it is. `checked`: the batch's blocked keys, if known.
    async fn apply_and_store(
        &self,
        batch: &[Record],
        mut checked: Option<HashSet<String>>,
        shutdown: &CancellationToken,
    ) -> Applied {
        // Records of halted partitions wait: they come again when the partition resumes.
        let mut batch = std::borrow::Cow::Borrowed(batch);
        if self.held_back_any(&batch) {
            batch = std::borrow::Cow::Owned(self.without_held_back(&batch));
        }
        let mut next = 0;
        let mut outcome = Applied::All;
        while next < batch.len() {
            let progress = self
                .pipeline
                .process_from(&batch[next..], checked.take(), shutdown)
                .await;
            let done = match progress {
                Progress::Gap(gap) => {
                    if !self.halt(gap, shutdown).await {
                        return Applied::Stopped;
                    }
                    let rest = self.without_held_back(&batch[next + 1..]);
                    batch = std::borrow::Cow::Owned(rest);
                    next = 0;
                    continue;
                }
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

    /// Whether any of `records` is of a halted partition or of one being resumed.
    fn held_back_any(&self, records: &[Record]) -> bool {
        let halted = self
            .halted
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let resuming = self
            .resuming
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        (!halted.is_empty() || !resuming.is_empty())
            && records.iter().any(|r| {
                is_halted(&halted, &r.topic, r.partition)
                    || resumed_from(&resuming, &r.topic, r.partition).is_some()
            })
    }

    /// `records` without those of halted partitions, and without those of a resumed partition
    /// that were received before its seek (past the offset sought, ahead of the first record
    /// fetched from there, which ends its resume).
    fn without_held_back(&self, records: &[Record]) -> Vec<Record> {
        let halted = self
            .halted
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let mut resuming = self
            .resuming
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        hold_back(
            records,
            |topic, partition| is_halted(&halted, topic, partition),
            &mut resuming,
        )
    }

    /// When the soonest halted partition's repair is due.
    fn next_repair(&self) -> Option<tokio::time::Instant> {
        let halted = self
            .halted
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        halted.values().map(|h| h.due).min()
    }

    /// Halts `gap`'s partition: records the gap (alerting when it is new), pauses the
    /// partition's fetching, and tries the repair at once. False when shutdown came while the
    /// gap could not be recorded (nothing of the partition after it was stored).
    async fn halt(&self, gap: Gap, shutdown: &CancellationToken) -> bool {
        let consumer = self.pipeline.applier.consumer.clone();
        let id = loop {
            match super::gaps::record(&self.pipeline.applier.pool, &consumer, &gap).await {
                Ok((id, new)) => {
                    if new {
                        tracing::error!(
                            source = gap.source,
                            topic = gap.topic,
                            partition = gap.partition,
                            from = gap.from_seq,
                            to = gap.to_seq,
                            offset = gap.offset,
                            "gap in the producer's numbers: the partition halts until it is repaired"
                        );
                        self.pipeline
                            .alerter
                            .raise(&crate::alert::Alert::new(
                                format!("{consumer} inbox consumer"),
                                "sequence_gap",
                                format!(
                                    "messages {}..={} of {} on {}/{} never arrived; the partition halts",
                                    gap.from_seq, gap.to_seq, gap.source, gap.topic, gap.partition
                                ),
                                serde_json::json!({
                                    "consumer": consumer,
                                    "gap": id,
                                    "source": gap.source,
                                    "topic": gap.topic,
                                    "partition": gap.partition,
                                    "from_seq": gap.from_seq,
                                    "to_seq": gap.to_seq,
                                    "offset": gap.offset,
                                    "repair": self.pipeline.config.repair_urls.contains_key(&gap.topic),
                                }),
                            ))
                            .await;
                    }
                    break id;
                }
                Err(e) => {
                    tracing::warn!(error = %e, "could not record a gap; trying again");
                    if sleep_or_shutdown(self.pipeline.config.backoff.delay(1), shutdown).await {
                        return false;
                    }
                }
            }
        };
        if let Some(m) = crate::metrics::instruments() {
            m.gaps.add(
                1,
                &[opentelemetry::KeyValue::new(
                    "messaging.destination.name",
                    gap.topic.clone(),
                )],
            );
        }
        let mut tpl = rdkafka::TopicPartitionList::new();
        tpl.add_partition(&gap.topic, gap.partition);
        if let Err(e) = self.consumer.pause(&tpl) {
            tracing::warn!(error = %e, topic = gap.topic, partition = gap.partition,
                "could not pause the halted partition; its records are dropped until it resumes");
        }
        let next = gap.from_seq;
        self.halted
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .insert(
                (gap.topic.clone(), gap.partition),
                Halt {
                    id,
                    gap,
                    next,
                    due: tokio::time::Instant::now(),
                },
            );
        self.halt_added.notify_waiters();
        true
    }

    /// Tries each halted partition whose turn it is: resumes it when its gap was skipped, or
    /// repairs it from the producer when a repair endpoint is configured for its topic.
    async fn repair_due(&self, shutdown: &CancellationToken) {
        let due: Vec<Halt> = {
            let halted = self
                .halted
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            let now = tokio::time::Instant::now();
            halted.values().filter(|h| h.due <= now).cloned().collect()
        };
        for halt in due {
            let outcome = self.repair(&halt, shutdown).await;
            let key = (halt.gap.topic.clone(), halt.gap.partition);
            match outcome {
                Repair::Resumed => {
                    self.halted
                        .lock()
                        .unwrap_or_else(std::sync::PoisonError::into_inner)
                        .remove(&key);
                    self.resume(&halt.gap);
                }
                Repair::Waiting { next } => {
                    let mut halted = self
                        .halted
                        .lock()
                        .unwrap_or_else(std::sync::PoisonError::into_inner);
                    if let Some(h) = halted.get_mut(&key) {
                        h.next = next;
                        h.due = tokio::time::Instant::now() + self.pipeline.config.repair_interval;
                    }
                }
            }
        }
    }

    /// One try at `halt`'s gap.
    async fn repair(&self, halt: &Halt, shutdown: &CancellationToken) -> Repair {
        let pool = &self.pipeline.applier.pool;
        let waiting = Repair::Waiting { next: halt.next };
        match super::gaps::status(pool, halt.id).await {
            Ok(status) if status != "open" => return Repair::Resumed,
            Ok(_) => {}
            Err(e) => {
                tracing::warn!(error = %e, "could not look at a gap; trying again");
                return waiting;
            }
        }
        let Some(url) = self.pipeline.config.repair_urls.get(&halt.gap.topic) else {
            return waiting;
        };
        let mut next = halt.next;
        while next <= halt.gap.to_seq {
            let records = match super::gaps::fetch(
                &self.http,
                url,
                &halt.gap,
                next,
                self.pipeline.config.repair_token.as_ref(),
            )
            .await
            {
                Ok(records) => records,
                Err(e) => {
                    tracing::warn!(error = %e, gap = halt.id, "gap not repaired yet; trying again");
                    let _ = super::gaps::close(pool, halt.id, false, &e.to_string()).await;
                    return Repair::Waiting { next };
                }
            };
            let mut done = 0;
            while done < records.len() {
                match self
                    .pipeline
                    .process_from(&records[done..], None, shutdown)
                    .await
                {
                    Progress::Done { count, .. } => done += count,
                    Progress::Shutdown | Progress::Halted(_) => {
                        return Repair::Waiting {
                            next: next + i64::try_from(done).unwrap_or(0),
                        };
                    }
                    Progress::Gap(gap) => {
                        // Numbers before ours were applied meanwhile (another instance):
                        // ask again from where the partition is.
                        tracing::warn!(?gap, "repair found the partition elsewhere; asking again");
                        return Repair::Waiting { next: gap.from_seq };
                    }
                }
            }
            next += i64::try_from(records.len()).unwrap_or(0);
        }
        tracing::info!(
            gap = halt.id,
            source = halt.gap.source,
            topic = halt.gap.topic,
            partition = halt.gap.partition,
            from = halt.gap.from_seq,
            to = halt.gap.to_seq,
            "gap repaired from the producer's sent log; the partition resumes"
        );
        if let Err(e) =
            super::gaps::close(pool, halt.id, true, &format!("repaired from {url}")).await
        {
            tracing::warn!(error = %e, "could not close the repaired gap; trying again");
            return Repair::Waiting { next };
        }
        Repair::Resumed
    }

    /// Fetches `gap`'s partition again from the message after the gap.
    fn resume(&self, gap: &Gap) {
        // Set before seeking: a record received ahead, before the seek, is past the offset.
        self.resuming
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .insert((gap.topic.clone(), gap.partition), gap.offset);
        let mut tpl = rdkafka::TopicPartitionList::new();
        tpl.add_partition(&gap.topic, gap.partition);
        if let Err(e) = self.consumer.seek(
            &gap.topic,
            gap.partition,
            rdkafka::Offset::Offset(gap.offset),
            std::time::Duration::from_secs(10),
        ) {
            // Not assigned here any more: its new owner starts from the committed offset.
            tracing::warn!(error = %e, topic = gap.topic, partition = gap.partition,
                "could not seek the resumed partition");
            self.resuming
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .remove(&(gap.topic.clone(), gap.partition));
        }
        if let Err(e) = self.consumer.resume(&tpl) {
            tracing::warn!(error = %e, topic = gap.topic, partition = gap.partition,
                "could not resume the partition");
        }
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

/// The receiving task: waits for one record, then takes what is already waiting, up to the
/// batch size, decodes the batch and hands it on; until `stop`, or until the client fails for
/// good (then the error is handed on and the task ends).
async fn receive(
    consumer: Arc<StreamConsumer<LagContext>>,
    decoder: Decoder,
    config: InboxConfig,
    batches: tokio::sync::mpsc::Sender<Result<Vec<Record>>>,
    stop: CancellationToken,
) {
    let mut failures = 0u32;
    loop {
        let received = tokio::select! {
            () = stop.cancelled() => return,
            r = consumer.recv() => r,
        };
        let first = match received {
            Ok(m) => {
                failures = 0;
                Record::from_kafka(&m)
            }
            Err(e) => {
                let failed = if let Some((code, reason)) = consumer.client().fatal_error() {
                    tracing::error!(error = %e, reason, "the kafka consumer failed for good");
                    Some(Error::Kafka(
                        rdkafka::error::KafkaError::MessageConsumptionFatal(code),
                    ))
                } else if !Error::Kafka(e.clone()).is_retryable() {
                    tracing::error!(error = %e, "kafka receive failed for good");
                    Some(Error::Kafka(e.clone()))
                } else {
                    None
                };
                if let Some(failed) = failed {
                    let _ = batches.send(Err(failed)).await;
                    return;
                }
                failures += 1;
                tracing::warn!(error = %e, "kafka receive failed");
                if sleep_or_shutdown(config.backoff.delay(failures), &stop).await {
                    return;
                }
                continue;
            }
        };
        let mut batch = Vec::with_capacity(config.batch_size);
        batch.push(first);
        while batch.len() < config.batch_size {
            // What librdkafka has ready is taken without a timer; only an empty queue waits,
            // for the linger at most.
            let next = match futures::FutureExt::now_or_never(consumer.recv()) {
                Some(ready) => Ok(ready),
                None => tokio::time::timeout(config.batch_linger, consumer.recv()).await,
            };
            match next {
                Ok(Ok(m)) => batch.push(Record::from_kafka(&m)),
                _ => break,
            }
        }
        decoder.decode(&mut batch).await;
        tokio::select! {
            () = stop.cancelled() => return,
            sent = batches.send(Ok(batch)) => if sent.is_err() {
                return;
            },
        }
    }
}

/// `records` without those of a partition `halted` says is halted, and without those of a
/// partition in `resuming` that are past the offset it was sought back to; the first record at
/// or before that offset ends its resume (it was fetched after the seek, and so are the ones
/// after it).
fn hold_back(
    records: &[Record],
    halted: impl Fn(&str, i32) -> bool,
    resuming: &mut HashMap<(String, i32), i64>,
) -> Vec<Record> {
    records
        .iter()
        .filter(|r| {
            if halted(&r.topic, r.partition) {
                return false;
            }
            match resumed_from(resuming, &r.topic, r.partition) {
                Some(from) if r.offset > from => false,
                Some(_) => {
                    resuming.remove(&(r.topic.clone(), r.partition));
                    true
                }
                None => true,
            }
        })
        .cloned()
        .collect()
}

/// The offset `topic`'s `partition` was sought back to, if it is being resumed (a handful:
/// looked through, with no key made per record).
fn resumed_from(
    resuming: &HashMap<(String, i32), i64>,
    topic: &str,
    partition: i32,
) -> Option<i64> {
    resuming
        .iter()
        .find(|((t, p), _)| t == topic && *p == partition)
        .map(|(_, from)| *from)
}

/// Whether `topic`'s `partition` is among the `halted` ones (a handful: looked through, with no
/// key made per record).
fn is_halted(halted: &HashMap<(String, i32), Halt>, topic: &str, partition: i32) -> bool {
    halted.keys().any(|(t, p)| t == topic && *p == partition)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(partition: i32, offset: i64) -> Record {
        Record::new(
            "t".into(),
            partition,
            offset,
            None,
            std::collections::BTreeMap::new(),
            Some(Vec::new()),
        )
    }

    fn offsets(records: &[Record]) -> Vec<(i32, i64)> {
        records.iter().map(|r| (r.partition, r.offset)).collect()
    }

    #[test]
    fn records_received_before_a_resume_are_dropped_until_the_refetched_one_arrives() {
        // Partition 0 was halted at offset 10 and sought back to it: 11 and 12 were received
        // ahead, before the seek; then 10, 11, 12 come again from the broker.
        let mut resuming = HashMap::from([(("t".to_owned(), 0), 10)]);
        let not_halted = |_: &str, _: i32| false;
        let stale = hold_back(
            &[record(0, 11), record(1, 5), record(0, 12)],
            not_halted,
            &mut resuming,
        );
        assert_eq!(
            offsets(&stale),
            vec![(1, 5)],
            "only the other partition's record is kept"
        );
        assert!(
            resumed_from(&resuming, "t", 0).is_some(),
            "still waiting for offset 10"
        );
        let refetched = hold_back(
            &[record(0, 10), record(0, 11), record(0, 12)],
            not_halted,
            &mut resuming,
        );
        assert_eq!(offsets(&refetched), vec![(0, 10), (0, 11), (0, 12)]);
        assert!(
            resuming.is_empty(),
            "the resume ended at the refetched record"
        );
        // Once ended, nothing of the partition is dropped any more.
        let later = hold_back(&[record(0, 13)], not_halted, &mut resuming);
        assert_eq!(offsets(&later), vec![(0, 13)]);
    }

    #[test]
    fn a_record_before_the_offset_sought_ends_the_resume_and_is_kept() {
        // Fetched from an earlier committed offset (the partition was reassigned): applied in
        // order from there, never dropped.
        let mut resuming = HashMap::from([(("t".to_owned(), 0), 10)]);
        let kept = hold_back(&[record(0, 7), record(0, 8)], |_, _| false, &mut resuming);
        assert_eq!(offsets(&kept), vec![(0, 7), (0, 8)]);
        assert!(resuming.is_empty());
    }

    #[test]
    fn records_of_a_halted_partition_are_dropped() {
        let mut resuming = HashMap::new();
        let kept = hold_back(&[record(0, 1), record(1, 1)], |_, p| p == 0, &mut resuming);
        assert_eq!(offsets(&kept), vec![(1, 1)]);
    }
}
