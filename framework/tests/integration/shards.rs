//! Relay shards: more than one instance publishes at once, each key keeps one ordered
//! writer, a dead instance's shards are taken over, and resharding is done online without
//! losing a message.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use diesel_async::{AsyncConnection, AsyncPgConnection};
use ferrybox::testing::{self, wait_until};
use ferrybox::{CancellationToken, Relay, RelayMode};

use crate::support::{Fixture, RunningRelay, TIMEOUT, log_relay};

async fn reshard(fx: &Fixture, shards: u32) -> ferrybox::outbox::ReshardReport {
    let mut conn = AsyncPgConnection::establish(fx.db.url()).await.unwrap();
    ferrybox::outbox::reshard(&mut conn, None, shards, TIMEOUT)
        .await
        .unwrap()
}

/// Each key's versions in arrival order, and how many times each message id arrived.
fn by_key(
    records: &[testing::ReadRecord],
) -> (BTreeMap<String, Vec<i64>>, BTreeMap<String, usize>) {
    let mut keys: BTreeMap<String, Vec<i64>> = BTreeMap::new();
    let mut ids: BTreeMap<String, usize> = BTreeMap::new();
    for r in records {
        keys.entry(r.headers["ce_subject"].clone())
            .or_default()
            .push(r.headers["ce_entityversion"].parse().unwrap());
        *ids.entry(r.headers["ce_id"].clone()).or_default() += 1;
    }
    (keys, ids)
}

/// Each key's first arrivals are in version order (a duplicate after a takeover may come
/// later; an earlier version after a later one never does).
fn assert_first_arrivals_in_order(keys: &BTreeMap<String, Vec<i64>>) {
    for (key, versions) in keys {
        let mut first_seen = Vec::new();
        for v in versions {
            if !first_seen.contains(v) {
                first_seen.push(*v);
            }
        }
        let mut sorted = first_seen.clone();
        sorted.sort_unstable();
        assert_eq!(first_seen, sorted, "key {key}");
    }
}

/// `writers` tasks, each changing `keys` keys of its own `versions` times; the message ids.
async fn write(
    fx: &Arc<Fixture>,
    prefix: &str,
    writers: usize,
    keys: usize,
    versions: std::ops::RangeInclusive<i64>,
) -> BTreeSet<String> {
    let tasks: Vec<_> = (0..writers)
        .map(|w| {
            let fx = fx.clone();
            let prefix = prefix.to_owned();
            let versions = versions.clone();
            tokio::spawn(async move {
                let mut ids = Vec::new();
                for version in versions {
                    for k in 0..keys {
                        ids.push(
                            fx.change(&format!("{prefix}-w{w}-k{k}"), version)
                                .await
                                .to_string(),
                        );
                    }
                }
                ids
            })
        })
        .collect();
    let mut ids = BTreeSet::new();
    for t in tasks {
        ids.extend(t.await.unwrap());
    }
    ids
}

/// Three shards, three relay instances, concurrent writers: the instances share the shards
/// out (each publishes), every message arrives exactly once and each key in commit order;
/// when one instance dies, the others take its shard over and nothing is lost.
#[tokio::test(flavor = "multi_thread")]
async fn three_shards_publish_at_once_in_key_order_and_a_dead_instances_shard_is_taken_over() {
    let fx = Arc::new(Fixture::new(3).await.writing_for(RelayMode::Log));
    let report = reshard(&fx, 3).await;
    assert_eq!((report.from, report.to), (1, 3));
    let relays: Vec<Relay> = (0..3).map(|_| log_relay(&fx)).collect();
    let published: Vec<_> = relays.iter().map(Relay::published).collect();
    let mut running: Vec<RunningRelay> = relays.into_iter().map(RunningRelay::start).collect();
    // Until every instance has published something: they have shared the shards out.
    let mut written = BTreeSet::new();
    let deadline = tokio::time::Instant::now() + TIMEOUT;
    for round in 0.. {
        written.extend(write(&fx, &format!("warm{round}"), 1, 8, 1..=1).await);
        if published.iter().all(|p| *p.borrow() > 0) {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "every instance publishes: {:?}",
            published.iter().map(|p| *p.borrow()).collect::<Vec<_>>()
        );
    }
    written.extend(write(&fx, "main", 4, 8, 1..=15).await);
    let records = testing::read_ids(&testing::kafka(), &fx.topic, &written, TIMEOUT).await;
    let (keys, ids) = by_key(&records);
    let twice: Vec<_> = ids.iter().filter(|(_, n)| **n > 1).collect();
    assert!(twice.is_empty(), "published twice: {twice:?}");
    for w in 0..4 {
        for k in 0..8 {
            let key = format!("main-w{w}-k{k}");
            assert_eq!(keys[&key], (1..=15).collect::<Vec<_>>(), "key {key}");
        }
    }
    // One instance dies; the two others take its shard over.
    running.remove(1).kill();
    written.extend(write(&fx, "after", 2, 8, 1..=10).await);
    let records = testing::read_ids(&testing::kafka(), &fx.topic, &written, TIMEOUT).await;
    let (keys, _) = by_key(&records);
    assert_first_arrivals_in_order(&keys);
    for relay in running {
        relay.stop().await;
    }
    assert_eq!(
        fx.count(
            "SELECT count(*) AS n FROM pg_replication_slots \
             WHERE database = current_database() AND slot_name LIKE '%\\_of\\_3'"
        )
        .await,
        3,
        "a slot per shard"
    );
}

/// Resharding from one shard to three while a relay runs and writers write: the relay lets
/// go, the new shards' slots publish from the table what the old slot may not have, and
/// nothing is lost or reordered; the old slot is gone.
#[tokio::test(flavor = "multi_thread")]
async fn resharding_online_loses_nothing_and_keeps_each_key_in_order() {
    let fx = Arc::new(Fixture::new(3).await.writing_for(RelayMode::Log));
    let running = RunningRelay::start(log_relay(&fx));
    let stop = CancellationToken::new();
    let writer = tokio::spawn({
        let (fx, stop) = (fx.clone(), stop.clone());
        async move {
            let mut ids = BTreeSet::new();
            let mut version = 0;
            while !stop.is_cancelled() {
                version += 1;
                ids.extend(write(&fx, "live", 2, 4, version..=version).await);
            }
            ids
        }
    });
    wait_until(TIMEOUT, "the relay publishes", || async {
        fx.count("SELECT count(*) AS n FROM ferrybox_messages")
            .await
            > 40
    })
    .await;
    let report = reshard(&fx, 3).await;
    assert_eq!((report.from, report.to), (1, 3));
    assert_eq!(report.dropped_slots.len(), 1);
    let before = fx
        .count("SELECT count(*) AS n FROM ferrybox_messages")
        .await;
    wait_until(TIMEOUT, "writes go on after the reshard", || async {
        fx.count("SELECT count(*) AS n FROM ferrybox_messages")
            .await
            > before + 40
    })
    .await;
    stop.cancel();
    let written = writer.await.unwrap();
    let records = testing::read_ids(&testing::kafka(), &fx.topic, &written, TIMEOUT).await;
    running.stop().await;
    let (keys, _) = by_key(&records);
    assert_first_arrivals_in_order(&keys);
    assert_eq!(
        fx.count(
            "SELECT count(*) AS n FROM pg_replication_slots WHERE database = current_database()"
        )
        .await,
        3,
        "the old slot is dropped, the three new ones made"
    );
    let status = ferrybox::outbox::sent_log::status(
        &mut AsyncPgConnection::establish(fx.db.url()).await.unwrap(),
    )
    .await
    .unwrap();
    assert_eq!(status.relay_shards, 3);
}

/// A reshard that died after recording its layout, before dropping the old layout's slots and
/// publications, leaves them behind (a slot nobody streams holds WAL back for ever). Running
/// the same reshard again, which has nothing to move, drops them; a slot of another layout
/// that a sender still streams is left for later.
#[tokio::test(flavor = "multi_thread")]
async fn running_a_reshard_again_drops_what_an_unfinished_one_left_behind() {
    let fx = Fixture::new(3).await.writing_for(RelayMode::Log);
    let report = reshard(&fx, 3).await;
    assert_eq!((report.from, report.to), (1, 3));
    // The default slot name: `ferrybox_` and the database's name (`fbtest_<hex>` here).
    let database = fx.db.url().rsplit('/').next().unwrap();
    let base = format!("ferrybox_{database}");
    // What a reshard from two shards that died before its end leaves: a slot and a
    // publication of the old layout; also the one-shard slot.
    let leftovers = [
        format!("{base}_0_of_2"),
        format!("{base}_1_of_2"),
        base.clone(),
    ];
    let mut conn = AsyncPgConnection::establish(fx.db.url()).await.unwrap();
    for slot in &leftovers {
        diesel_async::RunQueryDsl::execute(
            diesel::sql_query(format!(
                "SELECT 1 FROM pg_create_logical_replication_slot('{slot}', 'pgoutput')"
            )),
            &mut conn,
        )
        .await
        .unwrap();
    }
    diesel_async::SimpleAsyncConnection::batch_execute(
        &mut conn,
        "CREATE PUBLICATION ferrybox_messages_0_of_2 FOR TABLE ferrybox_messages",
    )
    .await
    .unwrap();
    let report = reshard(&fx, 3).await;
    assert_eq!((report.from, report.to), (3, 3));
    let mut expected = leftovers.to_vec();
    expected.sort();
    assert_eq!(report.dropped_slots, expected);
    let left = fx
        .count(&format!(
            "SELECT count(*) AS n FROM pg_replication_slots WHERE slot_name LIKE '{base}%'"
        ))
        .await;
    assert_eq!(
        left, 0,
        "the leftover slots are gone (the layout's own are made by its relays)"
    );
    assert_eq!(
        fx.count(
            "SELECT count(*) AS n FROM pg_publication WHERE pubname = 'ferrybox_messages_0_of_2'"
        )
        .await,
        0
    );
    assert_eq!(
        fx.count(
            "SELECT count(*) AS n FROM pg_publication WHERE pubname LIKE 'ferrybox_messages_%_of_3'"
        )
        .await,
        3,
        "the current layout's publications stay"
    );
    // Nothing more to drop the next time.
    assert!(reshard(&fx, 3).await.dropped_slots.is_empty());
}
