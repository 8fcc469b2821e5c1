//! The SQL of the result store. Every batch is one statement (one round
//! trip on a prepared statement): a multi-row upsert that is its own
//! transaction, so a batch's results are committed together or not at all.
//! Records cross as JSON text and are taken apart into columns by
//! PostgreSQL; reads put them back together in Celery's layout.

use super::connect::{Handles, PgError, pool_error};
use super::schema::{CHANNEL, EXPIRE_LOCK};
use crate::broker::RevokeOutcome;
use crate::proto::{TaskResult, TaskState};
use std::time::Duration;

/// States a waiter waits for; only these are announced with NOTIFY.
const FINAL: &str = "('SUCCESS', 'FAILURE', 'REVOKED')";

/// Celery keeps an exception in `result`; here it goes to `error` for
/// these states, and reads put it back.
const ERROR_STATES: &str = "('FAILURE', 'RETRY', 'REVOKED')";

/// Longest args / kwargs kept (bytes of JSON); longer ones are left out
/// (the worker leaves them out of its records already; this holds for any
/// writer).
const ARGS_BOUND: usize = crate::proto::ARGS_BOUND;

/// The upsert of a batch: `$1` task ids, `$2` their records (a JSON array
/// as text, in the same order), `$3` expiry in ms. Of two records of one
/// task in a batch the later wins. `guard` ends the `ON CONFLICT` update
/// (the start step's revocation check); `tail` is the final SELECT over
/// `up`, the upserted `(task_id, state)` rows.
fn upsert(guard: &str, tail: &str) -> String {
    format!(
        "WITH input AS (
            SELECT DISTINCT ON (id) id, r, r->>'status' AS state
            FROM (SELECT ($1::text[])[o] AS id, r, o
                  FROM jsonb_array_elements($2::text::jsonb) WITH ORDINALITY AS e(r, o)) s
            ORDER BY id, o DESC
        ), up AS (
            INSERT INTO taskstack_results AS t
                (task_id, state, result, error, traceback, task_name, args, kwargs, worker,
                 retries, queue, parent_id, group_id, children, date_started, date_done,
                 expires_at)
            SELECT id, state,
                CASE WHEN state IN {ERROR_STATES} THEN NULL ELSE r->'result' END,
                CASE WHEN state IN {ERROR_STATES} THEN r->'result' END,
                r->>'traceback', r->>'name',
                CASE WHEN octet_length((r->'args')::text) <= {ARGS_BOUND} THEN r->'args' END,
                CASE WHEN octet_length((r->'kwargs')::text) <= {ARGS_BOUND} THEN r->'kwargs' END,
                r->>'worker', (r->>'retries')::integer, r->>'queue', r->>'parent_id',
                r->>'group_id', COALESCE(r->'children', '[]'::jsonb),
                (r->>'date_started')::timestamptz, (r->>'date_done')::timestamptz,
                now() + $3::bigint * interval '1 millisecond'
            FROM input
            ON CONFLICT (task_id) DO UPDATE SET
                state = EXCLUDED.state, result = EXCLUDED.result, error = EXCLUDED.error,
                traceback = EXCLUDED.traceback, task_name = EXCLUDED.task_name,
                args = COALESCE(EXCLUDED.args, t.args),
                kwargs = COALESCE(EXCLUDED.kwargs, t.kwargs), worker = EXCLUDED.worker,
                retries = EXCLUDED.retries, queue = EXCLUDED.queue,
                parent_id = EXCLUDED.parent_id, group_id = EXCLUDED.group_id,
                children = EXCLUDED.children, date_started = EXCLUDED.date_started,
                date_done = EXCLUDED.date_done, expires_at = EXCLUDED.expires_at
                {guard}
            RETURNING task_id, state
        )
        {tail}"
    )
}

/// Stores records and announces the final ones (on commit).
fn write_sql() -> String {
    upsert(
        "",
        &format!("SELECT pg_notify('{CHANNEL}', task_id) FROM up WHERE state IN {FINAL}"),
    )
}

/// Stores STARTED records except over a live revocation; returns the
/// started ids. The row lock of `ON CONFLICT` makes the check and the write
/// one step against [`revoke`]'s `SELECT ... FOR UPDATE`.
fn start_sql() -> String {
    upsert(
        ", revoked = false WHERE NOT (t.revoked AND t.expires_at > now())",
        "SELECT task_id FROM up",
    )
}

#[cfg(feature = "amqp")]
/// [`start_sql`] that also leaves a final row alone: where nothing else
/// keeps a second delivery of a finished task from running (RabbitMQ
/// redelivers what a worker did not acknowledge), the row is the check.
fn start_once_sql() -> String {
    upsert(
        &format!(
            ", revoked = false WHERE NOT (t.expires_at > now() \
             AND (t.revoked OR t.state IN {FINAL}))"
        ),
        "SELECT task_id FROM up",
    )
}

/// Stores REVOKED records for tasks a worker skipped because the broker
/// marks them revoked, where the row does not say so yet: the revocation
/// was accepted on Redis but its own row write never happened (a crash in
/// between), or it came from Celery's remote control. A row that has moved
/// on (started, finished) keeps its record; a missing or expired one gets
/// the REVOKED record.
fn revoked_sql() -> String {
    upsert(
        &format!(
            ", revoked = true WHERE t.expires_at <= now() \
             OR (t.state IN {REVOCABLE} AND NOT t.revoked)"
        ),
        &format!("SELECT pg_notify('{CHANNEL}', task_id) FROM up WHERE state IN {FINAL}"),
    )
}

/// States a revocation may still replace.
const REVOCABLE: &str = "('PENDING', 'RECEIVED', 'RETRY')";

const DATE: &str = "'YYYY-MM-DD\"T\"HH24:MI:SS.US\"+00:00\"'";

fn read_sql() -> String {
    format!(
        "SELECT jsonb_build_object(
            'status', state, 'result', COALESCE(error, result), 'traceback', traceback,
            'children', children,
            'date_done', to_char(date_done AT TIME ZONE 'UTC', {DATE}),
            'task_id', task_id, 'name', task_name, 'args', args, 'kwargs', kwargs,
            'worker', worker, 'retries', retries,
            'queue', queue, 'parent_id', parent_id, 'group_id', group_id,
            'date_started', to_char(date_started AT TIME ZONE 'UTC', {DATE}))::text
        FROM taskstack_results WHERE task_id = $1 AND expires_at > now()"
    )
}

pub(super) fn millis(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX).max(1)
}

/// `(ids, records as one JSON array)` of a batch.
fn batch<'a>(items: impl Iterator<Item = (&'a str, &'a str)>) -> (Vec<&'a str>, String) {
    let mut ids = Vec::new();
    let mut json = String::from("[");
    for (id, record) in items {
        if !ids.is_empty() {
            json.push(',');
        }
        ids.push(id);
        json.push_str(record);
    }
    json.push(']');
    (ids, json)
}

/// Runs `f` within the store's deadline: a server that stops answering
/// fails the operation instead of hanging it.
pub(super) async fn timed<T>(
    pg: &Handles,
    op: &'static str,
    f: impl Future<Output = Result<T, PgError>>,
) -> Result<T, PgError> {
    // Pool wait + a connection + the statement, each bounded by `timeout`.
    let deadline = pg.connector.timeout * 3;
    match tokio::time::timeout(deadline, f).await {
        Ok(r) => r,
        Err(_) => Err(PgError::Op {
            op,
            detail: format!("no answer within {deadline:?}"),
        }),
    }
}

/// Stores `(task id, record JSON)` pairs, each kept `ttl`, in one statement.
pub(crate) async fn write(
    pg: &Handles,
    records: &[(&str, &str)],
    ttl: Duration,
) -> Result<(), PgError> {
    run_records(pg, "store results", &write_sql(), records, ttl).await
}

/// Stores the PENDING records `batch` carries, one statement per distinct
/// TTL (a producer's batch has one).
pub(crate) async fn write_pending(
    pg: &Handles,
    batch: &[crate::backend::Outgoing],
) -> Result<(), PgError> {
    let mut ttls: Vec<Duration> = batch
        .iter()
        .filter_map(|o| o.pending.as_ref().map(|p| p.ttl))
        .collect();
    ttls.sort_unstable();
    ttls.dedup();
    for ttl in ttls {
        let same: Vec<(&str, &str)> = batch
            .iter()
            .filter_map(|o| o.pending.as_ref())
            .filter(|p| p.ttl == ttl)
            .map(|p| (p.task_id.as_str(), p.record.as_str()))
            .collect();
        write(pg, &same, ttl).await?;
    }
    Ok(())
}

/// Runs `sql` (`$1` ids, `$2` records, `$3` ttl in ms) for `records` in
/// one statement; nothing when there are none.
async fn run_records(
    pg: &Handles,
    op: &'static str,
    sql: &str,
    records: &[(&str, &str)],
    ttl: Duration,
) -> Result<(), PgError> {
    if records.is_empty() {
        return Ok(());
    }
    let (ids, json) = batch(records.iter().copied());
    timed(pg, op, async {
        let client = client(pg, op).await?;
        let stmt = prepared(&client, op, sql).await?;
        client
            .execute(&stmt, &[&ids, &json, &millis(ttl)])
            .await
            .map_err(|e| PgError::op(op, &e))?;
        Ok(())
    })
    .await
}

/// A pooled connection for `op`.
pub(super) async fn client(
    pg: &Handles,
    op: &'static str,
) -> Result<deadpool_postgres::Client, PgError> {
    pg.pool
        .get()
        .await
        .map_err(|e| pool_error(op, &pg.connector.user, e))
}

/// `sql` prepared on `client` (cached per connection).
pub(super) async fn prepared(
    client: &deadpool_postgres::Client,
    op: &'static str,
    sql: &str,
) -> Result<tokio_postgres::Statement, PgError> {
    client
        .prepare_cached(sql)
        .await
        .map_err(|e| PgError::op(op, &e))
}

/// A task's live record.
pub(crate) async fn read(pg: &Handles, task_id: &str) -> Result<Option<TaskResult>, PgError> {
    let op = "read result";
    let raw: Option<String> = timed(pg, op, async {
        let client = client(pg, op).await?;
        let stmt = prepared(&client, op, &read_sql()).await?;
        let row = client
            .query_opt(&stmt, &[&task_id])
            .await
            .map_err(|e| PgError::op(op, &e))?;
        Ok(row.map(|r| r.get(0)))
    })
    .await?;
    raw.map(|s| {
        serde_json::from_str(&s).map_err(|e| PgError::Op {
            op,
            detail: format!("stored row is not a result record: {e}"),
        })
    })
    .transpose()
}

/// Records `(task id, STARTED record)` pairs unless revoked; returns, per
/// pair, whether it was started.
pub(crate) async fn start(
    pg: &Handles,
    tasks: &[(&str, &str)],
    ttl: Duration,
) -> Result<Vec<bool>, PgError> {
    if tasks.is_empty() {
        return Ok(Vec::new());
    }
    let op = "start tasks";
    let (ids, json) = batch(tasks.iter().copied());
    let started: Vec<String> = timed(pg, op, async {
        let client = client(pg, op).await?;
        let stmt = prepared(&client, op, &start_sql()).await?;
        let rows = client
            .query(&stmt, &[&ids, &json, &millis(ttl)])
            .await
            .map_err(|e| PgError::op(op, &e))?;
        Ok(rows.iter().map(|r| r.get(0)).collect())
    })
    .await?;
    let started: std::collections::HashSet<&str> = started.iter().map(String::as_str).collect();
    Ok(tasks.iter().map(|(id, _)| started.contains(id)).collect())
}

#[cfg(feature = "amqp")]
/// Records `(task id, STARTED record)` pairs unless revoked or final;
/// returns, per pair, whether it was started, else whether its row says
/// revoked (`Revoked`) or finished (`Finished`).
pub(crate) async fn start_once(
    pg: &Handles,
    tasks: &[(&str, &str)],
    ttl: Duration,
) -> Result<Vec<crate::broker::StartVerdict>, PgError> {
    use crate::broker::StartVerdict;
    if tasks.is_empty() {
        return Ok(Vec::new());
    }
    let op = "start tasks";
    let (ids, json) = batch(tasks.iter().copied());
    timed(pg, op, async {
        let client = client(pg, op).await?;
        let stmt = prepared(&client, op, &start_once_sql()).await?;
        let rows = client
            .query(&stmt, &[&ids, &json, &millis(ttl)])
            .await
            .map_err(|e| PgError::op(op, &e))?;
        let started: std::collections::HashSet<String> = rows.iter().map(|r| r.get(0)).collect();
        let refused: Vec<&str> = ids
            .iter()
            .copied()
            .filter(|id| !started.contains(*id))
            .collect();
        let mut revoked = std::collections::HashSet::new();
        if !refused.is_empty() {
            // Rare (a revocation, a second delivery): one more statement.
            let stmt = prepared(
                &client,
                op,
                "SELECT task_id FROM taskstack_results
                 WHERE task_id = ANY($1) AND (revoked OR state = 'REVOKED')",
            )
            .await?;
            for r in client
                .query(&stmt, &[&refused])
                .await
                .map_err(|e| PgError::op(op, &e))?
            {
                revoked.insert(r.get::<_, String>(0));
            }
        }
        Ok(tasks
            .iter()
            .map(|(id, _)| {
                if started.contains(*id) {
                    StartVerdict::Run
                } else if revoked.contains(*id) {
                    StartVerdict::Revoked
                } else {
                    StartVerdict::Finished
                }
            })
            .collect())
    })
    .await
}

/// What a revocation of a task in `state` (`revoked`: marked before)
/// answers without changing anything; `None` when it may go ahead.
fn settled(op: &'static str, state: &str, revoked: bool) -> Result<Option<RevokeOutcome>, PgError> {
    if revoked || state == "REVOKED" {
        return Ok(Some(RevokeOutcome::AlreadyRevoked));
    }
    if matches!(state, "PENDING" | "RECEIVED" | "RETRY") {
        return Ok(None);
    }
    serde_json::from_value::<TaskState>(serde_json::Value::String(state.to_owned()))
        .map(|s| Some(RevokeOutcome::Refused(s)))
        .map_err(|_| PgError::Op {
            op,
            detail: format!("unknown task state {state:?}"),
        })
}

const ROW_STATE: &str = "SELECT state, revoked,
        (extract(epoch FROM expires_at - now()) * 1000)::bigint
    FROM taskstack_results WHERE task_id = $1 AND expires_at > now()";

/// The first step of a revocation, without a lock: `Err(answer)` when the
/// task cannot be revoked (no live row, revoked before, started or
/// finished), else `Ok(ms)`, how long the row still lives.
pub(crate) async fn revocable(
    pg: &Handles,
    task_id: &str,
) -> Result<Result<i64, RevokeOutcome>, PgError> {
    let op = "revoke task";
    timed(pg, op, async {
        let client = client(pg, op).await?;
        let stmt = prepared(&client, op, ROW_STATE).await?;
        let row = client
            .query_opt(&stmt, &[&task_id])
            .await
            .map_err(|e| PgError::op(op, &e))?;
        let Some(row) = row else {
            return Ok(Err(RevokeOutcome::Unknown));
        };
        let (state, revoked, left_ms): (String, bool, i64) = (row.get(0), row.get(1), row.get(2));
        Ok(match settled(op, &state, revoked)? {
            Some(answer) => Err(answer),
            None => Ok(left_ms),
        })
    })
    .await
}

/// Revokes a task that has not started, in one transaction: the row is
/// locked, its state checked, the REVOKED record stored (kept at least
/// `ttl`, longer when the row already lives longer) and marked revoked.
/// With a Redis broker this runs after the broker's revoked marker is set
/// (see `PgTaskStates`), which is what keeps workers from starting
/// the task; the check here keeps a row that moved on meanwhile (the task
/// finished) from being overwritten.
pub(crate) async fn revoke(
    pg: &Handles,
    task_id: &str,
    record: &str,
    ttl: Duration,
) -> Result<RevokeOutcome, PgError> {
    let op = "revoke task";
    let e = |e: tokio_postgres::Error| PgError::op(op, &e);
    timed(pg, op, async {
        let mut client = client(pg, op).await?;
        let tx = client.transaction().await.map_err(e)?;
        let row = tx
            .query_opt(&format!("{ROW_STATE} FOR UPDATE"), &[&task_id])
            .await
            .map_err(e)?;
        let Some(row) = row else {
            return Ok(RevokeOutcome::Unknown);
        };
        let (state, revoked, left_ms): (String, bool, i64) = (row.get(0), row.get(1), row.get(2));
        if let Some(answer) = settled(op, &state, revoked)? {
            return Ok(answer);
        }
        let keep = millis(ttl).max(left_ms);
        let stmt = tx.prepare_cached(&write_sql()).await.map_err(e)?;
        tx.execute(&stmt, &[&vec![task_id], &format!("[{record}]"), &keep])
            .await
            .map_err(e)?;
        tx.execute(
            "UPDATE taskstack_results SET revoked = true WHERE task_id = $1",
            &[&task_id],
        )
        .await
        .map_err(e)?;
        tx.commit().await.map_err(e)?;
        Ok(RevokeOutcome::Revoked)
    })
    .await
}

/// Stores `(task id, REVOKED record)` pairs for tasks the broker marks
/// revoked, where the row does not record it yet (see [`revoked_sql`]), in
/// one statement.
pub(crate) async fn record_revoked(
    pg: &Handles,
    records: &[(&str, &str)],
    ttl: Duration,
) -> Result<(), PgError> {
    run_records(pg, "record revoked tasks", &revoked_sql(), records, ttl).await
}

/// Deletes up to `max` expired rows, oldest expiry first, if no other
/// process is cleaning (a transaction-level advisory lock); `None` when one
/// is.
pub(crate) async fn sweep(pg: &Handles, max: usize) -> Result<Option<u64>, PgError> {
    let op = "delete expired results";
    let e = |e: tokio_postgres::Error| PgError::op(op, &e);
    timed(pg, op, async {
        let mut client = client(pg, op).await?;
        let tx = client.transaction().await.map_err(e)?;
        let locked: bool = tx
            .query_one("SELECT pg_try_advisory_xact_lock($1)", &[&EXPIRE_LOCK])
            .await
            .map_err(e)?
            .get(0);
        if !locked {
            return Ok(None);
        }
        let n = tx
            .execute(
                "DELETE FROM taskstack_results WHERE task_id IN (
                    SELECT task_id FROM taskstack_results WHERE expires_at <= now()
                    ORDER BY expires_at LIMIT $1 FOR UPDATE SKIP LOCKED)",
                &[&i64::try_from(max).unwrap_or(i64::MAX)],
            )
            .await
            .map_err(e)?;
        tx.commit().await.map_err(e)?;
        Ok(Some(n))
    })
    .await
}

/// One round trip; how long it took.
pub(crate) async fn ping(pg: &Handles) -> Result<Duration, PgError> {
    let op = "ping PostgreSQL";
    timed(pg, op, async {
        let client = client(pg, op).await?;
        let start = std::time::Instant::now();
        client
            .simple_query("SELECT 1")
            .await
            .map_err(|e| PgError::op(op, &e))?;
        Ok(start.elapsed())
    })
    .await
}
