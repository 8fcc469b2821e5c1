//! Where a RabbitMQ broker keeps everything that is not a message: the
//! result backend's Redis (`result_backend = "redis://..."`) or PostgreSQL
//! (`result_backend = "postgresql://..."`, no Redis at all).
//!
//! Both keep the same records: results and task states (the STARTED
//! record is what excludes a revocation and a second delivery of a
//! finished task, see [`States`]), worker heartbeat records with the
//! messages each holds by queue (`held`), dead letters (`dead`), the beat's
//! lock and ledger (`slots`), the canvas's sent markers and chord counters
//! ([`CanvasStore`]). On Redis in the Redis backend's layout; in
//! PostgreSQL in the tables of schema version 2 (`postgres/records.rs`,
//! `postgres/beat.rs`, `postgres/canvas.rs`).

use super::consume::Consumer;
use super::held::HeldLeases;
use crate::backend::postgres::{PgCanvas, PgRecords};
use crate::backend::redis::{RedisBackend, SystemClock};
#[cfg(feature = "beat")]
use crate::backend::traits::{Acquired, LeaderLock, LockLease};
use crate::backend::traits::{
    Backend as _, BackendError, Clock, Expiry, Leases, Outgoing, Reaped, ResultStore, Store,
    TaskStates, Use,
};
use crate::broker::{
    self, DeadLetter, Lane, PickedDeadLetter, RevokeOutcome, Settle, StartVerdict, Starting,
    WorkerRecord, on_lane,
};
use crate::canvas::store::{CanvasStore, RedisCanvas};
use crate::proto::keys::result_key;
use async_trait::async_trait;
use std::sync::Arc;
use std::time::Duration;

/// The store beside RabbitMQ.
#[derive(Debug, Clone)]
pub(crate) enum Records {
    Redis(Arc<RedisBackend>),
    Pg(PgRecords),
}

/// One session's access to [`Records`].
#[derive(Debug)]
pub(super) enum Side {
    Redis {
        redis: Arc<RedisBackend>,
        lane: Box<Lane>,
    },
    Pg(PgRecords),
}

impl Records {
    pub(super) fn side(&self, usage: Use) -> Side {
        match self {
            Self::Redis(redis) => {
                let pool = redis.broker().backend_pool();
                Side::Redis {
                    redis: Arc::clone(redis),
                    lane: Box::new(match usage {
                        Use::Loop => pool.lane(),
                        Use::Request => pool.shared_lane(),
                    }),
                }
            }
            Self::Pg(pg) => Side::Pg(pg.clone()),
        }
    }

    pub(super) fn clock(&self) -> Arc<dyn Clock> {
        match self {
            Self::Redis(redis) => redis.clock(),
            Self::Pg(_) => Arc::new(SystemClock),
        }
    }

    pub(super) fn namespace(&self) -> &str {
        match self {
            Self::Redis(redis) => redis.namespace(),
            Self::Pg(pg) => pg.namespace(),
        }
    }

    /// The Redis of Celery's canvas records, when the store is Redis.
    pub(super) fn redis(&self) -> Option<&broker::Broker> {
        match self {
            Self::Redis(redis) => Some(redis.broker()),
            Self::Pg(_) => None,
        }
    }

    pub(super) fn leases(&self, usage: Use, consumer: &Arc<Consumer>) -> Box<dyn Leases> {
        match self {
            Self::Redis(redis) => Box::new(HeldLeases {
                inner: redis.leases(usage),
                consumer: Arc::clone(consumer),
                // One short pipeline per heartbeat: the shared connection, so
                // the keeper holds no second connection of the pool.
                lane: redis.broker().backend_pool().shared_lane(),
                keys: redis.broker().keys().clone(),
            }),
            Self::Pg(pg) => Box::new(PgLeases {
                pg: pg.clone(),
                consumer: Arc::clone(consumer),
            }),
        }
    }

    pub(super) fn results(&self, usage: Use) -> Box<dyn ResultStore> {
        match self {
            Self::Redis(redis) => redis.results(usage),
            Self::Pg(pg) => pg.results(),
        }
    }

    pub(super) fn task_states(&self, usage: Use) -> Box<dyn TaskStates> {
        match self {
            Self::Redis(redis) => Box::new(States(redis.task_states(usage))),
            Self::Pg(pg) => pg.task_states(),
        }
    }

    #[cfg(feature = "beat")]
    pub(super) fn leader_lock(&self, usage: Use) -> Box<dyn LeaderLock> {
        match self {
            Self::Redis(redis) => redis.leader_lock(usage),
            Self::Pg(pg) => Box::new(PgLock(pg.clone())),
        }
    }

    /// The canvas's records: on the Redis, or in PostgreSQL.
    pub(super) fn canvas(&self) -> Option<Box<dyn CanvasStore>> {
        match self {
            Self::Redis(redis) => Some(Box::new(RedisCanvas::new(redis.broker()))),
            Self::Pg(pg) => Some(Box::new(PgCanvas(pg.clone()))),
        }
    }

    pub(super) fn expiry(&self) -> Option<Box<dyn Expiry>> {
        match self {
            Self::Redis(_) => None,
            Self::Pg(pg) => Some(pg.expiry()),
        }
    }

    pub(super) fn records_task_args(&self) -> bool {
        matches!(self, Self::Pg(_))
    }

    pub(super) async fn ping(&self) -> (Store, Result<Duration, BackendError>) {
        match self {
            Self::Redis(redis) => (Store::Redis, redis.inspect(Use::Request).ping().await),
            Self::Pg(pg) => (
                Store::PostgreSql,
                pg.ping().await.map_err(BackendError::from),
            ),
        }
    }
}

impl Side {
    /// PENDING records (before the messages are published, so a fast
    /// worker's STARTED record is never overwritten by one).
    pub(super) async fn store_pending(&mut self, batch: &[Outgoing]) -> Result<(), BackendError> {
        match self {
            Self::Redis { lane, .. } => {
                let mut records = redis::pipe();
                for p in batch.iter().filter_map(|o| o.pending.as_ref()) {
                    records
                        .cmd("SET")
                        .arg(result_key(&p.task_id))
                        .arg(&p.record)
                        .arg("PX")
                        .arg(millis(p.ttl))
                        .ignore();
                }
                if !records.is_empty() {
                    on_lane!(lane, "record pending task", |c| records
                        .query_async::<()>(c))?;
                }
                Ok(())
            }
            Self::Pg(pg) => Ok(pg.write_pending(batch).await?),
        }
    }

    /// The results of a settled batch, stored and announced to waiting
    /// clients before any of its messages is acknowledged.
    pub(super) async fn store_results(
        &mut self,
        batch: &[Settle],
        ttl: Duration,
    ) -> Result<(), BackendError> {
        match self {
            Self::Redis { lane, .. } => {
                let mut p = redis::pipe();
                for (task_id, json) in batch.iter().filter_map(|s| s.result.as_ref()) {
                    let key = result_key(task_id);
                    p.cmd("SET")
                        .arg(&key)
                        .arg(json)
                        .arg("PX")
                        .arg(millis(ttl))
                        .ignore()
                        .cmd("PUBLISH")
                        .arg(&key)
                        .arg(json)
                        .ignore();
                }
                if !p.is_empty() {
                    on_lane!(lane, "store results", |c| p.query_async::<()>(c))?;
                }
                Ok(())
            }
            Self::Pg(pg) => {
                let results: Vec<(&str, &str)> = batch
                    .iter()
                    .filter_map(|s| s.result.as_ref())
                    .map(|(id, json)| (id.as_str(), json.as_str()))
                    .collect();
                Ok(pg.write(&results, ttl).await?)
            }
        }
    }

    /// Stores a dead letter (then the caller acknowledges its message).
    pub(super) async fn store_dead(&mut self, record: &DeadLetter) -> Result<(), BackendError> {
        match self {
            Self::Redis { redis, lane } => {
                Ok(super::dead::store(lane, redis.broker().keys(), record).await?)
            }
            Self::Pg(pg) => Ok(pg.store_dead(record).await?),
        }
    }

    /// The records of every worker whose lease is live.
    pub(super) async fn live_workers(
        &mut self,
        usage: Use,
    ) -> Result<Vec<WorkerRecord>, BackendError> {
        match self {
            Self::Redis { redis, .. } => redis.inspect(usage).live_workers().await,
            Self::Pg(pg) => Ok(pg.live_workers().await?),
        }
    }

    /// For each of `queues`, in order: its dead letters and the messages
    /// live workers hold of it.
    pub(super) async fn counts(
        &mut self,
        usage: Use,
        queues: &[String],
    ) -> Result<(Vec<u64>, Vec<u64>), BackendError> {
        match self {
            Self::Redis { redis, lane } => {
                let workers = redis.inspect(usage).live_workers().await?;
                super::held::counts(lane, redis.broker().keys(), &workers, queues).await
            }
            Self::Pg(pg) => Ok(pg.counts(queues).await?),
        }
    }

    /// Up to `count` dead letters of `queue`, newest first, and the total.
    pub(super) async fn dead_page(
        &mut self,
        usage: Use,
        queue: &str,
        count: usize,
    ) -> Result<(Vec<DeadLetter>, u64), BackendError> {
        match self {
            Self::Redis { redis, .. } => redis.dead_letters(usage).page(queue, count).await,
            Self::Pg(pg) => Ok(pg.dead_page(queue, count).await?),
        }
    }

    /// The dead letters `selection` names, oldest first.
    pub(super) async fn dead_pick(
        &mut self,
        usage: Use,
        queue: &str,
        selection: &broker::DeadSelection,
    ) -> Result<Vec<PickedDeadLetter>, BackendError> {
        match self {
            Self::Redis { redis, .. } => redis.dead_letters(usage).pick(queue, selection).await,
            Self::Pg(pg) => Ok(pg.dead_pick(queue, selection).await?),
        }
    }

    /// Removes the picked dead letters still listed, atomically (two
    /// callers never both get one); returns those removed.
    pub(super) async fn dead_claim(
        &mut self,
        usage: Use,
        queue: &str,
        picked: &[PickedDeadLetter],
    ) -> Result<Vec<DeadLetter>, BackendError> {
        match self {
            Self::Redis { redis, .. } => {
                redis
                    .dead_letters(usage)
                    .apply(queue, broker::DeadLetterAction::Discard, picked)
                    .await
            }
            Self::Pg(pg) => Ok(pg.dead_claim(queue, picked).await?),
        }
    }
}

/// Task states by STARTED records: RabbitMQ holds the messages, so the
/// store cannot check a worker's holds (the worker id is not passed on).
struct States(Box<dyn TaskStates>);

#[async_trait]
impl TaskStates for States {
    async fn start_batch(
        &mut self,
        _worker_id: Option<&str>,
        tasks: &[Starting],
        ttl: Duration,
        _track_started: bool,
    ) -> Result<Vec<StartVerdict>, BackendError> {
        self.0.start_batch(None, tasks, ttl, true).await
    }

    async fn revoke(
        &mut self,
        task_id: &str,
        record: &str,
        ttl: Duration,
    ) -> Result<RevokeOutcome, BackendError> {
        self.0.revoke(task_id, record, ttl).await
    }
}

/// Worker records in PostgreSQL, with the worker's held counts in the same
/// row. Nothing to restore when a worker's lease expires: RabbitMQ
/// redelivers what a dead connection held.
struct PgLeases {
    pg: PgRecords,
    consumer: Arc<Consumer>,
}

#[async_trait]
impl Leases for PgLeases {
    async fn heartbeat(
        &mut self,
        record: &WorkerRecord,
        _landing_source: &str,
        lease: Duration,
    ) -> Result<bool, BackendError> {
        let held = self.consumer.held_by_queue();
        Ok(self.pg.heartbeat(record, &held, lease).await?)
    }

    async fn reap_expired(&mut self) -> Result<Reaped, BackendError> {
        Ok(Reaped {
            workers: self.pg.reap().await?,
            restored: 0,
        })
    }

    async fn release(&mut self, worker_id: &str) -> Result<u64, BackendError> {
        self.pg.forget_worker(worker_id).await?;
        Ok(0)
    }
}

/// The beat's leader lock in PostgreSQL.
#[cfg(feature = "beat")]
struct PgLock(PgRecords);

#[cfg(feature = "beat")]
#[async_trait]
impl LeaderLock for PgLock {
    async fn try_acquire(&mut self, value: &str, ttl: Duration) -> Result<Acquired, BackendError> {
        Ok(self.0.lock_acquire(value, ttl).await?)
    }
    async fn renew(&mut self, value: &str, ttl: Duration) -> Result<bool, BackendError> {
        Ok(self.0.lock_renew(value, ttl).await?)
    }
    async fn release(&mut self, value: &str) -> Result<bool, BackendError> {
        Ok(self.0.lock_release(value).await?)
    }
    async fn lease(&mut self) -> Result<Option<LockLease>, BackendError> {
        Ok(self.0.lock_lease().await?)
    }
    async fn announce(
        &mut self,
        instance_id: &str,
        record: &str,
        ttl: Duration,
    ) -> Result<(), BackendError> {
        Ok(self.0.announce(instance_id, record, ttl).await?)
    }
    async fn forget(&mut self, instance_id: &str) -> Result<(), BackendError> {
        Ok(self.0.forget_instance(instance_id).await?)
    }
    async fn instance(&mut self, instance_id: &str) -> Result<Option<String>, BackendError> {
        Ok(self.0.instance(instance_id).await?)
    }
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX).max(1)
}
