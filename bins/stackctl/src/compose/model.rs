//! The subset of the Compose file format that `stackctl` understands, as
//! serde types that refuse every other key (`deny_unknown_fields`), so a
//! key stackctl would not apply is an error, never silently ignored.
//! Extension keys (`x-...`) are removed before these types see the file.

use serde::Deserialize;
use std::collections::BTreeMap;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawFile {
    /// Obsolete in the Compose specification; accepted and not used.
    #[allow(dead_code)]
    pub version: Option<Scalar>,
    pub name: Option<String>,
    pub services: BTreeMap<String, RawService>,
    #[serde(default)]
    pub networks: BTreeMap<String, Option<RawNetwork>>,
    #[serde(default)]
    pub volumes: BTreeMap<String, Option<RawVolume>>,
    #[serde(default)]
    pub secrets: BTreeMap<String, RawSecret>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawService {
    /// The service runs only when one of these profiles is enabled
    /// (`COMPOSE_PROFILES`, `--profile`).
    #[serde(default)]
    pub profiles: Vec<String>,
    pub image: Option<String>,
    pub command: Option<StringOrList>,
    pub user: Option<Scalar>,
    pub environment: Option<MapOrList>,
    #[serde(default)]
    pub volumes: Vec<String>,
    #[serde(default)]
    pub secrets: Vec<String>,
    pub networks: Option<NetworkRefs>,
    #[serde(default)]
    pub ports: Vec<Scalar>,
    pub healthcheck: Option<RawHealthcheck>,
    pub depends_on: Option<DependsOn>,
    pub deploy: Option<RawDeploy>,
    pub restart: Option<String>,
    pub init: Option<Flag>,
    pub read_only: Option<Flag>,
    pub tmpfs: Option<StringOrList>,
    #[serde(default)]
    pub cap_drop: Vec<String>,
    #[serde(default)]
    pub security_opt: Vec<String>,
    pub logging: Option<RawLogging>,
    pub stop_grace_period: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawHealthcheck {
    pub test: Option<StringOrList>,
    pub interval: Option<String>,
    pub timeout: Option<String>,
    pub retries: Option<Scalar>,
    pub start_period: Option<String>,
    #[serde(default)]
    pub disable: bool,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawDeploy {
    pub replicas: Option<Scalar>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawLogging {
    pub driver: Option<String>,
    #[serde(default)]
    pub options: BTreeMap<String, Scalar>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawNetwork {
    #[serde(default)]
    pub internal: bool,
    pub driver: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawVolume {
    pub driver: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawSecret {
    pub file: String,
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum StringOrList {
    String(String),
    List(Vec<Scalar>),
}

impl StringOrList {
    /// The list form; a string is split like a shell would (quotes respected).
    pub fn into_list(self) -> Vec<String> {
        match self {
            Self::List(l) => l.into_iter().map(Scalar::into_string).collect(),
            Self::String(s) => shell_split(&s),
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum MapOrList {
    Map(BTreeMap<String, Option<Scalar>>),
    List(Vec<String>),
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum NetworkRefs {
    List(Vec<String>),
    Map(BTreeMap<String, Option<EmptyNetworkRef>>),
}

/// A service's network entry in the map form, with no settings.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EmptyNetworkRef {}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum DependsOn {
    List(Vec<String>),
    Map(BTreeMap<String, RawDependency>),
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawDependency {
    pub condition: Option<String>,
}

/// A YAML scalar taken as text (interpolation makes every value a string,
/// so numbers and booleans are accepted in either form).
#[derive(Debug, Deserialize, Clone)]
#[serde(untagged)]
pub enum Scalar {
    String(String),
    Int(i64),
    Float(f64),
    Bool(bool),
}

impl Scalar {
    pub fn into_string(self) -> String {
        match self {
            Self::String(s) => s,
            Self::Int(i) => i.to_string(),
            Self::Float(f) => f.to_string(),
            Self::Bool(b) => b.to_string(),
        }
    }
}

/// A boolean, also as the strings `true`/`false` (after interpolation).
#[derive(Debug, Deserialize, Clone)]
#[serde(untagged)]
pub enum Flag {
    Bool(bool),
    String(String),
}

/// Splits a command string into words like a POSIX shell (single and double
/// quotes, backslash escapes), without any expansion.
pub fn shell_split(s: &str) -> Vec<String> {
    let mut words = Vec::new();
    let mut word = String::new();
    let mut in_word = false;
    let mut chars = s.chars();
    let mut quote: Option<char> = None;
    while let Some(c) = chars.next() {
        match (quote, c) {
            (Some(q), c) if c == q => quote = None,
            (Some('"'), '\\') => {
                if let Some(n) = chars.next() {
                    word.push(n);
                }
            }
            (Some(_), c) => word.push(c),
            (None, '\'' | '"') => {
                quote = Some(c);
                in_word = true;
            }
            (None, '\\') => {
                if let Some(n) = chars.next() {
                    word.push(n);
                    in_word = true;
                }
            }
            (None, c) if c.is_whitespace() => {
                if in_word {
                    words.push(std::mem::take(&mut word));
                    in_word = false;
                }
            }
            (None, c) => {
                word.push(c);
                in_word = true;
            }
        }
    }
    if in_word {
        words.push(word);
    }
    words
}

#[cfg(test)]
mod tests {
    use super::shell_split;

    #[test]
    fn splits_like_a_shell() {
        assert_eq!(
            shell_split("redis-server /etc/r.conf"),
            ["redis-server", "/etc/r.conf"]
        );
        assert_eq!(
            shell_split(r#"a "b c" 'd e' f\ g"#),
            ["a", "b c", "d e", "f g"]
        );
        assert_eq!(shell_split("  "), Vec::<String>::new());
        assert_eq!(shell_split("''"), [""]);
    }
}
