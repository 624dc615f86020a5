//! Writing messages into the outbox, inside the caller's business transaction.

use diesel::prelude::*;
use diesel_async::{AsyncConnection, AsyncPgConnection, RunQueryDsl, TransactionManager};

use super::schema::ferrybox_outbox;
use crate::error::{Error, Result};
use crate::message::OutgoingMessage;

/// Writes messages to the outbox table. Cheap to clone.
#[derive(Debug, Clone)]
pub struct Outbox {
    source: String,
}

#[derive(Insertable)]
#[diesel(table_name = ferrybox_outbox)]
struct NewRow<'a> {
    message_id: uuid::Uuid,
    topic: &'a str,
    message_key: &'a str,
    message_type: &'a str,
    entity_version: i64,
    headers: serde_json::Value,
    payload: &'a [u8],
    occurred_at: chrono::DateTime<chrono::Utc>,
}

impl Outbox {
    /// An outbox whose messages name `source` (the service) as their CloudEvents source.
    pub fn new(source: impl Into<String>) -> Self {
        Self {
            source: source.into(),
        }
    }

    /// The CloudEvents source this outbox stamps on its messages.
    pub fn source(&self) -> &str {
        &self.source
    }

    /// Adds `message` to the outbox as part of the transaction open on `conn`: it is published
    /// if and only if that transaction commits.
    ///
    /// Fails with [`Error::NotInTransaction`] when `conn` has no open transaction, since the
    /// message would then commit apart from the business change it describes.
    ///
    /// ```no_run
    /// # use diesel_async::{AsyncConnection, AsyncPgConnection};
    /// # async fn example(conn: &mut AsyncPgConnection, outbox: &ferrybox::Outbox,
    /// #                  message: ferrybox::OutgoingMessage) -> Result<(), ferrybox::Error> {
    /// conn.transaction::<_, ferrybox::Error, _>(async |tx| {
    ///     // ... change your own rows with `tx` ...
    ///     outbox.enqueue(tx, &message).await
    /// })
    /// .await
    /// # }
    /// ```
    pub async fn enqueue(
        &self,
        conn: &mut AsyncPgConnection,
        message: &OutgoingMessage,
    ) -> Result<()> {
        let depth = <AsyncPgConnection as AsyncConnection>::TransactionManager::transaction_manager_status_mut(conn)
            .transaction_depth()?;
        if depth.is_none() {
            return Err(Error::NotInTransaction);
        }
        let headers = serde_json::to_value(message.kafka_headers(&self.source))
            .map_err(|e| Error::Config(format!("headers are not JSON: {e}")))?;
        diesel::insert_into(ferrybox_outbox::table)
            .values(NewRow {
                message_id: message.id.0,
                topic: &message.topic,
                message_key: &message.key,
                message_type: &message.message_type,
                entity_version: message.entity_version,
                headers,
                payload: &message.payload,
                occurred_at: message.occurred_at,
            })
            .execute(conn)
            .await?;
        Ok(())
    }
}
