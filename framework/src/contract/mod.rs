//! Consumer-driven contracts: the schemas a producer has published, the reader schemas each
//! consumer declares, and the check that an incompatible change breaks the build.
//!
//! On disk:
//!
//! ```text
//! schemas/<topic>/producer.toml               producer = "user-service", compatibility = "BACKWARD_TRANSITIVE"
//! schemas/<topic>/<record full name>/v<N>.avsc every version the producer has published
//! <consumer>/contracts/<name>.toml            consumer = "...", topic = "...", [messages] "<type>" = "<file>.avsc"
//! <consumer>/contracts/<file>.avsc            the reader schema: only the fields the consumer needs
//! ```
//!
//! [`check`] verifies that each producer version is compatible with the earlier ones under the
//! topic's level, and that each consumer's reader schema can read every version the producer
//! has published. At run time a consumer decodes with [`ReaderSchemas`], so a producer adding
//! an optional field does not affect it.

mod asyncapi;
mod check;
mod compat;
mod load;
mod reader;
mod types;

pub use asyncapi::{asyncapi, asyncapi_text};
pub use check::{Finding, check};
pub use compat::{Level, can_read, explain};
pub use load::{
    ConsumerContract, EmbeddedContract, MessageHistory, ProducerCatalog, SchemaVersion,
    TopicSchemas,
};
pub use reader::ReaderSchemas;
pub use types::{check_event, check_reads};

/// Why contracts or schemas could not be loaded.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ContractError {
    /// A file could not be read.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: String,
        /// The error.
        source: std::io::Error,
    },
    /// A file's content is invalid.
    #[error("{path}: {reason}")]
    Invalid {
        /// The file.
        path: String,
        /// What is wrong.
        reason: String,
    },
}
