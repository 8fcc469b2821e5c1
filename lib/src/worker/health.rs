//! `taskstack-worker healthcheck`: is this container's worker alive and
//! connected? Answered from the state file the worker writes at start and
//! the heartbeat record it keeps in Redis, so it needs no shell and no port.

use crate::broker::{Broker, worker_record};
use serde::{Deserialize, Serialize};
use std::path::Path;

#[derive(Debug, Serialize, Deserialize)]
struct State {
    id: String,
    pid: u32,
    namespace: String,
}

/// Records which worker runs here (written atomically: temp file + rename).
pub(crate) fn write_state(path: &Path, id: &str, namespace: &str) -> std::io::Result<()> {
    let state = State {
        id: id.to_owned(),
        pid: std::process::id(),
        namespace: namespace.to_owned(),
    };
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, serde_json::to_vec(&state)?)?;
    std::fs::rename(tmp, path)
}

/// Whether `pid` is a live (not zombie) process.
pub(crate) fn process_alive(pid: u32) -> bool {
    // /proc/<pid>/stat is "pid (comm) S ..."; comm may hold spaces or
    // parentheses, so the state is the first field after the last ')'.
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|stat| {
        stat.rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().next())
            .is_some_and(|state| !matches!(state, "Z" | "X" | "x"))
    })
}

/// Checks that the worker recorded in `state_file` is running and that its
/// heartbeat is fresh in Redis. Ok names the worker; Err says what failed.
pub async fn check(state_file: &Path, broker: &Broker) -> Result<String, String> {
    let raw = std::fs::read(state_file).map_err(|e| {
        format!("no worker state at {state_file:?} ({e}): the worker is not running or not ready")
    })?;
    let state: State = serde_json::from_slice(&raw)
        .map_err(|e| format!("worker state file {state_file:?} is unreadable: {e}"))?;
    if !process_alive(state.pid) {
        return Err(format!(
            "worker {} (pid {}) is not running",
            state.id, state.pid
        ));
    }
    if state.namespace != broker.keys().namespace() {
        return Err(format!(
            "worker {} uses namespace {:?}, this check {:?}",
            state.id,
            state.namespace,
            broker.keys().namespace()
        ));
    }
    let mut lane = broker.broker_pool().lane();
    match worker_record(&mut lane, broker.keys(), &state.id).await {
        Ok(Some(rec)) if rec.pid == state.pid => Ok(format!(
            "worker {} alive: queues {:?}, {} processed",
            rec.id, rec.queues, rec.processed
        )),
        Ok(Some(rec)) => Err(format!(
            "heartbeat of {} names pid {}, expected {}",
            rec.id, rec.pid, state.pid
        )),
        Ok(None) => Err(format!(
            "worker {} has no fresh heartbeat in Redis (its lease lapsed)",
            state.id
        )),
        Err(e) => Err(format!("cannot reach Redis: {e}")),
    }
}
