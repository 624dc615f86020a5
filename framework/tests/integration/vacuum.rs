//! The vacuum guard against a real PostgreSQL of the test's own: prepared transactions need
//! `max_prepared_transactions`, and an idle slot or a long transaction in the shared server
//! would show in other tests' findings.

use std::time::Duration;

use diesel_async::{AsyncConnection, AsyncPgConnection, SimpleAsyncConnection};
use ferrybox::CancellationToken;
use ferrybox::alert::{AlertConfig, Alerter};
use ferrybox::testing::{self, wait_until};
use ferrybox::vacuum::{self, VacuumGuard, VacuumGuardConfig};

use crate::support::TIMEOUT;

/// A long transaction, a forgotten prepared transaction and a slot nobody streams each show
/// in `holds` (what `outbox status` prints), and each past its limit is alerted with what to
/// do; once they are gone, nothing is.
#[tokio::test(flavor = "multi_thread")]
async fn what_holds_vacuum_back_is_shown_and_alerted_past_its_limit() {
    let server =
        testing::PrivatePostgres::start(&["wal_level=logical", "max_prepared_transactions=4"])
            .await;
    let (db, pool) = testing::TestDatabase::with_framework_tables_in(&server.admin_url()).await;
    let mut look = AsyncPgConnection::establish(db.url()).await.unwrap();
    let quiet = vacuum::holds(&mut look).await.unwrap();
    assert_eq!(quiet.oldest_transaction_seconds, None, "{quiet:?}");
    assert_eq!(quiet.prepared_transactions, 0);
    assert!(quiet.inactive_slots.is_empty(), "{quiet:?}");

    // First: making a logical slot waits for every transaction running then to end.
    look.batch_execute("SELECT pg_create_logical_replication_slot('nobody_streams', 'pgoutput')")
        .await
        .unwrap();
    let (mut open, pid) = testing::open_transaction(db.url()).await;
    let mut preparing = AsyncPgConnection::establish(db.url()).await.unwrap();
    preparing
        .batch_execute(
            "CREATE TABLE t (x INT); BEGIN; INSERT INTO t VALUES (1); \
             PREPARE TRANSACTION 'forgotten'",
        )
        .await
        .unwrap();

    let held = vacuum::holds(&mut look).await.unwrap();
    assert_eq!(held.oldest_transaction_pid, Some(pid), "{held:?}");
    assert!(held.oldest_transaction_seconds.is_some());
    assert!(
        held.oldest_transaction_client
            .as_deref()
            .is_some_and(|c| c.contains("idle in transaction")),
        "{held:?}"
    );
    assert_eq!(held.prepared_transactions, 1);
    assert_eq!(held.oldest_prepared_gid.as_deref(), Some("forgotten"));
    assert_eq!(held.inactive_slots, ["nobody_streams"]);

    let stop = CancellationToken::new();
    let (webhook, alerts) = testing::alert_sink(&stop).await;
    let alerter = Alerter::new(&AlertConfig {
        webhook_url: Some(webhook.into()),
    })
    .unwrap();
    let limits = VacuumGuardConfig {
        interval: Duration::from_millis(20),
        max_transaction_age: Duration::ZERO,
        max_prepared_age: Duration::ZERO,
        max_slot_idle: Duration::from_millis(50),
        max_slot_retained_bytes: u64::MAX,
        ..VacuumGuardConfig::default()
    };
    let mut guard =
        VacuumGuard::new(limits.clone(), pool.clone(), alerter.clone(), "test").unwrap();
    let first: Vec<_> = guard
        .check()
        .await
        .unwrap()
        .iter()
        .map(|f| f.kind)
        .collect();
    assert_eq!(
        first,
        ["long_transaction", "prepared_transaction"],
        "the slot only once idle past its limit"
    );
    let running = tokio::spawn(
        VacuumGuard::new(limits.clone(), pool.clone(), alerter.clone(), "test")
            .unwrap()
            .run(stop.child_token()),
    );
    wait_until(TIMEOUT, "the idle slot alerted", || async {
        alerts
            .lock()
            .unwrap()
            .iter()
            .any(|a| a.kind == "idle_slot" && a.summary.contains("nobody_streams"))
    })
    .await;
    {
        let alerts = alerts.lock().unwrap();
        let long = alerts
            .iter()
            .find(|a| a.kind == "long_transaction")
            .expect("the long transaction alerted");
        assert!(
            long.summary
                .contains(&format!("pg_terminate_backend({pid})")),
            "{}",
            long.summary
        );
        assert!(
            alerts.iter().any(
                |a| a.kind == "prepared_transaction" && a.summary.contains("ROLLBACK PREPARED")
            )
        );
    }

    // The slot keeps the WAL written since it was made: past a limit below that, it is
    // alerted as behind, with the bytes it keeps.
    let retained = held.most_retained_bytes.expect("the slot keeps WAL");
    assert_eq!(held.most_retaining_slot.as_deref(), Some("nobody_streams"));
    let strict = VacuumGuardConfig {
        max_slot_retained_bytes: u64::try_from(retained).unwrap() - 1,
        ..limits.clone()
    };
    let lagging = VacuumGuard::new(strict, pool.clone(), alerter.clone(), "test")
        .unwrap()
        .check()
        .await
        .unwrap();
    assert!(
        lagging
            .iter()
            .any(|f| f.kind == "slot_lag" && f.summary.contains("nobody_streams")),
        "{lagging:?}"
    );

    // The running guard stops first: its own look, mid-query, is an open transaction too.
    stop.cancel();
    running.await.unwrap().unwrap();
    open.batch_execute("ROLLBACK").await.unwrap();
    // Each alone: several statements in one call are one transaction block.
    look.batch_execute("ROLLBACK PREPARED 'forgotten'")
        .await
        .unwrap();
    look.batch_execute("SELECT pg_drop_replication_slot('nobody_streams')")
        .await
        .unwrap();
    let gone = vacuum::holds(&mut look).await.unwrap();
    assert_eq!(gone, quiet);
    assert!(guard.check().await.unwrap().is_empty());
    drop((open, preparing, look, pool, db));
}

/// An id generation a consumer keeps long after it closed (a consumer that stopped for good)
/// shows in `holds`, with the consumer, and is alerted past `max_generation_kept`.
#[tokio::test(flavor = "multi_thread")]
async fn an_id_generation_kept_long_after_it_closed_is_shown_and_alerted() {
    let (db, pool) = testing::TestDatabase::with_framework_tables().await;
    testing::kept_generation(&pool, db.url(), "gone-consumer", 3).await;
    let mut look = AsyncPgConnection::establish(db.url()).await.unwrap();
    let fresh = vacuum::holds(&mut look).await.unwrap();
    assert!(
        fresh
            .oldest_kept_generation_seconds
            .is_some_and(|s| s < 60.0),
        "{fresh:?}"
    );
    assert_eq!(fresh.oldest_kept_generation_consumers, ["gone-consumer"]);
    testing::execute(
        db.url(),
        "UPDATE ferrybox_inbox_generations SET closed_at = now() - interval '40 days' \
         WHERE generation = 0",
    )
    .await;
    let alerter = Alerter::new(&AlertConfig { webhook_url: None }).unwrap();
    let mut guard =
        VacuumGuard::new(VacuumGuardConfig::default(), pool.clone(), alerter, "test").unwrap();
    let findings = guard.check().await.unwrap();
    let kept = findings
        .iter()
        .find(|f| f.kind == "kept_generation")
        .unwrap_or_else(|| panic!("{findings:?}"));
    assert!(
        kept.summary.contains("by gone-consumer"),
        "{}",
        kept.summary
    );
}
