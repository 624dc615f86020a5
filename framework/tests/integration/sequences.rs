//! Producer sequences: the log relay numbers each partition's messages 1, 2, 3, ... and sends a
//! message again with its number; the inbox skips what it applied by number (no row per
//! message), halts a partition at a gap, alerts, and repairs the gap from the producer's sent
//! log, ending equal to the producer.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use ferrybox::alert::{AlertConfig, Alerter};
use ferrybox::outbox::sent_log::{self, ReplayOptions, ReplaySelection};
use ferrybox::outbox::{SEQ_HEADER, SOURCE_HEADER};
use ferrybox::testing::{self, ReadRecord, wait_until};
use ferrybox::{CancellationToken, InboxConsumer, RelayMode};

use crate::inbox::{Recorder, Running, inbox_config};
use crate::support::{Fixture, RunningRelay, TIMEOUT, log_relay};

/// A record's (source, partition, number).
fn number_of(r: &ReadRecord) -> (String, i32, i64) {
    (
        r.headers[SOURCE_HEADER].clone(),
        r.partition,
        r.headers[SEQ_HEADER].parse().expect("a decimal number"),
    )
}

/// Checks what a topic holds: every message has one number and every number one message; each
/// (source, partition) is numbered 1..=n without a hole. Returns the distinct messages.
fn check_numbering(records: &[ReadRecord]) -> usize {
    let mut by_number: BTreeMap<(String, i32, i64), BTreeSet<String>> = BTreeMap::new();
    let mut by_id: BTreeMap<String, BTreeSet<(String, i32, i64)>> = BTreeMap::new();
    for r in records {
        let number = number_of(r);
        let id = r.headers["ce_id"].clone();
        by_number
            .entry(number.clone())
            .or_default()
            .insert(id.clone());
        by_id.entry(id).or_default().insert(number);
    }
    for (number, ids) in &by_number {
        assert_eq!(ids.len(), 1, "number {number:?} was given to {ids:?}");
    }
    for (id, numbers) in &by_id {
        assert_eq!(numbers.len(), 1, "message {id} was sent as {numbers:?}");
    }
    let mut partitions: BTreeMap<(String, i32), Vec<i64>> = BTreeMap::new();
    for (source, partition, seq) in by_number.keys() {
        partitions
            .entry((source.clone(), *partition))
            .or_default()
            .push(*seq);
    }
    for (partition, seqs) in partitions {
        let n = i64::try_from(seqs.len()).unwrap();
        assert_eq!(
            seqs,
            (1..=n).collect::<Vec<_>>(),
            "{partition:?} has a hole"
        );
    }
    by_id.len()
}

/// Reads `topic` from the start until every one of `ids` was seen twice.
async fn read_twice(topic: &str, ids: &BTreeSet<String>) -> Vec<ReadRecord> {
    use rdkafka::consumer::{Consumer, StreamConsumer};
    let consumer: StreamConsumer = testing::kafka()
        .client_config(ferrybox::ClientKind::Consumer)
        .set("group.id", testing::unique("reader"))
        .set("auto.offset.reset", "earliest")
        .set("enable.auto.commit", "false")
        .create()
        .unwrap();
    consumer.subscribe(&[topic]).unwrap();
    let mut seen: BTreeMap<String, usize> = BTreeMap::new();
    let mut out = Vec::new();
    while ids.iter().any(|id| seen.get(id).copied().unwrap_or(0) < 2) {
        let m = tokio::time::timeout(TIMEOUT, consumer.recv())
            .await
            .expect("records keep arriving")
            .unwrap();
        let record = ReadRecord::from_message(&m);
        *seen.entry(record.headers["ce_id"].clone()).or_default() += 1;
        out.push(record);
    }
    out
}

/// Waits until a log relay streams (its numbering loaded): rows committed before its slot
/// are published from the slot's snapshot, without numbers.
async fn until_streaming(fx: &Fixture) {
    wait_until(TIMEOUT, "the log relay streaming", || async {
        fx.count("SELECT count(*) AS n FROM ferrybox_sequence_sources")
            .await
            == 1
    })
    .await;
}

fn start_consumer(
    fx: &Fixture,
    config: ferrybox::InboxConfig,
    alerter: Option<Alerter>,
) -> Running {
    let mut consumer = InboxConsumer::new(
        fx.pool.clone(),
        &testing::kafka(),
        fx.codec.clone(),
        Recorder::default(),
        config,
    )
    .unwrap();
    if let Some(alerter) = alerter {
        consumer = consumer.with_alerter(alerter);
    }
    Running::start(consumer)
}

/// Relay crashes (the task dropped where it stands, its last second of numbers not
/// checkpointed) and a replay of the whole sent log: every message keeps its number, and the
/// inbox applies each once, by number, with no inbox row.
#[tokio::test(flavor = "multi_thread")]
async fn numbers_are_contiguous_per_partition_and_kept_across_relay_crashes_and_replay() {
    let fx = Fixture::new(3).await.writing_for(RelayMode::Log);
    let mut ids = BTreeSet::new();
    for round in 0..3i64 {
        let running = RunningRelay::start(log_relay(&fx));
        until_streaming(&fx).await;
        for i in 0..30 {
            let id = fx
                .change(&format!("k{}", i % 10), round * 3 + i / 10 + 1)
                .await;
            ids.insert(id.to_string());
        }
        // Killed as soon as the round arrived, well before its numbers' checkpoint (once a
        // second) in most runs: the next relay sends them again.
        testing::read_ids(&testing::kafka(), &fx.topic, &ids, TIMEOUT).await;
        running.kill();
    }
    let running = RunningRelay::start(log_relay(&fx));
    wait_until(TIMEOUT, "the last numbers checkpointed", || async {
        fx.count("SELECT coalesce(sum(cardinality(row_ids)), 0)::bigint AS n FROM ferrybox_sequence_runs")
            .await
            == 90
    })
    .await;
    running.stop().await;
    let mut conn = ferrybox::db::connection(&fx.pool).await.unwrap();
    let producer = ferrybox::kafka::durable_producer(&testing::kafka()).unwrap();
    let replayed = sent_log::replay(
        &mut conn,
        &producer,
        &ReplaySelection::default(),
        ReplayOptions::default(),
    )
    .await
    .unwrap();
    assert_eq!(replayed.sent, 90);
    drop(conn);

    // Every message is on the topic at least twice now (the replay's copy last in each
    // partition): read until each was seen twice.
    let all = read_twice(&fx.topic, &ids).await;
    assert_eq!(check_numbering(&all), 90);
    let sources: BTreeSet<&String> = all.iter().map(|r| &r.headers[SOURCE_HEADER]).collect();
    assert_eq!(sources.len(), 1, "one slot, one source: {sources:?}");
    eprintln!("{} records read for 90 messages", all.len());

    let running = start_consumer(&fx, inbox_config(&fx, &testing::unique("group")), None);
    let read = u64::try_from(all.len()).unwrap();
    wait_until(
        TIMEOUT,
        "at least what the reader read processed",
        || async {
            let s = running.stats.snapshot();
            s.applied + s.duplicates >= read
        },
    )
    .await;
    let stats = running.stats.snapshot();
    running.stop().await;
    assert_eq!(stats.applied, 90);
    assert!(stats.duplicates >= read - 90, "{stats:?}");
    assert_eq!(fx.count("SELECT count(*) AS n FROM applied").await, 90);
    assert_eq!(
        fx.count("SELECT count(*) AS n FROM ferrybox_inbox").await,
        0,
        "numbered messages need no inbox row"
    );
    assert_eq!(
        fx.count("SELECT sum(last_seq)::bigint AS n FROM ferrybox_inbox_sequences")
            .await,
        90
    );
}

/// Publishes 40 changes of 8 keys through the log relay to `fx`'s 2 partitions, then has the
/// broker lose numbers 4..=6 of partition 0: the topic's data is deleted and every other
/// record published again as it was. Returns how many records partition 1 holds.
async fn publish_and_lose_4_to_6_of_partition_0(fx: &Fixture) -> usize {
    let running = RunningRelay::start(log_relay(fx));
    until_streaming(fx).await;
    let mut ids = BTreeSet::new();
    for i in 0..40 {
        ids.insert(
            fx.change(&format!("k{}", i % 8), i / 8 + 1)
                .await
                .to_string(),
        );
    }
    let mut records = testing::read_ids(&testing::kafka(), &fx.topic, &ids, TIMEOUT).await;
    running.stop().await;
    records.sort_by_key(|r| (r.partition, r.offset));
    let lost: Vec<&ReadRecord> = records
        .iter()
        .filter(|r| r.partition == 0 && (4..=6).contains(&number_of(r).2))
        .collect();
    assert_eq!(lost.len(), 3, "partition 0 holds at least 7 messages");
    let kept_partition_1 = records.iter().filter(|r| r.partition == 1).count();

    testing::delete_topic(&fx.topic).await.unwrap();
    testing::create_topic_named(&fx.topic, 2).await;
    let producer = ferrybox::kafka::durable_producer(&testing::kafka()).unwrap();
    for r in records
        .iter()
        .filter(|r| !(r.partition == 0 && (4..=6).contains(&number_of(r).2)))
    {
        let key = r.key.clone().unwrap();
        let payload = r.payload.clone().unwrap();
        producer
            .send(
                rdkafka::producer::FutureRecord::to(&fx.topic)
                    .partition(r.partition)
                    .key(&key)
                    .payload(&payload)
                    .headers(ferrybox::kafka::owned_headers(&r.headers)),
                Duration::from_secs(30),
            )
            .await
            .map_err(|(e, _)| e)
            .unwrap();
    }

    kept_partition_1
}

/// The broker loses three messages of one partition (the topic's data is deleted and every
/// record but those is published again as it was): the consumer applies the other partition
/// in full and the first up to the gap, records the gap and alerts; started with the
/// producer's repair endpoint, it fills the gap from the sent log and ends equal to the
/// producer, each key in order.
#[tokio::test(flavor = "multi_thread")]
async fn a_gap_halts_only_its_partition_alerts_and_is_repaired_from_the_producers_sent_log() {
    let fx = Fixture::new(2).await.writing_for(RelayMode::Log);
    let kept_partition_1 = publish_and_lose_4_to_6_of_partition_0(&fx).await;

    let stop = CancellationToken::new();
    let (webhook, alerts) = testing::alert_sink(&stop).await;
    let alerter = Alerter::new(&AlertConfig {
        webhook_url: Some(webhook.into()),
    })
    .unwrap();
    let group = testing::unique("group");
    let mut config = inbox_config(&fx, &group);
    config.repair_interval = Duration::from_millis(100);
    let running = start_consumer(&fx, config.clone(), Some(alerter.clone()));
    let halted_at = u64::try_from(kept_partition_1 + 3).unwrap();
    wait_until(TIMEOUT, "partition 1 applied, partition 0 halted at its gap", || async {
        running.stats.snapshot().applied == halted_at
            && fx
                .count("SELECT count(*) AS n FROM ferrybox_inbox_gaps WHERE status = 'open' AND kafka_partition = 0 AND from_seq = 4 AND to_seq = 6")
                .await
                == 1
    })
    .await;
    wait_until(TIMEOUT, "the gap alert", || async {
        alerts
            .lock()
            .unwrap()
            .iter()
            .any(|a| a.kind == "sequence_gap" && a.details["from_seq"] == 4)
    })
    .await;
    // Halted: a repair try (every 100 ms, with nothing to repair from) changes nothing.
    let tries_before = running.stats.snapshot();
    running.stop().await;
    assert_eq!(
        tries_before.applied, halted_at,
        "nothing after the gap was applied"
    );
    assert_eq!(
        fx.count("SELECT count(*) AS n FROM ferrybox_inbox_gaps")
            .await,
        1
    );

    let url = testing::serve(ferrybox::feed::numbered_router(fx.pool.clone()), &stop).await;
    config
        .repair_urls
        .insert(fx.topic.clone(), format!("{url}/events/numbered"));
    let running = start_consumer(&fx, config, Some(alerter));
    wait_until(TIMEOUT, "the gap repaired and the rest applied", || async {
        fx.count("SELECT count(*) AS n FROM applied").await == 40
    })
    .await;
    wait_until(TIMEOUT, "the gap closed", || async {
        fx.count("SELECT count(*) AS n FROM ferrybox_inbox_gaps WHERE status = 'repaired'")
            .await
            == 1
    })
    .await;
    running.stop().await;
    stop.cancel();
    // Equal to the producer, each key in order, each message once.
    assert_eq!(
        fx.count("SELECT count(DISTINCT message_id) AS n FROM applied")
            .await,
        40
    );
    assert_eq!(
        fx.count(
            "SELECT count(*) AS n FROM ( \
               SELECT version, row_number() OVER (PARTITION BY thing_id ORDER BY seq) AS rank \
               FROM applied) AS a WHERE version <> rank"
        )
        .await,
        0,
        "a key's versions were applied out of order"
    );
    let alerted = alerts
        .lock()
        .unwrap()
        .iter()
        .filter(|a| a.kind == "sequence_gap")
        .count();
    assert_eq!(alerted, 1, "the gap is alerted once, not again on restart");
}

/// With no repair endpoint, a gap waits for an operator: skipping it accepts the loss, and the
/// running consumer goes on after it within its repair interval.
#[tokio::test(flavor = "multi_thread")]
async fn an_operator_skipping_a_gap_resumes_its_partition_after_it() {
    // The open-gaps gauge (what the FerryboxInboxGap alert reads) is checked too.
    ferrybox::metrics::install().unwrap();
    let fx = Fixture::new(2).await.writing_for(RelayMode::Log);
    let kept_partition_1 = publish_and_lose_4_to_6_of_partition_0(&fx).await;
    let group = testing::unique("group");
    let open_gaps = |n: u32| {
        let line = format!("ferrybox_inbox_open_gaps{{messaging_consumer_group_name=\"{group}\"");
        move || {
            let line = line.clone();
            async move {
                ferrybox::metrics::render()
                    .lines()
                    .any(|l| l.starts_with(&line) && l.ends_with(&format!(" {n}")))
            }
        }
    };
    let mut config = inbox_config(&fx, &group);
    config.repair_interval = Duration::from_millis(100);
    let running = start_consumer(&fx, config, None);
    let gaps = ferrybox::inbox::Gaps::new(fx.pool.clone(), group.clone());
    wait_until(TIMEOUT, "the gap recorded", || async {
        gaps.list(false).await.unwrap().len() == 1
    })
    .await;
    wait_until(TIMEOUT, "the gauge counts the open gap", open_gaps(1)).await;
    wait_until(TIMEOUT, "partition 1 applied", || async {
        running.stats.snapshot().applied == u64::try_from(kept_partition_1 + 3).unwrap()
    })
    .await;
    let gap = gaps.list(false).await.unwrap().remove(0);
    assert_eq!((gap.kafka_partition, gap.from_seq, gap.to_seq), (0, 4, 6));
    assert!(!gaps.skip(gap.id + 1, "no such gap").await.unwrap());
    assert!(gaps.skip(gap.id, "lost in a test").await.unwrap());
    assert!(!gaps.skip(gap.id, "twice").await.unwrap(), "skipped once");
    wait_until(TIMEOUT, "the rest applied", || async {
        fx.count("SELECT count(*) AS n FROM applied").await == 37
    })
    .await;
    wait_until(TIMEOUT, "the gauge counts no open gap", open_gaps(0)).await;
    running.stop().await;
    assert_eq!(gaps.list(false).await.unwrap().len(), 0);
    let all = gaps.list(true).await.unwrap();
    assert_eq!(all[0].status, "skipped");
    assert_eq!(
        fx.count("SELECT count(DISTINCT message_id) AS n FROM applied")
            .await,
        37
    );
}

/// The runs (which rows got which numbers) age with the sent log: the relay deletes those
/// older than its retention, and keeps the counters.
#[tokio::test(flavor = "multi_thread")]
async fn number_runs_are_deleted_with_the_sent_log_and_the_counters_stay() {
    let fx = Fixture::new(1).await.writing_for(RelayMode::Log);
    let running = RunningRelay::start(log_relay(&fx));
    until_streaming(&fx).await;
    for i in 0..5 {
        fx.change("k", i + 1).await;
    }
    wait_until(TIMEOUT, "the numbers checkpointed", || async {
        fx.count("SELECT coalesce(sum(cardinality(row_ids)), 0)::bigint AS n FROM ferrybox_sequence_runs")
            .await
            == 5
    })
    .await;
    running.stop().await;
    testing::execute(
        fx.db.url(),
        "UPDATE ferrybox_sequence_runs SET created_at = now() - interval '2 hours'",
    )
    .await;
    let relay = ferrybox::Relay::new(
        fx.db.config(),
        &testing::kafka(),
        ferrybox::RelayConfig {
            retention: Duration::from_secs(3600),
            cleanup_interval: Duration::from_millis(100),
            standby_interval: Duration::from_millis(50),
            ..crate::support::Fixture::relay_config_in(RelayMode::Log)
        },
    )
    .unwrap();
    let running = RunningRelay::start(relay);
    wait_until(TIMEOUT, "the old runs deleted", || async {
        fx.count("SELECT count(*) AS n FROM ferrybox_sequence_runs")
            .await
            == 0
    })
    .await;
    running.stop().await;
    assert_eq!(
        fx.count("SELECT max(next_seq) AS n FROM ferrybox_sequence_counters")
            .await,
        6,
        "the counters stay"
    );
}
