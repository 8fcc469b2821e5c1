//! The starter: the last step before a task runs. It batches the tasks
//! about to start into one script call that skips revoked ones and ones
//! this worker no longer holds, and records the rest STARTED (see
//! `scripts/start.lua`), so these checks cost one round trip per batch,
//! not per task.

use super::shared::{Shared, persist};
use crate::broker::{StartVerdict, Starting, held, start_batch};
use std::sync::Arc;
use tokio::sync::{mpsc, oneshot};

const MAX_BATCH: usize = 512;

/// One task about to run, and where to say whether it may.
#[derive(Debug)]
pub(crate) struct StartRequest {
    pub start: Starting,
    pub reply: oneshot::Sender<StartVerdict>,
}

/// Runs until every sender is gone. A request whose reply is dropped (the
/// worker abandoned Redis work) means "do not run": the message is then
/// handed back by the lease release.
pub(crate) async fn run(sh: Arc<Shared>, mut rx: mpsc::Receiver<StartRequest>) {
    let keys = sh.broker.keys().clone();
    let mut lane = sh.broker.backend_pool().lane();
    // Results on the broker's server: start.lua checks the holds itself,
    // atomically with the reaper. Elsewhere: one HMGET on the broker first.
    let mut broker_lane = (!sh.broker.backend_is_broker()).then(|| sh.broker.broker_pool().lane());
    let ttl = sh.settings.result_expires;
    let mut buf = Vec::with_capacity(MAX_BATCH);
    while rx.recv_many(&mut buf, MAX_BATCH).await > 0 {
        let mut verdicts: Vec<Option<StartVerdict>> = vec![None; buf.len()];
        if let Some(broker_lane) = broker_lane.as_mut() {
            let seqs: Vec<u64> = buf.iter().map(|r| r.start.seq).collect();
            let Some(holds) = persist!(
                sh,
                "check held messages",
                held(broker_lane, &keys, &sh.id, &seqs).await
            ) else {
                buf.clear();
                continue;
            };
            for (v, h) in verdicts.iter_mut().zip(holds) {
                if !h {
                    *v = Some(StartVerdict::NotHeld);
                }
            }
        }
        let tasks: Vec<Starting> = buf
            .iter_mut()
            .zip(&verdicts)
            .filter(|(_, v)| v.is_none())
            .map(|(r, _)| std::mem::take(&mut r.start))
            .collect();
        if !tasks.is_empty() {
            let checks_holds = broker_lane.is_none().then_some(sh.id.as_str());
            let Some(answers) = persist!(
                sh,
                "record tasks as started",
                start_batch(&mut lane, &keys, checks_holds, &tasks, ttl).await
            ) else {
                buf.clear();
                continue;
            };
            let mut answers = answers.into_iter();
            for v in verdicts.iter_mut().filter(|v| v.is_none()) {
                *v = answers.next();
            }
        }
        for (req, verdict) in buf.drain(..).zip(verdicts) {
            if let Some(v) = verdict {
                let _ = req.reply.send(v);
            }
        }
    }
}
