// The framework's inbox and dead-letter tables, as diesel sees them (see migrations/).

diesel::table! {
    ferrybox_inbox (consumer, message_id) {
        consumer -> Text,
        message_id -> Uuid,
        message_type -> Text,
        topic -> Text,
        kafka_partition -> Integer,
        kafka_offset -> BigInt,
        applied_at -> Timestamptz,
        generation -> Integer,
    }
}

diesel::table! {
    ferrybox_dead_letters (id) {
        id -> BigInt,
        consumer -> Text,
        message_id -> Nullable<Uuid>,
        message_key -> Nullable<Text>,
        topic -> Text,
        kafka_partition -> Integer,
        kafka_offset -> BigInt,
        headers -> Jsonb,
        payload -> Nullable<Bytea>,
        error_kind -> Text,
        error -> Text,
        attempts -> Integer,
        created_at -> Timestamptz,
        status -> Text,
        message_type -> Nullable<Text>,
        consumer_version -> Nullable<Text>,
        published_at -> Nullable<Timestamptz>,
        updated_at -> Timestamptz,
    }
}
