//! Configuration structs shared by services built on Ferrybox.
//!
//! They are plain serde structs with defaults, layered by [`load`]: the service's own
//! defaults, then a file, then the environment. Kafka client settings pass through as strings,
//! so anything librdkafka understands can be set without a new release of Ferrybox. Secrets are
//! wrapped so they never reach a log line, a `Debug` print or a serialized copy of the settings
//! (see [`secret`]).

use std::collections::BTreeMap;
use std::time::Duration;

use secrecy::{ExposeSecret, SecretString};
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// Where the database is and how many connections to keep.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DatabaseConfig {
    /// A `postgres://` URL. May contain a password: it is kept secret.
    #[serde(serialize_with = "secret::serialize")]
    pub url: SecretString,
    /// The largest number of pooled connections.
    pub max_connections: usize,
    /// How long a task waits for a free pooled connection (or for a new one to be opened)
    /// before it fails with a clear error instead of hanging.
    #[serde(with = "duration_ms", rename = "pool_timeout_ms")]
    pub pool_timeout: Duration,
}

impl Default for DatabaseConfig {
    fn default() -> Self {
        Self {
            url: SecretString::from("postgres://postgres@127.0.0.1:5432/postgres"),
            max_connections: 10,
            pool_timeout: Duration::from_secs(10),
        }
    }
}

impl DatabaseConfig {
    /// A config for `url` with default settings otherwise.
    pub fn new(url: impl Into<String>) -> Self {
        Self {
            url: SecretString::from(url.into()),
            ..Self::default()
        }
    }

    /// Checks the settings make sense.
    pub fn validate(&self) -> Result<()> {
        let url = self.url.expose_secret();
        if !(url.starts_with("postgres://") || url.starts_with("postgresql://")) {
            return Err(Error::Config(
                "database.url must start with postgres:// or postgresql://".into(),
            ));
        }
        if self.max_connections == 0 {
            return Err(Error::Config(
                "database.max_connections must be at least 1".into(),
            ));
        }
        if self.pool_timeout.is_zero() {
            return Err(Error::Config(
                "database.pool_timeout_ms must be above zero".into(),
            ));
        }
        Ok(())
    }
}

/// The kinds of Kafka client Ferrybox makes; each gets [`KafkaConfig::settings`] plus its own
/// kind's map.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ClientKind {
    /// Producers: the relay's, the dead-letter topic's, replay's.
    Producer,
    /// Consumers: the inbox consumer's.
    Consumer,
    /// Topic administration and metadata lookups: topic creation, the start-up durability
    /// check, partition counts, the readiness check.
    Admin,
}

/// How to reach Kafka. Every key in the settings maps is passed to librdkafka unchanged:
/// `settings` to every client, `producer_settings`, `consumer_settings` and `admin_settings`
/// only to clients of that kind (see [`ClientKind`]), after `settings`, so a kind's value wins.
/// A setting only one kind of client understands (`fetch.wait.max.ms`, `linger.ms`) belongs in
/// that kind's map: librdkafka warns about it on every other kind.
///
/// Its `Debug` output and serialized form hide the values of secret settings (passwords,
/// secrets, tokens, keys) in every map.
#[derive(Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct KafkaConfig {
    /// `bootstrap.servers`.
    pub bootstrap_servers: String,
    /// Extra librdkafka settings (security, timeouts, ...), applied to every client. Keys may
    /// use `_` for `.` (`message_timeout_ms`), so they can be set from the environment.
    /// Numbers and booleans are accepted and passed on as text.
    #[serde(
        deserialize_with = "scalar_map",
        serialize_with = "secret::serialize_settings"
    )]
    pub settings: BTreeMap<String, String>,
    /// Like `settings`, for producers only (`linger.ms`, `batch.num.messages`, ...).
    #[serde(
        deserialize_with = "scalar_map",
        serialize_with = "secret::serialize_settings"
    )]
    pub producer_settings: BTreeMap<String, String>,
    /// Like `settings`, for consumers only (`fetch.wait.max.ms`, `session.timeout.ms`,
    /// `group.instance.id`, ...).
    #[serde(
        deserialize_with = "scalar_map",
        serialize_with = "secret::serialize_settings"
    )]
    pub consumer_settings: BTreeMap<String, String>,
    /// Like `settings`, for topic administration and metadata lookups only.
    #[serde(
        deserialize_with = "scalar_map",
        serialize_with = "secret::serialize_settings"
    )]
    pub admin_settings: BTreeMap<String, String>,
    /// Production mode: start-up fails when a topic's replication factor is below 3 or its
    /// `min.insync.replicas` below 2 (otherwise that is a warning).
    pub strict_durability: bool,
    /// Lets the settings weaken the producer's durability (`acks` other than `all`,
    /// `enable.idempotence=false`). Off by default; for experiments only.
    pub allow_weak_durability: bool,
}

/// Whether a librdkafka setting holds a secret (`sasl.password`, `ssl.key.password`,
/// `sasl.oauthbearer.client.secret`, `ssl.key.pem`, ...).
pub(crate) fn is_secret_setting(key: &str) -> bool {
    let key = key.to_ascii_lowercase();
    ["password", "secret", "token", "pem", "jaas"]
        .iter()
        .any(|s| key.contains(s))
}

/// A settings map as `Debug` shows it: secret values hidden.
struct Redacted<'a>(&'a BTreeMap<String, String>);

impl std::fmt::Debug for Redacted<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_map()
            .entries(self.0.iter().map(|(k, v)| {
                let shown = if is_secret_setting(k) {
                    secret::REDACTED
                } else {
                    v.as_str()
                };
                (k, shown)
            }))
            .finish()
    }
}

impl std::fmt::Debug for KafkaConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KafkaConfig")
            .field("bootstrap_servers", &self.bootstrap_servers)
            .field("settings", &Redacted(&self.settings))
            .field("producer_settings", &Redacted(&self.producer_settings))
            .field("consumer_settings", &Redacted(&self.consumer_settings))
            .field("admin_settings", &Redacted(&self.admin_settings))
            .field("strict_durability", &self.strict_durability)
            .field("allow_weak_durability", &self.allow_weak_durability)
            .finish()
    }
}

impl Default for KafkaConfig {
    fn default() -> Self {
        Self::new("127.0.0.1:9092")
    }
}

impl KafkaConfig {
    /// A config for `bootstrap_servers` with no extra settings.
    pub fn new(bootstrap_servers: impl Into<String>) -> Self {
        Self {
            bootstrap_servers: bootstrap_servers.into(),
            settings: BTreeMap::new(),
            producer_settings: BTreeMap::new(),
            consumer_settings: BTreeMap::new(),
            admin_settings: BTreeMap::new(),
            strict_durability: false,
            allow_weak_durability: false,
        }
    }

    /// The settings only clients of `kind` get.
    pub fn kind_settings(&self, kind: ClientKind) -> &BTreeMap<String, String> {
        match kind {
            ClientKind::Producer => &self.producer_settings,
            ClientKind::Consumer => &self.consumer_settings,
            ClientKind::Admin => &self.admin_settings,
        }
    }

    /// The pass-through settings a client of `kind` gets, in the order they are applied
    /// (`settings`, then the kind's own), with keys as written.
    fn pass_through(
        &self,
        kind: ClientKind,
    ) -> impl DoubleEndedIterator<Item = (&String, &String)> {
        self.settings.iter().chain(self.kind_settings(kind))
    }

    /// The value of librdkafka setting `name` (given with `.` or `_`) a client of `kind` gets
    /// from the pass-through settings, if any: its kind's map first, then `settings` (the
    /// value applied last, as [`KafkaConfig::client_config`] applies them).
    pub fn setting(&self, kind: ClientKind, name: &str) -> Option<&str> {
        let name = librdkafka_name(name);
        self.pass_through(kind)
            .rev()
            .find(|(key, _)| librdkafka_name(key) == name)
            .map(|(_, value)| value.as_str())
    }

    /// Checks the settings make sense.
    pub fn validate(&self) -> Result<()> {
        if self.bootstrap_servers.trim().is_empty() {
            return Err(Error::Config("kafka.bootstrap_servers is empty".into()));
        }
        Ok(())
    }

    /// A librdkafka config for a client of `kind`: the bootstrap servers, `settings`, then
    /// the kind's own settings.
    pub fn client_config(&self, kind: ClientKind) -> rdkafka::ClientConfig {
        self.client_config_with_defaults(kind, &[])
    }

    /// Like [`KafkaConfig::client_config`], with `defaults` applied first so pass-through
    /// settings override them.
    pub fn client_config_with_defaults(
        &self,
        kind: ClientKind,
        defaults: &[(&str, &str)],
    ) -> rdkafka::ClientConfig {
        let mut config = rdkafka::ClientConfig::new();
        config.set("bootstrap.servers", &self.bootstrap_servers);
        for (key, value) in defaults {
            config.set(*key, *value);
        }
        for (key, value) in self.pass_through(kind) {
            config.set(librdkafka_name(key), value);
        }
        config
    }
}

/// librdkafka names never contain '_': it stands for '.', which environment variables cannot
/// carry (`..._KAFKA__SETTINGS__MESSAGE_TIMEOUT_MS`).
fn librdkafka_name(key: &str) -> String {
    key.replace('_', ".")
}

/// Reads a map whose values may be strings, numbers or booleans, as text.
fn scalar_map<'de, D: serde::Deserializer<'de>>(
    d: D,
) -> Result<BTreeMap<String, String>, D::Error> {
    use serde::de::Error as _;
    let raw = BTreeMap::<String, serde_json::Value>::deserialize(d)?;
    raw.into_iter()
        .map(|(key, value)| match value {
            serde_json::Value::String(s) => Ok((key, s)),
            serde_json::Value::Number(n) => Ok((key, n.to_string())),
            serde_json::Value::Bool(b) => Ok((key, b.to_string())),
            _ => Err(D::Error::custom(format!(
                "kafka setting {key} must be a string, number or boolean"
            ))),
        })
        .collect()
}

/// A topic a service publishes to or reads from, created at start-up when missing.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(default, deny_unknown_fields)]
pub struct TopicConfig {
    /// The topic's name.
    pub name: String,
    /// Partitions to create it with; keys map to partitions by librdkafka's default hash.
    pub partitions: i32,
    /// Replication factor to create it with.
    pub replication_factor: i32,
}

impl Default for TopicConfig {
    fn default() -> Self {
        Self {
            name: String::new(),
            partitions: 3,
            replication_factor: 1,
        }
    }
}

impl TopicConfig {
    /// A topic called `name` with default settings.
    pub fn new(name: impl Into<String>) -> Self {
        Self {
            name: name.into(),
            ..Self::default()
        }
    }

    /// Checks the settings make sense.
    pub fn validate(&self) -> Result<()> {
        if self.name.is_empty() {
            return Err(Error::Config("topic name is empty".into()));
        }
        if self.partitions < 1 || self.replication_factor < 1 {
            return Err(Error::Config(format!(
                "topic {}: partitions and replication_factor must be at least 1",
                self.name
            )));
        }
        Ok(())
    }
}

/// Serde support for secrets in settings structs (`secrecy` 0.10 has no `Serialize`).
///
/// A secret serializes as `"[redacted]"` ([`REDACTED`](secret::REDACTED)). The one exception
/// is the in-memory layering in [`load`], which serializes the service's defaults into figment
/// so the file and the environment merge over them field by field; only there, and only on
/// that thread for the duration of that call, is the real value written, and the serialized
/// copy is dropped when loading ends. So settings serialized anywhere else (`check-config --print`, a log line, an
/// HTTP answer) never carry a secret.
///
/// Use with `#[serde(serialize_with = "ferrybox::config::secret::serialize")]` on a
/// `SecretString` and `serialize_with = "...::serialize_option"` on an `Option<SecretString>`.
pub mod secret {
    use std::cell::Cell;
    use std::collections::BTreeMap;

    use secrecy::{ExposeSecret, SecretString};
    use serde::Serializer;
    use serde::ser::SerializeMap;

    /// What a secret serializes as.
    pub const REDACTED: &str = "[redacted]";

    thread_local! {
        /// Set only while [`exposed`] runs on this thread.
        static EXPOSED: Cell<bool> = const { Cell::new(false) };
    }

    /// Runs `f` with secrets serialized as their real values, on this thread only. For the
    /// loader's in-memory layering (and tests that compare settings in full); never for
    /// anything that leaves the process.
    pub(crate) fn exposed<R>(f: impl FnOnce() -> R) -> R {
        struct Restore(bool);
        impl Drop for Restore {
            fn drop(&mut self) {
                EXPOSED.with(|e| e.set(self.0));
            }
        }
        let _restore = Restore(EXPOSED.with(|e| e.replace(true)));
        f()
    }

    fn is_exposed() -> bool {
        EXPOSED.with(Cell::get)
    }

    /// Writes a secret as [`REDACTED`] (its value only inside the loader's layering).
    pub fn serialize<S: Serializer>(secret: &SecretString, s: S) -> Result<S::Ok, S::Error> {
        if is_exposed() {
            s.serialize_str(secret.expose_secret())
        } else {
            s.serialize_str(REDACTED)
        }
    }

    /// Like [`serialize`], for an optional secret: unset stays unset (`null`).
    pub fn serialize_option<S: Serializer>(
        secret: &Option<SecretString>,
        s: S,
    ) -> Result<S::Ok, S::Error> {
        match secret {
            Some(secret) => s.serialize_some(&Shown(secret)),
            None => s.serialize_none(),
        }
    }

    struct Shown<'a>(&'a SecretString);

    impl serde::Serialize for Shown<'_> {
        fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
            serialize(self.0, s)
        }
    }

    /// Writes librdkafka pass-through settings, the values of secret ones (`sasl.password`,
    /// `ssl.key.pem`, ...) as [`REDACTED`] (their values only inside the loader's layering).
    pub fn serialize_settings<S: Serializer>(
        settings: &BTreeMap<String, String>,
        s: S,
    ) -> Result<S::Ok, S::Error> {
        let exposed = is_exposed();
        let mut map = s.serialize_map(Some(settings.len()))?;
        for (key, value) in settings {
            if exposed || !super::is_secret_setting(key) {
                map.serialize_entry(key, value)?;
            } else {
                map.serialize_entry(key, REDACTED)?;
            }
        }
        map.end()
    }
}

/// Serde support for durations written as milliseconds.
pub mod duration_ms {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer, Serializer};

    /// Writes a duration as whole milliseconds.
    pub fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_u64(u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
    }

    /// Reads a duration from whole milliseconds.
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        Ok(Duration::from_millis(u64::deserialize(d)?))
    }
}

/// A bounded exponential backoff: `initial`, doubled each attempt, never above `max`.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(default, deny_unknown_fields)]
pub struct Backoff {
    /// The first delay.
    #[serde(with = "duration_ms", rename = "initial_ms")]
    pub initial: Duration,
    /// The largest delay.
    #[serde(with = "duration_ms", rename = "max_ms")]
    pub max: Duration,
}

impl Default for Backoff {
    fn default() -> Self {
        Self {
            initial: Duration::from_millis(100),
            max: Duration::from_secs(10),
        }
    }
}

impl Backoff {
    /// The delay before retry number `attempt` (1 is the first retry).
    pub fn delay(&self, attempt: u32) -> Duration {
        let factor = 2u32.saturating_pow(attempt.saturating_sub(1));
        self.initial.saturating_mul(factor).min(self.max)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_and_caps() {
        let b = Backoff {
            initial: Duration::from_millis(100),
            max: Duration::from_millis(1000),
        };
        assert_eq!(b.delay(1), Duration::from_millis(100));
        assert_eq!(b.delay(2), Duration::from_millis(200));
        assert_eq!(b.delay(4), Duration::from_millis(800));
        assert_eq!(b.delay(5), Duration::from_millis(1000));
        assert_eq!(b.delay(60), Duration::from_millis(1000));
    }

    #[test]
    fn database_url_is_not_printed() {
        let c = DatabaseConfig::new("postgres://app:hunter2@db/app");
        assert!(!format!("{c:?}").contains("hunter2"));
    }

    #[test]
    fn serialized_settings_hide_secrets_outside_the_loader() {
        let db = DatabaseConfig::new("postgres://app:hunter2@db/app");
        let mut kafka = KafkaConfig::default();
        kafka
            .settings
            .insert("sasl_password".into(), "kafka-s3cret".into());
        kafka
            .settings
            .insert("security.protocol".into(), "SASL_SSL".into());
        let shown = serde_json::json!({ "database": db, "kafka": kafka });
        assert_eq!(shown["database"]["url"], secret::REDACTED);
        assert_eq!(
            shown["kafka"]["settings"]["sasl_password"],
            secret::REDACTED
        );
        assert_eq!(shown["kafka"]["settings"]["security.protocol"], "SASL_SSL");
        assert!(!shown.to_string().contains("hunter2"), "{shown}");
        assert!(!shown.to_string().contains("kafka-s3cret"), "{shown}");
        // Only the loader's layering sees the values, and only while it runs.
        let inside = secret::exposed(|| serde_json::json!({ "database": db, "kafka": kafka }));
        assert_eq!(inside["database"]["url"], "postgres://app:hunter2@db/app");
        assert_eq!(inside["kafka"]["settings"]["sasl_password"], "kafka-s3cret");
        assert_eq!(serde_json::json!(db)["url"], secret::REDACTED);
    }

    #[test]
    fn each_kafka_client_gets_the_common_settings_and_its_own_kinds_only() {
        let mut kafka = KafkaConfig::new("b:9092");
        let set = |map: &mut BTreeMap<String, String>, key: &str, value: &str| {
            map.insert(key.into(), value.into());
        };
        set(&mut kafka.settings, "security.protocol", "SSL");
        set(&mut kafka.settings, "message.timeout.ms", "1000");
        set(&mut kafka.producer_settings, "linger_ms", "10");
        set(&mut kafka.producer_settings, "message_timeout_ms", "2000");
        set(&mut kafka.consumer_settings, "fetch_wait_max_ms", "5");
        set(&mut kafka.admin_settings, "request.timeout.ms", "3000");
        let get = |kind, name: &str| kafka.client_config(kind).get(name).map(str::to_owned);
        for kind in [
            ClientKind::Producer,
            ClientKind::Consumer,
            ClientKind::Admin,
        ] {
            assert_eq!(get(kind, "security.protocol").as_deref(), Some("SSL"));
            assert_eq!(get(kind, "bootstrap.servers").as_deref(), Some("b:9092"));
        }
        use ClientKind::{Admin, Consumer, Producer};
        assert_eq!(get(Producer, "linger.ms").as_deref(), Some("10"));
        assert_eq!(get(Producer, "fetch.wait.max.ms"), None);
        assert_eq!(get(Producer, "request.timeout.ms"), None);
        assert_eq!(get(Consumer, "fetch.wait.max.ms").as_deref(), Some("5"));
        assert_eq!(get(Consumer, "linger.ms"), None);
        assert_eq!(get(Admin, "request.timeout.ms").as_deref(), Some("3000"));
        assert_eq!(get(Admin, "fetch.wait.max.ms"), None);
        assert_eq!(get(Admin, "linger.ms"), None);
        // A kind's own value wins over the common one, and the lookup agrees with the client.
        assert_eq!(get(Producer, "message.timeout.ms").as_deref(), Some("2000"));
        assert_eq!(get(Consumer, "message.timeout.ms").as_deref(), Some("1000"));
        assert_eq!(kafka.setting(Producer, "message.timeout.ms"), Some("2000"));
        assert_eq!(kafka.setting(Producer, "message_timeout_ms"), Some("2000"));
        assert_eq!(kafka.setting(Consumer, "message.timeout.ms"), Some("1000"));
        assert_eq!(kafka.setting(Consumer, "fetch.wait.max.ms"), Some("5"));
        assert_eq!(kafka.setting(Producer, "fetch.wait.max.ms"), None);
    }

    #[test]
    fn kafka_secrets_are_hidden_in_every_settings_map() {
        let mut kafka = KafkaConfig::default();
        kafka
            .settings
            .insert("sasl.password".into(), "s3cret-1".into());
        kafka
            .producer_settings
            .insert("ssl_key_password".into(), "s3cret-2".into());
        kafka
            .consumer_settings
            .insert("sasl.oauthbearer.client.secret".into(), "s3cret-3".into());
        kafka
            .admin_settings
            .insert("ssl.key.pem".into(), "s3cret-4".into());
        kafka
            .consumer_settings
            .insert("fetch.wait.max.ms".into(), "5".into());
        let debug = format!("{kafka:?}");
        let serialized = serde_json::to_string(&kafka).unwrap();
        for shown in [&debug, &serialized] {
            assert!(!shown.contains("s3cret"), "{shown}");
            assert_eq!(shown.matches(secret::REDACTED).count(), 4, "{shown}");
            assert!(shown.contains("fetch.wait.max.ms"), "{shown}");
        }
    }

    #[test]
    fn validation_rejects_nonsense() {
        assert!(DatabaseConfig::new("mysql://x").validate().is_err());
        assert!(KafkaConfig::new(" ").validate().is_err());
        assert!(TopicConfig::new("").validate().is_err());
        let mut t = TopicConfig::new("t");
        t.partitions = 0;
        assert!(t.validate().is_err());
        assert!(TopicConfig::new("t").validate().is_ok());
    }
}

/// Loads a service's settings, layered field by field: the service's own defaults
/// (`T::default()`, not each section type's `Default`), then the TOML file (when given), then
/// environment variables named `<PREFIX>SECTION__KEY` (for example
/// `USER_SERVICE_DATABASE__URL`; `<PREFIX>CONFIG` is left out: it is the services' way to name
/// the file, their `--config`). A variable or file key replaces only the field it names:
/// `AUTH_SERVICE_DATABASE__MAX_CONNECTIONS=5` keeps the service's default database URL.
///
/// Error messages name the key and where it came from but never a value, so a secret with a
/// typo or a wrong type next to it is not printed.
pub fn load<T: Serialize + serde::de::DeserializeOwned + Default>(
    file: Option<&std::path::Path>,
    env_prefix: &str,
) -> Result<T> {
    load_over(&T::default(), file, env_prefix)
}

/// Like [`load`], layering the file and the environment over `defaults` instead of
/// `T::default()`.
///
/// `defaults` is serialized into the layering with its secrets' real values (see [`secret`]);
/// that copy lives only in memory, until this call returns.
pub fn load_over<T: Serialize + serde::de::DeserializeOwned>(
    defaults: &T,
    file: Option<&std::path::Path>,
    env_prefix: &str,
) -> Result<T> {
    use figment::Figment;
    use figment::providers::{Env, Format, Serialized, Toml};
    let mut figment = secret::exposed(|| Figment::from(Serialized::defaults(defaults)));
    if let Some(path) = file {
        if !path.exists() {
            return Err(Error::Config(format!(
                "configuration file {} does not exist",
                path.display()
            )));
        }
        figment = figment.merge(Toml::file(path));
    }
    figment
        .merge(Env::prefixed(env_prefix).ignore(&["config"]).split("__"))
        .extract()
        .map_err(config_error)
}

/// figment's error, without the values it quotes (`found string "hunter2"`): any of them may
/// be a secret.
fn config_error(error: figment::Error) -> Error {
    use figment::error::{Actual, Kind};
    let what = |actual: &Actual| -> String {
        match actual {
            Actual::Bool(_) => "a boolean".into(),
            Actual::Unsigned(_) | Actual::Signed(_) => "an integer".into(),
            Actual::Float(_) => "a float".into(),
            Actual::Char(_) | Actual::Str(_) => "a string".into(),
            Actual::Bytes(_) => "bytes".into(),
            Actual::Other(_) => "another value".into(),
            other => other.to_string(),
        }
    };
    let text_hint = |actual: &Actual, expected: &str| {
        let parsed = matches!(
            actual,
            Actual::Bool(_) | Actual::Unsigned(_) | Actual::Signed(_) | Actual::Float(_)
        );
        if parsed && expected.contains("string") {
            " (a value that looks like a number or boolean is read as one: write it in double \
             quotes to keep it text)"
        } else {
            ""
        }
    };
    let messages: Vec<String> = error
        .into_iter()
        .map(|mut e| {
            let message = match &e.kind {
                Kind::InvalidType(actual, expected) => format!(
                    "invalid type: found {}, expected {expected}{}",
                    what(actual),
                    text_hint(actual, expected)
                ),
                Kind::InvalidValue(actual, expected) => {
                    format!("invalid value: found {}, expected {expected}", what(actual))
                }
                other => other.to_string(),
            };
            e.kind = Kind::Message(message);
            e.to_string()
        })
        .collect();
    Error::Config(messages.join("; "))
}

#[cfg(test)]
// figment's Jail closures return figment's (large) error type.
#[allow(clippy::result_large_err)]
mod load_tests {
    use super::*;

    #[derive(Debug, Default, Serialize, Deserialize)]
    #[serde(default, deny_unknown_fields)]
    struct Settings {
        database: DatabaseConfig,
        kafka: KafkaConfig,
        name: String,
    }

    #[test]
    fn file_then_environment_override_defaults() {
        figment::Jail::expect_with(|jail| {
            jail.create_file(
                "svc.toml",
                "name = \"from-file\"\n[kafka]\nbootstrap_servers = \"file:9092\"\n",
            )?;
            jail.set_env("SVC_KAFKA__BOOTSTRAP_SERVERS", "env:9092");
            jail.set_env("SVC_DATABASE__URL", "postgres://u:pw@h/db");
            jail.set_env("SVC_KAFKA__SETTINGS__MESSAGE_TIMEOUT_MS", "1500");
            let s: Settings =
                load(Some(std::path::Path::new("svc.toml")), "SVC_").map_err(|e| e.to_string())?;
            assert_eq!(s.name, "from-file");
            assert_eq!(s.kafka.bootstrap_servers, "env:9092");
            assert_eq!(s.database.url.expose_secret(), "postgres://u:pw@h/db");
            assert_eq!(
                s.kafka
                    .settings
                    .get("message_timeout_ms")
                    .map(String::as_str),
                Some("1500")
            );
            assert_eq!(
                s.kafka
                    .client_config(ClientKind::Producer)
                    .get("message.timeout.ms"),
                Some("1500")
            );
            assert_eq!(s.database.max_connections, 10);
            Ok(())
        });
    }

    /// Settings shaped like a service's: sections whose defaults are the service's own, not
    /// their types'.
    #[derive(Debug, Serialize, Deserialize)]
    #[serde(default, deny_unknown_fields)]
    struct Service {
        database: DatabaseConfig,
        users_topic: TopicConfig,
        inbox: crate::InboxConfig,
    }

    impl Default for Service {
        fn default() -> Self {
            Self {
                database: DatabaseConfig::new("postgres://postgres@127.0.0.1:5432/auth_service"),
                users_topic: TopicConfig::new("users"),
                inbox: crate::InboxConfig {
                    group_id: "auth-service".into(),
                    topics: vec!["users".into()],
                    ..crate::InboxConfig::default()
                },
            }
        }
    }

    #[test]
    fn a_database_variable_keeps_the_services_database_url() {
        figment::Jail::expect_with(|jail| {
            jail.set_env("SVC3_DATABASE__MAX_CONNECTIONS", "5");
            let s: Service = load(None, "SVC3_").map_err(|e| e.to_string())?;
            assert_eq!(s.database.max_connections, 5);
            assert_eq!(
                s.database.url.expose_secret(),
                "postgres://postgres@127.0.0.1:5432/auth_service"
            );
            Ok(())
        });
    }

    #[test]
    fn a_topic_variable_keeps_the_services_topic_name() {
        figment::Jail::expect_with(|jail| {
            jail.set_env("SVC4_USERS_TOPIC__PARTITIONS", "12");
            let s: Service = load(None, "SVC4_").map_err(|e| e.to_string())?;
            assert_eq!(
                s.users_topic,
                TopicConfig {
                    partitions: 12,
                    ..TopicConfig::new("users")
                }
            );
            s.users_topic.validate().map_err(|e| e.to_string())?;
            Ok(())
        });
    }

    #[test]
    fn an_inbox_variable_keeps_the_services_group_and_topics() {
        figment::Jail::expect_with(|jail| {
            jail.create_file("svc.toml", "[inbox]\nbatch_size = 50\n")?;
            jail.set_env("SVC5_INBOX__MAX_ATTEMPTS", "5");
            let s: Service =
                load(Some(std::path::Path::new("svc.toml")), "SVC5_").map_err(|e| e.to_string())?;
            assert_eq!(s.inbox.max_attempts, 5);
            assert_eq!(s.inbox.batch_size, 50, "the file's key in the same section");
            assert_eq!(s.inbox.group_id, "auth-service");
            assert_eq!(s.inbox.topics, ["users"]);
            assert_eq!(
                s.inbox.handler_timeout,
                crate::InboxConfig::default().handler_timeout
            );
            s.inbox.validate().map_err(|e| e.to_string())?;
            Ok(())
        });
    }

    #[test]
    fn kafka_client_kinds_settings_load_from_the_environment() {
        figment::Jail::expect_with(|jail| {
            jail.create_file(
                "svc.toml",
                "[kafka.settings]\nsecurity_protocol = \"SSL\"\n\
                 [kafka.producer_settings]\nlinger_ms = 10\n",
            )?;
            jail.set_env("SVC8_KAFKA__CONSUMER_SETTINGS__FETCH_WAIT_MAX_MS", "5");
            jail.set_env("SVC8_KAFKA__ADMIN_SETTINGS__REQUEST_TIMEOUT_MS", "3000");
            let s: Settings =
                load(Some(std::path::Path::new("svc.toml")), "SVC8_").map_err(|e| e.to_string())?;
            let get = |kind| s.kafka.client_config(kind);
            assert_eq!(get(ClientKind::Producer).get("linger.ms"), Some("10"));
            assert_eq!(get(ClientKind::Producer).get("fetch.wait.max.ms"), None);
            assert_eq!(
                get(ClientKind::Consumer).get("fetch.wait.max.ms"),
                Some("5")
            );
            assert_eq!(
                get(ClientKind::Admin).get("request.timeout.ms"),
                Some("3000")
            );
            for kind in [
                ClientKind::Producer,
                ClientKind::Consumer,
                ClientKind::Admin,
            ] {
                assert_eq!(get(kind).get("security.protocol"), Some("SSL"));
            }
            Ok(())
        });
    }

    #[test]
    fn the_variable_naming_the_file_is_not_a_setting() {
        figment::Jail::expect_with(|jail| {
            jail.create_file("svc.toml", "name = \"from-file\"\n")?;
            jail.set_env("SVC7_CONFIG", "svc.toml");
            let s: Settings =
                load(Some(std::path::Path::new("svc.toml")), "SVC7_").map_err(|e| e.to_string())?;
            assert_eq!(s.name, "from-file");
            Ok(())
        });
    }

    #[test]
    fn a_missing_file_or_unknown_key_is_an_error_without_secrets() {
        assert!(
            load::<Settings>(Some(std::path::Path::new("/nonexistent.toml")), "NOPE_").is_err()
        );
        figment::Jail::expect_with(|jail| {
            jail.set_env("SVC2_DATABASE__URL", "postgres://u:hunter2@h/db");
            jail.set_env("SVC2_DATABSE__URL", "typo");
            let err = load::<Settings>(None, "SVC2_").unwrap_err().to_string();
            assert!(err.contains("databse"), "{err}");
            assert!(!err.contains("hunter2"), "{err}");
            Ok(())
        });
        // Secrets in the service's defaults go through the layering too; an error next to
        // them, or about them, quotes none.
        let defaults = Secrets {
            database: DatabaseConfig::new("postgres://u:hunter2@h/db"),
            token: Some(SecretString::from("t0ken-in-defaults")),
            other: None,
        };
        figment::Jail::expect_with(|jail| {
            jail.set_env("SVC6_DATABASE__MAX_CONNECTIONS", "many");
            let err = load_over(&defaults, None, "SVC6_").unwrap_err().to_string();
            assert!(
                err.contains("MAX_CONNECTIONS") && err.contains("SVC6_"),
                "{err}"
            );
            assert!(!err.contains("many"), "{err}");
            jail.set_env("SVC6_DATABASE__MAX_CONNECTIONS", "5");
            jail.set_env("SVC6_TOKENN", "typo");
            let err = load_over(&defaults, None, "SVC6_").unwrap_err().to_string();
            assert!(err.contains("tokenn"), "{err}");
            assert!(!err.contains("hunter2") && !err.contains("t0ken"), "{err}");
            // A secret that figment reads as a number is refused without being quoted.
            jail.clear_env();
            jail.set_env("SVC6_DATABASE__MAX_CONNECTIONS", "5");
            jail.set_env("SVC6_OTHER", "12345678");
            let err = load_over(&defaults, None, "SVC6_").unwrap_err().to_string();
            assert!(err.contains("OTHER") && err.contains("quotes"), "{err}");
            assert!(!err.contains("12345678"), "{err}");
            jail.set_env("SVC6_OTHER", "\"12345678\"");
            let loaded = load_over(&defaults, None, "SVC6_").map_err(|e| e.to_string())?;
            assert_eq!(loaded.database.max_connections, 5);
            assert_eq!(
                loaded.database.url.expose_secret(),
                "postgres://u:hunter2@h/db"
            );
            assert_eq!(
                loaded.token.as_ref().map(ExposeSecret::expose_secret),
                Some("t0ken-in-defaults")
            );
            assert_eq!(
                loaded.other.as_ref().map(ExposeSecret::expose_secret),
                Some("12345678")
            );
            Ok(())
        });
    }

    #[derive(Debug, Default, Serialize, Deserialize)]
    #[serde(default, deny_unknown_fields)]
    struct Secrets {
        database: DatabaseConfig,
        #[serde(serialize_with = "secret::serialize_option")]
        token: Option<SecretString>,
        #[serde(serialize_with = "secret::serialize_option")]
        other: Option<SecretString>,
    }
}
