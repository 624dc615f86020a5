-- `ferrybox_mark_published` now returns the ids it could not mark: rows that are not visible
-- to it. The log relay learns of a transaction from its commit record in the write-ahead log,
-- which is written (and streamed) a moment before the transaction becomes visible to other
-- sessions; a mark made in that moment finds no row. The relay marks those again until they
-- are marked, and confirms its position only then. (Before this, such a row was left unmarked
-- while the relay moved past it: published, but never given a feed position.)
DROP FUNCTION ferrybox_mark_published(BIGINT[], INTEGER[], BIGINT[]);

CREATE FUNCTION ferrybox_mark_published(ids BIGINT[], partitions INTEGER[], offsets BIGINT[])
RETURNS BIGINT[] LANGUAGE plpgsql AS $$
DECLARE
    base    BIGINT;
    given   BIGINT;
    missing BIGINT[];
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
        RETURNING o.id, m.n
    )
    -- The ids the update did not reach are the missing ones (from what it returned: no
    -- second look at the table).
    SELECT count(marked.n), coalesce(array_agg(u.id ORDER BY u.id)
                                     FILTER (WHERE marked.id IS NULL), '{}')
    INTO given, missing
    FROM unnest(ids) AS u(id) LEFT JOIN marked ON marked.id = u.id;
    UPDATE ferrybox_feed_sequence SET last = base + given;
    -- Wakes feed readers that are long-polling (one notification per call).
    IF given > 0 THEN
        PERFORM pg_notify('ferrybox_feed', '');
    END IF;
    RETURN missing;
END
$$;
