//! The starter: the last step before a task runs. It batches the tasks
//! about to start into one script call that skips revoked ones and records
//! the rest STARTED (see `scripts/start.lua`), so revocation costs one round
//! trip per batch, not per task.

use super::shared::{Shared, persist};
use crate::broker::start_batch;
use std::sync::Arc;
use tokio::sync::{mpsc, oneshot};

const MAX_BATCH: usize = 512;

/// One task about to run: its id, its STARTED record, and where to say
/// whether it may run.
#[derive(Debug)]
pub(crate) struct StartRequest {
    pub task_id: String,
    pub record: String,
    pub reply: oneshot::Sender<bool>,
}

/// Runs until every sender is gone. A request whose reply is dropped (the
/// worker abandoned Redis work) means "do not run": the message is then
/// handed back by the lease release.
pub(crate) async fn run(sh: Arc<Shared>, mut rx: mpsc::Receiver<StartRequest>) {
    let keys = sh.broker.keys().clone();
    let mut lane = sh.broker.backend_pool().lane();
    let ttl = sh.settings.result_expires;
    let mut buf = Vec::with_capacity(MAX_BATCH);
    while rx.recv_many(&mut buf, MAX_BATCH).await > 0 {
        let tasks: Vec<(String, String)> = buf
            .iter_mut()
            .map(|r| {
                (
                    std::mem::take(&mut r.task_id),
                    std::mem::take(&mut r.record),
                )
            })
            .collect();
        let verdicts = persist!(
            sh,
            "record tasks as started",
            start_batch(&mut lane, &keys, &tasks, ttl).await
        );
        let Some(verdicts) = verdicts else {
            buf.clear();
            continue;
        };
        for (req, run) in buf.drain(..).zip(verdicts) {
            let _ = req.reply.send(run);
        }
    }
}
