DROP TABLE ferrybox_dead_letters;
DROP TABLE ferrybox_inbox;
