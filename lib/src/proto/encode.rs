//! Building the Celery protocol v2 envelope a producer sends.
//!
//! The envelope is written straight from borrowed fields (no
//! `serde_json::Value` tree; two allocations, the body and the message,
//! each sized up front; the base64 body is encoded into the message): a
//! web batch builds a thousand of these per request.

use super::envelope::{HEADER_MAX_RETRIES, HEADER_READY_AT, format_time};
use super::json::{Object, fixed, write_value};
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use chrono::{DateTime, Utc};
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
///
/// The envelope's layout is fixed, so its keys and constant values are
/// written as they are ([`super::json`]); the caller's text is escaped
/// when it needs it and its other values go through serde_json: on the
/// web API's enqueue path, a serde-derived envelope with every key
/// escaped was the largest cost of a request after the kernel's.
pub fn encode(spec: &MessageSpec<'_>) -> String {
    let now = Utc::now();
    // The body, `[args, kwargs, embed]`, remembering where the args and
    // kwargs lie: the `argsrepr` and `kwargsrepr` headers are those texts.
    let mut body = Vec::with_capacity(BODY_CAPACITY);
    body.push(b'[');
    let args = write_value(&mut body, spec.args);
    body.push(b',');
    let kwargs = write_value(&mut body, spec.kwargs);
    body.push(b',');
    match spec.embed {
        Some(embed) => {
            write_value(&mut body, embed);
        }
        None => body.extend_from_slice(NO_EMBED.as_bytes()),
    }
    body.push(b']');
    // Room for the fixed part, the base64 body and the two reprs (about the
    // body's length again), so the text is written without regrowing.
    let capacity = ENVELOPE_FIXED
        + body.len() * 3
        + 3 * spec.id.len()
        + spec.task.len()
        + spec.queue.len()
        + spec.origin.len();
    let mut out = Vec::with_capacity(capacity);
    let mut envelope = Object::open(&mut out);
    envelope.key("body");
    write_base64(envelope.out(), &body);
    fixed!(&mut envelope, "content-encoding" => "\"utf-8\"", "content-type" => "\"application/json\"");
    envelope.key("headers");
    let ready_at_ms = spec.eta.map_or(now, |eta| eta.max(now)).timestamp_millis();
    write_headers(
        envelope.out(),
        spec,
        ready_at_ms,
        text_of(&body, args),
        text_of(&body, kwargs),
    );
    let mut p = envelope.object("properties");
    p.string("correlation_id", spec.id);
    p.text(
        "reply_to",
        uuid::Uuid::new_v4().hyphenated().encode_lower(&mut [0; 36]),
    );
    fixed!(&mut p, "delivery_mode" => "2");
    let mut d = p.object("delivery_info");
    fixed!(&mut d, "exchange" => "\"\"");
    d.string("routing_key", spec.queue);
    d.close();
    p.value("priority", &spec.priority.unwrap_or(0).min(9));
    fixed!(&mut p, "body_encoding" => "\"base64\"");
    p.text(
        "delivery_tag",
        uuid::Uuid::new_v4().hyphenated().encode_lower(&mut [0; 36]),
    );
    if let Some(exp) = spec.expires {
        p.value(
            "expiration",
            &(exp - now).num_milliseconds().max(0).to_string(),
        );
    }
    p.close();
    envelope.close();
    String::from_utf8(out).expect("serde_json writes UTF-8")
}

/// The body's first allocation: a task with a few small arguments fits.
const BODY_CAPACITY: usize = 256;
/// The envelope's length without its variable parts (keys, two UUIDs, the
/// fixed values), rounded up.
const ENVELOPE_FIXED: usize = 768;

/// The JSON text at `range` of `body`, which serde_json wrote.
fn text_of(body: &[u8], range: std::ops::Range<usize>) -> &str {
    std::str::from_utf8(&body[range]).expect("serde_json writes UTF-8")
}

/// The body's third element when the spec has none: all four null.
const NO_EMBED: &str = r#"{"callbacks":null,"errbacks":null,"chain":null,"chord":null}"#;

/// Writes `bytes` base64-encoded as a JSON string (base64 needs no
/// escaping), straight into `out`.
fn write_base64(out: &mut Vec<u8>, bytes: &[u8]) {
    let len = base64::encoded_len(bytes.len(), true).expect("a message's length fits in usize");
    out.push(b'"');
    let start = out.len();
    out.resize(start + len, 0);
    let written = B64
        .encode_slice(bytes, &mut out[start..])
        .expect("sized by encoded_len");
    debug_assert_eq!(written, len);
    out.push(b'"');
}

/// The headers, in Celery's order; `argsrepr` and `kwargsrepr` are given
/// as the JSON texts of the args and kwargs.
fn write_headers(
    out: &mut Vec<u8>,
    spec: &MessageSpec<'_>,
    ready_at_ms: i64,
    argsrepr: &str,
    kwargsrepr: &str,
) {
    let extra = spec.extra_headers.filter(|e| !e.is_empty());
    let secs = |d: Option<Duration>| d.map(|d| d.as_secs_f64());
    // A header the caller gave is written once, with the caller's value.
    let mut h = Object::with_callers(out, extra);
    fixed!(&mut h, "lang" => "\"py\"");
    h.string("task", spec.task);
    h.string("id", spec.id);
    if spec.eta.is_none() && spec.expires.is_none() && spec.group.is_none() {
        fixed!(&mut h, "shadow" => "null", "eta" => "null", "expires" => "null",
            "group" => "null", "group_index" => "null", "retries" => "0");
    } else {
        h.raw("shadow", "null");
        h.value("eta", &spec.eta.map(format_time));
        h.value("expires", &spec.expires.map(format_time));
        h.value("group", &spec.group.map(|(g, _)| g));
        h.value("group_index", &spec.group.map(|(_, i)| i));
        h.raw("retries", "0");
    }
    if spec.hard_time_limit.is_none() && spec.soft_time_limit.is_none() {
        fixed!(&mut h, "timelimit" => "[null,null]");
    } else {
        h.value(
            "timelimit",
            &[secs(spec.hard_time_limit), secs(spec.soft_time_limit)],
        );
    }
    h.string("root_id", spec.id);
    fixed!(&mut h, "parent_id" => "null");
    h.string("argsrepr", argsrepr);
    h.string("kwargsrepr", kwargsrepr);
    h.string("origin", spec.origin);
    fixed!(&mut h, "ignore_result" => "false", "replaced_task_nesting" => "0",
        "stamped_headers" => "null", "stamps" => "{}");
    h.value(HEADER_READY_AT, &ready_at_ms);
    if let Some(n) = spec.max_retries {
        h.value(HEADER_MAX_RETRIES, &n);
    }
    for (k, v) in extra.into_iter().flatten() {
        h.any(k, v);
    }
    h.close();
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
        assert_eq!(v["content-type"], super::super::envelope::CONTENT_TYPE_JSON);
        assert_eq!(v["content-encoding"], "utf-8");
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

    #[test]
    fn keys_come_in_celerys_order_and_callers_text_is_escaped() {
        let args = [json!("say \"hi\"\n")];
        let extra: Map<String, Value> = [("odd \"key\"".to_string(), json!("v\\"))]
            .into_iter()
            .collect();
        let raw = encode(&MessageSpec {
            id: "id \"1\"",
            task: "t\\x",
            args: &args,
            extra_headers: Some(&extra),
            ..Default::default()
        });
        let order = [
            "{\"body\":",
            "\"content-encoding\":",
            "\"content-type\":",
            "\"headers\":{\"lang\":",
            "\"task\":",
            "\"id\":",
            "\"shadow\":",
            "\"eta\":",
            "\"expires\":",
            "\"group\":",
            "\"group_index\":",
            "\"retries\":",
            "\"timelimit\":",
            "\"root_id\":",
            "\"parent_id\":",
            "\"argsrepr\":",
            "\"kwargsrepr\":",
            "\"origin\":",
            "\"ignore_result\":",
            "\"replaced_task_nesting\":",
            "\"stamped_headers\":",
            "\"stamps\":",
            "\"taskstack_ready_at\":",
            "\"odd \\\"key\\\"\":",
            "\"properties\":{\"correlation_id\":",
            "\"reply_to\":",
            "\"delivery_mode\":",
            "\"delivery_info\":",
            "\"priority\":",
            "\"body_encoding\":",
            "\"delivery_tag\":",
        ];
        let at: Vec<usize> = order
            .iter()
            .map(|k| {
                raw.find(k)
                    .unwrap_or_else(|| panic!("{k} missing from {raw}"))
            })
            .collect();
        assert!(at.windows(2).all(|w| w[0] < w[1]), "{raw}");
        let v: Value = serde_json::from_str(&raw).expect("JSON");
        let h = &v["headers"];
        assert_eq!(h["id"], "id \"1\"");
        assert_eq!(h["task"], "t\\x");
        assert_eq!(h["argsrepr"], "[\"say \\\"hi\\\"\\n\"]");
        assert_eq!(h["odd \"key\""], "v\\");
        assert_eq!(v["properties"]["correlation_id"], "id \"1\"");
    }
}
