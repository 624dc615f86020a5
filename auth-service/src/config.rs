//! auth-service settings: defaults, then a TOML file, then `AUTH_SERVICE_*` variables.

use std::net::SocketAddr;

use ferrybox::alert::AlertConfig;
use ferrybox::feed::FeedConfig;
use ferrybox::reconcile::ReconcileConfig;
use ferrybox::vacuum::VacuumGuardConfig;
use ferrybox::{DatabaseConfig, InboxConfig, KafkaConfig, TopicConfig};
use serde::{Deserialize, Serialize};

/// How user events reach the service.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
pub enum Transport {
    /// Consume the users topic from Kafka (the default).
    #[default]
    Kafka,
    /// Pull user-service's `events` feed over HTTP; no broker needed.
    Feed,
}

/// Everything auth-service can be configured with. Serializing it (`check-config --print`)
/// writes secrets as `"[redacted]"`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Settings {
    /// HTTP listen address.
    pub listen: SocketAddr,
    /// The service's own database (cache, sessions, inbox).
    pub database: DatabaseConfig,
    /// The Kafka cluster.
    pub kafka: KafkaConfig,
    /// A Confluent-API schema registry.
    pub schema_registry_url: String,
    /// The topic user events come from.
    pub users_topic: TopicConfig,
    /// The inbox consumer; its topics are always `users_topic`.
    pub inbox: InboxConfig,
    /// Kafka or the pulled feed.
    pub transport: Transport,
    /// user-service's event feed (with `transport = "feed"`).
    pub feed: FeedConfig,
    /// user-service's repair endpoint (`/events/numbered`): a gap in the users topic's
    /// numbers (messages the broker lost) is filled from it, with `feed.token`. Unset: a gap
    /// halts its partition until an operator skips it (`gaps skip`).
    pub repair_url: Option<String>,
    /// Reconciliation with user-service's snapshot.
    pub reconcile: ReconcileConfig,
    /// Where alerts go besides the log.
    pub alert: AlertConfig,
    /// When what holds vacuum back (long or prepared transactions, idle slots) is alerted.
    pub vacuum_guard: VacuumGuardConfig,
    /// Login attempts allowed per account and per client address.
    pub login_limits: crate::limits::LoginLimits,
    /// The secret session tokens are signed with (32 bytes or more), shared with the services
    /// that verify them (user-service). Unset: a random one per process, and no other service
    /// can verify the tokens. Never logged.
    #[serde(serialize_with = "ferrybox::config::secret::serialize_option")]
    pub token_secret: Option<secrecy::SecretString>,
    /// How long a login session lasts, in seconds.
    pub session_ttl_secs: i64,
    /// Log JSON lines instead of text.
    pub log_json: bool,
    /// Largest request body accepted, in bytes.
    pub max_body_bytes: usize,
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 8082)),
            database: DatabaseConfig::new("postgres://postgres@127.0.0.1:5432/auth_service"),
            kafka: KafkaConfig::default(),
            schema_registry_url: "http://127.0.0.1:8081".into(),
            users_topic: TopicConfig::new("users"),
            inbox: InboxConfig {
                group_id: "auth-service".into(),
                ..InboxConfig::default()
            },
            transport: Transport::Kafka,
            feed: FeedConfig {
                url: "http://127.0.0.1:8080/events".into(),
                name: "user-service".into(),
                ..FeedConfig::default()
            },
            repair_url: Some("http://127.0.0.1:8080/events/numbered".into()),
            reconcile: ReconcileConfig {
                snapshot_url: Some("http://127.0.0.1:8080/snapshot".into()),
                ..ReconcileConfig::default()
            },
            alert: AlertConfig::default(),
            vacuum_guard: VacuumGuardConfig::default(),
            login_limits: crate::limits::LoginLimits::default(),
            token_secret: None,
            session_ttl_secs: 3600,
            log_json: false,
            max_body_bytes: 16 * 1024,
        }
    }
}

impl Settings {
    /// Loads settings from `file` (optional) and the environment.
    pub fn load(file: Option<&std::path::Path>) -> ferrybox::Result<Self> {
        let mut settings: Self = ferrybox::config::load(file, "AUTH_SERVICE_")?;
        settings.inbox.topics = vec![settings.users_topic.name.clone()];
        settings.validate()?;
        Ok(settings)
    }

    /// Checks every section.
    pub fn validate(&self) -> ferrybox::Result<()> {
        self.database.validate()?;
        self.kafka.validate()?;
        self.users_topic.validate()?;
        self.inbox.validate()?;
        if self.transport == Transport::Feed {
            self.feed.validate()?;
        }
        self.reconcile.validate()?;
        self.alert.validate()?;
        self.vacuum_guard.validate()?;
        self.login_limits.validate()?;
        if let Some(secret) = &self.token_secret {
            ferrybox::token::TokenKey::new(secret, crate::login::TOKEN_ISSUER)?;
        }
        if self.inbox.topics != [self.users_topic.name.clone()] {
            return Err(ferrybox::Error::Config(
                "inbox.topics must be the users topic".into(),
            ));
        }
        if self.session_ttl_secs < 60 {
            return Err(ferrybox::Error::Config(
                "session_ttl_secs must be at least 60".into(),
            ));
        }
        Ok(())
    }

    /// The same settings reading `topic`, dead-lettering to `<topic>.auth-service.dlq` (used
    /// by tests and the demo).
    pub fn with_users_topic(mut self, topic: &str) -> Self {
        self.users_topic.name = topic.to_owned();
        self.inbox.topics = vec![topic.to_owned()];
        self.inbox.dead_letter_topic = Some(format!("{topic}.auth-service.dlq"));
        self
    }

    /// The inbox settings the Kafka consumer runs with: `inbox`, plus `repair_url` for the
    /// users topic (with `feed.token`) unless `inbox.repair_urls` names one.
    pub fn inbox(&self) -> InboxConfig {
        let mut inbox = self.inbox.clone();
        if let Some(url) = &self.repair_url {
            inbox
                .repair_urls
                .entry(self.users_topic.name.clone())
                .or_insert_with(|| url.clone());
        }
        if inbox.repair_token.is_none() {
            inbox.repair_token = self.feed.token.clone();
        }
        inbox
    }

    /// The topics this service owns and creates: its dead-letter topic, when set (one
    /// partition: dead letters are rare and read in order; replicated like the users topic).
    /// The users topic is user-service's: this service only checks it exists.
    pub fn own_topics(&self) -> Vec<TopicConfig> {
        self.inbox
            .dead_letter_topic
            .iter()
            .map(|name| TopicConfig {
                name: name.clone(),
                partitions: 1,
                ..self.users_topic.clone()
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use ferrybox::feed::OnUndecodable;
    use ferrybox::testing;

    use super::*;

    /// Every setting set to something other than its default.
    fn everything_set() -> Settings {
        let mut s = Settings::default().with_users_topic("people");
        s.listen = SocketAddr::from(([0, 0, 0, 0], 9000));
        s.database = DatabaseConfig::new("postgres://app:pw@db:5433/auth");
        s.database.max_connections = 7;
        s.database.pool_timeout = Duration::from_millis(27);
        s.kafka.bootstrap_servers = "broker:9093".into();
        s.kafka
            .settings
            .insert("sasl_password".into(), "kafka-pw".into());
        s.kafka
            .producer_settings
            .insert("linger.ms".into(), "10".into());
        s.kafka
            .consumer_settings
            .insert("fetch_wait_max_ms".into(), "5".into());
        s.kafka
            .admin_settings
            .insert("ssl.key.password".into(), "admin-pw".into());
        s.kafka.strict_durability = true;
        s.kafka.allow_weak_durability = true;
        s.schema_registry_url = "http://registry:8085".into();
        s.users_topic.partitions = 12;
        s.users_topic.replication_factor = 3;
        s.inbox.group_id = "auth-2".into();
        s.inbox.consumer_name = Some("auth-consumer".into());
        s.inbox.static_membership = false;
        s.inbox.instance_id = Some("auth-pod-0".into());
        s.inbox.consumer_version = Some("1.2.3".into());
        s.inbox.batch_size = 10;
        s.inbox.batch_linger = Duration::from_millis(11);
        s.inbox.max_attempts = 12;
        s.inbox.backoff.initial = Duration::from_millis(13);
        s.inbox.backoff.max = Duration::from_millis(130);
        s.inbox.handler_timeout = Duration::from_millis(14);
        s.inbox.retention = Duration::from_millis(15);
        s.inbox.cleanup_interval = Duration::from_millis(16);
        s.inbox.dedup = ferrybox::inbox::Dedup::Id;
        s.inbox
            .repair_urls
            .insert("users".into(), "http://users:8080/events/numbered".into());
        s.inbox.repair_token = Some("repair-token".into());
        s.inbox.repair_interval = Duration::from_millis(32);
        s.repair_url = Some("http://users-b:8080/events/numbered".into());
        s.transport = Transport::Feed;
        s.feed.url = "http://users:8080/events".into();
        s.feed.name = "users".into();
        s.feed.limit = 17;
        s.feed.wait = Duration::from_millis(18);
        s.feed.on_undecodable = OnUndecodable::DeadLetter;
        s.feed.backoff.initial = Duration::from_millis(19);
        s.feed.backoff.max = Duration::from_millis(190);
        s.feed.token = Some("feed-token".into());
        s.reconcile.snapshot_url = Some("http://users:8080/snapshot".into());
        s.reconcile.interval = Duration::from_millis(20);
        s.reconcile.newer_margin = Duration::from_millis(21);
        s.reconcile.timeout = Duration::from_millis(22);
        s.reconcile.token = Some("snapshot-token".into());
        s.alert.webhook_url = Some("https://alerts.example.com/hook".into());
        s.vacuum_guard.interval = Duration::from_millis(27);
        s.vacuum_guard.max_transaction_age = Duration::from_millis(28);
        s.vacuum_guard.max_prepared_age = Duration::from_millis(29);
        s.vacuum_guard.max_slot_idle = Duration::from_millis(30);
        s.vacuum_guard.max_slot_retained_bytes = 31;
        s.vacuum_guard.max_generation_kept = Duration::from_millis(32);
        s.login_limits.per_account_per_minute = 23;
        s.login_limits.per_address_per_minute = 24;
        s.token_secret = Some("a signing secret of at least 32 bytes".into());
        s.session_ttl_secs = 25;
        s.log_json = true;
        s.max_body_bytes = 26;
        s
    }

    #[test]
    fn every_setting_round_trips_through_the_loader() {
        // No variable uses this prefix.
        testing::assert_settings_round_trip(&everything_set(), "AUTH_SERVICE_ROUND_TRIP_TEST_");
    }
}
