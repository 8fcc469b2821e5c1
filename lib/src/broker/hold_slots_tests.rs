//! Holds that are the message alone, their queue named by the slot in their
//! hold number (see `fetch.lua`), against a real `redis-server`: restored
//! to the right lists when the served queues change, read by every script
//! that needs a hold's queue, and safe beside reapers of the earlier build,
//! whose holds were `<queue key>\n<message>`.

use super::test_support::{cmd, lane, list, slots};
use super::*;
use crate::test_redis::server;
use std::time::Duration;

const LEASE: Duration = Duration::from_secs(30);

/// Worker `w` takes up to `max` from `keys` (its slots as its process
/// gives them).
async fn take_from(
    l: &mut Lane,
    keys: &Keys,
    w: &str,
    queue_keys: &[String],
    max: usize,
    last_seq: u64,
) -> Vec<Delivery> {
    let (slots, named) = slots(queue_keys);
    let t = Take {
        worker_id: w,
        queue_keys,
        max,
        last_seq,
        lease: LEASE,
        max_size: usize::MAX,
        landing: false,
        slots,
        named,
    };
    fetch(l, keys, t).await.expect("fetch")
}

async fn push(l: &mut Lane, key: &str, messages: &[&str]) {
    for m in messages {
        cmd::<()>(l, redis::cmd("LPUSH").arg(key).arg(*m)).await;
    }
}

async fn expire_lease(l: &mut Lane, keys: &Keys, w: &str) {
    cmd::<()>(l, redis::cmd("ZADD").arg(keys.leases()).arg(0).arg(w)).await;
}

#[tokio::test]
async fn holds_go_back_to_their_own_lists_after_the_served_queues_change() {
    let s = server();
    let mut l = lane(&s);
    let keys = Keys::new("ns");
    push(&mut l, "a", &["a1", "a2", "a3"]).await;
    push(&mut l, "b", &["b1"]).await;
    push(&mut l, "c", &["c1", "c2"]).await;
    let first = vec!["a".to_string(), "b".to_string()];
    let got = take_from(&mut l, &keys, "w1", &first, 3, 0).await;
    assert_eq!(
        got.iter().map(|d| d.seq).collect::<Vec<_>>(),
        [1, 2, 3],
        "slot 0, from `a` only"
    );
    let got = take_from(&mut l, &keys, "w1", &first, 1, 3).await;
    assert_eq!(got[0].seq, hold_number(1, 4), "`b` has slot 1");
    // Remote control now serves `c` and `a`: `c` gets the next slot, `a`
    // keeps its own, and the named lists grow.
    let second = vec!["c".to_string(), "a".to_string()];
    let got = take_from(&mut l, &keys, "w1", &second, 2, 4).await;
    assert_eq!(
        got.iter().map(|d| d.seq).collect::<Vec<_>>(),
        [hold_number(2, 5), hold_number(2, 6)]
    );
    let named: String = cmd(
        &mut l,
        redis::cmd("HGET").arg(keys.hold_queues("w1")).arg("queues"),
    )
    .await;
    assert_eq!(named, r#"["a","b","c"]"#);
    // A take that names fewer lists (another session's, sent before the
    // list grew) does not shorten it.
    let stale = Take {
        worker_id: "w1",
        queue_keys: &first,
        max: 1,
        last_seq: 6,
        lease: LEASE,
        max_size: usize::MAX,
        landing: false,
        slots: &[0, 1],
        named: r#"["a","b"]"#,
    };
    push(&mut l, "a", &["a4"]).await;
    fetch(&mut l, &keys, stale).await.expect("fetch");
    let named: String = cmd(
        &mut l,
        redis::cmd("HGET").arg(keys.hold_queues("w1")).arg("queues"),
    )
    .await;
    assert_eq!(named, r#"["a","b","c"]"#);

    // The counts by queue name (the hold numbers alone tell them apart
    // once the counts are gone).
    cmd::<()>(&mut l, redis::cmd("DEL").arg(keys.held_counts("w1"))).await;
    let names = ["a".to_string(), "b".to_string(), "c".to_string()];
    let (counts, read) = queue_counts_read(&mut l, &keys, &names)
        .await
        .expect("counts");
    assert_eq!(read, 1, "read one by one without its counts");
    assert_eq!(
        counts.iter().map(|c| c.in_flight).collect::<Vec<_>>(),
        [4, 1, 2]
    );

    // Handed back by number, numbers never used included (a take whose
    // reply was lost is handed back as every number it may have used).
    let back = [hold_number(2, 5), hold_number(0, 5), hold_number(1, 5)];
    assert_eq!(
        requeue(&mut l, &keys, "w1", &back).await.expect("requeue"),
        1
    );
    assert_eq!(list(&mut l, "c").await, ["c1"]);

    // Reaped: each message at the front of its own list, oldest first.
    expire_lease(&mut l, &keys, "w1").await;
    assert_eq!(reap(&mut l, &keys, 1).await.expect("reap"), (1, 6));
    assert_eq!(list(&mut l, "a").await, ["a4", "a3", "a2", "a1"]);
    assert_eq!(list(&mut l, "b").await, ["b1"]);
    // c1 went back first (the requeue above), so c2, restored now, is
    // ahead of it: each goes to the very front.
    assert_eq!(list(&mut l, "c").await, ["c1", "c2"]);
    for k in [keys.inflight("w1"), keys.hold_queues("w1")] {
        let left: bool = cmd(&mut l, redis::cmd("EXISTS").arg(&k)).await;
        assert!(!left, "{k} is gone with the worker");
    }
}

#[tokio::test]
async fn a_reaper_of_the_earlier_build_stops_before_restoring_anything() {
    let s = server();
    let mut l = lane(&s);
    let keys = Keys::new("ns");
    push(&mut l, "q", &["m1", "m2\nwith a newline"]).await;
    push(&mut l, "p", &["p1"]).await;
    let qk = vec!["q".to_string(), "p".to_string()];
    assert_eq!(take_from(&mut l, &keys, "w1", &qk, 3, 0).await.len(), 3);
    expire_lease(&mut l, &keys, "w1").await;

    // The earlier build's reap.lua, called as that build called it.
    let earlier = redis::Script::new(include_str!("testdata/reap_before_hold_slots.lua"));
    let mut inv = earlier.prepare_invoke();
    inv.key(keys.leases())
        .key(keys.landing_sources())
        .arg(1)
        .arg(keys.hold_queues_prefix())
        .arg(keys.landing_prefix())
        .arg(keys.worker_prefix())
        .arg(100)
        .arg(keys.started_prefix())
        .arg(60_000)
        .arg(keys.running_prefix())
        .arg(keys.held_counts_prefix())
        .arg(keys.held_seqs_prefix());
    let conn = l.conn("test").await.expect("conn");
    let err = inv
        .invoke_async::<(u64, u64)>(conn)
        .await
        .expect_err("the earlier reaper cannot read this build's holds");
    assert!(err.to_string().contains("a nil value"), "{err}");
    // Nothing was restored, nothing was lost: the holds, their lease and
    // their named lists are as they were.
    assert!(list(&mut l, "q").await.is_empty());
    assert!(list(&mut l, "p").await.is_empty());
    let held: u64 = cmd(&mut l, redis::cmd("HLEN").arg(keys.inflight("w1"))).await;
    assert_eq!(held, 3);
    let lease: Option<f64> = cmd(&mut l, redis::cmd("ZSCORE").arg(keys.leases()).arg("w1")).await;
    assert_eq!(lease, Some(0.0));

    // This build's reaper restores them.
    assert_eq!(reap(&mut l, &keys, 1).await.expect("reap"), (1, 3));
    assert_eq!(list(&mut l, "q").await, ["m2\nwith a newline", "m1"]);
    assert_eq!(list(&mut l, "p").await, ["p1"]);
}

#[tokio::test]
async fn holds_of_the_earlier_build_are_counted_and_restored() {
    let s = server();
    let mut l = lane(&s);
    let keys = Keys::new("ns");
    // A worker of the earlier build: "<queue key>\n<message>" under the
    // name its in-flight hash had, with its held counts.
    let earlier = keys.hold_queues("old");
    cmd::<()>(
        &mut l,
        redis::cmd("HSET")
            .arg(&earlier)
            .arg(1)
            .arg("q\nm1")
            .arg(2)
            .arg("q\x06\x163\nlow")
            .arg(3)
            .arg("q\nm3"),
    )
    .await;
    cmd::<()>(
        &mut l,
        redis::cmd("HSET")
            .arg(keys.held_counts("old"))
            .arg("q")
            .arg(3),
    )
    .await;
    cmd::<()>(
        &mut l,
        redis::cmd("ZADD")
            .arg(keys.leases())
            .arg(now_ms() + 60_000)
            .arg("old"),
    )
    .await;
    // And a worker of this build beside it.
    push(&mut l, "q", &["n1"]).await;
    assert_eq!(
        take_from(&mut l, &keys, "new", &["q".to_string()], 1, 0)
            .await
            .len(),
        1
    );
    let q = ["q".to_string()];
    let (counts, read) = queue_counts_read(&mut l, &keys, &q).await.expect("counts");
    assert_eq!((counts[0].in_flight, read), (4, 0), "from the counts");
    cmd::<()>(&mut l, redis::cmd("DEL").arg(keys.held_counts("old"))).await;
    let (counts, read) = queue_counts_read(&mut l, &keys, &q).await.expect("counts");
    assert_eq!((counts[0].in_flight, read), (4, 1), "read one by one");

    expire_lease(&mut l, &keys, "old").await;
    assert_eq!(reap(&mut l, &keys, 1).await.expect("reap"), (1, 3));
    assert_eq!(list(&mut l, "q").await, ["m3", "m1"]);
    assert_eq!(list(&mut l, "q\x06\x163").await, ["low"]);
    let left: bool = cmd(&mut l, redis::cmd("EXISTS").arg(&earlier)).await;
    assert!(!left);
}

#[tokio::test]
async fn a_hold_whose_queue_is_not_named_is_left_in_place() {
    let s = server();
    let mut l = lane(&s);
    let keys = Keys::new("ns");
    push(&mut l, "q", &["m1"]).await;
    let qk = vec!["q".to_string()];
    assert_eq!(take_from(&mut l, &keys, "w1", &qk, 1, 0).await.len(), 1);
    // A server that lost the named lists (eviction): nothing can say where
    // the hold goes, so the reaper leaves it (and its lease) alone, and
    // requeue refuses with an error naming the hold.
    cmd::<()>(&mut l, redis::cmd("DEL").arg(keys.hold_queues("w1"))).await;
    let err = requeue(&mut l, &keys, "w1", &[1])
        .await
        .expect_err("no queue to hand it back to");
    assert!(err.to_string().contains("hold 1"), "{err}");
    expire_lease(&mut l, &keys, "w1").await;
    assert_eq!(reap(&mut l, &keys, 1).await.expect("reap"), (0, 0));
    let held: u64 = cmd(&mut l, redis::cmd("HLEN").arg(keys.inflight("w1"))).await;
    assert_eq!(held, 1);
    let lease: Option<f64> = cmd(&mut l, redis::cmd("ZSCORE").arg(keys.leases()).arg("w1")).await;
    assert_eq!(lease, Some(0.0));
}
