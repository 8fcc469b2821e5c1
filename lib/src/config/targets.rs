//! Where the stores are: the Redis, RabbitMQ and PostgreSQL targets a
//! configuration names, with passwords from their files applied.

use super::{Config, ConfigError, PgTarget, RedisTarget, Secret, is_postgres_url};
use std::path::Path;

impl Config {
    /// The broker's URL with the password from `broker_password(_file)` applied.
    /// With a RabbitMQ broker: the result backend's Redis (taskstack's own
    /// records live there).
    pub fn broker_target(&self) -> Result<RedisTarget, ConfigError> {
        if self.broker_is_amqp()
            && let Some(url) = &self.result_backend
            && !is_postgres_url(url.expose())
        {
            return self.backend_target();
        }
        let pw = secret(
            "broker_password_file",
            self.broker_password.as_ref(),
            self.broker_password_file.as_deref(),
        )?;
        Ok(
            RedisTarget::new("broker_url", self.broker_url.expose(), pw.as_ref())?
                .with_sentinel_password(self.sentinel_secret()?),
        )
    }

    /// The Redis server of result records and Celery's chord counters: the
    /// `result_backend` when it is a Redis URL, else the broker's (with a
    /// PostgreSQL result store, chord counters stay on the broker).
    pub fn backend_target(&self) -> Result<RedisTarget, ConfigError> {
        match &self.result_backend {
            None => self.broker_target(),
            Some(url) if is_postgres_url(url.expose()) => self.broker_target(),
            Some(url) => {
                let pw = secret(
                    "result_backend_password_file",
                    self.result_backend_password.as_ref(),
                    self.result_backend_password_file.as_deref(),
                )?;
                Ok(
                    RedisTarget::new("result_backend", url.expose(), pw.as_ref())?
                        .with_sentinel_password(self.sentinel_secret()?),
                )
            }
        }
    }

    /// The PostgreSQL result store, when `result_backend` names one
    /// (password from `result_backend_password(_file)`).
    pub fn postgres_target(&self) -> Result<Option<PgTarget>, ConfigError> {
        let Some(url) = self
            .result_backend
            .as_ref()
            .filter(|u| is_postgres_url(u.expose()))
        else {
            return Ok(None);
        };
        let pw = secret(
            "result_backend_password_file",
            self.result_backend_password.as_ref(),
            self.result_backend_password_file.as_deref(),
        )?;
        PgTarget::new("result_backend", url.expose(), pw.as_ref()).map(Some)
    }
}

/// A password: the content of `file` when set (trailing newline removed),
/// else `inline`.
pub(super) fn secret(
    file_key: &'static str,
    inline: Option<&Secret>,
    file: Option<&Path>,
) -> Result<Option<Secret>, ConfigError> {
    if let Some(path) = file {
        let text = std::fs::read_to_string(path).map_err(|e| ConfigError::SecretFile {
            key: file_key,
            path: path.to_owned(),
            reason: e.to_string(),
        })?;
        let pw = text.trim_end_matches(['\n', '\r']).to_owned();
        if pw.is_empty() {
            return Err(ConfigError::SecretFile {
                key: file_key,
                path: path.to_owned(),
                reason: "the file is empty".into(),
            });
        }
        return Ok(Some(Secret::new(pw)));
    }
    Ok(inline.cloned())
}
