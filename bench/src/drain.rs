//! The throughput phase: enqueue the tasks, wait for the drain, check every result.

use crate::ECHO;
use crate::worker::WorkerProc;
use anyhow::{Result, bail};
use serde_json::{Map, json};
use std::time::{Duration, Instant};
use taskstack::proto::{TaskResult, TaskState};
use taskstack::{Producer, SendOptions, TaskRequest};

/// Keys per pipeline when checking or reading results.
const SCAN_CHUNK: usize = 1_000;

fn echo_request(i: usize) -> TaskRequest {
    TaskRequest {
        name: ECHO.to_owned(),
        args: vec![json!(i)],
        kwargs: Map::new(),
        options: SendOptions::default(),
    }
}

/// Sends `tasks` echo tasks with `send_many`, `chunk` per pipeline, and
/// returns their ids.
pub(crate) async fn enqueue(
    producer: &Producer,
    tasks: usize,
    chunk: usize,
) -> Result<Vec<String>> {
    let mut ids = Vec::with_capacity(tasks);
    let mut next = 0;
    while next < tasks {
        let end = (next + chunk).min(tasks);
        let reqs: Vec<TaskRequest> = (next..end).map(echo_request).collect();
        ids.extend(producer.send_many(&reqs).await?);
        next = end;
    }
    Ok(ids)
}

/// Whether a stored task record is final (SUCCESS, FAILURE or REVOKED): the
/// worker also stores a STARTED record when a task starts, so a key that
/// exists is not yet a finished task.
fn is_final(record: Option<&str>) -> bool {
    record
        .and_then(|r| serde_json::from_str::<serde_json::Value>(r).ok())
        .is_some_and(|v| {
            matches!(
                v["status"].as_str(),
                Some("SUCCESS" | "FAILURE" | "REVOKED")
            )
        })
}

/// Polls until every key holds a final record and returns when that was
/// seen. Checks the last pending key (FIFO: it finishes last, give or take
/// the concurrency) and, once it is final, every pending key in pipelined
/// chunks.
pub(crate) async fn wait_drained(
    con: &mut redis::aio::MultiplexedConnection,
    worker: &mut WorkerProc,
    keys: &[String],
    timeout: Duration,
    own_polls: &mut u64,
) -> Result<Instant> {
    let start = Instant::now();
    let mut pending: Vec<&str> = keys.iter().map(String::as_str).collect();
    loop {
        let Some(last) = pending.last() else {
            return Ok(Instant::now());
        };
        let record: Option<String> = redis::cmd("GET").arg(*last).query_async(con).await?;
        *own_polls += 1;
        if is_final(record.as_deref()) {
            let mut still = Vec::new();
            for chunk in pending.chunks(SCAN_CHUNK) {
                let mut p = redis::pipe();
                for k in chunk {
                    p.cmd("GET").arg(*k);
                }
                let found: Vec<Option<String>> = p.query_async(con).await?;
                *own_polls += chunk.len() as u64;
                still.extend(
                    chunk
                        .iter()
                        .zip(found)
                        .filter(|(_, f)| !is_final(f.as_deref()))
                        .map(|(k, _)| *k),
                );
            }
            pending = still;
            if pending.is_empty() {
                return Ok(Instant::now());
            }
            continue;
        }
        worker.check_running()?;
        if start.elapsed() > timeout {
            bail!(
                "{} of {} tasks still have no result after {timeout:?}; worker log tail:\n{}",
                pending.len(),
                keys.len(),
                worker.log_tail()
            );
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

/// Every stored result must be SUCCESS.
pub(crate) async fn verify_results(
    con: &mut redis::aio::MultiplexedConnection,
    keys: &[String],
) -> Result<()> {
    let mut bad = 0usize;
    let mut example = None;
    for chunk in keys.chunks(SCAN_CHUNK) {
        let raws: Vec<Option<String>> = redis::cmd("MGET").arg(chunk).query_async(con).await?;
        for (key, raw) in chunk.iter().zip(raws) {
            let state = raw
                .as_deref()
                .map(|r| serde_json::from_str::<TaskResult>(r).map(|t| t.status));
            if !matches!(state, Some(Ok(TaskState::Success))) {
                bad += 1;
                example.get_or_insert_with(|| format!("{key}: {raw:?}"));
            }
        }
    }
    if bad > 0 {
        bail!(
            "{bad} of {} results are not SUCCESS, e.g. {}",
            keys.len(),
            example.unwrap_or_default()
        );
    }
    Ok(())
}
