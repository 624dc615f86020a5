//! Faults users meet with the default settings: real database errors (deadlocks, lock and
//! statement timeouts, a terminated backend) classified by SQLSTATE, handlers that panic or
//! hang in SQL, and the smallest pool the configuration accepts.

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use diesel::sql_types::{BigInt, Text, Uuid};
use diesel_async::{AsyncPgConnection, RunQueryDsl, SimpleAsyncConnection};
use ferrybox::inbox::{DeadLetterFilter, DeadLetters, Handler, HandlerError, ReceivedMessage};
use ferrybox::testing::{self, wait_until};
use ferrybox::{CancellationToken, InboxConsumer};

use crate::inbox::{inbox_config, publish_all};
use crate::support::{Fixture, TIMEOUT, ThingChanged};

/// Runs `sql` on `conn` and returns the error it fails with.
async fn failing(conn: &mut AsyncPgConnection, sql: &str) -> diesel::result::Error {
    conn.batch_execute(sql)
        .await
        .expect_err("the statement should fail")
}

/// Whether the framework counts `e` as retryable; a handler returning it (`?`) agrees.
fn retryable(e: diesel::result::Error) -> bool {
    let as_framework = ferrybox::Error::Database(e);
    let verdict = as_framework.is_retryable();
    let ferrybox::Error::Database(e) = as_framework else {
        unreachable!()
    };
    assert_eq!(
        HandlerError::from(e).is_retryable(),
        verdict,
        "handlers and the framework agree"
    );
    verdict
}

#[tokio::test(flavor = "multi_thread")]
async fn real_deadlocks_lock_and_statement_timeouts_and_shutdowns_are_retryable() {
    let fx = Fixture::new(1).await;
    let url = fx.db.url().to_owned();
    testing::execute(&url, "INSERT INTO things VALUES ('a', 'a'), ('b', 'b')").await;

    // A real deadlock: two transactions lock a and b in opposite orders.
    let mut one = ferrybox::db::establish(&url).await.unwrap();
    let mut two = ferrybox::db::establish(&url).await.unwrap();
    one.batch_execute("BEGIN; UPDATE things SET label = '1' WHERE id = 'a'")
        .await
        .unwrap();
    two.batch_execute("BEGIN; UPDATE things SET label = '2' WHERE id = 'b'")
        .await
        .unwrap();
    let (first, second) = tokio::join!(
        one.batch_execute("UPDATE things SET label = '1' WHERE id = 'b'"),
        two.batch_execute("UPDATE things SET label = '2' WHERE id = 'a'"),
    );
    let deadlock = first
        .err()
        .or(second.err())
        .expect("one side is the deadlock victim");
    assert_eq!(
        ferrybox::error::sqlstate(&deadlock),
        Some("40P01"),
        "{deadlock}"
    );
    assert!(retryable(deadlock));
    one.batch_execute("ROLLBACK").await.unwrap();
    two.batch_execute("ROLLBACK").await.unwrap();

    // A lock timeout, while another transaction holds the row.
    one.batch_execute("BEGIN; SELECT * FROM things WHERE id = 'a' FOR UPDATE")
        .await
        .unwrap();
    let lock_timeout = failing(
        &mut two,
        "BEGIN; SET LOCAL lock_timeout = '50ms'; SELECT * FROM things WHERE id = 'a' FOR UPDATE",
    )
    .await;
    assert_eq!(
        ferrybox::error::sqlstate(&lock_timeout),
        Some("55P03"),
        "{lock_timeout}"
    );
    assert!(retryable(lock_timeout));
    two.batch_execute("ROLLBACK").await.unwrap();
    let no_wait = failing(
        &mut two,
        "BEGIN; SELECT * FROM things WHERE id = 'a' FOR UPDATE NOWAIT",
    )
    .await;
    assert_eq!(
        ferrybox::error::sqlstate(&no_wait),
        Some("55P03"),
        "{no_wait}"
    );
    two.batch_execute("ROLLBACK").await.unwrap();
    one.batch_execute("ROLLBACK").await.unwrap();

    // A statement timeout.
    let statement_timeout = failing(
        &mut two,
        "BEGIN; SET LOCAL statement_timeout = '50ms'; SELECT pg_sleep(5)",
    )
    .await;
    assert_eq!(ferrybox::error::sqlstate(&statement_timeout), Some("57014"));
    assert!(retryable(statement_timeout));
    two.batch_execute("ROLLBACK").await.unwrap();

    // An administrator terminates the backend.
    let pid: i64 = {
        #[derive(diesel::QueryableByName)]
        struct Pid {
            #[diesel(sql_type = diesel::sql_types::Integer)]
            pid: i32,
        }
        let p: Pid = diesel::sql_query("SELECT pg_backend_pid() AS pid")
            .get_result(&mut two)
            .await
            .unwrap();
        p.pid.into()
    };
    testing::execute(&url, &format!("SELECT pg_terminate_backend({pid})")).await;
    let terminated = failing(&mut two, "SELECT 1").await;
    assert!(retryable(terminated));

    // Permanent: a constraint violation and bad SQL.
    let unique = failing(&mut one, "INSERT INTO things VALUES ('a', 'again')").await;
    assert_eq!(ferrybox::error::sqlstate(&unique), Some("23505"));
    assert!(!retryable(unique));
    let syntax = failing(&mut one, "SELEC 1").await;
    assert!(!retryable(syntax));
}

#[tokio::test(flavor = "multi_thread")]
async fn real_broker_errors_are_classified_by_their_code() {
    use rdkafka::producer::{FutureProducer, FutureRecord};
    // librdkafka refuses a record over `message.max.bytes` itself: permanent.
    let producer: FutureProducer = ferrybox::kafka::durable_producer(&testing::kafka()).unwrap();
    let topic = testing::create_topic(1).await;
    let huge = vec![0u8; 2 * 1024 * 1024];
    let (too_large, _) = producer
        .send(
            FutureRecord::<[u8], [u8]>::to(&topic).payload(&huge[..]),
            Duration::from_secs(10),
        )
        .await
        .expect_err("a 2 MiB record is refused");
    assert!(
        !ferrybox::Error::Kafka(too_large.clone()).is_retryable(),
        "{too_large}"
    );

    // No broker answers: the delivery times out, which may pass.
    let mut nowhere = ferrybox::KafkaConfig::new("127.0.0.1:1");
    nowhere
        .settings
        .insert("message.timeout.ms".into(), "300".into());
    let producer: FutureProducer = ferrybox::kafka::durable_producer(&nowhere).unwrap();
    let (timed_out, _) = producer
        .send(
            FutureRecord::<[u8], [u8]>::to(&topic).payload(&b"x"[..]),
            Duration::from_secs(10),
        )
        .await
        .expect_err("no broker");
    assert!(
        ferrybox::Error::Kafka(timed_out.clone()).is_retryable(),
        "{timed_out}"
    );
}

/// What the fault handler does with one message.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Misbehaviour {
    /// Panics on every message of thing `bad`.
    Panic,
    /// Locks a row with a lock timeout (55P03) while the test holds it.
    LockTimeoutWhileHeld,
    /// Its first attempt sleeps in SQL far past the handler time limit.
    SleepInSqlOnce,
    /// None: the fixed handler.
    Fixed,
}

/// Applies messages like the integration `Recorder`, and misbehaves as told.
#[derive(Clone)]
struct Faulty {
    misbehaviour: Misbehaviour,
    attempts: Arc<AtomicU32>,
}

impl Handler for Faulty {
    async fn handle(
        &self,
        conn: &mut AsyncPgConnection,
        message: &ReceivedMessage,
    ) -> Result<(), HandlerError> {
        let body: ThingChanged = message.body()?;
        if body.thing_id == "bad" {
            let attempt = self.attempts.fetch_add(1, Ordering::SeqCst) + 1;
            match self.misbehaviour {
                Misbehaviour::Panic => panic!("bug in the handler for {}", body.thing_id),
                Misbehaviour::LockTimeoutWhileHeld => {
                    conn.batch_execute(
                        "SET LOCAL lock_timeout = '100ms'; \
                         SELECT * FROM things WHERE id = 'locked' FOR UPDATE",
                    )
                    .await?;
                }
                Misbehaviour::SleepInSqlOnce if attempt == 1 => {
                    conn.batch_execute("SELECT pg_sleep(120)").await?;
                }
                _ => {}
            }
        }
        diesel::sql_query(
            "INSERT INTO applied (message_id, thing_id, version) VALUES ($1, $2, $3)",
        )
        .bind::<Uuid, _>(message.envelope.id.0)
        .bind::<Text, _>(&body.thing_id)
        .bind::<BigInt, _>(body.version)
        .execute(conn)
        .await?;
        Ok(())
    }
}

struct Run {
    fx: Fixture,
    group: String,
    handler: Faulty,
    stop: CancellationToken,
    task: tokio::task::JoinHandle<ferrybox::Result<()>>,
    stats: Arc<ferrybox::inbox::InboxStats>,
    /// The transaction holding the row a `LockTimeoutWhileHeld` handler waits for.
    holder: Option<AsyncPgConnection>,
}

/// Publishes `good` changes of other things around one of thing `bad`, and starts a consumer
/// with default settings (but the time limit, when given) on a pool of `pool_size`.
async fn run(
    misbehaviour: Misbehaviour,
    handler_timeout: Option<Duration>,
    pool_size: usize,
) -> Run {
    let fx = Fixture::new(1).await;
    testing::execute(fx.db.url(), "INSERT INTO things VALUES ('locked', '')").await;
    for version in 1..=3 {
        fx.change("good-1", version).await;
        if version == 2 {
            fx.change("bad", 1).await;
            fx.change("bad", 2).await;
        }
        fx.change("good-2", version).await;
    }
    publish_all(&fx).await;
    let group = testing::unique("faults");
    let mut config = inbox_config(&fx, &group);
    config.backoff = ferrybox::config::Backoff::default();
    config.max_attempts = ferrybox::InboxConfig::default().max_attempts;
    if let Some(limit) = handler_timeout {
        config.handler_timeout = limit;
    }
    let mut database = fx.db.config();
    database.max_connections = pool_size;
    let pool = ferrybox::db::pool(&database).unwrap();
    let handler = Faulty {
        misbehaviour,
        attempts: Arc::default(),
    };
    let consumer = InboxConsumer::new(
        pool,
        &testing::kafka(),
        fx.codec.clone(),
        handler.clone(),
        config,
    )
    .unwrap();
    let holder = if misbehaviour == Misbehaviour::LockTimeoutWhileHeld {
        let mut holder = ferrybox::db::establish(fx.db.url()).await.unwrap();
        holder
            .batch_execute("BEGIN; SELECT * FROM things WHERE id = 'locked' FOR UPDATE")
            .await
            .unwrap();
        Some(holder)
    } else {
        None
    };
    let stats = consumer.stats();
    let stop = CancellationToken::new();
    let task = tokio::spawn(consumer.run(stop.clone()));
    Run {
        fx,
        group,
        handler,
        stop,
        task,
        stats,
        holder,
    }
}

impl Run {
    async fn applied(&self, thing: &str) -> i64 {
        self.fx
            .count(&format!(
                "SELECT count(*) AS n FROM applied WHERE thing_id = '{thing}'"
            ))
            .await
    }

    async fn stop(self) -> Fixture {
        self.stop.cancel();
        self.task.await.unwrap().unwrap();
        self.fx
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_panicking_handler_dead_letters_its_message_parks_the_key_and_the_consumer_goes_on() {
    let run = run(Misbehaviour::Panic, None, 10).await;
    wait_until(TIMEOUT, "the other keys applied", || async {
        run.applied("good-1").await == 3 && run.applied("good-2").await == 3
    })
    .await;
    wait_until(
        TIMEOUT,
        "the panic dead-lettered and its follower parked",
        || async {
            let s = run.stats.snapshot();
            (s.dead_lettered, s.parked) == (1, 1)
        },
    )
    .await;
    assert!(!run.task.is_finished(), "the consumer keeps running");
    // A panic is a bug: dead-lettered at once, never retried with backoff.
    assert_eq!(run.stats.snapshot().retries, 0);
    let letters = DeadLetters::new(run.fx.pool.clone(), run.group.clone());
    let dead = letters.list(&DeadLetterFilter::All).await.unwrap();
    assert_eq!(dead.len(), 2, "{dead:?}");
    assert_eq!(
        (dead[0].error_kind.as_str(), dead[0].attempts),
        ("panic", 1)
    );
    assert!(
        dead[0].error.contains("bug in the handler for bad"),
        "{}",
        dead[0].error
    );
    assert_eq!(dead[1].status, "parked");
    run.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_lock_timeout_in_a_handler_is_retried_not_dead_lettered() {
    let mut run = run(Misbehaviour::LockTimeoutWhileHeld, None, 10).await;
    wait_until(TIMEOUT, "the locked message failed", || async {
        let s = run.stats.snapshot();
        s.retries + s.dead_lettered > 0
    })
    .await;
    // The lock goes away, as a deadlock's or a lock timeout's cause does.
    let mut holder = run.holder.take().unwrap();
    holder.batch_execute("ROLLBACK").await.unwrap();
    wait_until(TIMEOUT, "every message applied", || async {
        run.applied("bad").await == 2 && run.applied("good-2").await == 3
    })
    .await;
    let s = run.stats.snapshot();
    assert_eq!((s.dead_lettered, s.parked), (0, 0), "{s:?}");
    assert!(s.retries >= 1, "retried after a backoff: {s:?}");
    run.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_handler_over_its_time_limit_has_its_statement_cancelled_and_is_retried() {
    let run = run(
        Misbehaviour::SleepInSqlOnce,
        Some(Duration::from_millis(500)),
        10,
    )
    .await;
    // The first attempt sleeps 120 s in SQL; only a cancelled statement lets the retry (and
    // the message) through within the wait.
    wait_until(
        Duration::from_secs(30),
        "the slow message applied on its retry",
        || async { run.applied("bad").await == 2 },
    )
    .await;
    let sleeping = run
        .fx
        .count(
            "SELECT count(*) AS n FROM pg_stat_activity \
             WHERE datname = current_database() AND query LIKE '%pg_sleep(120)%' \
             AND state = 'active' AND pid <> pg_backend_pid()",
        )
        .await;
    assert_eq!(
        sleeping, 0,
        "the timed-out statement is not running any more"
    );
    let s = run.stats.snapshot();
    assert_eq!((s.dead_lettered, s.parked), (0, 0), "{s:?}");
    assert!(AtomicU32::load(&run.handler.attempts, Ordering::SeqCst) >= 3);
    run.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn one_pooled_connection_is_enough_to_consume_dead_letter_and_redrive() {
    let run = run(Misbehaviour::Panic, None, 1).await;
    wait_until(TIMEOUT, "everything finished", || async {
        let s = run.stats.snapshot();
        s.applied + s.dead_lettered + s.parked == 8
    })
    .await;
    let group = run.group.clone();
    let fx = run.stop().await;
    // The fix is deployed: the same consumer with a handler that no longer panics.
    let mut database = fx.db.config();
    database.max_connections = 1;
    let pool = ferrybox::db::pool(&database).unwrap();
    let fixed = Faulty {
        misbehaviour: Misbehaviour::Fixed,
        attempts: Arc::default(),
    };
    let report = tokio::time::timeout(
        TIMEOUT,
        DeadLetters::new(pool, group).redrive(
            &DeadLetterFilter::All,
            fx.codec.clone(),
            fixed,
            None,
            Duration::from_secs(30),
        ),
    )
    .await
    .expect("a redrive on a one-connection pool finishes")
    .unwrap();
    assert_eq!((report.applied, report.failed), (2, 0), "{report:?}");
    assert_eq!(
        fx.count("SELECT count(*) AS n FROM applied WHERE thing_id = 'bad'")
            .await,
        2
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn an_exhausted_pool_fails_with_a_clear_error_instead_of_hanging() {
    let (db, _) = testing::TestDatabase::with_framework_tables().await;
    let mut config = db.config();
    config.max_connections = 1;
    config.pool_timeout = Duration::from_millis(200);
    let pool = ferrybox::db::pool(&config).unwrap();
    let _held = ferrybox::db::connection(&pool).await.unwrap();
    let Err(err) = tokio::time::timeout(TIMEOUT, ferrybox::db::connection(&pool))
        .await
        .expect("the wait is bounded")
    else {
        panic!("no connection should be free");
    };
    assert!(err.is_retryable());
    assert!(err.to_string().contains("max_connections"), "{err}");
}
