//! Decoding into a consumer's own reader schemas at run time.

use std::collections::HashMap;
use std::path::Path;

use apache_avro::Schema;
use apache_avro::types::Value;

use super::{ConsumerContract, ContractError};

/// The reader schema for each message type a consumer understands. A value written with any
/// compatible writer schema is resolved into the reader's shape: fields the consumer does not
/// read are dropped, fields it reads but the writer lacks take their defaults.
#[derive(Debug, Clone, Default)]
pub struct ReaderSchemas {
    by_type: HashMap<String, Schema>,
}

impl ReaderSchemas {
    /// The reader schemas of a contract.
    pub fn from_contract(contract: &ConsumerContract) -> Self {
        Self {
            by_type: contract
                .readers
                .iter()
                .map(|(t, s)| (t.clone(), s.clone()))
                .collect(),
        }
    }

    /// Parses an embedded contract (`include_str!` of the contract and its reader schemas), so
    /// a service runs with exactly the files `make contracts` checks. [`crate::contract!`]
    /// does the embedding from the contract file alone.
    pub fn embedded(contract_toml: &str, files: &[(&str, &str)]) -> Result<Self, ContractError> {
        let contract =
            ConsumerContract::parse(Path::new("embedded contract"), contract_toml, |name| {
                files
                    .iter()
                    .find(|(file, _)| *file == name)
                    .map(|(_, text)| (*text).to_owned())
            })?;
        Ok(Self::from_contract(&contract))
    }

    /// Whether the consumer has a reader schema for `message_type`.
    pub fn knows(&self, message_type: &str) -> bool {
        self.by_type.contains_key(message_type)
    }

    /// Resolves a decoded value of `message_type` into the reader's schema.
    pub fn resolve(&self, message_type: &str, value: Value) -> Result<Value, String> {
        let reader = self
            .by_type
            .get(message_type)
            .ok_or_else(|| format!("no reader schema for message type {message_type}"))?;
        value.resolve(reader).map_err(|e| {
            format!("cannot resolve {message_type} into the consumer's reader schema: {e}")
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const CONTRACT: &str = r#"
        consumer = "c"
        topic = "t"
        [messages]
        "x.User" = "user.avsc"
    "#;
    const READER: &str = r#"{"type":"record","name":"User","namespace":"x","fields":[
        {"name":"id","type":"string"},{"name":"tier","type":"string","default":"basic"}]}"#;

    #[test]
    fn resolution_drops_unread_fields_and_fills_defaults() {
        let readers = ReaderSchemas::embedded(CONTRACT, &[("user.avsc", READER)]).unwrap();
        assert!(readers.knows("x.User"));
        let written = Value::Record(vec![
            ("id".into(), Value::String("u1".into())),
            ("extra".into(), Value::Int(3)),
        ]);
        let resolved = readers.resolve("x.User", written).unwrap();
        assert_eq!(
            resolved,
            Value::Record(vec![
                ("id".into(), Value::String("u1".into())),
                ("tier".into(), Value::String("basic".into()))
            ])
        );
    }

    #[test]
    fn unresolvable_or_unknown_messages_are_explained() {
        let readers = ReaderSchemas::embedded(CONTRACT, &[("user.avsc", READER)]).unwrap();
        let missing_id = Value::Record(vec![("name".into(), Value::String("n".into()))]);
        assert!(
            readers
                .resolve("x.User", missing_id)
                .unwrap_err()
                .contains("cannot resolve x.User")
        );
        assert!(
            readers
                .resolve("x.Other", Value::Null)
                .unwrap_err()
                .contains("no reader schema")
        );
        assert!(ReaderSchemas::embedded(CONTRACT, &[]).is_err());
    }
}
