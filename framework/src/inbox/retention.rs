//! Inbox retention: applied ids are kept long enough to catch every redelivery the broker can
//! still make, then deleted in small batches so no long lock or bloat builds up.

use std::time::Duration;

use diesel::sql_types::{BigInt, Interval, Text};
use diesel_async::RunQueryDsl;

use crate::db::{self, PgPool};
use crate::error::Result;

/// Rows deleted per statement.
pub(crate) const BATCH: i64 = 1_000;

/// Deletes `consumer`'s inbox rows applied more than `retention` ago, `batch` rows per
/// statement; returns how many went.
pub async fn delete_expired(
    pool: &PgPool,
    consumer: &str,
    retention: Duration,
    batch: i64,
) -> Result<u64> {
    let mut conn = db::connection(pool).await?;
    let interval = diesel::data_types::PgInterval::from_microseconds(
        i64::try_from(retention.as_micros()).unwrap_or(i64::MAX),
    );
    let mut total = 0u64;
    loop {
        let deleted = diesel::sql_query(
            "DELETE FROM ferrybox_inbox WHERE ctid IN ( \
                 SELECT ctid FROM ferrybox_inbox \
                 WHERE consumer = $1 AND applied_at < now() - $2 \
                 ORDER BY applied_at LIMIT $3)",
        )
        .bind::<Text, _>(consumer)
        .bind::<Interval, _>(interval)
        .bind::<BigInt, _>(batch)
        .execute(&mut conn)
        .await?;
        total += u64::try_from(deleted).unwrap_or(0);
        if i64::try_from(deleted).unwrap_or(0) < batch {
            return Ok(total);
        }
        // Let other work in between batches.
        tokio::task::yield_now().await;
    }
}
