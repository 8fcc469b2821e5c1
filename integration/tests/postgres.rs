//! The PostgreSQL result store with real processes: `taskstack-worker` and
//! `taskstack-web` on a private `redis-server` and a private `postgres`
//! (Debian's package; its own database per test). Results read through the
//! web API; start-up refusals; PostgreSQL restarted under load.
//!
//! Needs `cargo build -p taskstack-worker -p taskstack-web` first.

use anyhow::Result;
use serde_json::{Value, json};
use std::sync::Arc;
use std::time::Duration;
use taskstack::backend::{Backend, PostgresBackend};
use taskstack::broker::{Broker, RedisPool};
use taskstack::config::{PgTarget, RedisTarget, Secret};
use taskstack::proto::Keys;
use taskstack::{Producer, SendOptions, TaskRequest};
use taskstack_integration::{
    PG_PASSWORD, PgServer, RedisServer, WebProcess, WorkerProcess, namespace, run_to_exit,
    wait_until,
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

async fn wait_state(web: &WebProcess, id: &str, state: &str) -> Result<Value> {
    let path = format!("/api/v1/tasks/{id}");
    wait_until(
        &format!("task {id} to be {state}"),
        Duration::from_secs(30),
        || async {
            let (s, v) = web.call("GET", &path, None).await?;
            Ok((s == 200 && v["state"] == state).then_some(v))
        },
    )
    .await
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

    let (s, v) = web
        .call(
            "POST",
            "/api/v1/tasks",
            Some(&json!({"task": "taskstack.add", "args": [40, 2]})),
        )
        .await?;
    assert_eq!(s, 202, "{v}");
    let id = v["id"].as_str().unwrap_or_default().to_owned();
    let done = wait_state(&web, &id, "SUCCESS").await?;
    assert_eq!(done["result"], 42, "{done}");
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
    let failed = wait_state(&web, v["id"].as_str().unwrap_or_default(), "FAILURE").await?;
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
    wait_state(&web, &later, "REVOKED").await?;
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
    let reqs: Vec<TaskRequest> = (0..N)
        .map(|i| TaskRequest {
            name: "taskstack.sleep".into(),
            args: vec![json!(0.02), json!(i)],
            kwargs: serde_json::Map::new(),
            options: SendOptions::default(),
        })
        .collect();
    let mut ids = Vec::new();
    for chunk in reqs.chunks(500) {
        ids.extend(producer.send_many(chunk).await?);
    }
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
