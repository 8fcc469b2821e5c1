//! The capability traits and the values that cross them.
//!
//! Every capability is a *session*: methods take `&mut self`, so an
//! implementation may keep one connection per session (the Redis one keeps
//! a pooled connection for a long-lived loop, the shared multiplexed one for
//! request/response callers). [`Backend`] opens sessions; engines hold an
//! `Arc<dyn Backend>` and open one session per loop.

use crate::broker::{
    BrokerError, DeadLetter, DeadLetterAction, DeadSelection, DelayedSpan, Delivery,
    PickedDeadLetter, QueueCounts, RevokeOutcome, Settle, StartLanded, StartVerdict, Starting,
    WorkerRecord,
};
use crate::proto::TaskResult;
use async_trait::async_trait;
use std::fmt::Debug;
use std::sync::Arc;
use std::time::Duration;

/// A failed backend operation.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum BackendError {
    /// The Redis implementation's error, as the broker functions report it.
    #[error(transparent)]
    Broker(#[from] BrokerError),
    /// The backend cannot be reached (the in-memory one when a test made it
    /// unavailable, to exercise retries).
    #[error("{op} failed: the backend is unavailable")]
    Unavailable { op: &'static str },
    /// A value could not be written or read back.
    #[error("{op} failed: {detail}")]
    Invalid { op: &'static str, detail: String },
    /// The PostgreSQL result store's error.
    #[error(transparent)]
    Postgres(#[from] super::postgres::PgError),
    /// The RabbitMQ broker's error.
    #[cfg(feature = "amqp")]
    #[error(transparent)]
    Amqp(#[from] super::amqp::AmqpError),
}

impl BackendError {
    /// Whether the backend refused the credentials: retrying will not help
    /// until the configuration changes.
    pub fn is_auth_failure(&self) -> bool {
        match self {
            Self::Broker(e) => e.is_auth_failure(),
            Self::Postgres(e) => e.is_config(),
            #[cfg(feature = "amqp")]
            Self::Amqp(e) => e.refused,
            Self::Unavailable { .. } | Self::Invalid { .. } => false,
        }
    }
}

/// The time the backend's expiries, leases and due times are measured in
/// (ms since the Unix epoch).
pub trait Clock: Send + Sync + Debug {
    fn now_ms(&self) -> i64;
}

/// How a session will be used; decides the connection it gets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Use {
    /// A long-lived loop (the worker's settler, starter, keeper; the beat):
    /// a connection of its own, kept while the session lives.
    Loop,
    /// A request/response caller (the producer, the web API): the shared
    /// connection, pipelined with every other caller's. Never blocks.
    Request,
}

/// A server a backend works with, as `/health` names its check.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Store {
    Redis,
    PostgreSql,
    RabbitMq,
}

impl Store {
    /// The check's name: `redis`, `postgresql` or `rabbitmq`.
    pub fn name(self) -> &'static str {
        match self {
            Self::Redis => "redis",
            Self::PostgreSql => "postgresql",
            Self::RabbitMq => "rabbitmq",
        }
    }
}

/// Opens capability sessions. One per process, shared as `Arc<dyn Backend>`
/// (clones of one implementation share its state; two separately built
/// backends do not share hold sequence numbers, so they must not take
/// messages for the same worker id).
#[async_trait]
pub trait Backend: Send + Sync + Debug {
    /// The clock every due time, lease and expiry of this backend follows.
    fn clock(&self) -> Arc<dyn Clock>;
    /// The namespace of taskstack's own records on this backend (what a
    /// state file records, so `healthcheck` looks in the same place).
    fn namespace(&self) -> &str;
    fn enqueue(&self, usage: Use) -> Box<dyn Enqueue>;
    /// A worker's consuming session: always a connection of its own (it
    /// blocks while waiting for messages). Sequence numbers of holds are
    /// unique across every session of one backend, so several sessions of
    /// one worker never collide.
    fn consume(&self, worker_id: &str) -> Box<dyn Consume>;
    fn leases(&self, usage: Use) -> Box<dyn Leases>;
    fn delayed(&self, usage: Use) -> Box<dyn Delayed>;
    fn results(&self, usage: Use) -> Box<dyn ResultStore>;
    fn task_states(&self, usage: Use) -> Box<dyn TaskStates>;
    fn dead_letters(&self, usage: Use) -> Box<dyn DeadLetters>;
    fn inspect(&self, usage: Use) -> Box<dyn Inspect>;
    #[cfg(feature = "beat")]
    fn leader_lock(&self, usage: Use) -> Box<dyn LeaderLock>;
    #[cfg(feature = "beat")]
    fn slot_ledger(&self, usage: Use) -> Box<dyn SlotLedger>;
    /// The Redis broker under this backend, for the Celery features whose
    /// wire format is Redis itself (remote control's pidbox, task events,
    /// chord counters); `None` on a backend without one, where those
    /// features are off.
    fn redis(&self) -> Option<&crate::broker::Broker> {
        None
    }
    /// The Redis of the records Celery's features keep beside the results:
    /// Celery's chord counters (as Celery's Redis result backend keeps
    /// them), the canvas follow-ups' sent markers and remote control's
    /// revocation marks (the ones starting a task checks). Where
    /// [`Backend::redis`] is `None` but this is set (RabbitMQ, with Redis
    /// results), canvas follow-ups are published through
    /// [`Backend::enqueue`] and marked sent after the broker confirmed
    /// them. `None`: the canvas is off.
    fn records_redis(&self) -> Option<&crate::broker::Broker> {
        self.redis()
    }
    /// The canvas's records (follow-ups' sent markers, chord counters)
    /// where the broker does not keep them itself: on
    /// [`Backend::records_redis`] by default, in PostgreSQL with RabbitMQ
    /// and PostgreSQL results. `None`: the canvas is off.
    fn canvas(&self) -> Option<Box<dyn crate::canvas::store::CanvasStore>> {
        self.records_redis()
            .map(|b| Box::new(crate::canvas::store::RedisCanvas::new(b)) as _)
    }
    /// The RabbitMQ broker under this backend, for Celery's remote control
    /// and events on AMQP; `None` elsewhere.
    #[cfg(feature = "amqp")]
    fn amqp(&self) -> Option<&super::amqp::AmqpBackend> {
        None
    }
    /// Whether [`TaskStates::start_batch`] with a worker id marks starts
    /// without STARTED records (in the worker's running hash on the
    /// broker's Redis: Redis with results on the broker's server, and
    /// PostgreSQL results): then a worker without `task_track_started` need
    /// not build them, and its settlements name the started task
    /// ([`Settle::started`]) so the mark goes with the hold.
    fn marks_starts(&self) -> bool {
        false
    }
    /// Deleting expired results, for a store that does not expire them by
    /// itself (PostgreSQL); `None` where records expire on their own.
    fn expiry(&self) -> Option<Box<dyn Expiry>> {
        None
    }
    /// Whether the task's `args` / `kwargs` belong in every record the
    /// worker stores, whatever `result_extended` says (the PostgreSQL
    /// store's columns, bounded); false where the record's layout is
    /// Celery's own (Redis), which has them only with `result_extended`.
    fn records_task_args(&self) -> bool {
        false
    }
    /// One round trip to each store this backend works with, the broker
    /// first: what `/health` reports, by [`Store`].
    async fn pings(&self) -> Vec<(Store, Result<Duration, BackendError>)> {
        vec![(Store::Redis, self.inspect(Use::Request).ping().await)]
    }
}

/// Deleting expired result records in bounded batches.
#[async_trait]
pub trait Expiry: Send {
    /// Deletes up to `max` expired records, oldest expiry first. `None`
    /// when another process is cleaning now (exactly one cleans at a time).
    async fn sweep(&mut self, max: usize) -> Result<Option<u64>, BackendError>;
}

/// A message to send.
#[derive(Debug, Clone, PartialEq)]
pub struct Outgoing {
    /// The list it goes to (queue plus priority bucket).
    pub queue_key: String,
    pub payload: String,
    /// Park it until then (ms since the epoch) instead of queueing it now.
    pub due_ms: Option<i64>,
    /// A PENDING record to store on the result store before the message is
    /// sent, so a fast worker's STARTED record is never overwritten by it.
    pub pending: Option<PendingRecord>,
}

/// A task's PENDING result record and how long to keep it.
#[derive(Debug, Clone, PartialEq)]
pub struct PendingRecord {
    pub task_id: String,
    /// The record's JSON.
    pub record: String,
    pub ttl: Duration,
}

/// Sending messages.
#[async_trait]
pub trait Enqueue: Send {
    /// Stores the PENDING records, then pushes every immediate message to
    /// the back of its list (one round trip on Redis when results live on
    /// the broker) and parks the rest until due.
    async fn enqueue(&mut self, batch: &[Outgoing]) -> Result<(), BackendError>;
}

/// A worker taking and settling messages. Every message taken is *held*
/// under the worker's lease until settled, handed back, parked or
/// dead-lettered; if the lease expires first it is restored (see
/// [`Leases::reap_expired`]).
#[async_trait]
pub trait Consume: Send {
    /// The worker this session takes messages for.
    fn worker_id(&self) -> &str;

    /// Takes up to `max` messages from `queue_keys` (served in that order,
    /// each list oldest first), recording each as held and renewing the
    /// worker's lease to `lease` from now, in one atomic step. A message
    /// longer than `max_size` bytes is held but not sent: its delivery has
    /// an empty payload and [`Delivery::oversized`] set, and only
    /// [`Consume::dead_letter`] (which keeps its bytes) may settle it.
    async fn take(
        &mut self,
        queue_keys: &[String],
        max: usize,
        lease: Duration,
        max_size: usize,
    ) -> Result<Vec<Delivery>, BackendError>;

    /// Waits up to `wait` for a message the next [`Consume::take`] can
    /// have. `false` when none came; either answer may be early, so callers
    /// take and wait in a loop.
    async fn wait_for_message(
        &mut self,
        queue_keys: &[String],
        wait: Duration,
    ) -> Result<bool, BackendError>;

    /// The message the last [`Consume::wait_for_message`] moved toward this
    /// session, byte for byte, where the backend read it on the way (taken
    /// out: the next call, or a take, forgets it). A worker that will run
    /// it at once names it to [`Consume::take_starting`]. `None` by default.
    fn landed(&mut self) -> Option<Vec<u8>> {
        None
    }

    /// [`Consume::take`], starting `start` (the message
    /// [`Consume::landed`] returned) in the same atomic step where the
    /// backend can, as [`TaskStates::start_batch`] would for this worker:
    /// then it is the first delivery and the verdict is
    /// [`StartVerdict::Run`] (marked started) or [`StartVerdict::Revoked`]
    /// (skip it). `None`: nothing was started (the default, and whenever
    /// the take did not find exactly that message landed); every delivery
    /// goes through `start_batch` as usual.
    async fn take_starting(
        &mut self,
        queue_keys: &[String],
        max: usize,
        lease: Duration,
        max_size: usize,
        start: StartLanded<'_>,
    ) -> Result<(Vec<Delivery>, Option<StartVerdict>), BackendError> {
        let _ = start;
        Ok((self.take(queue_keys, max, lease, max_size).await?, None))
    }

    /// Stores each settlement's result (if any) with expiry `result_ttl`
    /// and publishes it, then releases the holds: a result is stored before
    /// its message is acknowledged. Settling a hold already gone is a no-op.
    async fn settle(&mut self, batch: &[Settle], result_ttl: Duration) -> Result<(), BackendError>;

    /// Puts held messages back at the front of their queues, the first of
    /// `seqs` (the oldest) at the very front. Returns how many were held.
    async fn hand_back(&mut self, seqs: &[u64]) -> Result<usize, BackendError>;

    /// Parks a held message (`payload` may differ from the one taken, e.g.
    /// the next retry) until `due_ms`, releasing the hold in the same step;
    /// nothing happens when the hold is already gone. `started`: the task
    /// started under this hold (a retry), so its start mark goes too.
    async fn park_held(
        &mut self,
        seq: u64,
        queue_key: &str,
        payload: &[u8],
        due_ms: i64,
        started: Option<&str>,
    ) -> Result<(), BackendError>;

    /// Appends `record` to its queue's dead letters and releases the hold in
    /// one step (with the start mark of `record.task_id`, when the task
    /// started under this hold); nothing happens when the hold is already
    /// gone. For an
    /// oversized delivery (`record.payload_size` set, no payload) the
    /// backend keeps the held bytes itself and names where
    /// (`payload_key`), so requeueing the dead letter restores them.
    async fn dead_letter(&mut self, seq: u64, record: &DeadLetter) -> Result<(), BackendError>;
}

/// What a reaper found.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Reaped {
    /// Workers whose lease had expired (now forgotten).
    pub workers: u64,
    /// Messages they held, now back at the front of their queues.
    pub restored: u64,
}

/// Worker leases and heartbeat records.
#[async_trait]
pub trait Leases: Send {
    /// Renews (or takes) the worker's lease to `lease` from now and stores
    /// its record for as long; `landing_source` is the first queue key it
    /// consumes. `true` when the lease was newly created (it had expired
    /// and been reaped, or this is the first heartbeat).
    async fn heartbeat(
        &mut self,
        record: &WorkerRecord,
        landing_source: &str,
        lease: Duration,
    ) -> Result<bool, BackendError>;

    /// Restores the messages of every worker whose lease expired, oldest
    /// first at the front of their queues, and forgets those workers.
    async fn reap_expired(&mut self) -> Result<Reaped, BackendError>;

    /// Ends `worker_id`'s lease now and hands back all it holds. Returns the
    /// number of messages handed back.
    async fn release(&mut self, worker_id: &str) -> Result<u64, BackendError>;
}

/// A message to park until due.
#[derive(Debug, Clone, PartialEq)]
pub struct Parked {
    pub queue_key: String,
    pub payload: String,
    pub due_ms: i64,
}

/// What a promotion did.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Promoted {
    pub moved: u64,
    /// How long until the next parked message is due (zero when one is due
    /// already), `None` when nothing is parked.
    pub next_due_in: Option<Duration>,
}

/// The delayed set: messages parked until a due time.
#[async_trait]
pub trait Delayed: Send {
    async fn park(&mut self, batch: &[Parked]) -> Result<(), BackendError>;
    /// Moves up to `max` due messages, earliest first, to the back of their
    /// queues.
    async fn promote_due(&mut self, max: usize) -> Result<Promoted, BackendError>;
}

/// Task results, in Celery's layout.
#[async_trait]
pub trait ResultStore: Send {
    /// Stores (and publishes) every result, each expiring after `ttl`.
    async fn write(&mut self, results: &[TaskResult], ttl: Duration) -> Result<(), BackendError>;
    /// A task's record; `None` when there is none (yet, or any more).
    async fn read(&mut self, task_id: &str) -> Result<Option<TaskResult>, BackendError>;
    /// Waits up to `timeout` for the task's final record (SUCCESS, FAILURE
    /// or REVOKED), woken by its publication; `None` when none came.
    async fn wait(
        &mut self,
        task_id: &str,
        timeout: Duration,
    ) -> Result<Option<TaskResult>, BackendError>;
}

/// Starting and revoking tasks, atomic with respect to each other: a task
/// is either revoked before it starts, or its revocation is refused.
#[async_trait]
pub trait TaskStates: Send {
    /// For each task about to start: [`StartVerdict::Run`] when it may run
    /// (it is now marked started, so [`TaskStates::revoke`] refuses it),
    /// [`StartVerdict::Revoked`] when it was revoked, and, when `worker_id`
    /// is given, [`StartVerdict::NotHeld`] when that worker no longer holds
    /// its message (checked atomically with the start). Where STARTED
    /// records mark starts, [`StartVerdict::Finished`] when the task's
    /// result record is already final (a second delivery). Its STARTED record
    /// (kept `ttl`) is stored when `track_started`, and also when the
    /// backend marks starts by that record (the in-memory backend, Redis
    /// with results on another Redis server, and any backend without
    /// `worker_id`). With `worker_id`, Redis with results on the broker's
    /// server and PostgreSQL results mark them in the worker's running
    /// hash on the broker instead (one script per batch; PostgreSQL then
    /// commits nothing unless `track_started`), where
    /// [`TaskStates::revoke`] looks; PostgreSQL also stores REVOKED for a
    /// task skipped as revoked whose row does not say so yet.
    async fn start_batch(
        &mut self,
        worker_id: Option<&str>,
        tasks: &[Starting],
        ttl: Duration,
        track_started: bool,
    ) -> Result<Vec<StartVerdict>, BackendError>;

    /// Revokes a task that has not started: stores `record` (its REVOKED
    /// record) for at least `ttl` and marks it so no worker starts it.
    /// With PostgreSQL results the mark (the broker's revoked marker) is
    /// set first, atomically with the workers' start marks, then the row
    /// is stored; a crash in between leaves the task revoked on the broker,
    /// and the row is completed by a repeated revocation or by the worker
    /// that skips the task.
    async fn revoke(
        &mut self,
        task_id: &str,
        record: &str,
        ttl: Duration,
    ) -> Result<RevokeOutcome, BackendError>;
}

/// Dead letters: listing, choosing, requeueing and discarding.
#[async_trait]
pub trait DeadLetters: Send {
    /// Up to `count` dead letters of `queue`, newest first, and how many it
    /// has in all, as one snapshot.
    async fn page(
        &mut self,
        queue: &str,
        count: usize,
    ) -> Result<(Vec<DeadLetter>, u64), BackendError>;
    /// The dead letters `selection` names, oldest first.
    async fn pick(
        &mut self,
        queue: &str,
        selection: &DeadSelection,
    ) -> Result<Vec<PickedDeadLetter>, BackendError>;
    /// Requeues (original message to the back of its list) or discards the
    /// picked dead letters, each atomically; returns those acted on. One
    /// another caller moved meanwhile is skipped, never moved twice.
    async fn apply(
        &mut self,
        queue: &str,
        action: DeadLetterAction,
        picked: &[PickedDeadLetter],
    ) -> Result<Vec<DeadLetter>, BackendError>;
}

/// Read-only views for operators.
#[async_trait]
pub trait Inspect: Send {
    /// Counts for each of `queues`, in order, as one snapshot.
    async fn queue_counts(&mut self, queues: &[String]) -> Result<Vec<QueueCounts>, BackendError>;
    /// The records of every worker whose lease is live.
    async fn live_workers(&mut self) -> Result<Vec<WorkerRecord>, BackendError>;
    /// How many messages wait in the delayed set and when the first and
    /// the last are due.
    async fn delayed_span(&mut self) -> Result<DelayedSpan, BackendError>;
    /// One round trip to the store; how long it took.
    async fn ping(&mut self) -> Result<Duration, BackendError>;
}

/// What [`LeaderLock::try_acquire`] found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Acquired {
    /// Taken: we lead for the TTL.
    Yes,
    /// Someone holds it (its value, when it still existed a moment later).
    HeldBy(Option<String>),
}

/// A held leader lock, as [`LeaderLock::lease`] reads it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LockLease {
    /// The holder's value.
    pub value: String,
    /// Milliseconds until it expires unless renewed; `None`: it never
    /// expires (a Redis key without a TTL, which no beat writes).
    pub remaining_ms: Option<i64>,
}

/// The leader lock. Its value (compared whole) embeds a random token per
/// term, so no instance can renew or release another's lock.
#[async_trait]
pub trait LeaderLock: Send {
    async fn try_acquire(&mut self, value: &str, ttl: Duration) -> Result<Acquired, BackendError>;
    /// Extends the lock to `ttl` if it still holds `value`; `false`: lost.
    async fn renew(&mut self, value: &str, ttl: Duration) -> Result<bool, BackendError>;
    /// Deletes the lock if it holds `value`; `false`: it was not ours.
    async fn release(&mut self, value: &str) -> Result<bool, BackendError>;
    /// The lock's current value and how long it has left, if it is held.
    async fn lease(&mut self) -> Result<Option<LockLease>, BackendError>;
    /// The lock's current value, if it is held.
    async fn holder(&mut self) -> Result<Option<String>, BackendError> {
        Ok(self.lease().await?.map(|l| l.value))
    }
    /// Stores a beat instance's heartbeat record (JSON) for `ttl`, whether
    /// it leads or stands by: a record that exists is a live instance.
    async fn announce(
        &mut self,
        instance_id: &str,
        record: &str,
        ttl: Duration,
    ) -> Result<(), BackendError>;
    /// Deletes an instance's heartbeat record (at a clean stop).
    async fn forget(&mut self, instance_id: &str) -> Result<(), BackendError>;
    /// A live instance's heartbeat record, as announced.
    async fn instance(&mut self, instance_id: &str) -> Result<Option<String>, BackendError>;
}

/// One slot to publish.
#[derive(Debug, Clone, Copy)]
pub struct SlotPublish<'a> {
    /// The lock value we hold (fencing).
    pub lock_value: &'a str,
    /// Publish only while the lock outlives this.
    pub margin: Duration,
    pub entry: &'a str,
    /// The queue the message goes to (bucket 0).
    pub queue: &'a str,
    /// The slot, ms since the epoch.
    pub slot_ms: i64,
    pub payload: &'a str,
}

/// What a slot publication did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SlotOutcome {
    /// Pushed, and recorded as the entry's last slot.
    Published,
    /// Refused: this slot, or a later one, was already published.
    AlreadyPublished { last_ms: i64 },
    /// Refused: the lock is not ours.
    NotLeader,
    /// Refused: the lock is ours but expires within the margin.
    LeaseTooShort { pttl_ms: i64 },
}

/// The beat's ledger of published slots: each slot of an entry is published
/// at most once, only by the lock holder, and slots only move forward.
#[async_trait]
pub trait SlotLedger: Send {
    /// Checks the lock and the ledger and, in the same atomic step, pushes
    /// the message and records the slot.
    async fn publish(&mut self, slot: SlotPublish<'_>) -> Result<SlotOutcome, BackendError>;
    /// The last published slot of each named entry.
    async fn last_slots(&mut self, entries: &[&str]) -> Result<Vec<Option<i64>>, BackendError>;
}
