-- Producer sequences (see `ferrybox::outbox::sequence`). Every message the log relay publishes
-- carries its source and a number that is contiguous per source, topic and partition, so a
-- consumer can skip what it applied and notice what never arrived. Nothing here is written per
-- message: the counters and the runs are written with the relay's checkpoint, once a second.

-- One source per replication slot (`stream`): a new slot (made again after it was lost)
-- starts a new source, since what it sends again is read from the table in another order.
-- `partitions`: the partition count per topic the source's numbers were given with; it
-- changes only at a checkpoint with nothing in flight.
CREATE TABLE ferrybox_sequence_sources (
    stream     TEXT        PRIMARY KEY,
    source     TEXT        NOT NULL UNIQUE,
    partitions JSONB       NOT NULL DEFAULT '{}'::jsonb,
    created_at TIMESTAMPTZ NOT NULL DEFAULT now()
);

-- The next number of each (source, topic, partition), as of the checkpoint.
CREATE TABLE ferrybox_sequence_counters (
    source          TEXT    NOT NULL,
    topic           TEXT    NOT NULL,
    kafka_partition INTEGER NOT NULL,
    next_seq        BIGINT  NOT NULL,
    PRIMARY KEY (source, topic, kafka_partition)
);

-- Which rows got which numbers: one row per checkpoint, topic, partition and outbox table,
-- `row_ids[n]` (the row's id in `origin`) numbered `first_seq + n - 1`. Replay sends a row
-- again with its number, and a consumer's repair asks for numbers by these.
CREATE TABLE ferrybox_sequence_runs (
    source          TEXT        NOT NULL,
    topic           TEXT        NOT NULL,
    kafka_partition INTEGER     NOT NULL,
    first_seq       BIGINT      NOT NULL,
    origin          TEXT        NOT NULL CHECK (origin IN ('messages', 'outbox')),
    row_ids         BIGINT[]    NOT NULL,
    created_at      TIMESTAMPTZ NOT NULL DEFAULT now(),
    PRIMARY KEY (source, topic, kafka_partition, first_seq)
);
CREATE INDEX ferrybox_sequence_runs_created_at ON ferrybox_sequence_runs (created_at);

-- The consumer's side: the last number applied per (consumer, source, topic, partition),
-- written in the transaction that applied it.
CREATE TABLE ferrybox_inbox_sequences (
    consumer        TEXT        NOT NULL,
    source          TEXT        NOT NULL,
    topic           TEXT        NOT NULL,
    kafka_partition INTEGER     NOT NULL,
    last_seq        BIGINT      NOT NULL,
    updated_at      TIMESTAMPTZ NOT NULL DEFAULT now(),
    PRIMARY KEY (consumer, source, topic, kafka_partition)
);

-- Gaps: a message numbered past the next one arrived; `from_seq`..`to_seq` are missing. The
-- partition waits (from `kafka_offset`, the message after the gap) until the gap is repaired
-- from the producer's sent log or an operator skips it.
CREATE TABLE ferrybox_inbox_gaps (
    id              BIGINT      GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    consumer        TEXT        NOT NULL,
    source          TEXT        NOT NULL,
    topic           TEXT        NOT NULL,
    kafka_partition INTEGER     NOT NULL,
    from_seq        BIGINT      NOT NULL,
    to_seq          BIGINT      NOT NULL,
    kafka_offset    BIGINT      NOT NULL,
    status          TEXT        NOT NULL DEFAULT 'open'
                    CHECK (status IN ('open', 'repaired', 'skipped')),
    detail          TEXT,
    detected_at     TIMESTAMPTZ NOT NULL DEFAULT now(),
    resolved_at     TIMESTAMPTZ
);
CREATE UNIQUE INDEX ferrybox_inbox_gaps_open
    ON ferrybox_inbox_gaps (consumer, source, topic, kafka_partition) WHERE status = 'open';
