//! Celery's canvas (chain, link, link_error, chord) with RabbitMQ as the
//! broker and results on Redis: a real Python Celery 5.7 client, a Python
//! Celery worker sharing a chord, and taskstack's own producer, against real
//! `taskstack-worker` processes on a real RabbitMQ node (a vhost per test)
//! and a real Redis. Follow-ups are published to RabbitMQ with confirms;
//! the chord counters live on the results' Redis, where Celery's Redis
//! result backend keeps them.

use anyhow::{Context as _, Result};
use serde_json::{Map, Value, json};
use std::path::Path;
use std::time::Duration;
use taskstack::backend::{Outgoing, Use};
use taskstack::proto::TaskState;
use taskstack::{ChordOptions, Producer, SendOptions, TaskRequest};
use taskstack_integration::python::{CeleryWorker, celery_python, run_client};
use taskstack_integration::rabbitmq_server::{self as rabbit, vhost_of};
use taskstack_integration::{RedisServer, WorkerProcess, namespace, wait_until};

/// A vhost on the shared node, a Redis for results and one stock worker.
struct Stack {
    amqp: String,
    redis: RedisServer,
    ns: String,
    worker: WorkerProcess,
}

impl Stack {
    fn start(hint: &str) -> Result<Self> {
        let amqp = rabbit::shared().vhost(hint);
        let redis = RedisServer::start()?;
        let ns = namespace(hint);
        let url = redis.url();
        let env = [
            ("TASKSTACK_BROKER_URL", amqp.as_str()),
            ("TASKSTACK_RESULT_BACKEND", url.as_str()),
        ];
        let worker = WorkerProcess::spawn(&url, &ns, &env)?;
        worker
            .wait_log("worker ready", Duration::from_secs(60))
            .with_context(|| worker.log())?;
        Ok(Self {
            amqp,
            redis,
            ns,
            worker,
        })
    }

    fn producer(&self) -> Result<Producer> {
        let config = taskstack::config::Config {
            broker_url: self.amqp.as_str().into(),
            result_backend: Some(self.redis.url().as_str().into()),
            namespace: self.ns.clone(),
            ..Default::default()
        };
        let backend = taskstack::open_backend(&config)?;
        Ok(
            Producer::on_backend(backend, "test@localhost")
                .record_pending(Duration::from_secs(600)),
        )
    }

    /// Runs one scenario of `canvas_client.py` with its broker on
    /// RabbitMQ and its results on the Redis; what the client saw.
    async fn client(&self, python: &Path, scenario: &str, extra: &[&str]) -> Result<Value> {
        let url = self.redis.url();
        let mut args = vec![self.amqp.as_str(), scenario];
        args.extend_from_slice(extra);
        args.extend_from_slice(&["--results", url.as_str()]);
        run_client(python, "canvas_client.py", &args, || self.worker.log()).await
    }

    /// Whether the follow-up `task_id` was marked sent on the results' Redis.
    fn marked_sent(&self, task_id: &str) -> Result<bool> {
        use redis::Commands as _;
        let mut conn = self.redis.conn()?;
        Ok(conn.exists(taskstack::canvas::redis::sent_marker(&self.ns, task_id))?)
    }

    /// `(ready, unacknowledged)` of the vhost's queue `name`.
    fn counts(&self, name: &str) -> (u64, u64) {
        rabbit::shared()
            .queue_counts(vhost_of(&self.amqp))
            .into_iter()
            .filter(|(n, _, _)| n == name)
            .fold((0, 0), |(r, u), (_, r2, u2)| (r + r2, u + u2))
    }
}

fn add(args: Vec<Value>) -> TaskRequest {
    TaskRequest {
        name: "taskstack.add".into(),
        args,
        kwargs: Map::new(),
        options: SendOptions::default(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_python_clients_chains_and_links_run_on_our_worker_over_rabbitmq() -> Result<()> {
    let python = tokio::task::spawn_blocking(celery_python).await??;
    let s = Stack::start("amqp-chain")?;

    let seen = s.client(&python, "chain", &[]).await?;
    assert_eq!(seen["result"], json!(16), "{seen}");
    assert_eq!(
        seen["states"],
        json!(["SUCCESS", "SUCCESS", "SUCCESS"]),
        "{seen}"
    );
    let ids = seen["ids"].as_array().context("ids")?;
    assert_eq!(seen["first_children"], json!([ids[1]]), "{seen}");
    let p = s.producer()?;
    for (i, id) in ids.iter().enumerate() {
        let id = id.as_str().context("id")?;
        let r = p.result(id).await?.context("stored result")?;
        assert_eq!(r.status, TaskState::Success, "step {i}: {r:?}");
        assert!(r.worker.is_some(), "our worker ran step {i}: {r:?}");
        assert_eq!(r.parent_id.as_deref(), seen["parent_ids"][i].as_str());
        if i > 0 {
            assert!(s.marked_sent(id)?, "step {i} went out marked sent");
        }
    }

    let seen = s.client(&python, "chain_fail", &[]).await?;
    assert_eq!(seen["failing_state"], "FAILURE", "{seen}");
    assert_eq!(seen["last_state"], "FAILURE", "{seen}");
    assert_eq!(seen["raised"], "RuntimeError", "{seen}");
    let failing = seen["failing_id"].clone();
    assert_eq!(
        seen["errback_result"],
        json!({"args": [failing, "errback"], "kwargs": {}}),
        "{seen}"
    );

    let seen = s.client(&python, "link", &[]).await?;
    assert_eq!(seen["result"], json!(7), "{seen}");
    assert_eq!(
        seen["callback_result"],
        json!({"args": [7, "linked"], "kwargs": {}}),
        "{seen}"
    );
    assert_eq!(seen["children"], json!([seen["callback_id"]]), "{seen}");

    let seen = s.client(&python, "chain_group", &[]).await?;
    assert_eq!(seen["result"], json!([12, 22]), "{seen}");
    wait_until(
        "every message acknowledged",
        Duration::from_secs(30),
        || async { Ok((s.counts("celery") == (0, 0)).then_some(())) },
    )
    .await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_python_clients_chords_complete_once_over_rabbitmq() -> Result<()> {
    let python = tokio::task::spawn_blocking(celery_python).await??;
    let s = Stack::start("amqp-chord")?;

    let seen = s.client(&python, "chord", &[]).await?;
    assert_eq!(
        seen["result"],
        json!({"args": [[0, 2, 4, 6, 8], "body"], "kwargs": {}}),
        "{seen}"
    );
    let body = seen["body_id"].as_str().context("body id")?;
    assert!(s.marked_sent(body)?, "the body went out marked sent");

    let seen = s.client(&python, "chord_fail", &[]).await?;
    assert_eq!(seen["state"], "FAILURE", "{seen}");
    assert_eq!(seen["body_exc_type"], "ChordError", "{seen}");
    let msg = seen["message"].as_str().unwrap_or_default();
    assert!(
        msg.contains("Dependency") && msg.contains("member broke"),
        "{seen}"
    );

    // A chord split between a Python Celery worker and ours, both on
    // RabbitMQ, counting into the one chord on the results' Redis.
    let pyq = format!("py-{}", &uuid::Uuid::new_v4().simple().to_string()[..8]);
    let mut celery = CeleryWorker::spawn_on(&python, &s.amqp, &s.redis.url(), &pyq)?;
    celery.wait_ready(Duration::from_secs(60))?;
    let seen = s
        .client(&python, "mixed_chord", &[&pyq])
        .await
        .with_context(|| celery.log())?;
    assert_eq!(
        seen["result"],
        json!({"args": [[2, 7, 30, 15], "body"], "kwargs": {}}),
        "{seen}\nCelery log:\n{}",
        celery.log()
    );
    assert!(celery.log().contains("interop.mul"), "{}", celery.log());
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn our_producers_chain_and_chord_run_over_rabbitmq() -> Result<()> {
    let s = Stack::start("amqp-rust-canvas")?;
    let p = s.producer()?;
    let chain = p
        .send_chain(&[
            add(vec![json!(2), json!(2)]),
            add(vec![json!(4)]),
            add(vec![json!(8)]),
        ])
        .await?;
    let header: Vec<TaskRequest> = (0..4).map(|i| add(vec![json!(i), json!(i)])).collect();
    let mut body = add(vec![]);
    body.name = "taskstack.echo".into();
    let chord = p
        .send_chord(&header, &body, &ChordOptions::default())
        .await?;
    let r = p
        .wait(chain.result_id(), Duration::from_secs(60))
        .await
        .with_context(|| s.worker.log())?;
    assert_eq!(
        (r.status, r.result.clone()),
        (TaskState::Success, json!(16)),
        "{r:?}"
    );
    let r = p
        .wait(&chord.body_id, Duration::from_secs(60))
        .await
        .with_context(|| s.worker.log())?;
    assert_eq!(r.status, TaskState::Success, "{r:?}");
    assert_eq!(
        r.result,
        json!({"args": [[0, 2, 4, 6]], "kwargs": {}}),
        "the body got the header's results in order: {r:?}"
    );
    Ok(())
}

/// A message redelivered after its follow-ups went out runs again but
/// publishes nothing twice: the chain step and the callback each reach
/// their queue on RabbitMQ once (the sent markers on the results' Redis).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redelivered_message_does_not_publish_its_follow_ups_twice() -> Result<()> {
    use redis::Commands as _;
    let s = Stack::start("amqp-canvas-redelivery")?;
    let sink = format!("sink-{}", &uuid::Uuid::new_v4().simple().to_string()[..8]);
    let id = uuid::Uuid::new_v4().to_string();
    let parent = taskstack::canvas::Signature::parse(&json!({
        "task": "taskstack.add",
        "args": [1, 2],
        "options": {
            "task_id": id,
            "chain": [{"task": "taskstack.add", "args": [10],
                       "options": {"task_id": uuid::Uuid::new_v4().to_string(), "queue": sink}}],
            "link": [{"task": "taskstack.echo", "options": {"queue": sink}}],
        },
    }))?;
    let msg = taskstack::canvas::build(
        &parent,
        &taskstack::canvas::Dispatch::default(),
        &taskstack::canvas::Lineage {
            parent_id: "",
            root_id: &id,
            origin: "test",
            now: chrono::Utc::now(),
        },
    );
    let config = taskstack::config::Config {
        broker_url: s.amqp.as_str().into(),
        result_backend: Some(s.redis.url().as_str().into()),
        namespace: s.ns.clone(),
        ..Default::default()
    };
    let backend = taskstack::open_backend(&config)?;
    let p = s.producer()?;
    let mut conn = s.redis.conn()?;
    for delivery in 1..=2 {
        // The first run's result is gone, so the copy runs again (a
        // redelivery after the worker died before storing it).
        let _: () = conn.del(taskstack::proto::keys::result_key(&id))?;
        backend
            .enqueue(Use::Request)
            .enqueue(&[Outgoing {
                queue_key: msg.queue_key.clone(),
                payload: msg.payload.clone(),
                due_ms: None,
                pending: None,
            }])
            .await?;
        let r = p
            .wait(&id, Duration::from_secs(30))
            .await
            .with_context(|| format!("delivery {delivery}; worker log:\n{}", s.worker.log()))?;
        assert_eq!(r.status, TaskState::Success, "delivery {delivery}: {r:?}");
        assert_eq!(r.result, json!(3));
        assert_eq!(r.children.len(), 2, "{r:?}");
    }
    assert_eq!(
        s.counts(&sink),
        (2, 0),
        "chain step + callback, each published once"
    );
    Ok(())
}
