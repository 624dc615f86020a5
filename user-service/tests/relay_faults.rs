//! The relay under faults, as operators run it: the `user-service relay` process killed with
//! SIGKILL again and again while producers write; a broker that goes away mid-stream and comes
//! back; and the `outbox status|replay` subcommands.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use diesel::QueryableByName;
use diesel::sql_types::BigInt;
use diesel_async::{AsyncConnection, AsyncPgConnection, RunQueryDsl};
use ferrybox::testing::{self, PrivateBroker, ReadRecord, TestDatabase, wait_until};
use ferrybox::{CancellationToken, MessageId, Outbox, OutgoingMessage, Relay, RelayConfig};
use rand::Rng;

const EXE: &str = env!("CARGO_BIN_EXE_user-service");
const TIMEOUT: Duration = Duration::from_secs(90);

async fn published(url: &str) -> i64 {
    testing::count(
        url,
        "SELECT count(*) AS n FROM ferrybox_outbox WHERE published_at IS NOT NULL",
    )
    .await
}

/// Every message id in the outbox.
async fn outbox_ids(url: &str) -> BTreeSet<String> {
    #[derive(QueryableByName)]
    struct Id {
        #[diesel(sql_type = diesel::sql_types::Text)]
        id: String,
    }
    let mut conn = AsyncPgConnection::establish(url).await.unwrap();
    diesel::sql_query("SELECT message_id::text AS id FROM ferrybox_outbox")
        .load::<Id>(&mut conn)
        .await
        .unwrap()
        .into_iter()
        .map(|r| r.id)
        .collect()
}

async fn migrated_database() -> TestDatabase {
    let db = TestDatabase::create().await;
    ferrybox::db::migrate_service(&db.pool(), user_service::startup::MIGRATIONS)
        .await
        .unwrap();
    db
}

/// Commits one message for `key` at `version` (a 200-byte payload).
async fn write(
    conn: &mut AsyncPgConnection,
    outbox: &Outbox,
    topic: &str,
    key: &str,
    version: i64,
) {
    let message = OutgoingMessage {
        id: MessageId::new(),
        topic: topic.to_owned(),
        key: key.to_owned(),
        message_type: "com.ferrybox.test.Tick".to_owned(),
        entity_version: version,
        occurred_at: ferrybox::message::now(),
        payload: vec![7; 200],
        headers: BTreeMap::new(),
    };
    conn.transaction::<_, ferrybox::Error, _>(async |tx| outbox.enqueue(tx, &message).await)
        .await
        .unwrap();
}

/// Writers that each own `keys` keys and write versions 1, 2, 3, ... of each until stopped.
/// Returns, per key, the last version committed.
fn start_writers(
    url: &str,
    topic: &str,
    writers: usize,
    keys: usize,
    stop: &CancellationToken,
) -> Vec<tokio::task::JoinHandle<BTreeMap<String, i64>>> {
    (0..writers)
        .map(|w| {
            let (url, topic, stop) = (url.to_owned(), topic.to_owned(), stop.clone());
            tokio::spawn(async move {
                let outbox = Outbox::new("relay-fault-test");
                let mut conn = AsyncPgConnection::establish(&url).await.unwrap();
                let mut last = BTreeMap::new();
                let mut version = 0;
                while !stop.is_cancelled() {
                    version += 1;
                    for k in 0..keys {
                        let key = format!("w{w}-k{k}");
                        write(&mut conn, &outbox, &topic, &key, version).await;
                        last.insert(key, version);
                    }
                }
                last
            })
        })
        .collect()
}

/// Checks `records` against what the writers committed: every version of every key arrived,
/// and, counting each message id at its first arrival, each key's versions arrived in order
/// with no gap. Returns the number of duplicates.
fn assert_complete_and_ordered(records: &[ReadRecord], committed: &BTreeMap<String, i64>) -> usize {
    let mut seen = BTreeSet::new();
    let mut by_key: BTreeMap<String, Vec<i64>> = BTreeMap::new();
    for r in records {
        if seen.insert(r.headers["ce_id"].clone()) {
            by_key
                .entry(r.key.clone().unwrap())
                .or_default()
                .push(r.headers["ce_entityversion"].parse().unwrap());
        }
    }
    assert_eq!(by_key.len(), committed.len(), "keys on the topic");
    for (key, last) in committed {
        assert_eq!(
            by_key[key],
            (1..=*last).collect::<Vec<_>>(),
            "key {key}: a gap or a reordering"
        );
    }
    records.len() - seen.len()
}

fn relay_env(db: &TestDatabase, topic: &str, partitions: i32) -> Vec<(String, String)> {
    let mut env = testing::service_env("USER_SERVICE_", db.url());
    env.extend([
        (
            "USER_SERVICE_USERS_TOPIC__NAME".to_owned(),
            topic.to_owned(),
        ),
        (
            "USER_SERVICE_USERS_TOPIC__PARTITIONS".to_owned(),
            partitions.to_string(),
        ),
        ("USER_SERVICE_RELAY__BATCH_SIZE".to_owned(), "50".to_owned()),
        (
            "USER_SERVICE_RELAY__POLL_INTERVAL_MS".to_owned(),
            "20".to_owned(),
        ),
    ]);
    env
}

fn spawn_relay(env: &[(String, String)]) -> tokio::process::Child {
    tokio::process::Command::new(EXE)
        .arg("relay")
        .envs(env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
        .env("RUST_LOG", "error")
        .kill_on_drop(true)
        .spawn()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn relay_killed_at_random_moments_loses_nothing_and_keeps_key_order() {
    const ROUNDS: usize = 8;
    let db = migrated_database().await;
    let topic = testing::create_topic(3).await;
    let env = relay_env(&db, &topic, 3);
    let stop = CancellationToken::new();
    let writers = start_writers(db.url(), &topic, 4, 5, &stop);

    for round in 0..ROUNDS {
        let before = published(db.url()).await;
        let mut relay = spawn_relay(&env);
        wait_until(TIMEOUT, "the relay publishes", || async {
            published(db.url()).await > before
        })
        .await;
        // Kill it somewhere in the middle of its next batches.
        let jitter = rand::rng().random_range(0..40);
        tokio::time::sleep(Duration::from_millis(jitter)).await;
        relay.kill().await.unwrap();
        eprintln!("round {round}: killed after {jitter} ms");
    }
    stop.cancel();
    let mut committed = BTreeMap::new();
    for writer in writers {
        committed.extend(writer.await.unwrap());
    }

    // A last relay drains what is left, then stops cleanly on SIGTERM.
    let relay = spawn_relay(&env);
    let total = testing::count(db.url(), "SELECT count(*) AS n FROM ferrybox_outbox").await;
    wait_until(TIMEOUT, "every committed row published", || async {
        published(db.url()).await == total
    })
    .await;
    let exit = testing::terminate(relay, TIMEOUT).await.unwrap();
    assert!(exit.success(), "relay exit status {exit}");

    let records = testing::read_ids(
        &testing::kafka(),
        &topic,
        &outbox_ids(db.url()).await,
        TIMEOUT,
    )
    .await;
    assert_eq!(
        committed.values().sum::<i64>(),
        total,
        "the writers' count and the outbox agree"
    );
    let duplicates = assert_complete_and_ordered(&records, &committed);
    eprintln!(
        "{total} messages committed, {} records on the topic, {duplicates} duplicates after {ROUNDS} kills",
        records.len()
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_standby_relay_process_takes_over_when_the_active_one_is_killed() {
    let db = migrated_database().await;
    let topic = testing::create_topic(3).await;
    let mut env = relay_env(&db, &topic, 3);
    env.push((
        "USER_SERVICE_RELAY__STANDBY_INTERVAL_MS".to_owned(),
        "200".to_owned(),
    ));
    let stop = CancellationToken::new();
    let writers = start_writers(db.url(), &topic, 2, 3, &stop);
    let mut relays: BTreeMap<u32, tokio::process::Child> = (0..3)
        .map(|_| {
            let child = spawn_relay(&env);
            (child.id().unwrap(), child)
        })
        .collect();
    // Twice: find the active process, kill it, and watch a standby carry on.
    for _ in 0..2 {
        wait_until(TIMEOUT, "a relay process holds the lock", || async {
            testing::active_relay_pid(db.url())
                .await
                .is_some_and(|pid| relays.contains_key(&pid))
        })
        .await;
        let pid = testing::active_relay_pid(db.url()).await.unwrap();
        relays.remove(&pid).unwrap().kill().await.unwrap();
        wait_until(TIMEOUT, "a standby takes the lock", || async {
            testing::active_relay_pid(db.url())
                .await
                .is_some_and(|p| p != pid && relays.contains_key(&p))
        })
        .await;
        let before = published(db.url()).await;
        wait_until(TIMEOUT, "the new active relay publishes", || async {
            published(db.url()).await > before
        })
        .await;
    }
    stop.cancel();
    let mut committed = BTreeMap::new();
    for writer in writers {
        committed.extend(writer.await.unwrap());
    }
    let total = testing::count(db.url(), "SELECT count(*) AS n FROM ferrybox_outbox").await;
    wait_until(TIMEOUT, "every committed row published", || async {
        published(db.url()).await == total
    })
    .await;
    for (_, mut relay) in relays {
        relay.kill().await.unwrap();
    }
    let records = testing::read_ids(
        &testing::kafka(),
        &topic,
        &outbox_ids(db.url()).await,
        TIMEOUT,
    )
    .await;
    let duplicates = assert_complete_and_ordered(&records, &committed);
    eprintln!("{total} messages across two takeovers, {duplicates} duplicates");
}

#[tokio::test(flavor = "multi_thread")]
async fn relay_rides_out_a_broker_outage_without_a_restart() {
    broker_outage(ferrybox::RelayMode::Table).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn the_log_relay_rides_out_a_broker_outage_without_a_restart() {
    broker_outage(ferrybox::RelayMode::Log).await;
}

/// Both relay modes: the writer is the polling table's (as user-service's), so the marks
/// show what was acknowledged in either.
async fn broker_outage(mode: ferrybox::RelayMode) {
    let mut broker = PrivateBroker::start().await;
    let mut kafka = broker.kafka();
    kafka
        .producer_settings
        .insert("message.timeout.ms".into(), "2000".into());
    let topic = ferrybox::TopicConfig {
        partitions: 2,
        ..ferrybox::TopicConfig::new(testing::unique("outage").replace('_', "-"))
    };
    ferrybox::kafka::ensure_topics(&kafka, std::slice::from_ref(&topic))
        .await
        .unwrap();
    let db = migrated_database().await;
    let relay = Relay::new(
        db.config(),
        &kafka,
        RelayConfig {
            batch_size: 20,
            poll_interval: Duration::from_millis(20),
            backoff: ferrybox::config::Backoff {
                initial: Duration::from_millis(100),
                max: Duration::from_millis(500),
            },
            mode,
            ..RelayConfig::default()
        },
    )
    .unwrap();
    let stop_relay = CancellationToken::new();
    let relay_task = tokio::spawn({
        let stop = stop_relay.clone();
        async move { relay.run(stop).await }
    });
    // Ten versions of three keys before the outage, ten more during it.
    let outbox = Outbox::new("outage-test");
    let mut conn = AsyncPgConnection::establish(db.url()).await.unwrap();
    let write_versions = async |conn: &mut AsyncPgConnection,
                                versions: std::ops::RangeInclusive<i64>| {
        for version in versions {
            for k in 0..3 {
                write(conn, &outbox, &topic.name, &format!("k{k}"), version).await;
            }
        }
    };
    write_versions(&mut conn, 1..=10).await;
    wait_until(TIMEOUT, "publishing before the outage", || async {
        published(db.url()).await == 30
    })
    .await;
    broker.kill().await;
    write_versions(&mut conn, 11..=20).await;
    // The polling relay keeps trying, records its attempts and the error, and marks nothing.
    // (The log relay writes nothing per failed message: it resends from its slot's confirmed
    // position once a new producer gets through.)
    if mode == ferrybox::RelayMode::Table {
        wait_until(TIMEOUT, "failed attempts recorded", || async {
        testing::count(
            db.url(),
            "SELECT count(*) AS n FROM ferrybox_outbox WHERE published_at IS NULL AND last_error IS NOT NULL AND attempts > 0",
        )
        .await
            > 0
    })
    .await;
        assert_eq!(
            published(db.url()).await,
            30,
            "nothing marked while the broker is down"
        );
    }
    broker.restart().await;
    wait_until(
        TIMEOUT,
        "the backlog drains once the broker is back",
        || async { published(db.url()).await == 60 },
    )
    .await;
    let committed: BTreeMap<String, i64> = (0..3).map(|k| (format!("k{k}"), 20)).collect();
    stop_relay.cancel();
    relay_task.await.unwrap().unwrap();

    // Every marked row's recorded position holds exactly that message on the broker.
    #[derive(QueryableByName)]
    struct Marked {
        #[diesel(sql_type = diesel::sql_types::Text)]
        id: String,
        #[diesel(sql_type = diesel::sql_types::Integer)]
        p: i32,
        #[diesel(sql_type = BigInt)]
        o: i64,
    }
    let mut conn = AsyncPgConnection::establish(db.url()).await.unwrap();
    let marked: Vec<Marked> = diesel::sql_query(
        "SELECT message_id::text AS id, kafka_partition AS p, kafka_offset AS o FROM ferrybox_outbox",
    )
    .load(&mut conn)
    .await
    .unwrap();
    let records =
        testing::read_ids(&kafka, &topic.name, &outbox_ids(db.url()).await, TIMEOUT).await;
    let at: BTreeMap<(i32, i64), &str> = records
        .iter()
        .map(|r| ((r.partition, r.offset), r.headers["ce_id"].as_str()))
        .collect();
    for row in &marked {
        assert_eq!(
            at.get(&(row.p, row.o)),
            Some(&row.id.as_str()),
            "row {}",
            row.id
        );
    }
    let duplicates = assert_complete_and_ordered(&records, &committed);
    eprintln!("60 messages across the outage, {duplicates} duplicates");
}

async fn run_cli(env: &[(String, String)], args: &[&str]) -> (i32, String, String) {
    let output = tokio::process::Command::new(EXE)
        .args(args)
        .envs(env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
        .output()
        .await
        .unwrap();
    (
        output.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

#[tokio::test(flavor = "multi_thread")]
async fn outbox_status_and_replay_subcommands() {
    let db = migrated_database().await;
    let topic = testing::create_topic(1).await;
    let env = relay_env(&db, &topic, 1);
    let outbox = Outbox::new("cli-test");
    let mut conn = AsyncPgConnection::establish(db.url()).await.unwrap();
    for version in 1..=4 {
        write(&mut conn, &outbox, &topic, "a", version).await;
    }

    let (code, out, err) = run_cli(&env, &["outbox", "status", "--json"]).await;
    assert_eq!(code, 0, "{err}");
    let status: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(status["unpublished"], 4);
    assert_eq!(status["sent_log_rows"], 0);
    // What holds vacuum back is there too (the shared test server's other tests may hold
    // some: only its shape is checked here; framework/tests/integration/vacuum.rs proves it).
    assert!(
        status["vacuum"]["prepared_transactions"].is_i64(),
        "{status}"
    );
    // How the sent log's tables are stored: partitions (the migration's first range and the
    // DEFAULT one, no relay has made ranges yet), bytes, rows outside the ranges.
    let outbox_storage = status["storage"]
        .as_array()
        .and_then(|tables| tables.iter().find(|t| t["table"] == "ferrybox_outbox"))
        .unwrap_or_else(|| panic!("{status}"));
    assert_eq!(outbox_storage["partitions"], 2, "{status}");
    assert!(outbox_storage["bytes"].as_i64() > Some(0), "{status}");
    assert!(outbox_storage["default_rows"].is_i64(), "{status}");

    let relay = Relay::new(db.config(), &testing::kafka(), RelayConfig::default()).unwrap();
    relay.publish_pending(&mut conn).await.unwrap();
    let (code, out, _) = run_cli(&env, &["outbox", "status"]).await;
    assert_eq!(code, 0);
    assert!(out.contains("sent log rows:          4"), "{out}");
    assert!(
        out.contains("storage:                ferrybox_outbox in 2 partitions"),
        "{out}"
    );
    assert!(out.contains("prepared transactions:  "), "{out}");

    let (code, out, err) = run_cli(
        &env,
        &["outbox", "replay", "--topic", &topic, "--dry-run", "--json"],
    )
    .await;
    assert_eq!(code, 0, "{err}");
    let report: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(
        (report["matched"].as_u64(), report["sent"].as_u64()),
        (Some(4), Some(0))
    );

    let (code, out, err) = run_cli(&env, &["outbox", "replay", "--key", "a", "--rate", "50"]).await;
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("replayed 4 of 4 messages; 0 failed"), "{out}");
    let records = testing::read_topic(&topic, 8, TIMEOUT).await;
    let first: Vec<&str> = records[..4]
        .iter()
        .map(|r| r.headers["ce_id"].as_str())
        .collect();
    let again: Vec<&str> = records[4..]
        .iter()
        .map(|r| r.headers["ce_id"].as_str())
        .collect();
    assert_eq!(first, again, "replay keeps ids and order");

    // Error paths: a malformed time is a usage error; a broker that never answers fails the
    // replay with exit status 1; rows with errors make `status` exit 2.
    let (code, _, err) = run_cli(&env, &["outbox", "replay", "--since", "yesterday"]).await;
    assert_eq!(code, 2);
    assert!(err.contains("--since"), "{err}");
    let mut unreachable = env.clone();
    unreachable.push((
        "USER_SERVICE_KAFKA__BOOTSTRAP_SERVERS".into(),
        "127.0.0.1:1".into(),
    ));
    unreachable.push((
        "USER_SERVICE_KAFKA__SETTINGS__MESSAGE_TIMEOUT_MS".into(),
        "1000".into(),
    ));
    let (code, out, _) = run_cli(&unreachable, &["outbox", "replay", "--key", "a"]).await;
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("4 failed"), "{out}");
    write(&mut conn, &outbox, &topic, "a", 5).await;
    let failing = Relay::new(
        db.config(),
        &{
            let mut k = ferrybox::KafkaConfig::new("127.0.0.1:1");
            k.producer_settings
                .insert("message.timeout.ms".into(), "1000".into());
            k
        },
        RelayConfig::default(),
    )
    .unwrap();
    assert_eq!(failing.publish_batch(&mut conn).await.unwrap().failed, 1);
    let (code, out, _) = run_cli(&env, &["outbox", "status"]).await;
    assert_eq!(code, 3, "rows with errors: {out}");
    assert!(out.contains("with errors:            1"), "{out}");
}

/// `outbox reshard`: the layout the relay runs as changes, `status` shows it, asking again is
/// a no-op, and an impossible count is a usage error.
#[tokio::test(flavor = "multi_thread")]
async fn outbox_reshard_subcommand() {
    let db = migrated_database().await;
    let topic = testing::create_topic(1).await;
    let env = relay_env(&db, &topic, 1);
    let (code, out, err) = run_cli(&env, &["outbox", "reshard", "2", "--json"]).await;
    assert_eq!(code, 0, "{err}");
    let report: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(
        (report["from"].as_u64(), report["to"].as_u64()),
        (Some(1), Some(2))
    );
    let (code, out, err) = run_cli(&env, &["outbox", "status", "--json"]).await;
    assert_eq!(code, 0, "{err}");
    let status: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(status["relay_shards"], 2);
    let (code, out, _) = run_cli(&env, &["outbox", "reshard", "2"]).await;
    assert_eq!(code, 0);
    assert!(out.contains("already runs as 2 shard(s)"), "{out}");
    let (code, _, err) = run_cli(&env, &["outbox", "reshard", "0"]).await;
    assert_eq!(code, 2, "{err}");
}
