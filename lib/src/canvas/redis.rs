//! The canvas on Redis: follow-ups sent at most once each, and Celery's
//! chord counters, driven by the very Lua scripts Celery 5.7's Redis result
//! backend runs (same text, same SHA), so header tasks finishing on Python
//! Celery workers and on taskstack workers count into one chord.

use super::FollowUp;
use crate::backend::BackendError;
use crate::broker::{BrokerError, Lane, on_lane};
use serde_json::Value;
use std::sync::LazyLock;
use std::time::Duration;

static SEND: LazyLock<::redis::Script> =
    LazyLock::new(|| ::redis::Script::new(include_str!("../../scripts/canvas_send.lua")));
static CHORD_PART_RETURN: LazyLock<::redis::Script> =
    LazyLock::new(|| ::redis::Script::new(include_str!("../../scripts/chord_part_return.lua")));
static CHORD_CLEANUP: LazyLock<::redis::Script> =
    LazyLock::new(|| ::redis::Script::new(include_str!("../../scripts/chord_cleanup.lua")));
static CHORD_CLAIM_EXTEND: LazyLock<::redis::Script> =
    LazyLock::new(|| ::redis::Script::new(include_str!("../../scripts/chord_claim_extend.lua")));

/// The marker under which a follow-up's sending is remembered.
pub fn sent_marker(namespace: &str, task_id: &str) -> String {
    format!("{namespace}:canvas:sent:{task_id}")
}

/// Pushes each follow-up whose marker is new (marker and push in one
/// atomic step, `canvas_send.lua`); returns how many were pushed. Markers
/// live `ttl`.
pub async fn send_once(
    lane: &mut Lane,
    namespace: &str,
    batch: &[FollowUp],
    ttl: Duration,
) -> Result<usize, BackendError> {
    if batch.is_empty() {
        return Ok(0);
    }
    let mut inv = SEND.prepare_invoke();
    inv.arg(ttl.as_secs().max(1));
    for f in batch {
        inv.key(sent_marker(namespace, &f.task_id))
            .key(&f.queue_key)
            .arg(&f.payload);
    }
    let n: usize = on_lane!(&mut *lane, "send canvas follow-ups", |c| inv
        .invoke_async(c))?;
    Ok(n)
}

/// The follow-ups of `batch` not marked sent yet, for a broker that is not
/// this Redis (RabbitMQ): they are published, then [`mark_sent`]. One
/// `MGET` of the markers.
pub async fn unsent(
    lane: &mut Lane,
    namespace: &str,
    batch: &[FollowUp],
) -> Result<Vec<FollowUp>, BackendError> {
    if batch.is_empty() {
        return Ok(Vec::new());
    }
    let keys: Vec<String> = batch
        .iter()
        .map(|f| sent_marker(namespace, &f.task_id))
        .collect();
    let marks: Vec<Option<String>> =
        on_lane!(&mut *lane, "read canvas sent markers", |c| ::redis::cmd(
            "MGET"
        )
        .arg(&keys)
        .query_async(c))?;
    Ok(batch
        .iter()
        .zip(marks)
        .filter(|(_, m)| m.is_none())
        .map(|(f, _)| f.clone())
        .collect())
}

/// Marks `batch` sent (markers live `ttl`), after the broker confirmed it.
pub async fn mark_sent(
    lane: &mut Lane,
    namespace: &str,
    batch: &[FollowUp],
    ttl: Duration,
) -> Result<(), BackendError> {
    if batch.is_empty() {
        return Ok(());
    }
    let mut pipe = ::redis::pipe();
    for f in batch {
        pipe.cmd("SET")
            .arg(sent_marker(namespace, &f.task_id))
            .arg(1)
            .arg("EX")
            .arg(ttl.as_secs().max(1))
            .ignore();
    }
    on_lane!(&mut *lane, "mark canvas follow-ups sent", |c| pipe
        .query_async::<()>(c))?;
    Ok(())
}

/// `celery-taskset-meta-<group id><suffix>`: Celery's chord keys.
pub fn group_key(group_id: &str, suffix: &str) -> String {
    format!("celery-taskset-meta-{group_id}{suffix}")
}

/// Records a chord's size (`.s`, kept `expires`) before its header is
/// sent, as Celery's `set_chord_size` does.
pub async fn set_size(
    lane: &mut Lane,
    group_id: &str,
    size: usize,
    expires: Duration,
) -> Result<(), BackendError> {
    let key = group_key(group_id, ".s");
    on_lane!(&mut *lane, "record chord size", |c| ::redis::cmd("SET")
        .arg(&key)
        .arg(size)
        .arg("EX")
        .arg(expires.as_secs().max(1))
        .query_async::<()>(c))?;
    Ok(())
}

/// Celery's claim lifetime with the default `result_chord_join_timeout`
/// (3 s): `max(5, int(3.0 * 2))`.
pub const CLAIM_EXPIRES_SECS: u64 = 6;
/// Lifetime of the `done` marker: `max(claim * 2, 300)`.
pub const DONE_EXPIRES_SECS: u64 = 300;
/// How long the claim is extended for publishing the body (what Celery
/// computes with its default retry policy and connection timeout).
pub const PUBLISH_CLAIM_SECS: u64 = 21;

/// What recording one header task's outcome found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PartOutcome {
    /// The chord was completed and cleaned up before (a late duplicate).
    AlreadyDone,
    /// Recorded; the chord is not complete yet (or another worker claimed
    /// sending its body).
    Pending { ready: i64, total: Option<i64> },
    /// Complete, and this worker holds the claim (token) to send the body.
    Claimed { token: String, total: i64 },
}

/// Records one header task's outcome (`[1, id, state, result]` into `.j`
/// at `group_index`) with Celery's `CHORD_PART_RETURN_LUA`: a header task
/// counted once even when it runs twice, the body's claim taken in the same
/// step when the chord is complete.
pub async fn part_return(
    lane: &mut Lane,
    group_id: &str,
    task_id: &str,
    group_index: Option<i64>,
    state: &str,
    result: &Value,
    expires: Duration,
) -> Result<PartOutcome, BackendError> {
    let encoded = encode_part(task_id, state, result);
    let token = uuid::Uuid::new_v4().simple().to_string();
    let secs = expires.as_secs();
    let mut inv = CHORD_PART_RETURN.prepare_invoke();
    for suffix in [".j", ".t", ".s", ".d", "", ".c"] {
        inv.key(group_key(group_id, suffix));
    }
    inv.arg(task_id)
        .arg(encoded)
        .arg("1")
        .arg(group_index.map_or_else(|| "+inf".to_owned(), |i| i.to_string()))
        .arg(secs)
        .arg(secs)
        .arg(CLAIM_EXPIRES_SECS)
        .arg(&token);
    let (ready, totaldiff, size, claimed): (i64, Option<i64>, Option<i64>, i64) =
        on_lane!(&mut *lane, "record chord part", |c| inv.invoke_async(c))?;
    if ready == -1 {
        return Ok(PartOutcome::AlreadyDone);
    }
    let total = size.map(|s| s + totaldiff.unwrap_or(0));
    Ok(match total {
        Some(total) if ready == total && claimed == 1 => PartOutcome::Claimed { token, total },
        _ => PartOutcome::Pending { ready, total },
    })
}

/// One header task's stored outcome, in `group_index` order.
#[derive(Debug, Clone, PartialEq)]
pub struct Part {
    pub task_id: String,
    pub state: String,
    pub result: Value,
}

/// The header's outcomes (`ZRANGE .j 0 -1`).
pub async fn parts(lane: &mut Lane, group_id: &str) -> Result<Vec<Part>, BackendError> {
    let key = group_key(group_id, ".j");
    let raw: Vec<String> = on_lane!(&mut *lane, "read chord parts", |c| ::redis::cmd("ZRANGE")
        .arg(&key)
        .arg(0)
        .arg(-1)
        .query_async(c))?;
    parse_parts(&raw)
}

/// The encoded header outcome `[1, id, state, result]` Celery stores.
pub(crate) fn encode_part(task_id: &str, state: &str, result: &Value) -> String {
    serde_json::json!([1, task_id, state, result]).to_string()
}

/// Stored header outcomes (`[1, id, state, result]` each), in order.
pub(crate) fn parse_parts(raw: &[String]) -> Result<Vec<Part>, BackendError> {
    raw.iter()
        .map(|s| {
            let bad = |detail: String| BrokerError::Reply {
                op: "read chord parts",
                detail,
            };
            let v: Value = serde_json::from_str(s).map_err(|e| bad(e.to_string()))?;
            match v.as_array().map(Vec::as_slice) {
                Some([_, Value::String(id), Value::String(state), result]) => Ok(Part {
                    task_id: id.clone(),
                    state: state.clone(),
                    result: result.clone(),
                }),
                _ => Err(bad(format!("{s} is not [1, id, state, result]"))),
            }
        })
        .collect::<Result<_, BrokerError>>()
        .map_err(BackendError::from)
}

/// Extends this worker's claim for publishing the body (Celery's
/// `CHORD_CLAIM_EXTEND_LUA`); false when the claim was lost.
pub async fn extend_claim(
    lane: &mut Lane,
    group_id: &str,
    token: &str,
) -> Result<bool, BackendError> {
    let mut inv = CHORD_CLAIM_EXTEND.prepare_invoke();
    inv.key(group_key(group_id, ".c"))
        .key(group_key(group_id, ".s"))
        .arg(token)
        .arg(PUBLISH_CLAIM_SECS);
    let n: i64 = on_lane!(&mut *lane, "extend chord claim", |c| inv.invoke_async(c))?;
    Ok(n == 1)
}

/// Drops the chord's counters and marks it done (Celery's
/// `CHORD_CLEANUP_LUA`); false when the claim was lost meanwhile.
pub async fn cleanup(lane: &mut Lane, group_id: &str, token: &str) -> Result<bool, BackendError> {
    let mut inv = CHORD_CLEANUP.prepare_invoke();
    for suffix in [".c", ".j", ".t", ".s", ".d"] {
        inv.key(group_key(group_id, suffix));
    }
    inv.arg(token).arg(DONE_EXPIRES_SECS);
    let n: i64 = on_lane!(&mut *lane, "clean up chord", |c| inv.invoke_async(c))?;
    Ok(n == 1)
}

/// Deletes the chord size after a failed chord (as Celery does), so a late
/// copy of a header task does not fail it again.
pub async fn drop_size(lane: &mut Lane, group_id: &str) -> Result<(), BackendError> {
    let key = group_key(group_id, ".s");
    on_lane!(&mut *lane, "drop chord size", |c| ::redis::cmd("DEL")
        .arg(&key)
        .query_async::<()>(c))?;
    Ok(())
}
