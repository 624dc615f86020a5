-- Tombstones: a deleted user's id and final version. The snapshot serves them, which is how
-- reconciliation tells a deleted user from one created after the snapshot was taken.
CREATE TABLE deleted_users (
    id         UUID        PRIMARY KEY,
    version    BIGINT      NOT NULL,
    deleted_at TIMESTAMPTZ NOT NULL DEFAULT now()
);
