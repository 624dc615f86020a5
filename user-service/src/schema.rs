// The users table, as diesel sees it (see migrations/).

diesel::table! {
    users (id) {
        id -> Uuid,
        email -> Text,
        name -> Text,
        password_hash -> Text,
        status -> Text,
        version -> BigInt,
        created_at -> Timestamptz,
        updated_at -> Timestamptz,
        locale -> Nullable<Text>,
    }
}

diesel::table! {
    deleted_users (id) {
        id -> Uuid,
        version -> BigInt,
        deleted_at -> Timestamptz,
    }
}
