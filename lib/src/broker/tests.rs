//! The broker's Redis steps against a real `redis-server` (started on a free
//! port per test; the tests are skipped loudly only where no server binary
//! exists, which CI never allows: it installs one).

use super::*;
use std::time::Duration;

use super::test_support::{calls, cmd, dead_record, lane, record_pending, take};
use crate::test_redis::server;

#[tokio::test]
async fn fetch_takes_oldest_first_and_records_each_hold() {
    let s = server();
    let mut l = lane(&s);
    let keys = Keys::new("ns");
    for m in ["m1", "m2", "m3"] {
        cmd::<()>(&mut l, redis::cmd("LPUSH").arg("q").arg(m)).await;
    }
    cmd::<()>(&mut l, redis::cmd("LPUSH").arg("q\x06\x163").arg("low")).await;
    let qk = vec!["q".to_string(), "q\x06\x163".to_string()];
    let got = fetch(&mut l, &keys, take(&qk, 2, 0)).await.expect("fetch");
    let payloads: Vec<_> = got
        .iter()
        .map(|d| d.text().unwrap_or("<not UTF-8>"))
        .collect();
    assert_eq!(payloads, ["m1", "m2"]);
    assert_eq!(got.iter().map(|d| d.seq).collect::<Vec<_>>(), [1, 2]);
    // A hold is the message alone; its number's slot names its list.
    let held: Vec<String> = cmd(&mut l, redis::cmd("HVALS").arg(keys.inflight("w1"))).await;
    assert_eq!(held.len(), 2);
    assert!(held.contains(&"m1".to_string()));
    let named: String = cmd(
        &mut l,
        redis::cmd("HGET").arg(keys.hold_queues("w1")).arg("queues"),
    )
    .await;
    assert_eq!(named, r#"["q","q\u0006\u00163"]"#);
    let lease: Option<f64> = cmd(&mut l, redis::cmd("ZSCORE").arg(keys.leases()).arg("w1")).await;
    assert!(lease.is_some_and(|d| d > now_ms() as f64));
    // Budget left over flows to the next list, after the first is empty.
    let got = fetch(&mut l, &keys, take(&qk, 5, 2)).await.expect("fetch");
    let payloads: Vec<_> = got
        .iter()
        .map(|d| d.text().unwrap_or("<not UTF-8>"))
        .collect();
    assert_eq!(payloads, ["m3", "low"]);
    assert_eq!(got[1].queue_key, "q\x06\x163");
    assert_eq!(
        got.iter().map(|d| d.seq).collect::<Vec<_>>(),
        [3, hold_number(1, 4)]
    );
    // Handed back by its number alone: the slot's name, JSON-escaped
    // priority separator and all, is the list's key.
    assert_eq!(
        requeue(&mut l, &keys, "w1", &[got[1].seq])
            .await
            .expect("requeue"),
        1
    );
    let low: Vec<String> = cmd(
        &mut l,
        redis::cmd("LRANGE").arg("q\x06\x163").arg(0).arg(-1),
    )
    .await;
    assert_eq!(low, ["low"]);
}

#[tokio::test]
async fn requeue_and_reap_put_messages_back_at_the_front_in_order() {
    let s = server();
    let mut l = lane(&s);
    let keys = Keys::new("ns");
    for m in ["a", "b", "c", "d"] {
        cmd::<()>(&mut l, redis::cmd("LPUSH").arg("q").arg(m)).await;
    }
    let qk = vec!["q".to_string()];
    let got = fetch(&mut l, &keys, take(&qk, 2, 0)).await.expect("fetch");
    let n = requeue(&mut l, &keys, "w1", &[got[0].seq, got[1].seq])
        .await
        .expect("requeue");
    assert_eq!(n, 2);
    let order: Vec<String> = cmd(&mut l, redis::cmd("LRANGE").arg("q").arg(0).arg(-1)).await;
    assert_eq!(
        order,
        ["d", "c", "b", "a"],
        "a is at the front (the RPOP end) again"
    );

    // A dead worker: held messages and its landing list return, oldest in front.
    fetch(&mut l, &keys, take(&qk, 2, 10)).await.expect("fetch");
    cmd::<()>(
        &mut l,
        redis::cmd("HSET")
            .arg(keys.landing_sources())
            .arg("w1")
            .arg("q"),
    )
    .await;
    cmd::<()>(
        &mut l,
        redis::cmd("LPUSH").arg(keys.landing("w1")).arg("landed"),
    )
    .await;
    cmd::<()>(&mut l, redis::cmd("SET").arg(keys.worker("w1")).arg("{}")).await;
    let (workers, restored) = reap(&mut l, &keys, now_ms() + 60_000).await.expect("reap");
    assert_eq!((workers, restored), (1, 3));
    let order: Vec<String> = cmd(&mut l, redis::cmd("LRANGE").arg("q").arg(0).arg(-1)).await;
    assert_eq!(order.len(), 5);
    assert_eq!(
        &order[3..],
        ["b", "a"],
        "the oldest held message is at the very front"
    );
    for key in [
        keys.inflight("w1"),
        keys.held_seqs("w1"),
        keys.landing("w1"),
        keys.worker("w1"),
    ] {
        let exists: bool = cmd(&mut l, redis::cmd("EXISTS").arg(&key)).await;
        assert!(!exists, "{key} left behind");
    }
    // A live lease is left alone.
    fetch(&mut l, &keys, take(&qk, 1, 20)).await.expect("fetch");
    assert_eq!(reap(&mut l, &keys, now_ms()).await.expect("reap"), (0, 0));
}

#[tokio::test]
async fn parked_messages_move_when_due_and_settling_twice_is_harmless() {
    let s = server();
    let mut l = lane(&s);
    let keys = Keys::new("ns");
    cmd::<()>(&mut l, redis::cmd("LPUSH").arg("q").arg("x")).await;
    let qk = vec!["q".to_string()];
    let got = fetch(&mut l, &keys, take(&qk, 1, 0)).await.expect("fetch");
    let due = now_ms() + 50;
    park(
        &mut l,
        &keys,
        due,
        "q",
        b"x-retry",
        Some(("w1", got[0].seq, None)),
    )
    .await
    .expect("park");
    // The same step again (a retry after a lost reply) must not duplicate it.
    park(
        &mut l,
        &keys,
        due,
        "q",
        b"x-retry",
        Some(("w1", got[0].seq, None)),
    )
    .await
    .expect("park");
    let parked: i64 = cmd(&mut l, redis::cmd("ZCARD").arg(keys.parked())).await;
    assert_eq!(parked, 1);
    let held: i64 = cmd(&mut l, redis::cmd("HLEN").arg(keys.inflight("w1"))).await;
    assert_eq!(held, 0);
    assert_eq!(
        promote(&mut l, &keys, due - 10, 10).await.expect("promote"),
        (0, Some(due))
    );
    assert_eq!(
        promote(&mut l, &keys, due, 10).await.expect("promote"),
        (1, None)
    );
    let q: Vec<String> = cmd(&mut l, redis::cmd("LRANGE").arg("q").arg(0).arg(-1)).await;
    assert_eq!(q, ["x-retry"]);

    let got = fetch(&mut l, &keys, take(&qk, 1, 5)).await.expect("fetch");
    let record = dead_record("q", "x-retry", "w1");
    dead_letter(&mut l, &keys, "w1", got[0].seq, &record)
        .await
        .expect("dead-letter");
    dead_letter(&mut l, &keys, "w1", got[0].seq, &record)
        .await
        .expect("dead-letter");
    let (dead, total) = dead_letters(&mut l, &keys, "q", 10).await.expect("read");
    assert_eq!(dead, [record]);
    assert_eq!(total, 1);
}

/// Promotion moves a batch with one command per kind of change: messages
/// parked by this build (the message alone, the queue key in the parked id)
/// and by earlier builds (`<queue key>\n<message>` under a plain id, in the
/// ZSET and HASH they used) alike, each queue key's in due order across
/// both, in batches larger than a script's slice.
#[tokio::test]
async fn promotion_moves_both_layouts_in_due_order_per_queue() {
    let s = server();
    let mut l = lane(&s);
    let keys = Keys::new("ns");
    let due = now_ms() - 10_000;
    let (n, mut expected) = (
        2_500,
        std::collections::BTreeMap::<&str, Vec<String>>::new(),
    );
    for i in 0..n {
        let qk = ["q", "other", "q\x06\x163"][i % 3];
        let msg = format!("m{i}");
        if i % 2 == 1 {
            park(&mut l, &keys, due + i as i64, qk, msg.as_bytes(), None)
                .await
                .expect("park");
        } else {
            // As an earlier build parked it, with its count.
            let id = format!("earlier-{i}");
            let name = qk.split('\x06').next().unwrap_or(qk);
            let value = format!("{qk}\n{msg}");
            let hset = redis::cmd("HSET")
                .arg(keys.delayed_messages())
                .arg(&id)
                .arg(value)
                .to_owned();
            let zadd = redis::cmd("ZADD")
                .arg(keys.delayed())
                .arg(due + i as i64)
                .arg(&id)
                .to_owned();
            let count = redis::cmd("HINCRBY")
                .arg(keys.delayed_counts())
                .arg(name)
                .arg(1)
                .to_owned();
            for mut c in [hset, zadd, count] {
                cmd::<()>(&mut l, &mut c).await;
            }
        }
        expected.entry(qk).or_default().push(msg);
    }
    // One more, not due yet: it stays, and its time is the next due.
    let later = now_ms() + 60_000;
    park(&mut l, &keys, later, "q", b"later", None)
        .await
        .expect("park");
    // The span covers both: the first due is an earlier build's, the last this one's.
    let span = delayed_span(&mut l, &keys).await.expect("span");
    assert_eq!(
        (span.parked, span.first_due_ms, span.last_due_ms),
        (2_501, Some(due), Some(later))
    );
    assert_eq!(
        promote(&mut l, &keys, now_ms(), 2_000)
            .await
            .expect("promote"),
        (2_000, Some(due + 2_000))
    );
    assert_eq!(
        promote(&mut l, &keys, now_ms(), 2_000)
            .await
            .expect("promote"),
        (500, Some(later))
    );
    for (qk, msgs) in &expected {
        // LPUSH puts each at the back, so the front (RPOP's end) is last.
        let mut got: Vec<String> = cmd(&mut l, redis::cmd("LRANGE").arg(*qk).arg(0).arg(-1)).await;
        got.reverse();
        assert_eq!(&got, msgs, "{qk:?}");
    }
    let counts: std::collections::HashMap<String, i64> =
        cmd(&mut l, redis::cmd("HGETALL").arg(keys.delayed_counts())).await;
    assert_eq!(counts, [("q".to_string(), 1)].into());
    let left: Vec<String> = cmd(&mut l, redis::cmd("HKEYS").arg(keys.parked_messages())).await;
    assert_eq!(left.len(), 1);
    assert!(left[0].ends_with("\nq"), "{left:?}");
    let parked: i64 = cmd(&mut l, redis::cmd("ZCARD").arg(keys.parked())).await;
    assert_eq!(parked, 1);
    let earlier: i64 = cmd(
        &mut l,
        redis::cmd("EXISTS")
            .arg(keys.delayed())
            .arg(keys.delayed_messages()),
    )
    .await;
    assert_eq!(earlier, 0, "the earlier build's set and hash are emptied");
}

#[tokio::test]
async fn settle_stores_expiring_results_then_releases() {
    let s = server();
    let mut l = lane(&s);
    let keys = Keys::new("ns");
    cmd::<()>(&mut l, redis::cmd("LPUSH").arg("q").arg("m")).await;
    let qk = vec!["q".to_string()];
    let got = fetch(&mut l, &keys, take(&qk, 1, 0)).await.expect("fetch");
    let batch = [Settle {
        seq: got[0].seq,
        result: Some(("id1".into(), "{\"status\":\"SUCCESS\"}".into())),
        started: None,
    }];
    settle(
        &mut l,
        None,
        &keys,
        "w1",
        &batch,
        &|_| None,
        Duration::from_secs(90),
    )
    .await
    .expect("settle");
    let ttl: i64 = cmd(&mut l, redis::cmd("TTL").arg("celery-task-meta-id1")).await;
    assert!((1..=90).contains(&ttl));
    let held: i64 = cmd(&mut l, redis::cmd("HLEN").arg(keys.inflight("w1"))).await;
    assert_eq!(held, 0);
}

#[tokio::test]
async fn queue_counts_are_one_snapshot_of_every_place_a_message_can_be() {
    let s = server();
    let mut l = lane(&s);
    let keys = Keys::new("ns");
    for m in ["a", "b", "c"] {
        cmd::<()>(&mut l, redis::cmd("LPUSH").arg("q").arg(m)).await;
    }
    cmd::<()>(&mut l, redis::cmd("LPUSH").arg("q\x06\x169").arg("low")).await;
    park(
        &mut l,
        &keys,
        now_ms() + 60_000,
        "q\x06\x163",
        b"later",
        None,
    )
    .await
    .expect("park");
    park(&mut l, &keys, now_ms() - 1, "q", b"due", None)
        .await
        .expect("park");
    let qk = vec!["q".to_string()];
    let got = fetch(&mut l, &keys, take(&qk, 2, 0)).await.expect("fetch");
    let record = DeadLetter {
        reason: "r".into(),
        queue: "q".into(),
        queue_key: "q".into(),
        task_id: Some("t1".into()),
        task: Some("x".into()),
        payload: "p".into(),
        payload_base64: None,
        payload_key: None,
        payload_size: None,
        worker: "w1".into(),
        at: "now".into(),
    };
    dead_letter(&mut l, &keys, "w1", got[0].seq, &record)
        .await
        .expect("dead-letter");
    let names = vec!["q".to_string(), "other".to_string()];
    let counts = queue_counts(&mut l, &keys, &names).await.expect("counts");
    let got: Vec<_> = counts
        .iter()
        .map(|c| (c.ready, c.delayed, c.in_flight, c.dead_lettered))
        .collect();
    assert_eq!(got, [(2, Some(2), 1, 1), (0, Some(0), 0, 0)]);
    assert_eq!(
        counts[0].oldest_ready_age, None,
        "raw messages carry no ready time"
    );
    assert_eq!(counts[1].oldest_ready_age, Some(Duration::ZERO), "empty");
    // A message that says when it became ready: its age is measured.
    let stamped = format!(
        r#"{{"headers": {{"taskstack_ready_at": {}}}}}"#,
        now_ms() - 5_000
    );
    cmd::<()>(&mut l, redis::cmd("LPUSH").arg("other").arg(&stamped)).await;
    let counts = queue_counts(&mut l, &keys, &names[1..])
        .await
        .expect("counts");
    let age = counts[0].oldest_ready_age.expect("an age");
    assert!(
        age >= Duration::from_secs(5) && age < Duration::from_secs(60),
        "{age:?}"
    );
    promote(&mut l, &keys, now_ms(), 10).await.expect("promote");
    let counts = queue_counts(&mut l, &keys, &names[..1])
        .await
        .expect("counts");
    assert_eq!((counts[0].ready, counts[0].delayed), (3, Some(1)));
}

#[tokio::test]
async fn revoking_and_starting_exclude_each_other() {
    let s = server();
    let mut l = lane(&s);
    let keys = Keys::new("ns");
    let ttl = Duration::from_secs(60);
    let revoked = r#"{"status":"REVOKED"}"#;
    let unknown = revoke(&mut l, &keys, "t1", revoked, ttl, true)
        .await
        .expect("revoke");
    assert_eq!(unknown, RevokeOutcome::Unknown);
    let pending =
        serde_json::to_string(&crate::proto::TaskResult::pending("t1", "x", "q")).expect("json");
    for id in ["t1", "t2"] {
        cmd::<()>(
            &mut l,
            redis::cmd("SET")
                .arg(crate::proto::keys::result_key(id))
                .arg(&pending),
        )
        .await;
    }
    let out = revoke(&mut l, &keys, "t1", revoked, ttl, true)
        .await
        .expect("revoke");
    assert_eq!(out, RevokeOutcome::Revoked);
    let again = revoke(&mut l, &keys, "t1", revoked, ttl, true)
        .await
        .expect("revoke");
    assert_eq!(again, RevokeOutcome::AlreadyRevoked);
    let started = r#"{"status":"STARTED"}"#.to_string();
    let starting = |id: &str| Starting {
        task_id: id.into(),
        record: started.clone(),
        seq: 0,
    };
    let go = start_batch(
        &mut l,
        &keys,
        None,
        &[starting("t1"), starting("t2")],
        ttl,
        true,
    )
    .await
    .expect("start");
    assert_eq!(
        go,
        [StartVerdict::Revoked, StartVerdict::Run],
        "the revoked task must not start"
    );
    let t1: String = cmd(
        &mut l,
        redis::cmd("GET").arg(crate::proto::keys::result_key("t1")),
    )
    .await;
    assert_eq!(t1, revoked, "starting must not overwrite a revocation");
    let late = revoke(&mut l, &keys, "t2", revoked, ttl, true)
        .await
        .expect("revoke");
    assert_eq!(
        late,
        RevokeOutcome::Refused(crate::proto::TaskState::Started)
    );
    let ttl_ms: i64 = cmd(&mut l, redis::cmd("PTTL").arg(keys.revoked("t1"))).await;
    assert!(
        ttl_ms > 50_000,
        "the revoked marker expires with the record"
    );
}

#[tokio::test]
async fn a_task_whose_record_is_final_is_not_started_again_where_records_mark_starts() {
    let s = server();
    let mut l = lane(&s);
    let keys = Keys::new("ns");
    let ttl = Duration::from_secs(60);
    let record = |status: crate::proto::TaskState| {
        let mut r = crate::proto::TaskResult::pending("x", "t", "q");
        r.status = status;
        serde_json::to_string(&r).expect("json")
    };
    use crate::proto::TaskState as S;
    // As taskstack stores them, and as Python Celery does (with spaces).
    let stored = [
        ("done", record(S::Success)),
        ("failed", record(S::Failure)),
        (
            "py-done",
            r#"{"status": "SUCCESS", "result": 3}"#.to_owned(),
        ),
        ("retrying", record(S::Retry)),
        ("crashed", record(S::Started)),
        ("pending", record(S::Pending)),
    ];
    for (id, rec) in &stored {
        cmd::<()>(
            &mut l,
            redis::cmd("SET")
                .arg(crate::proto::keys::result_key(id))
                .arg(rec),
        )
        .await;
    }
    let starting = |id: &str| Starting {
        task_id: id.into(),
        record: r#"{"status":"STARTED"}"#.into(),
        seq: 0,
    };
    let ids = [
        "done", "failed", "py-done", "retrying", "crashed", "pending", "new",
    ];
    let tasks: Vec<Starting> = ids.iter().map(|id| starting(id)).collect();
    let go = start_batch(&mut l, &keys, None, &tasks, ttl, true)
        .await
        .expect("start");
    use StartVerdict::{Finished, Run};
    assert_eq!(go, [Finished, Finished, Finished, Run, Run, Run, Run]);
    let done: String = cmd(
        &mut l,
        redis::cmd("GET").arg(crate::proto::keys::result_key("done")),
    )
    .await;
    assert_eq!(done, stored[0].1, "a final record is left as it was");
}

#[tokio::test]
async fn dead_letters_are_requeued_or_discarded_exactly_once() {
    let s = server();
    let mut l = lane(&s);
    let keys = Keys::new("ns");
    let qk = vec!["q".to_string()];
    for (i, m) in ["m1", "m2"].iter().enumerate() {
        cmd::<()>(&mut l, redis::cmd("LPUSH").arg("q").arg(*m)).await;
        let got = fetch(&mut l, &keys, take(&qk, 1, i as u64))
            .await
            .expect("fetch");
        let record = DeadLetter {
            reason: "r".into(),
            queue: "q".into(),
            queue_key: "q".into(),
            task_id: Some(format!("t{}", i + 1)),
            task: None,
            payload: (*m).into(),
            payload_base64: None,
            payload_key: None,
            payload_size: None,
            worker: "w1".into(),
            at: "now".into(),
        };
        dead_letter(&mut l, &keys, "w1", got[0].seq, &record)
            .await
            .expect("dead-letter");
    }
    cmd::<()>(
        &mut l,
        redis::cmd("RPUSH")
            .arg(keys.dead_letters("q"))
            .arg("not json"),
    )
    .await;
    let sel = DeadSelection::TaskIds(vec!["t2".into()]);
    let picked = pick_dead_letters(&mut l, &keys, "q", &sel)
        .await
        .expect("pick");
    assert_eq!(picked.len(), 1);
    let moved = move_dead_letters(&mut l, &keys, "q", DeadLetterAction::Requeue, &picked)
        .await
        .expect("requeue");
    assert_eq!(moved.len(), 1);
    let again = move_dead_letters(&mut l, &keys, "q", DeadLetterAction::Requeue, &picked)
        .await
        .expect("requeue");
    assert!(again.is_empty(), "a dead letter was requeued twice");
    let queue: Vec<String> = cmd(&mut l, redis::cmd("LRANGE").arg("q").arg(0).arg(-1)).await;
    assert_eq!(queue, ["m2"]);
    let oldest = DeadSelection::Oldest { limit: 10 };
    let all = pick_dead_letters(&mut l, &keys, "q", &oldest)
        .await
        .expect("pick");
    assert_eq!(all.len(), 1, "the record that is not JSON is not picked");
    let gone = move_dead_letters(&mut l, &keys, "q", DeadLetterAction::Discard, &all)
        .await
        .expect("discard");
    assert_eq!(gone[0].task_id.as_deref(), Some("t1"));
    let left: Vec<String> = cmd(
        &mut l,
        redis::cmd("LRANGE")
            .arg(keys.dead_letters("q"))
            .arg(0)
            .arg(-1),
    )
    .await;
    assert_eq!(left, ["not json"]);
}

#[tokio::test]
async fn a_message_restored_from_an_expired_lease_never_starts_on_its_old_worker() {
    let s = server();
    let mut l = lane(&s);
    let keys = Keys::new("ns");
    let queues = vec!["q".to_string()];
    for m in ["m1", "m2"] {
        cmd::<()>(&mut l, redis::cmd("LPUSH").arg("q").arg(m)).await;
    }
    let got = fetch(&mut l, &keys, take(&queues, 2, 0))
        .await
        .expect("fetch");
    assert_eq!(got.len(), 2);
    let ttl = Duration::from_secs(60);
    let starting = |id: &str, seq| Starting {
        task_id: id.into(),
        record: r#"{"status":"STARTED"}"#.into(),
        seq,
    };
    let first = start_batch(
        &mut l,
        &keys,
        Some("w1"),
        &[starting("a", got[0].seq)],
        ttl,
        true,
    )
    .await
    .expect("start");
    assert_eq!(first, [StartVerdict::Run]);
    // The lease expires (the worker stalled) and a reaper restores m2.
    let (workers, restored) = reap(&mut l, &keys, now_ms() + 60_000).await.expect("reap");
    assert_eq!((workers, restored), (1, 2));
    let late = start_batch(
        &mut l,
        &keys,
        Some("w1"),
        &[starting("b", got[1].seq)],
        ttl,
        true,
    )
    .await
    .expect("start");
    assert_eq!(
        late,
        [StartVerdict::NotHeld],
        "a restored message must not start here"
    );
    let record: Option<String> = cmd(
        &mut l,
        redis::cmd("GET").arg(crate::proto::keys::result_key("b")),
    )
    .await;
    assert_eq!(
        record, None,
        "no STARTED record for a task that did not start"
    );
    // The same answer through the separate-backend path (one SMISMEMBER).
    #[cfg(feature = "worker")]
    {
        let holds = held(&mut l, &keys, "w1", &[got[0].seq, got[1].seq])
            .await
            .expect("held");
        assert_eq!(holds, [false, false]);
    }
    let queued: Vec<String> = cmd(&mut l, redis::cmd("LRANGE").arg("q").arg(0).arg(-1)).await;
    assert_eq!(
        queued.len(),
        2,
        "both messages are back on the queue: {queued:?}"
    );
}

#[tokio::test]
async fn non_utf8_messages_are_delivered_as_bytes_and_dead_lettered_with_base64() {
    let s = server();
    let mut l = lane(&s);
    let keys = Keys::new("ns");
    let queues = vec!["celery".to_string()];
    let raw: &[u8] = b"\xff\xfe not text \x80";
    cmd::<()>(&mut l, redis::cmd("LPUSH").arg("celery").arg(raw)).await;
    let got = fetch(&mut l, &keys, take(&queues, 4, 0))
        .await
        .expect("fetch");
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].payload, raw);
    assert_eq!(got[0].text(), None);
    let mut record = DeadLetter {
        reason: "not UTF-8".into(),
        queue: "celery".into(),
        queue_key: "celery".into(),
        task_id: None,
        task: None,
        payload: String::new(),
        payload_base64: None,
        payload_key: None,
        payload_size: None,
        worker: "w1".into(),
        at: "now".into(),
    };
    record.set_payload(&got[0].payload);
    dead_letter(&mut l, &keys, "w1", got[0].seq, &record)
        .await
        .expect("dead-letter");
    let (items, total) = dead_letters(&mut l, &keys, "celery", 10)
        .await
        .expect("read");
    assert_eq!(total, 1);
    use base64::Engine as _;
    let b64 = items[0].payload_base64.as_deref().expect("base64 payload");
    assert_eq!(
        base64::engine::general_purpose::STANDARD
            .decode(b64)
            .expect("base64"),
        raw
    );
    let inflight: u64 = cmd(&mut l, redis::cmd("HLEN").arg(keys.inflight("w1"))).await;
    assert_eq!(inflight, 0, "nothing stays held");
    // It could never run: a requeue leaves it listed, a discard removes it.
    let all = DeadSelection::Oldest { limit: 10 };
    let picked = pick_dead_letters(&mut l, &keys, "celery", &all)
        .await
        .expect("pick");
    let moved = move_dead_letters(&mut l, &keys, "celery", DeadLetterAction::Requeue, &picked)
        .await
        .expect("requeue");
    assert!(moved.is_empty(), "not requeued: {moved:?}");
    let queued: u64 = cmd(&mut l, redis::cmd("LLEN").arg("celery")).await;
    assert_eq!(queued, 0);
    let moved = move_dead_letters(&mut l, &keys, "celery", DeadLetterAction::Discard, &picked)
        .await
        .expect("discard");
    assert_eq!(moved.len(), 1);
}

async fn status_of(l: &mut Lane, id: &str) -> Option<String> {
    let raw: Option<String> =
        cmd(l, redis::cmd("GET").arg(crate::proto::keys::result_key(id))).await;
    raw.map(|r| {
        let v: serde_json::Value = serde_json::from_str(&r).expect("record");
        v["status"].as_str().unwrap_or_default().to_owned()
    })
}

#[tokio::test]
async fn a_batch_start_checks_holds_and_revocations_once_and_marks_without_records() {
    let s = server();
    let mut l = lane(&s);
    let keys = Keys::new("ns");
    let qk = vec!["q".to_string()];
    for m in ["m1", "m2", "m3"] {
        cmd::<()>(&mut l, redis::cmd("LPUSH").arg("q").arg(m)).await;
    }
    let got = fetch(&mut l, &keys, take(&qk, 3, 0)).await.expect("fetch");
    record_pending(&mut l, &["a", "b", "c"]).await;
    let ttl = Duration::from_secs(60);
    let revoked = r#"{"status":"REVOKED"}"#;
    let out = revoke(&mut l, &keys, "c", revoked, ttl, true).await;
    assert_eq!(out.expect("revoke"), RevokeOutcome::Revoked);
    // b's hold is gone (as after a reaper restored it: the hold and its
    // sequence number go in one step).
    cmd::<()>(
        &mut l,
        redis::cmd("HDEL").arg(keys.inflight("w1")).arg(got[1].seq),
    )
    .await;
    cmd::<()>(
        &mut l,
        redis::cmd("SREM").arg(keys.held_seqs("w1")).arg(got[1].seq),
    )
    .await;
    let starting = |id: &str, seq| Starting {
        task_id: id.into(),
        record: r#"{"status":"STARTED"}"#.into(),
        seq,
    };
    let batch = [
        starting("a", got[0].seq),
        starting("b", got[1].seq),
        starting("c", got[2].seq),
    ];
    cmd::<()>(&mut l, redis::cmd("CONFIG").arg("RESETSTAT")).await;
    let go = start_batch(&mut l, &keys, Some("w1"), &batch, ttl, false)
        .await
        .expect("start");
    assert_eq!(
        go,
        [
            StartVerdict::Run,
            StartVerdict::NotHeld,
            StartVerdict::Revoked
        ]
    );
    // One SMISMEMBER for the holds (no held message read), one HSET for
    // the marks, no record written.
    assert_eq!(calls(&mut l, "smismember").await, 1);
    assert_eq!(calls(&mut l, "hmget").await, 0);
    assert_eq!(calls(&mut l, "hexists").await, 0);
    assert_eq!(calls(&mut l, "hset").await, 1);
    assert_eq!(calls(&mut l, "set").await, 0);
    assert_eq!(status_of(&mut l, "a").await.as_deref(), Some("PENDING"));
    let mark: Option<u64> = cmd(&mut l, redis::cmd("HGET").arg(keys.running("w1")).arg("a")).await;
    assert_eq!(mark, Some(got[0].seq));
    // Running: the revocation is refused, as on a STARTED record.
    let out = revoke(&mut l, &keys, "a", revoked, ttl, true).await;
    assert_eq!(
        out.expect("revoke"),
        RevokeOutcome::Refused(crate::proto::TaskState::Started)
    );
    // The acknowledgement takes the mark with the hold.
    let done = [Settle {
        seq: got[0].seq,
        result: Some(("a".into(), r#"{"status":"SUCCESS"}"#.into())),
        started: Some("a".into()),
    }];
    settle(&mut l, None, &keys, "w1", &done, &|_| None, ttl)
        .await
        .expect("settle");
    let left: Vec<String> = cmd(&mut l, redis::cmd("HKEYS").arg(keys.inflight("w1"))).await;
    assert_eq!(left, [got[2].seq.to_string()]);
    let marks: u64 = cmd(&mut l, redis::cmd("HLEN").arg(keys.running("w1"))).await;
    assert_eq!(marks, 0, "the mark goes with the hold");
    let out = revoke(&mut l, &keys, "a", revoked, ttl, true).await;
    assert_eq!(
        out.expect("revoke"),
        RevokeOutcome::Refused(crate::proto::TaskState::Success)
    );

    // Tracked: the STARTED record is written as well.
    cmd::<()>(&mut l, redis::cmd("LPUSH").arg("q").arg("m4")).await;
    let got = fetch(&mut l, &keys, take(&qk, 1, 10)).await.expect("fetch");
    record_pending(&mut l, &["d"]).await;
    let go = start_batch(
        &mut l,
        &keys,
        Some("w1"),
        &[starting("d", got[0].seq)],
        ttl,
        true,
    )
    .await
    .expect("start");
    assert_eq!(go, [StartVerdict::Run]);
    assert_eq!(status_of(&mut l, "d").await.as_deref(), Some("STARTED"));
}

/// A long-lived worker's running hash holds only the tasks it runs now: a
/// task that started and was then parked for a retry, or dead-lettered,
/// takes its start mark with its hold (before, the marks of such tasks
/// stayed until the worker's lease ended). A mark naming another hold of
/// the same task id stays.
#[tokio::test]
async fn a_retried_or_dead_lettered_task_leaves_no_start_mark() {
    let s = server();
    let mut l = lane(&s);
    let keys = Keys::new("ns");
    let qk = vec!["q".to_string()];
    for m in ["m1", "m2", "m3", "m4"] {
        cmd::<()>(&mut l, redis::cmd("LPUSH").arg("q").arg(m)).await;
    }
    let got = fetch(&mut l, &keys, take(&qk, 4, 0)).await.expect("fetch");
    let ttl = Duration::from_secs(60);
    // c1 and c2: two copies of one task (a duplicate message); the second
    // one runs.
    let batch: Vec<Starting> = [("a", 0), ("b", 1), ("c", 3)]
        .iter()
        .map(|(id, i)| Starting {
            task_id: (*id).into(),
            record: String::new(),
            seq: got[*i].seq,
        })
        .collect();
    let go = start_batch(&mut l, &keys, Some("w1"), &batch, ttl, false)
        .await
        .expect("start");
    assert_eq!(go, [StartVerdict::Run; 3]);
    async fn marks(l: &mut Lane) -> Vec<String> {
        let key = Keys::new("ns").running("w1");
        let mut m: Vec<String> = cmd(l, redis::cmd("HKEYS").arg(key)).await;
        m.sort();
        m
    }
    assert_eq!(marks(&mut l).await, ["a", "b", "c"]);

    // a asks to be retried: parked, its hold and its mark gone in one step.
    park(
        &mut l,
        &keys,
        now_ms() + 60_000,
        "q",
        b"a-retry",
        Some(("w1", got[0].seq, Some("a"))),
    )
    .await
    .expect("park");
    assert_eq!(
        marks(&mut l).await,
        ["b", "c"],
        "a's mark went with its hold"
    );
    // b gives up (retries exhausted): dead-lettered with its mark.
    let dead = |id: &str| DeadLetter {
        reason: "retries exhausted".into(),
        queue: "q".into(),
        queue_key: "q".into(),
        task_id: Some(id.into()),
        task: Some("t".into()),
        payload: String::new(),
        payload_base64: None,
        payload_key: None,
        payload_size: None,
        worker: "w1".into(),
        at: "now".into(),
    };
    dead_letter(&mut l, &keys, "w1", got[1].seq, &dead("b"))
        .await
        .expect("dead-letter");
    assert_eq!(marks(&mut l).await, ["c"], "b's mark went with its hold");
    // The first copy of c (never started) is dead-lettered: the mark of
    // the copy that runs stays, and a revocation is still refused.
    dead_letter(&mut l, &keys, "w1", got[2].seq, &dead("c"))
        .await
        .expect("dead-letter");
    assert_eq!(
        marks(&mut l).await,
        ["c"],
        "the running copy keeps its mark"
    );
    let held: Vec<String> = cmd(&mut l, redis::cmd("HKEYS").arg(keys.inflight("w1"))).await;
    assert_eq!(held, [got[3].seq.to_string()]);
    record_pending(&mut l, &["a", "c"]).await;
    let revoked = r#"{"status":"REVOKED"}"#;
    let out = revoke(&mut l, &keys, "c", revoked, ttl, true).await;
    assert_eq!(
        out.expect("revoke"),
        RevokeOutcome::Refused(crate::proto::TaskState::Started)
    );
    // a waits for its retry: revocable.
    let out = revoke(&mut l, &keys, "a", revoked, ttl, true).await;
    assert_eq!(out.expect("revoke"), RevokeOutcome::Revoked);
}

#[tokio::test]
async fn tasks_started_by_a_reaped_worker_stay_unrevocable() {
    let s = server();
    let mut l = lane(&s);
    let keys = Keys::new("ns");
    let qk = vec!["q".to_string()];
    for m in ["m1", "m2"] {
        cmd::<()>(&mut l, redis::cmd("LPUSH").arg("q").arg(m)).await;
    }
    let got = fetch(&mut l, &keys, take(&qk, 2, 0)).await.expect("fetch");
    record_pending(&mut l, &["a", "b"]).await;
    let ttl = Duration::from_secs(60);
    let a = Starting {
        task_id: "a".into(),
        record: String::new(),
        seq: got[0].seq,
    };
    let go = start_batch(&mut l, &keys, Some("w1"), &[a], ttl, false)
        .await
        .expect("start");
    assert_eq!(go, [StartVerdict::Run]);
    // The worker stalls while running a; its lease expires.
    let (workers, restored) = reap(&mut l, &keys, now_ms() + 60_000).await.expect("reap");
    assert_eq!((workers, restored), (1, 2));
    let marks: bool = cmd(&mut l, redis::cmd("EXISTS").arg(keys.running("w1"))).await;
    assert!(!marks, "the reaper deletes the dead worker's marks");
    let queued: Vec<String> = cmd(&mut l, redis::cmd("LRANGE").arg("q").arg(0).arg(-1)).await;
    assert_eq!(queued, ["m2", "m1"], "both back, oldest at the front");
    // a may still be running in the stalled worker: never reported revoked.
    let revoked = r#"{"status":"REVOKED"}"#;
    let out = revoke(&mut l, &keys, "a", revoked, ttl, true).await;
    assert_eq!(
        out.expect("revoke"),
        RevokeOutcome::Refused(crate::proto::TaskState::Started)
    );
    let pttl: i64 = cmd(&mut l, redis::cmd("PTTL").arg(keys.started("a"))).await;
    assert!(pttl > 3_600_000, "the started marker lasts: {pttl}");
    // b never started: revoked.
    let out = revoke(&mut l, &keys, "b", revoked, ttl, true).await;
    assert_eq!(out.expect("revoke"), RevokeOutcome::Revoked);
}

#[tokio::test]
async fn fetch_polls_only_lists_that_hold_messages() {
    let s = server();
    let mut l = lane(&s);
    let keys = Keys::new("ns");
    let qk: Vec<String> = crate::proto::keys::PRIORITY_BUCKETS
        .iter()
        .map(|b| crate::proto::keys::queue_key("q", *b))
        .collect();
    cmd::<()>(&mut l, redis::cmd("LPUSH").arg(&qk[2]).arg("low")).await;
    cmd::<()>(&mut l, redis::cmd("CONFIG").arg("RESETSTAT")).await;
    let mut t = take(&qk, 4, 0);
    t.landing = false;
    let got = fetch(&mut l, &keys, t).await.expect("fetch");
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].queue_key, qk[2]);
    // The first list, then the others in order until the one non-empty
    // list the EXISTS counted was found: bucket 9 is not popped.
    assert_eq!(calls(&mut l, "rpop").await, 3);
    assert_eq!(calls(&mut l, "exists").await, 1);
    // Nothing anywhere: one RPOP and one EXISTS.
    cmd::<()>(&mut l, redis::cmd("CONFIG").arg("RESETSTAT")).await;
    let got = fetch(&mut l, &keys, t).await.expect("fetch");
    assert!(got.is_empty());
    assert_eq!(calls(&mut l, "rpop").await, 1);
    // A message moved to the landing list is taken when the flag says so.
    cmd::<()>(
        &mut l,
        redis::cmd("LPUSH").arg(keys.landing("w1")).arg("landed"),
    )
    .await;
    let got = fetch(&mut l, &keys, take(&qk, 4, 10)).await.expect("fetch");
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].text(), Some("landed"));
}

#[test]
fn only_a_broken_connection_counts_as_lost() {
    let io = |kind| BrokerError::Redis {
        op: "read result",
        source: redis::RedisError::from(std::io::Error::new(kind, "gone")),
    };
    assert!(io(std::io::ErrorKind::BrokenPipe).is_connection_lost());
    assert!(io(std::io::ErrorKind::ConnectionReset).is_connection_lost());
    let refused_by_server = BrokerError::Redis {
        op: "read result",
        source: redis::RedisError::from((
            redis::ErrorKind::Server(redis::ServerErrorKind::ReadOnly),
            "READONLY",
        )),
    };
    assert!(!refused_by_server.is_connection_lost());
    let no_connection = BrokerError::Connect {
        op: "read result",
        target: "redis://127.0.0.1:1/0".into(),
        reason: "refused".into(),
    };
    assert!(!no_connection.is_connection_lost());
}
