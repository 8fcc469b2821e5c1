//! `taskstack-worker healthcheck`: is this container's worker alive and
//! connected? Answered from the state file the worker writes at start and
//! the heartbeat record it keeps in Redis, so it needs no shell and no port.

use crate::broker::{Broker, worker_record};
use crate::service::state::{self, StatePath};

/// Checks that every worker recorded at `at` (all of this host's workers
/// with per-process state files) is running and has a fresh heartbeat in
/// Redis. Ok names them; Err says what failed for the first that failed.
pub async fn check(at: &StatePath, broker: &Broker) -> Result<String, String> {
    let states = state::read_all_live(at, "worker", broker.keys().namespace())?;
    let mut lane = broker.broker_pool().lane();
    let mut healthy = Vec::with_capacity(states.len());
    for s in &states {
        healthy.push(check_one(&mut lane, broker, s).await?);
    }
    Ok(healthy.join("; "))
}

async fn check_one(
    lane: &mut crate::broker::Lane,
    broker: &Broker,
    state: &state::State,
) -> Result<String, String> {
    match worker_record(lane, broker.keys(), &state.id).await {
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
