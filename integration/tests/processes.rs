//! Real `taskstack-worker` processes against a real Redis: SIGKILL, SIGTERM,
//! a Redis restart, configuration errors, root refusal and the healthcheck.

use anyhow::{Context as _, Result};
use nix::sys::signal::Signal;
use redis::Commands as _;
use serde_json::{Value, json};
use std::collections::HashSet;
use std::time::{Duration, Instant};
use taskstack::proto::TaskState;
use taskstack::{SendOptions, TaskRequest};
use taskstack_integration::{
    Prereq, RedisServer, WorkerProcess, namespace, producer, require, run_to_exit, wait_until,
    wait_until_sync,
};

fn sleep_tasks(n: usize, secs: f64) -> Vec<TaskRequest> {
    (0..n)
        .map(|_| TaskRequest {
            name: "taskstack.sleep".into(),
            args: vec![json!(secs)],
            kwargs: serde_json::Map::new(),
            options: SendOptions::default(),
        })
        .collect()
}

/// Ids (of `ids`) that have a SUCCESS result.
fn succeeded(redis: &RedisServer, ids: &[String]) -> Result<HashSet<String>> {
    let mut c = redis.conn()?;
    let mut done = HashSet::new();
    for chunk in ids.chunks(500) {
        let keys: Vec<String> = chunk
            .iter()
            .map(|id| format!("celery-task-meta-{id}"))
            .collect();
        let vals: Vec<Option<String>> = redis::cmd("MGET").arg(&keys).query(&mut c)?;
        for (id, v) in chunk.iter().zip(vals) {
            if let Some(v) = v
                && serde_json::from_str::<Value>(&v)?["status"] == "SUCCESS"
            {
                done.insert(id.clone());
            }
        }
    }
    Ok(done)
}

/// Sends `n` `taskstack.add` tasks in `ns` and waits until every one has a
/// SUCCESS result (the worker's log on failure).
async fn add_and_wait(
    redis: &RedisServer,
    ns: &str,
    w: &WorkerProcess,
    n: usize,
    deadline: Duration,
) -> Result<()> {
    let p = producer(&redis.url(), ns)?;
    let tasks: Vec<TaskRequest> = (0..n)
        .map(|i| TaskRequest {
            name: "taskstack.add".into(),
            args: vec![json!(i), json!(1)],
            kwargs: serde_json::Map::new(),
            options: SendOptions::default(),
        })
        .collect();
    let ids = p.send_many(&tasks).await?;
    wait_until_sync(&format!("{n} results"), deadline, || {
        (succeeded(redis, &ids).ok()?.len() == ids.len()).then_some(())
    })
    .with_context(|| w.log())?;
    Ok(())
}

fn worker_id(w: &WorkerProcess) -> Result<String> {
    let v: Value = serde_json::from_slice(&std::fs::read(&w.state_file)?)?;
    Ok(v["id"].as_str().context("id")?.to_owned())
}

fn wait_ready(w: &WorkerProcess) -> Result<()> {
    w.wait_log("worker ready", Duration::from_secs(30))
}

/// Log level that shows each task's start (DEBUG of the message handler).
const SHOW_STARTS: (&str, &str) = (
    "TASKSTACK_LOG_LEVEL",
    "info,taskstack::worker::handle=debug",
);

/// Waits until `w` logged that `n` tasks started running (holding a message
/// is not enough: a held message that has not started is handed back).
fn wait_started(w: &WorkerProcess, n: usize) -> Result<()> {
    wait_until_sync(
        &format!("{n} tasks to start"),
        Duration::from_secs(10),
        || (w.log().matches("\"task started\"").count() >= n).then_some(()),
    )
    .with_context(|| w.log())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_mid_run_loses_no_task() -> Result<()> {
    let redis = RedisServer::start()?;
    let ns = namespace("sigkill");
    let p = producer(&redis.url(), &ns)?;
    let env = [
        ("TASKSTACK_CONCURRENCY", "20"),
        ("TASKSTACK_PREFETCH", "300"),
        ("TASKSTACK_LEASE", "2s"),
    ];
    let a = WorkerProcess::spawn(&redis.url(), &ns, &env)?;
    let b = WorkerProcess::spawn(&redis.url(), &ns, &env)?;
    wait_ready(&a)?;
    wait_ready(&b)?;
    let ids = p.send_many(&sleep_tasks(2000, 0.05)).await?;

    // Kill A once both hold work and some results exist.
    let a_id = worker_id(&a)?;
    let inflight = format!("{ns}:held:{a_id}");
    wait_until_sync(
        "worker A to hold messages and 200 results",
        Duration::from_secs(30),
        || {
            let held: i64 = redis.conn().ok()?.hlen(&inflight).ok()?;
            let done = succeeded(&redis, &ids).ok()?.len();
            (held > 0 && done >= 200).then_some(())
        },
    )?;
    let held_at_kill: i64 = redis.conn()?.hlen(&inflight)?;
    a.signal(Signal::SIGKILL)?;
    let killed_at = Instant::now();

    let total = ids.len();
    let done = wait_until(
        "every task to succeed after the SIGKILL",
        Duration::from_secs(90),
        || {
            let done = succeeded(&redis, &ids);
            async move {
                let done = done?;
                Ok((done.len() == total).then_some(done))
            }
        },
    )
    .await?;
    assert_eq!(done.len(), 2000);
    assert!(
        held_at_kill > 0,
        "A held nothing when killed: the test proved nothing"
    );
    // B restored A's messages after A's lease (2 s) expired, not an hour later.
    b.wait_log(
        "restored messages held by workers whose lease expired",
        Duration::from_secs(10),
    )?;
    assert!(killed_at.elapsed() < Duration::from_secs(90));
    let mut c = redis.conn()?;
    assert!(!c.exists::<_, bool>(&inflight)?, "A's holds were restored");
    assert_eq!(c.llen::<_, i64>("celery")?, 0);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_then_hands_back_what_did_not_finish() -> Result<()> {
    let redis = RedisServer::start()?;
    let ns = namespace("sigterm");
    let p = producer(&redis.url(), &ns)?;
    // Two slots, six messages held: two 0.5 s tasks run, four wait.
    let mut a = WorkerProcess::spawn(
        &redis.url(),
        &ns,
        &[
            ("TASKSTACK_CONCURRENCY", "2"),
            ("TASKSTACK_PREFETCH", "6"),
            ("TASKSTACK_DRAIN_TIMEOUT", "10s"),
            SHOW_STARTS,
        ],
    )?;
    wait_ready(&a)?;
    let short = p.send_many(&sleep_tasks(6, 0.5)).await?;
    let a_id = worker_id(&a)?;
    let inflight = format!("{ns}:held:{a_id}");
    wait_until_sync("worker A to hold all six", Duration::from_secs(10), || {
        (redis.conn().ok()?.hlen::<_, i64>(&inflight).ok()? == 6).then_some(())
    })?;
    wait_started(&a, 2)?;
    a.signal(Signal::SIGTERM)?;
    let status = a.wait_exit(Duration::from_secs(10))?;
    assert_eq!(status.code(), Some(0), "log:\n{}", a.log());
    // The two running ones finished during the drain; four went back at once.
    let done = succeeded(&redis, &short)?;
    let mut c = redis.conn()?;
    let queued: i64 = c.llen("celery")?;
    assert_eq!(
        done.len() + queued as usize,
        6,
        "every task either finished or is queued again"
    );
    assert!(
        done.len() >= 2,
        "running tasks finished during the drain: {}",
        done.len()
    );
    assert!(!c.exists::<_, bool>(&inflight)?);
    assert_eq!(
        c.zscore::<_, _, Option<f64>>(format!("{ns}:leases"), &a_id)?,
        None,
        "lease released"
    );

    // Now a drain shorter than the tasks: they are handed back, and another
    // worker completes them.
    let mut a2 = WorkerProcess::spawn(
        &redis.url(),
        &ns,
        &[
            ("TASKSTACK_CONCURRENCY", "4"),
            ("TASKSTACK_DRAIN_TIMEOUT", "500ms"),
            SHOW_STARTS,
        ],
    )?;
    wait_ready(&a2)?;
    let long = p.send_many(&sleep_tasks(4, 3.0)).await?;
    wait_started(&a2, 4)?;
    let t = Instant::now();
    a2.signal(Signal::SIGTERM)?;
    let status = a2.wait_exit(Duration::from_secs(10))?;
    assert_eq!(status.code(), Some(0));
    assert!(
        t.elapsed() < Duration::from_secs(3),
        "exited within the drain deadline, took {:?}",
        t.elapsed()
    );
    assert!(succeeded(&redis, &long)?.is_empty());
    let b = WorkerProcess::spawn(&redis.url(), &ns, &[("TASKSTACK_CONCURRENCY", "8")])?;
    wait_ready(&b)?;
    let all: Vec<String> = short.into_iter().chain(long).collect();
    wait_until_sync(
        "B to finish every handed-back task",
        Duration::from_secs(30),
        || (succeeded(&redis, &all).ok()?.len() == all.len()).then_some(()),
    )?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn second_signal_stops_at_once_and_the_lease_returns_the_task() -> Result<()> {
    let redis = RedisServer::start()?;
    let ns = namespace("twosignals");
    let p = producer(&redis.url(), &ns)?;
    let env = [
        ("TASKSTACK_LEASE", "2s"),
        ("TASKSTACK_DRAIN_TIMEOUT", "60s"),
        SHOW_STARTS,
    ];
    let mut a = WorkerProcess::spawn(&redis.url(), &ns, &env)?;
    wait_ready(&a)?;
    let id = p.send_task("taskstack.sleep", vec![json!(1.5)]).await?;
    wait_started(&a, 1)?;
    a.signal(Signal::SIGTERM)?;
    a.wait_log("shutdown requested", Duration::from_secs(5))?;
    a.signal(Signal::SIGTERM)?;
    let status = a.wait_exit(Duration::from_secs(5))?;
    assert_eq!(status.code(), Some(taskstack::shutdown::FORCED_EXIT_CODE));
    let b = WorkerProcess::spawn(&redis.url(), &ns, &env)?;
    wait_ready(&b)?;
    let r = p.wait(&id, Duration::from_secs(30)).await?;
    assert_eq!(r.status, TaskState::Success);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_restart_with_aof_loses_no_task() -> Result<()> {
    let mut redis = RedisServer::start_persistent()?;
    let ns = namespace("restart");
    let p = producer(&redis.url(), &ns)?;
    let w = WorkerProcess::spawn(&redis.url(), &ns, &[("TASKSTACK_CONCURRENCY", "10")])?;
    wait_ready(&w)?;
    let ids = p.send_many(&sleep_tasks(400, 0.02)).await?;
    wait_until_sync(
        "some results before the restart",
        Duration::from_secs(30),
        || (succeeded(&redis, &ids).ok()?.len() >= 40).then_some(()),
    )?;
    redis.restart()?;
    wait_until_sync(
        "every task enqueued before the restart to succeed",
        Duration::from_secs(90),
        || (succeeded(&redis, &ids).ok()?.len() == ids.len()).then_some(()),
    )
    .with_context(|| format!("worker log:\n{}", w.log()))?;
    Ok(())
}

fn run_worker(
    redis_url: &str,
    env: &[(&str, &str)],
    args: &[&str],
) -> Result<std::process::Output> {
    let dir = tempfile::tempdir()?;
    let mut cmd = WorkerProcess::command(redis_url, &namespace("cli"), &dir.path().join("w.json"))?;
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.args(args);
    run_to_exit(cmd, Duration::from_secs(20))
}

#[test]
fn bad_configuration_exits_2_naming_key_and_value() -> Result<()> {
    let url = "redis://127.0.0.1:1/0";
    type Case<'a> = (&'a [(&'a str, &'a str)], &'a [&'a str]);
    let cases: &[Case] = &[
        (
            &[("TASKSTACK_CONCURRENCY", "zero")],
            &["concurrency", "zero"],
        ),
        (&[("TASKSTACK_CONCURRENCY", "0")], &["concurrency", "0"]),
        (
            &[("TASKSTACK_BROKER_URL", "http://localhost:6379/0")],
            &["broker_url", "http://localhost:6379/0"],
        ),
        (&[("TASKSTACK_LEASE", "forever")], &["lease", "forever"]),
        (&[("TASKSTACK_CONCURENCY", "4")], &["concurency"]),
        (
            &[("TASKSTACK_CONFIG", "/nonexistent/taskstack.toml")],
            &["/nonexistent/taskstack.toml"],
        ),
        (&[("TASKSTACK_LOG_FORMAT", "xml")], &["log_format", "xml"]),
        (
            &[("TASKSTACK_WORKER_RUNTIME_THREADS", "0")],
            &["worker_runtime_threads", "0"],
        ),
        (
            &[("TASKSTACK_WORKER_RUNTIME_THREADS", "many")],
            &["worker_runtime_threads", "many"],
        ),
        (
            &[(
                "TASKSTACK_BROKER_PASSWORD_FILE",
                "/nonexistent/redis_password",
            )],
            &["broker_password_file", "/nonexistent/redis_password"],
        ),
        // Fewer connections than the worker's loops keep would stall it.
        (
            &[("TASKSTACK_REDIS_POOL_SIZE", "4")],
            &["redis_pool_size", "4", "at least"],
        ),
    ];
    for (env, needles) in cases {
        let out = run_worker(url, env, &[])?;
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{env:?}: {err}");
        for n in *needles {
            assert!(err.contains(n), "{env:?}: {err:?} should name {n:?}");
        }
    }
    // A TOML file is read, and the environment wins over it.
    let dir = tempfile::tempdir()?;
    let file = dir.path().join("c.toml");
    std::fs::write(
        &file,
        "concurrency = 3\nqueues = [\"a\", \"b\"]\nlease = \"7s\"\n",
    )?;
    let out = run_worker(
        url,
        &[
            ("TASKSTACK_CONFIG", file.to_str().context("utf8")?),
            ("TASKSTACK_LEASE", "9s"),
        ],
        &["config"],
    )?;
    assert_eq!(out.status.code(), Some(0));
    let shown: Value = serde_json::from_slice(&out.stdout)?;
    assert_eq!(shown["concurrency"], 3);
    assert_eq!(shown["queues"], json!(["a", "b"]));
    assert_eq!(shown["lease"], "9s");
    Ok(())
}

/// The stock worker (built-in and declared tasks only) runs on one
/// runtime thread by default; `worker_runtime_threads` and tokio's own
/// variable choose otherwise. Each runs tasks and stops cleanly.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_stock_worker_runs_one_runtime_thread_unless_told_otherwise() -> Result<()> {
    let redis = RedisServer::start()?;
    let cases: [(&[(&str, &str)], u64); 4] = [
        (&[], 1),
        (&[("TASKSTACK_WORKER_RUNTIME_THREADS", "auto")], 1),
        (&[("TASKSTACK_WORKER_RUNTIME_THREADS", "2")], 2),
        (&[("TOKIO_WORKER_THREADS", "3")], 3),
    ];
    for (i, (env, want)) in cases.into_iter().enumerate() {
        let ns = namespace(&format!("threads{i}"));
        let mut w = WorkerProcess::spawn(&redis.url(), &ns, env)?;
        wait_ready(&w)?;
        let log = w.log();
        let ready: Value = log
            .lines()
            .find(|l| l.contains("\"worker ready\""))
            .map(serde_json::from_str)
            .context("a ready line")??;
        assert_eq!(ready["fields"]["runtime_threads"], want, "{env:?}: {log}");
        add_and_wait(&redis, &ns, &w, 50, Duration::from_secs(20)).await?;
        w.signal(Signal::SIGTERM)?;
        let status = w.wait_exit(Duration::from_secs(20))?;
        assert_eq!(status.code(), Some(0), "{env:?}: {}", w.log());
    }
    Ok(())
}

/// A worker given the smallest pool it accepts, with its loops' connections
/// in use (task events on, so the event sink holds one; a burst at
/// concurrency 64, so both settler and starter lanes do), drains the burst
/// without a loop waiting for a pooled connection (4 connections, once
/// accepted, stalled the worker after its first batch).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_at_its_smallest_pool_drains_a_burst() -> Result<()> {
    let redis = RedisServer::start()?;
    let ns = namespace("minpool");
    let min = taskstack::worker::MIN_POOL_SIZE.to_string();
    let mut w = WorkerProcess::spawn(
        &redis.url(),
        &ns,
        &[
            ("TASKSTACK_REDIS_POOL_SIZE", min.as_str()),
            ("TASKSTACK_WORKER_SEND_TASK_EVENTS", "true"),
            ("TASKSTACK_CONCURRENCY", "64"),
        ],
    )?;
    wait_ready(&w)?;
    add_and_wait(&redis, &ns, &w, 3000, Duration::from_secs(60)).await?;
    let log = w.log();
    assert!(
        !log.contains("waiting for a slot"),
        "a loop waited for a pooled connection: {log}"
    );
    w.signal(Signal::SIGTERM)?;
    let status = w.wait_exit(Duration::from_secs(20))?;
    assert_eq!(status.code(), Some(0), "{}", w.log());
    Ok(())
}

#[test]
fn refuses_to_run_as_root_unless_allowed() -> Result<()> {
    require(Prereq::Root);
    let out = run_worker(
        "redis://127.0.0.1:1/0",
        &[("TASKSTACK_ALLOW_ROOT", "0")],
        &[],
    )?;
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("refusing to run as root") && err.contains("TASKSTACK_ALLOW_ROOT"),
        "{err}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn healthcheck_and_heartbeat_tell_the_truth() -> Result<()> {
    let redis = RedisServer::start()?;
    let ns = namespace("health");
    let w = WorkerProcess::spawn(&redis.url(), &ns, &[("TASKSTACK_QUEUES", "q1,q2")])?;
    wait_ready(&w)?;
    let check = || -> Result<std::process::Output> {
        Ok(WorkerProcess::command(&redis.url(), &ns, &w.state_file)?
            .arg("healthcheck")
            .output()?)
    };
    let out = check()?;
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    let id = worker_id(&w)?;
    let rec: String = redis.conn()?.get(format!("{ns}:worker:{id}"))?;
    let rec: Value = serde_json::from_str(&rec)?;
    assert_eq!(rec["queues"], json!(["q1", "q2"]));
    assert_eq!(rec["pid"], w.pid());
    assert!(
        rec["tasks"]
            .as_array()
            .is_some_and(|t| t.contains(&json!("taskstack.add")))
    );
    let ttl: i64 = redis.conn()?.pttl(format!("{ns}:worker:{id}"))?;
    assert!(ttl > 0, "the heartbeat record expires");

    w.signal(Signal::SIGKILL)?;
    wait_until_sync(
        "healthcheck to fail after SIGKILL",
        Duration::from_secs(10),
        || {
            let out = check().ok()?;
            (out.status.code() == Some(1)).then_some(())
        },
    )?;
    Ok(())
}

#[test]
fn a_refused_password_is_logged_as_such_by_worker_and_beat() -> Result<()> {
    let redis = RedisServer::start()?;
    let mut c = redis.conn()?;
    redis::cmd("CONFIG")
        .arg("SET")
        .arg("requirepass")
        .arg("the-right-one")
        .query::<()>(&mut c)?;
    let ns = namespace("wrong-password");
    let wrong = [("TASKSTACK_BROKER_PASSWORD", "the-wrong-one")];
    let worker = WorkerProcess::spawn(&redis.url(), &ns, &wrong)?;
    let beat = taskstack_integration::BeatProcess::spawn(
        &redis.url(),
        &ns,
        "[[schedule]]\nname = \"t\"\ntask = \"x\"\nevery = \"1s\"\n",
        &wrong,
    )?;
    let hint = "Redis refused the password; check broker_password";
    worker.wait_log(hint, Duration::from_secs(20))?;
    beat.wait_log(hint, Duration::from_secs(20))?;
    assert!(
        worker.is_running() && beat.is_running(),
        "they keep retrying"
    );
    Ok(())
}
