use diesel_async::{AsyncConnection, AsyncPgConnection};
use ferrybox::testing::{self, TestDatabase, wait_until};
use ferrybox::{AvroCodec, Event, Outbox};
use ferrybox_e2e::{Api, CONVERGE, Stack, user_settings};
use serde::{Deserialize, Serialize};
use serde_json::json;

/// `UserRegistered` as the producer wrote it before v2 added `locale`.
#[derive(Serialize, Deserialize)]
struct UserRegisteredV1 {
    user_id: String,
    version: i64,
    email: String,
    name: String,
    password_hash: String,
}

impl Event for UserRegisteredV1 {
    const MESSAGE_TYPE: &'static str = "com.ferrybox.user.UserRegistered";
    const SCHEMA: &'static str =
        include_str!("../../schemas/users/com.ferrybox.user.UserRegistered/v1.avsc");
    fn key(&self) -> String {
        self.user_id.clone()
    }
    fn entity_version(&self) -> i64 {
        self.version
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn old_and_new_versions_of_an_event_are_both_applied_by_an_unchanged_consumer() {
    let stack = Stack::start().await.unwrap();
    let api = Api::default();

    // An older producer instance still writes v1, into the same outbox and topic.
    let old_id = uuid::Uuid::now_v7().to_string();
    let old = UserRegisteredV1 {
        user_id: old_id.clone(),
        version: 1,
        email: "old@example.com".into(),
        name: "Old Writer".into(),
        password_hash: "$argon2id$v=19$m=19456,t=2,p=1$c2FsdHNhbHQ$aGFzaA".into(),
    };
    let message = AvroCodec::new(&testing::registry_url())
        .message(&stack.topic, &old)
        .await
        .unwrap();
    let mut conn = AsyncPgConnection::establish(stack.user_db.url())
        .await
        .unwrap();
    let outbox = Outbox::new("user-service");
    conn.transaction::<_, ferrybox::Error, _>(async |tx| outbox.enqueue(tx, &message).await)
        .await
        .unwrap();

    // The current producer writes v2, with the new optional field.
    let new = api
        .post(
            &format!("{}/users", stack.user_url),
            json!({ "email": "new@example.com", "name": "New Writer", "password": "long-enough", "locale": "fr-CA" }),
        )
        .await
        .unwrap();
    assert_eq!(
        (new.status, new.body["locale"].as_str()),
        (201, Some("fr-CA"))
    );
    let new_id = new.body["id"].as_str().unwrap().to_owned();

    // auth-service, still on its v1-era reader schema, applies both.
    for id in [&old_id, &new_id] {
        wait_until(CONVERGE, "user cached", || async {
            api.cached_version(&stack.auth_url, id).await.unwrap() == Some(1)
        })
        .await;
    }
    assert_eq!(
        api.login(&stack.auth_url, "new@example.com", "long-enough")
            .await
            .unwrap()
            .status,
        200
    );
    let stats = api.inbox_stats(&stack.auth_url).await.unwrap();
    assert_eq!(
        (stats["applied"].as_u64(), stats["dead_lettered"].as_u64()),
        (Some(2), Some(0))
    );
    stack.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn the_producer_refuses_to_start_when_the_registry_rejects_its_schema() {
    let topic = testing::create_topic(3).await;
    // Someone registered an incompatible UserRegistered under this topic's subject.
    let clash = r#"{"type":"record","name":"UserRegistered","namespace":"com.ferrybox.user","fields":[{"name":"user_id","type":"int"}]}"#;
    let subject = format!("{topic}-com.ferrybox.user.UserRegistered");
    let registered = reqwest::Client::new()
        .post(format!(
            "{}/subjects/{subject}/versions",
            testing::registry_url()
        ))
        .header("content-type", "application/vnd.schemaregistry.v1+json")
        .body(json!({ "schema": clash }).to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(registered.status(), 200);

    let db = TestDatabase::create().await;
    let Err(err) = user_service::Application::build(user_settings(&db, &topic)).await else {
        panic!("user-service started with a schema the registry rejects");
    };
    let err = format!("{err:#}");
    assert!(err.contains("registering event schemas"), "{err}");
    assert!(err.contains("incompatible"), "{err}");
}
