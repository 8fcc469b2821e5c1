//! kombu's Redis transport as Celery's remote control and events use it:
//! the message envelope, fanout channels (`/<db>.<exchange>[/<routing key>]`)
//! and exchange bindings (`_kombu.binding.<exchange>` sets whose members are
//! `routing_key SEP pattern SEP queue`).

use base64::Engine as _;
use serde_json::{Value, json};

/// kombu's separator inside binding members and priority queue names.
pub const SEP: &str = "\x06\x16";

/// The set of bindings of `exchange`.
pub fn binding_key(exchange: &str) -> String {
    format!("_kombu.binding.{exchange}")
}

/// The member binding `queue` to `exchange` with `routing_key` (no pattern).
pub fn binding_member(routing_key: &str, queue: &str) -> String {
    format!("{routing_key}{SEP}{SEP}{queue}")
}

/// The channel a fanout message to `exchange` is published on
/// (`fanout_prefix` and `fanout_patterns` on, kombu's defaults).
pub fn fanout_channel(db: i64, exchange: &str, routing_key: &str) -> String {
    if routing_key.is_empty() {
        format!("/{db}.{exchange}")
    } else {
        format!("/{db}.{exchange}/{routing_key}")
    }
}

/// The database number of a `redis://host:port/db` URL (0 when absent).
pub fn db_of_url(url: &str) -> i64 {
    let rest = url.split_once("://").map_or(url, |(_, r)| r);
    let path = rest.split_once('/').map_or("", |(_, p)| p);
    let path = path.split(['?', '#']).next().unwrap_or("");
    path.parse().unwrap_or(0)
}

/// A kombu message as the Redis transport stores and publishes it: the
/// JSON body base64-encoded inside a JSON envelope.
pub fn envelope(
    body: &Value,
    headers: Value,
    exchange: &str,
    routing_key: &str,
    delivery_mode: u8,
) -> String {
    let raw = serde_json::to_vec(body).unwrap_or_default();
    json!({
        "body": base64::engine::general_purpose::STANDARD.encode(raw),
        "content-encoding": "utf-8",
        "content-type": "application/json",
        "headers": headers,
        "properties": {
            "delivery_mode": delivery_mode,
            "delivery_info": {"exchange": exchange, "routing_key": routing_key},
            "priority": 0,
            "body_encoding": "base64",
            "delivery_tag": uuid::Uuid::new_v4().to_string(),
        },
    })
    .to_string()
}

/// A received kombu message: its decoded JSON body and its headers.
#[derive(Debug, Clone, PartialEq)]
pub struct Message {
    pub body: Value,
    pub headers: Value,
}

/// Decodes a kombu envelope (JSON bodies only, base64 or plain).
pub fn decode(raw: &[u8]) -> Result<Message, String> {
    let env: Value = serde_json::from_slice(raw).map_err(|e| format!("not JSON: {e}"))?;
    let ctype = env["content-type"].as_str().unwrap_or("application/json");
    if ctype != "application/json" {
        return Err(format!(
            "content type {ctype:?} is not accepted (only application/json)"
        ));
    }
    let body = match &env["body"] {
        Value::String(s) if env["properties"]["body_encoding"] == "base64" => {
            let bytes = base64::engine::general_purpose::STANDARD
                .decode(s)
                .map_err(|e| format!("body is not base64: {e}"))?;
            serde_json::from_slice(&bytes).map_err(|e| format!("body is not JSON: {e}"))?
        }
        Value::String(s) => {
            serde_json::from_str(s).map_err(|e| format!("body is not JSON: {e}"))?
        }
        other => other.clone(),
    };
    Ok(Message {
        body,
        headers: env["headers"].clone(),
    })
}

/// A Python `repr` of a JSON value, as Celery's events and `argsrepr`
/// show arguments and results (`None`, `True`, `'text'`, `(1, 2)` tuples
/// are written by the caller).
pub fn py_repr(v: &Value) -> String {
    match v {
        Value::Null => "None".into(),
        Value::Bool(true) => "True".into(),
        Value::Bool(false) => "False".into(),
        Value::Number(n) => n.to_string(),
        Value::String(s) => py_str(s),
        Value::Array(a) => format!("[{}]", a.iter().map(py_repr).collect::<Vec<_>>().join(", ")),
        Value::Object(o) => format!(
            "{{{}}}",
            o.iter()
                .map(|(k, v)| format!("{}: {}", py_str(k), py_repr(v)))
                .collect::<Vec<_>>()
                .join(", ")
        ),
    }
}

fn py_str(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('\'');
    for c in s.chars() {
        match c {
            '\'' => out.push_str("\\'"),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c => out.push(c),
        }
    }
    out.push('\'');
    out
}

/// `(a, b)`: the repr of a Python tuple of `args`.
pub fn py_tuple(args: &[Value]) -> String {
    match args {
        [one] => format!("({},)", py_repr(one)),
        _ => format!(
            "({})",
            args.iter().map(py_repr).collect::<Vec<_>>().join(", ")
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn envelopes_round_trip_and_channels_follow_kombu() {
        let raw = envelope(&json!({"a": 1}), json!({"ticket": "t"}), "x", "rk", 1);
        let m = decode(raw.as_bytes()).expect("decodes");
        assert_eq!(m.body, json!({"a": 1}));
        assert_eq!(m.headers["ticket"], "t");
        assert_eq!(fanout_channel(0, "celery.pidbox", ""), "/0.celery.pidbox");
        assert_eq!(
            fanout_channel(3, "celeryev", "task.multi"),
            "/3.celeryev/task.multi"
        );
        assert_eq!(db_of_url("redis://h:1/5"), 5);
        assert_eq!(db_of_url("redis://:pw@h:1"), 0);
        assert_eq!(
            binding_member("", "n.celery.pidbox"),
            "\x06\x16\x06\x16n.celery.pidbox"
        );
    }

    #[test]
    fn reprs_are_python_s() {
        assert_eq!(py_tuple(&[json!(2), json!(2)]), "(2, 2)");
        assert_eq!(py_tuple(&[json!("a")]), "('a',)");
        assert_eq!(py_repr(&json!({"k": [true, null]})), "{'k': [True, None]}");
    }
}
