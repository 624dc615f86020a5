//! Alerts: what Ferrybox cannot fix by itself and an operator must look at (a reconciliation
//! that found differences it could not repair, a feed consumer that halted).
//!
//! Every alert is logged as a structured `ERROR` line with `alert = <kind>`, which log-based
//! alerting picks up. When a webhook URL is configured, the alert is also POSTed there as JSON
//! (`{"source", "kind", "summary", "details", "raised_at"}`); a webhook that fails is logged and
//! never stops the caller.

use std::time::Duration;

use chrono::{DateTime, Utc};
use secrecy::{ExposeSecret, SecretString};
use serde::{Deserialize, Serialize};

/// Where alerts go besides the log.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AlertConfig {
    /// POST each alert as JSON to this URL (Slack-style incoming webhooks, Alertmanager's
    /// webhook receiver, a pager's endpoint). Off when unset. Kept secret: such URLs carry
    /// tokens.
    #[serde(serialize_with = "crate::config::secret::serialize_option")]
    pub webhook_url: Option<SecretString>,
}

impl AlertConfig {
    /// Checks the webhook URL is an http(s) URL.
    pub fn validate(&self) -> crate::Result<()> {
        if let Some(url) = &self.webhook_url
            && !(url.expose_secret().starts_with("http://")
                || url.expose_secret().starts_with("https://"))
        {
            return Err(crate::Error::Config(
                "alert.webhook_url must be an http:// or https:// URL".into(),
            ));
        }
        Ok(())
    }
}

/// One alert.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Alert {
    /// Which service or component raised it (`auth-service reconciler`).
    pub source: String,
    /// A stable kind to route on (`reconcile_unresolved`, `feed_halted`).
    pub kind: String,
    /// One line for a human.
    pub summary: String,
    /// Everything else, for the runbook.
    pub details: serde_json::Value,
    /// When it was raised.
    pub raised_at: DateTime<Utc>,
}

impl Alert {
    /// An alert raised now.
    pub fn new(
        source: impl Into<String>,
        kind: impl Into<String>,
        summary: impl Into<String>,
        details: serde_json::Value,
    ) -> Self {
        Self {
            source: source.into(),
            kind: kind.into(),
            summary: summary.into(),
            details,
            raised_at: Utc::now(),
        }
    }
}

/// Raises alerts: a log line always, a webhook call when configured.
#[derive(Clone)]
pub struct Alerter {
    /// The webhook's URL (it may carry a token) and the client that calls it.
    webhook: Option<(String, reqwest::Client)>,
}

impl std::fmt::Debug for Alerter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Alerter")
            .field("webhook", &self.webhook.as_ref().map(|_| "[redacted]"))
            .finish()
    }
}

/// How long a webhook gets to answer.
const WEBHOOK_TIMEOUT: Duration = Duration::from_secs(10);

impl Alerter {
    /// An alerter for `config`.
    pub fn new(config: &AlertConfig) -> crate::Result<Self> {
        config.validate()?;
        let Some(url) = &config.webhook_url else {
            return Ok(Self::log_only());
        };
        let client = reqwest::Client::builder()
            .timeout(WEBHOOK_TIMEOUT)
            .build()
            .map_err(|e| crate::Error::Config(format!("alert webhook client: {e}")))?;
        Ok(Self {
            webhook: Some((url.expose_secret().to_owned(), client)),
        })
    }

    /// An alerter that only logs.
    pub fn log_only() -> Self {
        Self { webhook: None }
    }

    /// Logs `alert` and sends it to the webhook, if any. Never fails: a webhook that cannot be
    /// reached is logged too.
    pub async fn raise(&self, alert: &Alert) {
        tracing::error!(
            alert = alert.kind,
            source = alert.source,
            details = %alert.details,
            "{}",
            alert.summary
        );
        let Some((url, client)) = &self.webhook else {
            return;
        };
        let sent = client
            .post(url)
            .json(alert)
            .send()
            .await
            .and_then(reqwest::Response::error_for_status);
        if let Err(e) = sent {
            // The URL may carry a token: log the error without it.
            tracing::warn!(alert = alert.kind, error = %e.without_url(), "alert webhook failed");
        }
    }
}
