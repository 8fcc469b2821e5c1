//! Publishing one slot: the Celery message, and the fenced, exactly-once
//! script (`beat_publish.lua`) that pushes it and records the slot in one
//! atomic step.

use super::schedule::{Entry, format_slot};
use crate::backend::SlotPublish;
use crate::broker::{BrokerError, Lane, on_lane};
use crate::proto::Keys;
use crate::proto::envelope::{MessageSpec, encode};
use crate::proto::keys::queue_key;
use chrono::{DateTime, Utc};
use redis::Script;
use serde_json::{Map, Value, json};
use std::sync::LazyLock;
#[cfg(test)]
use std::time::Duration;

static PUBLISH: LazyLock<Script> =
    LazyLock::new(|| Script::new(include_str!("../../scripts/beat_publish.lua")));

/// Header naming the schedule entry a message was published for.
pub const HEADER_BEAT_ENTRY: &str = "beat_entry";
/// Header carrying the slot (scheduled time, RFC 3339 UTC) a message is for.
pub const HEADER_BEAT_SLOT: &str = "beat_slot";

/// What the publish script did.
pub(crate) use crate::backend::SlotOutcome as Outcome;

/// The Celery message for `entry`'s `slot`: a fresh task id, `origin` set to
/// the publishing instance, and the `beat_entry` / `beat_slot` headers.
pub(crate) fn message(entry: &Entry, slot: DateTime<Utc>, origin: &str) -> String {
    let id = uuid::Uuid::new_v4().to_string();
    let mut headers = Map::new();
    headers.insert(HEADER_BEAT_ENTRY.into(), json!(entry.name));
    headers.insert(HEADER_BEAT_SLOT.into(), json!(format_slot(slot)));
    let expires = entry
        .expires
        .and_then(|d| chrono::Duration::from_std(d).ok())
        .map(|d| slot + d);
    encode(&MessageSpec {
        id: &id,
        task: &entry.task,
        args: &entry.args,
        kwargs: &entry.kwargs,
        queue: &entry.queue,
        expires,
        origin,
        extra_headers: Some(&headers),
        ..Default::default()
    })
}

/// Runs the publish script for one slot. `lock_value` is the lock value we
/// hold; `margin` how long the lock must still live for us to publish.
#[cfg(test)]
pub(crate) async fn publish(
    lane: &mut Lane,
    keys: &Keys,
    lock_value: &str,
    margin: Duration,
    entry: &Entry,
    slot: DateTime<Utc>,
    payload: &str,
) -> Result<Outcome, BrokerError> {
    publish_slot(
        lane,
        keys,
        SlotPublish {
            lock_value,
            margin,
            entry: &entry.name,
            queue: &entry.queue,
            slot_ms: slot.timestamp_millis(),
            payload,
        },
    )
    .await
}

/// [`publish`] by the entry's name and queue (what the script needs).
pub(crate) async fn publish_slot(
    lane: &mut Lane,
    keys: &Keys,
    slot: SlotPublish<'_>,
) -> Result<Outcome, BrokerError> {
    let mut inv = PUBLISH.prepare_invoke();
    inv.key(keys.beat_lock())
        .key(keys.beat_last())
        .key(queue_key(slot.queue, 0))
        .arg(slot.lock_value)
        .arg(u64::try_from(slot.margin.as_millis()).unwrap_or(u64::MAX))
        .arg(slot.entry)
        .arg(slot.slot_ms)
        .arg(slot.payload);
    let (code, detail): (i64, i64) =
        on_lane!(&mut *lane, "publish beat slot", |c| inv.invoke_async(c))?;
    match code {
        1 => Ok(Outcome::Published),
        0 => Ok(Outcome::AlreadyPublished { last_ms: detail }),
        -1 => Ok(Outcome::NotLeader),
        -2 => Ok(Outcome::LeaseTooShort { pttl_ms: detail }),
        other => Err(BrokerError::Reply {
            op: "publish beat slot",
            detail: format!("unknown code {other}"),
        }),
    }
}

/// The last published slot (ms since the epoch) of each named entry.
pub async fn last_slots(
    lane: &mut Lane,
    keys: &Keys,
    names: &[&str],
) -> Result<Vec<Option<i64>>, BrokerError> {
    if names.is_empty() {
        return Ok(Vec::new());
    }
    let raw: Vec<Option<String>> =
        on_lane!(&mut *lane, "read beat last slots", |c| redis::cmd("HMGET")
            .arg(keys.beat_last())
            .arg(names)
            .query_async(c))?;
    Ok(raw
        .into_iter()
        .map(|v| v.and_then(|s| s.parse::<i64>().ok()))
        .collect())
}

/// A message's `beat_entry` and `beat_slot` headers, if it has them.
pub fn beat_headers(payload: &str) -> Option<(String, DateTime<Utc>)> {
    let v: Value = serde_json::from_str(payload).ok()?;
    let entry = v.pointer("/headers/beat_entry")?.as_str()?.to_owned();
    let slot = v.pointer("/headers/beat_slot")?.as_str()?;
    let slot = DateTime::parse_from_rfc3339(slot).ok()?.with_timezone(&Utc);
    Some((entry, slot))
}
