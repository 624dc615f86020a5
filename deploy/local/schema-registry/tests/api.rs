//! The registry's REST API against a real database, over HTTP, as Confluent clients call it.

use ferrybox::CancellationToken;
use ferrybox::testing::TestDatabase;
use serde_json::{Value, json};

struct Registry {
    url: String,
    http: reqwest::Client,
    stop: CancellationToken,
    _db: TestDatabase,
}

impl Registry {
    async fn start() -> Self {
        let db = TestDatabase::create().await;
        let pool = db.pool();
        ferrybox::db::run_migrations(&pool, schema_registry::MIGRATIONS)
            .await
            .unwrap();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let stop = CancellationToken::new();
        tokio::spawn(schema_registry::serve(listener, pool, stop.clone()));
        Self {
            url,
            http: reqwest::Client::new(),
            stop,
            _db: db,
        }
    }

    async fn call(&self, method: reqwest::Method, path: &str, body: Option<Value>) -> (u16, Value) {
        let mut request = self.http.request(method, format!("{}{path}", self.url));
        if let Some(body) = body {
            request = request
                .header("content-type", "application/vnd.schemaregistry.v1+json")
                .body(body.to_string());
        }
        let response = request.send().await.unwrap();
        assert_eq!(
            response
                .headers()
                .get("content-type")
                .and_then(|v| v.to_str().ok()),
            Some("application/vnd.schemaregistry.v1+json")
        );
        let status = response.status().as_u16();
        (status, response.json().await.unwrap())
    }

    async fn get(&self, path: &str) -> (u16, Value) {
        self.call(reqwest::Method::GET, path, None).await
    }

    async fn post(&self, path: &str, body: Value) -> (u16, Value) {
        self.call(reqwest::Method::POST, path, Some(body)).await
    }

    async fn put(&self, path: &str, body: Value) -> (u16, Value) {
        self.call(reqwest::Method::PUT, path, Some(body)).await
    }

    async fn delete(&self, path: &str) -> (u16, Value) {
        self.call(reqwest::Method::DELETE, path, None).await
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

fn record(fields: &Value) -> Value {
    json!({ "schema": json!({ "type": "record", "name": "User", "namespace": "t", "fields": fields }).to_string() })
}

fn v1() -> Value {
    record(&json!([{ "name": "id", "type": "string" }]))
}

fn v2_optional() -> Value {
    record(&json!([
        { "name": "id", "type": "string" },
        { "name": "nick", "type": ["null", "string"], "default": null }
    ]))
}

fn v2_required() -> Value {
    record(&json!([{ "name": "id", "type": "string" }, { "name": "age", "type": "int" }]))
}

#[tokio::test(flavor = "multi_thread")]
async fn register_read_and_evolve_a_subject() {
    let r = Registry::start().await;
    assert_eq!(r.get("/subjects").await, (200, json!([])));

    let (status, body) = r.post("/subjects/users-value/versions", v1()).await;
    assert_eq!(status, 200);
    let id1 = body["id"].as_i64().unwrap();
    // Registering the same schema again returns the same id and no new version.
    assert_eq!(
        r.post("/subjects/users-value/versions", v1()).await,
        (200, json!({ "id": id1 }))
    );
    // The same schema under another subject shares the global id.
    assert_eq!(
        r.post("/subjects/other-value/versions", v1()).await,
        (200, json!({ "id": id1 }))
    );

    let (status, body) = r
        .post("/subjects/users-value/versions", v2_optional())
        .await;
    assert_eq!(status, 200);
    let id2 = body["id"].as_i64().unwrap();
    assert_ne!(id1, id2);

    assert_eq!(
        r.get("/subjects").await,
        (200, json!(["other-value", "users-value"]))
    );
    assert_eq!(
        r.get("/subjects/users-value/versions").await,
        (200, json!([1, 2]))
    );
    let (status, latest) = r.get("/subjects/users-value/versions/latest").await;
    assert_eq!(
        (status, latest["version"].as_i64(), latest["id"].as_i64()),
        (200, Some(2), Some(id2))
    );
    assert_eq!(latest["subject"], "users-value");
    let (_, first) = r.get("/subjects/users-value/versions/1").await;
    assert_eq!(first["id"].as_i64(), Some(id1));
    let (status, by_id) = r.get(&format!("/schemas/ids/{id1}")).await;
    assert_eq!(status, 200);
    assert_eq!(
        serde_json::from_str::<Value>(by_id["schema"].as_str().unwrap()).unwrap()["name"],
        "User"
    );
    assert_eq!(
        r.get(&format!("/schemas/ids/{id1}/subjects")).await,
        (200, json!(["other-value", "users-value"]))
    );

    // Lookup: which version holds this schema.
    let (status, found) = r.post("/subjects/users-value", v2_optional()).await;
    assert_eq!((status, found["version"].as_i64()), (200, Some(2)));
}

#[tokio::test(flavor = "multi_thread")]
async fn compatibility_is_enforced_and_testable() {
    let r = Registry::start().await;
    r.post("/subjects/s/versions", v1()).await;

    // BACKWARD by default: a new required field without default cannot read old data.
    let (status, body) = r.post("/subjects/s/versions", v2_required()).await;
    assert_eq!((status, body["error_code"].as_i64()), (409, Some(409)));
    assert!(
        body["message"].as_str().unwrap().contains("BACKWARD"),
        "{body}"
    );
    let (status, body) = r
        .post(
            "/compatibility/subjects/s/versions/latest?verbose=true",
            v2_required(),
        )
        .await;
    assert_eq!(
        (status, body["is_compatible"].as_bool()),
        (200, Some(false))
    );
    assert_eq!(body["messages"].as_array().map(Vec::len), Some(1));
    let (_, body) = r
        .post("/compatibility/subjects/s/versions/latest", v2_optional())
        .await;
    assert_eq!(body["is_compatible"], json!(true));

    // FORWARD on this subject: adding a required field is now fine.
    assert_eq!(
        r.put("/config/s", json!({ "compatibility": "FORWARD" }))
            .await,
        (200, json!({ "compatibility": "FORWARD" }))
    );
    assert_eq!(
        r.get("/config/s").await,
        (200, json!({ "compatibilityLevel": "FORWARD" }))
    );
    assert_eq!(r.post("/subjects/s/versions", v2_required()).await.0, 200);

    // The global level and its validation.
    assert_eq!(
        r.get("/config").await,
        (200, json!({ "compatibilityLevel": "BACKWARD" }))
    );
    let (status, body) = r
        .put("/config", json!({ "compatibility": "SIDEWAYS" }))
        .await;
    assert_eq!((status, body["error_code"].as_i64()), (422, Some(42203)));
    let (status, body) = r.get("/config/unconfigured").await;
    assert_eq!((status, body["error_code"].as_i64()), (404, Some(40408)));
    assert_eq!(
        r.get("/config/unconfigured?defaultToGlobal=true").await.1,
        json!({ "compatibilityLevel": "BACKWARD" })
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn errors_use_confluent_codes() {
    let r = Registry::start().await;
    let code = |reply: (u16, Value)| (reply.0, reply.1["error_code"].as_i64());
    assert_eq!(
        code(r.get("/subjects/missing/versions").await),
        (404, Some(40401))
    );
    assert_eq!(
        code(r.get("/subjects/missing/versions/latest").await),
        (404, Some(40401))
    );
    assert_eq!(code(r.get("/schemas/ids/999").await), (404, Some(40403)));
    r.post("/subjects/s/versions", v1()).await;
    assert_eq!(
        code(r.get("/subjects/s/versions/7").await),
        (404, Some(40402))
    );
    assert_eq!(
        code(r.get("/subjects/s/versions/zero").await),
        (422, Some(42202))
    );
    assert_eq!(
        code(r.post("/subjects/s", v2_optional()).await),
        (404, Some(40403))
    );
    assert_eq!(
        code(
            r.post("/subjects/s/versions", json!({ "schema": "{not json" }))
                .await
        ),
        (422, Some(42201))
    );
    assert_eq!(
        code(
            r.post(
                "/subjects/s/versions",
                json!({ "schema": "{\"type\":\"record\"}" })
            )
            .await
        ),
        (422, Some(42201))
    );
    assert_eq!(
        code(
            r.post(
                "/subjects/s/versions",
                json!({ "schema": "{}", "schemaType": "PROTOBUF" })
            )
            .await
        ),
        (422, Some(42201))
    );
    assert_eq!(code(r.get("/nowhere").await), (404, Some(404)));
}

#[tokio::test(flavor = "multi_thread")]
async fn the_ferrybox_codec_talks_to_it() {
    #[derive(serde::Serialize, serde::Deserialize, PartialEq, Debug)]
    struct Ping {
        id: String,
        version: i64,
    }
    impl ferrybox::Event for Ping {
        const MESSAGE_TYPE: &'static str = "t.Ping";
        const SCHEMA: &'static str = r#"{"type":"record","name":"Ping","namespace":"t","fields":[{"name":"id","type":"string"},{"name":"version","type":"long"}]}"#;
        fn key(&self) -> String {
            self.id.clone()
        }
        fn entity_version(&self) -> i64 {
            self.version
        }
    }
    let r = Registry::start().await;
    let codec = ferrybox::AvroCodec::new(&r.url);
    let id = codec.register::<Ping>("topic").await.unwrap();
    let ping = Ping {
        id: "k".into(),
        version: 3,
    };
    let bytes = codec.encode("topic", &ping).await.unwrap();
    assert_eq!(
        bytes[0], 0,
        "Confluent wire format starts with a zero magic byte"
    );
    assert_eq!(
        u32::from_be_bytes([bytes[1], bytes[2], bytes[3], bytes[4]]),
        id
    );
    // A fresh codec (empty cache) decodes by fetching the writer schema by id.
    let decoded = ferrybox::AvroCodec::new(&r.url)
        .decode(&bytes)
        .await
        .unwrap();
    assert_eq!(decoded.name.as_deref(), Some("t.Ping"));
    assert_eq!(decoded.into_typed::<Ping>().unwrap(), ping);
    assert_eq!(r.get("/subjects").await.1, json!(["topic-t.Ping"]));
    // An unknown schema id is a clear, non-retryable error.
    let mut unknown = bytes.clone();
    unknown[1..5].copy_from_slice(&9999u32.to_be_bytes());
    let err = ferrybox::AvroCodec::new(&r.url)
        .decode(&unknown)
        .await
        .unwrap_err();
    assert!(!err.is_retryable(), "{err}");
}

#[tokio::test(flavor = "multi_thread")]
async fn query_booleans_are_read_in_any_case() {
    let r = Registry::start().await;
    r.post("/subjects/s/versions", v1()).await;
    // Confluent's Python client sends Python's spelling: verbose=True, normalize=False.
    for spelling in ["True", "TRUE", "true", "tRuE"] {
        let (status, body) = r
            .post(
                &format!(
                    "/compatibility/subjects/s/versions/latest?normalize=False&verbose={spelling}"
                ),
                v2_required(),
            )
            .await;
        assert_eq!(status, 200, "verbose={spelling}: {body}");
        assert_eq!(body["is_compatible"], json!(false), "verbose={spelling}");
        assert_eq!(
            body["messages"].as_array().map(Vec::len),
            Some(1),
            "verbose={spelling}: {body}"
        );
    }
    for spelling in ["False", "FALSE", "false"] {
        assert_eq!(
            r.post(
                &format!("/compatibility/subjects/s/versions?verbose={spelling}"),
                v2_optional(),
            )
            .await,
            (200, json!({ "is_compatible": true })),
            "verbose={spelling}"
        );
    }
    let (status, found) = r
        .post("/subjects/s?normalize=False&deleted=False", v1())
        .await;
    assert_eq!((status, found["version"].as_i64()), (200, Some(1)));
    assert_eq!(
        r.post("/subjects/s/versions?normalize=True", v1()).await.0,
        200
    );
    assert_eq!(
        r.get("/subjects?deleted=False&deleted_only=False&offset=0&limit=-1")
            .await,
        (200, json!(["s"]))
    );
    assert_eq!(r.delete("/subjects/s").await, (200, json!([1])));
    assert_eq!(r.get("/subjects?deleted=True").await, (200, json!(["s"])));
    assert_eq!(
        r.delete("/subjects/s?permanent=True").await,
        (200, json!([1]))
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn every_rejection_is_a_confluent_json_error() {
    let r = Registry::start().await;
    r.post("/subjects/s/versions", v1()).await;
    let code = |reply: (u16, Value)| {
        assert!(
            reply.1["message"].is_string(),
            "no Confluent message: {}",
            reply.1
        );
        (reply.0, reply.1["error_code"].as_i64())
    };
    // A query the extractor rejects.
    assert_eq!(
        code(
            r.post(
                "/compatibility/subjects/s/versions/latest?verbose=maybe",
                v2_optional()
            )
            .await
        ),
        (400, Some(400))
    );
    assert_eq!(
        code(r.delete("/subjects/s?permanent=yes").await),
        (400, Some(400))
    );
    assert_eq!(
        code(r.get("/subjects?offset=first").await),
        (400, Some(400))
    );
    // A path parameter of the wrong type is, as in JAX-RS, a route that does not exist.
    assert_eq!(
        code(r.get("/schemas/ids/not-a-number").await),
        (404, Some(404))
    );
    assert_eq!(
        code(r.get("/schemas/ids/99999999999").await),
        (404, Some(404))
    );
    // An unknown route.
    assert_eq!(code(r.get("/no/such/route").await), (404, Some(404)));
    // A known route, the wrong method: 405, and the Allow header says which would do.
    assert_eq!(code(r.put("/subjects", json!({})).await), (405, Some(405)));
    assert_eq!(
        code(r.call(reqwest::Method::PATCH, "/config", None).await),
        (405, Some(405))
    );
    let response = r
        .http
        .delete(format!("{}/schemas/ids/1", r.url))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status().as_u16(), 405);
    let allow = response.headers()["allow"].to_str().unwrap().to_owned();
    assert!(allow.contains("GET"), "Allow: {allow}");
    // A body over the limit, and one that is not JSON.
    // axum's default limit is 2 MiB.
    let huge = json!({ "schema": "x".repeat(2 * 1024 * 1024 + 64 * 1024) });
    assert_eq!(
        code(r.post("/subjects/s/versions", huge).await),
        (413, Some(413))
    );
    let response = r
        .http
        .post(format!("{}/subjects/s/versions", r.url))
        .header("content-type", "application/vnd.schemaregistry.v1+json")
        .body("{\"schema\":")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status().as_u16(), 422);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["error_code"], json!(422), "{body}");
}

#[tokio::test(flavor = "multi_thread")]
async fn soft_and_hard_deletes_follow_confluent() {
    let r = Registry::start().await;
    let code = |reply: (u16, Value)| (reply.0, reply.1["error_code"].as_i64());
    r.post("/subjects/s/versions", v1()).await;
    r.post("/subjects/s/versions", v2_optional()).await;
    let (_, body) = r.post("/subjects/only-here/versions", v2_required()).await;
    let only_here = body["id"].as_i64().unwrap();
    r.put("/config/s", json!({ "compatibility": "FULL" })).await;

    // A version: soft, then hard; each in the wrong order is refused with Confluent's code.
    assert_eq!(
        code(r.delete("/subjects/s/versions/1?permanent=true").await),
        (404, Some(40407))
    );
    assert_eq!(r.delete("/subjects/s/versions/1").await, (200, json!(1)));
    assert_eq!(
        code(r.delete("/subjects/s/versions/1").await),
        (404, Some(40406))
    );
    assert_eq!(r.get("/subjects/s/versions").await, (200, json!([2])));
    assert_eq!(
        r.get("/subjects/s/versions?deleted=true").await,
        (200, json!([1, 2]))
    );
    assert_eq!(
        code(r.get("/subjects/s/versions/1").await),
        (404, Some(40402))
    );
    assert_eq!(
        r.get("/subjects/s/versions/1?deleted=true").await.1["version"],
        json!(1)
    );
    assert_eq!(
        r.delete("/subjects/s/versions/1?permanent=true").await,
        (200, json!(1))
    );
    assert_eq!(
        r.get("/subjects/s/versions?deleted=true").await,
        (200, json!([2]))
    );
    assert_eq!(
        code(r.delete("/subjects/s/versions/7").await),
        (404, Some(40402))
    );
    assert_eq!(
        code(r.delete("/subjects/missing/versions/1").await),
        (404, Some(40401))
    );

    // A subject: soft (its level goes with it), then hard.
    assert_eq!(
        code(r.delete("/subjects/s?permanent=true").await),
        (404, Some(40405))
    );
    assert_eq!(r.delete("/subjects/s").await, (200, json!([2])));
    assert_eq!(code(r.get("/config/s").await), (404, Some(40408)));
    assert_eq!(code(r.delete("/subjects/s").await), (404, Some(40404)));
    assert_eq!(
        r.get("/subjects?deleted=true").await,
        (200, json!(["only-here", "s"]))
    );
    assert_eq!(
        r.get("/subjects?deletedOnly=true").await,
        (200, json!(["s"]))
    );
    assert_eq!(
        r.delete("/subjects/s?permanent=true").await,
        (200, json!([2]))
    );
    assert_eq!(
        code(r.delete("/subjects/s?permanent=true").await),
        (404, Some(40401))
    );
    assert_eq!(
        r.get("/subjects?deleted=true").await,
        (200, json!(["only-here"]))
    );

    // A soft delete keeps the schema id readable; a hard delete of its last use removes it.
    r.delete("/subjects/only-here").await;
    assert_eq!(r.get(&format!("/schemas/ids/{only_here}")).await.0, 200);
    r.delete("/subjects/only-here?permanent=true").await;
    assert_eq!(
        code(r.get(&format!("/schemas/ids/{only_here}")).await),
        (404, Some(40403))
    );
    // A subject deleted for good starts again at version 1.
    r.post("/subjects/s/versions", v1()).await;
    assert_eq!(r.get("/subjects/s/versions").await, (200, json!([1])));
    assert_eq!(r.get("/schemas/types").await, (200, json!(["AVRO"])));
}

/// Confluent's own Python client (installed by `infra.sh registry-client`) passes the
/// conformance script against this registry: registration, lookups, compatibility, config,
/// deletes, error codes and the Avro serde.
#[tokio::test(flavor = "multi_thread")]
async fn confluents_python_client_passes_the_conformance_script() {
    let r = Registry::start().await;
    let local = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let install = tokio::process::Command::new("bash")
        .arg(local.join("infra.sh"))
        .arg("registry-client")
        .output()
        .await
        .expect("run infra.sh registry-client");
    assert!(
        install.status.success(),
        "infra.sh registry-client failed:\n{}",
        String::from_utf8_lossy(&install.stderr)
    );
    let python = String::from_utf8(install.stdout).unwrap();
    let python = python.trim().lines().last().expect("a python path");
    let script = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("conformance")
        .join("confluent_client.py");
    let run = tokio::time::timeout(
        std::time::Duration::from_secs(300),
        tokio::process::Command::new(python)
            .arg(&script)
            .arg(&r.url)
            .kill_on_drop(true)
            .output(),
    )
    .await
    .expect("the conformance script finishes within 5 minutes")
    .expect("run the conformance script");
    let stdout = String::from_utf8_lossy(&run.stdout);
    let stderr = String::from_utf8_lossy(&run.stderr);
    assert!(
        run.status.success(),
        "the conformance script failed ({}):\n--- stdout\n{stdout}\n--- stderr\n{stderr}",
        run.status
    );
    assert!(stdout.contains(" passed, 0 failed"), "{stdout}");
}
