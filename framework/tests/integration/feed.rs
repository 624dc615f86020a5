//! The pulled event feed against real PostgreSQL: a feed-only relay gives positions, a
//! `FeedServer` serves them over HTTP, a `FeedConsumer` applies them through the inbox.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use diesel::QueryableByName;
use diesel::sql_types::{BigInt, Text};
use diesel_async::{AsyncConnection, RunQueryDsl};
use ferrybox::alert::{AlertConfig, Alerter};
use ferrybox::feed::{FeedConfig, FeedServerConfig, OnUndecodable};
use ferrybox::testing::{self, wait_until};
use ferrybox::{CancellationToken, FeedConsumer, FeedServer, Outbox, Relay, RelayMode};
use rand::Rng;

use crate::inbox::{Recorder, inbox_config};
use crate::support::{Fixture, RunningRelay, TIMEOUT, ThingChanged};

/// Serves `fx`'s outbox as a feed on a free port; returns the `events` URL.
async fn serve_feed(fx: &Fixture, stop: &CancellationToken) -> String {
    serve_feed_with(fx, FeedServerConfig::default(), stop).await
}

async fn serve_feed_with(
    fx: &Fixture,
    config: FeedServerConfig,
    stop: &CancellationToken,
) -> String {
    let feed = FeedServer::start(fx.pool.clone(), &fx.db.config(), config, stop).unwrap();
    format!("{}/events", testing::serve(feed.router(), stop).await)
}

/// Records every unpublished row with a feed-only relay; returns how many it recorded.
async fn record_feed(fx: &Fixture) -> usize {
    let relay = Relay::feed_only(fx.db.config(), Fixture::relay_config()).unwrap();
    let mut conn = diesel_async::AsyncPgConnection::establish(fx.db.url())
        .await
        .unwrap();
    relay.publish_pending(&mut conn).await.unwrap().published
}

fn feed_config(url: &str, on_undecodable: OnUndecodable) -> FeedConfig {
    FeedConfig {
        url: url.to_owned(),
        name: "things".into(),
        limit: 50,
        wait: Duration::from_millis(500),
        on_undecodable,
        backoff: ferrybox::config::Backoff {
            initial: Duration::from_millis(20),
            max: Duration::from_millis(200),
        },
        token: None,
    }
}

/// The tests' inbox settings for a feed consumer.
fn feed_inbox(fx: &Fixture) -> ferrybox::InboxConfig {
    let mut inbox = inbox_config(fx, "feed-consumer");
    inbox.max_attempts = 3;
    inbox
}

fn consumer(
    fx: &Fixture,
    url: &str,
    on_undecodable: OnUndecodable,
    alerter: Alerter,
) -> FeedConsumer<Recorder> {
    consumer_with(fx, feed_inbox(fx), url, on_undecodable, alerter)
}

fn consumer_with(
    fx: &Fixture,
    inbox: ferrybox::InboxConfig,
    url: &str,
    on_undecodable: OnUndecodable,
    alerter: Alerter,
) -> FeedConsumer<Recorder> {
    FeedConsumer::new(
        fx.pool.clone(),
        fx.codec.clone(),
        Recorder::default(),
        inbox,
        feed_config(url, on_undecodable),
        alerter,
    )
    .unwrap()
}

#[derive(QueryableByName)]
struct Applied {
    #[diesel(sql_type = Text)]
    thing_id: String,
    #[diesel(sql_type = BigInt)]
    version: i64,
}

async fn applied(fx: &Fixture) -> Vec<(String, i64)> {
    let mut conn = diesel_async::AsyncPgConnection::establish(fx.db.url())
        .await
        .unwrap();
    diesel::sql_query("SELECT thing_id, version FROM applied ORDER BY seq")
        .load::<Applied>(&mut conn)
        .await
        .unwrap()
        .into_iter()
        .map(|a| (a.thing_id, a.version))
        .collect()
}

async fn stored_position(fx: &Fixture) -> i64 {
    fx.count("SELECT coalesce(max(position), 0) AS n FROM ferrybox_feed_positions")
        .await
}

/// One change of `thing`: the next version under the thing's row lock, enqueued, then a random
/// pause before the commit, so transactions commit out of the order they drew their ids.
async fn slow_change(fx: &Fixture, thing: String) {
    let mut conn = ferrybox::db::connection(&fx.pool).await.unwrap();
    let (codec, topic, outbox) = (fx.codec.clone(), fx.topic.clone(), fx.outbox.clone());
    conn.transaction::<_, ferrybox::Error, _>(async |tx| {
        #[derive(QueryableByName)]
        struct Version {
            #[diesel(sql_type = BigInt)]
            version: i64,
        }
        let Version { version } = diesel::sql_query(
            "INSERT INTO versions (id, version) VALUES ($1, 1) \
             ON CONFLICT (id) DO UPDATE SET version = versions.version + 1 RETURNING version",
        )
        .bind::<Text, _>(&thing)
        .get_result(tx)
        .await?;
        let event = ThingChanged {
            thing_id: thing.clone(),
            version,
            label: format!("v{version}"),
        };
        let message = codec.message(&topic, &event).await?;
        outbox.enqueue(tx, &message).await?;
        let pause = rand::rng().random_range(0..15);
        tokio::time::sleep(Duration::from_millis(pause)).await;
        Ok(())
    })
    .await
    .unwrap();
}

in_every_mode!(
    concurrent_transactions_committing_out_of_id_order_reach_the_feed_consumer_once_in_key_order,
);

async fn concurrent_transactions_committing_out_of_id_order_reach_the_feed_consumer_once_in_key_order(
    mode: RelayMode,
) {
    const WRITERS: usize = 8;
    const CHANGES: usize = 60;
    let fx = Fixture::new(1).await;
    testing::execute(
        fx.db.url(),
        "CREATE TABLE versions (id TEXT PRIMARY KEY, version BIGINT NOT NULL)",
    )
    .await;
    let stop = CancellationToken::new();
    let url = serve_feed(&fx, &stop).await;
    let relay = RunningRelay::start(
        Relay::feed_only(fx.db.config(), Fixture::relay_config_in(mode)).unwrap(),
    );
    let consumer = consumer(&fx, &url, OnUndecodable::Halt, Alerter::log_only());
    let consuming = tokio::spawn(consumer.run(stop.child_token()));

    let fx = Arc::new(fx);
    let writers: Vec<_> = (0..WRITERS)
        .map(|w| {
            let fx = Arc::clone(&fx);
            tokio::spawn(async move {
                for i in 0..CHANGES {
                    // Eight writers share six keys, so keys see overlapping transactions too.
                    slow_change(&fx, format!("thing-{}", (w + i) % 6)).await;
                }
            })
        })
        .collect();
    for w in writers {
        w.await.unwrap();
    }
    let total = i64::try_from(WRITERS * CHANGES).unwrap();
    // The commits really did come out of id order: some row got its position after a row
    // with a larger id.
    wait_until(TIMEOUT, "every message applied", || async {
        fx.count("SELECT count(*) AS n FROM applied").await == total
    })
    .await;
    let out_of_order = fx
        .count(
            "SELECT count(*) AS n FROM ferrybox_outbox a JOIN ferrybox_outbox b \
             ON a.id < b.id AND a.feed_position > b.feed_position",
        )
        .await;
    assert!(out_of_order > 0, "the test never committed out of id order");
    assert_eq!(
        fx.count("SELECT count(DISTINCT message_id) AS n FROM applied")
            .await,
        total,
        "each message once"
    );
    let mut by_key: BTreeMap<String, Vec<i64>> = BTreeMap::new();
    for (thing, version) in applied(&fx).await {
        by_key.entry(thing).or_default().push(version);
    }
    for (thing, versions) in &by_key {
        let expected: Vec<i64> = (1..=i64::try_from(versions.len()).unwrap()).collect();
        assert_eq!(versions, &expected, "{thing}: every version, in order");
    }
    assert_eq!(stored_position(&fx).await, total, "position at the head");
    assert_eq!(
        fx.count("SELECT count(DISTINCT feed_position) AS n FROM ferrybox_outbox WHERE feed_position BETWEEN 1 AND (SELECT last FROM ferrybox_feed_sequence)").await,
        total,
        "positions 1..=total with no gap"
    );

    stop.cancel();
    consuming.await.unwrap().unwrap();
    relay.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_feed_only_relay_reading_the_log_serves_messages_written_to_either_outbox_table() {
    let mut fx = Fixture::new(1).await;
    let stop = CancellationToken::new();
    let url = serve_feed(&fx, &stop).await;
    let relay = RunningRelay::start(
        Relay::feed_only(fx.db.config(), Fixture::relay_config_in(RelayMode::Log)).unwrap(),
    );
    let consuming = tokio::spawn(
        consumer(&fx, &url, OnUndecodable::Halt, Alerter::log_only()).run(stop.child_token()),
    );
    fx.change("k1", 1).await;
    // A service written for a broker's log relay writes the append-only table, which the feed
    // cannot serve from: that message is refused (the reason is logged), copied into the
    // polling table, and served from there.
    fx.outbox = Outbox::new("integration-test").for_mode(RelayMode::Log);
    let appended = fx.change("k2", 1).await;
    fx.outbox = Outbox::new("integration-test");
    fx.change("k3", 1).await;
    wait_until(TIMEOUT, "all three applied", || async {
        fx.count("SELECT count(*) AS n FROM applied").await == 3
    })
    .await;
    assert_eq!(
        fx.count(&format!(
            "SELECT count(*) AS n FROM ferrybox_outbox WHERE message_id = '{}' \
             AND feed_position IS NOT NULL AND attempts > 0",
            appended.0
        ))
        .await,
        1,
        "the appended message was copied into the polling table as refused, and served from there"
    );
    assert_eq!(
        fx.count("SELECT last AS n FROM ferrybox_feed_sequence")
            .await,
        3,
        "three positions, none twice or skipped"
    );
    stop.cancel();
    consuming.await.unwrap().unwrap();
    relay.stop().await;
}

/// A feed consumer with a retention of zero deletes the ids it applied once its stored
/// position is past them (it is, as soon as their transaction commits).
#[tokio::test(flavor = "multi_thread")]
async fn a_feed_consumer_deletes_applied_ids_its_position_is_past() {
    let fx = Fixture::new(1).await;
    for v in 1..=3 {
        fx.change("k1", v).await;
    }
    assert_eq!(record_feed(&fx).await, 3);
    let stop = CancellationToken::new();
    let url = serve_feed(&fx, &stop).await;
    let inbox = ferrybox::InboxConfig {
        retention: Duration::ZERO,
        cleanup_interval: Duration::from_millis(100),
        ..feed_inbox(&fx)
    };
    let consumer = consumer_with(&fx, inbox, &url, OnUndecodable::Halt, Alerter::log_only());
    let consuming = tokio::spawn(consumer.run(stop.child_token()));
    wait_until(TIMEOUT, "three applied and their ids deleted", || async {
        fx.count("SELECT count(*) AS n FROM applied").await == 3
            && fx.count("SELECT count(*) AS n FROM ferrybox_inbox").await == 0
    })
    .await;
    assert_eq!(stored_position(&fx).await, 3);
    stop.cancel();
    consuming.await.unwrap().unwrap();
}

/// Enqueues k1 v1, k2 v1 (its payload then corrupted), k1 v2, k2 v2, k3 v1 and lets a
/// feed-only relay give them positions 1 to 5.
async fn feed_with_a_poisoned_message(fx: &Fixture) {
    fx.change("k1", 1).await;
    let poisoned = fx.change("k2", 1).await;
    fx.change("k1", 2).await;
    fx.change("k2", 2).await;
    fx.change("k3", 1).await;
    // Not the Confluent wire format (its first byte must be 0).
    testing::execute(
        fx.db.url(),
        &format!(
            "UPDATE ferrybox_outbox SET payload = '\\x01deadbeef'::bytea WHERE message_id = '{}'",
            poisoned.0
        ),
    )
    .await;
    assert_eq!(record_feed(fx).await, 5);
}

#[tokio::test(flavor = "multi_thread")]
async fn undecodable_data_halts_the_feed_consumer_and_raises_an_alert_by_default() {
    let fx = Fixture::new(1).await;
    feed_with_a_poisoned_message(&fx).await;
    let stop = CancellationToken::new();
    let url = serve_feed(&fx, &stop).await;
    let (webhook, alerts) = testing::alert_sink(&stop).await;
    let alerter = Alerter::new(&AlertConfig {
        webhook_url: Some(webhook.into()),
    })
    .unwrap();

    let halted = tokio::time::timeout(
        TIMEOUT,
        consumer(&fx, &url, OnUndecodable::Halt, alerter).run(stop.child_token()),
    )
    .await
    .expect("the consumer halts by itself");
    match halted {
        Err(ferrybox::Error::FeedHalted { position, reason }) => {
            assert_eq!(position, 1, "halted right after the last good message");
            assert!(reason.contains("position 2"), "{reason}");
        }
        other => panic!("expected a halt, got {other:?}"),
    }
    assert_eq!(applied(&fx).await, [("k1".to_owned(), 1)]);
    assert_eq!(stored_position(&fx).await, 1);
    let alerts = alerts.lock().unwrap().clone();
    assert_eq!(alerts.len(), 1, "{alerts:?}");
    assert_eq!(alerts[0].kind, "feed_halted");
    assert_eq!(alerts[0].details["position"], 1);
    assert_eq!(
        fx.count("SELECT count(*) AS n FROM ferrybox_dead_letters")
            .await,
        0,
        "halting dead-letters nothing"
    );
    stop.cancel();
}

#[tokio::test(flavor = "multi_thread")]
async fn undecodable_data_is_dead_lettered_and_the_feed_goes_on_when_configured() {
    let fx = Fixture::new(1).await;
    feed_with_a_poisoned_message(&fx).await;
    let stop = CancellationToken::new();
    let url = serve_feed(&fx, &stop).await;
    let running = tokio::spawn(
        consumer(&fx, &url, OnUndecodable::DeadLetter, Alerter::log_only()).run(stop.child_token()),
    );

    wait_until(TIMEOUT, "the feed consumed to its head", || async {
        stored_position(&fx).await == 5
    })
    .await;
    assert_eq!(
        applied(&fx).await,
        [
            ("k1".to_owned(), 1),
            ("k1".to_owned(), 2),
            ("k3".to_owned(), 1)
        ],
        "other keys flow; k2 v2 waits behind k2 v1"
    );
    let letters = fx
        .count(
            "SELECT count(*) AS n FROM ferrybox_dead_letters \
             WHERE (status, message_key, kafka_offset, kafka_partition) IN (('dead', 'k2', 2, -1), ('parked', 'k2', 4, -1))",
        )
        .await;
    assert_eq!(
        letters, 2,
        "k2 v1 dead-lettered at position 2, k2 v2 parked"
    );
    stop.cancel();
    running.await.unwrap().unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn the_events_endpoint_refuses_bad_positions_with_clear_errors() {
    let fx = Fixture::new(1).await;
    fx.change("k1", 1).await;
    fx.change("k1", 2).await;
    record_feed(&fx).await;
    let stop = CancellationToken::new();
    let url = serve_feed(&fx, &stop).await;
    let http = reqwest::Client::new();
    let get = |query: &'static str| {
        let (http, url) = (http.clone(), url.clone());
        async move {
            let r = http.get(format!("{url}?{query}")).send().await.unwrap();
            let status = r.status().as_u16();
            (status, r.json::<serde_json::Value>().await.unwrap())
        }
    };

    let (status, page) = get("after=0&limit=1").await;
    assert_eq!(status, 200);
    assert_eq!(page["events"][0]["position"], 1);
    assert_eq!(page["next"], 1);
    assert_eq!(page["head"], 2);
    let (status, page) = get("after=2&wait_ms=50").await;
    assert_eq!((status, page["events"].as_array().unwrap().len()), (200, 0));
    let (status, error) = get("after=9").await;
    assert_eq!(
        (status, error["error"]["code"].as_str()),
        (409, Some("position_ahead"))
    );
    let (status, error) = get("after=-1").await;
    assert_eq!(
        (status, error["error"]["code"].as_str()),
        (422, Some("invalid_position"))
    );
    let (status, error) = get("limit=0").await;
    assert_eq!(
        (status, error["error"]["code"].as_str()),
        (422, Some("invalid_limit"))
    );
    let (status, error) = get("after=abc").await;
    assert_eq!(
        (status, error["error"]["code"].as_str()),
        (422, Some("invalid_query"))
    );
    // Retention removed position 1: a consumer still at 0 must not silently skip it.
    testing::execute(
        fx.db.url(),
        "DELETE FROM ferrybox_outbox WHERE feed_position = 1",
    )
    .await;
    let (status, error) = get("after=0").await;
    assert_eq!(
        (status, error["error"]["code"].as_str()),
        (410, Some("position_expired"))
    );
    stop.cancel();
}

#[tokio::test(flavor = "multi_thread")]
async fn a_row_sent_again_keeps_its_feed_position_and_positions_stay_gap_free() {
    let fx = Fixture::new(1).await;
    fx.change("k1", 1).await;
    fx.change("k2", 1).await;
    record_feed(&fx).await;
    // As if the relay died after sending row 1 again but before recording it.
    testing::execute(
        fx.db.url(),
        "UPDATE ferrybox_outbox SET published_at = NULL WHERE feed_position = 1",
    )
    .await;
    fx.change("k3", 1).await;
    assert_eq!(
        record_feed(&fx).await,
        2,
        "the unmarked row and the new one"
    );
    assert_eq!(
        fx.count(
            "SELECT count(*) AS n FROM ferrybox_outbox \
             WHERE published_at IS NOT NULL AND feed_position IS NOT NULL"
        )
        .await,
        3,
        "every row marked, none left to send again"
    );
    assert_eq!(
        fx.count("SELECT feed_position AS n FROM ferrybox_outbox ORDER BY id LIMIT 1")
            .await,
        1,
        "the first row kept its position"
    );
    assert_eq!(
        fx.count("SELECT max(feed_position) AS n FROM ferrybox_outbox")
            .await,
        3,
        "the new row got position 3"
    );
    assert_eq!(
        fx.count("SELECT last AS n FROM ferrybox_feed_sequence")
            .await,
        3,
        "and the sequence stands at 3: no position was handed out twice or skipped"
    );
    assert_eq!(record_feed(&fx).await, 0, "nothing is sent a third time");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_waiting_request_is_answered_as_soon_as_new_events_are_recorded() {
    let fx = Fixture::new(1).await;
    let stop = CancellationToken::new();
    // Polling only every hour: within the test's time, only the relay's notification can
    // answer the waiting request.
    let hour = std::time::Duration::from_secs(3600);
    let config = FeedServerConfig {
        poll_interval: hour,
        max_wait: hour,
        ..FeedServerConfig::default()
    };
    let url = serve_feed_with(&fx, config, &stop).await;
    let waiting = tokio::spawn(async move {
        reqwest::get(format!("{url}?after=0&wait_ms=3600000"))
            .await
            .unwrap()
            .json::<serde_json::Value>()
            .await
            .unwrap()
    });
    fx.change("k1", 1).await;
    let relay =
        RunningRelay::start(Relay::feed_only(fx.db.config(), Fixture::relay_config()).unwrap());
    let page = tokio::time::timeout(TIMEOUT, waiting)
        .await
        .expect("the waiting request is answered")
        .unwrap();
    assert_eq!(page["events"][0]["position"], 1, "{page}");
    assert_eq!(page["events"][0]["key"], "k1");
    relay.stop().await;
    stop.cancel();
}

#[tokio::test(flavor = "multi_thread")]
async fn the_feed_servers_listener_is_tracked_and_stops_with_its_shutdown() {
    let fx = Fixture::new(1).await;
    let stop = CancellationToken::new();
    let feed = FeedServer::start(
        fx.pool.clone(),
        &fx.db.config(),
        FeedServerConfig::default(),
        &stop,
    )
    .unwrap();
    assert!(
        tokio::time::timeout(Duration::from_millis(300), feed.stopped())
            .await
            .is_err(),
        "the listener runs until shutdown"
    );
    stop.cancel();
    tokio::time::timeout(TIMEOUT, feed.stopped())
        .await
        .expect("the listener stops and is awaited");
}
