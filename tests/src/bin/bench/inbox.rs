//! The inbox benchmarks.
//!
//! - `inbox_vs_raw_insert`: inbox apply rate for messages already in Kafka, numbered as a
//!   Ferrybox relay numbers them (deduplicated by number, the default), over the rate of
//!   inserting the same rows straight into PostgreSQL in batches of the same size;
//!   `inbox_id_mode_vs_raw_insert`: the same with `dedup = id` (a row per message).
//! - `bare_consumer_vs_raw_insert` / `raw_insert_with_numbers_vs_raw_insert` /
//!   `inbox_ids_vs_raw_insert`: what the broker alone and the database alone (the inserts
//!   plus the inbox's number statements, or plus the ids it records) allow against that
//!   floor; `inbox_machine_cpu_bound_vs_raw_insert`: what the machine's cores allow an inbox
//!   that costs them what the bare consumer and the inserts with numbers cost together.
//! - `inbox_vs_naive`: the same inbox rate over a naive consumer doing one transaction and one
//!   synchronous offset commit per message.
//! - `e2e_latency_p99_ms`: producer commit to consumer commit, at a fixed moderate rate,
//!   through outbox, relay and broker; `broker_latency_p99_ms`: a plain producer to a bare
//!   consumer at the same rate, the broker's part of it.

use std::time::{Duration, Instant};

use anyhow::Context;
use diesel::sql_types::{Array, BigInt, Text, Uuid as SqlUuid};
use diesel_async::{AsyncConnection, AsyncPgConnection, RunQueryDsl};
use ferrybox::inbox::Dedup;
use ferrybox::inbox::{Handler, HandlerError, ReceivedMessage};
use ferrybox::testing::{self, TestDatabase};
use ferrybox::{
    AvroCodec, CancellationToken, Event, InboxConfig, InboxConsumer, Outbox, Relay, RelayConfig,
    RelayMode,
};
use rdkafka::consumer::{CommitMode, Consumer, StreamConsumer};
use rdkafka::producer::{FutureProducer, FutureRecord};
use serde::{Deserialize, Serialize};

use crate::Report;
use crate::cpu::{self, Measured};

/// Messages for the throughput runs; `FERRYBOX_BENCH_MESSAGES` overrides it.
const DEFAULT_MESSAGES: usize = 100_000;
const NAIVE_MESSAGES: usize = 3_000;

pub(crate) fn messages() -> usize {
    std::env::var("FERRYBOX_BENCH_MESSAGES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(DEFAULT_MESSAGES)
}
const KEYS: usize = 1_000;
const BATCH: usize = 500;

/// How long a fetch may wait at the broker (ms); `FERRYBOX_BENCH_FETCH_WAIT_MS` overrides it.
const DEFAULT_FETCH_WAIT_MS: &str = "5";

/// The broker as every consumer of these benchmarks (inbox and baselines alike) reads it.
/// tansu holds each fetch for the whole `fetch.wait.max.ms` even when records are waiting
/// (Kafka answers at once), so with librdkafka's 500 ms default a consumer reads one fetch's
/// worth of records twice a second: a short wait is the tuning this broker needs.
fn consumer_kafka() -> ferrybox::KafkaConfig {
    let mut kafka = testing::kafka();
    let wait = std::env::var("FERRYBOX_BENCH_FETCH_WAIT_MS")
        .unwrap_or_else(|_| DEFAULT_FETCH_WAIT_MS.to_owned());
    kafka
        .consumer_settings
        .insert("fetch.wait.max.ms".into(), wait);
    kafka
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Reading {
    sensor: String,
    version: i64,
    data: String,
}

impl Event for Reading {
    const MESSAGE_TYPE: &'static str = "com.ferrybox.bench.Reading";
    const SCHEMA: &'static str = r#"{"type":"record","name":"Reading","namespace":"com.ferrybox.bench","fields":[
        {"name":"sensor","type":"string"},{"name":"version","type":"long"},{"name":"data","type":"string"}]}"#;
    fn key(&self) -> String {
        self.sensor.clone()
    }
    fn entity_version(&self) -> i64 {
        self.version
    }
}

const TABLE: &str = "CREATE TABLE readings (message_id UUID NOT NULL, sensor TEXT NOT NULL, version BIGINT NOT NULL, \
                     data TEXT NOT NULL, applied_at TIMESTAMPTZ NOT NULL DEFAULT clock_timestamp())";

/// Writes a whole batch with one statement.
struct Readings;

impl Handler for Readings {
    async fn handle(
        &self,
        conn: &mut AsyncPgConnection,
        message: &ReceivedMessage,
    ) -> Result<(), HandlerError> {
        self.handle_batch(conn, &[message]).await
    }

    async fn handle_batch(
        &self,
        conn: &mut AsyncPgConnection,
        messages: &[&ReceivedMessage],
    ) -> Result<(), HandlerError> {
        let mut ids = Vec::with_capacity(messages.len());
        let mut rows = Vec::with_capacity(messages.len());
        for m in messages {
            ids.push(m.envelope.id.0);
            rows.push(m.body::<Reading>()?);
        }
        insert_readings(conn, ids, &rows).await?;
        Ok(())
    }
}

/// The one statement both the inbox handler and the raw baseline write a batch with.
async fn insert_readings(
    conn: &mut AsyncPgConnection,
    ids: Vec<uuid::Uuid>,
    rows: &[Reading],
) -> Result<(), diesel::result::Error> {
    ferrybox::db::prepared(
        diesel::sql_query(
            "INSERT INTO readings (message_id, sensor, version, data) \
             SELECT * FROM unnest($1::uuid[], $2::text[], $3::bigint[], $4::text[])",
        )
        .bind::<Array<SqlUuid>, _>(ids)
        .bind::<Array<Text>, _>(rows.iter().map(|r| r.sensor.clone()).collect::<Vec<_>>())
        .bind::<Array<BigInt>, _>(rows.iter().map(|r| r.version).collect::<Vec<_>>())
        .bind::<Array<Text>, _>(rows.iter().map(|r| r.data.clone()).collect::<Vec<_>>()),
    )
    .execute(conn)
    .await?;
    Ok(())
}

fn readings(n: usize) -> Vec<Reading> {
    (0..n)
        .map(|i| Reading {
            sensor: format!("sensor-{:04}", i % KEYS),
            version: i64::try_from(i / KEYS + 1).unwrap_or(i64::MAX),
            data: format!("{i:0>180}"),
        })
        .collect()
}

/// The partitions the pre-filled topics have.
const PARTITIONS: usize = 3;

/// Produces `n` encoded messages straight to `topic` (not part of any measurement), numbered
/// as a Ferrybox relay numbers them: message `i` to partition `i % 3`, number `i / 3 + 1`.
async fn prefill(topic: &str, codec: &AvroCodec, n: usize) -> anyhow::Result<()> {
    let producer: FutureProducer = testing::kafka()
        .client_config(ferrybox::ClientKind::Producer)
        .set("linger.ms", "20")
        .create()?;
    let mut pending = Vec::new();
    for (i, reading) in readings(n).into_iter().enumerate() {
        let message = codec.message(topic, &reading).await?;
        let mut headers = message.kafka_headers("bench");
        headers.insert(
            ferrybox::outbox::SOURCE_HEADER.into(),
            "bench-source".into(),
        );
        headers.insert(
            ferrybox::outbox::SEQ_HEADER.into(),
            (i / PARTITIONS + 1).to_string(),
        );
        let kafka_headers = ferrybox::kafka::owned_headers(&headers);
        let record = FutureRecord::to(topic)
            .partition(i32::try_from(i % PARTITIONS)?)
            .key(&message.key)
            .payload(&message.payload)
            .headers(kafka_headers);
        pending.push(producer.send_result(record).map_err(|(e, _)| e)?);
        if pending.len() == 5_000 {
            for p in pending.drain(..) {
                p.await?.map_err(|(e, _)| e)?;
            }
        }
    }
    for p in pending {
        p.await?.map_err(|(e, _)| e)?;
    }
    Ok(())
}

async fn database() -> anyhow::Result<(TestDatabase, AsyncPgConnection)> {
    let (db, _) = TestDatabase::with_framework_tables().await;
    let mut conn = AsyncPgConnection::establish(db.url()).await?;
    diesel::sql_query(TABLE).execute(&mut conn).await?;
    Ok((db, conn))
}

/// An inbox consumer writing readings, reading the broker as every bench consumer does.
fn readings_inbox(
    db: &TestDatabase,
    codec: &AvroCodec,
    config: InboxConfig,
) -> anyhow::Result<InboxConsumer<Readings>> {
    Ok(InboxConsumer::new(
        db.pool(),
        &consumer_kafka(),
        codec.clone(),
        Readings,
        config,
    )?)
}

/// A plain consumer's settings (the inbox's consumer settings, auto commit, from the start),
/// in a group of its own named after `what`.
fn bare_consumer(what: &str) -> rdkafka::ClientConfig {
    let mut config = consumer_kafka().client_config_with_defaults(
        ferrybox::ClientKind::Consumer,
        &[
            ("enable.auto.commit", "true"),
            ("auto.offset.reset", "earliest"),
            ("enable.partition.eof", "false"),
        ],
    );
    config.set("group.id", testing::unique(what));
    config
}

/// Messages per second a plain consumer (the inbox's consumer settings) reads from `topic`,
/// doing nothing with them: how fast any Kafka consumer can go here, an upper bound for the
/// inbox (timed, like the inbox, from its first message: joining the group is left out).
async fn bare_consume_rate(topic: &str) -> anyhow::Result<Measured> {
    let consumer: StreamConsumer = bare_consumer("bare")
        .set("enable.auto.offset.store", "false")
        .create()?;
    consumer.subscribe(&[topic])?;
    let mut bytes = 0usize;
    let mut started = None;
    for _ in 0..messages() {
        let m = tokio::time::timeout(Duration::from_secs(60), consumer.recv())
            .await
            .context("bare consumer stalled")??;
        started.get_or_insert_with(|| (Instant::now(), cpu::Window::start()));
        bytes += rdkafka::message::Message::payload(&m).map_or(0, <[u8]>::len);
    }
    anyhow::ensure!(bytes > 0, "bare consumer read empty messages");
    let (started, window) = started.context("no message")?;
    let n = messages() - 1;
    let rate = n as f64 / started.elapsed().as_secs_f64();
    eprintln!(
        "inbox: bare consumer: this process {:.1} us of CPU per message",
        window.own() / n as f64 * 1e6
    );
    Ok(Measured::of(rate, window.busy(), n))
}

/// A pre-filled topic of numbered messages and a bare consumer's rate on it.
async fn prefilled(codec: &AvroCodec) -> anyhow::Result<(String, Measured)> {
    let topic = testing::create_topic(i32::try_from(PARTITIONS)?).await;
    prefill(&topic, codec, messages()).await?;
    let bare = bare_consume_rate(&topic).await?;
    Ok((topic, bare))
}

/// Messages per second the inbox applies from the pre-filled `topic`, deduplicating by
/// `dedup`.
async fn inbox_rate(codec: &AvroCodec, topic: &str, dedup: Dedup) -> anyhow::Result<Measured> {
    eprintln!("inbox: {dedup:?}: applying");
    let (db, _conn) = database().await?;
    let config = InboxConfig {
        group_id: testing::unique("bench"),
        topics: vec![topic.to_owned()],
        batch_size: BATCH,
        dedup,
        ..InboxConfig::default()
    };
    let consumer = readings_inbox(&db, codec, config)?;
    let stats = consumer.stats();
    let stop = CancellationToken::new();
    let joining = Instant::now();
    let task = tokio::spawn(consumer.run(stop.clone()));
    // Timed from the first batch applied: joining the group (5 to 6 s here, on tansu) is not
    // the inbox's apply rate.
    while stats.snapshot().applied == 0 {
        anyhow::ensure!(
            joining.elapsed() < Duration::from_secs(120),
            "inbox did not start"
        );
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    let started = Instant::now();
    let window = cpu::Window::start();
    let first = stats.snapshot().applied;
    while stats.snapshot().applied < messages() as u64 {
        anyhow::ensure!(
            started.elapsed() < Duration::from_secs(900),
            "inbox did not finish"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let elapsed = started.elapsed();
    let (busy, own) = (window.busy(), window.own());
    stop.cancel();
    task.await??;
    let n = messages() - usize::try_from(first)?;
    eprintln!(
        "inbox: {dedup:?}: this process {:.1} us of CPU per message",
        own / n as f64 * 1e6
    );
    Ok(Measured::of(n as f64 / elapsed.as_secs_f64(), busy, n))
}

/// What a raw batch writes besides the business rows.
#[derive(Clone, Copy)]
enum Extra {
    Nothing,
    /// The inbox's id insert.
    Ids,
    /// The inbox's two number statements (lock and move each partition's last number).
    Numbers,
}

impl Extra {
    fn name(self) -> &'static str {
        match self {
            Self::Nothing => "alone",
            Self::Ids => "with ids",
            Self::Numbers => "with numbers",
        }
    }
}

/// Rows per second inserted straight into PostgreSQL, in batches of the same size; with
/// `extra`, each batch also writes what the inbox writes (the same statements, in the same
/// transaction), still without Kafka, decoding or anything else.
async fn raw_insert_rate(extra: Extra) -> anyhow::Result<Measured> {
    let (_db, mut conn) = database().await?;
    let rows = readings(messages());
    let started = Instant::now();
    let window = cpu::Window::start();
    for (n, chunk) in rows.chunks(BATCH).enumerate() {
        let ids: Vec<uuid::Uuid> = chunk.iter().map(|_| uuid::Uuid::now_v7()).collect();
        conn.transaction::<_, diesel::result::Error, _>(async |tx| {
            match extra {
                Extra::Nothing => {}
                Extra::Ids => record_ids(tx, &ids).await?,
                Extra::Numbers => move_numbers(tx, n).await?,
            }
            insert_readings(tx, ids, chunk).await
        })
        .await?;
    }
    let rate = messages() as f64 / started.elapsed().as_secs_f64();
    eprintln!(
        "inbox: raw insert, {}: this process {:.1} us of CPU per row",
        extra.name(),
        window.own() / messages() as f64 * 1e6
    );
    Ok(Measured::of(rate, window.busy(), messages()))
}

/// The inbox's number statements for a batch over [`PARTITIONS`] partitions: lock each
/// partition's row ([`ferrybox::inbox::LOCK_NUMBERS_SQL`]), then move its last number
/// ([`ferrybox::inbox::STORE_NUMBERS_SQL`]).
async fn move_numbers(
    conn: &mut AsyncPgConnection,
    batch: usize,
) -> Result<(), diesel::result::Error> {
    use diesel::sql_types::Integer;
    #[derive(diesel::QueryableByName)]
    #[allow(dead_code)]
    struct Last {
        #[diesel(sql_type = BigInt)]
        last_seq: i64,
    }
    let partitions: Vec<i32> = (0..i32::try_from(PARTITIONS).unwrap_or(1)).collect();
    let sources = vec!["bench-source"; PARTITIONS];
    let topics = vec!["bench-raw-topic"; PARTITIONS];
    let locked: Vec<Last> = ferrybox::db::prepared(
        diesel::sql_query(ferrybox::inbox::LOCK_NUMBERS_SQL)
            .bind::<Text, _>("bench-raw")
            .bind::<Array<Text>, _>(&sources)
            .bind::<Array<Text>, _>(&topics)
            .bind::<Array<Integer>, _>(&partitions),
    )
    .load(conn)
    .await?;
    assert_eq!(locked.len(), PARTITIONS);
    let last = i64::try_from((batch + 1) * BATCH / PARTITIONS).unwrap_or(i64::MAX);
    ferrybox::db::prepared(
        diesel::sql_query(ferrybox::inbox::STORE_NUMBERS_SQL)
            .bind::<Text, _>("bench-raw")
            .bind::<Array<Text>, _>(&sources)
            .bind::<Array<Text>, _>(&topics)
            .bind::<Array<Integer>, _>(&partitions)
            .bind::<Array<BigInt>, _>(vec![last; PARTITIONS]),
    )
    .execute(conn)
    .await?;
    Ok(())
}

/// The inbox's own id insert ([`ferrybox::inbox::RECORD_IDS_SQL`]), for the bound above.
async fn record_ids(
    conn: &mut AsyncPgConnection,
    ids: &[uuid::Uuid],
) -> Result<(), diesel::result::Error> {
    #[derive(diesel::QueryableByName)]
    struct NewId {
        #[diesel(sql_type = diesel::sql_types::Nullable<SqlUuid>)]
        message_id: Option<uuid::Uuid>,
    }
    let n = ids.len();
    let new: Vec<NewId> = ferrybox::db::prepared(
        diesel::sql_query(ferrybox::inbox::RECORD_IDS_SQL)
            .bind::<Text, _>("bench-raw")
            .bind::<Array<SqlUuid>, _>(ids)
            .bind::<Array<Text>, _>(vec![Reading::MESSAGE_TYPE; n])
            .bind::<Array<Text>, _>(vec!["bench-raw-topic"; n])
            .bind::<Array<diesel::sql_types::Integer>, _>(vec![0; n])
            .bind::<Array<BigInt>, _>((0..i64::try_from(n).unwrap_or(0)).collect::<Vec<_>>())
            // The benchmark's database has one generation, the first.
            .bind::<diesel::sql_types::Integer, _>(0),
    )
    .load(conn)
    .await?;
    assert!(
        new.len() == n && new.iter().all(|r| r.message_id.is_some()),
        "fresh ids are all new"
    );
    Ok(())
}

/// Messages per second of a naive consumer: one transaction and one synchronous offset commit
/// per message.
async fn naive_rate(codec: &AvroCodec) -> anyhow::Result<f64> {
    let topic = testing::create_topic(3).await;
    prefill(&topic, codec, NAIVE_MESSAGES).await?;
    let (_db, mut conn) = database().await?;
    let consumer: StreamConsumer = consumer_kafka()
        .client_config(ferrybox::ClientKind::Consumer)
        .set("group.id", testing::unique("naive"))
        .set("auto.offset.reset", "earliest")
        .set("enable.auto.commit", "false")
        .create()?;
    consumer.subscribe(&[&topic])?;
    let started = Instant::now();
    for _ in 0..NAIVE_MESSAGES {
        let m = consumer.recv().await?;
        let headers = ferrybox::kafka::headers_map(&m);
        let envelope = ferrybox::IncomingMessage::from_parts(
            rdkafka::message::Message::topic(&m),
            rdkafka::message::Message::partition(&m),
            rdkafka::message::Message::offset(&m),
            rdkafka::message::Message::key(&m),
            headers,
            rdkafka::message::Message::payload(&m),
        )?;
        let reading: Reading = codec.decode(&envelope.payload).await?.into_typed()?;
        conn.transaction::<_, diesel::result::Error, _>(async |tx| {
            diesel::sql_query(
                "INSERT INTO ferrybox_inbox (consumer, message_id, message_type, topic, kafka_partition, kafka_offset, generation) \
                 VALUES ('naive', $1, 't', 't', 0, 0, 0) ON CONFLICT DO NOTHING",
            )
            .bind::<SqlUuid, _>(envelope.id.0)
            .execute(tx)
            .await?;
            diesel::sql_query("INSERT INTO readings (message_id, sensor, version, data) VALUES ($1, $2, $3, $4)")
                .bind::<SqlUuid, _>(envelope.id.0)
                .bind::<Text, _>(&reading.sensor)
                .bind::<BigInt, _>(reading.version)
                .bind::<Text, _>(&reading.data)
                .execute(tx)
                .await?;
            Ok(())
        })
        .await?;
        consumer.commit_message(&m, CommitMode::Sync)?;
    }
    Ok(NAIVE_MESSAGES as f64 / started.elapsed().as_secs_f64())
}

/// p50 and p99 of producer commit to consumer commit, in ms, at `rate` messages per second.
async fn e2e_latency(codec: &AvroCodec, rate: u32, seconds: u32) -> anyhow::Result<(f64, f64)> {
    let topic = testing::create_topic(3).await;
    codec.register::<Reading>(&topic).await?;
    let (db, mut conn) = database().await?;
    // Through the relay that reads the write-ahead log, from the append-only table.
    let relay = Relay::new(
        db.config(),
        &testing::kafka(),
        RelayConfig {
            mode: RelayMode::Log,
            ..RelayConfig::default()
        },
    )?;
    let config = InboxConfig {
        group_id: testing::unique("latency"),
        topics: vec![topic.clone()],
        batch_linger: Duration::from_millis(1),
        ..InboxConfig::default()
    };
    let consumer = readings_inbox(&db, codec, config)?;
    let stats = consumer.stats();
    let stop = CancellationToken::new();
    let relay_task = tokio::spawn({
        let stop = stop.clone();
        async move { relay.run(stop).await }
    });
    let consumer_task = tokio::spawn(consumer.run(stop.clone()));
    let outbox = Outbox::new("bench").for_mode(RelayMode::Log);
    let total = rate * seconds;
    let interval = Duration::from_secs(1) / rate;
    // Warm-up, left out of the percentiles: the consumer joins its group and the relay learns
    // the topic's metadata.
    let warm_up = codec.message(&topic, &readings(1)[0]).await?;
    conn.transaction::<_, ferrybox::Error, _>(async |tx| outbox.enqueue(tx, &warm_up).await)
        .await?;
    let started = Instant::now();
    while stats.snapshot().applied < 1 {
        anyhow::ensure!(started.elapsed() < Duration::from_secs(60), "warm-up stuck");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    diesel::sql_query("DELETE FROM readings")
        .execute(&mut conn)
        .await?;
    let mut next = Instant::now();
    for reading in readings(total as usize) {
        tokio::time::sleep_until(next.into()).await;
        next += interval;
        let message = codec.message(&topic, &reading).await?;
        conn.transaction::<_, ferrybox::Error, _>(async |tx| outbox.enqueue(tx, &message).await)
            .await?;
    }
    let started = Instant::now();
    while stats.snapshot().applied < u64::from(total) + 1 {
        anyhow::ensure!(
            started.elapsed() < Duration::from_secs(120),
            "latency run did not finish"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    stop.cancel();
    relay_task.await??;
    consumer_task.await??;
    #[derive(diesel::QueryableByName)]
    struct P {
        #[diesel(sql_type = diesel::sql_types::Double)]
        p50: f64,
        #[diesel(sql_type = diesel::sql_types::Double)]
        p99: f64,
    }
    // The outbox row's commit time is close to created_at; occurred_at is set just before.
    let p: P = diesel::sql_query(
        "SELECT percentile_cont(0.5) WITHIN GROUP (ORDER BY ms) AS p50, percentile_cont(0.99) WITHIN GROUP (ORDER BY ms) AS p99 \
         FROM (SELECT extract(epoch FROM (r.applied_at - o.created_at)) * 1000 AS ms \
               FROM readings r JOIN ferrybox_messages o ON o.message_id = r.message_id) AS l",
    )
    .get_result(&mut conn)
    .await
    .context("latency query")?;
    Ok((p.p50, p.p99))
}

/// The broker's part of the end-to-end latency: a plain producer (the relay's producer
/// settings) sends at `rate` messages a second for `seconds`, each with its send time, and a
/// bare consumer (the inbox's consumer settings) times each from send to receipt; p50 and p99
/// in ms. No database: what the end-to-end p99 cannot go below on this broker.
async fn broker_latency(rate: u32, seconds: u32) -> anyhow::Result<(f64, f64)> {
    let topic = testing::create_topic(3).await;
    let producer: FutureProducer = testing::kafka()
        .client_config(ferrybox::ClientKind::Producer)
        .create()?;
    let consumer: StreamConsumer = bare_consumer("broker-latency").create()?;
    consumer.subscribe(&[&topic])?;
    let epoch = Instant::now();
    let send = |n: u32| {
        let sent = epoch.elapsed().as_micros().to_string();
        let key = (n % 1000).to_string();
        producer
            .send_result(FutureRecord::to(&topic).key(&key).payload(&sent))
            .map_err(|(e, _)| e)
    };
    // Warm-up, left out: the consumer joins its group, the producer gets its id.
    send(0)?.await?.map_err(|(e, _)| e)?;
    tokio::time::timeout(Duration::from_secs(60), consumer.recv())
        .await
        .context("broker latency warm-up")??;
    let total = rate * seconds;
    let receiving = async {
        let mut latencies = Vec::with_capacity(total as usize);
        for _ in 0..total {
            let m = tokio::time::timeout(Duration::from_secs(60), consumer.recv())
                .await
                .context("broker latency receive")??;
            let sent: u128 =
                std::str::from_utf8(rdkafka::message::Message::payload(&m).unwrap_or_default())?
                    .parse()?;
            latencies.push((epoch.elapsed().as_micros() - sent) as f64 / 1e3);
        }
        anyhow::Ok(latencies)
    };
    let sending = async {
        let interval = Duration::from_secs(1) / rate;
        let mut next = Instant::now();
        let mut acks = Vec::with_capacity(total as usize);
        for n in 1..=total {
            tokio::time::sleep_until(next.into()).await;
            next += interval;
            acks.push(send(n)?);
        }
        for ack in acks {
            ack.await?.map_err(|(e, _)| e)?;
        }
        anyhow::Ok(())
    };
    let (latencies, sent) = tokio::join!(receiving, sending);
    sent?;
    let mut latencies = latencies?;
    // Both clients go before their topic does: librdkafka 2.x crashed (a segmentation fault in
    // its metadata cache) when tansu deleted the topic of a live subscription.
    drop(consumer);
    drop(producer);
    testing::delete_topic(&topic).await?;
    latencies.sort_by(f64::total_cmp);
    let at = |q: f64| latencies[((latencies.len() - 1) as f64 * q).round() as usize];
    Ok((at(0.5), at(0.99)))
}

/// The inbox section: throughput against raw inserts and a naive consumer, and e2e latency.
pub(crate) async fn run(codec: &AvroCodec, report: &mut Report) -> anyhow::Result<()> {
    eprintln!(
        "inbox: {} messages of ~200 bytes over {KEYS} keys, batches of {BATCH}",
        messages()
    );
    let (topic, bare) = prefilled(codec).await?;
    // The inbox and its baselines, alternated three times: the medians are reported.
    let (mut inboxes, mut raws, mut raws_with_numbers) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..3 {
        inboxes.push(inbox_rate(codec, &topic, Dedup::Sequence).await?);
        raws.push(raw_insert_rate(Extra::Nothing).await?);
        raws_with_numbers.push(raw_insert_rate(Extra::Numbers).await?);
    }
    let (inbox, raw, raw_with_numbers) = (
        cpu::median_of(&inboxes),
        cpu::median_of(&raws),
        cpu::median_of(&raws_with_numbers),
    );
    let inbox_id_mode = inbox_rate(codec, &topic, Dedup::Id).await?;
    testing::delete_topic(&topic).await?;
    let raw_with_ids = raw_insert_rate(Extra::Ids).await?;
    let naive = naive_rate(codec).await?;
    let (p50, p99) = e2e_latency(codec, 200, 10).await?;
    let (broker_p50, broker_p99) = broker_latency(200, 10).await?;
    let raw_rate = raw.rate;
    report.row("inbox apply rate, dedup by number (msg/s)", inbox.rate);
    report.row("inbox apply rate, dedup by id (msg/s)", inbox_id_mode.rate);
    report.row("raw batched insert rate (rows/s)", raw_rate);
    report.row("bare consumer, same topic, no database (msg/s)", bare.rate);
    report.row(
        "raw batched insert + the inbox's numbers, no Kafka (rows/s)",
        raw_with_numbers.rate,
    );
    report.row(
        "raw batched insert + inbox ids, no Kafka (rows/s)",
        raw_with_ids.rate,
    );
    report.row("naive consumer rate (msg/s)", naive);
    // What each costs the whole machine (broker, database, this process), per message.
    let micros = |m: Measured| m.cpu * 1e6;
    report.row(
        "machine CPU per message, inbox by number (us)",
        micros(inbox),
    );
    report.row(
        "machine CPU per message, inbox by id (us)",
        micros(inbox_id_mode),
    );
    report.row("machine CPU per message, bare consumer (us)", micros(bare));
    report.row(
        "machine CPU per message, raw insert + numbers (us)",
        micros(raw_with_numbers),
    );
    report.row("e2e latency p50 at 200 msg/s, log relay (ms)", p50);
    report.row("e2e latency p99 at 200 msg/s, log relay (ms)", p99);
    report.row(
        "producer to bare consumer p50 at 200 msg/s, no database (ms)",
        broker_p50,
    );
    report.row(
        "producer to bare consumer p99 at 200 msg/s, no database (ms)",
        broker_p99,
    );
    report.ratio("inbox_vs_raw_insert", inbox.rate / raw_rate);
    report.ratio("inbox_id_mode_vs_raw_insert", inbox_id_mode.rate / raw_rate);
    // The bound of inbox_vs_raw_insert the database sets: the inserts plus the numbers.
    report.ratio(
        "raw_insert_with_numbers_vs_raw_insert",
        raw_with_numbers.rate / raw_rate,
    );
    // What the floor of inbox_vs_raw_insert needs of the broker alone: a consumer that
    // writes nothing, over the raw insert rate.
    report.ratio("bare_consumer_vs_raw_insert", bare.rate / raw_rate);
    // ... and of the database alone: the same inserts plus the ids the inbox must record.
    report.ratio("inbox_ids_vs_raw_insert", raw_with_ids.rate / raw_rate);
    // The machine's bound for any inbox on these cores: per message it reads what the bare
    // consumer reads and writes what the raw insert with numbers writes, so it costs the
    // machine at least both; the cores can do no more than that many a second, and neither
    // half can go faster than it does alone.
    let machine = (cpu::cores() / (bare.cpu + raw_with_numbers.cpu))
        .min(bare.rate)
        .min(raw_with_numbers.rate);
    report.ratio("inbox_machine_cpu_bound_vs_raw_insert", machine / raw_rate);
    report.ratio("inbox_vs_naive", inbox.rate / naive);
    report.ratio("e2e_latency_p99_ms", p99);
    // Its bound on this broker: the same hop with no outbox, relay or database.
    report.ratio("broker_latency_p99_ms", broker_p99);
    Ok(())
}
