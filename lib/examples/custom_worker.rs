//! A worker running your own tasks, configured like `taskstack-worker`
//! (`TASKSTACK_*` environment, `TASKSTACK_CONFIG` file).
//!
//! ```sh
//! TASKSTACK_BROKER_URL=redis://127.0.0.1:6379/0 cargo run -p taskstack --example custom_worker
//! ```

use serde_json::{Value, json};
use taskstack::worker::{Registry, TaskContext, TaskError, Worker, WorkerSettings};

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let config = taskstack::config::Config::load(&[])?;
    taskstack::telemetry::init(&config.log_level, config.log_format);

    let mut tasks = Registry::new();
    tasks.register("proj.greet", |ctx: TaskContext| async move {
        let name = ctx.args.first().and_then(Value::as_str).unwrap_or("world");
        Ok(json!(format!("hello, {name}")))
    });
    tasks.register("proj.fetch", |ctx: TaskContext| async move {
        // Ask for a retry with the registered backoff when a dependency is down.
        match ctx.kwargs.get("url").and_then(Value::as_str) {
            Some(url) if url.starts_with("https://") => Ok(json!({ "fetched": url })),
            Some(_) => Err(TaskError::retry("dependency unavailable")),
            None => Err(TaskError::fail("ValueError", "kwarg `url` is required")),
        }
    });

    let worker = Worker::new(
        taskstack::connect(&config)?,
        tasks,
        WorkerSettings::from_config(&config),
    );
    let stop = taskstack::shutdown::install()?;
    worker.run(stop.cancelled_owned()).await?;
    Ok(())
}
