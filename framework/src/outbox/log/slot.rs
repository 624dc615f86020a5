//! The log relay's replication slot: what the database must allow, the slot's state and
//! lag, making it (with an exported snapshot), and the checkpoint row.

use diesel::prelude::*;
use diesel::sql_types::{BigInt, Bool, Nullable, Text};
use diesel_async::{AsyncPgConnection, RunQueryDsl};
use pgwire_replication::{Lsn, ReplicationClient, ReplicationConfig, TlsConfig};
use serde::Serialize;

use crate::error::{Error, Result};

/// The publication the migrations create and the relay streams.
pub(crate) const PUBLICATION: &str = "ferrybox_messages";

#[derive(QueryableByName)]
struct Setup {
    #[diesel(sql_type = Text)]
    wal_level: String,
    #[diesel(sql_type = Bool)]
    may_replicate: bool,
    #[diesel(sql_type = Bool)]
    publication: bool,
    #[diesel(sql_type = Text)]
    role: String,
}

async fn setup(conn: &mut AsyncPgConnection) -> Result<Setup> {
    Ok(diesel::sql_query(
        "SELECT current_setting('wal_level') AS wal_level, \
                (SELECT rolreplication OR rolsuper FROM pg_roles WHERE rolname = current_user) \
                    AS may_replicate, \
                EXISTS (SELECT 1 FROM pg_publication WHERE pubname = $1) AS publication, \
                current_user::text AS role",
    )
    .bind::<Text, _>(PUBLICATION)
    .get_result(conn)
    .await?)
}

/// What keeps the database from serving the log relay, with what to change; `None` when it
/// can (the slot may still have to be made: that needs one free slot, checked when it is).
pub(crate) async fn unsupported(conn: &mut AsyncPgConnection) -> Result<Option<String>> {
    let s = setup(conn).await?;
    Ok(if s.wal_level != "logical" {
        Some(format!(
            "wal_level is '{}', and reading the write-ahead log needs 'logical': run \
             `ALTER SYSTEM SET wal_level = logical` (or set it in postgresql.conf; on a managed \
             database, its logical replication flag) and restart PostgreSQL",
            s.wal_level
        ))
    } else if !s.may_replicate {
        Some(format!(
            "role {} may not use replication: run `ALTER ROLE \"{}\" REPLICATION` (on a \
             managed database, grant its replication role)",
            s.role, s.role
        ))
    } else if !s.publication {
        Some(format!(
            "the publication {PUBLICATION} does not exist: run the framework's migrations \
             (ferrybox-0006_log_relay creates it)"
        ))
    } else {
        None
    })
}

/// Fails with [`Error::ReplicationSetup`] naming what to change when the database cannot
/// serve the log relay.
pub(crate) async fn check_setup(conn: &mut AsyncPgConnection) -> Result<()> {
    match unsupported(conn).await? {
        Some(reason) => Err(Error::ReplicationSetup(reason)),
        None => Ok(()),
    }
}

#[derive(QueryableByName)]
struct DatabaseName {
    #[diesel(sql_type = Text)]
    name: String,
}

/// The slot's name: `relay.slot_name`, or `ferrybox_<database>` (slot names are unique per
/// server, not per database; only lower-case letters, digits and `_` are allowed).
pub(crate) async fn name(configured: Option<&str>, conn: &mut AsyncPgConnection) -> Result<String> {
    let name = match configured {
        Some(name) => name.to_owned(),
        None => {
            let db: DatabaseName = diesel::sql_query("SELECT current_database()::text AS name")
                .get_result(conn)
                .await?;
            default_name(&db.name)
        }
    };
    validate_name(&name)?;
    Ok(name)
}

fn default_name(database: &str) -> String {
    let mut name: String = format!("ferrybox_{database}")
        .chars()
        .map(|c| {
            let c = c.to_ascii_lowercase();
            if c.is_ascii_lowercase() || c.is_ascii_digit() {
                c
            } else {
                '_'
            }
        })
        .collect();
    name.truncate(63);
    name
}

/// Checks a slot name is one PostgreSQL accepts (and safe to put in a replication command).
pub(crate) fn validate_name(name: &str) -> Result<()> {
    if name.is_empty()
        || name.len() > 63
        || !name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
    {
        return Err(Error::Config(format!(
            "relay.slot_name {name:?}: a replication slot's name is 1 to 63 lower-case letters, \
             digits and underscores"
        )));
    }
    Ok(())
}

/// The replication connection's settings, from the database URL.
pub(crate) fn replication_config(
    url: &str,
    slot: &str,
    publication: &str,
) -> Result<ReplicationConfig> {
    let parsed = url::Url::parse(url)
        .map_err(|e| Error::Config(format!("the database URL cannot be parsed: {e}")))?;
    let decode = |s: &str| -> Result<String> {
        percent_encoding::percent_decode_str(s)
            .decode_utf8()
            .map(std::borrow::Cow::into_owned)
            .map_err(|_| Error::Config("the database URL is not valid UTF-8".into()))
    };
    let host = parsed.host_str().unwrap_or("localhost").to_owned();
    let user = match parsed.username() {
        "" => "postgres".to_owned(),
        user => decode(user)?,
    };
    let password = decode(parsed.password().unwrap_or_default())?;
    let database = decode(parsed.path().trim_start_matches('/'))?;
    let mut tls = TlsConfig::disabled();
    for (key, value) in parsed.query_pairs() {
        if key == "sslmode" {
            tls = match value.as_ref() {
                "disable" | "allow" | "prefer" => TlsConfig::disabled(),
                "require" => TlsConfig::require(),
                "verify-ca" => TlsConfig::verify_ca(None),
                "verify-full" => TlsConfig::verify_full(None),
                other => {
                    return Err(Error::Config(format!(
                        "sslmode={other} in the database URL is not one the log relay knows"
                    )));
                }
            };
        }
    }
    Ok(ReplicationConfig::new(
        host,
        user,
        password,
        if database.is_empty() {
            "postgres".to_owned()
        } else {
            database
        },
        slot,
        publication,
    )
    .with_port(parsed.port().unwrap_or(5432))
    .with_tls(tls)
    .with_binary(true)
    .with_start_lsn(Lsn::ZERO)
    .with_status_interval(std::time::Duration::from_secs(1))
    .with_application_name(format!("ferrybox log relay (pid {})", std::process::id())))
}

/// The slot and the checkpoint as the relay finds them when it becomes active.
#[derive(Debug, Default)]
pub(crate) struct SlotState {
    /// `wal_status` of the slot, when it exists (`lost`: invalidated).
    wal_status: Option<String>,
    /// Whether the checkpoint says a slot was made (and its snapshot published) before.
    had_slot: bool,
    /// Whether the slot's snapshot was published completely.
    snapshot_done: bool,
    /// The recovery bound of the checkpoint, as text.
    pub(crate) recover_from_xid: Option<String>,
    /// The checkpoint's confirmed position (of a slot whose snapshot was published).
    pub(crate) confirmed_lsn: Option<Lsn>,
}

impl SlotState {
    pub(crate) fn exists(&self) -> bool {
        self.wal_status.is_some()
    }

    /// Whether a slot existed and was lost (dropped or invalidated).
    pub(crate) fn lost(&self) -> bool {
        (self.had_slot && !self.exists()) || self.wal_status.as_deref() == Some("lost")
    }

    /// Why the slot must be made (again), or `None` when it can be streamed.
    pub(crate) fn needs_new_slot(&self) -> Option<&'static str> {
        match self.wal_status.as_deref() {
            None if self.had_slot => Some("the slot was dropped"),
            None => Some("no slot yet"),
            Some("lost") => {
                Some("the slot was invalidated: it held more WAL than max_slot_wal_keep_size")
            }
            Some(_) if !self.snapshot_done => {
                Some("the slot's initial snapshot was not published completely")
            }
            Some(_) => None,
        }
    }
}

#[derive(QueryableByName)]
struct StateRow {
    #[diesel(sql_type = Nullable<Text>)]
    wal_status: Option<String>,
    #[diesel(sql_type = Bool)]
    had_slot: bool,
    #[diesel(sql_type = Bool)]
    snapshot_done: bool,
    #[diesel(sql_type = Nullable<Text>)]
    recover_from_xid: Option<String>,
    #[diesel(sql_type = Nullable<Text>)]
    confirmed_lsn: Option<String>,
}

pub(crate) async fn state(conn: &mut AsyncPgConnection, slot: &str) -> Result<SlotState> {
    let row: StateRow = diesel::sql_query(
        "SELECT (SELECT coalesce(wal_status, 'unknown') FROM pg_replication_slots \
                 WHERE slot_name = $1) AS wal_status, \
                EXISTS (SELECT 1 FROM ferrybox_relay_checkpoints WHERE slot_name = $1) AS had_slot, \
                coalesce((SELECT snapshot_done FROM ferrybox_relay_checkpoints \
                          WHERE slot_name = $1), false) AS snapshot_done, \
                (SELECT recover_from_xid::text FROM ferrybox_relay_checkpoints \
                 WHERE slot_name = $1) AS recover_from_xid, \
                (SELECT confirmed_lsn::text FROM ferrybox_relay_checkpoints \
                 WHERE slot_name = $1 AND snapshot_done) AS confirmed_lsn",
    )
    .bind::<Text, _>(slot)
    .get_result(conn)
    .await?;
    Ok(SlotState {
        wal_status: row.wal_status,
        had_slot: row.had_slot && row.snapshot_done,
        snapshot_done: row.snapshot_done,
        recover_from_xid: row.recover_from_xid,
        confirmed_lsn: row
            .confirmed_lsn
            .as_deref()
            .and_then(|l| Lsn::parse(l).ok()),
    })
}

/// Before a slot is made: the checkpoint says its snapshot is not published yet (so a crash
/// before it is makes the slot again), and an unusable old slot is dropped.
pub(crate) async fn begin_new_slot(
    conn: &mut AsyncPgConnection,
    client: &mut ReplicationClient,
    slot: &str,
    exists: bool,
) -> Result<()> {
    diesel::sql_query(
        "INSERT INTO ferrybox_relay_checkpoints (slot_name, confirmed_lsn, snapshot_done) \
         VALUES ($1, '0/0', false) \
         ON CONFLICT (slot_name) DO UPDATE SET snapshot_done = false, updated_at = now()",
    )
    .bind::<Text, _>(slot)
    .execute(conn)
    .await?;
    // A new slot is a new sequence source (see `super::super::sequence`).
    diesel::sql_query("DELETE FROM ferrybox_sequence_sources WHERE stream = $1")
        .bind::<Text, _>(slot)
        .execute(conn)
        .await?;
    if exists {
        client
            .simple_query(&format!("DROP_REPLICATION_SLOT {slot} WAIT"))
            .await
            .map_err(|e| Error::Replication(format!("dropping the unusable slot {slot}: {e}")))?;
    }
    Ok(())
}

/// A slot just made: where its stream starts, and the snapshot of what was committed before.
pub(crate) struct NewSlot {
    pub(crate) consistent_point: Lsn,
    pub(crate) name: String,
}

/// Makes the slot, exporting its snapshot (valid until the replication session's next
/// command).
pub(crate) async fn create(client: &mut ReplicationClient, slot: &str) -> Result<NewSlot> {
    let rows = client
        .simple_query(&format!(
            "CREATE_REPLICATION_SLOT {slot} LOGICAL pgoutput (SNAPSHOT 'export')"
        ))
        .await
        .map_err(|e| {
            let text = e.to_string();
            if text.contains("all replication slots are in use") {
                Error::ReplicationSetup(format!(
                    "no free replication slot for {slot}: raise max_replication_slots (and \
                     restart PostgreSQL) or drop an unused slot ({text})"
                ))
            } else {
                Error::Replication(format!("creating the slot {slot}: {text}"))
            }
        })?;
    let column = |i: usize| -> Result<String> {
        <[_]>::first(&rows)
            .and_then(|row| row.get(i))
            .and_then(Option::as_deref)
            .map(|v| String::from_utf8_lossy(v).into_owned())
            .ok_or_else(|| Error::Replication("CREATE_REPLICATION_SLOT answered no row".into()))
    };
    let consistent_point = Lsn::parse(&column(1)?)
        .map_err(|e| Error::Replication(format!("the slot's consistent point: {e}")))?;
    Ok(NewSlot {
        consistent_point,
        name: column(2)?,
    })
}

/// Records that the new slot's snapshot was published.
pub(crate) async fn snapshot_done(
    conn: &mut AsyncPgConnection,
    slot: &str,
    consistent_point: Lsn,
) -> Result<()> {
    diesel::sql_query(
        "UPDATE ferrybox_relay_checkpoints \
         SET snapshot_done = true, confirmed_lsn = $2::pg_lsn, updated_at = now() \
         WHERE slot_name = $1",
    )
    .bind::<Text, _>(slot)
    .bind::<Text, _>(consistent_point.to_string())
    .execute(conn)
    .await?;
    Ok(())
}

/// SQL: whether a row's transaction is at or above the recovery bound `bound` (an SQL
/// expression of the bound's `xid8` or its text; NULL: every row is): the rows a slot that
/// checkpointed that bound may not have delivered. `xmin` is 32 bits, so the bound's epoch
/// goes and the two are compared by age (both are within the wraparound horizon).
pub(crate) fn since_bound(bound: &str) -> String {
    format!(
        "(({bound}) IS NULL \
          OR age(xmin) <= age(((({bound})::text)::bigint % 4294967296)::text::xid))"
    )
}

/// The checkpoint: the confirmed position and the recovery bound.
pub(crate) async fn write_checkpoint(
    conn: &mut AsyncPgConnection,
    slot: &str,
    confirmed: Lsn,
    recover_from_xid: Option<&str>,
) -> Result<()> {
    diesel::sql_query(
        "UPDATE ferrybox_relay_checkpoints \
         SET confirmed_lsn = $2::pg_lsn, \
             recover_from_xid = coalesce($3::xid8, recover_from_xid), updated_at = now() \
         WHERE slot_name = $1",
    )
    .bind::<Text, _>(slot)
    .bind::<Text, _>(confirmed.to_string())
    .bind::<Nullable<Text>, _>(recover_from_xid)
    .execute(conn)
    .await?;
    Ok(())
}

/// The slot as `outbox status` and `/metrics` show it.
#[derive(Debug, Clone, PartialEq, Serialize, QueryableByName)]
pub struct SlotStatus {
    /// The slot's name.
    #[diesel(sql_type = Text)]
    pub slot_name: String,
    /// `reserved`, `extended`, `unreserved` or `lost` (PostgreSQL's `wal_status`).
    #[diesel(sql_type = Nullable<Text>)]
    pub wal_status: Option<String>,
    /// Whether a relay is streaming it now.
    #[diesel(sql_type = Bool)]
    pub active: bool,
    /// How far the confirmed position is behind the current WAL position, in bytes: what the
    /// relay has yet to publish (or to confirm).
    #[diesel(sql_type = Nullable<BigInt>)]
    pub lag_bytes: Option<i64>,
    /// WAL the slot keeps the server from removing, in bytes.
    #[diesel(sql_type = Nullable<BigInt>)]
    pub retained_bytes: Option<i64>,
}

/// The status of the relay's slot (`None` when there is none).
pub(crate) async fn status(conn: &mut AsyncPgConnection, slot: &str) -> Result<Option<SlotStatus>> {
    Ok(diesel::sql_query(
        "SELECT slot_name::text, wal_status, active, \
                (pg_current_wal_lsn() - confirmed_flush_lsn)::bigint AS lag_bytes, \
                (pg_current_wal_lsn() - restart_lsn)::bigint AS retained_bytes \
         FROM pg_replication_slots WHERE slot_name = $1",
    )
    .bind::<Text, _>(slot)
    .get_result(conn)
    .await
    .optional()?)
}

/// Puts the slot's lag in the metrics (when they are on).
pub(crate) async fn record_lag(conn: &mut AsyncPgConnection, slot: &str) -> Result<()> {
    let Some(m) = crate::metrics::instruments() else {
        return Ok(());
    };
    if let Some(s) = status(conn, slot).await? {
        // One series per slot: a sharded relay has a slot per shard.
        let attrs = [opentelemetry::KeyValue::new("slot", slot.to_owned())];
        m.relay_slot_lag
            .record(u64::try_from(s.lag_bytes.unwrap_or(0)).unwrap_or(0), &attrs);
        m.relay_slot_retained.record(
            u64::try_from(s.retained_bytes.unwrap_or(0)).unwrap_or(0),
            &attrs,
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_slot_names_are_valid_for_any_database_name() {
        assert_eq!(default_name("user_service"), "ferrybox_user_service");
        assert_eq!(default_name("Test-DB.1"), "ferrybox_test_db_1");
        let long = default_name(&"x".repeat(100));
        assert_eq!(long.len(), 63);
        for name in ["ferrybox_user_service", "ferrybox_test_db_1", &long] {
            validate_name(name).unwrap();
        }
        assert!(validate_name("Bad Name").is_err());
        assert!(validate_name("x; DROP").is_err());
        assert!(validate_name("").is_err());
    }

    #[test]
    fn the_replication_connection_comes_from_the_database_url() {
        let c = replication_config(
            "postgres://svc:p%40ss@db.internal:6543/user_service?sslmode=require",
            "ferrybox_user_service",
            PUBLICATION,
        )
        .unwrap();
        assert_eq!(c.host, "db.internal");
        assert_eq!(c.port, 6543);
        assert_eq!(c.user, "svc");
        assert_eq!(c.password, "p@ss");
        assert_eq!(c.database, "user_service");
        assert!(c.tls.mode.requires_tls());
        let plain =
            replication_config("postgres://postgres@127.0.0.1/test", "s", PUBLICATION).unwrap();
        assert_eq!((plain.port, plain.user.as_str()), (5432, "postgres"));
        assert!(!plain.tls.mode.requires_tls());
        assert!(replication_config("postgres://h/db?sslmode=sometimes", "s", PUBLICATION).is_err());
    }

    #[test]
    fn a_dropped_or_invalidated_slot_is_lost_a_new_one_is_not() {
        let fresh = SlotState::default();
        assert_eq!(fresh.needs_new_slot(), Some("no slot yet"));
        assert!(!fresh.lost());
        let dropped = SlotState {
            had_slot: true,
            snapshot_done: true,
            ..SlotState::default()
        };
        assert!(dropped.lost());
        let invalidated = SlotState {
            wal_status: Some("lost".into()),
            had_slot: true,
            snapshot_done: true,
            ..SlotState::default()
        };
        assert!(invalidated.lost() && invalidated.needs_new_slot().is_some());
        let healthy = SlotState {
            wal_status: Some("reserved".into()),
            had_slot: true,
            snapshot_done: true,
            ..SlotState::default()
        };
        assert_eq!(healthy.needs_new_slot(), None);
        let half_made = SlotState {
            wal_status: Some("reserved".into()),
            ..SlotState::default()
        };
        assert!(half_made.needs_new_slot().is_some() && !half_made.lost());
    }
}
