use std::collections::BTreeMap;
use std::time::Duration;

use diesel::sql_types::Text;
use diesel_async::{AsyncConnection, AsyncPgConnection, RunQueryDsl};
use ferrybox::{KafkaConfig, Relay};

use crate::support::{Fixture, RunningRelay, TIMEOUT, read_records};

#[tokio::test(flavor = "multi_thread")]
async fn business_row_and_message_commit_or_roll_back_together() {
    let fx = Fixture::new(1).await;
    fx.change("committed", 1).await;

    // A transaction that fails after enqueueing leaves neither row behind.
    let message = fx.message("rolled-back", 1).await;
    let mut conn = AsyncPgConnection::establish(fx.db.url()).await.unwrap();
    let outbox = fx.outbox.clone();
    let result = conn
        .transaction::<(), ferrybox::Error, _>(async |tx| {
            diesel::sql_query("INSERT INTO things (id, label) VALUES ('rolled-back', 'x')")
                .execute(tx)
                .await?;
            outbox.enqueue(tx, &message).await?;
            Err(ferrybox::Error::Config("business rule failed".into()))
        })
        .await;
    assert!(result.is_err());

    assert_eq!(fx.count("SELECT count(*) AS n FROM things").await, 1);
    assert_eq!(
        fx.count("SELECT count(*) AS n FROM ferrybox_outbox").await,
        1
    );
    assert_eq!(
        fx.count("SELECT count(*) AS n FROM ferrybox_outbox WHERE message_key = 'committed'")
            .await,
        1
    );
}

/// `enqueue` runs in every business transaction: its statement is prepared once per
/// connection, not parsed and planned each time (as a plain `sql_query` would be).
#[tokio::test(flavor = "multi_thread")]
async fn enqueue_prepares_its_statement_once_per_connection() {
    #[derive(diesel::QueryableByName)]
    struct Prepared {
        #[diesel(sql_type = diesel::sql_types::BigInt)]
        n: i64,
    }
    let fx = Fixture::new(1).await;
    let mut conn = AsyncPgConnection::establish(fx.db.url()).await.unwrap();
    for version in 1..=3 {
        let message = fx.message("prepared", version).await;
        let outbox = fx.outbox.clone();
        conn.transaction::<(), ferrybox::Error, _>(async |tx| outbox.enqueue(tx, &message).await)
            .await
            .unwrap();
    }
    // Named server-side statements of this very connection.
    let prepared: Prepared = diesel::sql_query(
        "SELECT count(*) AS n FROM pg_prepared_statements \
         WHERE statement LIKE '%INSERT INTO ferrybox_outbox%' \
           AND statement NOT LIKE '%pg_prepared_statements%'",
    )
    .get_result(&mut conn)
    .await
    .unwrap();
    assert_eq!(prepared.n, 1);
    assert_eq!(
        fx.count("SELECT count(*) AS n FROM ferrybox_outbox").await,
        3
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn enqueue_outside_a_transaction_is_refused() {
    let fx = Fixture::new(1).await;
    let message = fx.message("t", 1).await;
    let mut conn = AsyncPgConnection::establish(fx.db.url()).await.unwrap();
    let err = fx.outbox.enqueue(&mut conn, &message).await.unwrap_err();
    assert!(matches!(err, ferrybox::Error::NotInTransaction), "{err}");
    assert_eq!(
        fx.count("SELECT count(*) AS n FROM ferrybox_outbox").await,
        0
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn relay_marks_rows_with_the_position_the_broker_acknowledged() {
    let fx = Fixture::new(3).await;
    let mut ids = Vec::new();
    for i in 0..12 {
        ids.push(
            fx.change(&format!("thing-{}", i % 4), i64::from(i / 4) + 1)
                .await,
        );
    }
    let relay = Relay::new(
        fx.db.config(),
        &ferrybox::testing::kafka(),
        Fixture::relay_config(),
    )
    .unwrap();
    let mut conn = AsyncPgConnection::establish(fx.db.url()).await.unwrap();
    let outcome = relay.publish_batch(&mut conn).await.unwrap();
    assert_eq!((outcome.published, outcome.failed), (12, 0));
    assert_eq!(
        fx.count("SELECT count(*) AS n FROM ferrybox_outbox WHERE published_at IS NULL")
            .await,
        0
    );

    // Every row's recorded partition and offset hold exactly that message on the broker.
    #[derive(diesel::QueryableByName)]
    struct Row {
        #[diesel(sql_type = Text)]
        message_id: String,
        #[diesel(sql_type = diesel::sql_types::Integer)]
        kafka_partition: i32,
        #[diesel(sql_type = diesel::sql_types::BigInt)]
        kafka_offset: i64,
    }
    let rows: Vec<Row> = diesel::sql_query(
        "SELECT message_id::text AS message_id, kafka_partition, kafka_offset FROM ferrybox_outbox",
    )
    .load(&mut conn)
    .await
    .unwrap();
    let on_broker: BTreeMap<(i32, i64), String> = read_records(&fx.topic, 12)
        .await
        .into_iter()
        .map(|(p, o, id)| ((p, o), id))
        .collect();
    for row in rows {
        assert_eq!(
            on_broker.get(&(row.kafka_partition, row.kafka_offset)),
            Some(&row.message_id)
        );
    }
    // A second pass finds nothing left to send.
    assert_eq!(relay.publish_batch(&mut conn).await.unwrap().published, 0);
}

#[tokio::test(flavor = "multi_thread")]
async fn relay_marks_nothing_the_broker_did_not_acknowledge() {
    let fx = Fixture::new(1).await;
    fx.change("a", 1).await;
    fx.change("b", 1).await;
    // A broker address nothing listens on, and a short delivery timeout.
    let mut unreachable = KafkaConfig::new("127.0.0.1:1");
    unreachable
        .producer_settings
        .insert("message.timeout.ms".into(), "1500".into());
    let relay = Relay::new(fx.db.config(), &unreachable, Fixture::relay_config()).unwrap();
    let mut conn = AsyncPgConnection::establish(fx.db.url()).await.unwrap();
    let outcome = relay.publish_batch(&mut conn).await.unwrap();
    assert_eq!((outcome.published, outcome.failed), (0, 2));
    assert_eq!(
        fx.count("SELECT count(*) AS n FROM ferrybox_outbox WHERE published_at IS NULL AND kafka_offset IS NULL AND attempts = 1 AND last_error IS NOT NULL").await,
        2
    );

    // The same rows go out once a broker answers.
    let relay = Relay::new(
        fx.db.config(),
        &ferrybox::testing::kafka(),
        Fixture::relay_config(),
    )
    .unwrap();
    let outcome = relay.publish_batch(&mut conn).await.unwrap();
    assert_eq!((outcome.published, outcome.failed), (2, 0));
    assert_eq!(read_records(&fx.topic, 2).await.len(), 2);
}

#[tokio::test(flavor = "multi_thread")]
async fn weakened_durability_settings_are_refused() {
    let mut kafka = ferrybox::testing::kafka();
    kafka.settings.insert("acks".into(), "1".into());
    let Err(err) = ferrybox::kafka::durable_producer(&kafka) else {
        panic!("acks=1 was accepted")
    };
    assert!(err.to_string().contains("acks=1"), "{err}");
    kafka.settings.insert("acks".into(), "all".into());
    kafka
        .settings
        .insert("enable.idempotence".into(), "false".into());
    assert!(ferrybox::kafka::durable_producer(&kafka).is_err());
}

#[tokio::test(flavor = "multi_thread")]
async fn only_one_relay_is_active_and_a_standby_takes_over() {
    let fx = Fixture::new(1).await;
    let config = ferrybox::RelayConfig {
        standby_interval: Duration::from_millis(50),
        ..Fixture::relay_config()
    };
    let first = RunningRelay::start(
        Relay::new(fx.db.config(), &ferrybox::testing::kafka(), config.clone()).unwrap(),
    );
    fx.change("x", 1).await;
    ferrybox::testing::wait_until(TIMEOUT, "first relay publishes", || async {
        fx.published().await == 1
    })
    .await;
    let second = RunningRelay::start(
        Relay::new(fx.db.config(), &ferrybox::testing::kafka(), config).unwrap(),
    );
    // With the first relay gone, the standby takes the lock and publishes.
    first.stop().await;
    fx.change("x", 2).await;
    ferrybox::testing::wait_until(TIMEOUT, "standby relay publishes", || async {
        fx.published().await == 2
    })
    .await;
    second.stop().await;
    assert_eq!(read_records(&fx.topic, 2).await.len(), 2);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_row_whose_stored_headers_are_damaged_is_published_with_its_envelope() {
    let fx = Fixture::new(1).await;
    let damaged = fx.change("thing-1", 1).await;
    let lenient = fx.change("thing-2", 1).await;
    let mut conn = AsyncPgConnection::establish(fx.db.url()).await.unwrap();
    // Not a map at all, and a map with a number, a nested object and a traceparent.
    diesel::sql_query(
        "UPDATE ferrybox_outbox SET headers = '[\"garbage\"]'::jsonb WHERE message_key = 'thing-1'",
    )
    .execute(&mut conn)
    .await
    .unwrap();
    diesel::sql_query(
        "UPDATE ferrybox_outbox SET headers = jsonb_build_object('x-count', 3, 'nested', jsonb_build_object('a', 1), \
         'traceparent', '00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01', 'ce_source', 'integration-test') \
         WHERE message_key = 'thing-2'",
    )
    .execute(&mut conn)
    .await
    .unwrap();
    let relay = Relay::new(
        fx.db.config(),
        &ferrybox::testing::kafka(),
        Fixture::relay_config(),
    )
    .unwrap();
    assert_eq!(relay.publish_batch(&mut conn).await.unwrap().published, 2);
    let records = ferrybox::testing::read_topic(&fx.topic, 2, TIMEOUT).await;
    let by_key: BTreeMap<String, &BTreeMap<String, String>> = records
        .iter()
        .map(|r| (r.headers["ce_subject"].clone(), &r.headers))
        .collect();
    let first = by_key["thing-1"];
    assert_eq!(first["ce_id"], damaged.to_string());
    assert_eq!(first["ce_type"], "com.ferrybox.test.ThingChanged");
    assert_eq!(first["ce_entityversion"], "1");
    assert!(first.contains_key("ce_time") && first.contains_key("ce_specversion"));
    let second = by_key["thing-2"];
    assert_eq!(second["ce_id"], lenient.to_string());
    assert_eq!(second["x-count"], "3");
    assert_eq!(second["ce_source"], "integration-test");
    assert!(second["traceparent"].starts_with("00-0af7"));
    assert!(!second.contains_key("nested"));
    // Both envelopes read as Ferrybox messages.
    for r in &records {
        ferrybox::message::IncomingMessage::from_parts(
            &fx.topic,
            r.partition,
            r.offset,
            r.key.as_deref().map(str::as_bytes),
            r.headers.clone(),
            Some(b"payload"),
        )
        .unwrap();
    }
}
