//! `taskstack-worker healthcheck`: is this container's worker alive and
//! connected? Answered from the state file the worker writes at start and
//! the heartbeat record it keeps in the store (Redis, or PostgreSQL with a
//! RabbitMQ broker), so it needs no shell and no port.

use crate::backend::{Backend, Use};
use crate::broker::{Broker, WorkerRecord, worker_record};
use crate::service::state::{self, StatePath};

/// Checks that every worker recorded at `at` (all of this host's workers
/// with per-process state files) is running and has a fresh heartbeat in
/// Redis. Ok names them; Err says what failed for the first that failed.
pub async fn check(at: &StatePath, broker: &Broker) -> Result<String, String> {
    let states = state::read_all_live(at, "worker", broker.keys().namespace())?;
    let mut lane = broker.broker_pool().lane();
    let mut healthy = Vec::with_capacity(states.len());
    for s in &states {
        let found = worker_record(&mut lane, broker.keys(), &s.id)
            .await
            .map_err(|e| format!("cannot reach Redis: {e}"))?;
        healthy.push(judge(found, s, "Redis")?);
    }
    Ok(healthy.join("; "))
}

/// [`check`] against the heartbeat records a backend keeps (PostgreSQL
/// with a RabbitMQ broker): one read of the live workers' records.
pub async fn check_on(at: &StatePath, backend: &dyn Backend) -> Result<String, String> {
    let states = state::read_all_live(at, "worker", backend.namespace())?;
    let live = backend
        .inspect(Use::Request)
        .live_workers()
        .await
        .map_err(|e| format!("cannot read worker records: {e}"))?;
    let mut healthy = Vec::with_capacity(states.len());
    for s in &states {
        let found = live.iter().find(|w| w.id == s.id).cloned();
        healthy.push(judge(found, s, "the result store")?);
    }
    Ok(healthy.join("; "))
}

fn judge(found: Option<WorkerRecord>, state: &state::State, store: &str) -> Result<String, String> {
    match found {
        Some(rec) if rec.pid == state.pid => Ok(format!(
            "worker {} alive: queues {:?}, {} processed",
            rec.id, rec.queues, rec.processed
        )),
        Some(rec) => Err(format!(
            "heartbeat of {} names pid {}, expected {}",
            rec.id, rec.pid, state.pid
        )),
        None => Err(format!(
            "worker {} has no fresh heartbeat in {store} (its lease lapsed)",
            state.id
        )),
    }
}
