//! Helpers shared by the end-to-end tests and the demo: both reference services running
//! against the real broker, registry and PostgreSQL, each with its own database and a topic of
//! its own, and a small HTTP client for their APIs.

pub mod monitoring;

use std::time::Duration;

use ferrybox::CancellationToken;
use ferrybox::testing::{self, TestDatabase};
use serde_json::{Value, json};

/// A workspace binary (`user-service`, `auth-service`) next to the running test executable:
/// cargo builds every package's binaries for the workspace's tests (`make test` does).
pub fn workspace_binary(name: &str) -> std::path::PathBuf {
    let exe = std::env::current_exe().expect("test binary path");
    let dir = exe
        .parent()
        .and_then(std::path::Path::parent)
        .expect("target directory");
    let path = dir.join(name);
    assert!(
        path.exists(),
        "{} is missing: build the workspace first (make test does)",
        path.display()
    );
    path
}

/// How long a test waits for the flow to converge before failing.
pub const CONVERGE: Duration = Duration::from_secs(60);

/// user-service and auth-service running in this process, wired to one fresh topic.
pub struct Stack {
    /// user-service's base URL.
    pub user_url: String,
    /// auth-service's base URL.
    pub auth_url: String,
    /// user-service's database.
    pub user_db: TestDatabase,
    /// auth-service's database.
    pub auth_db: TestDatabase,
    /// The users topic.
    pub topic: String,
    /// auth-service's consumer group (its metrics carry it).
    pub auth_group: String,
    shutdown: CancellationToken,
    tasks: Vec<tokio::task::JoinHandle<anyhow::Result<()>>>,
}

/// user-service settings for a test: port 0, its own database, `topic`, quick polling.
pub fn user_settings(db: &TestDatabase, topic: &str) -> user_service::Settings {
    let defaults = user_service::Settings::default();
    user_service::Settings {
        listen: ([127, 0, 0, 1], 0).into(),
        database: db.config(),
        kafka: testing::kafka(),
        schema_registry_url: testing::registry_url(),
        users_topic: ferrybox::TopicConfig {
            name: topic.to_owned(),
            ..defaults.users_topic
        },
        relay: ferrybox::RelayConfig {
            poll_interval: Duration::from_millis(20),
            ..defaults.relay
        },
        internal_token: Some(INTERNAL_TOKEN.into()),
        service_token: Some(SERVICE_TOKEN.into()),
        token_secret: Some(TOKEN_SECRET.into()),
        ..defaults
    }
}

/// The bearer token test user-services require on `/snapshot` and `/events`.
pub const INTERNAL_TOKEN: &str = "test-internal-token";
/// The service credential test user-services accept for any change.
pub const SERVICE_TOKEN: &str = "test-service-credential";
/// The secret test auth-services sign session tokens with, and test user-services verify them.
pub const TOKEN_SECRET: &str = "test-token-secret-of-at-least-32-bytes";

/// auth-service settings for a test: port 0, its own database and consumer group, `topic`.
pub fn auth_settings(db: &TestDatabase, topic: &str) -> auth_service::Settings {
    let mut s = auth_service::Settings::default().with_users_topic(topic);
    s.listen = ([127, 0, 0, 1], 0).into();
    s.database = db.config();
    s.kafka = testing::kafka();
    s.schema_registry_url = testing::registry_url();
    s.inbox.group_id = testing::unique("auth");
    s.token_secret = Some(TOKEN_SECRET.into());
    s
}

/// Points auth-service's feed and reconciler at the user-service at `user_url`, with
/// scheduled reconciliation off (tests run it on demand).
pub fn point_at_user_service(settings: &mut auth_service::Settings, user_url: &str) {
    settings.feed.url = format!("{user_url}/events");
    settings.feed.token = Some(INTERNAL_TOKEN.into());
    settings.reconcile.token = Some(INTERNAL_TOKEN.into());
    settings.feed.wait = Duration::from_secs(2);
    settings.reconcile.snapshot_url = Some(format!("{user_url}/snapshot"));
    settings.reconcile.interval = Duration::ZERO;
}

impl Stack {
    /// Starts both services in-process, auth-service consuming from Kafka.
    pub async fn start() -> anyhow::Result<Self> {
        Self::start_with(auth_service::config::Transport::Kafka).await
    }

    /// Starts both services in-process, auth-service reading user events through `transport`.
    pub async fn start_with(transport: auth_service::config::Transport) -> anyhow::Result<Self> {
        Self::start_tuned(transport, |_| {}, |_| {}).await
    }

    /// [`Stack::start_with`], with user-service's and auth-service's test settings changed by
    /// `tune_user` and `tune_auth` first.
    pub async fn start_tuned(
        transport: auth_service::config::Transport,
        tune_user: impl FnOnce(&mut user_service::Settings),
        tune_auth: impl FnOnce(&mut auth_service::Settings),
    ) -> anyhow::Result<Self> {
        let topic = testing::create_topic(3).await;
        let user_db = TestDatabase::create().await;
        let auth_db = TestDatabase::create().await;
        let mut user_settings = user_settings(&user_db, &topic);
        tune_user(&mut user_settings);
        let user = user_service::Application::build(user_settings).await?;
        let user_url = format!("http://{}", user.local_addr()?);
        let mut settings = auth_settings(&auth_db, &topic);
        settings.transport = transport;
        point_at_user_service(&mut settings, &user_url);
        tune_auth(&mut settings);
        let auth_group = settings.inbox.group_id.clone();
        let auth = auth_service::Application::build(settings).await?;
        let auth_url = format!("http://{}", auth.local_addr()?);
        let shutdown = CancellationToken::new();
        let tasks = vec![
            tokio::spawn(user.run(shutdown.child_token())),
            tokio::spawn(auth.run(shutdown.child_token())),
        ];
        Ok(Self {
            user_url,
            auth_url,
            user_db,
            auth_db,
            topic,
            auth_group,
            shutdown,
            tasks,
        })
    }

    /// Registers a user on user-service (open sign-up) and waits until auth-service has cached
    /// it; returns its id.
    pub async fn register_cached(
        &self,
        email: &str,
        name: &str,
        password: &str,
    ) -> anyhow::Result<String> {
        let api = Api::default();
        let user = api.register(&self.user_url, email, name, password).await?;
        let id = user["id"]
            .as_str()
            .ok_or_else(|| anyhow::anyhow!("no id in {user}"))?
            .to_owned();
        testing::wait_until(CONVERGE, "the user is cached", || async {
            api.cached_version(&self.auth_url, &id)
                .await
                .is_ok_and(|v| v == Some(1))
        })
        .await;
        Ok(id)
    }

    /// Settings for another auth-service on this stack's cache and user-service, in consumer
    /// group `group`, on a free port.
    pub fn extra_auth_settings(&self, group: &str) -> auth_service::Settings {
        let mut settings = auth_settings(&self.auth_db, &self.topic);
        point_at_user_service(&mut settings, &self.user_url);
        settings.inbox.group_id = testing::unique(group);
        settings
    }

    /// Stops both services and waits for them to drain.
    pub async fn stop(self) -> anyhow::Result<()> {
        self.stop_keeping_databases().await.map(drop)
    }

    /// Stops both services and hands back their databases: (user-service's, auth-service's).
    pub async fn stop_keeping_databases(self) -> anyhow::Result<(TestDatabase, TestDatabase)> {
        self.shutdown.cancel();
        for task in self.tasks {
            task.await??;
        }
        Ok((self.user_db, self.auth_db))
    }
}

/// A JSON HTTP client for the services' APIs.
#[derive(Clone, Default)]
pub struct Api {
    http: reqwest::Client,
    /// Sent when a request names no bearer token of its own.
    bearer: Option<String>,
}

/// A response's status and JSON body (`Value::Null` when empty or not JSON).
#[derive(Debug, Clone)]
pub struct Reply {
    /// HTTP status code.
    pub status: u16,
    /// Parsed body.
    pub body: Value,
}

impl Reply {
    /// The error code of a Ferrybox error body.
    pub fn error_code(&self) -> Option<&str> {
        self.body["error"]["code"].as_str()
    }
}

impl Api {
    /// A client that calls with the test user-services' service credential (it may change
    /// any user).
    pub fn service() -> Self {
        Self {
            bearer: Some(SERVICE_TOKEN.to_owned()),
            ..Self::default()
        }
    }

    /// Sends a request with an optional JSON body (and a bearer token: `bearer`, else this
    /// client's own).
    pub async fn send(
        &self,
        method: reqwest::Method,
        url: &str,
        body: Option<Value>,
        bearer: Option<&str>,
    ) -> anyhow::Result<Reply> {
        let mut request = self.http.request(method, url);
        if let Some(body) = body {
            request = request.json(&body);
        }
        if let Some(token) = bearer.or(self.bearer.as_deref()) {
            request = request.bearer_auth(token);
        }
        let response = request.send().await?;
        let status = response.status().as_u16();
        let bytes = response.bytes().await?;
        let body = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
        Ok(Reply { status, body })
    }

    /// GET.
    pub async fn get(&self, url: &str) -> anyhow::Result<Reply> {
        self.send(reqwest::Method::GET, url, None, None).await
    }

    /// POST with a JSON body.
    pub async fn post(&self, url: &str, body: Value) -> anyhow::Result<Reply> {
        self.send(reqwest::Method::POST, url, Some(body), None)
            .await
    }

    /// Registers a user; returns its JSON.
    pub async fn register(
        &self,
        user_url: &str,
        email: &str,
        name: &str,
        password: &str,
    ) -> anyhow::Result<Value> {
        let reply = self
            .post(
                &format!("{user_url}/users"),
                json!({ "email": email, "name": name, "password": password }),
            )
            .await?;
        anyhow::ensure!(reply.status == 201, "register {email}: {reply:?}");
        Ok(reply.body)
    }

    /// Logs in; the reply as is.
    pub async fn login(
        &self,
        auth_url: &str,
        email: &str,
        password: &str,
    ) -> anyhow::Result<Reply> {
        self.post(
            &format!("{auth_url}/login"),
            json!({ "email": email, "password": password }),
        )
        .await
    }

    /// auth-service's cached view of a user, when it has one at `version` or later.
    pub async fn cached_version(&self, auth_url: &str, id: &str) -> anyhow::Result<Option<i64>> {
        let reply = self.get(&format!("{auth_url}/users/{id}")).await?;
        Ok(if reply.status == 200 {
            reply.body["version"].as_i64()
        } else {
            None
        })
    }

    /// A GET whose body is text (`/metrics`).
    pub async fn http_text(&self, url: &str) -> anyhow::Result<String> {
        Ok(self.http.get(url).send().await?.text().await?)
    }

    /// auth-service's inbox counters.
    pub async fn inbox_stats(&self, auth_url: &str) -> anyhow::Result<Value> {
        Ok(self.get(&format!("{auth_url}/inbox/stats")).await?.body)
    }
}

/// A small keyed event for the fault-injection tests and their worker process.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Tick {
    /// The entity (and Kafka key).
    pub key: String,
    /// Its version: 1, 2, 3, ... per key.
    pub version: i64,
}

impl ferrybox::Event for Tick {
    const MESSAGE_TYPE: &'static str = "com.ferrybox.test.Tick";
    const SCHEMA: &'static str = r#"{"type":"record","name":"Tick","namespace":"com.ferrybox.test",
        "fields":[{"name":"key","type":"string"},{"name":"version","type":"long"}]}"#;
    fn key(&self) -> String {
        self.key.clone()
    }
    fn entity_version(&self) -> i64 {
        self.version
    }
}

/// The table the inbox worker's handler appends to: one row per application, with no unique
/// constraint, so a message applied twice would show up twice.
pub const APPLIED_TABLE: &str = "CREATE TABLE applied (seq BIGSERIAL PRIMARY KEY, \
    message_id UUID NOT NULL, key TEXT NOT NULL, version BIGINT NOT NULL, worker TEXT NOT NULL)";
