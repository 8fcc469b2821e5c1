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

use anyhow::{Context as _, Result, bail, ensure};
use canvas_procs::{CeleryPool, Service};
use clap::Parser;
use redis_info::{commandstats, info_field, redis_cpu_s};
use serde_json::json;
use std::path::PathBuf;
use std::time::{Duration, Instant};
use taskstack::proto::envelope::{MessageSpec, encode};
use taskstack::proto::keys::result_key;
use taskstack_integration::RedisServer;

/// Where the messages wait until the drain starts.
const PREFILL: &str = "bench.prefill";
/// The queue both workers consume (both defaults).
const QUEUE: &str = "celery";
/// Keys per `MGET` when confirming results.
const CHUNK: usize = 1_000;

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

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum System {
    Taskstack,
    Celery,
}

impl System {
    fn label(self) -> &'static str {
        match self {
            Self::Taskstack => "taskstack",
            Self::Celery => "celery",
        }
    }
}

/// One drain's figures.
#[derive(Debug)]
struct Drain {
    system: System,
    tasks: usize,
    seconds: f64,
    /// Every command Redis ran over the drain (scripts' commands included)
    /// but the bench's own.
    commands: u64,
    redis_cpu_s: Option<f64>,
    /// The busiest commands, for the per-run line.
    top: Vec<(String, u64)>,
}

impl Drain {
    fn tasks_per_s(&self) -> f64 {
        self.tasks as f64 / self.seconds
    }
    fn cmds_per_task(&self) -> f64 {
        self.commands as f64 / self.tasks as f64
    }
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<()> {
    let cli = Cli::parse();
    ensure!(cli.runs > 0, "--runs must be at least 1");
    ensure!(
        cli.tasks > 0 && cli.celery_tasks != Some(0),
        "--tasks and --celery-tasks must be at least 1"
    );
    let mut env = Vec::new();
    for s in &cli.settings {
        let Some((name, value)) = s.split_once('=') else {
            bail!("--set {s:?}: expected NAME=VALUE, e.g. CONCURRENCY=64");
        };
        let name = name.trim().to_ascii_uppercase();
        let name = name.strip_prefix("TASKSTACK_").unwrap_or(&name);
        ensure!(!name.is_empty(), "--set {s:?}: no name");
        env.push((format!("TASKSTACK_{name}"), value.to_owned()));
    }
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
    let mut con = redis::Client::open(url.as_str())?
        .get_multiplexed_async_connection()
        .await
        .context("cannot connect to the benchmark redis-server")?;
    let info: String = redis::cmd("INFO")
        .arg("server")
        .query_async(&mut con)
        .await?;
    let cpus = std::thread::available_parallelism().map_or(0, std::num::NonZero::get);
    println!("drain at default settings");
    println!(
        "  redis-server {} on 127.0.0.1:{} (no persistence), {cpus} CPUs",
        info_field(&info, "redis_version").unwrap_or("?"),
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
    println!("  taskstack: {} ({settings})", worker_bin.display());
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
        let d = drain(&cli, System::Taskstack, &mut con, run, || {
            Service::taskstack(&worker_bin, &url, &env)
        })
        .await
        .with_context(|| format!("run {run}, taskstack"))?;
        print_drain(run, &d);
        drains.push(d);
        if let Some(python) = &python {
            let d = drain(&cli, System::Celery, &mut con, run, || {
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

/// The prefilled messages: `taskstack.echo` with one argument each, as
/// Celery's own client writes them (protocol 2, JSON).
fn messages(run: usize, n: usize) -> Vec<(String, String)> {
    (0..n)
        .map(|i| {
            let id = format!("drain-{run}-{i:07}");
            let args = [json!(i)];
            let spec = MessageSpec {
                id: &id,
                task: "taskstack.echo",
                args: &args,
                queue: QUEUE,
                origin: "bench@drain",
                ..MessageSpec::default()
            };
            let payload = encode(&spec);
            (id, payload)
        })
        .collect()
}

async fn drain(
    cli: &Cli,
    system: System,
    con: &mut redis::aio::MultiplexedConnection,
    run: usize,
    start: impl FnOnce() -> Result<Service>,
) -> Result<Drain> {
    let n = match system {
        System::Taskstack => cli.tasks,
        System::Celery => cli.celery_tasks.unwrap_or(cli.tasks),
    };
    let _: () = redis::cmd("FLUSHALL").query_async(con).await?;
    let worker = start()?;
    let msgs = messages(run, n);
    for chunk in msgs.chunks(CHUNK) {
        let payloads: Vec<&str> = chunk.iter().map(|(_, p)| p.as_str()).collect();
        let _: () = redis::cmd("LPUSH")
            .arg(PREFILL)
            .arg(&payloads)
            .query_async(con)
            .await?;
    }
    let keys: Vec<String> = msgs.iter().map(|(id, _)| result_key(id)).collect();
    drop(msgs);

    let _: () = redis::cmd("CONFIG")
        .arg("RESETSTAT")
        .query_async(con)
        .await?;
    let cpu0 = redis_cpu_s(con).await?;
    let t0 = Instant::now();
    let _: () = redis::cmd("RENAME")
        .arg(PREFILL)
        .arg(QUEUE)
        .query_async(con)
        .await?;
    let (mut dbsize_calls, mut mget_calls) = (0u64, 0u64);
    let deadline = t0 + Duration::from_secs(cli.timeout);
    let mut pending: Vec<&str> = keys.iter().map(String::as_str).collect();
    let done = loop {
        let size: u64 = redis::cmd("DBSIZE").query_async(con).await?;
        dbsize_calls += 1;
        // Besides the results, only the queue and a few bookkeeping keys
        // of the worker exist: from N keys on, check the results.
        if size >= n as u64 {
            let mut still = Vec::new();
            for chunk in pending.chunks(CHUNK) {
                let found: Vec<Option<String>> =
                    redis::cmd("MGET").arg(chunk).query_async(con).await?;
                mget_calls += 1;
                for (k, v) in chunk.iter().zip(found) {
                    match v {
                        None => still.push(*k),
                        Some(v) if !v.contains("\"SUCCESS\"") => {
                            bail!("{k} is not SUCCESS: {v}")
                        }
                        Some(_) => {}
                    }
                }
            }
            pending = still;
            if pending.is_empty() {
                break Instant::now();
            }
        }
        worker.check_running()?;
        if Instant::now() > deadline {
            bail!(
                "{} of {n} results missing after {:?}; {} log tail:\n{}",
                pending.len(),
                cli.timeout,
                worker.name(),
                worker.log_tail()
            );
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    };
    let seconds = done.duration_since(t0).as_secs_f64();
    let cpu1 = redis_cpu_s(con).await?;
    let mut stats = commandstats(con).await?;
    for c in &mut stats {
        let own = match c.name.as_str() {
            "dbsize" => dbsize_calls,
            "mget" => mget_calls,
            "rename" => 1,
            _ => 0,
        };
        c.calls = c.calls.saturating_sub(own);
    }
    stats.retain(|c| c.calls > 0);
    stats.sort_by_key(|c| std::cmp::Reverse(c.calls));
    worker.stop()?;
    Ok(Drain {
        system,
        tasks: n,
        seconds,
        commands: stats.iter().map(|c| c.calls).sum(),
        redis_cpu_s: cpu0.zip(cpu1).map(|(a, b)| b - a),
        top: stats
            .iter()
            .take(8)
            .map(|c| (c.name.clone(), c.calls))
            .collect(),
    })
}

fn print_drain(run: usize, d: &Drain) {
    let top: Vec<String> = d
        .top
        .iter()
        .map(|(name, calls)| format!("{name} {:.2}", *calls as f64 / d.tasks as f64))
        .collect();
    println!(
        "run {run} {:<9} {:>7} tasks in {:>7.3} s: {:>9.0} tasks/s, {:.2} Redis commands per task (redis CPU {}); per task: {}",
        d.system.label(),
        d.tasks,
        d.seconds,
        d.tasks_per_s(),
        d.cmds_per_task(),
        d.redis_cpu_s
            .map_or_else(|| "?".to_owned(), |c| format!("{c:.2} s")),
        top.join(", ")
    );
}

fn print_summary(drains: &[Drain]) {
    println!();
    println!("| system | tasks/s (median) | runs | Redis commands per task (median) |");
    println!("| --- | --- | --- | --- |");
    let mut medians = Vec::new();
    for system in [System::Taskstack, System::Celery] {
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
            system.label(),
            runs.join(" / ")
        );
        medians.push((system, rate_m));
    }
    if let [(System::Taskstack, t), (System::Celery, c)] = medians.as_slice() {
        println!();
        println!("taskstack / celery: {:.1}x", t / c);
    }
}
