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

#[derive(diesel::QueryableByName, Debug, PartialEq)]
struct FullRow {
    #[diesel(sql_type = Text)]
    id: String,
    #[diesel(sql_type = Nullable<Text>)]
    email: Option<String>,
    #[diesel(sql_type = Nullable<Text>)]
    name: Option<String>,
    #[diesel(sql_type = Text)]
    status: String,
    #[diesel(sql_type = BigInt)]
    version: i64,
    #[diesel(sql_type = BigInt)]
    sessions: i64,
}

async fn everything(conn: &mut AsyncPgConnection) -> Vec<FullRow> {
    diesel::sql_query(
        "SELECT c.id::text AS id, c.email, c.name, c.status, c.version, \
                (SELECT count(*) FROM sessions AS s WHERE s.user_id = c.id) AS sessions \
         FROM cached_users AS c ORDER BY c.id",
    )
    .load(conn)
    .await
    .unwrap()
}

/// The batch path (one statement for the whole batch) ends where writing the same events one
/// by one, in order, ends: a stale event skipped, details kept across events that carry none,
/// a suspension ends the user's sessions even when a later event of the batch reactivates
/// them, a deletion clears the details.
#[tokio::test(flavor = "multi_thread")]
async fn a_batch_in_one_statement_ends_where_its_events_one_by_one_end() {
    let (_one_db, mut one) = database().await;
    let (_batch_db, mut batch) = database().await;
    let ids = [
        "0193a0b4-0000-7000-8000-0000000000a1",
        "0193a0b4-0000-7000-8000-0000000000a2",
        "0193a0b4-0000-7000-8000-0000000000a3",
        "0193a0b4-0000-7000-8000-0000000000a4",
    ];
    let state = |id, version, name| State {
        user_id: id,
        version,
        email: "x@example.com",
        name,
        password_hash: "h",
    };
    let update = |id, version, name, status| Update {
        user_id: id,
        version,
        email: "x@example.com",
        name,
        password_hash: "h",
        status,
    };
    let by_ref = |id, version| Ref {
        user_id: id,
        version,
    };
    // Before the batch, in both: the second user at version 5, every user with a session.
    for conn in [&mut one, &mut batch] {
        apply(conn, &message("UserRegistered", 5, state(ids[1], 5, "old")))
            .await
            .unwrap();
        for (n, id) in ids.iter().enumerate() {
            diesel::sql_query(
                "INSERT INTO sessions (token_hash, user_id, expires_at) \
                 VALUES ($1, $2::uuid, now() + interval '1 hour')",
            )
            .bind::<Text, _>(format!("token-{n}"))
            .bind::<Text, _>(*id)
            .execute(conn)
            .await
            .unwrap();
        }
    }
    let events = vec![
        message("UserRegistered", 1, state(ids[0], 1, "a1")),
        message("UserUpdated", 4, update(ids[1], 4, "stale", "active")),
        message("UserUpdated", 2, update(ids[0], 2, "a2", "active")),
        message("UserRegistered", 1, state(ids[2], 1, "c1")),
        message("UserSuspended", 6, by_ref(ids[1], 6)),
        message("UserSuspended", 3, by_ref(ids[0], 3)),
        message("UserDeleted", 2, by_ref(ids[2], 2)),
        message("UserUpdated", 7, update(ids[1], 7, "b7", "active")),
        message("UserSuspended", 1, by_ref(ids[3], 1)),
    ];
    for event in &events {
        apply(&mut one, event).await.unwrap();
    }
    let refs: Vec<&ReceivedMessage> = events.iter().collect();
    batch
        .transaction::<_, HandlerError, _>(async |tx| UserEvents.handle_batch(tx, &refs).await)
        .await
        .unwrap();

    let expected = everything(&mut one).await;
    assert_eq!(everything(&mut batch).await, expected);
    let second = expected.iter().find(|r| r.id == ids[1]).unwrap();
    assert_eq!(
        (
            second.name.as_deref(),
            second.status.as_str(),
            second.version,
            second.sessions
        ),
        (Some("b7"), "active", 7, 0),
        "the stale update skipped, the suspension ended the session, the last update won"
    );
    let deleted = expected.iter().find(|r| r.id == ids[2]).unwrap();
    assert_eq!(
        (deleted.name.as_deref(), deleted.status.as_str()),
        (None, "deleted")
    );
    let first = expected.iter().find(|r| r.id == ids[0]).unwrap();
    assert_eq!(
        (first.name.as_deref(), first.status.as_str()),
        (Some("a2"), "suspended"),
        "details kept through the suspension"
    );
}
