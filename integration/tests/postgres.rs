//! The PostgreSQL result store with real processes: `taskstack-worker` and
//! `taskstack-web` on a private `redis-server` and a private `postgres`
//! (Debian's package; its own database per test). Results read through the
//! web API; start-up refusals; PostgreSQL restarted under load; a worker
//! SIGKILLed mid-batch; the task's arguments in the row.
//!
//! Needs `cargo build -p taskstack-worker -p taskstack-web` first.

use anyhow::{Context as _, Result};
use nix::sys::signal::Signal;
use serde_json::{Value, json};
use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;
use taskstack::backend::{Backend, PostgresBackend};
use taskstack::broker::{Broker, RedisPool};
use taskstack::config::{PgTarget, RedisTarget, Secret};
use taskstack::proto::Keys;
use taskstack::{Producer, SendOptions, TaskRequest};
use taskstack_integration::{
    PG_PASSWORD, PgServer, RedisServer, WebProcess, WorkerProcess, namespace, run_to_exit,
    wait_until, wait_until_sync,
};

fn pg_env(pg: &PgServer, db: &str) -> Vec<(&'static str, String)> {
    vec![
        ("TASKSTACK_RESULT_BACKEND", pg.url(db)),
        ("TASKSTACK_RESULT_BACKEND_PASSWORD", PG_PASSWORD.to_owned()),
    ]
}

fn refs<'a>(env: &'a [(&'static str, String)]) -> Vec<(&'static str, &'a str)> {
    env.iter().map(|(k, v)| (*k, v.as_str())).collect()
}

/// A producer in this process on the same Redis and PostgreSQL database.
fn producer(redis: &RedisServer, ns: &str, pg: &PgServer, db: &str) -> Result<Producer> {
    let pool = RedisPool::new(
        &RedisTarget::from_url(&redis.url())?,
        4,
        Duration::from_secs(5),
    )?;
    let broker = Broker::new(pool.clone(), pool, Keys::new(ns));
    let target = PgTarget::new(
        "result_backend",
        &pg.url(db),
        Some(&Secret::new(PG_PASSWORD)),
    )?;
    let backend: Arc<dyn Backend> = Arc::new(PostgresBackend::new(
        broker,
        &target,
        4,
        Duration::from_secs(5),
    )?);
    Ok(Producer::on_backend(backend, "pg-test").record_pending(Duration::from_secs(3600)))
}

#[tokio::test(flavor = "multi_thread")]
async fn worker_and_web_keep_results_in_postgresql() -> Result<()> {
    let redis = RedisServer::start()?;
    let mut pg = PgServer::start();
    let db = pg.create_database();
    let ns = namespace("pg-e2e");
    let env = pg_env(&pg, &db);
    let web = WebProcess::spawn(&redis.url(), &ns, &refs(&env)).await?;
    let worker = WorkerProcess::spawn(&redis.url(), &ns, &refs(&env))?;
    worker.wait_log("worker ready", Duration::from_secs(30))?;
    wait_until("/health to turn 200", Duration::from_secs(30), || async {
        Ok((web.call("GET", "/health", None).await?.0 == 200).then_some(()))
    })
    .await?;

    let done = web.run_add(40, 2).await?;
    assert_eq!(done["result"], 42, "{done}");
    let id = done["id"].as_str().unwrap_or_default().to_owned();
    let row = pg
        .psql(
            &db,
            &format!(
                "SELECT state, result, task_name, expires_at > now() + interval '50 minutes' \
                 FROM taskstack_results WHERE task_id = '{id}'"
            ),
        )
        .map_err(anyhow::Error::msg)?;
    assert_eq!(
        row.trim(),
        "SUCCESS|42|taskstack.add|t",
        "the row in PostgreSQL"
    );
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg(format!("celery-task-meta-{id}"))
        .query(&mut redis.conn()?)?;
    assert!(keys.is_empty(), "no result record on Redis: {keys:?}");

    // A failure keeps Celery's exception record.
    let (_, v) = web
        .call(
            "POST",
            "/api/v1/tasks",
            Some(&json!({"task": "taskstack.fail", "args": ["boom"]})),
        )
        .await?;
    let failed = web
        .wait_state(v["id"].as_str().unwrap_or_default(), "FAILURE")
        .await?;
    assert!(failed.to_string().contains("boom"), "{failed}");

    // Revoked before it runs; refused once finished; unknown ids are 404.
    let (_, v) = web
        .call(
            "POST",
            "/api/v1/tasks",
            Some(&json!({"task": "taskstack.add", "args": [1, 1], "countdown": 2})),
        )
        .await?;
    let later = v["id"].as_str().unwrap_or_default().to_owned();
    let (s, v) = web
        .call("DELETE", &format!("/api/v1/tasks/{later}"), None)
        .await?;
    assert_eq!(s, 200, "{v}");
    web.wait_state(&later, "REVOKED").await?;
    // When due the worker takes it and skips it: it never runs.
    worker.wait_log(
        "task was revoked before it started; skipping it",
        Duration::from_secs(30),
    )?;
    let (_, v) = web
        .call("GET", &format!("/api/v1/tasks/{later}"), None)
        .await?;
    assert_eq!(v["state"], "REVOKED", "{v}");
    assert!(
        worker
            .log()
            .lines()
            .any(|l| l.contains(&later) && l.contains("revoked before it started")),
        "the skipped task is the revoked one: {}",
        worker.log()
    );

    // Running (marked on Redis, no STARTED row without
    // task_track_started): the revocation is refused, the task finishes.
    let (_, v) = web
        .call(
            "POST",
            "/api/v1/tasks",
            Some(&json!({"task": "taskstack.sleep", "args": [2]})),
        )
        .await?;
    let running = v["id"].as_str().unwrap_or_default().to_owned();
    let marks = format!("{ns}:running:{}", worker_id(&worker)?);
    wait_until(
        "the sleep task to start",
        Duration::from_secs(30),
        || async {
            let mark: Option<String> = redis::cmd("HGET")
                .arg(&marks)
                .arg(&running)
                .query(&mut redis.conn()?)?;
            Ok(mark.map(|_| ()))
        },
    )
    .await?;
    let (s, v) = web
        .call("DELETE", &format!("/api/v1/tasks/{running}"), None)
        .await?;
    assert_eq!(s, 409, "a running task is not revoked: {v}");
    let done = web.wait_state(&running, "SUCCESS").await?;
    assert_eq!(done["result"], 2.0, "{done}");
    let left: usize = redis::cmd("HLEN").arg(&marks).query(&mut redis.conn()?)?;
    assert_eq!(left, 0, "no start mark outlives its task");
    let (s, v) = web
        .call("DELETE", &format!("/api/v1/tasks/{id}"), None)
        .await?;
    assert_eq!(s, 409, "a finished task is not revoked: {v}");
    let (s, _) = web.call("GET", "/api/v1/tasks/no-such-task", None).await?;
    assert_eq!(s, 404);

    // /health measures PostgreSQL, and fails while it is down.
    let (s, v) = web.call("GET", "/health", None).await?;
    assert_eq!(s, 200, "{v}");
    assert_eq!(v["checks"]["postgresql"]["ok"], true, "{v}");
    assert!(v["checks"]["postgresql"]["latency_ms"].is_number(), "{v}");
    pg.stop();
    let (s, v) = web.call("GET", "/health", None).await?;
    assert_eq!(
        (s, v["failed"].clone()),
        (503, json!(["postgresql"])),
        "{v}"
    );
    pg.start_again();
    wait_until(
        "/health to turn 200 again",
        Duration::from_secs(30),
        || async { Ok((web.call("GET", "/health", None).await?.0 == 200).then_some(())) },
    )
    .await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn a_wrong_password_or_missing_database_stops_start_up_with_exit_2() -> Result<()> {
    let redis = RedisServer::start()?;
    let pg = PgServer::start();
    let db = pg.create_database();
    let ns = namespace("pg-refused");
    for (url, password, key) in [
        (pg.url(&db), "wrong-password", "result_backend_password"),
        (pg.url("missing_db"), PG_PASSWORD, "`result_backend`"),
    ] {
        let state = tempfile::tempdir()?;
        let mut cmd = WorkerProcess::command(&redis.url(), &ns, &state.path().join("w.json"))?;
        cmd.env("TASKSTACK_RESULT_BACKEND", &url)
            .env("TASKSTACK_RESULT_BACKEND_PASSWORD", password);
        let out = run_to_exit(cmd, Duration::from_secs(30))?;
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{url}: {stderr}");
        assert!(stderr.contains(key), "{url}: names {key}: {stderr}");
        assert!(!stderr.contains("wrong-password"), "no password in logs");
    }
    Ok(())
}

/// Counts rows of `db` in `state`.
/// `n` `taskstack.sleep` tasks of `secs` seconds each (the task's index as
/// its second argument), sent in batches of 500; their ids in order.
async fn send_sleeps(producer: &Producer, n: usize, secs: f64) -> Result<Vec<String>> {
    let reqs: Vec<TaskRequest> = (0..n)
        .map(|i| TaskRequest {
            name: "taskstack.sleep".into(),
            args: vec![json!(secs), json!(i)],
            kwargs: serde_json::Map::new(),
            options: SendOptions::default(),
        })
        .collect();
    let mut ids = Vec::new();
    for chunk in reqs.chunks(500) {
        ids.extend(producer.send_many(chunk).await?);
    }
    Ok(ids)
}

fn count(pg: &PgServer, db: &str, state: &str) -> Result<usize> {
    let n = pg
        .psql(
            db,
            &format!("SELECT count(*) FROM taskstack_results WHERE state = '{state}'"),
        )
        .map_err(anyhow::Error::msg)?;
    Ok(n.trim().parse()?)
}

#[tokio::test(flavor = "multi_thread")]
async fn postgresql_restarted_under_load_loses_nothing_and_the_worker_resumes() -> Result<()> {
    const N: usize = 3000;
    let redis = RedisServer::start()?;
    let mut pg = PgServer::start();
    let db = pg.create_database();
    let ns = namespace("pg-restart");
    let env = pg_env(&pg, &db);
    let mut env = refs(&env);
    env.push(("TASKSTACK_CONCURRENCY", "8"));
    env.push(("TASKSTACK_LEASE", "5s"));
    let worker = WorkerProcess::spawn(&redis.url(), &ns, &env)?;
    worker.wait_log("worker ready", Duration::from_secs(30))?;
    let producer = producer(&redis, &ns, &pg, &db)?;
    // Each task sleeps a little, so the run outlasts the restart.
    let ids = send_sleeps(&producer, N, 0.02).await?;
    wait_until("some results", Duration::from_secs(30), || async {
        Ok((count(&pg, &db, "SUCCESS")? >= 100).then_some(()))
    })
    .await?;
    pg.stop();
    worker.wait_log("failed; retrying", Duration::from_secs(30))?;
    pg.start_again();
    wait_until(
        "every task to have its result",
        Duration::from_secs(120),
        || async { Ok((count(&pg, &db, "SUCCESS")? == N).then_some(())) },
    )
    .await?;
    for id in [&ids[0], &ids[N / 2], &ids[N - 1]] {
        let r = producer.result(id).await?.expect("result");
        assert_eq!(r.status, taskstack::proto::TaskState::Success);
    }
    let mut c = redis.conn()?;
    let ready: usize = redis::cmd("LLEN").arg("celery").query(&mut c)?;
    assert_eq!(ready, 0, "every message acknowledged");
    assert!(worker.is_running(), "{}", worker.log());
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn a_celery_chord_completes_with_results_in_postgresql() -> Result<()> {
    use taskstack_integration::python::{celery_python, clean_env, python_dir};
    let python = tokio::task::spawn_blocking(celery_python).await??;
    let redis = RedisServer::start()?;
    let pg = PgServer::start();
    let db = pg.create_database();
    let ns = namespace("pg-chord");
    let env = pg_env(&pg, &db);
    let worker = WorkerProcess::spawn(&redis.url(), &ns, &refs(&env))?;
    worker.wait_log("worker ready", Duration::from_secs(60))?;
    let mut cmd = std::process::Command::new(&python);
    cmd.arg(python_dir().join("canvas_client.py"))
        .arg(redis.url())
        .arg("chord_send")
        .current_dir(python_dir());
    clean_env(&mut cmd);
    let out = run_to_exit(cmd, Duration::from_secs(120))?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    anyhow::ensure!(
        out.status.success(),
        "canvas_client.py chord_send: {stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let sent: Value = stdout
        .lines()
        .rev()
        .find_map(|l| serde_json::from_str(l.trim()).ok())
        .ok_or_else(|| anyhow::anyhow!("no JSON line: {stdout}"))?;
    let body = sent["body_id"].as_str().unwrap_or_default().to_owned();
    let producer = producer(&redis, &ns, &pg, &db)?;
    let r = producer.wait(&body, Duration::from_secs(60)).await?;
    assert_eq!(r.status, taskstack::proto::TaskState::Success, "{r:?}");
    assert_eq!(
        r.result,
        json!({"args": [[0, 2, 4, 6, 8], "body"], "kwargs": {}}),
        "the body got every header result, in order"
    );
    for id in sent["header_ids"].as_array().into_iter().flatten() {
        let id = id.as_str().unwrap_or_default();
        let h = producer.result(id).await?;
        assert_eq!(
            h.map(|h| h.status),
            Some(taskstack::proto::TaskState::Success)
        );
    }
    let on_redis: Vec<String> = redis::cmd("KEYS")
        .arg("celery-task-meta-*")
        .query(&mut redis.conn()?)?;
    assert!(
        on_redis.is_empty(),
        "results only in PostgreSQL: {on_redis:?}"
    );
    Ok(())
}

/// `(task id, state, worker)` of every row of `db`.
fn rows(pg: &PgServer, db: &str) -> Result<Vec<(String, String, String)>> {
    let out = pg
        .psql(
            db,
            "SELECT task_id, state, coalesce(worker, '') FROM taskstack_results",
        )
        .map_err(anyhow::Error::msg)?;
    out.lines()
        .filter(|l| !l.is_empty())
        .map(|l| {
            let mut f = l.splitn(3, '|').map(str::to_owned);
            match (f.next(), f.next(), f.next()) {
                (Some(id), Some(state), Some(worker)) => Ok((id, state, worker)),
                _ => anyhow::bail!("unexpected psql line {l:?}"),
            }
        })
        .collect()
}

fn worker_id(w: &WorkerProcess) -> Result<String> {
    let v: Value = serde_json::from_slice(&std::fs::read(&w.state_file)?)?;
    Ok(v["id"].as_str().context("id")?.to_owned())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn worker_sigkilled_mid_batch_leaves_exactly_one_committed_result_per_task() -> Result<()> {
    const N: usize = 2000;
    let redis = RedisServer::start()?;
    let pg = PgServer::start();
    let db = pg.create_database();
    let ns = namespace("pg-sigkill");
    let env = pg_env(&pg, &db);
    let mut env = refs(&env);
    env.extend([
        ("TASKSTACK_CONCURRENCY", "20"),
        ("TASKSTACK_PREFETCH", "300"),
        ("TASKSTACK_LEASE", "2s"),
    ]);
    let a = WorkerProcess::spawn(&redis.url(), &ns, &env)?;
    let b = WorkerProcess::spawn(&redis.url(), &ns, &env)?;
    a.wait_log("worker ready", Duration::from_secs(30))?;
    b.wait_log("worker ready", Duration::from_secs(30))?;
    let (a_id, b_id) = (worker_id(&a)?, worker_id(&b)?);
    let producer = producer(&redis, &ns, &pg, &db)?;
    let ids = send_sleeps(&producer, N, 0.05).await?;

    // Kill A while it holds messages (running, or settling a batch) and
    // after it has committed results of its own.
    let inflight = format!("{ns}:held:{a_id}");
    let held = || -> Option<i64> {
        redis::cmd("HLEN")
            .arg(&inflight)
            .query(&mut redis.conn().ok()?)
            .ok()
    };
    wait_until_sync(
        "worker A to hold messages and to have committed 100 results",
        Duration::from_secs(30),
        || {
            let a_done = rows(&pg, &db)
                .ok()?
                .iter()
                .filter(|(_, s, w)| s == "SUCCESS" && *w == a_id)
                .count();
            (held()? > 0 && a_done >= 100).then_some(())
        },
    )?;
    let held_at_kill = held().unwrap_or(0);
    a.signal(Signal::SIGKILL)?;
    anyhow::ensure!(
        held_at_kill > 0,
        "A held nothing when killed: the test proved nothing"
    );

    wait_until(
        "every task to have a SUCCESS row after the SIGKILL",
        Duration::from_secs(90),
        || async { Ok((count(&pg, &db, "SUCCESS")? == N).then_some(())) },
    )
    .await
    .with_context(|| b.log())?;
    let rows = rows(&pg, &db)?;
    let sent: HashSet<&str> = ids.iter().map(String::as_str).collect();
    let stored: HashSet<&str> = rows.iter().map(|r| r.0.as_str()).collect();
    assert_eq!(rows.len(), N, "one row per task, no other rows");
    assert_eq!(stored, sent, "every task sent has its row, none missing");
    assert!(rows.iter().all(|r| r.1 == "SUCCESS"), "all SUCCESS");
    let by_b = rows.iter().filter(|r| r.2 == b_id).count();
    let by_a = rows.iter().filter(|r| r.2 == a_id).count();
    assert_eq!(by_a + by_b, N, "each row written by A or B");
    assert!(by_b > 0 && by_a > 0, "both workers committed results");
    // B took over A's holds after A's lease (2 s), and nothing is left.
    b.wait_log(
        "restored messages held by workers whose lease expired",
        Duration::from_secs(30),
    )?;
    let mut c = redis.conn()?;
    let left: bool = redis::cmd("EXISTS").arg(&inflight).query(&mut c)?;
    assert!(!left, "A's holds were restored");
    let ready: usize = redis::cmd("LLEN").arg("celery").query(&mut c)?;
    assert_eq!(ready, 0, "every message acknowledged");
    let on_redis: Vec<String> = redis::cmd("KEYS").arg("celery-task-meta-*").query(&mut c)?;
    assert!(on_redis.is_empty(), "no result on Redis: {on_redis:?}");
    let marks: usize = redis::cmd("HLEN")
        .arg(format!("{ns}:running:{b_id}"))
        .query(&mut c)?;
    assert_eq!(marks, 0, "B's start marks went with its acknowledgements");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_row_keeps_the_tasks_args_and_kwargs_up_to_the_bound() -> Result<()> {
    let redis = RedisServer::start()?;
    let pg = PgServer::start();
    let db = pg.create_database();
    let ns = namespace("pg-args");
    let env = pg_env(&pg, &db);
    let worker = WorkerProcess::spawn(&redis.url(), &ns, &refs(&env))?;
    worker.wait_log("worker ready", Duration::from_secs(30))?;
    let producer = producer(&redis, &ns, &pg, &db)?;
    let task = |args: Vec<Value>, kwargs: Value| TaskRequest {
        name: "taskstack.echo".into(),
        args,
        kwargs: kwargs.as_object().cloned().unwrap_or_default(),
        options: SendOptions::default(),
    };
    let big = "x".repeat(taskstack::proto::ARGS_BOUND);
    let small = producer
        .send(&task(vec![json!(1), json!("two")], json!({"k": [3]})))
        .await?;
    let large = producer
        .send(&task(vec![json!(big)], json!({"k": "small"})))
        .await?;
    for id in [&small, &large] {
        let r = producer.wait(id, Duration::from_secs(30)).await?;
        assert_eq!(r.status, taskstack::proto::TaskState::Success, "{r:?}");
    }
    let row = |id: &str| -> Result<String> {
        let out = pg
            .psql(
                &db,
                &format!(
                    "SELECT coalesce(args::text, 'NULL'), coalesce(kwargs::text, 'NULL') \
                     FROM taskstack_results WHERE task_id = '{id}'"
                ),
            )
            .map_err(anyhow::Error::msg)?;
        Ok(out.trim().to_owned())
    };
    assert_eq!(row(&small)?, r#"[1, "two"]|{"k": [3]}"#);
    assert_eq!(
        row(&large)?,
        r#"NULL|{"k": "small"}"#,
        "args over 4 KiB are left out, kwargs kept"
    );
    // Reads give them back in Celery's extended record.
    let r = producer.result(&small).await?.context("result")?;
    assert_eq!(
        (r.args, r.kwargs),
        (Some(json!([1, "two"])), Some(json!({"k": [3]})))
    );
    Ok(())
}
