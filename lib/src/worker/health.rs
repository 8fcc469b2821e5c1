//! `taskstack-worker healthcheck`: is this container's worker alive and
//! connected? Answered from the state file the worker writes at start and
//! the heartbeat record it keeps in Redis, so it needs no shell and no port.

use crate::broker::{Broker, worker_record};
use crate::service::state;
use std::path::Path;

/// Checks that the worker recorded in `state_file` is running and that its
/// heartbeat is fresh in Redis. Ok names the worker; Err says what failed.
pub async fn check(state_file: &Path, broker: &Broker) -> Result<String, String> {
    let state = state::read_live(state_file, "worker", broker.keys().namespace())?;
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
