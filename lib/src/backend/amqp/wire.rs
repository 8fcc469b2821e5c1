//! Celery's message on AMQP and taskstack's in-process form of it.
//!
//! Inside taskstack every message is kombu's JSON envelope (`body`,
//! `content-type`, `content-encoding`, `headers`, `properties`), the form
//! the Redis transport stores. On RabbitMQ the same message is what Celery's
//! pyamqp transport sends: the body as raw bytes, the headers as an AMQP
//! table, and `content_type`, `content_encoding`, `correlation_id`,
//! `reply_to`, `priority` and `delivery_mode` as AMQP properties. These two
//! functions convert between them without losing a field the worker reads.

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use lapin::BasicProperties;
use lapin::types::{AMQPValue, FieldArray, FieldTable, LongString, ShortString};
use serde::{Serialize, Serializer};
use serde_json::{Map, Number, Value};

/// `delivery_mode` 2: RabbitMQ writes the message to disk (Celery's
/// default for task messages).
pub(crate) const PERSISTENT: u8 = 2;

/// Headers RabbitMQ adds when it dead-letters a message (the delay queues
/// do, on every hop): they describe the hop, not the task, and are left out
/// of the envelope so a re-published message does not carry them along.
const BROKER_HEADERS: [&str; 6] = [
    "x-death",
    "x-first-death-exchange",
    "x-first-death-queue",
    "x-first-death-reason",
    "x-last-death-queue",
    "x-last-death-reason",
];

/// A message ready for `basic.publish`.
#[derive(Debug, Clone)]
pub(crate) struct AmqpMessage {
    pub body: Vec<u8>,
    pub properties: BasicProperties,
}

/// Converts a kombu envelope (JSON text) to the AMQP message Celery's
/// pyamqp transport would send. The body is decoded from base64 when the
/// envelope says so, else taken as it is (text, or JSON re-serialised).
/// `expiration` (the message's TTL) is kept only when `keep_ttl`: a
/// message bound for the delay levels must not expire out of a level early.
pub(crate) fn to_amqp(envelope: &[u8], keep_ttl: bool) -> Result<AmqpMessage, String> {
    let v: Value = serde_json::from_slice(envelope)
        .map_err(|e| format!("the message is not a JSON envelope: {e}"))?;
    let obj = v
        .as_object()
        .ok_or("the message's top level is not a JSON object")?;
    let props = obj.get("properties").and_then(Value::as_object);
    let encoding = props
        .and_then(|p| p.get("body_encoding"))
        .and_then(Value::as_str);
    let body = match (encoding, obj.get("body")) {
        (Some("base64"), Some(Value::String(s))) => B64
            .decode(s.trim())
            .map_err(|e| format!("the message body is not valid base64: {e}"))?,
        (Some("base64"), _) => return Err("the base64 message body is not a string".into()),
        (Some(other), _) => return Err(format!("unknown body_encoding {other:?}")),
        (None, Some(Value::String(s))) => s.clone().into_bytes(),
        (None, Some(other)) => other.to_string().into_bytes(),
        (None, None) => return Err("the message has no body".into()),
    };
    let text = |o: Option<&Map<String, Value>>, k: &str| {
        o.and_then(|m| m.get(k))
            .and_then(Value::as_str)
            .map(ShortString::from)
    };
    let mut properties = BasicProperties::default().with_delivery_mode(PERSISTENT);
    if let Some(ct) = text(Some(obj), "content-type") {
        properties = properties.with_content_type(ct);
    }
    if let Some(ce) = text(Some(obj), "content-encoding") {
        properties = properties.with_content_encoding(ce);
    }
    if let Some(h) = obj.get("headers").and_then(Value::as_object) {
        properties = properties.with_headers(table_of(h));
    }
    if let Some(c) = text(props, "correlation_id") {
        properties = properties.with_correlation_id(c);
    }
    if let Some(r) = text(props, "reply_to") {
        properties = properties.with_reply_to(r);
    }
    let priority = props
        .and_then(|p| p.get("priority"))
        .and_then(Value::as_u64)
        .map_or(0, |p| u8::try_from(p.min(255)).unwrap_or(u8::MAX));
    properties = properties.with_priority(priority);
    if let Some(e) = text(props, "expiration").filter(|_| keep_ttl) {
        properties = properties.with_expiration(e);
    }
    Ok(AmqpMessage { body, properties })
}

/// What arrived from RabbitMQ, as a kombu envelope (JSON text) the worker
/// decodes as it decodes a message from Redis. Written straight from the
/// AMQP values (no JSON tree in between: it runs for every delivery).
pub(crate) fn to_envelope(
    body: &[u8],
    properties: &BasicProperties,
    exchange: &str,
    routing_key: &str,
) -> Vec<u8> {
    let envelope = Envelope {
        body: B64.encode(body),
        content_encoding: text(properties.content_encoding()),
        content_type: text(properties.content_type()),
        headers: Headers(properties.headers().as_ref()),
        properties: Properties {
            correlation_id: text(properties.correlation_id()),
            reply_to: text(properties.reply_to()),
            delivery_mode: properties.delivery_mode().unwrap_or(PERSISTENT),
            priority: properties.priority().unwrap_or(0),
            delivery_info: DeliveryInfo {
                exchange,
                routing_key,
            },
            body_encoding: "base64",
        },
    };
    // Cannot fail: every map key is a string.
    serde_json::to_vec(&envelope).unwrap_or_default()
}

fn text(o: &Option<ShortString>) -> Option<&str> {
    o.as_ref().map(ShortString::as_str)
}

/// kombu's envelope, as the Redis transport stores it.
#[derive(Serialize)]
struct Envelope<'a> {
    body: String,
    #[serde(rename = "content-encoding")]
    content_encoding: Option<&'a str>,
    #[serde(rename = "content-type")]
    content_type: Option<&'a str>,
    headers: Headers<'a>,
    properties: Properties<'a>,
}

#[derive(Serialize)]
struct Properties<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    correlation_id: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    reply_to: Option<&'a str>,
    delivery_mode: u8,
    priority: u8,
    delivery_info: DeliveryInfo<'a>,
    body_encoding: &'static str,
}

/// kombu's `delivery_info` property: where the message was sent.
#[derive(Serialize)]
struct DeliveryInfo<'a> {
    exchange: &'a str,
    routing_key: &'a str,
}

/// The message's headers without [`BROKER_HEADERS`]; `{}` when it has none.
struct Headers<'a>(Option<&'a FieldTable>);

impl Serialize for Headers<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let entries = self.0.into_iter().flat_map(|t| t.inner().iter());
        s.collect_map(
            entries
                .filter(|(k, _)| !BROKER_HEADERS.contains(&k.as_str()))
                .map(|(k, v)| (k.as_str(), AsJson(v))),
        )
    }
}

/// An AMQP value written as [`json_of`] would make it.
struct AsJson<'a>(&'a AMQPValue);

impl Serialize for AsJson<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let float = |s: S, f: f64| {
            if f.is_finite() {
                s.serialize_f64(f)
            } else {
                s.serialize_unit()
            }
        };
        match self.0 {
            AMQPValue::Boolean(b) => s.serialize_bool(*b),
            AMQPValue::ShortShortInt(i) => s.serialize_i8(*i),
            AMQPValue::ShortShortUInt(i) => s.serialize_u8(*i),
            AMQPValue::ShortInt(i) => s.serialize_i16(*i),
            AMQPValue::ShortUInt(i) => s.serialize_u16(*i),
            AMQPValue::LongInt(i) => s.serialize_i32(*i),
            AMQPValue::LongUInt(i) => s.serialize_u32(*i),
            AMQPValue::LongLongInt(i) => s.serialize_i64(*i),
            AMQPValue::Float(f) => float(s, f64::from(*f)),
            AMQPValue::Double(f) => float(s, *f),
            AMQPValue::DecimalValue(d) => {
                float(s, f64::from(d.value) / 10f64.powi(i32::from(d.scale)))
            }
            AMQPValue::ShortString(v) => s.serialize_str(v.as_str()),
            AMQPValue::LongString(v) => s.serialize_str(&String::from_utf8_lossy(v.as_bytes())),
            AMQPValue::FieldArray(a) => s.collect_seq(a.as_slice().iter().map(AsJson)),
            AMQPValue::Timestamp(t) => s.serialize_u64(*t),
            AMQPValue::FieldTable(t) => {
                s.collect_map(t.inner().iter().map(|(k, v)| (k.as_str(), AsJson(v))))
            }
            AMQPValue::ByteArray(b) => s.serialize_str(&B64.encode(b.as_slice())),
            AMQPValue::Void => s.serialize_unit(),
        }
    }
}

/// A JSON object as an AMQP table, typed as py-amqp types Python values
/// (strings long, integers signed 32-bit or 64-bit, floats doubles, null
/// void).
pub(crate) fn table_of(obj: &Map<String, Value>) -> FieldTable {
    let mut t = FieldTable::default();
    for (k, v) in obj {
        t.insert(ShortString::from(k.as_str()), amqp_of(v));
    }
    t
}

fn amqp_of(v: &Value) -> AMQPValue {
    match v {
        Value::Null => AMQPValue::Void,
        Value::Bool(b) => AMQPValue::Boolean(*b),
        Value::Number(n) => match (n.as_i64(), n.as_f64()) {
            // py-amqp's types: 'I' (32-bit) when it fits, else 'l'.
            (Some(i), _) => match i32::try_from(i) {
                Ok(small) => AMQPValue::LongInt(small),
                Err(_) => AMQPValue::LongLongInt(i),
            },
            (None, Some(f)) => AMQPValue::Double(f),
            (None, None) => AMQPValue::LongString(LongString::from(n.to_string())),
        },
        Value::String(s) => AMQPValue::LongString(LongString::from(s.as_str())),
        Value::Array(a) => {
            AMQPValue::FieldArray(FieldArray::from(a.iter().map(amqp_of).collect::<Vec<_>>()))
        }
        Value::Object(o) => AMQPValue::FieldTable(table_of(o)),
    }
}

/// An AMQP value as JSON: what Celery's Python side reads it as.
pub(crate) fn json_of(v: &AMQPValue) -> Value {
    match v {
        AMQPValue::Boolean(b) => Value::Bool(*b),
        AMQPValue::ShortShortInt(i) => Value::from(*i),
        AMQPValue::ShortShortUInt(i) => Value::from(*i),
        AMQPValue::ShortInt(i) => Value::from(*i),
        AMQPValue::ShortUInt(i) => Value::from(*i),
        AMQPValue::LongInt(i) => Value::from(*i),
        AMQPValue::LongUInt(i) => Value::from(*i),
        AMQPValue::LongLongInt(i) => Value::from(*i),
        AMQPValue::Float(f) => Number::from_f64(f64::from(*f)).map_or(Value::Null, Value::Number),
        AMQPValue::Double(f) => Number::from_f64(*f).map_or(Value::Null, Value::Number),
        AMQPValue::DecimalValue(d) => {
            let value = f64::from(d.value) / 10f64.powi(i32::from(d.scale));
            Number::from_f64(value).map_or(Value::Null, Value::Number)
        }
        AMQPValue::ShortString(s) => Value::from(s.as_str()),
        AMQPValue::LongString(s) => Value::from(String::from_utf8_lossy(s.as_bytes()).as_ref()),
        AMQPValue::FieldArray(a) => Value::Array(a.as_slice().iter().map(json_of).collect()),
        AMQPValue::Timestamp(t) => Value::from(*t),
        AMQPValue::FieldTable(t) => Value::Object(
            t.inner()
                .iter()
                .map(|(k, v)| (k.as_str().to_owned(), json_of(v)))
                .collect(),
        ),
        AMQPValue::ByteArray(b) => Value::from(B64.encode(b.as_slice())),
        AMQPValue::Void => Value::Null,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::envelope;

    const SAMPLE: &str = r#"{"body": "W1sxLCAxXSwge30sIHsiY2FsbGJhY2tzIjogbnVsbCwgImVycmJhY2tzIjogbnVsbCwgImNoYWluIjogbnVsbCwgImNob3JkIjogbnVsbH1d", "content-encoding": "utf-8", "content-type": "application/json", "headers": {"lang": "py", "task": "proj.add", "id": "13a3fd71-e082-436d-83c0-075cbb1d6ba8", "shadow": null, "eta": null, "group": null, "retries": 0, "timelimit": [20, 10.5], "root_id": "13a3fd71-e082-436d-83c0-075cbb1d6ba8", "argsrepr": "(1, 1)", "ignore_result": false, "stamps": {}}, "properties": {"correlation_id": "13a3fd71-e082-436d-83c0-075cbb1d6ba8", "reply_to": "69775078-a6b2-34c4-9b3c-133e8af8719e", "delivery_mode": 2, "delivery_info": {"exchange": "", "routing_key": "celery"}, "priority": 3, "body_encoding": "base64", "delivery_tag": "46bfaafd"}}"#;

    #[test]
    fn an_envelope_goes_to_amqp_as_celery_sends_it_and_comes_back_whole() {
        let m = to_amqp(SAMPLE.as_bytes(), true).expect("converts");
        assert_eq!(
            m.body,
            br#"[[1, 1], {}, {"callbacks": null, "errbacks": null, "chain": null, "chord": null}]"#
        );
        let p = &m.properties;
        assert_eq!(
            p.content_type().as_ref().map(ShortString::as_str),
            Some("application/json")
        );
        assert_eq!(
            p.content_encoding().as_ref().map(ShortString::as_str),
            Some("utf-8")
        );
        assert_eq!(
            p.correlation_id().as_ref().map(ShortString::as_str),
            Some("13a3fd71-e082-436d-83c0-075cbb1d6ba8")
        );
        assert_eq!(*p.delivery_mode(), Some(2));
        assert_eq!(*p.priority(), Some(3));
        let h = p.headers().as_ref().expect("headers");
        assert_eq!(
            h.inner().get("task"),
            Some(&AMQPValue::LongString("proj.add".into()))
        );
        assert_eq!(h.inner().get("retries"), Some(&AMQPValue::LongInt(0)));
        assert_eq!(h.inner().get("shadow"), Some(&AMQPValue::Void));

        let back = to_envelope(&m.body, p, "celery", "celery");
        let before = envelope::decode(SAMPLE).expect("sample decodes");
        let after = envelope::decode(std::str::from_utf8(&back).expect("utf-8")).expect("decodes");
        assert_eq!(after.id, before.id);
        assert_eq!(after.task, before.task);
        assert_eq!(after.args, before.args);
        assert_eq!(after.kwargs, before.kwargs);
        assert_eq!(after.header("timelimit"), before.header("timelimit"));
        assert_eq!(after.property("priority"), Some(&Value::from(3)));
    }

    #[test]
    fn every_amqp_value_reaches_the_envelope_as_json_of_reads_it() {
        use lapin::types::{ByteArray, DecimalValue};
        let mut inner = FieldTable::default();
        inner.insert("n".into(), AMQPValue::LongLongInt(-5));
        let mut h = FieldTable::default();
        let values = [
            ("bool", AMQPValue::Boolean(true)),
            ("i8", AMQPValue::ShortShortInt(-8)),
            ("u8", AMQPValue::ShortShortUInt(8)),
            ("i16", AMQPValue::ShortInt(-16)),
            ("u16", AMQPValue::ShortUInt(16)),
            ("i32", AMQPValue::LongInt(-32)),
            ("u32", AMQPValue::LongUInt(32)),
            ("i64", AMQPValue::LongLongInt(i64::MIN)),
            ("f32", AMQPValue::Float(0.1)),
            ("f64", AMQPValue::Double(10.5)),
            ("nan", AMQPValue::Double(f64::NAN)),
            (
                "decimal",
                AMQPValue::DecimalValue(DecimalValue {
                    scale: 2,
                    value: 314,
                }),
            ),
            ("short", AMQPValue::ShortString("s".into())),
            ("long", AMQPValue::LongString("l\"\u{e9}".into())),
            (
                "array",
                AMQPValue::FieldArray(FieldArray::from(vec![
                    AMQPValue::Void,
                    AMQPValue::FieldTable(inner.clone()),
                ])),
            ),
            ("time", AMQPValue::Timestamp(1_700_000_000)),
            ("table", AMQPValue::FieldTable(inner)),
            (
                "bytes",
                AMQPValue::ByteArray(ByteArray::from(vec![0u8, 255])),
            ),
            ("void", AMQPValue::Void),
        ];
        for (k, v) in &values {
            h.insert((*k).into(), v.clone());
        }
        let expected = json_of(&AMQPValue::FieldTable(h.clone()));
        h.insert(
            "x-first-death-queue".into(),
            AMQPValue::LongString("taskstack.delay.3".into()),
        );
        let p = BasicProperties::default()
            .with_headers(h)
            .with_content_type("application/json".into())
            .with_reply_to("r".into());
        let env: Value =
            serde_json::from_slice(&to_envelope(b"[1]", &p, "ex", "rk")).expect("json");
        assert_eq!(env["headers"], expected);
        assert_eq!(env["body"], "WzFd");
        assert_eq!(env["content-type"], "application/json");
        assert_eq!(env["content-encoding"], Value::Null);
        assert_eq!(
            env["properties"],
            serde_json::json!({
                "reply_to": "r",
                "delivery_mode": 2,
                "priority": 0,
                "delivery_info": {"exchange": "ex", "routing_key": "rk"},
                "body_encoding": "base64",
            })
        );
    }

    #[test]
    fn broker_headers_are_left_out_and_bad_envelopes_are_named() {
        let mut h = FieldTable::default();
        h.insert("id".into(), AMQPValue::LongString("x".into()));
        h.insert(
            "x-death".into(),
            AMQPValue::FieldArray(FieldArray::default()),
        );
        let p = BasicProperties::default().with_headers(h);
        let env: Value = serde_json::from_slice(&to_envelope(b"[]", &p, "", "q")).expect("json");
        assert_eq!(env["headers"], serde_json::json!({"id": "x"}));
        assert!(
            to_amqp(b"not json", true)
                .expect_err("refused")
                .contains("not a JSON envelope")
        );
        assert!(
            to_amqp(
                br#"{"body": 1, "properties": {"body_encoding": "zip"}}"#,
                true
            )
            .expect_err("refused")
            .contains("zip")
        );
    }
}
