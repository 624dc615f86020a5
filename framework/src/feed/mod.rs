//! The pulled event feed: the broker-less alternative to Kafka.
//!
//! The producer serves its sent log at an `events` endpoint ([`FeedServer`], an axum
//! router); a consumer pulls it in order ([`FeedConsumer`]) and applies each message through the
//! same [`Handler`](crate::inbox::Handler), inbox and dead-letter store as the Kafka consumer.
//!
//! **Positions.** Every published outbox row gets a feed position when the relay records it:
//! 1, 2, 3, ... with no gap, in the order the relay recorded rows, and only ever on committed
//! rows. A transaction that commits late gets a later position; it is never skipped, as it
//! would be by a reader of `id > last_seen` (ids are drawn before commit). The positions of one
//! recording transaction become visible together and after those of every earlier one, so a
//! reader never sees position N+1 without N. Per key, position order is commit order.
//! A producer without a broker runs [`Relay::feed_only`](crate::Relay::feed_only).
//!
//! **Consumers** store their position in their own database, in the same transaction as the
//! changes the messages made, so a crash anywhere resumes exactly after the last applied
//! message; the position is also how the inbox deduplicates (its row is locked in the applying
//! transaction, and a message at or below it is skipped), so no inbox row is written per
//! message (`inbox.dedup = "id"` writes them). On data they cannot understand they
//! halt and raise an alert (the default), or dead-letter it and go on.
//!
//! **The wire format** (`GET /events?after=P&limit=N&wait_ms=W`):
//!
//! ```json
//! {"events": [{"position": 8, "id": "…", "topic": "users", "key": "…", "type": "…",
//!              "headers": {"ce_id": "…"}, "payload": "<base64 of the Avro bytes>"}],
//!  "next": 8, "head": 12}
//! ```
//!
//! `next` is the position to ask after next time; `head` the newest position. With no event
//! after `P` the request waits up to `wait_ms` for one (long polling). A position older than
//! the sent log's retention answers `410 position_expired`; one beyond the head (the
//! producer's database was restored from an older backup) answers `409 position_ahead`: both
//! need an operator (reconcile, then set the position).

mod consumer;
mod numbered;
mod server;

use std::collections::BTreeMap;

use diesel_async::{AsyncPgConnection, RunQueryDsl};
use serde::{Deserialize, Serialize};

pub use consumer::{FeedConfig, FeedConsumer, OnUndecodable};
pub(crate) use numbered::NumberedApi;
pub use numbered::{MAX_NUMBERS, numbered_router};
pub(crate) use server::EventsApi;
pub use server::{FeedServer, FeedServerConfig};

use crate::outbox::schema::ferrybox_feed_positions as positions;

/// The partition number feed records carry where Kafka records carry theirs (in the inbox and
/// dead-letter tables); their offset is the feed position.
pub const FEED_PARTITION: i32 = -1;

/// The notification channel the relay signals when it gave out new positions.
pub(crate) const NOTIFY_CHANNEL: &str = "ferrybox_feed";

/// One event on the feed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct FeedEvent {
    /// Its feed position.
    pub position: i64,
    /// The message id (the same as on Kafka).
    pub id: uuid::Uuid,
    /// The topic it was enqueued for.
    pub topic: String,
    /// Its key.
    pub key: String,
    /// Its type.
    #[serde(rename = "type")]
    pub message_type: String,
    /// Its headers (CloudEvents attributes, trace context).
    pub headers: BTreeMap<String, String>,
    /// The payload bytes (Avro in the Confluent wire format), base64.
    pub payload: String,
}

/// One page of the feed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct FeedPage {
    /// Events after the requested position, in position order, with no gap.
    pub events: Vec<FeedEvent>,
    /// The position to ask after next.
    pub next: i64,
    /// The newest position the producer has given out.
    pub head: i64,
}

/// The URL of the page after `after` on the feed at `base`, at most `limit` events, waiting up
/// to `wait` for the first.
pub(crate) fn page_url(
    base: &str,
    after: i64,
    limit: usize,
    wait: std::time::Duration,
) -> crate::Result<reqwest::Url> {
    let mut url =
        reqwest::Url::parse(base).map_err(|e| crate::Error::Config(format!("feed.url: {e}")))?;
    url.query_pairs_mut()
        .append_pair("after", &after.to_string())
        .append_pair("limit", &limit.to_string())
        .append_pair("wait_ms", &wait.as_millis().to_string());
    Ok(url)
}

/// A consumer's stored position on `feed` (0 before its first message).
pub async fn position(
    conn: &mut AsyncPgConnection,
    consumer: &str,
    feed: &str,
) -> crate::Result<i64> {
    use diesel::{ExpressionMethods, OptionalExtension, QueryDsl};
    let stored: Option<i64> = positions::table
        .filter(positions::consumer.eq(consumer))
        .filter(positions::feed.eq(feed))
        .select(positions::position)
        .first(conn)
        .await
        .optional()?;
    Ok(stored.unwrap_or(0))
}

/// Sets a consumer's position on `feed`, for an operator: after a reconciliation, to skip
/// past a halt, or to start from a snapshot's watermark. Unlike the consumer's own updates it
/// may move the position back.
pub async fn set_position(
    conn: &mut AsyncPgConnection,
    consumer: &str,
    feed: &str,
    position: i64,
) -> crate::Result<()> {
    use diesel::ExpressionMethods;
    if position < 0 {
        return Err(crate::Error::Config(
            "a feed position is never negative".into(),
        ));
    }
    diesel::insert_into(positions::table)
        .values((
            positions::consumer.eq(consumer),
            positions::feed.eq(feed),
            positions::position.eq(position),
        ))
        .on_conflict((positions::consumer, positions::feed))
        .do_update()
        .set((
            positions::position.eq(position),
            positions::updated_at.eq(diesel::dsl::now),
        ))
        .execute(conn)
        .await?;
    Ok(())
}

/// Moves a consumer's position forward to `position` (never back), in the caller's
/// transaction.
pub(crate) async fn store_position(
    conn: &mut AsyncPgConnection,
    consumer: &str,
    feed: &str,
    position: i64,
) -> Result<(), diesel::result::Error> {
    use diesel::sql_types::{BigInt, Text};
    diesel::sql_query(
        "INSERT INTO ferrybox_feed_positions (consumer, feed, position) VALUES ($1, $2, $3) \
         ON CONFLICT (consumer, feed) DO UPDATE \
         SET position = GREATEST(ferrybox_feed_positions.position, EXCLUDED.position), \
             updated_at = now()",
    )
    .bind::<Text, _>(consumer)
    .bind::<Text, _>(feed)
    .bind::<BigInt, _>(position)
    .execute(conn)
    .await?;
    Ok(())
}
