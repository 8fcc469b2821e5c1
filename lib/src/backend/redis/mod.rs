//! The Redis implementation: a thin layer over the broker's and the beat's
//! functions (the same Lua scripts and pipelines), one [`Lane`] pair per
//! session.

#[cfg(feature = "beat")]
mod beat;
mod consume;

use super::due_in;
use super::traits::{
    Backend, BackendError, Clock, Consume, DeadLetters, Delayed, Enqueue, Inspect, Leases,
    Outgoing, Parked, Promoted, Reaped, ResultStore, TaskStates, Use,
};
#[cfg(feature = "beat")]
use super::traits::{LeaderLock, SlotLedger};
use crate::broker::{
    self, Broker, DeadLetter, DeadLetterAction, DeadSelection, DelayedSpan, Lane, PickedDeadLetter,
    QueueCounts, RevokeOutcome, StartVerdict, Starting, WorkerRecord, on_lane,
};
use crate::proto::TaskResult;
use crate::proto::keys::{queue_of_key, result_key};
use crate::results_listener::Listener;
use async_trait::async_trait;
use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use std::time::Duration;

/// The wall clock Redis's lease and due times are compared with.
#[derive(Debug, Clone, Copy, Default)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now_ms(&self) -> i64 {
        broker::now_ms()
    }
}

/// The Redis backend: the broker's pools and key layout, plus what every
/// session of the process shares (hold sequence numbers, the result
/// subscription).
#[derive(Debug, Clone)]
pub struct RedisBackend {
    broker: Broker,
    /// The last hold sequence number handed out; every take reserves its
    /// whole range first, so a reply lost after the script ran never lets a
    /// later take reuse (and overwrite) a number recording a held message.
    last_seq: Arc<AtomicU64>,
    /// The lists this process took messages from, each with the slot its
    /// hold numbers carry: a hold's number names its queue, so an
    /// acknowledgement lowers the right held count (`ack.lua`) without
    /// Redis reading the list of slots.
    hold_slots: Arc<std::sync::Mutex<broker::HoldQueues>>,
    listener: Arc<tokio::sync::Mutex<Option<Listener>>>,
}

impl RedisBackend {
    pub fn new(broker: Broker) -> Self {
        Self {
            broker,
            last_seq: Arc::default(),
            hold_slots: Arc::default(),
            listener: Arc::default(),
        }
    }

    /// The pools and key layout underneath.
    pub fn broker(&self) -> &Broker {
        &self.broker
    }

    /// The queue name of each slot (index), as of now.
    fn slot_queues(&self) -> Vec<String> {
        self.hold_slots
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .keys()
            .iter()
            .map(|k| queue_of_key(k).to_owned())
            .collect()
    }

    fn session(&self, usage: Use, worker_id: &str) -> Box<RedisSession> {
        let lane = |pool: &broker::RedisPool| match usage {
            Use::Loop => pool.lane(),
            Use::Request => pool.shared_lane(),
        };
        Box::new(RedisSession {
            lane: lane(self.broker.broker_pool()),
            backend: lane(self.broker.backend_pool()),
            worker_id: worker_id.to_owned(),
            shared: self.clone(),
            landing: true,
            landed: None,
            uncertain: Vec::new(),
        })
    }
}

impl Backend for RedisBackend {
    fn clock(&self) -> Arc<dyn Clock> {
        Arc::new(SystemClock)
    }
    fn namespace(&self) -> &str {
        self.broker.keys().namespace()
    }
    fn redis(&self) -> Option<&Broker> {
        Some(&self.broker)
    }
    fn marks_starts(&self) -> bool {
        self.broker.backend_is_broker()
    }
    fn enqueue(&self, usage: Use) -> Box<dyn Enqueue> {
        self.session(usage, "")
    }
    fn consume(&self, worker_id: &str) -> Box<dyn Consume> {
        self.session(Use::Loop, worker_id)
    }
    fn leases(&self, usage: Use) -> Box<dyn Leases> {
        self.session(usage, "")
    }
    fn delayed(&self, usage: Use) -> Box<dyn Delayed> {
        self.session(usage, "")
    }
    fn results(&self, usage: Use) -> Box<dyn ResultStore> {
        self.session(usage, "")
    }
    fn task_states(&self, usage: Use) -> Box<dyn TaskStates> {
        self.session(usage, "")
    }
    fn dead_letters(&self, usage: Use) -> Box<dyn DeadLetters> {
        self.session(usage, "")
    }
    fn inspect(&self, usage: Use) -> Box<dyn Inspect> {
        self.session(usage, "")
    }
    #[cfg(feature = "beat")]
    fn leader_lock(&self, usage: Use) -> Box<dyn LeaderLock> {
        self.session(usage, "")
    }
    #[cfg(feature = "beat")]
    fn slot_ledger(&self, usage: Use) -> Box<dyn SlotLedger> {
        self.session(usage, "")
    }
}

/// One session: a lane to the broker and one to the result backend (the
/// same server or not), opened lazily.
#[derive(Debug)]
struct RedisSession {
    lane: Lane,
    backend: Lane,
    worker_id: String,
    shared: RedisBackend,
    /// Whether this session's landing list may hold a message: it waited
    /// (BLMOVE) since its last take, or has not taken yet.
    landing: bool,
    /// The message the last wait moved to the landing list, until the
    /// worker asks for it ([`Consume::landed`]) or the next take.
    landed: Option<Vec<u8>>,
    /// Sequence numbers reserved by takes that failed: the script may have
    /// run (and, with Sentinel, been replicated to the master that took
    /// over) with its reply lost, leaving messages held under this live
    /// worker that it never learned of. The next take hands them back
    /// first.
    uncertain: Vec<u64>,
}

impl RedisSession {
    fn same_server(&self) -> bool {
        self.shared.broker.backend_is_broker()
    }
}

#[async_trait]
impl Enqueue for RedisSession {
    async fn enqueue(&mut self, batch: &[Outgoing]) -> Result<(), BackendError> {
        // Commands are sized before they are filled: on the web API's path
        // a request's allocations are a large part of its cost.
        let mut records = redis::Pipeline::with_capacity(batch.len() + 1);
        for p in batch.iter().filter_map(|o| o.pending.as_ref()) {
            let key = result_key(&p.task_id);
            let mut set = redis::Cmd::with_capacity(5, key.len() + p.record.len() + 32);
            set.arg("SET")
                .arg(key)
                .arg(&p.record)
                .arg("PX")
                .arg(millis(p.ttl));
            records.add_command(set).ignore();
        }
        // Records first, so a fast worker's STARTED record is never
        // overwritten; in the messages' pipeline when on the same server.
        let mut pipe = if self.same_server() {
            records
        } else {
            if !records.is_empty() {
                on_lane!(&mut self.backend, "record pending task", |c| records
                    .query_async::<()>(c))?;
            }
            redis::Pipeline::with_capacity(1)
        };
        // One LPUSH per run of messages to the same list: LPUSH pushes its
        // values in order, so the list ends as with one LPUSH each.
        let now: Vec<&Outgoing> = batch.iter().filter(|o| o.due_ms.is_none()).collect();
        for run in now.chunk_by(|a, b| a.queue_key == b.queue_key) {
            let bytes: usize = run.iter().map(|o| o.payload.len()).sum();
            let mut push =
                redis::Cmd::with_capacity(run.len() + 2, bytes + 16 + run[0].queue_key.len());
            push.arg("LPUSH").arg(&run[0].queue_key);
            for o in run {
                push.arg(&o.payload);
            }
            pipe.add_command(push).ignore();
        }
        if !pipe.is_empty() {
            on_lane!(&mut self.lane, "enqueue", |c| pipe.query_async::<()>(c))?;
        }
        let parked: Vec<Parked> = batch
            .iter()
            .filter_map(|o| {
                o.due_ms.map(|due_ms| Parked {
                    queue_key: o.queue_key.clone(),
                    payload: o.payload.clone(),
                    due_ms,
                })
            })
            .collect();
        if !parked.is_empty() {
            // Not called for nothing: the call boxes its future.
            Delayed::park(self, &parked).await?;
        }
        // redis_min_replicas_acked: enqueued once a replica has it too.
        if !self.same_server() {
            self.backend.replicated("record pending task").await?;
        }
        Ok(self.lane.replicated("enqueue").await?)
    }
}

#[async_trait]
impl Leases for RedisSession {
    async fn heartbeat(
        &mut self,
        record: &WorkerRecord,
        landing_source: &str,
        lease: Duration,
    ) -> Result<bool, BackendError> {
        let keys = self.shared.broker.keys();
        Ok(broker::heartbeat(&mut self.lane, keys, record, landing_source, lease).await?)
    }

    async fn reap_expired(&mut self) -> Result<Reaped, BackendError> {
        let keys = self.shared.broker.keys();
        let (workers, restored) = broker::reap(&mut self.lane, keys, broker::now_ms()).await?;
        Ok(Reaped { workers, restored })
    }

    async fn release(&mut self, worker_id: &str) -> Result<u64, BackendError> {
        let keys = self.shared.broker.keys();
        Ok(broker::release(&mut self.lane, keys, worker_id).await?)
    }
}

#[async_trait]
impl Delayed for RedisSession {
    async fn park(&mut self, batch: &[Parked]) -> Result<(), BackendError> {
        let keys = self.shared.broker.keys();
        for p in batch {
            broker::park(
                &mut self.lane,
                keys,
                p.due_ms,
                &p.queue_key,
                p.payload.as_bytes(),
                None,
            )
            .await?;
        }
        Ok(())
    }

    async fn promote_due(&mut self, max: usize) -> Result<Promoted, BackendError> {
        let keys = self.shared.broker.keys();
        let now = broker::now_ms();
        let (moved, next) = broker::promote(&mut self.lane, keys, now, max).await?;
        Ok(Promoted {
            moved,
            next_due_in: next.map(|due| due_in(due, now)),
        })
    }
}

#[async_trait]
impl ResultStore for RedisSession {
    async fn write(&mut self, results: &[TaskResult], ttl: Duration) -> Result<(), BackendError> {
        Ok(broker::store_results(&mut self.backend, results, ttl).await?)
    }

    async fn read(&mut self, task_id: &str) -> Result<Option<TaskResult>, BackendError> {
        // A pooled connection found broken (e.g. to a master that a
        // Sentinel failover replaced) is dropped by the lane: a read is
        // safe to redo once on a fresh one.
        match broker::get_result(&mut self.backend, task_id).await {
            Err(e) if e.is_connection_lost() => {
                Ok(broker::get_result(&mut self.backend, task_id).await?)
            }
            r => Ok(r?),
        }
    }

    async fn wait(
        &mut self,
        task_id: &str,
        timeout: Duration,
    ) -> Result<Option<TaskResult>, BackendError> {
        let pool = self.shared.broker.backend_pool();
        let slot = &self.shared.listener;
        Ok(crate::results_listener::wait_ready(slot, pool, task_id, timeout).await?)
    }
}

#[async_trait]
impl TaskStates for RedisSession {
    async fn start_batch(
        &mut self,
        worker_id: Option<&str>,
        tasks: &[Starting],
        ttl: Duration,
        track_started: bool,
    ) -> Result<Vec<StartVerdict>, BackendError> {
        let keys = self.shared.broker.keys();
        let Some(worker) = worker_id.filter(|_| !self.same_server()) else {
            // Results on the broker's server: start.lua checks the holds
            // itself, atomically with the reaper, and marks the tasks
            // started in the worker's running hash.
            return Ok(broker::start_batch(
                &mut self.backend,
                keys,
                worker_id,
                tasks,
                ttl,
                track_started,
            )
            .await?);
        };
        // Elsewhere: the holds are checked on the broker first; only the
        // tasks still held are started.
        let seqs: Vec<u64> = tasks.iter().map(|t| t.seq).collect();
        let holds = broker::held(&mut self.lane, keys, worker, &seqs).await?;
        let still_held: Vec<Starting> = tasks
            .iter()
            .zip(&holds)
            .filter(|(_, h)| **h)
            .map(|(t, _)| t.clone())
            .collect();
        let mut started = if still_held.is_empty() {
            Vec::new()
        } else {
            // No in-flight hash there to mark: STARTED records carry the
            // exclusion with revoke.lua.
            broker::start_batch(&mut self.backend, keys, None, &still_held, ttl, true).await?
        }
        .into_iter();
        Ok(holds
            .into_iter()
            .map(|h| {
                if h {
                    started.next().unwrap_or(StartVerdict::NotHeld)
                } else {
                    StartVerdict::NotHeld
                }
            })
            .collect())
    }

    async fn revoke(
        &mut self,
        task_id: &str,
        record: &str,
        ttl: Duration,
    ) -> Result<RevokeOutcome, BackendError> {
        let keys = self.shared.broker.keys();
        let on_broker = self.same_server();
        Ok(broker::revoke(&mut self.backend, keys, task_id, record, ttl, on_broker).await?)
    }
}

#[async_trait]
impl DeadLetters for RedisSession {
    async fn page(
        &mut self,
        queue: &str,
        count: usize,
    ) -> Result<(Vec<DeadLetter>, u64), BackendError> {
        let keys = self.shared.broker.keys();
        Ok(broker::dead_letters(&mut self.lane, keys, queue, count).await?)
    }

    async fn pick(
        &mut self,
        queue: &str,
        selection: &DeadSelection,
    ) -> Result<Vec<PickedDeadLetter>, BackendError> {
        let keys = self.shared.broker.keys();
        Ok(broker::pick_dead_letters(&mut self.lane, keys, queue, selection).await?)
    }

    async fn apply(
        &mut self,
        queue: &str,
        action: DeadLetterAction,
        picked: &[PickedDeadLetter],
    ) -> Result<Vec<DeadLetter>, BackendError> {
        let keys = self.shared.broker.keys();
        Ok(broker::move_dead_letters(&mut self.lane, keys, queue, action, picked).await?)
    }
}

#[async_trait]
impl Inspect for RedisSession {
    async fn queue_counts(&mut self, queues: &[String]) -> Result<Vec<QueueCounts>, BackendError> {
        let keys = self.shared.broker.keys();
        Ok(broker::queue_counts(&mut self.lane, keys, queues).await?)
    }

    async fn live_workers(&mut self) -> Result<Vec<WorkerRecord>, BackendError> {
        let keys = self.shared.broker.keys();
        Ok(broker::live_workers(&mut self.lane, keys).await?)
    }

    async fn delayed_span(&mut self) -> Result<DelayedSpan, BackendError> {
        let keys = self.shared.broker.keys();
        Ok(broker::delayed_span(&mut self.lane, keys).await?)
    }

    async fn ping(&mut self) -> Result<Duration, BackendError> {
        // The connection first, so the figure is one round trip.
        self.lane.conn("ping").await?;
        let start = std::time::Instant::now();
        on_lane!(&mut self.lane, "ping", |c| redis::cmd("PING")
            .query_async::<String>(c))?;
        Ok(start.elapsed())
    }
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX).max(1)
}
