use auth_service::config::Transport;
use ferrybox::testing::wait_until;
use ferrybox_e2e::{Api, CONVERGE, Stack};
use serde_json::json;

#[tokio::test(flavor = "multi_thread")]
async fn user_changes_flow_to_the_auth_cache_and_logins_follow_them() {
    scenario(Transport::Kafka).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn the_same_flow_works_through_the_pulled_event_feed() {
    scenario(Transport::Feed).await;
}

/// Registers, updates, suspends and deletes users on user-service; auth-service's cache and
/// logins follow, whichever way the events travel.
async fn scenario(transport: Transport) {
    let stack = Stack::start_with(transport).await.unwrap();
    let api = Api::service();
    let (user, auth) = (stack.user_url.clone(), stack.auth_url.clone());

    let ada = api
        .register(&user, "ada@example.com", "Ada", "analytical-engine")
        .await
        .unwrap();
    let bob = api
        .register(&user, "bob@example.com", "Bob", "bobs-password")
        .await
        .unwrap();
    let cyd = api
        .register(&user, "cyd@example.com", "Cyd", "cyds-password")
        .await
        .unwrap();
    let (ada_id, bob_id, cyd_id) = (
        ada["id"].as_str().unwrap(),
        bob["id"].as_str().unwrap(),
        cyd["id"].as_str().unwrap(),
    );

    // Update Ada's name and password.
    let updated = api
        .send(
            reqwest::Method::PATCH,
            &format!("{user}/users/{ada_id}"),
            Some(json!({ "name": "Ada L.", "password": "difference-engine" })),
            None,
        )
        .await
        .unwrap();
    assert_eq!(
        (updated.status, updated.body["version"].as_i64()),
        (200, Some(2))
    );

    // Bob logs in once his registration reached auth-service.
    wait_until(CONVERGE, "bob cached", || async {
        api.cached_version(&auth, bob_id).await.unwrap() == Some(1)
    })
    .await;
    let login = api
        .login(&auth, "bob@example.com", "bobs-password")
        .await
        .unwrap();
    assert_eq!(login.status, 200, "{login:?}");
    let token = login.body["token"].as_str().unwrap().to_owned();
    let session = api
        .send(
            reqwest::Method::GET,
            &format!("{auth}/session"),
            None,
            Some(&token),
        )
        .await
        .unwrap();
    assert_eq!(
        (session.status, session.body["user_id"].as_str()),
        (200, Some(bob_id))
    );

    // Suspend Bob: his login is refused and his token stops working once the event is applied.
    let suspended = api
        .post(
            &format!("{user}/users/{bob_id}/suspend"),
            json!({ "reason": "testing" }),
        )
        .await
        .unwrap();
    assert_eq!(
        (suspended.status, suspended.body["status"].as_str()),
        (200, Some("suspended"))
    );
    wait_until(CONVERGE, "bob suspended in cache", || async {
        api.cached_version(&auth, bob_id).await.unwrap() == Some(2)
    })
    .await;
    let refused = api
        .login(&auth, "bob@example.com", "bobs-password")
        .await
        .unwrap();
    assert_eq!(
        (refused.status, refused.error_code()),
        (401, Some("invalid_credentials"))
    );
    let revoked = api
        .send(
            reqwest::Method::GET,
            &format!("{auth}/session"),
            None,
            Some(&token),
        )
        .await
        .unwrap();
    assert_eq!(revoked.status, 401);

    // Delete Cyd: gone from both services.
    let deleted = api
        .send(
            reqwest::Method::DELETE,
            &format!("{user}/users/{cyd_id}"),
            None,
            None,
        )
        .await
        .unwrap();
    assert_eq!(deleted.status, 204);
    assert_eq!(
        api.get(&format!("{user}/users/{cyd_id}"))
            .await
            .unwrap()
            .status,
        404
    );
    wait_until(CONVERGE, "cyd deleted from cache", || async {
        api.cached_version(&auth, cyd_id).await.unwrap().is_none()
    })
    .await;
    assert_eq!(
        api.login(&auth, "cyd@example.com", "cyds-password")
            .await
            .unwrap()
            .status,
        401
    );

    // Ada's new password works and the old one does not.
    wait_until(CONVERGE, "ada updated in cache", || async {
        api.cached_version(&auth, ada_id).await.unwrap() == Some(2)
    })
    .await;
    let cached = api.get(&format!("{auth}/users/{ada_id}")).await.unwrap();
    assert_eq!(
        (cached.body["name"].as_str(), cached.body["status"].as_str()),
        (Some("Ada L."), Some("active"))
    );
    assert_eq!(
        api.login(&auth, "ada@example.com", "difference-engine")
            .await
            .unwrap()
            .status,
        200
    );
    assert_eq!(
        api.login(&auth, "ada@example.com", "analytical-engine")
            .await
            .unwrap()
            .status,
        401
    );

    // Six events (three registrations, an update, a suspension, a deletion), each applied once.
    wait_until(CONVERGE, "all six events applied", || async {
        api.inbox_stats(&auth).await.unwrap()["applied"] == json!(6)
    })
    .await;
    let stats = api.inbox_stats(&auth).await.unwrap();
    assert_eq!(
        (
            stats["duplicates"].as_u64(),
            stats["dead_lettered"].as_u64()
        ),
        (Some(0), Some(0))
    );
    let dlq = format!("{}.auth-service.dlq", stack.topic);
    let dlq_partitions = ferrybox::kafka::partition_count(&ferrybox::testing::kafka(), &dlq).await;
    match transport {
        // With Kafka, auth-service created its dead-letter topic at start-up, so a dead letter
        // can be published.
        Transport::Kafka => assert_eq!(dlq_partitions.unwrap(), 1),
        // Through the feed it never touches the broker (dead letters stay in its database).
        Transport::Feed => {
            assert!(
                dlq_partitions.is_err(),
                "no dead-letter topic without Kafka"
            );
            let position = ferrybox::testing::count(
                stack.auth_db.url(),
                "SELECT position AS n FROM ferrybox_feed_positions",
            )
            .await;
            assert_eq!(position, 6, "the feed position is at the sixth event");
            // Readiness checks the feed (with its token) instead of a broker.
            let ready = api
                .get(&format!("{}/health/ready", stack.auth_url))
                .await
                .unwrap();
            assert_eq!(ready.status, 200, "{:?}", ready.body);
            assert_eq!(ready.body["checks"]["feed"], "ok");
            assert!(ready.body["checks"].get("broker").is_none());
        }
    }
    stack.stop().await.unwrap();
}
