//! The log relay's own promises: it writes nothing back per message, recovers a lost slot
//! from the table without losing a committed message, and says what to change when the
//! database cannot stream. (The promises every mode keeps are in `relay.rs`.)

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use diesel_async::{AsyncConnection, AsyncPgConnection, RunQueryDsl};
use ferrybox::testing::{self, wait_until};
use ferrybox::{CancellationToken, Error, Relay, RelayConfig, RelayMode};

use crate::support::{Fixture, RunningRelay, TIMEOUT, log_relay};

/// Every key's versions in arrival order, and the set of message ids that arrived.
fn by_key(records: &[testing::ReadRecord]) -> (BTreeMap<String, Vec<i64>>, BTreeSet<String>) {
    let mut keys: BTreeMap<String, Vec<i64>> = BTreeMap::new();
    let mut ids = BTreeSet::new();
    for r in records {
        keys.entry(r.headers["ce_subject"].clone())
            .or_default()
            .push(r.headers["ce_entityversion"].parse().unwrap());
        ids.insert(r.headers["ce_id"].clone());
    }
    (keys, ids)
}

/// Concurrent writers, one relay: every row arrives once, each key in commit order, and the
/// outbox rows are never touched after their insert (no update, no delete: `xmax` is 0).
#[tokio::test(flavor = "multi_thread")]
async fn the_log_relay_publishes_in_commit_order_and_writes_nothing_back() {
    let fx = Arc::new(Fixture::new(3).await.writing_for(RelayMode::Log));
    let running = RunningRelay::start(log_relay(&fx));
    let writers: Vec<_> = (0..4)
        .map(|w| {
            let fx = fx.clone();
            tokio::spawn(async move {
                for version in 1..=25 {
                    for k in 0..4 {
                        fx.change(&format!("w{w}-k{k}"), version).await;
                    }
                }
            })
        })
        .collect();
    for writer in writers {
        writer.await.unwrap();
    }
    let records = testing::read_topic(&fx.topic, 400, TIMEOUT).await;
    let (keys, ids) = by_key(&records);
    assert_eq!(ids.len(), 400, "a message arrived twice");
    assert_eq!(keys.len(), 16);
    for (key, versions) in keys {
        assert_eq!(versions, (1..=25).collect::<Vec<_>>(), "key {key}");
    }
    running.stop().await;
    assert_eq!(
        fx.count("SELECT count(*) AS n FROM ferrybox_messages")
            .await,
        400
    );
    assert_eq!(
        fx.count("SELECT count(*) AS n FROM ferrybox_messages WHERE xmax::text <> '0'")
            .await,
        0,
        "the relay wrote to outbox rows after their insert"
    );
    // The polling table was never used.
    assert_eq!(
        fx.count("SELECT count(*) AS n FROM ferrybox_outbox").await,
        0
    );
}

/// Commits changes `range` over `keys` keys (change `i` is key `k{i % keys}`, version
/// `i / keys + 1`) and adds their message ids to `written`.
async fn write_changes(
    fx: &Fixture,
    range: std::ops::Range<i64>,
    keys: i64,
    written: &mut BTreeSet<String>,
) {
    for i in range {
        let id = fx.change(&format!("k{}", i % keys), i / keys + 1).await;
        written.insert(id.to_string());
    }
}

/// Until the relay's checkpoint (written once a second) holds a recovery bound, which a lost
/// slot is recovered from.
async fn recovery_bound_checkpointed(fx: &Fixture) {
    wait_until(TIMEOUT, "a checkpoint with a recovery bound", || async {
        fx.count(
            "SELECT count(*) AS n FROM ferrybox_relay_checkpoints \
             WHERE recover_from_xid IS NOT NULL AND snapshot_done",
        )
        .await
            == 1
    })
    .await;
}

/// A log relay publishes 20 changes over 4 keys and checkpoints a recovery bound, then stops;
/// 20 more are written while no relay runs (the log relay never saw them). The ids of all 40.
async fn published_then_stopped_with_more_written() -> (Fixture, BTreeSet<String>) {
    let fx = Fixture::new(2).await.writing_for(RelayMode::Log);
    let mut written = BTreeSet::new();
    let running = RunningRelay::start(log_relay(&fx));
    write_changes(&fx, 0..20, 4, &mut written).await;
    testing::read_ids(&testing::kafka(), &fx.topic, &written, TIMEOUT).await;
    recovery_bound_checkpointed(&fx).await;
    running.stop().await;
    write_changes(&fx, 20..40, 4, &mut written).await;
    (fx, written)
}

/// The slot is dropped (as an operator, or `max_slot_wal_keep_size`, would) while messages
/// are committed and no relay runs: the next relay makes it again and publishes from the
/// table what the lost slot had not delivered. Duplicates are allowed; a loss is not.
#[tokio::test(flavor = "multi_thread")]
async fn a_lost_slot_is_made_again_and_nothing_committed_is_lost() {
    let (fx, mut written) = published_then_stopped_with_more_written().await;
    let mut conn = AsyncPgConnection::establish(fx.db.url()).await.unwrap();
    diesel::sql_query(
        "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots \
         WHERE database = current_database()",
    )
    .execute(&mut conn)
    .await
    .unwrap();
    let running = RunningRelay::start(log_relay(&fx));
    write_changes(&fx, 40..50, 4, &mut written).await;
    let records = testing::read_ids(&testing::kafka(), &fx.topic, &written, TIMEOUT).await;
    running.stop().await;
    // Each key's first arrivals are in order: recovery republishes in id order, which for one
    // key is commit order.
    let (keys, _) = by_key(&records);
    for (key, versions) in keys {
        let mut first_seen = Vec::new();
        for v in versions {
            if !first_seen.contains(&v) {
                first_seen.push(v);
            }
        }
        let mut sorted = first_seen.clone();
        sorted.sort_unstable();
        assert_eq!(first_seen, sorted, "key {key}");
    }
    assert_eq!(
        fx.count(
            "SELECT count(*) AS n FROM pg_replication_slots WHERE database = current_database()"
        )
        .await,
        1,
        "the slot was made again"
    );
}

/// The server invalidates the slot of a relay that is down while the WAL grows past
/// `max_slot_wal_keep_size` (the slot stays, with `wal_status` lost): `status` says so, and
/// the next relay drops it, makes it again and publishes from the table what the lost slot
/// had not delivered. On a server of the test's own: the setting is the server's, and a tiny
/// one would invalidate other tests' slots.
#[tokio::test(flavor = "multi_thread")]
async fn a_slot_the_server_invalidated_is_made_again_and_nothing_committed_is_lost() {
    use ferrybox::outbox::sent_log;
    let server = testing::PrivatePostgres::start(&[
        "wal_level=logical",
        "max_slot_wal_keep_size=1MB",
        "max_wal_size=64MB",
    ])
    .await;
    let database = testing::TestDatabase::with_framework_tables_in(&server.admin_url()).await;
    let fx = Fixture::on(database, 2).await.writing_for(RelayMode::Log);
    let mut written = BTreeSet::new();
    let running = RunningRelay::start(log_relay(&fx));
    write_changes(&fx, 0..10, 3, &mut written).await;
    testing::read_ids(&testing::kafka(), &fx.topic, &written, TIMEOUT).await;
    recovery_bound_checkpointed(&fx).await;
    running.stop().await;
    // Committed while no relay runs: only the table has them once the slot is lost.
    write_changes(&fx, 10..20, 3, &mut written).await;
    testing::execute(fx.db.url(), "CREATE TABLE filler (x TEXT)").await;
    wait_until(TIMEOUT, "the server invalidated the slot", || async {
        testing::execute(
            fx.db.url(),
            "INSERT INTO filler SELECT repeat('x', 1000) FROM generate_series(1, 2000)",
        )
        .await;
        testing::execute(fx.db.url(), "SELECT pg_switch_wal()").await;
        testing::execute(fx.db.url(), "CHECKPOINT").await;
        fx.count(
            "SELECT count(*) AS n FROM pg_replication_slots \
             WHERE database = current_database() AND wal_status = 'lost'",
        )
        .await
            == 1
    })
    .await;
    let mut conn = AsyncPgConnection::establish(fx.db.url()).await.unwrap();
    let status = sent_log::status(&mut conn).await.unwrap();
    assert_eq!(
        status.slot_wal_status.as_deref(),
        Some("lost"),
        "{status:?}"
    );

    let running = RunningRelay::start(log_relay(&fx));
    write_changes(&fx, 20..25, 3, &mut written).await;
    let records = testing::read_ids(&testing::kafka(), &fx.topic, &written, TIMEOUT).await;
    running.stop().await;
    assert!(
        records.len() >= written.len(),
        "every message, duplicates allowed"
    );
    let status = sent_log::status(&mut conn).await.unwrap();
    assert_ne!(
        status.slot_wal_status.as_deref(),
        Some("lost"),
        "{status:?}"
    );
    assert_eq!(status.slot_active, Some(false), "{status:?}");
    drop(conn);
    drop(fx);
}

/// A role that may not replicate: the log relay refuses to start and says what to run; in
/// `auto` mode the relay polls the table instead, and publishes.
#[tokio::test(flavor = "multi_thread")]
async fn a_database_that_cannot_stream_is_named_with_what_to_change() {
    let fx = Fixture::new(1).await;
    let role = testing::unique("fb_norepl");
    let mut conn = AsyncPgConnection::establish(fx.db.url()).await.unwrap();
    diesel::sql_query(format!("CREATE ROLE {role} LOGIN NOREPLICATION"))
        .execute(&mut conn)
        .await
        .unwrap();
    for grant in [
        "GRANT ALL ON ALL TABLES IN SCHEMA public TO {role}",
        "GRANT ALL ON ALL SEQUENCES IN SCHEMA public TO {role}",
        "GRANT EXECUTE ON ALL FUNCTIONS IN SCHEMA public TO {role}",
    ] {
        diesel::sql_query(grant.replace("{role}", &role))
            .execute(&mut conn)
            .await
            .unwrap();
    }
    let url = fx.db.url().replacen("postgres@", &format!("{role}@"), 1);
    assert_ne!(url, fx.db.url(), "the test URL names its user");
    let config = |mode| RelayConfig {
        mode,
        ..Fixture::relay_config()
    };
    let refused = Relay::new(
        ferrybox::DatabaseConfig::new(url.clone()),
        &testing::kafka(),
        config(RelayMode::Log),
    )
    .unwrap()
    .run(CancellationToken::new())
    .await
    .unwrap_err();
    assert!(
        matches!(&refused, Error::ReplicationSetup(m) if m.contains(&format!("ALTER ROLE \"{role}\" REPLICATION"))),
        "{refused}"
    );
    assert!(!refused.is_retryable());

    let auto = RunningRelay::start(
        Relay::new(
            ferrybox::DatabaseConfig::new(url),
            &testing::kafka(),
            config(RelayMode::Auto),
        )
        .unwrap(),
    );
    fx.change("polled", 1).await;
    wait_until(TIMEOUT, "the auto relay polls and publishes", || async {
        fx.published().await == 1
    })
    .await;
    // Its retention makes the sent log's ranges ahead through the migrations' functions,
    // without the right to change tables itself.
    wait_until(TIMEOUT, "the relay's role made ranges ahead", || async {
        fx.count(
            "SELECT count(*) AS n FROM pg_inherits \
             WHERE inhparent = 'ferrybox_outbox'::regclass \
               AND inhrelid::regclass::text NOT LIKE '%\\_p0\\_%' \
               AND inhrelid::regclass::text <> 'ferrybox_outbox_default'",
        )
        .await
            >= ferrybox::storage::AHEAD
    })
    .await;
    auto.stop().await;
    drop(conn);
    let mut admin = AsyncPgConnection::establish(fx.db.url()).await.unwrap();
    diesel::sql_query(format!("DROP OWNED BY {role}"))
        .execute(&mut admin)
        .await
        .unwrap();
    diesel::sql_query(format!("DROP ROLE {role}"))
        .execute(&mut admin)
        .await
        .unwrap();
}

/// `outbox status` shows the slot and the log relay's table; after broker data loss, `replay`
/// resends the log relay's messages from that table, with their original ids, in order.
#[tokio::test(flavor = "multi_thread")]
async fn status_shows_the_slot_and_replay_resends_the_log_relays_messages() {
    use ferrybox::outbox::sent_log;
    let fx = Fixture::new(1).await.writing_for(RelayMode::Log);
    let running = RunningRelay::start(log_relay(&fx));
    let mut ids = BTreeSet::new();
    for i in 0..6 {
        ids.insert(
            fx.change(&format!("r{}", i % 2), i / 2 + 1)
                .await
                .to_string(),
        );
    }
    testing::read_ids(&testing::kafka(), &fx.topic, &ids, TIMEOUT).await;
    let mut conn = AsyncPgConnection::establish(fx.db.url()).await.unwrap();
    let status = sent_log::status(&mut conn).await.unwrap();
    assert_eq!(status.log_messages, 6);
    assert!(status.log_oldest.is_some());
    assert_eq!(status.unpublished, 0);
    assert!(
        status
            .slot_name
            .as_deref()
            .is_some_and(|s| s.starts_with("ferrybox_"))
    );
    assert_eq!(status.slot_active, Some(true), "{status:?}");
    assert!(status.slot_retained_bytes.is_some_and(|b| b >= 0));
    running.stop().await;

    let producer = ferrybox::kafka::durable_producer(&testing::kafka()).unwrap();
    let selection = ferrybox::ReplaySelection {
        key: Some("r0".into()),
        ..ferrybox::ReplaySelection::default()
    };
    let report = sent_log::replay(
        &mut conn,
        &producer,
        &selection,
        ferrybox::ReplayOptions::default(),
    )
    .await
    .unwrap();
    assert_eq!((report.matched, report.sent, report.failed), (3, 3, 0));
    let records = testing::read_topic(&fx.topic, 9, TIMEOUT).await;
    let r0: Vec<(String, String)> = records
        .iter()
        .filter(|r| r.headers["ce_subject"] == "r0")
        .map(|r| {
            (
                r.headers["ce_id"].clone(),
                r.headers["ce_entityversion"].clone(),
            )
        })
        .collect();
    assert_eq!(r0.len(), 6);
    assert_eq!(
        r0[..3],
        r0[3..],
        "the replay resends the same messages in order"
    );
}

#[derive(diesel::QueryableByName)]
struct Missing {
    #[diesel(sql_type = diesel::sql_types::Array<diesel::sql_types::BigInt>)]
    ids: Vec<i64>,
}

async fn mark(conn: &mut AsyncPgConnection, id: i64) -> Vec<i64> {
    let missing: Missing = diesel::sql_query(format!(
        "SELECT ferrybox_mark_published(ARRAY[{id}]::bigint[], ARRAY[0], ARRAY[7]::bigint[]) AS ids"
    ))
    .get_result(conn)
    .await
    .unwrap();
    missing.ids
}

/// The log relay learns of a transaction from its commit record, a moment before the
/// transaction is visible to other sessions; a mark made in that moment finds no row (the
/// fault test of the binaries caught rows left unmarked that way, published but never given a
/// feed position). The marking function names the rows it could not see, and the relay marks
/// them again until it can. Here a row of a transaction still open stands for one that is not
/// visible yet.
#[tokio::test(flavor = "multi_thread")]
async fn marking_names_rows_not_visible_yet_and_marks_them_once_they_are() {
    use diesel_async::SimpleAsyncConnection;
    #[derive(diesel::QueryableByName)]
    struct Id {
        #[diesel(sql_type = diesel::sql_types::BigInt)]
        id: i64,
    }
    let fx = Fixture::new(1).await;
    let mut writer = AsyncPgConnection::establish(fx.db.url()).await.unwrap();
    let mut relay = AsyncPgConnection::establish(fx.db.url()).await.unwrap();
    writer.batch_execute("BEGIN").await.unwrap();
    let row: Id = diesel::sql_query(
        "INSERT INTO ferrybox_outbox \
         (message_id, topic, message_key, message_type, entity_version, headers, payload, occurred_at) \
         VALUES (gen_random_uuid(), 't', 'k', 'T', 1, '{}', '\\x00', now()) RETURNING id",
    )
    .get_result(&mut writer)
    .await
    .unwrap();
    assert_eq!(
        mark(&mut relay, row.id).await,
        vec![row.id],
        "not visible: not marked"
    );
    writer.batch_execute("COMMIT").await.unwrap();
    assert_eq!(mark(&mut relay, row.id).await, Vec::<i64>::new());
    assert_eq!(
        fx.count(&format!(
            "SELECT count(*) AS n FROM ferrybox_outbox \
             WHERE id = {} AND published_at IS NOT NULL AND feed_position IS NOT NULL \
               AND kafka_offset = 7",
            row.id
        ))
        .await,
        1
    );
    // Marked again (sent twice): nothing is missing, and it keeps its position.
    assert_eq!(mark(&mut relay, row.id).await, Vec::<i64>::new());
    assert_eq!(
        fx.count("SELECT last AS n FROM ferrybox_feed_sequence")
            .await,
        1
    );
}

/// An outbox relayed from the log is relayed by polling from then on (`relay.mode = table`),
/// while its writer still writes the append-only table: the polling relay moves what the log
/// relay had not acknowledged, and what is written there afterwards, into the polling table
/// and publishes it; the log relay's acknowledged messages stay where they are, as the sent
/// log. Nothing committed is lost.
#[tokio::test(flavor = "multi_thread")]
async fn a_polling_relay_taking_over_from_the_log_relay_publishes_what_it_left() {
    let (fx, mut written) = published_then_stopped_with_more_written().await;
    // Its periodic pass (once per cleanup interval, a minute by default) comes soon here.
    let polling = Relay::new(
        fx.db.config(),
        &testing::kafka(),
        RelayConfig {
            cleanup_interval: std::time::Duration::from_millis(200),
            ..Fixture::relay_config_in(RelayMode::Table)
        },
    )
    .unwrap();
    let running = RunningRelay::start(polling);
    // A writer still writing for the log mode while the relay polls.
    write_changes(&fx, 40..45, 4, &mut written).await;
    let records = testing::read_ids(&testing::kafka(), &fx.topic, &written, TIMEOUT).await;
    running.stop().await;
    let (_, ids) = by_key(&records);
    assert_eq!(ids, written, "every message is on the topic");
    let left = fx
        .count("SELECT count(*) AS n FROM ferrybox_messages")
        .await;
    assert!(
        (1..=20).contains(&left),
        "the log relay's acknowledged messages stay as its sent log: {left}"
    );
    assert!(
        fx.count("SELECT count(*) AS n FROM ferrybox_outbox WHERE published_at IS NOT NULL")
            .await
            >= 25,
        "what it left was moved to the polling table and published there"
    );
}
