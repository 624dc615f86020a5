DROP INDEX ferrybox_inbox_applied_at;
DROP INDEX ferrybox_dead_letters_open;
ALTER TABLE ferrybox_dead_letters
    DROP COLUMN status, DROP COLUMN message_type, DROP COLUMN consumer_version,
    DROP COLUMN published_at, DROP COLUMN updated_at;
