//! The RabbitMQ backend with everything but the messages in PostgreSQL (no
//! Redis): a real RabbitMQ (the shared node, a vhost per test) and a
//! private `postgres` per test.

use super::tests::{LEASE, ack, id_of, message, out, take_n};
use super::{AmqpBackend, QueueOptions};
use crate::backend::postgres::{PgRecords, prepare};
use crate::backend::tests::pg_target;
use crate::backend::{Acquired, Backend, PendingRecord, SlotOutcome, SlotPublish, Use};
use crate::broker::{
    DeadLetter, DeadLetterAction, DeadSelection, RevokeOutcome, StartVerdict, Starting,
    WorkerRecord,
};
use crate::proto::TaskState;
use crate::test_postgres::PgServer;
use crate::test_rabbitmq;
use std::time::Duration;

struct Setup {
    backend: AmqpBackend,
    pg: PgServer,
    db: String,
}

impl Setup {
    async fn new(hint: &str) -> Self {
        let url = test_rabbitmq::shared().vhost(hint);
        let pg = PgServer::start();
        let db = pg.create_database();
        let target = pg_target(&pg.url(&db));
        prepare(&target, Duration::from_secs(5), Duration::from_secs(5))
            .await
            .expect("migrate");
        let records =
            PgRecords::open(&target, 4, Duration::from_secs(5), "amqp-pg").expect("records");
        let backend = AmqpBackend::with_postgres(
            url,
            QueueOptions::default(),
            Duration::from_secs(10),
            16,
            records,
        );
        Self { backend, pg, db }
    }

    fn psql(&self, sql: &str) -> String {
        self.pg.psql(&self.db, sql).expect("psql").trim().to_owned()
    }
}

fn record(id: &str, state: &str) -> String {
    serde_json::json!({"task_id": id, "status": state, "result": null, "name": "tests.add"})
        .to_string()
}

fn starting(id: &str) -> Starting {
    Starting {
        task_id: id.to_owned(),
        record: record(id, "STARTED"),
        ..Starting::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn results_starts_and_revocations_live_in_postgresql() {
    let s = Setup::new("pg-states").await;
    let b = &s.backend;
    let ttl = Duration::from_secs(600);
    let mut batch = vec![out("p1", "celery", None), out("p2", "celery", None)];
    for o in &mut batch {
        let id = if o.payload.contains("\"p1\"") {
            "p1"
        } else {
            "p2"
        };
        o.pending = Some(PendingRecord {
            task_id: id.to_owned(),
            record: record(id, "PENDING"),
            ttl,
        });
    }
    b.enqueue(Use::Request)
        .enqueue(&batch)
        .await
        .expect("enqueue");
    assert_eq!(
        s.psql("SELECT task_id || '=' || state FROM taskstack_results ORDER BY 1"),
        "p1=PENDING\np2=PENDING",
        "PENDING rows before the messages"
    );
    let got = take_n(b, "celery", 2, Duration::from_secs(20)).await;
    assert_eq!(got.iter().map(id_of).collect::<Vec<_>>(), ["p1", "p2"]);
    // p2 is revoked before any worker starts it.
    let mut states = b.task_states(Use::Request);
    let revoked = record("p2", "REVOKED");
    assert_eq!(
        states.revoke("p2", &revoked, ttl).await.expect("revoke"),
        RevokeOutcome::Revoked
    );
    assert_eq!(
        states
            .revoke("nobody", &revoked, ttl)
            .await
            .expect("revoke"),
        RevokeOutcome::Unknown
    );
    let verdicts = states
        .start_batch(Some("w1"), &[starting("p1"), starting("p2")], ttl, false)
        .await
        .expect("start");
    assert_eq!(verdicts, [StartVerdict::Run, StartVerdict::Revoked]);
    assert_eq!(
        states.revoke("p1", &revoked, ttl).await.expect("revoke"),
        RevokeOutcome::Refused(TaskState::Started),
        "a started task is not revoked"
    );
    // p1 finishes: its result is stored before the message is acknowledged.
    let waiter = {
        let mut results = b.results(Use::Request);
        tokio::spawn(async move { results.wait("p1", Duration::from_secs(20)).await })
    };
    let done = record("p1", "SUCCESS");
    b.consume("w1")
        .settle(
            &[ack(got[0].seq, Some(("p1", &done))), ack(got[1].seq, None)],
            ttl,
        )
        .await
        .expect("settle");
    let woken = waiter.await.expect("join").expect("wait").expect("result");
    assert_eq!(woken.status, TaskState::Success);
    // A second delivery of the finished task is not run again.
    let again = states
        .start_batch(Some("w1"), &[starting("p1")], ttl, false)
        .await
        .expect("start again");
    assert_eq!(again, [StartVerdict::Finished]);
    assert_eq!(
        s.psql(
            "SELECT task_id || '=' || state || '/' || revoked FROM taskstack_results ORDER BY 1"
        ),
        "p1=SUCCESS/false\np2=REVOKED/true"
    );
    let counts = b
        .inspect(Use::Request)
        .queue_counts(&["celery".into()])
        .await
        .expect("counts");
    assert_eq!(
        (counts[0].ready, counts[0].in_flight),
        (0, 0),
        "acknowledged"
    );
    let pings = b.pings().await;
    let names: Vec<&str> = pings.iter().map(|(s, _)| s.name()).collect();
    assert_eq!(names, ["rabbitmq", "postgresql"]);
    assert!(pings.iter().all(|(_, r)| r.is_ok()), "{pings:?}");
}

fn worker(id: &str, pid: u32) -> WorkerRecord {
    WorkerRecord {
        id: id.to_owned(),
        host: "test".into(),
        pid,
        queues: vec!["celery".into()],
        tasks: Vec::new(),
        concurrency: 1,
        started_at: "2026-12-05T00:00:00Z".into(),
        last_heartbeat: "2026-12-05T00:00:00Z".into(),
        processed: 0,
        failed: 0,
        retried: 0,
        dead_lettered: 0,
        version: "test".into(),
        metrics_addr: None,
    }
}

/// Polls `done` until it holds; panics after `within`.
async fn wait_until(within: Duration, done: impl Fn() -> bool) {
    let deadline = std::time::Instant::now() + within;
    while !done() {
        assert!(
            std::time::Instant::now() < deadline,
            "condition not met within {within:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn worker_records_held_counts_and_dead_letters_live_in_postgresql() {
    let s = Setup::new("pg-records").await;
    let b = &s.backend;
    for i in 0..3 {
        b.enqueue(Use::Request)
            .enqueue(&[out(&format!("h{i}"), "celery", None)])
            .await
            .expect("enqueue");
    }
    let got = take_n(b, "celery", 3, Duration::from_secs(20)).await;
    let mut leases = b.leases(Use::Request);
    assert!(
        leases
            .heartbeat(&worker("w1", 7), "celery", LEASE)
            .await
            .expect("hb"),
        "a first heartbeat creates the record"
    );
    assert!(
        !leases
            .heartbeat(&worker("w1", 8), "celery", LEASE)
            .await
            .expect("hb")
    );
    let live = b.inspect(Use::Request).live_workers().await.expect("live");
    assert_eq!(
        live.iter()
            .map(|w| (w.id.as_str(), w.pid))
            .collect::<Vec<_>>(),
        [("w1", 8)]
    );
    let counts = b
        .inspect(Use::Request)
        .queue_counts(&["celery".into(), "other".into()])
        .await
        .expect("counts");
    assert_eq!(
        counts.iter().map(|c| c.in_flight).collect::<Vec<_>>(),
        [3, 0],
        "what the worker holds, by queue"
    );
    // One message is dead-lettered: stored, then acknowledged.
    let mut dead = DeadLetter {
        reason: "poison".into(),
        queue: "celery".into(),
        queue_key: "celery".into(),
        task_id: Some("h0".into()),
        task: Some("tests.add".into()),
        payload: String::new(),
        payload_base64: None,
        payload_key: None,
        payload_size: None,
        worker: "w1".into(),
        at: "2026-12-05T00:00:00Z".into(),
    };
    let h0 = got.iter().find(|d| id_of(d) == "h0").expect("h0");
    dead.set_payload(&h0.payload);
    b.consume("w1")
        .dead_letter(h0.seq, &dead)
        .await
        .expect("dead");
    let mut dl = b.dead_letters(Use::Request);
    let (page, total) = dl.page("celery", 10).await.expect("page");
    assert_eq!((total, page[0].task_id.as_deref()), (1, Some("h0")));
    let picked = dl
        .pick("celery", &DeadSelection::TaskIds(vec!["h0".into()]))
        .await
        .expect("pick");
    assert_eq!(picked.len(), 1);
    let moved = dl
        .apply("celery", DeadLetterAction::Requeue, &picked)
        .await
        .expect("requeue");
    assert_eq!(moved.len(), 1);
    let twice = dl
        .pick("celery", &DeadSelection::TaskIds(vec!["h0".into()]))
        .await
        .expect("pick again");
    assert!(twice.is_empty(), "requeued once: the row is gone");
    let back = take_n(b, "celery", 1, Duration::from_secs(20)).await;
    assert_eq!(back.iter().map(id_of).collect::<Vec<_>>(), ["h0"]);
    // Discarding: the record goes, nothing is published.
    let h1 = got.iter().find(|d| id_of(d) == "h1").expect("h1");
    dead.task_id = Some("h1".into());
    dead.set_payload(&h1.payload);
    b.consume("w1")
        .dead_letter(h1.seq, &dead)
        .await
        .expect("dead");
    let oldest = dl
        .pick("celery", &DeadSelection::Oldest { limit: 5 })
        .await
        .expect("pick");
    let gone = dl
        .apply("celery", DeadLetterAction::Discard, &oldest)
        .await
        .expect("discard");
    assert_eq!(gone.len(), 1);
    assert_eq!(dl.page("celery", 10).await.expect("page").1, 0);
    // A clean stop forgets the worker; an expired record is reaped.
    leases.release("w1").await.expect("release");
    assert!(
        b.inspect(Use::Request)
            .live_workers()
            .await
            .expect("live")
            .is_empty()
    );
    leases
        .heartbeat(&worker("w2", 9), "celery", Duration::from_millis(1))
        .await
        .expect("hb");
    // The record is kept at least a second (as on Redis).
    wait_until(Duration::from_secs(10), || {
        s.psql("SELECT count(*) FROM taskstack_workers WHERE expires_at > clock_timestamp()") == "0"
    })
    .await;
    let reaped = leases.reap_expired().await.expect("reap");
    assert_eq!((reaped.workers, reaped.restored), (1, 0));
    assert_eq!(s.psql("SELECT count(*) FROM taskstack_workers"), "0");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_beat_publishes_each_slot_once_through_a_postgresql_outbox() {
    let s = Setup::new("pg-beat").await;
    let b = &s.backend;
    let mut lock = b.leader_lock(Use::Loop);
    assert_eq!(
        lock.try_acquire("L1", LEASE).await.expect("acquire"),
        Acquired::Yes
    );
    assert_eq!(
        lock.try_acquire("L2", LEASE).await.expect("acquire"),
        Acquired::HeldBy(Some("L1".into()))
    );
    assert!(lock.renew("L1", LEASE).await.expect("renew"));
    assert!(!lock.renew("L2", LEASE).await.expect("renew"), "not ours");
    assert_eq!(lock.holder().await.expect("holder").as_deref(), Some("L1"));
    let lease = lock.lease().await.expect("lease").expect("held");
    let left = lease.remaining_ms.expect("the lock expires");
    assert!(
        left > 0 && u128::try_from(left).is_ok_and(|l| l <= LEASE.as_millis()),
        "{lease:?}"
    );
    lock.announce("beat-a", "{\"id\":\"beat-a\"}", LEASE)
        .await
        .expect("announce");
    assert_eq!(
        lock.instance("beat-a").await.expect("instance").as_deref(),
        Some("{\"id\":\"beat-a\"}")
    );
    let mut ledger = b.slot_ledger(Use::Loop);
    let payload = message("beat-1", "celery");
    let slot = SlotPublish {
        lock_value: "L1",
        margin: Duration::from_secs(1),
        entry: "every-minute",
        queue: "celery",
        slot_ms: 60_000,
        payload: &payload,
    };
    assert_eq!(
        ledger.publish(slot).await.expect("publish"),
        SlotOutcome::Published
    );
    assert_eq!(
        ledger.publish(slot).await.expect("again"),
        SlotOutcome::AlreadyPublished { last_ms: 60_000 }
    );
    let later = SlotPublish {
        slot_ms: 120_000,
        ..slot
    };
    assert_eq!(
        ledger
            .publish(SlotPublish {
                lock_value: "someone else",
                ..later
            })
            .await
            .expect("not leader"),
        SlotOutcome::NotLeader
    );
    match ledger
        .publish(SlotPublish {
            margin: LEASE * 2,
            ..later
        })
        .await
        .expect("too short")
    {
        SlotOutcome::LeaseTooShort { pttl_ms } => assert!(pttl_ms > 0 && pttl_ms <= 60_000),
        other => panic!("expected LeaseTooShort, got {other:?}"),
    }
    // A message a former leader recorded but never got confirmed (killed
    // between its commit and RabbitMQ's confirm) goes out with the next
    // publication, even a refused one.
    let stranded = message("beat-stranded", "celery");
    s.psql(&format!(
        "INSERT INTO taskstack_beat_outbox (namespace, queue, message) \
         VALUES ('amqp-pg', 'celery', '{}')",
        stranded.replace('\'', "''")
    ));
    assert_eq!(
        ledger.publish(slot).await.expect("again"),
        SlotOutcome::AlreadyPublished { last_ms: 60_000 }
    );
    let got = take_n(b, "celery", 3, Duration::from_secs(5)).await;
    assert_eq!(
        got.iter().map(id_of).collect::<Vec<_>>(),
        ["beat-1", "beat-stranded"],
        "each published once"
    );
    assert_eq!(s.psql("SELECT count(*) FROM taskstack_beat_outbox"), "0");
    assert_eq!(
        ledger
            .last_slots(&["every-minute", "never"])
            .await
            .expect("last"),
        [Some(60_000), None]
    );
    assert!(lock.release("L1").await.expect("release"));
    assert!(!lock.release("L1").await.expect("release"), "gone already");
    assert_eq!(lock.holder().await.expect("holder"), None);
    assert_eq!(
        ledger.publish(later).await.expect("no lock"),
        SlotOutcome::NotLeader
    );
    lock.forget("beat-a").await.expect("forget");
    assert_eq!(lock.instance("beat-a").await.expect("instance"), None);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_expired_beat_lock_is_taken_over() {
    let s = Setup::new("pg-lock").await;
    let mut lock = s.backend.leader_lock(Use::Loop);
    assert_eq!(
        lock.try_acquire("old", Duration::from_millis(300))
            .await
            .expect("acquire"),
        Acquired::Yes
    );
    wait_until(Duration::from_secs(10), || {
        s.psql("SELECT count(*) FROM taskstack_beat_lock WHERE expires_at > clock_timestamp()")
            == "0"
    })
    .await;
    assert!(!lock.renew("old", LEASE).await.expect("renew"), "expired");
    assert_eq!(
        lock.try_acquire("new", LEASE).await.expect("acquire"),
        Acquired::Yes
    );
    assert_eq!(lock.holder().await.expect("holder").as_deref(), Some("new"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chord_counters_and_sent_markers_live_in_postgresql() {
    use crate::canvas::FollowUp;
    use crate::canvas::redis::PartOutcome;
    let s = Setup::new("pg-canvas").await;
    let mut store = s.backend.canvas().expect("a canvas store");
    let ttl = Duration::from_secs(600);
    let ok = |v: i64| serde_json::json!(v);
    store.set_size("g1", 2, ttl).await.expect("size");
    let pending = |ready, total| PartOutcome::Pending { ready, total };
    assert_eq!(
        store
            .part_return("g1", "t2", Some(1), "SUCCESS", &ok(2), ttl)
            .await
            .expect("part"),
        pending(1, Some(2))
    );
    assert_eq!(
        store
            .part_return("g1", "t2", Some(1), "SUCCESS", &ok(2), ttl)
            .await
            .expect("again"),
        pending(1, Some(2)),
        "a header task counts once"
    );
    let PartOutcome::Claimed { token, total } = store
        .part_return("g1", "t1", Some(0), "SUCCESS", &ok(1), ttl)
        .await
        .expect("last part")
    else {
        panic!("the last part takes the claim");
    };
    assert_eq!(total, 2);
    assert_eq!(
        store
            .part_return("g1", "t1", Some(0), "SUCCESS", &ok(1), ttl)
            .await
            .expect("copy"),
        pending(2, Some(2)),
        "a copy of the last part does not claim again"
    );
    let parts = store.parts("g1").await.expect("parts");
    assert_eq!(
        parts
            .iter()
            .map(|p| (p.task_id.as_str(), p.result.clone()))
            .collect::<Vec<_>>(),
        [("t1", ok(1)), ("t2", ok(2))],
        "in header order"
    );
    assert!(!store.extend_claim("g1", "not-mine").await.expect("extend"));
    assert!(store.extend_claim("g1", &token).await.expect("extend"));
    assert!(!store.cleanup("g1", "not-mine").await.expect("cleanup"));
    assert!(store.cleanup("g1", &token).await.expect("cleanup"));
    assert_eq!(
        store
            .part_return("g1", "t1", Some(0), "SUCCESS", &ok(1), ttl)
            .await
            .expect("late"),
        PartOutcome::AlreadyDone
    );
    assert_eq!(s.psql("SELECT count(*) FROM taskstack_chord_parts"), "0");

    // A claimant that died: its claim expires and is taken again.
    store.set_size("g2", 1, ttl).await.expect("size");
    let PartOutcome::Claimed { token: dead, .. } = store
        .part_return("g2", "u1", Some(0), "SUCCESS", &ok(1), ttl)
        .await
        .expect("part")
    else {
        panic!("claimed");
    };
    assert!(!store.extend_claim("g2", "second").await.expect("held"));
    s.psql("UPDATE taskstack_chords SET claim_expires = now() - interval '1 second' WHERE group_id = 'g2'");
    assert!(store.extend_claim("g2", "second").await.expect("free"));
    assert!(
        !store.cleanup("g2", &dead).await.expect("lost"),
        "the dead claim is no more"
    );
    // A failed chord's size is dropped: late parts never complete it.
    store.set_size("g3", 1, ttl).await.expect("size");
    store.drop_size("g3").await.expect("drop");
    assert_eq!(
        store
            .part_return("g3", "v1", None, "SUCCESS", &ok(1), ttl)
            .await
            .expect("part"),
        pending(1, None)
    );

    let follow = |id: &str| FollowUp {
        task_id: id.to_owned(),
        task: "tests.add".into(),
        queue_key: "celery".into(),
        payload: message(id, "celery"),
    };
    let batch = [follow("f1"), follow("f2")];
    assert_eq!(store.unsent(&batch).await.expect("unsent").len(), 2);
    store.mark_sent(&batch[..1], ttl).await.expect("mark");
    let left = store.unsent(&batch).await.expect("unsent");
    assert_eq!(
        left.iter().map(|f| f.task_id.as_str()).collect::<Vec<_>>(),
        ["f2"]
    );
    // Expired markers and chords are swept with the results.
    s.psql("UPDATE taskstack_canvas_sent SET expires_at = now() - interval '1 second'");
    s.psql("UPDATE taskstack_chords SET expires_at = now() - interval '1 second'");
    let mut expiry = s.backend.expiry().expect("an expiry");
    expiry.sweep(1000).await.expect("sweep");
    assert_eq!(
        s.psql(
            "SELECT (SELECT count(*) FROM taskstack_canvas_sent) + \
             (SELECT count(*) FROM taskstack_chords) + (SELECT count(*) FROM taskstack_chord_parts)"
        ),
        "0"
    );
}

/// Two drains of the beat's outbox at once (a former leader waking up
/// beside the new one): each stranded message is published once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_outbox_drains_at_once_publish_each_message_once() {
    let s = Setup::new("pg-drains").await;
    let b = &s.backend;
    for i in 0..20 {
        let m = message(&format!("stranded-{i}"), "celery");
        s.psql(&format!(
            "INSERT INTO taskstack_beat_outbox (namespace, queue, message) \
             VALUES ('amqp-pg', 'celery', '{}')",
            m.replace('\'', "''")
        ));
    }
    // Refused publications (no lock held) drain the outbox all the same.
    let payload = message("never", "celery");
    let slot = SlotPublish {
        lock_value: "nobody",
        margin: Duration::from_secs(1),
        entry: "e",
        queue: "celery",
        slot_ms: 1,
        payload: &payload,
    };
    let (mut one, mut two) = (b.slot_ledger(Use::Loop), b.slot_ledger(Use::Request));
    let (a, c) = tokio::join!(one.publish(slot), two.publish(slot));
    assert_eq!(a.expect("one"), SlotOutcome::NotLeader);
    assert_eq!(c.expect("two"), SlotOutcome::NotLeader);
    // Read in rounds of the prefetch (16), acknowledging each round, until
    // a round finds nothing.
    let mut got = Vec::new();
    loop {
        let round = take_n(b, "celery", 16, Duration::from_secs(2)).await;
        if round.is_empty() {
            break;
        }
        let acks: Vec<_> = round.iter().map(|d| ack(d.seq, None)).collect();
        b.consume("w1")
            .settle(&acks, Duration::from_secs(60))
            .await
            .expect("settle");
        got.extend(round.iter().map(id_of));
    }
    let mut ids = got.clone();
    ids.sort();
    ids.dedup();
    assert_eq!((got.len(), ids.len()), (20, 20), "each once: {got:?}");
    assert_eq!(s.psql("SELECT count(*) FROM taskstack_beat_outbox"), "0");
}
