//! Decoding the `pgoutput` messages the log relay needs: `Relation` (which columns a table's
//! rows carry, in which order) and `Insert` (one new `ferrybox_messages` row), with column
//! values in binary format (`binary 'true'`, PostgreSQL 14 and later). Begin, Commit and the
//! keepalives are decoded by the replication crate itself.

use std::collections::HashMap;

use crate::error::{Error, Result};

use crate::outbox::record::{Origin, OutboxRecord};

/// What one `pgoutput` change message meant to the relay.
#[derive(Debug)]
pub(crate) enum Change {
    /// A row of one of the outbox tables.
    Message(Origin, Box<OutboxRecord>),
    /// Anything else the publication can carry (a relation or type description, an origin,
    /// a truncate): nothing to publish.
    Other,
}

/// The columns of each relation seen on the stream so far (the server describes a table
/// before its first row, and again after its shape changed).
#[derive(Debug, Default)]
pub(crate) struct Decoder {
    relations: HashMap<u32, Relation>,
}

#[derive(Debug)]
struct Relation {
    name: String,
    table: Option<Origin>,
    /// For each of its columns, in order, which of [`FIELDS`] it is (`None`: a column the
    /// relay does not send), found once when the relation is described rather than per row.
    field_of: Vec<Option<usize>>,
    /// A field none of its columns is (an outbox table of an unexpected shape): its rows
    /// are an error, reported when one arrives.
    missing: Option<&'static str>,
}

/// The columns of an outbox row the relay sends, in the order [`row`] reads them.
const FIELDS: [&str; 9] = [
    "id",
    "message_id",
    "topic",
    "message_key",
    "message_type",
    "entity_version",
    "headers",
    "payload",
    "occurred_at",
];

impl Relation {
    fn new(name: String, table: Option<Origin>, columns: &[&str]) -> Self {
        let field_of: Vec<Option<usize>> = columns
            .iter()
            .map(|column| FIELDS.iter().position(|field| field == column))
            .collect();
        let missing = FIELDS
            .iter()
            .enumerate()
            .find(|(i, _)| !field_of.contains(&Some(*i)))
            .map(|(_, field)| *field);
        Self {
            name,
            table,
            field_of,
            missing,
        }
    }
}

impl Decoder {
    /// Decodes one change message (the payload of an `XLogData` that is not Begin, Commit or
    /// a logical decoding message).
    pub(crate) fn decode(&mut self, data: &[u8]) -> Result<Change> {
        let mut p = Reader(data);
        match p.u8()? {
            b'R' => {
                let oid = p.u32()?;
                let namespace = p.cstr()?;
                let name = p.cstr()?;
                let _replica_identity = p.u8()?;
                let count = p.u16()?;
                let mut columns = Vec::with_capacity(usize::from(count));
                for _ in 0..count {
                    let _flags = p.u8()?;
                    columns.push(p.cstr()?);
                    let _type_oid = p.u32()?;
                    let _modifier = p.u32()?;
                }
                let table = match name {
                    "ferrybox_messages" => Some(Origin::Messages),
                    "ferrybox_outbox" => Some(Origin::Outbox),
                    _ => None,
                };
                let relation = Relation::new(format!("{namespace}.{name}"), table, &columns);
                self.relations.insert(oid, relation);
                Ok(Change::Other)
            }
            b'I' => {
                let oid = p.u32()?;
                if p.u8()? != b'N' {
                    return Err(protocol("an Insert without a new tuple"));
                }
                let relation = self.relations.get(&oid).ok_or_else(|| {
                    protocol(&format!("an Insert into relation {oid}, never described"))
                })?;
                match relation.table {
                    Some(table) => Ok(Change::Message(
                        table,
                        Box::new(row(relation, &p.tuple(relation)?)?),
                    )),
                    // A table someone added to the publication: not an outbox.
                    None => Ok(Change::Other),
                }
            }
            // Updates, deletes and truncates are not published (`publish = 'insert'`); types
            // and origins describe, they do not change.
            b'Y' | b'O' | b'T' | b'U' | b'D' => Ok(Change::Other),
            tag => Err(protocol(&format!(
                "an unknown message tag {:?}",
                char::from(tag)
            ))),
        }
    }
}

fn protocol(what: &str) -> Error {
    Error::Replication(format!("the replication stream sent {what}"))
}

/// A column value of a tuple: `None` for SQL NULL (or an unchanged TOASTed value, which an
/// insert never has).
type Value<'a> = Option<&'a [u8]>;

/// The values of one row's [`FIELDS`], in that order.
type Fields<'a> = [Value<'a>; FIELDS.len()];

fn row(relation: &Relation, values: &Fields<'_>) -> Result<OutboxRecord> {
    if let Some(field) = relation.missing {
        return Err(protocol(&format!(
            "a row of {} without {field}",
            relation.name
        )));
    }
    let [
        id,
        message_id,
        topic,
        message_key,
        message_type,
        entity_version,
        headers,
        payload,
        occurred_at,
    ] = std::array::from_fn(|i| {
        values[i].ok_or_else(|| {
            protocol(&format!(
                "a row of {} with a null {}",
                relation.name, FIELDS[i]
            ))
        })
    });
    let int8 = |value: Result<&[u8]>, name: &str| -> Result<i64> {
        let bytes: [u8; 8] = value?
            .try_into()
            .map_err(|_| protocol(&format!("a {name} that is not 8 bytes")))?;
        Ok(i64::from_be_bytes(bytes))
    };
    let text = |value: Result<&[u8]>, name: &str| -> Result<String> {
        String::from_utf8(value?.to_vec())
            .map_err(|_| protocol(&format!("a {name} that is not UTF-8")))
    };
    let uuid = uuid::Uuid::from_slice(message_id?)
        .map_err(|_| protocol("a message_id that is not 16 bytes"))?;
    let headers =
        crate::outbox::record::StoredHeaders::from_jsonb(headers?).map_err(|e| protocol(&e))?;
    // timestamptz's binary form: microseconds since 2000-01-01 00:00 UTC.
    let micros = int8(occurred_at, "occurred_at")?;
    let occurred_at = postgres_epoch()
        .checked_add_signed(chrono::Duration::microseconds(micros))
        .ok_or_else(|| protocol("an occurred_at out of range"))?;
    Ok(OutboxRecord {
        id: int8(id, "id")?,
        message_id: uuid,
        topic: text(topic, "topic")?,
        message_key: text(message_key, "message_key")?,
        message_type: text(message_type, "message_type")?,
        entity_version: int8(entity_version, "entity_version")?,
        headers,
        payload: payload?.to_vec(),
        occurred_at,
    })
}

fn postgres_epoch() -> chrono::DateTime<chrono::Utc> {
    chrono::DateTime::from_timestamp(946_684_800, 0).expect("2000-01-01 is a valid time")
}

struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8]> {
        if self.0.len() < n {
            return Err(protocol("a truncated message"));
        }
        let (head, tail) = self.0.split_at(n);
        self.0 = tail;
        Ok(head)
    }

    fn u8(&mut self) -> Result<u8> {
        Ok(self.take(1)?[0])
    }

    fn u16(&mut self) -> Result<u16> {
        Ok(u16::from_be_bytes(
            self.take(2)?.try_into().expect("2 bytes"),
        ))
    }

    fn u32(&mut self) -> Result<u32> {
        Ok(u32::from_be_bytes(
            self.take(4)?.try_into().expect("4 bytes"),
        ))
    }

    fn cstr(&mut self) -> Result<&'a str> {
        let end = self
            .0
            .iter()
            .position(|&b| b == 0)
            .ok_or_else(|| protocol("a name without its terminator"))?;
        let name = std::str::from_utf8(&self.0[..end])
            .map_err(|_| protocol("a name that is not UTF-8"))?;
        self.0 = &self.0[end + 1..];
        Ok(name)
    }

    /// TupleData: a count, then per column `n` (null), `u` (unchanged TOAST), or `t`/`b`
    /// (text or binary) with a length and the bytes. Keeps the values of `relation`'s
    /// [`FIELDS`] and skips the rest.
    fn tuple(&mut self, relation: &Relation) -> Result<Fields<'a>> {
        let count = usize::from(self.u16()?);
        if count != relation.field_of.len() {
            return Err(protocol(&format!(
                "a row of {} with {count} values for {} columns",
                relation.name,
                relation.field_of.len()
            )));
        }
        let mut fields: Fields<'a> = [None; FIELDS.len()];
        for field in &relation.field_of {
            let value = match self.u8()? {
                b'n' | b'u' => None,
                b't' | b'b' => {
                    let len = usize::try_from(self.u32()?).unwrap_or(usize::MAX);
                    Some(self.take(len)?)
                }
                kind => {
                    return Err(protocol(&format!(
                        "a column of unknown kind {:?}",
                        char::from(kind)
                    )));
                }
            };
            if let Some(field) = field {
                fields[*field] = value;
            }
        }
        Ok(fields)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `ferrybox_messages`'s columns: what the relay sends, then one it does not.
    fn columns() -> Vec<&'static str> {
        [&FIELDS[..], &["created_at"]].concat()
    }

    fn relation(oid: u32, columns: &[&str]) -> Vec<u8> {
        let mut m = vec![b'R'];
        m.extend(oid.to_be_bytes());
        m.extend(b"public\0ferrybox_messages\0");
        m.push(b'd');
        m.extend(u16::try_from(columns.len()).unwrap().to_be_bytes());
        for c in columns {
            m.push(0);
            m.extend(c.as_bytes());
            m.push(0);
            m.extend(25u32.to_be_bytes());
            m.extend(u32::MAX.to_be_bytes());
        }
        m
    }

    fn insert(oid: u32, values: &[Option<Vec<u8>>]) -> Vec<u8> {
        let mut m = vec![b'I'];
        m.extend(oid.to_be_bytes());
        m.push(b'N');
        m.extend(u16::try_from(values.len()).unwrap().to_be_bytes());
        for v in values {
            match v {
                None => m.push(b'n'),
                Some(bytes) => {
                    m.push(b'b');
                    m.extend(u32::try_from(bytes.len()).unwrap().to_be_bytes());
                    m.extend(bytes);
                }
            }
        }
        m
    }

    fn values(id: i64) -> Vec<Option<Vec<u8>>> {
        let mut headers = vec![1u8];
        headers.extend(br#"{"ce_id": "x"}"#);
        vec![
            Some(id.to_be_bytes().to_vec()),
            Some(uuid::Uuid::from_u128(7).as_bytes().to_vec()),
            Some(b"users".to_vec()),
            Some(b"key-1".to_vec()),
            Some(b"UserRegistered".to_vec()),
            Some(3i64.to_be_bytes().to_vec()),
            Some(headers),
            Some(vec![0, 1, 2, 255]),
            Some(1_000_000i64.to_be_bytes().to_vec()),
            Some(0i64.to_be_bytes().to_vec()),
        ]
    }

    #[test]
    fn an_insert_is_decoded_by_the_columns_its_relation_named() {
        let mut decoder = Decoder::default();
        assert!(matches!(
            decoder.decode(&relation(42, &columns())).unwrap(),
            Change::Other
        ));
        let Change::Message(Origin::Messages, m) = decoder.decode(&insert(42, &values(9))).unwrap()
        else {
            panic!("not a message");
        };
        assert_eq!(m.id, 9);
        assert_eq!(m.message_id, uuid::Uuid::from_u128(7));
        assert_eq!(
            (m.topic.as_str(), m.message_key.as_str()),
            ("users", "key-1")
        );
        assert_eq!(m.message_type, "UserRegistered");
        assert_eq!(m.entity_version, 3);
        assert_eq!(m.headers.value(), serde_json::json!({"ce_id": "x"}));
        assert_eq!(m.payload, vec![0, 1, 2, 255]);
        assert_eq!(m.occurred_at.to_rfc3339(), "2000-01-01T00:00:01+00:00");
    }

    #[test]
    fn columns_are_found_by_name_whatever_their_order() {
        let mut reordered = columns();
        reordered.swap(2, 3);
        let mut vals = values(1);
        vals.swap(2, 3);
        let mut decoder = Decoder::default();
        decoder.decode(&relation(5, &reordered)).unwrap();
        let Change::Message(_, m) = decoder.decode(&insert(5, &vals)).unwrap() else {
            panic!("not a message");
        };
        assert_eq!(
            (m.topic.as_str(), m.message_key.as_str()),
            ("users", "key-1")
        );
    }

    #[test]
    fn damaged_or_unexpected_messages_are_typed_errors() {
        let mut decoder = Decoder::default();
        // A row of a relation never described.
        assert!(matches!(
            decoder.decode(&insert(1, &values(1))),
            Err(Error::Replication(_))
        ));
        decoder.decode(&relation(1, &columns())).unwrap();
        // Truncated.
        let mut cut = insert(1, &values(1));
        cut.truncate(cut.len() - 3);
        assert!(matches!(decoder.decode(&cut), Err(Error::Replication(_))));
        // A null where a value is required.
        let mut nulls = values(1);
        nulls[2] = None;
        assert!(matches!(
            decoder.decode(&insert(1, &nulls)),
            Err(Error::Replication(_))
        ));
        // An outbox table without a column the relay sends: its rows are errors.
        let mut without_topic = columns();
        without_topic.remove(2);
        decoder.decode(&relation(2, &without_topic)).unwrap();
        let mut fewer = values(1);
        fewer.remove(2);
        let Err(Error::Replication(why)) = decoder.decode(&insert(2, &fewer)) else {
            panic!("a row without its topic decoded");
        };
        assert!(why.contains("without topic"), "{why}");
        // A row with more values than its relation has columns.
        let mut more = values(1);
        more.push(None);
        assert!(matches!(
            decoder.decode(&insert(1, &more)),
            Err(Error::Replication(_))
        ));
        // Deletes and truncates are nothing to publish.
        assert!(matches!(
            decoder.decode(b"D\0\0\0\x01").unwrap(),
            Change::Other
        ));
        assert!(decoder.decode(b"?").is_err());
    }
}
