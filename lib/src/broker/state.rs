//! Task state changes that must be atomic with each other: a worker
//! starting a task, and an operator revoking it.
//!
//! Both live on the result backend, beside the task's result record: the
//! revoke script refuses a task that is STARTED, and the start script skips
//! a task that carries a revoked marker, so every task is either revoked
//! before it runs or the revocation is refused.

use super::pool::on_lane;
use super::{BrokerError, Lane, REVOKE, START};
use crate::proto::keys::{RESULT_PREFIX, result_key};
use crate::proto::{Keys, TaskState};
use std::time::Duration;

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX).max(1)
}

/// For each `(task id, STARTED record JSON)`: `true` when the task may run
/// (its STARTED record is now stored), `false` when it was revoked.
pub(crate) async fn start_batch(
    lane: &mut Lane,
    keys: &Keys,
    tasks: &[(String, String)],
    ttl: Duration,
) -> Result<Vec<bool>, BrokerError> {
    let mut inv = START.prepare_invoke();
    inv.arg(keys.revoked_prefix())
        .arg(RESULT_PREFIX)
        .arg(millis(ttl));
    for (id, record) in tasks {
        inv.arg(id).arg(record);
    }
    let flags: Vec<i64> = on_lane!(&mut *lane, "start tasks", |c| inv.invoke_async(c))?;
    if flags.len() != tasks.len() {
        return Err(BrokerError::Reply {
            op: "start tasks",
            detail: format!("{} answers for {} tasks", flags.len(), tasks.len()),
        });
    }
    Ok(flags.into_iter().map(|f| f == 1).collect())
}

/// What a revocation did.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum RevokeOutcome {
    /// The task had not started; it never will, and its record says REVOKED.
    Revoked,
    /// It was revoked before.
    AlreadyRevoked,
    /// It has started or finished (its state is given); nothing changed.
    Refused(TaskState),
    /// No record: never enqueued through a producer that records PENDING
    /// tasks, or its record expired.
    Unknown,
}

/// Revokes a task that has not started. `record` is the REVOKED result
/// record to store; `ttl` its least expiry (a longer-lived PENDING record,
/// e.g. of a task due in two hours, keeps its expiry).
pub async fn revoke(
    lane: &mut Lane,
    keys: &Keys,
    task_id: &str,
    record: &str,
    ttl: Duration,
) -> Result<RevokeOutcome, BrokerError> {
    let mut inv = REVOKE.prepare_invoke();
    inv.key(result_key(task_id))
        .key(keys.revoked(task_id))
        .arg(record)
        .arg(millis(ttl));
    let (outcome, status): (String, String) =
        on_lane!(&mut *lane, "revoke task", |c| inv.invoke_async(c))?;
    let state = || {
        serde_json::from_value::<TaskState>(serde_json::Value::String(status.clone())).map_err(
            |_| BrokerError::Reply {
                op: "revoke task",
                detail: format!("unknown task state {status:?}"),
            },
        )
    };
    Ok(match outcome.as_str() {
        "revoked" => RevokeOutcome::Revoked,
        "already" => RevokeOutcome::AlreadyRevoked,
        "unknown" => RevokeOutcome::Unknown,
        "refused" => RevokeOutcome::Refused(state()?),
        other => {
            return Err(BrokerError::Reply {
                op: "revoke task",
                detail: format!("unexpected outcome {other:?}"),
            });
        }
    })
}
