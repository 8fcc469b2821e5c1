//! Validation at start-up: every key checked once, an error naming the key
//! and the value.

use super::{
    Config, ConfigError, MIN_POOL_SIZE, PgTarget, check_queue_name, invalid, is_postgres_url,
    is_sentinel_url, redact_url, sentinel,
};
use std::collections::HashSet;
use std::net::SocketAddr;
use std::time::Duration;

impl Config {
    pub(super) fn validate(&self) -> Result<(), ConfigError> {
        if self.broker_is_amqp() {
            self.validate_amqp()?;
        } else {
            check_redis_url("broker_url", self.broker_url.expose())?;
            self.refuse_amqp_only_settings()?;
        }
        if let Some(b) = &self.result_backend {
            if is_postgres_url(b.expose()) {
                PgTarget::new("result_backend", b.expose(), None)?;
            } else {
                check_redis_url("result_backend", b.expose())?;
            }
        }
        self.validate_sentinel()?;
        if self.namespace.is_empty()
            || !self
                .namespace
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "-_.:".contains(c))
        {
            return Err(invalid(
                "namespace",
                &self.namespace,
                "use letters, digits and - _ . : only, at least one",
            ));
        }
        if self.queues.is_empty() {
            return Err(invalid("queues", "", "at least one queue is needed"));
        }
        for q in &self.queues {
            check_queue_name(q).map_err(|why| invalid("queues", q, why))?;
        }
        if let Some(p) = self.prefetch
            && p < self.concurrency
        {
            return Err(invalid(
                "prefetch",
                &p.to_string(),
                &format!("must be at least concurrency ({})", self.concurrency),
            ));
        }
        let at_least = |key: &'static str, d: Duration, min: Duration| {
            if d < min {
                Err(invalid(
                    key,
                    &humantime::format_duration(d).to_string(),
                    &format!("must be at least {}", humantime::format_duration(min)),
                ))
            } else {
                Ok(())
            }
        };
        if self.redis_pool_size.get() < MIN_POOL_SIZE {
            return Err(invalid(
                "redis_pool_size",
                &self.redis_pool_size.to_string(),
                &format!("must be at least {MIN_POOL_SIZE}"),
            ));
        }
        at_least("lease", self.lease, Duration::from_secs(1))?;
        at_least(
            "result_expires",
            self.result_expires,
            Duration::from_secs(1),
        )?;
        at_least(
            "max_task_delay",
            self.max_task_delay,
            Duration::from_secs(1),
        )?;
        if self.max_message_size < 1024 {
            return Err(invalid(
                "max_message_size",
                &self.max_message_size.to_string(),
                "must be at least 1KiB",
            ));
        }
        at_least(
            "redis_timeout",
            self.redis_timeout,
            Duration::from_millis(100),
        )?;
        at_least(
            "result_backend_timeout",
            self.result_backend_timeout,
            Duration::from_millis(100),
        )?;
        // Checked where logs are set up; a producer-only build has no telemetry.
        #[cfg(feature = "service")]
        tracing_subscriber::EnvFilter::try_new(&self.log_level)
            .map_err(|e| invalid("log_level", &self.log_level, &e.to_string()))?;
        at_least("beat_lock_ttl", self.beat_lock_ttl, Duration::from_secs(1))?;
        at_least(
            "beat_missed_grace",
            self.beat_missed_grace,
            Duration::from_secs(1),
        )?;
        self.beat_metrics_addr()?;
        self.worker_metrics_addr()?;
        self.validate_web()?;
        self.validate_schedule()
    }

    /// Every entry compiles (cron, time zone, interval, queue) and names are
    /// unique; disabled entries are checked too, so a typo never waits for
    /// the day someone enables the entry.
    fn validate_schedule(&self) -> Result<(), ConfigError> {
        let mut names = HashSet::new();
        for (i, entry) in self.schedule.iter().enumerate() {
            // Only a build with the beat can compile an entry; a producer
            // never runs the schedule.
            #[cfg(feature = "beat")]
            crate::beat::schedule::Entry::compile(entry).map_err(|e| ConfigError::Schedule {
                entry: entry.label(i),
                field: e.field,
                value: e.value,
                reason: e.reason,
            })?;
            if !names.insert(entry.name.as_str()) {
                return Err(ConfigError::Schedule {
                    entry: entry.label(i),
                    field: "name",
                    value: entry.name.clone(),
                    reason: "another entry has the same name; names must be unique".into(),
                });
            }
        }
        Ok(())
    }

    /// Where `taskstack-beat` serves metrics; `None` when `beat_metrics_listen`
    /// is `off` (or empty).
    pub fn beat_metrics_addr(&self) -> Result<Option<SocketAddr>, ConfigError> {
        metrics_addr("beat_metrics_listen", &self.beat_metrics_listen, 9102)
    }

    /// Where `taskstack-worker` serves metrics; `None` when
    /// `worker_metrics_listen` is `off` (or empty).
    pub fn worker_metrics_addr(&self) -> Result<Option<SocketAddr>, ConfigError> {
        metrics_addr("worker_metrics_listen", &self.worker_metrics_listen, 9101)
    }
}

/// A metrics listen address (`ip:port`), or `None` for `off` / empty.
fn metrics_addr(
    key: &'static str,
    raw: &str,
    example_port: u16,
) -> Result<Option<SocketAddr>, ConfigError> {
    let raw = raw.trim();
    if raw.is_empty() || raw.eq_ignore_ascii_case("off") {
        return Ok(None);
    }
    raw.parse().map(Some).map_err(|_| {
        invalid(
            key,
            raw,
            &format!(
                "use ip:port such as 0.0.0.0:{example_port} (port 0 picks a free port), or off"
            ),
        )
    })
}

/// Checks a `redis://`, `rediss://`, Sentinel or Unix socket URL.
fn check_redis_url(key: &'static str, raw: &str) -> Result<(), ConfigError> {
    if is_sentinel_url(raw) {
        sentinel::parse_sentinel_url(key, raw, None).map(drop)
    } else if super::is_socket_url(raw) {
        super::redis_socket::parse_socket_url(key, raw, None).map(drop)
    } else {
        parse_redis_url(key, raw).map(drop)
    }
}

pub(super) fn parse_redis_url(key: &'static str, raw: &str) -> Result<url::Url, ConfigError> {
    let shown = redact_url(raw);
    let url = url::Url::parse(raw).map_err(|e| invalid(key, &shown, &e.to_string()))?;
    if !matches!(url.scheme(), "redis" | "rediss") {
        return Err(invalid(
            key,
            &shown,
            "the scheme must be redis://, rediss://, redis+sentinel://, rediss+sentinel://, \
             unix:// or redis+socket://",
        ));
    }
    if url.host_str().is_none_or(str::is_empty) {
        return Err(invalid(key, &shown, "the URL names no host"));
    }
    let db = url.path().trim_start_matches('/');
    if !db.is_empty() && db.parse::<u16>().is_err() {
        return Err(invalid(
            key,
            &shown,
            "the path must be a database number such as /0",
        ));
    }
    Ok(url)
}
