//! The PostgreSQL result store: messages, leases and the delayed set stay
//! on the Redis broker ([`RedisBackend`]); result records, the STARTED
//! step and revocations live in one PostgreSQL table (see ARCHITECTURE.md,
//! "PostgreSQL result store").
//!
//! The guarantees are the Redis store's: a settlement commits its batch's
//! results in one statement before the holds are released on Redis (so
//! nothing is acknowledged without its result); the STARTED record and the
//! revocation check are one conditional upsert, serialized with a revoke's
//! row lock; writes are upserts, so a redelivered task overwrites its own
//! row; waiters are woken by `LISTEN`/`NOTIFY`; expired rows are invisible
//! at once and deleted in bounded batches by one cleaner at a time.

mod connect;
mod listen;
mod schema;
mod store;
mod tls;

pub use connect::{PgError, prepare};

use super::RedisBackend;
use super::traits::{
    Backend, BackendError, Clock, Consume, DeadLetters, Delayed, Enqueue, Expiry, Inspect, Leases,
    Outgoing, ResultStore, TaskStates, Use,
};
#[cfg(feature = "beat")]
use super::traits::{LeaderLock, SlotLedger};
use crate::broker::{
    self, Broker, DeadLetter, Delivery, Lane, RevokeOutcome, Settle, StartVerdict, Starting,
};
use crate::config::PgTarget;
use crate::proto::TaskResult;
use async_trait::async_trait;
use connect::{Connector, Handles};
use std::sync::Arc;
use std::time::Duration;

/// Messages on Redis, results in PostgreSQL. Clones share the pool and the
/// LISTEN connection.
#[derive(Debug, Clone)]
pub struct PostgresBackend {
    redis: RedisBackend,
    pg: Handles,
    listener: listen::Slot,
}

impl PostgresBackend {
    /// A backend over `broker` keeping results at `target`, with up to
    /// `pool_size` connections; `timeout` bounds connecting and each
    /// statement. Connects lazily: run [`prepare`] at start-up first, so the
    /// schema exists and bad credentials are reported.
    pub fn new(
        broker: Broker,
        target: &PgTarget,
        pool_size: usize,
        timeout: Duration,
    ) -> Result<Self, PgError> {
        let connector = Connector::new(target, timeout)?;
        let pool = connector.pool(pool_size)?;
        Ok(Self {
            redis: RedisBackend::new(broker),
            pg: Handles {
                pool,
                connector: Arc::new(connector),
            },
            listener: Arc::default(),
        })
    }

    fn session(&self) -> Box<PgSession> {
        Box::new(PgSession {
            pg: self.pg.clone(),
            listener: Arc::clone(&self.listener),
        })
    }
}

#[async_trait]
impl Backend for PostgresBackend {
    fn clock(&self) -> Arc<dyn Clock> {
        self.redis.clock()
    }
    fn namespace(&self) -> &str {
        self.redis.namespace()
    }
    fn redis(&self) -> Option<&Broker> {
        // Remote control, events and Celery's chord counters stay on Redis
        // (the broker's server): the chord's parts carry their own results.
        self.redis.redis()
    }
    fn enqueue(&self, usage: Use) -> Box<dyn Enqueue> {
        Box::new(PgEnqueue {
            pg: self.pg.clone(),
            redis: self.redis.enqueue(usage),
        })
    }
    fn consume(&self, worker_id: &str) -> Box<dyn Consume> {
        Box::new(PgConsume {
            pg: self.pg.clone(),
            redis: self.redis.consume(worker_id),
        })
    }
    fn leases(&self, usage: Use) -> Box<dyn Leases> {
        self.redis.leases(usage)
    }
    fn delayed(&self, usage: Use) -> Box<dyn Delayed> {
        self.redis.delayed(usage)
    }
    fn results(&self, _usage: Use) -> Box<dyn ResultStore> {
        self.session()
    }
    fn task_states(&self, usage: Use) -> Box<dyn TaskStates> {
        let broker = self.redis.broker();
        let lane = match usage {
            Use::Loop => broker.broker_pool().lane(),
            Use::Request => broker.broker_pool().shared_lane(),
        };
        Box::new(PgTaskStates {
            pg: self.pg.clone(),
            broker: broker.clone(),
            lane,
        })
    }
    fn dead_letters(&self, usage: Use) -> Box<dyn DeadLetters> {
        self.redis.dead_letters(usage)
    }
    fn inspect(&self, usage: Use) -> Box<dyn Inspect> {
        self.redis.inspect(usage)
    }
    #[cfg(feature = "beat")]
    fn leader_lock(&self, usage: Use) -> Box<dyn LeaderLock> {
        self.redis.leader_lock(usage)
    }
    #[cfg(feature = "beat")]
    fn slot_ledger(&self, usage: Use) -> Box<dyn SlotLedger> {
        self.redis.slot_ledger(usage)
    }
    fn expiry(&self) -> Option<Box<dyn Expiry>> {
        Some(self.session())
    }
    fn records_task_args(&self) -> bool {
        true
    }
    async fn result_store_ping(&self) -> Option<Result<Duration, BackendError>> {
        Some(store::ping(&self.pg).await.map_err(BackendError::from))
    }
}

/// Results, waiting and expiry on the pool.
#[derive(Debug)]
struct PgSession {
    pg: Handles,
    listener: listen::Slot,
}

fn json_of(results: &[TaskResult]) -> Result<Vec<(&str, String)>, BackendError> {
    results
        .iter()
        .map(|r| {
            serde_json::to_string(r)
                .map(|j| (r.task_id.as_str(), j))
                .map_err(|e| BackendError::Invalid {
                    op: "store results",
                    detail: e.to_string(),
                })
        })
        .collect()
}

#[async_trait]
impl ResultStore for PgSession {
    async fn write(&mut self, results: &[TaskResult], ttl: Duration) -> Result<(), BackendError> {
        let owned = json_of(results)?;
        let pairs: Vec<(&str, &str)> = owned.iter().map(|(id, j)| (*id, j.as_str())).collect();
        Ok(store::write(&self.pg, &pairs, ttl).await?)
    }

    async fn read(&mut self, task_id: &str) -> Result<Option<TaskResult>, BackendError> {
        Ok(store::read(&self.pg, task_id).await?)
    }

    async fn wait(
        &mut self,
        task_id: &str,
        timeout: Duration,
    ) -> Result<Option<TaskResult>, BackendError> {
        Ok(listen::wait_ready(&self.listener, &self.pg, task_id, timeout).await?)
    }
}

#[async_trait]
impl Expiry for PgSession {
    async fn sweep(&mut self, max: usize) -> Result<Option<u64>, BackendError> {
        Ok(store::sweep(&self.pg, max).await?)
    }
}

/// PENDING records in PostgreSQL first, then the messages on Redis.
struct PgEnqueue {
    pg: Handles,
    redis: Box<dyn Enqueue>,
}

#[async_trait]
impl Enqueue for PgEnqueue {
    async fn enqueue(&mut self, batch: &[Outgoing]) -> Result<(), BackendError> {
        let pending: Vec<(&str, &str, Duration)> = batch
            .iter()
            .filter_map(|o| o.pending.as_ref())
            .map(|p| (p.task_id.as_str(), p.record.as_str(), p.ttl))
            .collect();
        if pending.is_empty() {
            return self.redis.enqueue(batch).await;
        }
        // One statement per distinct TTL (a batch from one producer has one).
        let mut ttls: Vec<Duration> = pending.iter().map(|p| p.2).collect();
        ttls.sort_unstable();
        ttls.dedup();
        for ttl in ttls {
            let same: Vec<(&str, &str)> = pending
                .iter()
                .filter(|p| p.2 == ttl)
                .map(|p| (p.0, p.1))
                .collect();
            store::write(&self.pg, &same, ttl).await?;
        }
        let messages: Vec<Outgoing> = batch
            .iter()
            .map(|o| Outgoing {
                pending: None,
                ..o.clone()
            })
            .collect();
        self.redis.enqueue(&messages).await
    }
}

/// Taking messages on Redis; settling commits the results in PostgreSQL
/// before the holds are released.
struct PgConsume {
    pg: Handles,
    redis: Box<dyn Consume>,
}

#[async_trait]
impl Consume for PgConsume {
    fn worker_id(&self) -> &str {
        self.redis.worker_id()
    }

    async fn take(
        &mut self,
        queue_keys: &[String],
        max: usize,
        lease: Duration,
        max_size: usize,
    ) -> Result<Vec<Delivery>, BackendError> {
        self.redis.take(queue_keys, max, lease, max_size).await
    }

    async fn wait_for_message(
        &mut self,
        queue_keys: &[String],
        wait: Duration,
    ) -> Result<bool, BackendError> {
        self.redis.wait_for_message(queue_keys, wait).await
    }

    async fn settle(&mut self, batch: &[Settle], result_ttl: Duration) -> Result<(), BackendError> {
        let results: Vec<(&str, &str)> = batch
            .iter()
            .filter_map(|s| s.result.as_ref())
            .map(|(id, json)| (id.as_str(), json.as_str()))
            .collect();
        // Committed first: a failure here leaves every hold in place.
        store::write(&self.pg, &results, result_ttl).await?;
        let acks: Vec<Settle> = batch
            .iter()
            .map(|s| Settle {
                seq: s.seq,
                result: None,
                started: None,
            })
            .collect();
        self.redis.settle(&acks, result_ttl).await
    }

    async fn hand_back(&mut self, seqs: &[u64]) -> Result<usize, BackendError> {
        self.redis.hand_back(seqs).await
    }

    async fn park_held(
        &mut self,
        seq: u64,
        queue_key: &str,
        payload: &[u8],
        due_ms: i64,
    ) -> Result<(), BackendError> {
        self.redis.park_held(seq, queue_key, payload, due_ms).await
    }

    async fn dead_letter(&mut self, seq: u64, record: &DeadLetter) -> Result<(), BackendError> {
        self.redis.dead_letter(seq, record).await
    }
}

/// The start step and revocations in PostgreSQL; the holds checked on
/// Redis first (as the Redis store does when results live elsewhere).
struct PgTaskStates {
    pg: Handles,
    broker: Broker,
    lane: Lane,
}

#[async_trait]
impl TaskStates for PgTaskStates {
    async fn start_batch(
        &mut self,
        worker_id: Option<&str>,
        tasks: &[Starting],
        ttl: Duration,
        // Starts are marked by their STARTED rows here: always stored.
        _track_started: bool,
    ) -> Result<Vec<StartVerdict>, BackendError> {
        let holds = match worker_id {
            Some(w) => {
                let seqs: Vec<u64> = tasks.iter().map(|t| t.seq).collect();
                broker::held(&mut self.lane, self.broker.keys(), w, &seqs).await?
            }
            None => vec![true; tasks.len()],
        };
        let held: Vec<(&str, &str)> = tasks
            .iter()
            .zip(&holds)
            .filter(|(_, h)| **h)
            .map(|(t, _)| (t.task_id.as_str(), t.record.as_str()))
            .collect();
        let mut started = store::start(&self.pg, &held, ttl).await?.into_iter();
        Ok(holds
            .into_iter()
            .map(|h| {
                if !h {
                    StartVerdict::NotHeld
                } else if started.next() == Some(true) {
                    StartVerdict::Run
                } else {
                    StartVerdict::Revoked
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
        Ok(store::revoke(&self.pg, task_id, record, ttl).await?)
    }
}

#[cfg(test)]
mod tests;
