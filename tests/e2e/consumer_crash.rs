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

#[derive(QueryableByName)]
struct N {
    #[diesel(sql_type = BigInt)]
    n: i64,
}

async fn count(url: &str, sql: &str) -> i64 {
    let mut conn = AsyncPgConnection::establish(url).await.unwrap();
    diesel::sql_query(sql)
        .get_result::<N>(&mut conn)
        .await
        .unwrap()
        .n
}

/// Produces `versions` versions of each of `keys` keys, in order per key.
async fn produce(topic: &str, codec: &AvroCodec, keys: usize, versions: i64) -> usize {
    let producer: FutureProducer = ferrybox::kafka::durable_producer(&testing::kafka()).unwrap();
    let mut pending = Vec::new();
    for version in 1..=versions {
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

fn spawn_worker(db: &TestDatabase, topic: &str, group: &str) -> tokio::process::Child {
    tokio::process::Command::new(WORKER)
        .env("WORKER_DATABASE_URL", db.url())
        .env(
            "WORKER_BOOTSTRAP_SERVERS",
            testing::kafka().bootstrap_servers,
        )
        .env("WORKER_REGISTRY_URL", testing::registry_url())
        .env("WORKER_TOPIC", topic)
        .env("WORKER_GROUP", group)
        .env("RUST_LOG", "warn")
        .stdout(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_consumer_killed_again_and_again_applies_each_message_exactly_once() {
    const ROUNDS: usize = 6;
    let (db, _pool) = TestDatabase::with_framework_tables().await;
    let mut conn = AsyncPgConnection::establish(db.url()).await.unwrap();
    diesel::sql_query(APPLIED_TABLE)
        .execute(&mut conn)
        .await
        .unwrap();
    let topic = testing::create_topic(3).await;
    let codec = AvroCodec::new(&testing::registry_url());
    codec.register::<Tick>(&topic).await.unwrap();
    let total = produce(&topic, &codec, 40, 100).await;
    let group = testing::unique("crash");
    let applied = "SELECT count(DISTINCT message_id) AS n FROM applied";

    for round in 0..ROUNDS {
        let before = count(db.url(), applied).await;
        let mut worker = spawn_worker(&db, &topic, &group);
        wait_until(TIMEOUT, "the worker applies something", || async {
            count(db.url(), applied).await > before
        })
        .await;
        let jitter = rand::rng().random_range(0..30);
        tokio::time::sleep(Duration::from_millis(jitter)).await;
        worker.kill().await.unwrap();
        eprintln!(
            "round {round}: killed {jitter} ms after progress, {} of {total} applied",
            count(db.url(), applied).await
        );
    }

    let worker = spawn_worker(&db, &topic, &group);
    wait_until(TIMEOUT, "every message applied", || async {
        count(db.url(), applied).await == i64::try_from(total).unwrap()
    })
    .await;
    let pid = worker.id().unwrap().to_string();
    assert!(
        std::process::Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .unwrap()
            .success()
    );
    let exit = worker.wait_with_output().await.unwrap().status;
    assert!(exit.success(), "worker exit status {exit}");

    // Exactly once: as many applications as messages.
    assert_eq!(
        count(db.url(), "SELECT count(*) AS n FROM applied").await,
        i64::try_from(total).unwrap(),
        "some message was applied twice"
    );
    // In order per key: applications of a key, by application order, have rising versions.
    #[derive(QueryableByName)]
    struct Row {
        #[diesel(sql_type = Text)]
        key: String,
        #[diesel(sql_type = BigInt)]
        version: i64,
    }
    let rows: Vec<Row> = diesel::sql_query("SELECT key, version FROM applied ORDER BY seq")
        .load(&mut conn)
        .await
        .unwrap();
    let mut by_key: BTreeMap<String, Vec<i64>> = BTreeMap::new();
    for row in rows {
        by_key.entry(row.key).or_default().push(row.version);
    }
    for (key, versions) in by_key {
        assert_eq!(versions, (1..=100).collect::<Vec<_>>(), "key {key}");
    }
}
