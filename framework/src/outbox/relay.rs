//! The relay: publishes committed outbox rows to Kafka and marks them published only after the
//! broker acknowledged them.
//!
//! One relay is active per outbox at a time: an instance becomes active by taking a PostgreSQL
//! advisory lock on a connection it keeps, and stays active while that connection lives. Other
//! instances wait on standby and take over within `standby_interval` when it dies. The relay
//! never reads `WHERE id > last_seen`: it claims *unpublished* rows in id order, so a row whose
//! transaction commits late is published on the next pass instead of being skipped.

use std::collections::BTreeMap;
use std::time::Duration;

use diesel::prelude::*;
use diesel::sql_types::{Array, BigInt, Bool, Integer, Text};
use diesel_async::{AsyncConnection, AsyncPgConnection, RunQueryDsl};
use rdkafka::message::OwnedHeaders;
use rdkafka::producer::{FutureProducer, FutureRecord};
use secrecy::ExposeSecret;
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;

use super::schema::ferrybox_outbox;
use crate::config::{Backoff, DatabaseConfig, KafkaConfig, duration_ms};
use crate::error::{Error, Result};

/// How the relay batches and waits.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RelayConfig {
    /// Rows claimed and sent per batch.
    pub batch_size: i64,
    /// How long to wait before looking again when the outbox is empty.
    #[serde(with = "duration_ms", rename = "poll_interval_ms")]
    pub poll_interval: Duration,
    /// How often a standby instance tries to become the active relay.
    #[serde(with = "duration_ms", rename = "standby_interval_ms")]
    pub standby_interval: Duration,
    /// Delay between attempts after a failed batch (broker or database trouble).
    pub backoff: Backoff,
}

impl Default for RelayConfig {
    fn default() -> Self {
        Self {
            batch_size: 500,
            poll_interval: Duration::from_millis(100),
            standby_interval: Duration::from_secs(1),
            backoff: Backoff {
                initial: Duration::from_millis(200),
                max: Duration::from_secs(10),
            },
        }
    }
}

impl RelayConfig {
    /// Checks the settings make sense.
    pub fn validate(&self) -> Result<()> {
        if self.batch_size < 1 {
            return Err(Error::Config("relay.batch_size must be at least 1".into()));
        }
        if self.poll_interval.is_zero() || self.standby_interval.is_zero() {
            return Err(Error::Config("relay intervals must be above zero".into()));
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

/// The advisory lock key that makes one relay active per database: "ferrybox" in ASCII.
const RELAY_LOCK_KEY: i64 = 0x6665_7272_7962_6f78;

#[derive(Queryable)]
struct PendingRow {
    id: i64,
    topic: String,
    message_key: String,
    headers: serde_json::Value,
    payload: Vec<u8>,
}

#[derive(QueryableByName)]
struct Locked {
    #[diesel(sql_type = Bool)]
    locked: bool,
}

/// Publishes the outbox to Kafka. See the module documentation for the guarantees.
pub struct Relay {
    database: DatabaseConfig,
    producer: FutureProducer,
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
            producer: crate::kafka::durable_producer(kafka)?,
            config,
        })
    }

    /// Runs until `shutdown` is cancelled: waits to become the active relay, then publishes
    /// batch after batch. A batch in flight when shutdown comes is finished (its delivery
    /// reports awaited and recorded) before this returns.
    pub async fn run(&self, shutdown: CancellationToken) -> Result<()> {
        let mut failures = 0u32;
        while !shutdown.is_cancelled() {
            let result = match self.become_active(&shutdown).await {
                Ok(Some(mut conn)) => {
                    tracing::info!("relay is active");
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
                    tracing::warn!(error = %e, ?delay, "relay lost its connection; retrying");
                    if sleep_or_shutdown(delay, &shutdown).await {
                        return Ok(());
                    }
                }
            }
        }
        Ok(())
    }

    /// Opens a dedicated connection and holds the relay lock on it; `None` on shutdown.
    async fn become_active(
        &self,
        shutdown: &CancellationToken,
    ) -> Result<Option<AsyncPgConnection>> {
        let mut conn = AsyncPgConnection::establish(self.database.url.expose_secret())
            .await
            .map_err(|e| Error::Pool(e.to_string()))?;
        loop {
            let got: Locked = diesel::sql_query("SELECT pg_try_advisory_lock($1) AS locked")
                .bind::<BigInt, _>(RELAY_LOCK_KEY)
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
        let mut failed_batches = 0u32;
        while !shutdown.is_cancelled() {
            let outcome = self.publish_batch(conn).await?;
            let delay = if outcome.failed > 0 {
                failed_batches += 1;
                self.config.backoff.delay(failed_batches)
            } else if outcome.published == 0 {
                failed_batches = 0;
                self.config.poll_interval
            } else {
                failed_batches = 0;
                continue;
            };
            if sleep_or_shutdown(delay, shutdown).await {
                break;
            }
        }
        Ok(())
    }

    /// Publishes one batch of unpublished rows, in id order: sends them all, awaits every
    /// delivery report, then marks the acknowledged rows published (with partition and offset)
    /// in one statement and records the error on the others.
    ///
    /// Call it from the active relay only (or in tests); [`Relay::run`] takes care of that.
    pub async fn publish_batch(&self, conn: &mut AsyncPgConnection) -> Result<BatchOutcome> {
        let rows: Vec<PendingRow> = ferrybox_outbox::table
            .filter(ferrybox_outbox::published_at.is_null())
            .order(ferrybox_outbox::id.asc())
            .limit(self.config.batch_size)
            .select((
                ferrybox_outbox::id,
                ferrybox_outbox::topic,
                ferrybox_outbox::message_key,
                ferrybox_outbox::headers,
                ferrybox_outbox::payload,
            ))
            .load(conn)
            .await?;
        if rows.is_empty() {
            return Ok(BatchOutcome::default());
        }

        // Queue the whole batch first, then wait: librdkafka pipelines the sends. The idempotent
        // producer keeps each partition's order and fails the messages after a failed one, so a
        // failure normally leaves a key's later rows unpublished too. Known gap (issue #3): a
        // delivery that fails while a later one of the same key succeeds would reorder that key
        // on the retry.
        let mut in_flight = Vec::with_capacity(rows.len());
        for row in &rows {
            let record = FutureRecord::to(&row.topic)
                .key(&row.message_key)
                .payload(&row.payload)
                .headers(kafka_headers(&row.headers));
            in_flight.push(match self.producer.send_result(record) {
                Ok(delivery) => Ok(delivery),
                Err((e, _)) => Err(e.to_string()),
            });
        }

        let mut acked = (Vec::new(), Vec::new(), Vec::new());
        let mut failed = (Vec::new(), Vec::new());
        for (row, sent) in rows.iter().zip(in_flight) {
            let result = match sent {
                Ok(delivery) => match delivery.await {
                    Ok(Ok(d)) => Ok((d.partition, d.offset)),
                    Ok(Err((e, _))) => Err(e.to_string()),
                    Err(_) => Err("delivery report lost: producer closed".to_owned()),
                },
                Err(e) => Err(e),
            };
            match result {
                Ok((partition, offset)) => {
                    acked.0.push(row.id);
                    acked.1.push(partition);
                    acked.2.push(offset);
                }
                Err(e) => {
                    failed.0.push(row.id);
                    failed.1.push(e);
                }
            }
        }

        let outcome = BatchOutcome {
            published: acked.0.len(),
            failed: failed.0.len(),
        };
        if !acked.0.is_empty() {
            diesel::sql_query(
                "UPDATE ferrybox_outbox AS o \
                 SET published_at = now(), kafka_partition = u.p, kafka_offset = u.o, \
                     attempts = o.attempts + 1, last_error = NULL \
                 FROM unnest($1::bigint[], $2::int[], $3::bigint[]) AS u(id, p, o) \
                 WHERE o.id = u.id",
            )
            .bind::<Array<BigInt>, _>(acked.0)
            .bind::<Array<Integer>, _>(acked.1)
            .bind::<Array<BigInt>, _>(acked.2)
            .execute(conn)
            .await?;
        }
        if !failed.0.is_empty() {
            tracing::warn!(
                failed = outcome.failed,
                first_error = %failed.1[0],
                "broker did not acknowledge messages; they stay unpublished"
            );
            diesel::sql_query(
                "UPDATE ferrybox_outbox AS o \
                 SET attempts = o.attempts + 1, last_error = u.e \
                 FROM unnest($1::bigint[], $2::text[]) AS u(id, e) \
                 WHERE o.id = u.id",
            )
            .bind::<Array<BigInt>, _>(failed.0)
            .bind::<Array<Text>, _>(failed.1)
            .execute(conn)
            .await?;
        }
        Ok(outcome)
    }
}

fn kafka_headers(stored: &serde_json::Value) -> OwnedHeaders {
    let map: BTreeMap<String, String> = serde_json::from_value(stored.clone()).unwrap_or_default();
    crate::kafka::owned_headers(&map)
}

/// Sleeps for `delay`; true when shutdown came first.
pub(crate) async fn sleep_or_shutdown(delay: Duration, shutdown: &CancellationToken) -> bool {
    tokio::select! {
        () = shutdown.cancelled() => true,
        () = tokio::time::sleep(delay) => false,
    }
}
