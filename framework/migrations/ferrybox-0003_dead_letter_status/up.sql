-- Dead letters get a life cycle: 'dead' (failed, waiting for a fix), 'parked' (a later message
-- of a key that has a dead letter, held back so the key's order holds), 'redriven' (applied
-- after a fix, or found already applied).
ALTER TABLE ferrybox_dead_letters
    ADD COLUMN status           TEXT NOT NULL DEFAULT 'dead' CHECK (status IN ('dead', 'parked', 'redriven')),
    ADD COLUMN message_type     TEXT,
    ADD COLUMN consumer_version TEXT,
    ADD COLUMN published_at     TIMESTAMPTZ,
    ADD COLUMN updated_at       TIMESTAMPTZ NOT NULL DEFAULT now();

-- "Does this key have an open dead letter?" is asked for every message of a parked key.
CREATE INDEX ferrybox_dead_letters_open ON ferrybox_dead_letters (consumer, message_key)
    WHERE status <> 'redriven';

-- Retention deletes the oldest inbox rows first.
CREATE INDEX ferrybox_inbox_applied_at ON ferrybox_inbox (applied_at);
