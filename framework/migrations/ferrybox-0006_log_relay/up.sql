-- The outbox of the relay that reads the write-ahead log ("log mode"). Append-only: a row is
-- written once, by `enqueue`, in the business transaction, and never updated. The relay learns
-- of it from logical replication (the publication below) and acknowledges progress on its
-- replication slot, so it writes nothing back per message. The rows are the sent log: kept
-- for the retention window, then deleted oldest first, for `status`, `replay` and for
-- recovering a lost slot. No index but the primary key: every index is paid for by every
-- business transaction.
CREATE TABLE ferrybox_messages (
    id             BIGINT      GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    message_id     UUID        NOT NULL,
    topic          TEXT        NOT NULL,
    message_key    TEXT        NOT NULL,
    message_type   TEXT        NOT NULL,
    entity_version BIGINT      NOT NULL,
    headers        JSONB       NOT NULL,
    payload        BYTEA       NOT NULL,
    occurred_at    TIMESTAMPTZ NOT NULL,
    created_at     TIMESTAMPTZ NOT NULL DEFAULT now()
);

-- What the log relay streams: inserts only (marking and retention are not messages), into
-- either outbox table, so a writer still on the polling table (an instance not yet upgraded,
-- another configuration) is published too; the relay marks those rows published. Creating a
-- publication needs no particular wal_level; streaming from it needs wal_level = logical.
CREATE PUBLICATION ferrybox_messages FOR TABLE ferrybox_messages, ferrybox_outbox
    WITH (publish = 'insert');

-- The log relay's checkpoint, one row per replication slot, written once per second of
-- progress (never per message): how far the broker has acknowledged, and the bound that
-- recovery after a lost slot republishes from. `recover_from_xid` is the oldest transaction
-- that was still running when the WAL was at a position the broker has since acknowledged
-- past: every transaction not yet acknowledged has an id at or above it.
CREATE TABLE ferrybox_relay_checkpoints (
    slot_name        TEXT        PRIMARY KEY,
    confirmed_lsn    PG_LSN      NOT NULL,
    recover_from_xid XID8,
    -- False from the slot's creation until every row committed before it was published:
    -- a slot whose initial snapshot was not published is dropped and made again.
    snapshot_done    BOOLEAN     NOT NULL DEFAULT false,
    updated_at       TIMESTAMPTZ NOT NULL DEFAULT now()
);
