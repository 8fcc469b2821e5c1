//! Declared tasks: `[tasks."name"]` tables of the worker's TOML file, each
//! a program (`exec = [argv...]`) or an HTTP endpoint (`http = "url"`) the
//! stock worker runs without recompiling.
//!
//! The syntax is checked here, when any binary loads the file (an unknown
//! key, a wrong type, both or neither of `exec`/`http`, a URL without a
//! scheme), with an error naming the task and the key. What depends on the
//! worker's machine (the program exists, the secret file is readable) is
//! checked when the worker builds its registry.

use serde::de::{self, Deserializer};
use serde::ser::{SerializeMap as _, Serializer};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value, json};
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

/// Every `[tasks."name"]` table, by task name.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct DeclaredTasks(pub BTreeMap<String, TaskDecl>);

impl DeclaredTasks {
    /// Whether no task is declared.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// The declarations by name, sorted.
    pub fn iter(&self) -> impl Iterator<Item = (&String, &TaskDecl)> {
        self.0.iter()
    }
}

/// One declared task.
#[derive(Debug, Clone, PartialEq)]
pub struct TaskDecl {
    pub kind: TaskKind,
    /// Retries allowed after the first attempt (default: as for built-in tasks).
    pub max_retries: Option<u32>,
    /// First backoff before a retry, doubled each time, with jitter.
    pub retry_backoff: Option<Duration>,
    /// Starts a second on one worker (`"10/s"`, `"100/m"`, `"5/h"`).
    pub rate_limit: Option<super::RateLimit>,
}

/// What runs the task.
#[derive(Debug, Clone, PartialEq)]
pub enum TaskKind {
    Exec(ExecDecl),
    Http(HttpDecl),
}

/// A program run once per task (`exec = [...]`).
#[derive(Debug, Clone, PartialEq)]
pub struct ExecDecl {
    /// The program and its arguments; no shell.
    pub argv: Vec<String>,
    /// Hard limit: the program's process group is terminated, then killed.
    pub time_limit: Option<Duration>,
    /// Soft limit: the program's process group gets SIGTERM.
    pub soft_time_limit: Option<Duration>,
    /// Added to the program's minimal environment.
    pub env: BTreeMap<String, String>,
    /// The program's working directory (default: the worker's).
    pub cwd: Option<PathBuf>,
}

/// An endpoint POSTed once per task (`http = "url"`).
#[derive(Debug, Clone, PartialEq)]
pub struct HttpDecl {
    pub url: url::Url,
    /// Per-request timeout (connection, request and answer together).
    pub timeout: Option<Duration>,
    /// A file holding the HMAC key requests are signed with.
    pub secret_file: Option<PathBuf>,
}

const COMMON_KEYS: &[&str] = &["max_retries", "retry_backoff", "rate_limit"];
const EXEC_KEYS: &[&str] = &["exec", "time_limit", "soft_time_limit", "env", "cwd"];
const HTTP_KEYS: &[&str] = &["http", "timeout", "secret_file"];

/// Why a declaration is refused: the task, the key, and what is wrong.
fn refuse(task: &str, key: &str, reason: impl std::fmt::Display) -> String {
    format!("task `{task}`: key `{key}`: {reason}")
}

impl TaskDecl {
    /// Reads one `[tasks."name"]` table.
    pub fn parse(name: &str, table: &Value) -> Result<Self, String> {
        if name.trim().is_empty() || name.chars().any(char::is_control) {
            return Err(format!(
                "task name {name:?} is empty or has control characters"
            ));
        }
        let Some(t) = table.as_object() else {
            return Err(format!(
                "task `{name}`: expected a table ([tasks.\"{name}\"]) with `exec` or `http`, found {table}"
            ));
        };
        let kind = match (t.get("exec"), t.get("http")) {
            (Some(_), Some(_)) => {
                return Err(refuse(
                    name,
                    "http",
                    "a task has `exec` or `http`, not both",
                ));
            }
            (None, None) => {
                return Err(format!(
                    "task `{name}`: needs `exec` (exec = [\"/path/to/program\", ...]) or `http` (http = \"http://host/path\")"
                ));
            }
            (Some(_), None) => "exec",
            (None, Some(_)) => "http",
        };
        let own = if kind == "exec" { EXEC_KEYS } else { HTTP_KEYS };
        for key in t.keys() {
            if own.contains(&key.as_str()) || COMMON_KEYS.contains(&key.as_str()) {
                continue;
            }
            let reason = if EXEC_KEYS.contains(&key.as_str()) {
                "applies to `exec` tasks only".to_owned()
            } else if HTTP_KEYS.contains(&key.as_str()) {
                "applies to `http` tasks only".to_owned()
            } else {
                format!(
                    "unknown key; a `{kind}` task takes {}",
                    own.iter()
                        .chain(COMMON_KEYS)
                        .map(|k| format!("`{k}`"))
                        .collect::<Vec<_>>()
                        .join(", ")
                )
            };
            return Err(refuse(name, key, reason));
        }
        let dur = |key: &str| -> Result<Option<Duration>, String> {
            t.get(key)
                .map(|v| {
                    super::de::duration(v.clone())
                        .map_err(|e: serde_json::Error| refuse(name, key, e))
                })
                .transpose()
        };
        let max_retries = t
            .get("max_retries")
            .map(|v| {
                v.as_u64()
                    .and_then(|n| u32::try_from(n).ok())
                    .ok_or_else(|| {
                        refuse(
                            name,
                            "max_retries",
                            format!("{v} is not a count (0 or more)"),
                        )
                    })
            })
            .transpose()?;
        let retry_backoff = dur("retry_backoff")?;
        let rate_limit = super::annotations::rate_limit(t.get("rate_limit"))
            .map_err(|e| refuse(name, "rate_limit", e))?;
        let kind = if kind == "exec" {
            TaskKind::Exec(ExecDecl {
                argv: argv(name, &t["exec"])?,
                time_limit: positive(name, "time_limit", dur("time_limit")?)?,
                soft_time_limit: positive(name, "soft_time_limit", dur("soft_time_limit")?)?,
                env: env(name, t.get("env"))?,
                cwd: t
                    .get("cwd")
                    .map(|v| match v.as_str() {
                        Some(s) if !s.is_empty() => Ok(PathBuf::from(s)),
                        _ => Err(refuse(name, "cwd", format!("{v} is not a directory path"))),
                    })
                    .transpose()?,
            })
        } else {
            TaskKind::Http(HttpDecl {
                url: http_url(name, &t["http"])?,
                timeout: positive(name, "timeout", dur("timeout")?)?,
                secret_file: t
                    .get("secret_file")
                    .map(|v| match v.as_str() {
                        Some(s) if !s.is_empty() => Ok(PathBuf::from(s)),
                        _ => Err(refuse(
                            name,
                            "secret_file",
                            format!("{v} is not a file path"),
                        )),
                    })
                    .transpose()?,
            })
        };
        Ok(Self {
            kind,
            max_retries,
            retry_backoff,
            rate_limit,
        })
    }

    fn to_value(&self) -> Value {
        let mut m = Map::new();
        match &self.kind {
            TaskKind::Exec(e) => {
                m.insert("exec".into(), json!(e.argv));
                let secs = |d: Duration| humantime::format_duration(d).to_string();
                if let Some(d) = e.time_limit {
                    m.insert("time_limit".into(), json!(secs(d)));
                }
                if let Some(d) = e.soft_time_limit {
                    m.insert("soft_time_limit".into(), json!(secs(d)));
                }
                if !e.env.is_empty() {
                    // Values may be credentials: shown redacted, like secrets.
                    let env: Map<String, Value> =
                        e.env.keys().map(|k| (k.clone(), json!("***"))).collect();
                    m.insert("env".into(), Value::Object(env));
                }
                if let Some(c) = &e.cwd {
                    m.insert("cwd".into(), json!(c));
                }
            }
            TaskKind::Http(h) => {
                m.insert(
                    "http".into(),
                    json!(crate::secret::redact_url(h.url.as_str())),
                );
                if let Some(d) = h.timeout {
                    m.insert(
                        "timeout".into(),
                        json!(humantime::format_duration(d).to_string()),
                    );
                }
                if let Some(f) = &h.secret_file {
                    m.insert("secret_file".into(), json!(f));
                }
            }
        }
        if let Some(n) = self.max_retries {
            m.insert("max_retries".into(), json!(n));
        }
        if let Some(d) = self.retry_backoff {
            m.insert(
                "retry_backoff".into(),
                json!(humantime::format_duration(d).to_string()),
            );
        }
        if let Some(r) = &self.rate_limit {
            m.insert("rate_limit".into(), json!(r.to_string()));
        }
        Value::Object(m)
    }
}

fn positive(task: &str, key: &str, d: Option<Duration>) -> Result<Option<Duration>, String> {
    match d {
        Some(d) if d.is_zero() => Err(refuse(task, key, "must be more than zero")),
        d => Ok(d),
    }
}

fn argv(task: &str, v: &Value) -> Result<Vec<String>, String> {
    let bad = || {
        refuse(
            task,
            "exec",
            format!(
                "{v} is not a list of strings such as [\"/usr/bin/python3\", \"-m\", \"app.task\"] (no shell is used)"
            ),
        )
    };
    let items = v.as_array().ok_or_else(bad)?;
    let argv: Vec<String> = items
        .iter()
        .map(|a| a.as_str().map(str::to_owned))
        .collect::<Option<_>>()
        .ok_or_else(bad)?;
    match argv.first() {
        None => Err(refuse(
            task,
            "exec",
            "the list is empty; it starts with the program",
        )),
        Some(p) if p.is_empty() => Err(refuse(task, "exec", "the program (first item) is empty")),
        Some(_) if argv.iter().any(|a| a.contains('\0')) => {
            Err(refuse(task, "exec", "an argument contains a NUL character"))
        }
        Some(_) => Ok(argv),
    }
}

fn env(task: &str, v: Option<&Value>) -> Result<BTreeMap<String, String>, String> {
    let Some(v) = v else {
        return Ok(BTreeMap::new());
    };
    let t = v
        .as_object()
        .ok_or_else(|| refuse(task, "env", "expected a table such as { NAME = \"value\" }"))?;
    t.iter()
        .map(|(k, val)| {
            if k.is_empty() || k.contains('=') || k.contains('\0') {
                return Err(refuse(task, "env", format!("{k:?} is not a variable name")));
            }
            let s = match val {
                Value::String(s) => s.clone(),
                Value::Number(n) => n.to_string(),
                Value::Bool(b) => b.to_string(),
                other => {
                    return Err(refuse(task, "env", format!("{k}: {other} is not a string")));
                }
            };
            if s.contains('\0') {
                return Err(refuse(task, "env", format!("{k}: the value contains NUL")));
            }
            Ok((k.clone(), s))
        })
        .collect()
}

fn http_url(task: &str, v: &Value) -> Result<url::Url, String> {
    let s = v
        .as_str()
        .ok_or_else(|| refuse(task, "http", format!("{v} is not a URL string")))?;
    let u = url::Url::parse(s).map_err(|e| {
        refuse(
            task,
            "http",
            format!(
                "{s:?} is not a URL ({e}); write it whole, such as http://app:8000/tasks/{task}"
            ),
        )
    })?;
    match u.scheme() {
        "http" if u.host_str().is_some_and(|h| !h.is_empty()) => Ok(u),
        "http" => Err(refuse(task, "http", format!("{s:?} has no host"))),
        "https" => Err(refuse(
            task,
            "http",
            format!(
                "{s:?}: https is not supported yet; use http:// to a service on the same network"
            ),
        )),
        other => Err(refuse(
            task,
            "http",
            format!("{s:?} has scheme `{other}`; use http://host:port/path"),
        )),
    }
}

impl<'de> Deserialize<'de> for DeclaredTasks {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let raw = BTreeMap::<String, Value>::deserialize(d).map_err(|e| {
            de::Error::custom(format!(
                "expected [tasks.\"name\"] tables, each with `exec` or `http` ({e})"
            ))
        })?;
        raw.iter()
            .map(|(name, v)| Ok((name.clone(), TaskDecl::parse(name, v)?)))
            .collect::<Result<_, String>>()
            .map(Self)
            .map_err(de::Error::custom)
    }
}

impl Serialize for DeclaredTasks {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut m = s.serialize_map(Some(self.0.len()))?;
        for (name, decl) in &self.0 {
            m.serialize_entry(name, &decl.to_value())?;
        }
        m.end()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(name: &str, v: Value) -> Result<TaskDecl, String> {
        TaskDecl::parse(name, &v)
    }

    #[test]
    fn an_exec_task_with_every_key() {
        let d = parse(
            "reports.render",
            json!({
                "exec": ["/usr/bin/python3", "-m", "reports.render"],
                "time_limit": "5m", "soft_time_limit": 240, "max_retries": 5,
                "retry_backoff": "2s", "env": { "BUCKET": "b", "N": 3 }, "cwd": "/srv",
                "rate_limit": "30/m",
            }),
        )
        .expect("valid");
        assert_eq!(d.rate_limit.as_ref().map(|r| r.per_second()), Some(0.5));
        assert_eq!(d.max_retries, Some(5));
        assert_eq!(d.retry_backoff, Some(Duration::from_secs(2)));
        let TaskKind::Exec(e) = d.kind else {
            panic!("exec")
        };
        assert_eq!(e.argv, ["/usr/bin/python3", "-m", "reports.render"]);
        assert_eq!(e.time_limit, Some(Duration::from_secs(300)));
        assert_eq!(e.soft_time_limit, Some(Duration::from_secs(240)));
        assert_eq!(e.env["N"], "3");
        assert_eq!(e.cwd, Some(PathBuf::from("/srv")));
    }

    #[test]
    fn an_http_task_with_every_key() {
        let d = parse(
            "billing.charge",
            json!({ "http": "http://app:8000/tasks/billing.charge", "timeout": "30s",
                    "secret_file": "/run/secrets/k", "max_retries": 0 }),
        )
        .expect("valid");
        let TaskKind::Http(h) = d.kind else {
            panic!("http")
        };
        assert_eq!(h.url.as_str(), "http://app:8000/tasks/billing.charge");
        assert_eq!(h.timeout, Some(Duration::from_secs(30)));
        assert_eq!(d.max_retries, Some(0));
    }

    #[track_caller]
    fn refused(name: &str, v: Value, want: &[&str]) {
        let e = parse(name, v).expect_err("refused");
        assert!(e.contains(&format!("task `{name}`")), "{e}");
        for w in want {
            assert!(e.contains(w), "{e:?} should contain {w:?}");
        }
    }

    #[test]
    fn bad_declarations_name_the_task_and_the_key() {
        refused(
            "t",
            json!({ "exec": ["/bin/true"], "http": "http://a/" }),
            &["`http`", "not both"],
        );
        refused("t", json!({ "time_limit": "1s" }), &["needs `exec`"]);
        refused(
            "t",
            json!({ "exec": ["/bin/true"], "tiemout": "1s" }),
            &["key `tiemout`", "unknown key"],
        );
        refused(
            "t",
            json!({ "exec": ["/bin/true"], "timeout": "1s" }),
            &["key `timeout`", "`http` tasks only"],
        );
        refused(
            "t",
            json!({ "http": "http://a/", "env": {} }),
            &["key `env`", "`exec` tasks only"],
        );
        refused(
            "t",
            json!({ "exec": "/bin/true" }),
            &["key `exec`", "list of strings"],
        );
        refused("t", json!({ "exec": [] }), &["key `exec`", "empty"]);
        refused(
            "t",
            json!({ "exec": ["/bin/true"], "rate_limit": "5/d" }),
            &["key `rate_limit`", "unknown unit"],
        );
        refused(
            "t",
            json!({ "exec": ["/bin/true"], "time_limit": "soon" }),
            &["key `time_limit`"],
        );
        refused(
            "t",
            json!({ "exec": ["/bin/true"], "time_limit": 0 }),
            &["key `time_limit`", "more than zero"],
        );
        refused(
            "t",
            json!({ "exec": ["/bin/true"], "max_retries": -1 }),
            &["key `max_retries`"],
        );
        refused(
            "t",
            json!({ "exec": ["/bin/true"], "env": { "A": [1] } }),
            &["key `env`", "A"],
        );
        refused(
            "t",
            json!({ "exec": ["/bin/true"], "cwd": 3 }),
            &["key `cwd`"],
        );
        refused(
            "t",
            json!({ "http": "app:8000/x" }),
            &["key `http`", "scheme"],
        );
        refused(
            "t",
            json!({ "http": "/tasks/x" }),
            &["key `http`", "not a URL"],
        );
        refused(
            "t",
            json!({ "http": "ftp://a/x" }),
            &["key `http`", "`ftp`"],
        );
        refused("t", json!("x"), &["expected a table"]);
    }

    #[test]
    fn the_config_names_a_bad_declaration_and_prints_env_redacted() {
        use figment::Figment;
        use figment::providers::{Format as _, Serialized, Toml};
        let load = |toml: &str| {
            crate::config::Config::from_figment(
                Figment::from(Serialized::defaults(crate::config::Config::default()))
                    .merge(Toml::string(toml)),
            )
        };
        let c = load(
            "[tasks.\"a.b\"]\nexec = [\"/bin/true\"]\nenv = { TOKEN = \"s3cret\" }\n\
             [tasks.c]\nhttp = \"http://app:8000/c\"\n",
        )
        .expect("valid");
        assert_eq!(c.tasks.0.len(), 2);
        let shown = c.redacted().to_string();
        assert!(
            !shown.contains("s3cret") && shown.contains("TOKEN"),
            "{shown}"
        );
        let e = load("[tasks.\"a.b\"]\nexec = [\"/bin/true\"]\nretries = 3\n")
            .expect_err("unknown key")
            .to_string();
        assert!(e.contains("task `a.b`") && e.contains("`retries`"), "{e}");
    }
}
