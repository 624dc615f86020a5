DROP TABLE ferrybox_relay_layout;
