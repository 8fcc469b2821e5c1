//! The well-formed envelope decoded straight into a [`TaskMessage`], with
//! no JSON tree of its headers and properties: the fields taskstack reads
//! are picked out, borrowed from the text where they need no unescaping,
//! and everything else is skipped. A worker decodes every message it
//! takes, and the tree (an allocation per header, key and value) was the
//! largest part of that.
//!
//! Anything that is not the common shape (a field of another type, a
//! duplicate key, a value out of range, an error of any kind) gives `None`,
//! and [`super::decode`] decodes through the tree instead, which accepts
//! and refuses exactly what it always did and names what is wrong. The
//! test below checks that both paths give the same message.

use super::{
    Body, CONTENT_TYPE_JSON, Raw, TaskMessage, body_value, parse_time, split_body, time_limit,
};
use chrono::{DateTime, Utc};
use serde::Deserialize;
use serde_json::Value;
use std::borrow::Cow;
use std::time::Duration;

#[derive(Deserialize)]
struct Envelope<'a> {
    #[serde(borrow)]
    headers: Headers<'a>,
    #[serde(rename = "content-type", borrow)]
    content_type: Cow<'a, str>,
    #[serde(borrow, default)]
    properties: Option<Properties<'a>>,
    body: Value,
}

#[derive(Deserialize)]
struct Properties<'a> {
    #[serde(borrow, default)]
    body_encoding: Option<Cow<'a, str>>,
}

/// The headers taskstack reads (`HEADER_MAX_RETRIES` is `max_retries`).
#[derive(Deserialize)]
struct Headers<'a> {
    #[serde(borrow)]
    task: Cow<'a, str>,
    #[serde(borrow)]
    id: Cow<'a, str>,
    #[serde(default)]
    retries: Option<u32>,
    #[serde(default)]
    max_retries: Option<u32>,
    #[serde(default)]
    timelimit: Option<(Option<f64>, Option<f64>)>,
    #[serde(borrow, default)]
    eta: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    expires: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    parent_id: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    root_id: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    group: Option<Cow<'a, str>>,
    #[serde(default)]
    ignore_result: Option<bool>,
}

/// `payload` as a [`TaskMessage`] when it has the common shape; `None`
/// sends it through the tree (see the module documentation).
pub(super) fn decode(payload: &str) -> Option<TaskMessage> {
    let e: Envelope<'_> = serde_json::from_str(payload).ok()?;
    if e.content_type != CONTENT_TYPE_JSON {
        return None;
    }
    let h = e.headers;
    if h.task.is_empty() || h.id.is_empty() {
        return None;
    }
    let encoding = e.properties.and_then(|p| p.body_encoding);
    let (args, kwargs, embed): Body =
        split_body(body_value(encoding.as_deref(), &e.body).ok()?).ok()?;
    let limit = |secs: Option<f64>| -> Option<Option<Duration>> {
        match secs {
            None => Some(None),
            Some(s) => time_limit(s).map(Some),
        }
    };
    let (hard_time_limit, soft_time_limit) = match h.timelimit {
        None => (None, None),
        Some((hard, soft)) => (limit(hard)?, limit(soft)?),
    };
    Some(TaskMessage {
        id: h.id.into_owned(),
        task: h.task.into_owned(),
        args,
        kwargs,
        retries: h.retries.unwrap_or(0),
        max_retries: h.max_retries,
        eta: time(h.eta)?,
        expires: time(h.expires)?,
        hard_time_limit,
        soft_time_limit,
        parent_id: h.parent_id.map(Cow::into_owned),
        root_id: h.root_id.map(Cow::into_owned),
        group: h.group.map(Cow::into_owned),
        ignore_result: h.ignore_result.unwrap_or(false),
        embed,
        raw: Raw::new(payload),
    })
}

/// `Some(None)` for no time, `None` for one that does not parse.
fn time(s: Option<Cow<'_, str>>) -> Option<Option<DateTime<Utc>>> {
    match s {
        None => Some(None),
        Some(s) => parse_time(&s).map(Some),
    }
}

#[cfg(test)]
mod tests {
    use super::super::{HEADER_MAX_RETRIES, MessageSpec, decode_tree, encode};
    use super::*;
    use serde_json::{Map, json};

    /// Both paths give the same message for every input the fast one takes.
    fn same_both_ways(payload: &str) -> TaskMessage {
        let fast = decode(payload).unwrap_or_else(|| panic!("the fast path refused {payload}"));
        let tree = decode_tree(payload).expect("the tree decodes it");
        assert_eq!(format!("{fast:?}"), format!("{tree:?}"), "{payload}");
        assert_eq!(fast, tree);
        assert_eq!(fast.embed(), tree.embed());
        assert_eq!(fast.header("argsrepr"), tree.header("argsrepr"));
        assert_eq!(fast.property("reply_to"), tree.property("reply_to"));
        fast
    }

    fn celery(f: impl FnOnce(&mut Value)) -> String {
        let mut v: Value = serde_json::from_str(super::super::tests::CELERY_SAMPLE).expect("json");
        f(&mut v);
        v.to_string()
    }

    #[test]
    fn the_fast_path_decodes_what_the_tree_decodes_the_same_way() {
        let m = same_both_ways(super::super::tests::CELERY_SAMPLE);
        assert_eq!(m.task, "proj.add");
        assert_eq!(m.soft_time_limit, Some(Duration::from_secs(10)));
        let kwargs: Map<String, Value> = [("k".to_owned(), json!({"a": [1, "\u{e9}"]}))]
            .into_iter()
            .collect();
        let args = [json!("x\"y\\z\n"), json!(1.5), json!(null)];
        let parent: Map<String, Value> = [
            ("parent_id".to_owned(), json!("p")),
            ("retries".to_owned(), json!(3)),
        ]
        .into_iter()
        .collect();
        let chain = json!({"chain": [{"task": "next", "args": [1]}]});
        let own = encode(&MessageSpec {
            id: "id-\u{1f600}",
            task: "t.with \"quotes\"",
            args: &args,
            kwargs: &kwargs,
            queue: "q",
            max_retries: Some(5),
            hard_time_limit: Some(Duration::from_millis(2500)),
            extra_headers: Some(&parent),
            embed: Some(&chain),
            group: Some(("g", 1)),
            ..MessageSpec::default()
        });
        let m = same_both_ways(&own);
        assert_eq!((m.retries, m.max_retries), (3, Some(5)));
        assert_eq!(m.task, "t.with \"quotes\"");
        for v in [
            celery(|v| v["headers"]["timelimit"] = json!([null, 7])),
            celery(|v| v["headers"]["timelimit"] = json!(null)),
            celery(|v| v["headers"]["eta"] = json!("2026-11-23T23:44:32.5")),
            celery(|v| v["headers"]["retries"] = json!(null)),
            celery(|v| v["headers"]["group"] = json!("g\\u00e9")),
            celery(|v| v["headers"][HEADER_MAX_RETRIES] = json!(0)),
            celery(|v| {
                v["properties"] = json!(null);
                v["body"] = json!([[3], {}]);
            }),
            celery(|v| {
                v["properties"]["body_encoding"] = json!(null);
                v["body"] = json!([[1], {"a": 2}, {"chain": [{"task": "n"}]}]);
            }),
            celery(|v| {
                v["properties"]
                    .as_object_mut()
                    .expect("object")
                    .remove("body_encoding");
                v["body"] = json!("[[2], {}]");
            }),
        ] {
            same_both_ways(&v);
        }
    }

    #[test]
    fn anything_else_goes_through_the_tree() {
        // The tree takes the last of duplicate keys.
        let dup = super::super::tests::CELERY_SAMPLE.replacen(
            "\"retries\": 0",
            "\"retries\": 0, \"retries\": 2",
            1,
        );
        for v in [
            // Types the tree reads leniently or refuses by name.
            celery(|v| v["headers"]["parent_id"] = json!(7)),
            celery(|v| v["headers"]["ignore_result"] = json!("yes")),
            celery(|v| v["headers"]["retries"] = json!(-1)),
            celery(|v| v["headers"]["timelimit"] = json!([0, 1])),
            celery(|v| v["headers"]["eta"] = json!("soon")),
            celery(|v| v["headers"]["task"] = json!("")),
            celery(|v| v["headers"]["id"] = json!(null)),
            celery(|v| v["content-type"] = json!("application/x-python-serialize")),
            celery(|v| v["properties"]["body_encoding"] = json!("zip")),
            celery(|v| v["body"] = json!("not base64!")),
            dup.clone(),
            "[]".to_owned(),
            "{".to_owned(),
        ] {
            assert!(decode(&v).is_none(), "{v}");
        }
        assert_eq!(super::super::decode(&dup).expect("decodes").retries, 2);
        let lenient = celery(|v| v["headers"]["parent_id"] = json!(7));
        assert_eq!(
            super::super::decode(&lenient).expect("decodes").parent_id,
            None
        );
    }
}
