//! Test helpers (feature `test-util`): a fresh database and fresh topics per test, against the
//! real PostgreSQL and broker, and a condition-based wait.
//!
//! Where things are comes from the environment, with the local defaults:
//! `FERRYBOX_TEST_DATABASE_URL` (an admin URL, default `postgres://postgres@127.0.0.1:5432/postgres`),
//! `FERRYBOX_TEST_KAFKA` (default `127.0.0.1:9092`) and `FERRYBOX_TEST_REGISTRY`
//! (default `http://127.0.0.1:8081`).

use std::future::Future;
use std::time::{Duration, Instant};

use diesel_async::{AsyncConnection, AsyncPgConnection, RunQueryDsl};
use rand::Rng;

use crate::config::{ClientKind, DatabaseConfig, KafkaConfig, TopicConfig};
use crate::db::{self, PgPool};
use tokio_util::sync::CancellationToken;

/// The admin database URL tests create their databases from.
pub fn admin_database_url() -> String {
    std::env::var("FERRYBOX_TEST_DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".into())
}

/// The broker tests use.
pub fn kafka() -> KafkaConfig {
    KafkaConfig::new(
        std::env::var("FERRYBOX_TEST_KAFKA").unwrap_or_else(|_| "127.0.0.1:9092".into()),
    )
}

/// The schema registry tests use.
pub fn registry_url() -> String {
    std::env::var("FERRYBOX_TEST_REGISTRY").unwrap_or_else(|_| "http://127.0.0.1:8081".into())
}

/// Runs `f` with secrets in settings serialized as their values instead of `"[redacted]"`
/// (see [`crate::config::secret`]), so a test can compare two settings values in full.
pub fn with_secrets_exposed<R>(f: impl FnOnce() -> R) -> R {
    crate::config::secret::exposed(f)
}

/// A short random suffix for names.
pub fn unique(prefix: &str) -> String {
    let n: u64 = rand::rng().random();
    format!("{prefix}_{n:016x}")
}

/// A database of its own for one test, dropped when the value is dropped.
#[derive(Debug)]
pub struct TestDatabase {
    name: String,
    url: String,
    /// The admin URL it was made from (and is dropped through).
    admin: String,
}

impl TestDatabase {
    /// Creates an empty database with a random name.
    pub async fn create() -> Self {
        Self::create_in(&admin_database_url()).await
    }

    /// The same on the server of the admin URL `admin` (a [`PrivatePostgres`], say).
    pub async fn create_in(admin: &str) -> Self {
        let admin = admin.to_owned();
        let name = unique("fbtest");
        let mut conn = AsyncPgConnection::establish(&admin)
            .await
            .unwrap_or_else(|e| panic!("cannot reach PostgreSQL at {admin}: {e}"));
        diesel::sql_query(format!("CREATE DATABASE {name}"))
            .execute(&mut conn)
            .await
            .expect("create test database");
        let url = replace_database(&admin, &name);
        Self { name, url, admin }
    }

    /// Creates a database and runs the framework's migrations in it.
    pub async fn with_framework_tables() -> (Self, PgPool) {
        Self::with_framework_tables_in(&admin_database_url()).await
    }

    /// The same on the server of the admin URL `admin`.
    pub async fn with_framework_tables_in(admin: &str) -> (Self, PgPool) {
        let database = Self::create_in(admin).await;
        let pool = database.pool();
        db::run_migrations(&pool, db::MIGRATIONS)
            .await
            .expect("framework migrations");
        (database, pool)
    }

    /// The database's URL.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// A [`DatabaseConfig`] for it.
    pub fn config(&self) -> DatabaseConfig {
        DatabaseConfig::new(self.url.clone())
    }

    /// A pool for it.
    pub fn pool(&self) -> PgPool {
        db::pool(&self.config()).expect("pool")
    }
}

impl Drop for TestDatabase {
    fn drop(&mut self) {
        let admin = self.admin.clone();
        let name = self.name.clone();
        // For looking into a failed test: the database stays, its name on stderr.
        if std::env::var_os("FERRYBOX_TEST_KEEP_DATABASES").is_some() {
            eprintln!("[testing] kept database {name} (FERRYBOX_TEST_KEEP_DATABASES)");
            return;
        }
        // Drop runs outside any async context we could use: do it on a thread of its own.
        let dropped = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .ok()?;
            runtime.block_on(async {
                let mut conn = AsyncPgConnection::establish(&admin).await.ok()?;
                // A log relay's replication slot keeps its database from being dropped: its
                // sender is stopped and the slot dropped first (retried while the sender
                // lets go).
                for _ in 0..50 {
                    let left = diesel::sql_query(format!(
                        "SELECT pg_terminate_backend(active_pid) FROM pg_replication_slots \
                         WHERE database = '{name}' AND active_pid IS NOT NULL"
                    ))
                    .execute(&mut conn)
                    .await
                    .ok()?;
                    let dropped = diesel::sql_query(format!(
                        "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots \
                         WHERE database = '{name}' AND NOT active"
                    ))
                    .execute(&mut conn)
                    .await;
                    if left == 0 && dropped.is_ok() {
                        break;
                    }
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                diesel::sql_query(format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
                    .execute(&mut conn)
                    .await
                    .ok()
            })
        })
        .join();
        if !matches!(dropped, Ok(Some(_))) {
            eprintln!("warning: test database {} was not dropped", self.name);
        }
    }
}

fn replace_database(url: &str, database: &str) -> String {
    let (base, query) = match url.split_once('?') {
        Some((b, q)) => (b, Some(q)),
        None => (url, None),
    };
    let base = match base.rfind('/') {
        Some(i) if i > "postgres://".len() => &base[..i],
        _ => base,
    };
    match query {
        Some(q) => format!("{base}/{database}?{q}"),
        None => format!("{base}/{database}"),
    }
}

/// A PostgreSQL server of the test's own, made with `initdb` from the machine's newest
/// PostgreSQL binaries into a temporary folder and started on a free port with `settings`
/// (`name=value`), for tests that need server settings no other test may share (a tiny
/// `max_slot_wal_keep_size`, say). Stopped (immediately) and deleted when dropped. Run as
/// root, it runs as the `postgres` user, as PostgreSQL requires.
#[derive(Debug)]
pub struct PrivatePostgres {
    port: u16,
    data: std::path::PathBuf,
    bin: std::path::PathBuf,
}

impl PrivatePostgres {
    /// Makes and starts the server; waits until it accepts connections. (`initdb` and
    /// `pg_ctl` run on a blocking thread, off the test's runtime.)
    pub async fn start(settings: &[&str]) -> Self {
        let settings: Vec<String> = settings.iter().map(|&s| s.to_owned()).collect();
        tokio::task::spawn_blocking(move || Self::start_blocking(&settings))
            .await
            .expect("start a private PostgreSQL")
    }

    fn start_blocking(settings: &[String]) -> Self {
        let bin = std::fs::read_dir("/usr/lib/postgresql")
            .ok()
            .into_iter()
            .flatten()
            .filter_map(|entry| entry.ok().map(|e| e.path().join("bin")))
            .filter(|bin| bin.join("initdb").exists())
            .max_by_key(|bin| {
                bin.parent()
                    .and_then(|v| v.file_name()?.to_str()?.parse::<u32>().ok())
                    .unwrap_or(0)
            })
            .expect("PostgreSQL's binaries under /usr/lib/postgresql/<version>/bin");
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("free port")
            .port();
        let data = std::env::temp_dir().join(unique("ferrybox-pg"));
        let server = Self { port, data, bin };
        let data = server.data.to_string_lossy().into_owned();
        server.run("mkdir", &["-m", "700", "-p", &data]);
        server.run(
            &server.bin.join("initdb").to_string_lossy(),
            &["-D", &data, "-U", "postgres", "--auth=trust", "--no-sync"],
        );
        let mut options = format!(
            "-c listen_addresses=127.0.0.1 -c port={port} -c unix_socket_directories='' -c fsync=off"
        );
        for setting in settings {
            options.push_str(" -c ");
            options.push_str(setting);
        }
        let log = format!("{data}/server.log");
        server.run(
            &server.bin.join("pg_ctl").to_string_lossy(),
            &[
                "-D", &data, "-l", &log, "-o", &options, "-w", "-t", "60", "start",
            ],
        );
        server
    }

    /// The admin URL (database `postgres`, user `postgres`).
    pub fn admin_url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}/postgres", self.port)
    }

    /// Runs `program` as the cluster's owner; panics with its output when it fails.
    fn run(&self, program: &str, args: &[&str]) -> std::process::Output {
        let as_root = std::process::Command::new("id")
            .arg("-u")
            .output()
            .is_ok_and(|o| o.stdout.trim_ascii() == b"0");
        let mut command = if as_root {
            let mut c = std::process::Command::new("runuser");
            c.args(["-u", "postgres", "--", program]);
            c
        } else {
            std::process::Command::new(program)
        };
        let output = command
            .args(args)
            .output()
            .unwrap_or_else(|e| panic!("run {program}: {e}"));
        assert!(
            output.status.success(),
            "{program} {args:?} failed: {}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
        output
    }
}

impl Drop for PrivatePostgres {
    fn drop(&mut self) {
        let data = self.data.to_string_lossy().into_owned();
        let _ = std::panic::catch_unwind(|| {
            self.run(
                &self.bin.join("pg_ctl").to_string_lossy(),
                &["-D", &data, "-m", "immediate", "-w", "stop"],
            );
        });
        let _ = std::fs::remove_dir_all(&self.data);
    }
}

/// Panics with advice when nothing listens at the test broker's first address, instead of
/// letting the Kafka client time out a minute later.
fn require_broker(kafka: &KafkaConfig) {
    let first = kafka
        .bootstrap_servers
        .split(',')
        .next()
        .unwrap_or_default()
        .trim()
        .to_owned();
    let reachable = std::net::ToSocketAddrs::to_socket_addrs(first.as_str())
        .ok()
        .and_then(|mut addrs| addrs.next())
        .is_some_and(|addr| {
            std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(2)).is_ok()
        });
    assert!(
        reachable,
        "no Kafka broker at {first}: start the local environment with `make infra-up` (or run `make test`)"
    );
}

/// Creates a topic with a random name and `partitions` partitions on the test broker.
pub async fn create_topic(partitions: i32) -> String {
    let name = unique("fbtest").replace('_', "-");
    create_topic_named(&name, partitions).await;
    name
}

/// Creates topic `name` with `partitions` partitions on the test broker (again, after
/// [`delete_topic`]: a topic whose data the broker lost).
pub async fn create_topic_named(name: &str, partitions: i32) {
    require_broker(&kafka());
    let topic = TopicConfig {
        name: name.to_owned(),
        partitions,
        replication_factor: 1,
    };
    crate::kafka::ensure_topics(&kafka(), &[topic])
        .await
        .expect("create test topic");
}

/// Deletes `topic` (a benchmark's, whose messages would otherwise stay in an in-memory
/// broker's store for as long as it runs).
pub async fn delete_topic(topic: &str) -> crate::Result<()> {
    use rdkafka::admin::{AdminClient, AdminOptions};
    use rdkafka::client::DefaultClientContext;
    let admin: AdminClient<DefaultClientContext> =
        kafka().client_config(ClientKind::Admin).create()?;
    let options = AdminOptions::new().operation_timeout(Some(Duration::from_secs(10)));
    for result in admin.delete_topics(&[topic], &options).await? {
        result.map_err(|(topic, code)| crate::Error::Topic {
            topic,
            reason: format!("could not be deleted: {code}"),
        })?;
    }
    Ok(())
}

/// Runs `sql`, a query returning one row with a `BIGINT` column `n` (`SELECT count(*) AS n
/// ...`), on its own connection to `database_url`, and returns `n`.
pub async fn count(database_url: &str, sql: &str) -> i64 {
    #[derive(diesel::QueryableByName)]
    struct N {
        #[diesel(sql_type = diesel::sql_types::BigInt)]
        n: i64,
    }
    let mut conn = connect(database_url).await;
    diesel::sql_query(sql)
        .get_result::<N>(&mut conn)
        .await
        .unwrap_or_else(|e| panic!("{sql}: {e}"))
        .n
}

/// Runs `sql` (one or more statements) on its own connection to `database_url`.
pub async fn execute(database_url: &str, sql: &str) {
    use diesel_async::SimpleAsyncConnection;
    let mut conn = connect(database_url).await;
    conn.batch_execute(sql)
        .await
        .unwrap_or_else(|e| panic!("{sql}: {e}"));
}

/// Leaves `ids` ids of `consumer` in an id generation that is closed and summed up but kept:
/// the ids go into the newest generation, which is aged, and another consumer's retention pass
/// (with nothing committed) opens the next one. What a consumer that stopped for good leaves.
pub async fn kept_generation(pool: &PgPool, database_url: &str, consumer: &str, ids: u32) {
    execute(
        database_url,
        &format!(
            "INSERT INTO ferrybox_inbox (consumer, message_id, message_type, topic, kafka_partition, kafka_offset, generation) \
             SELECT '{consumer}', gen_random_uuid(), 't', 't', 0, n, \
                    (SELECT max(generation) FROM ferrybox_inbox_generations) \
             FROM generate_series(1, {ids}) AS n; \
             UPDATE ferrybox_inbox_generations SET opened_at = now() - interval '60 days' \
             WHERE generation = (SELECT max(generation) FROM ferrybox_inbox_generations)"
        ),
    )
    .await;
    let expired = crate::inbox::expire(
        pool,
        &format!("not-{consumer}"),
        &crate::inbox::Horizon::none(),
        Duration::from_secs(14 * 24 * 3600),
    )
    .await
    .expect("a retention pass");
    assert_eq!(expired.ids, 0, "nothing committed: nothing dropped");
}

/// Opens a transaction that holds vacuum back (it has a transaction id) on a connection of
/// its own to `database_url`: the connection, and its backend's pid. It stays open until the
/// connection runs `ROLLBACK` or is dropped.
pub async fn open_transaction(database_url: &str) -> (AsyncPgConnection, i32) {
    use diesel_async::SimpleAsyncConnection;
    #[derive(diesel::QueryableByName)]
    struct Pid {
        #[diesel(sql_type = diesel::sql_types::Integer)]
        pid: i32,
    }
    let mut conn = connect(database_url).await;
    conn.batch_execute("BEGIN")
        .await
        .expect("begin a transaction");
    // The transaction id is what holds vacuum back.
    let Pid { pid } = diesel::sql_query("SELECT pg_backend_pid() AS pid, txid_current() AS xid")
        .get_result(&mut conn)
        .await
        .expect("a transaction id and the backend's pid");
    (conn, pid)
}

/// A connection of its own to `database_url`.
async fn connect(database_url: &str) -> AsyncPgConnection {
    AsyncPgConnection::establish(database_url)
        .await
        .expect("connect to the test database")
}

/// Waits until `condition` returns true, checking every 20 ms; panics with `what` after
/// `timeout`. Tests wait on conditions like this, never on fixed sleeps.
pub async fn wait_until<F, Fut>(timeout: Duration, what: &str, mut condition: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let start = Instant::now();
    loop {
        if condition().await {
            return;
        }
        assert!(
            start.elapsed() < timeout,
            "timed out after {timeout:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::{documented_variables, replace_database};

    #[test]
    fn documented_variables_are_found_in_code_blocks_and_inline_code() {
        let doc = "Set `SVC_A__B=1` or `SVC_OTHER` (no value), not SVC_C=2.\n\
                   ```sh\n\
                   SVC_D__E=http://x:1/y     # a comment\n\
                   export SVC_F='quoted'\n\
                   OTHER_G=3\n\
                   svc_h=4\n\
                   ```\n\
                   SVC_I=5 outside code\n";
        assert_eq!(
            documented_variables(doc, "SVC_"),
            [
                ("SVC_A__B".to_owned(), "1".to_owned()),
                ("SVC_D__E".to_owned(), "http://x:1/y".to_owned()),
                ("SVC_F".to_owned(), "quoted".to_owned()),
            ]
        );
    }

    #[test]
    fn database_name_is_replaced() {
        assert_eq!(
            replace_database("postgres://u@h:5432/postgres", "x"),
            "postgres://u@h:5432/x"
        );
        assert_eq!(
            replace_database("postgres://u@h/db?sslmode=disable", "x"),
            "postgres://u@h/x?sslmode=disable"
        );
    }
}

/// Environment for a service binary built on Ferrybox whose settings read `<prefix>…`
/// variables: port 0, `database_url`, and the test broker and registry.
pub fn service_env(prefix: &str, database_url: &str) -> Vec<(String, String)> {
    vec![
        (format!("{prefix}LISTEN"), "127.0.0.1:0".to_owned()),
        (format!("{prefix}DATABASE__URL"), database_url.to_owned()),
        (
            format!("{prefix}KAFKA__BOOTSTRAP_SERVERS"),
            kafka().bootstrap_servers,
        ),
        (format!("{prefix}SCHEMA_REGISTRY_URL"), registry_url()),
    ]
}

/// What `program check-config --print` printed, run with only `PATH` and `env` in its
/// environment: the effective settings as JSON (secrets as `"[redacted]"`), and everything
/// it wrote (stdout then stderr, to look for leaked secrets in). Panics, with its output, when
/// it fails.
pub fn printed_settings(
    program: &std::path::Path,
    env: &[(&str, &str)],
) -> (serde_json::Value, String) {
    try_printed_settings(program, env).unwrap_or_else(|e| panic!("{e}"))
}

fn try_printed_settings(
    program: &std::path::Path,
    env: &[(&str, &str)],
) -> Result<(serde_json::Value, String), String> {
    let out = std::process::Command::new(program)
        .args(["check-config", "--print"])
        .env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .envs(env.iter().copied())
        .output()
        .map_err(|e| format!("run {}: {e}", program.display()))?;
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    if !out.status.success() {
        return Err(format!(
            "{} check-config --print with {env:?} failed ({}): {}",
            program.display(),
            out.status,
            stderr.trim()
        ));
    }
    let settings = serde_json::from_str(&stdout)
        .map_err(|e| format!("check-config --print printed no JSON ({e}):\n{stdout}"))?;
    Ok((settings, format!("{stdout}{stderr}")))
}

/// Every `<prefix>NAME=value` assignment `document` (a Markdown file) shows, in order: a line
/// of a fenced code block that starts with one (optionally after `export `; the value ends at
/// the first space, so a `# comment` after it is left out), or an `inline code` span that is
/// one.
pub fn documented_variables(document: &str, prefix: &str) -> Vec<(String, String)> {
    let assignment = |text: &str| -> Option<(String, String)> {
        let (name, value) = text.split_once('=')?;
        let is_name = name.starts_with(prefix)
            && name
                .chars()
                .all(|c| c.is_ascii_uppercase() || c.is_ascii_digit() || c == '_');
        is_name.then(|| (name.to_owned(), value.to_owned()))
    };
    let mut found = Vec::new();
    let mut in_code = false;
    for line in document.lines() {
        let line = line.trim_start();
        if line.starts_with("```") {
            in_code = !in_code;
        } else if in_code {
            let line = line.strip_prefix("export ").unwrap_or(line);
            if let Some((name, value)) = assignment(line) {
                let value = value.split_whitespace().next().unwrap_or_default();
                let value = ['\'', '"']
                    .iter()
                    .find_map(|q| value.strip_prefix(*q)?.strip_suffix(*q))
                    .unwrap_or(value);
                found.push((name, value.to_owned()));
            }
        } else {
            found.extend(line.split('`').skip(1).step_by(2).filter_map(assignment));
        }
    }
    found
}

/// The leaves of a JSON value by path (objects are descended into; arrays, strings, numbers,
/// booleans and nulls are leaves).
pub fn json_leaves(
    value: &serde_json::Value,
) -> std::collections::BTreeMap<Vec<String>, serde_json::Value> {
    fn walk(
        value: &serde_json::Value,
        path: &mut Vec<String>,
        out: &mut std::collections::BTreeMap<Vec<String>, serde_json::Value>,
    ) {
        match value {
            serde_json::Value::Object(map) => {
                for (key, value) in map {
                    path.push(key.clone());
                    walk(value, path, out);
                    path.pop();
                }
            }
            leaf => {
                out.insert(path.clone(), leaf.clone());
            }
        }
    }
    let mut out = std::collections::BTreeMap::new();
    walk(value, &mut Vec::new(), &mut out);
    out
}

/// Checks every `<prefix>…=value` example `document` shows against the service binary
/// `program` (built on [`crate::config::load`], with `check-config --print`): run with only
/// that variable set, the service accepts it, the setting the variable names
/// (`<PREFIX>SECTION__KEY` is `section.key`) prints as the value given (a secret prints as
/// `"[redacted]"`, and its value appears nowhere in the output), and no other setting moves
/// from the default print — except the settings `derived` says follow from it (pairs of
/// dotted paths: the variable's, and one the service derives from it). Panics listing every
/// example that fails; returns the examples checked.
pub fn check_documented_variables(
    program: &std::path::Path,
    prefix: &str,
    document: &str,
    derived: &[(&str, &str)],
) -> Vec<(String, String)> {
    let examples = documented_variables(document, prefix);
    assert!(
        !examples.is_empty(),
        "the document shows no {prefix}… variable"
    );
    let (default, _) = printed_settings(program, &[]);
    let default = json_leaves(&default);
    let text = |v: &serde_json::Value| match v {
        serde_json::Value::String(s) => s.clone(),
        other => other.to_string(),
    };
    let mut failures = Vec::new();
    for (name, value) in &examples {
        let example = format!("{name}={value}");
        let path: Vec<String> = name[prefix.len()..]
            .to_ascii_lowercase()
            .split("__")
            .map(str::to_owned)
            .collect();
        let dotted = path.join(".");
        let (printed, output) = match try_printed_settings(program, &[(name, value)]) {
            Ok(found) => found,
            Err(e) => {
                failures.push(format!("{example}: {e}"));
                continue;
            }
        };
        let printed = json_leaves(&printed);
        match printed.get(&path) {
            None => failures.push(format!("{example}: no setting {dotted} is printed")),
            Some(shown) if shown == crate::config::secret::REDACTED && value != shown => {
                // A secret: hidden, and nowhere in the output (short placeholders such as
                // `...` could match anything).
                if value.len() >= 8 && output.contains(value.as_str()) {
                    failures.push(format!("{example}: the secret is printed"));
                }
            }
            Some(shown) if text(shown) != *value => failures.push(format!(
                "{example}: {dotted} is {shown}, not the value given"
            )),
            Some(_) => {}
        }
        let allowed: Vec<&str> = std::iter::once(dotted.as_str())
            .chain(
                derived
                    .iter()
                    .filter(|(from, _)| *from == dotted)
                    .map(|(_, to)| *to),
            )
            .collect();
        let keys: std::collections::BTreeSet<&Vec<String>> =
            default.keys().chain(printed.keys()).collect();
        for key in keys {
            let moved = default.get(key) != printed.get(key);
            if moved && !allowed.contains(&key.join(".").as_str()) {
                failures.push(format!(
                    "{example}: {} moved from {} to {}",
                    key.join("."),
                    default
                        .get(key)
                        .map_or("(unset)".into(), ToString::to_string),
                    printed
                        .get(key)
                        .map_or("(unset)".into(), ToString::to_string),
                ));
            }
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {} documented examples fail:\n{}",
        failures.len(),
        examples.len(),
        failures.join("\n")
    );
    examples
}

/// A service binary running as a child process, for tests and demos that exercise the real
/// executable (start-up, SIGTERM handling).
#[derive(Debug)]
pub struct ServiceProcess {
    child: tokio::process::Child,
    /// The base URL the service printed on its `listening on <url>` line.
    pub url: String,
}

impl ServiceProcess {
    /// Starts `program` with `args` and extra environment `env`, and waits (up to `timeout`) for
    /// it to print `listening on <url>` on stdout. Its stderr (logs) is inherited.
    pub async fn start(
        program: &std::path::Path,
        args: &[&str],
        env: &[(String, String)],
        timeout: Duration,
    ) -> std::io::Result<Self> {
        use tokio::io::{AsyncBufReadExt, BufReader};
        let mut child = tokio::process::Command::new(program)
            .args(args)
            .envs(env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .stdout(std::process::Stdio::piped())
            .kill_on_drop(true)
            .spawn()?;
        let stdout = child
            .stdout
            .take()
            .ok_or_else(|| std::io::Error::other("no stdout"))?;
        let mut lines = BufReader::new(stdout).lines();
        let found = tokio::time::timeout(timeout, async {
            while let Some(line) = lines.next_line().await? {
                if let Some(url) = line.strip_prefix("listening on ") {
                    return Ok(Some(url.trim().to_owned()));
                }
            }
            Ok::<_, std::io::Error>(None)
        })
        .await;
        let url = match found {
            Ok(Ok(Some(url))) => url,
            Ok(Ok(None)) => {
                let status = child.wait().await?;
                return Err(std::io::Error::other(format!(
                    "{} exited ({status}) before listening",
                    program.display()
                )));
            }
            Ok(Err(e)) => return Err(e),
            Err(_) => {
                return Err(std::io::Error::other(format!(
                    "{} did not start within {timeout:?}",
                    program.display()
                )));
            }
        };
        // Keep draining stdout so the child never blocks on a full pipe.
        tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
        Ok(Self { child, url })
    }

    /// The process id, while it runs.
    pub fn id(&self) -> Option<u32> {
        self.child.id()
    }

    /// Kills the process with SIGKILL (no chance to clean up) and waits for it to go.
    pub async fn kill(mut self) -> std::io::Result<()> {
        self.child.kill().await
    }

    /// Sends SIGTERM and waits (up to `timeout`) for the process to exit; returns its status.
    pub async fn terminate(self, timeout: Duration) -> std::io::Result<std::process::ExitStatus> {
        terminate(self.child, timeout).await
    }
}

/// Sends `child` SIGTERM and waits (up to `timeout`) for it to exit; returns its status. A
/// process that ignores the signal is killed and reported as an error.
pub async fn terminate(
    mut child: tokio::process::Child,
    timeout: Duration,
) -> std::io::Result<std::process::ExitStatus> {
    let pid = child
        .id()
        .ok_or_else(|| std::io::Error::other("process already exited"))?;
    let sent = tokio::process::Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status()
        .await?;
    if !sent.success() {
        return Err(std::io::Error::other(format!("kill -TERM {pid} failed")));
    }
    match tokio::time::timeout(timeout, child.wait()).await {
        Ok(status) => status,
        Err(_) => {
            child.kill().await?;
            Err(std::io::Error::other(format!(
                "process {pid} ignored SIGTERM for {timeout:?}; killed"
            )))
        }
    }
}

/// One record read back from a topic by [`read_topic`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReadRecord {
    /// Its partition.
    pub partition: i32,
    /// Its offset.
    pub offset: i64,
    /// Its key, as text.
    pub key: Option<String>,
    /// Its headers.
    pub headers: std::collections::BTreeMap<String, String>,
    /// Its payload.
    pub payload: Option<Vec<u8>>,
}

impl ReadRecord {
    /// The record `m` as read.
    pub fn from_message(m: &impl rdkafka::message::Message) -> Self {
        Self {
            partition: m.partition(),
            offset: m.offset(),
            key: m.key().map(|k| String::from_utf8_lossy(k).into_owned()),
            headers: crate::kafka::headers_map(m),
            payload: m.payload().map(<[u8]>::to_vec),
        }
    }
}

/// Reads `n` records from the start of `topic` with a throw-away consumer group; panics if
/// they do not arrive within `timeout`.
pub async fn read_topic(topic: &str, n: usize, timeout: Duration) -> Vec<ReadRecord> {
    use rdkafka::consumer::{Consumer, StreamConsumer};
    let consumer: StreamConsumer = kafka()
        .client_config(ClientKind::Consumer)
        .set("group.id", unique("reader"))
        .set("auto.offset.reset", "earliest")
        .set("enable.auto.commit", "false")
        .create()
        .expect("reader");
    consumer.subscribe(&[topic]).expect("subscribe");
    let mut out = Vec::with_capacity(n);
    while out.len() < n {
        let m = tokio::time::timeout(timeout, consumer.recv())
            .await
            .unwrap_or_else(|_| panic!("only {} of {n} records arrived from {topic}", out.len()))
            .expect("receive");
        out.push(ReadRecord::from_message(&m));
    }
    out
}

/// Reads `topic` from the beginning of every partition until every id in `ids` (the `ce_id`
/// header) has arrived, without a consumer group (so it never waits for a rebalance); returns
/// every record read, duplicates included. Panics if they do not all arrive within `timeout`.
///
/// (It cannot read "up to the high watermark": tansu 0.6's in-memory engine reports the last
/// batch's base offset + 1 as the high watermark.)
pub async fn read_ids(
    config: &KafkaConfig,
    topic: &str,
    ids: &std::collections::BTreeSet<String>,
    timeout: Duration,
) -> Vec<ReadRecord> {
    use rdkafka::consumer::{BaseConsumer, Consumer};
    use rdkafka::{Offset, TopicPartitionList};
    let topic = topic.to_owned();
    let client = config.client_config(ClientKind::Consumer);
    let mut missing = ids.clone();
    let total = ids.len();
    tokio::task::spawn_blocking(move || {
        let consumer: BaseConsumer = client
            .clone()
            .set("group.id", unique("reader"))
            .set("enable.auto.commit", "false")
            .create()
            .expect("reader");
        let partitions = consumer
            .fetch_metadata(Some(&topic), Duration::from_secs(10))
            .expect("metadata")
            .topics()[0]
            .partitions()
            .len();
        let mut assignment = TopicPartitionList::new();
        for p in 0..i32::try_from(partitions).expect("partition count") {
            assignment
                .add_partition_offset(&topic, p, Offset::Beginning)
                .expect("assignment");
        }
        consumer.assign(&assignment).expect("assign");
        let start = Instant::now();
        let mut out = Vec::new();
        while !missing.is_empty() {
            assert!(
                start.elapsed() < timeout,
                "{topic}: {} of {} ids not read within {timeout:?}",
                missing.len(),
                total
            );
            let Some(m) = consumer.poll(Duration::from_millis(200)) else {
                continue;
            };
            let m = m.expect("receive");
            let record = ReadRecord::from_message(&m);
            if let Some(id) = record.headers.get("ce_id") {
                missing.remove(id);
            }
            out.push(record);
        }
        out
    })
    .await
    .expect("reader task")
}

/// A broker of the test's own (tansu, as the local environment installs it) on a free port,
/// with its own data folder, for tests that stop and restart the broker without disturbing
/// other tests. Killed when dropped.
#[derive(Debug)]
pub struct PrivateBroker {
    port: u16,
    data: std::path::PathBuf,
    child: Option<tokio::process::Child>,
}

impl PrivateBroker {
    /// Starts a new broker and waits until it accepts connections.
    pub async fn start() -> Self {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("free port")
            .port();
        let data = std::env::temp_dir().join(unique("ferrybox-broker"));
        std::fs::create_dir_all(&data).expect("broker data folder");
        let mut broker = Self {
            port,
            data,
            child: None,
        };
        broker.restart().await;
        broker
    }

    /// Client settings for this broker.
    pub fn kafka(&self) -> KafkaConfig {
        KafkaConfig::new(format!("127.0.0.1:{}", self.port))
    }

    /// Kills the broker (SIGKILL) and waits for it to go; its data stays.
    pub async fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            child.kill().await.expect("kill broker");
        }
    }

    /// Starts the broker again on the same port and data (after [`PrivateBroker::kill`]).
    pub async fn restart(&mut self) {
        self.kill().await;
        let url = format!("tcp://127.0.0.1:{}", self.port);
        let log = std::fs::File::create(self.data.join("tansu.log")).expect("broker log");
        let child = tokio::process::Command::new("tansu")
            .args([
                "broker",
                "--listener-url",
                &url,
                "--advertised-listener-url",
                &url,
            ])
            .args(["--storage-engine", "sqlite://tansu.db"])
            .current_dir(&self.data)
            .stdout(log.try_clone().expect("broker log"))
            .stderr(log)
            .kill_on_drop(true)
            .spawn()
            .expect("start tansu (installed by deploy/local/infra.sh)");
        self.child = Some(child);
        let addr = std::net::SocketAddr::from(([127, 0, 0, 1], self.port));
        wait_until(
            Duration::from_secs(30),
            "the private broker to listen",
            || async move { tokio::net::TcpStream::connect(addr).await.is_ok() },
        )
        .await;
    }
}

impl Drop for PrivateBroker {
    fn drop(&mut self) {
        if let Some(child) = self.child.as_mut() {
            let _ = child.start_kill();
        }
        let _ = std::fs::remove_dir_all(&self.data);
    }
}

/// Serves `router` on a free port of 127.0.0.1 until `stop`; returns its base URL
/// (`http://127.0.0.1:PORT`).
pub async fn serve(router: axum::Router, stop: &CancellationToken) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind a free port");
    let url = format!(
        "http://{}",
        listener.local_addr().expect("the listener's address")
    );
    let stop = stop.clone();
    tokio::spawn(async move {
        axum::serve(listener, router)
            .with_graceful_shutdown(async move { stop.cancelled().await })
            .await
    });
    url
}

/// An alert webhook on a free port that keeps what it receives, until `stop`: its URL and the
/// alerts so far.
pub async fn alert_sink(
    stop: &CancellationToken,
) -> (
    String,
    std::sync::Arc<std::sync::Mutex<Vec<crate::alert::Alert>>>,
) {
    use crate::alert::Alert;
    let received: std::sync::Arc<std::sync::Mutex<Vec<Alert>>> = std::sync::Arc::default();
    let app = axum::Router::new().route(
        "/alerts",
        axum::routing::post({
            let received = std::sync::Arc::clone(&received);
            move |axum::Json(alert): axum::Json<Alert>| async move {
                received
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner)
                    .push(alert);
            }
        }),
    );
    (format!("{}/alerts", serve(app, stop).await), received)
}

/// The process id of the relay holding the relay lock in the database at `url`, from the name
/// its connection carries (`ferrybox relay (pid N)`); `None` when no relay is active.
pub async fn active_relay_pid(url: &str) -> Option<u32> {
    #[derive(diesel::QueryableByName)]
    struct Name {
        #[diesel(sql_type = diesel::sql_types::Text)]
        name: String,
    }
    let (class, object) = RELAY_LOCK_KEYS;
    let mut conn = AsyncPgConnection::establish(url).await.ok()?;
    let names: Vec<Name> = diesel::sql_query(format!(
        "SELECT a.application_name AS name FROM pg_locks l \
         JOIN pg_stat_activity a ON a.pid = l.pid \
         WHERE l.locktype = 'advisory' AND l.granted AND l.objsubid = 2 \
           AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database()) \
           AND l.classid = {class} AND l.objid = {object}"
    ))
    .load(&mut conn)
    .await
    .ok()?;
    names.into_iter().next().and_then(|n| {
        n.name
            .strip_prefix("ferrybox relay (pid ")?
            .strip_suffix(')')?
            .parse()
            .ok()
    })
}

/// The relay lock's two keys as `pg_locks` shows them (`classid`, `objid`).
const RELAY_LOCK_KEYS: (u32, u32) = (0x6665_7272, 0x7962_6f78);

/// How the broker answers a fetch from an offset inside a record batch, as [`mid_batch_fetch`]
/// found it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MidBatchFetch {
    /// From that offset on, as Kafka does.
    FromThatOffset,
    /// From the next batch on: the rest of the batch is skipped for that consumer (tansu 0.6's
    /// in-memory engine; a consumer that resumes inside a batch misses its tail).
    FromTheNextBatch,
}

/// Finds out, once per process, how the test broker serves a fetch from inside a record batch
/// (three batches of 100 records, read from offset 137). Panics on any other answer.
pub async fn mid_batch_fetch() -> MidBatchFetch {
    static FOUND: tokio::sync::OnceCell<MidBatchFetch> = tokio::sync::OnceCell::const_new();
    FOUND
        .get_or_init(|| async {
            use rdkafka::consumer::{BaseConsumer, Consumer};
            use rdkafka::message::Message;
            use rdkafka::producer::{FutureProducer, FutureRecord};
            use rdkafka::{Offset, TopicPartitionList};
            let topic = create_topic(1).await;
            let producer: FutureProducer =
                crate::kafka::durable_producer(&kafka()).expect("producer");
            for batch in 0..3i64 {
                let sent: Vec<_> = (0..100)
                    .map(|i| {
                        let payload = (batch * 100 + i).to_string();
                        producer
                            .send_result(FutureRecord::<str, str>::to(&topic).payload(&payload))
                            .map_err(|(e, _)| e)
                            .expect("queued")
                    })
                    .collect();
                for s in sent {
                    s.await.expect("delivered").expect("acknowledged");
                }
            }
            let client = kafka().client_config(crate::config::ClientKind::Consumer);
            tokio::task::spawn_blocking(move || {
                let consumer: BaseConsumer = client
                    .clone()
                    .set("group.id", unique("mid-batch"))
                    .create()
                    .expect("consumer");
                let mut at = TopicPartitionList::new();
                at.add_partition_offset(&topic, 0, Offset::Offset(137))
                    .expect("offset");
                consumer.assign(&at).expect("assign");
                let deadline = Instant::now() + Duration::from_secs(60);
                while Instant::now() < deadline {
                    if let Some(Ok(m)) = consumer.poll(Duration::from_millis(200)) {
                        return match m.offset() {
                            137 => MidBatchFetch::FromThatOffset,
                            200 => MidBatchFetch::FromTheNextBatch,
                            other => panic!("a fetch from offset 137 answered from {other}"),
                        };
                    }
                }
                panic!("a fetch from offset 137 answered nothing");
            })
            .await
            .expect("probe task")
        })
        .await
        .clone()
}

/// Checks a service's settings type `T` against [`crate::config::load`]: with no file and no
/// environment (variables under `env_prefix`, which none should use) its defaults come back
/// unchanged, and `everything_set`, which must move every field away from its default (checked,
/// so a new field is not forgotten), comes back whole when loaded over.
pub fn assert_settings_round_trip<T>(everything_set: &T, env_prefix: &str)
where
    T: serde::Serialize + serde::de::DeserializeOwned + Default + std::fmt::Debug,
{
    let exposed = |s: &T| with_secrets_exposed(|| serde_json::to_value(s).expect("settings"));
    let default = T::default();
    let loaded: T = crate::config::load(None, env_prefix).expect("defaults load");
    assert_eq!(exposed(&loaded), exposed(&default));
    assert_eq!(format!("{loaded:?}"), format!("{default:?}"));

    let defaults = json_leaves(&exposed(&default));
    for (path, value) in json_leaves(&exposed(everything_set)) {
        assert_ne!(defaults.get(&path), Some(&value), "{path:?} is not set");
    }
    let loaded = crate::config::load_over(everything_set, None, env_prefix).expect("loads");
    assert_eq!(exposed(&loaded), exposed(everything_set));
    assert_eq!(format!("{loaded:?}"), format!("{everything_set:?}"));
}

/// Checks that `<prefix>CONFIG` names a settings file for `program` (`--config`) and is not
/// taken for a setting: a file setting `max_body_bytes` and `database.max_connections` shows
/// in `check-config --print`.
pub fn assert_config_variable_names_the_file(program: &std::path::Path, prefix: &str) {
    let file = std::env::temp_dir()
        .join(unique("service-config"))
        .with_extension("toml");
    std::fs::write(
        &file,
        "max_body_bytes = 1234\n[database]\nmax_connections = 3\n",
    )
    .expect("write the settings file");
    let variable = format!("{prefix}CONFIG");
    let (printed, _) = printed_settings(program, &[(&variable, file.to_str().expect("utf-8"))]);
    std::fs::remove_file(&file).expect("remove the settings file");
    assert_eq!(printed["max_body_bytes"], 1234);
    assert_eq!(printed["database"]["max_connections"], 3);
}
