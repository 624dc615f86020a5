//! `make demo`: the whole flow, visibly. Starts both service binaries against the local broker,
//! registry and PostgreSQL (which `make demo` brings up), drives user-service's API, shows each
//! event move (outbox, Kafka, inbox) and auth-service's cache converge, prints a summary and
//! stops what it started.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, bail, ensure};
use diesel::QueryableByName;
use diesel::sql_types::{BigInt, Integer, Nullable, Text};
use diesel_async::{AsyncConnection, AsyncPgConnection, RunQueryDsl};
use ferrybox::testing::{self, ServiceProcess, wait_until};
use ferrybox_e2e::{Api, CONVERGE, SERVICE_TOKEN, TOKEN_SECRET};
use serde_json::{Value, json};

const USER_DB: &str = "ferrybox_demo_user_service";
const AUTH_DB: &str = "ferrybox_demo_auth_service";
/// The token user-service requires on its internal endpoints in the demo.
const INTERNAL_TOKEN: &str = "demo-internal-token";

#[derive(QueryableByName, Debug)]
struct OutboxRow {
    #[diesel(sql_type = BigInt)]
    id: i64,
    #[diesel(sql_type = Text)]
    message_id: String,
    #[diesel(sql_type = Nullable<Integer>)]
    kafka_partition: Option<i32>,
    #[diesel(sql_type = Nullable<BigInt>)]
    kafka_offset: Option<i64>,
}

#[derive(QueryableByName)]
struct Count {
    #[diesel(sql_type = BigInt)]
    n: i64,
}

fn section(title: &str) {
    println!("\n== {title}");
}

fn database_url(name: &str) -> String {
    testing::admin_database_url()
        .rsplit_once('/')
        .map(|(base, _)| format!("{base}/{name}"))
        .unwrap_or_default()
}

async fn recreate_database(name: &str) -> anyhow::Result<()> {
    let mut admin = AsyncPgConnection::establish(&testing::admin_database_url()).await?;
    diesel::sql_query(format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
        .execute(&mut admin)
        .await?;
    diesel::sql_query(format!("CREATE DATABASE {name}"))
        .execute(&mut admin)
        .await?;
    Ok(())
}

fn binary(name: &str) -> anyhow::Result<PathBuf> {
    let dir = std::env::current_exe()?
        .parent()
        .context("no binary folder")?
        .to_path_buf();
    let path = dir.join(name);
    ensure!(
        path.exists(),
        "{} is missing: build it first (make demo does)",
        path.display()
    );
    Ok(path)
}

/// Waits until the outbox row for `message_type` and `key` at `version` is published; returns it.
async fn published(
    conn: &mut AsyncPgConnection,
    message_type: &str,
    key: &str,
    version: i64,
) -> anyhow::Result<OutboxRow> {
    let deadline = std::time::Instant::now() + CONVERGE;
    loop {
        let rows: Vec<OutboxRow> = diesel::sql_query(
            "SELECT id, message_id::text AS message_id, kafka_partition, kafka_offset \
             FROM ferrybox_outbox WHERE message_type = $1 AND message_key = $2 AND entity_version = $3 AND published_at IS NOT NULL",
        )
        .bind::<Text, _>(message_type)
        .bind::<Text, _>(key)
        .bind::<BigInt, _>(version)
        .load(conn)
        .await?;
        if let Some(row) = rows.into_iter().next() {
            return Ok(row);
        }
        if std::time::Instant::now() > deadline {
            bail!("{message_type} for {key} v{version} was not published within {CONVERGE:?}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

struct Demo {
    api: Api,
    user: String,
    auth: String,
    user_db: AsyncPgConnection,
    auth_db: AsyncPgConnection,
    /// auth-service's environment, for its operator commands.
    auth_env: Vec<(String, String)>,
}

impl Demo {
    /// Follows one event from the outbox through Kafka into auth-service's inbox and cache.
    async fn trace(
        &mut self,
        short_type: &str,
        user_id: &str,
        version: i64,
        expect_cached: bool,
    ) -> anyhow::Result<()> {
        let message_type = format!("com.ferrybox.user.{short_type}");
        let row = published(&mut self.user_db, &message_type, user_id, version).await?;
        println!(
            "   outbox #{:<3} {short_type:<14} v{version}  id {}  -> kafka partition {} offset {}",
            row.id,
            row.message_id,
            row.kafka_partition.unwrap_or(-1),
            row.kafka_offset.unwrap_or(-1)
        );
        let (auth_db, message_id) = (&mut self.auth_db, row.message_id.clone());
        let deadline = std::time::Instant::now() + CONVERGE;
        loop {
            let found: Count = diesel::sql_query(
                "SELECT count(*) AS n FROM ferrybox_inbox WHERE message_id = $1::uuid",
            )
            .bind::<Text, _>(&message_id)
            .get_result(auth_db)
            .await?;
            if found.n == 1 {
                break;
            }
            ensure!(
                std::time::Instant::now() < deadline,
                "{short_type} {message_id} never reached the inbox"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let cached = self
            .api
            .get(&format!("{}/users/{user_id}", self.auth))
            .await?;
        if expect_cached {
            ensure!(
                cached.body["version"] == json!(version),
                "cache not at v{version}: {:?}",
                cached.body
            );
            println!(
                "   inbox  applied {message_id}; cache: {} <{}> status={} v{}",
                cached.body["name"].as_str().unwrap_or("?"),
                cached.body["email"].as_str().unwrap_or("?"),
                cached.body["status"].as_str().unwrap_or("?"),
                cached.body["version"]
            );
        } else {
            ensure!(
                cached.status == 404,
                "deleted user still cached: {:?}",
                cached.body
            );
            println!("   inbox  applied {message_id}; cache: user removed");
        }
        Ok(())
    }

    async fn login(&self, email: &str, password: &str) -> anyhow::Result<u16> {
        let reply = self.api.login(&self.auth, email, password).await?;
        let outcome = match reply.status {
            200 => "accepted, token issued".to_owned(),
            s => format!("refused ({s} {})", reply.error_code().unwrap_or("?")),
        };
        println!("   login {email}: {outcome}");
        Ok(reply.status)
    }
}

async fn scenario(demo: &mut Demo) -> anyhow::Result<()> {
    let api = demo.api.clone();
    let user = demo.user.clone();

    section("Register three users (each: users row + UserRegistered in one transaction)");
    let mut ids = Vec::new();
    for (email, name, password) in [
        ("ada@example.com", "Ada Lovelace", "analytical-engine"),
        ("grace@example.com", "Grace Hopper", "compiler-pioneer"),
        ("alan@example.com", "Alan Turing", "universal-machine"),
    ] {
        let created = api.register(&user, email, name, password).await?;
        let id = created["id"].as_str().context("no id")?.to_owned();
        println!(" + POST /users {email} -> 201 {id}");
        demo.trace("UserRegistered", &id, 1, true).await?;
        ids.push(id);
    }
    let (ada, grace, alan) = (ids[0].clone(), ids[1].clone(), ids[2].clone());

    section("Update Ada's name (changes need a token: here an admin service's credential)");
    let reply = api
        .send(
            reqwest::Method::PATCH,
            &format!("{user}/users/{ada}"),
            Some(json!({ "name": "Ada, Countess of Lovelace" })),
            None,
        )
        .await?;
    ensure!(reply.status == 200, "update failed: {reply:?}");
    println!(" ~ PATCH /users/{ada} -> 200 v{}", reply.body["version"]);
    demo.trace("UserUpdated", &ada, 2, true).await?;

    section("Grace logs in, is suspended, and is refused");
    ensure!(
        demo.login("grace@example.com", "compiler-pioneer").await? == 200,
        "login should succeed"
    );
    let reply = api
        .post(
            &format!("{user}/users/{grace}/suspend"),
            json!({ "reason": "demo" }),
        )
        .await?;
    ensure!(reply.status == 200, "suspend failed: {reply:?}");
    println!(
        " ! POST /users/{grace}/suspend -> 200 status={}",
        reply.body["status"]
    );
    demo.trace("UserSuspended", &grace, 2, true).await?;
    ensure!(
        demo.login("grace@example.com", "compiler-pioneer").await? == 401,
        "login should be refused"
    );

    section("Delete Alan");
    let reply = api
        .send(
            reqwest::Method::DELETE,
            &format!("{user}/users/{alan}"),
            None,
            None,
        )
        .await?;
    ensure!(reply.status == 204, "delete failed: {reply:?}");
    println!(" - DELETE /users/{alan} -> 204");
    demo.trace("UserDeleted", &alan, 2, false).await?;

    section("A relay crash between the broker's ack and the mark: the message goes out twice");
    diesel::sql_query("UPDATE ferrybox_outbox SET published_at = NULL WHERE id = (SELECT min(id) FROM ferrybox_outbox)")
        .execute(&mut demo.user_db)
        .await?;
    println!(
        "   un-marked outbox #1 (as if the relay died before marking it); the relay republishes it"
    );
    wait_until(CONVERGE, "the duplicate is skipped", || async {
        api.inbox_stats(&demo.auth)
            .await
            .map(|s| s["duplicates"] == json!(1))
            .unwrap_or(false)
    })
    .await;
    println!("   auth-service found its id in the inbox and skipped it");

    section("The same events as a pulled feed (GET /events on user-service)");
    let page = api
        .send(
            reqwest::Method::GET,
            &format!("{user}/events?after=0&limit=3"),
            None,
            Some(INTERNAL_TOKEN),
        )
        .await?;
    ensure!(page.status == 200, "feed: {page:?}");
    for event in page.body["events"].as_array().context("no events")? {
        println!(
            "   position {:<3} {}  key {}",
            event["position"],
            event["type"].as_str().unwrap_or("?"),
            event["key"].as_str().unwrap_or("?")
        );
    }
    println!(
        "   ... head {}: run auth-service with --transport feed to consume these instead of Kafka",
        page.body["head"]
    );

    section("Damage auth-service's cache, then reconcile it with user-service's snapshot");
    diesel::sql_query(format!("DELETE FROM cached_users WHERE id = '{ada}'"))
        .execute(&mut demo.auth_db)
        .await?;
    diesel::sql_query(format!(
        "UPDATE cached_users SET status = 'active', version = 1 WHERE id = '{grace}'"
    ))
    .execute(&mut demo.auth_db)
    .await?;
    println!("   deleted Ada's cached row; set Grace back to active v1 (as if messages were lost)");
    ensure!(
        demo.login("grace@example.com", "compiler-pioneer").await? == 200,
        "the damaged cache lets suspended Grace in"
    );
    let output = tokio::process::Command::new(binary("auth-service")?)
        .arg("reconcile")
        .envs(demo.auth_env.iter().map(|(k, v)| (k, v)))
        .output()
        .await?;
    for line in String::from_utf8_lossy(&output.stdout).lines() {
        println!("   $ auth-service reconcile | {line}");
    }
    ensure!(
        output.status.success(),
        "reconcile failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let ada_cached = api.get(&format!("{}/users/{ada}", demo.auth)).await?;
    ensure!(
        ada_cached.body["version"] == json!(2),
        "Ada not repaired: {:?}",
        ada_cached.body
    );
    println!(
        "   cache: {} v{} is back",
        ada_cached.body["name"].as_str().unwrap_or("?"),
        ada_cached.body["version"]
    );
    ensure!(
        demo.login("grace@example.com", "compiler-pioneer").await? == 401,
        "Grace is suspended again"
    );
    Ok(())
}

async fn summary(demo: &mut Demo) -> anyhow::Result<Value> {
    let published: Count = diesel::sql_query(
        "SELECT count(*) AS n FROM ferrybox_outbox WHERE published_at IS NOT NULL",
    )
    .get_result(&mut demo.user_db)
    .await?;
    let stats = demo.api.inbox_stats(&demo.auth).await?;
    section("Summary");
    println!("   messages published         {}", published.n);
    println!("   messages applied           {}", stats["applied"]);
    println!("   duplicates skipped         {}", stats["duplicates"]);
    println!("   dead letters               {}", stats["dead_lettered"]);
    ensure!(
        stats["applied"] == json!(published.n),
        "applied {} != published {}",
        stats["applied"],
        published.n
    );
    ensure!(
        stats["dead_lettered"] == json!(0),
        "unexpected dead letters"
    );
    Ok(stats)
}

/// Prints where an operator looks, with a few live readings.
async fn where_to_look(demo: &Demo) -> anyhow::Result<()> {
    section("Where to look");
    let metric = |text: &str, name: &str| -> f64 {
        text.lines()
            .filter(|l| l.starts_with(name) && !l.starts_with('#'))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    };
    let user_metrics = demo
        .api
        .http_text(&format!("{}/metrics", demo.user))
        .await?;
    let auth_metrics = demo
        .api
        .http_text(&format!("{}/metrics", demo.auth))
        .await?;
    println!(
        "   {}/metrics        messaging_client_sent_messages_total = {}",
        demo.user,
        metric(&user_metrics, "messaging_client_sent_messages_total")
    );
    println!(
        "   {}/metrics        messaging_client_consumed_messages_total = {}",
        demo.auth,
        metric(&auth_metrics, "messaging_client_consumed_messages_total")
    );
    for url in [&demo.user, &demo.auth] {
        let ready = demo.api.get(&format!("{url}/health/ready")).await?;
        println!(
            "   {url}/health/ready   {} {}",
            ready.status, ready.body["checks"]
        );
    }
    println!(
        "   {}/inbox/stats    consumer counters and dead letters",
        demo.auth
    );
    println!(
        "   {}/reconcile/last the last scheduled reconciliation",
        demo.auth
    );
    println!("   user-service outbox status | outbox replay | snapshot --out FILE");
    println!("   auth-service dlq list | dlq redrive | reconcile | feed position");
    println!(
        "   traces: set OTEL_EXPORTER_OTLP_ENDPOINT (e.g. http://localhost:4318) on both services"
    );
    Ok(())
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let topic = format!("demo-users-{}", &testing::unique("run")[4..]);
    println!(
        "Ferrybox demo: user-service -> outbox -> relay -> Kafka ({topic}) -> inbox -> auth-service"
    );
    recreate_database(USER_DB).await?;
    recreate_database(AUTH_DB).await?;
    let env = |prefix: &str, database: &str| {
        let mut env = testing::service_env(prefix, &database_url(database));
        env.push((format!("{prefix}USERS_TOPIC__NAME"), topic.clone()));
        env.push((
            "RUST_LOG".to_owned(),
            std::env::var("RUST_LOG").unwrap_or_else(|_| "warn".into()),
        ));
        env
    };
    let mut user_env = env("USER_SERVICE_", USER_DB);
    // /snapshot and /events carry password hashes: only callers with this token get them.
    user_env.push(("USER_SERVICE_INTERNAL_TOKEN".into(), INTERNAL_TOKEN.into()));
    // Changes need a token: the demo acts as an admin service with the service credential;
    // users' own session tokens from auth-service are verified with the shared secret.
    user_env.push(("USER_SERVICE_SERVICE_TOKEN".into(), SERVICE_TOKEN.into()));
    user_env.push(("USER_SERVICE_TOKEN_SECRET".into(), TOKEN_SECRET.into()));
    let mut auth_env = env("AUTH_SERVICE_", AUTH_DB);
    auth_env.push(("AUTH_SERVICE_DATABASE__URL".into(), database_url(AUTH_DB)));
    auth_env.push((
        "AUTH_SERVICE_INBOX__GROUP_ID".into(),
        format!("{topic}-auth"),
    ));

    let start = Duration::from_secs(60);
    let user_service =
        ServiceProcess::start(&binary("user-service")?, &["serve"], &user_env, start).await?;
    // Where auth-service finds user-service's snapshot and feed.
    auth_env.push((
        "AUTH_SERVICE_RECONCILE__SNAPSHOT_URL".into(),
        format!("{}/snapshot", user_service.url),
    ));
    auth_env.push((
        "AUTH_SERVICE_FEED__URL".into(),
        format!("{}/events", user_service.url),
    ));
    auth_env.push(("AUTH_SERVICE_FEED__TOKEN".into(), INTERNAL_TOKEN.into()));
    auth_env.push(("AUTH_SERVICE_TOKEN_SECRET".into(), TOKEN_SECRET.into()));
    auth_env.push((
        "AUTH_SERVICE_RECONCILE__TOKEN".into(),
        INTERNAL_TOKEN.into(),
    ));
    let auth_service =
        match ServiceProcess::start(&binary("auth-service")?, &["serve"], &auth_env, start).await {
            Ok(s) => s,
            Err(e) => {
                user_service.terminate(Duration::from_secs(30)).await?;
                return Err(e.into());
            }
        };
    println!(
        "user-service at {}, auth-service at {}",
        user_service.url, auth_service.url
    );

    let mut demo = Demo {
        api: Api::service(),
        user: user_service.url.clone(),
        auth: auth_service.url.clone(),
        user_db: AsyncPgConnection::establish(&database_url(USER_DB)).await?,
        auth_db: AsyncPgConnection::establish(&database_url(AUTH_DB)).await?,
        auth_env: auth_env.clone(),
    };
    let outcome = match scenario(&mut demo).await {
        Ok(()) => match summary(&mut demo).await {
            Ok(_) => where_to_look(&demo).await,
            Err(e) => Err(e),
        },
        Err(e) => Err(e),
    };

    section("Stopping both services with SIGTERM");
    let stopped_user = user_service.terminate(Duration::from_secs(30)).await?;
    let stopped_auth = auth_service.terminate(Duration::from_secs(30)).await?;
    println!("   user-service exited {stopped_user}; auth-service exited {stopped_auth}");
    outcome?;
    ensure!(
        stopped_user.success() && stopped_auth.success(),
        "a service did not stop cleanly"
    );
    println!(
        "\nDemo finished: every change reached auth-service exactly once, and reconciliation repaired a damaged cache."
    );
    Ok(())
}
