DROP INDEX IF EXISTS ferrybox_outbox_errors;
DROP INDEX IF EXISTS ferrybox_outbox_published_at;
