//! The engine on the in-memory backend, on paused time: retry backoff,
//! leases, ETAs and drains play out in simulated seconds, so each test takes
//! a few milliseconds of real time.

use super::{Registry, RunSummary, TaskContext, TaskError, TaskOptions, Worker, WorkerSettings};
use crate::backend::{Backend, MemoryBackend, Outgoing, Use};
use crate::proto::envelope::{MessageSpec, encode};
use crate::proto::keys::queue_key;
use crate::proto::{TaskResult, TaskState};
use serde_json::{Value, json};
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

const QUEUE: &str = "celery";

fn settings() -> WorkerSettings {
    WorkerSettings {
        queues: vec![QUEUE.into()],
        concurrency: 2,
        prefetch: 8,
        lease: Duration::from_secs(30),
        drain_timeout: Duration::from_secs(5),
        result_expires: Duration::from_secs(3600),
        result_extended: false,
        max_message_size: 1 << 20,
        max_task_delay: Duration::from_secs(86_400),
        state_file: None,
        nodename: None,
        remote_control: crate::config::RemoteControl::default(),
        task_events: false,
        track_started: false,
    }
}

/// A running worker on a shared memory backend.
struct Rig {
    stop: CancellationToken,
    run: JoinHandle<Result<RunSummary, super::WorkerError>>,
    id: String,
    stats: Arc<super::Stats>,
}

impl Rig {
    fn start(backend: &Arc<dyn Backend>, registry: Registry, settings: WorkerSettings) -> Self {
        let worker = Worker::on_backend(Arc::clone(backend), registry, settings);
        let id = worker.id().to_owned();
        let stats = worker.stats();
        let stop = CancellationToken::new();
        let run = tokio::spawn(worker.run(stop.clone().cancelled_owned()));
        Self {
            stop,
            run,
            id,
            stats,
        }
    }

    async fn shut_down(self) -> RunSummary {
        self.stop.cancel();
        self.run.await.expect("join").expect("worker run")
    }
}

fn memory() -> Arc<dyn Backend> {
    Arc::new(MemoryBackend::new())
}

/// Sends one message built from `spec` (its queue's bucket 0).
async fn send(b: &dyn Backend, spec: &MessageSpec<'_>) {
    let out = Outgoing {
        queue_key: queue_key(spec.queue, 0),
        payload: encode(spec),
        due_ms: None,
        pending: None,
    };
    b.enqueue(Use::Request).enqueue(&[out]).await.expect("send");
}

fn task<'a>(id: &'a str, name: &'a str, args: &'a [Value]) -> MessageSpec<'a> {
    MessageSpec {
        id,
        task: name,
        args,
        origin: "test",
        ..MessageSpec::default()
    }
}

/// The task's final record, waiting (in simulated time) up to a minute.
async fn final_record(b: &dyn Backend, id: &str) -> TaskResult {
    let mut results = b.results(Use::Request);
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Some(r) = results.read(id).await.expect("read")
            && r.status.is_ready()
        {
            return r;
        }
        assert!(Instant::now() < deadline, "no final record for {id}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn until(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(120);
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn dead_letters(b: &dyn Backend) -> Vec<crate::broker::DeadLetter> {
    let mut dl = b.dead_letters(Use::Request);
    dl.page(QUEUE, 100).await.expect("dead letters").0
}

async fn queued(b: &dyn Backend) -> (u64, u64) {
    let mut inspect = b.inspect(Use::Request);
    let c = inspect
        .queue_counts(&[QUEUE.to_owned()])
        .await
        .expect("counts");
    (c[0].ready, c[0].in_flight)
}

fn adder() -> Registry {
    let mut r = Registry::new();
    r.register("t.add", |ctx: TaskContext| async move {
        let sum: i64 = ctx.args.iter().filter_map(Value::as_i64).sum();
        Ok(json!(sum))
    });
    r
}

#[tokio::test(start_paused = true)]
async fn runs_tasks_and_stores_their_results() {
    let b = memory();
    let rig = Rig::start(&b, adder(), settings());
    for i in 0..20 {
        let id = format!("t{i}");
        send(&*b, &task(&id, "t.add", &[json!(i), json!(1)])).await;
    }
    for i in 0..20 {
        let r = final_record(&*b, &format!("t{i}")).await;
        assert_eq!((r.status, r.result), (TaskState::Success, json!(i + 1)));
        assert!(r.date_started.is_some());
    }
    let summary = rig.shut_down().await;
    assert_eq!(summary.processed, 20);
    assert_eq!(queued(&*b).await, (0, 0), "nothing left held");
}

#[tokio::test(start_paused = true)]
async fn records_carry_args_and_kwargs_only_with_result_extended() {
    for extended in [false, true] {
        let b = memory();
        let rig = Rig::start(
            &b,
            adder(),
            WorkerSettings {
                result_extended: extended,
                ..settings()
            },
        );
        let big = json!("x".repeat(crate::proto::ARGS_BOUND));
        send(&*b, &task("small", "t.add", &[json!(1), json!(2)])).await;
        send(&*b, &task("big", "t.add", &[big])).await;
        let small = final_record(&*b, "small").await;
        let over = final_record(&*b, "big").await;
        if extended {
            assert_eq!(small.args, Some(json!([1, 2])), "taken before the run");
            assert_eq!(small.kwargs, Some(json!({})));
            assert_eq!((over.args, over.kwargs), (None, Some(json!({}))), "bounded");
        } else {
            assert_eq!((small.args, small.kwargs), (None, None), "Celery's default");
        }
        rig.shut_down().await;
    }
}

#[tokio::test(start_paused = true)]
async fn retries_wait_their_backoff_then_succeed() {
    let b = memory();
    let attempts = Arc::new(AtomicU32::new(0));
    let mut r = Registry::new();
    let seen = Arc::clone(&attempts);
    let policy = TaskOptions {
        max_retries: 3,
        retry_backoff: Duration::from_secs(10),
        retry_backoff_max: Duration::from_secs(600),
    };
    r.register_with("t.flaky", policy, move |_ctx: TaskContext| {
        let seen = Arc::clone(&seen);
        async move {
            if seen.fetch_add(1, Ordering::SeqCst) < 2 {
                Err(TaskError::retry("not yet"))
            } else {
                Ok(json!("done"))
            }
        }
    });
    let rig = Rig::start(&b, r, settings());
    let began = Instant::now();
    send(&*b, &task("f1", "t.flaky", &[])).await;
    let r = final_record(&*b, "f1").await;
    assert_eq!((r.status, r.result), (TaskState::Success, json!("done")));
    assert_eq!(r.retries, Some(2));
    assert_eq!(attempts.load(Ordering::SeqCst), 3);
    // Backoffs 10 s × 2ⁿ with equal jitter: at least 5 s, then at least 10 s.
    let waited = began.elapsed();
    assert!(
        waited >= Duration::from_secs(15),
        "retried after {waited:?}"
    );
    assert!(waited < Duration::from_secs(31), "retried after {waited:?}");
    assert_eq!(super::Stats::get(&rig.stats.retried), 2);
    rig.shut_down().await;
}

#[tokio::test(start_paused = true)]
async fn exhausted_retries_record_failure_and_dead_letter_the_task() {
    let b = memory();
    let mut r = Registry::new();
    let policy = TaskOptions {
        max_retries: 1,
        retry_backoff: Duration::from_secs(2),
        retry_backoff_max: Duration::from_secs(2),
    };
    r.register_with("t.never", policy, |_ctx: TaskContext| async {
        Err(TaskError::retry("the upstream is down"))
    });
    let rig = Rig::start(&b, r, settings());
    send(&*b, &task("n1", "t.never", &[])).await;
    let r = final_record(&*b, "n1").await;
    assert_eq!(r.status, TaskState::Failure);
    assert_eq!(r.result["exc_type"], "MaxRetriesExceededError");
    let dead = dead_letters(&*b).await;
    assert_eq!(dead.len(), 1);
    assert_eq!(dead[0].task_id.as_deref(), Some("n1"));
    assert!(dead[0].reason.contains("retries exhausted (1)"), "{dead:?}");
    assert!(dead[0].payload.contains("t.never"), "payload kept");
    rig.shut_down().await;
    assert_eq!(queued(&*b).await, (0, 0));
}

#[tokio::test(start_paused = true)]
async fn poison_is_dead_lettered_and_the_worker_goes_on() {
    let b = memory();
    let mut settings = settings();
    settings.max_message_size = 4096;
    let rig = Rig::start(&b, adder(), settings);
    send(&*b, &task("u1", "t.unknown", &[])).await;
    let big = [json!("x".repeat(8192))];
    send(&*b, &task("big1", "t.add", &big)).await;
    let raw = Outgoing {
        queue_key: QUEUE.into(),
        payload: "not json".into(),
        due_ms: None,
        pending: None,
    };
    b.enqueue(Use::Request).enqueue(&[raw]).await.expect("send");
    send(&*b, &task("ok1", "t.add", &[json!(2), json!(2)])).await;

    assert_eq!(final_record(&*b, "ok1").await.result, json!(4));
    let unknown = final_record(&*b, "u1").await;
    assert_eq!(unknown.result["exc_type"], "NotRegistered");
    let dead = dead_letters(&*b).await;
    assert_eq!(dead.len(), 3, "{dead:?}");
    let big = dead.iter().find(|d| d.payload_size.is_some());
    let big = big.expect("the oversized message");
    assert!(big.reason.contains("4096"), "{}", big.reason);
    assert!(big.payload.contains("big1"), "its bytes were kept");
    assert!(dead.iter().any(|d| d.payload == "not json"));
    rig.shut_down().await;
    assert_eq!(queued(&*b).await, (0, 0));
}

#[tokio::test(start_paused = true)]
async fn etas_park_until_due_and_expired_tasks_are_revoked() {
    let b = memory();
    let rig = Rig::start(&b, adder(), settings());
    let now = crate::backend::Clock::now_ms(&*b.clock());
    let at = |secs: i64| chrono::DateTime::from_timestamp_millis(now + secs * 1000);
    let (args, later, far) = ([json!(1)], at(30), at(2 * 86_400));
    send(
        &*b,
        &MessageSpec {
            eta: later,
            ..task("eta1", "t.add", &args)
        },
    )
    .await;
    send(
        &*b,
        &MessageSpec {
            eta: far,
            ..task("far1", "t.add", &args)
        },
    )
    .await;
    send(
        &*b,
        &MessageSpec {
            expires: at(-1),
            ..task("exp1", "t.add", &args)
        },
    )
    .await;
    let began = Instant::now();
    let r = final_record(&*b, "eta1").await;
    assert_eq!(r.status, TaskState::Success);
    assert!(began.elapsed() >= Duration::from_secs(29), "ran early");
    assert_eq!(final_record(&*b, "exp1").await.status, TaskState::Revoked);
    let far = final_record(&*b, "far1").await;
    assert_eq!(far.status, TaskState::Failure, "beyond max_task_delay");
    let dead = dead_letters(&*b).await;
    assert!(dead[0].reason.contains("max_task_delay"), "{dead:?}");
    rig.shut_down().await;
}

/// Defect 9: once the lease is known lost, nothing held and not yet started
/// may start (a reaper already put those messages back).
#[tokio::test(start_paused = true)]
async fn held_messages_are_not_started_once_the_lease_is_lost() {
    let b = memory();
    let mut r = adder();
    r.register("t.sleep", |ctx: TaskContext| async move {
        let secs = ctx.args.first().and_then(Value::as_u64).unwrap_or(0);
        tokio::time::sleep(Duration::from_secs(secs)).await;
        Ok(Value::Null)
    });
    let mut s = settings();
    s.concurrency = 1;
    s.prefetch = 4;
    let rig = Rig::start(&b, r, s);
    let long = [json!(10)];
    send(&*b, &task("s1", "t.sleep", &long)).await;
    for i in 0..3 {
        let two = [json!(i), json!(i)];
        send(&*b, &task(&format!("a{i}"), "t.add", &two)).await;
    }
    let mut inspect = b.inspect(Use::Request);
    let deadline = Instant::now() + Duration::from_secs(5);
    while inspect.queue_counts(&[QUEUE.into()]).await.expect("counts")[0].in_flight < 4 {
        assert!(Instant::now() < deadline, "the worker never held all four");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // A reaper decides the lease expired: everything held goes back.
    let restored = b.leases(Use::Request).release(&rig.id).await.expect("reap");
    assert_eq!(restored, 4);
    let stats = Arc::clone(&rig.stats);
    until("three forfeits", || {
        super::Stats::get(&stats.forfeited) == 3
    })
    .await;
    let mut results = b.results(Use::Request);
    for i in 0..3 {
        let r = results.read(&format!("a{i}")).await.expect("read");
        assert!(r.is_none(), "a{i} started after its hold was gone: {r:?}");
    }
    rig.shut_down().await;
}

#[tokio::test(start_paused = true)]
async fn a_dead_workers_messages_are_restored_after_its_lease() {
    let b = memory();
    // A worker that took a message and died (never renews, never settles).
    send(&*b, &task("d1", "t.add", &[json!(5)])).await;
    let mut dead = b.consume("dead-worker");
    let lease = Duration::from_secs(30);
    let held = dead
        .take(&[QUEUE.to_owned()], 1, lease, usize::MAX)
        .await
        .expect("take");
    assert_eq!(held.len(), 1);
    let began = Instant::now();
    let rig = Rig::start(&b, adder(), settings());
    let r = final_record(&*b, "d1").await;
    assert_eq!(r.result, json!(5));
    assert!(
        began.elapsed() >= lease - Duration::from_secs(1),
        "too early"
    );
    assert_eq!(super::Stats::get(&rig.stats.restored_from_dead_workers), 1);
    rig.shut_down().await;
}

#[tokio::test(start_paused = true)]
async fn a_drain_hands_back_what_did_not_start() {
    let b = memory();
    let mut r = Registry::new();
    r.register("t.slow", |_ctx: TaskContext| async {
        tokio::time::sleep(Duration::from_secs(2)).await;
        Ok(Value::Null)
    });
    let mut s = settings();
    s.concurrency = 1;
    s.prefetch = 4;
    let rig = Rig::start(&b, r, s);
    for i in 0..4 {
        send(&*b, &task(&format!("s{i}"), "t.slow", &[])).await;
    }
    let mut inspect = b.inspect(Use::Request);
    let deadline = Instant::now() + Duration::from_secs(5);
    while inspect.queue_counts(&[QUEUE.into()]).await.expect("counts")[0].in_flight < 4 {
        assert!(Instant::now() < deadline, "the worker never held all four");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let summary = rig.shut_down().await;
    // The running one finishes within the drain; three go back unstarted.
    assert_eq!((summary.processed, summary.handed_back), (1, 3));
    assert_eq!(queued(&*b).await, (3, 0));
    assert_eq!(final_record(&*b, "s0").await.status, TaskState::Success);
}

#[tokio::test(start_paused = true)]
async fn hard_time_limits_stop_the_task() {
    let b = memory();
    let mut r = Registry::new();
    r.register("t.hang", |_ctx: TaskContext| async {
        tokio::time::sleep(Duration::from_secs(3600)).await;
        Ok(Value::Null)
    });
    let rig = Rig::start(&b, r, settings());
    send(
        &*b,
        &MessageSpec {
            hard_time_limit: Some(Duration::from_secs(5)),
            ..task("h1", "t.hang", &[])
        },
    )
    .await;
    let r = final_record(&*b, "h1").await;
    assert_eq!(r.status, TaskState::Failure);
    assert_eq!(r.result["exc_type"], "TimeLimitExceeded");
    rig.shut_down().await;
}

#[tokio::test(start_paused = true)]
async fn a_revoked_task_is_skipped() {
    let b = memory();
    // Enqueued through a producer that records PENDING tasks (the web API).
    let pending = TaskResult::pending("r1", "t.add", QUEUE);
    let out = Outgoing {
        queue_key: QUEUE.into(),
        payload: encode(&task("r1", "t.add", &[])),
        due_ms: None,
        pending: Some(crate::backend::PendingRecord {
            task_id: "r1".into(),
            record: serde_json::to_string(&pending).expect("json"),
            ttl: Duration::from_secs(3600),
        }),
    };
    b.enqueue(Use::Request).enqueue(&[out]).await.expect("send");
    let revoked = TaskResult::new(
        "r1",
        TaskState::Revoked,
        Value::Null,
        crate::proto::Provenance {
            name: "t.add",
            worker: "api",
            retries: 0,
            queue: QUEUE,
            parent_id: None,
        },
    );
    let record = serde_json::to_string(&revoked).expect("json");
    let mut states = b.task_states(Use::Request);
    let ttl = Duration::from_secs(3600);
    let outcome = states.revoke("r1", &record, ttl).await.expect("revoke");
    assert_eq!(outcome, crate::broker::RevokeOutcome::Revoked);
    let ran = Arc::new(AtomicU32::new(0));
    let mut r = Registry::new();
    let count = Arc::clone(&ran);
    r.register("t.add", move |_ctx: TaskContext| {
        let count = Arc::clone(&count);
        async move {
            count.fetch_add(1, Ordering::SeqCst);
            Ok(Value::Null)
        }
    });
    let rig = Rig::start(&b, r, settings());
    send(&*b, &task("r2", "t.add", &[])).await;
    final_record(&*b, "r2").await;
    let stats = Arc::clone(&rig.stats);
    until("the revoked task skipped", || {
        super::Stats::get(&stats.revoked) == 1
    })
    .await;
    assert_eq!(ran.load(Ordering::SeqCst), 1, "only r2 ran");
    assert_eq!(final_record(&*b, "r1").await.status, TaskState::Revoked);
    rig.shut_down().await;
    assert_eq!(queued(&*b).await, (0, 0));
}

#[tokio::test(start_paused = true)]
async fn an_unreachable_backend_is_retried_without_losing_messages() {
    let mem = MemoryBackend::new();
    let b: Arc<dyn Backend> = Arc::new(mem.clone());
    let rig = Rig::start(&b, adder(), settings());
    send(&*b, &task("x1", "t.add", &[json!(1)])).await;
    assert_eq!(final_record(&*b, "x1").await.result, json!(1));
    mem.set_available(false);
    tokio::time::sleep(Duration::from_secs(3)).await;
    mem.set_available(true);
    send(&*b, &task("x2", "t.add", &[json!(2)])).await;
    assert_eq!(final_record(&*b, "x2").await.result, json!(2));
    rig.shut_down().await;
    assert_eq!(queued(&*b).await, (0, 0));
}

fn started_ms(r: &TaskResult) -> i64 {
    let s = r.date_started.as_deref().expect("date_started");
    chrono::DateTime::parse_from_rfc3339(s)
        .expect("rfc3339")
        .timestamp_millis()
}

#[tokio::test(start_paused = true)]
async fn rate_limited_tasks_wait_their_turn_without_holding_up_others() {
    let b = memory();
    let mut r = adder();
    r.register("t.free", |_ctx: TaskContext| async { Ok(Value::Null) });
    let rate = crate::config::RateLimit::parse("2/s").expect("valid");
    assert!(r.set_limits(
        "t.add",
        super::TaskLimits {
            rate_limit: rate,
            ..super::TaskLimits::default()
        },
    ));
    let rig = Rig::start(&b, r, settings());
    for i in 0..4 {
        send(&*b, &task(&format!("r{i}"), "t.add", &[json!(i)])).await;
    }
    send(&*b, &task("free", "t.free", &[])).await;
    let mut starts = Vec::new();
    for i in 0..4 {
        let r = final_record(&*b, &format!("r{i}")).await;
        assert_eq!((r.status, &r.result), (TaskState::Success, &json!(i)));
        starts.push(started_ms(&r));
    }
    starts.sort_unstable();
    for pair in starts.windows(2) {
        assert!(pair[1] - pair[0] >= 500, "{starts:?}");
    }
    let free = final_record(&*b, "free").await;
    assert!(started_ms(&free) < starts[1], "{starts:?}");
    let summary = rig.shut_down().await;
    assert_eq!(summary.processed, 5);
}

#[tokio::test(start_paused = true)]
async fn a_tasks_time_limits_apply_when_its_message_names_none() {
    let b = memory();
    let mut r = Registry::new();
    r.register("t.hang", |_ctx: TaskContext| async {
        tokio::time::sleep(Duration::from_secs(3600)).await;
        Ok(Value::Null)
    });
    r.set_limits(
        "t.hang",
        super::TaskLimits {
            time_limit: Some(Duration::from_secs(5)),
            ..super::TaskLimits::default()
        },
    );
    let rig = Rig::start(&b, r, settings());
    let t0 = Instant::now();
    send(&*b, &task("h1", "t.hang", &[])).await;
    let r = final_record(&*b, "h1").await;
    assert_eq!(r.result["exc_type"], "TimeLimitExceeded");
    assert!(t0.elapsed() < Duration::from_secs(10));
    // The message's own limit wins.
    let t1 = Instant::now();
    send(
        &*b,
        &MessageSpec {
            hard_time_limit: Some(Duration::from_secs(1)),
            ..task("h2", "t.hang", &[])
        },
    )
    .await;
    let r = final_record(&*b, "h2").await;
    assert_eq!(r.result["exc_type"], "TimeLimitExceeded");
    assert!(t1.elapsed() < Duration::from_secs(3));
    rig.shut_down().await;
}

#[test]
fn a_pool_too_small_for_the_loops_is_refused_naming_the_key() {
    assert!(super::check_pool_size(super::MIN_POOL_SIZE).is_ok());
    assert!(super::check_pool_size(super::MIN_POOL_SIZE + 5).is_ok());
    for size in [1, 4, super::MIN_POOL_SIZE - 1] {
        let err = super::check_pool_size(size)
            .expect_err("too small")
            .to_string();
        assert!(err.contains("redis_pool_size"), "{err}");
        assert!(err.contains(&size.to_string()), "{err}");
        assert!(
            err.contains(&format!("at least {}", super::MIN_POOL_SIZE)),
            "{err}"
        );
    }
    // The default configuration runs a worker.
    let defaults = crate::config::Config::load_from(None, &[]).expect("defaults load");
    assert!(super::check_pool_size(defaults.redis_pool_size.get()).is_ok());
}
