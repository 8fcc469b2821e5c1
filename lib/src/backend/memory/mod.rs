//! The in-memory implementation: every guarantee of the Redis one, in one
//! `Mutex`-guarded state, for fast tests of the worker, beat and web logic.
//!
//! Time comes from a [`TokioClock`], which follows `tokio::time`: under
//! `tokio::time::pause()`, `advance` drives leases, expiries and due times
//! with no real waits. Waiters (for messages, for results) are woken by
//! `tokio::sync::Notify`, never by polling.
//!
//! A list's front is the message served next (Redis's RPOP end): producers
//! push to the back, hand-backs and reaping return messages to the front.

#[cfg(feature = "beat")]
mod beat;
mod consume;
mod store;

use super::traits::{
    Backend, BackendError, Clock, Consume, DeadLetters, Delayed, Enqueue, Inspect, Leases,
    ResultStore, TaskStates, Use,
};
#[cfg(feature = "beat")]
use super::traits::{LeaderLock, SlotLedger};
use crate::broker::WorkerRecord;
use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use tokio::sync::Notify;

/// A clock that follows `tokio::time` from a starting wall-clock time, so
/// paused time (`tokio::time::pause`, `advance`) moves it.
#[derive(Debug, Clone, Copy)]
pub struct TokioClock {
    epoch_ms: i64,
    origin: tokio::time::Instant,
}

impl TokioClock {
    /// Starts at the current wall-clock time.
    pub fn new() -> Self {
        Self::starting_at(chrono::Utc::now().timestamp_millis())
    }

    /// Starts at `epoch_ms` (ms since the Unix epoch).
    pub fn starting_at(epoch_ms: i64) -> Self {
        Self {
            epoch_ms,
            origin: tokio::time::Instant::now(),
        }
    }
}

impl Default for TokioClock {
    fn default() -> Self {
        Self::new()
    }
}

impl Clock for TokioClock {
    fn now_ms(&self) -> i64 {
        let elapsed = i64::try_from(self.origin.elapsed().as_millis()).unwrap_or(i64::MAX);
        self.epoch_ms.saturating_add(elapsed)
    }
}

/// A value that disappears at `until_ms` (like a Redis key with a TTL).
#[derive(Debug, Clone)]
struct Expiring<T> {
    value: T,
    until_ms: i64,
}

impl<T> Expiring<T> {
    fn live(&self, now: i64) -> Option<&T> {
        (self.until_ms > now).then_some(&self.value)
    }
}

/// A message somewhere other than a queue: held, or parked.
#[derive(Debug, Clone, PartialEq)]
struct Placed {
    queue_key: String,
    payload: Vec<u8>,
}

#[derive(Debug, Default)]
struct State {
    /// Queue key → messages, front served first.
    lists: HashMap<String, VecDeque<Vec<u8>>>,
    /// Worker → hold sequence number → the message it holds.
    holds: HashMap<String, BTreeMap<u64, Placed>>,
    /// Worker → lease deadline (ms); kept after expiry until reaped.
    leases: HashMap<String, i64>,
    workers: HashMap<String, Expiring<WorkerRecord>>,
    /// (due ms, park order) → message.
    delayed: BTreeMap<(i64, u64), Placed>,
    /// Queue name → dead-letter records (JSON), newest first.
    dead: HashMap<String, VecDeque<String>>,
    /// Task id → its result record (JSON).
    results: HashMap<String, Expiring<String>>,
    /// Task id → revoked marker expiry.
    revoked: HashMap<String, i64>,
    #[cfg(feature = "beat")]
    lock: Option<Expiring<String>>,
    /// Beat entry → last published slot (ms).
    #[cfg(feature = "beat")]
    last_slots: HashMap<String, i64>,
    /// Beat instance id → its heartbeat record (JSON).
    #[cfg(feature = "beat")]
    beat_instances: HashMap<String, Expiring<String>>,
    last_seq: u64,
    parked: u64,
}

impl State {
    fn push_back(&mut self, queue_key: &str, payload: Vec<u8>) {
        self.lists
            .entry(queue_key.to_owned())
            .or_default()
            .push_back(payload);
    }

    fn push_front(&mut self, queue_key: &str, payload: Vec<u8>) {
        self.lists
            .entry(queue_key.to_owned())
            .or_default()
            .push_front(payload);
    }

    fn park(&mut self, due_ms: i64, placed: Placed) {
        self.parked += 1;
        self.delayed.insert((due_ms, self.parked), placed);
    }

    /// Returns everything `worker` holds to the front of its queues, the
    /// oldest taken at the very front, and forgets the worker.
    fn reap_worker(&mut self, worker: &str) -> u64 {
        let held = self.holds.remove(worker).unwrap_or_default();
        let restored = held.len() as u64;
        for (_, p) in held.into_iter().rev() {
            self.push_front(&p.queue_key, p.payload);
        }
        self.leases.remove(worker);
        self.workers.remove(worker);
        restored
    }

    fn set_result(&mut self, task_id: &str, record: String, until_ms: i64) {
        self.results.insert(
            task_id.to_owned(),
            Expiring {
                value: record,
                until_ms,
            },
        );
    }
}

#[derive(Debug)]
struct Inner {
    state: Mutex<State>,
    clock: TokioClock,
    /// Woken whenever a message lands in a queue.
    arrived: Notify,
    /// Woken whenever a result record is stored (Redis's PUBLISH).
    recorded: Notify,
    unavailable: AtomicBool,
}

/// The in-memory backend. Clones share one state.
#[derive(Debug, Clone)]
pub struct MemoryBackend {
    inner: Arc<Inner>,
    /// This handle's result store is unreachable (see
    /// [`MemoryBackend::with_results_unavailable`]).
    results_down: bool,
}

impl Default for MemoryBackend {
    fn default() -> Self {
        Self::new()
    }
}

impl MemoryBackend {
    /// An empty backend on a [`TokioClock`] starting now.
    pub fn new() -> Self {
        Self::with_clock(TokioClock::new())
    }

    pub fn with_clock(clock: TokioClock) -> Self {
        Self {
            inner: Arc::new(Inner {
                state: Mutex::default(),
                clock,
                arrived: Notify::new(),
                recorded: Notify::new(),
                unavailable: AtomicBool::new(false),
            }),
            results_down: false,
        }
    }

    /// A handle on the same state whose result store is unreachable while
    /// the broker side works, as with a separate result server that is
    /// down: for tests that a result is stored before its message is
    /// acknowledged.
    pub fn with_results_unavailable(&self) -> Self {
        Self {
            inner: Arc::clone(&self.inner),
            results_down: true,
        }
    }

    /// Makes every operation fail with [`BackendError::Unavailable`] (or
    /// work again), as an unreachable server would: for tests of retries.
    pub fn set_available(&self, available: bool) {
        self.inner.unavailable.store(!available, Ordering::SeqCst);
    }

    fn session(&self, worker_id: &str) -> Box<MemorySession> {
        Box::new(MemorySession {
            inner: Arc::clone(&self.inner),
            worker_id: worker_id.to_owned(),
            results_down: self.results_down,
        })
    }
}

impl Backend for MemoryBackend {
    fn clock(&self) -> Arc<dyn Clock> {
        Arc::new(self.inner.clock)
    }
    fn namespace(&self) -> &str {
        "memory"
    }
    fn enqueue(&self, _: Use) -> Box<dyn Enqueue> {
        self.session("")
    }
    fn consume(&self, worker_id: &str) -> Box<dyn Consume> {
        self.session(worker_id)
    }
    fn leases(&self, _: Use) -> Box<dyn Leases> {
        self.session("")
    }
    fn delayed(&self, _: Use) -> Box<dyn Delayed> {
        self.session("")
    }
    fn results(&self, _: Use) -> Box<dyn ResultStore> {
        self.session("")
    }
    fn task_states(&self, _: Use) -> Box<dyn TaskStates> {
        self.session("")
    }
    fn dead_letters(&self, _: Use) -> Box<dyn DeadLetters> {
        self.session("")
    }
    fn inspect(&self, _: Use) -> Box<dyn Inspect> {
        self.session("")
    }
    #[cfg(feature = "beat")]
    fn leader_lock(&self, _: Use) -> Box<dyn LeaderLock> {
        self.session("")
    }
    #[cfg(feature = "beat")]
    fn slot_ledger(&self, _: Use) -> Box<dyn SlotLedger> {
        self.session("")
    }
}

/// A session: every capability on the one shared state.
#[derive(Debug)]
struct MemorySession {
    inner: Arc<Inner>,
    worker_id: String,
    results_down: bool,
}

impl MemorySession {
    /// The state and the current time, or `Unavailable` when a test made
    /// the backend unreachable.
    fn state(&self, op: &'static str) -> Result<(MutexGuard<'_, State>, i64), BackendError> {
        if self.inner.unavailable.load(Ordering::SeqCst) {
            return Err(BackendError::Unavailable { op });
        }
        let guard = self
            .inner
            .state
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        Ok((guard, self.inner.clock.now_ms()))
    }

    /// [`MemorySession::state`] for an operation on the result store.
    fn result_state(&self, op: &'static str) -> Result<(MutexGuard<'_, State>, i64), BackendError> {
        self.results_reachable(op, true)?;
        self.state(op)
    }

    /// Fails when this session's result store is unreachable and `touches`
    /// it; checked before anything is written, so nothing half happens.
    fn results_reachable(&self, op: &'static str, touches: bool) -> Result<(), BackendError> {
        if touches && self.results_down {
            return Err(BackendError::Unavailable { op });
        }
        Ok(())
    }
}

fn ms(d: std::time::Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX).max(1)
}

fn to_json<T: serde::Serialize>(op: &'static str, v: &T) -> Result<String, BackendError> {
    serde_json::to_string(v).map_err(|e| BackendError::Invalid {
        op,
        detail: e.to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::Outgoing;
    use std::time::Duration;

    #[tokio::test(start_paused = true)]
    async fn the_clock_follows_paused_tokio_time() {
        let clock = TokioClock::starting_at(1_000);
        assert_eq!(clock.now_ms(), 1_000);
        tokio::time::advance(Duration::from_secs(90)).await;
        assert_eq!(
            clock.now_ms(),
            91_000,
            "moved by advance, not by the wall clock"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn an_unavailable_backend_fails_every_call_and_changes_nothing() {
        let b = MemoryBackend::new();
        let q = vec!["q".to_owned()];
        let msg = Outgoing {
            queue_key: "q".into(),
            payload: "m".into(),
            due_ms: None,
            pending: None,
        };
        b.set_available(false);
        let err = b
            .enqueue(Use::Request)
            .enqueue(std::slice::from_ref(&msg))
            .await;
        assert!(matches!(
            err,
            Err(BackendError::Unavailable { op: "enqueue" })
        ));
        let err = b
            .consume("w")
            .take(&q, 1, Duration::from_secs(1), usize::MAX)
            .await;
        assert!(matches!(err, Err(BackendError::Unavailable { .. })));
        b.set_available(true);
        assert!(
            b.consume("w")
                .take(&q, 1, Duration::from_secs(1), usize::MAX)
                .await
                .expect("take")
                .is_empty()
        );
        b.enqueue(Use::Request)
            .enqueue(&[msg])
            .await
            .expect("enqueue");
        assert_eq!(
            b.consume("w")
                .take(&q, 1, Duration::from_secs(1), usize::MAX)
                .await
                .expect("take")
                .len(),
            1
        );
    }
}
