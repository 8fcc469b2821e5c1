//! A RabbitMQ broker: `broker_url = "amqp://user@host:5672/vhost"` (or
//! `amqps://`). Results, task states, worker records and the beat's ledger
//! then live on `result_backend`: a Redis URL, or a PostgreSQL one (then
//! the stack needs no Redis at all).

use super::{Config, ConfigError, Secret, invalid, redact_url, secret};
use serde::{Deserialize, Serialize};

/// Whether `raw` names a RabbitMQ broker.
pub fn is_amqp_url(raw: &str) -> bool {
    raw.starts_with("amqp://") || raw.starts_with("amqps://")
}

/// How taskstack declares the RabbitMQ queues it creates (Celery's
/// `x-queue-type`). A queue that exists already is never changed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum QueueType {
    /// RabbitMQ's classic queues, no arguments (Celery's default).
    #[default]
    Classic,
    /// Replicated quorum queues (`x-queue-type = quorum`).
    Quorum,
}

impl Config {
    /// Whether the broker is RabbitMQ.
    pub fn broker_is_amqp(&self) -> bool {
        is_amqp_url(self.broker_url.expose())
    }

    /// Whether any Redis is used: false with a RabbitMQ broker and
    /// PostgreSQL results, where everything else lives in PostgreSQL.
    pub fn uses_redis(&self) -> bool {
        !(self.broker_is_amqp()
            && self
                .result_backend
                .as_ref()
                .is_some_and(|b| super::is_postgres_url(b.expose())))
    }

    pub(super) fn validate_amqp(&self) -> Result<(), ConfigError> {
        let raw = self.broker_url.expose();
        let shown = redact_url(raw);
        let url =
            url::Url::parse(raw).map_err(|e| invalid("broker_url", &shown, &e.to_string()))?;
        if url.host_str().is_none_or(str::is_empty) {
            return Err(invalid("broker_url", &shown, "the URL names no host"));
        }
        match self.broker_queue_max_priority {
            Some(0) => {
                return Err(invalid(
                    "broker_queue_max_priority",
                    "0",
                    "must be 1..=255 (leave it out for queues without priorities)",
                ));
            }
            Some(n) if self.broker_queue_type == QueueType::Quorum => {
                return Err(invalid(
                    "broker_queue_max_priority",
                    &n.to_string(),
                    "quorum queues take no x-max-priority (RabbitMQ refuses the argument): \
                     use broker_queue_type = \"classic\" or leave broker_queue_max_priority out",
                ));
            }
            _ => {}
        }
        if !self.uses_redis() && self.redis_min_replicas_acked > 0 {
            return Err(invalid(
                "redis_min_replicas_acked",
                &self.redis_min_replicas_acked.to_string(),
                "applies to Redis only, and with a RabbitMQ broker and PostgreSQL results \
                 no Redis is used (leave it out)",
            ));
        }
        match &self.result_backend {
            Some(_) => Ok(()),
            None => Err(invalid(
                "result_backend",
                "",
                "a RabbitMQ broker (broker_url = amqp://...) needs result_backend = \
                 redis://... or postgresql://... (results, task states and worker records \
                 live there)",
            )),
        }
    }

    /// With a Redis broker, the RabbitMQ-only settings must be left at
    /// their defaults: one that was set would otherwise do nothing.
    pub(super) fn refuse_amqp_only_settings(&self) -> Result<(), ConfigError> {
        let redis = "applies to a RabbitMQ broker (broker_url = amqp://...) only; \
                     this broker_url is Redis";
        if self.broker_queue_type != QueueType::Classic {
            return Err(invalid("broker_queue_type", "quorum", redis));
        }
        if let Some(n) = self.broker_queue_max_priority {
            return Err(invalid(
                "broker_queue_max_priority",
                &n.to_string(),
                &format!(
                    "{redis} (Redis queues always have Celery's four priority buckets, \
                     0 served first)"
                ),
            ));
        }
        Ok(())
    }

    /// The RabbitMQ URL with the password from `broker_password(_file)`
    /// applied; `None` when the broker is Redis.
    pub fn amqp_url(&self) -> Result<Option<Secret>, ConfigError> {
        if !self.broker_is_amqp() {
            return Ok(None);
        }
        let raw = self.broker_url.expose();
        let pw = secret(
            "broker_password_file",
            self.broker_password.as_ref(),
            self.broker_password_file.as_deref(),
        )?;
        let Some(pw) = pw else {
            return Ok(Some(Secret::from(raw.to_owned())));
        };
        let mut url = url::Url::parse(raw)
            .map_err(|e| invalid("broker_url", &redact_url(raw), &e.to_string()))?;
        url.set_password(Some(pw.expose()))
            .map_err(|()| invalid("broker_password", "***", "cannot be set on this URL"))?;
        Ok(Some(Secret::from(url.to_string())))
    }
}
