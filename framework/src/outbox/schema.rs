// The framework's outbox table, as diesel sees it (see migrations/).

diesel::table! {
    ferrybox_outbox (id) {
        id -> BigInt,
        message_id -> Uuid,
        topic -> Text,
        message_key -> Text,
        message_type -> Text,
        entity_version -> BigInt,
        headers -> Jsonb,
        payload -> Bytea,
        occurred_at -> Timestamptz,
        created_at -> Timestamptz,
        published_at -> Nullable<Timestamptz>,
        kafka_partition -> Nullable<Integer>,
        kafka_offset -> Nullable<BigInt>,
        attempts -> Integer,
        last_error -> Nullable<Text>,
        feed_position -> Nullable<BigInt>,
    }
}

diesel::table! {
    ferrybox_feed_positions (consumer, feed) {
        consumer -> Text,
        feed -> Text,
        position -> BigInt,
        updated_at -> Timestamptz,
    }
}

diesel::table! {
    ferrybox_messages (id) {
        id -> BigInt,
        message_id -> Uuid,
        topic -> Text,
        message_key -> Text,
        message_type -> Text,
        entity_version -> BigInt,
        headers -> Jsonb,
        payload -> Bytea,
        occurred_at -> Timestamptz,
        created_at -> Timestamptz,
    }
}
