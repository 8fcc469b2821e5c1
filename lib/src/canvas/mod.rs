//! Celery's canvas on the wire: the signatures a task message carries in
//! its body's embed (`callbacks`, `errbacks`, `chain`, `chord`) and the
//! messages a worker sends for them, built as Celery 5.7's worker builds
//! them (`celery/app/trace.py`, `celery/backends/base.py`,
//! `celery/backends/redis.py`).
//!
//! - [`Signature`]: one `{"task", "args", "kwargs", "options",
//!   "subtask_type", "immutable"}` dict.
//! - [`FollowUp`]: a signature turned into a task message (args prepended
//!   unless immutable, `parent_id`/`root_id`, the remaining chain, options).
//! - [`redis`]: sending follow-ups at most once each, and Celery's chord
//!   counters (the same Lua scripts as Celery's Redis result backend).
//! - [`send`]: chains, chords and links sent from Rust
//!   ([`crate::Producer::send_chain`], [`crate::Producer::send_chord`]).

pub mod redis;
pub mod send;
pub mod store;

use crate::proto::envelope::{self, CONTENT_TYPE_JSON, HEADER_READY_AT};
use crate::proto::keys::{priority_bucket, queue_key};
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use chrono::{DateTime, Utc};
use serde_json::{Map, Value, json};

/// The queue a follow-up goes to when its signature names none (Celery's
/// `task_default_queue`).
pub const DEFAULT_QUEUE: &str = "celery";

/// A signature as Celery serializes it.
#[derive(Debug, Clone, PartialEq)]
pub struct Signature {
    pub task: String,
    pub args: Vec<Value>,
    pub kwargs: Map<String, Value>,
    pub options: Map<String, Value>,
    /// `null` for a plain task; `chain`, `group`, `chord`, ... for a nested
    /// canvas (not run by taskstack's worker yet).
    pub subtask_type: Option<String>,
    pub immutable: bool,
}

/// Why a signature cannot be sent.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum CanvasError {
    #[error("signature is not an object: {0}")]
    NotObject(String),
    #[error("signature has no task name: {0}")]
    NoTask(String),
    #[error(
        "a nested {kind:?} canvas ({task}) as a follow-up is not supported by taskstack's worker yet"
    )]
    Nested { kind: String, task: String },
}

impl Signature {
    /// Parses one signature dict.
    pub fn parse(v: &Value) -> Result<Self, CanvasError> {
        let o = v
            .as_object()
            .ok_or_else(|| CanvasError::NotObject(short(v)))?;
        let task = o
            .get("task")
            .and_then(Value::as_str)
            .filter(|s| !s.is_empty())
            .ok_or_else(|| CanvasError::NoTask(short(v)))?
            .to_owned();
        let subtask_type = o
            .get("subtask_type")
            .and_then(Value::as_str)
            .map(str::to_owned);
        Ok(Self {
            task,
            args: o
                .get("args")
                .and_then(Value::as_array)
                .cloned()
                .unwrap_or_default(),
            kwargs: o
                .get("kwargs")
                .and_then(Value::as_object)
                .cloned()
                .unwrap_or_default(),
            options: o
                .get("options")
                .and_then(Value::as_object)
                .cloned()
                .unwrap_or_default(),
            subtask_type,
            immutable: o.get("immutable").and_then(Value::as_bool).unwrap_or(false),
        })
    }

    /// Refuses a nested canvas (chain, group, chord, ... as one step).
    pub fn check_plain(&self) -> Result<(), CanvasError> {
        match &self.subtask_type {
            Some(kind) => Err(CanvasError::Nested {
                kind: kind.clone(),
                task: self.task.clone(),
            }),
            None => Ok(()),
        }
    }

    /// The task id the signature was frozen with (`options.task_id`).
    pub fn task_id(&self) -> Option<&str> {
        self.options.get("task_id").and_then(Value::as_str)
    }

    fn opt(&self, name: &str) -> Option<&Value> {
        self.options.get(name).filter(|v| !v.is_null())
    }

    /// The queue it is routed to: `options.queue` (a name or a queue dict),
    /// else `options.routing_key`, else [`DEFAULT_QUEUE`].
    pub fn queue(&self) -> String {
        let named = |v: &Value| {
            v.as_str()
                .map(str::to_owned)
                .or_else(|| v.get("name").and_then(Value::as_str).map(str::to_owned))
        };
        self.opt("queue")
            .and_then(named)
            .or_else(|| self.opt("routing_key").and_then(named))
            .unwrap_or_else(|| DEFAULT_QUEUE.to_owned())
    }
}

/// A list of signatures as the embed holds them: `null`, one dict or a list
/// (Celery's `maybe_list`).
pub fn signatures(v: Option<&Value>) -> Result<Vec<Signature>, CanvasError> {
    match v {
        None | Some(Value::Null) => Ok(Vec::new()),
        Some(Value::Array(a)) => a.iter().map(Signature::parse).collect(),
        Some(one) => Ok(vec![Signature::parse(one)?]),
    }
}

fn short(v: &Value) -> String {
    let s = v.to_string();
    if s.chars().count() > 200 {
        format!("{}...", s.chars().take(200).collect::<String>())
    } else {
        s
    }
}

/// What the sending task contributes to a follow-up's message.
#[derive(Debug, Clone)]
pub struct Lineage<'a> {
    /// The task that finished (becomes `parent_id`).
    pub parent_id: &'a str,
    /// Its root (`root_id`, or its own id when it had none).
    pub root_id: &'a str,
    /// `origin` header: who sent it.
    pub origin: &'a str,
    pub now: DateTime<Utc>,
}

/// A follow-up task message, ready to push.
#[derive(Debug, Clone, PartialEq)]
pub struct FollowUp {
    pub task_id: String,
    pub task: String,
    /// The list it goes to (queue plus priority bucket).
    pub queue_key: String,
    pub payload: String,
}

/// Extra settings for one follow-up beyond its signature.
#[derive(Debug, Clone, Default)]
pub struct Dispatch<'a> {
    /// Prepended to the signature's args unless it is immutable (the
    /// previous result for a chain step or callback, the failed task's id
    /// for an errback, the header results for a chord body).
    pub prepend: Option<Value>,
    /// The rest of the chain this step carries (`None`: the signature's own
    /// `options.chain`, if any).
    pub chain: Option<&'a [Value]>,
    /// The id to use when the signature was not frozen with one; callers
    /// derive it from the parent so a redelivered parent picks the same.
    pub fallback_id: String,
    /// `group` and `group_index` headers (a group of callbacks/errbacks).
    pub group: Option<(&'a str, usize)>,
}

/// Builds the message Celery's `send_task` would send for `sig` (protocol
/// v2; options `task_id`, `queue`/`routing_key`, `priority`, `countdown`,
/// `eta`, `expires`, `time_limit`, `soft_time_limit`, `reply_to`,
/// `group_id`, `group_index`, `chord`, `link`, `link_error`,
/// `ignore_result`, `shadow` honoured).
pub fn build(sig: &Signature, send: &Dispatch<'_>, from: &Lineage<'_>) -> FollowUp {
    let id = sig
        .task_id()
        .map_or_else(|| send.fallback_id.clone(), str::to_owned);
    let mut args = Vec::with_capacity(sig.args.len() + 1);
    if let (Some(p), false) = (&send.prepend, sig.immutable) {
        args.push(p.clone());
    }
    args.extend(sig.args.iter().cloned());
    let opt = |name: &str| sig.opt(name);
    let eta = match (opt("countdown").and_then(Value::as_f64), opt("eta")) {
        (Some(secs), _) if secs > 0.0 => {
            Some(from.now + chrono::Duration::milliseconds((secs * 1000.0) as i64))
        }
        (_, Some(Value::String(s))) => envelope::parse_time(s),
        _ => None,
    };
    let expires = match opt("expires") {
        Some(Value::String(s)) => envelope::parse_time(s),
        Some(v) => v
            .as_f64()
            .map(|secs| from.now + chrono::Duration::milliseconds((secs * 1000.0) as i64)),
        None => None,
    };
    let chain = match send.chain {
        Some(rest) => json!(rest),
        None => opt("chain").cloned().unwrap_or(Value::Null),
    };
    let (group, group_index) = match send.group {
        Some((g, i)) => (json!(g), json!(i)),
        None => (
            opt("group_id").cloned().unwrap_or(Value::Null),
            opt("group_index").cloned().unwrap_or(Value::Null),
        ),
    };
    let body = json!([
        args,
        sig.kwargs,
        {
            "callbacks": as_list(opt("link")),
            "errbacks": as_list(opt("link_error")),
            "chain": chain,
            "chord": opt("chord").cloned().unwrap_or(Value::Null),
        }
    ]);
    let queue = sig.queue();
    let priority = opt("priority")
        .and_then(Value::as_u64)
        .map_or(0, |p| u8::try_from(p.min(9)).unwrap_or(9));
    let ready_at = eta.map_or(from.now, |e| e.max(from.now));
    let headers = json!({
        "lang": "py",
        "task": sig.task,
        "id": id,
        "shadow": opt("shadow").cloned().unwrap_or(Value::Null),
        "eta": eta.map(envelope::format_time),
        "expires": expires.map(envelope::format_time),
        "group": group,
        "group_index": group_index,
        "retries": 0,
        "timelimit": [
            opt("time_limit").cloned().unwrap_or(Value::Null),
            opt("soft_time_limit").cloned().unwrap_or(Value::Null),
        ],
        "root_id": from.root_id,
        "parent_id": from.parent_id,
        "argsrepr": Value::from(args.clone()).to_string(),
        "kwargsrepr": Value::from(sig.kwargs.clone()).to_string(),
        "origin": from.origin,
        "ignore_result": opt("ignore_result").and_then(Value::as_bool).unwrap_or(false),
        "replaced_task_nesting": 0,
        "stamped_headers": null,
        "stamps": {},
        HEADER_READY_AT: ready_at.timestamp_millis(),
    });
    let mut properties = json!({
        "correlation_id": id,
        "reply_to": opt("reply_to").and_then(Value::as_str).unwrap_or(""),
        "delivery_mode": 2,
        "delivery_info": {"exchange": "", "routing_key": queue},
        "priority": priority,
        "body_encoding": "base64",
        "delivery_tag": uuid::Uuid::new_v4().to_string(),
    });
    if let (Some(exp), Some(p)) = (expires, properties.as_object_mut()) {
        let ms = (exp - from.now).num_milliseconds().max(0);
        p.insert("expiration".into(), json!(ms.to_string()));
    }
    let payload = json!({
        "body": B64.encode(body.to_string()),
        "content-encoding": "utf-8",
        "content-type": CONTENT_TYPE_JSON,
        "headers": headers,
        "properties": properties,
    })
    .to_string();
    FollowUp {
        task_id: id,
        task: sig.task.clone(),
        queue_key: queue_key(&queue, priority_bucket(priority)),
        payload,
    }
}

fn as_list(v: Option<&Value>) -> Value {
    match v {
        None | Some(Value::Null) => Value::Null,
        Some(Value::Array(a)) => Value::Array(a.clone()),
        Some(one) => json!([one]),
    }
}

/// Every task id frozen inside a (nested) signature's value: the
/// `options.task_id` of each signature found, at any depth of its kwargs
/// (a group's `tasks`, a chord's `header` and `body`).
pub fn frozen_ids(v: &Value, out: &mut Vec<String>) {
    match v {
        Value::Array(a) => a.iter().for_each(|x| frozen_ids(x, out)),
        Value::Object(o) => {
            if o.contains_key("task")
                && let Some(id) = o
                    .get("options")
                    .and_then(|x| x.get("task_id"))
                    .and_then(Value::as_str)
            {
                out.push(id.to_owned());
            }
            if let Some(k) = o.get("kwargs") {
                frozen_ids(k, out);
            } else if !o.contains_key("task") {
                o.values().for_each(|x| frozen_ids(x, out));
            }
        }
        _ => {}
    }
}

/// A task id derived from `parent` and `what`, the same on every run of the
/// parent (so a redelivered parent sends a follow-up under the same id and
/// its send-once marker recognises it).
pub fn derived_id(parent: &str, what: &str) -> String {
    uuid::Uuid::new_v5(
        &uuid::Uuid::NAMESPACE_OID,
        format!("{parent}/{what}").as_bytes(),
    )
    .to_string()
}

/// An `AsyncResult.as_tuple()` as Celery stores it in `children`:
/// `[[id, null], null]`.
pub fn child(task_id: &str) -> Value {
    json!([[task_id, null], null])
}

/// A `GroupResult.as_tuple()`: `[[group_id, null], [child, ...]]`.
pub fn group_child(group_id: &str, task_ids: &[String]) -> Value {
    json!([
        [group_id, null],
        task_ids.iter().map(|t| child(t)).collect::<Vec<_>>()
    ])
}

/// Python's `repr` of an exception rebuilt from its stored form (what
/// Celery's `ChordError` message quotes: `ValueError('boom')`).
pub fn exception_repr(stored: &Value) -> String {
    let ty = stored
        .get("exc_type")
        .and_then(Value::as_str)
        .unwrap_or("Exception");
    let args: Vec<String> = match stored.get("exc_message") {
        Some(Value::Array(a)) => a.iter().map(py_repr).collect(),
        Some(Value::Null) | None => Vec::new(),
        Some(other) => vec![py_repr(other)],
    };
    format!("{ty}({})", args.join(", "))
}

fn py_repr(v: &Value) -> String {
    match v {
        Value::String(s) => {
            if s.contains('\'') && !s.contains('"') {
                format!("\"{s}\"")
            } else {
                format!("'{}'", s.replace('\\', "\\\\").replace('\'', "\\'"))
            }
        }
        Value::Null => "None".into(),
        Value::Bool(true) => "True".into(),
        Value::Bool(false) => "False".into(),
        other => other.to_string(),
    }
}

#[cfg(test)]
mod tests;
