//! Redis over a Unix domain socket, for services on the host Redis runs on:
//! `unix:///path/to/redis.sock?db=N` (redis-py's form) or
//! `redis+socket:///path/to/redis.sock?virtual_host=N` (Celery's and
//! kombu's). A password is the URL's (`unix://:password@/path`, or the
//! `password` parameter) or the key's `*_password(_file)`.
//!
//! A round trip is shorter on a socket than on loopback TCP, which lowers
//! an idle worker's enqueue-to-result latency (README, "Performance").

use super::{ConfigError, Secret, invalid};
use crate::secret::REDACTED;

/// Whether `raw` names Redis through a Unix socket.
pub fn is_socket_url(raw: &str) -> bool {
    let lower = |p: &str| {
        raw.get(..p.len())
            .is_some_and(|h| h.eq_ignore_ascii_case(p))
    };
    lower("unix://") || lower("redis+socket://")
}

/// A Redis server behind a Unix socket (the password's `Debug` is redacted).
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) struct SocketTarget {
    /// The socket's absolute path.
    pub path: String,
    pub db: u16,
    pub username: Option<String>,
    pub password: Option<Secret>,
}

impl SocketTarget {
    /// The URL redis-rs connects with (`unix:///path?db=N&user=..&pass=..`),
    /// the password shown unless `redacted`.
    pub fn client_url(&self, redacted: bool) -> String {
        let mut u = url::Url::parse("unix:///").expect("a constant URL");
        u.set_path(&self.path);
        {
            let mut q = u.query_pairs_mut();
            q.append_pair("db", &self.db.to_string());
            if let Some(user) = &self.username {
                q.append_pair("user", user);
            }
            if let Some(pw) = &self.password {
                q.append_pair("pass", if redacted { REDACTED } else { pw.expose() });
            }
        }
        u.into()
    }
}

/// Parses a socket URL for `key`; `password` (from `*_password(_file)`)
/// overrides the URL's.
pub(super) fn parse_socket_url(
    key: &'static str,
    raw: &str,
    password: Option<&Secret>,
) -> Result<SocketTarget, ConfigError> {
    let shown = redact_socket_url(raw);
    let bad = |why: &str| invalid(key, &shown, why);
    let (userinfo, rest) = split_userinfo(raw);
    let url = url::Url::parse(&rest).map_err(|e| bad(&e.to_string()))?;
    if url.host_str().is_some_and(|h| !h.is_empty()) {
        return Err(bad(
            "a socket URL names a path, not a host: write three slashes, as in \
             unix:///run/redis/redis.sock",
        ));
    }
    if url.port().is_some() {
        return Err(bad("a socket URL has no port"));
    }
    let path = decode(url.path(), &bad)?;
    if !path.starts_with('/') || path.ends_with('/') {
        return Err(bad(
            "the URL names no socket file: give its absolute path, as in \
             unix:///run/redis/redis.sock",
        ));
    }
    let (user, pass) = match userinfo {
        Some(u) => u.split_once(':').map_or((u, None), |(u, p)| (u, Some(p))),
        None => ("", None),
    };
    let mut target = SocketTarget {
        path,
        db: 0,
        username: Some(user)
            .filter(|u| !u.is_empty())
            .map(|u| decode(u, &bad))
            .transpose()?,
        password: pass
            .map(|p| decode(p, &bad).map(Secret::from))
            .transpose()?,
    };
    let mut db_seen = false;
    for (name, value) in url.query_pairs() {
        match name.as_ref() {
            "db" | "virtual_host" if db_seen => {
                return Err(bad("the database is given twice (db and virtual_host)"));
            }
            "db" | "virtual_host" => {
                db_seen = true;
                target.db = value.parse().map_err(|_| {
                    bad(&format!(
                        "{name}={value} is not a database number (such as {name}=0)"
                    ))
                })?;
            }
            "password" if target.password.is_some() => {
                return Err(bad("the password is given twice (before @ and password=)"));
            }
            "password" => target.password = Some(Secret::from(value.into_owned())),
            other => {
                return Err(bad(&format!(
                    "unknown parameter {other:?}: a socket URL takes db (or virtual_host) \
                     and password"
                )));
            }
        }
    }
    if let Some(pw) = password {
        target.password = Some(pw.clone());
    }
    Ok(target)
}

/// `raw` split into its user information (before `@`) and the URL without
/// it: the url crate refuses a user or password without a host, which
/// kombu's `redis+socket://:password@/path` has.
fn split_userinfo(raw: &str) -> (Option<&str>, String) {
    let Some((scheme, rest)) = raw.split_once("://") else {
        return (None, raw.to_owned());
    };
    let authority = &rest[..rest.find(['/', '?', '#']).unwrap_or(rest.len())];
    match authority.rfind('@') {
        Some(at) => (Some(&rest[..at]), format!("{scheme}://{}", &rest[at + 1..])),
        None => (None, raw.to_owned()),
    }
}

fn decode(s: &str, bad: &impl Fn(&str) -> ConfigError) -> Result<String, ConfigError> {
    percent_encoding::percent_decode_str(s)
        .decode_utf8()
        .map(std::borrow::Cow::into_owned)
        .map_err(|_| bad("the path, user or password is not UTF-8"))
}

/// `raw` with its password (before `@`, or a `password`/`pass` parameter)
/// hidden.
pub(crate) fn redact_socket_url(raw: &str) -> String {
    // The Sentinel redaction hides the password before `@` of any URL.
    let shown = super::redact_sentinel_url(raw);
    let Some((base, query)) = shown.split_once('?') else {
        return shown;
    };
    let pairs = url::form_urlencoded::parse(query.as_bytes()).map(|(k, v)| {
        let v = if k == "password" || k == "pass" {
            REDACTED.into()
        } else {
            v
        };
        (k, v)
    });
    let query = url::form_urlencoded::Serializer::new(String::new())
        .extend_pairs(pairs)
        .finish();
    format!("{base}?{query}")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(raw: &str) -> Result<SocketTarget, String> {
        parse_socket_url("broker_url", raw, None).map_err(|e| e.to_string())
    }

    #[test]
    fn both_forms_name_the_path_and_database() {
        assert!(is_socket_url("unix:///run/r.sock"));
        assert!(is_socket_url("REDIS+SOCKET:///run/r.sock"));
        assert!(!is_socket_url("redis://h:1/0"));
        let t = parse("unix:///run/redis/redis.sock?db=3").expect("valid");
        assert_eq!((t.path.as_str(), t.db), ("/run/redis/redis.sock", 3));
        assert_eq!(t.client_url(false), "unix:///run/redis/redis.sock?db=3");
        let t = parse("redis+socket:///tmp/a%20b.sock?virtual_host=5").expect("valid");
        assert_eq!((t.path.as_str(), t.db), ("/tmp/a b.sock", 5));
        assert_eq!(t.client_url(false), "unix:///tmp/a%20b.sock?db=5");
        let t = parse("unix:///r.sock").expect("valid");
        assert_eq!((t.db, t.password.is_none()), (0, true));
    }

    #[test]
    fn a_password_comes_from_the_url_or_the_key_and_is_redacted() {
        let t = parse("redis+socket://:p%40ss@/r.sock").expect("valid");
        assert_eq!(t.password.as_ref().map(Secret::expose), Some("p@ss"));
        assert_eq!(t.client_url(false), "unix:///r.sock?db=0&pass=p%40ss");
        assert_eq!(t.client_url(true), "unix:///r.sock?db=0&pass=***");
        let t = parse("unix://app:pw@/r.sock?db=1").expect("valid");
        assert_eq!(t.username.as_deref(), Some("app"));
        assert_eq!(t.client_url(false), "unix:///r.sock?db=1&user=app&pass=pw");
        let t = parse("unix:///r.sock?password=pw").expect("valid");
        assert_eq!(t.password.as_ref().map(Secret::expose), Some("pw"));
        let file = Secret::from("from-file");
        let t = parse_socket_url("broker_url", "unix://:pw@/r.sock", Some(&file)).expect("valid");
        assert_eq!(t.password.as_ref().map(Secret::expose), Some("from-file"));
        for (raw, shown) in [
            ("unix://:pw@/r.sock", "unix://:***@/r.sock"),
            ("unix://app:pw@/r.sock", "unix://app:***@/r.sock"),
            ("unix://app@/r.sock", "unix://app@/r.sock"),
            (
                "unix:///r.sock?db=1&password=pw",
                "unix:///r.sock?db=1&password=***",
            ),
        ] {
            assert_eq!(redact_socket_url(raw), shown, "{raw}");
        }
    }

    #[test]
    fn a_bad_socket_url_is_refused_with_what_is_wrong() {
        for (raw, why) in [
            ("unix://redis/r.sock", "not a host"),
            ("unix://", "no socket file"),
            ("unix:///run/", "no socket file"),
            ("unix:///r.sock?db=x", "db=x is not a database number"),
            (
                "unix:///r.sock?db=70000",
                "db=70000 is not a database number",
            ),
            ("unix:///r.sock?db=1&virtual_host=2", "given twice"),
            ("unix:///r.sock?timeout=5", "unknown parameter \"timeout\""),
            ("unix://:a@/r.sock?password=b", "password is given twice"),
        ] {
            let err = parse(raw).expect_err(raw);
            assert!(err.contains(why), "{raw}: {err}");
            assert!(err.contains("broker_url"), "{raw}: {err}");
        }
        let err = parse("unix://:secret@/r.sock?db=x").expect_err("bad db");
        assert!(!err.contains("secret"), "{err}");
    }
}
