//! The relay under concurrency: per-key commit order, NOTIFY, several instances; and the sent
//! log: retention, status, replay; and the topic durability check.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use diesel_async::{AsyncConnection, AsyncPgConnection, TransactionManager};
use ferrybox::outbox::sent_log;
use ferrybox::testing::{self, ReadRecord, wait_until};
use ferrybox::{CancellationToken, Relay, RelayConfig, RelayMode, ReplayOptions, ReplaySelection};

use crate::support::{Fixture, RunningRelay, TIMEOUT};

type Tm = <AsyncPgConnection as AsyncConnection>::TransactionManager;

/// `pg_locks` shows every database's locks: keep to the test's own (advisory locks are per
/// database, and other tests run beside this one).
const THIS_DATABASE: &str =
    "database = (SELECT oid FROM pg_database WHERE datname = current_database())";

/// Entity versions per key, in the order the records arrived (partition order, which is the
/// order of one key).
fn versions_by_key(records: &[ReadRecord]) -> BTreeMap<String, Vec<i64>> {
    let mut by_key: BTreeMap<String, Vec<i64>> = BTreeMap::new();
    for r in records {
        by_key
            .entry(r.headers["ce_subject"].clone())
            .or_default()
            .push(r.headers["ce_entityversion"].parse().unwrap());
    }
    by_key
}

fn relay(fx: &Fixture, config: RelayConfig) -> Relay {
    Relay::new(fx.db.config(), &testing::kafka(), config).unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn one_key_is_published_in_commit_order_when_its_transactions_overlap() {
    let fx = Fixture::new(1).await;
    let (first, second) = (fx.message("k", 1).await, fx.message("k", 2).await);

    // Transaction A enqueues version 1 and stays open.
    let mut a = AsyncPgConnection::establish(fx.db.url()).await.unwrap();
    Tm::begin_transaction(&mut a).await.unwrap();
    fx.outbox.enqueue(&mut a, &first).await.unwrap();

    // Transaction B enqueues version 2 of the same key and commits as soon as it can.
    let outbox = fx.outbox.clone();
    let url = fx.db.url().to_owned();
    let b = tokio::spawn(async move {
        let mut b = AsyncPgConnection::establish(&url).await.unwrap();
        Tm::begin_transaction(&mut b).await.unwrap();
        outbox.enqueue(&mut b, &second).await.unwrap();
        Tm::commit_transaction(&mut b).await.unwrap();
    });
    // B must wait for A's key lock: had it committed first, its row (drawn after A's id)
    // would have been published after A's in spite of committing before it.
    wait_until(TIMEOUT, "B waits for A's key lock", || async {
        b.is_finished()
            || fx
                .count(&format!("SELECT count(*) AS n FROM pg_locks WHERE locktype = 'advisory' AND NOT granted AND {THIS_DATABASE}"))
                .await
                > 0
    })
    .await;
    assert!(!b.is_finished(), "B committed while A held the key");
    Tm::commit_transaction(&mut a).await.unwrap();
    b.await.unwrap();

    let mut conn = AsyncPgConnection::establish(fx.db.url()).await.unwrap();
    let outcome = relay(&fx, Fixture::relay_config())
        .publish_pending(&mut conn)
        .await
        .unwrap();
    assert_eq!(outcome.published, 2);
    let records = testing::read_topic(&fx.topic, 2, TIMEOUT).await;
    assert_eq!(versions_by_key(&records)["k"], vec![1, 2]);
}

#[tokio::test(flavor = "multi_thread")]
async fn other_keys_do_not_wait_for_an_open_transaction() {
    let fx = Fixture::new(1).await;
    let held = fx.message("held", 1).await;
    let mut a = AsyncPgConnection::establish(fx.db.url()).await.unwrap();
    Tm::begin_transaction(&mut a).await.unwrap();
    fx.outbox.enqueue(&mut a, &held).await.unwrap();
    // A different key commits while "held" is still open.
    fx.change("free", 1).await;
    Tm::rollback_transaction(&mut a).await.unwrap();
    assert_eq!(
        fx.count("SELECT count(*) AS n FROM ferrybox_outbox").await,
        1
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn notify_wakes_the_relay_without_polling() {
    let fx = Fixture::new(1).await;
    // Polling once an hour: only the notification can bring these rows out in time.
    let running = RunningRelay::start(relay(
        &fx,
        RelayConfig {
            poll_interval: Duration::from_secs(3600),
            ..Fixture::relay_config_in(RelayMode::Table)
        },
    ));
    for round in 1..=3 {
        fx.change("n", round).await;
        wait_until(TIMEOUT, "the notified relay publishes", || async {
            fx.published().await == round
        })
        .await;
    }
    running.stop().await;
}

/// Writers notify only while a relay waits. A transaction that enqueued while no relay was
/// waiting (so it will not notify) and commits just as the relay runs out of work must still be
/// published without a poll: the relay waits for it before it starts waiting itself.
#[tokio::test(flavor = "multi_thread")]
async fn a_writer_that_did_not_notify_is_published_without_polling() {
    let fx = Fixture::new(1).await;
    let message = fx.message("quiet", 1).await;
    // No relay yet: this transaction holds the waiting lock shared and will not notify.
    let mut a = AsyncPgConnection::establish(fx.db.url()).await.unwrap();
    Tm::begin_transaction(&mut a).await.unwrap();
    fx.outbox.enqueue(&mut a, &message).await.unwrap();
    let (class, object) = ferrybox::outbox::RELAY_WAITING_LOCK;
    let waiting_lock = format!(
        "SELECT count(*) AS n FROM pg_locks WHERE locktype = 'advisory' \
         AND classid = {class} AND objid = {object} AND {THIS_DATABASE}"
    );
    assert_eq!(
        fx.count(&format!(
            "{waiting_lock} AND granted AND mode = 'ShareLock'"
        ))
        .await,
        1
    );
    // A relay that polls once an hour finds the outbox empty and queues for the waiting lock
    // behind the open transaction.
    let running = RunningRelay::start(relay(
        &fx,
        RelayConfig {
            poll_interval: Duration::from_secs(3600),
            ..Fixture::relay_config_in(RelayMode::Table)
        },
    ));
    wait_until(TIMEOUT, "the relay queues for the waiting lock", || async {
        fx.count(&format!("{waiting_lock} AND NOT granted")).await == 1
    })
    .await;
    Tm::commit_transaction(&mut a).await.unwrap();
    wait_until(TIMEOUT, "the quiet writer's row is published", || async {
        fx.published().await == 1
    })
    .await;
    // Waiting now, the relay is woken by the next writer's notification.
    fx.change("loud", 1).await;
    wait_until(TIMEOUT, "the notified relay publishes", || async {
        fx.published().await == 2
    })
    .await;
    running.stop().await;
}

/// The notifications on `ferrybox_outbox` that arrive before a sentinel sent after the writer's
/// commit (notifications arrive in commit order, so no waiting on a clock).
async fn notifications_before_sentinel(
    fx: &Fixture,
    listener: &mut AsyncPgConnection,
    write: impl std::future::Future<Output = ()>,
) -> usize {
    use futures::StreamExt;
    write.await;
    let mut sender = AsyncPgConnection::establish(fx.db.url()).await.unwrap();
    diesel_async::SimpleAsyncConnection::batch_execute(
        &mut sender,
        "NOTIFY ferrybox_outbox, 'sentinel'",
    )
    .await
    .unwrap();
    let mut before = 0;
    let mut stream = std::pin::pin!(listener.notifications_stream());
    loop {
        let next = tokio::time::timeout(TIMEOUT, stream.next())
            .await
            .expect("the sentinel arrives")
            .expect("the listener is open")
            .unwrap();
        if next.payload == "sentinel" {
            return before;
        }
        before += 1;
    }
}

/// Writers pay for `NOTIFY` (a commit-time global lock) only while a relay waits for work.
#[tokio::test(flavor = "multi_thread")]
async fn writers_notify_only_while_a_relay_waits() {
    let fx = Fixture::new(1).await;
    let mut listener = AsyncPgConnection::establish(fx.db.url()).await.unwrap();
    diesel_async::SimpleAsyncConnection::batch_execute(&mut listener, "LISTEN ferrybox_outbox")
        .await
        .unwrap();
    // No relay waits: the commit notifies no one.
    let quiet = notifications_before_sentinel(&fx, &mut listener, async {
        fx.change("a", 1).await;
    })
    .await;
    assert_eq!(quiet, 0);
    // A relay waits (it holds the waiting lock, as `Relay::run` does when the outbox is empty).
    let (class, object) = ferrybox::outbox::RELAY_WAITING_LOCK;
    let mut relay = AsyncPgConnection::establish(fx.db.url()).await.unwrap();
    diesel_async::SimpleAsyncConnection::batch_execute(
        &mut relay,
        &format!("SELECT pg_advisory_lock({class}, {object})"),
    )
    .await
    .unwrap();
    let woken = notifications_before_sentinel(&fx, &mut listener, async {
        fx.change("a", 2).await;
    })
    .await;
    assert_eq!(woken, 1);
}

in_every_mode!(
    a_message_the_broker_refuses_for_good_is_kept_with_its_error_and_the_rest_go_on,
    three_relays_with_concurrent_writers_publish_each_row_once_in_key_order,
    a_standby_takes_over_when_the_active_relay_stops,
    the_running_relay_deletes_the_sent_log_after_its_retention,
    under_load_the_running_relay_keeps_the_sent_log_within_its_retention,
);

/// Over `message.max.bytes`: librdkafka refuses it itself, for good. Two such messages, one
/// committed before the relay first starts (the log relay's new slot publishes it from its
/// snapshot) and one while it runs (from the stream), each between messages that are
/// published: they stay in the polling table, unpublished, with the error, where `status`
/// counts them, and the rest go on.
async fn a_message_the_broker_refuses_for_good_is_kept_with_its_error_and_the_rest_go_on(
    mode: RelayMode,
) {
    let fx = Fixture::new(1).await.writing_for(mode);
    let huge = "x".repeat(2 * 1024 * 1024);
    let mut ids = std::collections::BTreeSet::new();
    ids.insert(fx.change("before", 1).await.to_string());
    let refused_before = fx.change_labelled("huge-before", 1, &huge).await;
    ids.insert(fx.change("before", 2).await.to_string());
    let running = RunningRelay::start(relay(&fx, Fixture::relay_config_in(mode)));
    testing::read_ids(&testing::kafka(), &fx.topic, &ids, TIMEOUT).await;
    ids.insert(fx.change("while", 1).await.to_string());
    let refused_while = fx.change_labelled("huge-while", 1, &huge).await;
    ids.insert(fx.change("while", 2).await.to_string());
    let read = testing::read_ids(&testing::kafka(), &fx.topic, &ids, TIMEOUT).await;
    assert_eq!(read.len(), 4, "the four others published");
    let kept = format!(
        "SELECT count(*) AS n FROM ferrybox_outbox WHERE message_id IN ('{}', '{}') \
         AND published_at IS NULL AND attempts > 0 AND last_error LIKE '%too large%'",
        refused_before.0, refused_while.0
    );
    wait_until(
        TIMEOUT,
        "both refused messages kept with the error",
        || async { fx.count(&kept).await == 2 },
    )
    .await;
    let mut conn = AsyncPgConnection::establish(fx.db.url()).await.unwrap();
    let status = sent_log::status(&mut conn).await.unwrap();
    assert_eq!(status.unpublished, 2, "{status:?}");
    assert_eq!(status.unpublished_with_errors, 2, "{status:?}");
    running.stop().await;
}

async fn three_relays_with_concurrent_writers_publish_each_row_once_in_key_order(mode: RelayMode) {
    let fx = Arc::new(Fixture::new(3).await.writing_for(mode));
    let config = RelayConfig {
        standby_interval: Duration::from_millis(50),
        ..Fixture::relay_config_in(mode)
    };
    let mut relays: Vec<RunningRelay> = (0..3)
        .map(|_| RunningRelay::start(relay(&fx, config.clone())))
        .collect();
    // Four writers, each owning five keys, writing versions 1, 2, 3, ... until told to stop.
    let stop_writers = CancellationToken::new();
    let writers: Vec<_> = (0..4)
        .map(|w| {
            let (fx, stop) = (fx.clone(), stop_writers.clone());
            tokio::spawn(async move {
                let mut last = BTreeMap::new();
                let mut version = 0;
                while !stop.is_cancelled() {
                    version += 1;
                    for k in 0..5 {
                        let key = format!("w{w}-k{k}");
                        fx.change(&key, version).await;
                        last.insert(key, version);
                    }
                }
                last
            })
        })
        .collect();
    // Stop the relays one by one while the writers write: each time, another one has to take
    // over before anything more is published.
    let mut before = 0;
    for running in relays.drain(..2) {
        wait_until(TIMEOUT, "progress since the last stop", || async {
            fx.progress().await > before
        })
        .await;
        running.stop().await;
        before = fx.progress().await;
    }
    wait_until(TIMEOUT, "progress after the last takeover", || async {
        fx.progress().await > before
    })
    .await;
    stop_writers.cancel();
    let mut committed = BTreeMap::new();
    for writer in writers {
        committed.extend(writer.await.unwrap());
    }
    let total: i64 = committed.values().sum();
    if mode == RelayMode::Table {
        wait_until(TIMEOUT, "every row published", || async {
            fx.published().await == total
        })
        .await;
    }
    let records = testing::read_topic(&fx.topic, usize::try_from(total).unwrap(), TIMEOUT).await;
    relays.pop().unwrap().stop().await;
    let mut ids: Vec<&str> = records
        .iter()
        .map(|r| r.headers["ce_id"].as_str())
        .collect();
    ids.sort_unstable();
    ids.dedup();
    assert_eq!(ids.len(), records.len(), "a row was published twice");
    let by_key = versions_by_key(&records);
    assert_eq!(by_key.len(), committed.len());
    for (key, versions) in by_key {
        assert_eq!(
            versions,
            (1..=committed[&key]).collect::<Vec<_>>(),
            "key {key}"
        );
    }
}

/// Retention drops a partition of the sent log whole, once every row in it was published
/// longer ago than the retention; an unpublished row holds its partition however old. Rows
/// no range covers (the DEFAULT partition) are deleted one by one.
#[tokio::test(flavor = "multi_thread")]
async fn retention_drops_a_partition_once_every_row_in_it_expired_and_never_an_unpublished_row() {
    use diesel_async::RunQueryDsl;
    let fx = Fixture::new(1).await;
    let mut conn = AsyncPgConnection::establish(fx.db.url()).await.unwrap();
    // The migration's first range holds what the table had (nothing here) up to its time.
    let first: String = {
        #[derive(diesel::QueryableByName)]
        struct Name {
            #[diesel(sql_type = diesel::sql_types::Text)]
            name: String,
        }
        let n: Name = diesel::sql_query(
            "SELECT relname::text AS name FROM pg_class WHERE relname LIKE 'ferrybox_outbox_p0\\_%'",
        )
        .get_result(&mut conn)
        .await
        .unwrap();
        n.name
    };
    let old_rows = |published: bool, count: usize| {
        format!(
            "INSERT INTO ferrybox_outbox (message_id, topic, message_key, message_type, entity_version, payload, occurred_at, created_at, published_at) \
             SELECT gen_random_uuid(), 't', 'k', 'ty', 1, 'x', now(), now() - interval '3 days', {} \
             FROM generate_series(1, {count})",
            if published {
                "now() - interval '2 days'"
            } else {
                "NULL"
            }
        )
    };
    testing::execute(fx.db.url(), &old_rows(true, 5)).await;
    testing::execute(fx.db.url(), &old_rows(false, 1)).await;
    let in_first = format!("SELECT count(*) AS n FROM {first}");
    assert_eq!(fx.count(&in_first).await, 6);

    // A retention of a second: ranges of a second each. Once a range made by maintenance has
    // expired and gone, the first one (older still) was looked at too: the unpublished row
    // holds it.
    let retention = Duration::from_secs(1);
    let made = std::sync::atomic::AtomicU64::new(0);
    let url = fx.db.url();
    wait_until(
        TIMEOUT,
        "a range made ahead expired and dropped",
        || async {
            let mut conn = AsyncPgConnection::establish(url).await.unwrap();
            let done = ferrybox::storage::maintain(&mut conn, ferrybox::storage::OUTBOX, retention)
                .await
                .unwrap();
            made.fetch_add(done.created, std::sync::atomic::Ordering::Relaxed);
            done.dropped > 0
        },
    )
    .await;
    let made = made.into_inner();
    assert!(
        made >= ferrybox::storage::AHEAD as u64,
        "{made} ranges made ahead"
    );
    assert_eq!(fx.count(&in_first).await, 6, "held by its unpublished row");

    // Published (long ago, for the test): the range goes, as a table.
    testing::execute(
        fx.db.url(),
        "UPDATE ferrybox_outbox SET published_at = now() - interval '2 days' WHERE published_at IS NULL",
    )
    .await;
    let done = ferrybox::storage::maintain(&mut conn, ferrybox::storage::OUTBOX, retention)
        .await
        .unwrap();
    assert!(done.dropped >= 1, "{done:?}");
    assert_eq!(
        fx.count(&format!(
            "SELECT count(*) AS n FROM pg_class WHERE relname = '{first}'"
        ))
        .await,
        0
    );
    assert_eq!(
        fx.count("SELECT count(*) AS n FROM ferrybox_outbox").await,
        0
    );

    // No range covers three days ago any more: such rows go to the DEFAULT partition, where
    // the expired published one is deleted and the unpublished one stays.
    testing::execute(fx.db.url(), &old_rows(true, 1)).await;
    testing::execute(fx.db.url(), &old_rows(false, 1)).await;
    assert_eq!(
        fx.count("SELECT count(*) AS n FROM ferrybox_outbox_default")
            .await,
        2
    );
    let done = ferrybox::storage::maintain(&mut conn, ferrybox::storage::OUTBOX, retention)
        .await
        .unwrap();
    assert_eq!(done.deleted_from_default, 1, "{done:?}");
    assert_eq!(
        fx.count("SELECT count(*) AS n FROM ferrybox_outbox WHERE published_at IS NULL")
            .await,
        1
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn status_reports_backlog_errors_and_the_sent_log() {
    let fx = Fixture::new(1).await;
    fx.change("s1", 1).await;
    fx.change("s2", 1).await;
    let mut conn = AsyncPgConnection::establish(fx.db.url()).await.unwrap();
    let status = sent_log::status(&mut conn).await.unwrap();
    assert_eq!(status.unpublished, 2);
    assert!(status.oldest_unpublished_age_seconds.unwrap() >= 0.0);
    assert_eq!(
        (status.unpublished_with_errors, status.sent_log_rows),
        (0, 0)
    );

    let mut unreachable = ferrybox::KafkaConfig::new("127.0.0.1:1");
    unreachable
        .producer_settings
        .insert("message.timeout.ms".into(), "1000".into());
    let failing = Relay::new(fx.db.config(), &unreachable, Fixture::relay_config()).unwrap();
    assert_eq!(failing.publish_batch(&mut conn).await.unwrap().failed, 2);
    let status = sent_log::status(&mut conn).await.unwrap();
    assert_eq!(status.unpublished_with_errors, 2);
    assert!(status.last_error.is_some());

    relay(&fx, Fixture::relay_config())
        .publish_pending(&mut conn)
        .await
        .unwrap();
    let status = sent_log::status(&mut conn).await.unwrap();
    assert_eq!(status.unpublished, 0);
    assert_eq!(status.oldest_unpublished_age_seconds, None);
    assert_eq!(
        (status.unpublished_with_errors, status.sent_log_rows),
        (0, 2)
    );
    assert!(status.sent_log_oldest.is_some());
}

#[tokio::test(flavor = "multi_thread")]
async fn replay_resends_the_selection_with_original_ids_in_order() {
    let fx = Fixture::new(1).await;
    let mut sent = Vec::new();
    for version in 1..=3 {
        sent.push(fx.change("a", version).await.to_string());
        fx.change("b", version).await;
    }
    let mut conn = AsyncPgConnection::establish(fx.db.url()).await.unwrap();
    relay(&fx, Fixture::relay_config())
        .publish_pending(&mut conn)
        .await
        .unwrap();
    let producer = ferrybox::kafka::durable_producer(&testing::kafka()).unwrap();
    let only_a = ReplaySelection {
        topic: Some(fx.topic.clone()),
        key: Some("a".into()),
        ..ReplaySelection::default()
    };

    let dry = sent_log::replay(
        &mut conn,
        &producer,
        &only_a,
        ReplayOptions {
            dry_run: true,
            ..ReplayOptions::default()
        },
    )
    .await
    .unwrap();
    assert_eq!((dry.matched, dry.sent, dry.dry_run), (3, 0, true));

    let other_topic = ReplaySelection {
        topic: Some("no-such-topic".into()),
        ..ReplaySelection::default()
    };
    let none = sent_log::replay(&mut conn, &producer, &other_topic, ReplayOptions::default())
        .await
        .unwrap();
    assert_eq!((none.matched, none.sent), (0, 0));

    let report = sent_log::replay(&mut conn, &producer, &only_a, ReplayOptions::default())
        .await
        .unwrap();
    assert_eq!((report.matched, report.sent, report.failed), (3, 3, 0));
    // The topic now holds the six originals, then key a's three again, same ids, same order.
    let records = testing::read_topic(&fx.topic, 9, TIMEOUT).await;
    let replayed: Vec<String> = records[6..]
        .iter()
        .map(|r| r.headers["ce_id"].clone())
        .collect();
    assert_eq!(replayed, sent);

    // A position range selects by outbox id: the first two rows.
    let first_two = ReplaySelection {
        to_position: Some(
            fx.count("SELECT min(id) + 1 AS n FROM ferrybox_outbox")
                .await,
        ),
        ..ReplaySelection::default()
    };
    let options = ReplayOptions {
        dry_run: true,
        ..ReplayOptions::default()
    };
    let counted = sent_log::replay(&mut conn, &producer, &first_two, options)
        .await
        .unwrap();
    assert_eq!(counted.matched, 2);
    let zero_rate = ReplayOptions {
        rate_per_second: 0,
        dry_run: false,
    };
    assert!(
        sent_log::replay(&mut conn, &producer, &first_two, zero_rate)
            .await
            .is_err()
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn durability_check_reports_the_topic_and_strict_mode_refuses_it() {
    let topic = testing::create_topic(2).await;
    let config = ferrybox::TopicConfig {
        partitions: 2,
        ..ferrybox::TopicConfig::new(&topic)
    };
    let mut kafka = testing::kafka();
    let report = ferrybox::kafka::check_durability(&kafka, std::slice::from_ref(&config))
        .await
        .unwrap();
    assert_eq!(report[0].partitions, 2);
    // The local broker is a single node: replication factor 1, below production level.
    assert_eq!(report[0].replication_factor, 1);
    assert!(!report[0].shortcomings().is_empty());

    kafka.strict_durability = true;
    let err = ferrybox::kafka::check_durability(&kafka, std::slice::from_ref(&config))
        .await
        .unwrap_err();
    assert!(
        err.to_string().contains("replication factor 1 is below 3"),
        "{err}"
    );

    kafka.strict_durability = false;
    let wrong = ferrybox::TopicConfig {
        partitions: 5,
        ..config
    };
    let err = ferrybox::kafka::check_durability(&kafka, &[wrong])
        .await
        .unwrap_err();
    assert!(err.to_string().contains("has 2 partitions"), "{err}");
}

async fn the_running_relay_deletes_the_sent_log_after_its_retention(mode: RelayMode) {
    let fx = Fixture::new(1).await.writing_for(mode);
    let running = RunningRelay::start(relay(
        &fx,
        RelayConfig {
            retention: Duration::from_millis(1),
            cleanup_interval: Duration::from_millis(20),
            ..Fixture::relay_config_in(mode)
        },
    ));
    for i in 0..5 {
        fx.change(&format!("gone-{i}"), 1).await;
    }
    assert_eq!(testing::read_topic(&fx.topic, 5, TIMEOUT).await.len(), 5);
    // Published, then expired and deleted by the relay itself, from either table.
    wait_until(TIMEOUT, "the sent log emptied by retention", || async {
        fx.count(
            "SELECT (SELECT count(*) FROM ferrybox_outbox) \
                  + (SELECT count(*) FROM ferrybox_messages) AS n",
        )
        .await
            == 0
    })
    .await;
    running.stop().await;
}

/// Under a steady write load, the running relay keeps the sent log within its retention and
/// one range: after the first few seconds nothing older stays, however much has been written,
/// and it keeps as many partitions at the end as at the start. (Sizes over 10,000,000 rows are
/// the soak's, in `make bench`.)
async fn under_load_the_running_relay_keeps_the_sent_log_within_its_retention(mode: RelayMode) {
    let fx = Fixture::new(1).await.writing_for(mode);
    let retention = Duration::from_secs(2);
    let span = ferrybox::storage::span_for(retention);
    let mut running = RunningRelay::start(relay(
        &fx,
        RelayConfig {
            retention,
            cleanup_interval: Duration::from_millis(100),
            ..Fixture::relay_config_in(mode)
        },
    ));
    let (table, headers) = if mode == RelayMode::Log {
        ("ferrybox_messages", "headers, ")
    } else {
        ("ferrybox_outbox", "")
    };
    let write = format!(
        "INSERT INTO {table} (message_id, topic, message_key, message_type, entity_version, \
                              {headers}payload, occurred_at) \
         SELECT gen_random_uuid(), '{}', 'k' || (n % 50), 'load.Changed', n, {}'x', now() \
         FROM generate_series(1, 500) AS n",
        fx.topic,
        if headers.is_empty() { "" } else { "'{}', " }
    );
    let partitions =
        format!("SELECT count(*) AS n FROM pg_inherits WHERE inhparent = '{table}'::regclass");
    let oldest = format!(
        "SELECT coalesce(extract(epoch FROM now() - min(created_at)), 0)::bigint AS n FROM {table}"
    );
    // Retention, a range, the relay's cleanup tick (a second in log mode) and slack for a
    // loaded machine; a sent log that kept everything would be older than this well before
    // the end.
    let bound = i64::try_from((retention + span * 2 + Duration::from_secs(3)).as_secs()).unwrap();
    let run_for = Duration::from_secs(u64::try_from(bound).unwrap() * 2 + 4);
    let started = std::time::Instant::now();
    let (mut written, mut counts) = (0i64, Vec::new());
    while started.elapsed() < run_for {
        running.assert_running().await;
        let before = fx.progress().await;
        testing::execute(fx.db.url(), &write).await;
        written += 500;
        // (Published rows leave the polling table with retention: its relay is done once
        // none is left unpublished.)
        wait_until(
            TIMEOUT,
            "the relay publishes the rows just written",
            || async {
                if mode == RelayMode::Log {
                    fx.progress().await > before
                } else {
                    fx.count("SELECT count(*) AS n FROM ferrybox_outbox WHERE published_at IS NULL")
                        .await
                        == 0
                }
            },
        )
        .await;
        if started.elapsed() > Duration::from_secs(u64::try_from(bound).unwrap()) {
            let age = fx.count(&oldest).await;
            assert!(
                age <= bound,
                "the sent log holds a row {age} s old (retention {retention:?})"
            );
            counts.push(fx.count(&partitions).await);
        }
    }
    running.stop().await;
    let most = *counts
        .iter()
        .max()
        .expect("checked after the first seconds");
    assert!(
        written > 0 && counts.len() > 1,
        "{written} rows, {counts:?}"
    );
    // The ranges kept: those the retention and one range span, those made ahead, the DEFAULT.
    let kept = i64::try_from(((retention + span).as_secs() / span.as_secs()) + 1).unwrap()
        + ferrybox::storage::AHEAD
        + 2;
    assert!(
        most <= kept,
        "{most} partitions at most (about {kept} expected): {counts:?}"
    );
}

async fn a_standby_takes_over_when_the_active_relay_stops(mode: RelayMode) {
    let fx = Fixture::new(1).await.writing_for(mode);
    let config = RelayConfig {
        standby_interval: Duration::from_millis(50),
        ..Fixture::relay_config_in(mode)
    };
    let first = RunningRelay::start(relay(&fx, config.clone()));
    fx.change("x", 1).await;
    testing::read_topic(&fx.topic, 1, TIMEOUT).await;
    let second = RunningRelay::start(relay(&fx, config));
    // With the first relay gone, the standby takes over and publishes.
    first.stop().await;
    fx.change("x", 2).await;
    let records = testing::read_topic(&fx.topic, 2, TIMEOUT).await;
    second.stop().await;
    assert_eq!(versions_by_key(&records)["x"], vec![1, 2]);
}
