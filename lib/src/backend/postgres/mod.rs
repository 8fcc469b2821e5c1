//! The PostgreSQL result store: messages, leases and the delayed set stay
//! on the Redis broker ([`RedisBackend`]), and so do the marks that keep a
//! start and a revocation apart; result records (PENDING, STARTED with
//! `task_track_started`, REVOKED, the outcomes) live in one PostgreSQL table
//! (see ARCHITECTURE.md, "PostgreSQL result store").
//!
//! The guarantees are the Redis store's: a settlement commits its batch's
//! results in one statement before the holds are released on Redis (so
//! nothing is acknowledged without its result); a worker's start and a
//! revocation exclude each other on the broker's Redis, as with results
//! there (the worker's running marks and the revoked markers, see
//! `PgTaskStates`), so a batch's start costs no PostgreSQL commit; writes
//! are upserts, so a redelivered task overwrites its own row; waiters are
//! woken by `LISTEN`/`NOTIFY`; expired rows are invisible at once and
//! deleted in bounded batches by one cleaner at a time.

// The records of a RabbitMQ broker without Redis.
#[cfg(all(feature = "amqp", feature = "beat"))]
mod beat;
#[cfg(feature = "amqp")]
mod canvas;
mod connect;
mod listen;
#[cfg(feature = "amqp")]
mod records;
mod schema;
mod store;
mod tls;

#[cfg(feature = "amqp")]
pub(crate) use canvas::PgCanvas;
pub use connect::{PgError, prepare};
#[cfg(feature = "amqp")]
pub(crate) use records::PgRecords;

use super::RedisBackend;
use super::traits::{
    Backend, BackendError, Clock, Consume, DeadLetters, Delayed, Enqueue, Expiry, Inspect, Leases,
    Outgoing, ResultStore, Store, TaskStates, Use,
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
    fn marks_starts(&self) -> bool {
        // On the broker's Redis, in the worker's running hash (see
        // `PgTaskStates`).
        true
    }
    fn expiry(&self) -> Option<Box<dyn Expiry>> {
        Some(self.session())
    }
    fn records_task_args(&self) -> bool {
        true
    }
    async fn pings(&self) -> Vec<(Store, Result<Duration, BackendError>)> {
        let mut redis = self.redis.inspect(Use::Request);
        let (redis, pg) = tokio::join!(redis.ping(), store::ping(&self.pg));
        vec![
            (Store::Redis, redis),
            (Store::PostgreSql, pg.map_err(BackendError::from)),
        ]
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
        if batch.iter().all(|o| o.pending.is_none()) {
            return self.redis.enqueue(batch).await;
        }
        store::write_pending(&self.pg, batch).await?;
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
                // The start marks go with the holds.
                started: s.started.clone(),
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
        started: Option<&str>,
    ) -> Result<(), BackendError> {
        self.redis
            .park_held(seq, queue_key, payload, due_ms, started)
            .await
    }

    async fn dead_letter(&mut self, seq: u64, record: &DeadLetter) -> Result<(), BackendError> {
        self.redis.dead_letter(seq, record).await
    }
}

/// Starting and revoking. With a worker the exclusion lives on the
/// broker's Redis, as with results there: `scripts/start.lua` checks the
/// holds and the revoked markers and marks the batch started in the
/// worker's running hash (one round trip, no PostgreSQL commit per batch),
/// and a revocation sets the revoked marker through `scripts/revoke.lua`
/// (refused while a mark says the task runs) before it stores the REVOKED
/// row. STARTED rows are written only with `task_track_started`. Without a
/// worker (a caller that checked the holds itself) the STARTED row is the
/// mark, written unless the row is revoked; a revocation's locked check of
/// the row refuses once it is there.
struct PgTaskStates {
    pg: Handles,
    broker: Broker,
    lane: Lane,
}

/// The REVOKED record stored for a task a worker skipped because the
/// broker marks it revoked (see [`store::record_revoked`]).
fn revoked_record(task_id: &str) -> Result<String, BackendError> {
    use crate::proto::{ExceptionInfo, Provenance, TaskState};
    let exc = ExceptionInfo::celery("TaskRevokedError", "revoked");
    let from = Provenance {
        name: "",
        worker: "",
        retries: 0,
        queue: "",
        parent_id: None,
    };
    let record = TaskResult::new(task_id, TaskState::Revoked, exc.to_value(), from);
    serde_json::to_string(&record).map_err(|e| BackendError::Invalid {
        op: "record revoked tasks",
        detail: e.to_string(),
    })
}

impl PgTaskStates {
    /// The start step without a worker: STARTED rows, except over a
    /// revoked row.
    async fn start_rows(
        &self,
        tasks: &[Starting],
        ttl: Duration,
    ) -> Result<Vec<StartVerdict>, BackendError> {
        let rows: Vec<(&str, &str)> = tasks
            .iter()
            .map(|t| (t.task_id.as_str(), t.record.as_str()))
            .collect();
        let started = store::start(&self.pg, &rows, ttl).await?;
        Ok(started
            .into_iter()
            .map(|s| {
                if s {
                    StartVerdict::Run
                } else {
                    StartVerdict::Revoked
                }
            })
            .collect())
    }
}

#[async_trait]
impl TaskStates for PgTaskStates {
    async fn start_batch(
        &mut self,
        worker_id: Option<&str>,
        tasks: &[Starting],
        ttl: Duration,
        track_started: bool,
    ) -> Result<Vec<StartVerdict>, BackendError> {
        let Some(worker) = worker_id else {
            return self.start_rows(tasks, ttl).await;
        };
        let keys = self.broker.keys();
        // `false`: start.lua writes no STARTED record on Redis (results
        // are not there); the running marks are the exclusion.
        let mut verdicts =
            broker::start_batch(&mut self.lane, keys, Some(worker), tasks, ttl, false).await?;
        if track_started {
            let run: Vec<(usize, &Starting)> = tasks
                .iter()
                .enumerate()
                .filter(|(i, _)| verdicts[*i] == StartVerdict::Run)
                .collect();
            let rows: Vec<(&str, &str)> = run
                .iter()
                .map(|(_, t)| (t.task_id.as_str(), t.record.as_str()))
                .collect();
            // Guarded by the row's revoked flag too: a row revoked by an
            // older version (no marker on Redis) is not started. The mark
            // on Redis then goes with the settlement.
            let started = store::start(&self.pg, &rows, ttl).await?;
            for ((i, _), s) in run.iter().zip(started) {
                if !s {
                    verdicts[*i] = StartVerdict::Revoked;
                }
            }
        }
        // Skipped as revoked: make sure the row says so (a revocation that
        // set the marker and then failed before its row, or Celery's remote
        // control). Only batches with such tasks pay for it.
        let skipped: Vec<(&str, String)> = tasks
            .iter()
            .zip(&verdicts)
            .filter(|(_, v)| **v == StartVerdict::Revoked)
            .map(|(t, _)| Ok((t.task_id.as_str(), revoked_record(&t.task_id)?)))
            .collect::<Result<_, BackendError>>()?;
        if !skipped.is_empty() {
            let rows: Vec<(&str, &str)> = skipped.iter().map(|(i, r)| (*i, r.as_str())).collect();
            store::record_revoked(&self.pg, &rows, ttl).await?;
        }
        Ok(verdicts)
    }

    /// The row's state is checked first (unknown, revoked before, started
    /// with a STARTED row, or finished: answered without touching Redis);
    /// then the broker's marker is set, in one step with the workers'
    /// start marks (refused while the task runs); then the REVOKED row is
    /// stored under the row's lock, unless it moved on meanwhile. A crash
    /// after the marker and before the row leaves the task revoked on the
    /// broker (no worker starts it): a repeated revocation stores the row,
    /// and so does the first worker that takes the message and skips it.
    async fn revoke(
        &mut self,
        task_id: &str,
        record: &str,
        ttl: Duration,
    ) -> Result<RevokeOutcome, BackendError> {
        let keys = self.broker.keys();
        let left_ms = match store::revocable(&self.pg, task_id).await? {
            Ok(ms) => ms,
            Err(RevokeOutcome::AlreadyRevoked) => {
                // The marker again (harmless when set): a row revoked by a
                // build that kept the exclusion in PostgreSQL has none, and
                // a queued task must not start on a worker of this one.
                broker::mark_revoked(&mut self.lane, keys, task_id, ttl).await?;
                return Ok(RevokeOutcome::AlreadyRevoked);
            }
            Err(answer) => return Ok(answer),
        };
        let keep = ttl.max(Duration::from_millis(u64::try_from(left_ms).unwrap_or(0)));
        if !broker::mark_revoked(&mut self.lane, keys, task_id, keep).await? {
            return Ok(RevokeOutcome::Refused(crate::proto::TaskState::Started));
        }
        Ok(store::revoke(&self.pg, task_id, record, ttl).await?)
    }
}

#[cfg(test)]
mod start_tests;
#[cfg(test)]
mod tests;
