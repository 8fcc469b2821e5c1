//! The backlog bench's messages (`bin/backlog.rs`): the queued and the
//! parked ones it prefills, and the check that every task succeeded.

use anyhow::{Result, bail};
use redis::aio::MultiplexedConnection;
use serde_json::json;
use taskstack::proto::envelope::{MessageSpec, encode};
use taskstack::proto::keys::result_key;

/// The queue the worker consumes (its default).
pub(crate) const QUEUE: &str = "celery";
/// Where the queued messages wait until the drain starts.
pub(crate) const PREFILL: &str = "bench.backlog.queue";
/// Where the parked messages wait until the drain starts (the parked
/// ZSET and HASH, renamed to the worker's own at the start).
pub(crate) const PREFILL_DELAYED: &str = "bench.backlog.delayed";
pub(crate) const PREFILL_DELAYED_MSG: &str = "bench.backlog.delayed-msg";
/// Messages per command when prefilling and checking results.
pub(crate) const CHUNK: usize = 1_000;
/// Commands per pipelined round trip when prefilling.
pub(crate) const PIPELINE: usize = 8;

/// A task id as long as Celery's (a UUID), so sizes compare.
pub(crate) fn task_id(kind: u8, i: usize) -> String {
    format!("0000b10c-{kind:04x}-4000-8000-{i:012x}")
}

/// The message of task `i`: `taskstack.echo(i)` in Celery's protocol 2.
pub(crate) fn message(kind: u8, i: usize) -> String {
    let id = task_id(kind, i);
    let args = [json!(i)];
    encode(&MessageSpec {
        id: &id,
        task: "taskstack.echo",
        args: &args,
        queue: QUEUE,
        origin: "bench@backlog",
        ..MessageSpec::default()
    })
}

pub(crate) const QUEUED: u8 = 1;
pub(crate) const DELAYED: u8 = 2;

/// Pipelined `LPUSH`es of the queued messages to [`PREFILL`]; returns the bytes pushed.
pub(crate) async fn prefill_queue(con: &mut MultiplexedConnection, n: usize) -> Result<usize> {
    let mut bytes = 0;
    for start in (0..n).step_by(CHUNK * PIPELINE) {
        let mut pipe = redis::pipe();
        for chunk in (start..n.min(start + CHUNK * PIPELINE)).step_by(CHUNK) {
            let msgs: Vec<String> = (chunk..n.min(chunk + CHUNK))
                .map(|i| message(QUEUED, i))
                .collect();
            bytes += msgs.iter().map(String::len).sum::<usize>();
            pipe.cmd("LPUSH").arg(PREFILL).arg(msgs).ignore();
        }
        let _: () = pipe.query_async(con).await?;
    }
    Ok(bytes)
}

/// The delayed messages, parked as `delay.lua` parks them (parked id
/// `<id>\n<queue key>` → due time in the ZSET, parked id → the message in
/// the HASH) under the prefill names; due from `first_due` (ms) over
/// `spread` seconds.
pub(crate) async fn prefill_delayed(
    con: &mut MultiplexedConnection,
    n: usize,
    first_due: i64,
    spread: f64,
) -> Result<()> {
    for start in (0..n).step_by(CHUNK * PIPELINE) {
        let mut pipe = redis::pipe();
        for chunk in (start..n.min(start + CHUNK * PIPELINE)).step_by(CHUNK) {
            let range = chunk..n.min(chunk + CHUNK);
            let due = |i: usize| first_due + (spread * 1000.0 * i as f64 / n as f64) as i64;
            let parked = |i: usize| format!("{}\n{QUEUE}", task_id(DELAYED, i));
            let fields: Vec<(String, String)> = range
                .clone()
                .map(|i| (parked(i), message(DELAYED, i)))
                .collect();
            let scores: Vec<(i64, String)> = range.map(|i| (due(i), parked(i))).collect();
            pipe.cmd("HSET")
                .arg(PREFILL_DELAYED_MSG)
                .arg(fields)
                .ignore();
            pipe.cmd("ZADD").arg(PREFILL_DELAYED).arg(scores).ignore();
        }
        let _: () = pipe.query_async(con).await?;
    }
    Ok(())
}

/// Every task's result exists and is SUCCESS (read with `MGET`, not timed).
pub(crate) async fn check_results(
    con: &mut MultiplexedConnection,
    queued: usize,
    delayed: usize,
) -> Result<()> {
    for (kind, n) in [(QUEUED, queued), (DELAYED, delayed)] {
        for start in (0..n).step_by(CHUNK) {
            let keys: Vec<String> = (start..n.min(start + CHUNK))
                .map(|i| result_key(&task_id(kind, i)))
                .collect();
            let found: Vec<Option<String>> = redis::cmd("MGET").arg(&keys).query_async(con).await?;
            for (k, v) in keys.iter().zip(found) {
                match v {
                    None => bail!("{k} is missing after the drain"),
                    Some(v) if !v.contains("\"SUCCESS\"") => bail!("{k} is not SUCCESS: {v}"),
                    Some(_) => {}
                }
            }
        }
    }
    Ok(())
}
