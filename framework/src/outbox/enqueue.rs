//! Writing messages into the outbox, inside the caller's business transaction.

use diesel::sql_types::{BigInt, Bytea, Jsonb, Text, Timestamptz, Uuid};
use diesel_async::{AsyncConnection, AsyncPgConnection, RunQueryDsl, TransactionManager};

use crate::error::{Error, Result};
use crate::message::OutgoingMessage;

/// The channel the outbox notifies and the relay listens on.
pub(crate) const NOTIFY_CHANNEL: &str = "ferrybox_outbox";

/// The advisory lock ("ferr", "wait") the active relay holds while it waits for work.
///
/// Every enqueueing transaction tries to take it *shared* until it ends, and notifies only when
/// it cannot: that is, when a relay holds it (waiting for a wake-up) or is queued for it (about
/// to wait). A relay that is busy publishing, or absent, costs writers no `NOTIFY`, whose
/// commit-time global lock would otherwise serialize every writer's commit. No wake-up is
/// lost: before it waits, the relay takes the lock exclusively, which waits out every
/// transaction that holds it shared (those that did not notify), and then looks at the outbox
/// once more, so it sees their rows. In `pg_locks` it is the advisory lock with these `classid`
/// and `objid`, held exclusively by the waiting relay.
pub const RELAY_WAITING_LOCK: (i32, i32) = (0x6665_7272, 0x7761_6974);

/// Takes the key's lock, then inserts (so the row's id is drawn after the lock), then notifies
/// if a relay is waiting (see [`RELAY_WAITING_LOCK`]; the numbers below are that lock).
///
/// The key lock is a transaction-scoped advisory lock on a 64-bit hash of topic and key: a
/// second transaction writing the same key waits until the first one ends, so for one key the
/// outbox ids are in commit order and the relay, which publishes in id order, keeps it.
/// Different keys never wait for each other (barring a hash collision, which only costs a
/// short wait).
///
/// `pg_notify` with the same channel and payload is folded into one notification per
/// transaction by PostgreSQL, so a transaction with many messages still notifies once; and a
/// transaction that already holds the waiting lock shared takes it again without notifying.
const ENQUEUE_SQL: &str = "\
WITH key_lock AS (
    SELECT pg_advisory_xact_lock(hashtextextended($2 || E'\\n' || $3, 0))
), inserted AS (
    INSERT INTO ferrybox_outbox
        (message_id, topic, message_key, message_type, entity_version, headers, payload, occurred_at)
    SELECT $1, $2, $3, $4, $5, $6, $7, $8 FROM key_lock
    RETURNING 1
)
SELECT pg_notify('ferrybox_outbox', '') FROM inserted
WHERE NOT pg_try_advisory_xact_lock_shared(1717924466, 2002872692)";

/// The key lock and the insert into `$table`, without a notification.
macro_rules! enqueue_quietly_into {
    ($table:literal) => {
        concat!(
            "WITH key_lock AS (
    SELECT pg_advisory_xact_lock(hashtextextended($2 || E'\\n' || $3, 0))
)
INSERT INTO ", $table, "
    (message_id, topic, message_key, message_type, entity_version, headers, payload, occurred_at)
SELECT $1, $2, $3, $4, $5, $6, $7, $8 FROM key_lock"
        )
    };
}

/// The same without the notification, for outboxes whose relay only polls.
const ENQUEUE_SQL_QUIET: &str = enqueue_quietly_into!("ferrybox_outbox");

/// The same for the log relay: the append-only table, no notification (the relay is woken
/// by the stream itself). The key lock stays: for one key, ids follow commit order, which is
/// the order a new slot's snapshot and `replay` publish in.
const ENQUEUE_SQL_LOG: &str = enqueue_quietly_into!("ferrybox_messages");

/// Writes messages to the outbox table. Cheap to clone.
#[derive(Debug, Clone)]
pub struct Outbox {
    source: String,
    notify: bool,
    log: bool,
}

impl Outbox {
    /// An outbox whose messages name `source` (the service) as their CloudEvents source. It
    /// wakes the relay with `NOTIFY` when a transaction that enqueued something commits.
    pub fn new(source: impl Into<String>) -> Self {
        Self {
            source: source.into(),
            notify: true,
            log: false,
        }
    }

    /// Writes for the relay mode `mode` (as [`RelayMode::resolve`] resolved it): the
    /// append-only table the log relay streams, or the table the polling relay claims from.
    /// A log relay publishes both tables, so a writer that still writes the polling table
    /// loses nothing; the append-only one is cheaper for every business transaction.
    ///
    /// [`RelayMode::resolve`]: super::RelayMode::resolve
    #[must_use]
    pub fn for_mode(mut self, mode: super::RelayMode) -> Self {
        self.log = mode == super::RelayMode::Log;
        self
    }

    /// Whether this outbox writes for the log relay.
    pub fn writes_for_log(&self) -> bool {
        self.log
    }

    /// Does not send `NOTIFY`: the relay finds new rows by polling only. `NOTIFY` makes
    /// committing transactions take a short global lock; at very high commit rates polling
    /// can be the better trade.
    #[must_use]
    pub fn without_notify(mut self) -> Self {
        self.notify = false;
        self
    }

    /// The CloudEvents source this outbox stamps on its messages.
    pub fn source(&self) -> &str {
        &self.source
    }

    /// Adds `message` to the outbox as part of the transaction open on `conn`: it is published
    /// if and only if that transaction commits.
    ///
    /// Messages with the same topic and key are published in the order their transactions
    /// commit: the second of two concurrent transactions enqueuing the same key waits here
    /// until the first ends. Enqueue a transaction's keys in a consistent order (PostgreSQL
    /// breaks the deadlock otherwise, by failing one of the transactions).
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
        let mut headers = message.kafka_headers(&self.source);
        // The trace of the request that made the change travels with its message.
        crate::telemetry::inject_current(&mut headers);
        let headers = serde_json::to_value(headers)
            .map_err(|e| Error::Config(format!("headers are not JSON: {e}")))?;
        let sql = if self.log {
            ENQUEUE_SQL_LOG
        } else if self.notify {
            ENQUEUE_SQL
        } else {
            ENQUEUE_SQL_QUIET
        };
        // Prepared once per connection: this runs in every business transaction.
        crate::db::prepared(
            diesel::sql_query(sql)
                .bind::<Uuid, _>(message.id.0)
                .bind::<Text, _>(&message.topic)
                .bind::<Text, _>(&message.key)
                .bind::<Text, _>(&message.message_type)
                .bind::<BigInt, _>(message.entity_version)
                .bind::<Jsonb, _>(headers)
                .bind::<Bytea, _>(&message.payload)
                .bind::<Timestamptz, _>(message.occurred_at),
        )
        .execute(conn)
        .await?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::{ENQUEUE_SQL, ENQUEUE_SQL_LOG, ENQUEUE_SQL_QUIET, NOTIFY_CHANNEL};

    #[test]
    fn enqueue_notifies_the_channel_the_relay_listens_on() {
        assert!(ENQUEUE_SQL.contains(&format!("pg_notify('{NOTIFY_CHANNEL}', '')")));
        assert!(!ENQUEUE_SQL_QUIET.contains("pg_notify"));
        // Notifies only when it cannot share the relay's waiting lock.
        let (class, object) = super::RELAY_WAITING_LOCK;
        assert!(ENQUEUE_SQL.contains(&format!(
            "WHERE NOT pg_try_advisory_xact_lock_shared({class}, {object})"
        )));
        // Both take the key lock before the insert draws the row's id.
        assert!(!ENQUEUE_SQL_LOG.contains("pg_notify"));
        assert!(ENQUEUE_SQL_LOG.contains("INSERT INTO ferrybox_messages"));
        // The same key lock (topic and key, a newline between) in all three.
        let key_lock = "pg_advisory_xact_lock(hashtextextended($2 || E'\\n' || $3, 0))";
        for sql in [ENQUEUE_SQL, ENQUEUE_SQL_QUIET, ENQUEUE_SQL_LOG] {
            assert!(sql.contains(key_lock), "{sql}");
            let lock = sql.find("pg_advisory_xact_lock").expect("key lock");
            let insert = sql.find("INSERT INTO").expect("insert");
            assert!(lock < insert);
        }
    }
}
