use ferrybox_e2e::{Api, Stack};
use serde_json::json;

#[tokio::test(flavor = "multi_thread")]
async fn bad_requests_get_clear_4xx_errors_and_never_a_500() {
    let stack = Stack::start().await.unwrap();
    let api = Api::service();
    let http = reqwest::Client::new();
    let user = stack.user_url.clone();
    let auth = stack.auth_url.clone();

    let raw = |method: reqwest::Method, url: String, content_type: &'static str, body: Vec<u8>| {
        let http = http.clone();
        async move {
            let r = http
                .request(method, url)
                .header("content-type", content_type)
                .body(body)
                .send()
                .await
                .unwrap();
            let status = r.status().as_u16();
            let body: serde_json::Value = r.json().await.unwrap_or_default();
            (status, body["error"]["code"].as_str().map(str::to_owned))
        }
    };
    let code = |s: &str| Some(s.to_owned());

    // Malformed JSON, wrong content type, oversize body.
    assert_eq!(
        raw(
            reqwest::Method::POST,
            format!("{user}/users"),
            "application/json",
            b"{\"email\":".to_vec()
        )
        .await,
        (400, code("malformed_json"))
    );
    assert_eq!(
        raw(
            reqwest::Method::POST,
            format!("{user}/users"),
            "text/plain",
            b"{}".to_vec()
        )
        .await,
        (415, code("unsupported_media_type"))
    );
    let huge = format!(
        r#"{{"email":"a@example.com","name":"{}","password":"longenough"}}"#,
        "x".repeat(64 * 1024)
    );
    assert_eq!(
        raw(
            reqwest::Method::POST,
            format!("{user}/users"),
            "application/json",
            huge.into_bytes()
        )
        .await,
        (413, code("payload_too_large"))
    );

    // Missing fields, unknown fields, invalid values.
    let missing = api
        .post(
            &format!("{user}/users"),
            json!({ "email": "a@example.com" }),
        )
        .await
        .unwrap();
    assert_eq!(
        (missing.status, missing.error_code()),
        (422, Some("invalid_body"))
    );
    let unknown = api.post(&format!("{user}/users"), json!({ "email": "a@example.com", "name": "A", "password": "longenough", "admin": true })).await.unwrap();
    assert_eq!(
        (unknown.status, unknown.error_code()),
        (422, Some("invalid_body"))
    );
    let email = api
        .post(
            &format!("{user}/users"),
            json!({ "email": "not-an-email", "name": "A", "password": "longenough" }),
        )
        .await
        .unwrap();
    assert_eq!(
        (email.status, email.error_code()),
        (422, Some("invalid_email"))
    );
    let password = api
        .post(
            &format!("{user}/users"),
            json!({ "email": "a@example.com", "name": "A", "password": "short" }),
        )
        .await
        .unwrap();
    assert_eq!(
        (password.status, password.error_code()),
        (422, Some("invalid_password"))
    );

    // Duplicate email, case-insensitively.
    let ada = api
        .register(&user, "ada@example.com", "Ada", "analytical-engine")
        .await
        .unwrap();
    let dup = api
        .post(
            &format!("{user}/users"),
            json!({ "email": "ADA@example.com", "name": "Ada 2", "password": "longenough" }),
        )
        .await
        .unwrap();
    assert_eq!((dup.status, dup.error_code()), (409, Some("email_taken")));

    // Unknown and malformed ids, an empty patch, an unknown route.
    let ada_id = ada["id"].as_str().unwrap();
    let unknown_id = uuid::Uuid::now_v7();
    assert_eq!(
        api.get(&format!("{user}/users/{unknown_id}"))
            .await
            .unwrap()
            .status,
        404
    );
    assert_eq!(
        api.get(&format!("{user}/users/not-a-uuid"))
            .await
            .unwrap()
            .status,
        404
    );
    assert_eq!(
        api.post(&format!("{user}/users/{unknown_id}/suspend"), json!({}))
            .await
            .unwrap()
            .status,
        404
    );
    assert_eq!(
        api.send(
            reqwest::Method::DELETE,
            &format!("{user}/users/{unknown_id}"),
            None,
            None
        )
        .await
        .unwrap()
        .status,
        404
    );
    let empty = api
        .send(
            reqwest::Method::PATCH,
            &format!("{user}/users/{ada_id}"),
            Some(json!({})),
            None,
        )
        .await
        .unwrap();
    assert_eq!(
        (empty.status, empty.error_code()),
        (422, Some("empty_patch"))
    );
    assert_eq!(api.get(&format!("{user}/nope")).await.unwrap().status, 404);

    // auth-service: malformed login, unknown user, missing token, unknown cached user.
    assert_eq!(
        raw(
            reqwest::Method::POST,
            format!("{auth}/login"),
            "application/json",
            b"nope".to_vec()
        )
        .await,
        (400, code("malformed_json"))
    );
    let nobody = api
        .login(&auth, "nobody@example.com", "whatever-password")
        .await
        .unwrap();
    assert_eq!(
        (nobody.status, nobody.error_code()),
        (401, Some("invalid_credentials"))
    );
    let no_token = Api::default()
        .get(&format!("{auth}/session"))
        .await
        .unwrap();
    assert_eq!(
        (no_token.status, no_token.error_code()),
        (401, Some("missing_token"))
    );
    let bad_token = api
        .send(
            reqwest::Method::GET,
            &format!("{auth}/session"),
            None,
            Some("forged"),
        )
        .await
        .unwrap();
    assert_eq!(bad_token.status, 401);
    assert_eq!(
        api.get(&format!("{auth}/users/{unknown_id}"))
            .await
            .unwrap()
            .status,
        404
    );

    // The rejected requests published nothing: only Ada's registration is in the outbox.
    let outbox_rows = ferrybox::testing::count(
        stack.user_db.url(),
        "SELECT count(*) AS n FROM ferrybox_outbox",
    )
    .await;
    assert_eq!(outbox_rows, 1);
    stack.stop().await.unwrap();
}
