//! The RabbitMQ backend against a real RabbitMQ (one private node for this
//! test binary, a vhost per test) and a private `redis-server` per test.

use super::{AmqpBackend, QueueOptions};
use crate::backend::{Backend, Outgoing, RedisBackend, Use};
use crate::broker::{
    Broker, DeadLetter, DeadLetterAction, DeadSelection, Delivery, RedisPool, Settle,
};
use crate::config::RedisTarget;
use crate::proto::envelope::{self, MessageSpec};
use crate::test_rabbitmq::{self, Rabbit, vhost_of};
use std::time::{Duration, Instant};

const ANY_SIZE: usize = usize::MAX;
pub(super) const LEASE: Duration = Duration::from_secs(60);

struct Setup {
    url: String,
    redis: crate::test_redis::Server,
}

impl Setup {
    fn new(hint: &str) -> Self {
        Self {
            url: test_rabbitmq::shared().vhost(hint),
            redis: crate::test_redis::server(),
        }
    }

    fn backend(&self, options: QueueOptions) -> AmqpBackend {
        backend_on(&self.url, &self.redis.url, options)
    }

    fn rabbit(&self) -> &'static Rabbit {
        test_rabbitmq::shared()
    }

    /// `rabbitmqctl list_queues name <columns>` of this test's vhost, one
    /// queue a line.
    fn list_queues(&self, columns: &[&str]) -> String {
        let mut args = vec![
            "list_queues",
            "-p",
            vhost_of(&self.url),
            "--quiet",
            "--no-table-headers",
            "name",
        ];
        args.extend_from_slice(columns);
        self.rabbit().ctl(&args)
    }

    /// `(ready, unacknowledged)` of `queue` as rabbitmqctl reports them.
    fn counts(&self, queue: &str) -> (u64, u64) {
        self.rabbit()
            .queue_counts(vhost_of(&self.url))
            .into_iter()
            .find(|(n, _, _)| n == queue)
            .map_or((0, 0), |(_, r, u)| (r, u))
    }
}

fn backend_on(amqp: &str, redis: &str, options: QueueOptions) -> AmqpBackend {
    let target = RedisTarget::from_url(redis).expect("url");
    let pool = RedisPool::new(&target, 4, Duration::from_secs(5)).expect("pool");
    let broker = Broker::new(pool.clone(), pool, crate::proto::Keys::new("amqp-test"));
    AmqpBackend::new(
        amqp.to_owned(),
        options,
        Duration::from_secs(10),
        16,
        RedisBackend::new(broker),
    )
}

pub(super) fn message(id: &str, queue: &str) -> String {
    envelope::encode(&MessageSpec {
        id,
        task: "tests.add",
        args: &[serde_json::json!(1), serde_json::json!(2)],
        queue,
        origin: "test",
        ..MessageSpec::default()
    })
}

pub(super) fn out(id: &str, queue: &str, due_ms: Option<i64>) -> Outgoing {
    Outgoing {
        queue_key: queue.to_owned(),
        payload: message(id, queue),
        due_ms,
        pending: None,
    }
}

pub(super) fn id_of(d: &Delivery) -> String {
    envelope::decode(d.text().expect("utf-8"))
        .expect("a task message")
        .id
}

/// Takes until `n` deliveries came or the deadline passed.
pub(super) async fn take_n(
    b: &AmqpBackend,
    queue: &str,
    n: usize,
    within: Duration,
) -> Vec<Delivery> {
    let mut c = b.consume("w1");
    let keys = [queue.to_owned()];
    let deadline = Instant::now() + within;
    let mut got = Vec::new();
    while got.len() < n && Instant::now() < deadline {
        got.extend(
            c.take(&keys, n - got.len(), LEASE, ANY_SIZE)
                .await
                .expect("take"),
        );
        if got.len() < n {
            c.wait_for_message(&keys, Duration::from_millis(200))
                .await
                .expect("wait");
        }
    }
    got
}

pub(super) fn ack(seq: u64, result: Option<(&str, &str)>) -> Settle {
    Settle {
        seq,
        result: result.map(|(a, b)| (a.to_owned(), b.to_owned())),
        started: None,
    }
}

/// Declares the queue `celery` as Celery with `task_queue_max_priority =
/// 10` does (`x-max-priority` as a signed 32-bit integer); the connection
/// is for the caller to close.
async fn declare_as_celery_with_max_priority_10(url: &str) -> lapin::Connection {
    let conn = lapin::Connection::connect(url, lapin::ConnectionProperties::default())
        .await
        .expect("connect");
    let ch = conn.create_channel().await.expect("channel");
    let mut args = lapin::types::FieldTable::default();
    args.insert(
        "x-max-priority".into(),
        lapin::types::AMQPValue::LongInt(10),
    );
    ch.queue_declare(
        "celery".into(),
        lapin::options::QueueDeclareOptions {
            durable: true,
            ..Default::default()
        },
        args,
    )
    .await
    .expect("declare");
    conn
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn messages_arrive_as_sent_and_are_acknowledged_after_their_result() {
    let s = Setup::new("settle");
    let b = s.backend(QueueOptions::default());
    b.enqueue(Use::Request)
        .enqueue(&[out("t1", "celery", None), out("t2", "celery", None)])
        .await
        .expect("enqueue");
    let got = take_n(&b, "celery", 2, Duration::from_secs(20)).await;
    assert_eq!(
        got.iter().map(id_of).collect::<Vec<_>>(),
        ["t1", "t2"],
        "delivered in order, whole"
    );
    assert_eq!(s.counts("celery"), (0, 2), "both held unacknowledged");
    let record = r#"{"status": "SUCCESS", "result": 3, "task_id": "t1"}"#;
    b.consume("w1")
        .settle(&[ack(got[0].seq, Some(("t1", record)))], LEASE)
        .await
        .expect("settle");
    let stored = redis::Client::open(s.redis.url.as_str())
        .expect("client")
        .get_multiplexed_async_connection()
        .await
        .expect("conn");
    let mut conn = stored;
    let v: Option<String> = redis::cmd("GET")
        .arg("celery-task-meta-t1")
        .query_async(&mut conn)
        .await
        .expect("get");
    assert_eq!(v.as_deref(), Some(record));
    assert_eq!(s.counts("celery"), (0, 1), "t1 acknowledged, t2 still held");
    // Settling twice is a no-op; handing back returns t2 to the queue.
    b.consume("w1")
        .settle(&[ack(got[0].seq, None)], LEASE)
        .await
        .expect("again");
    assert_eq!(
        b.consume("w1")
            .hand_back(&[got[1].seq])
            .await
            .expect("back"),
        1
    );
    let again = take_n(&b, "celery", 1, Duration::from_secs(20)).await;
    assert_eq!(again.iter().map(id_of).collect::<Vec<_>>(), ["t2"]);
}

/// Waits until `queue`'s `(ready, unacknowledged)` are `want`.
async fn counts_become(s: &Setup, queue: &str, want: (u64, u64)) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let got = s.counts(queue);
        if got == want {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{queue}: (ready, unacknowledged) stayed {got:?}, expected {want:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Six messages sent to `celery` and taken by `b`, in order.
async fn six_held(b: &AmqpBackend) -> Vec<Delivery> {
    let sent: Vec<Outgoing> = (1..=6)
        .map(|i| out(&format!("m{i}"), "celery", None))
        .collect();
    b.enqueue(Use::Request)
        .enqueue(&sent)
        .await
        .expect("enqueue");
    let got = take_n(b, "celery", 6, Duration::from_secs(20)).await;
    assert_eq!(
        got.iter().map(id_of).collect::<Vec<_>>(),
        ["m1", "m2", "m3", "m4", "m5", "m6"]
    );
    got
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn coalesced_acknowledgements_cover_settled_messages_only() {
    let s = Setup::new("coalesce");
    let b = s.backend(QueueOptions::default());
    let got = six_held(&b).await;
    // m3 and m6 still run: m1-m2 go as one multiple acknowledgement,
    // m4-m5 one by one.
    let settle = |idx: &[usize]| {
        idx.iter()
            .map(|&i| ack(got[i].seq, None))
            .collect::<Vec<_>>()
    };
    b.consume("w1")
        .settle(&settle(&[0, 1, 3, 4]), LEASE)
        .await
        .expect("settle");
    counts_become(&s, "celery", (0, 2)).await;
    // Now everything up to m6 is settled: one multiple up to m6 (RabbitMQ
    // would close the channel over a tag it no longer holds, and m3 and
    // m6 would come back).
    b.consume("w1")
        .settle(&settle(&[2, 5]), LEASE)
        .await
        .expect("settle");
    counts_become(&s, "celery", (0, 0)).await;
    b.enqueue(Use::Request)
        .enqueue(&[out("m7", "celery", None)])
        .await
        .expect("enqueue");
    let more = take_n(&b, "celery", 1, Duration::from_secs(20)).await;
    assert_eq!(
        more.iter().map(id_of).collect::<Vec<_>>(),
        ["m7"],
        "only the new one"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_worker_loses_none_of_its_unsettled_messages_to_a_coalesced_acknowledgement() {
    let s = Setup::new("coalesce-kill");
    let first = s.backend(QueueOptions::default());
    let got = six_held(&first).await;
    // m2 is handed back; m5 still runs when m1, m3, m4 and m6 are settled:
    // m1-m4 go as one multiple acknowledgement (m2 is RabbitMQ's again, so
    // it is not covered), m6 alone; then the worker dies.
    assert_eq!(
        first
            .consume("w1")
            .hand_back(&[got[1].seq])
            .await
            .expect("back"),
        1
    );
    first
        .consume("w1")
        .settle(&[0, 2, 3, 5].map(|i| ack(got[i].seq, None)), LEASE)
        .await
        .expect("settle");
    first.consumer.close_now().await;
    drop(first);
    counts_become(&s, "celery", (2, 0)).await;
    let second = s.backend(QueueOptions::default());
    let mut back: Vec<String> = take_n(&second, "celery", 2, Duration::from_secs(20))
        .await
        .iter()
        .map(id_of)
        .collect();
    back.sort();
    assert_eq!(back, ["m2", "m5"], "the unsettled ones, and only those");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_workers_messages_are_redelivered_to_another() {
    let s = Setup::new("redeliver");
    let first = s.backend(QueueOptions::default());
    first
        .enqueue(Use::Request)
        .enqueue(&[out("r1", "celery", None)])
        .await
        .expect("enqueue");
    let held = take_n(&first, "celery", 1, Duration::from_secs(20)).await;
    assert_eq!(held.len(), 1);
    // The worker's connections end without an acknowledgement.
    first.consumer.close_now().await;
    drop(first);
    let second = s.backend(QueueOptions::default());
    let got = take_n(&second, "celery", 1, Duration::from_secs(20)).await;
    assert_eq!(got.iter().map(id_of).collect::<Vec<_>>(), ["r1"]);
    assert!(
        got[0]
            .text()
            .expect("text")
            .contains(r#""routing_key":"celery""#),
        "{:?}",
        got[0].text()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_parked_message_waits_in_rabbitmq_unacknowledged_nowhere_then_arrives() {
    let s = Setup::new("park");
    let b = s.backend(QueueOptions::default());
    b.enqueue(Use::Request)
        .enqueue(&[out("p1", "celery", None)])
        .await
        .expect("enqueue");
    let got = take_n(&b, "celery", 1, Duration::from_secs(20)).await;
    let due = crate::broker::now_ms() + 2_000;
    let sent = Instant::now();
    b.consume("w1")
        .park_held(got[0].seq, "celery", &got[0].payload, due, None)
        .await
        .expect("park");
    // Held by no one: the work queue and every delay level have it
    // ready or not at all.
    let all = s.rabbit().queue_counts(vhost_of(&s.url));
    assert!(all.iter().all(|(_, _, unacked)| *unacked == 0), "{all:?}");
    let waiting: u64 = all
        .iter()
        .filter(|(n, _, _)| n.starts_with("taskstack.delay."))
        .map(|(_, r, _)| r)
        .sum();
    assert_eq!(waiting, 1, "{all:?}");
    let span = b.inspect(Use::Request).delayed_span().await.expect("span");
    assert_eq!(span.parked, 1);
    let back = take_n(&b, "celery", 1, Duration::from_secs(30)).await;
    assert_eq!(back.iter().map(id_of).collect::<Vec<_>>(), ["p1"]);
    assert!(
        sent.elapsed() >= Duration::from_millis(1_500),
        "not before it was due"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_hour_long_eta_survives_a_broker_restart_in_the_delay_levels() {
    let mut own = Rabbit::start();
    let url = own.vhost("restart");
    let redis = crate::test_redis::server();
    let b = backend_on(&url, &redis.url, QueueOptions::default());
    let due = crate::broker::now_ms() + 3_600_000;
    b.enqueue(Use::Request)
        .enqueue(&[out("eta1", "celery", Some(due))])
        .await
        .expect("enqueue");
    let parked = |r: &Rabbit| -> Vec<(String, u64, u64)> {
        r.queue_counts(vhost_of(&url))
            .into_iter()
            .filter(|(_, ready, unacked)| *ready > 0 || *unacked > 0)
            .collect()
    };
    let before = parked(&own);
    own.kill();
    own.start_again();
    let after = parked(&own);
    assert_eq!(before, after, "the delayed message is still in its level");
    assert_eq!(after.len(), 1, "{after:?}");
    assert!(after[0].0.starts_with("taskstack.delay."), "{after:?}");
    assert_eq!(after[0].2, 0, "unacknowledged nowhere");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_letters_are_listed_on_redis_and_requeued_to_rabbitmq_once() {
    let s = Setup::new("dead");
    let b = s.backend(QueueOptions::default());
    b.enqueue(Use::Request)
        .enqueue(&[out("d1", "celery", None)])
        .await
        .expect("enqueue");
    let got = take_n(&b, "celery", 1, Duration::from_secs(20)).await;
    let mut record = DeadLetter {
        reason: "poison".into(),
        queue: "celery".into(),
        queue_key: "celery".into(),
        task_id: Some("d1".into()),
        task: Some("tests.add".into()),
        payload: String::new(),
        payload_base64: None,
        payload_key: None,
        payload_size: None,
        worker: "w1".into(),
        at: "2026-12-03T00:00:00Z".into(),
    };
    record.set_payload(&got[0].payload);
    b.consume("w1")
        .dead_letter(got[0].seq, &record)
        .await
        .expect("dead");
    assert_eq!(s.counts("celery"), (0, 0), "acknowledged once recorded");
    let mut dl = b.dead_letters(Use::Request);
    let (page, total) = dl.page("celery", 10).await.expect("page");
    assert_eq!(total, 1);
    assert_eq!(page[0].task_id.as_deref(), Some("d1"));
    let counts = b
        .inspect(Use::Request)
        .queue_counts(&["celery".into(), "other".into()])
        .await
        .expect("counts");
    let seen: Vec<(u64, u64, u64)> = counts
        .iter()
        .map(|c| (c.ready, c.in_flight, c.dead_lettered))
        .collect();
    assert_eq!(seen, [(0, 0, 1), (0, 0, 0)], "per queue, in order");
    let picked = dl
        .pick("celery", &DeadSelection::TaskIds(vec!["d1".into()]))
        .await
        .expect("pick");
    let moved = dl
        .apply("celery", DeadLetterAction::Requeue, &picked)
        .await
        .expect("requeue");
    assert_eq!(moved.len(), 1);
    // A retry picks again: the record is gone, nothing is sent.
    let again = dl
        .pick("celery", &DeadSelection::TaskIds(vec!["d1".into()]))
        .await
        .expect("pick again");
    assert!(again.is_empty(), "requeued once");
    // A request that picked it at the same moment (the same pick applied
    // again) sends its copy too and removes nothing: at least once, never
    // lost (the message goes out before the record is removed).
    let late = dl
        .apply("celery", DeadLetterAction::Requeue, &picked)
        .await
        .expect("a late requeue");
    assert!(late.is_empty(), "removed once");
    let back = take_n(&b, "celery", 2, Duration::from_secs(20)).await;
    assert_eq!(back.iter().map(id_of).collect::<Vec<_>>(), ["d1", "d1"]);
    let counts = b
        .inspect(Use::Request)
        .queue_counts(&["celery".into()])
        .await
        .expect("counts");
    assert_eq!(counts[0].dead_lettered, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_queue_declared_with_other_arguments_is_reported_and_left_alone() {
    let s = Setup::new("conflict");
    // Celery with task_queue_max_priority = 10 declared it first.
    let conn = declare_as_celery_with_max_priority_10(&s.url).await;
    let b = s.backend(QueueOptions::default());
    let err = b
        .enqueue(Use::Request)
        .enqueue(&[out("c1", "celery", None)])
        .await
        .expect_err("refused")
        .to_string();
    assert!(err.contains("PRECONDITION_FAILED"), "{err}");
    assert!(err.contains("\"celery\" already exists"), "{err}");
    assert!(err.contains("x-max-priority"), "{err}");
    // Unchanged: a passive declaration still finds it, and nothing went in.
    assert_eq!(s.counts("celery"), (0, 0));
    let _ = conn.close(200, "done".into()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_a_max_priority_higher_priorities_are_served_first_on_celerys_queue() {
    let s = Setup::new("priority");
    // Celery with task_queue_max_priority = 10 declared the queue first:
    // the same arguments, so taskstack's declaration agrees with it.
    let conn = declare_as_celery_with_max_priority_10(&s.url).await;
    let b = s.backend(QueueOptions {
        max_priority: Some(10),
        ..QueueOptions::default()
    });
    let with_priority = |id: &str, priority: u8| Outgoing {
        queue_key: "celery".to_owned(),
        payload: envelope::encode(&MessageSpec {
            id,
            task: "tests.add",
            queue: "celery",
            origin: "test",
            priority: Some(priority),
            ..MessageSpec::default()
        }),
        due_ms: None,
        pending: None,
    };
    let low: Vec<Outgoing> = (0..5)
        .map(|i| with_priority(&format!("low{i}"), 0))
        .collect();
    let high: Vec<Outgoing> = (0..5)
        .map(|i| with_priority(&format!("high{i}"), 9))
        .collect();
    b.enqueue(Use::Request)
        .enqueue(&low)
        .await
        .expect("enqueue low");
    b.enqueue(Use::Request)
        .enqueue(&high)
        .await
        .expect("enqueue high");
    let got: Vec<String> = take_n(&b, "celery", 10, Duration::from_secs(20))
        .await
        .iter()
        .map(id_of)
        .collect();
    assert_eq!(
        got,
        [
            "high0", "high1", "high2", "high3", "high4", "low0", "low1", "low2", "low3", "low4"
        ],
        "priority 9 first, each priority in its order"
    );
    // A queue taskstack declares itself gets the same argument.
    b.enqueue(Use::Request)
        .enqueue(&[Outgoing {
            queue_key: "other".to_owned(),
            ..with_priority("other2", 0)
        }])
        .await
        .expect("declared with x-max-priority");
    let info = s.list_queues(&["arguments"]);
    let row = info
        .lines()
        .find(|l| l.split_whitespace().next() == Some("other"))
        .unwrap_or_default();
    assert!(
        row.contains("x-max-priority") && row.contains("10"),
        "{info}"
    );
    let _ = conn.close(200, "done".into()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quorum_queues_are_declared_as_celery_declares_them() {
    let s = Setup::new("quorum");
    let b = s.backend(QueueOptions {
        quorum: true,
        ..QueueOptions::default()
    });
    b.enqueue(Use::Request)
        .enqueue(&[
            out("q1", "celery", None),
            out("q2", "celery", Some(crate::broker::now_ms() + 600_000)),
        ])
        .await
        .expect("enqueue");
    // Quorum queues report their counts a few seconds late: wait for them.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let types = s.list_queues(&["type", "messages"]);
        let row = |name: &str| {
            types
                .lines()
                .find(|l| l.split_whitespace().next() == Some(name))
                .map(|l| l.split_whitespace().skip(1).collect::<Vec<_>>().join(" "))
        };
        let seen = [
            row("celery"),
            row("celery_delayed_27"),
            row("celery_delayed_9"),
        ];
        let want = ["quorum 1", "quorum 0", "quorum 1"].map(|s| Some(s.to_owned()));
        if seen == want {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "quorum queues: {seen:?}\n{types}"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

#[cfg(feature = "beat")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_beat_publishes_each_slot_once_to_rabbitmq_through_its_outbox() {
    use crate::backend::{Acquired, SlotOutcome, SlotPublish};
    let s = Setup::new("beat");
    let b = s.backend(QueueOptions::default());
    let mut lock = b.leader_lock(Use::Loop);
    assert_eq!(
        lock.try_acquire("L1", LEASE).await.expect("acquire"),
        Acquired::Yes
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
    let other = SlotPublish {
        lock_value: "someone else",
        slot_ms: 120_000,
        ..slot
    };
    assert_eq!(
        ledger.publish(other).await.expect("not leader"),
        SlotOutcome::NotLeader
    );
    let got = take_n(&b, "celery", 2, Duration::from_secs(5)).await;
    assert_eq!(
        got.iter().map(id_of).collect::<Vec<_>>(),
        ["beat-1"],
        "published once"
    );
    assert_eq!(
        ledger.last_slots(&["every-minute"]).await.expect("last"),
        [Some(60_000)]
    );
}
