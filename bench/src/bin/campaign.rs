//! `campaign`: the whole comparison in one command, side by side on one
//! throwaway `redis-server`: each run drains the same prefilled queue of
//! Celery-protocol `taskstack.echo` messages with a stock
//! `taskstack-worker` (defaults), with a tuned one (`--tuned` settings,
//! through the server's Unix socket unless `--tcp`) and
//! with Python Celery (`-P prefork -c 2`, otherwise its defaults), then
//! measures the server's ceiling with `redis-benchmark -P 16`, and the
//! enqueue-to-result latency of one task at a time on each taskstack worker
//! while it is otherwise idle (beside the server's own `PING` round trip).
//! It prints tables of medians with the ratios; it asserts nothing about
//! them. See `bench/README.md`.
//!
//! ```sh
//! cargo build --release -p taskstack-worker -p taskstack-bench
//! target/release/campaign --runs 3
//! ```

#[allow(dead_code, reason = "shared with the canvas and drain benches")]
#[path = "../canvas_procs.rs"]
mod canvas_procs;
#[path = "../latency.rs"]
mod latency;
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
use redis_info::redis_benchmark;
use stats::Latency;
use std::path::{Path, PathBuf};
use std::time::Duration;
use taskstack_integration::RedisServer;

const DEFAULTS: &str = "taskstack defaults";
const TUNED: &str = "taskstack tuned";
const CELERY: &str = "celery prefork -c 2";
/// `redis-benchmark`'s pipeline depth for the ceiling.
const PIPELINE: u32 = 16;
/// The task of the latency round trips (the prefilled messages' too).
const ECHO: &str = "taskstack.echo";
/// Unmeasured round trips before each latency sample.
const WARMUP: usize = 100;

#[derive(Debug, Parser)]
#[command(
    about = "One run, side by side: taskstack defaults, taskstack tuned, Celery prefork -c 2 and the redis-benchmark ceiling; medians and ratios"
)]
struct Cli {
    /// Messages per taskstack drain.
    #[arg(long, default_value_t = 50_000)]
    tasks: usize,
    /// Messages per Celery drain (fewer: Celery is slow).
    #[arg(long, default_value_t = 10_000)]
    celery_tasks: usize,
    /// Repetitions; the table shows medians.
    #[arg(long, default_value_t = 3)]
    runs: usize,
    /// A setting of the tuned taskstack worker, `NAME=VALUE` (becoming
    /// `TASKSTACK_NAME`); repeatable. None given: the default settings,
    /// which were the best measured in the sweep of 2026-12-06 (bench/HISTORY.md,
    /// "The tuned worker is the defaults on the Unix socket"); the tuned
    /// worker then differs from the defaults only by reaching Redis through
    /// the server's Unix socket (unless `--tcp`).
    #[arg(long = "tuned", value_name = "NAME=VALUE")]
    tuned: Vec<String>,
    /// The tuned worker, and the producer of its latency round trips, reach
    /// Redis through the server's Unix socket (`unix://...`), while the
    /// defaults stay on loopback TCP. This is the default; the flag is kept
    /// so that earlier commands run as written.
    #[arg(long, conflicts_with = "tcp")]
    socket: bool,
    /// The tuned worker reaches Redis over loopback TCP, as the defaults do,
    /// instead of through the Unix socket.
    #[arg(long)]
    tcp: bool,
    /// Measured round trips (one task at a time on an idle worker) per
    /// taskstack worker and run.
    #[arg(long, default_value_t = 1000)]
    latency_samples: usize,
    /// How each round trip's producer waits for the result.
    #[arg(long, value_enum, default_value_t = latency::Api::SendAndWait)]
    latency_api: latency::Api,
    /// Skip Celery (no Python with Celery at hand).
    #[arg(long)]
    no_celery: bool,
    /// The worker binary (default: `taskstack-worker` beside this one).
    #[arg(long, value_name = "PATH")]
    worker_bin: Option<PathBuf>,
    /// Give up on a drain after this many seconds.
    #[arg(long, default_value_t = 600)]
    timeout: u64,
}

/// One `redis-benchmark -P 16` run's requests per second, per test.
type Ceiling = Vec<(String, f64)>;

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<()> {
    let cli = Cli::parse();
    ensure!(cli.runs > 0, "--runs must be at least 1");
    ensure!(
        cli.tasks > 0 && cli.celery_tasks > 0 && cli.latency_samples > 0,
        "--tasks, --celery-tasks and --latency-samples must be at least 1"
    );
    let tuned = canvas_procs::settings_env(&cli.tuned)?;
    let tuned: Vec<(&str, String)> = tuned.iter().map(|(k, v)| (k.as_str(), v.clone())).collect();
    let worker_bin = canvas_procs::worker_bin(cli.worker_bin.as_deref())?;
    let python = if cli.no_celery {
        None
    } else {
        Some(canvas_procs::celery_python()?)
    };
    if cfg!(debug_assertions) {
        eprintln!("warning: campaign is a debug build (the worker binary is what counts)");
    }

    let redis = RedisServer::start()?;
    let url = redis.url();
    let mut con = redis_info::connect(&url).await?;
    let version = redis_info::server_version(&mut con).await?;
    let cpus = std::thread::available_parallelism().map_or(0, std::num::NonZero::get);
    let mut tuned_text: Vec<String> = tuned.iter().map(|(k, v)| format!("{k}={v}")).collect();
    if tuned_text.is_empty() {
        tuned_text.push("default settings".to_owned());
    }
    // `--socket` and `--tcp` exclude each other (clap refuses both).
    let tuned_url = if cli.socket || !cli.tcp {
        tuned_text.push("via the Unix socket".to_owned());
        redis.socket_url()
    } else {
        url.clone()
    };
    println!("campaign: taskstack against Celery and the Redis ceiling, side by side");
    println!(
        "  redis-server {} on 127.0.0.1:{} (no persistence), {cpus} CPUs; worker {}",
        version,
        redis.port(),
        worker_bin.display()
    );
    println!(
        "  {} messages per taskstack drain, {} per Celery drain; tuned: {}; {} run(s)",
        cli.tasks,
        cli.celery_tasks,
        tuned_text.join(" "),
        cli.runs
    );
    println!();

    let timeout = Duration::from_secs(cli.timeout);
    let (mut drains, mut ceilings, mut latencies) = (Vec::new(), Vec::new(), Vec::new());
    for run in 1..=cli.runs {
        let d = drain(&mut con, DEFAULTS, cli.tasks, run, timeout, || {
            Service::taskstack(&worker_bin, &url, &[])
        })
        .await
        .with_context(|| format!("run {run}, {DEFAULTS}"))?;
        print_drain(run, &d);
        drains.push(d);
        let d = drain(&mut con, TUNED, cli.tasks, run, timeout, || {
            Service::taskstack(&worker_bin, &tuned_url, &tuned)
        })
        .await
        .with_context(|| format!("run {run}, {TUNED}"))?;
        print_drain(run, &d);
        drains.push(d);
        if let Some(python) = &python {
            let d = drain(&mut con, CELERY, cli.celery_tasks, run, timeout, || {
                Service::celery(python, &url, "drain_tasks", CeleryPool::Prefork, 2)
            })
            .await
            .with_context(|| format!("run {run}, {CELERY}"))?;
            print_drain(run, &d);
            drains.push(d);
        }
        let _: () = redis::cmd("FLUSHALL").query_async(&mut con).await?;
        let ceiling: Ceiling = redis_benchmark(redis.port(), Some(PIPELINE))?
            .into_iter()
            .filter_map(|l| Some((l.label, l.rps?)))
            .collect();
        let line: Vec<String> = ceiling
            .iter()
            .map(|(t, rps)| format!("{t} {rps:.0}/s"))
            .collect();
        println!(
            "run {run} redis-benchmark -P {PIPELINE}: {}",
            line.join(", ")
        );
        ceilings.push(ceiling);
        for (system, url, env) in [(DEFAULTS, &url, &[][..]), (TUNED, &tuned_url, &tuned[..])] {
            let l = idle_latency(
                &mut con,
                &worker_bin,
                url,
                env,
                cli.latency_samples,
                cli.latency_api,
            )
            .await
            .with_context(|| format!("run {run}, {system}, latency"))?;
            println!(
                "run {run} {system} idle latency: p50 {:.3} ms, p99 {:.3} ms ({} round trips)",
                l.p50, l.p99, cli.latency_samples
            );
            latencies.push((system, l));
        }
        let ping = latency::ping_round_trips(&mut con, cli.latency_samples).await?;
        println!(
            "run {run} redis PING: p50 {:.3} ms, p99 {:.3} ms",
            ping.p50, ping.p99
        );
        latencies.push((PING, ping));
    }
    print_table(&cli, &tuned_text, &drains, &ceilings);
    print_latency_table(&cli, &tuned_text, &latencies);
    Ok(())
}

/// The server's own round trip, beside the workers' latencies.
const PING: &str = "redis PING";

/// Enqueue-to-result round trips, one task at a time, on a worker started
/// with `env` that has nothing else to do (a flushed server, an empty
/// queue): `WARMUP` unmeasured, then `samples` measured.
async fn idle_latency(
    con: &mut redis::aio::MultiplexedConnection,
    worker_bin: &Path,
    url: &str,
    env: &[(&str, String)],
    samples: usize,
    api: latency::Api,
) -> Result<Latency> {
    let _: () = redis::cmd("FLUSHALL").query_async(con).await?;
    let worker = Service::taskstack(worker_bin, url, env)?;
    let producer = taskstack_integration::producer(url, worker.namespace())?;
    let measured = latency::measure_latency(&producer, WARMUP, samples, api)
        .await
        .with_context(|| format!("worker log tail:\n{}", worker.log_tail()));
    // A failed measurement is the error to report, before a failed stop.
    let stopped = worker.stop();
    let latency = measured?;
    stopped?;
    Ok(latency)
}

fn print_latency_table(cli: &Cli, tuned: &[String], latencies: &[(&str, Latency)]) {
    println!();
    println!(
        "| idle round trip ({} per run, {:?}) | p50 ms (median) | p99 ms (median) | runs (p50) |",
        cli.latency_samples, cli.latency_api
    );
    println!("| --- | --- | --- | --- |");
    for (system, label) in [
        (DEFAULTS, DEFAULTS.to_owned()),
        (TUNED, format!("{TUNED} ({})", tuned.join(" "))),
        (PING, format!("{PING} (the bench's own connection)")),
    ] {
        let mine: Vec<&Latency> = latencies
            .iter()
            .filter(|(s, _)| *s == system)
            .map(|(_, l)| l)
            .collect();
        let p50: Vec<f64> = mine.iter().map(|l| l.p50).collect();
        let p99: Vec<f64> = mine.iter().map(|l| l.p99).collect();
        let runs: Vec<String> = p50.iter().map(|x| format!("{x:.3}")).collect();
        println!(
            "| {label} | {:.3} | {:.3} | {} |",
            median(&p50),
            median(&p99),
            runs.join(" / ")
        );
    }
    println!();
    println!(
        "latency: enqueue (taskstack's producer: the message and its PENDING record) to the result received through its channel, on a worker with an empty queue"
    );
}

fn runs_text(values: &[f64]) -> String {
    let v: Vec<String> = values.iter().map(|x| format!("{x:.0}")).collect();
    v.join(" / ")
}

fn median(values: &[f64]) -> f64 {
    let v: Vec<Option<f64>> = values.iter().copied().map(Some).collect();
    stats::median(&v).unwrap_or(f64::NAN)
}

fn print_table(cli: &Cli, tuned: &[String], drains: &[Drain], ceilings: &[Ceiling]) {
    println!();
    println!(
        "| system | tasks/s (median) | runs | Redis commands per task | × Celery | Redis commands/s, % of the LPUSH ceiling |"
    );
    println!("| --- | --- | --- | --- | --- | --- |");
    let lpush = median(
        &ceilings
            .iter()
            .filter_map(|c| c.iter().find(|(t, _)| t == "LPUSH").map(|(_, r)| *r))
            .collect::<Vec<_>>(),
    );
    let rate_of = |system: &str| -> Option<(f64, f64, Vec<f64>)> {
        let mine: Vec<&Drain> = drains.iter().filter(|d| d.system == system).collect();
        if mine.is_empty() {
            return None;
        }
        let rates: Vec<f64> = mine.iter().map(|d| d.tasks_per_s()).collect();
        let cmds: Vec<f64> = mine.iter().map(|d| d.cmds_per_task()).collect();
        Some((median(&rates), median(&cmds), rates))
    };
    let celery = rate_of(CELERY).map(|(r, _, _)| r);
    for (system, label) in [
        (DEFAULTS, DEFAULTS.to_owned()),
        (TUNED, format!("{TUNED} ({})", tuned.join(" "))),
        (CELERY, CELERY.to_owned()),
    ] {
        let Some((rate, cmds, rates)) = rate_of(system) else {
            continue;
        };
        let ratio = celery.map_or_else(|| "–".to_owned(), |c| format!("{:.1}×", rate / c));
        println!(
            "| {label} | {rate:.0} | {} | {cmds:.2} | {ratio} | {:.0} ({:.0}%) |",
            runs_text(&rates),
            rate * cmds,
            rate * cmds / lpush * 100.0
        );
    }
    let tests: Vec<String> = ceilings
        .first()
        .map(|c| c.iter().map(|(t, _)| t.clone()).collect())
        .unwrap_or_default();
    for test in tests {
        let rps: Vec<f64> = ceilings
            .iter()
            .filter_map(|c| c.iter().find(|(t, _)| *t == test).map(|(_, r)| *r))
            .collect();
        println!(
            "| redis-benchmark -P {PIPELINE} {test} (requests/s) | {:.0} | {} | 1 | | |",
            median(&rps),
            runs_text(&rps)
        );
    }
    println!();
    println!(
        "taskstack drains {} messages, Celery {}; medians of {} run(s); every result checked SUCCESS",
        cli.tasks, cli.celery_tasks, cli.runs
    );
}
