//! What auth-service reads from user events: only the fields it needs, declared as reader
//! schemas in `contracts/` (checked by `make contracts`). Values are resolved into those
//! schemas before the handler sees them, so fields the producer adds never reach this service.

use ferrybox::contract::{ContractError, EmbeddedContract, ReaderSchemas};
use serde::Deserialize;

/// auth-service's contract with user-service, `contracts/users.toml`, embedded with every
/// reader schema it names, so the service runs with exactly the files `make contracts`
/// checks.
pub const CONTRACT: EmbeddedContract = ferrybox::contract!("contracts/users.toml");

/// The contract's reader schemas.
pub fn reader_schemas() -> Result<ReaderSchemas, ContractError> {
    CONTRACT.reader_schemas()
}

/// The message types this service understands.
pub mod types {
    /// A user was registered.
    pub const REGISTERED: &str = "com.ferrybox.user.UserRegistered";
    /// A user's details changed.
    pub const UPDATED: &str = "com.ferrybox.user.UserUpdated";
    /// A user was suspended.
    pub const SUSPENDED: &str = "com.ferrybox.user.UserSuspended";
    /// A user was deleted.
    pub const DELETED: &str = "com.ferrybox.user.UserDeleted";
}

/// The full state carried by `UserRegistered` (always active) and `UserUpdated`.
#[derive(Debug, Clone, Deserialize)]
pub struct UserState {
    /// The user's id.
    pub user_id: String,
    /// The account's version.
    pub version: i64,
    /// Email address.
    pub email: String,
    /// Display name.
    pub name: String,
    /// Argon2id PHC string.
    pub password_hash: String,
}

/// `UserUpdated`: the full state plus the status.
#[derive(Debug, Clone, Deserialize)]
pub struct UserUpdate {
    /// The state after the change.
    #[serde(flatten)]
    pub state: UserState,
    /// `active` or `suspended`.
    pub status: String,
}

/// `UserSuspended` and `UserDeleted`: only the id and the version matter here.
#[derive(Debug, Clone, Deserialize)]
pub struct UserRef {
    /// The user's id.
    pub user_id: String,
    /// The account's version.
    pub version: i64,
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Each body type the handler reads deserializes from every value its reader schema
    /// allows: a mismatch fails here, not as dead letters in production.
    #[test]
    fn the_handler_types_read_their_reader_schemas() {
        let contract = CONTRACT.contract().unwrap();
        use ferrybox::contract::check_reads;
        check_reads::<UserState>(&contract, types::REGISTERED).unwrap();
        check_reads::<UserUpdate>(&contract, types::UPDATED).unwrap();
        check_reads::<UserRef>(&contract, types::SUSPENDED).unwrap();
        check_reads::<UserRef>(&contract, types::DELETED).unwrap();
    }

    #[test]
    fn the_embedded_contract_covers_every_type_the_handler_applies() {
        let readers = reader_schemas().unwrap();
        for t in [
            types::REGISTERED,
            types::UPDATED,
            types::SUSPENDED,
            types::DELETED,
        ] {
            assert!(readers.knows(t), "{t}");
        }
    }
}
