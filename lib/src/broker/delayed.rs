//! Messages parked until a due time (ETA, countdown, retry backoff).

use super::pool::on_lane;
use super::{BrokerError, DELAY, Lane, PROMOTE};
use crate::proto::Keys;

/// Parks `payload` until `due_ms`, to be pushed to `queue_key` then. With
/// `held = Some((worker, seq, started))` the worker's hold is settled in the
/// same step, and with it the start mark of task `started` (a retry of a
/// task that ran) while that mark names this hold.
pub(crate) async fn park(
    lane: &mut Lane,
    keys: &Keys,
    due_ms: i64,
    queue_key: &str,
    payload: &[u8],
    held: Option<(&str, u64, Option<&str>)>,
) -> Result<(), BrokerError> {
    let mut inv = DELAY.prepare_invoke();
    let (inflight, counts, running, seqs, named, seq, task_id) = match held {
        Some((worker, seq, started)) => (
            keys.inflight(worker),
            keys.held_counts(worker),
            keys.running(worker),
            keys.held_seqs(worker),
            keys.hold_queues(worker),
            seq.to_string(),
            started.unwrap_or(""),
        ),
        None => (
            keys.parked(),
            keys.parked(),
            keys.parked(),
            keys.parked(),
            keys.parked(),
            String::new(),
            "",
        ),
    };
    inv.key(keys.parked())
        .key(keys.parked_messages())
        .key(inflight)
        .key(keys.delayed_counts())
        .key(counts)
        .key(running)
        .key(seqs)
        .key(named)
        .arg(due_ms)
        .arg(uuid::Uuid::new_v4().to_string())
        .arg(queue_key)
        .arg(payload)
        .arg(seq)
        .arg(task_id)
        .arg(crate::proto::keys::HOLD_SLOT_UNIT);
    on_lane!(&mut *lane, "park delayed message", |c| inv
        .invoke_async::<()>(c))?;
    lane.recycle_after(payload.len());
    Ok(())
}

/// Moves up to `max` due messages to their queues. Returns how many moved
/// and when the next parked message is due (ms), if any.
pub(crate) async fn promote(
    lane: &mut Lane,
    keys: &Keys,
    now_ms: i64,
    max: usize,
) -> Result<(u64, Option<i64>), BrokerError> {
    let mut inv = PROMOTE.prepare_invoke();
    inv.key(keys.parked())
        .key(keys.parked_messages())
        .key(keys.delayed_counts())
        .key(keys.delayed())
        .key(keys.delayed_messages())
        .arg(now_ms)
        .arg(max);
    let (moved, next): (u64, String) = on_lane!(&mut *lane, "promote delayed messages", |c| inv
        .invoke_async(c))?;
    Ok((moved, next.parse::<f64>().ok().map(|f| f as i64)))
}
