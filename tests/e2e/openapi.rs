//! The OpenAPI documents both services serve at `/openapi.json` (generated from their handlers):
//! valid by the OpenAPI specification (openapi-spec-validator), and true of the running
//! services (schemathesis against them, with their real databases and broker): no 5xx, every
//! status, content type, header and body as documented, and every error JSON with a code (the
//! documents' `ErrorBody`).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use ferrybox_e2e::{Api, INTERNAL_TOKEN, SERVICE_TOKEN, Stack, monitoring};
use serde_json::Value;

/// The venv's `bin` with openapi-spec-validator and schemathesis (installed once per machine).
fn tools() -> PathBuf {
    monitoring::tool("openapi-tools")
}

/// `url`'s document, saved under the test's own directory.
async fn document(url: &str, dir: &Path, name: &str) -> (PathBuf, Value) {
    let doc: Value = reqwest::get(format!("{url}/openapi.json"))
        .await
        .unwrap()
        .error_for_status()
        .unwrap()
        .json()
        .await
        .unwrap();
    let path = dir.join(format!("{name}.openapi.json"));
    std::fs::write(&path, serde_json::to_vec_pretty(&doc).unwrap()).unwrap();
    (path, doc)
}

fn run(command: &mut Command) -> (bool, String) {
    let out = command.output().expect("run the tool");
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

/// schemathesis against the service at `url` with `document`, sending `bearer`, on the
/// operations `filter` selects: whether every check passed, and its report.
fn schemathesis_run(
    document: &Path,
    url: &str,
    bearer: &str,
    filter: &[&str],
    dir: &Path,
) -> (bool, String) {
    let name = document.file_stem().unwrap().to_string_lossy().into_owned();
    run(Command::new(tools().join("schemathesis"))
        .arg("run")
        .arg(document)
        .args(["--url", url])
        .args(["--header", &format!("Authorization: Bearer {bearer}")])
        .args([
            "--checks",
            "not_a_server_error,status_code_conformance,content_type_conformance,\
             response_headers_conformance,response_schema_conformance",
        ])
        .args(["--max-examples", "40", "--seed", "20261203"])
        .args(["--phases", "examples,coverage,fuzzing"])
        .args(["--request-timeout", "20", "--workers", "2"])
        .args(filter)
        .arg("--report-dir")
        .arg(dir.join(format!("{name}-{}", filter.len())))
        .arg("--no-color")
        .args(["--generation-database", "none"])
        // Its caches go to the test's own directory, not the repository.
        .current_dir(dir))
}

/// [`schemathesis_run`], which must pass.
fn schemathesis(document: &Path, url: &str, bearer: &str, filter: &[&str], dir: &Path) {
    let name = document.file_stem().unwrap().to_string_lossy().into_owned();
    let (passed, output) = schemathesis_run(document, url, bearer, filter, dir);
    assert!(passed, "schemathesis found problems in {name}:\n{output}");
    assert!(
        output.contains("passed"),
        "schemathesis ran nothing against {name}:\n{output}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn both_services_document_their_api_and_answer_as_documented() {
    // A short longest wait on the feed (schemathesis asks for waits of any length), and a
    // reconciliation on a schedule, so `/reconcile/last` has a report to answer.
    let stack = Stack::start_tuned(
        auth_service::config::Transport::Kafka,
        |user| user.feed.max_wait = Duration::from_millis(300),
        |auth| auth.reconcile.interval = Duration::from_millis(500),
    )
    .await
    .unwrap();
    // The user of the documents' examples (so the examples phase logs in with it), and a
    // session for auth-service's routes that need one.
    stack
        .register_cached("ada@example.com", "Ada Lovelace", "analytical-engine")
        .await
        .unwrap();
    let session = Api::default()
        .login(&stack.auth_url, "ada@example.com", "analytical-engine")
        .await
        .unwrap();
    ferrybox::testing::wait_until(ferrybox_e2e::CONVERGE, "a reconciliation ran", || async {
        Api::default()
            .get(&format!("{}/reconcile/last", stack.auth_url))
            .await
            .is_ok_and(|r| r.status == 200)
    })
    .await;
    assert_eq!(session.status, 200, "{:?}", session.body);
    let token = session.body["token"].as_str().unwrap().to_owned();

    let dir = std::env::temp_dir().join(format!("ferrybox-openapi-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let (user_doc_path, user_doc) = document(&stack.user_url, &dir, "user-service").await;
    let (auth_doc_path, auth_doc) = document(&stack.auth_url, &dir, "auth-service").await;

    // What each document covers: the service's own routes and the framework's it mounts.
    let paths = |doc: &Value| -> Vec<String> {
        doc["paths"].as_object().unwrap().keys().cloned().collect()
    };
    for path in [
        "/users",
        "/users/{id}",
        "/users/{id}/suspend",
        "/snapshot",
        "/events",
        "/events/numbered",
        "/health/live",
        "/health/ready",
        "/metrics",
    ] {
        assert!(
            paths(&user_doc).contains(&path.to_owned()),
            "user-service: {path}"
        );
    }
    for path in [
        "/login",
        "/session",
        "/users/{id}",
        "/inbox/stats",
        "/reconcile/last",
    ] {
        assert!(
            paths(&auth_doc).contains(&path.to_owned()),
            "auth-service: {path}"
        );
    }
    for doc in [&user_doc, &auth_doc] {
        assert_eq!(doc["openapi"].as_str().map(|v| &v[..2]), Some("3."));
        assert!(doc["components"]["schemas"]["ErrorBody"].is_object());
    }

    // Valid by the specification.
    for path in [&user_doc_path, &auth_doc_path] {
        let (valid, output) = run(Command::new(tools().join("openapi-spec-validator")).arg(path));
        assert!(valid, "{}: {output}", path.display());
    }
    // ...and the validator bites.
    let mut broken = user_doc.clone();
    broken["paths"]["/users"]["post"]["responses"]["201"]["content"]["application/json"]["schema"]
        ["$ref"] = "#/components/schemas/NoSuchSchema".into();
    let broken_path = dir.join("broken.openapi.json");
    std::fs::write(&broken_path, serde_json::to_vec(&broken).unwrap()).unwrap();
    let (valid, output) =
        run(Command::new(tools().join("openapi-spec-validator")).arg(&broken_path));
    assert!(!valid, "a dangling reference passed: {output}");

    // True of the running services.
    let internal = "^/(snapshot|events)";
    schemathesis(
        &user_doc_path,
        &stack.user_url,
        SERVICE_TOKEN,
        &["--exclude-path-regex", internal],
        &dir,
    );
    schemathesis(
        &user_doc_path,
        &stack.user_url,
        INTERNAL_TOKEN,
        &["--include-path-regex", internal],
        &dir,
    );
    schemathesis(&auth_doc_path, &stack.auth_url, &token, &[], &dir);
    // ...and schemathesis bites: a document that says `/health/live` answers JSON is refused.
    let mut wrong = auth_doc.clone();
    let ok = &mut wrong["paths"]["/health/live"]["get"]["responses"]["200"]["content"];
    *ok = serde_json::json!({"application/json": {"schema": {"type": "object"}}});
    let wrong_path = dir.join("wrong.openapi.json");
    std::fs::write(&wrong_path, serde_json::to_vec(&wrong).unwrap()).unwrap();
    let (passed, output) = schemathesis_run(
        &wrong_path,
        &stack.auth_url,
        &token,
        &["--include-path", "/health/live"],
        &dir,
    );
    assert!(!passed, "a wrong content type passed:\n{output}");

    std::fs::remove_dir_all(&dir).unwrap();
    stack.stop().await.unwrap();
}
