//! `result_backend = "postgresql://user@host[:port]/db[?sslmode=...]"`: the
//! PostgreSQL result store's target, parsed and checked at start-up so a
//! bad URL is an error naming `result_backend`.

use super::{ConfigError, Secret, invalid, redact_url};

/// How the connection to PostgreSQL is protected (`sslmode` in the URL,
/// with libpq's meanings for the modes taskstack supports).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SslMode {
    /// Plain TCP.
    Disable,
    /// TLS when the server offers it, certificate not verified (libpq's
    /// default when `sslmode` is absent).
    Prefer,
    /// TLS required, certificate not verified.
    Require,
    /// TLS required, certificate chain and host name verified against the
    /// system's roots (and `sslrootcert`, when given).
    VerifyFull,
}

/// A PostgreSQL server and database to keep results in.
#[derive(Clone)]
pub struct PgTarget {
    /// The URL without `sslmode` / `sslrootcert`, password applied.
    url: String,
    pub ssl_mode: SslMode,
    /// A PEM file of CA certificates trusted besides the system's.
    pub ssl_root_cert: Option<std::path::PathBuf>,
}

impl std::fmt::Debug for PgTarget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PgTarget")
            .field("url", &redact_url(&self.url))
            .field("ssl_mode", &self.ssl_mode)
            .finish()
    }
}

/// Whether `raw` names a PostgreSQL server (`postgresql://` or `postgres://`).
pub fn is_postgres_url(raw: &str) -> bool {
    let lower = raw.trim_start().to_ascii_lowercase();
    lower.starts_with("postgresql://") || lower.starts_with("postgres://")
}

impl PgTarget {
    /// Parses `raw` (the value of `key`), applying `password` when given.
    pub fn new(
        key: &'static str,
        raw: &str,
        password: Option<&Secret>,
    ) -> Result<Self, ConfigError> {
        let shown = redact_url(raw);
        let mut url = url::Url::parse(raw).map_err(|e| invalid(key, &shown, &e.to_string()))?;
        if !matches!(url.scheme(), "postgresql" | "postgres") {
            return Err(invalid(
                key,
                &shown,
                "the scheme must be postgresql:// (or redis:// for Redis)",
            ));
        }
        if url.host_str().is_none_or(str::is_empty) {
            return Err(invalid(key, &shown, "the URL names no host"));
        }
        if url.path().trim_start_matches('/').is_empty() {
            return Err(invalid(key, &shown, "the URL names no database (…/dbname)"));
        }
        if url.username().is_empty() {
            return Err(invalid(key, &shown, "the URL names no user (user@host)"));
        }
        let mut ssl_mode = SslMode::Prefer;
        let mut ssl_root_cert = None;
        let mut kept = Vec::new();
        for (k, v) in url.query_pairs() {
            match k.as_ref() {
                "sslmode" => {
                    ssl_mode = match v.as_ref() {
                        "disable" => SslMode::Disable,
                        "prefer" | "allow" => SslMode::Prefer,
                        "require" => SslMode::Require,
                        "verify-full" => SslMode::VerifyFull,
                        other => {
                            return Err(invalid(
                                key,
                                &shown,
                                &format!(
                                    "sslmode={other} is not supported: use disable, prefer, \
                                     require or verify-full"
                                ),
                            ));
                        }
                    }
                }
                "sslrootcert" => ssl_root_cert = Some(std::path::PathBuf::from(v.as_ref())),
                "application_name"
                | "connect_timeout"
                | "options"
                | "host"
                | "port"
                | "keepalives"
                | "keepalives_idle"
                | "target_session_attrs"
                | "user" => {
                    kept.push((k.into_owned(), v.into_owned()));
                }
                other => {
                    return Err(invalid(
                        key,
                        &shown,
                        &format!("unknown URL parameter {other:?}"),
                    ));
                }
            }
        }
        url.set_query(None);
        if !kept.is_empty() {
            url.query_pairs_mut().extend_pairs(kept);
        }
        if let Some(pw) = password {
            url.set_password(Some(pw.expose()))
                .map_err(|()| invalid(key, &shown, "cannot carry a password"))?;
        }
        Ok(Self {
            url: url.into(),
            ssl_mode,
            ssl_root_cert,
        })
    }

    /// A target from a URL (for tests and tools).
    pub fn from_url(raw: &str) -> Result<Self, ConfigError> {
        Self::new("result_backend", raw, None)
    }

    /// The URL including the password, without TLS parameters; never log it.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// The URL with the password hidden.
    pub fn redacted(&self) -> String {
        redact_url(&self.url)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_sslmode_and_applies_the_password() {
        let pw = Secret::new("s3cret".to_owned());
        let t = PgTarget::new(
            "result_backend",
            "postgresql://app@db:5433/results?sslmode=verify-full&application_name=x",
            Some(&pw),
        )
        .expect("valid");
        assert_eq!(t.ssl_mode, SslMode::VerifyFull);
        assert_eq!(
            t.url(),
            "postgresql://app:s3cret@db:5433/results?application_name=x"
        );
        assert!(!format!("{t:?}").contains("s3cret"));
    }

    #[test]
    fn refuses_what_it_cannot_honour_naming_the_key() {
        for (raw, why) in [
            ("postgresql://app@db/results?sslmode=verify-ca", "verify-ca"),
            ("postgresql://app@db/", "no database"),
            ("postgresql://db/results", "no user"),
            ("postgresql://app@db/results?frobnicate=1", "frobnicate"),
        ] {
            let e = PgTarget::from_url(raw).expect_err(raw).to_string();
            assert!(
                e.contains("`result_backend`") && e.contains(why),
                "{raw}: {e}"
            );
        }
    }
}
