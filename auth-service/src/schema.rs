// auth-service's tables, as diesel sees them (see migrations/).

diesel::table! {
    cached_users (id) {
        id -> Uuid,
        email -> Nullable<Text>,
        name -> Nullable<Text>,
        password_hash -> Nullable<Text>,
        status -> Text,
        version -> BigInt,
        updated_at -> Timestamptz,
    }
}

diesel::table! {
    sessions (token_hash) {
        token_hash -> Text,
        user_id -> Uuid,
        created_at -> Timestamptz,
        expires_at -> Timestamptz,
    }
}
diesel::allow_tables_to_appear_in_same_query!(cached_users, sessions);
