-- The pulled event feed. Every published row gets a feed position: contiguous, in the order the
-- relay recorded the rows, and only ever given to committed rows (the relay can only see
-- those). Outbox ids cannot serve as positions: they are drawn before commit, so a reader
-- that moved past id N would skip a row with a smaller id whose transaction commits later.
ALTER TABLE ferrybox_outbox ADD COLUMN feed_position BIGINT;
CREATE UNIQUE INDEX ferrybox_outbox_feed_position ON ferrybox_outbox (feed_position)
    WHERE feed_position IS NOT NULL;

-- The last position handed out. Its row lock orders the relay's recording transactions, so
-- positions become visible in order: a reader never sees position N+1 before N.
CREATE TABLE ferrybox_feed_sequence (
    singleton BOOLEAN PRIMARY KEY DEFAULT true CHECK (singleton),
    last      BIGINT  NOT NULL
);
INSERT INTO ferrybox_feed_sequence (singleton, last) VALUES (true, 0);

-- Marks acknowledged rows published and gives the ones without a position the next feed
-- positions, in id order, in one round trip. A row that has a position already (published
-- before, then sent again) keeps it. PL/pgSQL so each statement reads after the sequence lock
-- is taken: a recording transaction that committed while this one waited is seen. Returns how
-- many positions it gave out, and notifies `ferrybox_feed` when it gave any.
CREATE FUNCTION ferrybox_mark_published(ids BIGINT[], partitions INTEGER[], offsets BIGINT[])
RETURNS BIGINT LANGUAGE plpgsql AS $$
DECLARE
    base   BIGINT;
    given  BIGINT;
BEGIN
    SELECT s.last INTO base FROM ferrybox_feed_sequence AS s FOR UPDATE;
    WITH acked AS (
        SELECT u.id, u.p, u.o, o.feed_position IS NULL AS needs_position
        FROM unnest(ids, partitions, offsets) AS u(id, p, o)
        JOIN ferrybox_outbox AS o ON o.id = u.id
        WHERE o.id = ANY(ids)
    ),
    numbered AS (
        SELECT a.*, CASE WHEN a.needs_position
                         THEN row_number() OVER (PARTITION BY a.needs_position ORDER BY a.id)
                    END AS n
        FROM acked AS a
    ),
    marked AS (
        UPDATE ferrybox_outbox AS o
        SET published_at = now(), kafka_partition = m.p, kafka_offset = m.o,
            attempts = o.attempts + 1, last_error = NULL,
            feed_position = COALESCE(o.feed_position, base + m.n)
        FROM numbered AS m
        WHERE o.id = m.id
        RETURNING m.n
    )
    SELECT count(n) INTO given FROM marked;
    UPDATE ferrybox_feed_sequence SET last = base + given;
    -- Wakes feed readers that are long-polling (one notification per call).
    IF given > 0 THEN
        PERFORM pg_notify('ferrybox_feed', '');
    END IF;
    RETURN given;
END
$$;

-- A feed consumer's position, written in the same transaction as the changes it applied.
CREATE TABLE ferrybox_feed_positions (
    consumer   TEXT        NOT NULL,
    feed       TEXT        NOT NULL,
    position   BIGINT      NOT NULL,
    updated_at TIMESTAMPTZ NOT NULL DEFAULT now(),
    PRIMARY KEY (consumer, feed)
);
