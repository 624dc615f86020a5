//! The relay: publishes committed outbox rows to Kafka and marks them published only after the
//! broker acknowledged them.
//!
//! One relay is active per outbox at a time: an instance becomes active by taking a PostgreSQL
//! advisory lock on a connection it keeps, and stays active while that connection lives. Other
//! instances (in the same process or others) wait on standby and take over within
//! `standby_interval` when it dies; a killed process's connection closes and its lock goes with
//! it. A row is marked published only after the broker acknowledged it (true whichever
//! connection writes it): the active relay records one batch on a second connection while it
//! sends the next, except after a failed batch, which is recorded before anything else is sent.
//!
//! The relay never reads `WHERE id > last_seen`: it claims *unpublished* rows in id order, so
//! a row whose transaction commits late is published on the next pass instead of being skipped.
//! [`Outbox::enqueue`](super::Outbox::enqueue) serializes transactions per key, so for one key
//! id order is commit order.
//!
//! The active relay wakes on `LISTEN/NOTIFY` and also polls every `poll_interval`, so a lost
//! notification (or an outbox written without notify) only costs latency. Writers notify only
//! while a relay waits for work: before it waits, the relay takes the waiting lock (see
//! `RELAY_WAITING_LOCK` in the enqueue module) and looks once more; busy, it costs writers
//! nothing.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use diesel::prelude::*;
use diesel::sql_types::{Array, BigInt, Bool, Integer, Nullable, Text};
use diesel_async::{AsyncConnection, AsyncPgConnection, RunQueryDsl, SimpleAsyncConnection};
use futures::StreamExt;
use rdkafka::producer::{FutureProducer, FutureRecord, Producer};
use secrecy::ExposeSecret;
use serde::{Deserialize, Serialize};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use super::enqueue::{NOTIFY_CHANNEL, RELAY_WAITING_LOCK};
use super::schema::ferrybox_outbox;
use super::sent_log;
use crate::config::{Backoff, DatabaseConfig, KafkaConfig, duration_ms};
use crate::error::{Error, Result};

/// How the relay batches, waits and keeps the sent log.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RelayConfig {
    /// Rows claimed and sent per batch. Also bounds the relay's memory.
    pub batch_size: i64,
    /// Wake on the outbox's `NOTIFY` as well as by polling.
    pub listen: bool,
    /// How long to wait before looking again when the outbox is empty (the fallback when
    /// listening, the only wake-up otherwise).
    #[serde(with = "duration_ms", rename = "poll_interval_ms")]
    pub poll_interval: Duration,
    /// How often a standby instance tries to become the active relay: the longest a dead
    /// instance's work waits for another one.
    #[serde(with = "duration_ms", rename = "standby_interval_ms")]
    pub standby_interval: Duration,
    /// Delay between attempts after a failed batch (broker or database trouble).
    pub backoff: Backoff,
    /// How long published rows stay in the sent log (for `replay`).
    #[serde(with = "duration_ms", rename = "retention_ms")]
    pub retention: Duration,
    /// How often the active relay deletes expired rows.
    #[serde(with = "duration_ms", rename = "cleanup_interval_ms")]
    pub cleanup_interval: Duration,
}

impl Default for RelayConfig {
    fn default() -> Self {
        Self {
            batch_size: 5_000,
            listen: true,
            poll_interval: Duration::from_millis(500),
            standby_interval: Duration::from_secs(1),
            backoff: Backoff {
                initial: Duration::from_millis(200),
                max: Duration::from_secs(10),
            },
            retention: Duration::from_secs(7 * 24 * 3600),
            cleanup_interval: Duration::from_secs(60),
        }
    }
}

impl RelayConfig {
    /// Checks the settings make sense.
    pub fn validate(&self) -> Result<()> {
        if self.batch_size < 1 {
            return Err(Error::Config("relay.batch_size must be at least 1".into()));
        }
        if self.poll_interval.is_zero()
            || self.standby_interval.is_zero()
            || self.cleanup_interval.is_zero()
        {
            return Err(Error::Config("relay intervals must be above zero".into()));
        }
        if self.retention.is_zero() {
            return Err(Error::Config(
                "relay.retention_ms must be above zero: the sent log is what replay reads".into(),
            ));
        }
        Ok(())
    }
}

/// What one batch did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct BatchOutcome {
    /// Rows acknowledged by the broker and marked published.
    pub published: usize,
    /// Rows the broker did not acknowledge; they stay unpublished with the error recorded.
    pub failed: usize,
}

/// The advisory lock that makes one relay active per database ("ferr", "ybox"). It uses the
/// two-key form, which PostgreSQL keeps apart from the one-key locks `enqueue` takes per key.
const RELAY_LOCK: (i32, i32) = (0x6665_7272, 0x7962_6f78);

/// How often the active relay measures the backlog for the metrics (when they are on).
const BACKLOG_GAUGE_INTERVAL: Duration = Duration::from_secs(5);

/// An outbox row as the relay (and replay) sends it.
#[derive(Queryable, Selectable)]
#[diesel(table_name = ferrybox_outbox)]
pub(super) struct OutboxRecord {
    pub(super) id: i64,
    message_id: uuid::Uuid,
    topic: String,
    message_key: String,
    message_type: String,
    entity_version: i64,
    occurred_at: chrono::DateTime<chrono::Utc>,
    headers: serde_json::Value,
    payload: Vec<u8>,
}

impl OutboxRecord {
    pub(super) fn topic(&self) -> &str {
        &self.topic
    }

    /// The headers the record is sent with (see [`envelope_headers`]).
    pub(super) fn headers(&self) -> BTreeMap<String, String> {
        envelope_headers(
            &self.headers,
            self.id,
            self.message_id,
            &self.message_type,
            &self.message_key,
            self.entity_version,
            self.occurred_at,
        )
    }
}

/// The headers an outbox row goes out with, on Kafka and on the feed: the stored ones, with
/// the CloudEvents headers the row's own columns determine (id, type, subject, time, entity
/// version) filled in from those columns where they are missing. Stored headers that are not a JSON object of text
/// are read leniently (numbers and booleans as text, the rest left out, with a warning), so a
/// damaged row still carries what a consumer needs to deduplicate and decode it.
pub(crate) fn envelope_headers(
    stored: &serde_json::Value,
    row: i64,
    message_id: uuid::Uuid,
    message_type: &str,
    key: &str,
    entity_version: i64,
    occurred_at: chrono::DateTime<chrono::Utc>,
) -> BTreeMap<String, String> {
    use crate::message::headers as h;
    let mut map = BTreeMap::<String, String>::deserialize(stored).unwrap_or_else(|e| {
        tracing::warn!(id = row, %message_id, error = %e,
            "stored headers are not a map of text; sending what can be read and the row's own envelope");
        lenient_headers(stored)
    });
    // `enqueue` stored these from the same columns: an intact row costs no formatting here.
    let mut fill = |name: &str, value: &dyn Fn() -> String| {
        if !map.contains_key(name) {
            map.insert(name.to_owned(), value());
        }
    };
    fill(h::ID, &|| message_id.to_string());
    fill(h::TYPE, &|| message_type.to_owned());
    fill(h::SUBJECT, &|| key.to_owned());
    fill(h::ENTITY_VERSION, &|| entity_version.to_string());
    fill(h::TIME, &|| {
        occurred_at.to_rfc3339_opts(chrono::SecondsFormat::Micros, true)
    });
    fill(h::SPEC_VERSION, &|| "1.0".to_owned());
    fill(h::CONTENT_TYPE, &|| h::AVRO_CONTENT_TYPE.to_owned());
    map
}

/// The text, number and boolean entries of a JSON object; nothing from anything else.
fn lenient_headers(stored: &serde_json::Value) -> BTreeMap<String, String> {
    let Some(object) = stored.as_object() else {
        return BTreeMap::new();
    };
    object
        .iter()
        .filter_map(|(name, value)| {
            let text = match value {
                serde_json::Value::String(s) => s.clone(),
                serde_json::Value::Number(n) => n.to_string(),
                serde_json::Value::Bool(b) => b.to_string(),
                _ => return None,
            };
            Some((name.clone(), text))
        })
        .collect()
}

/// Queues every record with `producer` (librdkafka pipelines them), then awaits each delivery
/// report: the acknowledged (partition, offset) or the error, in the records' order.
pub(super) async fn send_all(
    producer: &FutureProducer,
    records: &[OutboxRecord],
) -> Vec<std::result::Result<(i32, i64), String>> {
    let mut in_flight = Vec::with_capacity(records.len());
    for row in records {
        let record = FutureRecord::to(&row.topic)
            .key(&row.message_key)
            .payload(&row.payload)
            .headers(crate::kafka::owned_headers(&row.headers()));
        in_flight.push(producer.send_result(record).map_err(|(e, _)| e.to_string()));
    }
    let mut results = Vec::with_capacity(records.len());
    for sent in in_flight {
        results.push(match sent {
            Ok(delivery) => match delivery.await {
                Ok(Ok(d)) => Ok((d.partition, d.offset)),
                Ok(Err((e, _))) => Err(e.to_string()),
                Err(_) => Err("delivery report lost: producer closed".to_owned()),
            },
            Err(e) => Err(e),
        });
    }
    results
}

#[derive(QueryableByName)]
struct Locked {
    #[diesel(sql_type = Bool)]
    locked: bool,
}

/// Where the relay sends rows.
enum Sink {
    Kafka {
        config: KafkaConfig,
        /// Replaced after a failed batch (see [`Relay::renew_producer`]).
        producer: Mutex<FutureProducer>,
    },
    /// No broker: rows only get their feed positions, for services that serve the pulled
    /// event feed alone.
    FeedOnly,
}

/// Publishes the outbox to Kafka. See the module documentation for the guarantees.
pub struct Relay {
    database: DatabaseConfig,
    sink: Sink,
    config: RelayConfig,
}

impl std::fmt::Debug for Relay {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Relay")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

impl Relay {
    /// A relay for the outbox in `database`, publishing with a durable producer.
    pub fn new(database: DatabaseConfig, kafka: &KafkaConfig, config: RelayConfig) -> Result<Self> {
        database.validate()?;
        kafka.validate()?;
        config.validate()?;
        Ok(Self {
            database,
            sink: Sink::Kafka {
                config: kafka.clone(),
                producer: Mutex::new(crate::kafka::durable_producer(kafka)?),
            },
            config,
        })
    }

    /// A relay for a service without a broker: it records committed rows in the sent log and
    /// gives them their [feed](crate::feed) positions, with the same ordering, leadership and
    /// retention as a Kafka relay, and sends them nowhere.
    pub fn feed_only(database: DatabaseConfig, config: RelayConfig) -> Result<Self> {
        database.validate()?;
        config.validate()?;
        Ok(Self {
            database,
            sink: Sink::FeedOnly,
            config,
        })
    }

    /// Runs until `shutdown` is cancelled: waits to become the active relay, then publishes
    /// batch after batch and keeps the sent log within its retention. A batch in flight when
    /// shutdown comes is finished (its delivery reports awaited and recorded) before this
    /// returns.
    pub async fn run(&self, shutdown: CancellationToken) -> Result<()> {
        let mut failures = 0u32;
        while !shutdown.is_cancelled() {
            let result = match self.become_active(&shutdown).await {
                Ok(Some(mut conn)) => {
                    tracing::info!("relay is active");
                    failures = 0;
                    self.publish_until_shutdown(&mut conn, &shutdown).await
                }
                Ok(None) => return Ok(()),
                Err(e) => Err(e),
            };
            match result {
                Ok(()) => return Ok(()),
                Err(e) => {
                    failures += 1;
                    let delay = self.config.backoff.delay(failures);
                    tracing::warn!(error = %e, ?delay, "relay lost its database connection; retrying");
                    if sleep_or_shutdown(delay, &shutdown).await {
                        return Ok(());
                    }
                }
            }
        }
        Ok(())
    }

    /// A connection of the relay's own, named so operators can see in `pg_stat_activity`
    /// which process holds the relay lock.
    async fn connect(&self) -> Result<AsyncPgConnection> {
        let mut conn = crate::db::establish(self.database.url.expose_secret())
            .await
            .map_err(|e| Error::Pool(e.to_string()))?;
        conn.batch_execute(&format!(
            "SET application_name = 'ferrybox relay (pid {})'",
            std::process::id()
        ))
        .await?;
        Ok(conn)
    }

    /// Opens a dedicated connection and holds the relay lock on it; `None` on shutdown.
    async fn become_active(
        &self,
        shutdown: &CancellationToken,
    ) -> Result<Option<AsyncPgConnection>> {
        let mut conn = self.connect().await?;
        loop {
            let got: Locked = diesel::sql_query("SELECT pg_try_advisory_lock($1, $2) AS locked")
                .bind::<Integer, _>(RELAY_LOCK.0)
                .bind::<Integer, _>(RELAY_LOCK.1)
                .get_result(&mut conn)
                .await?;
            if got.locked {
                return Ok(Some(conn));
            }
            tracing::debug!("another relay is active; standing by");
            if sleep_or_shutdown(self.config.standby_interval, shutdown).await {
                return Ok(None);
            }
        }
    }

    async fn publish_until_shutdown(
        &self,
        conn: &mut AsyncPgConnection,
        shutdown: &CancellationToken,
    ) -> Result<()> {
        let wake = Arc::new(Notify::new());
        let listening = shutdown.child_token();
        // Stops the listener however this function ends, also when its future is dropped.
        let _stop_listening = listening.clone().drop_guard();
        let listener = tokio_util::task::TaskTracker::new();
        if self.config.listen {
            let url = self.database.url.expose_secret().to_owned();
            let wake = Arc::clone(&wake);
            let backoff = self.config.backoff;
            let wake_up = move || wake.notify_one();
            listener.spawn(listen(
                url,
                NOTIFY_CHANNEL,
                wake_up,
                backoff,
                listening.clone(),
            ));
        }
        listener.close();
        let published = self.publish_loop(conn, &wake, shutdown).await;
        // However publishing ended, the listener stops and is waited for.
        listening.cancel();
        listener.wait().await;
        published
    }

    /// Publishes batch after batch (woken by `wake` or polling) until `shutdown`.
    async fn publish_loop(
        &self,
        conn: &mut AsyncPgConnection,
        wake: &Notify,
        shutdown: &CancellationToken,
    ) -> Result<()> {
        // Batches are recorded on a second connection while the next one is sent, so the
        // database work of one overlaps the broker round trip of the other. (Marking needs no
        // lock: a row marked after its acknowledgement is true whoever marks it.)
        let mut marker = self.connect().await?;
        let mut next_cleanup = tokio::time::Instant::now();
        let mut next_gauges = tokio::time::Instant::now();
        let mut failed_batches = 0u32;
        // A batch sent and acknowledged (or failed) but not recorded yet.
        let mut sent = Sent::default();
        // Holding the waiting lock: writers notify.
        let mut waiting = false;
        while !shutdown.is_cancelled() {
            if tokio::time::Instant::now() >= next_cleanup && self.clean_some(conn).await? {
                next_cleanup = tokio::time::Instant::now() + self.config.cleanup_interval;
            }
            if let Some(m) = crate::metrics::instruments()
                && tokio::time::Instant::now() >= next_gauges
            {
                let (rows, age, errors) = sent_log::backlog(conn).await?;
                m.outbox_backlog
                    .record(u64::try_from(rows).unwrap_or(0), &[]);
                m.outbox_oldest_age.record(age, &[]);
                m.outbox_errors
                    .record(u64::try_from(errors).unwrap_or(0), &[]);
                next_gauges = tokio::time::Instant::now() + BACKLOG_GAUGE_INTERVAL;
            }
            if !sent.failed.is_empty() {
                // The broker is down or refusing: record it, then back off, ignoring wake-ups
                // meanwhile. Nothing else is sent before the failure is recorded.
                self.record(&mut marker, &std::mem::take(&mut sent)).await?;
                failed_batches += 1;
                let delay = self.config.backoff.delay(failed_batches);
                if sleep_or_shutdown(delay, shutdown).await {
                    break;
                }
                continue;
            }
            failed_batches = 0;
            if sent.is_empty() {
                sent = self.send_batch(conn, &[]).await?;
                if !sent.is_empty() {
                    if waiting {
                        waiting = false;
                        self.stop_waiting(conn).await?;
                    }
                    continue;
                }
                if self.config.listen && !waiting {
                    // Rows of writers that did not notify are committed once the lock is
                    // granted: look once more before waiting.
                    waiting = self.start_waiting(conn).await;
                    if waiting {
                        continue;
                    }
                }
                tokio::select! {
                    () = shutdown.cancelled() => break,
                    () = tokio::time::sleep(self.config.poll_interval) => {}
                    () = wake.notified() => {}
                }
                continue;
            }
            let previous = std::mem::take(&mut sent);
            let (recorded, next) = tokio::join!(
                self.record(&mut marker, &previous),
                self.send_batch(conn, &previous.acked)
            );
            recorded?;
            sent = next?;
        }
        // Shutdown: what was sent is recorded before the relay lets go.
        self.record(&mut marker, &sent).await?;
        if waiting {
            self.stop_waiting(conn).await?;
        }
        Ok(())
    }

    /// Takes the waiting lock, so that writers notify from now on. Waits (up to
    /// `poll_interval`) for the transactions that hold it shared: those enqueued without
    /// notifying, and are committed (or gone) once it is granted. False when it was not
    /// granted in time (a long transaction holds it): the relay then polls this round.
    async fn start_waiting(&self, conn: &mut AsyncPgConnection) -> bool {
        let (class, object) = RELAY_WAITING_LOCK;
        let timeout_ms = self.config.poll_interval.as_millis().max(1);
        // One implicit transaction: the timeout is local to it, the lock is the session's.
        let sql = format!(
            "SET LOCAL lock_timeout = {timeout_ms}; SELECT pg_advisory_lock({class}, {object})"
        );
        match conn.batch_execute(&sql).await {
            Ok(()) => true,
            Err(e) => {
                tracing::debug!(error = %e, "relay waiting lock not granted in time; polling");
                false
            }
        }
    }

    /// Lets go of the waiting lock: the relay is busy, writers need not notify.
    async fn stop_waiting(&self, conn: &mut AsyncPgConnection) -> Result<()> {
        let (class, object) = RELAY_WAITING_LOCK;
        diesel::sql_query("SELECT pg_advisory_unlock($1, $2)")
            .bind::<Integer, _>(class)
            .bind::<Integer, _>(object)
            .execute(conn)
            .await?;
        Ok(())
    }

    /// Retention in short statements between batches, so publishing never waits long: at most
    /// one publishing batch's worth of rows per pass (enough to keep up with expiry while the
    /// relay publishes at full speed). True when nothing expired is left.
    async fn clean_some(&self, conn: &mut AsyncPgConnection) -> Result<bool> {
        let batch = sent_log::CLEANUP_BATCH;
        let statements = self.config.batch_size / batch + 1;
        let mut deleted = 0;
        for _ in 0..statements {
            let went = sent_log::delete_expired_batch(conn, self.config.retention, batch).await?;
            deleted += went;
            if went < u64::try_from(batch).unwrap_or(0) {
                tracing::debug!(deleted, "sent log: expired rows deleted");
                return Ok(true);
            }
        }
        tracing::debug!(deleted, "sent log: expired rows deleted; more to go");
        Ok(false)
    }

    /// Publishes batches until the outbox has no unpublished row left or a batch fails;
    /// returns the totals. For tools and tests; [`Relay::run`] is what services use.
    pub async fn publish_pending(&self, conn: &mut AsyncPgConnection) -> Result<BatchOutcome> {
        let mut total = BatchOutcome::default();
        loop {
            let outcome = self.publish_batch(conn).await?;
            total.published += outcome.published;
            total.failed += outcome.failed;
            if outcome.published == 0 || outcome.failed > 0 {
                return Ok(total);
            }
        }
    }

    fn producer(&self) -> Option<FutureProducer> {
        match &self.sink {
            Sink::Kafka { producer, .. } => Some(
                producer
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner)
                    .clone(),
            ),
            Sink::FeedOnly => None,
        }
    }

    /// Starts a new producer after a failed batch. The idempotent producer's state (producer
    /// id, sequence numbers) may no longer match the broker's: after a fatal error it refuses
    /// every message, and a broker that restarted or failed over can keep refusing an old
    /// producer's sequence. Every row of the batch is unmarked and retried, so nothing is lost,
    /// and a fresh producer costs only a connection.
    fn renew_producer(&self, old: &FutureProducer) -> Result<()> {
        let Sink::Kafka { config, producer } = &self.sink else {
            return Ok(());
        };
        match old.client().fatal_error() {
            Some((code, reason)) => {
                tracing::error!(%code, %reason, "kafka producer hit a fatal error; starting a new one");
            }
            None => tracing::info!("starting a new kafka producer after a failed batch"),
        }
        let renewed = crate::kafka::durable_producer(config)?;
        *producer
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = renewed;
        Ok(())
    }

    /// Publishes one batch of unpublished rows, in id order: sends them all, awaits every
    /// delivery report, then marks the acknowledged rows published (with partition and offset)
    /// in one statement and records attempts and the error on the others.
    ///
    /// Call it from the active relay only (or in tests); [`Relay::run`] takes care of that.
    pub async fn publish_batch(&self, conn: &mut AsyncPgConnection) -> Result<BatchOutcome> {
        let sent = self.send_batch(conn, &[]).await?;
        self.record(conn, &sent).await
    }

    /// Claims the next batch of unpublished rows in id order (leaving out `in_flight`, rows
    /// sent but not yet recorded), sends them all, then awaits every delivery report.
    async fn send_batch(&self, conn: &mut AsyncPgConnection, in_flight: &[i64]) -> Result<Sent> {
        // The in-flight rows are left out here rather than in SQL (`id <> ALL($1)` compares
        // every row with every in-flight id): read that many more and drop them.
        let extra = i64::try_from(in_flight.len()).unwrap_or(i64::MAX);
        let mut rows: Vec<OutboxRecord> = ferrybox_outbox::table
            .filter(ferrybox_outbox::published_at.is_null())
            .order(ferrybox_outbox::id.asc())
            .limit(self.config.batch_size.saturating_add(extra))
            .select(OutboxRecord::as_select())
            .load(conn)
            .await?;
        if !in_flight.is_empty() {
            let skip: std::collections::HashSet<i64> = in_flight.iter().copied().collect();
            rows.retain(|row| !skip.contains(&row.id));
            rows.truncate(usize::try_from(self.config.batch_size).unwrap_or(usize::MAX));
        }
        // Send the whole batch, then wait. The idempotent producer keeps each partition's
        // order and retries without duplicating; when the broker stays away, messages time out
        // (`message.timeout.ms`) oldest first, so a key's later rows fail with its earlier ones
        // and are retried together.
        let Some(producer) = self.producer() else {
            return Ok(Sent {
                acked: rows.iter().map(|row| row.id).collect(),
                partitions: vec![None; rows.len()],
                offsets: vec![None; rows.len()],
                ..Sent::default()
            });
        };
        let mut sent = Sent::default();
        let results = if crate::telemetry::tracing_enabled() {
            let headers: Vec<BTreeMap<String, String>> =
                rows.iter().map(OutboxRecord::headers).collect();
            let span = crate::telemetry::batch_span("publish", "producer", &headers);
            tracing::Instrument::instrument(send_all(&producer, &rows), span).await
        } else {
            send_all(&producer, &rows).await
        };
        if let Some(m) = crate::metrics::instruments() {
            record_sent(m, &rows, &results);
        }
        for (row, result) in rows.iter().zip(results) {
            match result {
                Ok((partition, offset)) => {
                    sent.acked.push(row.id);
                    sent.partitions.push(Some(partition));
                    sent.offsets.push(Some(offset));
                }
                Err(e) => {
                    sent.failed.push(row.id);
                    sent.errors.push(e);
                }
            }
        }
        if !sent.failed.is_empty() {
            self.renew_producer(&producer)?;
        }
        Ok(sent)
    }

    /// Marks the acknowledged rows published (with partition, offset and feed position) and
    /// records attempts and the error on the others, one statement each.
    async fn record(&self, conn: &mut AsyncPgConnection, sent: &Sent) -> Result<BatchOutcome> {
        let outcome = BatchOutcome {
            published: sent.acked.len(),
            failed: sent.failed.len(),
        };
        // One call marks the rows and hands out their feed positions in id order (see the
        // `ferrybox-0005_feed` migration). A row sent again (after a crash before its mark, or
        // by an instance that lost the lock mid-batch) keeps the position it had.
        if !sent.acked.is_empty() {
            crate::db::prepared(
                diesel::sql_query("SELECT ferrybox_mark_published($1, $2, $3)")
                    .bind::<Array<BigInt>, _>(&sent.acked)
                    .bind::<Array<Nullable<Integer>>, _>(&sent.partitions)
                    .bind::<Array<Nullable<BigInt>>, _>(&sent.offsets),
            )
            .execute(conn)
            .await?;
        }
        if !sent.failed.is_empty() {
            tracing::warn!(
                failed = outcome.failed,
                first_error = %sent.errors[0],
                "broker did not acknowledge messages; they stay unpublished"
            );
            diesel::sql_query(
                "UPDATE ferrybox_outbox AS o \
                 SET attempts = o.attempts + 1, last_error = u.e \
                 FROM unnest($1::bigint[], $2::text[]) AS u(id, e) \
                 WHERE o.id = u.id AND o.id = ANY($1)",
            )
            .bind::<Array<BigInt>, _>(&sent.failed)
            .bind::<Array<Text>, _>(&sent.errors)
            .execute(conn)
            .await?;
        }
        Ok(outcome)
    }
}

/// Counts a batch's sends per topic, acknowledged and refused.
fn record_sent(
    m: &crate::metrics::Instruments,
    rows: &[OutboxRecord],
    results: &[std::result::Result<(i32, i64), String>],
) {
    let mut counts: BTreeMap<&str, (u64, u64)> = BTreeMap::new();
    for (row, result) in rows.iter().zip(results) {
        let c = counts.entry(row.topic.as_str()).or_default();
        if result.is_ok() {
            c.0 += 1;
        } else {
            c.1 += 1;
        }
    }
    for (topic, (acked, refused)) in counts {
        let attrs = crate::metrics::kafka_attrs(topic);
        m.sent.add(acked, &attrs);
        if refused > 0 {
            let mut failed = attrs.to_vec();
            failed.push(opentelemetry::KeyValue::new(
                "error.type",
                "delivery_failed",
            ));
            m.sent.add(refused, &failed);
        }
    }
}

/// What a sent batch came back with: acknowledged rows with their positions, and failed rows
/// with their errors.
#[derive(Default)]
struct Sent {
    acked: Vec<i64>,
    /// `None` for a feed-only relay.
    partitions: Vec<Option<i32>>,
    offsets: Vec<Option<i64>>,
    failed: Vec<i64>,
    errors: Vec<String>,
}

impl Sent {
    fn is_empty(&self) -> bool {
        self.acked.is_empty() && self.failed.is_empty()
    }
}

/// Keeps a connection listening on `channel` and calls `wake` for each notification (and once
/// after each (re)connection, for what was committed while no one listened), reconnecting
/// when the connection fails, until `stop`.
pub(crate) async fn listen(
    url: String,
    channel: &'static str,
    wake: impl Fn() + Send,
    backoff: Backoff,
    stop: CancellationToken,
) {
    let mut failures = 0u32;
    while !stop.is_cancelled() {
        let error = match listen_once(&url, channel, &wake, &stop).await {
            Ok(()) => return,
            Err(e) => e,
        };
        failures += 1;
        let delay = backoff.delay(failures);
        tracing::warn!(error = %error, ?delay, channel, "listener lost its connection; polling until it is back");
        if sleep_or_shutdown(delay, &stop).await {
            return;
        }
    }
}

/// How often the listener checks its connection is alive.
const LISTEN_HEALTH_CHECK: Duration = Duration::from_secs(10);

async fn listen_once(
    url: &str,
    channel: &str,
    wake: &(impl Fn() + Send),
    stop: &CancellationToken,
) -> Result<()> {
    let mut conn = AsyncPgConnection::establish(url)
        .await
        .map_err(|e| Error::Pool(e.to_string()))?;
    conn.batch_execute(&format!("LISTEN {channel}")).await?;
    // Rows may have been committed while no one listened.
    wake();
    loop {
        let next = {
            let mut notifications = std::pin::pin!(conn.notifications_stream());
            tokio::select! {
                () = stop.cancelled() => return Ok(()),
                next = notifications.next() => Some(next),
                () = tokio::time::sleep(LISTEN_HEALTH_CHECK) => None,
            }
        };
        match next {
            Some(Some(Ok(_))) => wake(),
            Some(Some(Err(e))) => return Err(e.into()),
            Some(None) => return Err(Error::Pool("notification stream ended".into())),
            None => conn.batch_execute("SELECT 1").await?,
        }
    }
}

/// Sleeps for `delay`; true when shutdown came first.
pub(crate) async fn sleep_or_shutdown(delay: Duration, shutdown: &CancellationToken) -> bool {
    tokio::select! {
        () = shutdown.cancelled() => true,
        () = tokio::time::sleep(delay) => false,
    }
}
