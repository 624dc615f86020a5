//! The real `auth-service` executable: it starts, consumes, and stops cleanly on SIGTERM.

use std::time::Duration;

use ferrybox::testing::{self, ServiceProcess, TestDatabase};

const EXE: &str = env!("CARGO_BIN_EXE_auth-service");

#[tokio::test(flavor = "multi_thread")]
async fn serves_and_stops_cleanly_on_sigterm() {
    let db = TestDatabase::create().await;
    let topic = testing::create_topic(1).await;
    let mut env = testing::service_env("AUTH_SERVICE_", db.url());
    env.push(("AUTH_SERVICE_USERS_TOPIC__NAME".to_owned(), topic));
    env.push((
        "AUTH_SERVICE_USERS_TOPIC__PARTITIONS".to_owned(),
        "1".to_owned(),
    ));
    env.push((
        "AUTH_SERVICE_INBOX__GROUP_ID".to_owned(),
        testing::unique("auth"),
    ));
    let service = ServiceProcess::start(EXE.as_ref(), &["serve"], &env, Duration::from_secs(60))
        .await
        .unwrap();
    let health = reqwest::get(format!("{}/health", service.url))
        .await
        .unwrap();
    assert_eq!(health.status(), 200);
    let status = service.terminate(Duration::from_secs(30)).await.unwrap();
    assert!(status.success(), "exit status {status}");
}

async fn run(env: &[(String, String)], args: &[&str]) -> (Option<i32>, String, String) {
    let out = tokio::process::Command::new(EXE)
        .args(args)
        .envs(env.iter().map(|(k, v)| (k, v)))
        .output()
        .await
        .unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[tokio::test(flavor = "multi_thread")]
async fn feed_and_reconcile_commands_answer_scripts_clearly() {
    let db = TestDatabase::create().await;
    let env = testing::service_env("AUTH_SERVICE_", db.url());
    let (code, _, err) = run(&env, &["migrate"]).await;
    assert_eq!(code, Some(0), "{err}");

    let (code, out, err) = run(&env, &["--transport", "feed", "feed", "position", "--json"]).await;
    assert_eq!(code, Some(0), "{err}");
    let shown: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(shown["position"], 0);
    let (code, out, err) = run(&env, &["feed", "position", "--set", "42"]).await;
    assert_eq!(code, Some(0), "{err}");
    assert!(out.contains("position 42"), "{out}");
    let (code, _, err) = run(&env, &["feed", "position", "--set=-1"]).await;
    assert_eq!(code, Some(2), "a negative position is a usage error: {err}");
    let (code, _, err) = run(&env, &["--transport", "pigeon", "feed", "position"]).await;
    assert_eq!(
        code,
        Some(2),
        "an unknown transport is a usage error: {err}"
    );

    // Nothing listens on port 9 (discard): the run fails with a clear error, status 1.
    let mut unreachable = env.clone();
    unreachable.push((
        "AUTH_SERVICE_RECONCILE__SNAPSHOT_URL".into(),
        "http://127.0.0.1:9/snapshot".into(),
    ));
    let (code, _, err) = run(&unreachable, &["reconcile"]).await;
    assert_eq!(code, Some(1), "{err}");
    assert!(
        err.contains("reconciliation") && err.contains("snapshot"),
        "{err}"
    );
    let missing = std::env::temp_dir().join(testing::unique("no-such-snapshot"));
    let (code, _, err) = run(&env, &["reconcile", "--file", missing.to_str().unwrap()]).await;
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains("invalid snapshot"), "{err}");
}
