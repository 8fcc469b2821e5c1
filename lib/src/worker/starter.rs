//! The starter: the last step before a task runs. It batches the tasks
//! about to start into one [`crate::backend::TaskStates::start_batch`] that
//! skips revoked ones and ones this worker no longer holds, and marks the
//! rest started (on Redis one `scripts/start.lua` call: one SMISMEMBER
//! (with an SCARD and an HLEN), one EXISTS and one HSET for the batch,
//! plus STARTED records when
//! `task_track_started` is on), so these checks cost one round trip per
//! batch, not per task.

use super::shared::{Shared, persist};
use crate::backend::Use;
use crate::broker::{StartVerdict, Starting};
use std::sync::Arc;
use tokio::sync::{mpsc, oneshot};

const MAX_BATCH: usize = 512;

/// Batches asked about at once, each on a session of its own.
pub(super) const IN_FLIGHT: usize = 2;

/// One task about to run, and where to say whether it may.
#[derive(Debug)]
pub(crate) struct StartRequest {
    pub start: Starting,
    pub reply: oneshot::Sender<StartVerdict>,
}

/// Runs until every sender is gone. A request whose reply is dropped (the
/// worker abandoned Redis work) means "do not run": the message is then
/// handed back by the lease release.
pub(crate) async fn run(sh: Arc<Shared>, rx: mpsc::Receiver<StartRequest>) {
    let rx = tokio::sync::Mutex::new(rx);
    futures_util::future::join_all((0..IN_FLIGHT).map(|_| lane(&sh, &rx))).await;
}

/// One of the starter's lanes: takes the next batch (the receiver is held
/// only while gathering) and asks about it.
async fn lane(sh: &Shared, rx: &tokio::sync::Mutex<mpsc::Receiver<StartRequest>>) {
    let mut states = sh.backend.task_states(Use::Loop);
    let ttl = sh.settings.result_expires;
    let mut buf = Vec::with_capacity(MAX_BATCH);
    while rx.lock().await.recv_many(&mut buf, MAX_BATCH).await > 0 {
        let tasks: Vec<Starting> = buf
            .iter_mut()
            .map(|r| std::mem::take(&mut r.start))
            .collect();
        let Some(verdicts) = persist!(
            sh,
            "record tasks as started",
            states
                .start_batch(Some(&sh.id), &tasks, ttl, sh.settings.track_started)
                .await
        ) else {
            buf.clear();
            continue;
        };
        for (req, verdict) in buf.drain(..).zip(verdicts) {
            let _ = req.reply.send(verdict);
        }
    }
}
