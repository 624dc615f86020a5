//! Operator commands for the producer side: `relay` on its own, `outbox status`,
//! `outbox replay` and `snapshot --out`.

use anyhow::Context;
use ferrybox::outbox::sent_log;
use ferrybox::{CancellationToken, Relay, ReplayOptions, ReplaySelection, db};

use crate::config::Settings;

/// `relay`: runs only the relay (no HTTP API) until `shutdown`. Several can run at once; one
/// is active, the others take over when it stops.
pub async fn relay(settings: &Settings, shutdown: CancellationToken) -> anyhow::Result<()> {
    db::migrate_service(&db::pool(&settings.database)?, crate::startup::MIGRATIONS)
        .await
        .context("database migrations")?;
    ferrybox::kafka::check_durability(&settings.kafka, std::slice::from_ref(&settings.users_topic))
        .await
        .context("users topic")?;
    let relay = Relay::new(
        settings.database.clone(),
        &settings.kafka,
        settings.relay.clone(),
    )?;
    relay.run(shutdown).await.context("relay")
}

async fn connection(settings: &Settings) -> anyhow::Result<db::PooledConnection> {
    let pool = db::pool(&settings.database)?;
    db::connection(&pool)
        .await
        .context("connecting to the database")
}

/// `outbox status`: backlog, its age, rows with errors and the sent log's extent.
pub async fn status(settings: &Settings, json: bool) -> anyhow::Result<sent_log::OutboxStatus> {
    let mut conn = connection(settings).await?;
    let status = sent_log::status(&mut conn).await?;
    let vacuum = ferrybox::vacuum::holds(&mut conn).await?;
    let storage = ferrybox::storage::outbox_storage(&mut conn).await?;
    let retention_seconds = settings.relay.retention.as_secs();
    if json {
        let mut value = serde_json::to_value(&status)?;
        value["retention_seconds"] = retention_seconds.into();
        value["storage"] = serde_json::to_value(&storage)?;
        value["vacuum"] = serde_json::to_value(&vacuum)?;
        println!("{}", serde_json::to_string_pretty(&value)?);
    } else {
        println!("unpublished:            {}", status.unpublished);
        println!(
            "oldest unpublished age: {}",
            status
                .oldest_unpublished_age_seconds
                .map_or_else(|| "-".to_owned(), |s| format!("{s:.1}s"))
        );
        println!(
            "with errors:            {}{}",
            status.unpublished_with_errors,
            status
                .last_error
                .as_deref()
                .map_or_else(String::new, |e| format!("  (last: {e})"))
        );
        println!("sent log rows:          {}", status.sent_log_rows);
        println!(
            "sent log oldest:        {}",
            status
                .sent_log_oldest
                .map_or_else(|| "-".to_owned(), |t| t.to_rfc3339())
        );
        println!("retention:              {retention_seconds}s");
        for t in &storage {
            println!(
                "storage:                {} in {} partitions, {:.1} MB, {} rows outside its ranges",
                t.table,
                t.partitions,
                t.bytes as f64 / 1e6,
                t.default_rows
            );
        }
        println!("log relay messages:     {}", status.log_messages);
        println!("relay shards:           {}", status.relay_shards);
        match &status.slot_name {
            Some(slot) => println!(
                "replication slot:       {slot} ({}, {}), {} bytes to confirm, {} bytes of WAL kept",
                status.slot_wal_status.as_deref().unwrap_or("unknown"),
                if status.slot_active == Some(true) {
                    "streaming"
                } else {
                    "idle"
                },
                status.slot_lag_bytes.unwrap_or(0),
                status.slot_retained_bytes.unwrap_or(0),
            ),
            None => println!("replication slot:       none (the relay polls the table)"),
        }
        print_vacuum(&vacuum);
    }
    Ok(status)
}

/// `outbox reshard`: splits the log relay into `shards` shards, online.
pub async fn reshard(
    settings: &Settings,
    shards: u32,
    timeout: std::time::Duration,
    json: bool,
) -> anyhow::Result<ferrybox::outbox::ReshardReport> {
    let mut conn = connection(settings).await?;
    let report = ferrybox::outbox::reshard(
        &mut conn,
        settings.relay.slot_name.as_deref(),
        shards,
        timeout,
    )
    .await?;
    if json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else if report.from == report.to {
        println!("the relay already runs as {} shard(s)", report.to);
    } else {
        println!(
            "the relay runs as {} shard(s) now (was {}); dropped slots: {}",
            report.to,
            report.from,
            report.dropped_slots.join(", ")
        );
    }
    Ok(report)
}

/// `outbox replay`: sends a range of the sent log again, with the original ids and headers.
pub async fn replay(
    settings: &Settings,
    selection: &ReplaySelection,
    options: ReplayOptions,
    json: bool,
) -> anyhow::Result<sent_log::ReplayReport> {
    let mut conn = connection(settings).await?;
    let producer = ferrybox::kafka::durable_producer(&settings.kafka)?;
    let report = sent_log::replay(&mut conn, &producer, selection, options).await?;
    if json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else if report.dry_run {
        println!("would replay {} messages (dry run)", report.matched);
    } else {
        println!(
            "replayed {} of {} messages; {} failed{}",
            report.sent,
            report.matched,
            report.failed,
            report
                .first_error
                .as_deref()
                .map_or_else(String::new, |e| format!(" (first error: {e})"))
        );
    }
    Ok(report)
}

/// `snapshot --out FILE`: writes the full snapshot of users to `out`.
pub async fn export_snapshot(
    settings: &Settings,
    out: &std::path::Path,
    json: bool,
) -> anyhow::Result<()> {
    let pool = db::pool(&settings.database)?;
    let mut file = tokio::fs::File::create(out)
        .await
        .with_context(|| format!("creating {}", out.display()))?;
    let entities = ferrybox::reconcile::snapshot::export(
        pool,
        std::sync::Arc::new(crate::snapshot::UserSnapshot),
        crate::snapshot::SOURCE.to_owned(),
        &mut file,
    )
    .await
    .context("exporting the snapshot")?;
    if json {
        println!(
            "{}",
            serde_json::json!({ "file": out.display().to_string(), "entities": entities })
        );
    } else {
        println!("{entities} users written to {}", out.display());
    }
    Ok(())
}

/// What holds vacuum back, for `outbox status`.
fn print_vacuum(vacuum: &ferrybox::vacuum::VacuumHolds) {
    match vacuum.oldest_transaction_seconds {
        Some(seconds) => println!(
            "oldest transaction:     {seconds:.0}s (pid {}, {})",
            vacuum.oldest_transaction_pid.unwrap_or_default(),
            vacuum.oldest_transaction_client.as_deref().unwrap_or("?")
        ),
        None => println!("oldest transaction:     -"),
    }
    println!(
        "prepared transactions:  {}{}",
        vacuum.prepared_transactions,
        vacuum
            .oldest_prepared_gid
            .as_deref()
            .map_or_else(String::new, |gid| format!(
                " (oldest '{gid}', {:.0}s)",
                vacuum.oldest_prepared_seconds.unwrap_or_default()
            ))
    );
    println!(
        "inactive slots:         {}",
        if vacuum.inactive_slots.is_empty() {
            "-".to_owned()
        } else {
            format!(
                "{} (up to {} bytes of WAL kept)",
                vacuum.inactive_slots.join(", "),
                vacuum.inactive_slot_retained_bytes.unwrap_or_default()
            )
        }
    );
    println!(
        "slot keeping most WAL:  {}",
        match (&vacuum.most_retaining_slot, vacuum.most_retained_bytes) {
            (Some(slot), Some(bytes)) => format!("{bytes} bytes ({slot})"),
            _ => "-".to_owned(),
        }
    );
}
