//! Inbox retention: an applied id is kept as long as the message can still be delivered
//! again, then deleted in small batches so no long lock or bloat builds up.
//!
//! A message can come again while the consumer has not committed past it (a crash between
//! the inbox commit and the offset commit redelivers it, however long the consumer was down)
//! and while the broker still has it (a group reset re-reads it). So an id goes only once
//! both have passed: its offset is below the position the consumer committed on its
//! partition, and it was applied longer ago than the topic's retention (and the inbox's own
//! `retention`, whichever is longer). A wall-clock window alone would let a redelivery after
//! a long outage be applied twice.

use std::time::Duration;

use diesel::sql_types::{Array, BigInt, Integer, Text};
use diesel_async::RunQueryDsl;

use crate::config::{ClientKind, KafkaConfig};
use crate::db::{self, PgPool};
use crate::error::{Error, Result};

/// Rows deleted per statement.
pub(crate) const BATCH: i64 = 1_000;

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

/// Deletes `consumer`'s inbox rows that `horizon` says are past redelivery, `batch` rows per
/// statement; returns how many went.
pub async fn delete_expired(
    pool: &PgPool,
    consumer: &str,
    horizon: &Horizon,
    batch: i64,
) -> Result<u64> {
    if horizon.is_empty() {
        return Ok(0);
    }
    let mut conn = db::connection(pool).await?;
    let mut total = 0u64;
    loop {
        let deleted = diesel::sql_query(
            "DELETE FROM ferrybox_inbox WHERE ctid IN ( \
                 SELECT i.ctid FROM ferrybox_inbox AS i \
                 JOIN unnest($2::text[], $3::int[], $4::bigint[], $5::bigint[]) \
                      AS h(topic, kafka_partition, committed, min_age) \
                   ON i.topic = h.topic AND i.kafka_partition = h.kafka_partition \
                 WHERE i.consumer = $1 AND i.kafka_offset < h.committed \
                   AND i.applied_at < now() - make_interval(secs => h.min_age) \
                 LIMIT $6)",
        )
        .bind::<Text, _>(consumer)
        .bind::<Array<Text>, _>(&horizon.topics)
        .bind::<Array<Integer>, _>(&horizon.partitions)
        .bind::<Array<BigInt>, _>(&horizon.committed)
        .bind::<Array<BigInt>, _>(&horizon.min_age_seconds)
        .bind::<BigInt, _>(batch)
        .execute(&mut conn)
        .await?;
        total += u64::try_from(deleted).unwrap_or(0);
        if i64::try_from(deleted).unwrap_or(0) < batch {
            return Ok(total);
        }
        // Let other work in between batches.
        tokio::task::yield_now().await;
    }
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
