//! Reconciliation end to end: auth-service's cache compared with user-service's snapshot.

use diesel_async::{AsyncConnection, AsyncPgConnection};
use ferrybox::CancellationToken;
use ferrybox::testing::{self, wait_until};
use ferrybox_e2e::{Api, CONVERGE, Stack, auth_settings, point_at_user_service, user_settings};

/// auth-service settings for one-off reconciliation runs against `stack`'s user-service.
fn reconcile_settings(stack: &Stack, webhook: Option<String>) -> auth_service::Settings {
    let mut settings = auth_settings(&stack.auth_db, &stack.topic);
    point_at_user_service(&mut settings, &stack.user_url);
    settings.alert.webhook_url = webhook.map(Into::into);
    settings
}

async fn cached(stack: &Stack, id: &str, column: &str) -> String {
    #[derive(diesel::QueryableByName)]
    struct V {
        #[diesel(sql_type = diesel::sql_types::Text)]
        v: String,
    }
    let mut conn = AsyncPgConnection::establish(stack.auth_db.url())
        .await
        .unwrap();
    use diesel_async::RunQueryDsl;
    diesel::sql_query(format!(
        "SELECT {column}::text AS v FROM cached_users WHERE id = '{id}'"
    ))
    .get_result::<V>(&mut conn)
    .await
    .map_or_else(|_| "<missing>".into(), |v| v.v)
}

/// Registers `n` users and waits until auth-service has cached them all.
async fn register(stack: &Stack, api: &Api, n: usize) -> Vec<String> {
    let mut ids = Vec::new();
    for i in 0..n {
        let user = api
            .register(
                &stack.user_url,
                &format!("user{i}@example.com"),
                &format!("User {i}"),
                &format!("password-{i}"),
            )
            .await
            .unwrap();
        ids.push(user["id"].as_str().unwrap().to_owned());
    }
    for id in &ids {
        wait_until(CONVERGE, "the user is cached", || async {
            api.cached_version(&stack.auth_url, id).await.unwrap() == Some(1)
        })
        .await;
    }
    ids
}

#[tokio::test(flavor = "multi_thread")]
async fn one_run_repairs_what_lost_messages_left_behind_and_counts_it() {
    let stack = Stack::start().await.unwrap();
    let api = Api::service();
    let ids = register(&stack, &api, 6).await;
    // A deletion that reaches the cache...
    let deleted = &ids[5];
    let reply = api
        .send(
            reqwest::Method::DELETE,
            &format!("{}/users/{deleted}", stack.user_url),
            None,
            None,
        )
        .await
        .unwrap();
    assert_eq!(reply.status, 204);
    wait_until(CONVERGE, "the deletion is applied", || async {
        cached(&stack, deleted, "status").await == "deleted"
    })
    .await;

    // ...then the damage: two users' messages lost, one user stale, the deletion lost, and a
    // user whose event was never sent at all (written straight into user-service's table).
    testing::execute(
        stack.auth_db.url(),
        &format!(
            "DELETE FROM cached_users WHERE id IN ('{}', '{}');
             UPDATE cached_users SET version = 0, name = 'Stale' WHERE id = '{}';
             UPDATE cached_users SET status = 'active', version = 1, email = 'user5@example.com',
                 name = 'User 5', password_hash = 'x' WHERE id = '{deleted}';",
            ids[0], ids[1], ids[2]
        ),
    )
    .await;
    let unsent = uuid::Uuid::now_v7().to_string();
    testing::execute(
        stack.user_db.url(),
        &format!(
            "INSERT INTO users (id, email, name, password_hash, status, version)
             SELECT '{unsent}', 'unsent@example.com', 'Unsent', password_hash, 'active', 1
             FROM users WHERE id = '{}'",
            ids[3]
        ),
    )
    .await;
    assert_eq!(
        api.login(&stack.auth_url, "user0@example.com", "password-0")
            .await
            .unwrap()
            .status,
        401,
        "the lost user cannot log in before the repair"
    );

    let settings = reconcile_settings(&stack, None);
    let report = auth_service::ops::reconcile(&settings, None, true)
        .await
        .unwrap();
    assert_eq!(
        (
            report.checked,
            report.repaired,
            report.in_sync,
            report.skipped_newer,
            report.unresolved
        ),
        (7, 5, 2, 0, 0),
        "{report:?}"
    );

    assert_eq!(cached(&stack, &ids[0], "version").await, "1");
    assert_eq!(cached(&stack, &ids[2], "name").await, "User 2");
    assert_eq!(cached(&stack, deleted, "status").await, "deleted");
    assert_eq!(cached(&stack, deleted, "version").await, "2");
    assert_eq!(cached(&stack, &unsent, "email").await, "unsent@example.com");
    let login = api
        .login(&stack.auth_url, "user0@example.com", "password-0")
        .await
        .unwrap();
    assert_eq!(login.status, 200, "the repaired user logs in again");

    // A second run finds nothing to do.
    let again = auth_service::ops::reconcile(&settings, None, true)
        .await
        .unwrap();
    assert_eq!(
        (again.checked, again.repaired, again.in_sync),
        (7, 0, 7),
        "{again:?}"
    );
    stack.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn an_old_snapshot_never_overwrites_newer_cache_entries_and_absence_proves_nothing() {
    let stack = Stack::start().await.unwrap();
    let api = Api::service();
    let ids = register(&stack, &api, 3).await;
    let file = std::env::temp_dir().join(format!("{}.ndjson", testing::unique("snapshot")));
    user_service::ops::export_snapshot(&user_settings(&stack.user_db, &stack.topic), &file, true)
        .await
        .unwrap();

    // After the snapshot: two users change, one is deleted, and the cache follows.
    for id in &ids[..2] {
        let reply = api
            .send(
                reqwest::Method::PATCH,
                &format!("{}/users/{id}", stack.user_url),
                Some(serde_json::json!({ "name": "Renamed" })),
                None,
            )
            .await
            .unwrap();
        assert_eq!(reply.status, 200);
    }
    let reply = api
        .send(
            reqwest::Method::DELETE,
            &format!("{}/users/{}", stack.user_url, ids[2]),
            None,
            None,
        )
        .await
        .unwrap();
    assert_eq!(reply.status, 204);
    wait_until(CONVERGE, "the changes are applied", || async {
        cached(&stack, &ids[0], "version").await == "2"
            && cached(&stack, &ids[1], "version").await == "2"
            && cached(&stack, &ids[2], "status").await == "deleted"
    })
    .await;
    // Two users the snapshot does not know: one cached just now (created after the snapshot),
    // one cached long before it (the producer has no trace of it: unresolved).
    let (recent, old) = (uuid::Uuid::now_v7(), uuid::Uuid::now_v7());
    testing::execute(
        stack.auth_db.url(),
        &format!(
            "INSERT INTO cached_users (id, email, name, password_hash, status, version, updated_at) VALUES
             ('{recent}', 'recent@example.com', 'Recent', 'x', 'active', 1, now() + interval '1 minute'),
             ('{old}', 'old@example.com', 'Old', 'x', 'active', 4, now() - interval '1 day')"
        ),
    )
    .await;

    let stop = CancellationToken::new();
    let (webhook, alerts) = testing::alert_sink(&stop).await;
    let settings = reconcile_settings(&stack, Some(webhook));
    let report = auth_service::ops::reconcile(&settings, Some(&file), false)
        .await
        .unwrap();
    assert_eq!(
        (
            report.checked,
            report.repaired,
            report.skipped_newer,
            report.unresolved
        ),
        (5, 0, 4, 1),
        "{report:?}"
    );
    assert_eq!(report.unresolved_entities[0].key, old.to_string());
    assert_eq!(cached(&stack, &ids[0], "name").await, "Renamed");
    assert_eq!(cached(&stack, &ids[2], "status").await, "deleted");
    assert_eq!(
        cached(&stack, &recent.to_string(), "status").await,
        "active"
    );
    assert_eq!(cached(&stack, &old.to_string(), "status").await, "active");
    let alerts = alerts.lock().unwrap().clone();
    assert_eq!(alerts.len(), 1, "{alerts:?}");
    assert_eq!(alerts[0].kind, "reconcile_unresolved");
    assert_eq!(alerts[0].details["unresolved"], 1);

    std::fs::remove_file(&file).unwrap();
    stop.cancel();
    stack.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn the_snapshot_and_the_feed_need_the_internal_token() {
    let stack = Stack::start().await.unwrap();
    let api = Api::service();
    for path in ["snapshot", "events"] {
        let url = format!("{}/{path}", stack.user_url);
        for bearer in [None, Some("wrong-token")] {
            let reply = api
                .send(reqwest::Method::GET, &url, None, bearer)
                .await
                .unwrap();
            assert_eq!(
                (reply.status, reply.error_code()),
                (401, Some("unauthorized")),
                "{path} with {bearer:?}"
            );
        }
        let reply = reqwest::Client::new()
            .get(&url)
            .bearer_auth(ferrybox_e2e::INTERNAL_TOKEN)
            .send()
            .await
            .unwrap();
        assert_eq!(reply.status(), 200, "{path} with the token");
    }
    // The public API does not need it.
    let reply = api
        .get(&format!("{}/health", stack.user_url))
        .await
        .unwrap();
    assert_eq!(reply.status, 200);
    stack.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn the_service_reconciles_on_its_schedule_and_reports_the_last_run() {
    let stack = Stack::start().await.unwrap();
    let api = Api::default();
    let ids = register(&stack, &api, 2).await;
    // A second auth-service on the same database, reconciling every 200 ms.
    let mut settings = stack.extra_auth_settings("scheduled");
    settings.reconcile.interval = std::time::Duration::from_millis(200);
    let app = auth_service::Application::build(settings).await.unwrap();
    let url = format!("http://{}", app.local_addr().unwrap());
    let stop = CancellationToken::new();
    let running = tokio::spawn(app.run(stop.clone()));

    testing::execute(
        stack.auth_db.url(),
        &format!("DELETE FROM cached_users WHERE id = '{}'", ids[0]),
    )
    .await;
    wait_until(
        CONVERGE,
        "a scheduled run repairs the lost user",
        || async { cached(&stack, &ids[0], "version").await == "1" },
    )
    .await;
    wait_until(CONVERGE, "the last report shows the repair", || async {
        let last = api.get(&format!("{url}/reconcile/last")).await.unwrap();
        last.status == 200 && last.body["checked"] == 2 && last.body["in_sync"] == 2
    })
    .await;
    stop.cancel();
    running.await.unwrap().unwrap();
    stack.stop().await.unwrap();
}
