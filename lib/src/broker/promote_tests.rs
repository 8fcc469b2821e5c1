//! Promotion of parked messages (`delay.lua`, `promote.lua`) while several
//! workers promote at once and producers keep parking. Against a real
//! `redis-server`.

use super::test_support::{cmd, lane, list};
use super::*;
use crate::test_redis::server;
use std::collections::HashMap;

/// Promoters racing on the same due messages, while more are parked with
/// the same due times, move every message exactly once and leave the
/// delayed counts exact (here: none left) and nothing parked behind.
#[tokio::test]
async fn racing_promoters_move_each_message_once() {
    let s = server();
    let keys = Keys::new("ns");
    let due = now_ms() - 1_000;
    let (per_parker, parkers) = (600, 2);
    let parking: Vec<_> = (0..parkers)
        .map(|p| {
            let (mut l, keys) = (lane(&s), keys.clone());
            tokio::spawn(async move {
                for i in 0..per_parker {
                    let msg = format!("p{p}-{i}");
                    let qk = ["a", "b\x06\x163"][i % 2];
                    park(
                        &mut l,
                        &keys,
                        due + (i % 12) as i64,
                        qk,
                        msg.as_bytes(),
                        None,
                    )
                    .await
                    .expect("park");
                }
            })
        })
        .collect();
    let promoting: Vec<_> = (0..4)
        .map(|_| {
            let (mut l, keys) = (lane(&s), keys.clone());
            tokio::spawn(async move {
                let mut moved = 0;
                for _ in 0..200 {
                    moved += promote(&mut l, &keys, now_ms(), 37)
                        .await
                        .expect("promote")
                        .0;
                    tokio::task::yield_now().await;
                }
                moved
            })
        })
        .collect();
    for p in parking {
        p.await.expect("parker");
    }
    let mut moved = 0;
    for p in promoting {
        moved += p.await.expect("promoter");
    }
    let mut l = lane(&s);
    // What the racers left: 1,200 messages need at most 33 more steps.
    let mut ran_dry = false;
    for _ in 0..100 {
        let (n, next) = promote(&mut l, &keys, now_ms(), 37).await.expect("promote");
        moved += n;
        if n == 0 {
            assert_eq!(next, None, "nothing left parked");
            ran_dry = true;
            break;
        }
    }
    assert!(ran_dry, "promotion never ran dry ({moved} moved)");
    assert_eq!(moved, (per_parker * parkers) as u64);
    let mut all = list(&mut l, "a").await;
    all.extend(list(&mut l, "b\x06\x163").await);
    all.sort();
    let mut want: Vec<String> = (0..parkers)
        .flat_map(|p| (0..per_parker).map(move |i| format!("p{p}-{i}")))
        .collect();
    want.sort();
    assert_eq!(all, want, "each message once");
    let counts: HashMap<String, i64> =
        cmd(&mut l, redis::cmd("HGETALL").arg(keys.delayed_counts())).await;
    assert!(counts.is_empty(), "{counts:?}");
    let left: i64 = cmd(&mut l, &mut redis::cmd("DBSIZE")).await;
    assert_eq!(left, 2, "only the two queues are left");
}
