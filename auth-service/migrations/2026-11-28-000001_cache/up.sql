-- The cache of users, fed by user-service's events. A row keeps the version of the last event
-- applied, so an older event never overwrites a newer state. Deleted users stay as tombstones
-- (status 'deleted', details cleared) so a late older event cannot bring them back.
CREATE TABLE cached_users (
    id            UUID        PRIMARY KEY,
    email         TEXT,
    name          TEXT,
    password_hash TEXT,
    status        TEXT        NOT NULL CHECK (status IN ('active', 'suspended', 'deleted')),
    version       BIGINT      NOT NULL,
    updated_at    TIMESTAMPTZ NOT NULL DEFAULT now()
);
CREATE INDEX cached_users_email ON cached_users (lower(email));

-- Login sessions. Only a hash of each token is stored.
CREATE TABLE sessions (
    token_hash  TEXT        PRIMARY KEY,
    user_id     UUID        NOT NULL,
    created_at  TIMESTAMPTZ NOT NULL DEFAULT now(),
    expires_at  TIMESTAMPTZ NOT NULL
);
CREATE INDEX sessions_user ON sessions (user_id);
