//! The quick start: starts a Redis server and a `taskstack-worker` process
//! on this machine, sends tasks through the library exactly as a web app
//! would, prints their results, then stops the worker with SIGTERM.
//!
//! ```sh
//! cargo run -p taskstack-integration --example quickstart
//! ```

use serde_json::json;
use std::time::{Duration, Instant};
use taskstack::{SendOptions, TaskRequest};
use taskstack_integration::{RedisServer, WorkerProcess, namespace, producer};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let redis = RedisServer::start()?;
    println!("redis-server    {}", redis.url());
    let ns = namespace("quickstart");
    let mut worker = WorkerProcess::spawn(&redis.url(), &ns, &[("TASKSTACK_CONCURRENCY", "8")])?;
    worker.wait_log("worker ready", Duration::from_secs(60))?;
    println!("taskstack-worker pid {} ready", worker.pid());

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

    worker.signal(nix::sys::signal::Signal::SIGTERM)?;
    let status = worker.wait_exit(Duration::from_secs(30))?;
    println!("worker stopped   {status}");
    Ok(())
}
