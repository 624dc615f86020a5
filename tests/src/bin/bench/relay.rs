//! The relay and outbox benchmarks.
//!
//! - `relay_vs_raw_producer`: relay drain rate from a pre-filled outbox over the rate of a plain
//!   rdkafka producer sending the same messages with the same settings.
//! - `outbox_write_overhead_1` / `_8`: business transactions per second with `enqueue` over the
//!   same transactions without it, at 1 and 8 concurrent writers.
//! - `bare_row_write_overhead_1` / `_8`: the same with a bare one-row insert instead of
//!   `enqueue`: the least a transactional outbox can cost on this machine.
//! - `notify_latency_p99_ms` / `poll_latency_p99_ms`: commit to acknowledged publish at a fixed
//!   moderate rate, woken by `NOTIFY` and by polling only.

use std::collections::{BTreeMap, VecDeque};
use std::time::{Duration, Instant};

use diesel::sql_types::{BigInt, Double, Integer, Text};
use diesel_async::{AsyncConnection, AsyncPgConnection, RunQueryDsl};
use ferrybox::testing::{self, TestDatabase};
use ferrybox::{CancellationToken, MessageId, Outbox, OutgoingMessage, Relay, RelayConfig};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::producer::FutureRecord;

use crate::Report;
use crate::inbox::messages;

const KEYS: i64 = 1_000;
const PAYLOAD: usize = 200;

async fn outbox_database() -> anyhow::Result<(TestDatabase, AsyncPgConnection)> {
    let (db, _) = TestDatabase::with_framework_tables().await;
    let conn = AsyncPgConnection::establish(db.url()).await?;
    Ok((db, conn))
}

/// Commits `n` outbox rows for `topic` (200-byte payloads over 1,000 keys, CloudEvents
/// headers) in one statement; not part of any measurement.
async fn prefill_outbox(conn: &mut AsyncPgConnection, topic: &str, n: usize) -> anyhow::Result<()> {
    diesel::sql_query(
        "INSERT INTO ferrybox_outbox \
           (message_id, topic, message_key, message_type, entity_version, headers, payload, occurred_at) \
         SELECT u, $1, 'key-' || (i % $3), 'com.ferrybox.bench.Blob', i / $3 + 1, \
                jsonb_build_object('ce_specversion', '1.0', 'ce_id', u::text, \
                  'ce_type', 'com.ferrybox.bench.Blob', 'ce_source', 'bench', \
                  'ce_time', now()::text, 'ce_subject', 'key-' || (i % $3), \
                  'ce_entityversion', (i / $3 + 1)::text, 'content-type', 'application/avro'), \
                decode(repeat('ab', $4), 'hex'), now() \
         FROM (SELECT gen_random_uuid() AS u, i FROM generate_series(1, $2) AS i) AS s",
    )
    .bind::<Text, _>(topic)
    .bind::<Integer, _>(i32::try_from(n)?)
    .bind::<BigInt, _>(KEYS)
    .bind::<Integer, _>(i32::try_from(PAYLOAD)?)
    .execute(conn)
    .await?;
    // As autovacuum would soon after such a burst: without statistics the planner sorts the
    // backlog on disk instead of walking the unpublished index.
    diesel::sql_query("ANALYZE ferrybox_outbox")
        .execute(conn)
        .await?;
    Ok(())
}

#[derive(diesel::QueryableByName)]
struct Stored {
    #[diesel(sql_type = Text)]
    message_key: String,
    #[diesel(sql_type = diesel::sql_types::Jsonb)]
    headers: serde_json::Value,
    #[diesel(sql_type = diesel::sql_types::Bytea)]
    payload: Vec<u8>,
}

/// Messages per second of a plain producer with the relay's settings, sending `rows`.
async fn raw_producer_rate(topic: &str, rows: &[Stored]) -> anyhow::Result<f64> {
    let producer = ferrybox::kafka::durable_producer(&testing::kafka())?;
    let headers: Vec<BTreeMap<String, String>> = rows
        .iter()
        .map(|r| serde_json::from_value(r.headers.clone()))
        .collect::<Result<_, _>>()?;
    let started = Instant::now();
    let mut pending = VecDeque::new();
    for (row, headers) in rows.iter().zip(&headers) {
        loop {
            let record = FutureRecord::to(topic)
                .key(&row.message_key)
                .payload(&row.payload)
                .headers(ferrybox::kafka::owned_headers(headers));
            match producer.send_result(record) {
                Ok(delivery) => {
                    pending.push_back(delivery);
                    break;
                }
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), _)) => {
                    if let Some(oldest) = pending.pop_front() {
                        oldest.await?.map_err(|(e, _)| e)?;
                    }
                }
                Err((e, _)) => return Err(e.into()),
            }
        }
    }
    for delivery in pending {
        delivery.await?.map_err(|(e, _)| e)?;
    }
    Ok(rows.len() as f64 / started.elapsed().as_secs_f64())
}

/// Relay drain rate from a pre-filled outbox, and the raw producer's rate for the same
/// messages (the better of a run before and one after the relay's).
async fn drain_rates(n: usize) -> anyhow::Result<(f64, f64)> {
    let (_db, mut conn) = outbox_database().await?;
    let raw_topic = testing::create_topic(3).await;
    prefill_outbox(&mut conn, &raw_topic, n).await?;
    let rows: Vec<Stored> =
        diesel::sql_query("SELECT message_key, headers, payload FROM ferrybox_outbox ORDER BY id")
            .load(&mut conn)
            .await?;
    let raw_before = raw_producer_rate(&raw_topic, &rows).await?;

    let (db, mut conn) = outbox_database().await?;
    let relay_topic = testing::create_topic(3).await;
    // The relay as services run it (`Relay::run`: batches recorded while the next is sent),
    // already active and knowing its topic.
    let relay = Relay::new(db.config(), &testing::kafka(), RelayConfig::default())?;
    let stop = CancellationToken::new();
    let task = tokio::spawn({
        let stop = stop.clone();
        async move { relay.run(stop).await }
    });
    prefill_outbox(&mut conn, &relay_topic, 1).await?;
    diesel::sql_query("SELECT pg_notify('ferrybox_outbox', '')")
        .execute(&mut conn)
        .await?;
    all_published(&mut conn).await?;
    prefill_outbox(&mut conn, &relay_topic, n).await?;
    let started = Instant::now();
    diesel::sql_query("SELECT pg_notify('ferrybox_outbox', '')")
        .execute(&mut conn)
        .await?;
    all_published(&mut conn).await?;
    let rate = n as f64 / started.elapsed().as_secs_f64();
    stop.cancel();
    task.await??;
    // The broker's speed drifts: the baseline runs before and after the relay, and the
    // better of the two counts.
    let raw_after = raw_producer_rate(&testing::create_topic(3).await, &rows).await?;
    Ok((rate, raw_before.max(raw_after)))
}

const ACCOUNTS: &str = "CREATE TABLE accounts (id UUID PRIMARY KEY, email TEXT NOT NULL UNIQUE, \
                        name TEXT NOT NULL, profile TEXT NOT NULL, \
                        created_at TIMESTAMPTZ NOT NULL DEFAULT now())";

/// What a business transaction writes besides its account.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Extra {
    Nothing,
    /// The matching event, through `Outbox::enqueue`.
    Enqueue,
    /// One 200-byte row in a table with nothing but a primary key, in its own statement: the
    /// least any transactional outbox adds.
    BareRow,
}

const BARE: &str = "CREATE TABLE bare (id BIGSERIAL PRIMARY KEY, payload BYTEA NOT NULL)";

/// Business transactions per second: `writers` connections each registering accounts for
/// `seconds`, with `extra` written alongside.
async fn write_rate(
    db: &TestDatabase,
    topic: &str,
    writers: usize,
    extra: Extra,
    seconds: u64,
) -> anyhow::Result<f64> {
    let deadline = Instant::now() + Duration::from_secs(seconds);
    let started = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..writers {
        let (url, topic) = (db.url().to_owned(), topic.to_owned());
        tasks.push(tokio::spawn(async move {
            let mut conn = AsyncPgConnection::establish(&url).await?;
            let outbox = Outbox::new("bench");
            let mut done = 0u64;
            while Instant::now() < deadline {
                let id = uuid::Uuid::now_v7();
                let message = OutgoingMessage {
                    id: MessageId::new(),
                    topic: topic.clone(),
                    key: id.to_string(),
                    message_type: "com.ferrybox.bench.AccountOpened".into(),
                    entity_version: 1,
                    occurred_at: ferrybox::message::now(),
                    payload: vec![0xab; PAYLOAD],
                    headers: BTreeMap::new(),
                };
                let outbox = &outbox;
                conn.transaction::<_, ferrybox::Error, _>(async |tx| {
                    // Prepared once, as a service's own statements (built with diesel's DSL)
                    // are.
                    ferrybox::db::prepared(
                        diesel::sql_query(
                            "INSERT INTO accounts (id, email, name, profile) VALUES ($1, $2, $3, $4)",
                        )
                        .bind::<diesel::sql_types::Uuid, _>(id)
                        .bind::<Text, _>(format!("{id}@example.com"))
                        .bind::<Text, _>("Bench Account")
                        .bind::<Text, _>("p".repeat(PAYLOAD)),
                    )
                    .execute(tx)
                    .await?;
                    match extra {
                        Extra::Nothing => {}
                        Extra::Enqueue => outbox.enqueue(tx, &message).await?,
                        Extra::BareRow => {
                            ferrybox::db::prepared(
                                diesel::sql_query("INSERT INTO bare (payload) VALUES ($1)")
                                    .bind::<diesel::sql_types::Bytea, _>(&message.payload),
                            )
                            .execute(tx)
                            .await?;
                        }
                    }
                    Ok(())
                })
                .await?;
                done += 1;
            }
            anyhow::Ok(done)
        }));
    }
    let mut total = 0;
    for task in tasks {
        total += task.await??;
    }
    Ok(total as f64 / started.elapsed().as_secs_f64())
}

/// Transactions per second at `writers` concurrent writers: (with enqueue, without, with a
/// bare extra row).
async fn write_overhead(writers: usize) -> anyhow::Result<(f64, f64, f64)> {
    let (db, mut conn) = outbox_database().await?;
    diesel::sql_query(ACCOUNTS).execute(&mut conn).await?;
    diesel::sql_query(BARE).execute(&mut conn).await?;
    let topic = testing::unique("bench-unpublished");
    // Warm up, then alternate so drift affects all alike.
    write_rate(&db, &topic, writers, Extra::Enqueue, 1).await?;
    let mut rates = [0.0; 3];
    for _ in 0..2 {
        for (i, extra) in [Extra::Enqueue, Extra::Nothing, Extra::BareRow]
            .into_iter()
            .enumerate()
        {
            rates[i] += write_rate(&db, &topic, writers, extra, 3).await? / 2.0;
        }
    }
    Ok((rates[0], rates[1], rates[2]))
}

/// p99 of commit to acknowledged publish, in ms, at `rate` messages a second for `seconds`.
async fn publish_latency_p99(listen: bool, rate: u32, seconds: u32) -> anyhow::Result<f64> {
    let (db, mut conn) = outbox_database().await?;
    let topic = testing::create_topic(3).await;
    let config = RelayConfig {
        listen,
        poll_interval: Duration::from_millis(POLL_MS),
        ..RelayConfig::default()
    };
    let relay = Relay::new(db.config(), &testing::kafka(), config)?;
    let stop = CancellationToken::new();
    let task = tokio::spawn({
        let stop = stop.clone();
        async move { relay.run(stop).await }
    });
    let outbox = Outbox::new("bench");
    let total = rate * seconds;
    let interval = Duration::from_secs(1) / rate;
    // A running relay already knows its topic: the first message (which waits for the
    // topic's metadata) is a warm-up, left out of the percentile.
    for i in 0..=total {
        if i == 1 {
            all_published(&mut conn).await?;
            diesel::sql_query("DELETE FROM ferrybox_outbox")
                .execute(&mut conn)
                .await?;
            break;
        }
        enqueue_blob(&mut conn, &outbox, &topic, i).await?;
    }
    let mut next = Instant::now();
    for i in 0..total {
        tokio::time::sleep_until(next.into()).await;
        next += interval;
        enqueue_blob(&mut conn, &outbox, &topic, i).await?;
    }
    all_published(&mut conn).await?;
    stop.cancel();
    task.await??;
    #[derive(diesel::QueryableByName)]
    struct P99 {
        #[diesel(sql_type = Double)]
        p99: f64,
    }
    // created_at is the enqueueing transaction's start (it commits right after);
    // published_at is when the relay marked the row, after the broker's acknowledgement.
    let p: P99 = diesel::sql_query(
        "SELECT percentile_cont(0.99) WITHIN GROUP \
           (ORDER BY extract(epoch FROM published_at - created_at) * 1000) AS p99 \
         FROM ferrybox_outbox",
    )
    .get_result(&mut conn)
    .await?;
    Ok(p.p99)
}

/// Waits (up to a minute) until the outbox has no unpublished row.
async fn all_published(conn: &mut AsyncPgConnection) -> anyhow::Result<()> {
    #[derive(diesel::QueryableByName)]
    struct Count {
        #[diesel(sql_type = BigInt)]
        n: i64,
    }
    // Cheap while waiting (one primary-key lookup: the relay publishes in id order), exact at
    // the end (a count of the unpublished rows, which would slow the relay if polled).
    let newest_unpublished = "SELECT count(*) AS n FROM ferrybox_outbox \
        WHERE id = (SELECT max(id) FROM ferrybox_outbox) AND published_at IS NULL";
    let unpublished = "SELECT count(*) AS n FROM ferrybox_outbox WHERE published_at IS NULL";
    let started = Instant::now();
    for query in [newest_unpublished, unpublished] {
        loop {
            let left: Count = diesel::sql_query(query).get_result(conn).await?;
            if left.n == 0 {
                break;
            }
            anyhow::ensure!(
                started.elapsed() < Duration::from_secs(60),
                "relay did not catch up"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
    Ok(())
}

/// Commits one 200-byte message for key `i % KEYS`.
async fn enqueue_blob(
    conn: &mut AsyncPgConnection,
    outbox: &Outbox,
    topic: &str,
    i: u32,
) -> anyhow::Result<()> {
    let message = OutgoingMessage {
        id: MessageId::new(),
        topic: topic.to_owned(),
        key: format!("key-{}", i64::from(i) % KEYS),
        message_type: "com.ferrybox.bench.Blob".into(),
        entity_version: i64::from(i),
        occurred_at: ferrybox::message::now(),
        payload: vec![0xab; PAYLOAD],
        headers: BTreeMap::new(),
    };
    conn.transaction::<_, ferrybox::Error, _>(async |tx| outbox.enqueue(tx, &message).await)
        .await?;
    Ok(())
}

/// The polling interval of both latency runs (the listening relay polls too, as a fallback).
const POLL_MS: u64 = 100;

/// The relay section.
pub(crate) async fn run(report: &mut Report) -> anyhow::Result<()> {
    let n = messages();
    eprintln!("relay: {n} outbox rows of {PAYLOAD} bytes over {KEYS} keys");
    let (relay, raw) = drain_rates(n).await?;
    report.row("relay drain rate (msg/s)", relay);
    report.row("plain producer rate, same messages (msg/s)", raw);
    let (with_1, without_1, bare_1) = write_overhead(1).await?;
    report.row("business tx/s with enqueue, 1 writer", with_1);
    report.row("business tx/s without enqueue, 1 writer", without_1);
    report.row("business tx/s with a bare extra row, 1 writer", bare_1);
    let (with_8, without_8, bare_8) = write_overhead(8).await?;
    report.row("business tx/s with enqueue, 8 writers", with_8);
    report.row("business tx/s without enqueue, 8 writers", without_8);
    report.row("business tx/s with a bare extra row, 8 writers", bare_8);
    let notify = publish_latency_p99(true, 200, 5).await?;
    let poll = publish_latency_p99(false, 200, 5).await?;
    report.row("commit-to-publish p99 at 200 msg/s, NOTIFY (ms)", notify);
    report.row("commit-to-publish p99 at 200 msg/s, poll 100 ms (ms)", poll);
    report.ratio("relay_vs_raw_producer", relay / raw);
    report.ratio("outbox_write_overhead_1", with_1 / without_1);
    report.ratio("outbox_write_overhead_8", with_8 / without_8);
    // The least any outbox writing a row per transaction could score here.
    report.ratio("bare_row_write_overhead_1", bare_1 / without_1);
    report.ratio("bare_row_write_overhead_8", bare_8 / without_8);
    report.ratio("notify_latency_p99_ms", notify);
    report.ratio("poll_latency_p99_ms", poll);
    Ok(())
}
