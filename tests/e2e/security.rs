//! Login hardening: rate limits per account and per address, and no tell between an unknown
//! account and a wrong password.

use argon2::password_hash::PasswordHash;
use ferrybox::CancellationToken;
use ferrybox::testing::wait_until;
use ferrybox_e2e::{Api, CONVERGE, Stack};

#[tokio::test(flavor = "multi_thread")]
async fn logins_are_rate_limited_per_account_and_per_address() {
    let stack = Stack::start().await.unwrap();
    let api = Api::default();
    stack
        .register_cached("ada@example.com", "Ada", "analytical-engine")
        .await
        .unwrap();
    // An auth-service on the same cache with small budgets.
    let mut settings = stack.extra_auth_settings("limited");
    settings.login_limits.per_account_per_minute = 3;
    settings.login_limits.per_address_per_minute = 5;
    let app = auth_service::Application::build(settings).await.unwrap();
    let url = format!("http://{}", app.local_addr().unwrap());
    let stop = CancellationToken::new();
    let running = tokio::spawn(app.run(stop.clone()));

    for _ in 0..3 {
        let reply = api
            .login(&url, "ada@example.com", "wrong-guess")
            .await
            .unwrap();
        assert_eq!(reply.status, 401);
    }
    // The account's budget is spent: even the right password waits.
    let http = reqwest::Client::new();
    let limited = http
        .post(format!("{url}/login"))
        .json(&serde_json::json!({ "email": "ADA@example.com", "password": "analytical-engine" }))
        .send()
        .await
        .unwrap();
    assert_eq!(limited.status(), 429);
    let retry_after: u64 = limited.headers()["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!((1..=60).contains(&retry_after), "{retry_after}");
    let body: serde_json::Value = limited.json().await.unwrap();
    assert_eq!(body["error"]["code"], "too_many_attempts");
    // The address has one attempt left (four used), on any other account; then it waits too.
    let other = api
        .login(&url, "nobody@example.com", "guess")
        .await
        .unwrap();
    assert_eq!(other.status, 401);
    let other = api
        .login(&url, "someone@example.com", "guess")
        .await
        .unwrap();
    assert_eq!(other.status, 429, "{:?}", other.body);
    // The shared service, with its own budgets, still lets Ada in.
    let ok = api
        .login(&stack.auth_url, "ada@example.com", "analytical-engine")
        .await
        .unwrap();
    assert_eq!(ok.status, 200);

    stop.cancel();
    running.await.unwrap().unwrap();
    stack.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn an_unknown_account_costs_what_a_wrong_password_costs() {
    let stack = Stack::start().await.unwrap();
    let api = Api::default();
    let id = stack
        .register_cached("ada2@example.com", "Ada", "analytical-engine")
        .await
        .unwrap();
    #[derive(diesel::QueryableByName)]
    struct Hash {
        #[diesel(sql_type = diesel::sql_types::Text)]
        password_hash: String,
    }
    use diesel_async::{AsyncConnection, RunQueryDsl};
    let mut conn = diesel_async::AsyncPgConnection::establish(stack.auth_db.url())
        .await
        .unwrap();
    let stored: Hash = diesel::sql_query(format!(
        "SELECT password_hash FROM cached_users WHERE id = '{id}'"
    ))
    .get_result(&mut conn)
    .await
    .unwrap();
    // Same algorithm, version and cost parameters: verifying against the dummy hash is the
    // same work as verifying a real user's.
    let real = PasswordHash::new(&stored.password_hash).unwrap();
    let dummy = PasswordHash::new(auth_service::login::dummy_hash()).unwrap();
    assert_eq!(real.algorithm, dummy.algorithm);
    assert_eq!(real.version, dummy.version);
    assert_eq!(real.params, dummy.params);
    // And both answers are the same.
    let unknown = api
        .login(&stack.auth_url, "nobody@example.com", "analytical-engine")
        .await
        .unwrap();
    let wrong = api
        .login(&stack.auth_url, "ada2@example.com", "wrong-password")
        .await
        .unwrap();
    assert_eq!((unknown.status, &unknown.body), (wrong.status, &wrong.body));
    stack.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn changes_need_a_token_and_a_suspended_or_deleted_users_token_stops_working() {
    let stack = Stack::start().await.unwrap();
    let (anyone, service) = (Api::default(), Api::service());
    let mut ids = Vec::new();
    for (email, password) in [
        ("eve@example.com", "eves-password"),
        ("fay@example.com", "fays-password"),
    ] {
        ids.push(
            stack
                .register_cached(email, "Someone", password)
                .await
                .unwrap(),
        );
    }
    let (eve, fay) = (ids[0].clone(), ids[1].clone());
    let token = login_token(&stack, "eve@example.com", "eves-password").await;
    let patch = |id: &str, bearer: Option<&str>| {
        let (api, url, bearer) = (
            anyone.clone(),
            format!("{}/users/{id}", stack.user_url),
            bearer.map(str::to_owned),
        );
        async move {
            api.send(
                reqwest::Method::PATCH,
                &url,
                Some(serde_json::json!({ "name": "Changed" })),
                bearer.as_deref(),
            )
            .await
            .unwrap()
        }
    };

    // No token, a forged one, an expired one: 401. Someone else's account: 403.
    assert_eq!(patch(&eve, None).await.status, 401);
    let forged = signed(
        "another-secret-of-at-least-32-bytes!",
        &eve,
        chrono::Duration::minutes(5),
    );
    assert_eq!(patch(&eve, Some(&forged)).await.status, 401);
    let expired = signed(
        ferrybox_e2e::TOKEN_SECRET,
        &eve,
        -chrono::Duration::seconds(1),
    );
    assert_eq!(patch(&eve, Some(&expired)).await.status, 401);
    let other = patch(&fay, Some(&token)).await;
    assert_eq!((other.status, other.error_code()), (403, Some("forbidden")));
    let suspend = anyone
        .send(
            reqwest::Method::POST,
            &format!("{}/users/{eve}/suspend", stack.user_url),
            None,
            Some(&token),
        )
        .await
        .unwrap();
    assert_eq!(suspend.status, 403, "users cannot suspend, even themselves");
    // Eve's own token changes Eve.
    assert_eq!(patch(&eve, Some(&token)).await.status, 200);

    // The service suspends Eve: her token, good at auth-service until now, stops working at
    // user-service at once (it owns the users) and at auth-service once the event is applied.
    assert_eq!(session_status(&stack, &token).await, 200);
    let suspended = service
        .post(
            &format!("{}/users/{eve}/suspend", stack.user_url),
            serde_json::json!({}),
        )
        .await
        .unwrap();
    assert_eq!(suspended.status, 200);
    assert_eq!(patch(&eve, Some(&token)).await.status, 401);
    wait_until(CONVERGE, "auth-service revokes Eve's session", || async {
        session_status(&stack, &token).await == 401
    })
    .await;

    // Fay deletes herself with her own token; it then opens nothing anywhere.
    let fay_token = login_token(&stack, "fay@example.com", "fays-password").await;
    assert_eq!(session_status(&stack, &fay_token).await, 200);
    let deleted = anyone
        .send(
            reqwest::Method::DELETE,
            &format!("{}/users/{fay}", stack.user_url),
            None,
            Some(&fay_token),
        )
        .await
        .unwrap();
    assert_eq!(deleted.status, 204);
    assert_eq!(patch(&fay, Some(&fay_token)).await.status, 401);
    wait_until(CONVERGE, "auth-service revokes Fay's session", || async {
        session_status(&stack, &fay_token).await == 401
    })
    .await;
    stack.stop().await.unwrap();
}

/// Logs in on `stack`'s auth-service; the session token.
async fn login_token(stack: &Stack, email: &str, password: &str) -> String {
    let login = Api::default()
        .login(&stack.auth_url, email, password)
        .await
        .unwrap();
    assert_eq!(login.status, 200, "{:?}", login.body);
    login.body["token"].as_str().unwrap().to_owned()
}

/// What auth-service's `GET /session` answers for `token`.
async fn session_status(stack: &Stack, token: &str) -> u16 {
    Api::default()
        .send(
            reqwest::Method::GET,
            &format!("{}/session", stack.auth_url),
            None,
            Some(token),
        )
        .await
        .unwrap()
        .status
}

/// A token for `user` signed with `secret`, expiring `valid_for` from now (negative: expired).
fn signed(secret: &str, user: &str, valid_for: chrono::Duration) -> String {
    ferrybox::token::TokenKey::new(&secret.to_owned().into(), "auth-service")
        .unwrap()
        .issue(
            user.parse().unwrap(),
            uuid::Uuid::now_v7(),
            chrono::Utc::now() + valid_for,
        )
        .unwrap()
}
