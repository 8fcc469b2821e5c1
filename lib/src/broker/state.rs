//! Task state changes that must be atomic with each other: a worker
//! starting a task, and an operator revoking it.
//!
//! Both live on the result backend, beside the task's result record: the
//! revoke script refuses a task that is started, and the start script skips
//! a task that carries a revoked marker, so every task is either revoked
//! before it runs or the revocation is refused. "Started" is a STARTED
//! record, or (results on the broker's server) a mark in the worker's
//! running hash written for the whole batch in one command (see
//! `scripts/start.lua`).

use super::pool::on_lane;
use super::{BrokerError, Lane, REVOKE, START};
use crate::proto::keys::{RESULT_PREFIX, result_key};
use crate::proto::{Keys, TaskState};
use std::time::Duration;

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX).max(1)
}

/// What the start step decided for one task.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StartVerdict {
    /// Recorded STARTED: run it.
    Run,
    /// Revoked before it started: skip it (its REVOKED record is stored).
    Revoked,
    /// The worker no longer holds the message (its lease expired and the
    /// message went back to its queue): do not run it, settle nothing.
    NotHeld,
    /// Its result record is already final (SUCCESS, FAILURE or REVOKED):
    /// a second delivery of a task that ran to the end. Do not run it;
    /// settle the hold without storing anything. Only where STARTED
    /// records mark starts (no worker id given).
    Finished,
}

/// One task about to start: its id, its STARTED record (JSON) and the
/// sequence number of the worker's hold on its message.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Starting {
    pub task_id: String,
    pub record: String,
    pub seq: u64,
}

/// Decides, for a batch of tasks held by `worker_id`, which may run (see
/// `scripts/start.lua`). With `worker_id` (results on the broker's server)
/// the script checks the holds in the same atomic step and marks the tasks
/// started in the worker's running hash, writing STARTED records only
/// when `track_started`; without it (the caller checked the holds with
/// [`held`] first) STARTED records are always written.
pub(crate) async fn start_batch(
    lane: &mut Lane,
    keys: &Keys,
    worker_id: Option<&str>,
    tasks: &[Starting],
    ttl: Duration,
    track_started: bool,
) -> Result<Vec<StartVerdict>, BrokerError> {
    let record = track_started || worker_id.is_none();
    let mut inv = START.prepare_invoke();
    inv.arg(keys.revoked_prefix())
        .arg(RESULT_PREFIX)
        .arg(millis(ttl))
        .arg(worker_id.map(|w| keys.inflight(w)).unwrap_or_default())
        .arg(u8::from(track_started))
        .arg(worker_id.map(|w| keys.running(w)).unwrap_or_default())
        .arg(worker_id.map(|w| keys.held_seqs(w)).unwrap_or_default());
    for t in tasks {
        let json = if record { t.record.as_str() } else { "" };
        inv.arg(&t.task_id).arg(json).arg(t.seq);
    }
    let flags: Vec<i64> = on_lane!(&mut *lane, "start tasks", |c| inv.invoke_async(c))?;
    if flags.len() != tasks.len() {
        return Err(BrokerError::Reply {
            op: "start tasks",
            detail: format!("{} answers for {} tasks", flags.len(), tasks.len()),
        });
    }
    flags
        .into_iter()
        .map(|f| match f {
            1 => Ok(StartVerdict::Run),
            0 => Ok(StartVerdict::Revoked),
            2 => Ok(StartVerdict::NotHeld),
            3 => Ok(StartVerdict::Finished),
            other => Err(BrokerError::Reply {
                op: "start tasks",
                detail: format!("unexpected verdict {other}"),
            }),
        })
        .collect()
}

/// Which of `seqs` the worker still holds, for when results live on another
/// server than the broker: one `SMISMEMBER` on its held-sequence set (which
/// reads no held message), or an `HMGET` of the in-flight hash when the two
/// differ in size (see `scripts/start.lua`).
pub(crate) async fn held(
    lane: &mut Lane,
    keys: &Keys,
    worker_id: &str,
    seqs: &[u64],
) -> Result<Vec<bool>, BrokerError> {
    if seqs.is_empty() {
        return Ok(Vec::new());
    }
    let (set, inflight) = (keys.held_seqs(worker_id), keys.inflight(worker_id));
    let mut p = redis::pipe();
    p.atomic()
        .cmd("SCARD")
        .arg(&set)
        .cmd("HLEN")
        .arg(&inflight)
        .cmd("SMISMEMBER")
        .arg(&set)
        .arg(seqs);
    let (members, fields, mut found): (u64, u64, Vec<bool>) =
        on_lane!(&mut *lane, "check holds", |conn| p.query_async(conn))?;
    if members != fields {
        let mut c = redis::cmd("HMGET");
        c.arg(&inflight).arg(seqs);
        let values: Vec<Option<redis::Value>> =
            on_lane!(&mut *lane, "check holds", |conn| c.query_async(conn))?;
        found = values.into_iter().map(|v| v.is_some()).collect();
    }
    if found.len() != seqs.len() {
        return Err(BrokerError::Reply {
            op: "check holds",
            detail: format!("{} answers for {} holds", found.len(), seqs.len()),
        });
    }
    Ok(found)
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
/// e.g. of a task due in two hours, keeps its expiry). `on_broker`: results
/// live on the broker's server, so the workers' start marks (their running
/// hashes) are looked at too.
pub async fn revoke(
    lane: &mut Lane,
    keys: &Keys,
    task_id: &str,
    record: &str,
    ttl: Duration,
    on_broker: bool,
) -> Result<RevokeOutcome, BrokerError> {
    let mode = if on_broker {
        Mode::OnBroker
    } else {
        Mode::Elsewhere
    };
    let (outcome, status) = invoke_revoke(lane, keys, task_id, record, ttl, mode).await?;
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

/// How `scripts/revoke.lua` is asked to revoke.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    /// Results on the broker's server: state, marks and record in one step.
    OnBroker,
    /// Results on another Redis server: the STARTED record decides.
    Elsewhere,
    /// Results in PostgreSQL: only the marks and the revoked marker.
    MarkOnly,
}

async fn invoke_revoke(
    lane: &mut Lane,
    keys: &Keys,
    task_id: &str,
    record: &str,
    ttl: Duration,
    mode: Mode,
) -> Result<(String, String), BrokerError> {
    let mut inv = REVOKE.prepare_invoke();
    inv.key(result_key(task_id))
        .key(keys.revoked(task_id))
        .key(keys.started(task_id))
        .key(keys.leases())
        .arg(record)
        .arg(millis(ttl))
        .arg(if mode == Mode::Elsewhere {
            String::new()
        } else {
            keys.inflight_prefix()
        })
        .arg(task_id)
        .arg(keys.running_prefix())
        .arg(if mode == Mode::MarkOnly { "1" } else { "" })
        .arg(keys.hold_queues_prefix());
    on_lane!(&mut *lane, "revoke task", |c| inv.invoke_async(c))
}

/// The broker's half of a revocation when results live in PostgreSQL: in
/// one step with `scripts/start.lua`, refuses when a worker's running mark
/// (with its hold) or a started marker says the task runs, else sets the
/// task's revoked marker for `ttl`, so no worker starts it from then on.
/// `true`: marked (the caller then stores the REVOKED record); `false`: it
/// runs. Marking twice is harmless.
pub(crate) async fn mark_revoked(
    lane: &mut Lane,
    keys: &Keys,
    task_id: &str,
    ttl: Duration,
) -> Result<bool, BrokerError> {
    let (outcome, _) = invoke_revoke(lane, keys, task_id, "", ttl, Mode::MarkOnly).await?;
    match outcome.as_str() {
        "marked" => Ok(true),
        "refused" => Ok(false),
        other => Err(BrokerError::Reply {
            op: "revoke task",
            detail: format!("unexpected outcome {other:?}"),
        }),
    }
}
