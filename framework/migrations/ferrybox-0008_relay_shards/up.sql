-- Relay shards (see `ferrybox::outbox::reshard`): how many shards the log relay runs as, one
-- row. No row means one shard, the layout every outbox starts with. `resharding_to` is set
-- while a reshard is under way: every relay lets go of its shards until it is cleared.
CREATE TABLE ferrybox_relay_layout (
    singleton     BOOLEAN     PRIMARY KEY DEFAULT true CHECK (singleton),
    shards        INTEGER     NOT NULL CHECK (shards BETWEEN 1 AND 64),
    resharding_to INTEGER     CHECK (resharding_to BETWEEN 1 AND 64),
    updated_at    TIMESTAMPTZ NOT NULL DEFAULT now()
);
