//! The conformance suite: every guarantee of the capability traits, written
//! once and run against each implementation (see `tests.rs`). A later
//! backend (PostgreSQL results, RabbitMQ) passes it before it ships.
//!
//! Time-based cases wait on a condition with a deadline, stepping time with
//! [`Harness::tick`]: paused time advanced on the memory backend, a short
//! real wait on Redis.

#[cfg(feature = "beat")]
pub(crate) mod beat;

use super::{Backend, Outgoing, PendingRecord, Use};
use crate::broker::{
    DeadLetter, DeadLetterAction, DeadSelection, RevokeOutcome, Settle, StartVerdict, Starting,
};
use crate::proto::keys::queue_key;
use crate::proto::result::Provenance;
use crate::proto::{TaskResult, TaskState};
use std::sync::Arc;
use std::time::Duration;
use tokio::time::Instant;

/// What a suite run needs from an implementation.
#[async_trait::async_trait]
pub(crate) trait Harness: Send + Sync {
    fn backend(&self) -> Arc<dyn Backend>;
    /// The same broker, with a result store that cannot be reached.
    fn results_down(&self) -> Arc<dyn Backend>;
    /// One step of waiting for time to pass.
    async fn tick(&self);
}

/// Short enough for real waits on Redis, long enough (on a loaded CI machine)
/// for the few round trips a case makes before it must not have run out.
const SHORT: Duration = Duration::from_secs(1);
const LONG: Duration = Duration::from_secs(60);
/// A `max_size` no message reaches.
const ANY_SIZE: usize = usize::MAX;

/// Waits for a condition, stepping time, until a deadline.
struct Waiter<'a> {
    h: &'a dyn Harness,
    what: &'static str,
    deadline: Instant,
}

impl<'a> Waiter<'a> {
    fn new(h: &'a dyn Harness, what: &'static str) -> Self {
        Self {
            h,
            what,
            deadline: Instant::now() + Duration::from_secs(10),
        }
    }

    async fn tick(&self) {
        assert!(
            Instant::now() < self.deadline,
            "timed out waiting for {}",
            self.what
        );
        self.h.tick().await;
    }
}

fn keys(list: &[&str]) -> Vec<String> {
    list.iter().map(|s| (*s).to_owned()).collect()
}

fn out(queue_key: &str, payload: &str) -> Outgoing {
    Outgoing {
        queue_key: queue_key.to_owned(),
        payload: payload.to_owned(),
        due_ms: None,
        pending: None,
    }
}

async fn send(b: &dyn Backend, batch: &[Outgoing]) {
    b.enqueue(Use::Request)
        .enqueue(batch)
        .await
        .expect("enqueue");
}

fn record(id: &str, status: TaskState) -> TaskResult {
    let from = Provenance {
        name: "t.add",
        worker: "w",
        retries: 0,
        queue: "q",
        parent_id: None,
    };
    match status {
        TaskState::Pending => TaskResult::pending(id, "t.add", "q"),
        s => TaskResult::new(id, s, serde_json::json!(3), from),
    }
}

/// Settles a hold with no result to store.
fn ack(seq: u64) -> Settle {
    Settle {
        seq,
        result: None,
        started: None,
    }
}

async fn counts_of(b: &dyn Backend, queues: &[String]) -> Vec<crate::broker::QueueCounts> {
    let counts = b.inspect(Use::Request).queue_counts(queues).await;
    counts.expect("counts")
}

fn json(r: &TaskResult) -> String {
    serde_json::to_string(r).expect("record JSON")
}

/// Takes everything from `queue_keys` (as a fresh worker) and returns the payloads.
async fn drain(b: &dyn Backend, worker: &str, queue_keys: &[String]) -> Vec<String> {
    let got = b
        .consume(worker)
        .take(queue_keys, 100, LONG, ANY_SIZE)
        .await
        .expect("take");
    got.into_iter()
        .map(|d| String::from_utf8_lossy(&d.payload).into_owned())
        .collect()
}

pub(crate) async fn delivery_order_and_priority_buckets(h: &dyn Harness) {
    let b = h.backend();
    let low = queue_key("q", 3);
    send(
        &*b,
        &[
            out("q", "m1"),
            out(&low, "low"),
            out("q", "m2"),
            out("r", "r1"),
        ],
    )
    .await;
    send(&*b, &[out("q", "m3")]).await;
    let order = keys(&["q", "r", &low]);
    let mut c = b.consume("w1");
    let first = c.take(&order, 2, LONG, ANY_SIZE).await.expect("take");
    let payloads: Vec<_> = first
        .iter()
        .map(|d| d.text().unwrap_or("<not UTF-8>"))
        .collect();
    assert_eq!(payloads, ["m1", "m2"], "oldest first");
    let rest = c.take(&order, 10, LONG, ANY_SIZE).await.expect("take");
    let payloads: Vec<_> = rest
        .iter()
        .map(|d| d.text().unwrap_or("<not UTF-8>"))
        .collect();
    assert_eq!(
        payloads,
        ["m3", "r1", "low"],
        "lists served in the order given"
    );
    assert_eq!(rest[2].queue_key, low, "a delivery names its list");
    let mut seqs: Vec<u64> = first.iter().chain(&rest).map(|d| d.seq).collect();
    seqs.dedup();
    assert_eq!(seqs.len(), 5, "every hold has its own sequence number");
    assert!(
        c.take(&order, 10, LONG, ANY_SIZE)
            .await
            .expect("take")
            .is_empty()
    );
    let counts = counts_of(&*b, &keys(&["q", "r"])).await;
    assert_eq!((counts[0].ready, counts[0].in_flight), (0, 4));
    assert_eq!((counts[1].ready, counts[1].in_flight), (0, 1));
}

pub(crate) async fn waiting_wakes_on_arrival(h: &dyn Harness) {
    let b = h.backend();
    let q = keys(&["q"]);
    let mut c = b.consume("w1");
    let empty = c.wait_for_message(&q, Duration::from_millis(50)).await;
    assert!(!empty.expect("wait"), "nothing arrived");
    let start = Instant::now();
    let (woken, ()) = tokio::join!(c.wait_for_message(&q, Duration::from_secs(5)), async {
        h.tick().await;
        send(&*b, &[out("q", "m1")]).await;
    });
    assert!(woken.expect("wait"), "the arrival wakes the waiter");
    assert!(
        start.elapsed() < Duration::from_secs(5),
        "woken, not timed out"
    );
    let got = c.take(&q, 10, LONG, ANY_SIZE).await.expect("take");
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].text(), Some("m1"));
}

pub(crate) async fn redelivery_after_lease_expiry(h: &dyn Harness) {
    let b = h.backend();
    let q = keys(&["q"]);
    send(&*b, &[out("q", "a"), out("q", "b"), out("q", "c")]).await;
    let mut a = b.consume("wa");
    let mut leases = b.leases(Use::Loop);
    let rec = worker_record("wa");
    assert!(
        leases.heartbeat(&rec, "q", SHORT).await.expect("beat"),
        "new lease"
    );
    assert!(
        !leases.heartbeat(&rec, "q", SHORT).await.expect("beat"),
        "renewed"
    );
    let held = a.take(&q, 2, SHORT, ANY_SIZE).await.expect("take");
    assert_eq!(held.len(), 2);
    let mut states = b.task_states(Use::Loop);
    let starting = |seq| Starting {
        task_id: format!("task-{seq}"),
        record: json(&record("x", TaskState::Started)),
        seq,
    };
    let go = states
        .start_batch(Some("wa"), &[starting(held[0].seq)], LONG, true)
        .await
        .expect("start");
    assert_eq!(go, [StartVerdict::Run], "a held message starts");
    let live = b
        .inspect(Use::Request)
        .live_workers()
        .await
        .expect("workers");
    assert_eq!(
        live.iter().map(|w| w.id.as_str()).collect::<Vec<_>>(),
        ["wa"]
    );
    assert_eq!(
        leases.reap_expired().await.expect("reap").restored,
        0,
        "lease live"
    );

    let w = Waiter::new(h, "the expired lease to be reaped");
    let reaped = loop {
        let r = leases.reap_expired().await.expect("reap");
        if r.workers > 0 {
            break r;
        }
        w.tick().await;
    };
    assert_eq!((reaped.workers, reaped.restored), (1, 2));
    let go = states
        .start_batch(Some("wa"), &[starting(held[1].seq)], LONG, true)
        .await
        .expect("start");
    assert_eq!(
        go,
        [StartVerdict::NotHeld],
        "a message restored to its queue never starts on its old holder"
    );
    let again = leases.reap_expired().await.expect("reap");
    assert_eq!(again.restored, 0, "restored exactly once");
    assert!(
        b.inspect(Use::Request)
            .live_workers()
            .await
            .expect("workers")
            .is_empty()
    );

    // The stale holder's late settlements touch nothing.
    let late = ack(held[0].seq);
    a.settle(&[late], LONG).await.expect("late settle");
    a.dead_letter(held[1].seq, &dead("q", "x", held[1].text().unwrap_or("")))
        .await
        .expect("late dead letter");
    assert_eq!(
        drain(&*b, "wb", &q).await,
        ["a", "b", "c"],
        "front, oldest first"
    );
    let counts = counts_of(&*b, &q).await;
    assert_eq!((counts[0].in_flight, counts[0].dead_lettered), (3, 0));
    assert!(
        leases.heartbeat(&rec, "q", SHORT).await.expect("beat"),
        "a reaped worker's next heartbeat finds its lease gone"
    );
}

/// A worker record of worker `id` serving queue `q`.
pub(crate) fn worker_record(id: &str) -> crate::broker::WorkerRecord {
    crate::broker::WorkerRecord {
        id: id.to_owned(),
        host: "h".into(),
        pid: 1,
        queues: keys(&["q"]),
        tasks: Vec::new(),
        concurrency: 1,
        started_at: "2026-01-01T00:00:00Z".into(),
        last_heartbeat: "2026-01-01T00:00:00Z".into(),
        processed: 0,
        failed: 0,
        retried: 0,
        dead_lettered: 0,
        version: "test".into(),
        metrics_addr: None,
    }
}

pub(crate) async fn hand_back_returns_to_the_front(h: &dyn Harness) {
    let b = h.backend();
    let q = keys(&["q"]);
    send(
        &*b,
        &[out("q", "a"), out("q", "b"), out("q", "c"), out("q", "d")],
    )
    .await;
    let mut c = b.consume("w1");
    let held = c.take(&q, 3, LONG, ANY_SIZE).await.expect("take");
    let (sa, sb, sc) = (held[0].seq, held[1].seq, held[2].seq);
    assert_eq!(c.hand_back(&[sa, sc]).await.expect("hand back"), 2);
    assert_eq!(c.hand_back(&[sa, sc]).await.expect("hand back"), 0, "once");
    assert_eq!(c.hand_back(&[]).await.expect("hand back"), 0);
    let next = c.take(&q, 10, LONG, ANY_SIZE).await.expect("take");
    let payloads: Vec<_> = next
        .iter()
        .map(|d| d.text().unwrap_or("<not UTF-8>"))
        .collect();
    assert_eq!(payloads, ["a", "c", "d"]);
    c.settle(&[ack(sb)], LONG).await.expect("settle");
    let counts = counts_of(&*b, &q).await;
    assert_eq!((counts[0].ready, counts[0].in_flight), (0, 3));
}

pub(crate) async fn settle_stores_results_then_acks_idempotently(h: &dyn Harness) {
    let b = h.backend();
    let q = keys(&["q"]);
    send(&*b, &[out("q", "m1"), out("q", "m2")]).await;
    let mut c = b.consume("w1");
    let held = c.take(&q, 2, LONG, ANY_SIZE).await.expect("take");
    let done = record("t1", TaskState::Success);
    let batch = [
        Settle {
            seq: held[0].seq,
            result: Some(("t1".into(), json(&done))),
            started: None,
        },
        ack(held[1].seq),
    ];
    let mut results = b.results(Use::Request);
    let (waited, settled) = tokio::join!(results.wait("t1", Duration::from_secs(5)), async {
        h.tick().await;
        c.settle(&batch, LONG).await
    });
    settled.expect("settle");
    assert_eq!(waited.expect("wait"), Some(done.clone()), "waiter woken");
    c.settle(&batch, LONG)
        .await
        .expect("settling again is harmless");
    assert_eq!(results.read("t1").await.expect("read"), Some(done));
    let counts = counts_of(&*b, &q).await;
    assert_eq!(
        (counts[0].ready, counts[0].in_flight),
        (0, 0),
        "acknowledged once"
    );
}

pub(crate) async fn settle_acknowledges_nothing_until_results_are_stored(h: &dyn Harness) {
    let (b, down) = (h.backend(), h.results_down());
    let q = keys(&["q"]);
    send(&*b, &[out("q", "m1")]).await;
    let held = down
        .consume("w1")
        .take(&q, 1, LONG, ANY_SIZE)
        .await
        .expect("take");
    let done = record("t1", TaskState::Success);
    let batch = [Settle {
        seq: held[0].seq,
        result: Some(("t1".into(), json(&done))),
        started: None,
    }];
    let failed = down.consume("w1").settle(&batch, LONG).await;
    assert!(failed.is_err(), "no result store, no settlement");
    let counts = counts_of(&*b, &q).await;
    assert_eq!(
        counts[0].in_flight, 1,
        "still held, so redelivered if we die"
    );
    assert_eq!(
        b.results(Use::Request).read("t1").await.expect("read"),
        None
    );
    b.consume("w1").settle(&batch, LONG).await.expect("settle");
    assert_eq!(
        b.results(Use::Request).read("t1").await.expect("read"),
        Some(done)
    );
    let counts = counts_of(&*b, &q).await;
    assert_eq!(counts[0].in_flight, 0);
}

fn dead(queue: &str, task_id: &str, payload: &str) -> DeadLetter {
    DeadLetter {
        reason: format!("{task_id} is poison"),
        queue: queue.to_owned(),
        queue_key: queue.to_owned(),
        task_id: Some(task_id.to_owned()),
        task: Some("t.add".into()),
        payload: payload.to_owned(),
        payload_base64: None,
        payload_key: None,
        payload_size: None,
        worker: "w1".into(),
        at: "2026-01-01T00:00:00Z".into(),
    }
}

pub(crate) async fn dead_letters_keep_reason_and_payload_and_move_once(h: &dyn Harness) {
    let b = h.backend();
    let q = keys(&["q"]);
    send(&*b, &[out("q", "{\"p\":1}"), out("q", "not json")]).await;
    let mut c = b.consume("w1");
    let held = c.take(&q, 2, LONG, ANY_SIZE).await.expect("take");
    let (d1, d2) = (dead("q", "t1", "{\"p\":1}"), dead("q", "t2", "not json"));
    c.dead_letter(held[0].seq, &d1).await.expect("dead-letter");
    c.dead_letter(held[0].seq, &d1)
        .await
        .expect("hold gone: no-op");
    c.dead_letter(held[1].seq, &d2).await.expect("dead-letter");
    let mut dl = b.dead_letters(Use::Request);
    let (page, total) = dl.page("q", 10).await.expect("page");
    assert_eq!(
        page,
        [d2.clone(), d1.clone()],
        "newest first, byte for byte"
    );
    assert_eq!(total, 2);
    let (page, total) = dl.page("q", 1).await.expect("page");
    assert_eq!((page.len(), total), (1, 2));
    let counts = counts_of(&*b, &q).await;
    assert_eq!((counts[0].in_flight, counts[0].dead_lettered), (0, 2));

    let picked = dl
        .pick("q", &DeadSelection::TaskIds(vec!["t1".into()]))
        .await
        .expect("pick");
    assert_eq!(picked.len(), 1);
    let moved = dl.apply("q", DeadLetterAction::Requeue, &picked).await;
    assert_eq!(moved.expect("requeue"), std::slice::from_ref(&d1));
    let again = dl.apply("q", DeadLetterAction::Requeue, &picked).await;
    assert!(again.expect("requeue").is_empty(), "requeued exactly once");
    let oldest = dl.pick("q", &DeadSelection::Oldest { limit: 5 }).await;
    let oldest = oldest.expect("pick");
    assert_eq!(oldest.len(), 1);
    let gone = dl.apply("q", DeadLetterAction::Discard, &oldest).await;
    assert_eq!(gone.expect("discard"), [d2]);
    assert_eq!(dl.page("q", 10).await.expect("page"), (Vec::new(), 0));
    assert_eq!(
        drain(&*b, "w2", &q).await,
        ["{\"p\":1}"],
        "only the requeued one"
    );
}

pub(crate) async fn oversized_messages_stay_unsent_and_dead_letter_whole(h: &dyn Harness) {
    let b = h.backend();
    let q = keys(&["q"]);
    let big = "x".repeat(300);
    send(&*b, &[out("q", "small"), out("q", &big)]).await;
    let mut c = b.consume("w1");
    let held = c.take(&q, 2, LONG, 100).await.expect("take");
    assert_eq!(held.len(), 2);
    assert_eq!((held[0].text(), held[0].oversized), (Some("small"), None));
    assert!(
        held[1].payload.is_empty(),
        "an oversized message is not sent"
    );
    assert_eq!(held[1].oversized, Some(300));
    let counts = counts_of(&*b, &q).await;
    assert_eq!(counts[0].in_flight, 2, "both are held");

    let mut record = dead("q", "t-big", "");
    record.payload_size = held[1].oversized;
    c.dead_letter(held[1].seq, &record)
        .await
        .expect("dead-letter");
    c.settle(&[ack(held[0].seq)], LONG).await.expect("settle");
    let mut dl = b.dead_letters(Use::Request);
    let (page, total) = dl.page("q", 10).await.expect("page");
    assert_eq!(total, 1);
    assert_eq!(page[0].payload_size, Some(300));
    let picked = dl.pick("q", &DeadSelection::Oldest { limit: 1 }).await;
    let moved = dl
        .apply("q", DeadLetterAction::Requeue, &picked.expect("pick"))
        .await;
    assert_eq!(moved.expect("requeue").len(), 1);
    assert_eq!(
        drain(&*b, "w2", &q).await,
        [big],
        "requeued byte for byte from where the backend kept it"
    );
}

pub(crate) async fn delayed_messages_move_when_due_and_not_before(h: &dyn Harness) {
    let b = h.backend();
    let q = keys(&["q"]);
    let clock = b.clock();
    let due = clock.now_ms() + i64::try_from(SHORT.as_millis()).unwrap_or(0);
    let mut later = out("q", "parked");
    later.due_ms = Some(due);
    send(&*b, &[later]).await;
    send(&*b, &[out("q", "held")]).await;
    let mut c = b.consume("w1");
    let held = c.take(&q, 1, LONG, ANY_SIZE).await.expect("take");
    c.park_held(held[0].seq, "q", b"retry", due, None)
        .await
        .expect("park held");
    c.park_held(held[0].seq, "q", b"retry", due, None)
        .await
        .expect("hold gone: no-op");
    send(&*b, &[out("q", "first")]).await;
    let mut d = b.delayed(Use::Loop);
    let p = d.promote_due(100).await.expect("promote");
    assert_eq!(p.moved, 0, "not before it is due");
    assert!(
        p.next_due_in
            .is_some_and(|n| n > Duration::ZERO && n <= SHORT)
    );
    let counts = counts_of(&*b, &q).await;
    assert_eq!(
        (counts[0].ready, counts[0].delayed, counts[0].in_flight),
        (1, Some(2), 0)
    );
    let mut inspect = b.inspect(Use::Request);
    let span = inspect.delayed_span().await.expect("span");
    assert_eq!(
        (span.parked, span.first_due_ms, span.last_due_ms),
        (2, Some(due), Some(due))
    );
    inspect.ping().await.expect("ping");

    let w = Waiter::new(h, "the parked messages to come due");
    let mut moved = 0;
    while moved < 2 {
        w.tick().await;
        moved += d.promote_due(100).await.expect("promote").moved;
    }
    assert!(clock.now_ms() >= due);
    assert_eq!(moved, 2, "each moved once");
    let p = d.promote_due(100).await.expect("promote");
    assert_eq!((p.moved, p.next_due_in), (0, None));
    let span = inspect.delayed_span().await.expect("span");
    assert_eq!((span.parked, span.first_due_ms), (0, None));
    let mut got = drain(&*b, "w2", &q).await;
    assert_eq!(got.remove(0), "first", "promoted to the back of the queue");
    got.sort();
    assert_eq!(got, ["parked", "retry"]);
}

pub(crate) async fn revoke_and_start_exclude_each_other(h: &dyn Harness) {
    let b = h.backend();
    let mut pending = Vec::new();
    for id in ["r1", "r2"] {
        let mut o = out("q", id);
        o.pending = Some(PendingRecord {
            task_id: id.to_owned(),
            record: json(&record(id, TaskState::Pending)),
            ttl: LONG,
        });
        pending.push(o);
    }
    send(&*b, &pending).await;
    let mut ts = b.task_states(Use::Loop);
    let mut results = b.results(Use::Request);
    let pend = results.read("r1").await.expect("read");
    assert_eq!(pend.map(|r| r.status), Some(TaskState::Pending));

    // Revoke first: the start skips it.
    let revoked = json(&record("r1", TaskState::Revoked));
    let r = ts.revoke("r1", &revoked, LONG).await.expect("revoke");
    assert_eq!(r, RevokeOutcome::Revoked);
    let r = ts.revoke("r1", &revoked, LONG).await.expect("revoke");
    assert_eq!(r, RevokeOutcome::AlreadyRevoked);
    let started = |id: &str| Starting {
        task_id: id.to_owned(),
        record: json(&record(id, TaskState::Started)),
        seq: 0,
    };
    let go = ts
        .start_batch(None, &[started("r1"), started("s1")], LONG, true)
        .await
        .expect("start");
    assert_eq!(go, [StartVerdict::Revoked, StartVerdict::Run]);
    let r1 = results.read("r1").await.expect("read");
    assert_eq!(r1.map(|r| r.status), Some(TaskState::Revoked));

    // Start first: the revocation is refused.
    let go = ts
        .start_batch(None, &[started("r2")], LONG, true)
        .await
        .expect("start");
    assert_eq!(go, [StartVerdict::Run]);
    let r = ts
        .revoke("r2", &json(&record("r2", TaskState::Revoked)), LONG)
        .await;
    assert_eq!(
        r.expect("revoke"),
        RevokeOutcome::Refused(TaskState::Started)
    );
    let r2 = results.read("r2").await.expect("read");
    assert_eq!(r2.map(|r| r.status), Some(TaskState::Started));
    let r = ts.revoke("never", "{}", LONG).await.expect("revoke");
    assert_eq!(r, RevokeOutcome::Unknown);
}

/// A worker's start without `track_started` (the default): a Redis
/// backend with results on the broker marks it in the worker's running
/// hash instead of a STARTED record; every backend refuses a revocation
/// while the task runs, and after its result is stored.
pub(crate) async fn a_start_without_tracking_still_refuses_revocation(h: &dyn Harness) {
    let b = h.backend();
    let mut o = out("q", "m1");
    o.pending = Some(PendingRecord {
        task_id: "t1".to_owned(),
        record: json(&record("t1", TaskState::Pending)),
        ttl: LONG,
    });
    send(&*b, &[o, out("q", "m2")]).await;
    let mut c = b.consume("w1");
    let held = c
        .take(&keys(&["q"]), 2, LONG, ANY_SIZE)
        .await
        .expect("take");
    assert_eq!(held.len(), 2);
    let mut ts = b.task_states(Use::Loop);
    let starting = |id: &str, seq| Starting {
        task_id: id.to_owned(),
        record: json(&record(id, TaskState::Started)),
        seq,
    };
    let go = ts
        .start_batch(
            Some("w1"),
            &[starting("t1", held[0].seq), starting("t2", held[1].seq)],
            LONG,
            false,
        )
        .await
        .expect("start");
    assert_eq!(go, [StartVerdict::Run, StartVerdict::Run]);
    let revoked = json(&record("t1", TaskState::Revoked));
    let r = ts.revoke("t1", &revoked, LONG).await.expect("revoke");
    assert_eq!(
        r,
        RevokeOutcome::Refused(TaskState::Started),
        "a running task is never reported revoked"
    );
    let counts = counts_of(&*b, &keys(&["q"])).await;
    assert_eq!(counts[0].in_flight, 2, "{counts:?}");
    let done = record("t1", TaskState::Success);
    let batch = [
        Settle {
            seq: held[0].seq,
            result: Some(("t1".into(), json(&done))),
            started: Some("t1".into()),
        },
        Settle {
            seq: held[1].seq,
            result: None,
            started: Some("t2".into()),
        },
    ];
    c.settle(&batch, LONG).await.expect("settle");
    let mut results = b.results(Use::Request);
    let stored = results.read("t1").await.expect("read");
    assert_eq!(stored.map(|r| r.status), Some(TaskState::Success));
    let r = ts.revoke("t1", &revoked, LONG).await.expect("revoke");
    assert_eq!(r, RevokeOutcome::Refused(TaskState::Success));
    let counts = counts_of(&*b, &keys(&["q"])).await;
    assert_eq!(counts[0].ready + counts[0].in_flight, 0, "{counts:?}");
}

pub(crate) async fn results_expire(h: &dyn Harness) {
    let b = h.backend();
    let mut results = b.results(Use::Request);
    let done = record("t1", TaskState::Success);
    results
        .write(std::slice::from_ref(&done), SHORT)
        .await
        .expect("write");
    assert_eq!(results.read("t1").await.expect("read"), Some(done.clone()));
    let waited = results.wait("t1", Duration::from_secs(5)).await;
    assert_eq!(
        waited.expect("wait"),
        Some(done),
        "a stored result needs no wake-up"
    );
    let none = results.wait("t2", Duration::from_millis(100)).await;
    assert_eq!(none.expect("wait"), None, "nothing came");
    let w = Waiter::new(h, "the result to expire");
    while results.read("t1").await.expect("read").is_some() {
        w.tick().await;
    }
}
