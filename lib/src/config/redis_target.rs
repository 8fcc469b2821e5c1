//! [`RedisTarget`]: one Redis server to connect to, given directly
//! (`redis://`, `rediss://`), behind a Unix socket (`unix://`,
//! `redis+socket://`) or found through Redis Sentinel (`redis+sentinel://`,
//! `rediss+sentinel://`).

use super::redis_socket::{SocketTarget, is_socket_url, parse_socket_url};
use super::sentinel::{SentinelTarget, is_sentinel_url, parse_sentinel_url, redact_sentinel_url};
use super::{Config, ConfigError, Secret, invalid, parse_redis_url, redact_url, secret};

/// A Redis server to connect to: the full URL (with password) and a
/// redacted form for logs; for a Sentinel URL, also the sentinels and the
/// master's name, the master itself being looked up at each connection.
#[derive(Clone)]
pub struct RedisTarget {
    url: String,
    sentinel: Option<SentinelTarget>,
    socket: Option<SocketTarget>,
}

impl std::fmt::Debug for RedisTarget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.redacted())
    }
}

impl RedisTarget {
    pub(super) fn new(
        key: &'static str,
        raw: &str,
        password: Option<&Secret>,
    ) -> Result<Self, ConfigError> {
        if is_sentinel_url(raw) {
            let s = parse_sentinel_url(key, raw, password)?;
            return Ok(Self {
                url: s.display(false),
                sentinel: Some(s),
                socket: None,
            });
        }
        if is_socket_url(raw) {
            let s = parse_socket_url(key, raw, password)?;
            return Ok(Self {
                url: s.client_url(false),
                sentinel: None,
                socket: Some(s),
            });
        }
        let mut url = parse_redis_url(key, raw)?;
        if let Some(pw) = password {
            url.set_password(Some(pw.expose()))
                .map_err(|()| invalid(key, &redact_url(raw), "cannot carry a password"))?;
        }
        Ok(Self {
            url: url.into(),
            sentinel: None,
            socket: None,
        })
    }

    /// The sentinels' own password, for a Sentinel target (ignored otherwise).
    pub(super) fn with_sentinel_password(mut self, pw: Option<Secret>) -> Self {
        if let Some(s) = &mut self.sentinel {
            s.sentinel_password = pw;
        }
        self
    }

    /// A target from a URL, validated like configuration (for tests and tools).
    pub fn from_url(raw: &str) -> Result<Self, ConfigError> {
        Self::new("broker_url", raw, None)
    }

    /// A Sentinel target whose sentinels need `password` (for tests and tools).
    pub fn from_sentinel_url(raw: &str, password: Option<Secret>) -> Result<Self, ConfigError> {
        Ok(Self::new("broker_url", raw, None)?.with_sentinel_password(password))
    }

    /// The URL including the password; never log it. For a Sentinel
    /// target, the `redis+sentinel://` URL; for a socket, redis-rs's
    /// `unix:///path?db=N` form.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// The URL with the password hidden.
    pub fn redacted(&self) -> String {
        if let Some(s) = &self.socket {
            s.client_url(true)
        } else if self.sentinel.is_some() {
            redact_sentinel_url(&self.url)
        } else {
            redact_url(&self.url)
        }
    }

    /// The sentinels and master name, when this target is found through Sentinel.
    pub fn sentinel(&self) -> Option<&SentinelTarget> {
        self.sentinel.as_ref()
    }

    /// Whether connections use TLS.
    pub fn is_tls(&self) -> bool {
        match &self.sentinel {
            Some(s) => s.tls,
            None => self.url.starts_with("rediss:"),
        }
    }

    /// The database number.
    pub fn db(&self) -> i64 {
        if let Some(s) = &self.socket {
            return s.db.into();
        }
        match &self.sentinel {
            Some(s) => s.db,
            None => url::Url::parse(&self.url)
                .ok()
                .and_then(|u| u.path().trim_start_matches('/').parse().ok())
                .unwrap_or(0),
        }
    }

    /// The host and port the URL names (for a Sentinel target, the first
    /// sentinel's; for a socket, its path and port 0): for display only,
    /// never to connect to.
    pub fn host_port(&self) -> (String, u16) {
        if let Some(s) = &self.socket {
            return (s.path.clone(), 0);
        }
        match &self.sentinel {
            Some(s) => s.sentinels.first().cloned().unwrap_or_default(),
            None => url::Url::parse(&self.url)
                .ok()
                .map(|u| {
                    (
                        u.host_str().unwrap_or_default().to_owned(),
                        u.port().unwrap_or(6379),
                    )
                })
                .unwrap_or_default(),
        }
    }
}

impl Config {
    /// The sentinels' password from `sentinel_password(_file)`.
    pub(super) fn sentinel_secret(&self) -> Result<Option<Secret>, ConfigError> {
        secret(
            "sentinel_password_file",
            self.sentinel_password.as_ref(),
            self.sentinel_password_file(),
        )
    }

    /// `sentinel_password_file`, where an empty value counts as unset: the
    /// compose file passes `${SENTINEL_PASSWORD_FILE:-}` to every service,
    /// empty unless the profile `ha` is on.
    fn sentinel_password_file(&self) -> Option<&std::path::Path> {
        self.sentinel_password_file
            .as_deref()
            .filter(|p| !p.as_os_str().is_empty())
    }

    /// `sentinel_password(_file)` only with a Sentinel URL: set without
    /// one it would be silently ignored.
    pub(super) fn validate_sentinel(&self) -> Result<(), ConfigError> {
        let any_sentinel = is_sentinel_url(self.broker_url.expose())
            || self
                .result_backend
                .as_ref()
                .is_some_and(|u| is_sentinel_url(u.expose()));
        if any_sentinel {
            return Ok(());
        }
        let key = if self.sentinel_password_file().is_some() {
            "sentinel_password_file"
        } else if self.sentinel_password.is_some() {
            "sentinel_password"
        } else {
            return Ok(());
        };
        Err(invalid(
            key,
            "***",
            "is set, but neither broker_url nor result_backend is a redis+sentinel:// URL",
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_plain_url_keeps_its_db_host_and_port() {
        let t = RedisTarget::from_url("rediss://:pw@redis.example:6380/4").expect("valid");
        assert_eq!(t.db(), 4);
        assert_eq!(t.host_port(), ("redis.example".to_owned(), 6380));
        assert!(t.is_tls());
        assert!(t.sentinel().is_none());
        assert!(!t.redacted().contains("pw"));
    }

    #[test]
    fn a_sentinel_url_carries_sentinels_master_and_passwords() {
        let t = RedisTarget::from_sentinel_url(
            "redis+sentinel://:master-pw@s1:26379,s2:26380/mymaster/2",
            Some(Secret::new("sentinel-pw")),
        )
        .expect("valid");
        assert_eq!(t.db(), 2);
        assert_eq!(t.host_port(), ("s1".to_owned(), 26379));
        assert!(!t.is_tls());
        let s = t.sentinel().expect("sentinel");
        assert_eq!(s.master_name, "mymaster");
        assert_eq!(
            s.sentinel_password.as_ref().map(Secret::expose),
            Some("sentinel-pw")
        );
        let shown = format!("{} {t:?}", t.redacted());
        assert!(
            !shown.contains("master-pw") && !shown.contains("sentinel-pw"),
            "{shown}"
        );
    }

    #[test]
    fn a_socket_target_connects_by_path_with_the_keys_password() {
        let pw = Secret::from("from-file");
        let t = RedisTarget::new(
            "broker_url",
            "redis+socket:///run/r.sock?virtual_host=4",
            Some(&pw),
        )
        .expect("valid");
        assert_eq!(t.url(), "unix:///run/r.sock?db=4&pass=from-file");
        assert_eq!(t.redacted(), "unix:///run/r.sock?db=4&pass=***");
        assert_eq!(format!("{t:?}"), t.redacted());
        assert_eq!(t.db(), 4);
        assert_eq!(t.host_port(), ("/run/r.sock".to_owned(), 0));
        assert!(!t.is_tls() && t.sentinel().is_none());
    }
}
