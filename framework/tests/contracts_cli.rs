//! The `ferrybox-contracts` command: exit codes and messages offline, and the check against a
//! live Confluent-API registry (the local one).

use std::path::{Path, PathBuf};
use std::process::Output;

use ferrybox::testing;
use serde_json::json;

const EXE: &str = env!("CARGO_BIN_EXE_ferrybox-contracts");

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn run(args: &[&str]) -> (Option<i32>, String, String) {
    let Output {
        status,
        stdout,
        stderr,
    } = std::process::Command::new(EXE)
        .args(args)
        .current_dir(root())
        .output()
        .unwrap();
    (
        status.code(),
        String::from_utf8_lossy(&stdout).into_owned(),
        String::from_utf8_lossy(&stderr).into_owned(),
    )
}

#[test]
fn offline_check_passes_fails_and_errors_with_distinct_exit_codes() {
    let (code, out, _) = run(&["check"]);
    assert_eq!(code, Some(0));
    assert!(out.contains("contracts hold"), "{out}");

    let fixtures = "framework/tests/fixtures/contracts";
    let (code, _, err) = run(&[
        "check",
        "--schemas",
        &format!("{fixtures}/removed_field/schemas"),
        "--contracts",
        &format!("{fixtures}/consumer/contracts"),
    ]);
    assert_eq!(code, Some(1));
    assert!(
        err.contains("BREAKING p -> c: t/x.User v2: field 'email'"),
        "{err}"
    );

    let (code, _, err) = run(&["check", "--schemas", "no/such/folder"]);
    assert_eq!(code, Some(2));
    assert!(err.contains("no/such/folder"), "{err}");
}

async fn register(subject: &str, schema: &str) -> u16 {
    reqwest::Client::new()
        .post(format!(
            "{}/subjects/{subject}/versions",
            testing::registry_url()
        ))
        .header("content-type", "application/vnd.schemaregistry.v1+json")
        .body(json!({ "schema": schema }).to_string())
        .send()
        .await
        .unwrap()
        .status()
        .as_u16()
}

#[tokio::test(flavor = "multi_thread")]
async fn registry_check_reads_what_is_registered() {
    // auth-service's contract, pointed at a topic of this test's own.
    let topic = testing::unique("contracts").replace('_', "-");
    let dir = std::env::temp_dir().join(&topic);
    std::fs::create_dir_all(&dir).unwrap();
    let contracts = root().join("auth-service/contracts");
    for entry in std::fs::read_dir(&contracts).unwrap() {
        let path = entry.unwrap().path();
        let text = std::fs::read_to_string(&path)
            .unwrap()
            .replace("topic = \"users\"", &format!("topic = \"{topic}\""));
        std::fs::write(dir.join(path.file_name().unwrap()), text).unwrap();
    }
    let schemas = root().join("schemas/users");
    for (message, versions) in [
        ("UserRegistered", 2),
        ("UserUpdated", 1),
        ("UserSuspended", 1),
        ("UserDeleted", 1),
    ] {
        for v in 1..=versions {
            let text = std::fs::read_to_string(
                schemas.join(format!("com.ferrybox.user.{message}/v{v}.avsc")),
            )
            .unwrap();
            assert_eq!(
                register(&format!("{topic}-com.ferrybox.user.{message}"), &text).await,
                200
            );
        }
    }
    let dir_arg = dir.to_string_lossy().into_owned();
    let url = testing::registry_url();
    let (code, out, err) = run(&["check-registry", "--url", &url, "--contracts", &dir_arg]);
    assert_eq!(code, Some(0), "{out}{err}");
    assert!(out.contains("4 message(s) read"), "{out}");

    // Someone turns the subject's checks off and registers a version without `email`.
    let subject = format!("{topic}-com.ferrybox.user.UserRegistered");
    let config = reqwest::Client::new()
        .put(format!("{url}/config/{subject}"))
        .header("content-type", "application/vnd.schemaregistry.v1+json")
        .body(json!({ "compatibility": "NONE" }).to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(config.status(), 200);
    let no_email = r#"{"type":"record","name":"UserRegistered","namespace":"com.ferrybox.user","fields":[
        {"name":"user_id","type":"string"},{"name":"version","type":"long"},{"name":"name","type":"string"},
        {"name":"password_hash","type":"string"}]}"#;
    assert_eq!(register(&subject, no_email).await, 200);
    let (code, _, err) = run(&["check-registry", "--url", &url, "--contracts", &dir_arg]);
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains(&format!("-> auth-service: {topic}/com.ferrybox.user.UserRegistered v3: field 'email' is read but not written")), "{err}");
    std::fs::remove_dir_all(&dir).unwrap();
}
