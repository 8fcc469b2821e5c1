//! State shared by a worker's loops and its per-message tasks.

use super::WorkerSettings;
use super::registry::Registry;
use crate::backend::{Backend, BackendError, Clock};
use crate::broker::{Delivery, Settle, StartVerdict, Starting};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;
use tokio::sync::{Semaphore, mpsc};
use tokio_util::sync::CancellationToken;

/// Counters a worker reports in its heartbeat record.
#[derive(Debug, Default)]
pub struct Stats {
    pub processed: AtomicU64,
    pub succeeded: AtomicU64,
    pub failed: AtomicU64,
    pub retried: AtomicU64,
    pub dead_lettered: AtomicU64,
    pub revoked: AtomicU64,
    pub handed_back: AtomicU64,
    /// Held messages not started because the lease was lost meanwhile
    /// (a reaper had already put them back on their queues).
    pub forfeited: AtomicU64,
    pub restored_from_dead_workers: AtomicU64,
}

impl Stats {
    pub(crate) fn bump(counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }

    /// Reads a counter.
    pub fn get(counter: &AtomicU64) -> u64 {
        counter.load(Ordering::Relaxed)
    }
}

/// One unit of the prefetch budget (a permit of [`Shared::held`]): while it
/// lives, the dispatcher counts one message as held. Dropping it gives the
/// unit back, so capacity follows ownership instead of hand-kept counts.
pub(crate) type Slot = tokio::sync::OwnedSemaphorePermit;

/// A message this worker holds, with its [`Slot`]. Whatever path the
/// message takes (run, parked, dead-lettered, handed back, forfeited), the
/// slot returns when the last owner drops it: after the settlement that
/// ends the hold in Redis, never before.
#[derive(Debug)]
pub(crate) struct Held {
    delivery: Delivery,
    slot: Slot,
}

impl Held {
    pub fn new(delivery: Delivery, slot: Slot) -> Self {
        Self { delivery, slot }
    }

    /// Takes the message's bytes out (the hold stays), for a dead letter.
    pub fn take_payload(&mut self) -> Vec<u8> {
        std::mem::take(&mut self.delivery.payload)
    }

    /// The hold's sequence number and slot, for a settlement (the payload
    /// is freed now rather than when the batch is settled).
    pub fn into_settlement(self) -> (u64, Slot) {
        (self.delivery.seq, self.slot)
    }
}

impl std::ops::Deref for Held {
    type Target = Delivery;
    fn deref(&self) -> &Delivery {
        &self.delivery
    }
}

/// What the settler does with a message the worker holds; the slot is
/// released once the settlement is stored.
#[derive(Debug)]
pub(crate) enum SettleMsg {
    /// Store the result (if any), then release the hold.
    Done(Settle, Slot),
    /// Never started: put it back at the front of its queue.
    HandBack(u64, Slot),
}

impl SettleMsg {
    /// Hands `held` back to its queue.
    pub fn hand_back(held: Held) -> Self {
        let (seq, slot) = held.into_settlement();
        Self::HandBack(seq, slot)
    }
}

#[derive(Debug)]
pub(crate) struct Shared {
    /// Remote control's view of this worker and its event dispatcher.
    pub monitor: Arc<crate::control::Monitor>,
    pub backend: Arc<dyn Backend>,
    /// The backend's clock: due times, ETAs and expiries are read on it.
    pub clock: Arc<dyn Clock>,
    pub registry: Registry,
    /// Rate and time limits per task, changed by remote control.
    pub limits: super::limits::Limits,
    /// The queues served now: the configured ones, changed by remote
    /// control's `add_consumer` and `cancel_consumer` (not kept across a
    /// restart). The dispatcher watches it.
    pub queues: tokio::sync::watch::Sender<Vec<String>>,
    /// The list the dispatcher's blocking wait moves messages from (the
    /// first it serves), named in the lease record so that a dead worker's
    /// landed message goes back where it came from.
    pub landing_source: std::sync::Mutex<String>,
    pub settings: WorkerSettings,
    pub id: String,
    pub stats: Arc<Stats>,
    pub metrics: Arc<super::metrics::Metrics>,
    /// Where `/metrics` is served, announced in the heartbeat record.
    pub metrics_addr: Option<std::net::SocketAddr>,
    /// Permits = messages the worker may still take (prefetch − held).
    pub held: Arc<Semaphore>,
    /// Permits = tasks that may run now (concurrency).
    pub exec: Arc<Semaphore>,
    /// Cancelled when the worker stops taking messages.
    pub stop: CancellationToken,
    /// Cancelled when the worker gives up on Redis work (after the drain).
    pub abandon: CancellationToken,
    pub settle_tx: std::sync::Mutex<Option<mpsc::Sender<SettleMsg>>>,
    pub start_tx: std::sync::Mutex<Option<mpsc::Sender<super::starter::StartRequest>>>,
}

impl Shared {
    /// Now, on the backend's clock.
    pub fn now(&self) -> chrono::DateTime<chrono::Utc> {
        chrono::DateTime::from_timestamp_millis(self.clock.now_ms()).unwrap_or_default()
    }

    /// `wait`, unless the worker is told to stop first (`None`): for waits
    /// that may be given up at any point.
    pub async fn until_stop<F: std::future::Future>(&self, wait: F) -> Option<F::Output> {
        tokio::select! {
            biased;
            () = self.stop.cancelled() => None,
            out = wait => Some(out),
        }
    }

    /// See [`Shared::landing_source`].
    pub fn landing_source(&self) -> String {
        self.landing_source
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    /// Queues a settlement; the settler batches them.
    pub async fn settle(&self, msg: SettleMsg) {
        // The settler outlives every message task, so a send only fails once
        // the worker abandoned Redis work; the lease release then hands the
        // message back.
        let tx = self.settle_tx.lock().ok().and_then(|g| g.clone());
        if let Some(tx) = tx {
            let _ = tx.send(msg).await;
        }
    }

    /// Closes the settlement channel (after the last message task ended).
    pub fn close_settlements(&self) {
        if let Ok(mut g) = self.settle_tx.lock() {
            g.take();
        }
    }

    /// Asks the starter whether the task may run (not revoked, still held)
    /// and records it STARTED if so. `None` when the worker gave up on Redis.
    pub async fn start(&self, start: Starting) -> Option<StartVerdict> {
        let tx = self.start_tx.lock().ok().and_then(|g| g.clone())?;
        let (reply, rx) = tokio::sync::oneshot::channel();
        let req = super::starter::StartRequest { start, reply };
        tx.send(req).await.ok()?;
        rx.await.ok()
    }

    /// Closes the start channel (after the last message task ended).
    pub fn close_starts(&self) {
        if let Ok(mut g) = self.start_tx.lock() {
            g.take();
        }
    }

    /// A retry helper for a Redis step that must eventually succeed.
    pub fn retrier(&self, what: &'static str) -> Retrier {
        Retrier {
            what,
            delay: Duration::from_millis(50),
            abandon: self.abandon.clone(),
        }
    }
}

/// Retries a Redis step with jittered exponential backoff until it succeeds
/// or the worker abandons Redis work; then the lease release (or expiry)
/// hands the message back, so giving up never loses it.
#[derive(Debug)]
pub(crate) struct Retrier {
    what: &'static str,
    delay: Duration,
    abandon: CancellationToken,
}

impl Retrier {
    /// Logs `err` and waits before the next attempt; false means give up.
    pub async fn again(&mut self, err: &BackendError) -> bool {
        if err.is_auth_failure() {
            // Not a passing outage: say what to fix, loudly, on every try.
            let fix = if matches!(err, BackendError::Postgres(_)) {
                "PostgreSQL refused the password, has no such database or refused TLS; \
                 check result_backend / result_backend_password / result_backend_password_file"
            } else {
                "Redis refused the password; check broker_password / broker_password_file \
                 (or result_backend_password for a separate result Redis)"
            };
            tracing::error!(
                error = %err,
                retry_in = ?self.delay,
                "{} failed: {fix}; retrying",
                self.what
            );
        } else {
            tracing::warn!(error = %err, retry_in = ?self.delay, "{} failed; retrying", self.what);
        }
        tokio::select! {
            () = self.abandon.cancelled() => return false,
            () = tokio::time::sleep(jitter(self.delay)) => {}
        }
        self.delay = (self.delay * 2).min(Duration::from_secs(5));
        true
    }
}

/// Evaluates `$step` (an expression ending in `.await` that yields a
/// `Result<T, BackendError>`) until it succeeds, retrying through
/// [`Shared::retrier`]; `Some(T)`, or `None` once the worker abandons Redis
/// work (the lease release then hands the message back).
macro_rules! persist {
    ($sh:expr, $what:expr, $step:expr) => {{
        let mut retry = $sh.retrier($what);
        loop {
            match $step {
                Ok(v) => break Some(v),
                Err(e) => {
                    if !retry.again(&e).await {
                        break None;
                    }
                }
            }
        }
    }};
}
pub(crate) use persist;

/// The text of a panic payload.
pub(crate) fn panic_text(payload: &(dyn std::any::Any + Send)) -> String {
    payload
        .downcast_ref::<&str>()
        .map(|s| (*s).to_owned())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "non-text panic payload".into())
}

/// `d` scaled by a random factor in [0.5, 1.0].
pub(crate) fn jitter(d: Duration) -> Duration {
    d.mul_f64(0.5 + rand::random::<f64>() / 2.0)
}
