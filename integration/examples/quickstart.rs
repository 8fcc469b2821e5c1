//! The quick start: starts a Redis server, a `taskstack-worker` and a
//! `taskstack-web` process on this machine, sends tasks through the HTTP API
//! and through the library, prints their results, then stops the services
//! with SIGTERM.
//!
//! ```sh
//! cargo run -p taskstack-integration --example quickstart
//! ```

use serde_json::json;
use std::time::{Duration, Instant};
use taskstack::{SendOptions, TaskRequest};
use taskstack_integration::{RedisServer, WebProcess, WorkerProcess, namespace, producer};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let redis = RedisServer::start()?;
    println!("redis-server    {}", redis.url());
    let ns = namespace("quickstart");
    let mut worker = WorkerProcess::spawn(&redis.url(), &ns, &[("TASKSTACK_CONCURRENCY", "8")])?;
    worker.wait_log("worker ready", Duration::from_secs(60))?;
    println!("taskstack-worker pid {} ready", worker.pid());
    let mut web = WebProcess::spawn(&redis.url(), &ns, &[]).await?;
    println!("taskstack-web   http://{} (pid {})", web.addr, web.pid());

    // Through the HTTP API, as any client would.
    let t = Instant::now();
    let (status, sent) = web
        .call(
            "POST",
            "/api/v1/tasks",
            Some(&json!({"task": "taskstack.add", "args": [20, 22]})),
        )
        .await?;
    println!("POST /api/v1/tasks  {status} {sent}");
    let path = format!("/api/v1/tasks/{}", sent["id"].as_str().unwrap_or_default());
    let done =
        taskstack_integration::wait_until("the task's result", Duration::from_secs(30), || async {
            let (_, v) = web.call("GET", &path, None).await?;
            Ok((v["state"] == "SUCCESS" || v["state"] == "FAILURE").then_some(v))
        })
        .await?;
    println!(
        "GET {path}  {} result {} after {:?}",
        done["state"],
        done["result"],
        t.elapsed()
    );
    let (status, health) = web.call("GET", "/health", None).await?;
    println!("GET /health  {status} {}", health["status"]);

    // Through the library, as a Rust service would.

    let p = producer(&redis.url(), &ns)?;
    let t = Instant::now();
    let add = p
        .send_task("taskstack.add", vec![json!(2), json!(3)])
        .await?;
    let echo = p.send_task("taskstack.echo", vec![json!("hello")]).await?;
    let later = p
        .send(&TaskRequest {
            name: "taskstack.add".into(),
            args: vec![json!(40), json!(2)],
            kwargs: serde_json::Map::new(),
            options: SendOptions {
                countdown: Some(Duration::from_secs(1)),
                ..Default::default()
            },
        })
        .await?;
    let fail = p
        .send_task("taskstack.fail", vec![json!("on purpose")])
        .await?;
    for (what, id) in [
        ("add(2, 3)", &add),
        ("echo(\"hello\")", &echo),
        ("add(40, 2) in 1s", &later),
        ("fail(\"on purpose\")", &fail),
    ] {
        let r = p.wait(id, Duration::from_secs(30)).await?;
        println!(
            "{what:<20} {:?} {} after {:?}",
            r.status,
            r.result,
            t.elapsed()
        );
    }

    let batch: Vec<TaskRequest> = (0..1000)
        .map(|i| TaskRequest {
            name: "taskstack.add".into(),
            args: vec![json!(i), json!(1)],
            kwargs: serde_json::Map::new(),
            options: SendOptions::default(),
        })
        .collect();
    let t = Instant::now();
    let ids = p.send_many(&batch).await?;
    let last = p
        .wait(
            ids.last().map_or("", String::as_str),
            Duration::from_secs(60),
        )
        .await?;
    println!(
        "1000 x add        last result {} after {:?}",
        last.result,
        t.elapsed()
    );

    web.signal(nix::sys::signal::Signal::SIGTERM)?;
    web.wait_exit(Duration::from_secs(30))?;
    worker.signal(nix::sys::signal::Signal::SIGTERM)?;
    let status = worker.wait_exit(Duration::from_secs(30))?;
    println!("worker stopped   {status}");
    Ok(())
}
