//! The settler: batches finished messages into one pipeline (results, then
//! acknowledgements) and hands back messages that never started.

use super::shared::{SettleMsg, Shared, persist};
use crate::broker::Settle;
use std::sync::Arc;
use tokio::sync::mpsc;

const MAX_BATCH: usize = 512;

/// Batches stored at once, each on a session of its own: while one waits
/// for its reply, the next gathers what finished meanwhile and goes out.
pub(super) const IN_FLIGHT: usize = 2;

/// Runs until every sender is gone and everything received is settled (or
/// the worker abandons Redis work).
pub(crate) async fn run(sh: Arc<Shared>, rx: mpsc::Receiver<SettleMsg>) {
    let rx = tokio::sync::Mutex::new(rx);
    futures_util::future::join_all((0..IN_FLIGHT).map(|_| lane(&sh, &rx))).await;
}

/// One of the settler's lanes: takes the next batch (the receiver is held
/// only while gathering) and stores it.
async fn lane(sh: &Shared, rx: &tokio::sync::Mutex<mpsc::Receiver<SettleMsg>>) {
    let mut consume = sh.backend.consume(&sh.id);
    let mut buf = Vec::with_capacity(MAX_BATCH);
    while rx.lock().await.recv_many(&mut buf, MAX_BATCH).await > 0 {
        let mut done: Vec<Settle> = Vec::with_capacity(buf.len());
        let mut back: Vec<u64> = Vec::new();
        // Released once this batch is stored (or abandoned): only then may
        // the dispatcher take more.
        let mut slots = Vec::with_capacity(buf.len());
        for m in buf.drain(..) {
            match m {
                SettleMsg::Done(s, slot) => {
                    done.push(s);
                    slots.push(slot);
                }
                SettleMsg::HandBack(seq, slot) => {
                    back.push(seq);
                    slots.push(slot);
                }
            }
        }
        if !back.is_empty() {
            back.sort_unstable();
            let n = persist!(
                sh,
                "hand back unstarted messages",
                consume.hand_back(&back).await
            );
            if let Some(n) = n {
                tracing::info!(count = n, "handed unstarted messages back to their queues");
                sh.stats
                    .handed_back
                    .fetch_add(n as u64, std::sync::atomic::Ordering::Relaxed);
                sh.metrics.handed_back(n as u64);
            }
        }
        if !done.is_empty() {
            let ttl = sh.settings.result_expires;
            let ok = persist!(
                sh,
                "store results and acknowledge",
                consume.settle(&done, ttl).await
            );
            if ok.is_some() {
                sh.stats
                    .processed
                    .fetch_add(done.len() as u64, std::sync::atomic::Ordering::Relaxed);
            }
        }
        drop(slots);
    }
}
