//! Held counts (`Keys::held_counts`): `queue_stats.lua` counts a worker's
//! holds per queue without reading them, and the answer stays exact through
//! every way a hold ends, against a real `redis-server`.

use super::test_support::{cmd, dead_record};
use super::*;
use crate::config::RedisTarget;
use crate::proto::keys::{queue_key, queue_of_key};
use crate::test_redis::server;
use std::time::Duration;

const LEASE: Duration = Duration::from_secs(30);

/// Pushes `n` messages to `key` in pipelines of 10,000.
async fn fill(lane: &mut Lane, key: &str, n: usize) {
    for start in (0..n).step_by(10_000) {
        let mut p = redis::pipe();
        let batch: Vec<String> = (start..(start + 10_000).min(n))
            .map(|i| format!("{key}-{i}"))
            .collect();
        p.cmd("LPUSH").arg(key).arg(&batch).ignore();
        let conn = lane.conn("test").await.expect("conn");
        p.query_async::<()>(conn).await.expect("fill");
    }
}

async fn take_as(
    lane: &mut Lane,
    keys: &Keys,
    worker: &str,
    queue_keys: &[String],
    max: usize,
    last_seq: u64,
) -> Vec<Delivery> {
    // In takes of at most 1,000 (a script unpacks one take's holds at once).
    let mut got: Vec<Delivery> = Vec::new();
    while got.len() < max {
        let (slots, named) = super::test_support::slots(queue_keys);
        let take = Take {
            worker_id: worker,
            queue_keys,
            max: (max - got.len()).min(1_000),
            last_seq: last_seq + got.len() as u64,
            lease: LEASE,
            max_size: usize::MAX,
            landing: false,
            slots,
            named,
        };
        let batch = fetch(lane, keys, take).await.expect("fetch");
        if batch.is_empty() {
            break;
        }
        got.extend(batch);
    }
    got
}

fn ack(d: &Delivery) -> Settle {
    Settle {
        seq: d.seq,
        result: None,
        started: None,
    }
}

/// (ready, in flight) of each queue, and how many workers were read one by one.
async fn counts(lane: &mut Lane, keys: &Keys, queues: &[String]) -> (Vec<(u64, u64)>, u64) {
    let (c, read) = queue_counts_read(lane, keys, queues)
        .await
        .expect("queue counts");
    (c.iter().map(|c| (c.ready, c.in_flight)).collect(), read)
}

#[tokio::test]
async fn many_held_messages_are_counted_without_reading_them() {
    let s = server();
    let mut l = RedisPool::new(&RedisTarget::from_url(&s.url).expect("url"), 4, LEASE)
        .expect("pool")
        .lane();
    let keys = Keys::new("ns");
    let (a, a_low, b) = ("a".to_string(), queue_key("a", 6), "b".to_string());
    fill(&mut l, &a, 200_000).await;
    fill(&mut l, &a_low, 50_000).await;
    fill(&mut l, &b, 100_000).await;
    let names = vec![a.clone(), b.clone(), "idle".to_string()];

    // w1 serves a (both buckets) then b; w2 serves b; w3 serves a only.
    let w1_keys = [a.clone(), a_low.clone(), b.clone()];
    let mut w1 = take_as(&mut l, &keys, "w1", &w1_keys, 30_000, 0).await;
    w1.extend(
        take_as(
            &mut l,
            &keys,
            "w1",
            &[a_low.clone(), b.clone()],
            60_000,
            30_000,
        )
        .await,
    );
    let w2 = take_as(&mut l, &keys, "w2", std::slice::from_ref(&b), 40_000, 0).await;
    let w3 = take_as(&mut l, &keys, "w3", std::slice::from_ref(&a), 20_000, 0).await;
    // w1: 30,000 of a, then all 50,000 of a's low bucket and 10,000 of b.
    let held_in = |ds: &[Delivery], q: &str| {
        ds.iter()
            .filter(|d| queue_of_key(&d.queue_key) == q)
            .count() as u64
    };
    assert_eq!((held_in(&w1, "a"), held_in(&w1, "b")), (80_000, 10_000));
    let ttl: i64 = cmd(&mut l, redis::cmd("PTTL").arg(keys.held_counts("w1"))).await;
    assert!(ttl > 0, "a held-count hash expires with its worker: {ttl}");
    assert_eq!(
        counts(&mut l, &keys, &names).await,
        (vec![(150_000, 100_000), (50_000, 50_000), (0, 0)], 0),
        "ready 250,000 - 100,000 of a; 100,000 - 50,000 of b; none read one by one"
    );

    // Acknowledged: with the queue known (w1's first 1,000 and w2's), and
    // without (w1's next 1,000: ack.lua reads those holds), and again (a
    // repeated acknowledgement lowers nothing).
    let known: Vec<Settle> = w1[..1_000].iter().map(ack).collect();
    let queue_names: std::collections::HashMap<u64, String> = w1[..1_000]
        .iter()
        .map(|d| (d.seq, queue_of_key(&d.queue_key).to_owned()))
        .collect();
    let of = |seq: u64| queue_names.get(&seq).cloned();
    settle(&mut l, None, &keys, "w1", &known, &of, LEASE)
        .await
        .expect("settle");
    settle(&mut l, None, &keys, "w1", &known, &of, LEASE)
        .await
        .expect("settle again");
    let unknown: Vec<Settle> = w1[1_000..2_000].iter().map(ack).collect();
    settle(&mut l, None, &keys, "w1", &unknown, &|_| None, LEASE)
        .await
        .expect("settle");
    let w2_acks: Vec<Settle> = w2[..5_000].iter().map(ack).collect();
    settle(
        &mut l,
        None,
        &keys,
        "w2",
        &w2_acks,
        &|_| Some("b".into()),
        LEASE,
    )
    .await
    .expect("settle");
    // Handed back: the last 500 of w3 (back to a's ready list).
    let back: Vec<u64> = w3[19_500..].iter().map(|d| d.seq).collect();
    assert_eq!(
        requeue(&mut l, &keys, "w3", &back).await.expect("requeue"),
        500
    );
    // Retried into another queue (b), and dead-lettered: one each from w3.
    park(
        &mut l,
        &keys,
        now_ms() + 60_000,
        &b,
        b"again",
        Some(("w3", w3[0].seq, None)),
    )
    .await
    .expect("park held");
    let record = dead_record("a", "p", "w3");
    dead_letter(&mut l, &keys, "w3", w3[1].seq, &record)
        .await
        .expect("dead-letter");
    assert_eq!(
        counts(&mut l, &keys, &names).await,
        (
            vec![
                (150_500, 100_000 - 2_000 - 500 - 2),
                (50_000, 45_000),
                (0, 0)
            ],
            0
        ),
        "every way a hold ends lowers its queue's count"
    );

    // A reaper restores w2's holds while w2 still runs (its lease lapsed):
    // its counts go with its holds, so what it takes next is counted from
    // zero and nothing needs reading.
    cmd::<()>(
        &mut l,
        redis::cmd("ZADD").arg(keys.leases()).arg(0).arg("w2"),
    )
    .await;
    let (reaped, restored) = reap(&mut l, &keys, 1).await.expect("reap");
    assert_eq!((reaped, restored), (1, 35_000));
    let again = take_as(&mut l, &keys, "w2", std::slice::from_ref(&b), 100, 40_000).await;
    assert_eq!(again.len(), 100);
    let expected = vec![
        (150_500, 97_498),
        (50_000 + 35_000 - 100, 10_000 + 100),
        (0, 0),
    ];
    assert_eq!(
        counts(&mut l, &keys, &names).await,
        (expected.clone(), 0),
        "the reaper took w2's counts with its holds"
    );

    // Counts that do not add up to the holds (a worker of a build that kept
    // none, or a hash lost): that worker's holds are read one by one, and
    // the answer is still right.
    cmd::<()>(&mut l, redis::cmd("DEL").arg(keys.held_counts("w2"))).await;
    assert_eq!(
        counts(&mut l, &keys, &names).await,
        (expected, 1),
        "w2's counts are missing: its 100 holds are read"
    );
}
