DROP FUNCTION ferrybox_mark_published(BIGINT[], INTEGER[], BIGINT[]);

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
