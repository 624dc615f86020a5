-- Schemas are global: the same schema text has one id whichever subjects use it.
CREATE TABLE registry_schemas (
    id          SERIAL PRIMARY KEY,
    schema_type TEXT NOT NULL DEFAULT 'AVRO',
    schema      TEXT NOT NULL
);
-- A unique index on the text itself would fail for schemas over a few kilobytes.
CREATE UNIQUE INDEX registry_schemas_text ON registry_schemas (md5(schema));

CREATE TABLE registry_subject_versions (
    subject    TEXT    NOT NULL,
    version    INTEGER NOT NULL,
    schema_id  INTEGER NOT NULL REFERENCES registry_schemas (id),
    deleted    BOOLEAN NOT NULL DEFAULT false,
    PRIMARY KEY (subject, version)
);

-- Compatibility levels: the row with an empty subject is the global default.
CREATE TABLE registry_config (
    subject       TEXT PRIMARY KEY,
    compatibility TEXT NOT NULL
);
INSERT INTO registry_config (subject, compatibility) VALUES ('', 'BACKWARD');
