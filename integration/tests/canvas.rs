//! Celery's canvas (chain, link, link_error, chord) from a real Python
//! Celery 5.7 client against a real taskstack worker process on a real
//! Redis; a chord split between a Python Celery worker and a taskstack
//! worker; and a redelivered message that must not send its follow-ups
//! twice. The Python side comes from the venv the interop tests use
//! (`target/celery-venv`, or `TASKSTACK_CELERY_PYTHON`).

use anyhow::{Context as _, Result};
use serde_json::{Value, json};
use std::path::PathBuf;
use std::time::Duration;
use taskstack::proto::TaskState;
use taskstack_integration::python::{CeleryWorker, celery_python, run_client};
use taskstack_integration::{RedisServer, WorkerProcess, namespace, producer};

/// A Redis server and one stock taskstack worker on it (own namespace).
struct Stack {
    redis: RedisServer,
    worker: WorkerProcess,
    ns: String,
    python: PathBuf,
}

impl Stack {
    async fn start(test: &str) -> Result<Self> {
        let python = tokio::task::spawn_blocking(celery_python).await??;
        let redis = RedisServer::start()?;
        let ns = namespace(test);
        let worker = WorkerProcess::spawn(&redis.url(), &ns, &[])?;
        worker.wait_log("worker ready", Duration::from_secs(60))?;
        Ok(Self {
            redis,
            worker,
            ns,
            python,
        })
    }

    /// Runs one scenario of `canvas_client.py`; what the client saw.
    async fn client(&self, scenario: &str, extra: &[&str]) -> Result<Value> {
        let url = self.redis.url();
        let mut args = vec![url.as_str(), scenario];
        args.extend_from_slice(extra);
        run_client(&self.python, "canvas_client.py", &args, || {
            self.worker.log()
        })
        .await
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chain_of_three_adds_runs_to_the_end_with_parent_and_children() -> Result<()> {
    let s = Stack::start("canvas-chain").await?;
    let seen = s.client("chain", &[]).await?;
    assert_eq!(seen["result"], json!(16), "{seen}");
    assert_eq!(
        seen["states"],
        json!(["SUCCESS", "SUCCESS", "SUCCESS"]),
        "{seen}"
    );
    let ids = seen["ids"].as_array().context("ids")?;
    // The first step's stored record lists the second as its child.
    assert_eq!(seen["first_children"], json!([ids[1]]), "{seen}");
    let p = producer(&s.redis.url(), &s.ns)?;
    for (i, id) in ids.iter().enumerate() {
        let id = id.as_str().context("id")?;
        let r = p.result(id).await?.context("stored result")?;
        assert_eq!(r.status, TaskState::Success);
        assert_eq!(
            r.parent_id.as_deref(),
            seen["parent_ids"][i].as_str(),
            "step {i}: {r:?}"
        );
        assert!(r.worker.is_some(), "our worker ran step {i}");
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_immutable_step_ignores_the_previous_result() -> Result<()> {
    let s = Stack::start("canvas-immutable").await?;
    let seen = s.client("immutable", &[]).await?;
    // (2+2) is dropped by the immutable (10+1); then 11 + 1.
    assert_eq!(seen["result"], json!(12), "{seen}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_step_stops_the_chain_and_runs_its_errback() -> Result<()> {
    let s = Stack::start("canvas-chain-fail").await?;
    let seen = s.client("chain_fail", &[]).await?;
    assert_eq!(seen["failing_state"], "FAILURE", "{seen}");
    // The step after the failure never ran: Celery's client sees the
    // failure on it too, as it does with a Python worker.
    assert_eq!(seen["last_state"], "FAILURE", "{seen}");
    assert_eq!(seen["raised"], "RuntimeError", "{seen}");
    // Old-style errback, as Celery sends one it cannot call in-process:
    // the failed task's id first, then the errback's own args.
    let failing = seen["failing_id"].clone();
    assert_eq!(
        seen["errback_result"],
        json!({"args": [failing, "errback"], "kwargs": {}}),
        "{seen}"
    );
    assert_eq!(seen["errback_parent_id"], failing, "{seen}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_link_callback_gets_the_result() -> Result<()> {
    let s = Stack::start("canvas-link").await?;
    let seen = s.client("link", &[]).await?;
    assert_eq!(seen["result"], json!(7), "{seen}");
    assert_eq!(
        seen["callback_result"],
        json!({"args": [7, "linked"], "kwargs": {}}),
        "{seen}"
    );
    assert_eq!(seen["children"], json!([seen["callback_id"]]), "{seen}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_chord_body_gets_the_ordered_header_results_once() -> Result<()> {
    let s = Stack::start("canvas-chord").await?;
    let seen = s.client("chord", &[]).await?;
    assert_eq!(
        seen["result"],
        json!({"args": [[0, 2, 4, 6, 8], "body"], "kwargs": {}}),
        "{seen}"
    );
    // The body went out through the send-once marker (so never twice).
    use redis::Commands as _;
    let body = seen["body_id"].as_str().context("body id")?;
    let mut conn = s.redis.conn()?;
    let marked: bool = conn.exists(taskstack::canvas::redis::sent_marker(&s.ns, body))?;
    assert!(marked, "no send-once marker for the body {body}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_chord_member_gives_chord_error_on_the_body() -> Result<()> {
    let s = Stack::start("canvas-chord-fail").await?;
    let seen = s.client("chord_fail", &[]).await?;
    assert_eq!(seen["state"], "FAILURE", "{seen}");
    assert_eq!(seen["body_exc_type"], "ChordError", "{seen}");
    assert_eq!(seen["body_exc_module"], "celery.exceptions", "{seen}");
    let msg = seen["message"].as_str().unwrap_or_default();
    assert!(
        msg.contains("Dependency") && msg.contains("member broke"),
        "{seen}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_group_as_the_last_chain_step_gets_the_result_in_each_member() -> Result<()> {
    let s = Stack::start("canvas-chain-group").await?;
    let seen = s.client("chain_group", &[]).await?;
    assert_eq!(seen["result"], json!([12, 22]), "{seen}");
    Ok(())
}

/// What taskstack cannot run yet fails loudly, naming it, on the ids the
/// client waits for: never a silent drop.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_nested_chord_in_a_chain_is_refused_with_not_implemented() -> Result<()> {
    let s = Stack::start("canvas-nested").await?;
    let seen = s.client("nested_chord", &[]).await?;
    assert_eq!(seen["state"], "FAILURE", "{seen}");
    assert_eq!(seen["exc_type"], "NotImplementedError", "{seen}");
    let msg = seen["message"].as_str().unwrap_or_default();
    assert!(msg.contains("\"chord\""), "{seen}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_chord_split_between_python_celery_and_taskstack_completes_once() -> Result<()> {
    let s = Stack::start("canvas-mixed").await?;
    let pyq = format!("py-{}", &uuid::Uuid::new_v4().simple().to_string()[..8]);
    let mut celery = CeleryWorker::spawn(&s.python, &s.redis.url(), &pyq)?;
    celery.wait_ready(Duration::from_secs(60))?;
    let seen = s
        .client("mixed_chord", &[&pyq])
        .await
        .with_context(|| celery.log())?;
    assert_eq!(
        seen["result"],
        json!({"args": [[2, 7, 30, 15], "body"], "kwargs": {}}),
        "{seen}\nCelery log:\n{}",
        celery.log()
    );
    // Both kinds of worker ran header tasks.
    assert!(celery.log().contains("interop.mul"), "{}", celery.log());
    Ok(())
}

/// A message redelivered after its follow-ups went out (a worker killed
/// between sending them and acknowledging) runs again but sends nothing
/// twice: the chain step (frozen id) and the callback (id derived from the
/// parent's) each reach their queue once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redelivered_message_does_not_send_its_follow_ups_twice() -> Result<()> {
    use redis::Commands as _;
    let s = Stack::start("canvas-redelivery").await?;
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
    let p = producer(&s.redis.url(), &s.ns)?;
    let mut conn = s.redis.conn()?;
    for delivery in 1..=2 {
        let _: () = conn.del(taskstack::proto::keys::result_key(&id))?;
        let _: () = conn.lpush("celery", &msg.payload)?;
        let r = p
            .wait(&id, Duration::from_secs(30))
            .await
            .with_context(|| format!("delivery {delivery}; worker log:\n{}", s.worker.log()))?;
        assert_eq!(r.status, TaskState::Success, "delivery {delivery}: {r:?}");
        assert_eq!(r.result, json!(3));
        assert_eq!(r.children.len(), 2, "{r:?}");
    }
    let queued: usize = conn.llen(&sink)?;
    assert_eq!(queued, 2, "chain step + callback, each once");
    Ok(())
}

/// A worker SIGKILLed in the middle of a 1,000-step chain loses no step and
/// duplicates none: another worker picks the held message up after the
/// lease and the chain runs to its end. Each step is a program task that
/// appends its id to a file, so executions are counted: every step ran,
/// and only steps in flight at the kill may have run twice (at least
/// once); each follow-up was pushed once (one send-once marker per step).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_killed_mid_chain_loses_no_step() -> Result<()> {
    use redis::Commands as _;
    const STEPS: usize = 1000;
    let redis = RedisServer::start()?;
    let ns = namespace("canvas-kill");
    let dir = tempfile::tempdir()?;
    let script = dir.path().join("step.sh");
    let log = dir.path().join("executions.log");
    std::fs::write(
        &script,
        "#!/bin/sh\n# One execution of a chain step: its id appended to the log.\n\
         grep -o '\"id\":\"[^\"]*\"' >> \"$1\"\necho 1\n",
    )?;
    let config = dir.path().join("worker.toml");
    std::fs::write(
        &config,
        format!(
            "[tasks.\"count.step\"]\nexec = [\"/bin/sh\", {:?}, {:?}]\n",
            script.to_str().context("utf-8 path")?,
            log.to_str().context("utf-8 path")?
        ),
    )?;
    let env = [
        ("TASKSTACK_LEASE", "2s"),
        ("TASKSTACK_CONFIG", config.to_str().context("utf-8 path")?),
    ];
    let mut first_worker = WorkerProcess::spawn(&redis.url(), &ns, &env)?;
    first_worker.wait_log("worker ready", Duration::from_secs(60))?;

    let ids: Vec<String> = (0..STEPS)
        .map(|_| uuid::Uuid::new_v4().to_string())
        .collect();
    let rest: Vec<Value> = ids[1..]
        .iter()
        .rev()
        .map(|id| json!({"task": "count.step", "args": [], "options": {"task_id": id}}))
        .collect();
    let first = taskstack::canvas::Signature::parse(&json!({
        "task": "count.step",
        "args": [],
        "options": {"task_id": ids[0], "chain": rest},
    }))?;
    let msg = taskstack::canvas::build(
        &first,
        &taskstack::canvas::Dispatch::default(),
        &taskstack::canvas::Lineage {
            parent_id: &ids[0],
            root_id: &ids[0],
            origin: "test",
            now: chrono::Utc::now(),
        },
    );
    let mut conn = redis.conn()?;
    let _: () = conn.lpush("celery", &msg.payload)?;

    let p = producer(&redis.url(), &ns)?;
    let third = &ids[STEPS / 3];
    p.wait(third, Duration::from_secs(120))
        .await
        .with_context(|| first_worker.log())?;
    first_worker.kill()?;
    let mut done_at_kill = 0;
    for id in &ids {
        if p.result(id)
            .await?
            .is_none_or(|r| r.status != TaskState::Success)
        {
            break;
        }
        done_at_kill += 1;
    }
    eprintln!("{done_at_kill} of {STEPS} steps done when the worker was killed");
    assert!(done_at_kill < STEPS, "the chain finished before the kill");
    let second_worker = WorkerProcess::spawn(&redis.url(), &ns, &env)?;
    let last = p
        .wait(&ids[STEPS - 1], Duration::from_secs(300))
        .await
        .with_context(|| format!("chain did not finish; worker log:\n{}", second_worker.log()))?;
    assert_eq!(last.status, TaskState::Success, "{last:?}");
    for (k, id) in ids.iter().enumerate() {
        let r = p
            .result(id)
            .await?
            .with_context(|| format!("step {k} has no result"))?;
        assert_eq!(r.status, TaskState::Success, "step {k}: {r:?}");
        if k > 0 {
            assert_eq!(
                r.parent_id.as_deref(),
                Some(ids[k - 1].as_str()),
                "step {k}"
            );
        }
    }
    let mut runs = std::collections::HashMap::<String, usize>::new();
    for line in std::fs::read_to_string(&log)?.lines() {
        let id = line.trim_start_matches("\"id\":\"").trim_end_matches('"');
        *runs.entry(id.to_owned()).or_default() += 1;
    }
    for (k, id) in ids.iter().enumerate() {
        assert!(runs.contains_key(id), "step {k} never ran");
    }
    let twice: Vec<usize> = ids
        .iter()
        .enumerate()
        .filter(|(_, id)| runs[*id] > 1)
        .map(|(k, _)| k)
        .collect();
    eprintln!("steps run twice: {twice:?}");
    // At least once: a step taken but not yet acknowledged when the worker
    // died runs again (acknowledgements go in batches of at most the
    // prefetch, 32 here); no other step does, and none runs three times.
    assert!(
        runs.values().all(|n| *n <= 2)
            && twice
                .iter()
                .all(|k| *k <= done_at_kill && done_at_kill - *k < 32),
        "only steps in flight at the kill (step {done_at_kill}) may run twice: {twice:?}"
    );
    assert_eq!(runs.len(), STEPS, "no other task ran");
    let markers: Vec<String> = conn.keys(format!("{ns}:canvas:sent:*"))?;
    assert_eq!(
        markers.len(),
        STEPS - 1,
        "one send-once marker per follow-up"
    );
    Ok(())
}
