//! The `taskstack-web` keys: listen address, API tokens, limits.

use super::{Config, ConfigError, RuntimeThreads, Secret, TOKIO_WORKER_THREADS, invalid};
use std::net::SocketAddr;
use std::time::Duration;

/// Shortest API token accepted: a guessable token is no protection.
pub const MIN_TOKEN_LEN: usize = 16;

/// Smallest body limit that still fits a useful enqueue request.
const MIN_BODY_LIMIT: u64 = 1024;

/// Shortest header and idle timeouts: below this, ordinary clients on a
/// slow link would be cut off.
const MIN_WEB_TIMEOUT: Duration = Duration::from_millis(100);

impl Config {
    pub(super) fn validate_web(&self) -> Result<(), ConfigError> {
        self.web_addr()?;
        for t in &self.api_tokens {
            check_token("api_tokens", t.expose())?;
        }
        if self.web_body_limit < MIN_BODY_LIMIT {
            return Err(invalid(
                "web_body_limit",
                &self.web_body_limit.to_string(),
                &format!("must be at least {MIN_BODY_LIMIT} bytes"),
            ));
        }
        for (key, d) in [
            ("web_header_timeout", self.web_header_timeout),
            ("web_idle_timeout", self.web_idle_timeout),
        ] {
            if d < MIN_WEB_TIMEOUT {
                return Err(invalid(
                    key,
                    &humantime::format_duration(d).to_string(),
                    &format!(
                        "must be at least {}",
                        humantime::format_duration(MIN_WEB_TIMEOUT)
                    ),
                ));
            }
        }
        for t in &self.web_tasks {
            if t.chars().any(|c| c.is_control() || c.is_whitespace()) {
                return Err(invalid(
                    "web_tasks",
                    t,
                    "task names may not contain spaces or control characters",
                ));
            }
        }
        Ok(())
    }

    /// How many threads serve `taskstack-web`'s requests (`web_threads`):
    /// the number given, or under `auto` tokio's `TOKIO_WORKER_THREADS`
    /// when set (it must then be a positive number), else one per CPU the
    /// process may use.
    pub fn web_thread_count(&self) -> Result<usize, ConfigError> {
        match self.web_threads {
            RuntimeThreads::Fixed(n) => Ok(n.get()),
            RuntimeThreads::Auto => match std::env::var(TOKIO_WORKER_THREADS) {
                Ok(v) => v
                    .trim()
                    .parse::<usize>()
                    .ok()
                    .filter(|&n| n > 0)
                    .ok_or_else(|| {
                        invalid(
                            "web_threads",
                            &format!("auto, with {TOKIO_WORKER_THREADS}={v:?}"),
                            &format!(
                                "{TOKIO_WORKER_THREADS} must be a number of threads of at least 1 \
                                 (or unset; or give web_threads a number)"
                            ),
                        )
                    }),
                Err(_) => Ok(std::thread::available_parallelism().map_or(1, |n| n.get())),
            },
        }
    }

    /// Where `taskstack-web` listens.
    pub fn web_addr(&self) -> Result<SocketAddr, ConfigError> {
        self.web_listen.trim().parse().map_err(|_| {
            invalid(
                "web_listen",
                &self.web_listen,
                "use ip:port such as 0.0.0.0:8000 (port 0 picks a free port)",
            )
        })
    }

    /// Every API token: `api_tokens` plus the lines of `api_tokens_file`.
    /// Fails when the file cannot be read, a token is too short, or there
    /// is no token at all (the API never runs unauthenticated).
    pub fn load_api_tokens(&self) -> Result<Vec<Secret>, ConfigError> {
        let mut tokens = self.api_tokens.clone();
        if let Some(path) = &self.api_tokens_file {
            let text = std::fs::read_to_string(path).map_err(|e| ConfigError::SecretFile {
                key: "api_tokens_file",
                path: path.clone(),
                reason: e.to_string(),
            })?;
            for line in text.lines().map(str::trim) {
                if line.is_empty() || line.starts_with('#') {
                    continue;
                }
                check_token("api_tokens_file", line)?;
                tokens.push(Secret::from(line));
            }
        }
        if tokens.is_empty() {
            return Err(invalid(
                "api_tokens",
                "",
                "no API token is configured: set TASKSTACK_API_TOKENS (comma-separated) or \
                 TASKSTACK_API_TOKENS_FILE (one per line); generate one with \
                 `openssl rand -hex 32`",
            ));
        }
        Ok(tokens)
    }
}

fn check_token(key: &'static str, token: &str) -> Result<(), ConfigError> {
    if token.chars().count() < MIN_TOKEN_LEN {
        return Err(invalid(
            key,
            crate::secret::REDACTED,
            &format!(
                "an API token must be at least {MIN_TOKEN_LEN} characters \
                 (this one has {})",
                token.chars().count()
            ),
        ));
    }
    if token.chars().any(|c| c.is_control() || c.is_whitespace()) {
        return Err(invalid(
            key,
            crate::secret::REDACTED,
            "an API token may not contain spaces or control characters",
        ));
    }
    Ok(())
}
