//! The producer's side: a consistent full snapshot, streamed as NDJSON.

use std::future::Future;
use std::sync::Arc;

use axum::body::{Body, Bytes};
use axum::http::{HeaderValue, header};
use axum::response::{IntoResponse, Response};
use chrono::{DateTime, Utc};
use diesel::QueryableByName;
use diesel_async::{AsyncPgConnection, RunQueryDsl};
use tokio::io::{AsyncWrite, AsyncWriteExt};
use tokio::sync::mpsc;

use super::{SnapshotEntry, SnapshotHeader, SnapshotLine};
use crate::db::{self, PgPool};
use crate::error::{Error, Result};

/// Entries read per query while a snapshot streams.
const PAGE: i64 = 1_000;

/// What a producer implements to serve its entities as a snapshot.
pub trait SnapshotSource: Send + Sync + 'static {
    /// Up to `limit` entities with keys after `after` (all from the start when `None`), in
    /// key order, live and deleted (tombstones) alike, each with its per-entity version. It
    /// runs inside the snapshot's read-only repeatable-read transaction: every page sees the
    /// same moment.
    fn page(
        &self,
        conn: &mut AsyncPgConnection,
        after: Option<&str>,
        limit: i64,
    ) -> impl Future<Output = std::result::Result<Vec<SnapshotEntry>, diesel::result::Error>> + Send;
}

#[derive(QueryableByName)]
struct Moment {
    #[diesel(sql_type = diesel::sql_types::Timestamptz)]
    taken_at: DateTime<Utc>,
    #[diesel(sql_type = diesel::sql_types::BigInt)]
    watermark: i64,
}

/// Streams the snapshot of `source` (named `name` in its header), read in one read-only
/// repeatable-read transaction. The receiver gets each line as it is read, or the error that
/// ended the stream; when the receiver goes away, reading stops and the transaction rolls back.
pub fn stream<S: SnapshotSource>(
    pool: PgPool,
    source: Arc<S>,
    name: String,
) -> mpsc::Receiver<Result<SnapshotLine>> {
    let (sender, receiver) = mpsc::channel(8);
    tokio::spawn(async move {
        if let Err(e) = produce(&pool, source.as_ref(), name, &sender).await {
            // Nothing to tell when the reader is gone; otherwise the reader sees the error
            // (and the missing `end` line tells any later reader the snapshot is incomplete).
            let _ = sender.send(Err(e)).await;
        }
    });
    receiver
}

async fn produce<S: SnapshotSource>(
    pool: &PgPool,
    source: &S,
    name: String,
    sender: &mpsc::Sender<Result<SnapshotLine>>,
) -> Result<()> {
    let mut conn = db::connection(pool).await?;
    conn.build_transaction()
        .read_only()
        .repeatable_read()
        .run::<_, Error, _>(async |tx| {
            // Every message whose feed position is at most `watermark` is in this snapshot:
            // the relay only gives positions to committed rows, and this transaction sees
            // every commit before it.
            let moment: Moment = diesel::sql_query(
                "SELECT now() AS taken_at, (SELECT last FROM ferrybox_feed_sequence) AS watermark",
            )
            .get_result(tx)
            .await?;
            let header = SnapshotLine::Snapshot(SnapshotHeader {
                format: super::FORMAT.to_owned(),
                source: name,
                taken_at: moment.taken_at,
                watermark: moment.watermark,
            });
            send(sender, header).await?;
            let mut after: Option<String> = None;
            let mut entities = 0u64;
            loop {
                let page = source.page(tx, after.as_deref(), PAGE).await?;
                let full = i64::try_from(page.len()).unwrap_or(i64::MAX) >= PAGE;
                after = page.last().map(|e| e.key.clone());
                for entry in page {
                    entities += 1;
                    send(sender, SnapshotLine::Entry(entry)).await?;
                }
                if !full {
                    break;
                }
            }
            send(sender, SnapshotLine::End { entities }).await
        })
        .await
}

async fn send(sender: &mpsc::Sender<Result<SnapshotLine>>, line: SnapshotLine) -> Result<()> {
    sender
        .send(Ok(line))
        .await
        .map_err(|_| Error::Task("snapshot reader went away".into()))
}

/// One NDJSON line.
fn ndjson(line: &SnapshotLine) -> Result<Bytes> {
    let mut bytes = serde_json::to_vec(line).map_err(|e| Error::Snapshot(e.to_string()))?;
    bytes.push(b'\n');
    Ok(Bytes::from(bytes))
}

/// An HTTP response streaming the snapshot (`application/x-ndjson`). An error after the first
/// line cuts the stream short, so the client sees no `end` line and knows it is incomplete.
pub fn response<S: SnapshotSource>(pool: PgPool, source: Arc<S>, name: String) -> Response {
    let receiver = stream(pool, source, name);
    let body = futures::stream::unfold(receiver, |mut r| async move {
        let next = r.recv().await?;
        Some((
            next.and_then(|line| ndjson(&line)).map_err(|e| {
                tracing::error!(error = %e, "snapshot stream failed");
                std::io::Error::other(e.to_string())
            }),
            r,
        ))
    });
    let mut response = Body::from_stream(body).into_response();
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/x-ndjson"),
    );
    response
}

/// Writes the snapshot to `out` (a file, for an export); returns how many entities it holds.
pub async fn export<S: SnapshotSource, W: AsyncWrite + Unpin>(
    pool: PgPool,
    source: Arc<S>,
    name: String,
    out: &mut W,
) -> Result<u64> {
    let mut receiver = stream(pool, source, name);
    let mut entities = 0u64;
    let mut ended = false;
    while let Some(line) = receiver.recv().await {
        let line = line?;
        match &line {
            SnapshotLine::Entry(_) => entities += 1,
            SnapshotLine::End { .. } => ended = true,
            SnapshotLine::Snapshot(_) => {}
        }
        out.write_all(&ndjson(&line)?)
            .await
            .map_err(|e| Error::Snapshot(format!("writing the export: {e}")))?;
    }
    out.flush()
        .await
        .map_err(|e| Error::Snapshot(format!("writing the export: {e}")))?;
    if !ended {
        return Err(Error::Snapshot("the snapshot ended early".into()));
    }
    Ok(entities)
}
