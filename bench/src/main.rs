//! `taskstack-bench`: throughput, latency and memory of one release
//! `taskstack-worker` process against a throwaway `redis-server`.
//!
//! It prints figures and never asserts timings. See `bench/README.md`.

use anyhow::{Context as _, Result, bail, ensure};
use clap::Parser;
use serde_json::{Map, Value, json};
use std::collections::VecDeque;
use std::io::{BufRead as _, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};
use taskstack::proto::keys::result_key;
use taskstack::proto::{TaskResult, TaskState};
use taskstack::{Producer, SendOptions, TaskRequest};
use taskstack_integration::RedisServer;

const ECHO: &str = "taskstack.echo";
/// Keys per pipeline when checking or reading results.
const SCAN_CHUNK: usize = 1_000;
/// Linux reports process CPU times in USER_HZ ticks, 100 per second.
const USER_HZ: f64 = 100.0;

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
    /// Unmeasured round trips before the latency samples.
    #[arg(long, default_value_t = 50)]
    warmup: usize,
    /// Repetitions of the throughput, latency and memory phases.
    #[arg(long, default_value_t = 3)]
    runs: usize,
    /// The worker binary [default: <workspace>/target/release/taskstack-worker].
    #[arg(long, value_name = "PATH")]
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

/// One Redis command's share of the traffic (from `INFO commandstats`).
#[derive(Debug, Clone)]
struct CmdStat {
    name: String,
    calls: u64,
    usec: u64,
}

#[derive(Debug, Clone, Copy)]
struct Latency {
    p50: f64,
    p90: f64,
    p99: f64,
    max: f64,
    mean: f64,
}

/// Everything measured in one run.
#[derive(Debug)]
struct RunFigures {
    tasks: usize,
    enqueue_s: f64,
    /// Worker spawn → every task has a SUCCESS result.
    drain_s: f64,
    /// Worker spawn → its "worker ready" log line.
    startup_s: Option<f64>,
    worker_cpu_s: Option<f64>,
    redis_cpu_s: Option<f64>,
    bench_cpu_s: Option<f64>,
    drain_cmds: Vec<CmdStat>,
    latency: Latency,
    latency_round_trips: usize,
    latency_cmds: Vec<CmdStat>,
    peak_rss_kb: u64,
}

impl RunFigures {
    fn tasks_per_s(&self) -> f64 {
        self.tasks as f64 / self.drain_s
    }

    /// Throughput counted from the "worker ready" line instead of the spawn.
    fn tasks_per_s_excl_startup(&self) -> Option<f64> {
        let s = self.startup_s?;
        (self.drain_s > s).then(|| self.tasks as f64 / (self.drain_s - s))
    }
}

/// A reference line of `redis-benchmark`.
#[derive(Debug)]
struct RefLine {
    label: String,
    line: String,
    rps: Option<f64>,
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
    let ping = ping_round_trips(&mut con, 1_000).await?;

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
        "  {} tasks ({} per send_many), concurrency {}, prefetch {}, {} latency samples after {} warm-up, {} run(s)",
        cli.tasks,
        cli.chunk,
        cli.concurrency,
        cli.prefetch,
        cli.latency_samples,
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

fn echo_request(i: usize) -> TaskRequest {
    TaskRequest {
        name: ECHO.to_owned(),
        args: vec![json!(i)],
        kwargs: Map::new(),
        options: SendOptions::default(),
    }
}

async fn run_once(
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
    let mut ids = Vec::with_capacity(cli.tasks);
    let mut next = 0;
    while next < cli.tasks {
        let end = (next + cli.chunk).min(cli.tasks);
        let reqs: Vec<TaskRequest> = (next..end).map(echo_request).collect();
        ids.extend(producer.send_many(&reqs).await?);
        next = end;
    }
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
    let mut own_exists = 0;
    let done = wait_drained(
        con,
        &mut worker,
        &keys,
        Duration::from_secs(cli.timeout),
        &mut own_exists,
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
        if c.name == "exists" {
            c.calls = c.calls.saturating_sub(own_exists);
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
    let latency = measure_latency(&producer, cli.warmup, cli.latency_samples)
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

/// Polls until every key exists and returns when that was seen. Checks the
/// last pending key (FIFO: it finishes last, give or take the concurrency)
/// and, once it is there, every pending key in pipelined chunks.
async fn wait_drained(
    con: &mut redis::aio::MultiplexedConnection,
    worker: &mut WorkerProc,
    keys: &[String],
    timeout: Duration,
    own_exists: &mut u64,
) -> Result<Instant> {
    let start = Instant::now();
    let mut pending: Vec<&str> = keys.iter().map(String::as_str).collect();
    loop {
        let Some(last) = pending.last() else {
            return Ok(Instant::now());
        };
        let present: bool = redis::cmd("EXISTS").arg(*last).query_async(con).await?;
        *own_exists += 1;
        if present {
            let mut still = Vec::new();
            for chunk in pending.chunks(SCAN_CHUNK) {
                let mut p = redis::pipe();
                for k in chunk {
                    p.cmd("EXISTS").arg(*k);
                }
                let found: Vec<bool> = p.query_async(con).await?;
                *own_exists += chunk.len() as u64;
                still.extend(chunk.iter().zip(found).filter(|(_, f)| !f).map(|(k, _)| *k));
            }
            pending = still;
            if pending.is_empty() {
                return Ok(Instant::now());
            }
            continue;
        }
        worker.check_running()?;
        if start.elapsed() > timeout {
            bail!(
                "{} of {} tasks still have no result after {timeout:?}; worker log tail:\n{}",
                pending.len(),
                keys.len(),
                worker.log_tail()
            );
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

/// Every stored result must be SUCCESS.
async fn verify_results(
    con: &mut redis::aio::MultiplexedConnection,
    keys: &[String],
) -> Result<()> {
    let mut bad = 0usize;
    let mut example = None;
    for chunk in keys.chunks(SCAN_CHUNK) {
        let raws: Vec<Option<String>> = redis::cmd("MGET").arg(chunk).query_async(con).await?;
        for (key, raw) in chunk.iter().zip(raws) {
            let state = raw
                .as_deref()
                .map(|r| serde_json::from_str::<TaskResult>(r).map(|t| t.status));
            if !matches!(state, Some(Ok(TaskState::Success))) {
                bad += 1;
                example.get_or_insert_with(|| format!("{key}: {raw:?}"));
            }
        }
    }
    if bad > 0 {
        bail!(
            "{bad} of {} results are not SUCCESS, e.g. {}",
            keys.len(),
            example.unwrap_or_default()
        );
    }
    Ok(())
}

async fn measure_latency(producer: &Producer, warmup: usize, samples: usize) -> Result<Latency> {
    let mut times = Vec::with_capacity(samples);
    for i in 0..warmup + samples {
        let t = Instant::now();
        let id = producer.send_task(ECHO, vec![json!(i)]).await?;
        let result = producer.wait(&id, Duration::from_secs(10)).await?;
        let elapsed = t.elapsed();
        ensure!(
            result.status == TaskState::Success,
            "latency task {id} ended {:?}",
            result.status
        );
        if i >= warmup {
            times.push(elapsed.as_secs_f64() * 1e3);
        }
    }
    Ok(percentiles(times))
}

/// Sequential PINGs on the bench's own connection: the unit a round trip
/// costs on this machine.
async fn ping_round_trips(
    con: &mut redis::aio::MultiplexedConnection,
    n: usize,
) -> Result<Latency> {
    let mut times = Vec::with_capacity(n);
    for _ in 0..n {
        let t = Instant::now();
        let _: String = redis::cmd("PING").query_async(con).await?;
        times.push(t.elapsed().as_secs_f64() * 1e3);
    }
    Ok(percentiles(times))
}

/// Nearest-rank percentiles of a non-empty sample, in its unit.
fn percentiles(mut times: Vec<f64>) -> Latency {
    if times.is_empty() {
        times.push(f64::NAN);
    }
    times.sort_by(f64::total_cmp);
    let rank = |p: f64| {
        let idx = ((p * times.len() as f64).ceil() as usize).clamp(1, times.len()) - 1;
        times[idx]
    };
    Latency {
        p50: rank(0.50),
        p90: rank(0.90),
        p99: rank(0.99),
        max: rank(1.0),
        mean: times.iter().sum::<f64>() / times.len() as f64,
    }
}

/// `used_cpu_sys + used_cpu_user` of the server, in seconds.
async fn redis_cpu_s(con: &mut redis::aio::MultiplexedConnection) -> Result<Option<f64>> {
    let info: String = redis::cmd("INFO").arg("cpu").query_async(con).await?;
    let field = |name| info_field(&info, name).and_then(|v| v.parse::<f64>().ok());
    Ok(field("used_cpu_sys")
        .zip(field("used_cpu_user"))
        .map(|(s, u)| s + u))
}

/// `INFO commandstats`, busiest first, without our own INFO/CONFIG calls.
async fn commandstats(con: &mut redis::aio::MultiplexedConnection) -> Result<Vec<CmdStat>> {
    let info: String = redis::cmd("INFO")
        .arg("commandstats")
        .query_async(con)
        .await?;
    let mut stats: Vec<CmdStat> = info
        .lines()
        .filter_map(|l| l.trim().strip_prefix("cmdstat_"))
        .filter_map(|l| {
            let (name, rest) = l.split_once(':')?;
            let mut calls = None;
            let mut usec = None;
            for kv in rest.split(',') {
                match kv.split_once('=') {
                    Some(("calls", v)) => calls = v.parse().ok(),
                    Some(("usec", v)) => usec = v.parse().ok(),
                    _ => {}
                }
            }
            Some(CmdStat {
                name: name.to_owned(),
                calls: calls?,
                usec: usec.unwrap_or(0),
            })
        })
        .filter(|c| c.name != "info" && !c.name.starts_with("config"))
        .collect();
    stats.sort_by(|a, b| b.calls.cmp(&a.calls).then_with(|| a.name.cmp(&b.name)));
    Ok(stats)
}

fn info_field<'a>(info: &'a str, name: &str) -> Option<&'a str> {
    info.lines()
        .find_map(|l| l.trim().strip_prefix(name)?.strip_prefix(':'))
}

/// utime + stime of `/proc/<pid>/stat`, in seconds.
fn proc_cpu_s(pid: &str) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name (which may contain spaces): state is
    // field 3, utime 14, stime 15.
    let mut fields = stat
        .get(stat.rfind(')')? + 1..)?
        .split_whitespace()
        .skip(11);
    let utime: f64 = fields.next()?.parse().ok()?;
    let stime: f64 = fields.next()?.parse().ok()?;
    Some((utime + stime) / USER_HZ)
}

fn redis_benchmark(port: u16, pipeline: Option<u32>) -> Result<Vec<RefLine>> {
    let mut cmd = Command::new("redis-benchmark");
    cmd.args(["-h", "127.0.0.1", "-p", &port.to_string()])
        .args(["-q", "-n", "200000", "-t", "set,lpush,rpop"]);
    if let Some(p) = pipeline {
        cmd.args(["-P", &p.to_string()]);
    }
    let out = cmd
        .stdin(Stdio::null())
        .stderr(Stdio::inherit())
        .output()
        .context("cannot run redis-benchmark (apt-get install -y redis-tools)")?;
    ensure!(
        out.status.success(),
        "redis-benchmark failed: {}",
        out.status
    );
    let text = String::from_utf8_lossy(&out.stdout);
    Ok(text
        .split(['\r', '\n'])
        .map(str::trim)
        .filter(|l| l.contains("requests per second"))
        .map(|l| {
            let (label, rest) = l.split_once(':').unwrap_or(("?", l));
            RefLine {
                label: label.trim().to_owned(),
                line: l.to_owned(),
                rps: rest.split_whitespace().next().and_then(|n| n.parse().ok()),
            }
        })
        .collect())
}

/// What the worker logged, and when it said it was ready.
#[derive(Debug, Default)]
struct LogState {
    ready: Option<Instant>,
    tail: VecDeque<String>,
}

const LOG_TAIL: usize = 40;

/// A `taskstack-worker` process whose stderr is read by a thread; killed on
/// drop unless it was stopped.
#[derive(Debug)]
struct WorkerProc {
    child: Child,
    log: Arc<Mutex<LogState>>,
    reader: Option<JoinHandle<()>>,
}

impl WorkerProc {
    fn spawn(cli: &Cli, bin: &Path, url: &str, namespace: &str, state_dir: &Path) -> Result<Self> {
        let mut cmd = Command::new(bin);
        for (k, _) in std::env::vars_os() {
            if k.to_string_lossy().starts_with("TASKSTACK_") {
                cmd.env_remove(k);
            }
        }
        cmd.env("TASKSTACK_BROKER_URL", url)
            .env("TASKSTACK_NAMESPACE", namespace)
            .env("TASKSTACK_ALLOW_ROOT", "1")
            .env("TASKSTACK_WORKER_STATE_FILE", state_dir.join("w.json"))
            .env("TASKSTACK_LOG_LEVEL", &cli.worker_log_level)
            .env("TASKSTACK_LOG_FORMAT", "json")
            .env("TASKSTACK_CONCURRENCY", cli.concurrency.to_string())
            .env("TASKSTACK_PREFETCH", cli.prefetch.to_string())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        let mut child = cmd
            .spawn()
            .with_context(|| format!("cannot start {}", bin.display()))?;
        let log = Arc::new(Mutex::new(LogState::default()));
        let reader = match child.stderr.take() {
            Some(stderr) => {
                let log = Arc::clone(&log);
                Some(std::thread::spawn(move || read_log(stderr, &log)))
            }
            None => None,
        };
        Ok(Self { child, log, reader })
    }

    fn state(&self) -> std::sync::MutexGuard<'_, LogState> {
        self.log.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn ready_at(&self) -> Option<Instant> {
        self.state().ready
    }

    fn log_tail(&self) -> String {
        self.state()
            .tail
            .iter()
            .map(String::as_str)
            .collect::<Vec<_>>()
            .join("\n")
    }

    fn check_running(&mut self) -> Result<()> {
        if let Some(status) = self.child.try_wait()? {
            bail!(
                "worker exited early with {status}; log tail:\n{}",
                self.log_tail()
            );
        }
        Ok(())
    }

    fn cpu_s(&self) -> Option<f64> {
        proc_cpu_s(&self.child.id().to_string())
    }

    /// `VmHWM` (peak resident set) in kB.
    fn peak_rss_kb(&self) -> Result<u64> {
        let path = format!("/proc/{}/status", self.child.id());
        let status =
            std::fs::read_to_string(&path).with_context(|| format!("cannot read {path}"))?;
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmHWM:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .with_context(|| format!("no VmHWM in {path}"))
    }

    /// SIGTERM, then waits for the exit.
    fn stop(&mut self, deadline: Duration) -> Result<ExitStatus> {
        let pid = nix::unistd::Pid::from_raw(i32::try_from(self.child.id())?);
        nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM)?;
        let child = &mut self.child;
        let status = taskstack_integration::wait_until_sync(
            "worker to exit after SIGTERM",
            deadline,
            || child.try_wait().ok().flatten(),
        )?;
        if let Some(r) = self.reader.take() {
            let _ = r.join();
        }
        Ok(status)
    }
}

impl Drop for WorkerProc {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

fn read_log(stderr: std::process::ChildStderr, log: &Mutex<LogState>) {
    for line in BufReader::new(stderr).lines() {
        let Ok(line) = line else { break };
        let now = Instant::now();
        let mut s = log.lock().unwrap_or_else(PoisonError::into_inner);
        if s.ready.is_none() && line.contains("worker ready") {
            s.ready = Some(now);
        }
        if s.tail.len() == LOG_TAIL {
            s.tail.pop_front();
        }
        s.tail.push_back(line);
    }
}

fn cmds_per_task(stats: &[CmdStat], per: usize) -> String {
    let per = per.max(1) as f64;
    let total: u64 = stats.iter().map(|c| c.calls).sum();
    let parts: Vec<String> = stats
        .iter()
        .map(|c| {
            format!(
                "{} {:.2} ({:.1}us)",
                c.name,
                c.calls as f64 / per,
                c.usec as f64 / per
            )
        })
        .collect();
    format!("{:.2} = {}", total as f64 / per, parts.join(", "))
}

fn pct(part: Option<f64>, whole: f64) -> String {
    part.map_or_else(
        || "?".to_owned(),
        |p| format!("{p:.2} s ({:.0}% of a core)", 100.0 * p / whole),
    )
}

fn print_run(k: usize, r: &RunFigures) {
    println!("run {k}");
    println!(
        "  enqueue     {} tasks in {:.3} s ({:.0}/s, before the worker started)",
        r.tasks,
        r.enqueue_s,
        r.tasks as f64 / r.enqueue_s
    );
    println!(
        "  drain       {:.3} s from spawn -> {:.0} tasks/s",
        r.drain_s,
        r.tasks_per_s()
    );
    match (r.startup_s, r.tasks_per_s_excl_startup()) {
        (Some(s), Some(t)) => println!(
            "  startup     {:.1} ms to \"worker ready\" -> {t:.0} tasks/s excluding startup",
            s * 1e3
        ),
        _ => println!("  startup     not detected (no \"worker ready\" line)"),
    }
    println!(
        "  CPU (drain) worker {}, redis {}, bench {}",
        pct(r.worker_cpu_s, r.drain_s),
        pct(r.redis_cpu_s, r.drain_s),
        pct(r.bench_cpu_s, r.drain_s)
    );
    println!(
        "  redis cmds per task (drain, bench polling removed): {}",
        cmds_per_task(&r.drain_cmds, r.tasks)
    );
    let l = r.latency;
    println!(
        "  latency     p50 {:.3} ms, p90 {:.3} ms, p99 {:.3} ms, max {:.3} ms, mean {:.3} ms",
        l.p50, l.p90, l.p99, l.max, l.mean
    );
    println!(
        "  redis cmds per round trip (latency, incl. warm-up and worker background): {}",
        cmds_per_task(&r.latency_cmds, r.latency_round_trips)
    );
    println!(
        "  worker peak RSS (VmHWM) {:.1} MB",
        r.peak_rss_kb as f64 / 1024.0
    );
    println!();
}

fn median(values: &[Option<f64>]) -> Option<f64> {
    let mut v: Vec<f64> = values.iter().flatten().copied().collect();
    if v.is_empty() {
        return None;
    }
    v.sort_by(f64::total_cmp);
    let n = v.len();
    Some(if n % 2 == 1 {
        v[n / 2]
    } else {
        f64::midpoint(v[n / 2 - 1], v[n / 2])
    })
}

fn round3(x: f64) -> f64 {
    (x * 1000.0).round() / 1000.0
}

fn print_summary(
    cli: &Cli,
    cpus: usize,
    ping: Latency,
    runs: &[RunFigures],
    reference: &[RefLine],
) {
    type Figure = fn(&RunFigures) -> Option<f64>;
    let rows: [(&str, &str, usize, Figure); 12] = [
        ("throughput_tasks_per_s", "tasks/s (from spawn)", 0, |r| {
            Some(r.tasks_per_s())
        }),
        (
            "throughput_excl_startup_tasks_per_s",
            "tasks/s (excl. startup)",
            0,
            RunFigures::tasks_per_s_excl_startup,
        ),
        ("drain_s", "drain s", 3, |r| Some(r.drain_s)),
        ("worker_startup_ms", "worker startup ms", 1, |r| {
            r.startup_s.map(|s| s * 1e3)
        }),
        ("worker_cpu_s", "worker CPU s (drain)", 2, |r| {
            r.worker_cpu_s
        }),
        ("redis_cpu_s", "redis CPU s (drain)", 2, |r| r.redis_cpu_s),
        ("latency_p50_ms", "latency p50 ms", 3, |r| {
            Some(r.latency.p50)
        }),
        ("latency_p90_ms", "latency p90 ms", 3, |r| {
            Some(r.latency.p90)
        }),
        ("latency_p99_ms", "latency p99 ms", 3, |r| {
            Some(r.latency.p99)
        }),
        ("latency_max_ms", "latency max ms", 3, |r| {
            Some(r.latency.max)
        }),
        ("latency_mean_ms", "latency mean ms", 3, |r| {
            Some(r.latency.mean)
        }),
        ("worker_peak_rss_mb", "worker peak RSS MB", 1, |r| {
            Some(r.peak_rss_kb as f64 / 1024.0)
        }),
    ];
    let fmt = |v: Option<f64>, d: usize| v.map_or_else(|| "-".to_owned(), |v| format!("{v:.d$}"));

    let mut header = format!("{:<26}", "figure");
    for k in 1..=runs.len() {
        header.push_str(&format!("{:>12}", format!("run {k}")));
    }
    header.push_str(&format!("{:>12}", "median"));
    println!("{header}");
    println!("{}", "-".repeat(header.len()));

    let mut out = Map::new();
    out.insert("bench".into(), json!("taskstack"));
    out.insert("tasks".into(), json!(cli.tasks));
    out.insert("runs".into(), json!(runs.len()));
    out.insert("concurrency".into(), json!(cli.concurrency));
    out.insert("prefetch".into(), json!(cli.prefetch));
    out.insert("latency_samples".into(), json!(cli.latency_samples));
    out.insert("cpus".into(), json!(cpus));
    for (key, label, decimals, get) in rows {
        let values: Vec<Option<f64>> = runs.iter().map(get).collect();
        let med = median(&values);
        let mut line = format!("{label:<26}");
        for v in &values {
            line.push_str(&format!("{:>12}", fmt(*v, decimals)));
        }
        line.push_str(&format!("{:>12}", fmt(med, decimals)));
        println!("{line}");
        out.insert(key.into(), med.map_or(Value::Null, |m| json!(round3(m))));
    }
    out.insert("redis_ping_p50_ms".into(), json!(round3(ping.p50)));
    if !reference.is_empty() {
        let rps: Map<String, Value> = reference
            .iter()
            .map(|r| (r.label.clone(), r.rps.map_or(Value::Null, |v| json!(v))))
            .collect();
        out.insert("redis_benchmark_rps".into(), Value::Object(rps));
    }
    println!();
    println!("{}", Value::Object(out));
}
