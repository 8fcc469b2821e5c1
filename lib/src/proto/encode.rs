//! Building the Celery protocol v2 envelope a producer sends.
//!
//! The envelope is serialized straight from borrowed fields (no
//! `serde_json::Value` tree, one allocation for the body and one for the
//! message): a web batch builds a thousand of these per request.

use super::envelope::{CONTENT_TYPE_JSON, HEADER_MAX_RETRIES, HEADER_READY_AT, format_time};
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use chrono::{DateTime, Utc};
use serde::Serialize;
use serde::ser::{SerializeMap, Serializer};
use serde_json::{Map, Value};
use std::time::Duration;

static NO_KWARGS: std::sync::LazyLock<Map<String, Value>> = std::sync::LazyLock::new(Map::new);

/// What a producer chooses about one message.
#[derive(Debug, Clone)]
pub struct MessageSpec<'a> {
    pub id: &'a str,
    pub task: &'a str,
    pub args: &'a [Value],
    pub kwargs: &'a Map<String, Value>,
    pub queue: &'a str,
    pub eta: Option<DateTime<Utc>>,
    pub expires: Option<DateTime<Utc>>,
    pub priority: Option<u8>,
    pub max_retries: Option<u32>,
    pub hard_time_limit: Option<Duration>,
    pub soft_time_limit: Option<Duration>,
    pub origin: &'a str,
    pub extra_headers: Option<&'a Map<String, Value>>,
    /// The body's embed (`callbacks`, `errbacks`, `chain`, `chord`); `None`
    /// for all four null.
    pub embed: Option<&'a Value>,
    /// The `group` and `group_index` headers (a chord's header task).
    pub group: Option<(&'a str, usize)>,
}

impl Default for MessageSpec<'_> {
    fn default() -> Self {
        Self {
            id: "",
            task: "",
            args: &[],
            kwargs: &NO_KWARGS,
            queue: "celery",
            eta: None,
            expires: None,
            priority: None,
            max_retries: None,
            hard_time_limit: None,
            soft_time_limit: None,
            origin: "",
            extra_headers: None,
            embed: None,
            group: None,
        }
    }
}

/// Builds the envelope JSON exactly as Celery 5 writes it (its keys, in
/// its order), so Python workers accept it. A key of `extra_headers`
/// replaces the header of that name.
pub fn encode(spec: &MessageSpec<'_>) -> String {
    let now = Utc::now();
    let body = serde_json::to_vec(&(spec.args, spec.kwargs, Embed(spec.embed)))
        .expect("JSON values always serialize");
    let envelope = Envelope {
        body: B64.encode(body),
        content_encoding: "utf-8",
        content_type: CONTENT_TYPE_JSON,
        headers: Headers {
            spec,
            ready_at_ms: spec.eta.map_or(now, |eta| eta.max(now)).timestamp_millis(),
        },
        properties: Properties {
            correlation_id: spec.id,
            reply_to: uuid::Uuid::new_v4(),
            delivery_mode: 2,
            delivery_info: DeliveryInfo {
                exchange: "",
                routing_key: spec.queue,
            },
            priority: spec.priority.unwrap_or(0).min(9),
            body_encoding: "base64",
            delivery_tag: uuid::Uuid::new_v4(),
            expiration: spec
                .expires
                .map(|exp| (exp - now).num_milliseconds().max(0).to_string()),
        },
    };
    serde_json::to_string(&envelope).expect("the envelope always serializes")
}

#[derive(Serialize)]
struct Envelope<'a> {
    body: String,
    #[serde(rename = "content-encoding")]
    content_encoding: &'static str,
    #[serde(rename = "content-type")]
    content_type: &'static str,
    headers: Headers<'a>,
    properties: Properties<'a>,
}

#[derive(Serialize)]
struct Properties<'a> {
    correlation_id: &'a str,
    reply_to: uuid::Uuid,
    delivery_mode: u8,
    delivery_info: DeliveryInfo<'a>,
    priority: u8,
    body_encoding: &'static str,
    delivery_tag: uuid::Uuid,
    #[serde(skip_serializing_if = "Option::is_none")]
    expiration: Option<String>,
}

/// kombu's `delivery_info` property: where the message was sent.
#[derive(Serialize)]
pub(crate) struct DeliveryInfo<'a> {
    pub(crate) exchange: &'a str,
    pub(crate) routing_key: &'a str,
}

/// The body's third element; all four null when the spec has none.
struct Embed<'a>(Option<&'a Value>);

impl Serialize for Embed<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self.0 {
            Some(v) => v.serialize(s),
            None => {
                let mut m = s.serialize_map(Some(4))?;
                for k in ["callbacks", "errbacks", "chain", "chord"] {
                    m.serialize_entry(k, &())?;
                }
                m.end()
            }
        }
    }
}

/// `{}`.
struct EmptyMap;

impl Serialize for EmptyMap {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_map(Some(0))?.end()
    }
}

/// A JSON text (`argsrepr`, `kwargsrepr`) written as a string without
/// building it first.
struct Repr<'a, T: Serialize>(&'a T);

impl<T: Serialize> Serialize for Repr<'_, T> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let text = serde_json::to_string(self.0).map_err(serde::ser::Error::custom)?;
        s.serialize_str(&text)
    }
}

struct Headers<'a> {
    spec: &'a MessageSpec<'a>,
    ready_at_ms: i64,
}

impl Serialize for Headers<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let spec = self.spec;
        let extra = spec.extra_headers.filter(|e| !e.is_empty());
        let secs = |d: Option<Duration>| d.map(|d| d.as_secs_f64());
        let eta = spec.eta.map(format_time);
        let expires = spec.expires.map(format_time);
        let mut m = s.serialize_map(None)?;
        // A header the caller gave is written once, with the caller's value.
        macro_rules! put {
            ($k:expr, $v:expr) => {
                if !extra.is_some_and(|e| e.contains_key($k)) {
                    m.serialize_entry($k, &$v)?;
                }
            };
        }
        put!("lang", "py");
        put!("task", spec.task);
        put!("id", spec.id);
        put!("shadow", ());
        put!("eta", eta);
        put!("expires", expires);
        put!("group", spec.group.map(|(g, _)| g));
        put!("group_index", spec.group.map(|(_, i)| i));
        put!("retries", 0);
        put!(
            "timelimit",
            [secs(spec.hard_time_limit), secs(spec.soft_time_limit)]
        );
        put!("root_id", spec.id);
        put!("parent_id", ());
        put!("argsrepr", Repr(&spec.args));
        put!("kwargsrepr", Repr(spec.kwargs));
        put!("origin", spec.origin);
        put!("ignore_result", false);
        put!("replaced_task_nesting", 0);
        put!("stamped_headers", ());
        put!("stamps", EmptyMap);
        put!(HEADER_READY_AT, self.ready_at_ms);
        if let Some(n) = spec.max_retries {
            put!(HEADER_MAX_RETRIES, n);
        }
        for (k, v) in extra.into_iter().flatten() {
            m.serialize_entry(k, v)?;
        }
        m.end()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn headers_of(raw: &str) -> Map<String, Value> {
        let v: Value = serde_json::from_str(raw).expect("JSON");
        v["headers"].as_object().expect("headers").clone()
    }

    #[test]
    fn writes_celerys_headers_and_properties() {
        let args = [json!(1), json!("x")];
        let raw = encode(&MessageSpec {
            id: "id-1",
            task: "t.echo",
            args: &args,
            queue: "q",
            priority: Some(12),
            hard_time_limit: Some(Duration::from_secs(20)),
            origin: "o",
            ..Default::default()
        });
        let v: Value = serde_json::from_str(&raw).expect("JSON");
        let h = headers_of(&raw);
        for (k, want) in [
            ("lang", json!("py")),
            ("task", json!("t.echo")),
            ("id", json!("id-1")),
            ("root_id", json!("id-1")),
            ("shadow", Value::Null),
            ("eta", Value::Null),
            ("retries", json!(0)),
            ("timelimit", json!([20.0, null])),
            ("argsrepr", json!("[1,\"x\"]")),
            ("kwargsrepr", json!("{}")),
            ("stamps", json!({})),
            ("ignore_result", json!(false)),
        ] {
            assert_eq!(h.get(k), Some(&want), "header {k}");
        }
        assert!(h[HEADER_READY_AT].is_i64());
        assert!(!h.contains_key(HEADER_MAX_RETRIES));
        let p = &v["properties"];
        assert_eq!(p["correlation_id"], "id-1");
        assert_eq!(p["priority"], 9, "clamped to Celery's 0..=9");
        assert_eq!(
            p["delivery_info"],
            json!({"exchange": "", "routing_key": "q"})
        );
        assert!(p.get("expiration").is_none());
        assert_ne!(p["reply_to"], p["delivery_tag"]);
        let body = B64
            .decode(v["body"].as_str().expect("body"))
            .expect("base64");
        let body: Value = serde_json::from_slice(&body).expect("body JSON");
        assert_eq!(
            body,
            json!([[1, "x"], {}, {"callbacks": null, "errbacks": null, "chain": null, "chord": null}])
        );
    }

    #[test]
    fn a_callers_header_replaces_the_standard_one_once() {
        let extra: Map<String, Value> = [
            ("retries".to_string(), json!(3)),
            ("custom".to_string(), json!({"a": 1})),
        ]
        .into_iter()
        .collect();
        let raw = encode(&MessageSpec {
            id: "i",
            task: "t",
            max_retries: Some(5),
            extra_headers: Some(&extra),
            ..Default::default()
        });
        assert_eq!(raw.matches("\"retries\"").count(), 1, "{raw}");
        let h = headers_of(&raw);
        assert_eq!(h["retries"], 3);
        assert_eq!(h["custom"], json!({"a": 1}));
        assert_eq!(h[HEADER_MAX_RETRIES], 5);
    }

    #[test]
    fn an_expiry_becomes_the_expiration_property() {
        let expires = Utc::now() + chrono::Duration::seconds(600);
        let raw = encode(&MessageSpec {
            id: "i",
            task: "t",
            expires: Some(expires),
            ..Default::default()
        });
        let v: Value = serde_json::from_str(&raw).expect("JSON");
        let ms: i64 = v["properties"]["expiration"]
            .as_str()
            .expect("a string, as Celery writes it")
            .parse()
            .expect("digits");
        assert!((590_000..=600_000).contains(&ms), "{ms}");
        assert_eq!(v["headers"]["expires"], format_time(expires));
    }
}
