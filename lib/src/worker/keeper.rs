//! Background duties of a live worker: renew its lease and heartbeat,
//! restore the messages of dead workers, move due delayed messages.

use super::shared::{Shared, jitter};
use crate::backend::{Delayed, Expiry, Leases, Promoted, Reaped, Use};
use crate::broker::WorkerRecord;
use crate::proto::envelope::format_time;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

/// Longest a due delayed message waits for promotion when the next due time
/// is unknown (another process may park one at any moment).
const PROMOTE_POLL: Duration = Duration::from_millis(250);
const PROMOTE_BATCH: usize = 500;
/// How often a worker looks for expired results (a store that does not
/// expire them by itself), and the most rows one statement deletes.
const EXPIRY_EVERY: Duration = Duration::from_secs(10);
const EXPIRY_BATCH: usize = 1000;
/// Most batches one look deletes before yielding to the other duties.
const EXPIRY_BATCHES: usize = 20;

pub(crate) fn record(sh: &Shared, started_at: &str) -> WorkerRecord {
    let s = &sh.stats;
    WorkerRecord {
        id: sh.id.clone(),
        host: super::hostname(),
        pid: std::process::id(),
        queues: sh.queues.borrow().clone(),
        tasks: sh.registry.names(),
        concurrency: sh.settings.concurrency,
        started_at: started_at.to_owned(),
        last_heartbeat: format_time(sh.now()),
        processed: s.processed.load(Ordering::Relaxed),
        failed: s.failed.load(Ordering::Relaxed),
        retried: s.retried.load(Ordering::Relaxed),
        dead_lettered: s.dead_lettered.load(Ordering::Relaxed),
        version: env!("CARGO_PKG_VERSION").to_owned(),
        metrics_addr: sh.metrics_addr.map(|a| a.to_string()),
    }
}

/// Until `until` is cancelled, on one connection each: renews the lease every
/// third of its length, restores messages of workers whose lease expired
/// every half lease (jittered), and moves due delayed messages when due.
pub(crate) async fn run(sh: Arc<Shared>, started_at: String, until: CancellationToken) {
    let mut leases = sh.backend.leases(Use::Loop);
    let mut delayed = sh.backend.delayed(Use::Loop);
    let mut expiry = sh.backend.expiry();
    let beat_every = sh.settings.lease / 3;
    let reap_every = sh.settings.lease / 2;
    let now = tokio::time::Instant::now();
    let (mut next_beat, mut next_reap, mut next_promote) = (now + beat_every, now, now);
    let mut next_expiry = now + jitter(EXPIRY_EVERY);
    loop {
        tokio::select! {
            () = until.cancelled() => return,
            () = tokio::time::sleep_until(next_beat) => {
                let landing_source = sh.landing_source();
                beat(&sh, &mut *leases, &started_at, &landing_source).await;
                next_beat = tokio::time::Instant::now() + beat_every;
            }
            () = tokio::time::sleep_until(next_reap) => {
                reap_dead(&sh, &mut *leases).await;
                next_reap = tokio::time::Instant::now() + jitter(reap_every);
            }
            () = tokio::time::sleep_until(next_promote) => {
                next_promote = tokio::time::Instant::now() + promote_due(&mut *delayed).await;
            }
            () = tokio::time::sleep_until(next_expiry), if expiry.is_some() => {
                if let Some(e) = expiry.as_deref_mut() {
                    delete_expired(&sh, e).await;
                }
                next_expiry = tokio::time::Instant::now() + jitter(EXPIRY_EVERY);
            }
        }
    }
}

async fn beat(sh: &Shared, leases: &mut dyn Leases, started_at: &str, landing_source: &str) {
    // Every third of a lease: give back what large messages left behind.
    crate::service::memory::trim();
    let rec = record(sh, started_at);
    match leases
        .heartbeat(&rec, landing_source, sh.settings.lease)
        .await
    {
        Ok(false) => {}
        Ok(true) => tracing::warn!(
            "this worker's lease had expired (Redis unreachable or the process stalled); \
             messages it held may have been redelivered"
        ),
        Err(e) => tracing::warn!(error = %e, "cannot renew the lease"),
    }
}

async fn reap_dead(sh: &Shared, leases: &mut dyn Leases) {
    match leases.reap_expired().await {
        Ok(r) if r.workers == 0 => {}
        Ok(Reaped { workers, restored }) => {
            sh.stats
                .restored_from_dead_workers
                .fetch_add(restored, Ordering::Relaxed);
            sh.metrics.restored(restored);
            tracing::warn!(
                workers,
                restored,
                "restored messages held by workers whose lease expired"
            );
        }
        Err(e) => tracing::warn!(error = %e, "cannot check for dead workers"),
    }
}

/// Moves due delayed messages; returns how long to wait before the next look.
async fn promote_due(delayed: &mut dyn Delayed) -> Duration {
    match delayed.promote_due(PROMOTE_BATCH).await {
        Ok(p) if p.moved as usize == PROMOTE_BATCH => Duration::ZERO,
        Ok(Promoted { moved, next_due_in }) => {
            if moved > 0 {
                tracing::debug!(moved, "moved due delayed messages to their queues");
            }
            next_due_in.map_or(PROMOTE_POLL, |due_in| due_in.min(PROMOTE_POLL))
        }
        Err(e) => {
            tracing::warn!(error = %e, "cannot move delayed messages");
            Duration::from_secs(1)
        }
    }
}

/// Deletes expired result records in bounded batches while this worker
/// holds the cleaner's lock (another worker cleaning: nothing to do).
async fn delete_expired(sh: &Shared, expiry: &mut dyn Expiry) {
    for _ in 0..EXPIRY_BATCHES {
        match expiry.sweep(EXPIRY_BATCH).await {
            Ok(Some(n)) => {
                sh.metrics.results_expired(n);
                if n > 0 {
                    tracing::debug!(deleted = n, "deleted expired results");
                }
                if (n as usize) < EXPIRY_BATCH {
                    return;
                }
            }
            Ok(None) => return,
            Err(e) => {
                tracing::warn!(error = %e, "cannot delete expired results");
                return;
            }
        }
    }
}
