//! Dead letters: messages a consumer could not apply, kept with their bytes and origin, the
//! later messages of their key parked behind them, and redrive once a fix is deployed.
//!
//! A key with an open dead letter is *blocked*: its later messages are parked, in order, so
//! the key's order holds while other keys keep flowing. Redrive takes one key at a time under a
//! PostgreSQL advisory lock (the consumer takes the same lock before parking), runs the key's
//! dead and parked messages through the current handler in their original order, and stops at
//! the first that fails again.

use std::collections::BTreeMap;
use std::time::Duration;

use chrono::{DateTime, Utc};
use diesel::prelude::*;
use diesel::sql_types::Text;
use diesel_async::{AsyncConnection, AsyncPgConnection, RunQueryDsl};
use rdkafka::producer::{FutureProducer, FutureRecord};
use serde::Serialize;

use super::apply::{Applier, Claim, Failure, Outcome, Record};
use super::handler::Handler;
use super::schema::ferrybox_dead_letters as dl;
use crate::codec::AvroCodec;
use crate::contract::ReaderSchemas;
use crate::db::{self, PgPool};
use crate::error::{Error, Result};

/// Header names added to records on the dead-letter topic.
pub mod dlq_headers {
    /// The topic the message came from.
    pub const ORIGIN_TOPIC: &str = "ferrybox_dlq_topic";
    /// Its partition.
    pub const ORIGIN_PARTITION: &str = "ferrybox_dlq_partition";
    /// Its offset.
    pub const ORIGIN_OFFSET: &str = "ferrybox_dlq_offset";
    /// The consumer that gave up on it.
    pub const CONSUMER: &str = "ferrybox_dlq_consumer";
    /// The consumer's version.
    pub const CONSUMER_VERSION: &str = "ferrybox_dlq_consumer_version";
    /// The kind of failure (`decode`, `handler`, `retries_exhausted`, ...).
    pub const ERROR_KIND: &str = "ferrybox_dlq_error_kind";
    /// The error.
    pub const ERROR: &str = "ferrybox_dlq_error";
    /// How many attempts were made.
    pub const ATTEMPTS: &str = "ferrybox_dlq_attempts";
}

fn lock_name(consumer: &str, key: &str) -> String {
    format!("ferrybox-dead-letters/{consumer}/{key}")
}

/// The consumer loop's side of the dead-letter store.
pub(crate) struct DeadLetterStore {
    pub(crate) pool: PgPool,
    pub(crate) consumer: String,
    pub(crate) consumer_version: Option<String>,
    pub(crate) topic: Option<(FutureProducer, String)>,
    /// How the consumer deduplicates: a numbered message's number is used when it is
    /// dead-lettered or parked.
    pub(crate) dedup: super::apply::Dedup,
}

impl DeadLetterStore {
    /// Which of `keys` have an open (dead or parked) letter: one query for a whole batch.
    pub(crate) async fn blocked_keys(
        &self,
        keys: &[String],
    ) -> Result<std::collections::HashSet<String>> {
        if keys.is_empty() {
            return Ok(std::collections::HashSet::new());
        }
        let mut conn = db::connection(&self.pool).await?;
        let blocked: Vec<Option<String>> = dl::table
            .filter(dl::consumer.eq(&self.consumer))
            .filter(dl::message_key.eq_any(keys))
            .filter(dl::status.ne("redriven"))
            .select(dl::message_key)
            .distinct()
            .load(&mut conn)
            .await?;
        Ok(blocked.into_iter().flatten().collect())
    }

    /// Parks `record` behind its key's open dead letter. False when the key was unblocked in
    /// the meantime (a redrive finished), in which case the caller applies it normally.
    pub(crate) async fn park(&self, record: &Record, key: &str) -> Result<bool> {
        let mut conn = db::connection(&self.pool).await?;
        let (consumer, version) = (self.consumer.as_str(), self.consumer_version.as_deref());
        conn.transaction::<_, Error, _>(async |tx| {
            diesel::sql_query("SELECT pg_advisory_xact_lock(hashtextextended($1, 0))")
                .bind::<Text, _>(lock_name(consumer, key))
                .execute(tx)
                .await?;
            let blocking: Option<i64> = dl::table
                .filter(dl::consumer.eq(consumer))
                .filter(dl::message_key.eq(key))
                .filter(dl::status.ne("redriven"))
                .order(dl::id)
                .select(dl::id)
                .first(tx)
                .await
                .optional()?;
            let Some(blocking) = blocking else {
                return Ok(false);
            };
            // Its number is used by parking it; one that is not the next is left to the
            // applier, which skips a duplicate and halts on a gap.
            match super::apply::claim_number(tx, consumer, self.dedup, record).await? {
                Claim::Unnumbered | Claim::Next => {}
                Claim::Duplicate | Claim::Gap(_) => return Ok(false),
            }
            let failure = Failure {
                kind: "parked",
                error: format!("parked behind dead letter #{blocking} of key {key}"),
                retryable: false,
                gap: None,
            };
            insert(tx, consumer, version, record, &failure, 0, "parked").await?;
            Ok(true)
        })
        .await
    }

    /// Records a dead letter (once per origin) and publishes it to the dead-letter topic when
    /// one is configured and it is not published yet. Only when both are done may the
    /// consumer's offset move past it.
    pub(crate) async fn record_dead(
        &self,
        record: &Record,
        failure: &Failure,
        attempts: u32,
    ) -> Result<()> {
        let mut conn = db::connection(&self.pool).await?;
        let attempts = i32::try_from(attempts).unwrap_or(i32::MAX);
        // Its number counts as used with the dead letter, in one transaction.
        let stored = conn
            .transaction::<_, Error, _>(async |tx| {
                if super::apply::claim_number(tx, &self.consumer, self.dedup, record).await?
                    == Claim::Duplicate
                {
                    return Ok(false);
                }
                insert(
                    tx,
                    &self.consumer,
                    self.consumer_version.as_deref(),
                    record,
                    failure,
                    attempts,
                    "dead",
                )
                .await?;
                Ok(true)
            })
            .await?;
        if !stored {
            tracing::info!(
                topic = record.topic,
                partition = record.partition,
                offset = record.offset,
                "not dead-lettered: its number was used meanwhile (applied by another instance)"
            );
            return Ok(());
        }
        let Some((producer, topic)) = &self.topic else {
            return Ok(());
        };
        let row = dl::table
            .filter(dl::consumer.eq(&self.consumer))
            .filter(dl::topic.eq(&record.topic))
            .filter(dl::kafka_partition.eq(record.partition))
            .filter(dl::kafka_offset.eq(record.offset));
        let (id, published, stored_kind, stored_error, stored_attempts): (
            i64,
            Option<DateTime<Utc>>,
            String,
            String,
            i32,
        ) = row
            .select((
                dl::id,
                dl::published_at,
                dl::error_kind,
                dl::error,
                dl::attempts,
            ))
            .first(&mut conn)
            .await?;
        if published.is_some() {
            return Ok(());
        }
        let mut headers = record.headers().clone();
        for (name, value) in [
            (dlq_headers::ORIGIN_TOPIC, record.topic.clone()),
            (dlq_headers::ORIGIN_PARTITION, record.partition.to_string()),
            (dlq_headers::ORIGIN_OFFSET, record.offset.to_string()),
            (dlq_headers::CONSUMER, self.consumer.clone()),
            (
                dlq_headers::CONSUMER_VERSION,
                self.consumer_version.clone().unwrap_or_default(),
            ),
            (dlq_headers::ERROR_KIND, stored_kind),
            (dlq_headers::ERROR, stored_error),
            (dlq_headers::ATTEMPTS, stored_attempts.to_string()),
        ] {
            headers.insert(name.to_owned(), value);
        }
        let mut out: FutureRecord<'_, [u8], [u8]> =
            FutureRecord::to(topic).headers(crate::kafka::owned_headers(&headers));
        if let Some(key) = &record.key {
            out = out.key(key.as_slice());
        }
        if let Some(payload) = record.payload() {
            out = out.payload(payload);
        }
        producer
            .send(out, Duration::from_secs(30))
            .await
            .map_err(|(e, _)| Error::Kafka(e))?;
        diesel::update(dl::table.find(id))
            .set(dl::published_at.eq(diesel::dsl::now))
            .execute(&mut conn)
            .await?;
        Ok(())
    }
}

async fn insert(
    conn: &mut AsyncPgConnection,
    consumer: &str,
    consumer_version: Option<&str>,
    record: &Record,
    failure: &Failure,
    attempts: i32,
    status: &str,
) -> Result<()> {
    let message_id = record
        .headers()
        .get(crate::message::headers::ID)
        .and_then(|v| v.parse::<uuid::Uuid>().ok());
    let message_type = record.headers().get(crate::message::headers::TYPE);
    let headers = serde_json::to_value(record.headers()).unwrap_or_default();
    diesel::insert_into(dl::table)
        .values((
            dl::consumer.eq(consumer),
            dl::consumer_version.eq(consumer_version),
            dl::message_id.eq(message_id),
            dl::message_key.eq(record.key_text()),
            dl::message_type.eq(message_type),
            dl::topic.eq(&record.topic),
            dl::kafka_partition.eq(record.partition),
            dl::kafka_offset.eq(record.offset),
            dl::headers.eq(headers),
            dl::payload.eq(record.payload()),
            dl::error_kind.eq(failure.kind),
            dl::error.eq(&failure.error),
            dl::attempts.eq(attempts),
            dl::status.eq(status),
        ))
        .on_conflict_do_nothing()
        .execute(conn)
        .await?;
    Ok(())
}

/// Which dead letters an operation takes.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum DeadLetterFilter {
    /// Every open one.
    All,
    /// One by id.
    Id(i64),
    /// Those of one key.
    Key(String),
    /// Those that failed with one kind of error (`decode`, `handler`, ...).
    Kind(String),
}

/// A dead or parked message, as operators see it.
#[derive(Debug, Clone, PartialEq, Serialize, Queryable, Selectable)]
#[diesel(table_name = dl)]
pub struct DeadLetter {
    /// Its id in the store.
    pub id: i64,
    /// `dead`, `parked` or `redriven`.
    pub status: String,
    /// The message id, when the envelope was readable.
    pub message_id: Option<uuid::Uuid>,
    /// The message key.
    pub message_key: Option<String>,
    /// The message type.
    pub message_type: Option<String>,
    /// Origin topic.
    pub topic: String,
    /// Origin partition.
    #[serde(rename = "partition")]
    pub kafka_partition: i32,
    /// Origin offset.
    #[serde(rename = "offset")]
    pub kafka_offset: i64,
    /// What kind of failure.
    pub error_kind: String,
    /// The error.
    pub error: String,
    /// Attempts so far (including redrives).
    pub attempts: i32,
    /// The version of the consumer that failed it.
    pub consumer_version: Option<String>,
    /// When it was recorded.
    pub created_at: DateTime<Utc>,
    /// When it last changed.
    pub updated_at: DateTime<Utc>,
    /// When it was published to the dead-letter topic.
    pub published_at: Option<DateTime<Utc>>,
    /// The original headers.
    pub headers: serde_json::Value,
    /// The original payload bytes.
    #[serde(skip)]
    pub payload: Option<Vec<u8>>,
}

impl DeadLetter {
    fn record(&self) -> Record {
        let headers: BTreeMap<String, String> =
            serde_json::from_value(self.headers.clone()).unwrap_or_default();
        Record::new(
            self.topic.clone(),
            self.kafka_partition,
            self.kafka_offset,
            self.message_key.as_ref().map(|k| k.as_bytes().to_vec()),
            headers,
            self.payload.clone(),
        )
    }
}

/// How many dead letters are in each state.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, utoipa::ToSchema)]
pub struct DeadLetterCounts {
    /// Failed, waiting for a fix.
    pub dead: i64,
    /// Held back behind a dead letter of their key.
    pub parked: i64,
    /// Applied (or found applied) by a redrive.
    pub redriven: i64,
    /// Keys held back: keys with a dead or parked message.
    pub blocked_keys: i64,
}

/// What a redrive did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct RedriveReport {
    /// Messages the current handler applied.
    pub applied: u64,
    /// Messages found already applied (their id was in the inbox).
    pub duplicates: u64,
    /// Messages that failed again and stay dead, attempts raised.
    pub failed: u64,
    /// Messages left parked behind one that failed again.
    pub still_parked: u64,
}

/// The operator's side of the dead-letter store: list, inspect, count, redrive.
#[derive(Clone)]
pub struct DeadLetters {
    pool: PgPool,
    consumer: String,
}

impl std::fmt::Debug for DeadLetters {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DeadLetters")
            .field("consumer", &self.consumer)
            .finish_non_exhaustive()
    }
}

impl DeadLetters {
    /// The dead letters of `consumer` (the inbox's consumer name) in `pool`'s database.
    pub fn new(pool: PgPool, consumer: impl Into<String>) -> Self {
        Self {
            pool,
            consumer: consumer.into(),
        }
    }

    /// Open (dead and parked) letters matching `filter`, in origin order.
    pub async fn list(&self, filter: &DeadLetterFilter) -> Result<Vec<DeadLetter>> {
        let mut conn = db::connection(&self.pool).await?;
        self.list_on(&mut conn, filter, None).await
    }

    /// [`DeadLetters::list`] on `conn`, at most `limit` letters.
    async fn list_on(
        &self,
        conn: &mut AsyncPgConnection,
        filter: &DeadLetterFilter,
        limit: Option<i64>,
    ) -> Result<Vec<DeadLetter>> {
        let mut query = dl::table
            .filter(dl::consumer.eq(&self.consumer))
            .filter(dl::status.ne("redriven"))
            .order((dl::topic, dl::kafka_partition, dl::kafka_offset))
            .select(DeadLetter::as_select())
            .into_boxed();
        query = match filter {
            DeadLetterFilter::All => query,
            DeadLetterFilter::Id(id) => query.filter(dl::id.eq(*id)),
            DeadLetterFilter::Key(key) => query.filter(dl::message_key.eq(key.clone())),
            DeadLetterFilter::Kind(kind) => query.filter(dl::error_kind.eq(kind.clone())),
        };
        if let Some(limit) = limit {
            query = query.limit(limit);
        }
        Ok(query.load(conn).await?)
    }

    /// One letter by id, whatever its state.
    pub async fn get(&self, id: i64) -> Result<Option<DeadLetter>> {
        let mut conn = db::connection(&self.pool).await?;
        Ok(dl::table
            .filter(dl::consumer.eq(&self.consumer))
            .filter(dl::id.eq(id))
            .select(DeadLetter::as_select())
            .first(&mut conn)
            .await
            .optional()?)
    }

    /// How many letters are dead, parked and redriven.
    pub async fn counts(&self) -> Result<DeadLetterCounts> {
        let mut conn = db::connection(&self.pool).await?;
        let rows: Vec<(String, i64)> = dl::table
            .filter(dl::consumer.eq(&self.consumer))
            .group_by(dl::status)
            .select((dl::status, diesel::dsl::count_star()))
            .load(&mut conn)
            .await?;
        let blocked_keys: i64 = dl::table
            .filter(dl::consumer.eq(&self.consumer))
            .filter(dl::status.ne("redriven"))
            .select(diesel::dsl::count(dl::message_key).aggregate_distinct())
            .first(&mut conn)
            .await?;
        let mut counts = DeadLetterCounts {
            blocked_keys,
            ..DeadLetterCounts::default()
        };
        for (status, n) in rows {
            match status.as_str() {
                "dead" => counts.dead = n,
                "parked" => counts.parked = n,
                _ => counts.redriven = n,
            }
        }
        Ok(counts)
    }

    /// Runs the dead letters matching `filter`, and the messages parked behind them, through
    /// `handler` (deduplicated by the inbox), key by key in their original order. A message
    /// that fails again stays dead with its attempts raised, and its key stays blocked.
    ///
    /// Each message is applied and marked in one transaction, under its key's lock (the one
    /// parking takes), on one connection: a redrive needs a single pooled connection, and a
    /// message parked while its key is redriven is redriven after the others, in order.
    pub async fn redrive<H: Handler>(
        &self,
        filter: &DeadLetterFilter,
        codec: AvroCodec,
        handler: H,
        readers: Option<ReaderSchemas>,
        handler_timeout: Duration,
    ) -> Result<RedriveReport> {
        let applier = Applier {
            pool: self.pool.clone(),
            codec,
            handler,
            readers,
            consumer: self.consumer.clone(),
            handler_timeout,
            checkpoint: None,
            // A redriven message's number was used when it was dead-lettered: its id decides.
            dedup: super::apply::Dedup::Id,
        };
        let mut conn = db::connection(&self.pool).await?;
        let selected: Vec<DeadLetter> = self
            .list_on(&mut conn, filter, None)
            .await?
            .into_iter()
            .filter(|d| d.status == "dead")
            .collect();
        let mut report = RedriveReport::default();
        let mut keys: Vec<String> = selected
            .iter()
            .filter_map(|d| d.message_key.clone())
            .collect();
        keys.sort();
        keys.dedup();
        // Letters without a key block nothing: redrive them one by one.
        for letter in selected.iter().filter(|d| d.message_key.is_none()) {
            self.redrive_one(&mut conn, &applier, letter, &mut report)
                .await?;
        }
        for key in keys {
            let filter = DeadLetterFilter::Key(key);
            while let Some(letter) = self
                .list_on(&mut conn, &filter, Some(1))
                .await?
                .into_iter()
                .next()
            {
                if !self
                    .redrive_one(&mut conn, &applier, &letter, &mut report)
                    .await?
                {
                    let parked = self
                        .list_on(&mut conn, &filter, None)
                        .await?
                        .iter()
                        .filter(|d| d.status == "parked")
                        .count();
                    report.still_parked += u64::try_from(parked).unwrap_or(0);
                    break;
                }
            }
        }
        Ok(report)
    }

    /// Applies one letter and marks it (redriven, or dead again with the new failure) in one
    /// transaction on `conn`, under its key's lock. True when it was applied or found applied.
    async fn redrive_one<H: Handler>(
        &self,
        conn: &mut AsyncPgConnection,
        applier: &Applier<H>,
        letter: &DeadLetter,
        report: &mut RedriveReport,
    ) -> Result<bool> {
        let record = letter.record();
        // Decoding may ask the registry: before the transaction, so no lock waits on it.
        let prepared = applier.prepare(&record).await;
        let consumer = self.consumer.as_str();
        let applied = conn
            .transaction::<_, Error, _>(async |tx| {
                if let Some(key) = &letter.message_key {
                    diesel::sql_query("SELECT pg_advisory_xact_lock(hashtextextended($1, 0))")
                        .bind::<Text, _>(lock_name(consumer, key))
                        .execute(tx)
                        .await?;
                }
                // Another redrive may have finished it meanwhile: look again under the lock.
                let status: String = dl::table
                    .find(letter.id)
                    .select(dl::status)
                    .for_update()
                    .first(tx)
                    .await?;
                if status == "redriven" {
                    return Ok(Ok(Some(Outcome::Duplicate)));
                }
                let failure = match prepared {
                    Ok(message) => {
                        match applier
                            .apply_prepared(tx, std::slice::from_ref(&record), &[message], true)
                            .await?
                        {
                            super::apply::Prepared {
                                outcomes,
                                failure: None,
                                ..
                            } => {
                                let outcome = outcomes.into_iter().next();
                                diesel::update(dl::table.find(letter.id))
                                    .set((
                                        dl::status.eq("redriven"),
                                        dl::attempts.eq(dl::attempts + 1),
                                        dl::updated_at.eq(diesel::dsl::now),
                                    ))
                                    .execute(tx)
                                    .await?;
                                return Ok(Ok(outcome));
                            }
                            super::apply::Prepared {
                                failure: Some(failure),
                                ..
                            } => failure,
                        }
                    }
                    Err(failure) => failure,
                };
                diesel::update(dl::table.find(letter.id))
                    .set((
                        dl::status.eq("dead"),
                        dl::attempts.eq(dl::attempts + 1),
                        dl::error_kind.eq(failure.kind),
                        dl::error.eq(&failure.error),
                        dl::updated_at.eq(diesel::dsl::now),
                    ))
                    .execute(tx)
                    .await?;
                Ok(Err(failure))
            })
            .await?;
        match applied {
            Ok(outcome) => {
                match outcome {
                    Some(Outcome::Duplicate) => report.duplicates += 1,
                    _ => report.applied += 1,
                }
                Ok(true)
            }
            Err(failure) => {
                report.failed += 1;
                tracing::warn!(id = letter.id, kind = failure.kind, error = %failure.error, "redrive failed again");
                Ok(false)
            }
        }
    }
}
