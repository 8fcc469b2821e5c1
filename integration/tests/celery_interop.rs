//! Interoperability with the real Python Celery, both ways, on a real Redis:
//! a Celery client's tasks run on our worker, and our library's tasks run on
//! a Celery worker. The Python side comes from a venv made on first use
//! (`target/celery-venv`) or from `TASKSTACK_CELERY_PYTHON`; these tests
//! never skip.

use anyhow::{Context as _, Result};
use serde_json::{Map, json};
use std::process::{Child, Command, Stdio};
use std::time::Duration;
use taskstack::proto::TaskState;
use taskstack::{SendOptions, TaskRequest};
use taskstack_integration::python::{
    CeleryWorker, celery_python, clean_env as python_env, python_dir, run_client,
};
use taskstack_integration::{RedisServer, WorkerProcess, namespace, producer, wait_until_sync};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_client_runs_on_our_worker() -> Result<()> {
    let python = tokio::task::spawn_blocking(celery_python).await??;
    let redis = RedisServer::start()?;
    let ns = namespace("celery-client");
    let worker = WorkerProcess::spawn(&redis.url(), &ns, &[])?;
    worker.wait_log("worker ready", Duration::from_secs(60))?;

    let seen = run_client(&python, "send_add.py", &[&redis.url()], || worker.log()).await?;

    assert_eq!(seen["add_state"], "SUCCESS", "{seen}");
    assert_eq!(seen["add_result"], json!(5), "{seen}");
    assert_eq!(seen["fail_state"], "FAILURE", "{seen}");
    assert_eq!(seen["fail_failed"], json!(true), "{seen}");
    assert_eq!(seen["fail_is_exception"], json!(true), "{seen}");
    // Our builtins.RuntimeError comes back as the real Python class.
    assert_eq!(seen["fail_exc_type"], "RuntimeError", "{seen}");
    let message = seen["fail_message"].as_str().unwrap_or_default();
    assert!(
        message.contains("boom"),
        "exception message {message:?} lacks \"boom\""
    );

    // And it was our worker that ran them.
    let p = producer(&redis.url(), &ns)?;
    let add_id = seen["add_id"].as_str().context("no add_id")?;
    let stored = p
        .result(add_id)
        .await?
        .context("no stored result for the add task")?;
    assert_eq!(
        (stored.status, stored.result),
        (TaskState::Success, json!(5))
    );
    assert!(
        stored.worker.is_some(),
        "our worker records itself in the result"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn our_library_task_runs_on_python_worker() -> Result<()> {
    let python = tokio::task::spawn_blocking(celery_python).await??;
    let redis = RedisServer::start()?;
    let ns = namespace("celery-worker");
    let queue = format!(
        "interop-{}",
        &uuid::Uuid::new_v4().simple().to_string()[..8]
    );
    let mut celery = CeleryWorker::spawn(&python, &redis.url(), &queue)?;
    celery.wait_ready(Duration::from_secs(60))?;

    let p = producer(&redis.url(), &ns)?;
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
        r.status,
        TaskState::Success,
        "{r:?}\nCelery worker log:\n{}",
        celery.log()
    );
    assert_eq!(r.result, json!(42), "{r:?}");
    assert_eq!(r.task_id, id);
    assert!(
        r.date_done.is_some() && r.done_at().is_some(),
        "date_done parses: {r:?}"
    );

    drop(celery);
    Ok(())
}

/// A process killed on drop (the example app below).
struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Issue 12: a Celery client's program and HTTP tasks run by the stock
/// worker from its `[tasks."name"]` declarations. The program is
/// examples/python-app's `python -m reports.render`, the endpoint that
/// example's `app.py`, both run by the venv's Python.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_client_runs_program_and_http_tasks_on_the_stock_worker() -> Result<()> {
    let python = tokio::task::spawn_blocking(celery_python).await??;
    let example = python_dir().join("../../examples/python-app");
    let port = taskstack_integration::free_port()?;
    let mut app = Command::new(&python);
    python_env(&mut app)
        .arg(example.join("app.py"))
        .env("PORT", port.to_string())
        .stdin(Stdio::null())
        .stdout(Stdio::null());
    let _app = Killed(
        app.spawn()
            .context("cannot start examples/python-app/app.py")?,
    );
    wait_until_sync(
        "examples/python-app/app.py to answer its healthcheck",
        Duration::from_secs(30),
        || {
            let mut check = Command::new(&python);
            python_env(&mut check)
                .arg(example.join("app.py"))
                .arg("healthcheck")
                .env("PORT", port.to_string());
            check.status().is_ok_and(|s| s.success()).then_some(())
        },
    )?;

    let redis = RedisServer::start()?;
    let ns = namespace("celery-declared");
    let dir = tempfile::tempdir()?;
    let toml = format!(
        r#"
[tasks."reports.render"]
exec = ["{python}", "-m", "reports.render"]
cwd = "{example}"
env = {{ PYTHONDONTWRITEBYTECODE = "1" }}
time_limit = "30s"
[tasks."billing.charge"]
http = "http://127.0.0.1:{port}/tasks/billing.charge"
timeout = "10s"
"#,
        python = python.display(),
        example = example.canonicalize()?.display()
    );
    let file = dir.path().join("worker.toml");
    std::fs::write(&file, toml)?;
    let file = file.to_str().context("utf-8 path")?;
    let worker = WorkerProcess::spawn(&redis.url(), &ns, &[("TASKSTACK_CONFIG", file)])?;
    worker.wait_log("worker ready", Duration::from_secs(60))?;

    let seen = run_client(&python, "send_declared.py", &[&redis.url()], || {
        worker.log()
    })
    .await?;

    assert_eq!(seen["render_state"], "SUCCESS", "{seen}");
    assert_eq!(
        seen["render_result"],
        json!({"title": "Q3", "lines": 4, "text": "Q3\n==\norders: 12\nrefunds: 1"}),
        "{seen}"
    );
    assert_eq!(seen["charge_state"], "SUCCESS", "{seen}");
    assert_eq!(
        seen["charge_result"],
        json!({"customer": "c-7", "charged": 1250, "currency": "EUR"}),
        "{seen}"
    );
    // The endpoint's 422 is a failure the client sees as an exception.
    assert_eq!(seen["refused_state"], "FAILURE", "{seen}");
    assert_eq!(seen["refused_is_exception"], json!(true), "{seen}");
    assert_eq!(seen["refused_exc_type"], "HTTPError", "{seen}");
    let message = seen["refused_message"].as_str().unwrap_or_default();
    assert!(
        message.contains("422") && message.contains("cannot charge 0 cents"),
        "{message:?}"
    );

    // Our worker ran them (and recorded itself in the results).
    let p = producer(&redis.url(), &ns)?;
    for key in ["render_id", "charge_id"] {
        let id = seen[key].as_str().context("no task id")?;
        let stored = p.result(id).await?.context("no stored result")?;
        assert_eq!(stored.status, TaskState::Success);
        assert!(stored.worker.is_some(), "our worker records itself");
    }
    Ok(())
}
