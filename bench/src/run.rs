//! One run: enqueue, drain, latency and peak memory with one worker in a fresh namespace.

use crate::Cli;
use crate::drain::{enqueue, verify_results, wait_drained};
use crate::latency::measure_latency;
use crate::redis_info::{CmdStat, commandstats, redis_cpu_s};
use crate::stats::Latency;
use crate::worker::{WorkerProc, proc_cpu_s};
use anyhow::{Context as _, Result, bail, ensure};
use std::path::Path;
use std::time::{Duration, Instant};
use taskstack::proto::keys::result_key;

/// Everything measured in one run.
#[derive(Debug)]
pub(crate) struct RunFigures {
    pub(crate) tasks: usize,
    pub(crate) enqueue_s: f64,
    /// Worker spawn → every task has a SUCCESS result.
    pub(crate) drain_s: f64,
    /// Worker spawn → its "worker ready" log line.
    pub(crate) startup_s: Option<f64>,
    pub(crate) worker_cpu_s: Option<f64>,
    pub(crate) redis_cpu_s: Option<f64>,
    pub(crate) bench_cpu_s: Option<f64>,
    pub(crate) drain_cmds: Vec<CmdStat>,
    pub(crate) latency: Latency,
    pub(crate) latency_round_trips: usize,
    pub(crate) latency_cmds: Vec<CmdStat>,
    pub(crate) peak_rss_kb: u64,
}

impl RunFigures {
    pub(crate) fn tasks_per_s(&self) -> f64 {
        self.tasks as f64 / self.drain_s
    }

    /// Throughput counted from the "worker ready" line instead of the spawn.
    pub(crate) fn tasks_per_s_excl_startup(&self) -> Option<f64> {
        let s = self.startup_s?;
        (self.drain_s > s).then(|| self.tasks as f64 / (self.drain_s - s))
    }
}

/// Runs the four phases once and returns their figures.
pub(crate) async fn run_once(
    cli: &Cli,
    worker_bin: &Path,
    url: &str,
    con: &mut redis::aio::MultiplexedConnection,
) -> Result<RunFigures> {
    // Each run starts from an empty server and a namespace of its own.
    let _: () = redis::cmd("FLUSHALL").query_async(con).await?;
    let namespace = taskstack_integration::namespace("bench");
    let producer = taskstack_integration::producer(url, &namespace)?;

    // 1. Enqueue everything before any worker runs.
    let t0 = Instant::now();
    let ids = enqueue(&producer, cli.tasks, cli.chunk).await?;
    let enqueue_s = t0.elapsed().as_secs_f64();
    ensure!(
        ids.len() == cli.tasks,
        "send_many returned {} ids for {} tasks",
        ids.len(),
        cli.tasks
    );
    let keys: Vec<String> = ids.iter().map(|id| result_key(id)).collect();

    // 2. Drain with one worker process, timed from its spawn.
    let _: () = redis::cmd("CONFIG")
        .arg("RESETSTAT")
        .query_async(con)
        .await?;
    let redis_cpu0 = redis_cpu_s(con).await?;
    let bench_cpu0 = proc_cpu_s("self");
    let state_dir = tempfile::tempdir()?;
    let spawned = Instant::now();
    let mut worker = WorkerProc::spawn(cli, worker_bin, url, &namespace, state_dir.path())?;
    let mut own_polls = 0;
    let done = wait_drained(
        con,
        &mut worker,
        &keys,
        Duration::from_secs(cli.timeout),
        &mut own_polls,
    )
    .await?;
    let drain_s = done.duration_since(spawned).as_secs_f64();
    let worker_cpu_s = worker.cpu_s();
    let bench_cpu_s = bench_cpu0.and_then(|c0| proc_cpu_s("self").map(|c1| c1 - c0));
    let redis_cpu_s = match (redis_cpu0, redis_cpu_s(con).await?) {
        (Some(a), Some(b)) => Some(b - a),
        _ => None,
    };
    let mut drain_cmds = commandstats(con).await?;
    // Our own polling is not the worker's traffic.
    for c in &mut drain_cmds {
        if c.name == "get" {
            c.calls = c.calls.saturating_sub(own_polls);
        }
    }
    drain_cmds.retain(|c| c.calls > 0);
    let startup_s = worker
        .ready_at()
        .map(|r| r.saturating_duration_since(spawned).as_secs_f64());
    verify_results(con, &keys).await?;

    // 3. Latency: the same worker, now idle, one task at a time.
    let _: () = redis::cmd("CONFIG")
        .arg("RESETSTAT")
        .query_async(con)
        .await?;
    let latency = measure_latency(&producer, cli.warmup, cli.latency_samples, cli.latency_api)
        .await
        .with_context(|| format!("latency phase; worker log tail:\n{}", worker.log_tail()))?;
    let latency_cmds = commandstats(con).await?;

    // 4. Peak RSS, then a graceful stop.
    let peak_rss_kb = worker.peak_rss_kb()?;
    let status = worker.stop(Duration::from_secs(60))?;
    if !status.success() {
        bail!(
            "worker exited with {status} after SIGTERM; log tail:\n{}",
            worker.log_tail()
        );
    }
    drop(state_dir);

    Ok(RunFigures {
        tasks: cli.tasks,
        enqueue_s,
        drain_s,
        startup_s,
        worker_cpu_s,
        redis_cpu_s,
        bench_cpu_s,
        drain_cmds,
        latency,
        latency_round_trips: cli.warmup + cli.latency_samples,
        latency_cmds,
        peak_rss_kb,
    })
}
