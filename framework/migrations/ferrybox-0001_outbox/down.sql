DROP TABLE ferrybox_outbox;
