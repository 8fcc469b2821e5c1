//! What the broker's Redis tests share: a lane to a test server, one
//! command on it, a take for worker `w1`, a plain dead-letter record.

use super::*;
use crate::config::RedisTarget;
use crate::test_redis::Server;
use std::time::Duration;

pub(super) fn lane(s: &Server) -> Lane {
    RedisPool::new(
        &RedisTarget::from_url(&s.url).expect("url"),
        4,
        Duration::from_secs(5),
    )
    .expect("pool")
    .lane()
}

pub(super) async fn cmd<T: redis::FromRedisValue>(lane: &mut Lane, c: &mut redis::Cmd) -> T {
    let conn = lane.conn("test").await.expect("conn");
    c.query_async(conn).await.expect("command")
}

/// Worker `w1` takes up to `max` from `keys`, its landing list included.
pub(super) fn take<'a>(keys: &'a [String], max: usize, last_seq: u64) -> Take<'a> {
    Take {
        worker_id: "w1",
        queue_keys: keys,
        max,
        last_seq,
        lease: Duration::from_secs(30),
        max_size: usize::MAX,
        landing: true,
    }
}

/// A dead-letter record of a message of queue `queue` (its key too) held
/// by `worker`.
pub(super) fn dead_record(queue: &str, payload: &str, worker: &str) -> DeadLetter {
    DeadLetter {
        reason: "r".into(),
        queue: queue.into(),
        queue_key: queue.into(),
        task_id: None,
        task: None,
        payload: payload.into(),
        payload_base64: None,
        payload_key: None,
        payload_size: None,
        worker: worker.into(),
        at: "now".into(),
    }
}
