//! The real `user-service` executable: it starts, serves, and stops cleanly on SIGTERM; a bad
//! configuration stops it at start-up with a clear error and no secret in it; `check-config
//! --print` shows the effective settings.

use std::time::Duration;

use diesel_async::{AsyncConnection, AsyncPgConnection, RunQueryDsl};
use ferrybox::testing::{self, ServiceProcess, TestDatabase};

const EXE: &str = env!("CARGO_BIN_EXE_user-service");

#[tokio::test(flavor = "multi_thread")]
async fn serves_and_stops_cleanly_on_sigterm() {
    let db = TestDatabase::create().await;
    let topic = testing::create_topic(1).await;
    let mut env = testing::service_env("USER_SERVICE_", db.url());
    env.push(("USER_SERVICE_USERS_TOPIC__NAME".to_owned(), topic));
    env.push((
        "USER_SERVICE_USERS_TOPIC__PARTITIONS".to_owned(),
        "1".to_owned(),
    ));
    let service = ServiceProcess::start(EXE.as_ref(), &["serve"], &env, Duration::from_secs(60))
        .await
        .unwrap();
    let reply = reqwest::Client::new()
        .post(format!("{}/users", service.url))
        .json(&serde_json::json!({ "email": "term@example.com", "name": "T", "password": "long-enough" }))
        .send()
        .await
        .unwrap();
    assert_eq!(reply.status(), 201);
    // The relay inside the process publishes the registration.
    testing::wait_until(
        Duration::from_secs(60),
        "the registration published",
        || async {
            let mut conn = AsyncPgConnection::establish(db.url()).await.unwrap();
            diesel::sql_query("SELECT 1 AS one FROM ferrybox_outbox WHERE published_at IS NOT NULL")
                .execute(&mut conn)
                .await
                .unwrap()
                == 1
        },
    )
    .await;
    let status = service.terminate(Duration::from_secs(30)).await.unwrap();
    assert!(status.success(), "exit status {status}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_bad_configuration_fails_fast_without_leaking_secrets() {
    let output = tokio::process::Command::new(EXE)
        .arg("serve")
        .env("USER_SERVICE_DATABASE__URL", "mysql://app:hunter2@db/users")
        .output()
        .await
        .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("database.url must start with postgres://"),
        "{stderr}"
    );
    assert!(!stderr.contains("hunter2"), "{stderr}");

    let output = tokio::process::Command::new(EXE)
        .env("USER_SERVICE_RELAY__BATCH_SIZ", "5")
        .output()
        .await
        .unwrap();
    assert!(!output.status.success());
    assert!(String::from_utf8_lossy(&output.stderr).contains("batch_siz"));
}

#[test]
fn check_config_prints_the_effective_settings_without_secrets() {
    const SECRETS: [&str; 5] = [
        "db-hunter2",
        "kafka-s3cret",
        "internal-t0ken",
        "service-t0ken",
        "signing-secret-of-at-least-32-bytes!",
    ];
    let (default, _) = testing::printed_settings(EXE.as_ref(), &[]);
    assert_eq!(default["listen"], "127.0.0.1:8080");
    assert_eq!(default["users_topic"]["name"], "users");
    assert_eq!(default["database"]["url"], "[redacted]");
    assert_eq!(default["internal_token"], serde_json::Value::Null);

    let (printed, output) = testing::printed_settings(
        EXE.as_ref(),
        &[
            (
                "USER_SERVICE_DATABASE__URL",
                "postgres://app:db-hunter2@db/users",
            ),
            (
                "USER_SERVICE_KAFKA__SETTINGS__SASL_PASSWORD",
                "kafka-s3cret",
            ),
            ("USER_SERVICE_INTERNAL_TOKEN", "internal-t0ken"),
            ("USER_SERVICE_SERVICE_TOKEN", "service-t0ken"),
            ("USER_SERVICE_TOKEN_SECRET", SECRETS[4]),
            ("USER_SERVICE_LISTEN", "0.0.0.0:9000"),
        ],
    );
    for secret in SECRETS {
        assert!(
            !output.contains(secret),
            "the print leaks {secret}:\n{output}"
        );
    }
    assert_eq!(printed["listen"], "0.0.0.0:9000");
    assert_eq!(printed["database"]["url"], "[redacted]");
    assert_eq!(printed["kafka"]["settings"]["sasl_password"], "[redacted]");
    for token in ["internal_token", "service_token", "token_secret"] {
        assert_eq!(printed[token], "[redacted]", "{token}");
    }
}

/// Every `USER_SERVICE_…=` example in the README, alone, sets exactly the setting it names.
#[test]
fn every_variable_the_readme_shows_sets_exactly_its_setting() {
    let readme = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../README.md"))
        .expect("the README");
    let checked = testing::check_documented_variables(EXE.as_ref(), "USER_SERVICE_", &readme, &[]);
    eprintln!("checked {} examples: {checked:?}", checked.len());
}

/// `USER_SERVICE_CONFIG` names the settings file (`--config`); it is not a setting itself.
#[test]
fn the_config_variable_names_the_settings_file() {
    testing::assert_config_variable_names_the_file(EXE.as_ref(), "USER_SERVICE_");
}
