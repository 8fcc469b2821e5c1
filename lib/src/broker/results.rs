//! Reading and writing results in Celery's layout.

use super::pool::on_lane;
use super::{BrokerError, Lane};
use crate::proto::TaskResult;
use crate::proto::keys::result_key;
use std::time::Duration;

/// Stores a result (`SET ... EX`) and publishes it on its channel.
pub async fn store_result(
    lane: &mut Lane,
    result: &TaskResult,
    ttl: Duration,
) -> Result<(), BrokerError> {
    let json = serde_json::to_string(result).map_err(|e| BrokerError::Reply {
        op: "store result",
        detail: e.to_string(),
    })?;
    let key = result_key(&result.task_id);
    let mut p = redis::pipe();
    p.cmd("SET")
        .arg(&key)
        .arg(&json)
        .arg("EX")
        .arg(ttl.as_secs().max(1))
        .ignore()
        .cmd("PUBLISH")
        .arg(&key)
        .arg(&json)
        .ignore();
    on_lane!(&mut *lane, "store result", |c| p.query_async::<()>(c))?;
    lane.recycle_after(json.len() * 2);
    Ok(())
}

/// Stores many results (`SET ... PX`, then `PUBLISH` each) in one pipeline.
pub async fn store_results(
    lane: &mut Lane,
    results: &[TaskResult],
    ttl: Duration,
) -> Result<(), BrokerError> {
    if results.is_empty() {
        return Ok(());
    }
    let mut p = redis::pipe();
    for r in results {
        let json = serde_json::to_string(r).map_err(|e| BrokerError::Reply {
            op: "store results",
            detail: e.to_string(),
        })?;
        let key = result_key(&r.task_id);
        p.cmd("SET")
            .arg(&key)
            .arg(&json)
            .arg("PX")
            .arg(u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX).max(1))
            .ignore()
            .cmd("PUBLISH")
            .arg(&key)
            .arg(&json)
            .ignore();
    }
    on_lane!(&mut *lane, "store results", |c| p.query_async::<()>(c))
}

/// Reads a task's result; `None` when there is none (yet, or any more).
pub async fn get_result(lane: &mut Lane, task_id: &str) -> Result<Option<TaskResult>, BrokerError> {
    let key = result_key(task_id);
    let raw: Option<String> = on_lane!(&mut *lane, "read result", |c| redis::cmd("GET")
        .arg(&key)
        .query_async(c))?;
    raw.map(|s| parse_result(&s)).transpose()
}

pub(crate) fn parse_result(raw: &str) -> Result<TaskResult, BrokerError> {
    serde_json::from_str(raw).map_err(|e| BrokerError::Reply {
        op: "read result",
        detail: format!("result is not a Celery result record: {e}"),
    })
}
