DROP TABLE ferrybox_feed_positions;
DROP FUNCTION ferrybox_mark_published(BIGINT[], INTEGER[], BIGINT[]);
DROP TABLE ferrybox_feed_sequence;
DROP INDEX ferrybox_outbox_feed_position;
ALTER TABLE ferrybox_outbox DROP COLUMN feed_position;
