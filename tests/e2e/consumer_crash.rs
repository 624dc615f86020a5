//! An inbox consumer process killed with SIGKILL at random moments, over and over, while it
//! works through a topic: whether a kill lands before the database commit (the batch rolls
//! back and is redelivered) or between the commit and the offset commit (the batch is
//! redelivered and the inbox skips it), every message ends up applied exactly once, and each
//! key's messages in order.

use std::collections::BTreeMap;
use std::time::Duration;

use diesel::QueryableByName;
use diesel::sql_types::{BigInt, Text};
use diesel_async::{AsyncConnection, AsyncPgConnection, RunQueryDsl};
use ferrybox::AvroCodec;
use ferrybox::testing::{self, TestDatabase, wait_until};
use ferrybox_e2e::{APPLIED_TABLE, Tick};
use rand::Rng;
use rdkafka::producer::{FutureProducer, FutureRecord};

const WORKER: &str = env!("CARGO_BIN_EXE_inbox-worker");
const TIMEOUT: Duration = Duration::from_secs(120);
/// Distinct messages applied so far.
const APPLIED_IDS: &str = "SELECT count(DISTINCT message_id) AS n FROM applied";

/// Produces `versions` versions of each of `keys` keys, in order per key, with the durable
/// producer's own batching (what the relay sends), so consumers resume from offsets committed
/// inside record batches — on a broker that serves such fetches. On one that skips to the next
/// batch (tansu 0.6 in memory, proved by
/// `a_consumer_resumes_from_an_offset_inside_a_record_batch_as_the_broker_serves_it`), one
/// record per batch, or the broker itself would lose records for the resumed consumer.
async fn produce(topic: &str, codec: &AvroCodec, keys: usize, versions: i64) -> usize {
    produce_versions(topic, codec, keys, 1..=versions).await
}

/// Produces `versions` of each of `keys` keys, in order per key (see [`produce`] on batches).
async fn produce_versions(
    topic: &str,
    codec: &AvroCodec,
    keys: usize,
    versions: std::ops::RangeInclusive<i64>,
) -> usize {
    let mut kafka = testing::kafka();
    if testing::mid_batch_fetch().await == testing::MidBatchFetch::FromTheNextBatch {
        kafka
            .producer_settings
            .insert("batch.num.messages".into(), "1".into());
        kafka
            .producer_settings
            .insert("linger.ms".into(), "0".into());
    }
    let producer: FutureProducer = ferrybox::kafka::durable_producer(&kafka).unwrap();
    let mut pending = Vec::new();
    for version in versions {
        for k in 0..keys {
            let tick = Tick {
                key: format!("key-{k}"),
                version,
            };
            let message = codec.message(topic, &tick).await.unwrap();
            let headers = ferrybox::kafka::owned_headers(&message.kafka_headers("crash-test"));
            let record = FutureRecord::to(topic)
                .key(&message.key)
                .payload(&message.payload)
                .headers(headers);
            pending.push(producer.send_result(record).map_err(|(e, _)| e).unwrap());
        }
    }
    let n = pending.len();
    for p in pending {
        p.await.unwrap().unwrap();
    }
    n
}

/// A database with the framework's tables and `applied`, and a topic of `partitions` with the
/// `Tick` schema registered.
async fn setup(partitions: i32) -> (TestDatabase, AsyncPgConnection, String, AvroCodec) {
    let (db, _pool) = TestDatabase::with_framework_tables().await;
    let mut conn = AsyncPgConnection::establish(db.url()).await.unwrap();
    diesel::sql_query(APPLIED_TABLE)
        .execute(&mut conn)
        .await
        .unwrap();
    let topic = testing::create_topic(partitions).await;
    let codec = AvroCodec::new(&testing::registry_url());
    codec.register::<Tick>(&topic).await.unwrap();
    (db, conn, topic, codec)
}

/// A worker with the consumer's default settings.
fn spawn_worker(db: &TestDatabase, topic: &str, group: &str) -> tokio::process::Child {
    spawn_worker_process(db, topic, group, &[])
}

fn spawn_named_worker(
    db: &TestDatabase,
    topic: &str,
    group: &str,
    name: &str,
) -> tokio::process::Child {
    // Members that join and leave for good: dynamic membership (a static member that leaves
    // keeps its partitions until it is evicted; see `InboxConfig::static_membership`).
    spawn_worker_process(
        db,
        topic,
        group,
        &[("WORKER_NAME", name), ("WORKER_STATIC", "false")],
    )
}

/// An `inbox-worker` process on `db`, reading `topic` in `group`, with `extra` variables.
fn spawn_worker_process(
    db: &TestDatabase,
    topic: &str,
    group: &str,
    extra: &[(&str, &str)],
) -> tokio::process::Child {
    tokio::process::Command::new(WORKER)
        .env("WORKER_DATABASE_URL", db.url())
        .env(
            "WORKER_BOOTSTRAP_SERVERS",
            testing::kafka().bootstrap_servers,
        )
        .env("WORKER_REGISTRY_URL", testing::registry_url())
        .env("WORKER_TOPIC", topic)
        .env("WORKER_GROUP", group)
        .envs(extra.iter().copied())
        .env(
            "RUST_LOG",
            std::env::var("WORKER_LOG").unwrap_or_else(|_| "warn".into()),
        )
        .stdout(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_consumer_killed_again_and_again_applies_each_message_exactly_once() {
    const ROUNDS: usize = 6;
    let (db, mut conn, topic, codec) = setup(3).await;
    let total = produce(&topic, &codec, 40, 100).await;
    let group = testing::unique("crash");

    kill_again_and_again(&db, ROUNDS, 30, total, || spawn_worker(&db, &topic, &group)).await;

    let worker = spawn_worker(&db, &topic, &group);
    all_applied(&db, total).await;
    terminate(worker).await;
    assert_applied_once_in_order(&mut conn, total, 100).await;
}

/// Starts a worker with `spawn` `rounds` times and SIGKILLs it each time, a random moment (up to
/// `max_jitter_ms`) after it applied something.
async fn kill_again_and_again(
    db: &TestDatabase,
    rounds: usize,
    max_jitter_ms: u64,
    total: usize,
    spawn: impl Fn() -> tokio::process::Child,
) {
    for round in 0..rounds {
        let before = testing::count(db.url(), APPLIED_IDS).await;
        let mut worker = spawn();
        wait_until(TIMEOUT, "the worker applies something", || async {
            testing::count(db.url(), APPLIED_IDS).await > before
        })
        .await;
        let jitter = rand::rng().random_range(0..max_jitter_ms);
        tokio::time::sleep(Duration::from_millis(jitter)).await;
        worker.kill().await.unwrap();
        eprintln!(
            "round {round}: killed {jitter} ms after progress, {} of {total} applied",
            testing::count(db.url(), APPLIED_IDS).await
        );
    }
}

/// Waits until `total` distinct messages have been applied.
async fn all_applied(db: &TestDatabase, total: usize) {
    let total = i64::try_from(total).unwrap();
    wait_until(TIMEOUT, "every message applied", || async {
        testing::count(db.url(), APPLIED_IDS).await == total
    })
    .await;
}

/// Every message applied exactly once, and each key's versions 1..=versions applied in order.
async fn assert_applied_once_in_order(conn: &mut AsyncPgConnection, total: usize, versions: i64) {
    #[derive(QueryableByName)]
    struct Row {
        #[diesel(sql_type = Text)]
        key: String,
        #[diesel(sql_type = BigInt)]
        version: i64,
    }
    let rows: Vec<Row> = diesel::sql_query("SELECT key, version FROM applied ORDER BY seq")
        .load(conn)
        .await
        .unwrap();
    assert_eq!(rows.len(), total, "applications vs messages");
    let mut by_key: BTreeMap<String, Vec<i64>> = BTreeMap::new();
    for row in rows {
        by_key.entry(row.key).or_default().push(row.version);
    }
    for (key, applied) in by_key {
        assert_eq!(applied, (1..=versions).collect::<Vec<_>>(), "key {key}");
    }
}

async fn terminate(worker: tokio::process::Child) {
    let exit = testing::terminate(worker, TIMEOUT).await.unwrap();
    assert!(exit.success(), "worker exit status {exit}");
}

#[tokio::test(flavor = "multi_thread")]
async fn two_consumers_with_rebalances_mid_stream_apply_each_message_once() {
    let (db, mut conn, topic, codec) = setup(4).await;
    let group = testing::unique("rebalance");
    let by = |worker: &'static str| {
        format!("SELECT count(*) AS n FROM applied WHERE worker = '{worker}'")
    };

    // The stream keeps coming while the group changes: 20 versions at a time.
    let producing = tokio::spawn({
        let (topic, codec) = (topic.clone(), codec.clone());
        async move {
            let mut total = 0;
            for round in 0..8 {
                total +=
                    produce_versions(&topic, &codec, 20, round * 20 + 1..=round * 20 + 20).await;
            }
            total
        }
    });
    let first = spawn_named_worker(&db, &topic, &group, "first");
    wait_until(TIMEOUT, "the first consumer applies", || async {
        testing::count(db.url(), &by("first")).await > 0
    })
    .await;
    // A second member joins: the group rebalances and splits the partitions.
    let second = spawn_named_worker(&db, &topic, &group, "second");
    wait_until(
        TIMEOUT,
        "the second consumer gets partitions and applies",
        || async { testing::count(db.url(), &by("second")).await > 0 },
    )
    .await;
    // The first leaves mid-stream: the group rebalances again and the second takes over.
    let first_applied = testing::count(db.url(), &by("first")).await;
    terminate(first).await;
    let total = producing.await.unwrap();
    all_applied(&db, total).await;
    terminate(second).await;
    eprintln!(
        "{total} messages: {first_applied} applied by the first consumer, the rest by the second"
    );
    assert_applied_once_in_order(&mut conn, total, 160).await;
}

/// A producer database whose outbox holds `versions` ticks of each of `keys` keys (in order per
/// key), given feed positions by a feed-only relay and served by a `FeedServer` until `stop`:
/// the `events` URL and the number of messages.
async fn feed_of_ticks(
    topic: &str,
    codec: &AvroCodec,
    keys: usize,
    versions: i64,
    stop: &ferrybox::CancellationToken,
) -> (TestDatabase, String, usize) {
    let (producer_db, pool) = TestDatabase::with_framework_tables().await;
    let outbox = ferrybox::Outbox::new("crash-test").without_notify();
    let mut conn = AsyncPgConnection::establish(producer_db.url())
        .await
        .unwrap();
    for version in 1..=versions {
        let mut messages = Vec::with_capacity(keys);
        for k in 0..keys {
            let tick = Tick {
                key: format!("key-{k}"),
                version,
            };
            messages.push(codec.message(topic, &tick).await.unwrap());
        }
        conn.transaction::<_, ferrybox::Error, _>(async |tx| {
            for message in &messages {
                outbox.enqueue(tx, message).await?;
            }
            Ok(())
        })
        .await
        .unwrap();
    }
    let relay =
        ferrybox::Relay::feed_only(producer_db.config(), ferrybox::RelayConfig::default()).unwrap();
    let total = relay.publish_pending(&mut conn).await.unwrap().published;
    let feed = ferrybox::FeedServer::start(
        pool,
        &producer_db.config(),
        ferrybox::feed::FeedServerConfig::default(),
        stop,
    )
    .unwrap();
    let url = format!("{}/events", testing::serve(feed.router(), stop).await);
    (producer_db, url, total)
}

fn spawn_feed_worker(db: &TestDatabase, topic: &str, feed_url: &str) -> tokio::process::Child {
    spawn_worker_process(
        db,
        topic,
        "feed-worker",
        &[
            ("WORKER_FEED_URL", feed_url),
            // Each batch of 50 takes a while, so most kills land inside one.
            ("WORKER_HANDLER_DELAY_MS", "25"),
        ],
    )
}

#[tokio::test(flavor = "multi_thread")]
async fn a_feed_consumer_killed_mid_batch_again_and_again_resumes_with_no_gap_and_no_double_apply()
{
    const ROUNDS: usize = 6;
    let stop = ferrybox::CancellationToken::new();
    // The feed's events name the topic; the worker reads them from the feed, not from Kafka.
    let (db, mut conn, topic, codec) = setup(1).await;
    let (_producer_db, url, total) = feed_of_ticks(&topic, &codec, 40, 50, &stop).await;

    kill_again_and_again(&db, ROUNDS, 40, total, || {
        spawn_feed_worker(&db, &topic, &url)
    })
    .await;

    let worker = spawn_feed_worker(&db, &topic, &url);
    all_applied(&db, total).await;
    terminate(worker).await;
    assert_applied_once_in_order(&mut conn, total, 50).await;
    assert_eq!(
        testing::count(
            db.url(),
            "SELECT position AS n FROM ferrybox_feed_positions"
        )
        .await,
        i64::try_from(total).unwrap(),
        "the stored position is the last message"
    );
    stop.cancel();
}

/// Proves what the broker does with a consumer group that resumes from an offset committed
/// inside a record batch (the relay and the durable producer send batches). Kafka serves the
/// records from that offset on, none before it, none twice: checked here whenever the broker
/// does. tansu 0.6's in-memory engine serves the next batch instead, skipping the rest of the
/// batch for that consumer (see [`testing::MidBatchFetch`]): then this test proves exactly
/// that, and the crash tests below produce one record per batch, so no resume point falls
/// inside a batch. Against Kafka (`FERRYBOX_TEST_KAFKA`) they run on the producer's own batches.
#[tokio::test(flavor = "multi_thread")]
async fn a_consumer_resumes_from_an_offset_inside_a_record_batch_as_the_broker_serves_it() {
    use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer, StreamConsumer};
    use rdkafka::message::Message;
    use rdkafka::{Offset, TopicPartitionList};
    const RESUME_AT: i64 = 137;
    let topic = testing::create_topic(1).await;
    let producer: FutureProducer = ferrybox::kafka::durable_producer(&testing::kafka()).unwrap();
    // Three batches: 0-99, 100-199, 200-299.
    for batch in 0..3i64 {
        let pending: Vec<_> = (batch * 100..batch * 100 + 100)
            .map(|i| {
                let payload = i.to_string();
                producer
                    .send_result(
                        FutureRecord::<str, str>::to(&topic)
                            .key("k")
                            .payload(&payload),
                    )
                    .map_err(|(e, _)| e)
                    .unwrap()
            })
            .collect();
        for p in pending {
            p.await.unwrap().unwrap();
        }
    }
    let group = testing::unique("resume");
    let committer: BaseConsumer = testing::kafka()
        .client_config(ferrybox::config::ClientKind::Consumer)
        .set("group.id", &group)
        .create()
        .unwrap();
    let mut offsets = TopicPartitionList::new();
    offsets
        .add_partition_offset(&topic, 0, Offset::Offset(RESUME_AT))
        .unwrap();
    committer.commit(&offsets, CommitMode::Sync).unwrap();
    drop(committer);

    let consumer: StreamConsumer = testing::kafka()
        .client_config(ferrybox::config::ClientKind::Consumer)
        .set("group.id", &group)
        .set("enable.auto.commit", "false")
        // Were the committed offset not used, reading would start from the first record.
        .set("auto.offset.reset", "earliest")
        .create()
        .unwrap();
    consumer.subscribe(&[&topic]).unwrap();
    let first = match testing::mid_batch_fetch().await {
        testing::MidBatchFetch::FromThatOffset => RESUME_AT,
        testing::MidBatchFetch::FromTheNextBatch => {
            eprintln!(
                "the broker serves a fetch inside a batch from the next batch: records {RESUME_AT}-199 are skipped for this consumer"
            );
            200
        }
    };
    let mut got = Vec::new();
    while got.len() < usize::try_from(300 - first).unwrap() {
        let m = tokio::time::timeout(TIMEOUT, consumer.recv())
            .await
            .unwrap_or_else(|_| panic!("records arrive; got {} so far: {got:?}", got.len()))
            .unwrap();
        let payload: i64 = std::str::from_utf8(m.payload().unwrap())
            .unwrap()
            .parse()
            .unwrap();
        assert_eq!(payload, m.offset(), "each record at its own offset");
        got.push(m.offset());
    }
    let expected: Vec<i64> = (first..300).collect();
    assert_eq!(got, expected, "the records from {first} on, once each");
}
