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
    /// Parked until due (ETA, countdown, retry backoff); `None` where the
    /// broker cannot tell by queue (RabbitMQ's delay levels are shared by
    /// every queue: their total is [`DelayedSpan::parked`]).
    pub delayed: Option<u64>,
    /// Taken by workers and not yet settled.
    pub in_flight: u64,
    /// In the queue's dead-letter list.
    pub dead_lettered: u64,
    /// How long the oldest ready message has been ready (0 when none is
    /// ready); `None` when that message does not say when it became ready
    /// (one sent by Python Celery).
    pub oldest_ready_age: Option<std::time::Duration>,
    /// Consumers the broker counts on the queue (RabbitMQ: one per
    /// consuming channel, so one per worker serving it); `None` where the
    /// broker has no consumers to count (Redis: see the live workers).
    pub consumers: Option<u64>,
}

/// Counts for each of `queues`, in order, as one consistent snapshot.
/// Costs a few Redis commands per live worker and per queue however many
/// messages are queued or held (held messages are counted from each
/// worker's held counts, see [`Keys::held_counts`]).
pub async fn queue_counts(
    lane: &mut Lane,
    keys: &Keys,
    queues: &[String],
) -> Result<Vec<QueueCounts>, BrokerError> {
    Ok(queue_counts_read(lane, keys, queues).await?.0)
}

/// [`queue_counts`], and how many workers' held messages had to be read
/// one by one because their held counts did not add up (a worker of an
/// older version, or one whose holds a reaper restored while it ran).
pub async fn queue_counts_read(
    lane: &mut Lane,
    keys: &Keys,
    queues: &[String],
) -> Result<(Vec<QueueCounts>, u64), BrokerError> {
    if queues.is_empty() {
        return Ok((Vec::new(), 0));
    }
    let mut inv = QUEUE_STATS.prepare_invoke();
    inv.key(keys.leases())
        .key(keys.landing_sources())
        .key(keys.delayed_counts())
        .arg(keys.inflight_prefix())
        .arg(keys.landing_prefix())
        .arg(keys.dead_letters_prefix())
        .arg(super::now_ms())
        .arg(keys.held_counts_prefix())
        .arg(keys.hold_queues_prefix())
        .arg(crate::proto::keys::HOLD_SLOT_UNIT);
    for q in queues {
        inv.arg(q);
    }
    let mut rows: Vec<Vec<i64>> =
        on_lane!(&mut *lane, "count queue messages", |c| inv.invoke_async(c))?;
    let bad = |detail: String| BrokerError::Reply {
        op: "count queue messages",
        detail,
    };
    let read_one_by_one = match rows.pop().as_deref() {
        Some(&[w]) if rows.len() == queues.len() => w,
        _ => return Err(bad(format!("expected {} rows and a total", queues.len()))),
    };
    let n = |v: i64| u64::try_from(v).unwrap_or(0);
    let counts = rows
        .into_iter()
        .map(|row| match row[..] {
            [ready, delayed, in_flight, dead, oldest] => {
                Ok((ready, delayed, in_flight, dead, oldest))
            }
            _ => Err(bad(format!("a row of {} numbers, not 5", row.len()))),
        })
        .collect::<Result<Vec<_>, _>>()?;
    let counts = counts
        .into_iter()
        .map(|(ready, delayed, in_flight, dead, oldest)| QueueCounts {
            ready: n(ready),
            delayed: Some(n(delayed)),
            in_flight: n(in_flight),
            dead_lettered: n(dead),
            oldest_ready_age: u64::try_from(oldest)
                .ok()
                .map(std::time::Duration::from_millis),
            consumers: None,
        })
        .collect();
    Ok((counts, n(read_one_by_one)))
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

/// Reads the [`DelayedSpan`] in one round trip: three O(log n) commands
/// for each of the parked set and the set earlier builds parked in.
pub async fn delayed_span(lane: &mut Lane, keys: &Keys) -> Result<DelayedSpan, BrokerError> {
    let mut p = redis::pipe();
    for key in [keys.parked(), keys.delayed()] {
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
    }
    type Ends = Vec<(String, f64)>;
    let (n, first, last, n_earlier, first_earlier, last_earlier): (
        u64,
        Ends,
        Ends,
        u64,
        Ends,
        Ends,
    ) = on_lane!(&mut *lane, "read the delayed set", |c| p.query_async(c))?;
    let due = |e: &Ends| e.first().map(|(_, score)| *score as i64);
    let either = |a: Option<i64>, b: Option<i64>, pick: fn(i64, i64) -> i64| match (a, b) {
        (Some(a), Some(b)) => Some(pick(a, b)),
        (a, b) => a.or(b),
    };
    Ok(DelayedSpan {
        parked: n + n_earlier,
        first_due_ms: either(due(&first), due(&first_earlier), i64::min),
        last_due_ms: either(due(&last), due(&last_earlier), i64::max),
    })
}
