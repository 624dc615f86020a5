//! The cache handler against a real database: versions decide, never arrival order.

use std::collections::BTreeMap;

use auth_service::cache::UserEvents;
use diesel::sql_types::{BigInt, Nullable, Text};
use diesel_async::{AsyncConnection, AsyncPgConnection, RunQueryDsl};
use ferrybox::inbox::{Handler, HandlerError, ReceivedMessage};
use ferrybox::testing::TestDatabase;
use ferrybox::{IncomingMessage, MessageId, apache_avro};
use serde::Serialize;

#[derive(Serialize)]
struct State<'a> {
    user_id: &'a str,
    version: i64,
    email: &'a str,
    name: &'a str,
    password_hash: &'a str,
}

#[derive(Serialize)]
struct Update<'a> {
    user_id: &'a str,
    version: i64,
    email: &'a str,
    name: &'a str,
    password_hash: &'a str,
    status: &'a str,
}

#[derive(Serialize)]
struct Ref<'a> {
    user_id: &'a str,
    version: i64,
}

const ID: &str = "0193a0b4-0000-7000-8000-000000000001";

fn message(short_type: &str, version: i64, body: impl Serialize) -> ReceivedMessage {
    ReceivedMessage {
        envelope: IncomingMessage {
            id: MessageId::new(),
            message_type: format!("com.ferrybox.user.{short_type}"),
            key: ID.into(),
            entity_version: version,
            occurred_at: ferrybox::message::now(),
            topic: "users".into(),
            partition: 0,
            offset: 0,
            headers: BTreeMap::new(),
            payload: Vec::new(),
        },
        value: apache_avro::to_value(body).unwrap(),
    }
}

async fn apply(
    conn: &mut AsyncPgConnection,
    message: &ReceivedMessage,
) -> Result<(), HandlerError> {
    conn.transaction::<_, HandlerError, _>(async |tx| UserEvents.handle(tx, message).await)
        .await
}

#[derive(diesel::QueryableByName, Debug, PartialEq)]
struct Row {
    #[diesel(sql_type = Nullable<Text>)]
    name: Option<String>,
    #[diesel(sql_type = Text)]
    status: String,
    #[diesel(sql_type = BigInt)]
    version: i64,
}

async fn cached(conn: &mut AsyncPgConnection) -> Row {
    diesel::sql_query("SELECT name, status, version FROM cached_users WHERE id = $1::uuid")
        .bind::<Text, _>(ID)
        .get_result(conn)
        .await
        .unwrap()
}

fn row(name: Option<&str>, status: &str, version: i64) -> Row {
    Row {
        name: name.map(str::to_owned),
        status: status.into(),
        version,
    }
}

async fn database() -> (TestDatabase, AsyncPgConnection) {
    let db = TestDatabase::create().await;
    let settings = auth_service::Settings {
        database: db.config(),
        ..auth_service::Settings::default()
    };
    auth_service::startup::migrate(&settings).await.unwrap();
    let conn = AsyncPgConnection::establish(db.url()).await.unwrap();
    (db, conn)
}

#[tokio::test(flavor = "multi_thread")]
async fn an_older_event_never_overwrites_a_newer_state() {
    let (_db, mut conn) = database().await;
    let state = |version, name| State {
        user_id: ID,
        version,
        email: "a@example.com",
        name,
        password_hash: "h",
    };
    let update = |version, name, status| Update {
        user_id: ID,
        version,
        email: "a@example.com",
        name,
        password_hash: "h",
        status,
    };

    apply(&mut conn, &message("UserRegistered", 1, state(1, "v1")))
        .await
        .unwrap();
    assert_eq!(cached(&mut conn).await, row(Some("v1"), "active", 1));
    apply(
        &mut conn,
        &message("UserUpdated", 3, update(3, "v3", "active")),
    )
    .await
    .unwrap();
    // Older events arriving late (a redrive, a replay) change nothing.
    apply(
        &mut conn,
        &message("UserUpdated", 2, update(2, "v2", "active")),
    )
    .await
    .unwrap();
    apply(
        &mut conn,
        &message(
            "UserSuspended",
            2,
            Ref {
                user_id: ID,
                version: 2,
            },
        ),
    )
    .await
    .unwrap();
    apply(&mut conn, &message("UserRegistered", 1, state(1, "v1")))
        .await
        .unwrap();
    assert_eq!(cached(&mut conn).await, row(Some("v3"), "active", 3));

    apply(
        &mut conn,
        &message(
            "UserSuspended",
            4,
            Ref {
                user_id: ID,
                version: 4,
            },
        ),
    )
    .await
    .unwrap();
    assert_eq!(cached(&mut conn).await, row(Some("v3"), "suspended", 4));
    apply(
        &mut conn,
        &message(
            "UserDeleted",
            5,
            Ref {
                user_id: ID,
                version: 5,
            },
        ),
    )
    .await
    .unwrap();
    // A deleted user stays deleted: the tombstone keeps its version.
    apply(
        &mut conn,
        &message("UserUpdated", 3, update(3, "v3", "active")),
    )
    .await
    .unwrap();
    assert_eq!(cached(&mut conn).await, row(None, "deleted", 5));
}

#[tokio::test(flavor = "multi_thread")]
async fn events_the_handler_cannot_understand_are_permanent_errors() {
    let (_db, mut conn) = database().await;
    let unknown = apply(
        &mut conn,
        &message(
            "UserTeleported",
            1,
            Ref {
                user_id: ID,
                version: 1,
            },
        ),
    )
    .await
    .unwrap_err();
    assert!(!unknown.is_retryable(), "{unknown}");
    assert!(
        unknown.to_string().contains("unknown message type"),
        "{unknown}"
    );

    let bad_id = apply(
        &mut conn,
        &message(
            "UserSuspended",
            1,
            Ref {
                user_id: "not-a-uuid",
                version: 1,
            },
        ),
    )
    .await
    .unwrap_err();
    assert!(
        !bad_id.is_retryable() && bad_id.to_string().contains("not a UUID"),
        "{bad_id}"
    );

    // A payload missing fields the handler needs.
    let missing = apply(
        &mut conn,
        &message(
            "UserRegistered",
            1,
            Ref {
                user_id: ID,
                version: 1,
            },
        ),
    )
    .await
    .unwrap_err();
    assert!(!missing.is_retryable(), "{missing}");
    let none: Vec<Row> = diesel::sql_query("SELECT name, status, version FROM cached_users")
        .load(&mut conn)
        .await
        .unwrap();
    assert!(none.is_empty());
}
