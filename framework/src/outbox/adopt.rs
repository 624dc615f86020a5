//! What the polling relay takes over from the append-only table.
//!
//! `ferrybox_messages` is published only by the log relay. When an outbox that was relayed
//! from the log is relayed by polling instead (`relay.mode = table`, or `auto` on a database
//! that no longer allows reading its log), two kinds of rows there would never be published:
//! those the log relay had not acknowledged yet, and those that writers which still write for
//! the log mode keep adding. The polling relay moves them into `ferrybox_outbox` (same message
//! ids, same creation time, in id order), where it publishes them like any other row: when it
//! becomes active, then once per `cleanup_interval`.
//!
//! Which rows: every row when no log relay ever confirmed anything (no checkpoint with a
//! recovery bound), otherwise the rows whose transaction id is at or above the oldest
//! checkpoint's bound, as a lost slot's recovery picks them (see `log/mod.rs`). Some of those
//! may have been published already and are sent again (consumers deduplicate). A row below
//! every bound was acknowledged and stays as the sent log until its retention expires.
//!
//! Order: the moved rows get new ids, after the polling table's rows, so a key written to
//! both tables around the switch may have its newer polling-table message published before
//! its older moved one (as a lost slot's recovery publishes the polling table's rows first).

use diesel::QueryableByName;
use diesel::sql_types::BigInt;
use diesel_async::{AsyncPgConnection, RunQueryDsl};

use crate::error::Result;

#[derive(QueryableByName)]
struct Moved {
    #[diesel(sql_type = BigInt)]
    moved: i64,
}

/// Moves the append-only table's rows the log relay may not have published into the polling
/// table, in one statement; how many moved.
pub(super) async fn adopt_appended(conn: &mut AsyncPgConnection) -> Result<u64> {
    let moved: Moved = diesel::sql_query(format!(
        "WITH bound AS ( \
             SELECT CASE WHEN count(recover_from_xid) = count(*) AND count(*) > 0 \
                         THEN min(recover_from_xid) END AS xid \
             FROM ferrybox_relay_checkpoints), \
         gone AS ( \
             DELETE FROM ferrybox_messages WHERE {} \
             RETURNING id, message_id, topic, message_key, message_type, entity_version, headers, \
                       payload, occurred_at, created_at), \
         made AS ( \
             INSERT INTO ferrybox_outbox \
                 (message_id, topic, message_key, message_type, entity_version, headers, \
                  payload, occurred_at, created_at) \
             SELECT message_id, topic, message_key, message_type, entity_version, headers, \
                    payload, occurred_at, created_at \
             FROM gone ORDER BY id \
             ON CONFLICT (message_id, created_at) DO NOTHING \
             RETURNING 1) \
         SELECT (SELECT count(*) FROM gone) AS moved",
        super::log::slot::since_bound("SELECT xid FROM bound")
    ))
    .get_result(conn)
    .await?;
    let moved = u64::try_from(moved.moved).unwrap_or(0);
    if moved > 0 {
        tracing::warn!(
            moved,
            "the polling relay took over messages of the log relay's append-only table \
             (ferrybox_messages) it may not have published; a writer still writing that table \
             while the relay polls (an Outbox made .for_mode(RelayMode::Log)) costs this move \
             each time"
        );
    }
    Ok(moved)
}
