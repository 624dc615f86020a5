//! Loading producer schemas and consumer contracts from disk (or from embedded text).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use apache_avro::Schema;
use serde::Deserialize;

use super::{ContractError, Level};

/// One published version of a message's schema.
#[derive(Debug, Clone)]
pub struct SchemaVersion {
    /// 1, 2, ...
    pub version: u32,
    /// The parsed schema.
    pub schema: Schema,
    /// Where it was read from.
    pub path: PathBuf,
}

/// Every version of one message type, oldest first.
#[derive(Debug, Clone)]
pub struct MessageHistory {
    /// The record's full name, also the message type.
    pub message_type: String,
    /// Versions 1..=N, in order.
    pub versions: Vec<SchemaVersion>,
}

/// A topic's producer, its compatibility level and its messages.
#[derive(Debug, Clone)]
pub struct TopicSchemas {
    /// The topic.
    pub topic: String,
    /// The producing service.
    pub producer: String,
    /// The compatibility level every message on the topic evolves under.
    pub compatibility: Level,
    /// The messages, by type.
    pub messages: Vec<MessageHistory>,
}

/// Everything under `schemas/`.
#[derive(Debug, Clone, Default)]
pub struct ProducerCatalog {
    /// One entry per topic folder.
    pub topics: Vec<TopicSchemas>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ProducerFile {
    producer: String,
    #[serde(default = "default_level")]
    compatibility: String,
}

fn default_level() -> String {
    "BACKWARD".into()
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ContractFile {
    consumer: String,
    topic: String,
    messages: BTreeMap<String, String>,
}

fn invalid(path: &Path, reason: impl Into<String>) -> ContractError {
    ContractError::Invalid {
        path: path.display().to_string(),
        reason: reason.into(),
    }
}

fn read(path: &Path) -> Result<String, ContractError> {
    std::fs::read_to_string(path).map_err(|source| ContractError::Io {
        path: path.display().to_string(),
        source,
    })
}

fn sorted_entries(dir: &Path) -> Result<Vec<PathBuf>, ContractError> {
    let entries = std::fs::read_dir(dir).map_err(|source| ContractError::Io {
        path: dir.display().to_string(),
        source,
    })?;
    let mut paths: Vec<PathBuf> = entries.filter_map(|e| e.ok().map(|e| e.path())).collect();
    paths.sort();
    Ok(paths)
}

fn parse_schema(path: &Path, text: &str) -> Result<Schema, ContractError> {
    Schema::parse_str(text).map_err(|e| invalid(path, format!("not a valid Avro schema: {e}")))
}

fn full_name(schema: &Schema) -> Option<String> {
    match schema {
        Schema::Record(r) => Some(r.name.fullname(None)),
        _ => None,
    }
}

impl ProducerCatalog {
    /// Reads every `<topic>/producer.toml` and `<topic>/<type>/v<N>.avsc` under `root`.
    pub fn load(root: &Path) -> Result<Self, ContractError> {
        let mut topics = Vec::new();
        for topic_dir in sorted_entries(root)?.into_iter().filter(|p| p.is_dir()) {
            let producer_path = topic_dir.join("producer.toml");
            let producer: ProducerFile = toml::from_str(&read(&producer_path)?)
                .map_err(|e| invalid(&producer_path, e.to_string()))?;
            let compatibility = producer
                .compatibility
                .parse::<Level>()
                .map_err(|e| invalid(&producer_path, e))?;
            let mut messages = Vec::new();
            for type_dir in sorted_entries(&topic_dir)?
                .into_iter()
                .filter(|p| p.is_dir())
            {
                messages.push(load_history(&type_dir)?);
            }
            let topic = topic_dir
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default();
            topics.push(TopicSchemas {
                topic,
                producer: producer.producer,
                compatibility,
                messages,
            });
        }
        Ok(Self { topics })
    }

    /// The history of `message_type` on `topic`.
    pub fn find(
        &self,
        topic: &str,
        message_type: &str,
    ) -> Option<(&TopicSchemas, &MessageHistory)> {
        let t = self.topics.iter().find(|t| t.topic == topic)?;
        Some((
            t,
            t.messages.iter().find(|m| m.message_type == message_type)?,
        ))
    }
}

fn load_history(type_dir: &Path) -> Result<MessageHistory, ContractError> {
    let message_type = type_dir
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let mut versions = Vec::new();
    for path in sorted_entries(type_dir)? {
        let name = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let Some(number) = name.strip_prefix('v').and_then(|n| n.strip_suffix(".avsc")) else {
            return Err(invalid(&path, "schema files are named v<N>.avsc"));
        };
        let version: u32 = number
            .parse()
            .map_err(|_| invalid(&path, "schema files are named v<N>.avsc"))?;
        let schema = parse_schema(&path, &read(&path)?)?;
        if full_name(&schema).as_deref() != Some(message_type.as_str()) {
            return Err(invalid(
                &path,
                format!("the record's full name must be the folder's name, {message_type}"),
            ));
        }
        versions.push(SchemaVersion {
            version,
            schema,
            path,
        });
    }
    versions.sort_by_key(|v| v.version);
    for (i, v) in versions.iter().enumerate() {
        if usize::try_from(v.version).ok() != Some(i + 1) {
            return Err(invalid(
                type_dir,
                format!(
                    "versions must run 1, 2, 3, ... without gaps; found v{}",
                    v.version
                ),
            ));
        }
    }
    if versions.is_empty() {
        return Err(invalid(type_dir, "no v<N>.avsc files"));
    }
    Ok(MessageHistory {
        message_type,
        versions,
    })
}

/// A contract and its reader schemas as [`crate::contract!`] embeds them at compile time.
#[derive(Debug, Clone, Copy)]
pub struct EmbeddedContract {
    /// The contract file, relative to the crate that embedded it.
    pub path: &'static str,
    /// Its text.
    pub text: &'static str,
    /// Each reader schema file it names, with its text.
    pub files: &'static [(&'static str, &'static str)],
}

impl EmbeddedContract {
    /// The contract, parsed (its schemas checked to be records named after their types).
    pub fn contract(&self) -> Result<ConsumerContract, ContractError> {
        ConsumerContract::parse(Path::new(self.path), self.text, |name| {
            self.files
                .iter()
                .find(|(file, _)| *file == name)
                .map(|(_, text)| (*text).to_owned())
        })
    }

    /// Its reader schemas, to decode with.
    pub fn reader_schemas(&self) -> Result<super::ReaderSchemas, ContractError> {
        self.contract()
            .map(|c| super::ReaderSchemas::from_contract(&c))
    }
}

/// What one consumer reads from one topic: a reader schema per message type.
#[derive(Debug, Clone)]
pub struct ConsumerContract {
    /// The consuming service.
    pub consumer: String,
    /// The topic it reads.
    pub topic: String,
    /// Reader schema per message type.
    pub readers: BTreeMap<String, Schema>,
    /// Where the contract was read from.
    pub path: PathBuf,
}

impl ConsumerContract {
    /// Reads a contract file and the reader schemas it names (relative to its folder).
    pub fn load(path: &Path) -> Result<Self, ContractError> {
        let dir = path.parent().unwrap_or(Path::new("."));
        Self::parse(path, &read(path)?, |file| read(&dir.join(file)).ok())
    }

    /// Reads every `*.toml` contract in `dir`.
    pub fn load_dir(dir: &Path) -> Result<Vec<Self>, ContractError> {
        sorted_entries(dir)?
            .into_iter()
            .filter(|p| p.extension().is_some_and(|e| e == "toml"))
            .map(|p| Self::load(&p))
            .collect()
    }

    /// Parses a contract from its text; `file` returns the text of a reader schema file it
    /// names. Services use this with `include_str!` so they run with the files the check reads.
    pub fn parse(
        path: &Path,
        text: &str,
        file: impl Fn(&str) -> Option<String>,
    ) -> Result<Self, ContractError> {
        let contract: ContractFile =
            toml::from_str(text).map_err(|e| invalid(path, e.to_string()))?;
        let mut readers = BTreeMap::new();
        for (message_type, schema_file) in contract.messages {
            let schema_text = file(&schema_file)
                .ok_or_else(|| invalid(path, format!("reader schema {schema_file} not found")))?;
            let schema = parse_schema(&path.with_file_name(&schema_file), &schema_text)?;
            if full_name(&schema).as_deref() != Some(message_type.as_str()) {
                return Err(invalid(
                    path,
                    format!("{schema_file} must be a record named {message_type}"),
                ));
            }
            readers.insert(message_type, schema);
        }
        Ok(Self {
            consumer: contract.consumer,
            topic: contract.topic,
            readers,
            path: path.to_owned(),
        })
    }
}
