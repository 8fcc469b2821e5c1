//! Real `taskstack-web` and `taskstack-worker` processes against a real
//! Redis: the HTTP API end to end, `/health` following the worker's life,
//! the `healthcheck` subcommand, start-up refusals and SIGTERM.

use anyhow::Result;
use nix::sys::signal::Signal;
use serde_json::{Value, json};
use std::time::Duration;
use taskstack_integration::{
    RedisServer, WebProcess, WorkerProcess, namespace, run_to_exit, wait_until,
};

/// Short leases, so a killed worker is noticed within seconds.
const FAST_LEASE: (&str, &str) = ("TASKSTACK_LEASE", "2s");

async fn health(web: &WebProcess) -> Result<(u16, Value)> {
    web.call("GET", "/health", None).await
}

#[tokio::test(flavor = "multi_thread")]
async fn tasks_flow_through_the_http_api_and_health_follows_the_worker() -> Result<()> {
    let redis = RedisServer::start()?;
    let ns = namespace("web-e2e");
    let web = WebProcess::spawn(&redis.url(), &ns, &[FAST_LEASE]).await?;
    let (s, v) = health(&web).await?;
    assert_eq!((s, v["failed"].clone()), (503, json!(["workers"])), "{v}");
    let hc = run_to_exit(healthcheck_cmd(&redis, &ns, &web)?, Duration::from_secs(10))?;
    assert_eq!(hc.status.code(), Some(1), "healthcheck without a worker");
    assert!(String::from_utf8_lossy(&hc.stderr).contains("503"));

    let mut worker = WorkerProcess::spawn(&redis.url(), &ns, &[FAST_LEASE])?;
    wait_until("/health to turn 200", Duration::from_secs(20), || async {
        Ok((health(&web).await?.0 == 200).then_some(()))
    })
    .await?;
    let hc = run_to_exit(healthcheck_cmd(&redis, &ns, &web)?, Duration::from_secs(10))?;
    assert_eq!(
        hc.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&hc.stderr)
    );

    // Enqueue and poll to SUCCESS.
    let done = web.run_add(40, 2).await?;
    assert_eq!(done["result"], 42);

    // Revoke one that waits for its countdown: it never runs.
    let (_, v) = web
        .call(
            "POST",
            "/api/v1/tasks",
            Some(&json!({"task": "taskstack.add", "args": [1, 1], "countdown": 1})),
        )
        .await?;
    let id = v["id"].as_str().unwrap_or_default().to_owned();
    let (s, v) = web
        .call("DELETE", &format!("/api/v1/tasks/{id}"), None)
        .await?;
    assert_eq!((s, v["revoked_now"].clone()), (200, json!(true)), "{v}");
    wait_until(
        "the revoked task to leave the queue",
        Duration::from_secs(20),
        || async {
            let (_, v) = web.call("GET", "/api/v1/queues", None).await?;
            let q = &v["queues"][0];
            Ok((q["delayed"] == 0 && q["ready"] == 0 && q["in_flight"] == 0).then_some(()))
        },
    )
    .await?;
    assert_eq!(
        web.wait_state(&id, "REVOKED").await?["error"]["type"],
        "TaskRevokedError"
    );
    worker.wait_log("revoked before it started", Duration::from_secs(10))?;

    // A message the worker cannot decode is dead-lettered; inspect and discard it.
    let mut c = redis.conn()?;
    redis::cmd("LPUSH")
        .arg("celery")
        .arg("not a celery message")
        .query::<()>(&mut c)?;
    let dead = wait_until("a dead letter", Duration::from_secs(20), || async {
        let (_, v) = web.call("GET", "/api/v1/dead-letters/celery", None).await?;
        Ok((v["total"] == 1).then_some(v))
    })
    .await?;
    assert_eq!(dead["dead_letters"][0]["payload"], "not a celery message");
    let (s, v) = web
        .call(
            "POST",
            "/api/v1/dead-letters/celery/requeue",
            Some(&json!({"oldest": 1})),
        )
        .await?;
    assert_eq!((s, v["count"].clone()), (200, json!(1)), "{v}");
    // Requeued as it was, it is dead-lettered again; then discarded for good.
    wait_until(
        "the requeued message to be dead again",
        Duration::from_secs(20),
        || async {
            let (_, v) = web.call("GET", "/api/v1/queues", None).await?;
            let q = &v["queues"][0];
            Ok((q["dead_lettered"] == 1 && q["ready"] == 0 && q["in_flight"] == 0).then_some(()))
        },
    )
    .await?;
    let (_, v) = web
        .call(
            "POST",
            "/api/v1/dead-letters/celery/discard",
            Some(&json!({"oldest": 10})),
        )
        .await?;
    assert_eq!(v["count"], 1);

    // The only worker dies: /health says so once its lease runs out, and
    // recovers when another starts.
    worker.kill()?;
    let v = wait_until("/health to turn 503", Duration::from_secs(20), || async {
        let (s, v) = health(&web).await?;
        Ok((s == 503).then_some(v))
    })
    .await?;
    assert_eq!(v["checks"]["workers"]["missing"], json!(["celery"]));
    let _worker = WorkerProcess::spawn(&redis.url(), &ns, &[FAST_LEASE])?;
    wait_until(
        "/health to turn 200 again",
        Duration::from_secs(20),
        || async { Ok((health(&web).await?.0 == 200).then_some(())) },
    )
    .await?;
    Ok(())
}

fn healthcheck_cmd(
    redis: &RedisServer,
    ns: &str,
    web: &WebProcess,
) -> Result<std::process::Command> {
    let mut cmd = WebProcess::command(&redis.url(), ns, &web.addr)?;
    cmd.arg("healthcheck");
    Ok(cmd)
}

#[tokio::test(flavor = "multi_thread")]
async fn web_refuses_to_start_without_a_token_and_stops_cleanly_on_sigterm() -> Result<()> {
    let redis = RedisServer::start()?;
    let ns = namespace("web-start");
    let addr = format!("127.0.0.1:{}", taskstack_integration::free_port()?);
    let mut cmd = WebProcess::command(&redis.url(), &ns, &addr)?;
    cmd.env_remove("TASKSTACK_API_TOKENS");
    let out = run_to_exit(cmd, Duration::from_secs(10))?;
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("TASKSTACK_API_TOKENS"), "{err}");

    let mut cmd = WebProcess::command(&redis.url(), &ns, &addr)?;
    cmd.env("TASKSTACK_API_TOKENS", "short");
    let out = run_to_exit(cmd, Duration::from_secs(10))?;
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("at least 16 characters"));

    // `web_threads = auto` reads tokio's variable: a bad one is named.
    for (key, value, named) in [
        ("TOKIO_WORKER_THREADS", "none", "TOKIO_WORKER_THREADS"),
        ("TASKSTACK_WEB_THREADS", "0", "web_threads"),
    ] {
        let mut cmd = WebProcess::command(&redis.url(), &ns, &addr)?;
        cmd.env(key, value);
        let out = run_to_exit(cmd, Duration::from_secs(10))?;
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{key}={value}: {err}");
        assert!(err.contains("web_threads") && err.contains(named), "{err}");
    }

    // Served by three threads: each request answered, and SIGTERM stops
    // them all.
    let mut web = WebProcess::spawn(&redis.url(), &ns, &[("TASKSTACK_WEB_THREADS", "3")]).await?;
    assert!(web.log().contains(r#""threads":3"#), "{}", web.log());
    for _ in 0..6 {
        assert_eq!(health(&web).await?.0, 503, "no worker yet");
    }
    web.signal(Signal::SIGTERM)?;
    let status = web.wait_exit(Duration::from_secs(10))?;
    assert_eq!(status.code(), Some(0), "{}", web.log());
    assert!(web.log().contains("taskstack-web stopped"));
    Ok(())
}
