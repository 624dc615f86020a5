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

/// What axum and tower-http answer by themselves — a method the route does not have, a body
/// over the limit, a route that does not exist — is JSON with a code like every other error,
/// on every route of both services, the framework's own (`/events`, `/health/*`, `/metrics`)
/// included.
#[tokio::test(flavor = "multi_thread")]
async fn every_error_either_service_sends_is_json_with_a_code() {
    let stack = Stack::start().await.unwrap();
    let user = stack.user_url.clone();
    let auth = stack.auth_url.clone();
    let http = reqwest::Client::new();
    let api = Api::service();
    let ada = api
        .register(&user, "ada@example.com", "Ada", "analytical-engine")
        .await
        .unwrap();
    let ada_id = ada["id"].as_str().unwrap();

    // (status, error code, Allow header) of a request with the service credential, or with the
    // internal token for the endpoints other services call (`/events`, `/snapshot`: without it
    // they answer 401 before looking at the method).
    let send = |method: reqwest::Method, url: String, body: Vec<u8>| {
        let http = http.clone();
        async move {
            let internal = url.ends_with("/events") || url.ends_with("/snapshot");
            let token = if internal {
                ferrybox_e2e::INTERNAL_TOKEN
            } else {
                ferrybox_e2e::SERVICE_TOKEN
            };
            let response = http
                .request(method.clone(), &url)
                .bearer_auth(token)
                .header("content-type", "application/json")
                .body(body)
                .send()
                .await
                .unwrap();
            let status = response.status().as_u16();
            let content_type = response
                .headers()
                .get("content-type")
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned);
            let allow = response
                .headers()
                .get("allow")
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned);
            let text = response.text().await.unwrap();
            let body: serde_json::Value = serde_json::from_str(&text).unwrap_or_else(|_| {
                panic!("{method} {url}: {status} with a body that is not JSON: {text:?}")
            });
            assert_eq!(
                content_type.as_deref(),
                Some("application/json"),
                "{method} {url}: {status} {text}"
            );
            assert!(
                body["error"]["message"]
                    .as_str()
                    .is_some_and(|m| !m.is_empty()),
                "{method} {url}: no message in {body}"
            );
            let code = body["error"]["code"].as_str().map(str::to_owned);
            (status, code, allow)
        }
    };
    let code = |s: &str| Some(s.to_owned());

    // A method the route does not have: 405 method_not_allowed, and Allow says which do.
    let wrong_methods = [
        (reqwest::Method::PUT, format!("{user}/users"), "POST"),
        (reqwest::Method::GET, format!("{user}/users"), "POST"),
        (
            reqwest::Method::POST,
            format!("{user}/users/{ada_id}"),
            "PATCH",
        ),
        (
            reqwest::Method::PUT,
            format!("{user}/users/{ada_id}"),
            "PATCH",
        ),
        (
            reqwest::Method::GET,
            format!("{user}/users/{ada_id}/suspend"),
            "POST",
        ),
        (reqwest::Method::POST, format!("{user}/events"), "GET"),
        (reqwest::Method::DELETE, format!("{user}/snapshot"), "GET"),
        (reqwest::Method::POST, format!("{user}/metrics"), "GET"),
        (reqwest::Method::POST, format!("{user}/health/ready"), "GET"),
        (reqwest::Method::PUT, format!("{auth}/login"), "POST"),
        (reqwest::Method::GET, format!("{auth}/login"), "POST"),
        (reqwest::Method::DELETE, format!("{auth}/session"), "GET"),
        (
            reqwest::Method::POST,
            format!("{auth}/users/{ada_id}"),
            "GET",
        ),
        (reqwest::Method::POST, format!("{auth}/inbox/stats"), "GET"),
        (reqwest::Method::POST, format!("{auth}/health/live"), "GET"),
    ];
    for (method, url, allowed) in wrong_methods {
        let (status, error, allow) = send(method.clone(), url.clone(), Vec::new()).await;
        assert_eq!(
            (status, error),
            (405, code("method_not_allowed")),
            "{method} {url}"
        );
        assert!(
            allow.as_deref().is_some_and(|a| a.contains(allowed)),
            "{method} {url}: Allow {allow:?} lacks {allowed}"
        );
    }

    // A body over the limit (16 KiB by default) on every POST and PATCH route: 413
    // payload_too_large, whether the handler reads JSON or raw bytes.
    let huge = format!(r#"{{"name":"{}"}}"#, "x".repeat(64 * 1024)).into_bytes();
    let writes = [
        (reqwest::Method::POST, format!("{user}/users")),
        (reqwest::Method::PATCH, format!("{user}/users/{ada_id}")),
        (
            reqwest::Method::POST,
            format!("{user}/users/{ada_id}/suspend"),
        ),
        (reqwest::Method::POST, format!("{auth}/login")),
    ];
    for (method, url) in writes {
        assert_eq!(
            send(method.clone(), url.clone(), huge.clone()).await,
            (413, code("payload_too_large"), None),
            "{method} {url}"
        );
    }

    // Routes that do not exist: 404 not_found, under the framework's prefixes too.
    for url in [
        format!("{user}/nope"),
        format!("{user}/users/{ada_id}/nope"),
        format!("{user}/health/nope"),
        format!("{auth}/nope"),
        format!("{auth}/inbox/nope"),
    ] {
        assert_eq!(
            send(reqwest::Method::GET, url.clone(), Vec::new()).await,
            (404, code("not_found"), None),
            "GET {url}"
        );
    }
    stack.stop().await.unwrap();
}
