//! `auth-service dlq list|show|redrive` on a real database: happy and error paths, exit codes.

use std::process::Output;

use diesel::sql_types::{Bytea, Jsonb, Text};
use diesel_async::{AsyncConnection, AsyncPgConnection, RunQueryDsl};
use ferrybox::testing::{self, TestDatabase};
use ferrybox::{AvroCodec, Event};
use serde::{Deserialize, Serialize};

const EXE: &str = env!("CARGO_BIN_EXE_auth-service");

#[derive(Serialize, Deserialize)]
struct UserRegistered {
    user_id: String,
    version: i64,
    email: String,
    name: String,
    password_hash: String,
}

impl Event for UserRegistered {
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

async fn dlq(db: &TestDatabase, args: &[&str]) -> (Option<i32>, String, String) {
    let Output {
        status,
        stdout,
        stderr,
    } = tokio::process::Command::new(EXE)
        .arg("dlq")
        .args(args)
        .envs(testing::service_env("AUTH_SERVICE_", db.url()))
        .env("AUTH_SERVICE_INBOX__GROUP_ID", "ops-test")
        .output()
        .await
        .unwrap();
    (
        status.code(),
        String::from_utf8_lossy(&stdout).into_owned(),
        String::from_utf8_lossy(&stderr).into_owned(),
    )
}

/// Records a dead letter as the consumer would have, for `key`, at `offset`, with `payload`.
async fn dead_letter(
    conn: &mut AsyncPgConnection,
    topic: &str,
    key: &str,
    offset: i64,
    payload: &[u8],
    status: &str,
) {
    let headers = serde_json::json!({
        "ce_id": uuid::Uuid::now_v7().to_string(),
        "ce_type": "com.ferrybox.user.UserRegistered",
        "ce_time": "2026-11-28T10:00:00Z",
        "ce_entityversion": "1",
        "ce_subject": key,
    });
    diesel::sql_query(
        "INSERT INTO ferrybox_dead_letters (consumer, message_key, message_type, topic, kafka_partition, kafka_offset, headers, payload, error_kind, error, attempts, status) \
         VALUES ('ops-test', $1, 'com.ferrybox.user.UserRegistered', $2, 0, $3, $4, $5, 'handler', 'bug', 1, $6)",
    )
    .bind::<Text, _>(key)
    .bind::<Text, _>(topic)
    .bind::<diesel::sql_types::BigInt, _>(offset)
    .bind::<Jsonb, _>(headers)
    .bind::<Bytea, _>(payload)
    .bind::<Text, _>(status)
    .execute(conn)
    .await
    .unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn list_show_and_redrive_with_exit_codes_scripts_can_use() {
    let db = TestDatabase::create().await;
    auth_service::startup::migrate(&auth_service::Settings {
        database: db.config(),
        ..auth_service::Settings::default()
    })
    .await
    .unwrap();
    let topic = testing::unique("dlq-ops").replace('_', "-");
    let codec = AvroCodec::new(&testing::registry_url());
    let good_id = uuid::Uuid::now_v7().to_string();
    let event = UserRegistered {
        user_id: good_id.clone(),
        version: 1,
        email: "fixed@example.com".into(),
        name: "Fixed".into(),
        password_hash: "$argon2id$v=19$m=19456,t=2,p=1$c2FsdHNhbHQ$aGFzaA".into(),
    };
    let payload = codec.encode(&topic, &event).await.unwrap();
    let mut conn = AsyncPgConnection::establish(db.url()).await.unwrap();
    dead_letter(&mut conn, &topic, &good_id, 10, &payload, "dead").await;
    dead_letter(&mut conn, &topic, "broken-key", 11, b"\xde\xad", "dead").await;

    let (code, out, _) = dlq(&db, &["list"]).await;
    assert_eq!(code, Some(0));
    assert!(out.contains("dead: 2  parked: 0"), "{out}");
    let (code, out, _) = dlq(&db, &["list", "--json", "--key", &good_id]).await;
    assert_eq!(code, Some(0));
    let listed: Vec<serde_json::Value> = serde_json::from_str(&out).unwrap();
    assert_eq!(listed.len(), 1);
    let id = listed[0]["id"].as_i64().unwrap();
    let (code, out, _) = dlq(&db, &["show", &id.to_string()]).await;
    assert_eq!(code, Some(0));
    assert!(out.contains("com.ferrybox.user.UserRegistered"), "{out}");
    let (code, _, err) = dlq(&db, &["show", "999999"]).await;
    assert_eq!(code, Some(1));
    assert!(err.contains("no dead letter 999999"), "{err}");
    let (code, _, err) = dlq(&db, &["redrive", "--id", "1", "--key", "k"]).await;
    assert_eq!(code, Some(2), "clap refuses two selectors: {err}");

    // The fixed message applies; the broken one fails again and stays dead.
    let (code, out, _) = dlq(&db, &["redrive", "--key", &good_id, "--json"]).await;
    assert_eq!(code, Some(0), "{out}");
    let report: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(
        (report["applied"].as_u64(), report["failed"].as_u64()),
        (Some(1), Some(0))
    );
    let (code, out, _) = dlq(&db, &["redrive", "--all"]).await;
    assert_eq!(code, Some(1));
    assert!(out.contains("failed again: 1"), "{out}");
    let (_, out, _) = dlq(&db, &["list", "--json"]).await;
    let open: Vec<serde_json::Value> = serde_json::from_str(&out).unwrap();
    assert_eq!(open.len(), 1);
    assert_eq!(
        (
            open[0]["message_key"].as_str(),
            open[0]["attempts"].as_i64()
        ),
        (Some("broken-key"), Some(2))
    );

    #[derive(diesel::QueryableByName)]
    struct Cached {
        #[diesel(sql_type = Text)]
        status: String,
    }
    let cached: Cached = diesel::sql_query("SELECT status FROM cached_users WHERE id = $1::uuid")
        .bind::<Text, _>(&good_id)
        .get_result(&mut conn)
        .await
        .unwrap();
    assert_eq!(cached.status, "active");
}
