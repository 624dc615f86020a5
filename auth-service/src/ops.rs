//! Operator commands: the dead-letter queue (`dlq list|show|redrive`), `reconcile`,
//! `feed position`, `gaps` and the id inbox's `generations`.

use std::time::Duration;

use anyhow::Context;
use ferrybox::inbox::{DeadLetter, DeadLetterFilter, DeadLetters, RedriveReport};
use ferrybox::{AvroCodec, db};

use crate::cache::UserEvents;
use crate::config::Settings;

fn letters(settings: &Settings) -> anyhow::Result<DeadLetters> {
    Ok(DeadLetters::new(
        db::pool(&settings.database)?,
        settings.inbox.consumer_name(),
    ))
}

fn line(d: &DeadLetter) -> String {
    format!(
        "{:>6}  {:<8} {:<12} {:<38} {}[{}]@{}  attempts={}  {}",
        d.id,
        d.status,
        d.error_kind,
        d.message_key.as_deref().unwrap_or("-"),
        d.topic,
        d.kafka_partition,
        d.kafka_offset,
        d.attempts,
        d.error
    )
}

/// `dlq list`: open dead letters (and what is parked behind them).
pub async fn list(
    settings: &Settings,
    filter: &DeadLetterFilter,
    json: bool,
) -> anyhow::Result<()> {
    let letters = letters(settings)?;
    let rows = letters.list(filter).await?;
    if json {
        println!("{}", serde_json::to_string_pretty(&rows)?);
    } else {
        let counts = letters.counts().await?;
        println!(
            "dead: {}  parked: {}  redriven: {}",
            counts.dead, counts.parked, counts.redriven
        );
        for d in &rows {
            println!("{}", line(d));
        }
    }
    Ok(())
}

/// `dlq show ID`: one dead letter in full. Errors when there is none with that id.
pub async fn show(settings: &Settings, id: i64, json: bool) -> anyhow::Result<()> {
    let letter = letters(settings)?
        .get(id)
        .await?
        .with_context(|| format!("no dead letter {id}"))?;
    if json {
        println!("{}", serde_json::to_string_pretty(&letter)?);
    } else {
        println!("{}", line(&letter));
        println!(
            "message id:   {}",
            letter
                .message_id
                .map(|m| m.to_string())
                .unwrap_or_else(|| "-".into())
        );
        println!(
            "message type: {}",
            letter.message_type.as_deref().unwrap_or("-")
        );
        println!(
            "consumer:     {}",
            letter.consumer_version.as_deref().unwrap_or("-")
        );
        println!(
            "recorded:     {}  updated: {}",
            letter.created_at, letter.updated_at
        );
        println!(
            "published:    {}",
            letter
                .published_at
                .map(|t| t.to_string())
                .unwrap_or_else(|| "-".into())
        );
        println!(
            "payload:      {} bytes",
            letter.payload.as_ref().map_or(0, Vec::len)
        );
        println!("headers:      {}", letter.headers);
    }
    Ok(())
}

/// `dlq redrive`: runs the selected dead letters, and what is parked behind them, through the
/// current handler. Returns the report; the caller exits non-zero when some failed again.
pub async fn redrive(
    settings: &Settings,
    filter: &DeadLetterFilter,
    json: bool,
) -> anyhow::Result<RedriveReport> {
    let report = letters(settings)?
        .redrive(
            filter,
            AvroCodec::new(&settings.schema_registry_url),
            UserEvents,
            Some(crate::events::reader_schemas()?),
            settings.inbox.handler_timeout.max(Duration::from_secs(1)),
        )
        .await?;
    if json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        println!(
            "applied: {}  already applied: {}  failed again: {}  still parked: {}",
            report.applied, report.duplicates, report.failed, report.still_parked
        );
    }
    Ok(report)
}

/// `reconcile [--file F]`: one reconciliation run; prints its report.
pub async fn reconcile(
    settings: &Settings,
    file: Option<&std::path::Path>,
    json: bool,
) -> anyhow::Result<ferrybox::reconcile::Report> {
    let pool = db::pool(&settings.database)?;
    let alerter = ferrybox::alert::Alerter::new(&settings.alert)?;
    let reconciler = crate::startup::reconciler(settings, pool, alerter)?;
    let report = match file {
        Some(path) => reconciler.run_file(path).await,
        None => reconciler.run_once().await,
    }
    .context("reconciliation")?;
    if json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        println!(
            "reconciled with {} (snapshot of {}, watermark {}):",
            report.source, report.snapshot_taken_at, report.watermark
        );
        println!(
            "  checked {}  in sync {}  repaired {}  skipped as newer {}  unresolved {}",
            report.checked,
            report.in_sync,
            report.repaired,
            report.skipped_newer,
            report.unresolved
        );
        for u in &report.unresolved_entities {
            println!("  unresolved {}: {}", u.key, u.reason);
        }
    }
    Ok(report)
}

/// `feed position [--set N]`.
pub async fn feed_position(
    settings: &Settings,
    set: Option<i64>,
    json: bool,
) -> anyhow::Result<()> {
    let pool = db::pool(&settings.database)?;
    let mut conn = db::connection(&pool)
        .await
        .context("connecting to the database")?;
    let consumer = settings.inbox.consumer_name();
    let feed = settings.feed.name.as_str();
    if let Some(position) = set {
        ferrybox::feed::set_position(&mut conn, consumer, feed, position).await?;
    }
    let position = ferrybox::feed::position(&mut conn, consumer, feed).await?;
    if json {
        println!(
            "{}",
            serde_json::json!({ "consumer": consumer, "feed": feed, "position": position })
        );
    } else {
        println!("{consumer} on feed {feed}: position {position}");
    }
    Ok(())
}

/// `gaps list`: the open gaps in user-service's numbers (every gap with `all`).
pub async fn gaps(settings: &Settings, all: bool, json: bool) -> anyhow::Result<()> {
    let gaps = ferrybox::inbox::Gaps::new(
        db::pool(&settings.database)?,
        settings.inbox.consumer_name(),
    )
    .list(all)
    .await?;
    if json {
        println!("{}", serde_json::to_string_pretty(&gaps)?);
        return Ok(());
    }
    println!("{} gap(s)", gaps.len());
    for g in &gaps {
        println!(
            "#{} {} {}/{} missing {}..={} (resumes at offset {}) {} since {}{}",
            g.id,
            g.source,
            g.topic,
            g.kafka_partition,
            g.from_seq,
            g.to_seq,
            g.kafka_offset,
            g.status,
            g.detected_at.format("%Y-%m-%d %H:%M:%S"),
            g.detail
                .as_deref()
                .map(|d| format!(": {d}"))
                .unwrap_or_default(),
        );
    }
    Ok(())
}

/// `generations`: the id inbox's generations, and what keeps each.
pub async fn generations(settings: &Settings, json: bool) -> anyhow::Result<()> {
    let generations = ferrybox::inbox::generations(&db::pool(&settings.database)?).await?;
    if json {
        println!("{}", serde_json::to_string_pretty(&generations)?);
        return Ok(());
    }
    for g in &generations {
        println!(
            "generation {} opened {} {}",
            g.generation,
            g.opened_at.format("%Y-%m-%d %H:%M:%S"),
            match (&g.closed_at, g.ids) {
                (None, _) => "(ids go here now)".to_owned(),
                (Some(_), None) => "closed, not summed up yet".to_owned(),
                (Some(closed), Some(ids)) => format!(
                    "closed {}, {ids} ids, {}",
                    closed.format("%Y-%m-%d %H:%M:%S"),
                    if g.held_by.is_empty() {
                        "dropped on the next pass".to_owned()
                    } else {
                        format!("kept for {}", g.held_by.join(", "))
                    }
                ),
            }
        );
    }
    Ok(())
}

/// `gaps skip ID --reason R`: accepts the loss of an open gap's messages. False when no open
/// gap has that id.
pub async fn skip_gap(settings: &Settings, id: i64, reason: &str) -> anyhow::Result<bool> {
    Ok(ferrybox::inbox::Gaps::new(
        db::pool(&settings.database)?,
        settings.inbox.consumer_name(),
    )
    .skip(id, reason)
    .await?)
}
