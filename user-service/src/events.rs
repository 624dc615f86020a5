//! The events user-service publishes, each tied to its schema file in `schemas/`.

use serde::{Deserialize, Serialize};

/// `ferrybox::event!` for a user event: its type is `com.ferrybox.user.<Name>`, its schema
/// `schemas/users/com.ferrybox.user.<Name>/<file>`, its key the user's id.
macro_rules! user_event {
    ($ty:ident, $file:literal) => {
        ferrybox::event!($ty {
            message_type: concat!("com.ferrybox.user.", stringify!($ty)),
            schema: include_str!(concat!(
                "../../schemas/users/com.ferrybox.user.",
                stringify!($ty),
                "/",
                $file
            )),
            key: user_id,
            version: version,
        });
    };
}

/// A user account was created.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UserRegistered {
    /// The user's id.
    pub user_id: String,
    /// The account's version (1).
    pub version: i64,
    /// Email address.
    pub email: String,
    /// Display name.
    pub name: String,
    /// Argon2id PHC string.
    pub password_hash: String,
    /// Preferred locale, when given (added in v2).
    pub locale: Option<String>,
}
user_event!(UserRegistered, "v2.avsc");

/// A user's details changed; carries the full state after the change.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UserUpdated {
    /// The user's id.
    pub user_id: String,
    /// The account's version after the change.
    pub version: i64,
    /// Email address.
    pub email: String,
    /// Display name.
    pub name: String,
    /// Argon2id PHC string.
    pub password_hash: String,
    /// `active` or `suspended`.
    pub status: String,
}
user_event!(UserUpdated, "v1.avsc");

/// A user was suspended.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UserSuspended {
    /// The user's id.
    pub user_id: String,
    /// The account's version after the change.
    pub version: i64,
    /// Why, when given.
    pub reason: Option<String>,
}
user_event!(UserSuspended, "v1.avsc");

/// A user was deleted.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UserDeleted {
    /// The user's id.
    pub user_id: String,
    /// The account's version after the change.
    pub version: i64,
}
user_event!(UserDeleted, "v1.avsc");

#[cfg(test)]
mod tests {
    use apache_avro::Schema;
    use ferrybox::{Event, apache_avro};

    use super::*;

    /// Each Rust type round-trips through its schema file, and the schema's record name is the
    /// message type: the two cannot drift apart unnoticed.
    fn round_trip<E: Event + PartialEq + std::fmt::Debug>(event: &E) {
        ferrybox::contract::check_event(event).unwrap();
    }

    /// The schema an event type is written with is the newest version in `schemas/`.
    fn written_with_latest<E: Event>() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../schemas/users")
            .join(E::MESSAGE_TYPE);
        let latest = (1..)
            .take_while(|n| dir.join(format!("v{n}.avsc")).exists())
            .last()
            .expect("a v1.avsc");
        let file = std::fs::read_to_string(dir.join(format!("v{latest}.avsc"))).unwrap();
        assert_eq!(
            Schema::parse_str(&file).unwrap(),
            Schema::parse_str(E::SCHEMA).unwrap(),
            "{} must be written with v{latest}.avsc",
            E::MESSAGE_TYPE
        );
    }

    #[test]
    fn events_are_written_with_their_newest_schema() {
        written_with_latest::<UserRegistered>();
        written_with_latest::<UserUpdated>();
        written_with_latest::<UserSuspended>();
        written_with_latest::<UserDeleted>();
    }

    #[test]
    fn events_round_trip_through_their_schemas() {
        let id = "0193a0b4-0000-7000-8000-000000000001".to_owned();
        round_trip(&UserRegistered {
            user_id: id.clone(),
            version: 1,
            email: "a@example.com".into(),
            name: "A".into(),
            password_hash: "$argon2id$...".into(),
            locale: Some("fr-CA".into()),
        });
        round_trip(&UserUpdated {
            user_id: id.clone(),
            version: 2,
            email: "b@example.com".into(),
            name: "B".into(),
            password_hash: "$argon2id$...".into(),
            status: "active".into(),
        });
        round_trip(&UserSuspended {
            user_id: id.clone(),
            version: 3,
            reason: Some("abuse".into()),
        });
        round_trip(&UserSuspended {
            user_id: id.clone(),
            version: 3,
            reason: None,
        });
        round_trip(&UserDeleted {
            user_id: id,
            version: 4,
        });
    }
}
