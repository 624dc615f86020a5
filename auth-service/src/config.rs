//! auth-service settings: defaults, then a TOML file, then `AUTH_SERVICE_*` variables.

use std::net::SocketAddr;

use ferrybox::alert::AlertConfig;
use ferrybox::feed::FeedConfig;
use ferrybox::reconcile::ReconcileConfig;
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
    /// Reconciliation with user-service's snapshot.
    pub reconcile: ReconcileConfig,
    /// Where alerts go besides the log.
    pub alert: AlertConfig,
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
            reconcile: ReconcileConfig {
                snapshot_url: Some("http://127.0.0.1:8080/snapshot".into()),
                ..ReconcileConfig::default()
            },
            alert: AlertConfig::default(),
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
        self.login_limits.validate()?;
        if let Some(secret) = &self.token_secret {
            ferrybox::token::TokenKey::new(secret)?;
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

    /// The topics this service needs: the users topic and, when set, its dead-letter topic
    /// (one partition: dead letters are rare and read in order).
    pub fn topics(&self) -> Vec<TopicConfig> {
        let mut topics = vec![self.users_topic.clone()];
        if let Some(name) = &self.inbox.dead_letter_topic {
            topics.push(TopicConfig {
                name: name.clone(),
                partitions: 1,
                ..self.users_topic.clone()
            });
        }
        topics
    }
}
