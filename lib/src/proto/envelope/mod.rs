//! The Celery protocol v2 message envelope: decoding what any producer wrote,
//! and building what Python and Rust consumers both accept.

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use chrono::{DateTime, NaiveDateTime, SecondsFormat, Utc};
use serde_json::{Map, Value, json};
use std::sync::OnceLock;
use std::time::Duration;

pub use super::encode::{MessageSpec, encode};

mod fast;

/// The only content type taskstack decodes. Pickle, YAML and msgpack are
/// refused without being looked at.
pub const CONTENT_TYPE_JSON: &str = "application/json";

/// Header (a taskstack extension, ignored by Python Celery) carrying the
/// task's retry budget when the producer chose one.
pub const HEADER_MAX_RETRIES: &str = "max_retries";

/// Header (a taskstack extension, ignored by Python Celery): when the
/// message becomes ready to run, in ms since the epoch — when it was sent,
/// or its ETA. `queue_stats.lua` reads it off the oldest ready message to
/// tell how long that one has waited. Written as the pattern
/// `"taskstack_ready_at":<digits>` so the script can find it without
/// decoding the message.
pub const HEADER_READY_AT: &str = "taskstack_ready_at";

/// Why a raw message could not be turned into a task.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum DecodeError {
    /// Larger than `max_message_size`: refused before any decoding.
    #[error("message of {size} bytes exceeds max_message_size ({limit} bytes)")]
    TooLarge { size: usize, limit: usize },
    /// The payload is not UTF-8 text (so not JSON either).
    #[error("message is not UTF-8 text (invalid byte at offset {valid_up_to})")]
    NotUtf8 { valid_up_to: usize },
    /// The payload is not JSON at all.
    #[error("message is not valid JSON: {detail}")]
    NotJson { detail: String },
    /// Valid JSON, but not an object with `headers`, `properties` and `body`.
    #[error("message is not a Celery protocol v2 envelope: {detail}")]
    NotEnvelope { detail: String },
    /// A content type other than `application/json` (pickle above all).
    #[error("content type {content_type:?} is refused: only application/json is accepted")]
    ContentType { content_type: String },
    /// `body_encoding` is neither base64 nor absent.
    #[error("body encoding {encoding:?} is not supported")]
    BodyEncoding { encoding: String },
    /// The body is not valid base64.
    #[error("body is not valid base64: {detail}")]
    Base64 { detail: String },
    /// The decoded body is not `[args, kwargs, embed]` JSON.
    #[error("body is not [args, kwargs, embed] JSON: {detail}")]
    Body { detail: String },
    /// A required header is absent or null.
    #[error("required header {header:?} is missing")]
    MissingHeader { header: &'static str },
    /// A header has the wrong type or an unparseable value.
    #[error("header {header:?} is invalid: {detail}")]
    BadHeader {
        header: &'static str,
        detail: String,
    },
}

/// A decoded, validated task message. `raw` keeps the original envelope so a
/// retry re-publishes everything, including headers this version ignores.
#[derive(Debug, Clone, PartialEq)]
pub struct TaskMessage {
    pub id: String,
    pub task: String,
    pub args: Vec<Value>,
    pub kwargs: Map<String, Value>,
    pub retries: u32,
    pub max_retries: Option<u32>,
    pub eta: Option<DateTime<Utc>>,
    pub expires: Option<DateTime<Utc>>,
    /// `timelimit[0]`: the hard limit.
    pub hard_time_limit: Option<Duration>,
    /// `timelimit[1]`: the soft limit.
    pub soft_time_limit: Option<Duration>,
    pub parent_id: Option<String>,
    pub root_id: Option<String>,
    pub group: Option<String>,
    pub ignore_result: bool,
    /// The body's third element (`callbacks`, `errbacks`, `chain`, `chord`):
    /// what Celery's canvas asks to happen after this task.
    embed: Value,
    raw: Raw,
}

/// The original envelope: its text, and its JSON tree built the first
/// time a header or property beyond the decoded fields is asked for (most
/// messages never need it; see `fast`).
#[derive(Clone)]
struct Raw {
    text: Box<str>,
    tree: OnceLock<Value>,
}

impl Raw {
    fn new(text: &str) -> Self {
        Self {
            text: text.into(),
            tree: OnceLock::new(),
        }
    }

    fn with_tree(text: &str, tree: Value) -> Self {
        Self {
            text: text.into(),
            tree: OnceLock::from(tree),
        }
    }

    fn tree(&self) -> &Value {
        // The text was decoded once already, so it parses.
        self.tree
            .get_or_init(|| serde_json::from_str(&self.text).unwrap_or(Value::Null))
    }
}

impl PartialEq for Raw {
    fn eq(&self, other: &Self) -> bool {
        self.text == other.text
    }
}

impl std::fmt::Debug for Raw {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.text)
    }
}

/// [`decode`] for a message as taken from the broker: one larger than
/// `max_size` bytes is refused unread, one that is not UTF-8 is refused
/// before JSON parsing.
pub fn decode_bytes(
    payload: &[u8],
    max_size: usize,
) -> Result<TaskMessage, (DecodeError, Option<String>)> {
    if payload.len() > max_size {
        return Err((
            DecodeError::TooLarge {
                size: payload.len(),
                limit: max_size,
            },
            None,
        ));
    }
    let text = std::str::from_utf8(payload).map_err(|e| {
        (
            DecodeError::NotUtf8 {
                valid_up_to: e.valid_up_to(),
            },
            None,
        )
    })?;
    decode(text)
}

/// Decodes a raw message. On failure the task id is returned too when the
/// headers name one, so the caller can record a FAILURE result for it.
pub fn decode(payload: &str) -> Result<TaskMessage, (DecodeError, Option<String>)> {
    // The common, well-formed envelope without a JSON tree; anything else
    // (and every error) through the tree, which names what is wrong.
    if let Some(m) = fast::decode(payload) {
        return Ok(m);
    }
    decode_tree(payload)
}

/// [`decode`] through the envelope's whole JSON tree.
fn decode_tree(payload: &str) -> Result<TaskMessage, (DecodeError, Option<String>)> {
    let raw: Value = serde_json::from_str(payload).map_err(|e| {
        (
            DecodeError::NotJson {
                detail: e.to_string(),
            },
            None,
        )
    })?;
    let id = raw
        .pointer("/headers/id")
        .and_then(Value::as_str)
        .filter(|s| !s.is_empty())
        .map(str::to_owned);
    decode_value(payload, raw).map_err(|e| (e, id))
}

fn decode_value(payload: &str, raw: Value) -> Result<TaskMessage, DecodeError> {
    let obj = raw.as_object().ok_or_else(|| DecodeError::NotEnvelope {
        detail: "top level is not an object".into(),
    })?;
    let headers = obj
        .get("headers")
        .and_then(Value::as_object)
        .ok_or_else(|| DecodeError::NotEnvelope {
            detail: "\"headers\" is missing or not an object".into(),
        })?;
    let content_type = obj
        .get("content-type")
        .and_then(Value::as_str)
        .unwrap_or_default();
    if content_type != CONTENT_TYPE_JSON {
        return Err(DecodeError::ContentType {
            content_type: content_type.to_owned(),
        });
    }
    let body_encoding = obj
        .get("properties")
        .and_then(|p| p.get("body_encoding"))
        .and_then(Value::as_str);
    let body = obj.get("body").ok_or_else(|| DecodeError::NotEnvelope {
        detail: "\"body\" is missing".into(),
    })?;
    let (args, kwargs, embed) = split_body(body_value(body_encoding, body)?)?;

    let task = required_str(headers, "task")?;
    let id = required_str(headers, "id")?;
    let retries = match headers.get("retries") {
        None | Some(Value::Null) => 0,
        Some(v) => v
            .as_u64()
            .and_then(|n| u32::try_from(n).ok())
            .ok_or_else(|| bad("retries", format!("{v} is not a non-negative integer")))?,
    };
    let max_retries = match headers.get(HEADER_MAX_RETRIES) {
        None | Some(Value::Null) => None,
        Some(v) => Some(
            v.as_u64()
                .and_then(|n| u32::try_from(n).ok())
                .ok_or_else(|| bad("max_retries", format!("{v} is not a non-negative integer")))?,
        ),
    };
    let (hard_time_limit, soft_time_limit) = time_limits(headers.get("timelimit"))?;
    Ok(TaskMessage {
        id,
        task,
        args,
        kwargs,
        retries,
        max_retries,
        eta: optional_time(headers, "eta")?,
        expires: optional_time(headers, "expires")?,
        hard_time_limit,
        soft_time_limit,
        parent_id: optional_str(headers, "parent_id"),
        root_id: optional_str(headers, "root_id"),
        group: optional_str(headers, "group"),
        ignore_result: headers
            .get("ignore_result")
            .and_then(Value::as_bool)
            .unwrap_or(false),
        embed,
        raw: Raw::with_tree(payload, raw),
    })
}

/// The body as JSON: `body` decoded as `body_encoding` says.
fn body_value(body_encoding: Option<&str>, body: &Value) -> Result<Value, DecodeError> {
    match (body_encoding, body) {
        (Some("base64"), Value::String(s)) => {
            let bytes = B64.decode(s.trim()).map_err(|e| DecodeError::Base64 {
                detail: e.to_string(),
            })?;
            serde_json::from_slice(&bytes).map_err(|e| DecodeError::Body {
                detail: e.to_string(),
            })
        }
        (Some("base64"), _) => Err(DecodeError::Base64 {
            detail: "body is not a string".into(),
        }),
        (None, Value::String(s)) => serde_json::from_str(s).map_err(|e| DecodeError::Body {
            detail: e.to_string(),
        }),
        (None, other) => Ok(other.clone()),
        (Some(other), _) => Err(DecodeError::BodyEncoding {
            encoding: other.to_owned(),
        }),
    }
}

type Body = (Vec<Value>, Map<String, Value>, Value);

fn split_body(body: Value) -> Result<Body, DecodeError> {
    let Value::Array(mut parts) = body else {
        return Err(DecodeError::Body {
            detail: "body is not an array".into(),
        });
    };
    if parts.is_empty() || parts.len() > 3 {
        return Err(DecodeError::Body {
            detail: format!("body has {} elements, expected 2 or 3", parts.len()),
        });
    }
    let embed = if parts.len() == 3 {
        parts.pop().unwrap_or(Value::Null)
    } else {
        Value::Null
    };
    let kwargs = match parts.pop() {
        Some(Value::Object(m)) => m,
        Some(Value::Null) | None => Map::new(),
        Some(other) => {
            return Err(DecodeError::Body {
                detail: format!("kwargs is {other}, expected an object"),
            });
        }
    };
    let args = match parts.pop() {
        Some(Value::Array(a)) => a,
        Some(Value::Null) | None => Vec::new(),
        Some(other) => {
            return Err(DecodeError::Body {
                detail: format!("args is {other}, expected an array"),
            });
        }
    };
    Ok((args, kwargs, embed))
}

fn bad(header: &'static str, detail: String) -> DecodeError {
    DecodeError::BadHeader { header, detail }
}

fn required_str(headers: &Map<String, Value>, header: &'static str) -> Result<String, DecodeError> {
    match headers.get(header) {
        None | Some(Value::Null) => Err(DecodeError::MissingHeader { header }),
        Some(Value::String(s)) if !s.is_empty() => Ok(s.clone()),
        Some(other) => Err(bad(header, format!("{other} is not a non-empty string"))),
    }
}

fn optional_str(headers: &Map<String, Value>, header: &str) -> Option<String> {
    headers
        .get(header)
        .and_then(Value::as_str)
        .map(str::to_owned)
}

fn optional_time(
    headers: &Map<String, Value>,
    header: &'static str,
) -> Result<Option<DateTime<Utc>>, DecodeError> {
    match headers.get(header) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => parse_time(s)
            .map(Some)
            .ok_or_else(|| bad(header, format!("{s:?} is not an ISO 8601 time"))),
        Some(other) => Err(bad(header, format!("{other} is not a string"))),
    }
}

/// Parses an ISO 8601 time; a time without an offset is taken as UTC.
pub fn parse_time(s: &str) -> Option<DateTime<Utc>> {
    if let Ok(t) = DateTime::parse_from_rfc3339(s) {
        return Some(t.with_timezone(&Utc));
    }
    NaiveDateTime::parse_from_str(s, "%Y-%m-%dT%H:%M:%S%.f")
        .ok()
        .map(|n| n.and_utc())
}

/// Formats a time the way Celery does (ISO 8601 with offset, microseconds).
pub fn format_time(t: DateTime<Utc>) -> String {
    t.to_rfc3339_opts(SecondsFormat::Micros, false)
}

fn time_limits(v: Option<&Value>) -> Result<(Option<Duration>, Option<Duration>), DecodeError> {
    let one = |v: Option<&Value>| -> Result<Option<Duration>, DecodeError> {
        match v {
            None | Some(Value::Null) => Ok(None),
            Some(n) => n.as_f64().and_then(time_limit).map(Some).ok_or_else(|| {
                bad(
                    "timelimit",
                    format!("{n} is not a positive number of seconds"),
                )
            }),
        }
    };
    match v {
        None | Some(Value::Null) => Ok((None, None)),
        Some(Value::Array(a)) if a.len() == 2 => Ok((one(a.first())?, one(a.get(1))?)),
        Some(other) => Err(bad("timelimit", format!("{other} is not [hard, soft]"))),
    }
}

/// A time limit of `secs` seconds, if it is one (positive, finite, under
/// 10⁹ s).
fn time_limit(secs: f64) -> Option<Duration> {
    (secs.is_finite() && secs > 0.0 && secs < 1e9).then(|| Duration::from_secs_f64(secs))
}

impl TaskMessage {
    /// A text header of the original message (e.g. `argsrepr`), if any.
    pub fn header_str(&self, name: &str) -> Option<&str> {
        self.raw.tree().get("headers")?.get(name)?.as_str()
    }

    /// The message to publish for the next attempt: `retries` incremented,
    /// `eta` set, a fresh delivery tag, every other field as it was.
    pub fn for_retry(&self, eta: DateTime<Utc>) -> String {
        let mut raw = self.raw.tree().clone();
        if let Some(h) = raw.get_mut("headers").and_then(Value::as_object_mut) {
            h.insert("retries".into(), json!(self.retries + 1));
            h.insert("eta".into(), json!(format_time(eta)));
            h.insert(HEADER_READY_AT.into(), json!(eta.timestamp_millis()));
        }
        if let Some(p) = raw.get_mut("properties").and_then(Value::as_object_mut) {
            p.insert(
                "delivery_tag".into(),
                json!(uuid::Uuid::new_v4().to_string()),
            );
        }
        raw.to_string()
    }

    /// The body's embed (`{"callbacks", "errbacks", "chain", "chord"}`;
    /// `null` when the body had only args and kwargs).
    pub fn embed(&self) -> &Value {
        &self.embed
    }

    /// A header as sent, `None` when absent or null.
    pub fn header(&self, name: &str) -> Option<&Value> {
        self.raw
            .tree()
            .get("headers")
            .and_then(|h| h.get(name))
            .filter(|v| !v.is_null())
    }

    /// A message property as sent (`reply_to`, `priority`, ...).
    pub fn property(&self, name: &str) -> Option<&Value> {
        self.raw
            .tree()
            .get("properties")
            .and_then(|h| h.get(name))
            .filter(|v| !v.is_null())
    }

    /// The queue the producer routed this message to, if it said.
    pub fn routing_key(&self) -> Option<&str> {
        self.raw
            .tree()
            .pointer("/properties/delivery_info/routing_key")
            .and_then(Value::as_str)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The envelope captured from Celery 5.7 in shared/celery-protocol.md.
    pub(super) const CELERY_SAMPLE: &str = r#"{"body": "W1sxLCAxXSwge30sIHsiY2FsbGJhY2tzIjogbnVsbCwgImVycmJhY2tzIjogbnVsbCwgImNoYWluIjogbnVsbCwgImNob3JkIjogbnVsbH1d", "content-encoding": "utf-8", "content-type": "application/json", "headers": {"lang": "py", "task": "proj.add", "id": "13a3fd71-e082-436d-83c0-075cbb1d6ba8", "shadow": null, "eta": "2026-11-23T23:44:32.670674+00:00", "expires": "2026-11-23T23:54:02.670674+00:00", "group": null, "group_index": null, "retries": 0, "timelimit": [20, 10], "root_id": "13a3fd71-e082-436d-83c0-075cbb1d6ba8", "parent_id": null, "argsrepr": "(1, 1)", "kwargsrepr": "{}", "origin": "gen14873@vm", "ignore_result": false, "replaced_task_nesting": 0, "stamped_headers": null, "stamps": {}}, "properties": {"correlation_id": "13a3fd71-e082-436d-83c0-075cbb1d6ba8", "reply_to": "69775078-a6b2-34c4-9b3c-133e8af8719e", "delivery_mode": 2, "expiration": "600000", "delivery_info": {"exchange": "", "routing_key": "other"}, "priority": 0, "body_encoding": "base64", "delivery_tag": "46bfaafd-2ace-46f2-8353-8a2457943f83"}}"#;

    #[test]
    fn decodes_a_real_celery_message() {
        let m = decode(CELERY_SAMPLE).expect("decodes");
        assert_eq!(m.task, "proj.add");
        assert_eq!(m.id, "13a3fd71-e082-436d-83c0-075cbb1d6ba8");
        assert_eq!(m.args, vec![json!(1), json!(1)]);
        assert!(m.kwargs.is_empty());
        assert_eq!(m.hard_time_limit, Some(Duration::from_secs(20)));
        assert_eq!(m.soft_time_limit, Some(Duration::from_secs(10)));
        assert_eq!(
            m.eta.map(format_time).as_deref(),
            Some("2026-11-23T23:44:32.670674+00:00")
        );
        assert!(m.expires.is_some());
        assert_eq!(m.routing_key(), Some("other"));
    }

    #[test]
    fn round_trips_what_it_encodes() {
        let kwargs: Map<String, Value> = [("k".to_string(), json!("v"))].into_iter().collect();
        let args = [json!(2), json!("x")];
        let raw = encode(&MessageSpec {
            id: "id-1",
            task: "t.echo",
            args: &args,
            kwargs: &kwargs,
            queue: "q",
            max_retries: Some(4),
            hard_time_limit: Some(Duration::from_millis(1500)),
            origin: "test",
            ..Default::default()
        });
        let m = decode(&raw).expect("decodes");
        assert_eq!((m.id.as_str(), m.task.as_str()), ("id-1", "t.echo"));
        assert_eq!(m.args, args);
        assert_eq!(m.kwargs, kwargs);
        assert_eq!(m.max_retries, Some(4));
        assert_eq!(m.hard_time_limit, Some(Duration::from_millis(1500)));
        assert_eq!(m.soft_time_limit, None);
        assert_eq!(m.routing_key(), Some("q"));
    }

    #[test]
    fn retry_message_keeps_everything_but_attempt_and_eta() {
        let m = decode(CELERY_SAMPLE).expect("decodes");
        let eta = Utc::now();
        let next = decode(&m.for_retry(eta)).expect("decodes");
        assert_eq!(next.retries, 1);
        assert_eq!(next.id, m.id);
        assert_eq!(next.args, m.args);
        assert_eq!(next.eta.map(format_time), Some(format_time(eta)));
    }

    fn sample_with(f: impl FnOnce(&mut Value)) -> String {
        let mut v: Value = serde_json::from_str(CELERY_SAMPLE).expect("sample");
        f(&mut v);
        v.to_string()
    }

    #[test]
    fn refuses_bad_input_with_the_reason() {
        let cases: Vec<(String, &str)> = vec![
            ("not json".into(), "not valid JSON"),
            ("[1,2]".into(), "not a Celery protocol v2 envelope"),
            (
                sample_with(|v| v["content-type"] = json!("application/x-python-serialize")),
                "content type \"application/x-python-serialize\" is refused",
            ),
            (
                sample_with(|v| v["body"] = json!("%%%not base64")),
                "not valid base64",
            ),
            (
                sample_with(|v| v["body"] = json!(B64.encode("{\"a\":1}"))),
                "body is not an array",
            ),
            (
                sample_with(|v| {
                    v["headers"].as_object_mut().map(|h| h.remove("task"));
                }),
                "required header \"task\" is missing",
            ),
            (
                sample_with(|v| v["headers"]["eta"] = json!("tomorrow")),
                "header \"eta\" is invalid",
            ),
            (
                sample_with(|v| v["headers"]["timelimit"] = json!([-1, null])),
                "header \"timelimit\" is invalid",
            ),
        ];
        for (payload, want) in cases {
            let (err, _) = decode(&payload).expect_err(want);
            assert!(err.to_string().contains(want), "{err} !~ {want}");
        }
    }

    #[test]
    fn failed_decode_still_names_the_task_id() {
        let p = sample_with(|v| v["content-type"] = json!("application/x-yaml"));
        let (_, id) = decode(&p).expect_err("refused");
        assert_eq!(id.as_deref(), Some("13a3fd71-e082-436d-83c0-075cbb1d6ba8"));
    }

    #[test]
    fn naive_times_are_utc() {
        let t = parse_time("2026-01-02T03:04:05.5").expect("parses");
        assert_eq!(format_time(t), "2026-01-02T03:04:05.500000+00:00");
    }
}
