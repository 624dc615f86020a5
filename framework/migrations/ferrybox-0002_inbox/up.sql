-- The inbox: one row per message id a consumer has applied. Inserting the id and running the
-- handler happen in one transaction, so a redelivered message finds its id and is skipped.
CREATE TABLE ferrybox_inbox (
    consumer        TEXT        NOT NULL,
    message_id      UUID        NOT NULL,
    message_type    TEXT        NOT NULL,
    topic           TEXT        NOT NULL,
    kafka_partition INTEGER     NOT NULL,
    kafka_offset    BIGINT      NOT NULL,
    applied_at      TIMESTAMPTZ NOT NULL DEFAULT now(),
    PRIMARY KEY (consumer, message_id)
);

-- Messages the consumer could not process: kept with their bytes and origin until redriven.
CREATE TABLE ferrybox_dead_letters (
    id              BIGSERIAL   PRIMARY KEY,
    consumer        TEXT        NOT NULL,
    message_id      UUID,
    message_key     TEXT,
    topic           TEXT        NOT NULL,
    kafka_partition INTEGER     NOT NULL,
    kafka_offset    BIGINT      NOT NULL,
    headers         JSONB       NOT NULL DEFAULT '{}'::jsonb,
    payload         BYTEA,
    error_kind      TEXT        NOT NULL,
    error           TEXT        NOT NULL,
    attempts        INTEGER     NOT NULL,
    created_at      TIMESTAMPTZ NOT NULL DEFAULT now(),
    UNIQUE (consumer, topic, kafka_partition, kafka_offset)
);
