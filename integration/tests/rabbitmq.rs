//! The RabbitMQ broker end to end (issue 15): real `taskstack-worker`
//! processes with `broker_url = "amqp://..."` and results on a real Redis,
//! a real RabbitMQ node shared by this binary with a vhost per test, and
//! the real Python Celery on both sides.

use anyhow::{Context as _, Result, ensure};
use serde_json::{Map, json};
use std::sync::Arc;
use std::time::Duration;
use taskstack::broker::QueueCounts;
use taskstack::proto::TaskState;
use taskstack::{Producer, SendOptions, TaskRequest};
use taskstack_integration::python::{
    CeleryWorker, celery_python, interop_cmd, last_json, run_client,
};
use taskstack_integration::rabbitmq_server::{self as rabbit, vhost_of};
use taskstack_integration::{RedisServer, WebProcess, WorkerProcess, namespace, wait_until};

/// A vhost on the shared node, a Redis for results, and the settings of
/// both for the processes and the producer.
struct Stack {
    amqp: String,
    redis: RedisServer,
    ns: String,
}

impl Stack {
    fn new(hint: &str) -> Result<Self> {
        Ok(Self {
            amqp: rabbit::shared().vhost(hint),
            redis: RedisServer::start()?,
            ns: namespace(hint),
        })
    }

    fn config(&self) -> taskstack::config::Config {
        taskstack::config::Config {
            broker_url: self.amqp.as_str().into(),
            result_backend: Some(self.redis.url().as_str().into()),
            namespace: self.ns.clone(),
            ..Default::default()
        }
    }

    fn producer(&self) -> Result<Producer> {
        let backend = taskstack::open_backend(&self.config())?;
        Ok(Producer::on_backend(backend, "test@localhost"))
    }

    fn worker(&self, extra: &[(&str, &str)]) -> Result<WorkerProcess> {
        let redis = self.redis.url();
        let mut env = vec![
            ("TASKSTACK_BROKER_URL", self.amqp.as_str()),
            ("TASKSTACK_RESULT_BACKEND", redis.as_str()),
        ];
        env.extend_from_slice(extra);
        let w = WorkerProcess::spawn(&redis, &self.ns, &env)?;
        w.wait_log("worker ready", Duration::from_secs(60))
            .with_context(|| w.log())?;
        Ok(w)
    }

    /// `(ready, unacknowledged)` summed over the vhost's queues whose
    /// names satisfy `which`.
    fn counts(&self, which: impl Fn(&str) -> bool) -> (u64, u64) {
        self.counts_on(rabbit::shared(), which)
    }

    /// [`Stack::counts`] on `node` (a private node, for the restart test).
    fn counts_on(&self, node: &rabbit::Rabbit, which: impl Fn(&str) -> bool) -> (u64, u64) {
        node.queue_counts(vhost_of(&self.amqp))
            .into_iter()
            .filter(|(n, _, _)| which(n))
            .fold((0, 0), |(r, u), (_, r2, u2)| (r + r2, u + u2))
    }
}

/// `n` `taskstack.sleep` tasks of `secs` each, tagged from `first` on.
fn sleeps(secs: f64, first: usize, n: usize) -> Vec<TaskRequest> {
    (first..first + n)
        .map(|i| TaskRequest {
            name: "taskstack.sleep".into(),
            args: vec![json!(secs), json!(i)],
            kwargs: Map::new(),
            options: SendOptions::default(),
        })
        .collect()
}

fn add(a: i64, b: i64, options: SendOptions) -> TaskRequest {
    TaskRequest {
        name: "taskstack.add".into(),
        args: vec![json!(a), json!(b)],
        kwargs: Map::new(),
        options,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_on_rabbitmq_runs_tasks_and_countdowns_and_stores_results() -> Result<()> {
    let s = Stack::new("e2e")?;
    let worker = s.worker(&[])?;
    let p = s.producer()?;
    let reqs: Vec<TaskRequest> = (0..50).map(|i| add(i, 1, SendOptions::default())).collect();
    let ids = p.send_many(&reqs).await?;
    let later = p
        .send(&add(
            20,
            22,
            SendOptions {
                countdown: Some(Duration::from_secs(3)),
                ..Default::default()
            },
        ))
        .await?;
    for (i, id) in ids.iter().enumerate() {
        let r = p
            .wait(id, Duration::from_secs(60))
            .await
            .with_context(|| worker.log())?;
        assert_eq!(r.status, TaskState::Success, "{r:?}");
        assert_eq!(r.result, json!(i as i64 + 1));
    }
    let r = p
        .wait(&later, Duration::from_secs(60))
        .await
        .with_context(|| worker.log())?;
    assert_eq!((r.status, r.result), (TaskState::Success, json!(42)));
    assert_eq!(s.counts(|_| true), (0, 0), "everything acknowledged");
    Ok(())
}

/// A real Python Celery client sends 3,000 tasks of 50 ms to two workers;
/// one is SIGKILLed once 300 were sent and the first finished (the test
/// prints how many sends had returned by then): every task ends SUCCESS,
/// what the killed one held comes back through RabbitMQ's redelivery.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_killed_mid_run_loses_none_of_3000_celery_client_tasks() -> Result<()> {
    let python = tokio::task::spawn_blocking(celery_python).await??;
    let s = Stack::new("kill")?;
    let mut doomed = s.worker(&[])?;
    let survivor = s.worker(&[])?;
    let p = s.producer()?;
    let dir = tempfile::tempdir()?;
    let ids_file = dir.path().join("ids");
    let ids_arg = ids_file.display().to_string();
    let read_ids = || -> Vec<String> {
        std::fs::read_to_string(&ids_file)
            .unwrap_or_default()
            .lines()
            .map(str::to_owned)
            .collect()
    };
    let args = [s.amqp.as_str(), "3000", "0.05", &ids_arg];
    let client = run_client(&python, "send_sleeps.py", &args, || survivor.log());
    // Kill one once 300 were sent and the first is done, mid-send.
    let kill = async {
        wait_until(
            "300 sends and a result",
            Duration::from_secs(120),
            || async {
                let ids = read_ids();
                if ids.len() < 300 {
                    return Ok(None);
                }
                Ok(p.result(&ids[0])
                    .await?
                    .filter(|r| r.status == TaskState::Success))
            },
        )
        .await?;
        doomed.kill()?;
        anyhow::Ok(read_ids().len())
    };
    let (sent, killed_at) = tokio::join!(client, kill);
    let (sent, killed_at) = (sent?, killed_at?);
    assert_eq!(sent["sent"], 3000, "{sent}");
    let ids = read_ids();
    assert_eq!(ids.len(), 3000);
    eprintln!("killed after {killed_at} of 3000 sends");
    for id in &ids {
        let r = p
            .wait(id, Duration::from_secs(120))
            .await
            .with_context(|| format!("task {id}; survivor log:\n{}", survivor.log()))?;
        ensure!(r.status == TaskState::Success, "task {id}: {r:?}");
    }
    assert_eq!(s.counts(|_| true), (0, 0), "nothing left behind");
    // What the killed worker held came back through RabbitMQ's redelivery.
    assert!(
        survivor.log().contains("RabbitMQ redelivered a message"),
        "no redelivery seen; survivor log:\n{}",
        survivor.log()
    );
    Ok(())
}

/// RabbitMQ SIGKILLed and started again while two workers drain 2,000
/// tasks (a private node: the shared one serves the other tests): every
/// task sent before the crash and 500 sent after it end SUCCESS, and
/// nothing is left in the broker. The workers and the producer reconnect
/// by themselves; a message whose acknowledgement died with the broker
/// comes back and runs again (at least once), never lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rabbitmq_killed_and_restarted_under_load_loses_nothing() -> Result<()> {
    let mut node = rabbit::Rabbit::start();
    let s = Stack {
        amqp: node.vhost("restart"),
        redis: RedisServer::start()?,
        ns: namespace("restart"),
    };
    let w1 = s.worker(&[])?;
    let w2 = s.worker(&[])?;
    let logs = || format!("worker 1:\n{}\nworker 2:\n{}", w1.log(), w2.log());
    let p = Arc::new(s.producer()?);
    let mut ids = Vec::new();
    for chunk in sleeps(0.2, 0, 2000).chunks(500) {
        ids.extend(p.send_many(chunk).await?);
    }
    let first = ids[0].clone();
    wait_until("the first task to finish", Duration::from_secs(60), || {
        let p = Arc::clone(&p);
        let id = first.clone();
        async move {
            Ok(p.result(&id)
                .await?
                .filter(|r| r.status == TaskState::Success))
        }
    })
    .await
    .with_context(logs)?;
    node.kill();
    node.start_again();
    // The producer's next publish opens a new connection.
    ids.extend(
        tokio::time::timeout(
            Duration::from_secs(60),
            p.send_many(&sleeps(0.2, 2000, 500)),
        )
        .await
        .context("sending after the restart")??,
    );
    for (done, id) in ids.iter().enumerate() {
        let r = p
            .wait(id, Duration::from_secs(180))
            .await
            .with_context(|| format!("task {id} ({done} done before it)\n{}", logs()))?;
        ensure!(r.status == TaskState::Success, "task {id}: {r:?}");
    }
    wait_until(
        "the broker to be empty",
        Duration::from_secs(30),
        || async { Ok(Some(()).filter(|()| s.counts_on(&node, |_| true) == (0, 0))) },
    )
    .await
    .with_context(|| format!("{:?}", node.queue_counts(vhost_of(&s.amqp))))?;
    // Both saw the broker go (a failed wait, take or acknowledgement, or
    // the reconnect), so the run crossed the crash.
    for (i, w) in [&w1, &w2].into_iter().enumerate() {
        let log = w.log();
        ensure!(
            [
                "reconnecting",
                "cannot wait for messages",
                "cannot take messages",
                "cannot acknowledge"
            ]
            .iter()
            .any(|m| log.contains(m)),
            "worker {} did not see the broker go:\n{log}",
            i + 1
        );
    }
    // Remote control came back with the broker: both answer ping.
    let python = tokio::task::spawn_blocking(celery_python).await??;
    let redis = s.redis.url();
    wait_until(
        "both workers to answer ping after the restart",
        Duration::from_secs(60),
        || {
            let out = interop_cmd(&python, &redis, Some(&s.amqp))
                .args(["-m", "celery", "-A", "interop_tasks", "inspect", "ping"])
                .args(["--json", "--timeout", "3"])
                .output();
            async move {
                Ok(last_json(&out?.stdout).filter(|v| v.as_object().is_some_and(|o| o.len() == 2)))
            }
        },
    )
    .await
    .with_context(logs)?;
    Ok(())
}

/// The same message twice (what a beat killed between its publish and
/// the outbox trim sends): the second copy, arriving after the first
/// finished, is acknowledged without running, and the first result stays.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_copy_of_a_finished_task_is_acknowledged_without_running() -> Result<()> {
    let s = Stack::new("dup")?;
    let worker = s.worker(&[])?;
    let p = s.producer()?;
    let payload = taskstack::proto::envelope::encode(&taskstack::proto::envelope::MessageSpec {
        id: "beat-slot-1",
        task: "taskstack.add",
        args: &[json!(2), json!(3)],
        origin: "test",
        ..Default::default()
    });
    let backend = taskstack::open_backend(&s.config())?;
    let send = || async {
        backend
            .enqueue(taskstack::backend::Use::Request)
            .enqueue(&[taskstack::backend::Outgoing {
                queue_key: "celery".into(),
                payload: payload.clone(),
                due_ms: None,
                pending: None,
            }])
            .await
    };
    send().await?;
    let first = p
        .wait("beat-slot-1", Duration::from_secs(60))
        .await
        .with_context(|| worker.log())?;
    assert_eq!(
        (first.status, first.result.clone()),
        (TaskState::Success, json!(5))
    );
    send().await?;
    worker
        .wait_log("task already finished", Duration::from_secs(60))
        .with_context(|| worker.log())?;
    wait_until(
        "the copy to be acknowledged",
        Duration::from_secs(30),
        || async { Ok(Some(()).filter(|()| s.counts(|_| true) == (0, 0))) },
    )
    .await?;
    let after = p.result("beat-slot-1").await?.context("no result")?;
    // A second run would have stored a new record with its own time.
    assert_eq!(after.date_done, first.date_done, "the first result stands");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_hour_long_eta_waits_in_rabbitmq_not_unacknowledged_in_the_worker() -> Result<()> {
    let s = Stack::new("eta")?;
    let worker = s.worker(&[])?;
    let p = s.producer()?;
    // As Python Celery sends it: straight to the queue, with the eta header.
    let eta = chrono::Utc::now() + chrono::Duration::hours(1);
    let payload = taskstack::proto::envelope::encode(&taskstack::proto::envelope::MessageSpec {
        id: "eta-1h",
        task: "taskstack.add",
        args: &[json!(1), json!(1)],
        eta: Some(eta),
        origin: "test",
        ..Default::default()
    });
    let backend = taskstack::open_backend(&s.config())?;
    backend
        .enqueue(taskstack::backend::Use::Request)
        .enqueue(&[taskstack::backend::Outgoing {
            queue_key: "celery".into(),
            payload,
            due_ms: None,
            pending: None,
        }])
        .await?;
    wait_until(
        "the worker to park the ETA task in a delay level",
        Duration::from_secs(60),
        || async {
            Ok(Some(()).filter(|()| s.counts(|n| n.starts_with("taskstack.delay.")) == (1, 0)))
        },
    )
    .await
    .with_context(|| worker.log())?;
    assert_eq!(s.counts(|_| true), (1, 0), "held unacknowledged nowhere");
    assert_eq!(p.result("eta-1h").await?.map(|r| r.status), None, "not run");
    Ok(())
}

/// A queue's `in_flight` on RabbitMQ is what live workers hold, from
/// their heartbeats: six 4-second tasks on a worker of concurrency 2
/// (prefetch 8, so it takes all six) count 6 in flight and none ready,
/// then 0 once they have finished.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn in_flight_counts_what_the_workers_hold() -> Result<()> {
    let s = Stack::new("in_flight")?;
    let worker = s.worker(&[("TASKSTACK_CONCURRENCY", "2"), ("TASKSTACK_LEASE", "3s")])?;
    let p = s.producer()?;
    let backend = taskstack::open_backend(&s.config())?;
    let celery = ["celery".to_owned()];
    let counts_until = |what: &'static str, done: fn(&QueueCounts) -> bool| {
        let backend = &backend;
        let celery = &celery;
        wait_until(what, Duration::from_secs(30), move || async move {
            let mut c = backend
                .inspect(taskstack::backend::Use::Request)
                .queue_counts(celery)
                .await?;
            Ok(Some(c.remove(0)).filter(done))
        })
    };
    let ids = p.send_many(&sleeps(4.0, 0, 6)).await?;
    let c = counts_until("6 in flight", |c| c.in_flight == 6)
        .await
        .with_context(|| worker.log())?;
    assert_eq!(c.ready, 0, "{c:?}");
    for id in &ids {
        let r = p.wait(id, Duration::from_secs(60)).await?;
        assert_eq!(r.status, TaskState::Success, "{id}");
    }
    counts_until("none in flight", |c| c.in_flight == 0)
        .await
        .with_context(|| worker.log())?;
    Ok(())
}

/// `/health` with a RabbitMQ broker checks both stores under their own
/// names: `rabbitmq` (a passive declaration) and `redis` (the result
/// backend). RabbitMQ stopped (a private node) fails `rabbitmq` alone;
/// Redis stays ok.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn web_health_names_rabbitmq_and_redis_apart() -> Result<()> {
    let mut node = rabbit::Rabbit::start();
    let s = Stack {
        amqp: node.vhost("health"),
        redis: RedisServer::start()?,
        ns: namespace("health"),
    };
    let worker = s.worker(&[])?;
    let redis = s.redis.url();
    let web = WebProcess::spawn(
        &redis,
        &s.ns,
        &[
            ("TASKSTACK_BROKER_URL", s.amqp.as_str()),
            ("TASKSTACK_RESULT_BACKEND", redis.as_str()),
        ],
    )
    .await?;
    let logs = || format!("web:\n{}\nworker:\n{}", web.log(), worker.log());
    // Polls until `failing` is among the failed checks (None: none failed).
    let health = |failing: Option<&'static str>| {
        let web = &web;
        move || async move {
            let (status, v) = web.call("GET", "/health", None).await?;
            let failed = v["failed"].as_array().cloned().unwrap_or_default();
            let reached = match failing {
                None => failed.is_empty(),
                Some(name) => failed.iter().any(|f| f == name),
            };
            Ok(reached.then_some((status, v)))
        }
    };
    let (status, up) = wait_until("/health to pass", Duration::from_secs(60), health(None))
        .await
        .with_context(logs)?;
    assert_eq!(status, 200, "{up}");
    for store in ["rabbitmq", "redis"] {
        assert_eq!(up["checks"][store]["ok"], true, "{up}");
        assert!(up["checks"][store]["latency_ms"].is_number(), "{up}");
    }
    assert!(up["checks"].get("postgresql").is_none(), "{up}");
    node.stop();
    let (status, down) = wait_until(
        "/health to fail the rabbitmq check",
        Duration::from_secs(60),
        health(Some("rabbitmq")),
    )
    .await
    .with_context(logs)?;
    assert_eq!(status, 503, "{down}");
    assert_eq!(down["failed"], json!(["rabbitmq"]), "{down}");
    assert!(down["checks"]["rabbitmq"]["error"].is_string(), "{down}");
    assert_eq!(down["checks"]["redis"]["ok"], true, "{down}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_python_celery_client_on_rabbitmq_runs_on_our_worker() -> Result<()> {
    let python = tokio::task::spawn_blocking(celery_python).await??;
    let s = Stack::new("pyclient")?;
    let worker = s.worker(&[])?;
    let seen = run_client(&python, "send_add.py", &[&s.amqp, &s.redis.url()], || {
        worker.log()
    })
    .await?;
    assert_eq!(seen["add_state"], "SUCCESS", "{seen}");
    assert_eq!(seen["add_result"], json!(5), "{seen}");
    assert_eq!(seen["fail_state"], "FAILURE", "{seen}");
    assert_eq!(seen["fail_exc_type"], "RuntimeError", "{seen}");
    let stored = s
        .producer()?
        .result(seen["add_id"].as_str().context("no add_id")?)
        .await?
        .context("no result")?;
    assert!(stored.worker.is_some(), "our worker ran it: {stored:?}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn our_producer_on_rabbitmq_feeds_a_python_celery_worker() -> Result<()> {
    let python = tokio::task::spawn_blocking(celery_python).await??;
    let s = Stack::new("pyworker")?;
    let queue = format!(
        "interop-{}",
        &uuid::Uuid::new_v4().simple().to_string()[..8]
    );
    let mut celery = CeleryWorker::spawn_on(&python, &s.amqp, &s.redis.url(), &queue)?;
    celery.wait_ready(Duration::from_secs(60))?;
    let p = s.producer()?;
    let id = p
        .send(&TaskRequest {
            name: "interop.mul".into(),
            args: vec![json!(6), json!(7)],
            kwargs: Map::new(),
            options: SendOptions {
                queue: Some(queue.clone()),
                ..Default::default()
            },
        })
        .await?;
    let r = p
        .wait(&id, Duration::from_secs(60))
        .await
        .with_context(|| format!("Celery worker log:\n{}", celery.log()))?;
    assert_eq!(
        (r.status, r.result.clone()),
        (TaskState::Success, json!(42)),
        "{r:?}\n{}",
        celery.log()
    );
    Ok(())
}
