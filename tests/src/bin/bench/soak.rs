//! The storage soak: writes and ages `FERRYBOX_SOAK_ROWS` (default 10,000,000) outbox rows
//! (the log relay's table, `ferrybox_messages`) and as many inbox ids, in rounds, with a
//! retention of a few seconds so that rows expire all along, and runs the retention the
//! relay and the inbox run (partition drops, see `ferrybox::storage`) after every round.
//! Prints both tables' size and the cost of a retention pass over the first and the last
//! quarter of the rounds: both stay flat when retention keeps up without leaving dead rows.
//!
//! Ratios: `soak_outbox_size_end_vs_start`, `soak_inbox_size_end_vs_start`,
//! `soak_cleanup_end_vs_start` (1.0 is flat).

use std::time::{Duration, Instant};

use diesel_async::{AsyncConnection, AsyncPgConnection, RunQueryDsl};
use ferrybox::inbox::Horizon;
use ferrybox::testing::TestDatabase;

use crate::Report;

const DEFAULT_ROWS: u64 = 10_000_000;
/// Rows of each table written per round (one statement each).
const ROUND: u64 = 100_000;
/// The sent log's retention: ranges of a second each.
const OUTBOX_RETENTION: Duration = Duration::from_secs(8);
/// How old an id must be before it may go (its group is past it from the start).
const INBOX_MIN_AGE: Duration = Duration::from_secs(4);

fn rows() -> u64 {
    std::env::var("FERRYBOX_SOAK_ROWS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(DEFAULT_ROWS)
}

/// One round's readings.
struct Round {
    outbox_bytes: i64,
    inbox_bytes: i64,
    cleanup: Duration,
}

pub(crate) async fn run(report: &mut Report) -> anyhow::Result<()> {
    let total = rows();
    let rounds = total.div_ceil(ROUND).max(10);
    eprintln!("soak: {rounds} rounds of {ROUND} outbox rows and {ROUND} inbox ids");
    let (db, pool) = TestDatabase::with_framework_tables().await;
    let mut conn = AsyncPgConnection::establish(db.url()).await?;
    let horizon = Horizon::none().with("soak", 0, i64::MAX, INBOX_MIN_AGE);
    let payload = "x".repeat(200);
    let mut readings = Vec::with_capacity(usize::try_from(rounds).unwrap_or(0));
    let started = Instant::now();
    for round in 0..rounds {
        diesel::sql_query(format!(
            "INSERT INTO ferrybox_messages \
               (message_id, topic, message_key, message_type, entity_version, headers, payload, occurred_at) \
             SELECT gen_random_uuid(), 'soak', 'k' || (n % 1000), 'soak.Changed', n, '{{}}', \
                    convert_to('{payload}', 'UTF8'), now() \
             FROM generate_series(1, {ROUND}) AS n"
        ))
        .execute(&mut conn)
        .await?;
        diesel::sql_query(format!(
            "INSERT INTO ferrybox_inbox \
               (consumer, message_id, message_type, topic, kafka_partition, kafka_offset, generation) \
             SELECT 'soak', gen_random_uuid(), 'soak.Changed', 'soak', 0, {base} + n, \
                    (SELECT max(generation) FROM ferrybox_inbox_generations) \
             FROM generate_series(1, {ROUND}) AS n",
            base = round * ROUND
        ))
        .execute(&mut conn)
        .await?;
        let cleaning = Instant::now();
        ferrybox::storage::maintain_outboxes(&mut conn, OUTBOX_RETENTION).await?;
        ferrybox::inbox::expire(&pool, "soak", &horizon, INBOX_MIN_AGE).await?;
        let cleanup = cleaning.elapsed();
        let outbox = ferrybox::storage::table_storage(&mut conn, "ferrybox_messages").await?;
        let inbox = ferrybox::storage::table_storage(&mut conn, "ferrybox_inbox").await?;
        readings.push(Round {
            outbox_bytes: outbox.bytes,
            inbox_bytes: inbox.bytes,
            cleanup,
        });
        if round % 10 == 0 {
            eprintln!(
                "  round {round}: outbox {:.0} MB in {} partitions, inbox {:.0} MB in {}, cleanup {:.1} ms",
                mb(outbox.bytes),
                outbox.partitions,
                mb(inbox.bytes),
                inbox.partitions,
                cleanup.as_secs_f64() * 1e3
            );
        }
    }
    let elapsed = started.elapsed();
    // Steady state begins once the first rows have expired: skip the first tenth of the
    // rounds (longer than the retention), then compare the first quarter of the rest with the
    // last quarter (sizes saw up and down as ranges fill and go: a quarter spans many teeth).
    let warm = readings.len() / 10;
    let steady = &readings[warm..];
    let quarter = (steady.len() / 4).max(1);
    let (first, last) = (&steady[..quarter], &steady[steady.len() - quarter..]);
    let mean = |rs: &[Round], f: fn(&Round) -> f64| rs.iter().map(f).sum::<f64>() / rs.len() as f64;
    let outbox_size = |r: &Round| r.outbox_bytes as f64;
    let inbox_size = |r: &Round| r.inbox_bytes as f64;
    let cleanup = |r: &Round| r.cleanup.as_secs_f64() * 1e3;
    report.row("soak: rows written per table", (rounds * ROUND) as f64);
    report.row("soak: wall time (s)", elapsed.as_secs_f64());
    report.row(
        "soak: outbox size at start (MB)",
        mb(mean(first, outbox_size) as i64),
    );
    report.row(
        "soak: outbox size at end (MB)",
        mb(mean(last, outbox_size) as i64),
    );
    report.row(
        "soak: inbox size at start (MB)",
        mb(mean(first, inbox_size) as i64),
    );
    report.row(
        "soak: inbox size at end (MB)",
        mb(mean(last, inbox_size) as i64),
    );
    let peak = |f: fn(&Round) -> i64| steady.iter().map(f).max().unwrap_or(0);
    report.row(
        "soak: outbox size at most, after warm-up (MB)",
        mb(peak(|r| r.outbox_bytes)),
    );
    report.row(
        "soak: inbox size at most, after warm-up (MB)",
        mb(peak(|r| r.inbox_bytes)),
    );
    report.row("soak: retention pass at start (ms)", mean(first, cleanup));
    report.row("soak: retention pass at end (ms)", mean(last, cleanup));
    report.ratio(
        "soak_outbox_size_end_vs_start",
        mean(last, outbox_size) / mean(first, outbox_size),
    );
    report.ratio(
        "soak_inbox_size_end_vs_start",
        mean(last, inbox_size) / mean(first, inbox_size),
    );
    report.ratio(
        "soak_cleanup_end_vs_start",
        mean(last, cleanup) / mean(first, cleanup),
    );
    drop(conn);
    drop(pool);
    drop(db);
    Ok(())
}

fn mb(bytes: i64) -> f64 {
    bytes as f64 / 1e6
}
