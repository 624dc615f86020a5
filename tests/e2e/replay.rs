//! Broker data loss: the users topic is deleted and created again, empty. Replaying
//! user-service's sent log rebuilds auth-service's cache exactly, for a consumer that starts
//! from nothing and for one that already had everything (which deduplicates the replay).

use std::time::Duration;

use diesel::QueryableByName;
use diesel::sql_types::Text;
use diesel_async::{AsyncConnection, AsyncPgConnection, RunQueryDsl};
use ferrybox::outbox::sent_log;
use ferrybox::testing::{self, TestDatabase, wait_until};
use ferrybox::{CancellationToken, ReplayOptions, ReplaySelection};
use ferrybox_e2e::{Api, CONVERGE, Stack, auth_settings};
use rdkafka::admin::{AdminClient, AdminOptions};
use rdkafka::client::DefaultClientContext;
use serde_json::json;

#[derive(QueryableByName, Debug, PartialEq, Eq)]
struct Cached {
    #[diesel(sql_type = Text)]
    row: String,
}

/// The whole cache, one line per user (id, status, version, email, name).
async fn cache(db: &TestDatabase) -> Vec<String> {
    let mut conn = AsyncPgConnection::establish(db.url()).await.unwrap();
    diesel::sql_query(
        "SELECT concat_ws(' ', id, status, version, email, name) AS row FROM cached_users ORDER BY id",
    )
    .load::<Cached>(&mut conn)
    .await
    .unwrap()
    .into_iter()
    .map(|c| c.row)
    .collect()
}

/// Runs an auth-service on `db` with a new consumer group until the cache equals `expected`.
async fn auth_service_converges(db: &TestDatabase, topic: &str, expected: &[String]) {
    let app = auth_service::Application::build(auth_settings(db, topic))
        .await
        .unwrap();
    let stop = CancellationToken::new();
    let task = tokio::spawn(app.run(stop.clone()));
    wait_until(
        CONVERGE,
        "the cache to match the one before the loss",
        || async { cache(db).await == expected },
    )
    .await;
    stop.cancel();
    task.await.unwrap().unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn replaying_the_sent_log_after_broker_data_loss_restores_the_consumer() {
    let stack = Stack::start().await.unwrap();
    let api = Api::service();
    let user = stack.user_url.clone();
    let mut ids = Vec::new();
    for name in ["ann", "ben", "cat", "dan"] {
        let created = api
            .register(
                &user,
                &format!("{name}@example.com"),
                name,
                "a-long-password",
            )
            .await
            .unwrap();
        ids.push(created["id"].as_str().unwrap().to_owned());
    }
    let renamed = api
        .send(
            reqwest::Method::PATCH,
            &format!("{user}/users/{}", ids[0]),
            Some(json!({ "name": "Ann B." })),
            None,
        )
        .await
        .unwrap();
    assert_eq!(renamed.status, 200);
    let deleted = api
        .send(
            reqwest::Method::DELETE,
            &format!("{user}/users/{}", ids[1]),
            None,
            None,
        )
        .await
        .unwrap();
    assert_eq!(deleted.status, 204);
    wait_until(CONVERGE, "auth-service caught up", || async {
        let rows = cache(&stack.auth_db).await;
        rows.len() == 4
            && rows.iter().any(|r| r.contains("Ann B."))
            && rows.iter().any(|r| r.contains(" deleted "))
    })
    .await;
    let before = cache(&stack.auth_db).await;
    let topic = stack.topic.clone();
    let (user_db, auth_db) = stack.stop_keeping_databases().await.unwrap();

    // The broker loses the topic's data.
    let admin: AdminClient<DefaultClientContext> = testing::kafka()
        .client_config(ferrybox::ClientKind::Admin)
        .create()
        .unwrap();
    let options = AdminOptions::new().operation_timeout(Some(Duration::from_secs(10)));
    for result in admin.delete_topics(&[&topic], &options).await.unwrap() {
        result.unwrap();
    }
    ferrybox::kafka::ensure_topics(
        &testing::kafka(),
        &[ferrybox::TopicConfig {
            partitions: 3,
            ..ferrybox::TopicConfig::new(&topic)
        }],
    )
    .await
    .unwrap();

    let empty = tokio::task::spawn_blocking({
        let topic = topic.clone();
        move || {
            use rdkafka::consumer::{BaseConsumer, Consumer};
            let consumer: BaseConsumer = testing::kafka()
                .client_config(ferrybox::ClientKind::Consumer)
                .create()
                .unwrap();
            (0..3).all(|p| {
                consumer
                    .fetch_watermarks(&topic, p, Duration::from_secs(10))
                    .unwrap()
                    .1
                    == 0
            })
        }
    })
    .await
    .unwrap();
    assert!(empty, "the recreated topic still holds records");

    // Replay everything user-service sent to that topic.
    let mut conn = AsyncPgConnection::establish(user_db.url()).await.unwrap();
    let producer = ferrybox::kafka::durable_producer(&testing::kafka()).unwrap();
    let selection = ReplaySelection {
        topic: Some(topic.clone()),
        ..ReplaySelection::default()
    };
    let report = sent_log::replay(&mut conn, &producer, &selection, ReplayOptions::default())
        .await
        .unwrap();
    let sent = testing::count(user_db.url(), "SELECT count(*) AS n FROM ferrybox_outbox").await;
    assert_eq!(report.sent, u64::try_from(sent).unwrap());
    assert_eq!(report.failed, 0);

    // A consumer starting from nothing rebuilds the same cache ...
    let fresh = TestDatabase::create().await;
    auth_service_converges(&fresh, &topic, &before).await;
    // ... and the one that had everything ends exactly where it was.
    auth_service_converges(&auth_db, &topic, &before).await;
}
