use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};

use diesel::sql_types::{BigInt, Text, Uuid};
use diesel_async::{AsyncConnection, AsyncPgConnection, RunQueryDsl};
use ferrybox::contract::ReaderSchemas;
use ferrybox::inbox::{Handler, HandlerError, Horizon, InboxStats, ReceivedMessage};
use ferrybox::testing::{self, wait_until};
use ferrybox::{CancellationToken, InboxConfig, InboxConsumer, Relay};
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::{Offset, TopicPartitionList};

use crate::support::{Fixture, TIMEOUT, ThingChanged};

/// Records each applied message in `applied`; fails while `failures_left` is above zero.
#[derive(Clone, Default)]
pub(crate) struct Recorder {
    pub(crate) failures_left: Arc<AtomicU32>,
    /// A (thing, version) the handler always fails permanently.
    pub(crate) poison: Option<(&'static str, i64)>,
}

impl Handler for Recorder {
    async fn handle(
        &self,
        conn: &mut AsyncPgConnection,
        message: &ReceivedMessage,
    ) -> Result<(), HandlerError> {
        if self
            .failures_left
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
            .is_ok()
        {
            return Err(HandlerError::retryable("downstream unavailable"));
        }
        let body: ThingChanged = message.body()?;
        if self
            .poison
            .is_some_and(|(thing, version)| body.thing_id == thing && body.version == version)
        {
            return Err(HandlerError::permanent(format!(
                "{} v{} is poison",
                body.thing_id, body.version
            )));
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

pub(crate) fn inbox_config(fx: &Fixture, group: &str) -> InboxConfig {
    InboxConfig {
        group_id: group.into(),
        topics: vec![fx.topic.clone()],
        backoff: ferrybox::config::Backoff {
            initial: std::time::Duration::from_millis(20),
            max: std::time::Duration::from_millis(200),
        },
        max_attempts: 1_000,
        ..InboxConfig::default()
    }
}

pub(crate) struct Running {
    stop: CancellationToken,
    task: tokio::task::JoinHandle<ferrybox::Result<()>>,
    pub(crate) stats: Arc<InboxStats>,
}

impl Running {
    /// Runs `consumer` in the background.
    pub(crate) fn start<H: Handler>(consumer: InboxConsumer<H>) -> Self {
        let stats = consumer.stats();
        let stop = CancellationToken::new();
        let task = tokio::spawn(consumer.run(stop.clone()));
        Running { stop, task, stats }
    }

    pub(crate) async fn stop(self) {
        self.stop.cancel();
        self.task.await.unwrap().unwrap();
    }
}

fn start(fx: &Fixture, group: &str, handler: Recorder) -> Running {
    start_reading(fx, inbox_config(fx, group), handler, None)
}

pub(crate) fn start_reading(
    fx: &Fixture,
    config: InboxConfig,
    handler: Recorder,
    readers: Option<ReaderSchemas>,
) -> Running {
    let mut consumer = InboxConsumer::new(
        fx.pool.clone(),
        &testing::kafka(),
        fx.codec.clone(),
        handler,
        config,
    )
    .unwrap();
    if let Some(readers) = readers {
        consumer = consumer.with_reader_schemas(readers);
    }
    Running::start(consumer)
}

pub(crate) async fn publish_all(fx: &Fixture) {
    let relay = Relay::new(fx.db.config(), &testing::kafka(), Fixture::relay_config()).unwrap();
    let mut conn = AsyncPgConnection::establish(fx.db.url()).await.unwrap();
    let outcome = relay.publish_batch(&mut conn).await.unwrap();
    assert_eq!(outcome.failed, 0);
}

/// The committed offset of partition 0 for `group`, if any.
pub(crate) fn committed_offset(topic: &str, group: &str) -> Option<i64> {
    let consumer: BaseConsumer = testing::kafka()
        .client_config(ferrybox::ClientKind::Consumer)
        .set("group.id", group)
        .create()
        .unwrap();
    let mut tpl = TopicPartitionList::new();
    tpl.add_partition(topic, 0);
    let committed = consumer
        .committed_offsets(tpl, std::time::Duration::from_secs(10))
        .unwrap();
    match committed.find_partition(topic, 0).map(|p| p.offset()) {
        Some(Offset::Offset(o)) => Some(o),
        _ => None,
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_message_delivered_three_times_is_applied_once() {
    let fx = Fixture::new(1).await;
    fx.change("a", 1).await;
    publish_all(&fx).await;
    // The relay crashed after the broker's ack but before marking: the row goes out again,
    // with the same message id.
    let mut conn = AsyncPgConnection::establish(fx.db.url()).await.unwrap();
    for _ in 0..2 {
        diesel::sql_query("UPDATE ferrybox_outbox SET published_at = NULL")
            .execute(&mut conn)
            .await
            .unwrap();
        publish_all(&fx).await;
    }

    let group = testing::unique("group");
    let running = start(&fx, &group, Recorder::default());
    wait_until(TIMEOUT, "all three deliveries processed", || async {
        let s = running.stats.snapshot();
        s.applied + s.duplicates == 3
    })
    .await;
    let stats = running.stats.snapshot();
    running.stop().await;
    assert_eq!((stats.applied, stats.duplicates), (1, 2));
    assert_eq!(fx.count("SELECT count(*) AS n FROM applied").await, 1);
    assert_eq!(
        fx.count("SELECT count(*) AS n FROM ferrybox_inbox").await,
        1
    );
    // Both offsets were stored after the commits and committed on shutdown.
    assert_eq!(committed_offset(&fx.topic, &group), Some(3));
}

#[tokio::test(flavor = "multi_thread")]
async fn a_failing_handler_stores_no_offset_and_the_message_is_redelivered() {
    let fx = Fixture::new(1).await;
    fx.change("a", 1).await;
    publish_all(&fx).await;
    let group = testing::unique("group");

    // A handler that keeps failing: the consumer retries, applies nothing, stores nothing.
    let failing = Recorder {
        failures_left: Arc::new(AtomicU32::new(u32::MAX)),
        ..Recorder::default()
    };
    let running = start(&fx, &group, failing);
    wait_until(TIMEOUT, "several failed attempts", || async {
        running.stats.snapshot().retries >= 2
    })
    .await;
    let stats = running.stats.snapshot();
    running.stop().await;
    assert_eq!(stats.applied, 0);
    assert!(stats.retries >= 2);
    assert_eq!(fx.count("SELECT count(*) AS n FROM applied").await, 0);
    assert_eq!(
        fx.count("SELECT count(*) AS n FROM ferrybox_inbox").await,
        0,
        "the inbox row rolled back"
    );
    assert_eq!(committed_offset(&fx.topic, &group), None);

    // A new consumer in the same group gets the same message again and applies it once.
    let fixed = Recorder::default();
    let running = start(&fx, &group, fixed);
    wait_until(TIMEOUT, "redelivered message applied", || async {
        running.stats.snapshot().applied == 1
    })
    .await;
    running.stop().await;
    assert_eq!(fx.count("SELECT count(*) AS n FROM applied").await, 1);
    assert_eq!(committed_offset(&fx.topic, &group), Some(1));
}

#[tokio::test(flavor = "multi_thread")]
async fn undecodable_messages_are_dead_lettered_and_later_ones_still_flow() {
    let fx = Fixture::new(1).await;
    fx.change("a", 1).await;
    // A row whose payload is not Avro in the wire format at all.
    let mut conn = AsyncPgConnection::establish(fx.db.url()).await.unwrap();
    diesel::sql_query("UPDATE ferrybox_outbox SET payload = '\\xdeadbeef'::bytea")
        .execute(&mut conn)
        .await
        .unwrap();
    fx.change("b", 1).await;
    publish_all(&fx).await;

    let group = testing::unique("group");
    let running = start(&fx, &group, Recorder::default());
    wait_until(
        TIMEOUT,
        "good message applied after the bad one",
        || async { running.stats.snapshot().applied == 1 },
    )
    .await;
    let stats = running.stats.snapshot();
    running.stop().await;
    assert_eq!(stats.dead_lettered, 1);
    assert_eq!(
        fx.count(
            "SELECT count(*) AS n FROM ferrybox_dead_letters \
             WHERE error_kind = 'decode' AND message_key = 'a' AND payload = '\\xdeadbeef'::bytea AND kafka_offset = 0"
        )
        .await,
        1
    );
    assert_eq!(
        fx.count("SELECT count(*) AS n FROM applied WHERE thing_id = 'b'")
            .await,
        1
    );
    assert_eq!(committed_offset(&fx.topic, &group), Some(2));
}

fn readers(message_type: &str, fields: &str) -> ReaderSchemas {
    let (namespace, name) = message_type.rsplit_once('.').unwrap();
    let contract =
        format!("consumer = \"c\"\ntopic = \"t\"\n[messages]\n\"{message_type}\" = \"r.avsc\"\n");
    let schema = format!(
        r#"{{"type":"record","name":"{name}","namespace":"{namespace}","fields":[{fields}]}}"#
    );
    ReaderSchemas::embedded(&contract, &[("r.avsc", &schema)]).unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn reader_schemas_drop_unknown_fields_and_dead_letter_what_they_cannot_resolve() {
    let fx = Fixture::new(1).await;
    fx.change("a", 1).await;
    publish_all(&fx).await;

    // A reader that needs only two of the three fields: applied.
    let narrow = readers(
        "com.ferrybox.test.ThingChanged",
        r#"{"name":"thing_id","type":"string"},{"name":"version","type":"long"},{"name":"label","type":"string","default":"?"}"#,
    );
    let running = start_reading(
        &fx,
        inbox_config(&fx, &testing::unique("group")),
        Recorder::default(),
        Some(narrow),
    );
    wait_until(TIMEOUT, "applied through the reader schema", || async {
        running.stats.snapshot().applied == 1
    })
    .await;
    running.stop().await;

    // A reader that needs a field the writer never had, with no default: dead-lettered.
    let needs_colour = readers(
        "com.ferrybox.test.ThingChanged",
        r#"{"name":"thing_id","type":"string"},{"name":"colour","type":"string"}"#,
    );
    let running = start_reading(
        &fx,
        inbox_config(&fx, &testing::unique("group")),
        Recorder::default(),
        Some(needs_colour),
    );
    wait_until(TIMEOUT, "dead-lettered", || async {
        running.stats.snapshot().dead_lettered == 1
    })
    .await;
    running.stop().await;

    // A consumer with no reader schema for the type: dead-lettered as unknown.
    let other = readers(
        "com.ferrybox.test.Other",
        r#"{"name":"id","type":"string"}"#,
    );
    let running = start_reading(
        &fx,
        inbox_config(&fx, &testing::unique("group")),
        Recorder::default(),
        Some(other),
    );
    wait_until(TIMEOUT, "dead-lettered", || async {
        running.stats.snapshot().dead_lettered == 1
    })
    .await;
    running.stop().await;

    assert_eq!(
        fx.count("SELECT count(*) AS n FROM ferrybox_dead_letters WHERE error_kind = 'schema_resolution' AND error LIKE '%cannot resolve com.ferrybox.test.ThingChanged%'").await,
        1
    );
    assert_eq!(
        fx.count("SELECT count(*) AS n FROM ferrybox_dead_letters WHERE error_kind = 'unknown_type' AND error LIKE '%no reader schema%'").await,
        1
    );
    assert_eq!(fx.count("SELECT count(*) AS n FROM applied").await, 1);
}

/// Ages the newest id generation, so the next retention pass opens another.
async fn age_newest_generation(fx: &Fixture) {
    testing::execute(
        fx.db.url(),
        "UPDATE ferrybox_inbox_generations SET opened_at = now() - interval '60 days' \
         WHERE generation = (SELECT max(generation) FROM ferrybox_inbox_generations)",
    )
    .await;
}

/// `count` ids of `consumer` applied `age` ago at offsets 0.. into the newest generation.
async fn applied_ids(fx: &Fixture, consumer: &str, topic: &str, count: i64, age: &str) {
    testing::execute(
        fx.db.url(),
        &format!(
            "INSERT INTO ferrybox_inbox (consumer, message_id, message_type, topic, kafka_partition, kafka_offset, applied_at, generation) \
             SELECT '{consumer}', gen_random_uuid(), 't', '{topic}', 0, n - 1, now() - interval '{age}', \
                    (SELECT max(generation) FROM ferrybox_inbox_generations) \
             FROM generate_series(1, {count}) AS n"
        ),
    )
    .await;
}

/// Retention drops a whole generation, once every consumer with ids in it is past
/// redelivery for all of them; the newest generation and recent ids stay.
#[tokio::test(flavor = "multi_thread")]
async fn an_id_generation_is_dropped_whole_once_every_consumer_in_it_is_past_redelivery() {
    let fx = Fixture::new(1).await;
    let two_weeks = std::time::Duration::from_secs(14 * 24 * 3600);
    applied_ids(&fx, "c", "t", 2_500, "30 days").await;
    applied_ids(&fx, "other", "t", 5, "30 days").await;
    age_newest_generation(&fx).await;
    // Committed past every row: age decides.
    let past = Horizon::none().with("t", 0, i64::MAX, two_weeks);
    let expired = ferrybox::inbox::expire(&fx.pool, "c", &past, two_weeks)
        .await
        .unwrap();
    assert_eq!(
        expired.ids, 0,
        "'other' is not known to be past its ids yet"
    );
    assert_eq!(
        fx.count("SELECT count(*) AS n FROM ferrybox_inbox_generations")
            .await,
        2,
        "a new generation was opened"
    );
    applied_ids(&fx, "c", "t", 10, "1 hour").await;
    let expired = ferrybox::inbox::expire(&fx.pool, "other", &past, two_weeks)
        .await
        .unwrap();
    assert_eq!(expired.generations, 1);
    assert_eq!(expired.ids, 2_505, "both consumers' ids in it");
    assert_eq!(
        fx.count("SELECT count(*) AS n FROM ferrybox_inbox WHERE consumer = 'c'")
            .await,
        10,
        "the newest generation stays"
    );
    assert_eq!(
        fx.count("SELECT count(*) AS n FROM pg_class WHERE relname = 'ferrybox_inbox_g0'")
            .await,
        0,
        "dropped as a table, not deleted row by row"
    );
    assert_eq!(
        ferrybox::inbox::expire(&fx.pool, "c", &past, two_weeks)
            .await
            .unwrap(),
        ferrybox::inbox::Expired::default()
    );
}

/// An id recorded in a generation that has since closed is still a duplicate: the inbox's
/// insert looks in every generation.
#[tokio::test(flavor = "multi_thread")]
async fn an_id_in_an_older_generation_is_still_a_duplicate() {
    let fx = Fixture::new(1).await;
    #[derive(diesel::QueryableByName)]
    struct New {
        #[diesel(sql_type = diesel::sql_types::Nullable<Uuid>)]
        message_id: Option<uuid::Uuid>,
    }
    let record = |ids: Vec<uuid::Uuid>| {
        let url = fx.db.url().to_owned();
        async move {
            let mut conn = AsyncPgConnection::establish(&url).await.unwrap();
            let n = ids.len();
            let newest = testing::count(
                &url,
                "SELECT max(generation)::bigint AS n FROM ferrybox_inbox_generations",
            )
            .await;
            let new: Vec<New> = diesel::sql_query(ferrybox::inbox::RECORD_IDS_SQL)
                .bind::<Text, _>("c")
                .bind::<diesel::sql_types::Array<Uuid>, _>(ids)
                .bind::<diesel::sql_types::Array<Text>, _>(vec!["t"; n])
                .bind::<diesel::sql_types::Array<Text>, _>(vec!["t"; n])
                .bind::<diesel::sql_types::Array<diesel::sql_types::Integer>, _>(vec![0; n])
                .bind::<diesel::sql_types::Array<BigInt>, _>(vec![0i64; n])
                .bind::<diesel::sql_types::Integer, _>(i32::try_from(newest).unwrap())
                .load(&mut conn)
                .await
                .unwrap();
            new.into_iter()
                .map(|n| n.message_id.expect("the newest generation"))
                .collect::<Vec<_>>()
        }
    };
    let old = uuid::Uuid::now_v7();
    assert_eq!(record(vec![old]).await, vec![old]);
    age_newest_generation(&fx).await;
    // Nothing committed: the pass only opens a generation.
    ferrybox::inbox::expire(&fx.pool, "c", &Horizon::none(), std::time::Duration::ZERO)
        .await
        .unwrap();
    let newest = fx
        .count("SELECT max(generation)::bigint AS n FROM ferrybox_inbox_generations")
        .await;
    assert_eq!(newest, 1);
    let fresh = uuid::Uuid::now_v7();
    assert_eq!(
        record(vec![old, fresh, fresh]).await,
        vec![fresh],
        "the id of the closed generation is a duplicate, and so is the repeated one"
    );
    assert_eq!(
        fx.count(&format!(
            "SELECT generation::bigint AS n FROM ferrybox_inbox WHERE message_id = '{fresh}'"
        ))
        .await,
        1
    );

    // Given a generation that is not the newest any more, it records nothing and says which is.
    let mut conn = AsyncPgConnection::establish(fx.db.url()).await.unwrap();
    let stale: Vec<New> = diesel::sql_query(ferrybox::inbox::RECORD_IDS_SQL)
        .bind::<Text, _>("c")
        .bind::<diesel::sql_types::Array<Uuid>, _>(vec![uuid::Uuid::now_v7()])
        .bind::<diesel::sql_types::Array<Text>, _>(vec!["t"])
        .bind::<diesel::sql_types::Array<Text>, _>(vec!["t"])
        .bind::<diesel::sql_types::Array<diesel::sql_types::Integer>, _>(vec![0])
        .bind::<diesel::sql_types::Array<BigInt>, _>(vec![0i64])
        .bind::<diesel::sql_types::Integer, _>(0)
        .load(&mut conn)
        .await
        .unwrap();
    assert_eq!(stale.len(), 1);
    assert_eq!(stale[0].message_id, None);
    assert_eq!(
        fx.count("SELECT count(*) AS n FROM ferrybox_inbox").await,
        2,
        "nothing recorded with the stale generation"
    );
}

/// The running consumer, in its default configuration (a message without numbers is
/// deduplicated by id): a message delivered again after a new id generation opened is still a
/// duplicate, found in the closed generation.
#[tokio::test(flavor = "multi_thread")]
async fn a_message_delivered_again_after_its_generation_closed_is_applied_once() {
    let fx = Fixture::new(1).await;
    fx.change("a", 1).await;
    publish_all(&fx).await;
    let group = testing::unique("group");
    let first = start(&fx, &group, Recorder::default());
    wait_until(TIMEOUT, "the message applied", || async {
        first.stats.snapshot().applied == 1
    })
    .await;
    first.stop().await;
    age_newest_generation(&fx).await;
    ferrybox::inbox::expire(
        &fx.pool,
        &group,
        &Horizon::none(),
        std::time::Duration::ZERO,
    )
    .await
    .unwrap();
    assert_eq!(
        fx.count("SELECT max(generation)::bigint AS n FROM ferrybox_inbox_generations")
            .await,
        1,
        "a new generation opened"
    );
    // The relay sends it again (a crash after the broker's ack, before marking).
    testing::execute(
        fx.db.url(),
        "UPDATE ferrybox_outbox SET published_at = NULL",
    )
    .await;
    publish_all(&fx).await;
    let second = start(&fx, &group, Recorder::default());
    wait_until(TIMEOUT, "the second delivery processed", || async {
        second.stats.snapshot().duplicates == 1
    })
    .await;
    let stats = second.stats.snapshot();
    second.stop().await;
    assert_eq!(stats.applied, 0);
    assert_eq!(fx.count("SELECT count(*) AS n FROM applied").await, 1);
    assert_eq!(
        fx.count("SELECT count(*) AS n FROM ferrybox_inbox WHERE generation = 0")
            .await,
        1,
        "recorded once, in the closed generation"
    );
}

/// However old, an applied id stays while its group has not committed past its offset (a
/// consumer killed between its inbox commit and its offset commit, then down for weeks, is
/// redelivered the message): retention asks the broker for the group's committed offsets, and
/// a generation goes only once the group is past every id in it.
#[tokio::test(flavor = "multi_thread")]
async fn an_applied_id_stays_until_the_group_committed_past_it_however_old_it_is() {
    let fx = Fixture::new(1).await;
    let group = testing::unique("retention");
    applied_ids(&fx, &group, &fx.topic, 100, "60 days").await;
    age_newest_generation(&fx).await;
    let two_weeks = std::time::Duration::from_secs(14 * 24 * 3600);
    let horizon = |group: String, topic: String| async move {
        ferrybox::inbox::kafka_horizon(&testing::kafka(), &group, &[topic], two_weeks)
            .await
            .unwrap()
    };
    let count_ids = format!("SELECT count(*) AS n FROM ferrybox_inbox WHERE consumer = '{group}'");
    let ids = || fx.count(&count_ids);
    let nothing_committed = horizon(group.clone(), fx.topic.clone()).await;
    assert!(nothing_committed.is_empty(), "{nothing_committed:?}");
    ferrybox::inbox::expire(&fx.pool, &group, &nothing_committed, two_weeks)
        .await
        .unwrap();
    assert_eq!(ids().await, 100, "nothing committed: every id stays");

    // The group commits offset 40 (the next message it would read): 40..99 can come again.
    let commit = |offset: i64| {
        let committer: BaseConsumer = testing::kafka()
            .client_config(ferrybox::ClientKind::Consumer)
            .set("group.id", &group)
            .create()
            .unwrap();
        let mut tpl = TopicPartitionList::new();
        tpl.add_partition_offset(&fx.topic, 0, Offset::Offset(offset))
            .unwrap();
        committer
            .commit(&tpl, rdkafka::consumer::CommitMode::Sync)
            .unwrap();
    };
    commit(40);
    let committed = horizon(group.clone(), fx.topic.clone()).await;
    assert_eq!(committed.len(), 1, "{committed:?}");
    let expired = ferrybox::inbox::expire(&fx.pool, &group, &committed, two_weeks)
        .await
        .unwrap();
    assert_eq!(expired.ids, 0);
    assert_eq!(
        ids().await,
        100,
        "the ids past the committed offset hold their generation"
    );

    commit(100);
    let committed = horizon(group.clone(), fx.topic.clone()).await;
    let expired = ferrybox::inbox::expire(&fx.pool, &group, &committed, two_weeks)
        .await
        .unwrap();
    assert_eq!(expired.ids, 100, "committed past all of them");
    assert_eq!(ids().await, 0);
}

/// The running consumer, with a retention of zero: what it applied is deleted only once its
/// offsets are committed (librdkafka commits stored offsets every 5 s by default).
#[tokio::test(flavor = "multi_thread")]
async fn the_running_consumer_deletes_applied_ids_once_its_offsets_are_committed() {
    let fx = Fixture::new(1).await;
    for v in 1..=5 {
        fx.change("a", v).await;
    }
    publish_all(&fx).await;
    let group = testing::unique("cleaning");
    let config = InboxConfig {
        retention: std::time::Duration::ZERO,
        cleanup_interval: std::time::Duration::from_millis(100),
        ..inbox_config(&fx, &group)
    };
    let running = start_reading(&fx, config, Recorder::default(), None);
    wait_until(TIMEOUT, "all five applied", || async {
        fx.count("SELECT count(*) AS n FROM applied").await == 5
    })
    .await;
    wait_until(TIMEOUT, "the group committed past them", || async {
        committed_offset(&fx.topic, &group) == Some(5)
    })
    .await;
    wait_until(TIMEOUT, "their ids deleted", || async {
        fx.count(&format!(
            "SELECT count(*) AS n FROM ferrybox_inbox WHERE consumer = '{group}'"
        ))
        .await
            == 0
    })
    .await;
    assert_eq!(running.stats.snapshot().cleaned, 5);
    running.stop().await;
}

/// A consumer given a contract of another topic refuses it (it would decode with the writer's
/// schemas, not its contract's); one of its own topic, or of the topic it is deployed as, takes
/// the contract's reader schemas.
#[tokio::test(flavor = "multi_thread")]
async fn a_contract_of_another_topic_is_refused() {
    // The fixture contract reads topic `t` (embedded from its file, as services do).
    let contract = ferrybox::contract!("tests/fixtures/contracts/consumer/contracts/t.toml")
        .contract()
        .unwrap();
    assert_eq!(contract.topic, "t");
    assert!(contract.readers.contains_key("x.User"));
    let fx = Fixture::new(1).await;
    let consumer = |topics: Vec<String>| {
        let mut config = inbox_config(&fx, &testing::unique("group"));
        config.topics = topics;
        InboxConsumer::new(
            fx.pool.clone(),
            &testing::kafka(),
            fx.codec.clone(),
            Recorder::default(),
            config,
        )
        .unwrap()
    };
    let Err(refused) = consumer(vec![fx.topic.clone()]).with_contract(&contract) else {
        panic!("a contract of another topic is refused");
    };
    let text = refused.to_string();
    assert!(
        text.contains("reads topic \"t\"") && text.contains(&fx.topic),
        "{text}"
    );
    assert!(consumer(vec!["t".into()]).with_contract(&contract).is_ok());
    assert!(
        consumer(vec![fx.topic.clone()])
            .with_contract_as(&contract, &fx.topic)
            .is_ok()
    );
    assert!(
        consumer(vec![fx.topic.clone()])
            .with_contract_as(&contract, "elsewhere")
            .is_err()
    );
}

/// Records the things a typed handler was given, in order.
#[derive(Clone, Default)]
struct Things(Arc<std::sync::Mutex<Vec<(String, i64)>>>);

impl ferrybox::inbox::TypedHandler<ThingChanged> for Things {
    async fn handle(
        &self,
        _conn: &mut AsyncPgConnection,
        _message: &ReceivedMessage,
        body: ThingChanged,
    ) -> Result<(), HandlerError> {
        self.0.lock().unwrap().push((body.thing_id, body.version));
        Ok(())
    }
}

/// Typed handlers get their type's messages decoded, in the order published; a type nobody
/// handles is dead-lettered by default, or ignored (applied as a no-op) when declared so.
#[tokio::test(flavor = "multi_thread")]
async fn routes_hand_each_type_to_its_typed_handler_and_declare_what_happens_to_the_rest() {
    use ferrybox::inbox::{Routes, UnknownTypes};
    let fx = Fixture::new(1).await;
    for (thing, version) in [("a", 1), ("b", 1), ("a", 2)] {
        fx.change(thing, version).await;
    }
    publish_all(&fx).await;
    let run = |handler: Routes| {
        Running::start(
            InboxConsumer::new(
                fx.pool.clone(),
                &testing::kafka(),
                fx.codec.clone(),
                handler,
                inbox_config(&fx, &testing::unique("group")),
            )
            .unwrap(),
        )
    };

    let things = Things::default();
    let running = run(Routes::new().on_event::<ThingChanged, _>(things.clone()));
    wait_until(TIMEOUT, "every thing applied", || async {
        running.stats.snapshot().applied == 3
    })
    .await;
    running.stop().await;
    assert_eq!(
        *things.0.lock().unwrap(),
        [
            ("a".to_owned(), 1),
            ("b".to_owned(), 1),
            ("a".to_owned(), 2)
        ]
    );

    // No handler for the type: dead-lettered (the first; its key's later message is parked).
    let running = run(Routes::new());
    wait_until(TIMEOUT, "dead-lettered, not dropped", || async {
        let s = running.stats.snapshot();
        s.dead_lettered >= 1 && s.dead_lettered + s.parked + s.applied == 3 && s.applied == 0
    })
    .await;
    running.stop().await;

    // Declared ignorable: applied as a no-op.
    let running = run(Routes::new().unknown_types(UnknownTypes::Ignore));
    wait_until(TIMEOUT, "ignored as applied", || async {
        running.stats.snapshot().applied == 3
    })
    .await;
    running.stop().await;
}

/// A consumer's routes and its contract must name the same types.
#[test]
fn routes_are_checked_against_the_contract() {
    use ferrybox::inbox::Routes;
    let contract = ferrybox::contract!("tests/fixtures/contracts/consumer/contracts/t.toml")
        .contract()
        .unwrap();
    let handled = Routes::new().on("x.User", Things::default());
    // Things decodes ThingChanged, but the check is about types named, not bodies.
    assert!(handled.check_contract(&contract).is_ok());
    let error = Routes::new()
        .check_contract(&contract)
        .unwrap_err()
        .to_string();
    assert!(
        error.contains("read but not handled [\"x.User\"]"),
        "{error}"
    );
    let extra = Routes::new()
        .on("x.User", Things::default())
        .on("x.Other", Things::default());
    let error = extra.check_contract(&contract).unwrap_err().to_string();
    assert!(
        error.contains("handled but not read [\"x.Other\"]"),
        "{error}"
    );
}
