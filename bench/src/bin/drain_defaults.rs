//! `drain_defaults`: one `taskstack-worker` with default settings and a
//! Python Celery worker (`-P prefork -c 2`, otherwise Celery's defaults)
//! each drain the same prefilled queue of Celery-protocol
//! `taskstack.echo` messages on the same throwaway `redis-server`, one
//! after the other, in the same run. For each drain it prints tasks per
//! second and Redis commands per task; then the medians and the ratio. It
//! asserts nothing about the figures. See `bench/README.md`.
//!
//! ```sh
//! cargo build --release -p taskstack-worker -p taskstack-bench
//! target/release/drain_defaults --runs 3
//! ```
//!
//! How one drain is measured: the worker starts on an empty queue and
//! logs that it is ready; the messages wait in another list, and one
//! `RENAME` makes them the `celery` queue (the clock starts there). The
//! bench then polls `DBSIZE` every 2 ms (one cheap command: no key scans)
//! until it reaches the number of tasks, and then confirms with `MGET`
//! that every task's result exists and is SUCCESS (the clock stops at the
//! first confirmation that finds them all). Redis's `INFO commandstats`
//! is reset at the `RENAME`; the bench's own `RENAME`, `DBSIZE` and `MGET`
//! calls are taken off before dividing by the number of tasks.

#[allow(dead_code, reason = "shared with the canvas bench")]
#[path = "../canvas_procs.rs"]
mod canvas_procs;
#[path = "../prefilled.rs"]
mod prefilled;
#[allow(
    dead_code,
    reason = "shared with the main bench; this binary uses part of it"
)]
#[path = "../redis_info.rs"]
mod redis_info;
#[allow(
    dead_code,
    reason = "shared with the main bench; this binary uses part of it"
)]
#[path = "../stats.rs"]
mod stats;

use anyhow::{Context as _, Result, ensure};
use canvas_procs::{CeleryPool, Service};
use clap::Parser;
use prefilled::{Drain, drain, print_drain};
use std::path::PathBuf;
use std::time::Duration;
use taskstack_integration::RedisServer;

#[derive(Debug, Parser)]
#[command(
    about = "Drain rate and Redis commands per task at default settings: taskstack-worker against Celery prefork -c 2 on the same prefilled queue"
)]
struct Cli {
    /// Messages prefilled for each drain.
    #[arg(long, default_value_t = 20_000)]
    tasks: usize,
    /// Messages for Celery's drains (default: --tasks).
    #[arg(long)]
    celery_tasks: Option<usize>,
    /// Repetitions; the summary shows medians.
    #[arg(long, default_value_t = 3)]
    runs: usize,
    /// A setting for the taskstack worker, `NAME=VALUE` (e.g.
    /// `CONCURRENCY=64`, becoming `TASKSTACK_CONCURRENCY`); repeatable.
    /// None given: the defaults, which is the point of this benchmark.
    #[arg(long = "set", value_name = "NAME=VALUE")]
    settings: Vec<String>,
    /// The taskstack worker reaches Redis through the server's Unix socket
    /// (`unix://...`) instead of loopback TCP.
    #[arg(long)]
    socket: bool,
    /// The Celery worker's --concurrency (prefork processes).
    #[arg(long, default_value_t = 2)]
    celery_concurrency: usize,
    /// Only taskstack.
    #[arg(long)]
    no_celery: bool,
    /// The worker binary (default: `taskstack-worker` beside this one).
    #[arg(long, value_name = "PATH")]
    worker_bin: Option<PathBuf>,
    /// Give up on a drain after this many seconds.
    #[arg(long, default_value_t = 600)]
    timeout: u64,
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<()> {
    let cli = Cli::parse();
    ensure!(cli.runs > 0, "--runs must be at least 1");
    ensure!(
        cli.tasks > 0 && cli.celery_tasks != Some(0),
        "--tasks and --celery-tasks must be at least 1"
    );
    let env = canvas_procs::settings_env(&cli.settings)?;
    let env: Vec<(&str, String)> = env.iter().map(|(k, v)| (k.as_str(), v.clone())).collect();
    let worker_bin = canvas_procs::worker_bin(cli.worker_bin.as_deref())?;
    let python = if cli.no_celery {
        None
    } else {
        Some(canvas_procs::celery_python()?)
    };
    if cfg!(debug_assertions) {
        eprintln!("warning: drain_defaults is a debug build (the worker binary is what counts)");
    }

    let redis = RedisServer::start()?;
    let url = redis.url();
    let mut con = redis_info::connect(&url).await?;
    let version = redis_info::server_version(&mut con).await?;
    let cpus = std::thread::available_parallelism().map_or(0, std::num::NonZero::get);
    println!("drain at default settings");
    println!(
        "  redis-server {} on 127.0.0.1:{} (no persistence), {cpus} CPUs",
        version,
        redis.port()
    );
    let settings = if env.is_empty() {
        "defaults".to_owned()
    } else {
        env.iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect::<Vec<_>>()
            .join(" ")
    };
    let worker_url = if cli.socket {
        redis.socket_url()
    } else {
        url.clone()
    };
    println!(
        "  taskstack: {} ({settings}), Redis at {worker_url}",
        worker_bin.display()
    );
    if let Some(p) = &python {
        println!(
            "  celery: {} -m celery worker {} (otherwise defaults; log level WARNING)",
            p.display(),
            CeleryPool::Prefork.args(cli.celery_concurrency).join(" ")
        );
    }
    let celery_tasks = cli.celery_tasks.unwrap_or(cli.tasks);
    println!(
        "  {} taskstack.echo messages prefilled per drain ({} for Celery), {} run(s)",
        cli.tasks, celery_tasks, cli.runs
    );
    println!();

    let mut drains = Vec::new();
    for run in 1..=cli.runs {
        let timeout = Duration::from_secs(cli.timeout);
        let d = drain(&mut con, "taskstack", cli.tasks, run, timeout, || {
            Service::taskstack(&worker_bin, &worker_url, &env)
        })
        .await
        .with_context(|| format!("run {run}, taskstack"))?;
        print_drain(run, &d);
        drains.push(d);
        if let Some(python) = &python {
            let d = drain(&mut con, "celery", celery_tasks, run, timeout, || {
                Service::celery(
                    python,
                    &url,
                    "drain_tasks",
                    CeleryPool::Prefork,
                    cli.celery_concurrency,
                )
            })
            .await
            .with_context(|| format!("run {run}, celery"))?;
            print_drain(run, &d);
            drains.push(d);
        }
    }
    print_summary(&drains);
    Ok(())
}

fn print_summary(drains: &[Drain]) {
    println!();
    println!("| system | tasks/s (median) | runs | Redis commands per task (median) |");
    println!("| --- | --- | --- | --- |");
    let mut medians = Vec::new();
    for system in ["taskstack", "celery"] {
        let mine: Vec<&Drain> = drains.iter().filter(|d| d.system == system).collect();
        if mine.is_empty() {
            continue;
        }
        let rate: Vec<Option<f64>> = mine.iter().map(|d| Some(d.tasks_per_s())).collect();
        let cmds: Vec<Option<f64>> = mine.iter().map(|d| Some(d.cmds_per_task())).collect();
        let rate_m = stats::median(&rate).unwrap_or(f64::NAN);
        let cmds_m = stats::median(&cmds).unwrap_or(f64::NAN);
        let runs: Vec<String> = mine
            .iter()
            .map(|d| format!("{:.0}", d.tasks_per_s()))
            .collect();
        println!(
            "| {} | {rate_m:.0} | {} | {cmds_m:.2} |",
            system,
            runs.join(" / ")
        );
        medians.push((system, rate_m));
    }
    if let [("taskstack", t), ("celery", c)] = medians.as_slice() {
        println!();
        println!("taskstack / celery: {:.1}x", t / c);
    }
}
