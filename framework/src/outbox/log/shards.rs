//! Relay shards: more than one instance publishing at once, each key with one ordered writer.
//!
//! The outbox's layout (how many shards, recorded in `ferrybox_relay_layout` by
//! [`reshard`], one by default) splits the keys by hash: shard `i` of `n` streams the rows whose
//! `(hashtext(message_key) & 2147483647) % n = i`, through a publication with that row filter
//! and a replication slot of its own, while its relay holds the shard's advisory lock. A key
//! is in one shard, so it has one writer at a time, and the log gives that writer the key's
//! commit order. Instances share the shards out: each runs at most its fair share (the
//! shards divided by the live instances, rounded up) and lets go of any above it, so a new
//! instance gets work within a standby interval and a dead one's shards are taken over within
//! one.
//!
//! One shard is the layout every outbox starts with: its slot is the relay's slot
//! (`ferrybox_<database>` or `relay.slot_name`), its publication is `ferrybox_messages`, its
//! lock is the single relay's lock. A layout change is made by [`reshard`], online: it asks
//! the relays to let go, takes every shard's lock of the old layout (so no relay streams),
//! records the new layout with each new slot's recovery bound (the oldest bound of the old
//! slots), and drops the old slots. Each new slot then starts as a lost slot would: what the
//! old slots may not have delivered is published from the table, so nothing is lost, and what
//! they had delivered may be sent again.

use std::time::Duration;

use std::sync::Mutex;
use std::sync::atomic::{AtomicU32, Ordering};

use diesel::OptionalExtension;
use diesel::sql_types::{Integer, Nullable, Text};
use diesel_async::{AsyncPgConnection, RunQueryDsl, SimpleAsyncConnection};
use serde::Serialize;
use tokio_util::sync::CancellationToken;

use crate::error::{Error, Result};

/// The advisory lock class of the relay's locks ("ferr"); shard `i`'s lock is
/// `(RELAY_LOCK_CLASS, RELAY_LOCK_OBJECT + i)`. Shard 0's is the single relay's lock
/// ("ferr", "ybox"), so a relay of one shard and shard 0 of any layout exclude each other.
/// The two-key form, which PostgreSQL keeps apart from the one-key locks `enqueue` takes per
/// key.
pub(crate) const RELAY_LOCK_CLASS: i32 = 0x6665_7272;
const RELAY_LOCK_OBJECT: i32 = 0x7962_6f78;

/// Held shared by every running relay instance, so that each can count the others in
/// `pg_locks` ("ferr", "live").
const PRESENCE_LOCK: (i32, i32) = (0x6665_7272, 0x6c69_7665);

/// The most shards an outbox may have.
pub const MAX_SHARDS: u32 = 64;

/// Shard `index` of `of`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Shard {
    pub(crate) index: u32,
    pub(crate) of: u32,
}

impl Shard {
    /// The shard's advisory lock.
    pub(crate) fn lock(self) -> (i32, i32) {
        let index = i32::try_from(self.index).unwrap_or(0);
        (RELAY_LOCK_CLASS, RELAY_LOCK_OBJECT.wrapping_add(index))
    }

    /// The shard's replication slot, from the relay's slot name.
    pub(crate) fn slot(self, base: &str) -> String {
        if self.of == 1 {
            return base.to_owned();
        }
        let suffix = format!("_{}_of_{}", self.index, self.of);
        let keep = 63usize.saturating_sub(suffix.len()).min(base.len());
        format!("{}{suffix}", &base[..keep])
    }

    /// The shard's publication.
    pub(crate) fn publication(self) -> String {
        if self.of == 1 {
            super::slot::PUBLICATION.to_owned()
        } else {
            format!("{}_{}_of_{}", super::slot::PUBLICATION, self.index, self.of)
        }
    }

    /// The SQL condition on a row's `message_key` that puts it in this shard (`true` for the
    /// only shard).
    pub(crate) fn condition(self) -> String {
        if self.of == 1 {
            "true".to_owned()
        } else {
            format!(
                "(hashtext(message_key) & 2147483647) % {} = {}",
                self.of, self.index
            )
        }
    }

    /// A layout's shards.
    pub(crate) fn all(of: u32) -> impl Iterator<Item = Shard> {
        (0..of).map(move |index| Shard { index, of })
    }
}

/// The layout recorded for the outbox.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Layout {
    /// How many shards the relay runs as.
    pub shards: u32,
    /// A reshard in progress, to this many shards: relays let go of their shards.
    pub resharding_to: Option<u32>,
}

#[derive(diesel::QueryableByName)]
struct LayoutRow {
    #[diesel(sql_type = Integer)]
    shards: i32,
    #[diesel(sql_type = Nullable<Integer>)]
    resharding_to: Option<i32>,
}

/// The recorded layout (one shard when none is).
pub(crate) async fn layout(conn: &mut AsyncPgConnection) -> Result<Layout> {
    let row: Option<LayoutRow> = match diesel::sql_query(
        "SELECT shards, resharding_to FROM ferrybox_relay_layout WHERE singleton",
    )
    .get_result(conn)
    .await
    .optional()
    {
        Ok(row) => row,
        // A database whose migrations predate shards has one.
        Err(diesel::result::Error::DatabaseError(_, info))
            if info.message().contains("ferrybox_relay_layout") =>
        {
            None
        }
        Err(e) => return Err(e.into()),
    };
    Ok(row.map_or(
        Layout {
            shards: 1,
            resharding_to: None,
        },
        |row| Layout {
            shards: u32::try_from(row.shards).unwrap_or(1).max(1),
            resharding_to: row.resharding_to.and_then(|n| u32::try_from(n).ok()),
        },
    ))
}

#[derive(diesel::QueryableByName)]
struct Exists {
    #[diesel(sql_type = diesel::sql_types::Bool)]
    exists: bool,
}

/// Fails with what to do when a shard's publication is missing (the migrations make the one
/// of a single shard, [`reshard`] the others).
pub(crate) async fn check_publication(conn: &mut AsyncPgConnection, shard: Shard) -> Result<()> {
    if shard.of == 1 {
        return Ok(());
    }
    let found: Exists = diesel::sql_query(
        "SELECT EXISTS (SELECT 1 FROM pg_publication WHERE pubname = $1) AS exists",
    )
    .bind::<Text, _>(shard.publication())
    .get_result(conn)
    .await?;
    if found.exists {
        Ok(())
    } else {
        Err(Error::ReplicationSetup(format!(
            "the publication {} of relay shard {} of {} does not exist: run `outbox reshard {}` \
             again (it makes each shard's publication)",
            shard.publication(),
            shard.index,
            shard.of,
            shard.of
        )))
    }
}

/// Registers this instance as a live relay on `conn` (a session lock, let go with the
/// connection).
pub(crate) async fn register(conn: &mut AsyncPgConnection) -> Result<()> {
    let (class, object) = PRESENCE_LOCK;
    conn.batch_execute(&format!(
        "SELECT pg_advisory_lock_shared({class}, {object})"
    ))
    .await?;
    Ok(())
}

#[derive(diesel::QueryableByName)]
struct Count {
    #[diesel(sql_type = diesel::sql_types::BigInt)]
    n: i64,
}

/// How many relay instances are running on this database (at least one: the caller).
pub(crate) async fn live_instances(conn: &mut AsyncPgConnection) -> Result<u32> {
    let (class, object) = PRESENCE_LOCK;
    let count: Count = diesel::sql_query(
        "SELECT count(*) AS n FROM pg_locks \
         WHERE locktype = 'advisory' AND granted \
           AND database = (SELECT oid FROM pg_database WHERE datname = current_database()) \
           AND classid = $1::bigint::oid AND objid = $2::bigint::oid AND objsubid = 2",
    )
    .bind::<Integer, _>(class)
    .bind::<Integer, _>(object)
    .get_result(conn)
    .await?;
    Ok(u32::try_from(count.n).unwrap_or(1).max(1))
}

/// How many shards one instance runs at most: the shards divided by the live instances,
/// rounded up.
pub(crate) fn fair_share(shards: u32, instances: u32) -> u32 {
    shards.div_ceil(instances.max(1))
}

/// What [`reshard`] did.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ReshardReport {
    /// The layout before.
    pub from: u32,
    /// The layout now.
    pub to: u32,
    /// The old layout's slots, dropped.
    pub dropped_slots: Vec<String>,
}

/// Changes the outbox's relay layout to `shards` shards, online (see the module
/// documentation). Waits up to `timeout` for the running relays to let go of their shards.
pub async fn reshard(
    conn: &mut AsyncPgConnection,
    slot_name: Option<&str>,
    shards: u32,
    timeout: Duration,
) -> Result<ReshardReport> {
    if !(1..=MAX_SHARDS).contains(&shards) {
        return Err(Error::Config(format!(
            "an outbox has 1 to {MAX_SHARDS} relay shards, not {shards}"
        )));
    }
    super::slot::check_setup(conn).await?;
    let base = super::slot::name(slot_name, conn).await?;
    let old = layout(conn).await?;
    if old.shards == shards && old.resharding_to.is_none() {
        // Nothing to move; what an earlier reshard that died before its end left behind goes.
        return Ok(ReshardReport {
            from: shards,
            to: shards,
            dropped_slots: drop_leftovers(conn, &base, shards).await?,
        });
    }
    // Ask the relays to let go (they look at the layout once a second).
    diesel::sql_query(
        "INSERT INTO ferrybox_relay_layout (singleton, shards, resharding_to) \
         VALUES (true, $1, $2) \
         ON CONFLICT (singleton) DO UPDATE SET resharding_to = $2, updated_at = now()",
    )
    .bind::<Integer, _>(i32::try_from(old.shards).unwrap_or(1))
    .bind::<Integer, _>(i32::try_from(shards).unwrap_or(1))
    .execute(conn)
    .await?;
    let taken = take_all(conn, old.shards, timeout).await;
    let outcome = match taken {
        Ok(()) => move_to(conn, &base, old.shards, shards).await,
        Err(e) => Err(e),
    };
    if outcome.is_err() {
        // The relays go back to the old layout.
        diesel::sql_query("UPDATE ferrybox_relay_layout SET resharding_to = NULL")
            .execute(conn)
            .await?;
    }
    // Lets go of every shard lock it took.
    conn.batch_execute("SELECT pg_advisory_unlock_all()")
        .await?;
    // The old layout's slots are dropped by `move_to`; its publications, and whatever an
    // earlier unfinished reshard left, go here.
    let mut dropped_slots = outcome?;
    dropped_slots.extend(drop_leftovers(conn, &base, shards).await?);
    Ok(ReshardReport {
        from: old.shards,
        to: shards,
        dropped_slots,
    })
}

#[derive(diesel::QueryableByName)]
struct Locked {
    #[diesel(sql_type = diesel::sql_types::Bool)]
    locked: bool,
}

/// Takes every shard lock of a layout of `of` shards, or fails after `timeout` naming the
/// shards still held.
async fn take_all(conn: &mut AsyncPgConnection, of: u32, timeout: Duration) -> Result<()> {
    let deadline = tokio::time::Instant::now() + timeout;
    let mut missing: Vec<Shard> = Shard::all(of).collect();
    loop {
        let mut still = Vec::new();
        for shard in missing {
            let (class, object) = shard.lock();
            let got: Locked = diesel::sql_query("SELECT pg_try_advisory_lock($1, $2) AS locked")
                .bind::<Integer, _>(class)
                .bind::<Integer, _>(object)
                .get_result(conn)
                .await?;
            if !got.locked {
                still.push(shard);
            }
        }
        if still.is_empty() {
            return Ok(());
        }
        if tokio::time::Instant::now() >= deadline {
            let held: Vec<String> = still.iter().map(|s| s.index.to_string()).collect();
            return Err(Error::Config(format!(
                "resharding: relays still hold shard(s) {} of {of} after {timeout:?}; \
                 are they running a version without shards? Stop them and try again",
                held.join(", ")
            )));
        }
        missing = still;
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[derive(diesel::QueryableByName)]
struct Bound {
    #[diesel(sql_type = Nullable<Text>)]
    xid: Option<String>,
    #[diesel(sql_type = diesel::sql_types::Bool)]
    unbounded: bool,
}

/// With every old shard's lock held: records the new layout and each new slot's recovery
/// bound in one transaction, then drops the old slots. The dropped slots' names.
async fn move_to(
    conn: &mut AsyncPgConnection,
    base: &str,
    from: u32,
    to: u32,
) -> Result<Vec<String>> {
    let old_slots: Vec<String> = Shard::all(from).map(|s| s.slot(base)).collect();
    // The oldest bound of the old slots: every transaction one of them had not acknowledged
    // has an id at or above it. A slot without a bound (or without a checkpoint, never made)
    // leaves the new slots unbounded: they publish the whole table.
    let bound: Bound = diesel::sql_query(
        "SELECT min(recover_from_xid)::text AS xid, \
                (count(recover_from_xid) < cardinality($1::text[])) AS unbounded \
         FROM ferrybox_relay_checkpoints WHERE slot_name = ANY($1::text[])",
    )
    .bind::<diesel::sql_types::Array<Text>, _>(&old_slots)
    .get_result(conn)
    .await?;
    let recover_from = if bound.unbounded { None } else { bound.xid };
    let mut sql = String::from("BEGIN;");
    for shard in Shard::all(to).filter(|s| s.of > 1) {
        let publication = shard.publication();
        let condition = shard.condition();
        sql.push_str(&format!(
            "DROP PUBLICATION IF EXISTS {publication}; \
             CREATE PUBLICATION {publication} \
               FOR TABLE ferrybox_messages WHERE ({condition}), \
                         ferrybox_outbox WHERE ({condition}) \
               WITH (publish = 'insert', publish_via_partition_root = true);"
        ));
    }
    sql.push_str("COMMIT;");
    conn.batch_execute(&sql).await?;
    let new_slots: Vec<String> = Shard::all(to).map(|s| s.slot(base)).collect();
    // One statement, so one transaction: the new slots' checkpoints (each starts as a slot
    // that must be made, recovering from the bound) and the layout.
    diesel::sql_query(
        "WITH gone AS ( \
             DELETE FROM ferrybox_relay_checkpoints WHERE slot_name = ANY($1::text[])), \
         made AS ( \
             INSERT INTO ferrybox_relay_checkpoints \
                 (slot_name, confirmed_lsn, recover_from_xid, snapshot_done) \
             SELECT s, '0/0', $3::xid8, false FROM unnest($2::text[]) AS s \
             ON CONFLICT (slot_name) DO UPDATE \
                 SET confirmed_lsn = '0/0', recover_from_xid = $3::xid8, \
                     snapshot_done = false, updated_at = now()) \
         UPDATE ferrybox_relay_layout \
         SET shards = $4, resharding_to = NULL, updated_at = now()",
    )
    .bind::<diesel::sql_types::Array<Text>, _>(&old_slots)
    .bind::<diesel::sql_types::Array<Text>, _>(&new_slots)
    .bind::<Nullable<Text>, _>(recover_from.as_deref())
    .bind::<Integer, _>(i32::try_from(to).unwrap_or(1))
    .execute(conn)
    .await?;
    drop_slots(conn, &old_slots).await?;
    Ok(old_slots)
}

#[derive(diesel::QueryableByName)]
struct Named {
    #[diesel(sql_type = Text)]
    name: String,
}

/// Drops what other layouts than the one of `current` shards left in this database: their
/// slots that no sender uses (a reshard that died between recording its layout and dropping
/// the old slots leaves them, holding WAL back for ever) and their publications. The
/// dropped slots' names. A slot still in use is left, with a warning, to the next reshard.
async fn drop_leftovers(
    conn: &mut AsyncPgConnection,
    base: &str,
    current: u32,
) -> Result<Vec<String>> {
    let other = (1..=MAX_SHARDS).filter(|n| *n != current);
    let slots: Vec<String> = other
        .clone()
        .flat_map(Shard::all)
        .map(|s| s.slot(base))
        .collect();
    let publications: Vec<String> = other
        .filter(|n| *n > 1)
        .flat_map(Shard::all)
        .map(Shard::publication)
        .collect();
    let found: Vec<NamedSlot> = diesel::sql_query(
        "SELECT slot_name::text AS name, active FROM pg_replication_slots \
         WHERE database = current_database() AND slot_name = ANY($1::text[]) \
         ORDER BY slot_name",
    )
    .bind::<diesel::sql_types::Array<Text>, _>(&slots)
    .load(conn)
    .await?;
    let (busy, idle): (Vec<_>, Vec<_>) = found.into_iter().partition(|slot| slot.active);
    for slot in &busy {
        tracing::warn!(slot = %slot.name, "a slot of another relay layout is still streaming; the next reshard drops it");
    }
    let idle: Vec<String> = idle.into_iter().map(|slot| slot.name).collect();
    drop_slots(conn, &idle).await?;
    let stale: Vec<Named> = diesel::sql_query(
        "SELECT pubname::text AS name FROM pg_publication WHERE pubname = ANY($1::text[])",
    )
    .bind::<diesel::sql_types::Array<Text>, _>(&publications)
    .load(conn)
    .await?;
    // A layout's publication goes once none of its slots streams.
    for publication in stale.into_iter().filter(|_| busy.is_empty()) {
        conn.batch_execute(&format!("DROP PUBLICATION IF EXISTS {}", publication.name))
            .await?;
    }
    if !idle.is_empty() {
        tracing::info!(slots = ?idle, "dropped the slots an unfinished reshard left");
    }
    Ok(idle)
}

#[derive(diesel::QueryableByName)]
struct NamedSlot {
    #[diesel(sql_type = Text)]
    name: String,
    #[diesel(sql_type = diesel::sql_types::Bool)]
    active: bool,
}

/// Drops the slots that exist of `slots`, waiting (up to 10 s) for a sender that is still
/// letting go of one.
async fn drop_slots(conn: &mut AsyncPgConnection, slots: &[String]) -> Result<()> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let dropped = diesel::sql_query(
            "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots \
             WHERE slot_name = ANY($1::text[])",
        )
        .bind::<diesel::sql_types::Array<Text>, _>(slots)
        .execute(conn)
        .await;
        match dropped {
            Ok(_) => return Ok(()),
            Err(e) if tokio::time::Instant::now() < deadline => {
                tracing::debug!(error = %e, "an old shard's slot is still active; retrying");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(e) => return Err(e.into()),
        }
    }
}

/// How an instance's shard workers share the shards out: how many this instance holds, its
/// fair share, and a way to ask one worker to let go.
#[derive(Debug, Default)]
pub(crate) struct Balance {
    held: AtomicU32,
    share: AtomicU32,
    /// The release token of each shard this instance runs, by index.
    running: Mutex<Vec<(u32, CancellationToken)>>,
}

impl Balance {
    pub(crate) fn new(share: u32) -> Self {
        Self {
            share: AtomicU32::new(share),
            ..Self::default()
        }
    }

    /// Whether this instance may take one more shard.
    pub(crate) fn may_take(&self) -> bool {
        AtomicU32::load(&self.held, Ordering::SeqCst)
            < AtomicU32::load(&self.share, Ordering::SeqCst)
    }

    pub(crate) fn set_share(&self, share: u32) {
        self.share.store(share, Ordering::SeqCst);
    }

    /// A shard was taken: its release token (a child of `stop`).
    pub(crate) fn took(&self, shard: u32, stop: &CancellationToken) -> CancellationToken {
        self.held.fetch_add(1, Ordering::SeqCst);
        let release = stop.child_token();
        if let Ok(mut running) = self.running.lock() {
            running.push((shard, release.clone()));
        }
        release
    }

    /// A shard was let go.
    pub(crate) fn let_go(&self, shard: u32) {
        self.held.fetch_sub(1, Ordering::SeqCst);
        if let Ok(mut running) = self.running.lock() {
            running.retain(|(s, _)| *s != shard);
        }
    }

    /// Above its share: asks the worker of the highest shard it runs to let go. True when it
    /// asked.
    pub(crate) fn shed(&self) -> bool {
        if AtomicU32::load(&self.held, Ordering::SeqCst)
            <= AtomicU32::load(&self.share, Ordering::SeqCst)
        {
            return false;
        }
        let Ok(running) = self.running.lock() else {
            return false;
        };
        match running
            .iter()
            .filter(|(_, t)| !t.is_cancelled())
            .max_by_key(|(s, _)| *s)
        {
            Some((shard, token)) => {
                tracing::info!(
                    shard,
                    "relay instance above its fair share; letting a shard go"
                );
                token.cancel();
                true
            }
            None => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ONLY: Shard = Shard { index: 0, of: 1 };

    #[test]
    fn one_shard_keeps_the_single_relays_slot_publication_and_lock() {
        let only = ONLY;
        assert_eq!(only.slot("ferrybox_users"), "ferrybox_users");
        assert_eq!(only.publication(), "ferrybox_messages");
        assert_eq!(only.lock(), (0x6665_7272, 0x7962_6f78));
        assert_eq!(only.condition(), "true");
    }

    #[test]
    fn each_shard_has_its_own_slot_publication_lock_and_keys() {
        let shards: Vec<Shard> = Shard::all(3).collect();
        assert_eq!(shards[2].slot("ferrybox_users"), "ferrybox_users_2_of_3");
        assert_eq!(shards[1].publication(), "ferrybox_messages_1_of_3");
        assert_eq!(
            shards[1].condition(),
            "(hashtext(message_key) & 2147483647) % 3 = 1"
        );
        let locks: std::collections::BTreeSet<_> = shards.iter().map(|s| s.lock()).collect();
        assert_eq!(locks.len(), 3);
        assert_eq!(shards[0].lock(), ONLY.lock());
        // A long base name is cut so the suffix fits PostgreSQL's 63 bytes.
        let long = shards[2].slot(&"x".repeat(63));
        assert_eq!(long.len(), 63);
        assert!(long.ends_with("_2_of_3"));
        super::super::slot::validate_name(&long).unwrap();
    }

    #[test]
    fn instances_share_the_shards_out_and_the_one_above_its_share_lets_one_go() {
        assert_eq!(fair_share(3, 1), 3);
        assert_eq!(fair_share(3, 2), 2);
        assert_eq!(fair_share(3, 3), 1);
        assert_eq!(fair_share(3, 5), 1);
        assert_eq!(fair_share(1, 4), 1);
        let stop = CancellationToken::new();
        let balance = Balance::new(3);
        let tokens: Vec<_> = (0..3).map(|s| balance.took(s, &stop)).collect();
        assert!(!balance.may_take());
        assert!(!balance.shed(), "at its share");
        balance.set_share(2);
        assert!(balance.shed());
        assert!(tokens[2].is_cancelled() && !tokens[1].is_cancelled());
        balance.let_go(2);
        assert!(!balance.shed());
        balance.set_share(1);
        assert!(balance.shed());
        assert!(tokens[1].is_cancelled() && !tokens[0].is_cancelled());
    }
}
