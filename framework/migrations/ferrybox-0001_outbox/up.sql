-- The transactional outbox. Rows are written in the caller's business transaction and
-- published by the relay. Published rows stay as the sent log until retention removes them.
CREATE TABLE ferrybox_outbox (
    id              BIGSERIAL PRIMARY KEY,
    message_id      UUID        NOT NULL UNIQUE,
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
    last_error      TEXT
);

-- The relay's claim query only ever looks at unpublished rows, in id order.
CREATE INDEX ferrybox_outbox_unpublished ON ferrybox_outbox (id) WHERE published_at IS NULL;
