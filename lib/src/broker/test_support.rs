//! What the broker's Redis tests share: a lane to a test server, one
//! command on it, a command's call count, PENDING records, a whole list, a
//! take for worker `w1`, a plain dead-letter record.

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

/// How often `command` ran since the last `CONFIG RESETSTAT` (scripts'
/// commands included), from `INFO commandstats`.
pub(super) async fn calls(l: &mut Lane, command: &str) -> u64 {
    let info: String = cmd(l, redis::cmd("INFO").arg("commandstats")).await;
    let prefix = format!("cmdstat_{command}:calls=");
    info.lines()
        .find_map(|line| line.strip_prefix(&prefix))
        .and_then(|rest| rest.split(',').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or(0)
}

/// PENDING records for `ids`, as a producer with `record_pending` writes.
pub(super) async fn record_pending(l: &mut Lane, ids: &[&str]) {
    for id in ids {
        let pending =
            serde_json::to_string(&crate::proto::TaskResult::pending(id, "x", "q")).expect("json");
        cmd::<()>(
            l,
            redis::cmd("SET")
                .arg(crate::proto::keys::result_key(id))
                .arg(&pending),
        )
        .await;
    }
}

/// The whole of LIST `key`, left (the back of a queue) first.
pub(super) async fn list(lane: &mut Lane, key: &str) -> Vec<String> {
    cmd(lane, redis::cmd("LRANGE").arg(key).arg(0).arg(-1)).await
}

thread_local! {
    /// The slots of the test's worker process: each test runs on a thread
    /// of its own, as each worker is a process of its own.
    static SLOTS: std::cell::RefCell<HoldQueues> = std::cell::RefCell::default();
}

/// The slots of `keys` in this test's worker process (see [`HoldQueues`])
/// and the JSON naming them, leaked (a test's few takes) so a [`Take`] can
/// borrow them.
pub(super) fn slots(keys: &[String]) -> (&'static [u64], &'static str) {
    SLOTS.with_borrow_mut(|h| {
        let slots: &'static [u64] = Box::leak(h.slots(keys).expect("slots").into_boxed_slice());
        let named: &'static str = Box::leak(h.json().to_owned().into_boxed_str());
        (slots, named)
    })
}

/// Worker `w1` takes up to `max` from `keys`, its landing list included.
pub(super) fn take<'a>(keys: &'a [String], max: usize, last_seq: u64) -> Take<'a> {
    let (slots, named) = slots(keys);
    Take {
        worker_id: "w1",
        queue_keys: keys,
        max,
        last_seq,
        lease: Duration::from_secs(30),
        max_size: usize::MAX,
        landing: true,
        slots,
        named,
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
