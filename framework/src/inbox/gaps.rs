//! Gaps in a producer's numbers (see [`crate::outbox::SEQ_HEADER`]): a message numbered past
//! the next one of its source, topic and partition arrived, so the broker lost what is
//! between (a retention that expired before it was read, an unclean leader election, a
//! broker's bug). The consumer records the gap, raises an alert and halts that partition (the
//! others go on); the gap is filled from the producer's sent log through its repair endpoint
//! (`GET /events/numbered`, see [`crate::feed::numbered_router`]), automatically when
//! `inbox.repair_urls` names one for the topic, or skipped by an operator
//! ([`Gaps::skip`]), who accepts the loss. Then the partition resumes in order.

use std::collections::BTreeMap;

use base64::Engine;
use diesel::prelude::*;
use diesel::sql_types::{BigInt, Integer, Nullable, Text, Timestamptz};
use diesel_async::{AsyncConnection, RunQueryDsl};
use serde::Serialize;

use super::apply::{Gap, Record};
use crate::db::{self, PgPool};
use crate::error::{Error, Result};
use crate::feed::FeedEvent;

/// A gap as an operator sees it (`auth-service gaps list`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, QueryableByName)]
pub struct GapRecord {
    /// Its id (for [`Gaps::skip`]).
    #[diesel(sql_type = BigInt)]
    pub id: i64,
    /// The producer's source.
    #[diesel(sql_type = Text)]
    pub source: String,
    /// The topic.
    #[diesel(sql_type = Text)]
    pub topic: String,
    /// The partition.
    #[diesel(sql_type = Integer)]
    pub kafka_partition: i32,
    /// The first missing number.
    #[diesel(sql_type = BigInt)]
    pub from_seq: i64,
    /// The last missing number.
    #[diesel(sql_type = BigInt)]
    pub to_seq: i64,
    /// The offset of the message after the gap, where the partition resumes.
    #[diesel(sql_type = BigInt)]
    pub kafka_offset: i64,
    /// `open`, `repaired` or `skipped`.
    #[diesel(sql_type = Text)]
    pub status: String,
    /// Why it is still open (the last repair's error), or how it was closed.
    #[diesel(sql_type = Nullable<Text>)]
    pub detail: Option<String>,
    /// When it was found.
    #[diesel(sql_type = Timestamptz)]
    pub detected_at: chrono::DateTime<chrono::Utc>,
}

/// A consumer's gaps, for operators.
#[derive(Clone)]
pub struct Gaps {
    pool: PgPool,
    consumer: String,
}

impl std::fmt::Debug for Gaps {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Gaps")
            .field("consumer", &self.consumer)
            .finish_non_exhaustive()
    }
}

const GAP_COLUMNS: &str = "id, source, topic, kafka_partition, from_seq, to_seq, kafka_offset, \
                           status, detail, detected_at";

impl Gaps {
    /// The gaps of `consumer` (its inbox name) in `pool`'s database.
    pub fn new(pool: PgPool, consumer: impl Into<String>) -> Self {
        Self {
            pool,
            consumer: consumer.into(),
        }
    }

    /// The open gaps, or every gap with `all`, oldest first.
    pub async fn list(&self, all: bool) -> Result<Vec<GapRecord>> {
        let mut conn = db::connection(&self.pool).await?;
        Ok(diesel::sql_query(format!(
            "SELECT {GAP_COLUMNS} FROM ferrybox_inbox_gaps \
             WHERE consumer = $1 AND ($2 OR status = 'open') ORDER BY id"
        ))
        .bind::<Text, _>(&self.consumer)
        .bind::<diesel::sql_types::Bool, _>(all)
        .load(&mut conn)
        .await?)
    }

    /// How many gaps are open (what the `ferrybox_inbox_open_gaps` gauge reports), counted
    /// by the database rather than by loading them.
    pub(crate) async fn open_count(&self) -> Result<u64> {
        #[derive(QueryableByName)]
        struct Open {
            #[diesel(sql_type = BigInt)]
            n: i64,
        }
        let mut conn = db::connection(&self.pool).await?;
        let open: Open = diesel::sql_query(
            "SELECT count(*) AS n FROM ferrybox_inbox_gaps WHERE consumer = $1 AND status = 'open'",
        )
        .bind::<Text, _>(&self.consumer)
        .get_result(&mut conn)
        .await?;
        Ok(u64::try_from(open.n).unwrap_or(0))
    }

    /// Accepts the loss of an open gap's messages: its partition goes on after it (a running
    /// consumer resumes within `inbox.repair_interval`). Returns false when no open gap has
    /// that id.
    pub async fn skip(&self, id: i64, reason: &str) -> Result<bool> {
        let mut conn = db::connection(&self.pool).await?;
        let consumer = self.consumer.as_str();
        conn.transaction::<_, Error, _>(async |tx| {
            let gap: Option<GapRecord> = diesel::sql_query(format!(
                "UPDATE ferrybox_inbox_gaps SET status = 'skipped', resolved_at = now(), \
                        detail = $3 \
                 WHERE consumer = $1 AND id = $2 AND status = 'open' RETURNING {GAP_COLUMNS}"
            ))
            .bind::<Text, _>(consumer)
            .bind::<BigInt, _>(id)
            .bind::<Text, _>(format!("skipped by an operator: {reason}"))
            .get_result(tx)
            .await
            .optional()?;
            let Some(gap) = gap else {
                return Ok(false);
            };
            // The numbers before the message after the gap count as applied.
            diesel::sql_query(
                "UPDATE ferrybox_inbox_sequences SET last_seq = GREATEST(last_seq, $5), \
                        updated_at = now() \
                 WHERE consumer = $1 AND source = $2 AND topic = $3 AND kafka_partition = $4",
            )
            .bind::<Text, _>(consumer)
            .bind::<Text, _>(&gap.source)
            .bind::<Text, _>(&gap.topic)
            .bind::<Integer, _>(gap.kafka_partition)
            .bind::<BigInt, _>(gap.to_seq)
            .execute(tx)
            .await?;
            tracing::warn!(
                id,
                source = gap.source,
                topic = gap.topic,
                partition = gap.kafka_partition,
                from = gap.from_seq,
                to = gap.to_seq,
                reason,
                "gap skipped: its messages are accepted as lost"
            );
            Ok(true)
        })
        .await
    }
}

/// Records `gap` (open) unless it is recorded already; its id, and whether it is new.
pub(crate) async fn record(pool: &PgPool, consumer: &str, gap: &Gap) -> Result<(i64, bool)> {
    #[derive(QueryableByName)]
    struct Id {
        #[diesel(sql_type = BigInt)]
        id: i64,
        #[diesel(sql_type = diesel::sql_types::Bool)]
        new: bool,
    }
    let mut conn = db::connection(pool).await?;
    let found: Id = diesel::sql_query(
        "WITH made AS ( \
             INSERT INTO ferrybox_inbox_gaps \
               (consumer, source, topic, kafka_partition, from_seq, to_seq, kafka_offset) \
             VALUES ($1, $2, $3, $4, $5, $6, $7) \
             ON CONFLICT (consumer, source, topic, kafka_partition) WHERE status = 'open' \
             DO NOTHING RETURNING id) \
         SELECT id, true AS new FROM made \
         UNION ALL \
         SELECT id, false FROM ferrybox_inbox_gaps \
         WHERE consumer = $1 AND source = $2 AND topic = $3 AND kafka_partition = $4 \
           AND status = 'open' \
         LIMIT 1",
    )
    .bind::<Text, _>(consumer)
    .bind::<Text, _>(&gap.source)
    .bind::<Text, _>(&gap.topic)
    .bind::<Integer, _>(gap.partition)
    .bind::<BigInt, _>(gap.from_seq)
    .bind::<BigInt, _>(gap.to_seq)
    .bind::<BigInt, _>(gap.offset)
    .get_result(&mut conn)
    .await?;
    Ok((found.id, found.new))
}

/// A gap's status now (`open`, `repaired`, `skipped`).
pub(crate) async fn status(pool: &PgPool, id: i64) -> Result<String> {
    #[derive(QueryableByName)]
    struct Status {
        #[diesel(sql_type = Text)]
        status: String,
    }
    let mut conn = db::connection(pool).await?;
    Ok(
        diesel::sql_query("SELECT status FROM ferrybox_inbox_gaps WHERE id = $1")
            .bind::<BigInt, _>(id)
            .get_result::<Status>(&mut conn)
            .await?
            .status,
    )
}

/// Closes gap `id` as repaired, or notes why it is still open.
pub(crate) async fn close(pool: &PgPool, id: i64, repaired: bool, detail: &str) -> Result<()> {
    let mut conn = db::connection(pool).await?;
    diesel::sql_query(
        "UPDATE ferrybox_inbox_gaps SET detail = $3, \
                status = CASE WHEN $2 THEN 'repaired' ELSE status END, \
                resolved_at = CASE WHEN $2 THEN now() ELSE resolved_at END \
         WHERE id = $1 AND status = 'open'",
    )
    .bind::<BigInt, _>(id)
    .bind::<diesel::sql_types::Bool, _>(repaired)
    .bind::<Text, _>(detail)
    .execute(&mut conn)
    .await?;
    Ok(())
}

/// The most numbers one repair request asks for.
pub(crate) const REPAIR_PAGE: i64 = 500;

/// The `numbered` endpoint's answer.
#[derive(Debug, serde::Deserialize)]
struct NumberedPage {
    events: Vec<FeedEvent>,
}

/// Asks the producer's repair endpoint at `url` for `gap`'s numbers `from..=to` (at most
/// [`REPAIR_PAGE`]), as records of the gap's partition, in number order. Every number must
/// come back: a hole is an error (the sent log no longer has it).
pub(crate) async fn fetch(
    http: &reqwest::Client,
    url: &str,
    gap: &Gap,
    from: i64,
    token: Option<&secrecy::SecretString>,
) -> Result<Vec<Record>> {
    let to = gap.to_seq.min(from + REPAIR_PAGE - 1);
    let mut url = reqwest::Url::parse(url)
        .map_err(|e| Error::Config(format!("inbox.repair_urls.{}: {e}", gap.topic)))?;
    url.query_pairs_mut()
        .append_pair("source", &gap.source)
        .append_pair("topic", &gap.topic)
        .append_pair("partition", &gap.partition.to_string())
        .append_pair("from", &from.to_string())
        .append_pair("to", &to.to_string());
    let response = crate::http::get_with_token(http, url.clone(), token)
        .send()
        .await
        .map_err(|e| Error::Repair(format!("asking {url}: {e}")))?;
    let status = response.status();
    if !status.is_success() {
        let body = response.text().await.unwrap_or_default();
        return Err(Error::Repair(format!("{url} answered {status}: {body}")));
    }
    let page: NumberedPage = response
        .json()
        .await
        .map_err(|e| Error::Repair(format!("{url} answered what is not a page: {e}")))?;
    let numbers: Vec<i64> = page.events.iter().map(|e| e.position).collect();
    let wanted: Vec<i64> = (from..=to).collect();
    if numbers != wanted {
        return Err(Error::Repair(format!(
            "{url} returned numbers {numbers:?}, not {from}..={to}"
        )));
    }
    page.events
        .into_iter()
        .map(|event| {
            let payload = base64::engine::general_purpose::STANDARD
                .decode(&event.payload)
                .map_err(|e| Error::Repair(format!("number {}: payload: {e}", event.position)))?;
            let headers: BTreeMap<String, String> = event.headers;
            // The producer sends each message with its number, as the relay did: one that
            // says otherwise is not the message that is missing.
            let source = headers.get(crate::outbox::SOURCE_HEADER);
            let seq = headers.get(crate::outbox::SEQ_HEADER);
            if source != Some(&gap.source) || seq != Some(&event.position.to_string()) {
                return Err(Error::Repair(format!(
                    "{url}: number {} came with source {source:?} and number {seq:?}",
                    event.position
                )));
            }
            // A repaired record has no offset of its own: it carries its number, negated,
            // where a dead letter of it records the origin.
            Ok(Record::new(
                gap.topic.clone(),
                gap.partition,
                -event.position,
                Some(event.key.into_bytes()),
                headers,
                Some(payload),
            ))
        })
        .collect()
}
