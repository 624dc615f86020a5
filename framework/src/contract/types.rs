//! Checks that the Rust types of a service match the schemas they are written or read with,
//! for a unit test of each service (a mismatch is found by `cargo test`, not as dead letters
//! in production):
//!
//! - a producer's [`Event`] type: [`check_event`] writes a sample with the type's schema and
//!   reads it back;
//! - a consumer's body type: [`check_reads`] deserializes the type from values of every shape
//!   its contract's reader schema allows (each optional field absent, then present).

use apache_avro::Schema;
use apache_avro::types::Value;
use serde::de::DeserializeOwned;

use super::ConsumerContract;
use crate::message::Event;

/// Checks that `E`'s schema is a record named `E::MESSAGE_TYPE` and that `sample` is written
/// with it and read back unchanged. Give a sample with every optional field set (and call it
/// again with them unset) to cover both branches.
pub fn check_event<E>(sample: &E) -> Result<(), String>
where
    E: Event + PartialEq + std::fmt::Debug,
{
    let schema = Schema::parse_str(E::SCHEMA)
        .map_err(|e| format!("{}: its schema does not parse: {e}", E::MESSAGE_TYPE))?;
    match &schema {
        Schema::Record(r) if r.name.fullname(None) == E::MESSAGE_TYPE => {}
        Schema::Record(r) => {
            return Err(format!(
                "{}: its schema is the record {}, not {}",
                E::MESSAGE_TYPE,
                r.name.fullname(None),
                E::MESSAGE_TYPE
            ));
        }
        _ => return Err(format!("{}: its schema is not a record", E::MESSAGE_TYPE)),
    }
    let value = apache_avro::to_value(sample)
        .map_err(|e| format!("{}: the sample does not serialize: {e}", E::MESSAGE_TYPE))?
        .resolve(&schema)
        .map_err(|e| format!("{}: the type does not fit its schema: {e}", E::MESSAGE_TYPE))?;
    let writer = apache_avro::writer::datum::GenericDatumWriter::builder(&schema)
        .build()
        .map_err(|e| e.to_string())?;
    let bytes = writer
        .write_value_to_vec(value)
        .map_err(|e| format!("{}: not written: {e}", E::MESSAGE_TYPE))?;
    let reader = apache_avro::reader::datum::GenericDatumReader::builder(&schema)
        .build()
        .map_err(|e| e.to_string())?;
    let back = reader
        .read_value(&mut bytes.as_slice())
        .map_err(|e| format!("{}: not read back: {e}", E::MESSAGE_TYPE))?;
    let read: E = apache_avro::from_value(&back).map_err(|e| {
        format!(
            "{}: read back, it does not fit the type: {e}",
            E::MESSAGE_TYPE
        )
    })?;
    if &read == sample {
        Ok(())
    } else {
        Err(format!(
            "{}: written and read back as {read:?}, not {sample:?}",
            E::MESSAGE_TYPE
        ))
    }
}

/// Checks that `T` deserializes from every shape of value `contract`'s reader schema for
/// `message_type` allows: what the consumer's handler gets from
/// [`crate::ReceivedMessage::body`]. Two values are tried: each union (an optional field) as
/// its first branch, then as its first non-null one; strings empty, numbers zero, enums their
/// first symbol.
pub fn check_reads<T: DeserializeOwned>(
    contract: &ConsumerContract,
    message_type: &str,
) -> Result<(), String> {
    let schema = contract.readers.get(message_type).ok_or_else(|| {
        format!(
            "{}'s contract has no reader schema for {message_type}",
            contract.consumer
        )
    })?;
    for optional_set in [false, true] {
        let value = sample(schema, optional_set, &contract.readers_by_name())?;
        apache_avro::from_value::<T>(&value).map_err(|e| {
            format!(
                "{message_type} in {}'s contract does not deserialize into {} (optional fields {}): {e}",
                contract.consumer,
                std::any::type_name::<T>(),
                if optional_set { "set" } else { "absent" }
            )
        })?;
    }
    Ok(())
}

impl ConsumerContract {
    /// The named schemas its reader schemas define, for resolving references in [`sample`].
    fn readers_by_name(&self) -> std::collections::HashMap<String, Schema> {
        let mut named = std::collections::HashMap::new();
        for schema in self.readers.values() {
            collect_named(schema, &mut named);
        }
        named
    }
}

fn collect_named(schema: &Schema, named: &mut std::collections::HashMap<String, Schema>) {
    match schema {
        Schema::Record(r) => {
            named.insert(r.name.fullname(None), schema.clone());
            for field in &r.fields {
                collect_named(&field.schema, named);
            }
        }
        Schema::Enum(e) => {
            named.insert(e.name.fullname(None), schema.clone());
        }
        Schema::Fixed(f) => {
            named.insert(f.name.fullname(None), schema.clone());
        }
        Schema::Array(a) => collect_named(&a.items, named),
        Schema::Map(m) => collect_named(&m.types, named),
        Schema::Union(u) => {
            for variant in u.variants() {
                collect_named(variant, named);
            }
        }
        _ => {}
    }
}

/// A value of `schema`: unions as their first branch, or with `optional_set` their first
/// non-null one.
fn sample(
    schema: &Schema,
    optional_set: bool,
    named: &std::collections::HashMap<String, Schema>,
) -> Result<Value, String> {
    Ok(match schema {
        Schema::Null => Value::Null,
        Schema::Boolean => Value::Boolean(false),
        Schema::Int | Schema::Date | Schema::TimeMillis => Value::Int(0),
        Schema::Long
        | Schema::TimeMicros
        | Schema::TimestampMillis
        | Schema::TimestampMicros
        | Schema::LocalTimestampMillis
        | Schema::LocalTimestampMicros => Value::Long(0),
        Schema::Float => Value::Float(0.0),
        Schema::Double => Value::Double(0.0),
        Schema::Bytes => Value::Bytes(Vec::new()),
        Schema::String | Schema::Uuid(_) => Value::String(String::new()),
        Schema::Fixed(f) => Value::Fixed(f.size, vec![0; f.size]),
        Schema::Enum(e) => Value::Enum(0, e.symbols.first().cloned().unwrap_or_default()),
        Schema::Array(_) => Value::Array(Vec::new()),
        Schema::Map(_) => Value::Map(std::collections::HashMap::new()),
        Schema::Union(u) => {
            let variants = u.variants();
            let index = if optional_set {
                variants
                    .iter()
                    .position(|v| *v != Schema::Null)
                    .unwrap_or(0)
            } else {
                0
            };
            let variant = variants
                .get(index)
                .ok_or_else(|| "an empty union".to_owned())?;
            Value::Union(
                u32::try_from(index).unwrap_or(0),
                Box::new(sample(variant, optional_set, named)?),
            )
        }
        Schema::Record(r) => Value::Record(
            r.fields
                .iter()
                .map(|f| Ok((f.name.clone(), sample(&f.schema, optional_set, named)?)))
                .collect::<Result<_, String>>()?,
        ),
        Schema::Ref { name } => {
            let target = named
                .get(&name.fullname(None))
                .ok_or_else(|| format!("the schema names {}, which it does not define", name))?;
            sample(target, optional_set, named)?
        }
        other => return Err(format!("no sample for the schema {other:?}")),
    })
}

#[cfg(test)]
mod tests {
    use serde::Deserialize;

    use super::*;

    const READER: &str = r#"{"type":"record","name":"User","namespace":"x","fields":[
        {"name":"id","type":"string"},{"name":"version","type":"long"},
        {"name":"nick","type":["null","string"],"default":null}]}"#;

    fn contract() -> ConsumerContract {
        ConsumerContract::parse(
            std::path::Path::new("c.toml"),
            "consumer = \"c\"\ntopic = \"t\"\n[messages]\n\"x.User\" = \"User.avsc\"\n",
            |_| Some(READER.to_owned()),
        )
        .unwrap()
    }

    #[test]
    fn a_type_that_reads_the_schema_passes_and_one_that_does_not_is_named() {
        #[derive(Deserialize)]
        #[allow(dead_code)]
        struct Fits {
            id: String,
            version: i64,
            nick: Option<String>,
        }
        #[derive(Deserialize)]
        #[allow(dead_code)]
        struct NeedsMore {
            id: String,
            email: String,
        }
        #[derive(Deserialize)]
        #[allow(dead_code)]
        struct WrongType {
            id: String,
            version: String,
        }
        #[derive(Deserialize)]
        #[allow(dead_code)]
        struct NickRequired {
            id: String,
            nick: String,
        }
        let c = contract();
        check_reads::<Fits>(&c, "x.User").unwrap();
        for error in [
            check_reads::<NeedsMore>(&c, "x.User").unwrap_err(),
            check_reads::<WrongType>(&c, "x.User").unwrap_err(),
            check_reads::<NickRequired>(&c, "x.User").unwrap_err(),
        ] {
            assert!(error.contains("x.User in c's contract"), "{error}");
        }
        assert!(check_reads::<Fits>(&c, "x.Other").is_err());
    }

    #[derive(Debug, PartialEq, serde::Serialize, Deserialize)]
    struct Opened {
        id: String,
        version: i64,
    }
    impl Event for Opened {
        const MESSAGE_TYPE: &'static str = "x.Opened";
        const SCHEMA: &'static str = r#"{"type":"record","name":"Opened","namespace":"x","fields":[
            {"name":"id","type":"string"},{"name":"version","type":"long"}]}"#;
        fn key(&self) -> String {
            self.id.clone()
        }
        fn entity_version(&self) -> i64 {
            self.version
        }
    }

    #[derive(Debug, PartialEq, serde::Serialize, Deserialize)]
    struct Misnamed {
        id: String,
    }
    impl Event for Misnamed {
        const MESSAGE_TYPE: &'static str = "x.Misnamed";
        const SCHEMA: &'static str = r#"{"type":"record","name":"Opened","namespace":"x","fields":[
            {"name":"id","type":"string"},{"name":"version","type":"long"}]}"#;
        fn key(&self) -> String {
            self.id.clone()
        }
        fn entity_version(&self) -> i64 {
            0
        }
    }

    #[test]
    fn an_event_is_checked_against_its_schema_and_its_name() {
        check_event(&Opened {
            id: "a".into(),
            version: 1,
        })
        .unwrap();
        let error = check_event(&Misnamed { id: "a".into() }).unwrap_err();
        assert!(error.contains("not x.Misnamed"), "{error}");
    }
}
