//! The real `auth-service` executable: it starts, consumes, and stops cleanly on SIGTERM; its
//! scripting commands answer clearly; `check-config --print` shows the effective settings.

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

/// The service's vacuum guard runs with its settings: a transaction held open in its
/// database past `vacuum_guard.max_transaction_age_ms` reaches `alert.webhook_url` with the
/// pid to end. (The limits are set small here: the defaults are minutes.)
#[tokio::test(flavor = "multi_thread")]
async fn a_transaction_held_open_in_its_database_is_alerted_by_the_vacuum_guard() {
    use diesel_async::SimpleAsyncConnection;
    let db = TestDatabase::create().await;
    let stop = ferrybox::CancellationToken::new();
    let (webhook, alerts) = testing::alert_sink(&stop).await;
    let mut env = testing::service_env("AUTH_SERVICE_", db.url());
    for (name, value) in [
        (
            "AUTH_SERVICE_USERS_TOPIC__NAME",
            testing::create_topic(1).await,
        ),
        ("AUTH_SERVICE_USERS_TOPIC__PARTITIONS", "1".to_owned()),
        ("AUTH_SERVICE_INBOX__GROUP_ID", testing::unique("auth")),
        ("AUTH_SERVICE_ALERT__WEBHOOK_URL", webhook),
        ("AUTH_SERVICE_VACUUM_GUARD__INTERVAL_MS", "100".to_owned()),
        (
            "AUTH_SERVICE_VACUUM_GUARD__MAX_TRANSACTION_AGE_MS",
            "0".to_owned(),
        ),
    ] {
        env.push((name.to_owned(), value));
    }
    let service = ServiceProcess::start(EXE.as_ref(), &["serve"], &env, Duration::from_secs(60))
        .await
        .unwrap();
    let (mut open, pid) = testing::open_transaction(db.url()).await;
    let ours = format!("pg_terminate_backend({pid})");
    testing::wait_until(
        Duration::from_secs(60),
        "the long transaction alerted",
        || async {
            alerts.lock().unwrap().iter().any(|a| {
                a.source == "auth-service"
                    && a.kind == "long_transaction"
                    && a.summary.contains(&ours)
            })
        },
    )
    .await;
    open.batch_execute("ROLLBACK").await.unwrap();
    let status = service.terminate(Duration::from_secs(30)).await.unwrap();
    assert!(status.success(), "exit status {status}");
    stop.cancel();
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

#[tokio::test(flavor = "multi_thread")]
async fn no_secret_reaches_a_log_line_or_an_error_message() {
    const SECRETS: [&str; 5] = [
        "db-hunter2",
        "kafka-s3cret",
        "feed-t0ken",
        "snapshot-t0ken",
        "hook-t0ken",
    ];
    let db = TestDatabase::create().await;
    let secret_env = |database_url: String| {
        vec![
            ("RUST_LOG".to_owned(), "debug".to_owned()),
            ("AUTH_SERVICE_DATABASE__URL".to_owned(), database_url),
            (
                "AUTH_SERVICE_KAFKA__BOOTSTRAP_SERVERS".to_owned(),
                testing::kafka().bootstrap_servers,
            ),
            (
                "AUTH_SERVICE_KAFKA__SETTINGS__SASL_PASSWORD".to_owned(),
                "kafka-s3cret".to_owned(),
            ),
            (
                "AUTH_SERVICE_FEED__TOKEN".to_owned(),
                "feed-t0ken".to_owned(),
            ),
            (
                "AUTH_SERVICE_FEED__URL".to_owned(),
                "http://reader:feed-t0ken@127.0.0.1:9/events".to_owned(),
            ),
            (
                "AUTH_SERVICE_RECONCILE__TOKEN".to_owned(),
                "snapshot-t0ken".to_owned(),
            ),
            (
                "AUTH_SERVICE_RECONCILE__SNAPSHOT_URL".to_owned(),
                "http://127.0.0.1:9/snapshot?token=snapshot-t0ken".to_owned(),
            ),
            (
                "AUTH_SERVICE_ALERT__WEBHOOK_URL".to_owned(),
                "http://127.0.0.1:9/hooks/hook-t0ken".to_owned(),
            ),
        ]
    };
    let assert_clean = |what: &str, out: &str| {
        for secret in SECRETS {
            assert!(!out.contains(secret), "{what} leaks {secret}:\n{out}");
        }
    };
    // A database that refuses the password, with debug logs on.
    let refused = db
        .url()
        .replacen("postgres://", "postgres://nobody:db-hunter2@", 1);
    let (code, out, err) = run(&secret_env(refused.clone()), &["serve"]).await;
    assert_ne!(code, Some(0), "{err}");
    assert_clean("serve with a bad database", &format!("{out}{err}"));
    // A bad setting next to the secrets.
    let mut env = secret_env(refused);
    env.push(("AUTH_SERVICE_SESSION_TTL_SECS".to_owned(), "1".to_owned()));
    let (code, out, err) = run(&env, &["serve"]).await;
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains("session_ttl_secs"), "{err}");
    assert_clean("serve with a bad setting", &format!("{out}{err}"));
    // A reconciliation and an alert that fail to reach anything, with a working database.
    let (code, _, err) = run(&secret_env(db.url().to_owned()), &["migrate"]).await;
    assert_eq!(code, Some(0), "{err}");
    let (code, out, err) = run(&secret_env(db.url().to_owned()), &["reconcile"]).await;
    assert_eq!(code, Some(1), "{err}");
    assert_clean("reconcile", &format!("{out}{err}"));
    // The feed consumer reaching a dead feed, logged at debug, until SIGTERM.
    let mut env = secret_env(db.url().to_owned());
    env.push(("AUTH_SERVICE_TRANSPORT".to_owned(), "feed".to_owned()));
    env.push(("AUTH_SERVICE_LISTEN".to_owned(), "127.0.0.1:0".to_owned()));
    let mut child = tokio::process::Command::new(EXE)
        .arg("serve")
        .envs(env.iter().map(|(k, v)| (k, v)))
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let mut lines = tokio::io::AsyncBufReadExt::lines(tokio::io::BufReader::new(stderr));
    let mut seen = String::new();
    // Read until the consumer has failed to reach the feed a few times.
    while seen.matches("feed unreachable").count() < 2 {
        match tokio::time::timeout(Duration::from_secs(30), lines.next_line()).await {
            Ok(Ok(Some(line))) => {
                seen.push_str(&line);
                seen.push('\n');
            }
            other => panic!("the feed consumer never reported the dead feed ({other:?}):\n{seen}"),
        }
    }
    let status = testing::terminate(child, Duration::from_secs(30))
        .await
        .unwrap();
    assert!(status.success(), "exit status {status}");
    assert_clean("the feed consumer's logs", &seen);
}

/// A consumer that stops while the service serves takes the service down with it: here the
/// pulled feed serves a message that cannot be decoded and the consumer halts (its default).
/// The process must not live on without consuming: readiness fails with the reason, and it
/// exits non-zero so its orchestrator restarts it (and an operator is alerted).
#[tokio::test(flavor = "multi_thread")]
async fn a_consumer_that_stops_fails_readiness_and_exits_non_zero() {
    use base64::Engine as _;
    let db = TestDatabase::create().await;
    let stop = ferrybox::CancellationToken::new();
    let event = ferrybox::feed::FeedEvent {
        position: 1,
        id: uuid::Uuid::new_v4(),
        topic: "users".into(),
        key: "k".into(),
        message_type: "com.ferrybox.user.UserRegistered".into(),
        headers: ferrybox::OutgoingMessage {
            id: ferrybox::MessageId::new(),
            topic: "users".into(),
            key: "k".into(),
            message_type: "com.ferrybox.user.UserRegistered".into(),
            entity_version: 1,
            occurred_at: ferrybox::message::now(),
            payload: Vec::new(),
            headers: Default::default(),
        }
        .kafka_headers("user-service"),
        payload: base64::engine::general_purpose::STANDARD.encode(b"\xde\xad\xbe\xef"),
    };
    let page = serde_json::json!({ "events": [event], "next": 1, "head": 1 });
    let feed = testing::serve(
        axum::Router::new().route(
            "/events",
            axum::routing::get(move || {
                let page = page.clone();
                async move { axum::Json(page) }
            }),
        ),
        &stop,
    )
    .await;
    let mut env = testing::service_env("AUTH_SERVICE_", db.url());
    env.push((
        "AUTH_SERVICE_FEED__URL".to_owned(),
        format!("{feed}/events"),
    ));
    env.push((
        "AUTH_SERVICE_RECONCILE__INTERVAL_MS".to_owned(),
        "0".to_owned(),
    ));
    let out = tokio::time::timeout(
        Duration::from_secs(60),
        tokio::process::Command::new(EXE)
            .args(["--transport", "feed", "serve"])
            .envs(env.iter().map(|(k, v)| (k, v)))
            .output(),
    )
    .await
    .expect("the service stops by itself")
    .unwrap();
    let log = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{log}");
    assert!(log.contains("consumer stopped"), "{log}");
    assert!(log.contains("halted"), "{log}");
    stop.cancel();
}

#[test]
fn check_config_prints_the_effective_settings_without_secrets() {
    const SECRETS: [&str; 6] = [
        "db-hunter2",
        "kafka-s3cret",
        "feed-t0ken",
        "snapshot-t0ken",
        "hook-t0ken",
        "signing-secret-of-at-least-32-bytes!",
    ];
    let (default, _) = testing::printed_settings(EXE.as_ref(), &[]);
    assert_eq!(default["listen"], "127.0.0.1:8082");
    assert_eq!(default["inbox"]["group_id"], "auth-service");
    assert_eq!(default["transport"], "kafka");
    assert_eq!(default["feed"]["on_undecodable"], "halt");
    assert_eq!(default["alert"]["webhook_url"], serde_json::Value::Null);

    let (printed, output) = testing::printed_settings(
        EXE.as_ref(),
        &[
            (
                "AUTH_SERVICE_DATABASE__URL",
                "postgres://app:db-hunter2@db/auth",
            ),
            (
                "AUTH_SERVICE_KAFKA__SETTINGS__SASL_PASSWORD",
                "kafka-s3cret",
            ),
            ("AUTH_SERVICE_FEED__TOKEN", "feed-t0ken"),
            ("AUTH_SERVICE_RECONCILE__TOKEN", "snapshot-t0ken"),
            (
                "AUTH_SERVICE_ALERT__WEBHOOK_URL",
                "https://alerts.example.com/hooks/hook-t0ken",
            ),
            ("AUTH_SERVICE_TOKEN_SECRET", SECRETS[5]),
        ],
    );
    for secret in SECRETS {
        assert!(
            !output.contains(secret),
            "the print leaks {secret}:\n{output}"
        );
    }
    assert_eq!(printed["database"]["url"], "[redacted]");
    assert_eq!(printed["kafka"]["settings"]["sasl_password"], "[redacted]");
    assert_eq!(printed["feed"]["token"], "[redacted]");
    assert_eq!(printed["reconcile"]["token"], "[redacted]");
    assert_eq!(printed["alert"]["webhook_url"], "[redacted]");
    assert_eq!(printed["token_secret"], "[redacted]");
}

/// Every `AUTH_SERVICE_…=` example in the README, alone, sets exactly the setting it names.
#[test]
fn every_variable_the_readme_shows_sets_exactly_its_setting() {
    let readme = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../README.md"))
        .expect("the README");
    // The inbox always reads the users topic (Settings::load).
    let derived = [("users_topic.name", "inbox.topics")];
    let checked =
        testing::check_documented_variables(EXE.as_ref(), "AUTH_SERVICE_", &readme, &derived);
    eprintln!("checked {} examples: {checked:?}", checked.len());
}

/// `AUTH_SERVICE_CONFIG` names the settings file (`--config`); it is not a setting itself.
#[test]
fn the_config_variable_names_the_settings_file() {
    testing::assert_config_variable_names_the_file(EXE.as_ref(), "AUTH_SERVICE_");
}

/// The users topic is user-service's: started before it exists, auth-service refuses to start
/// and says who creates it, instead of creating it with its own guess at the partitions (and
/// the topic stays uncreated).
#[tokio::test(flavor = "multi_thread")]
async fn refuses_to_start_without_the_users_topic_and_never_creates_it() {
    let db = TestDatabase::create().await;
    let topic = testing::unique("never-created");
    let mut env = testing::service_env("AUTH_SERVICE_", db.url());
    env.push(("AUTH_SERVICE_USERS_TOPIC__NAME".to_owned(), topic.clone()));
    env.push((
        "AUTH_SERVICE_INBOX__GROUP_ID".to_owned(),
        testing::unique("auth"),
    ));
    let run = tokio::process::Command::new(EXE)
        .arg("serve")
        .env_clear()
        .envs(env)
        .kill_on_drop(true)
        .output();
    let out = tokio::time::timeout(Duration::from_secs(90), run)
        .await
        .expect("auth-service exits")
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "it started without the users topic");
    assert!(
        stderr.contains(&topic) && stderr.contains("user-service creates it"),
        "{stderr}"
    );
    let exists = ferrybox::kafka::check_consumed(&testing::kafka(), &[topic.as_str()], "x").await;
    assert!(
        exists.is_err(),
        "the users topic was created by its consumer"
    );
}
