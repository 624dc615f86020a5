//! `auth-service generations`: the id inbox's generations and the consumers that keep them, on
//! a real database.

use std::process::Output;

use ferrybox::testing::{self, TestDatabase};

const EXE: &str = env!("CARGO_BIN_EXE_auth-service");

async fn generations(db: &TestDatabase, json: bool) -> (Option<i32>, String, String) {
    let mut command = tokio::process::Command::new(EXE);
    command
        .arg("generations")
        .envs(testing::service_env("AUTH_SERVICE_", db.url()));
    if json {
        command.arg("--json");
    }
    let Output {
        status,
        stdout,
        stderr,
    } = command.output().await.unwrap();
    (
        status.code(),
        String::from_utf8_lossy(&stdout).into_owned(),
        String::from_utf8_lossy(&stderr).into_owned(),
    )
}

/// A consumer that stopped for good (its group never commits again) keeps the generation its
/// ids are in; the command names it, with the ids it holds.
#[tokio::test(flavor = "multi_thread")]
async fn a_generation_kept_by_a_consumer_that_stopped_is_named_with_its_ids() {
    let db = TestDatabase::create().await;
    let settings = auth_service::Settings {
        database: db.config(),
        ..auth_service::Settings::default()
    };
    auth_service::startup::migrate(&settings).await.unwrap();
    // Another consumer's retention pass opened the next generation and summed up the first;
    // nothing tells it the stopped consumer is past its ids.
    testing::kept_generation(&db.pool(), db.url(), "stopped-consumer", 25).await;

    let (code, out, err) = generations(&db, true).await;
    assert_eq!(code, Some(0), "{err}");
    let listed: serde_json::Value = serde_json::from_str(&out).unwrap();
    let listed = listed.as_array().unwrap();
    assert_eq!(listed.len(), 2, "{out}");
    assert_eq!(listed[0]["generation"], 0);
    assert_eq!(listed[0]["ids"], 25);
    assert_eq!(
        listed[0]["held_by"],
        serde_json::json!(["stopped-consumer"])
    );
    assert_eq!(listed[1]["generation"], 1);
    assert!(listed[1]["closed_at"].is_null(), "the newest: {out}");

    let (code, out, _) = generations(&db, false).await;
    assert_eq!(code, Some(0));
    assert!(out.contains("25 ids, kept for stopped-consumer"), "{out}");
    assert!(out.contains("generation 1 opened"), "{out}");
}
