use std::collections::BTreeMap;

use diesel::sql_types::{BigInt, Text};
use diesel_async::{AsyncConnection, AsyncPgConnection, RunQueryDsl};
use ferrybox::inbox::{DeadLetterFilter, DeadLetters, dlq_headers};
use ferrybox::testing::{self, wait_until};

use crate::inbox::{Recorder, inbox_config, publish_all, start_reading};
use crate::support::{Fixture, TIMEOUT};

const KEYS: i64 = 30;
const VERSIONS: i64 = 10;

#[derive(diesel::QueryableByName)]
struct Applied {
    #[diesel(sql_type = Text)]
    thing_id: String,
    #[diesel(sql_type = BigInt)]
    version: i64,
}

/// Versions applied per key, in the order they were applied.
async fn applied_in_order(fx: &Fixture) -> BTreeMap<String, Vec<i64>> {
    let mut conn = AsyncPgConnection::establish(fx.db.url()).await.unwrap();
    let rows: Vec<Applied> =
        diesel::sql_query("SELECT thing_id, version FROM applied ORDER BY seq")
            .load(&mut conn)
            .await
            .unwrap();
    let mut by_key: BTreeMap<String, Vec<i64>> = BTreeMap::new();
    for r in rows {
        by_key.entry(r.thing_id).or_default().push(r.version);
    }
    by_key
}

/// Reads `n` records from the dead-letter topic: their origin headers.
async fn dead_letter_topic(topic: &str, n: usize) -> Vec<BTreeMap<String, String>> {
    testing::read_topic(topic, n, TIMEOUT)
        .await
        .into_iter()
        .map(|r| r.headers)
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn poison_is_dead_lettered_once_its_key_is_parked_and_redrive_releases_it_in_order() {
    let fx = Fixture::new(3).await;
    for version in 1..=VERSIONS {
        for key in 0..KEYS {
            fx.change(&format!("k{key}"), version).await;
        }
    }
    // One message in a hundred is poison: random bytes, an unknown schema id, and one the
    // handler rejects.
    let mut conn = AsyncPgConnection::establish(fx.db.url()).await.unwrap();
    diesel::sql_query("UPDATE ferrybox_outbox SET payload = '\\xdeadbeef'::bytea WHERE message_key = 'k7' AND entity_version = 3")
        .execute(&mut conn)
        .await
        .unwrap();
    diesel::sql_query("UPDATE ferrybox_outbox SET payload = '\\x007fffff000261'::bytea WHERE message_key = 'k11' AND entity_version = 1")
        .execute(&mut conn)
        .await
        .unwrap();
    publish_all(&fx).await;

    let dlq = testing::create_topic(1).await;
    let group = testing::unique("group");
    let mut config = inbox_config(&fx, &group);
    config.dead_letter_topic = Some(dlq.clone());
    let poisoned = Recorder {
        poison: Some(("k3", 2)),
        ..Recorder::default()
    };
    let running = start_reading(&fx, config.clone(), poisoned, None);
    let total = u64::try_from(KEYS * VERSIONS).unwrap();
    wait_until(
        TIMEOUT,
        "every message applied, parked or dead-lettered",
        || async {
            let s = running.stats.snapshot();
            s.applied + s.parked + s.dead_lettered == total
        },
    )
    .await;
    let stats = running.stats.snapshot();
    assert_eq!(
        (stats.dead_lettered, stats.parked, stats.applied),
        (3, 8 + 7 + 9, total - 3 - 24)
    );

    // Every other key has all its versions, in order; the poisoned keys stop before the poison.
    let applied = applied_in_order(&fx).await;
    for key in 0..KEYS {
        let name = format!("k{key}");
        let expected: Vec<i64> = match key {
            3 => vec![1],
            7 => vec![1, 2],
            11 => vec![],
            _ => (1..=VERSIONS).collect(),
        };
        assert_eq!(
            applied.get(&name).cloned().unwrap_or_default(),
            expected,
            "{name}"
        );
    }

    // Each poison is in the store once, with its origin and reason, and on the topic once.
    let letters = DeadLetters::new(fx.pool.clone(), group.clone());
    let dead = letters.list(&DeadLetterFilter::All).await.unwrap();
    let kinds: BTreeMap<String, String> = dead
        .iter()
        .filter(|d| d.status == "dead")
        .map(|d| (d.message_key.clone().unwrap(), d.error_kind.clone()))
        .collect();
    assert_eq!(
        kinds,
        BTreeMap::from([
            ("k11".into(), "decode".into()),
            ("k3".into(), "handler".into()),
            ("k7".into(), "decode".into())
        ])
    );
    let counts = letters.counts().await.unwrap();
    assert_eq!((counts.dead, counts.parked), (3, 24));
    let on_topic = dead_letter_topic(&dlq, 3).await;
    for letter in dead.iter().filter(|d| d.status == "dead") {
        assert!(letter.published_at.is_some());
        let matching = on_topic.iter().filter(|h| {
            h.get(dlq_headers::ORIGIN_PARTITION) == Some(&letter.kafka_partition.to_string())
                && h.get(dlq_headers::ORIGIN_OFFSET) == Some(&letter.kafka_offset.to_string())
                && h.get(dlq_headers::ORIGIN_TOPIC) == Some(&fx.topic)
                && h.get(dlq_headers::ERROR_KIND) == Some(&letter.error_kind)
        });
        assert_eq!(
            matching.count(),
            1,
            "dead letter {} on the topic once",
            letter.id
        );
    }

    // After the fix, a redrive (while the consumer keeps running) applies k3 in order; the
    // undecodable ones fail again and stay dead with their attempts raised.
    let report = letters
        .redrive(
            &DeadLetterFilter::All,
            fx.codec.clone(),
            Recorder::default(),
            None,
            std::time::Duration::from_secs(5),
        )
        .await
        .unwrap();
    assert_eq!(
        (
            report.applied,
            report.duplicates,
            report.failed,
            report.still_parked
        ),
        (9, 0, 2, 16)
    );
    assert_eq!(
        applied_in_order(&fx).await["k3"],
        (1..=VERSIONS).collect::<Vec<_>>()
    );
    let k7 = letters
        .list(&DeadLetterFilter::Key("k7".into()))
        .await
        .unwrap();
    assert_eq!((k7[0].status.as_str(), k7[0].attempts), ("dead", 2));
    assert!(k7[1..].iter().all(|d| d.status == "parked"));

    // New messages: k3 flows again, k7 is still parked.
    fx.change("k3", VERSIONS + 1).await;
    fx.change("k7", VERSIONS + 1).await;
    publish_all(&fx).await;
    wait_until(TIMEOUT, "new messages handled", || async {
        let s = running.stats.snapshot();
        s.applied == stats.applied + 1 && s.parked == stats.parked + 1
    })
    .await;
    assert_eq!(
        applied_in_order(&fx).await["k3"].last(),
        Some(&(VERSIONS + 1))
    );
    assert_eq!(letters.counts().await.unwrap().parked, 8 + 9);
    running.stop().await;
    assert_eq!(
        letters.get(k7[0].id).await.unwrap().map(|d| d.attempts),
        Some(2)
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_rebalance_mid_stream_loses_nothing_and_applies_nothing_twice() {
    let fx = Fixture::new(3).await;
    let group = testing::unique("group");
    let config = inbox_config(&fx, &group);
    let mut version = 0;
    let publish_next = async |version: &mut i64| {
        *version += 1;
        for key in 0..KEYS {
            fx.change(&format!("k{key}"), *version).await;
        }
        publish_all(&fx).await;
    };
    let applied =
        async || u64::try_from(fx.count("SELECT count(*) AS n FROM applied").await).unwrap();
    let keys = u64::try_from(KEYS).unwrap();

    // A consumes alone. Two members of one group in one process: dynamic membership (one
    // static id would have B fence A instead of sharing partitions with it).
    let mut config = config;
    config.static_membership = false;
    let a = start_reading(&fx, config.clone(), Recorder::default(), None);
    publish_next(&mut version).await;
    wait_until(TIMEOUT, "A applied the first round", || async {
        applied().await == keys
    })
    .await;

    // B joins: a rebalance. Rounds keep coming until B has been given partitions and applied.
    let b = start_reading(&fx, config.clone(), Recorder::default(), None);
    while b.stats.snapshot().applied == 0 {
        assert!(version < VERSIONS - 2, "B never got a partition");
        publish_next(&mut version).await;
        let expected = keys * u64::try_from(version).unwrap();
        wait_until(TIMEOUT, "the round applied", || async {
            applied().await == expected
        })
        .await;
    }

    // A leaves: another rebalance; B takes everything that follows.
    let a_counters = std::sync::Arc::clone(&a.stats);
    a.stop().await;
    while version < VERSIONS {
        publish_next(&mut version).await;
    }
    let total = keys * u64::try_from(VERSIONS).unwrap();
    wait_until(TIMEOUT, "everything applied", || async {
        applied().await == total
    })
    .await;
    let b_counters = std::sync::Arc::clone(&b.stats);
    b.stop().await;

    let (a_stats, b_stats) = (a_counters.snapshot(), b_counters.snapshot());
    assert!(a_stats.applied > 0 && b_stats.applied > 0);
    assert_eq!(
        a_stats.applied + b_stats.applied,
        total,
        "each message applied by exactly one of them"
    );
    assert_eq!(
        fx.count("SELECT count(*) AS n FROM ferrybox_dead_letters")
            .await,
        0
    );
    for (key, versions) in applied_in_order(&fx).await {
        assert_eq!(versions, (1..=VERSIONS).collect::<Vec<_>>(), "{key}");
    }
}
