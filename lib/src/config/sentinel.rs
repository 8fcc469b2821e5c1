//! Redis Sentinel targets: `redis+sentinel://` and `rediss+sentinel://`
//! URLs, the syntax
//! `redis+sentinel://[user:password@]host:port[,host:port...]/<master name>[/<db>]`.
//!
//! The user and password are the master's (and its replicas'), as in a plain
//! `redis://` URL; the sentinels' own password is a separate key
//! (`sentinel_password` / `sentinel_password_file`), as in Celery's
//! `sentinel_kwargs`. `rediss+sentinel://` speaks TLS to the sentinels and
//! to the master they name.

use super::{ConfigError, Secret, invalid};

/// The port a sentinel listens on when the URL names none.
pub const DEFAULT_SENTINEL_PORT: u16 = 26379;

/// Where to find a master through its sentinels.
#[derive(Clone, PartialEq, Eq)]
pub struct SentinelTarget {
    /// The sentinels, in the order they are asked.
    pub sentinels: Vec<(String, u16)>,
    /// The name the sentinels monitor the master under (`sentinel monitor <name> ...`).
    pub master_name: String,
    /// The database number on the master.
    pub db: i64,
    /// The master's ACL user, if any.
    pub username: Option<String>,
    /// The master's password (from the URL or `*_password(_file)`).
    pub password: Option<Secret>,
    /// The sentinels' own password (`sentinel_password(_file)`).
    pub sentinel_password: Option<Secret>,
    /// TLS to the sentinels and the master (`rediss+sentinel://`).
    pub tls: bool,
}

impl std::fmt::Debug for SentinelTarget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.display(true))
    }
}

impl SentinelTarget {
    /// The target as a URL, password included unless `redacted`.
    pub(crate) fn display(&self, redacted: bool) -> String {
        let scheme = if self.tls {
            "rediss+sentinel"
        } else {
            "redis+sentinel"
        };
        let enc = |s: &str| {
            percent_encoding::utf8_percent_encode(s, percent_encoding::NON_ALPHANUMERIC).to_string()
        };
        let user = self.username.as_deref().map(enc).unwrap_or_default();
        let auth = match (&self.password, user.is_empty()) {
            (Some(_), _) if redacted => format!("{user}:{}@", crate::secret::REDACTED),
            (Some(pw), _) => format!("{user}:{}@", enc(pw.expose())),
            (None, false) => format!("{user}@"),
            (None, true) => String::new(),
        };
        let hosts = self
            .sentinels
            .iter()
            .map(|(h, p)| {
                if h.contains(':') {
                    format!("[{h}]:{p}")
                } else {
                    format!("{h}:{p}")
                }
            })
            .collect::<Vec<_>>()
            .join(",");
        format!(
            "{scheme}://{auth}{hosts}/{}/{}",
            enc(&self.master_name),
            self.db
        )
    }
}

/// Whether `raw` is a Sentinel URL (`redis+sentinel://` or `rediss+sentinel://`).
pub fn is_sentinel_url(raw: &str) -> bool {
    let lower = raw.trim_start().to_ascii_lowercase();
    lower.starts_with("redis+sentinel://") || lower.starts_with("rediss+sentinel://")
}

/// Parses a Sentinel URL for configuration key `key`; `password` (from
/// `*_password(_file)`) overrides the URL's. Errors name the key and say
/// what is wrong; the value is shown with its password hidden.
pub(crate) fn parse_sentinel_url(
    key: &'static str,
    raw: &str,
    password: Option<&Secret>,
) -> Result<SentinelTarget, ConfigError> {
    let shown = redact_sentinel_url(raw);
    let bad = |reason: &str| invalid(key, &shown, reason);
    let (scheme, rest) = raw
        .split_once("://")
        .ok_or_else(|| bad("expected redis+sentinel://host:port[,host:port...]/<master name>"))?;
    let tls = match scheme.to_ascii_lowercase().as_str() {
        "redis+sentinel" => false,
        "rediss+sentinel" => true,
        _ => {
            return Err(bad(
                "the scheme must be redis+sentinel:// or rediss+sentinel://",
            ));
        }
    };
    let (authority, path) = rest.split_once('/').unwrap_or((rest, ""));
    let (userinfo, hosts) = match authority.rsplit_once('@') {
        Some((u, h)) => (Some(u), h),
        None => (None, authority),
    };
    let decode = |what: &str, s: &str| {
        percent_encoding::percent_decode_str(s)
            .decode_utf8()
            .map(|c| c.into_owned())
            .map_err(|_| bad(&format!("the {what} is not valid percent-encoded UTF-8")))
    };
    let (mut username, mut url_password) = (None, None);
    if let Some(u) = userinfo {
        let (user, pw) = match u.split_once(':') {
            Some((user, pw)) => (user, Some(pw)),
            None => (u, None),
        };
        if !user.is_empty() {
            username = Some(decode("user name", user)?);
        }
        if let Some(pw) = pw.filter(|p| !p.is_empty()) {
            url_password = Some(Secret::new(decode("password", pw)?));
        }
    }
    let mut sentinels = Vec::new();
    for h in hosts.split(',') {
        let h = h.trim();
        if h.is_empty() {
            return Err(bad(
                "a sentinel address is empty: list them as host:port,host:port",
            ));
        }
        sentinels.push(parse_host_port(h).map_err(|why| bad(&why))?);
    }
    let path = path.split(['?', '#']).next().unwrap_or("");
    let mut parts = path.split('/').filter(|p| !p.is_empty());
    let master_name = match parts.next() {
        Some(m) => decode("master name", m)?,
        None => {
            return Err(bad(
                "the path must name the master: redis+sentinel://host:port/<master name>[/<db>]",
            ));
        }
    };
    let db = match parts.next() {
        None => 0,
        Some(d) => d.parse::<u16>().map(i64::from).map_err(|_| {
            bad(&format!(
                "after the master name the path may only hold a database number such as /0, not {d:?}"
            ))
        })?,
    };
    if parts.next().is_some() {
        return Err(bad(
            "the path has too many parts: /<master name>[/<db>] is all it may hold",
        ));
    }
    Ok(SentinelTarget {
        sentinels,
        master_name,
        db,
        username,
        password: password.cloned().or(url_password),
        sentinel_password: None,
        tls,
    })
}

fn parse_host_port(h: &str) -> Result<(String, u16), String> {
    let (host, port) = if let Some(rest) = h.strip_prefix('[') {
        let (host, after) = rest
            .split_once(']')
            .ok_or_else(|| format!("sentinel address {h:?} opens [ but does not close it"))?;
        match after.strip_prefix(':') {
            Some(p) => (host, Some(p)),
            None if after.is_empty() => (host, None),
            None => return Err(format!("sentinel address {h:?}: expected [ipv6]:port")),
        }
    } else {
        match h.rsplit_once(':') {
            Some((host, p)) => (host, Some(p)),
            None => (h, None),
        }
    };
    if host.is_empty() {
        return Err(format!("sentinel address {h:?} names no host"));
    }
    let port = match port {
        None => DEFAULT_SENTINEL_PORT,
        Some(p) => p
            .parse::<u16>()
            .ok()
            .filter(|p| *p != 0)
            .ok_or_else(|| format!("sentinel address {h:?}: the port must be 1-65535"))?,
    };
    Ok((host.to_owned(), port))
}

/// `raw` (a Sentinel URL) with its password replaced by `***`.
pub(crate) fn redact_sentinel_url(raw: &str) -> String {
    let Some((scheme, rest)) = raw.split_once("://") else {
        return "<unparseable URL>".into();
    };
    let (authority, path) = match rest.split_once('/') {
        Some((a, p)) => (a, Some(p)),
        None => (rest, None),
    };
    let authority = match authority.rsplit_once('@') {
        Some((userinfo, hosts)) => match userinfo.split_once(':') {
            Some((user, _)) => format!("{user}:{}@{hosts}", crate::secret::REDACTED),
            None => format!("{userinfo}@{hosts}"),
        },
        None => authority.to_owned(),
    };
    match path {
        Some(p) => format!("{scheme}://{authority}/{p}"),
        None => format!("{scheme}://{authority}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(raw: &str) -> Result<SentinelTarget, String> {
        parse_sentinel_url("broker_url", raw, None).map_err(|e| e.to_string())
    }

    #[test]
    fn parses_hosts_master_db_and_credentials() {
        let t =
            parse("redis+sentinel://app:p%40ss@s1:26379,s2:26380,[::1]/mymaster/3").expect("valid");
        assert_eq!(
            t.sentinels,
            [
                ("s1".to_owned(), 26379),
                ("s2".to_owned(), 26380),
                ("::1".to_owned(), DEFAULT_SENTINEL_PORT)
            ]
        );
        assert_eq!(t.master_name, "mymaster");
        assert_eq!(t.db, 3);
        assert_eq!(t.username.as_deref(), Some("app"));
        assert_eq!(t.password.as_ref().map(Secret::expose), Some("p@ss"));
        assert!(!t.tls);
        assert!(!format!("{t:?}").contains("p%40ss"));
        assert_eq!(
            t.display(false),
            "redis+sentinel://app:p%40ss@s1:26379,s2:26380,[::1]:26379/mymaster/3"
        );
        let t = parse("rediss+sentinel://:pw@s1:1/m").expect("valid");
        assert!(t.tls);
        assert_eq!(t.db, 0);
        assert_eq!(t.username, None);
    }

    #[test]
    fn the_password_key_overrides_the_url() {
        let pw = Secret::new("from-file");
        let t = parse_sentinel_url("result_backend", "redis+sentinel://:x@s1:1/m", Some(&pw))
            .expect("valid");
        assert_eq!(t.password.as_ref().map(Secret::expose), Some("from-file"));
    }

    #[test]
    fn errors_name_the_key_say_what_is_wrong_and_hide_the_password() {
        for (raw, says) in [
            ("redis+sentinel://:hunter2@s1:26379", "must name the master"),
            (
                "redis+sentinel://:hunter2@s1:26379/",
                "must name the master",
            ),
            ("redis+sentinel://:hunter2@s1:x/m", "port must be 1-65535"),
            (
                "redis+sentinel://:hunter2@s1:1,,s2:2/m",
                "sentinel address is empty",
            ),
            ("redis+sentinel://:hunter2@:1/m", "names no host"),
            ("redis+sentinel://:hunter2@s1:1/m/zero", "database number"),
            ("redis+sentinel://:hunter2@s1:1/m/0/x", "too many parts"),
            (
                "sentinel://:hunter2@s1:1/m",
                "scheme must be redis+sentinel",
            ),
        ] {
            let e = parse(raw).expect_err(raw);
            assert!(e.contains("`broker_url`") && e.contains(says), "{raw}: {e}");
            assert!(!e.contains("hunter2"), "{raw}: {e}");
        }
    }

    #[test]
    fn recognises_both_schemes() {
        assert!(is_sentinel_url("redis+sentinel://s:1/m"));
        assert!(is_sentinel_url("REDISS+SENTINEL://s:1/m"));
        assert!(!is_sentinel_url("redis://s:1/0"));
        assert_eq!(
            redact_sentinel_url("redis+sentinel://u:pw@a:1,b:2/m/1"),
            "redis+sentinel://u:***@a:1,b:2/m/1"
        );
    }
}
