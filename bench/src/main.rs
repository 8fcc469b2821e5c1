//! `taskstack-bench`: throughput, latency and memory of one release
//! `taskstack-worker` process against a throwaway `redis-server`.
//!
//! It prints figures and never asserts timings. See `bench/README.md`.
//! This file holds the command line and runs the phases; the modules below
//! do the work.

mod drain;
mod latency;
mod redis_info;
mod report;
mod run;
mod stats;
mod worker;

use anyhow::{Context as _, Result, bail, ensure};
use clap::Parser;
use redis_info::{RefLine, info_field, redis_benchmark};
use report::{print_run, print_summary};
use run::run_once;
use std::path::{Path, PathBuf};
use taskstack_integration::RedisServer;

/// The task every benchmark sends: the worker's built-in echo.
const ECHO: &str = "taskstack.echo";

#[derive(Debug, Parser)]
#[command(
    name = "taskstack-bench",
    about = "Throughput, latency and peak memory of one release taskstack-worker on a throwaway redis-server"
)]
struct Cli {
    /// Tasks enqueued (before the worker starts) for the throughput phase.
    #[arg(long, default_value_t = 20_000)]
    tasks: usize,
    /// Tasks per `send_many` pipeline when enqueueing.
    #[arg(long, default_value_t = 1_000)]
    chunk: usize,
    /// TASKSTACK_CONCURRENCY of the worker.
    #[arg(long, default_value_t = 64)]
    concurrency: usize,
    /// TASKSTACK_PREFETCH of the worker.
    #[arg(long, default_value_t = 512)]
    prefetch: usize,
    /// Measured one-at-a-time round trips per run.
    #[arg(long, default_value_t = 1_000)]
    latency_samples: usize,
    /// How each round trip's producer waits for the result.
    #[arg(long, value_enum, default_value_t = latency::Api::SendAndWait)]
    latency_api: latency::Api,
    /// Unmeasured round trips before the latency samples.
    #[arg(long, default_value_t = 50)]
    warmup: usize,
    /// Repetitions of the throughput, latency and memory phases.
    #[arg(long, default_value_t = 3)]
    runs: usize,
    /// Run the worker with Celery task events on (`-E`,
    /// TASKSTACK_WORKER_SEND_TASK_EVENTS=1).
    #[arg(long)]
    task_events: bool,
    /// The worker binary (default: `<workspace>/target/release/taskstack-worker`).
    // `help` keeps the `--help` text as it was; rustdoc reads `[...]` as a link.
    #[arg(
        long,
        value_name = "PATH",
        help = "The worker binary [default: <workspace>/target/release/taskstack-worker]"
    )]
    worker_bin: Option<PathBuf>,
    /// TASKSTACK_LOG_LEVEL of the worker; it must let the "worker ready"
    /// line through (used to time the worker's startup).
    #[arg(
        long,
        default_value = "warn,taskstack::worker=info,taskstack::worker::handle=warn"
    )]
    worker_log_level: String,
    /// Give up on a drain after this many seconds.
    #[arg(long, default_value_t = 300)]
    timeout: u64,
    /// Skip the redis-benchmark reference.
    #[arg(long)]
    no_redis_benchmark: bool,
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<()> {
    let cli = Cli::parse();
    ensure!(cli.tasks > 0, "--tasks must be at least 1");
    ensure!(cli.chunk > 0, "--chunk must be at least 1");
    ensure!(cli.runs > 0, "--runs must be at least 1");
    ensure!(
        cli.latency_samples > 0,
        "--latency-samples must be at least 1"
    );
    ensure!(
        cli.prefetch >= cli.concurrency,
        "--prefetch must be at least --concurrency"
    );
    let worker_bin = cli.worker_bin.clone().unwrap_or_else(default_worker_bin);
    if !worker_bin.is_file() {
        bail!(
            "worker binary {} not found: run `cargo build --release -p taskstack-worker` first (or pass --worker-bin)",
            worker_bin.display()
        );
    }
    if cfg!(debug_assertions) {
        eprintln!(
            "warning: taskstack-bench is a debug build; the producer side of the latency figures is unoptimised (use cargo run --release)"
        );
    }

    let redis = RedisServer::start()?;
    let url = redis.url();
    let client = redis::Client::open(url.as_str())?;
    let mut con = client
        .get_multiplexed_async_connection()
        .await
        .context("cannot connect to the benchmark redis-server")?;
    let server_info: String = redis::cmd("INFO")
        .arg("server")
        .query_async(&mut con)
        .await?;
    let cpus = std::thread::available_parallelism().map_or(0, std::num::NonZero::get);
    let ping = latency::ping_round_trips(&mut con, 1_000).await?;

    println!("taskstack-bench");
    println!(
        "  redis-server {} on 127.0.0.1:{} (no persistence), {cpus} CPUs",
        info_field(&server_info, "redis_version").unwrap_or("?"),
        redis.port()
    );
    println!("  worker {}", worker_bin.display());
    println!(
        "  PING round trip (sequential, 1000): p50 {:.3} ms, p99 {:.3} ms",
        ping.p50, ping.p99
    );
    println!(
        "  {} tasks ({} per send_many), concurrency {}, prefetch {}, {} latency samples ({:?}) after {} warm-up, {} run(s)",
        cli.tasks,
        cli.chunk,
        cli.concurrency,
        cli.prefetch,
        cli.latency_samples,
        cli.latency_api,
        cli.warmup,
        cli.runs
    );
    println!();

    let mut runs = Vec::with_capacity(cli.runs);
    for k in 1..=cli.runs {
        let r = run_once(&cli, &worker_bin, &url, &mut con)
            .await
            .with_context(|| format!("run {k}"))?;
        print_run(k, &r);
        runs.push(r);
    }

    let mut reference = Vec::new();
    if !cli.no_redis_benchmark {
        let _: () = redis::cmd("FLUSHALL").query_async(&mut con).await?;
        println!("redis-benchmark reference (-n 200000 -t set,lpush,rpop):");
        for (label, pipeline) in [("no pipelining", None), ("-P 16", Some(16))] {
            for line in redis_benchmark(redis.port(), pipeline)? {
                println!("  [{label:>13}] {}", line.line);
                reference.push(RefLine {
                    label: match pipeline {
                        Some(p) => format!("{}_P{p}", line.label),
                        None => line.label,
                    },
                    ..line
                });
            }
        }
        println!();
    }

    print_summary(&cli, cpus, ping, &runs, &reference);
    Ok(())
}

fn default_worker_bin() -> PathBuf {
    let bench_dir = Path::new(env!("CARGO_MANIFEST_DIR"));
    bench_dir
        .parent()
        .unwrap_or(bench_dir)
        .join("target/release/taskstack-worker")
}
