//! Celery's remote control and monitoring against real taskstack worker
//! processes, driven by the real Python Celery 5 (`celery inspect`, `celery
//! control`, `AsyncResult.revoke`) and Flower, on a real Redis.

use anyhow::{Context as _, Result};
use serde_json::{Value, json};
use std::path::Path;
use std::process::Command;
use std::time::Duration;
use taskstack_integration::monitors::Monitors;
use taskstack_integration::python::{celery_json, celery_python, control_client, interop_cmd};
use taskstack_integration::{RedisServer, WorkerProcess, namespace, wait_until_sync};

const LONG: Duration = Duration::from_secs(60);

fn python_cmd(python: &Path, url: &str) -> Command {
    interop_cmd(python, url, None)
}

fn celery_cli(python: &Path, url: &str, args: &[&str]) -> Result<Option<Value>> {
    celery_json(python_cmd(python, url), args)
}

/// `celery inspect <what> -d node`: the node's reply.
fn inspect(python: &Path, url: &str, what: &str, node: &str) -> Result<Value> {
    let replies = celery_cli(python, url, &["inspect", what, "-d", node])?
        .with_context(|| format!("{node} did not answer `celery inspect {what}`"))?;
    Ok(replies[node].clone())
}

fn client(python: &Path, url: &str, args: &[&str]) -> Result<Value> {
    control_client(python_cmd(python, url), args)
}

fn state(python: &Path, url: &str, id: &str) -> Result<String> {
    Ok(client(python, url, &["state", id])?["state"]
        .as_str()
        .unwrap_or_default()
        .to_owned())
}

fn wait_state(
    python: &Path,
    url: &str,
    id: &str,
    want: &str,
    worker: &WorkerProcess,
) -> Result<()> {
    wait_until_sync(&format!("task {id} to be {want}"), LONG, || {
        (state(python, url, id).ok()? == want).then_some(())
    })
    .with_context(|| format!("worker log:\n{}", worker.log()))
}

#[test]
fn celery_inspect_and_control_reach_a_taskstack_worker() -> Result<()> {
    let python = celery_python()?;
    let redis = RedisServer::start()?;
    let url = redis.url();
    let ns = namespace("control");
    let node = format!("ts1@{ns}");
    let worker = WorkerProcess::spawn(&url, &ns, &[("TASKSTACK_WORKER_NODENAME", &node)])?;
    worker.wait_log("worker ready", LONG)?;

    // inspect: ping, registered, stats, active_queues.
    let ping = wait_until_sync("the worker to answer celery inspect ping", LONG, || {
        inspect(&python, &url, "ping", &node)
            .ok()
            .filter(|v| !v.is_null())
    })?;
    assert_eq!(ping, json!({"ok": "pong"}));
    let registered = inspect(&python, &url, "registered", &node)?;
    assert!(
        registered
            .as_array()
            .is_some_and(|a| a.contains(&json!("taskstack.add"))),
        "{registered}"
    );
    let stats = inspect(&python, &url, "stats", &node)?;
    assert_eq!(stats["pool"]["max-concurrency"], json!(64), "{stats}");
    assert_eq!(stats["pid"], json!(worker.pid()), "{stats}");
    let queues = inspect(&python, &url, "active_queues", &node)?;
    assert_eq!(queues[0]["name"], "celery", "{queues}");

    // active, then AsyncResult.revoke(terminate=True) stops the running task.
    let long = client(&python, &url, &["send", "taskstack.sleep", "[120]"])?["id"]
        .as_str()
        .context("no id")?
        .to_owned();
    let active = wait_until_sync("the sleep task to be active", LONG, || {
        let a = inspect(&python, &url, "active", &node).ok()?;
        a.as_array()?
            .iter()
            .any(|r| r["id"] == long.as_str())
            .then_some(a)
    })?;
    assert_eq!(active[0]["name"], "taskstack.sleep", "{active}");
    client(&python, &url, &["revoke_terminate", &long])?;
    wait_state(&python, &url, &long, "REVOKED", &worker)?;
    let active = inspect(&python, &url, "active", &node)?;
    assert_eq!(active, json!([]), "terminated task still active");

    // app.control.revoke before the task is sent: it never runs.
    let early = uuid::Uuid::new_v4().to_string();
    client(&python, &url, &["revoke", &early])?;
    wait_until_sync("the revoke to be recorded", LONG, || {
        let r = inspect(&python, &url, "revoked", &node).ok()?;
        r.as_array()?.contains(&json!(early)).then_some(())
    })?;
    client(&python, &url, &["send", "taskstack.add", "[1, 2]", &early])?;
    wait_state(&python, &url, &early, "REVOKED", &worker)?;
    worker.wait_log("revoked before it started", LONG)?;
    // Others still run.
    let add = client(&python, &url, &["send", "taskstack.add", "[2, 3]"])?["id"]
        .as_str()
        .context("no id")?
        .to_owned();
    wait_state(&python, &url, &add, "SUCCESS", &worker)?;

    // Unknown commands get Celery's error; shutdown is refused by default.
    let r = client(&python, &url, &["broadcast", "no_such_command", "{}"])?;
    assert!(
        r["replies"].as_array().is_some_and(
            |a| a.contains(&json!({ node.clone(): {"error": "KeyError('no_such_command')"} }))
        ),
        "{r}"
    );
    let r = client(&python, &url, &["broadcast", "shutdown", "{}"])?;
    let refusal = r["replies"][0][&node]["error"].as_str().unwrap_or_default();
    assert!(refusal.contains("worker_remote_control"), "{r}");
    assert!(worker.is_running(), "shutdown must be refused by default");
    Ok(())
}

#[test]
fn default_names_differ_per_worker_and_shutdown_obeys_all() -> Result<()> {
    let python = celery_python()?;
    let redis = RedisServer::start()?;
    let url = redis.url();
    let ns = namespace("control-names");
    let env = [("TASKSTACK_WORKER_REMOTE_CONTROL", "all")];
    let mut a = WorkerProcess::spawn(&url, &ns, &env)?;
    a.wait_log("worker ready", LONG)?;
    let b = WorkerProcess::spawn(&url, &ns, &env)?;
    b.wait_log("worker ready", LONG)?;

    let names = wait_until_sync("both workers to answer ping", LONG, || {
        let v = celery_cli(&python, &url, &["inspect", "ping"]).ok()??;
        let names: Vec<String> = v.as_object()?.keys().cloned().collect();
        (names.len() == 2).then_some(names)
    })?;
    assert!(
        names.iter().all(|n| n.starts_with("taskstack")),
        "{names:?}"
    );
    assert_ne!(names[0], names[1]);
    // The first worker has the default name; the second, finding it
    // taken, adds its pid.
    let b_prefix = format!("taskstack-{}@", b.pid());
    let a_name = names
        .iter()
        .find(|n| !n.starts_with(&b_prefix))
        .context("worker a's name")?
        .clone();
    assert!(a_name.starts_with("taskstack@"), "{names:?}");
    // `celery control shutdown` expects no reply (as from a Celery worker).
    let out = python_cmd(&python, &url)
        .args([
            "-m",
            "celery",
            "-A",
            "interop_tasks",
            "control",
            "shutdown",
            "-d",
            &a_name,
        ])
        .output()?;
    eprintln!(
        "celery control shutdown: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    let status = a.wait_exit(LONG)?;
    assert!(status.success(), "{status}\n{}", a.log());
    assert!(b.is_running());
    let left = celery_cli(&python, &url, &["inspect", "ping"])?.context("b answers")?;
    assert_eq!(left.as_object().map(|o| o.len()), Some(1), "{left}");
    Ok(())
}

#[test]
fn workers_started_while_redis_is_down_get_distinct_names() -> Result<()> {
    let python = celery_python()?;
    let mut redis = RedisServer::start()?;
    let url = redis.url();
    let ns = namespace("control-names-down");
    redis.stop()?;
    let a = WorkerProcess::spawn(&url, &ns, &[])?;
    let b = WorkerProcess::spawn(&url, &ns, &[])?;
    for w in [&a, &b] {
        w.wait_log("cannot claim the node name", LONG)
            .with_context(|| w.log())?;
    }
    redis.restart()?;
    // Both would have taken `taskstack@<host>` unchecked, and answered
    // under one name.
    let names = wait_until_sync("both workers to answer ping", LONG, || {
        let v = celery_cli(&python, &url, &["inspect", "ping"]).ok()??;
        let names: Vec<String> = v.as_object()?.keys().cloned().collect();
        (names.len() == 2).then_some(names)
    })
    .with_context(|| format!("{}\n{}", a.log(), b.log()))?;
    for w in [&a, &b] {
        let own = format!("taskstack-{}@", w.pid());
        assert!(names.iter().any(|n| n.starts_with(&own)), "{names:?}");
    }
    Ok(())
}

#[test]
fn flower_and_celery_events_show_taskstack_workers_and_tasks() -> Result<()> {
    let python = Monitors::python()?;
    let redis = RedisServer::start()?;
    let url = redis.url();
    let ns = namespace("events");
    let node = format!("ev@{ns}");
    let worker = WorkerProcess::spawn(
        &url,
        &ns,
        &[
            ("TASKSTACK_WORKER_NODENAME", &node),
            ("TASKSTACK_WORKER_SEND_TASK_EVENTS", "1"),
        ],
    )?;
    worker.wait_log("worker ready", LONG)?;
    let monitors = Monitors::start(|| python_cmd(&python, &url))?;

    let ok = client(&python, &url, &["send", "taskstack.add", "[20, 22]"])?["id"]
        .as_str()
        .context("no id")?
        .to_owned();
    let bad = client(&python, &url, &["send", "taskstack.fail", "[\"boom\"]"])?["id"]
        .as_str()
        .context("no id")?
        .to_owned();

    let tasks = wait_until_sync("Flower to list both tasks as finished", LONG, || {
        let v = monitors.api("/api/tasks")?;
        (v[&ok]["state"] == "SUCCESS" && v[&bad]["state"] == "FAILURE").then_some(v)
    })
    .with_context(|| {
        format!(
            "worker log:\n{}\nflower log:\n{}",
            worker.log(),
            monitors.flower_log()
        )
    })?;
    assert_eq!(tasks[&ok]["name"], "taskstack.add", "{}", tasks[&ok]);
    assert_eq!(tasks[&ok]["result"], "42", "{}", tasks[&ok]);
    assert_eq!(tasks[&ok]["worker"], node.as_str(), "{}", tasks[&ok]);
    assert!(
        tasks[&bad]["exception"]
            .as_str()
            .unwrap_or_default()
            .contains("boom"),
        "{}",
        tasks[&bad]
    );

    let workers = wait_until_sync("Flower to list the worker", LONG, || {
        let v = monitors.api("/api/workers?refresh=1")?;
        v.get(&node).filter(|w| w.get("stats").is_some()).cloned()
    })
    .with_context(|| monitors.flower_log())?;
    assert!(
        workers["registered"]
            .as_array()
            .is_some_and(|a| a.contains(&json!("taskstack.add"))),
        "{workers}"
    );

    // `celery events --dump` saw the worker and the tasks too.
    let dump = wait_until_sync("celery events --dump to show the tasks", LONG, || {
        let d = monitors.dump();
        (d.contains(&ok) && d.contains("task succeeded") && d.contains(&node)).then_some(d)
    })?;
    assert!(dump.contains(&format!("{node} [")), "{dump}");
    Ok(())
}
