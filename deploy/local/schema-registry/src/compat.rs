//! Compatibility levels and the checks behind them, done by apache-avro's schema resolution.

use std::fmt;
use std::str::FromStr;

use apache_avro::Schema;
use apache_avro::schema_compatibility::{Compatibility, SchemaCompatibility};

/// A subject's compatibility level, as Confluent names them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Level {
    /// No checks.
    None,
    /// The new schema can read data written with the latest one.
    Backward,
    /// ... with every earlier one.
    BackwardTransitive,
    /// Data written with the new schema can be read with the latest one.
    Forward,
    /// ... with every earlier one.
    ForwardTransitive,
    /// Both backward and forward, against the latest.
    Full,
    /// Both, against every earlier one.
    FullTransitive,
}

impl Level {
    /// Whether the check covers every earlier version rather than only the latest.
    pub fn is_transitive(self) -> bool {
        matches!(
            self,
            Level::BackwardTransitive | Level::ForwardTransitive | Level::FullTransitive
        )
    }

    fn backward(self) -> bool {
        matches!(
            self,
            Level::Backward | Level::BackwardTransitive | Level::Full | Level::FullTransitive
        )
    }

    fn forward(self) -> bool {
        matches!(
            self,
            Level::Forward | Level::ForwardTransitive | Level::Full | Level::FullTransitive
        )
    }

    /// Why `new` may not follow `existing` under this level; empty when it may.
    pub fn violations(self, new: &Schema, existing: &Schema, existing_version: i32) -> Vec<String> {
        let mut out = Vec::new();
        if self.backward()
            && let Err(e) = can_read(existing, new)
        {
            {
                out.push(format!(
                    "new schema cannot read data written with version {existing_version}: {e}"
                ));
            }
        }
        if self.forward()
            && let Err(e) = can_read(new, existing)
        {
            {
                out.push(format!(
                    "version {existing_version} cannot read data written with the new schema: {e}"
                ));
            }
        }
        out
    }
}

/// Ok when `reader` can read everything `writer` writes.
pub fn can_read(writer: &Schema, reader: &Schema) -> Result<(), String> {
    match SchemaCompatibility::can_read(writer, reader) {
        Ok(Compatibility::Full) => Ok(()),
        Ok(Compatibility::Partial) => {
            Err("only some values resolve (enum symbols or union branches missing)".into())
        }
        Err(e) => Err(e.to_string()),
    }
}

impl FromStr for Level {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(match s.to_ascii_uppercase().as_str() {
            "NONE" => Level::None,
            "BACKWARD" => Level::Backward,
            "BACKWARD_TRANSITIVE" => Level::BackwardTransitive,
            "FORWARD" => Level::Forward,
            "FORWARD_TRANSITIVE" => Level::ForwardTransitive,
            "FULL" => Level::Full,
            "FULL_TRANSITIVE" => Level::FullTransitive,
            other => return Err(format!("Invalid compatibility level: {other}")),
        })
    }
}

impl fmt::Display for Level {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Level::None => "NONE",
            Level::Backward => "BACKWARD",
            Level::BackwardTransitive => "BACKWARD_TRANSITIVE",
            Level::Forward => "FORWARD",
            Level::ForwardTransitive => "FORWARD_TRANSITIVE",
            Level::Full => "FULL",
            Level::FullTransitive => "FULL_TRANSITIVE",
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn schema(fields: &str) -> Schema {
        Schema::parse_str(&format!(
            r#"{{"type":"record","name":"U","fields":[{fields}]}}"#
        ))
        .unwrap()
    }

    #[test]
    fn optional_field_is_backward_and_forward_compatible() {
        let v1 = schema(r#"{"name":"id","type":"string"}"#);
        let v2 = schema(
            r#"{"name":"id","type":"string"},{"name":"nick","type":["null","string"],"default":null}"#,
        );
        assert!(Level::Full.violations(&v2, &v1, 1).is_empty());
    }

    #[test]
    fn required_field_without_default_breaks_backward_only() {
        let v1 = schema(r#"{"name":"id","type":"string"}"#);
        let v2 = schema(r#"{"name":"id","type":"string"},{"name":"age","type":"int"}"#);
        assert_eq!(Level::Backward.violations(&v2, &v1, 1).len(), 1);
        assert!(Level::Forward.violations(&v2, &v1, 1).is_empty());
        assert!(Level::None.violations(&v2, &v1, 1).is_empty());
    }

    #[test]
    fn changed_type_breaks_both() {
        let v1 = schema(r#"{"name":"id","type":"string"}"#);
        let v2 = schema(r#"{"name":"id","type":"int"}"#);
        assert_eq!(Level::Full.violations(&v2, &v1, 1).len(), 2);
    }

    #[test]
    fn levels_parse_and_print() {
        for name in [
            "NONE",
            "BACKWARD",
            "BACKWARD_TRANSITIVE",
            "FORWARD",
            "FORWARD_TRANSITIVE",
            "FULL",
            "FULL_TRANSITIVE",
        ] {
            assert_eq!(name.parse::<Level>().unwrap().to_string(), name);
        }
        assert!("SIDEWAYS".parse::<Level>().is_err());
    }
}
