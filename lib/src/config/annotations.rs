//! `[task_annotations."name"]` tables (Celery's `task_annotations`): the
//! rate limit and time limits of a task the worker has built in or
//! registered itself. Declared tasks (`[tasks."name"]`) carry these keys
//! in their own table.

use super::rate::RateLimit;
use serde::de::{self, Deserializer};
use serde::ser::{SerializeMap as _, Serializer};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value, json};
use std::collections::BTreeMap;
use std::time::Duration;

/// Every `[task_annotations."name"]` table, by task name.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct TaskAnnotations(pub BTreeMap<String, Annotation>);

impl TaskAnnotations {
    /// The annotations by name, sorted.
    pub fn iter(&self) -> impl Iterator<Item = (&String, &Annotation)> {
        self.0.iter()
    }
}

/// What one `[task_annotations."name"]` table sets.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Annotation {
    /// Starts a second on one worker (`"10/s"`, `"100/m"`, `"5/h"`).
    pub rate_limit: Option<RateLimit>,
    /// Hard limit, for messages that carry none.
    pub time_limit: Option<Duration>,
    /// Soft limit, for messages that carry none.
    pub soft_time_limit: Option<Duration>,
}

pub(super) const KEYS: &[&str] = &["rate_limit", "time_limit", "soft_time_limit"];

fn refuse(task: &str, key: &str, reason: impl std::fmt::Display) -> String {
    format!("task `{task}`: key `{key}`: {reason}")
}

/// An optional `rate_limit` value; the error says what is wrong with it.
pub(super) fn rate_limit(v: Option<&Value>) -> Result<Option<RateLimit>, String> {
    v.map_or(Ok(None), RateLimit::from_value)
}

impl Annotation {
    fn parse(name: &str, v: &Value) -> Result<Self, String> {
        let Some(t) = v.as_object() else {
            return Err(format!(
                "task `{name}`: expected a table with {}, found {v}",
                keys()
            ));
        };
        if let Some(k) = t.keys().find(|k| !KEYS.contains(&k.as_str())) {
            return Err(refuse(name, k, format!("unknown key; use {}", keys())));
        }
        let dur = |key: &str| -> Result<Option<Duration>, String> {
            match t.get(key) {
                None => Ok(None),
                Some(v) => match super::de::duration(v.clone()) {
                    Ok(d) if d.is_zero() => Err(refuse(name, key, "must be more than zero")),
                    Ok(d) => Ok(Some(d)),
                    Err(e) => Err(refuse(name, key, e)),
                },
            }
        };
        Ok(Self {
            rate_limit: rate_limit(t.get("rate_limit"))
                .map_err(|e| refuse(name, "rate_limit", e))?,
            time_limit: dur("time_limit")?,
            soft_time_limit: dur("soft_time_limit")?,
        })
    }

    fn to_value(&self) -> Value {
        let mut m = Map::new();
        if let Some(r) = &self.rate_limit {
            m.insert("rate_limit".into(), json!(r.to_string()));
        }
        let secs = |d: Duration| json!(humantime::format_duration(d).to_string());
        if let Some(d) = self.time_limit {
            m.insert("time_limit".into(), secs(d));
        }
        if let Some(d) = self.soft_time_limit {
            m.insert("soft_time_limit".into(), secs(d));
        }
        Value::Object(m)
    }
}

fn keys() -> String {
    KEYS.iter()
        .map(|k| format!("`{k}`"))
        .collect::<Vec<_>>()
        .join(", ")
}

impl<'de> Deserialize<'de> for TaskAnnotations {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let raw = BTreeMap::<String, Value>::deserialize(d).map_err(|e| {
            de::Error::custom(format!("expected [task_annotations.\"name\"] tables ({e})"))
        })?;
        raw.iter()
            .map(|(name, v)| Ok((name.clone(), Annotation::parse(name, v)?)))
            .collect::<Result<_, String>>()
            .map(Self)
            .map_err(de::Error::custom)
    }
}

impl Serialize for TaskAnnotations {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut m = s.serialize_map(Some(self.0.len()))?;
        for (name, a) in &self.0 {
            m.serialize_entry(name, &a.to_value())?;
        }
        m.end()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(v: Value) -> Result<TaskAnnotations, String> {
        TaskAnnotations::deserialize(v).map_err(|e: serde_json::Error| e.to_string())
    }

    #[test]
    fn every_key_is_read_and_shown_back() {
        let a = parse(json!({
            "taskstack.add": { "rate_limit": "10/m", "time_limit": "30s", "soft_time_limit": 20 },
            "taskstack.echo": { "rate_limit": 3 },
        }))
        .expect("valid");
        let add = &a.0["taskstack.add"];
        assert_eq!(
            add.rate_limit.as_ref().map(RateLimit::per_second),
            Some(10.0 / 60.0)
        );
        assert_eq!(add.time_limit, Some(Duration::from_secs(30)));
        assert_eq!(add.soft_time_limit, Some(Duration::from_secs(20)));
        assert_eq!(
            serde_json::to_value(&a).expect("json")["taskstack.echo"],
            json!({ "rate_limit": "3" })
        );
    }

    #[test]
    fn bad_values_name_the_task_and_the_key() {
        let e = parse(json!({ "t.a": { "rate_limit": "10/d" } })).expect_err("bad");
        assert!(
            e.contains("task `t.a`: key `rate_limit`") && e.contains("unit"),
            "{e}"
        );
        let e = parse(json!({ "t.a": { "rate": "10/s" } })).expect_err("bad");
        assert!(e.contains("key `rate`: unknown key"), "{e}");
        let e = parse(json!({ "t.a": { "time_limit": 0 } })).expect_err("bad");
        assert!(
            e.contains("key `time_limit`: must be more than zero"),
            "{e}"
        );
        let e = parse(json!({ "t.a": "10/s" })).expect_err("bad");
        assert!(e.contains("task `t.a`: expected a table"), "{e}");
    }
}
