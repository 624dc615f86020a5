//! Inbox retention: an applied id is kept as long as the message can still be delivered
//! again, then dropped with the rest of its generation ([`expire`]): no row is deleted one by
//! one, so no dead tuples or bloat build up, and cleanup costs the same however many ids
//! there are.
//!
//! A message can come again while the consumer has not committed past it (a crash between
//! the inbox commit and the offset commit redelivers it, however long the consumer was down)
//! and while the broker still has it (a group reset re-reads it). So an id goes only once
//! both have passed: its offset is below the position the consumer committed on its
//! partition, and it was applied longer ago than the topic's retention (and the inbox's own
//! `retention`, whichever is longer). A wall-clock window alone would let a redelivery after
//! a long outage be applied twice.

use std::time::Duration;

use diesel::sql_types::{Array, BigInt, Bool, Integer, Interval, Text};
use diesel_async::{AsyncPgConnection, RunQueryDsl};

use crate::config::{ClientKind, KafkaConfig};
use crate::db::{self, PgPool};
use crate::error::{Error, Result};

/// How far each of a consumer's partitions is past redelivery: the position the consumer
/// committed there (rows below it will not be delivered again) and the age a row must have
/// besides (the topic's retention, or the inbox's when longer). A partition not listed keeps
/// all its rows.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Horizon {
    topics: Vec<String>,
    partitions: Vec<i32>,
    committed: Vec<i64>,
    min_age_seconds: Vec<i64>,
}

impl Horizon {
    /// No partition is past anything: nothing may be deleted.
    pub fn none() -> Self {
        Self::default()
    }

    /// Rows of `topic`'s `partition` below `committed` may go once older than `min_age`.
    #[must_use]
    pub fn with(mut self, topic: &str, partition: i32, committed: i64, min_age: Duration) -> Self {
        self.topics.push(topic.to_owned());
        self.partitions.push(partition);
        self.committed.push(committed);
        self.min_age_seconds
            .push(i64::try_from(min_age.as_secs()).unwrap_or(i64::MAX));
        self
    }

    /// How many partitions it covers.
    pub fn len(&self) -> usize {
        self.topics.len()
    }

    /// Whether it covers no partition.
    pub fn is_empty(&self) -> bool {
        self.topics.is_empty()
    }
}

/// The age an applied id must have before it may go: the inbox's `retention`, or the topic's
/// (`retention.ms`) when that is longer; `None` when the topic keeps messages forever
/// (`retention.ms` -1), so its ids are kept forever too.
pub(crate) fn min_age(
    inbox_retention: Duration,
    topic_retention_ms: Option<i64>,
) -> Option<Duration> {
    match topic_retention_ms {
        Some(ms) if ms < 0 => None,
        Some(ms) => Some(inbox_retention.max(Duration::from_millis(ms.unsigned_abs()))),
        None => Some(inbox_retention),
    }
}

/// The horizon of a Kafka consumer group: its committed offset on every partition of
/// `topics` (asked of the broker), each topic's retention from its configuration. A partition
/// where the group committed nothing is left out (its rows stay), and so is a topic that keeps
/// messages forever; a topic whose retention the broker does not tell is taken to keep them
/// `inbox_retention` (which should be longer than any topic's, as its documentation says).
pub async fn kafka_horizon(
    kafka: &KafkaConfig,
    group: &str,
    topics: &[String],
    inbox_retention: Duration,
) -> Result<Horizon> {
    use rdkafka::consumer::{BaseConsumer, Consumer};
    let mut partitions = rdkafka::TopicPartitionList::new();
    let mut ages = Vec::with_capacity(topics.len());
    for topic in topics {
        let retention = crate::kafka::topic_setting(kafka, topic, "retention.ms")
            .await?
            .and_then(|ms| ms.parse().ok());
        let Some(age) = min_age(inbox_retention, retention) else {
            tracing::info!(
                topic,
                "the topic keeps messages forever (retention.ms -1): its inbox ids are kept too"
            );
            continue;
        };
        // A topic the broker does not know (yet) keeps its rows.
        match crate::kafka::partition_count(kafka, topic).await {
            Ok(count) => {
                for partition in 0..count {
                    partitions.add_partition(topic, partition);
                }
                ages.push((topic.clone(), age));
            }
            Err(e) => tracing::debug!(topic, error = %e, "no partitions to clean"),
        }
    }
    if ages.is_empty() {
        return Ok(Horizon::none());
    }
    let mut client = kafka.client_config(ClientKind::Consumer);
    // Asks for the group's offsets without joining it.
    client.set("group.id", group).remove("group.instance.id");
    tokio::task::spawn_blocking(move || {
        let consumer: BaseConsumer = client.create()?;
        let committed = consumer.committed_offsets(partitions, Duration::from_secs(10))?;
        let mut horizon = Horizon::none();
        for element in committed.elements() {
            let (rdkafka::Offset::Offset(offset), Some((_, age))) = (
                element.offset(),
                ages.iter().find(|(t, _)| t == element.topic()),
            ) else {
                continue;
            };
            horizon = horizon.with(element.topic(), element.partition(), offset, *age);
        }
        Ok(horizon)
    })
    .await
    .map_err(|e| Error::Task(e.to_string()))?
}

/// How long the id inbox writes into one generation: a third of the inbox's `retention` (an id
/// is kept at most that much longer than it must), at least a second and at most a week.
pub fn generation_span(retention: Duration) -> Duration {
    Duration::from_secs((retention.as_secs() / 3).clamp(1, 7 * 24 * 3600))
}

/// What one [`expire`] pass did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Expired {
    /// Generations dropped.
    pub generations: u64,
    /// The ids they held, every consumer's.
    pub ids: u64,
}

/// Retention of the id inbox, which is partitioned by generation (migration `ferrybox-0010`):
/// ids go into the newest generation; one pass of this
///
/// 1. opens a new generation once the newest is [`generation_span`] old;
/// 2. sums up each closed generation once, per consumer and partition (how far its ids reach:
///    the highest offset, the last time one was applied);
/// 3. marks `consumer`'s sums that `horizon` says are past redelivery;
/// 4. drops every closed generation whose sums are all marked, by every consumer with ids in
///    it: a `DROP TABLE`, however many ids it holds.
///
/// An id stays while any consumer with ids in its generation is not past redelivery for them
/// (a consumer that stopped running for good holds its generations until its rows are
/// removed by hand; [`generations`] names it, and the vacuum guard alerts on it).
///
/// Dedup spans the generations: the inbox's insert ([`super::RECORD_IDS_SQL`]) skips an id
/// present in an older one, and the newest one's key catches the rest. Opening a generation
/// locks the table against inserts for a moment, so no insert that read the old generation
/// as the newest is still running once the new one is there.
pub async fn expire(
    pool: &PgPool,
    consumer: &str,
    horizon: &Horizon,
    retention: Duration,
) -> Result<Expired> {
    let mut conn = db::connection(pool).await?;
    open_generation_if_due(&mut conn, generation_span(retention)).await?;
    summarize_closed(&mut conn).await?;
    if !horizon.is_empty() {
        diesel::sql_query(
            "UPDATE ferrybox_inbox_bounds AS b SET expired = true \
             FROM unnest($2::text[], $3::int[], $4::bigint[], $5::bigint[]) \
                  AS h(topic, kafka_partition, committed, min_age) \
             WHERE b.consumer = $1 AND NOT b.expired \
               AND b.topic = h.topic AND b.kafka_partition = h.kafka_partition \
               AND b.max_offset < h.committed \
               AND b.last_applied_at < now() - make_interval(secs => h.min_age)",
        )
        .bind::<Text, _>(consumer)
        .bind::<Array<Text>, _>(&horizon.topics)
        .bind::<Array<Integer>, _>(&horizon.partitions)
        .bind::<Array<BigInt>, _>(&horizon.committed)
        .bind::<Array<BigInt>, _>(&horizon.min_age_seconds)
        .execute(&mut conn)
        .await?;
    }
    drop_expired(&mut conn).await
}

#[derive(diesel::QueryableByName)]
struct Generation {
    #[diesel(sql_type = Integer)]
    generation: i32,
}

async fn open_generation_if_due(conn: &mut AsyncPgConnection, span: Duration) -> Result<()> {
    #[derive(diesel::QueryableByName)]
    struct Newest {
        #[diesel(sql_type = Integer)]
        generation: i32,
        #[diesel(sql_type = Bool)]
        due: bool,
    }
    let newest: Newest = diesel::sql_query(
        "SELECT generation, opened_at < now() - $1 AS due FROM ferrybox_inbox_generations \
         ORDER BY generation DESC LIMIT 1",
    )
    .bind::<Interval, _>(crate::storage::interval(span))
    .get_result(conn)
    .await?;
    if !newest.due {
        return Ok(());
    }
    // `ferrybox_open_inbox_generation` takes the inbox's lock against inserts: they take
    // theirs before they read the newest generation, so none runs with the old one as the
    // newest once the new one commits.
    let ddl = format!(
        "SELECT ferrybox_open_inbox_generation(make_interval(secs => {}))",
        span.as_secs()
    );
    if crate::storage::change_layout(conn, "ferrybox_inbox", ddl).await? {
        tracing::info!(
            after = newest.generation,
            "inbox: a new id generation opened"
        );
    }
    Ok(())
}

async fn summarize_closed(conn: &mut AsyncPgConnection) -> Result<()> {
    let closed: Vec<Generation> = diesel::sql_query(
        "SELECT generation FROM ferrybox_inbox_generations \
         WHERE closed_at IS NOT NULL AND NOT summarized ORDER BY generation",
    )
    .load(conn)
    .await?;
    for Generation { generation } in closed {
        // Nothing is written into a closed generation: read once, with the sums, in one
        // statement (so one transaction).
        diesel::sql_query(format!(
            "WITH sums AS ( \
                 INSERT INTO ferrybox_inbox_bounds \
                     (generation, consumer, topic, kafka_partition, max_offset, \
                      last_applied_at, ids) \
                 SELECT {generation}, consumer, topic, kafka_partition, max(kafka_offset), \
                        max(applied_at), count(*) \
                 FROM ferrybox_inbox WHERE generation = {generation} \
                 GROUP BY consumer, topic, kafka_partition \
                 ON CONFLICT DO NOTHING) \
             UPDATE ferrybox_inbox_generations SET summarized = true \
             WHERE generation = {generation}"
        ))
        .execute(conn)
        .await?;
    }
    Ok(())
}

async fn drop_expired(conn: &mut AsyncPgConnection) -> Result<Expired> {
    #[derive(diesel::QueryableByName)]
    struct Droppable {
        #[diesel(sql_type = Integer)]
        generation: i32,
        #[diesel(sql_type = BigInt)]
        ids: i64,
    }
    let droppable: Vec<Droppable> = diesel::sql_query(
        "SELECT g.generation, coalesce(sum(b.ids), 0)::bigint AS ids \
         FROM ferrybox_inbox_generations AS g \
         LEFT JOIN ferrybox_inbox_bounds AS b USING (generation) \
         WHERE g.summarized \
         GROUP BY g.generation HAVING bool_and(coalesce(b.expired, true)) \
         ORDER BY g.generation",
    )
    .load(conn)
    .await?;
    let mut done = Expired::default();
    for Droppable { generation, ids } in droppable {
        let ddl = format!("SELECT ferrybox_drop_inbox_generation({generation})");
        if crate::storage::change_layout(conn, "ferrybox_inbox", ddl).await? {
            tracing::info!(generation, ids, "inbox: an expired id generation dropped");
            done.generations += 1;
            done.ids += u64::try_from(ids).unwrap_or(0);
        }
    }
    Ok(done)
}

/// One generation of the id inbox, as an operator sees it (`inbox generations`).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, diesel::QueryableByName)]
pub struct GenerationStatus {
    /// Its number; the highest is the one ids go into now.
    #[diesel(sql_type = Integer)]
    pub generation: i32,
    /// When it opened.
    #[diesel(sql_type = diesel::sql_types::Timestamptz)]
    pub opened_at: chrono::DateTime<chrono::Utc>,
    /// When the next one opened (nothing is written into it since); none for the newest.
    #[diesel(sql_type = diesel::sql_types::Nullable<diesel::sql_types::Timestamptz>)]
    pub closed_at: Option<chrono::DateTime<chrono::Utc>>,
    /// The ids it holds, once summed up (a closed generation; none for the newest).
    #[diesel(sql_type = diesel::sql_types::Nullable<BigInt>)]
    pub ids: Option<i64>,
    /// The consumers whose ids in it may still be delivered again: it is dropped once none is
    /// left. A consumer that stopped for good stays here until its ids are removed by hand.
    #[diesel(sql_type = Array<Text>)]
    pub held_by: Vec<String>,
}

/// Every generation of the id inbox, oldest first, with what holds each.
pub async fn generations(pool: &PgPool) -> Result<Vec<GenerationStatus>> {
    let mut conn = db::connection(pool).await?;
    Ok(diesel::sql_query(
        "SELECT g.generation, g.opened_at, g.closed_at, \
                CASE WHEN g.summarized THEN coalesce(sum(b.ids), 0)::bigint END AS ids, \
                coalesce(array_agg(DISTINCT b.consumer ORDER BY b.consumer) \
                         FILTER (WHERE NOT b.expired), '{}') AS held_by \
         FROM ferrybox_inbox_generations AS g \
         LEFT JOIN ferrybox_inbox_bounds AS b USING (generation) \
         GROUP BY g.generation ORDER BY g.generation",
    )
    .load(&mut conn)
    .await?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_id_is_kept_as_long_as_the_longer_of_the_two_retentions_and_forever_with_the_topic() {
        let two_weeks = Duration::from_secs(14 * 24 * 3600);
        let thirty_days_ms = 30 * 24 * 3600 * 1000;
        assert_eq!(
            min_age(two_weeks, None),
            Some(two_weeks),
            "the broker did not say"
        );
        assert_eq!(
            min_age(two_weeks, Some(7 * 24 * 3600 * 1000)),
            Some(two_weeks)
        );
        assert_eq!(
            min_age(two_weeks, Some(thirty_days_ms)),
            Some(Duration::from_millis(30 * 24 * 3600 * 1000))
        );
        assert_eq!(min_age(two_weeks, Some(-1)), None, "kept forever");
    }
}
