//! Held sequences (`Keys::held_seqs`): the set names exactly the fields of a
//! worker's in-flight hash through every way a hold begins and ends, so the
//! start of a batch checks its holds without reading the held messages; and
//! where the two disagree (the hash deleted without the set, as reapers of
//! earlier builds did; the set expired) the hash is read instead. Against
//! a real `redis-server`.

use super::test_support::{cmd, dead_record, lane, take};
use super::*;
use crate::test_redis::server;
use std::collections::BTreeSet;
use std::time::Duration;

const LEASE: Duration = Duration::from_secs(30);

/// The in-flight hash's fields and the held-sequence set's members.
async fn fields_and_members(l: &mut Lane, keys: &Keys) -> (BTreeSet<u64>, BTreeSet<u64>) {
    let fields: Vec<u64> = cmd(l, redis::cmd("HKEYS").arg(keys.inflight("w1"))).await;
    let members: Vec<u64> = cmd(l, redis::cmd("SMEMBERS").arg(keys.held_seqs("w1"))).await;
    (fields.into_iter().collect(), members.into_iter().collect())
}

async fn assert_mirrored(l: &mut Lane, keys: &Keys, expected: &[u64], step: &str) {
    let (fields, members) = fields_and_members(l, keys).await;
    let expected: BTreeSet<u64> = expected.iter().copied().collect();
    assert_eq!(fields, expected, "in-flight hash after {step}");
    assert_eq!(members, expected, "held-sequence set after {step}");
}

/// Worker `w1` takes two of four messages on queue `q`, `parted` (its
/// in-flight hash or its held-sequence set) is deleted, and the worker,
/// still running, takes the other two. Returns the hash's fields and the
/// set's members then.
async fn take_part_take(l: &mut Lane, keys: &Keys, parted: &str) -> (BTreeSet<u64>, BTreeSet<u64>) {
    let qk = vec!["q".to_string()];
    for i in 1..=4 {
        cmd::<()>(l, redis::cmd("LPUSH").arg("q").arg(format!("m{i}"))).await;
    }
    fetch(l, keys, take(&qk, 2, 0)).await.expect("fetch");
    cmd::<()>(l, redis::cmd("DEL").arg(parted)).await;
    fetch(l, keys, take(&qk, 2, 2)).await.expect("fetch");
    fields_and_members(l, keys).await
}

fn starting(id: &str, seq: u64) -> Starting {
    Starting {
        task_id: id.into(),
        record: r#"{"status":"STARTED"}"#.into(),
        seq,
    }
}

/// Settles `seq` without a result.
fn ack(seq: u64) -> Settle {
    Settle {
        seq,
        result: None,
        started: None,
    }
}

#[tokio::test]
async fn the_held_sequences_follow_the_holds_through_every_step() {
    let s = server();
    let mut l = lane(&s);
    let keys = Keys::new("ns");
    let qk = vec!["q".to_string(), "other".to_string()];
    for i in 1..=8 {
        cmd::<()>(&mut l, redis::cmd("LPUSH").arg("q").arg(format!("m{i}"))).await;
    }
    cmd::<()>(&mut l, redis::cmd("LPUSH").arg("other").arg("o1")).await;
    // Taken: from the landing list (a blocking wait's catch) and two lists.
    assert!(
        wait_for_message(&mut l, &keys, "w1", "q", Duration::from_secs(1))
            .await
            .expect("wait")
            .is_some()
    );
    let got = fetch(&mut l, &keys, take(&qk, 9, 0)).await.expect("fetch");
    let seqs: Vec<u64> = got.iter().map(|d| d.seq).collect();
    // The ninth message came from the second list: its slot is 1.
    let o1 = hold_number(1, 9);
    assert_eq!(seqs, [1, 2, 3, 4, 5, 6, 7, 8, o1]);
    assert_mirrored(&mut l, &keys, &seqs, "fetch").await;
    let ttl: i64 = cmd(&mut l, redis::cmd("PTTL").arg(keys.held_seqs("w1"))).await;
    assert!(
        ttl > 0,
        "a held-sequence set expires with its worker: {ttl}"
    );

    // Acknowledged with the queue known, then without it (ack.lua reads
    // those holds), then again (nothing left to remove).
    let of_q = |_| Some("q".to_string());
    settle(&mut l, None, &keys, "w1", &[ack(1), ack(2)], &of_q, LEASE)
        .await
        .expect("settle");
    settle(&mut l, None, &keys, "w1", &[ack(3)], &|_| None, LEASE)
        .await
        .expect("settle");
    settle(&mut l, None, &keys, "w1", &[ack(3)], &|_| None, LEASE)
        .await
        .expect("settle again");
    assert_mirrored(&mut l, &keys, &[4, 5, 6, 7, 8, o1], "acknowledgements").await;

    // Handed back, parked for a retry, dead-lettered.
    assert_eq!(
        requeue(&mut l, &keys, "w1", &[4]).await.expect("requeue"),
        1
    );
    park(
        &mut l,
        &keys,
        now_ms() + 60_000,
        "q",
        b"again",
        Some(("w1", 5, None)),
    )
    .await
    .expect("park");
    let record = dead_record("q", "p", "w1");
    dead_letter(&mut l, &keys, "w1", 6, &record)
        .await
        .expect("dead-letter");
    assert_mirrored(&mut l, &keys, &[7, 8, o1], "requeue, park, dead-letter").await;

    // A batch start checks the set, and reads no held message.
    cmd::<()>(&mut l, redis::cmd("CONFIG").arg("RESETSTAT")).await;
    let batch = [starting("a", 7), starting("b", 6), starting("c", 8)];
    let go = start_batch(&mut l, &keys, Some("w1"), &batch, LEASE, false)
        .await
        .expect("start");
    assert_eq!(
        go,
        [StartVerdict::Run, StartVerdict::NotHeld, StartVerdict::Run]
    );
    let info: String = cmd(&mut l, redis::cmd("INFO").arg("commandstats")).await;
    assert!(info.contains("cmdstat_smismember:calls=1,"), "{info}");
    assert!(!info.contains("cmdstat_hmget"), "{info}");
    assert_eq!(
        held(&mut l, &keys, "w1", &[6, 7, o1]).await.expect("held"),
        [false, true, true]
    );

    // Reaped: the set goes with the hash.
    cmd::<()>(
        &mut l,
        redis::cmd("ZADD").arg(keys.leases()).arg(0).arg("w1"),
    )
    .await;
    assert_eq!(reap(&mut l, &keys, 1).await.expect("reap"), (1, 3));
    assert_mirrored(&mut l, &keys, &[], "reap").await;
    let left: bool = cmd(&mut l, redis::cmd("EXISTS").arg(keys.held_seqs("w1"))).await;
    assert!(!left, "an empty set leaves no key");
}

#[tokio::test]
async fn holds_deleted_without_their_sequences_are_read_from_the_hash() {
    let s = server();
    let mut l = lane(&s);
    let keys = Keys::new("ns");
    // Both holds restored the way reapers of earlier builds did it: the
    // hash deleted (the messages pushed back), not the set. Those reapers
    // now stop before this build's holds (see `hold_slots_tests`); the
    // check for such a parting stays.
    let (fields, members) = take_part_take(&mut l, &keys, &keys.inflight("w1")).await;
    assert_eq!(fields, BTreeSet::from([3, 4]));
    assert_eq!(members, BTreeSet::from([1, 2, 3, 4]));

    let batch = [starting("a", 1), starting("b", 2), starting("c", 3)];
    let go = start_batch(&mut l, &keys, Some("w1"), &batch, LEASE, false)
        .await
        .expect("start");
    assert_eq!(
        go,
        [
            StartVerdict::NotHeld,
            StartVerdict::NotHeld,
            StartVerdict::Run
        ],
        "a restored message must not start here"
    );
    assert_eq!(
        held(&mut l, &keys, "w1", &[1, 2, 4]).await.expect("held"),
        [false, false, true]
    );

    // Settling the stale ones clears the set, and it answers alone again.
    settle(
        &mut l,
        None,
        &keys,
        "w1",
        &[ack(1), ack(2)],
        &|_| None,
        LEASE,
    )
    .await
    .expect("settle");
    let (fields, members) = fields_and_members(&mut l, &keys).await;
    assert_eq!((fields.len(), members), (2, BTreeSet::from([3, 4])));
    cmd::<()>(&mut l, redis::cmd("CONFIG").arg("RESETSTAT")).await;
    let go = start_batch(&mut l, &keys, Some("w1"), &[starting("d", 4)], LEASE, false)
        .await
        .expect("start");
    assert_eq!(go, [StartVerdict::Run]);
    let info: String = cmd(&mut l, redis::cmd("INFO").arg("commandstats")).await;
    assert!(!info.contains("cmdstat_hmget"), "{info}");
}

#[tokio::test]
async fn a_set_that_expired_is_read_around_and_the_heartbeat_renews_it() {
    let s = server();
    let mut l = lane(&s);
    let keys = Keys::new("ns");
    // The set expired (a heartbeat that stopped for three lease lengths)
    // while the worker still holds both.
    let (fields, members) = take_part_take(&mut l, &keys, &keys.held_seqs("w1")).await;
    assert_eq!(fields, BTreeSet::from([1, 2, 3, 4]));
    assert_eq!(members, BTreeSet::from([3, 4]));
    let batch = [starting("a", 1), starting("b", 2), starting("c", 3)];
    let go = start_batch(&mut l, &keys, Some("w1"), &batch, LEASE, false)
        .await
        .expect("start");
    assert_eq!(
        go,
        [StartVerdict::Run, StartVerdict::Run, StartVerdict::Run],
        "held messages still start"
    );
    assert_eq!(
        held(&mut l, &keys, "w1", &[1, 2, 4]).await.expect("held"),
        [true, true, true]
    );

    // The heartbeat renews the set's expiry.
    cmd::<()>(
        &mut l,
        redis::cmd("PEXPIRE").arg(keys.held_seqs("w1")).arg(1_000),
    )
    .await;
    let record = crate::backend::conformance::worker_record("w1");
    heartbeat(&mut l, &keys, &record, "q", LEASE)
        .await
        .expect("heartbeat");
    let ttl: i64 = cmd(&mut l, redis::cmd("PTTL").arg(keys.held_seqs("w1"))).await;
    assert!(ttl > 60_000, "renewed for three lease lengths: {ttl}");
}
