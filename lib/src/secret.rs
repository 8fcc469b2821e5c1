//! Values that must never reach a log line or a printed configuration.
//!
//! [`Secret`] (a password, an API token) and [`SecretUrl`] (a URL that may
//! carry a password) show `***` in place of the secret in `Debug`,
//! `Display` and `Serialize`, so deriving those on a struct that holds them
//! (the [`Config`](crate::config::Config), settings structs) is safe by
//! construction instead of by a hand-kept list of keys to hide. The value
//! itself is reachable only through an explicit `expose()`, called where a
//! connection is made or a token compared.

use serde::{Deserialize, Deserializer, Serialize, Serializer};
use std::fmt;

/// What a secret is shown as.
pub const REDACTED: &str = "***";

/// A secret string. Deserializes from a plain string; serializes (and
/// prints) as [`REDACTED`], so a serialized configuration does not read
/// back with its secrets.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: impl Into<String>) -> Self {
        Self(value.into())
    }

    /// The secret itself: only to hand to a connection or a comparison,
    /// never to a log line or an error message.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl From<String> for Secret {
    fn from(value: String) -> Self {
        Self(value)
    }
}

impl From<&str> for Secret {
    fn from(value: &str) -> Self {
        Self(value.to_owned())
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(REDACTED)
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(REDACTED)
    }
}

impl Serialize for Secret {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(REDACTED)
    }
}

impl<'de> Deserialize<'de> for Secret {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        String::deserialize(d).map(Self)
    }
}

/// A URL that may carry a password (`redis://user:pass@host/0`): shown,
/// printed and serialized with the password replaced by [`REDACTED`]
/// (everything else stays, so logs still say where it points).
#[derive(Clone, PartialEq, Eq)]
pub struct SecretUrl(String);

impl SecretUrl {
    pub fn new(value: impl Into<String>) -> Self {
        Self(value.into())
    }

    /// The URL with its password: only to connect with.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl From<&str> for SecretUrl {
    fn from(value: &str) -> Self {
        Self(value.to_owned())
    }
}

impl fmt::Debug for SecretUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}", redact_url(&self.0))
    }
}

impl fmt::Display for SecretUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&redact_url(&self.0))
    }
}

impl Serialize for SecretUrl {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&redact_url(&self.0))
    }
}

impl<'de> Deserialize<'de> for SecretUrl {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        String::deserialize(d).map(Self)
    }
}

/// `raw` with any password replaced by [`REDACTED`]; a URL that does not
/// parse is not shown at all (it might be a password pasted in the wrong
/// place).
pub fn redact_url(raw: &str) -> String {
    if crate::config::is_sentinel_url(raw) {
        return crate::config::redact_sentinel_url(raw);
    }
    if crate::config::is_socket_url(raw) {
        return crate::config::redact_socket_url(raw);
    }
    match url::Url::parse(raw) {
        Ok(mut u) if u.password().is_some() => {
            let _ = u.set_password(Some(REDACTED));
            u.to_string()
        }
        Ok(u) => u.to_string(),
        Err(_) => "<unparseable URL>".into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_secret_is_redacted_in_debug_display_and_serialize() {
        let s: Secret = serde_json::from_value(serde_json::json!("hunter2-hunter2")).expect("str");
        assert_eq!(s.expose(), "hunter2-hunter2");
        assert_eq!(format!("{s:?}"), REDACTED);
        assert_eq!(format!("{s:#?}"), REDACTED);
        assert_eq!(s.to_string(), REDACTED);
        assert_eq!(
            serde_json::to_string(&s).expect("json"),
            format!("\"{REDACTED}\"")
        );
        // Inside derived impls too.
        #[derive(Debug, Serialize)]
        struct Holder {
            list: Vec<Secret>,
            maybe: Option<Secret>,
        }
        let h = Holder {
            list: vec![s.clone()],
            maybe: Some(s),
        };
        let shown = format!("{h:?} {h:#?} {}", serde_json::to_string(&h).expect("json"));
        assert!(!shown.contains("hunter2"), "{shown}");
    }

    #[test]
    fn a_secret_must_be_a_string() {
        assert!(serde_json::from_value::<Secret>(serde_json::json!(12)).is_err());
    }

    #[test]
    fn a_url_keeps_everything_but_its_password() {
        let u: SecretUrl =
            serde_json::from_value(serde_json::json!("redis://app:pa55word@redis:6379/2"))
                .expect("str");
        assert_eq!(u.expose(), "redis://app:pa55word@redis:6379/2");
        let redacted = format!("redis://app:{REDACTED}@redis:6379/2");
        assert_eq!(u.to_string(), redacted);
        assert_eq!(format!("{u:?}"), format!("{redacted:?}"));
        assert_eq!(
            serde_json::to_value(&u).expect("json"),
            serde_json::json!(redacted)
        );
        let plain = SecretUrl::from("redis://127.0.0.1:6379/0");
        assert_eq!(plain.to_string(), "redis://127.0.0.1:6379/0");
        assert_eq!(
            SecretUrl::from("pa55word not a url").to_string(),
            "<unparseable URL>"
        );
    }
}
