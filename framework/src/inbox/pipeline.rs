//! What both transports share once records are in hand: apply a run of them in one
//! transaction, retry what may succeed later, and dead-letter (or halt on) what cannot, parking
//! the later messages of a dead-lettered key. The Kafka consumer and the feed consumer differ
//! only in how records arrive and how their position is kept.

use std::collections::HashSet;
use std::sync::Arc;

use rdkafka::producer::FutureProducer;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use super::apply::{Applier, Failure, Gap, Outcome, Record};
use super::config::{InboxConfig, InboxStats};
use super::dead_letters::DeadLetterStore;
use super::handler::Handler;
use super::retention;
use crate::codec::AvroCodec;
use crate::db::PgPool;
use crate::outbox::sleep_or_shutdown;

/// What finally happened to one record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Done {
    Applied,
    Duplicate,
    DeadLettered,
    Parked,
}

/// What to do with a message that can never be applied.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum OnPermanent {
    /// Record a dead letter, park its key's later messages, go on.
    DeadLetter,
    /// Stop before it: nothing after it is applied until an operator acts.
    Halt,
}

/// How far [`Pipeline::process_from`] got.
#[derive(Debug)]
pub(crate) enum Progress {
    /// This many leading records are finished (applied, duplicate, parked or dead-lettered).
    Done {
        /// How many.
        count: usize,
        /// They were applied or found duplicate by the applier, whose transaction also moved
        /// the feed position (when it keeps one); parked and dead-lettered records were not.
        by_applier: bool,
    },
    /// The first record cannot be applied and the pipeline halts on such records.
    Halted(Failure),
    /// The first record is numbered past the next number of its partition: the gap before
    /// it. Nothing of that partition after it may be applied until the gap is filled.
    Gap(Gap),
    /// Shutdown came while the first record was still failing; it is left for redelivery.
    Shutdown,
}

/// One record's fate, as [`Pipeline::process`] saw it.
enum Step {
    Finished(Done),
    Halted(Failure),
    Gap(Gap),
    Shutdown,
}

/// Where a consumer's records come from, and so how its position is kept: what its metrics
/// call the system, and how retention learns which applied ids are past redelivery.
#[derive(Debug, Clone)]
pub(crate) enum Transport {
    /// A Kafka consumer group: its position is the offsets it commits to the broker, after
    /// the inbox transaction.
    Kafka(crate::config::KafkaConfig),
    /// A producer's pulled feed, named so: its position is written in the inbox transaction.
    Feed(String),
}

impl Transport {
    /// The `messaging.system` its metrics carry.
    fn system(&self) -> &'static str {
        match self {
            Transport::Kafka(_) => "kafka",
            Transport::Feed(_) => "ferrybox_feed",
        }
    }

    /// Which of `config`'s applied ids are past redelivery now (see [`retention`]).
    async fn horizon(
        &self,
        pool: &PgPool,
        config: &InboxConfig,
    ) -> crate::Result<retention::Horizon> {
        match self {
            Transport::Kafka(kafka) => {
                retention::kafka_horizon(kafka, &config.group_id, &config.topics, config.retention)
                    .await
            }
            Transport::Feed(feed) => {
                let mut conn = crate::db::connection(pool).await?;
                let position =
                    crate::feed::position(&mut conn, config.consumer_name(), feed).await?;
                Ok(config
                    .topics
                    .iter()
                    .fold(retention::Horizon::none(), |h, topic| {
                        // The feed's records carry their position as the offset.
                        h.with(
                            topic,
                            crate::feed::FEED_PARTITION,
                            position.saturating_add(1),
                            config.retention,
                        )
                    }))
            }
        }
    }
}

/// Applies records through the inbox, with retries, dead letters and parking.
pub(crate) struct Pipeline<H> {
    pub(crate) applier: Applier<H>,
    pub(crate) dead_letters: DeadLetterStore,
    pub(crate) config: InboxConfig,
    pub(crate) stats: Arc<InboxStats>,
    pub(crate) on_permanent: OnPermanent,
    /// Told when dead letters cannot be stored and the partition waits on it.
    pub(crate) alerter: crate::alert::Alerter,
    pub(crate) transport: Transport,
}

/// Failed dead-letter writes (of a retryable kind) before an alert is raised; a permanent
/// failure (a dead-letter topic the consumer may not write, a record it will never take)
/// alerts at once.
const DEAD_LETTER_FAILURES_BEFORE_ALERT: u32 = 5;

impl<H: Handler> Pipeline<H> {
    /// A pipeline for `config`'s consumer of `transport` that dead-letters (to
    /// `dead_letter_topic` too, when given) what it cannot apply.
    pub(crate) fn new(
        pool: PgPool,
        codec: AvroCodec,
        handler: H,
        config: InboxConfig,
        transport: Transport,
        dead_letter_topic: Option<(FutureProducer, String)>,
    ) -> Self {
        Self {
            applier: Applier {
                pool: pool.clone(),
                codec,
                handler,
                readers: None,
                consumer: config.consumer_name().to_owned(),
                handler_timeout: config.handler_timeout,
                checkpoint: match &transport {
                    Transport::Feed(feed) => Some(feed.clone()),
                    Transport::Kafka(_) => None,
                },
                dedup: config.dedup,
            },
            dead_letters: DeadLetterStore {
                pool,
                consumer: config.consumer_name().to_owned(),
                consumer_version: config.consumer_version.clone(),
                topic: dead_letter_topic,
                dedup: config.dedup,
            },
            config,
            stats: Arc::default(),
            on_permanent: OnPermanent::DeadLetter,
            alerter: crate::alert::Alerter::log_only(),
            transport,
        }
    }

    /// Counts `n` records of `topic` finished as `done` in the stats and, when on, the metrics.
    fn counted(&self, done: Done, topic: &str, n: u64) {
        let (counter, outcome) = match done {
            Done::Applied => (&self.stats.applied, "applied"),
            Done::Duplicate => (&self.stats.duplicates, "duplicate"),
            Done::DeadLettered => (&self.stats.dead_lettered, "dead_lettered"),
            Done::Parked => (&self.stats.parked, "parked"),
        };
        InboxStats::add(counter, n);
        if let Some(m) = crate::metrics::instruments() {
            let mut attrs = self.metric_attrs(topic);
            attrs.push(opentelemetry::KeyValue::new("ferrybox.outcome", outcome));
            m.consumed.add(n, &attrs);
        }
    }

    /// The transport, topic and consumer group a record's metrics carry.
    fn metric_attrs(&self, topic: &str) -> Vec<opentelemetry::KeyValue> {
        vec![
            opentelemetry::KeyValue::new("messaging.system", self.transport.system()),
            opentelemetry::KeyValue::new("messaging.destination.name", topic.to_owned()),
            opentelemetry::KeyValue::new(
                "messaging.consumer.group.name",
                self.applier.consumer.clone(),
            ),
        ]
    }

    /// Deletes expired inbox rows in the background until `shutdown`, and (when metrics are
    /// on) reports the dead letters and the open gaps.
    pub(crate) fn spawn_cleaner(&self, shutdown: &CancellationToken) -> JoinHandle<()> {
        let cleaning = clean_periodically(
            self.applier.pool.clone(),
            self.config.clone(),
            self.transport.clone(),
            Arc::clone(&self.stats),
            shutdown.child_token(),
        );
        let reporting = report_gauges(
            super::DeadLetters::new(self.applier.pool.clone(), self.config.consumer_name()),
            super::Gaps::new(self.applier.pool.clone(), self.config.consumer_name()),
            self.applier.consumer.clone(),
            shutdown.child_token(),
        );
        tokio::spawn(async move {
            tokio::join!(cleaning, reporting);
        })
    }

    /// The keys of `records` held back by an open dead letter; `None` when the check failed.
    pub(crate) async fn blocked_keys(&self, records: &[Record]) -> Option<HashSet<String>> {
        let keys: Vec<String> = records.iter().filter_map(Record::key_text).collect();
        match self.dead_letters.blocked_keys(&keys).await {
            Ok(blocked) => Some(blocked),
            Err(e) => {
                tracing::warn!(error = %e, "could not check for parked keys");
                None
            }
        }
    }

    /// Finishes the leading records of `records`: a batch of those whose keys are not blocked,
    /// or (when the first is blocked or fails) that one record on its own, retried, parked or
    /// dead-lettered. Returns how many leading records are done; `None` on shutdown.
    ///
    /// `checked`: the blocked keys among `records`, when the caller looked them up already
    /// (since the last dead letter or parked message of this pipeline). A key found blocked
    /// that a redrive has freed meanwhile is not lost: parking checks again under its lock.
    pub(crate) async fn process_from(
        &self,
        records: &[Record],
        checked: Option<HashSet<String>>,
        shutdown: &CancellationToken,
    ) -> Progress {
        let blocked = match checked {
            Some(blocked) => blocked,
            None => match self.blocked_keys(records).await {
                Some(blocked) => blocked,
                // Unknown: every key is treated as blocked, so messages go one by one and
                // parking decides under each key's lock.
                None => records.iter().filter_map(Record::key_text).collect(),
            },
        };
        let run = records
            .iter()
            .take_while(|r| r.key_text().is_none_or(|k| !blocked.contains(&k)))
            .count();
        if run > 0 {
            let applied = self.applier.apply_batch(&records[..run]).await;
            // Counted by runs of one topic and outcome: one metric update per run, not per
            // message.
            let mut runs: Vec<(&str, Done, u64)> = Vec::new();
            for (outcome, record) in applied.outcomes.iter().zip(records) {
                let done = match outcome {
                    Outcome::Applied => Done::Applied,
                    Outcome::Duplicate => Done::Duplicate,
                };
                match runs.last_mut() {
                    Some((topic, d, n)) if *topic == record.topic && *d == done => *n += 1,
                    _ => runs.push((&record.topic, done, 1)),
                }
            }
            for (topic, done, n) in runs {
                self.counted(done, topic, n);
            }
            if !applied.outcomes.is_empty() {
                return Progress::Done {
                    count: applied.outcomes.len(),
                    by_applier: true,
                };
            }
            if let Some(gap) = applied.gap {
                return Progress::Gap(gap);
            }
        }
        // The first record is blocked or failed in the batch: handle it alone.
        let first_blocked = records[0].key_text().is_some_and(|k| blocked.contains(&k));
        match self.process(&records[0], first_blocked, shutdown).await {
            Step::Finished(done) => Progress::Done {
                count: 1,
                by_applier: matches!(done, Done::Applied | Done::Duplicate),
            },
            Step::Halted(failure) => Progress::Halted(failure),
            Step::Gap(gap) => Progress::Gap(gap),
            Step::Shutdown => Progress::Shutdown,
        }
    }

    /// Processes one record until it is applied, found duplicate, parked or dead-lettered (or,
    /// when halting on permanent failures, until it fails for good).
    async fn process(&self, record: &Record, blocked: bool, shutdown: &CancellationToken) -> Step {
        let mut attempt = 0u32;
        loop {
            attempt += 1;
            let failure = match self.try_once(record, blocked).await {
                Ok(done) => {
                    self.counted(done, &record.topic, 1);
                    return Step::Finished(done);
                }
                Err(Failure { gap: Some(gap), .. }) => return Step::Gap(*gap),
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
                if self.on_permanent == OnPermanent::Halt {
                    return Step::Halted(failure);
                }
                return match self
                    .dead_letter_until_stored(record, &failure, attempt, shutdown)
                    .await
                {
                    Some(done) => Step::Finished(done),
                    None => Step::Shutdown,
                };
            }
            InboxStats::add(&self.stats.retries, 1);
            if let Some(m) = crate::metrics::instruments() {
                m.retries.add(1, &self.metric_attrs(&record.topic));
            }
            let delay = self.config.backoff.delay(attempt);
            tracing::warn!(kind = failure.kind, error = %failure.error, attempt, ?delay,
                topic = record.topic, partition = record.partition, offset = record.offset, "message failed; retrying");
            if sleep_or_shutdown(delay, shutdown).await {
                return Step::Shutdown;
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
    /// topic is set) or shutdown comes; the offset moves on only once it is safe. Failures back
    /// off (up to the backoff's bound); one that cannot pass by itself, or that keeps failing,
    /// raises an alert once, since the partition waits on it.
    async fn dead_letter_until_stored(
        &self,
        record: &Record,
        failure: &Failure,
        attempts: u32,
        shutdown: &CancellationToken,
    ) -> Option<Done> {
        let mut write_attempt = 0u32;
        let mut alerted = false;
        loop {
            write_attempt += 1;
            let e = match self
                .dead_letters
                .record_dead(record, failure, attempts)
                .await
            {
                Ok(()) => {
                    tracing::error!(kind = failure.kind, error = %failure.error,
                        topic = record.topic, partition = record.partition, offset = record.offset, "message dead-lettered");
                    self.counted(Done::DeadLettered, &record.topic, 1);
                    return Some(Done::DeadLettered);
                }
                Err(e) => e,
            };
            let delay = self.config.backoff.delay(write_attempt);
            tracing::warn!(error = %e, retryable = e.is_retryable(), attempt = write_attempt, ?delay,
                "could not record the dead letter; the offset stays");
            if !alerted && (!e.is_retryable() || write_attempt >= DEAD_LETTER_FAILURES_BEFORE_ALERT)
            {
                alerted = true;
                self.alerter
                    .raise(&crate::alert::Alert::new(
                        format!("{} inbox consumer", self.applier.consumer),
                        "dead_letter_write_failing",
                        format!(
                            "dead letter for {}/{}@{} cannot be stored; the partition waits",
                            record.topic, record.partition, record.offset
                        ),
                        serde_json::json!({
                            "consumer": self.applier.consumer,
                            "topic": record.topic,
                            "partition": record.partition,
                            "offset": record.offset,
                            "error": e.to_string(),
                            "retryable": e.is_retryable(),
                            "attempts": write_attempt,
                        }),
                    ))
                    .await;
            }
            if sleep_or_shutdown(delay, shutdown).await {
                return None;
            }
        }
    }
}

async fn clean_periodically(
    pool: PgPool,
    config: InboxConfig,
    transport: Transport,
    stats: Arc<InboxStats>,
    shutdown: CancellationToken,
) {
    while !sleep_or_shutdown(config.cleanup_interval, &shutdown).await {
        let cleaned = match transport.horizon(&pool, &config).await {
            Ok(horizon) => {
                retention::expire(&pool, config.consumer_name(), &horizon, config.retention).await
            }
            Err(e) => Err(e),
        };
        match cleaned {
            Ok(expired) if expired.ids == 0 => {}
            Ok(expired) => {
                tracing::info!(
                    ids = expired.ids,
                    generations = expired.generations,
                    "expired inbox ids dropped"
                );
                InboxStats::add(&stats.cleaned, expired.ids);
            }
            Err(e) => tracing::warn!(error = %e, "inbox cleanup failed; will try again"),
        }
    }
}

/// How often the dead-letter and gap gauges are measured.
const GAUGE_INTERVAL: std::time::Duration = std::time::Duration::from_secs(15);

/// Records the open dead letters, parked messages, blocked keys and open gaps every
/// `GAUGE_INTERVAL` until `shutdown`; nothing when metrics are off.
async fn report_gauges(
    letters: super::DeadLetters,
    gaps: super::Gaps,
    consumer: String,
    shutdown: CancellationToken,
) {
    let Some(m) = crate::metrics::instruments() else {
        return;
    };
    let group = opentelemetry::KeyValue::new("messaging.consumer.group.name", consumer);
    loop {
        match letters.counts().await {
            Ok(counts) => {
                for (status, n) in [("dead", counts.dead), ("parked", counts.parked)] {
                    m.dead_letters.record(
                        u64::try_from(n).unwrap_or(0),
                        &[
                            group.clone(),
                            opentelemetry::KeyValue::new("ferrybox.status", status),
                        ],
                    );
                }
                m.blocked_keys.record(
                    u64::try_from(counts.blocked_keys).unwrap_or(0),
                    std::slice::from_ref(&group),
                );
            }
            Err(e) => tracing::debug!(error = %e, "dead letters not counted; trying again"),
        }
        match gaps.open_count().await {
            Ok(open) => m.open_gaps.record(open, std::slice::from_ref(&group)),
            Err(e) => tracing::debug!(error = %e, "gaps not counted; trying again"),
        }
        if sleep_or_shutdown(GAUGE_INTERVAL, &shutdown).await {
            return;
        }
    }
}
