DROP TABLE ferrybox_relay_checkpoints;
DROP PUBLICATION ferrybox_messages;
DROP TABLE ferrybox_messages;
