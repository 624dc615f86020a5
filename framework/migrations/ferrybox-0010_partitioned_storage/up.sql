-- Storage that never bloats (see `ferrybox::storage`). The tables that grow with traffic are
-- partitioned, and retention drops whole partitions instead of deleting rows: no dead tuples,
-- no vacuum debt, and the cost of cleanup does not grow with the table.
--
-- * `ferrybox_messages` and `ferrybox_outbox` (the outbox and its sent log) by `created_at`,
--   in ranges the relay creates ahead of time. A partition goes once its newest possible row
--   is older than the retention (and, in the polling table, once every row in it was
--   published and left the retention too). A DEFAULT partition takes rows no range covers,
--   so an insert never fails for want of a partition; retention deletes from it row by row.
-- * `ferrybox_inbox` (the id inbox) by `generation`: ids go into the newest generation; a
--   new one is opened every span; a closed generation goes once every consumer with ids in
--   it is past redelivery for all of them (see `ferrybox::inbox::retention`).
--
-- The existing tables are kept as the first partition of each (attached, not copied: a copy
-- would be streamed to the log relay as new inserts and published twice).

-- What each publication streams of the two outbox tables (the shards' row filters), to be
-- given to the partitioned tables that replace them.
CREATE TEMPORARY TABLE ferrybox_published_tables ON COMMIT DROP AS
    SELECT pubname, tablename, rowfilter FROM pg_publication_tables
    WHERE schemaname = current_schema() AND tablename IN ('ferrybox_messages', 'ferrybox_outbox');

DO $$
DECLARE
    p RECORD;
BEGIN
    FOR p IN SELECT * FROM ferrybox_published_tables LOOP
        EXECUTE format('ALTER PUBLICATION %I DROP TABLE %I', p.pubname, p.tablename);
    END LOOP;
END
$$;

-- The log relay's append-only outbox.
ALTER TABLE ferrybox_messages RENAME TO ferrybox_messages_legacy;
-- Its key becomes the partitioned table's (id, created_at), made when it is attached.
ALTER TABLE ferrybox_messages_legacy DROP CONSTRAINT ferrybox_messages_pkey;

CREATE TABLE ferrybox_messages (
    id             BIGINT      GENERATED ALWAYS AS IDENTITY,
    message_id     UUID        NOT NULL,
    topic          TEXT        NOT NULL,
    message_key    TEXT        NOT NULL,
    message_type   TEXT        NOT NULL,
    entity_version BIGINT      NOT NULL,
    headers        JSONB       NOT NULL,
    payload        BYTEA       NOT NULL,
    occurred_at    TIMESTAMPTZ NOT NULL,
    created_at     TIMESTAMPTZ NOT NULL DEFAULT now(),
    PRIMARY KEY (id, created_at)
) PARTITION BY RANGE (created_at);
CREATE TABLE ferrybox_messages_default PARTITION OF ferrybox_messages DEFAULT;

-- The polling relay's outbox and sent log.
ALTER TABLE ferrybox_outbox RENAME TO ferrybox_outbox_legacy;
ALTER TABLE ferrybox_outbox_legacy DROP CONSTRAINT ferrybox_outbox_pkey;
ALTER TABLE ferrybox_outbox_legacy DROP CONSTRAINT ferrybox_outbox_message_id_key;
DROP INDEX ferrybox_outbox_feed_position;
ALTER INDEX ferrybox_outbox_unpublished RENAME TO ferrybox_outbox_legacy_unpublished;
ALTER INDEX ferrybox_outbox_published_at RENAME TO ferrybox_outbox_legacy_published_at;
ALTER INDEX ferrybox_outbox_errors RENAME TO ferrybox_outbox_legacy_errors;

CREATE TABLE ferrybox_outbox (
    id              BIGINT      NOT NULL DEFAULT nextval('ferrybox_outbox_id_seq'),
    message_id      UUID        NOT NULL,
    topic           TEXT        NOT NULL,
    message_key     TEXT        NOT NULL,
    message_type    TEXT        NOT NULL,
    entity_version  BIGINT      NOT NULL,
    headers         JSONB       NOT NULL DEFAULT '{}'::jsonb,
    payload         BYTEA       NOT NULL,
    occurred_at     TIMESTAMPTZ NOT NULL,
    created_at      TIMESTAMPTZ NOT NULL DEFAULT now(),
    published_at    TIMESTAMPTZ,
    kafka_partition INTEGER,
    kafka_offset    BIGINT,
    attempts        INTEGER     NOT NULL DEFAULT 0,
    last_error      TEXT,
    feed_position   BIGINT,
    PRIMARY KEY (id, created_at),
    -- A message id is unique per creation time (a partitioned table's unique keys include its
    -- partition key); ids are random, so this is unique in practice, and the relay's inserts
    -- of a known message give its original creation time.
    UNIQUE (message_id, created_at)
) PARTITION BY RANGE (created_at);
ALTER SEQUENCE ferrybox_outbox_id_seq OWNED BY ferrybox_outbox.id;
ALTER TABLE ferrybox_outbox_legacy ALTER COLUMN id SET DEFAULT nextval('ferrybox_outbox_id_seq');
CREATE INDEX ferrybox_outbox_unpublished ON ferrybox_outbox (id) WHERE published_at IS NULL;
CREATE INDEX ferrybox_outbox_published_at ON ferrybox_outbox (published_at)
    WHERE published_at IS NOT NULL;
CREATE INDEX ferrybox_outbox_errors ON ferrybox_outbox (id)
    WHERE published_at IS NULL AND last_error IS NOT NULL;
CREATE UNIQUE INDEX ferrybox_outbox_feed_position ON ferrybox_outbox (feed_position, created_at)
    WHERE feed_position IS NOT NULL;
CREATE TABLE ferrybox_outbox_default PARTITION OF ferrybox_outbox DEFAULT;

-- The old tables become each one's first partition: everything created until now (to the
-- second; the next ranges start there), named by its bounds in seconds since the epoch, like
-- every range partition (`<table>_p<from>_<to>`).
DO $$
DECLARE
    upto   BIGINT := ceil(extract(epoch FROM clock_timestamp()))::bigint;
    bound  TEXT   := to_char(to_timestamp(upto) AT TIME ZONE 'UTC', 'YYYY-MM-DD HH24:MI:SS') || '+00';
    top    BIGINT;
BEGIN
    SELECT coalesce(max(id), 0) INTO top FROM ferrybox_messages_legacy;
    ALTER TABLE ferrybox_messages_legacy ALTER COLUMN id DROP IDENTITY;
    EXECUTE format('ALTER TABLE ferrybox_messages ALTER COLUMN id RESTART WITH %s', top + 1);
    EXECUTE format('ALTER TABLE ferrybox_messages_legacy RENAME TO %I', 'ferrybox_messages_p0_' || upto);
    EXECUTE format('ALTER TABLE ferrybox_messages ATTACH PARTITION %I '
                   'FOR VALUES FROM (%L) TO (%L)', 'ferrybox_messages_p0_' || upto,
                   '1970-01-01 00:00:00+00', bound);
    EXECUTE format('ALTER TABLE ferrybox_outbox_legacy RENAME TO %I', 'ferrybox_outbox_p0_' || upto);
    EXECUTE format('ALTER TABLE ferrybox_outbox ATTACH PARTITION %I '
                   'FOR VALUES FROM (%L) TO (%L)', 'ferrybox_outbox_p0_' || upto,
                   '1970-01-01 00:00:00+00', bound);
END
$$;

-- The publications stream the partitioned tables as themselves (the relay decodes rows by
-- table name), with the row filters they had.
DO $$
DECLARE
    p RECORD;
BEGIN
    FOR p IN SELECT DISTINCT pubname FROM ferrybox_published_tables LOOP
        EXECUTE format('ALTER PUBLICATION %I SET (publish_via_partition_root = true)', p.pubname);
    END LOOP;
    FOR p IN SELECT * FROM ferrybox_published_tables LOOP
        IF p.rowfilter IS NULL THEN
            EXECUTE format('ALTER PUBLICATION %I ADD TABLE %I', p.pubname, p.tablename);
        ELSE
            EXECUTE format('ALTER PUBLICATION %I ADD TABLE %I WHERE (%s)', p.pubname,
                           p.tablename, p.rowfilter);
        END IF;
    END LOOP;
END
$$;

-- The id inbox, by generation.
CREATE TABLE ferrybox_inbox_generations (
    generation INTEGER     PRIMARY KEY,
    opened_at  TIMESTAMPTZ NOT NULL DEFAULT now(),
    -- Set when the next generation opens: nothing is written into this one after.
    closed_at  TIMESTAMPTZ,
    -- Set once `ferrybox_inbox_bounds` has this generation's rows.
    summarized BOOLEAN     NOT NULL DEFAULT false
);
INSERT INTO ferrybox_inbox_generations (generation) VALUES (0);

-- A closed generation's ids, summed up per consumer and partition: how far they reach, so
-- retention decides from a handful of rows instead of reading the generation. `expired` is
-- set by the consumer's own retention once its group is past redelivery for all of them.
CREATE TABLE ferrybox_inbox_bounds (
    generation      INTEGER     NOT NULL REFERENCES ferrybox_inbox_generations ON DELETE CASCADE,
    consumer        TEXT        NOT NULL,
    topic           TEXT        NOT NULL,
    kafka_partition INTEGER     NOT NULL,
    max_offset      BIGINT      NOT NULL,
    last_applied_at TIMESTAMPTZ NOT NULL,
    ids             BIGINT      NOT NULL,
    expired         BOOLEAN     NOT NULL DEFAULT false,
    PRIMARY KEY (generation, consumer, topic, kafka_partition)
);

ALTER TABLE ferrybox_inbox RENAME TO ferrybox_inbox_g0;
ALTER TABLE ferrybox_inbox_g0 DROP CONSTRAINT ferrybox_inbox_pkey;
-- Retention no longer reads rows by age: one index less for every applied message to pay.
DROP INDEX ferrybox_inbox_applied_at;
ALTER TABLE ferrybox_inbox_g0 ADD COLUMN generation INTEGER NOT NULL DEFAULT 0;
CREATE TABLE ferrybox_inbox (
    consumer        TEXT        NOT NULL,
    message_id      UUID        NOT NULL,
    message_type    TEXT        NOT NULL,
    topic           TEXT        NOT NULL,
    kafka_partition INTEGER     NOT NULL,
    kafka_offset    BIGINT      NOT NULL,
    applied_at      TIMESTAMPTZ NOT NULL DEFAULT now(),
    generation      INTEGER     NOT NULL,
    PRIMARY KEY (consumer, message_id, generation)
) PARTITION BY RANGE (generation);
ALTER TABLE ferrybox_inbox_g0 ALTER COLUMN generation DROP DEFAULT;
ALTER TABLE ferrybox_inbox ATTACH PARTITION ferrybox_inbox_g0 FOR VALUES FROM (0) TO (1);

-- Partition changes run as the tables' owner (the role that ran these migrations), so relays
-- and consumers need no right to change tables: each function does only what it is named for,
-- to the tables it is meant for. Called by `ferrybox::storage` and `ferrybox::inbox`.

-- Makes the range [from_epoch, to_epoch) (seconds since the epoch) of an outbox table.
CREATE FUNCTION ferrybox_create_range(parent TEXT, from_epoch BIGINT, to_epoch BIGINT)
RETURNS VOID LANGUAGE plpgsql SECURITY DEFINER SET search_path FROM CURRENT AS $$
BEGIN
    IF parent NOT IN ('ferrybox_messages', 'ferrybox_outbox') THEN
        RAISE EXCEPTION 'ferrybox_create_range: % is not a partitioned outbox table', parent;
    END IF;
    IF from_epoch >= to_epoch THEN
        RAISE EXCEPTION 'ferrybox_create_range: an empty range [%, %)', from_epoch, to_epoch;
    END IF;
    EXECUTE format('CREATE TABLE %I PARTITION OF %I FOR VALUES FROM (%L) TO (%L)',
                   parent || '_p' || from_epoch || '_' || to_epoch, parent,
                   to_timestamp(from_epoch), to_timestamp(to_epoch));
END
$$;

-- Drops a range partition of an outbox table.
CREATE FUNCTION ferrybox_drop_range(parent TEXT, range_name TEXT)
RETURNS VOID LANGUAGE plpgsql SECURITY DEFINER SET search_path FROM CURRENT AS $$
DECLARE
    unpublished BOOLEAN;
BEGIN
    IF parent NOT IN ('ferrybox_messages', 'ferrybox_outbox') THEN
        RAISE EXCEPTION 'ferrybox_drop_range: % is not a partitioned outbox table', parent;
    END IF;
    IF NOT EXISTS (SELECT 1 FROM pg_inherits AS i JOIN pg_class AS c ON c.oid = i.inhrelid
                   WHERE i.inhparent = parent::regclass AND c.relname = range_name
                     AND starts_with(range_name, parent || '_p')) THEN
        RAISE EXCEPTION 'ferrybox_drop_range: % is not a range of %', range_name, parent;
    END IF;
    IF parent = 'ferrybox_outbox' THEN
        EXECUTE format('SELECT EXISTS (SELECT 1 FROM %I WHERE published_at IS NULL)', range_name)
            INTO unpublished;
        IF unpublished THEN
            RAISE EXCEPTION 'ferrybox_drop_range: % holds unpublished rows', range_name;
        END IF;
    END IF;
    EXECUTE format('DROP TABLE %I', range_name);
END
$$;

-- Opens the id inbox's next generation if the newest was opened longer than `span` ago;
-- returns it, or NULL when none was due. Holds the inbox's lock against inserts while it does,
-- so no insert that read the old generation as the newest is still running once it commits.
CREATE FUNCTION ferrybox_open_inbox_generation(span INTERVAL)
RETURNS INTEGER LANGUAGE plpgsql SECURITY DEFINER SET search_path FROM CURRENT AS $$
DECLARE
    newest INTEGER;
    opened TIMESTAMPTZ;
BEGIN
    SELECT generation, opened_at INTO newest, opened FROM ferrybox_inbox_generations
    ORDER BY generation DESC LIMIT 1 FOR UPDATE;
    IF opened >= now() - span THEN
        RETURN NULL;
    END IF;
    LOCK TABLE ferrybox_inbox IN SHARE ROW EXCLUSIVE MODE;
    EXECUTE format('CREATE TABLE %I PARTITION OF ferrybox_inbox FOR VALUES FROM (%s) TO (%s)',
                   'ferrybox_inbox_g' || (newest + 1), newest + 1, newest + 2);
    UPDATE ferrybox_inbox_generations SET closed_at = now() WHERE generation = newest;
    INSERT INTO ferrybox_inbox_generations (generation) VALUES (newest + 1);
    RETURN newest + 1;
END
$$;

-- Drops a closed generation of the id inbox, with its sums.
CREATE FUNCTION ferrybox_drop_inbox_generation(closed INTEGER)
RETURNS VOID LANGUAGE plpgsql SECURITY DEFINER SET search_path FROM CURRENT AS $$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM ferrybox_inbox_generations
                   WHERE generation = closed AND closed_at IS NOT NULL) THEN
        RAISE EXCEPTION 'ferrybox_drop_inbox_generation: % is not a closed generation', closed;
    END IF;
    EXECUTE format('DROP TABLE IF EXISTS %I', 'ferrybox_inbox_g' || closed);
    DELETE FROM ferrybox_inbox_generations WHERE generation = closed;
END
$$;

-- Only roles given the right may call them (with their rights on the tables): not every role
-- that can connect.
REVOKE ALL ON FUNCTION ferrybox_create_range(TEXT, BIGINT, BIGINT) FROM PUBLIC;
REVOKE ALL ON FUNCTION ferrybox_drop_range(TEXT, TEXT) FROM PUBLIC;
REVOKE ALL ON FUNCTION ferrybox_open_inbox_generation(INTERVAL) FROM PUBLIC;
REVOKE ALL ON FUNCTION ferrybox_drop_inbox_generation(INTEGER) FROM PUBLIC;
