//! Read-only views of the broker for operators: per-queue message counts.

use super::pool::on_lane;
use super::{BrokerError, Lane, QUEUE_STATS};
use crate::proto::Keys;
use serde::Serialize;

/// Where one queue's messages are, at one instant.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize)]
pub struct QueueCounts {
    /// Waiting in the queue's lists (every priority bucket).
    pub ready: u64,
    /// Parked until due (ETA, countdown, retry backoff).
    pub delayed: u64,
    /// Taken by workers and not yet settled.
    pub in_flight: u64,
    /// In the queue's dead-letter list.
    pub dead_lettered: u64,
    /// How long the oldest ready message has been ready (0 when none is
    /// ready); `None` when that message does not say when it became ready
    /// (one sent by Python Celery).
    pub oldest_ready_age: Option<std::time::Duration>,
}

/// Counts for each of `queues`, in order, as one consistent snapshot.
/// Reads every held message (bounded by the workers' prefetch): meant for
/// dashboards and health pages, not for every task.
pub async fn queue_counts(
    lane: &mut Lane,
    keys: &Keys,
    queues: &[String],
) -> Result<Vec<QueueCounts>, BrokerError> {
    if queues.is_empty() {
        return Ok(Vec::new());
    }
    let mut inv = QUEUE_STATS.prepare_invoke();
    inv.key(keys.leases())
        .key(keys.landing_sources())
        .key(keys.delayed_counts())
        .arg(keys.inflight_prefix())
        .arg(keys.landing_prefix())
        .arg(keys.dead_letters_prefix())
        .arg(super::now_ms());
    for q in queues {
        inv.arg(q);
    }
    let rows: Vec<(i64, i64, i64, i64, i64)> =
        on_lane!(&mut *lane, "count queue messages", |c| inv.invoke_async(c))?;
    let n = |v: i64| u64::try_from(v).unwrap_or(0);
    Ok(rows
        .into_iter()
        .map(|(ready, delayed, in_flight, dead, oldest)| QueueCounts {
            ready: n(ready),
            delayed: n(delayed),
            in_flight: n(in_flight),
            dead_lettered: n(dead),
            oldest_ready_age: u64::try_from(oldest)
                .ok()
                .map(std::time::Duration::from_millis),
        })
        .collect())
}

/// The delayed set as a whole (it is shared by every queue): how many
/// messages are parked and when the first and the last are due, so an ETA
/// far in the future is visible rather than silently waiting.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize)]
pub struct DelayedSpan {
    pub parked: u64,
    /// Due time (ms since the epoch) of the message due first.
    pub first_due_ms: Option<i64>,
    /// Due time (ms since the epoch) of the message due last.
    pub last_due_ms: Option<i64>,
}

/// Reads the [`DelayedSpan`] in one round trip (three O(log n) commands).
pub async fn delayed_span(lane: &mut Lane, keys: &Keys) -> Result<DelayedSpan, BrokerError> {
    let key = keys.delayed();
    let mut p = redis::pipe();
    p.cmd("ZCARD")
        .arg(&key)
        .cmd("ZRANGE")
        .arg(&key)
        .arg(0)
        .arg(0)
        .arg("WITHSCORES")
        .cmd("ZRANGE")
        .arg(&key)
        .arg(-1)
        .arg(-1)
        .arg("WITHSCORES");
    type Ends = Vec<(String, f64)>;
    let (parked, first, last): (u64, Ends, Ends) =
        on_lane!(&mut *lane, "read the delayed set", |c| p.query_async(c))?;
    let due = |e: Ends| e.first().map(|(_, score)| *score as i64);
    Ok(DelayedSpan {
        parked,
        first_due_ms: due(first),
        last_due_ms: due(last),
    })
}
