//! Messages in flight per queue on RabbitMQ. RabbitMQ counts a queue's
//! unacknowledged deliveries only through its management API, so each
//! worker writes what it holds, by queue, with its heartbeat: the hash
//! [`Keys::held_counts`] on the result backend's Redis, the one the Redis
//! broker keeps per worker too. It expires with the worker's lease and is
//! deleted when the worker is reaped or releases its lease, and
//! [`counts`] sums it over the live workers.

use super::consume::Consumer;
use crate::backend::traits::{BackendError, Leases, Reaped};
use crate::broker::{Lane, WorkerRecord, held_count_ttl_ms, on_lane};
use crate::proto::Keys;
use async_trait::async_trait;
use std::sync::Arc;
use std::time::Duration;

/// The Redis leases, plus the worker's held counts with each heartbeat.
pub(super) struct HeldLeases {
    pub(super) inner: Box<dyn Leases>,
    pub(super) consumer: Arc<Consumer>,
    pub(super) lane: Lane,
    pub(super) keys: Keys,
}

#[async_trait]
impl Leases for HeldLeases {
    async fn heartbeat(
        &mut self,
        record: &WorkerRecord,
        landing_source: &str,
        lease: Duration,
    ) -> Result<bool, BackendError> {
        let created = self.inner.heartbeat(record, landing_source, lease).await?;
        let key = self.keys.held_counts(&record.id);
        let held = self.consumer.held_by_queue();
        let mut p = redis::pipe();
        p.atomic().del(&key).ignore();
        if !held.is_empty() {
            p.hset_multiple(&key, &held)
                .ignore()
                .pexpire(
                    &key,
                    i64::try_from(held_count_ttl_ms(lease)).unwrap_or(i64::MAX),
                )
                .ignore();
        }
        on_lane!(&mut self.lane, "record held counts", |c| p
            .query_async::<()>(c))?;
        Ok(created)
    }

    async fn reap_expired(&mut self) -> Result<Reaped, BackendError> {
        self.inner.reap_expired().await
    }

    async fn release(&mut self, worker_id: &str) -> Result<u64, BackendError> {
        self.inner.release(worker_id).await
    }
}

/// For each of `queues` (in order): its dead letters on Redis, and the
/// messages live `workers` hold of it as of their last heartbeats. One
/// round trip.
pub(super) async fn counts(
    lane: &mut Lane,
    keys: &Keys,
    workers: &[WorkerRecord],
    queues: &[String],
) -> Result<(Vec<u64>, Vec<u64>), BackendError> {
    let mut held = vec![0; queues.len()];
    if queues.is_empty() {
        return Ok((Vec::new(), held));
    }
    let mut p = redis::pipe();
    for q in queues {
        p.cmd("LLEN").arg(keys.dead_letters(q));
    }
    for w in workers {
        p.cmd("HMGET").arg(keys.held_counts(&w.id)).arg(queues);
    }
    let replies: Vec<redis::Value> = on_lane!(lane, "count dead letters and held messages", |c| p
        .query_async(c))?;
    let mut replies = replies.into_iter();
    let bad = |detail: String| BackendError::Invalid {
        op: "count dead letters and held messages",
        detail,
    };
    let dead = replies
        .by_ref()
        .take(queues.len())
        .map(|v| redis::from_redis_value::<u64>(v).map_err(|e| bad(e.to_string())))
        .collect::<Result<Vec<u64>, _>>()?;
    for v in replies {
        let row: Vec<Option<u64>> = redis::from_redis_value(v).map_err(|e| bad(e.to_string()))?;
        for (t, n) in held.iter_mut().zip(row) {
            *t += n.unwrap_or(0);
        }
    }
    Ok((dead, held))
}
