//! Capability traits over the broker and result store, with two
//! implementations that keep the same guarantees: [`RedisBackend`] (the
//! production one, a thin layer over [`crate::broker`] and the beat's lock
//! and publish scripts) and [`MemoryBackend`] (one in-process state on a
//! clock that follows `tokio::time`, for fast tests of the engines).
//! [`PostgresBackend`] keeps results in PostgreSQL; `AmqpBackend` (feature
//! `amqp`, module `amqp`) carries messages on RabbitMQ.
//!
//! One conformance suite (`conformance.rs`, run by `tests.rs`) checks both
//! against the same cases: delivery order and priority buckets,
//! redelivery after a lease expires, hand-back, settling, dead letters,
//! the delayed set, revoke against start, result expiry, the leader lock
//! and the beat's slot ledger.

#[cfg(feature = "amqp")]
pub mod amqp;
mod memory;
pub mod postgres;
mod redis;
mod traits;

#[cfg(feature = "amqp")]
pub use amqp::AmqpBackend;
pub use memory::{MemoryBackend, TokioClock};
pub use postgres::PostgresBackend;
pub use redis::{RedisBackend, SystemClock};
pub use traits::{
    Acquired, Backend, BackendError, Clock, Consume, DeadLetters, Delayed, Enqueue, Expiry,
    Inspect, LeaderLock, Leases, LockLease, Outgoing, Parked, PendingRecord, Promoted, Reaped,
    ResultStore, SlotLedger, SlotOutcome, SlotPublish, Store, TaskStates, Use,
};

/// How long from `now_ms` until `due_ms` (zero when already due).
pub(crate) fn due_in(due_ms: i64, now_ms: i64) -> std::time::Duration {
    std::time::Duration::from_millis(u64::try_from(due_ms.saturating_sub(now_ms)).unwrap_or(0))
}

#[cfg(test)]
pub(crate) mod conformance;
#[cfg(test)]
mod tests;
