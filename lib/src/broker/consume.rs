//! Taking messages (atomically recorded as held) and settling them.

use super::pool::on_lane;
use super::{ACK, BrokerError, FETCH, Lane, LaneConn, REQUEUE, StartVerdict};
use crate::proto::Keys;
use crate::proto::keys::HOLD_SLOT_UNIT;
use std::time::Duration;

/// A message a worker took and now holds.
#[derive(Debug, Clone)]
pub struct Delivery {
    /// The worker-local hold number recording the hold (its slot names
    /// the list, see [`crate::proto::keys::HOLD_SLOT_UNIT`]).
    pub seq: u64,
    /// The list it came from (queue plus priority bucket).
    pub queue_key: String,
    /// The raw message, byte for byte. Celery messages are JSON text; a
    /// message that is not UTF-8 is still delivered (and dead-lettered by
    /// the worker), never left held.
    pub payload: Vec<u8>,
    /// `Some(size)` when the message is larger than the taker's
    /// `max_size`: it stays in Redis (in the hold) and `payload` is empty.
    pub oversized: Option<u64>,
}

impl Delivery {
    /// The message as text; `None` when it is not UTF-8.
    pub fn text(&self) -> Option<&str> {
        std::str::from_utf8(&self.payload).ok()
    }
}

/// How a finished message is settled: its result (if any) is written first,
/// then the hold is released, in one pipeline.
#[derive(Debug, Clone)]
pub struct Settle {
    pub seq: u64,
    /// `(task id, result JSON)` to store and publish before releasing.
    pub result: Option<(String, String)>,
    /// The task id whose start mark (see `scripts/start.lua`) is deleted
    /// with the hold; `None` when the message never reached a start.
    pub started: Option<String>,
}

/// How long a worker's held-count hash (see [`Keys::held_counts`]) lives
/// without a heartbeat renewing it, in lease lengths: a live worker renews
/// it three times a lease, and a dead one's is gone soon after its lease.
pub(crate) const HELD_COUNT_TTL_LEASES: u32 = 3;

/// The held-count hash's expiry, in ms, for a lease of `lease`.
pub(crate) fn held_count_ttl_ms(lease: Duration) -> u64 {
    u64::try_from(lease.saturating_mul(HELD_COUNT_TTL_LEASES).as_millis())
        .unwrap_or(u64::MAX)
        .max(1000)
}

/// One worker's request for messages.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Take<'a> {
    pub worker_id: &'a str,
    /// Lists to serve, in order; the first feeds the landing list.
    pub queue_keys: &'a [String],
    pub max: usize,
    /// The worker's last used sequence number.
    pub last_seq: u64,
    pub lease: Duration,
    /// Larger messages are held but not sent (see [`Delivery::oversized`]).
    pub max_size: usize,
    /// Whether the landing list may hold a message (the worker waited
    /// since its last take); `false` spares its `RPOP`.
    pub landing: bool,
    /// The slot of each of `queue_keys` (see [`super::HoldQueues`]).
    pub slots: &'a [u64],
    /// The JSON array naming every slot ([`super::HoldQueues::json`]).
    pub named: &'a str,
}

/// The message a worker's last wait moved to its landing list (see
/// [`crate::backend::Consume::landed`]), which the worker will run at once:
/// the take starts it in the same step where the backend can.
#[derive(Debug, Clone, Copy)]
pub struct StartLanded<'a> {
    /// Its task id.
    pub task_id: &'a str,
    /// Its length in bytes.
    pub len: usize,
}

/// Takes up to `max` messages from `queue_keys` (served in order), recording
/// the hold and refreshing the lease in the same script.
pub(crate) async fn fetch(
    lane: &mut Lane,
    keys: &Keys,
    take: Take<'_>,
) -> Result<Vec<Delivery>, BrokerError> {
    Ok(fetch_inner(lane, keys, take, None).await?.0)
}

/// [`fetch`], and in the same script what `scripts/start.lua` does for
/// `start` when the landing list held exactly that message: it is then
/// the first delivery, and the verdict says whether it was marked started
/// ([`StartVerdict::Run`]) or is revoked ([`StartVerdict::Revoked`]).
/// `None`: nothing was started; every delivery starts as usual.
pub(crate) async fn fetch_starting(
    lane: &mut Lane,
    keys: &Keys,
    take: Take<'_>,
    start: StartLanded<'_>,
) -> Result<(Vec<Delivery>, Option<StartVerdict>), BrokerError> {
    fetch_inner(lane, keys, take, Some(start)).await
}

async fn fetch_inner(
    lane: &mut Lane,
    keys: &Keys,
    take: Take<'_>,
    start: Option<StartLanded<'_>>,
) -> Result<(Vec<Delivery>, Option<StartVerdict>), BrokerError> {
    let Take {
        worker_id,
        queue_keys,
        max,
        last_seq,
        lease,
        max_size,
        landing,
        slots,
        named,
    } = take;
    if slots.len() != queue_keys.len() {
        return Err(BrokerError::Reply {
            op: "fetch",
            detail: format!("{} queue lists but {} slots", queue_keys.len(), slots.len()),
        });
    }
    let deadline = super::now_ms() + i64::try_from(lease.as_millis()).unwrap_or(i64::MAX);
    let mut inv = FETCH.prepare_invoke();
    inv.key(keys.leases())
        .key(keys.inflight(worker_id))
        .key(keys.landing(worker_id))
        .key(keys.held_counts(worker_id))
        .key(keys.held_seqs(worker_id))
        .key(keys.hold_queues(worker_id))
        .key(keys.running(worker_id));
    for k in queue_keys {
        inv.key(k);
    }
    inv.arg(worker_id)
        .arg(deadline)
        .arg(max)
        .arg(last_seq)
        .arg(1)
        .arg(max_size)
        .arg(u8::from(landing))
        .arg(held_count_ttl_ms(lease))
        .arg(named)
        .arg(HOLD_SLOT_UNIT)
        .arg(start.map_or("", |s| s.task_id))
        .arg(start.map_or(0, |s| s.len))
        .arg(keys.revoked_prefix())
        .arg(slots);
    let flat: Vec<redis::Value> = on_lane!(&mut *lane, "fetch", |c| inv.invoke_async(c))?;
    let bad = |what: &str| BrokerError::Reply {
        op: "fetch",
        detail: what.to_owned(),
    };
    let mut it = flat.into_iter();
    let verdict = match start {
        None => None,
        Some(_) => match it.next().map(redis::from_redis_value::<i64>) {
            Some(Ok(1)) => Some(StartVerdict::Run),
            Some(Ok(0)) => Some(StartVerdict::Revoked),
            Some(Ok(-1)) => None,
            _ => return Err(bad("start verdict")),
        },
    };
    let mut out = Vec::with_capacity(it.len() / 3);
    while let (Some(seq), Some(idx), Some(payload)) = (it.next(), it.next(), it.next()) {
        let seq: u64 = redis::from_redis_value(seq).map_err(|_| bad("sequence number"))?;
        let idx: usize = redis::from_redis_value(idx).map_err(|_| bad("queue index"))?;
        let (payload, oversized) = match payload {
            redis::Value::Int(size) => (Vec::new(), Some(u64::try_from(size).unwrap_or(0))),
            other => (
                redis::from_redis_value::<Vec<u8>>(other)
                    .map_err(|_| bad("message is not a string"))?,
                None,
            ),
        };
        let queue_key = queue_keys
            .get(idx.wrapping_sub(1))
            .ok_or_else(|| bad("queue index out of range"))?
            .clone();
        out.push(Delivery {
            seq,
            queue_key,
            payload,
            oversized,
        });
    }
    if verdict.is_some() && out.is_empty() {
        return Err(bad("a start verdict without the message"));
    }
    lane.recycle_after(out.iter().map(|d| d.payload.len()).sum());
    Ok((out, verdict))
}

/// Blocks up to `wait` for a message on `queue_key`, moving it to the
/// worker's landing list (atomically; [`fetch`] then records it). Returns
/// the message moved, if one arrived.
pub(crate) async fn wait_for_message(
    lane: &mut Lane,
    keys: &Keys,
    worker_id: &str,
    queue_key: &str,
    wait: Duration,
) -> Result<Option<Vec<u8>>, BrokerError> {
    let landing = keys.landing(worker_id);
    // BLMOVE answers with the message it moved: bytes, whatever they are,
    // and a large one must not leave its size in this connection's buffers.
    let moved: Option<Vec<u8>> = on_lane!(&mut *lane, "wait", |c| redis::cmd("BLMOVE")
        .arg(queue_key)
        .arg(&landing)
        .arg("RIGHT")
        .arg("LEFT")
        .arg(wait.as_secs_f64())
        .query_async(c))?;
    lane.recycle_after(moved.as_ref().map_or(0, Vec::len));
    Ok(moved)
}

/// Hands held messages back to the front of their queues.
pub(crate) async fn requeue(
    lane: &mut Lane,
    keys: &Keys,
    worker_id: &str,
    seqs: &[u64],
) -> Result<usize, BrokerError> {
    if seqs.is_empty() {
        return Ok(0);
    }
    let mut inv = REQUEUE.prepare_invoke();
    inv.key(keys.inflight(worker_id))
        .key(keys.held_counts(worker_id))
        .key(keys.held_seqs(worker_id))
        .key(keys.hold_queues(worker_id))
        .arg(HOLD_SLOT_UNIT);
    for s in seqs {
        inv.arg(*s);
    }
    on_lane!(&mut *lane, "requeue", |c| inv.invoke_async(c))
}

/// The `ack.lua` call releasing the holds of `batch`, grouped by queue name
/// (`queue_of`: a hold's queue name when the caller knows it; the script
/// reads the others to learn theirs).
fn ack_invocation<'a>(
    keys: &Keys,
    worker_id: &str,
    batch: &[Settle],
    queue_of: &(dyn Fn(u64) -> Option<String> + Sync),
) -> redis::ScriptInvocation<'a> {
    let mut groups: Vec<(String, Vec<u64>)> = Vec::new();
    for s in batch {
        let q = queue_of(s.seq).unwrap_or_default();
        match groups.iter_mut().find(|(name, _)| *name == q) {
            Some((_, seqs)) => seqs.push(s.seq),
            None => groups.push((q, vec![s.seq])),
        }
    }
    let mut inv = ACK.prepare_invoke();
    inv.key(keys.inflight(worker_id))
        .key(keys.held_counts(worker_id))
        .key(keys.held_seqs(worker_id))
        .key(keys.hold_queues(worker_id))
        .arg(HOLD_SLOT_UNIT);
    for (q, seqs) in groups {
        inv.arg(q).arg(seqs.len());
        for s in seqs {
            inv.arg(s);
        }
    }
    inv
}

/// Stores results (`SET ... EX` then `PUBLISH`, as Celery's backend does)
/// and then releases the holds (`ack.lua`, which keeps the worker's held
/// counts; `queue_of` names a hold's queue when the caller knows it). When
/// results live on another server they are written and confirmed there
/// before any hold is released, so a crash in between re-runs a task rather
/// than losing its result.
pub(crate) async fn settle(
    broker_lane: &mut Lane,
    backend_lane: Option<&mut Lane>,
    keys: &Keys,
    worker_id: &str,
    batch: &[Settle],
    queue_of: &(dyn Fn(u64) -> Option<String> + Sync),
    result_ttl: Duration,
) -> Result<(), BrokerError> {
    let ttl = result_ttl.as_secs().max(1);
    let bytes: usize = batch
        .iter()
        .filter_map(|s| s.result.as_ref().map(|(_, json)| json.len()))
        .sum();
    let mut results = redis::pipe();
    for s in batch {
        if let Some((id, json)) = &s.result {
            let key = crate::proto::keys::result_key(id);
            results
                .cmd("SET")
                .arg(&key)
                .arg(json)
                .arg("EX")
                .arg(ttl)
                .ignore()
                .cmd("PUBLISH")
                .arg(&key)
                .arg(json)
                .ignore();
        }
    }
    // The holds, and (results on the broker's server, where start.lua marks
    // started tasks in the running hash) the start marks.
    let ack = ack_invocation(keys, worker_id, batch, queue_of);
    let release = |p: &mut redis::Pipeline, marks: bool| {
        p.invoke_script(&ack).ignore();
        let started: Vec<&str> = batch.iter().filter_map(|s| s.started.as_deref()).collect();
        if marks && !started.is_empty() {
            p.cmd("HDEL")
                .arg(keys.running(worker_id))
                .arg(&started)
                .ignore();
        }
    };
    match backend_lane {
        Some(backend) => {
            if !results.is_empty() {
                on_lane!(&mut *backend, "store results", |c| results
                    .query_async::<()>(c))?;
                // redis_min_replicas_acked: the results survive a failover
                // before any hold is released.
                backend.replicated("store results").await?;
                backend.recycle_after(bytes);
            }
            let mut acks = redis::pipe();
            release(&mut acks, false);
            on_lane!(&mut *broker_lane, "acknowledge", |c| run_loading(
                c, &acks, &ack
            ))
        }
        None => {
            release(&mut results, true);
            on_lane!(&mut *broker_lane, "store results and acknowledge", |c| {
                run_loading(c, &results, &ack)
            })?;
            // redis_min_replicas_acked (results and holds replicate in order).
            broker_lane
                .replicated("store results and acknowledge")
                .await?;
            broker_lane.recycle_after(bytes);
            Ok(())
        }
    }
}

/// Runs `pipe`, which calls `ack` by its hash: when Redis does not know the
/// script (restarted, or `SCRIPT FLUSH`), everything else in the pipeline
/// has run, so the script alone runs again (loaded this time).
async fn run_loading(
    c: &mut LaneConn,
    pipe: &redis::Pipeline,
    ack: &redis::ScriptInvocation<'_>,
) -> redis::RedisResult<()> {
    match pipe.query_async::<()>(&mut *c).await {
        Err(e) if e.kind() == redis::ErrorKind::Server(redis::ServerErrorKind::NoScript) => {
            ack.invoke_async::<()>(c).await
        }
        other => other,
    }
}
