//! The PostgreSQL store for a broker that is not Redis (RabbitMQ with
//! `result_backend = "postgresql://..."`): results and task states by the
//! result row ([`RowStates`]), and taskstack's own records: the workers'
//! heartbeat records with the messages each holds by queue, and the dead
//! letters (the beat's in `beat.rs`, the canvas's in `canvas.rs`). Every
//! row of the records carries the configured `namespace`, as every Redis
//! key does, so two stacks can share one database.
//!
//! Expired worker rows are invisible at once (every read checks
//! `expires_at`) and deleted by the reaper ([`PgRecords::reap`]).

use super::PgSession;
use super::connect::{Connector, Handles, PgError};
use super::store::{self, client, millis, prepared, timed};
use crate::backend::traits::{BackendError, Expiry, ResultStore, TaskStates};
use crate::broker::{
    DeadLetter, DeadSelection, PickedDeadLetter, RevokeOutcome, StartVerdict, Starting,
    WorkerRecord,
};
use crate::config::PgTarget;
use async_trait::async_trait;
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

/// The records' tables on one pool, under one namespace.
#[derive(Debug, Clone)]
pub(crate) struct PgRecords {
    pub(super) pg: Handles,
    pub(super) namespace: String,
    /// The LISTEN connection result waiters share.
    pub(super) listener: super::listen::Slot,
}

fn json_err(op: &'static str, e: &serde_json::Error) -> PgError {
    PgError::op(op, e)
}

const HEARTBEAT: &str = "WITH before AS (
        SELECT expires_at > clock_timestamp() AS live FROM taskstack_workers
        WHERE namespace = $1 AND worker_id = $2)
    INSERT INTO taskstack_workers AS w (namespace, worker_id, record, held, expires_at)
    VALUES ($1, $2, $3, $4::text::jsonb,
            clock_timestamp() + $5::bigint * interval '1 millisecond')
    ON CONFLICT (namespace, worker_id) DO UPDATE SET
        record = EXCLUDED.record, held = EXCLUDED.held, expires_at = EXCLUDED.expires_at
    RETURNING NOT COALESCE((SELECT live FROM before), false)";

const LIVE_WORKERS: &str = "SELECT record FROM taskstack_workers
    WHERE namespace = $1 AND expires_at > clock_timestamp() ORDER BY worker_id";

/// Per queue of `$2`, in order: its dead letters, and what live workers
/// hold of it.
const COUNTS: &str = "SELECT
        (SELECT count(*) FROM taskstack_dead_letters d
         WHERE d.namespace = $1 AND d.queue = q.name),
        (SELECT COALESCE(sum((w.held ->> q.name)::bigint), 0)::bigint FROM taskstack_workers w
         WHERE w.namespace = $1 AND w.expires_at > clock_timestamp())
    FROM unnest($2::text[]) WITH ORDINALITY AS q(name, o) ORDER BY q.o";

impl PgRecords {
    /// The namespace every row of these records carries.
    pub(crate) fn namespace(&self) -> &str {
        &self.namespace
    }

    /// Stores `record` for `lease` from now with `held` (messages held by
    /// queue); `true` when the worker had no live row (first heartbeat,
    /// or after its row expired).
    pub(crate) async fn heartbeat(
        &self,
        record: &WorkerRecord,
        held: &[(String, u64)],
        lease: Duration,
    ) -> Result<bool, PgError> {
        let op = "worker heartbeat";
        let json = serde_json::to_string(record).map_err(|e| json_err(op, &e))?;
        let held: BTreeMap<&str, u64> = held.iter().map(|(q, n)| (q.as_str(), *n)).collect();
        let held = serde_json::to_string(&held).map_err(|e| json_err(op, &e))?;
        let ttl = millis(lease.max(Duration::from_secs(1)));
        timed(&self.pg, op, async {
            let client = client(&self.pg, op).await?;
            let stmt = prepared(&client, op, HEARTBEAT).await?;
            let row = client
                .query_one(&stmt, &[&self.namespace, &record.id, &json, &held, &ttl])
                .await
                .map_err(|e| PgError::op(op, &e))?;
            Ok(row.get(0))
        })
        .await
    }

    /// Deletes the rows of workers whose lease expired; how many.
    pub(crate) async fn reap(&self) -> Result<u64, PgError> {
        self.execute(
            "forget expired workers",
            "DELETE FROM taskstack_workers WHERE namespace = $1 AND expires_at <= clock_timestamp()",
            &[&self.namespace],
        )
        .await
    }

    /// Deletes `worker_id`'s row (a clean stop).
    pub(crate) async fn forget_worker(&self, worker_id: &str) -> Result<u64, PgError> {
        self.execute(
            "release worker",
            "DELETE FROM taskstack_workers WHERE namespace = $1 AND worker_id = $2",
            &[&self.namespace, &worker_id],
        )
        .await
    }

    /// The records of every worker whose lease is live.
    pub(crate) async fn live_workers(&self) -> Result<Vec<WorkerRecord>, PgError> {
        let op = "read worker records";
        let rows = self.query(op, LIVE_WORKERS, &[&self.namespace]).await?;
        // A row this build cannot read is skipped, as on Redis.
        Ok(rows
            .iter()
            .filter_map(|r| serde_json::from_str(r.get::<_, &str>(0)).ok())
            .collect())
    }

    /// For each of `queues`, in order: its dead letters and the messages
    /// live workers hold of it. One statement.
    pub(crate) async fn counts(&self, queues: &[String]) -> Result<(Vec<u64>, Vec<u64>), PgError> {
        if queues.is_empty() {
            return Ok((Vec::new(), Vec::new()));
        }
        let op = "count dead letters and held messages";
        let rows = self.query(op, COUNTS, &[&self.namespace, &queues]).await?;
        let n = |v: i64| u64::try_from(v).unwrap_or(0);
        Ok(rows.iter().map(|r| (n(r.get(0)), n(r.get(1)))).unzip())
    }

    /// Appends a dead letter to its queue's.
    pub(crate) async fn store_dead(&self, record: &DeadLetter) -> Result<(), PgError> {
        let op = "dead-letter";
        let json = serde_json::to_string(record).map_err(|e| json_err(op, &e))?;
        self.execute(
            op,
            "INSERT INTO taskstack_dead_letters (namespace, queue, record) VALUES ($1, $2, $3)",
            &[&self.namespace, &record.queue, &json],
        )
        .await
        .map(drop)
    }

    /// Up to `count` dead letters of `queue`, newest first, and how many
    /// there are, as one snapshot (one statement).
    pub(crate) async fn dead_page(
        &self,
        queue: &str,
        count: usize,
    ) -> Result<(Vec<DeadLetter>, u64), PgError> {
        let op = "list dead letters";
        let limit = i64::try_from(count).unwrap_or(i64::MAX);
        let rows = self
            .query(
                op,
                "SELECT (SELECT count(*) FROM taskstack_dead_letters
                         WHERE namespace = $1 AND queue = $2),
                        ARRAY(SELECT record FROM taskstack_dead_letters
                              WHERE namespace = $1 AND queue = $2 ORDER BY id DESC LIMIT $3)",
                &[&self.namespace, &queue, &limit],
            )
            .await?;
        let Some(row) = rows.first() else {
            return Ok((Vec::new(), 0));
        };
        let total: i64 = row.get(0);
        let records: Vec<String> = row.get(1);
        let letters = records
            .iter()
            .map(|r| serde_json::from_str(r).unwrap_or_else(|_| unreadable(queue, r)))
            .collect();
        Ok((letters, u64::try_from(total).unwrap_or(0)))
    }

    /// The dead letters `selection` names, oldest first; each one's `raw`
    /// is its row id.
    pub(crate) async fn dead_pick(
        &self,
        queue: &str,
        selection: &DeadSelection,
    ) -> Result<Vec<PickedDeadLetter>, PgError> {
        let op = "choose dead letters";
        let rows = match selection {
            DeadSelection::Oldest { limit } => {
                let limit = i64::try_from(*limit).unwrap_or(i64::MAX);
                self.query(
                    op,
                    "SELECT id, record FROM taskstack_dead_letters
                     WHERE namespace = $1 AND queue = $2 ORDER BY id LIMIT $3",
                    &[&self.namespace, &queue, &limit],
                )
                .await?
            }
            DeadSelection::TaskIds(ids) => {
                self.query(
                    op,
                    "SELECT id, record FROM taskstack_dead_letters
                     WHERE namespace = $1 AND queue = $2
                       AND (record::jsonb ->> 'task_id') = ANY($3) ORDER BY id",
                    &[&self.namespace, &queue, ids],
                )
                .await?
            }
        };
        Ok(rows
            .iter()
            .map(|r| {
                let (id, record): (i64, &str) = (r.get(0), r.get(1));
                PickedDeadLetter {
                    raw: id.to_string(),
                    record: serde_json::from_str(record)
                        .unwrap_or_else(|_| unreadable(queue, record)),
                }
            })
            .collect())
    }

    /// Deletes the picked dead letters still there, in one statement (two
    /// callers never both get one); returns those deleted, oldest first.
    pub(crate) async fn dead_claim(
        &self,
        queue: &str,
        picked: &[PickedDeadLetter],
    ) -> Result<Vec<DeadLetter>, PgError> {
        let ids: Vec<i64> = picked.iter().filter_map(|p| p.raw.parse().ok()).collect();
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        let op = "take dead letters";
        let rows = self
            .query(
                op,
                "WITH gone AS (DELETE FROM taskstack_dead_letters
                     WHERE namespace = $1 AND queue = $2 AND id = ANY($3) RETURNING id, record)
                 SELECT record FROM gone ORDER BY id",
                &[&self.namespace, &queue, &ids],
            )
            .await?;
        Ok(rows
            .iter()
            .map(|r| {
                let record: &str = r.get(0);
                serde_json::from_str(record).unwrap_or_else(|_| unreadable(queue, record))
            })
            .collect())
    }

    /// `sql` with `params` on a pooled connection (prepared, cached), in
    /// the store's deadline.
    pub(super) async fn query(
        &self,
        op: &'static str,
        sql: &str,
        params: &[&(dyn tokio_postgres::types::ToSql + Sync)],
    ) -> Result<Vec<tokio_postgres::Row>, PgError> {
        timed(&self.pg, op, async {
            let client = client(&self.pg, op).await?;
            let stmt = prepared(&client, op, sql).await?;
            client
                .query(&stmt, params)
                .await
                .map_err(|e| PgError::op(op, &e))
        })
        .await
    }

    pub(super) async fn execute(
        &self,
        op: &'static str,
        sql: &str,
        params: &[&(dyn tokio_postgres::types::ToSql + Sync)],
    ) -> Result<u64, PgError> {
        timed(&self.pg, op, async {
            let client = client(&self.pg, op).await?;
            let stmt = prepared(&client, op, sql).await?;
            client
                .execute(&stmt, params)
                .await
                .map_err(|e| PgError::op(op, &e))
        })
        .await
    }
}

impl PgRecords {
    /// The store at `target` with up to `pool_size` connections, its rows
    /// under `namespace`: results and taskstack's own records, for a
    /// broker that is not Redis. Connects lazily (run [`prepare`] first).
    pub(crate) fn open(
        target: &PgTarget,
        pool_size: usize,
        timeout: Duration,
        namespace: &str,
    ) -> Result<Self, PgError> {
        let connector = Connector::new(target, timeout)?;
        let pool = connector.pool(pool_size)?;
        Ok(Self {
            pg: Handles {
                pool,
                connector: Arc::new(connector),
            },
            namespace: namespace.to_owned(),
            listener: Arc::default(),
        })
    }

    /// Results, waiting and expiry on this pool.
    pub(crate) fn results(&self) -> Box<dyn ResultStore> {
        self.session()
    }

    /// Deletes expired results, then expired canvas markers and chords
    /// (worker and beat rows are deleted by the reaper and the beat).
    pub(crate) fn expiry(&self) -> Box<dyn Expiry> {
        Box::new(RecordsExpiry {
            results: self.session(),
            records: self.clone(),
        })
    }

    fn session(&self) -> Box<PgSession> {
        Box::new(PgSession {
            pg: self.pg.clone(),
            listener: Arc::clone(&self.listener),
        })
    }

    /// Stores `(task id, record)` pairs for `ttl`, announcing final ones.
    pub(crate) async fn write(
        &self,
        records: &[(&str, &str)],
        ttl: Duration,
    ) -> Result<(), PgError> {
        store::write(&self.pg, records, ttl).await
    }

    /// Stores the PENDING records `batch` carries.
    pub(crate) async fn write_pending(
        &self,
        batch: &[crate::backend::Outgoing],
    ) -> Result<(), PgError> {
        store::write_pending(&self.pg, batch).await
    }

    /// One round trip.
    pub(crate) async fn ping(&self) -> Result<Duration, PgError> {
        store::ping(&self.pg).await
    }

    /// Task states where no broker marks starts: the row is the mark.
    pub(crate) fn task_states(&self) -> Box<dyn TaskStates> {
        Box::new(RowStates {
            pg: self.pg.clone(),
        })
    }
}

/// [`PgRecords::expiry`]: the results' cleaner, then the canvas's rows
/// by the process whose turn it was (it held the results' advisory lock).
/// The count returned is the results' (what the worker's metric counts).
struct RecordsExpiry {
    results: Box<PgSession>,
    records: PgRecords,
}

#[async_trait]
impl Expiry for RecordsExpiry {
    async fn sweep(&mut self, max: usize) -> Result<Option<u64>, BackendError> {
        let Some(results) = self.results.sweep(max).await? else {
            return Ok(None);
        };
        let canvas = self.records.sweep_canvas(max).await?;
        if canvas > 0 {
            tracing::debug!(
                deleted = canvas,
                "deleted expired canvas markers and chords"
            );
        }
        Ok(Some(results))
    }
}

/// Starting and revoking where the result row is the only mark (a
/// RabbitMQ broker): a start writes the STARTED row unless the row says
/// revoked or finished (so a second delivery of a finished task is
/// acknowledged without running), in one upsert under the row's lock; a
/// revocation locks the row, checks it is not started or finished, and
/// stores REVOKED with the revoked flag. The two exclude each other
/// through the row lock.
struct RowStates {
    pg: Handles,
}

#[async_trait]
impl TaskStates for RowStates {
    async fn start_batch(
        &mut self,
        _worker_id: Option<&str>,
        tasks: &[Starting],
        ttl: Duration,
        _track_started: bool,
    ) -> Result<Vec<StartVerdict>, BackendError> {
        let rows: Vec<(&str, &str)> = tasks
            .iter()
            .map(|t| (t.task_id.as_str(), t.record.as_str()))
            .collect();
        Ok(store::start_once(&self.pg, &rows, ttl).await?)
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

/// A row whose record this build cannot read: listed with the text as its
/// reason, so it can still be seen and discarded.
fn unreadable(queue: &str, raw: &str) -> DeadLetter {
    DeadLetter {
        reason: format!("unreadable dead-letter record: {raw}"),
        queue: queue.to_owned(),
        queue_key: queue.to_owned(),
        task_id: None,
        task: None,
        payload: String::new(),
        payload_base64: None,
        payload_key: None,
        payload_size: None,
        worker: String::new(),
        at: String::new(),
    }
}
