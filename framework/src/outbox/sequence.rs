//! Producer sequences: every message the log relay publishes to Kafka carries its **source** (a
//! name per replication slot, [`SOURCE_HEADER`]) and a **number** ([`SEQ_HEADER`]) that is
//! contiguous per source, topic and partition: 1, 2, 3, ... A consumer keeps the last number
//! it applied in its own transaction, skips what is at or below it, and halts the partition
//! on a number past the next one (a gap: the broker lost what is between), to repair it from
//! the producer's sent log (see [`crate::inbox`]).
//!
//! **No write per message.** The relay picks each message's partition itself (as librdkafka's
//! default partitioner does: CRC-32 of the key modulo the partition count) and numbers it when
//! it hands it to the producer. What it numbered is written with the checkpoint, once a second,
//! in one transaction: the next number of each partition (`ferrybox_sequence_counters`) and
//! which rows got which numbers (`ferrybox_sequence_runs`, one row per partition and
//! checkpoint). The slot is confirmed only up to that checkpoint, so after a crash the stream
//! starts exactly where the counters are, and the write-ahead log hands the same transactions
//! over in the same order: every message sent again gets the number it had.
//!
//! **Sent again by other paths.** Replay and the retry of refused rows look the number up in
//! the runs and send the message with it. What has no number there (a row published before
//! this, by the polling relay, or from a new slot's snapshot) is sent without one, and
//! consumers deduplicate it by its message id.
//!
//! **A new source** begins with each new replication slot (the first one, or one made again
//! after the slot was lost): what a lost slot's recovery sends again is read from the table, in
//! another order, so it cannot keep the old numbers. Consumers see a new source start at 1.
//!
//! **Repartitioning.** A source numbers a topic's messages with the partition count it read
//! when it first published to the topic, recorded in `ferrybox_sequence_sources`, and keeps
//! it: partitions added later get no messages from that source. A new source (resharding the
//! relay makes new slots, see [`crate::outbox::reshard`]) reads the count again. Keys then move
//! to other partitions, as with any Kafka producer, and each partition's numbers start at 1.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::Arc;

use diesel::prelude::*;
use diesel::sql_types::{Array, BigInt, Integer, Jsonb, Text};
use diesel_async::{AsyncPgConnection, RunQueryDsl};
use pgwire_replication::Lsn;

use super::record::Origin;
use crate::error::{Error, Result};

/// The header naming the message's source.
pub const SOURCE_HEADER: &str = "ferrybox_source";

/// The header holding the message's number within its source, topic and partition (decimal).
pub const SEQ_HEADER: &str = "ferrybox_seq";

/// A message's place in its source: its partition and number.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Sequence {
    pub(crate) source: Arc<str>,
    pub(crate) partition: i32,
    pub(crate) seq: i64,
}

/// The partition a key goes to among `partitions`: librdkafka's default for keyed messages
/// (`consistent_random`: CRC-32 of the key), so a relay that picks partitions itself sends every
/// key where it went before.
pub(crate) fn partition_for(key: &[u8], partitions: i32) -> i32 {
    let count = u32::try_from(partitions.max(1)).unwrap_or(1);
    i32::try_from(crc32fast::hash(key) % count).unwrap_or(0)
}

fn origin_name(origin: Origin) -> &'static str {
    match origin {
        Origin::Messages => "messages",
        Origin::Outbox => "outbox",
    }
}

/// A message numbered and acknowledged, not yet written with a checkpoint.
#[derive(Debug, Clone)]
struct Numbered {
    topic: Arc<str>,
    partition: i32,
    seq: i64,
    origin: Origin,
    row_id: i64,
}

/// The numbering of one stream (a replication slot): hands out numbers as messages are sent,
/// and writes what was acknowledged with the checkpoint.
#[derive(Debug)]
pub(crate) struct Sequencer {
    stream: String,
    source: Arc<str>,
    /// The partition count each topic is numbered with.
    partitions: BTreeMap<String, i32>,
    partitions_changed: bool,
    /// The next number to hand out per topic and partition (looked up by `&str`: no
    /// allocation per message).
    next: HashMap<Arc<str>, HashMap<i32, i64>>,
    /// Acknowledged messages in stream order, and how many of them each taken transaction end
    /// covers (its end position).
    taken: VecDeque<Numbered>,
    ends: VecDeque<(Lsn, usize)>,
}

#[derive(QueryableByName)]
struct SourceRow {
    #[diesel(sql_type = Text)]
    source: String,
    #[diesel(sql_type = Jsonb)]
    partitions: serde_json::Value,
}

#[derive(QueryableByName)]
struct CounterRow {
    #[diesel(sql_type = Text)]
    topic: String,
    #[diesel(sql_type = Integer)]
    kafka_partition: i32,
    #[diesel(sql_type = BigInt)]
    next_seq: i64,
}

impl Sequencer {
    /// The numbering of `stream` as its last checkpoint left it; a new source when it has none
    /// (a new slot).
    pub(crate) async fn load(conn: &mut AsyncPgConnection, stream: &str) -> Result<Self> {
        let fresh = format!(
            "{stream}.{}",
            &uuid::Uuid::new_v4().simple().to_string()[..12]
        );
        let row: SourceRow = diesel::sql_query(
            "WITH made AS ( \
                 INSERT INTO ferrybox_sequence_sources (stream, source) VALUES ($1, $2) \
                 ON CONFLICT (stream) DO NOTHING RETURNING source, partitions) \
             SELECT source, partitions FROM made \
             UNION ALL \
             SELECT source, partitions FROM ferrybox_sequence_sources WHERE stream = $1 \
             LIMIT 1",
        )
        .bind::<Text, _>(stream)
        .bind::<Text, _>(&fresh)
        .get_result(conn)
        .await?;
        let partitions: BTreeMap<String, i32> = serde_json::from_value(row.partitions)
            .map_err(|e| Error::Replication(format!("sequence source {stream}: {e}")))?;
        let counters: Vec<CounterRow> = diesel::sql_query(
            "SELECT topic, kafka_partition, next_seq FROM ferrybox_sequence_counters \
             WHERE source = $1",
        )
        .bind::<Text, _>(&row.source)
        .load(conn)
        .await?;
        let mut next: HashMap<Arc<str>, HashMap<i32, i64>> = HashMap::new();
        for c in counters {
            next.entry(Arc::from(c.topic))
                .or_default()
                .insert(c.kafka_partition, c.next_seq);
        }
        Ok(Self {
            stream: stream.to_owned(),
            source: row.source.into(),
            partitions,
            partitions_changed: false,
            next,
            taken: VecDeque::new(),
            ends: VecDeque::new(),
        })
    }

    /// The partition count `topic` is numbered with, if known.
    pub(crate) fn partitions(&self, topic: &str) -> Option<i32> {
        self.partitions.get(topic).copied()
    }

    /// Numbers `topic` with `count` partitions from now on (the first time it is published).
    pub(crate) fn set_partitions(&mut self, topic: &str, count: i32) {
        self.partitions.insert(topic.to_owned(), count.max(1));
        self.partitions_changed = true;
    }

    /// The next number for a message of `topic` with `key`; `None` when the topic's partition
    /// count is not known yet ([`Sequencer::set_partitions`] first).
    pub(crate) fn assign(&mut self, topic: &str, key: &[u8]) -> Option<Sequence> {
        let partition = partition_for(key, self.partitions(topic)?);
        if !self.next.contains_key(topic) {
            self.next.insert(Arc::from(topic), HashMap::new());
        }
        let next = self.next.get_mut(topic)?.entry(partition).or_insert(1);
        let seq = *next;
        *next += 1;
        Some(Sequence {
            source: Arc::clone(&self.source),
            partition,
            seq,
        })
    }

    /// A numbered message was acknowledged (or recorded as refused): it is written with the
    /// checkpoint that covers its transaction.
    pub(crate) fn taken(&mut self, topic: &str, sequence: &Sequence, origin: Origin, row_id: i64) {
        // The counters' key, shared: no allocation per message.
        let topic = self
            .next
            .get_key_value(topic)
            .map_or_else(|| Arc::from(topic), |(key, _)| Arc::clone(key));
        self.taken.push_back(Numbered {
            topic,
            partition: sequence.partition,
            seq: sequence.seq,
            origin,
            row_id,
        });
    }

    /// The end of a transaction whose messages were all taken.
    pub(crate) fn committed(&mut self, end: Lsn) {
        match self.ends.back_mut() {
            // Nothing numbered since the last end: move that end.
            Some((at, covered)) if *covered == self.taken.len() => *at = end,
            _ => self.ends.push_back((end, self.taken.len())),
        }
    }

    /// Whether anything numbered is not written yet: the slot may not be confirmed past it
    /// without a checkpoint.
    pub(crate) fn has_unwritten(&self) -> bool {
        !self.taken.is_empty() || self.partitions_changed
    }

    /// Writes, in `tx` (the checkpoint's transaction), the numbers of the messages in
    /// transactions ending at or before `through`: their runs and the counters after them.
    pub(crate) async fn write(&mut self, tx: &mut AsyncPgConnection, through: Lsn) -> Result<()> {
        let mut covered = 0;
        while let Some((end, n)) = self.ends.front() {
            if *end > through {
                break;
            }
            covered = *n;
            self.ends.pop_front();
        }
        for (_, n) in &mut self.ends {
            *n -= covered;
        }
        let written: Vec<Numbered> = self.taken.drain(..covered).collect();
        if self.partitions_changed {
            diesel::sql_query(
                "UPDATE ferrybox_sequence_sources SET partitions = $2 WHERE stream = $1",
            )
            .bind::<Text, _>(&self.stream)
            .bind::<Jsonb, _>(serde_json::to_value(&self.partitions).unwrap_or_default())
            .execute(tx)
            .await?;
            self.partitions_changed = false;
        }
        if written.is_empty() {
            return Ok(());
        }
        let runs = runs_of(&written);
        for run in &runs {
            diesel::sql_query(
                "INSERT INTO ferrybox_sequence_runs \
                 (source, topic, kafka_partition, first_seq, origin, row_ids) \
                 VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT DO NOTHING",
            )
            .bind::<Text, _>(&*self.source)
            .bind::<Text, _>(&*run.topic)
            .bind::<Integer, _>(run.partition)
            .bind::<BigInt, _>(run.first_seq)
            .bind::<Text, _>(origin_name(run.origin))
            .bind::<Array<BigInt>, _>(&run.row_ids)
            .execute(tx)
            .await?;
        }
        let mut next: BTreeMap<(&str, i32), i64> = BTreeMap::new();
        for n in &written {
            next.insert((&n.topic, n.partition), n.seq + 1);
        }
        let (topics, (partitions, seqs)): (Vec<&str>, (Vec<i32>, Vec<i64>)) = next
            .into_iter()
            .map(|((topic, partition), seq)| (topic, (partition, seq)))
            .unzip();
        diesel::sql_query(
            "INSERT INTO ferrybox_sequence_counters (source, topic, kafka_partition, next_seq) \
             SELECT $1, * FROM unnest($2::text[], $3::int[], $4::bigint[]) \
             ON CONFLICT (source, topic, kafka_partition) \
             DO UPDATE SET next_seq = EXCLUDED.next_seq",
        )
        .bind::<Text, _>(&*self.source)
        .bind::<Array<Text>, _>(topics)
        .bind::<Array<Integer>, _>(partitions)
        .bind::<Array<BigInt>, _>(seqs)
        .execute(tx)
        .await?;
        Ok(())
    }
}

/// Consecutive numbers of one topic, partition and table, as one run row.
#[derive(Debug, PartialEq, Eq)]
struct Run {
    topic: Arc<str>,
    partition: i32,
    first_seq: i64,
    origin: Origin,
    row_ids: Vec<i64>,
}

/// `numbered` (in stream order) as runs: per topic and partition, a new run wherever the
/// numbers jump or the table changes.
fn runs_of(numbered: &[Numbered]) -> Vec<Run> {
    let mut open: HashMap<(Arc<str>, i32), usize> = HashMap::new();
    let mut runs: Vec<Run> = Vec::new();
    for n in numbered {
        let key = (Arc::clone(&n.topic), n.partition);
        if let Some(&i) = open.get(&key) {
            let run = &mut runs[i];
            let next = run.first_seq + i64::try_from(run.row_ids.len()).unwrap_or(i64::MAX);
            if run.origin == n.origin && next == n.seq {
                run.row_ids.push(n.row_id);
                continue;
            }
        }
        open.insert(key, runs.len());
        runs.push(Run {
            topic: Arc::clone(&n.topic),
            partition: n.partition,
            first_seq: n.seq,
            origin: n.origin,
            row_ids: vec![n.row_id],
        });
    }
    runs
}

#[derive(QueryableByName)]
struct Found {
    #[diesel(sql_type = BigInt)]
    row_id: i64,
    #[diesel(sql_type = Text)]
    source: String,
    #[diesel(sql_type = Integer)]
    kafka_partition: i32,
    #[diesel(sql_type = BigInt)]
    seq: i64,
}

/// The numbers the rows `ids` of `origin` (created at or after `since`) were published with,
/// from the runs; rows with none are left out.
pub(crate) async fn numbers_of(
    conn: &mut AsyncPgConnection,
    origin: Origin,
    ids: &[i64],
    since: chrono::DateTime<chrono::Utc>,
) -> Result<HashMap<i64, Sequence>> {
    if ids.is_empty() {
        return Ok(HashMap::new());
    }
    let found: Vec<Found> = diesel::sql_query(
        "SELECT u.row_id, r.source, r.kafka_partition, r.first_seq + u.n - 1 AS seq \
         FROM ferrybox_sequence_runs AS r, unnest(r.row_ids) WITH ORDINALITY AS u(row_id, n) \
         WHERE r.created_at >= $1 AND r.origin = $2 AND u.row_id = ANY($3)",
    )
    .bind::<diesel::sql_types::Timestamptz, _>(since)
    .bind::<Text, _>(origin_name(origin))
    .bind::<Array<BigInt>, _>(ids)
    .load(conn)
    .await?;
    let mut sources: HashMap<String, Arc<str>> = HashMap::new();
    Ok(found
        .into_iter()
        .map(|f| {
            let source = Arc::clone(
                sources
                    .entry(f.source.clone())
                    .or_insert_with(|| Arc::from(f.source)),
            );
            (
                f.row_id,
                Sequence {
                    source,
                    partition: f.kafka_partition,
                    seq: f.seq,
                },
            )
        })
        .collect())
}

/// The numbers `rows` of `origin` were published with, for sending them again (replay, a
/// drain, a new slot's snapshot); see [`numbers_of`]. The runs are searched from an hour
/// before the oldest row's `occurred_at` (a run is written after its rows).
pub(crate) async fn numbers_for(
    conn: &mut AsyncPgConnection,
    origin: Origin,
    rows: &[super::record::OutboxRecord],
) -> Result<HashMap<i64, Sequence>> {
    let Some(oldest) = rows.iter().map(|r| r.occurred_at).min() else {
        return Ok(HashMap::new());
    };
    let ids: Vec<i64> = rows.iter().map(|r| r.id).collect();
    numbers_of(conn, origin, &ids, oldest - chrono::Duration::hours(1)).await
}

/// A row of the sent log as a repair serves it: its table and id, and its number.
#[derive(Debug, Clone, PartialEq, Eq, QueryableByName)]
pub(crate) struct NumberedRow {
    #[diesel(sql_type = Text)]
    pub(crate) origin: String,
    #[diesel(sql_type = BigInt)]
    pub(crate) row_id: i64,
    #[diesel(sql_type = BigInt)]
    pub(crate) seq: i64,
}

/// The rows numbered `from..=to` in `source`, `topic`, `partition`, in number order.
pub(crate) async fn rows_numbered(
    conn: &mut AsyncPgConnection,
    source: &str,
    topic: &str,
    partition: i32,
    from: i64,
    to: i64,
) -> Result<Vec<NumberedRow>> {
    Ok(diesel::sql_query(
        "SELECT r.origin, u.row_id, r.first_seq + u.n - 1 AS seq \
         FROM ferrybox_sequence_runs AS r, unnest(r.row_ids) WITH ORDINALITY AS u(row_id, n) \
         WHERE r.source = $1 AND r.topic = $2 AND r.kafka_partition = $3 \
           AND r.first_seq <= $5 \
           AND r.first_seq + cardinality(r.row_ids) - 1 >= $4 \
           AND r.first_seq + u.n - 1 BETWEEN $4 AND $5 \
         ORDER BY seq",
    )
    .bind::<Text, _>(source)
    .bind::<Text, _>(topic)
    .bind::<Integer, _>(partition)
    .bind::<BigInt, _>(from)
    .bind::<BigInt, _>(to)
    .load(conn)
    .await?)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn numbered(topic: &str, partition: i32, seq: i64, origin: Origin, row_id: i64) -> Numbered {
        Numbered {
            topic: Arc::from(topic),
            partition,
            seq,
            origin,
            row_id,
        }
    }

    #[test]
    fn the_partition_is_librdkafkas_consistent_one() {
        // librdkafka's `consistent` partitioner is CRC-32 (IEEE) of the key modulo the count.
        assert_eq!(crc32fast::hash(b"123456789"), 0xCBF4_3926, "CRC-32 (IEEE)");
        for partitions in [1, 3, 6, 12] {
            for key in [&b"a"[..], b"user-42", b""] {
                let p = partition_for(key, partitions);
                assert!((0..partitions).contains(&p));
                assert_eq!(
                    i64::from(p),
                    i64::from(crc32fast::hash(key)) % i64::from(partitions)
                );
            }
        }
        assert_eq!(
            partition_for(b"anything", 0),
            0,
            "no partitions counts as one"
        );
    }

    #[test]
    fn runs_break_where_numbers_jump_or_the_table_changes() {
        use Origin::{Messages, Outbox};
        let runs = runs_of(&[
            numbered("t", 0, 1, Messages, 10),
            numbered("t", 1, 1, Messages, 11),
            numbered("t", 0, 2, Messages, 12),
            numbered("t", 0, 3, Outbox, 5),
            numbered("t", 0, 4, Outbox, 6),
            numbered("u", 0, 7, Messages, 13),
        ]);
        let summary: Vec<(&str, i32, i64, Origin, Vec<i64>)> = runs
            .iter()
            .map(|r| {
                (
                    &*r.topic,
                    r.partition,
                    r.first_seq,
                    r.origin,
                    r.row_ids.clone(),
                )
            })
            .collect();
        assert_eq!(
            summary,
            vec![
                ("t", 0, 1, Messages, vec![10, 12]),
                ("t", 1, 1, Messages, vec![11]),
                ("t", 0, 3, Outbox, vec![5, 6]),
                ("u", 0, 7, Messages, vec![13]),
            ]
        );
    }
}
