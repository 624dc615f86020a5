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
