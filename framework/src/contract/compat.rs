//! Compatibility levels and readable explanations of why one schema cannot read another.

use std::fmt;
use std::str::FromStr;

use apache_avro::Schema;
use apache_avro::schema::{RecordField, RecordSchema};
use apache_avro::schema_compatibility::{Compatibility, SchemaCompatibility};

/// A subject's compatibility level, as the Confluent schema registry names them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Level {
    /// No checks.
    None,
    /// A new version can read data written with the latest one.
    Backward,
    /// ... with every earlier one.
    BackwardTransitive,
    /// Data written with a new version can be read with the latest one.
    Forward,
    /// ... with every earlier one.
    ForwardTransitive,
    /// Both backward and forward, against the latest.
    Full,
    /// Both, against every earlier one.
    FullTransitive,
}

impl Level {
    /// Whether checks cover every earlier version rather than only the latest.
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

    /// Why `new` may not follow `existing` (version `existing_version`) under this level;
    /// empty when it may.
    pub fn violations(self, new: &Schema, existing: &Schema, existing_version: u32) -> Vec<String> {
        let mut out = Vec::new();
        if self.backward() {
            out.extend(explain(existing, new).into_iter().map(|p| {
                format!("the new version cannot read data written with v{existing_version}: {p}")
            }));
        }
        if self.forward() {
            out.extend(explain(new, existing).into_iter().map(|p| {
                format!("v{existing_version} cannot read data written with the new version: {p}")
            }));
        }
        out
    }

    /// The versions (1-based, ascending) a new version is checked against, out of `count`.
    pub fn checked_against(self, count: usize) -> std::ops::Range<usize> {
        if self.is_transitive() {
            0..count
        } else {
            count.saturating_sub(1)..count
        }
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

/// Ok when `reader` can read everything written with `writer`.
pub fn can_read(writer: &Schema, reader: &Schema) -> Result<(), String> {
    match SchemaCompatibility::can_read(writer, reader) {
        Ok(Compatibility::Full) => Ok(()),
        Ok(Compatibility::Partial) => {
            Err("only some values resolve (enum symbols or union branches are missing)".into())
        }
        Err(e) => Err(e.to_string()),
    }
}

/// Why `reader` cannot read data written with `writer`, one line per problem, naming fields
/// and symbols; empty when it can.
pub fn explain(writer: &Schema, reader: &Schema) -> Vec<String> {
    if can_read(writer, reader).is_ok() {
        return Vec::new();
    }
    let mut problems = Vec::new();
    explain_at("", writer, reader, &mut problems);
    if problems.is_empty() {
        // Nothing more specific found: fall back to apache-avro's own account.
        problems.push(can_read(writer, reader).err().unwrap_or_default());
    }
    problems
}

fn explain_at(path: &str, writer: &Schema, reader: &Schema, out: &mut Vec<String>) {
    match (writer, reader) {
        (Schema::Record(w), Schema::Record(r)) => explain_record(path, w, r, out),
        (Schema::Enum(w), Schema::Enum(r)) => {
            if r.default.is_none() {
                for symbol in w.symbols.iter().filter(|s| !r.symbols.contains(s)) {
                    out.push(format!(
                        "{}enum {} symbol '{symbol}' is written but unknown to the reader (renamed or removed), and the reader's enum has no default",
                        at(path),
                        r.name.fullname(None)
                    ));
                }
            }
        }
        _ => {
            if let Err(e) = can_read(writer, reader) {
                out.push(format!(
                    "{}written as {}, read as {}: {e}",
                    at(path),
                    kind(writer),
                    kind(reader)
                ));
            }
        }
    }
}

fn explain_record(path: &str, w: &RecordSchema, r: &RecordSchema, out: &mut Vec<String>) {
    for field in &r.fields {
        let field_path = if path.is_empty() {
            field.name.clone()
        } else {
            format!("{path}.{}", field.name)
        };
        match writer_field(w, field) {
            Some(written) if can_read(&written.schema, &field.schema).is_err() => {
                explain_at(&field_path, &written.schema, &field.schema, out);
            }
            Some(_) => {}
            None if field.default.is_none() => out.push(format!(
                "field '{field_path}' is read but not written (removed, renamed or new), and the reader gives it no default"
            )),
            None => {}
        }
    }
}

fn writer_field<'w>(w: &'w RecordSchema, reader_field: &RecordField) -> Option<&'w RecordField> {
    w.fields
        .iter()
        .find(|f| f.name == reader_field.name || reader_field.aliases.contains(&f.name))
}

fn at(path: &str) -> String {
    if path.is_empty() {
        String::new()
    } else {
        format!("field '{path}': ")
    }
}

fn kind(schema: &Schema) -> String {
    match schema {
        Schema::Record(r) => format!("record {}", r.name.fullname(None)),
        Schema::Enum(e) => format!("enum {}", e.name.fullname(None)),
        Schema::Union(u) => format!("union of {}", u.variants().len()),
        other => format!("{:?}", apache_avro::schema::SchemaKind::from(other)).to_lowercase(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(fields: &str) -> Schema {
        Schema::parse_str(&format!(
            r#"{{"type":"record","name":"U","namespace":"t","fields":[{fields}]}}"#
        ))
        .unwrap()
    }

    #[test]
    fn an_optional_field_is_compatible_both_ways() {
        let v1 = record(r#"{"name":"id","type":"string"}"#);
        let v2 = record(
            r#"{"name":"id","type":"string"},{"name":"nick","type":["null","string"],"default":null}"#,
        );
        assert!(Level::FullTransitive.violations(&v2, &v1, 1).is_empty());
    }

    #[test]
    fn problems_name_the_field() {
        let writer = record(r#"{"name":"id","type":"string"}"#);
        let reader = record(r#"{"name":"id","type":"string"},{"name":"email","type":"string"}"#);
        let problems = explain(&writer, &reader);
        assert_eq!(problems.len(), 1);
        assert!(
            problems[0].contains("field 'email' is read but not written"),
            "{problems:?}"
        );

        let retyped = record(r#"{"name":"id","type":"long"}"#);
        let problems = explain(&writer, &retyped);
        assert!(
            problems[0].starts_with("field 'id': written as string, read as long"),
            "{problems:?}"
        );
    }

    #[test]
    fn a_renamed_enum_symbol_is_named() {
        let e = |symbols: &str| {
            record(&format!(
                r#"{{"name":"s","type":{{"type":"enum","name":"S","symbols":[{symbols}]}}}}"#
            ))
        };
        let problems = explain(&e(r#""ACTIVE","BANNED""#), &e(r#""ACTIVE","SUSPENDED""#));
        assert!(
            problems.iter().any(|p| p.contains("symbol 'BANNED'")),
            "{problems:?}"
        );
    }

    #[test]
    fn levels_check_the_right_direction_and_versions() {
        let v1 = record(r#"{"name":"id","type":"string"}"#);
        let v2 = record(r#"{"name":"id","type":"string"},{"name":"age","type":"int"}"#);
        assert_eq!(Level::Backward.violations(&v2, &v1, 1).len(), 1);
        assert!(Level::Forward.violations(&v2, &v1, 1).is_empty());
        assert!(Level::None.violations(&v2, &v1, 1).is_empty());
        assert_eq!(Level::Backward.checked_against(3), 2..3);
        assert_eq!(Level::BackwardTransitive.checked_against(3), 0..3);
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
