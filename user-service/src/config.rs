//! user-service settings: defaults, then a TOML file, then `USER_SERVICE_*` variables.

use std::net::SocketAddr;

use ferrybox::alert::AlertConfig;
use ferrybox::feed::FeedServerConfig;
use ferrybox::vacuum::VacuumGuardConfig;
use ferrybox::{DatabaseConfig, KafkaConfig, RelayConfig, TopicConfig};
use serde::{Deserialize, Serialize};

/// Everything user-service can be configured with. Serializing it (`check-config --print`)
/// writes secrets as `"[redacted]"`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Settings {
    /// HTTP listen address.
    pub listen: SocketAddr,
    /// The service's own database (users and the outbox).
    pub database: DatabaseConfig,
    /// The Kafka cluster.
    pub kafka: KafkaConfig,
    /// A Confluent-API schema registry.
    pub schema_registry_url: String,
    /// The topic user events go to.
    pub users_topic: TopicConfig,
    /// How the relay batches and waits.
    pub relay: RelayConfig,
    /// Serve `GET /events`, the pulled feed of the service's events (what auth-service reads
    /// with `--transport feed`). Off: there is no `/events` (it answers `404`), and where the
    /// relay reads the write-ahead log each event is written to its append-only table, which
    /// costs every business transaction less than the feed's table does.
    pub serve_feed: bool,
    /// Limits of the `events` feed endpoint.
    pub feed: FeedServerConfig,
    /// When what holds vacuum back (long or prepared transactions, idle slots) is alerted.
    pub vacuum_guard: VacuumGuardConfig,
    /// Where alerts go besides the log.
    pub alert: AlertConfig,
    /// When set, `GET /snapshot` and `GET /events` (which other services call, and which carry
    /// password hashes) need `Authorization: Bearer <token>`. Never logged.
    #[serde(serialize_with = "ferrybox::config::secret::serialize_option")]
    pub internal_token: Option<secrecy::SecretString>,
    /// The credential other services present (`Authorization: Bearer <it>`) to change any
    /// user. Never logged.
    #[serde(serialize_with = "ferrybox::config::secret::serialize_option")]
    pub service_token: Option<secrecy::SecretString>,
    /// auth-service's token secret: session tokens signed with it let a user change their own
    /// account. Never logged.
    #[serde(serialize_with = "ferrybox::config::secret::serialize_option")]
    pub token_secret: Option<secrecy::SecretString>,
    /// `POST /users` without a token (self sign-up). Off: only the service credential registers.
    pub open_registration: bool,
    /// Log JSON lines instead of text.
    pub log_json: bool,
    /// Largest request body accepted, in bytes.
    pub max_body_bytes: usize,
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 8080)),
            database: DatabaseConfig::new("postgres://postgres@127.0.0.1:5432/user_service"),
            kafka: KafkaConfig::default(),
            schema_registry_url: "http://127.0.0.1:8081".into(),
            users_topic: TopicConfig::new("users"),
            relay: RelayConfig::default(),
            serve_feed: true,
            feed: FeedServerConfig::default(),
            vacuum_guard: VacuumGuardConfig::default(),
            alert: AlertConfig::default(),
            internal_token: None,
            service_token: None,
            token_secret: None,
            open_registration: true,
            log_json: false,
            max_body_bytes: 16 * 1024,
        }
    }
}

impl Settings {
    /// Loads settings from `file` (optional) and the environment.
    pub fn load(file: Option<&std::path::Path>) -> ferrybox::Result<Self> {
        let settings: Self = ferrybox::config::load(file, "USER_SERVICE_")?;
        settings.validate()?;
        Ok(settings)
    }

    /// Checks every section.
    pub fn validate(&self) -> ferrybox::Result<()> {
        self.database.validate()?;
        self.kafka.validate()?;
        self.users_topic.validate()?;
        self.relay.validate()?;
        self.feed.validate()?;
        self.vacuum_guard.validate()?;
        self.alert.validate()?;
        if let Some(secret) = &self.token_secret {
            ferrybox::token::TokenKey::new(secret, crate::auth::TOKEN_ISSUER)?;
        }
        if self.schema_registry_url.is_empty() {
            return Err(ferrybox::Error::Config(
                "schema_registry_url is empty".into(),
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use ferrybox::testing;

    use super::*;

    /// Every setting set to something other than its default.
    fn everything_set() -> Settings {
        let mut kafka = KafkaConfig::new("broker:9093");
        kafka
            .settings
            .insert("sasl_password".into(), "kafka-pw".into());
        kafka
            .producer_settings
            .insert("linger.ms".into(), "10".into());
        kafka
            .consumer_settings
            .insert("fetch_wait_max_ms".into(), "5".into());
        kafka
            .admin_settings
            .insert("ssl.key.password".into(), "admin-pw".into());
        kafka.strict_durability = true;
        kafka.allow_weak_durability = true;
        Settings {
            listen: SocketAddr::from(([0, 0, 0, 0], 9000)),
            database: DatabaseConfig {
                max_connections: 7,
                pool_timeout: Duration::from_millis(27),
                ..DatabaseConfig::new("postgres://app:pw@db:5433/users")
            },
            kafka,
            schema_registry_url: "http://registry:8085".into(),
            users_topic: TopicConfig {
                name: "people".into(),
                partitions: 12,
                replication_factor: 3,
            },
            relay: RelayConfig {
                mode: ferrybox::RelayMode::Log,
                slot_name: Some("users_relay".into()),
                batch_size: 10,
                listen: false,
                poll_interval: Duration::from_millis(7),
                standby_interval: Duration::from_millis(8),
                backoff: ferrybox::config::Backoff {
                    initial: Duration::from_millis(9),
                    max: Duration::from_millis(90),
                },
                retention: Duration::from_millis(11),
                cleanup_interval: Duration::from_millis(12),
            },
            serve_feed: false,
            feed: FeedServerConfig {
                default_limit: 13,
                max_limit: 14,
                max_wait: Duration::from_millis(15),
                poll_interval: Duration::from_millis(16),
            },
            vacuum_guard: VacuumGuardConfig {
                interval: Duration::from_millis(18),
                max_transaction_age: Duration::from_millis(19),
                max_prepared_age: Duration::from_millis(20),
                max_slot_idle: Duration::from_millis(21),
                max_slot_retained_bytes: 22,
                max_generation_kept: Duration::from_millis(23),
            },
            alert: AlertConfig {
                webhook_url: Some("https://alerts.example.com/users".into()),
            },
            internal_token: Some("internal".into()),
            service_token: Some("service".into()),
            token_secret: Some("a signing secret of at least 32 bytes".into()),
            open_registration: false,
            log_json: true,
            max_body_bytes: 17,
        }
    }

    #[test]
    fn every_setting_round_trips_through_the_loader() {
        // No variable uses this prefix.
        testing::assert_settings_round_trip(&everything_set(), "USER_SERVICE_ROUND_TRIP_TEST_");
    }
}
