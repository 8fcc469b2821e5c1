//! The worker engine in-process against a real Redis: round trips, retries,
//! delays, expiry, priorities, limits, panics and bad input.

use anyhow::Result;
use redis::Commands as _;
use serde_json::{Map, Value, json};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use taskstack::backend::Use;
use taskstack::proto::TaskState;
use taskstack::worker::{Registry, TaskContext, TaskError, TaskOptions, builtin};
use taskstack::{SendOptions, TaskRequest};
use taskstack_integration::{
    InProcessWorker, RedisServer, namespace, producer, settings, wait_until,
};

const WAIT: Duration = Duration::from_secs(20);

fn builtins() -> Registry {
    let mut r = Registry::new();
    builtin::register(&mut r);
    r
}

fn req(name: &str, args: Vec<Value>, options: SendOptions) -> TaskRequest {
    TaskRequest {
        name: name.into(),
        args,
        kwargs: Map::new(),
        options,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn round_trip_echo_and_add() -> Result<()> {
    let redis = RedisServer::start()?;
    let ns = namespace("roundtrip");
    let w = InProcessWorker::start(&redis.url(), &ns, builtins(), settings(&["celery"]))?;
    let p = producer(&redis.url(), &ns)?;

    let add = p.send_task(builtin::ADD, vec![json!(2), json!(3)]).await?;
    let mut kwargs = Map::new();
    kwargs.insert("k".into(), json!("v"));
    let echo = p
        .send(&TaskRequest {
            name: builtin::ECHO.into(),
            args: vec![json!([1, 2])],
            kwargs,
            options: SendOptions::default(),
        })
        .await?;
    let r = p.wait(&add, WAIT).await?;
    assert_eq!((r.status, r.result), (TaskState::Success, json!(5)));
    assert_eq!(r.worker.as_deref(), Some(w.id.as_str()));
    let r = p.wait(&echo, WAIT).await?;
    assert_eq!(r.result, json!({"args": [[1, 2]], "kwargs": {"k": "v"}}));

    // Results expire: the key carries a TTL no longer than configured.
    let ttl: i64 = redis.conn()?.ttl(format!("celery-task-meta-{add}"))?;
    assert!(ttl > 0 && ttl <= 600, "ttl {ttl}");

    let fail = p.send_task(builtin::FAIL, vec![json!("boom")]).await?;
    let r = p.wait(&fail, WAIT).await?;
    assert_eq!(r.status, TaskState::Failure);
    assert_eq!(r.result["exc_type"], "RuntimeError");
    assert_eq!(r.result["exc_message"], json!(["boom"]));

    let wid = w.id.clone();
    let summary = w.stop().await?;
    assert_eq!(summary.processed, 3);
    // Everything settled: nothing held, no lease left behind.
    let mut c = redis.conn()?;
    let held: i64 = c.hlen(format!("{ns}:held:{wid}"))?;
    assert_eq!(held, 0);
    let named: bool = c.exists(format!("{ns}:inflight:{wid}"))?;
    assert!(!named, "nor the lists its holds named");
    let leases: i64 = c.zcard(format!("{ns}:leases"))?;
    assert_eq!(leases, 0, "a stopped worker releases its lease");
    Ok(())
}

/// Subscribers of a result channel on the server (`PUBSUB NUMSUB`).
fn subscribers(redis: &RedisServer, task_id: &str) -> Result<i64> {
    let (_, n): (String, i64) = redis::cmd("PUBSUB")
        .arg("NUMSUB")
        .arg(format!("celery-task-meta-{task_id}"))
        .query(&mut redis.conn()?)?;
    Ok(n)
}

/// Waits until nobody is subscribed to `task_id`'s result channel.
async fn unsubscribed(redis: &RedisServer, task_id: &str) -> Result<()> {
    wait_until(
        &format!("no subscriber left on {task_id}'s result"),
        Duration::from_secs(10),
        || async { Ok((subscribers(redis, task_id)? == 0).then_some(())) },
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn send_and_wait_returns_final_results_and_leaves_no_subscription() -> Result<()> {
    let redis = RedisServer::start()?;
    let ns = namespace("sendwait");
    let w = InProcessWorker::start(&redis.url(), &ns, builtins(), settings(&["celery"]))?;
    let p = producer(&redis.url(), &ns)?;

    let with_id = |name: &str, args: Vec<Value>, id: &str, queue: &str| {
        req(
            name,
            args,
            SendOptions {
                task_id: Some(id.into()),
                queue: Some(queue.into()),
                ..SendOptions::default()
            },
        )
    };
    // A success and a failure, each the task's final record.
    let r = p
        .send_and_wait(
            &with_id(builtin::ADD, vec![json!(2), json!(3)], "sw-add", "celery"),
            WAIT,
        )
        .await?;
    assert_eq!(
        (r.task_id.as_str(), r.status, r.result),
        ("sw-add", TaskState::Success, json!(5))
    );
    assert_eq!(r.worker.as_deref(), Some(w.id.as_str()));
    let r = p
        .send_and_wait(
            &with_id(builtin::FAIL, vec![json!("boom")], "sw-fail", "celery"),
            WAIT,
        )
        .await?;
    assert_eq!(r.status, TaskState::Failure);
    assert_eq!(r.result["exc_message"], json!(["boom"]));
    unsubscribed(&redis, "sw-add").await?;
    unsubscribed(&redis, "sw-fail").await?;

    // Waiting for a result that is already stored answers from the key and
    // drops the subscription it made.
    let r = p.wait("sw-add", WAIT).await?;
    assert_eq!(r.result, json!(5));
    unsubscribed(&redis, "sw-add").await?;

    // No worker serves `elsewhere`: the wait times out naming the task, and
    // the task stays queued.
    let lonely = with_id(builtin::ECHO, vec![json!(1)], "sw-lonely", "elsewhere");
    let err = p
        .send_and_wait(&lonely, Duration::from_millis(300))
        .await
        .expect_err("nobody runs it");
    assert!(
        matches!(&err, taskstack::producer::ProducerError::Timeout { task_id, .. } if task_id == "sw-lonely"),
        "{err}"
    );
    unsubscribed(&redis, "sw-lonely").await?;
    let queued: i64 = redis.conn()?.llen("elsewhere")?;
    assert_eq!(queued, 1);

    // A caller that gives up first (its own timeout drops the wait midway)
    // leaves no subscription behind either.
    let again = with_id(builtin::ECHO, vec![json!(2)], "sw-dropped", "elsewhere");
    let gave_up =
        tokio::time::timeout(Duration::from_millis(300), p.send_and_wait(&again, WAIT)).await;
    assert!(gave_up.is_err(), "nobody runs it: {gave_up:?}");
    unsubscribed(&redis, "sw-dropped").await?;

    // A send that fails (the queue's key holds a string, so LPUSH answers
    // WRONGTYPE) ends the wait at once with the send's error.
    redis::cmd("SET")
        .arg("broken")
        .arg("not a list")
        .query::<()>(&mut redis.conn()?)?;
    let unsent = with_id(builtin::ECHO, vec![json!(3)], "sw-unsent", "broken");
    let t = Instant::now();
    let err = p
        .send_and_wait(&unsent, Duration::from_secs(60))
        .await
        .expect_err("the queue's key is not a list");
    assert!(
        t.elapsed() < Duration::from_secs(30),
        "the wait outlived the failed send: {:?}",
        t.elapsed()
    );
    assert!(err.to_string().contains("WRONGTYPE"), "{err}");
    unsubscribed(&redis, "sw-unsent").await?;

    // An invalid request sends nothing and subscribes to nothing.
    let bad = req(
        builtin::ECHO,
        vec![],
        SendOptions {
            task_id: Some("sw-bad".into()),
            priority: Some(10),
            ..SendOptions::default()
        },
    );
    let err = p.send_and_wait(&bad, WAIT).await.expect_err("priority 10");
    assert!(err.to_string().contains("priority"), "{err}");
    assert_eq!(subscribers(&redis, "sw-bad")?, 0);
    assert_eq!(redis.conn()?.llen::<_, i64>("celery")?, 0);

    w.stop().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retries_back_off_then_succeed_or_dead_letter() -> Result<()> {
    let redis = RedisServer::start()?;
    let ns = namespace("retry");
    let attempts: Arc<Mutex<Vec<(u32, Instant)>>> = Arc::default();
    let mut r = Registry::new();
    let a = Arc::clone(&attempts);
    let policy = TaskOptions {
        max_retries: 3,
        retry_backoff: Duration::from_millis(200),
        retry_backoff_max: Duration::from_secs(5),
    };
    r.register_with("t.flaky", policy, move |ctx: TaskContext| {
        let a = Arc::clone(&a);
        async move {
            a.lock().expect("lock").push((ctx.retries, Instant::now()));
            if ctx.retries < 2 {
                Err(TaskError::retry("not yet"))
            } else {
                Ok(json!(ctx.retries))
            }
        }
    });
    r.register_with("t.hopeless", policy, |_ctx: TaskContext| async move {
        Err(TaskError::retry("never works"))
    });
    let w = InProcessWorker::start(&redis.url(), &ns, r, settings(&["celery"]))?;
    let p = producer(&redis.url(), &ns)?;

    let id = p.send_task("t.flaky", vec![]).await?;
    let res = p.wait(&id, WAIT).await?;
    assert_eq!(
        (res.status, res.result.clone()),
        (TaskState::Success, json!(2))
    );
    assert_eq!(res.retries, Some(2));
    let times = attempts.lock().expect("lock").clone();
    assert_eq!(times.iter().map(|t| t.0).collect::<Vec<_>>(), [0, 1, 2]);
    // Backoff: ≥ half of 200 ms before retry 1, ≥ half of 400 ms before retry 2.
    assert!(times[1].1 - times[0].1 >= Duration::from_millis(100));
    assert!(times[2].1 - times[1].1 >= Duration::from_millis(200));

    // A message's own max_retries wins over the registered policy.
    let id = p
        .send(&req(
            "t.hopeless",
            vec![],
            SendOptions {
                max_retries: Some(1),
                ..Default::default()
            },
        ))
        .await?;
    let res = p.wait(&id, WAIT).await?;
    assert_eq!(res.status, TaskState::Failure);
    assert_eq!(res.result["exc_type"], "MaxRetriesExceededError");
    assert_eq!(res.retries, Some(1));
    // The FAILURE result is stored first, then the message is dead-lettered.
    let dead = wait_until("the dead letter", WAIT, || {
        let mut dl = p.backend().dead_letters(Use::Request);
        async move {
            let (d, _) = dl.page("celery", 10).await?;
            Ok((!d.is_empty()).then_some(d))
        }
    })
    .await?;
    assert_eq!(dead.len(), 1);
    assert_eq!(dead[0].task_id.as_deref(), Some(id.as_str()));
    assert!(
        dead[0].reason.contains("retries exhausted"),
        "{}",
        dead[0].reason
    );
    w.stop().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn countdown_waits_in_redis_and_expired_tasks_are_revoked() -> Result<()> {
    let redis = RedisServer::start()?;
    let ns = namespace("eta");
    let p = producer(&redis.url(), &ns)?;
    let sent = chrono::Utc::now();
    let later = p
        .send(&req(
            builtin::ADD,
            vec![json!(1)],
            SendOptions {
                countdown: Some(Duration::from_millis(1500)),
                ..Default::default()
            },
        ))
        .await?;
    // Parked in Redis, not in any queue or worker.
    let mut c = redis.conn()?;
    assert_eq!(c.zcard::<_, i64>(format!("{ns}:parked"))?, 1);
    assert_eq!(c.llen::<_, i64>("celery")?, 0);

    let expired = p
        .send(&req(
            builtin::ADD,
            vec![json!(1)],
            SendOptions {
                expires: Some(sent - chrono::Duration::seconds(1)),
                ..Default::default()
            },
        ))
        .await?;
    let w = InProcessWorker::start(&redis.url(), &ns, builtins(), settings(&["celery"]))?;
    let r = p.wait(&expired, WAIT).await?;
    assert_eq!(r.status, TaskState::Revoked);

    let r = p.wait(&later, WAIT).await?;
    assert_eq!(r.status, TaskState::Success);
    let done = r.done_at().expect("date_done");
    assert!(
        done - sent >= chrono::Duration::milliseconds(1500),
        "ran after {:?}",
        done - sent
    );
    assert_eq!(c.zcard::<_, i64>(format!("{ns}:parked"))?, 0);

    // A producer that pushes an ETA message straight to the queue (as Python
    // Celery does) gets it parked by the worker, not run early.
    let eta = chrono::Utc::now() + chrono::Duration::milliseconds(1200);
    let id = "eta-direct-1";
    let raw = taskstack::proto::envelope::encode(&taskstack::proto::MessageSpec {
        id,
        task: builtin::ADD,
        args: &[json!(4)],
        queue: "celery",
        eta: Some(eta),
        origin: "test",
        ..Default::default()
    });
    let _: () = c.lpush("celery", raw)?;
    let r = p.wait(id, WAIT).await?;
    assert_eq!(r.result, json!(4));
    assert!(r.done_at().expect("done") >= eta, "ran before its ETA");
    w.stop().await?;
    Ok(())
}

/// Calls of `command` since the last `CONFIG RESETSTAT`, from `INFO commandstats`.
fn calls(redis: &RedisServer, command: &str) -> Result<u64> {
    let info: String = redis::cmd("INFO")
        .arg("commandstats")
        .query(&mut redis.conn()?)?;
    let prefix = format!("cmdstat_{command}:calls=");
    Ok(info
        .lines()
        .find_map(|l| l.strip_prefix(&prefix))
        .and_then(|rest| rest.split(',').next())
        .map_or(Ok(0), str::parse)?)
}

/// An idle worker woken by a message takes once and blocks again: it does
/// not ask a second time to learn that the lists it just found empty are
/// still empty. Every take (`fetch.lua`) renews the lease with one `ZADD`;
/// the lease here is long enough that no heartbeat does.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_worker_takes_once_per_message_it_wakes_for() -> Result<()> {
    let redis = RedisServer::start()?;
    let ns = namespace("idle-take");
    let mut s = settings(&["celery"]);
    s.lease = Duration::from_secs(300);
    let w = InProcessWorker::start(&redis.url(), &ns, builtins(), s)?;
    let p = producer(&redis.url(), &ns)?;
    wait_until("the worker to block for messages", WAIT, || async {
        Ok((calls(&redis, "blmove")? > 0).then_some(()))
    })
    .await?;
    redis::cmd("CONFIG")
        .arg("RESETSTAT")
        .query::<()>(&mut redis.conn()?)?;
    const N: u64 = 20;
    for i in 0..N {
        let id = p.send_task(builtin::ADD, vec![json!(i), json!(1)]).await?;
        let r = p.wait(&id, WAIT).await?;
        assert_eq!(r.result, json!(i + 1));
    }
    // Each wait that ended (a message landed, or its 100 ms passed) is
    // followed by one take; a take in flight or one that found a message
    // between two waits may add one or two.
    let (takes, waits) = (calls(&redis, "zadd")?, calls(&redis, "blmove")?);
    assert!(waits >= N, "{waits} waits for {N} messages");
    assert!(
        takes <= waits + 2,
        "{takes} takes for {waits} waits: a woken worker asked twice"
    );
    // The take started the message the wait brought (no start.lua, whose
    // SMISMEMBER is the only one); one that came between a wait's timeout
    // and the next take goes through start.lua, as may a second.
    let starts = calls(&redis, "smismember")?;
    assert!(
        starts <= 2,
        "{starts} of {N} messages were started apart from their take"
    );
    // A message on another priority bucket (not the one the wait watches)
    // is still served.
    let id = p
        .send(&req(
            builtin::ADD,
            vec![json!(1), json!(1)],
            SendOptions {
                priority: Some(6),
                ..Default::default()
            },
        ))
        .await?;
    assert_eq!(p.wait(&id, WAIT).await?.result, json!(2));
    w.stop().await?;
    Ok(())
}

/// A Celery-protocol message of `taskstack.add(1, 2)` with task id `id`
/// for the `celery` queue.
fn add_message(id: &str) -> String {
    taskstack::proto::envelope::encode(&taskstack::proto::MessageSpec {
        id,
        task: builtin::ADD,
        args: &[json!(1), json!(2)],
        queue: "celery",
        origin: "test",
        ..Default::default()
    })
}

/// A message revoked before it reached an idle worker is skipped by the
/// take that starts it: acknowledged, never run, its REVOKED record kept.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_worker_skips_a_landed_message_revoked_before_it_came() -> Result<()> {
    let redis = RedisServer::start()?;
    let ns = namespace("idle-revoked");
    let w = InProcessWorker::start(&redis.url(), &ns, builtins(), settings(&["celery"]))?;
    let p = producer(&redis.url(), &ns)?;
    wait_until("the worker to block for messages", WAIT, || async {
        Ok((calls(&redis, "blmove")? > 0).then_some(()))
    })
    .await?;
    let keys = taskstack::proto::Keys::new(&ns);
    let mut c = redis.conn()?;
    // A message that comes between a wait's timeout and the next take is
    // started by start.lua instead (the same skip, by the other path):
    // then again, with another task.
    let mut skipped_by_take = false;
    for attempt in 0..3 {
        let id = format!("revoked-before-landing-{attempt}");
        let key = taskstack::proto::keys::result_key(&id);
        let pending = taskstack::proto::TaskResult::pending_json(&id, builtin::ADD, "celery");
        let _: () = c.set(&key, pending)?;
        let revoked = json!({ "status": "REVOKED", "result": null, "task_id": id }).to_string();
        let mut states = p.backend().task_states(Use::Request);
        let out = states
            .revoke(&id, &revoked, Duration::from_secs(600))
            .await?;
        assert_eq!(out, taskstack::broker::RevokeOutcome::Revoked);
        redis::cmd("CONFIG").arg("RESETSTAT").query::<()>(&mut c)?;
        let raw = add_message(&id);
        let _: () = c.lpush("celery", raw)?;
        let (landing, inflight) = (keys.landing(&w.id), keys.inflight(&w.id));
        wait_until("the revoked message to be acknowledged", WAIT, || async {
            let mut c = redis.conn()?;
            let left: (u64, u64, u64) = redis::pipe()
                .llen("celery")
                .llen(&landing)
                .hlen(&inflight)
                .query(&mut c)?;
            Ok((left == (0, 0, 0)).then_some(()))
        })
        .await?;
        let record: String = c.get(&key)?;
        assert!(record.contains(r#""status":"REVOKED""#), "{record}");
        if calls(&redis, "smismember")? == 0 {
            skipped_by_take = true;
            break;
        }
    }
    assert!(skipped_by_take, "never skipped by the take that landed it");
    // A task after it runs as usual.
    let id = p.send_task(builtin::ADD, vec![json!(2), json!(2)]).await?;
    assert_eq!(p.wait(&id, WAIT).await?.result, json!(4));
    w.stop().await?;
    Ok(())
}

/// The command a Redis client of `redis` is running, and whether it waits
/// (`b` among its flags: a blocking command, or any command held by
/// `CLIENT PAUSE`), by client id.
fn clients(redis: &RedisServer) -> Result<Vec<(u64, String, bool)>> {
    let list: String = redis::cmd("CLIENT").arg("LIST").query(&mut redis.conn()?)?;
    Ok(list
        .lines()
        .filter_map(|l| {
            let field = |name: &str| {
                l.split(' ')
                    .find_map(|f| f.strip_prefix(name)?.strip_prefix('='))
                    .map(str::to_owned)
            };
            let id = field("id")?.parse().ok()?;
            Some((id, field("cmd")?, field("flags")?.contains('b')))
        })
        .collect())
}

/// A worker told to stop while the take that starts its landed message is
/// in flight lets the take finish and runs what it started. Were the take
/// dropped, the release would hand the message back still marked running,
/// and a revocation of a task that never ran would be refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_stopped_during_a_starting_take_runs_what_it_started() -> Result<()> {
    let redis = RedisServer::start()?;
    let ns = namespace("stop-mid-take");
    let keys = taskstack::proto::Keys::new(&ns);
    let mut c = redis.conn()?;
    let pause = Duration::from_secs(2);
    // The stop must come while the take that starts the message waits; a
    // message that lands between a wait's timeout and the next take is
    // taken by a plain take instead (handed back at the stop): then again.
    let mut ran_by_take = false;
    for attempt in 0..3 {
        let w = InProcessWorker::start(&redis.url(), &ns, builtins(), settings(&["celery"]))?;
        let lane = wait_until("the worker to block for messages", WAIT, || async {
            let blocked = clients(&redis)?
                .into_iter()
                .find(|(_, cmd, b)| *b && cmd == "blmove");
            Ok(blocked.map(|(id, ..)| id))
        })
        .await?;
        let id = format!("stopped-mid-take-{attempt}");
        let raw = add_message(&id);
        // The message lands, and every write after it (the worker's take
        // among them) waits out the pause.
        redis::pipe()
            .lpush("celery", raw)
            .cmd("CLIENT")
            .arg("PAUSE")
            .arg(pause.as_millis() as u64)
            .arg("WRITE")
            .query::<()>(&mut c)?;
        let paused_at = Instant::now();
        let take_waits = loop {
            let waits = clients(&redis)?
                .into_iter()
                .any(|(cid, cmd, b)| cid == lane && b && (cmd == "evalsha" || cmd == "eval"));
            if waits || paused_at.elapsed() > pause / 2 {
                break waits;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        };
        let summary = w.stop().await?;
        let key = taskstack::proto::keys::result_key(&id);
        let record: Option<String> = c.get(&key)?;
        let marked: bool = c.exists(keys.started(&id))?;
        let queued: u64 = c.llen("celery")?;
        if record
            .as_deref()
            .is_some_and(|r| r.contains(r#""status":"SUCCESS""#))
        {
            assert_eq!(queued, 0);
            ran_by_take |= take_waits && summary.processed == 1;
        } else {
            // Handed back: unstarted, so revocable.
            assert_eq!(queued, 1, "the message is lost: {record:?}");
            assert!(
                !marked,
                "{id} went back to its queue marked as started (attempt {attempt})"
            );
            let _: () = c.del("celery")?;
        }
        if ran_by_take {
            break;
        }
    }
    assert!(
        ran_by_take,
        "the stop never came while a starting take waited"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn priorities_are_served_lowest_bucket_first() -> Result<()> {
    let redis = RedisServer::start()?;
    let ns = namespace("prio");
    let p = producer(&redis.url(), &ns)?;
    let order: Arc<Mutex<Vec<i64>>> = Arc::default();
    let mut r = Registry::new();
    let o = Arc::clone(&order);
    r.register("t.record", move |ctx: TaskContext| {
        let o = Arc::clone(&o);
        async move {
            o.lock()
                .expect("lock")
                .push(ctx.args[0].as_i64().unwrap_or(-1));
            Ok(Value::Null)
        }
    });
    let mut ids = Vec::new();
    for prio in [9u8, 0, 6, 3, 9, 0] {
        ids.push(
            p.send(&req(
                "t.record",
                vec![json!(prio)],
                SendOptions {
                    priority: Some(prio),
                    ..Default::default()
                },
            ))
            .await?,
        );
    }
    let mut s = settings(&["celery"]);
    s.concurrency = 1;
    s.prefetch = 1;
    let w = InProcessWorker::start(&redis.url(), &ns, r, s)?;
    for id in &ids {
        p.wait(id, WAIT).await?;
    }
    assert_eq!(*order.lock().expect("lock"), [0, 0, 3, 6, 9, 9]);
    w.stop().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn time_limits_and_panics_become_failures() -> Result<()> {
    let redis = RedisServer::start()?;
    let ns = namespace("limits");
    let mut r = builtins();
    r.register("t.panic", |ctx: TaskContext| async move {
        if ctx.args.is_empty() {
            panic!("deliberate panic in a task");
        }
        Ok(Value::Null)
    });
    r.register("t.spin", |_ctx: TaskContext| async move {
        tokio::time::sleep(Duration::from_secs(3600)).await;
        Ok(Value::Null)
    });
    let w = InProcessWorker::start(&redis.url(), &ns, r, settings(&["celery"]))?;
    let p = producer(&redis.url(), &ns)?;

    let panicked = p.send_task("t.panic", vec![]).await?;
    let hard = p
        .send(&req(
            "t.spin",
            vec![],
            SendOptions {
                time_limit: Some(Duration::from_millis(300)),
                ..Default::default()
            },
        ))
        .await?;
    let soft = p
        .send(&req(
            builtin::SLEEP,
            vec![json!(3600)],
            SendOptions {
                soft_time_limit: Some(Duration::from_millis(200)),
                ..Default::default()
            },
        ))
        .await?;
    let r = p.wait(&panicked, WAIT).await?;
    assert_eq!(r.status, TaskState::Failure);
    assert!(
        r.result["exc_message"][0]
            .as_str()
            .unwrap_or("")
            .contains("deliberate panic"),
        "{}",
        r.result
    );
    let r = p.wait(&hard, WAIT).await?;
    assert_eq!(r.status, TaskState::Failure);
    assert_eq!(r.result["exc_type"], "TimeLimitExceeded");
    let r = p.wait(&soft, WAIT).await?;
    assert_eq!(r.result["exc_type"], "SoftTimeLimitExceeded");
    // The worker survived all of it.
    let ok = p.send_task(builtin::ADD, vec![json!(1), json!(1)]).await?;
    assert_eq!(p.wait(&ok, WAIT).await?.result, json!(2));
    w.stop().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_is_dead_lettered_while_good_tasks_flow() -> Result<()> {
    let redis = RedisServer::start()?;
    let ns = namespace("bad");
    let p = producer(&redis.url(), &ns)?;
    let good = taskstack::proto::envelope::encode(&taskstack::proto::MessageSpec {
        id: "good-1",
        task: builtin::ADD,
        args: &[json!(20), json!(22)],
        queue: "celery",
        origin: "test",
        ..Default::default()
    });
    let with = |f: &dyn Fn(&mut Value)| {
        let mut v: Value = serde_json::from_str(&good).expect("json");
        f(&mut v);
        v.to_string()
    };
    let bad: Vec<(String, Option<&str>, &str)> = vec![
        ("this is not json".into(), None, "not valid JSON"),
        (
            with(&|v| {
                v["content-type"] = json!("application/x-python-serialize");
                v["headers"]["id"] = json!("pickle-1");
            }),
            Some("pickle-1"),
            "application/x-python-serialize",
        ),
        (
            with(&|v| {
                v["body"] = json!("!!!");
                v["headers"]["id"] = json!("b64-1");
            }),
            Some("b64-1"),
            "base64",
        ),
        (
            with(&|v| {
                v["headers"].as_object_mut().map(|h| h.remove("task"));
                v["headers"]["id"] = json!("notask-1");
            }),
            Some("notask-1"),
            "\"task\" is missing",
        ),
        (
            with(&|v| {
                v["headers"]["task"] = json!("proj.unknown");
                v["headers"]["id"] = json!("unknown-1");
            }),
            Some("unknown-1"),
            "unknown task",
        ),
    ];
    let mut c = redis.conn()?;
    for (payload, _, _) in &bad {
        let _: () = c.lpush("celery", payload)?;
        let _: () = c.lpush("celery", &good)?;
    }
    let w = InProcessWorker::start(&redis.url(), &ns, builtins(), settings(&["celery"]))?;
    let r = p.wait("good-1", WAIT).await?;
    assert_eq!(r.result, json!(42));
    let dead = wait_until("five dead letters", WAIT, || {
        let mut dl = p.backend().dead_letters(Use::Request);
        async move {
            let (d, _) = dl.page("celery", 100).await?;
            Ok((d.len() >= 5).then_some(d))
        }
    })
    .await?;
    assert_eq!(dead.len(), 5);
    for (payload, id, reason) in &bad {
        let d = dead
            .iter()
            .find(|d| &d.payload == payload)
            .unwrap_or_else(|| panic!("no dead letter for {reason}"));
        assert!(d.reason.contains(reason), "{} !~ {reason}", d.reason);
        assert_eq!(d.task_id.as_deref(), *id);
        if let Some(id) = id {
            let r = p.wait(id, WAIT).await?;
            assert_eq!(r.status, TaskState::Failure, "{id}");
        }
    }
    // Nothing left queued or held; the worker keeps serving.
    assert_eq!(c.llen::<_, i64>("celery")?, 0);
    let ok = p.send_task(builtin::ADD, vec![json!(1)]).await?;
    assert_eq!(p.wait(&ok, WAIT).await?.result, json!(1));
    w.stop().await?;
    Ok(())
}
