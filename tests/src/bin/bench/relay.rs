//! The relay and outbox benchmarks, for both relay modes (`log`: the write-ahead log;
//! `table`: polling the outbox table).
//!
//! - `relay_vs_raw_producer_<mode>`: relay drain rate from a backlog over the rate of a plain
//!   rdkafka producer sending the same messages with the same settings (medians of three
//!   alternating runs: the broker's speed swings between runs).
//! - `outbox_write_overhead_1` / `_8`: business transactions per second with `enqueue` (log
//!   mode: the append-only table) over the same transactions without it, at 1 and 8
//!   writers; `..._table_...` the same with the polling table's `enqueue`.
//! - `bare_row_write_overhead_1` / `_8`: a bare one-row insert instead of `enqueue`, and
//!   `logical_message_write_overhead_1` / `_8`: the same bytes as a logical decoding message
//!   (`pg_logical_emit_message`): the bounds of what any outbox can cost on this machine.
//! - `log_machine_cpu_bound_vs_raw_producer`: the log mode's bound: the machine's cores over
//!   the least CPU a log relay costs per message (its WAL sender's, measured during the
//!   relay's run, plus what the plain producer costs the machine), over the producer's rate;
//!   `log_one_wal_sender_bound_vs_raw_producer`: one WAL sender's most at its CPU per message.
//! - `log_read_alone_vs_raw_producer`: how fast PostgreSQL streams the same backlog to
//!   `pg_recvlogical` (timed from the first bytes it streams), with no broker, over the
//!   producer's rate (printed; no bound: the relay is faster).
//! - `log_read_and_produce_vs_raw_producer`: that stream and the plain producer at once, on
//!   the same cores (not a bound: each runs at full speed and takes cores from the other,
//!   which the relay's read, paced by its sends, does not).
//! - `table_read_and_mark_alone_vs_raw_producer`: the table mode's bound: the polling relay
//!   with nothing to send to (`Relay::feed_only`), so only its database work (poll, mark).
//! - `publish_latency_p99_ms_<mode>`: commit to acknowledged publish at 200 msg/s.
//! - `backlog_vs_steady_<mode>`: the drain rate of a backlog ten times as large over the
//!   drain rate above (medians of three runs each); its bound,
//!   `raw_producer_backlog_vs_steady`: the plain producer sending that many over its rate
//!   above (how much of the slowdown the broker and client alone cause), and
//!   `table_read_and_mark_backlog_vs_steady`: the same for the table mode's database work
//!   alone (`Relay::feed_only`).

use std::collections::{BTreeMap, VecDeque};
use std::time::{Duration, Instant};

use diesel::sql_types::{BigInt, Integer, Text};
use diesel_async::{AsyncConnection, AsyncPgConnection, RunQueryDsl};
use ferrybox::testing::{self, TestDatabase};
use ferrybox::{
    CancellationToken, MessageId, Outbox, OutgoingMessage, Relay, RelayConfig, RelayMode,
};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::producer::FutureRecord;

use crate::Report;
use crate::cpu::{self, Measured, median, median_of};
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
    prefill(conn, "ferrybox_outbox", topic, n).await
}

/// Commits `n` messages into `table` (either outbox table), in transactions of at most
/// 10,000 rows (as a busy service would, not one transaction the log must spill to disk).
async fn prefill(
    conn: &mut AsyncPgConnection,
    table: &str,
    topic: &str,
    n: usize,
) -> anyhow::Result<()> {
    let mut left = n;
    while left > 0 {
        let chunk = left.min(10_000);
        prefill_once(conn, table, topic, chunk).await?;
        left -= chunk;
    }
    // As autovacuum would soon after such a burst: without statistics the planner sorts the
    // backlog on disk instead of walking the unpublished index.
    diesel::sql_query(format!("ANALYZE {table}"))
        .execute(conn)
        .await?;
    Ok(())
}

async fn prefill_once(
    conn: &mut AsyncPgConnection,
    table: &str,
    topic: &str,
    n: usize,
) -> anyhow::Result<()> {
    diesel::sql_query(format!("INSERT INTO {table} \
           (message_id, topic, message_key, message_type, entity_version, headers, payload, occurred_at) \
         SELECT u, $1, 'key-' || (i % $3), 'com.ferrybox.bench.Blob', i / $3 + 1, \
                jsonb_build_object('ce_specversion', '1.0', 'ce_id', u::text, \
                  'ce_type', 'com.ferrybox.bench.Blob', 'ce_source', 'bench', \
                  'ce_time', now()::text, 'ce_subject', 'key-' || (i % $3), \
                  'ce_entityversion', (i / $3 + 1)::text, 'content-type', 'application/avro'), \
                decode(repeat('ab', $4), 'hex'), now() \
         FROM (SELECT gen_random_uuid() AS u, i FROM generate_series(1, $2) AS i) AS s"))
    .bind::<Text, _>(topic)
    .bind::<Integer, _>(i32::try_from(n)?)
    .bind::<BigInt, _>(KEYS)
    .bind::<Integer, _>(i32::try_from(PAYLOAD)?)
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

/// A message of the plain producer's baseline, as the relay sends it.
struct Outgoing {
    key: String,
    headers: BTreeMap<String, String>,
    payload: Vec<u8>,
}

/// A plain producer with the relay's settings, ready: a message to `topic` acknowledged. A new
/// idempotent producer's first message waits for its producer id (about 0.5 s against tansu),
/// a start-up cost the relay's rate leaves out too (see `drain_rate_in`).
async fn ready_producer(topic: &str) -> anyhow::Result<rdkafka::producer::FutureProducer> {
    let producer = ferrybox::kafka::durable_producer(&testing::kafka())?;
    producer
        .send_result(FutureRecord::to(topic).key("warm-up").payload("warm-up"))
        .map_err(|(e, _)| e)?
        .await?
        .map_err(|(e, _)| e)?;
    Ok(producer)
}

/// Messages per second of a ready plain producer sending `rows`, and the machine's CPU
/// meanwhile.
async fn raw_producer_rate(
    producer: &rdkafka::producer::FutureProducer,
    topic: &str,
    rows: &[Outgoing],
) -> anyhow::Result<Measured> {
    let (sent, busy) = cpu::busy_during(send_timed(producer, topic, rows)).await;
    Ok(Measured::of(sent?, busy, rows.len()))
}

/// One run of the plain producer's baseline: `rows` sent by a ready producer to a topic of
/// their own, deleted afterwards.
async fn raw_producer_run(rows: &[Outgoing]) -> anyhow::Result<Measured> {
    let topic = testing::create_topic(3).await;
    let producer = ready_producer(&topic).await?;
    let measured = raw_producer_rate(&producer, &topic, rows).await?;
    drop(producer);
    testing::delete_topic(&topic).await?;
    Ok(measured)
}

/// The plain producer's timed part: sends every row, awaits every acknowledgement; the rate.
async fn send_timed(
    producer: &rdkafka::producer::FutureProducer,
    topic: &str,
    rows: &[Outgoing],
) -> anyhow::Result<f64> {
    let started = Instant::now();
    let mut pending = VecDeque::new();
    for row in rows {
        loop {
            let record = FutureRecord::to(topic)
                .key(&row.key)
                .payload(&row.payload)
                .headers(ferrybox::kafka::owned_headers(&row.headers));
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

/// The relay in `mode` as services run it (`Relay::run`), on its own task.
struct Running {
    stop: CancellationToken,
    task: tokio::task::JoinHandle<ferrybox::Result<()>>,
    published: tokio::sync::watch::Receiver<u64>,
}

/// Where a measured relay publishes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Via {
    /// The broker, as every relay rate here but the table mode's bound.
    Kafka,
    /// Nowhere (`Relay::feed_only`): reading and marking the rows is all the relay does.
    Feed,
}

impl Running {
    fn start(db: &TestDatabase, config: RelayConfig) -> anyhow::Result<Self> {
        Self::start_via(db, config, Via::Kafka)
    }

    fn start_via(db: &TestDatabase, config: RelayConfig, via: Via) -> anyhow::Result<Self> {
        let relay = match via {
            Via::Kafka => Relay::new(db.config(), &testing::kafka(), config)?,
            Via::Feed => Relay::feed_only(db.config(), config)?,
        };
        let published = relay.published();
        let stop = CancellationToken::new();
        let task = tokio::spawn({
            let stop = stop.clone();
            async move { relay.run(stop).await }
        });
        Ok(Self {
            stop,
            task,
            published,
        })
    }

    /// Waits (up to five minutes) until the relay has published `n` messages.
    async fn published(&mut self, n: u64) -> anyhow::Result<()> {
        let wait = self.published.wait_for(|p| *p >= n);
        tokio::time::timeout(Duration::from_secs(300), wait)
            .await
            .map_err(|_| anyhow::anyhow!("the relay did not publish {n} messages in time"))??;
        Ok(())
    }

    async fn stop(self) -> anyhow::Result<()> {
        self.stop.cancel();
        self.task.await??;
        Ok(())
    }
}

fn config_in(mode: RelayMode) -> RelayConfig {
    RelayConfig {
        mode,
        ..RelayConfig::default()
    }
}

fn table_of(mode: RelayMode) -> &'static str {
    if mode == RelayMode::Log {
        "ferrybox_messages"
    } else {
        "ferrybox_outbox"
    }
}

/// Messages per second at which the relay in `mode` drains a backlog of `n`: the relay is
/// made active (its slot made, its topic known), stopped, the backlog committed, and a new
/// relay started; the clock runs from its first acknowledgement to its `n`th (the messages
/// before the first count are left out of the rate); the WAL senders' CPU is measured over
/// the same time. For the log mode, also how fast PostgreSQL streams the same backlog from a
/// slot of its own to `pg_recvlogical` (a C client that only reads it), with no broker at all
/// (printed, no bound: the relay is faster).
async fn drain_rate(mode: RelayMode, n: usize) -> anyhow::Result<(Measured, Option<Measured>)> {
    drain_rate_in(mode, 1, n, Via::Kafka).await
}

/// The same with the log relay split into `shards` shards (one instance running them all),
/// publishing `via` the broker or nowhere.
async fn drain_rate_in(
    mode: RelayMode,
    shards: u32,
    n: usize,
    via: Via,
) -> anyhow::Result<(Measured, Option<Measured>)> {
    let (db, mut conn) = outbox_database().await?;
    if shards > 1 {
        ferrybox::outbox::reshard(&mut conn, None, shards, Duration::from_secs(60)).await?;
    }
    let topic = testing::create_topic(3).await;
    let mut warm = Running::start_via(&db, config_in(mode), via)?;
    // One row per key: every shard has its slot before the clock starts.
    let warm_rows = if shards > 1 {
        usize::try_from(KEYS)?
    } else {
        1
    };
    prefill(&mut conn, table_of(mode), &topic, warm_rows).await?;
    diesel::sql_query("SELECT pg_notify('ferrybox_outbox', '')")
        .execute(&mut conn)
        .await?;
    warm.published(u64::try_from(warm_rows)?).await?;
    warm.stop().await?;
    let bound_slot = testing::unique("bound");
    let with_bound = mode == RelayMode::Log && via == Via::Kafka;
    if with_bound {
        diesel::sql_query(format!(
            "SELECT 1 FROM pg_create_logical_replication_slot('{bound_slot}', 'pgoutput')"
        ))
        .execute(&mut conn)
        .await?;
    }
    prefill(&mut conn, table_of(mode), &topic, n).await?;
    // The backlog was written in seconds, a real one over the time the relay was away: the
    // checkpoint its WAL calls for (a 1,000,000-row backlog writes more than `max_wal_size`)
    // would otherwise run during the drain and be measured as the relay's.
    diesel::sql_query("CHECKPOINT").execute(&mut conn).await?;
    let mut relay = Running::start_via(&db, config_in(mode), via)?;
    // The clock starts at the relay's first acknowledgement, as the plain producer's does (see
    // `raw_producer_rate`): before it, a new producer waits for its producer id.
    relay.published(1).await?;
    let from = *relay.published.borrow();
    // The server processes decoding the log for the relay (one per slot).
    let senders = if mode == RelayMode::Log {
        wal_senders(&mut conn).await?
    } else {
        Vec::new()
    };
    let senders_before = senders_seconds(&senders);
    let (drained, busy) = cpu::busy_during(async {
        let started = Instant::now();
        relay.published(u64::try_from(n)?).await?;
        anyhow::Ok(started.elapsed().as_secs_f64())
    })
    .await;
    let senders_spent = senders_seconds(&senders)
        .zip(senders_before)
        .map(|(after, before)| after - before);
    let measured = n.saturating_sub(usize::try_from(from)?).max(1);
    let mut drain = Measured::of(measured as f64 / drained?, busy, measured);
    drain.sender = senders_spent.map(|s| s / measured as f64);
    relay.stop().await?;
    // tansu keeps every message in memory until its topic goes: left, the runs' messages
    // make the broker slower run after run (9.8 GB after a few, and a 1,000,000-message
    // backlog drained at 0.72 of the 100,000 one, where a fresh broker drained both alike).
    testing::delete_topic(&topic).await?;
    let bound = if with_bound {
        let read = log_read_rate(&db, &mut conn, &bound_slot, n).await;
        diesel::sql_query(format!("SELECT pg_drop_replication_slot('{bound_slot}')"))
            .execute(&mut conn)
            .await?;
        Some(read?)
    } else {
        None
    };
    Ok((drain, bound))
}

#[derive(diesel::QueryableByName)]
struct Pid {
    #[diesel(sql_type = diesel::sql_types::Integer)]
    pid: i32,
}

/// The process ids of the WAL senders streaming this database's slots now.
async fn wal_senders(conn: &mut AsyncPgConnection) -> anyhow::Result<Vec<u32>> {
    let pids: Vec<Pid> = diesel::sql_query(
        "SELECT active_pid AS pid FROM pg_replication_slots \
         WHERE database = current_database() AND active_pid IS NOT NULL",
    )
    .load(conn)
    .await?;
    Ok(pids
        .into_iter()
        .filter_map(|p| u32::try_from(p.pid).ok())
        .collect())
}

/// The CPU seconds the `senders` have spent, together (`None` when one cannot be read, or
/// there are none).
fn senders_seconds(senders: &[u32]) -> Option<f64> {
    if senders.is_empty() {
        return None;
    }
    senders.iter().map(|pid| cpu::process_seconds(*pid)).sum()
}

/// Messages per second `pg_recvlogical` reads from `slot` up to the current WAL position.
async fn log_read_rate(
    db: &TestDatabase,
    conn: &mut AsyncPgConnection,
    slot: &str,
    n: usize,
) -> anyhow::Result<Measured> {
    use tokio::io::AsyncReadExt;
    #[derive(diesel::QueryableByName)]
    struct Lsn {
        #[diesel(sql_type = Text)]
        lsn: String,
    }
    let end: Lsn = diesel::sql_query("SELECT pg_current_wal_lsn()::text AS lsn")
        .get_result(conn)
        .await?;
    let bindir = std::process::Command::new("pg_config")
        .arg("--bindir")
        .output()
        .ok()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .filter(|d| std::path::Path::new(d).join("pg_recvlogical").exists())
        .unwrap_or_else(|| "/usr/lib/postgresql/15/bin".into());
    let mut reader = tokio::process::Command::new(format!("{bindir}/pg_recvlogical"))
        .args([
            "-d",
            db.url(),
            "--slot",
            slot,
            "--start",
            "--endpos",
            &end.lsn,
        ])
        .args([
            "-o",
            "proto_version=1",
            "-o",
            "publication_names=ferrybox_messages",
        ])
        .args(["-o", "binary=true", "-f", "-", "--no-loop"])
        .stdout(std::process::Stdio::piped())
        .spawn()?;
    let mut out = reader.stdout.take().expect("piped");
    // The clock starts at the first bytes streamed, as the relay's does at its first
    // acknowledgement: the program's start, its connection and the decoding of the first
    // transaction are left out (the messages of that first read, a pipe's worth, are not).
    let mut buffer = vec![0u8; 1 << 16];
    anyhow::ensure!(
        out.read(&mut buffer).await? > 0,
        "pg_recvlogical streamed nothing"
    );
    let (read, busy) = cpu::busy_during(async {
        let started = Instant::now();
        while out.read(&mut buffer).await? > 0 {}
        let status = reader.wait().await?;
        anyhow::ensure!(status.success(), "pg_recvlogical failed: {status}");
        anyhow::Ok(started.elapsed().as_secs_f64())
    })
    .await;
    Ok(Measured::of(n as f64 / read?, busy, n))
}

/// PostgreSQL streaming a backlog of `rows.len()` messages to `pg_recvlogical` and a plain
/// producer sending the same messages, both at once, on the same cores: the rate of the
/// slower (printed, no bound: each runs at full speed and takes cores from the other).
async fn read_and_produce_rate(rows: &[Outgoing]) -> anyhow::Result<f64> {
    let n = rows.len();
    let (db, mut conn) = outbox_database().await?;
    let slot = testing::unique("bound");
    diesel::sql_query(format!(
        "SELECT 1 FROM pg_create_logical_replication_slot('{slot}', 'pgoutput')"
    ))
    .execute(&mut conn)
    .await?;
    prefill(&mut conn, "ferrybox_messages", "unused", n).await?;
    let topic = testing::create_topic(3).await;
    // Ready first, so that both halves run at once from their first message.
    let producer = ready_producer(&topic).await?;
    let (read, produced) = tokio::join!(
        log_read_rate(&db, &mut conn, &slot, n),
        raw_producer_rate(&producer, &topic, rows)
    );
    diesel::sql_query(format!("SELECT pg_drop_replication_slot('{slot}')"))
        .execute(&mut conn)
        .await?;
    testing::delete_topic(&topic).await?;
    Ok(read?.rate.min(produced?.rate))
}

/// The messages a drain sends, for the plain producer's baseline.
async fn baseline_rows(n: usize) -> anyhow::Result<Vec<Outgoing>> {
    let (_db, mut conn) = outbox_database().await?;
    prefill_outbox(&mut conn, "unused", n).await?;
    let stored: Vec<Stored> =
        diesel::sql_query("SELECT message_key, headers, payload FROM ferrybox_outbox ORDER BY id")
            .load(&mut conn)
            .await?;
    stored
        .into_iter()
        .map(|row| {
            Ok(Outgoing {
                key: row.message_key,
                headers: serde_json::from_value(row.headers)?,
                payload: row.payload,
            })
        })
        .collect()
}

/// Drain rates (msg/s) and their CPU, medians of three alternated runs.
struct DrainRates {
    log: Measured,
    log_3_shards: Measured,
    table: Measured,
    raw: Measured,
    /// The log read alone.
    read: Measured,
    /// The log read and the plain producer at once (a bound of the log mode).
    read_and_produce: f64,
    /// The table mode with nothing to send to (`Relay::feed_only`): polling the table and
    /// marking its rows alone (the bound of the table mode).
    read_and_mark: Measured,
}

/// Drain rates of each relay mode (the log one also in three shards) and of the plain
/// producer, alternated three times.
async fn drain_rates(n: usize) -> anyhow::Result<DrainRates> {
    let rows = baseline_rows(n).await?;
    let mut marked = Vec::new();
    let (mut log, mut sharded, mut table, mut raw, mut read, mut both) = (
        Vec::new(),
        Vec::new(),
        Vec::new(),
        Vec::new(),
        Vec::new(),
        Vec::new(),
    );
    for _ in 0..3 {
        raw.push(raw_producer_run(&rows).await?);
        let (rate, bound) = drain_rate(RelayMode::Log, n).await?;
        log.push(rate);
        read.extend(bound);
        sharded.push(drain_rate_in(RelayMode::Log, 3, n, Via::Kafka).await?.0);
        table.push(drain_rate(RelayMode::Table, n).await?.0);
        marked.push(drain_rate_in(RelayMode::Table, 1, n, Via::Feed).await?.0);
        both.push(read_and_produce_rate(&rows).await?);
    }
    let rates = |runs: &[Measured]| runs.iter().map(|m| m.rate.round()).collect::<Vec<_>>();
    eprintln!(
        "relay: drain runs (msg/s) log {:?}, log in 3 shards {:?}, table {:?}, raw {:?}, \
         the log read alone {:?}, the log read and the producer at once {both:.0?}, \
         the table polled and marked, no broker {:?}",
        rates(&log),
        rates(&sharded),
        rates(&table),
        rates(&raw),
        rates(&read),
        rates(&marked),
    );
    Ok(DrainRates {
        log: median_of(&log),
        log_3_shards: median_of(&sharded),
        table: median_of(&table),
        raw: median_of(&raw),
        read: median_of(&read),
        read_and_produce: median(both),
        read_and_mark: median_of(&marked),
    })
}

const ACCOUNTS: &str = "CREATE TABLE accounts (id UUID PRIMARY KEY, email TEXT NOT NULL UNIQUE, \
                        name TEXT NOT NULL, profile TEXT NOT NULL, \
                        created_at TIMESTAMPTZ NOT NULL DEFAULT now())";

/// What a business transaction writes besides its account.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Extra {
    Nothing,
    /// The matching event, through `Outbox::enqueue` for the log relay (append-only table).
    Enqueue,
    /// The same through the polling table's `Outbox::enqueue`.
    EnqueueTable,
    /// The bytes `enqueue` writes, as a transactional logical decoding message instead of a
    /// row: the bound for an outbox that writes no row at all.
    LogicalMessage,
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
            let outbox = Outbox::new("bench").for_mode(RelayMode::Log);
            let table_outbox = Outbox::new("bench");
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
                let (outbox, table_outbox) = (&outbox, &table_outbox);
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
                        Extra::EnqueueTable => table_outbox.enqueue(tx, &message).await?,
                        Extra::LogicalMessage => {
                            // What enqueue stores: the payload and its headers, topic, key
                            // and type.
                            let mut bytes = message.payload.clone();
                            bytes.extend_from_slice(
                                serde_json::to_string(&message.kafka_headers("bench"))
                                    .unwrap_or_default()
                                    .as_bytes(),
                            );
                            bytes.extend_from_slice(message.topic.as_bytes());
                            bytes.extend_from_slice(message.key.as_bytes());
                            bytes.extend_from_slice(message.message_type.as_bytes());
                            ferrybox::db::prepared(
                                diesel::sql_query(
                                    "SELECT pg_logical_emit_message(true, 'ferrybox', $1)",
                                )
                                .bind::<diesel::sql_types::Bytea, _>(&bytes),
                            )
                            .execute(tx)
                            .await?;
                        }
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

/// Transactions per second at `writers` concurrent writers, in the order of [`EXTRAS`].
async fn write_overhead(writers: usize) -> anyhow::Result<[f64; 5]> {
    let (db, mut conn) = outbox_database().await?;
    diesel::sql_query(ACCOUNTS).execute(&mut conn).await?;
    diesel::sql_query(BARE).execute(&mut conn).await?;
    let topic = testing::create_topic(1).await;
    // Warm up, then alternate so drift affects all alike; medians of three.
    write_rate(&db, &topic, writers, Extra::Enqueue, 1).await?;
    let mut runs: [Vec<f64>; 5] = Default::default();
    for _ in 0..3 {
        for (i, extra) in EXTRAS.into_iter().enumerate() {
            runs[i].push(write_rate(&db, &topic, writers, extra, 3).await?);
        }
    }
    Ok(runs.map(median))
}

const EXTRAS: [Extra; 5] = [
    Extra::Enqueue,
    Extra::Nothing,
    Extra::BareRow,
    Extra::EnqueueTable,
    Extra::LogicalMessage,
];

/// p99 of commit to acknowledged publish, in ms, at `rate` messages a second for `seconds`,
/// for the relay in `mode` (the polling relay woken by `NOTIFY`, polling every 100 ms as a
/// fallback). The acknowledgement time is when the relay's published count reached the
/// message (messages are committed one at a time, so the nth count is the nth message).
async fn publish_latency_p99(mode: RelayMode, rate: u32, seconds: u32) -> anyhow::Result<f64> {
    let (db, mut conn) = outbox_database().await?;
    let topic = testing::create_topic(3).await;
    let config = RelayConfig {
        poll_interval: Duration::from_millis(POLL_MS),
        ..config_in(mode)
    };
    let mut relay = Running::start(&db, config)?;
    let outbox = Outbox::new("bench").for_mode(mode);
    // The first message (which waits for the slot and the topic's metadata) is a warm-up.
    enqueue_blob(&mut conn, &outbox, &topic, 0).await?;
    relay.published(1).await?;
    let total = usize::try_from(rate * seconds)?;
    let acked = tokio::spawn({
        let mut published = relay.published.clone();
        async move {
            let mut at = Vec::with_capacity(total);
            while at.len() < total {
                if published.changed().await.is_err() {
                    break;
                }
                let now = Instant::now();
                let n = usize::try_from(*published.borrow_and_update()).unwrap_or(0) - 1;
                while at.len() < n.min(total) {
                    at.push(now);
                }
            }
            at
        }
    });
    let interval = Duration::from_secs(1) / rate;
    let mut committed = Vec::with_capacity(total);
    let mut next = Instant::now();
    for i in 0..total {
        tokio::time::sleep_until(next.into()).await;
        next += interval;
        enqueue_blob(&mut conn, &outbox, &topic, u32::try_from(i)? + 1).await?;
        committed.push(Instant::now());
    }
    let acked = tokio::time::timeout(Duration::from_secs(60), acked).await??;
    relay.stop().await?;
    anyhow::ensure!(
        acked.len() == total,
        "only {} of {total} published",
        acked.len()
    );
    let latencies: Vec<f64> = committed
        .iter()
        .zip(&acked)
        .map(|(c, a)| a.saturating_duration_since(*c).as_secs_f64() * 1000.0)
        .collect();
    let mut sorted = latencies;
    sorted.sort_by(f64::total_cmp);
    Ok(sorted[(sorted.len() * 99).div_ceil(100) - 1])
}

/// The bound of the latency floor: a plain producer with the relay's settings sending one
/// 200-byte message every `1/rate` s to the same broker, p99 of send-to-acknowledgement (ms):
/// what no relay can beat, since it sends with the same producer after the commit.
async fn raw_producer_latency_p99(rate: u32, seconds: u32) -> anyhow::Result<f64> {
    let topic = testing::create_topic(3).await;
    let producer = ferrybox::kafka::durable_producer(&testing::kafka())?;
    let payload = vec![0xab_u8; PAYLOAD];
    let send = |i: u32| {
        let key = format!("key-{}", i64::from(i) % KEYS);
        let record = FutureRecord::to(&topic).key(&key).payload(&payload);
        producer.send_result(record).map_err(|(e, _)| e)
    };
    // The first message (which waits for the topic's metadata) is a warm-up.
    send(0)?.await?.map_err(|(e, _)| e)?;
    let total = rate * seconds;
    let interval = Duration::from_secs(1) / rate;
    let mut waits = Vec::new();
    let mut next = Instant::now();
    for i in 1..=total {
        tokio::time::sleep_until(next.into()).await;
        next += interval;
        let sent = Instant::now();
        let delivery = send(i)?;
        waits.push(tokio::spawn(async move {
            delivery
                .await
                .ok()
                .and_then(Result::ok)
                .map(|_| sent.elapsed())
        }));
    }
    let mut latencies = Vec::with_capacity(waits.len());
    for w in waits {
        let took = w
            .await?
            .ok_or_else(|| anyhow::anyhow!("a message was not acknowledged"))?;
        latencies.push(took.as_secs_f64() * 1000.0);
    }
    latencies.sort_by(f64::total_cmp);
    Ok(latencies[(latencies.len() * 99).div_ceil(100) - 1])
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
    let DrainRates {
        log,
        log_3_shards,
        table,
        raw,
        read,
        read_and_produce,
        read_and_mark,
    } = drain_rates(n).await?;
    report.row("relay drain rate, log mode (msg/s)", log.rate);
    report.row(
        "relay drain rate, log mode in 3 shards, one instance (msg/s)",
        log_3_shards.rate,
    );
    report.row("relay drain rate, table mode (msg/s)", table.rate);
    report.row("plain producer rate, same messages (msg/s)", raw.rate);
    report.row(
        "the log read alone: pg_recvlogical, no broker (msg/s)",
        read.rate,
    );
    report.row(
        "the log read and a plain producer at once (msg/s)",
        read_and_produce,
    );
    report.row(
        "the table polled and marked, no broker (msg/s)",
        read_and_mark.rate,
    );
    // What each costs the whole machine (broker, database, this process), per message.
    let micros = |m: Measured| m.cpu * 1e6;
    report.row("machine CPU per message, log relay (us)", micros(log));
    report.row("machine CPU per message, table relay (us)", micros(table));
    report.row("machine CPU per message, plain producer (us)", micros(raw));
    report.row(
        "machine CPU per message, the log read alone (us)",
        micros(read),
    );
    report.row(
        "machine CPU per message, table polled and marked (us)",
        micros(read_and_mark),
    );
    // One slot is decoded by one server process, on one core: at its CPU per message, the
    // most it can stream, however fast the relay, is one second's worth.
    let sender = log.sender.unwrap_or(f64::NAN);
    report.row(
        "WAL sender CPU per message, log relay, one slot (us)",
        sender * 1e6,
    );
    let one_sender_most = 1.0 / sender;
    report.row(
        "one WAL sender's most, a core at that cost (msg/s)",
        one_sender_most,
    );
    let backlog = backlog_rates(backlog_messages(n)).await?;
    report.row("backlog drain rate, log mode (msg/s)", backlog.log);
    report.row("backlog drain rate, table mode (msg/s)", backlog.table);
    report.row("plain producer rate, backlog's size (msg/s)", backlog.raw);
    report.row(
        "the table polled and marked, no broker, backlog's size (msg/s)",
        backlog.read_and_mark,
    );
    let w1 = write_overhead(1).await?;
    let w8 = write_overhead(8).await?;
    for (w, writers) in [(&w1, 1), (&w8, 8)] {
        eprintln!(
            "relay: business tx/s at {writers} writer(s): enqueue (log) {:.0}, none {:.0}, \
             bare row {:.0}, enqueue (table) {:.0}, logical message {:.0}",
            w[0], w[1], w[2], w[3], w[4]
        );
    }
    report.row("business tx/s with enqueue (log mode), 1 writer", w1[0]);
    report.row("business tx/s without enqueue, 1 writer", w1[1]);
    report.row("business tx/s with enqueue (log mode), 8 writers", w8[0]);
    report.row("business tx/s without enqueue, 8 writers", w8[1]);
    let latency_log = publish_latency_p99(RelayMode::Log, 200, 5).await?;
    let latency_table = publish_latency_p99(RelayMode::Table, 200, 5).await?;
    let latency_raw = raw_producer_latency_p99(200, 5).await?;
    report.row(
        "send-to-acknowledgement p99 of a plain producer at 200 msg/s (ms)",
        latency_raw,
    );
    report.row(
        "commit-to-publish p99 at 200 msg/s, log mode (ms)",
        latency_log,
    );
    report.row(
        "commit-to-publish p99 at 200 msg/s, table mode (ms)",
        latency_table,
    );
    report.ratio("relay_vs_raw_producer_log", log.rate / raw.rate);
    report.ratio("relay_vs_raw_producer_table", table.rate / raw.rate);
    report.ratio(
        "relay_vs_raw_producer_log_3_shards",
        log_3_shards.rate / raw.rate,
    );
    // The bound for the log mode: PostgreSQL streaming the backlog to a client that does
    // nothing with it, over the same producer baseline.
    report.ratio("log_read_alone_vs_raw_producer", read.rate / raw.rate);
    // The bound of one slot (the single-shard log relay): its WAL sender, a core's worth of
    // CPU at the cost it was measured at, over the producer baseline. Shards split the
    // decoding over several senders.
    report.ratio(
        "log_one_wal_sender_bound_vs_raw_producer",
        one_sender_most / raw.rate,
    );
    // The machine's bound for any relay that reads the log and sends with this producer: per
    // message, at least the WAL sender's CPU (measured during the relay's run) plus what the
    // plain producer costs the machine (its client and the broker); the cores can do no more
    // than that many messages a second.
    let cores = cpu::cores();
    let least = sender + raw.cpu;
    report.row(
        "least machine CPU per message of a log relay: WAL sender + plain producer (us)",
        least * 1e6,
    );
    report.ratio(
        "log_machine_cpu_bound_vs_raw_producer",
        cores / least / raw.rate,
    );
    // Both halves of the log relay's work at once, by programs that do nothing else, on the
    // same cores (each at full speed, so they take cores from each other).
    report.ratio(
        "log_read_and_produce_vs_raw_producer",
        read_and_produce / raw.rate,
    );
    // The bound for the table mode: its database work alone (poll, mark published), with
    // nothing sent, over the same producer baseline.
    report.ratio(
        "table_read_and_mark_alone_vs_raw_producer",
        read_and_mark.rate / raw.rate,
    );
    report.ratio("backlog_vs_steady_log", backlog.log / log.rate);
    report.ratio("backlog_vs_steady_table", backlog.table / table.rate);
    // The bounds: the broker and client alone sending the backlog's size, and the table
    // mode's database work alone on it, each over its own steady rate.
    report.ratio("raw_producer_backlog_vs_steady", backlog.raw / raw.rate);
    report.ratio(
        "table_read_and_mark_backlog_vs_steady",
        backlog.read_and_mark / read_and_mark.rate,
    );
    report.ratio("outbox_write_overhead_1", w1[0] / w1[1]);
    report.ratio("outbox_write_overhead_8", w8[0] / w8[1]);
    report.ratio("outbox_write_overhead_table_1", w1[3] / w1[1]);
    report.ratio("outbox_write_overhead_table_8", w8[3] / w8[1]);
    // The bounds: the least any outbox writing a row, or only a logical message, costs here.
    report.ratio("bare_row_write_overhead_1", w1[2] / w1[1]);
    report.ratio("bare_row_write_overhead_8", w8[2] / w8[1]);
    report.ratio("logical_message_write_overhead_1", w1[4] / w1[1]);
    report.ratio("logical_message_write_overhead_8", w8[4] / w8[1]);
    report.ratio("publish_latency_p99_ms_log", latency_log);
    report.ratio("publish_latency_p99_ms_table", latency_table);
    // The bound: the producer alone, no database, no relay.
    report.ratio("publish_latency_p99_ms_raw_producer", latency_raw);
    Ok(())
}

/// Drain rates (msg/s) of a backlog of `n` in each mode, and the plain producer's rate
/// sending as many: medians of three alternated runs (a single one swings as much as the
/// steady drains do).
async fn backlog_rates(n: usize) -> anyhow::Result<BacklogRates> {
    let rows = baseline_rows(n).await?;
    let (mut log, mut table, mut raw, mut marked) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for _ in 0..3 {
        raw.push(raw_producer_run(&rows).await?.rate);
        log.push(drain_rate(RelayMode::Log, n).await?.0.rate);
        table.push(drain_rate(RelayMode::Table, n).await?.0.rate);
        marked.push(
            drain_rate_in(RelayMode::Table, 1, n, Via::Feed)
                .await?
                .0
                .rate,
        );
    }
    eprintln!(
        "relay: backlog runs of {n} (msg/s) log {log:.0?}, table {table:.0?}, raw {raw:.0?}, \
         the table polled and marked, no broker {marked:.0?}"
    );
    Ok(BacklogRates {
        log: median(log),
        table: median(table),
        raw: median(raw),
        read_and_mark: median(marked),
    })
}

/// The medians of [`backlog_rates`], msg/s.
struct BacklogRates {
    log: f64,
    table: f64,
    /// The plain producer sending as many.
    raw: f64,
    /// The table mode with nothing to send to: its database work alone.
    read_and_mark: f64,
}

/// Only the large backlog drain (`FERRYBOX_BENCH_ONLY=backlog`), of the log relay or, with
/// `FERRYBOX_BENCH_MODE=table`, the polling one.
pub(crate) async fn backlog_only(report: &mut Report) -> anyhow::Result<()> {
    let backlog = backlog_messages(messages());
    let mode = match std::env::var("FERRYBOX_BENCH_MODE").as_deref() {
        Ok("table") => RelayMode::Table,
        _ => RelayMode::Log,
    };
    let started = Instant::now();
    let rate = drain_rate(mode, backlog).await?.0.rate;
    eprintln!(
        "relay: backlog of {backlog} drained in {:.1?} ({mode:?})",
        started.elapsed()
    );
    report.row("backlog drain rate (msg/s)", rate);
    Ok(())
}

/// The large backlog: ten times the throughput runs' size; `FERRYBOX_BENCH_BACKLOG`
/// overrides it.
fn backlog_messages(n: usize) -> usize {
    std::env::var("FERRYBOX_BENCH_BACKLOG")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(n * 10)
}
