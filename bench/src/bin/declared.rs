//! `declared`: throughput and per-task overhead of declared tasks (a
//! program task running `/bin/cat`, an HTTP task POSTing to a local echo
//! endpoint) against the built-in `taskstack.echo`, in one
//! `taskstack-worker` process on a throwaway `redis-server`. It prints
//! figures (each run and the medians); it asserts nothing about them.
//!
//! ```sh
//! cargo build --release -p taskstack-worker
//! cargo run --release -p taskstack-bench --bin declared -- --runs 3
//! ```

use anyhow::{Context as _, Result, bail, ensure};
use clap::Parser;
use serde_json::json;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};
use taskstack::proto::TaskState;
use taskstack::{Producer, SendOptions, TaskRequest};
use taskstack_integration::RedisServer;

#[derive(Debug, Parser)]
#[command(about = "Program and HTTP task throughput and overhead against the built-in echo")]
struct Cli {
    /// Tasks per throughput measurement.
    #[arg(long, default_value_t = 2_000)]
    tasks: usize,
    /// One-at-a-time round trips per latency measurement.
    #[arg(long, default_value_t = 100)]
    latency_samples: usize,
    /// Repetitions; the summary shows medians.
    #[arg(long, default_value_t = 3)]
    runs: usize,
    /// The worker's TASKSTACK_CONCURRENCY.
    #[arg(long, default_value_t = 16)]
    concurrency: usize,
    /// The worker binary (default: `<target dir>/release/taskstack-worker`).
    #[arg(long, value_name = "PATH")]
    worker_bin: Option<PathBuf>,
}

const KINDS: [(&str, &str); 3] = [
    ("taskstack.echo", "built-in echo"),
    ("bench.exec", "program (/bin/cat)"),
    ("bench.http", "HTTP (local echo)"),
];

struct Worker {
    child: Child,
    _dir: tempfile::TempDir,
}

impl Drop for Worker {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn worker_bin(cli: &Cli) -> Result<PathBuf> {
    let bin = cli.worker_bin.clone().unwrap_or_else(|| {
        std::env::var_os("CARGO_TARGET_DIR")
            .map_or_else(
                || PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target"),
                PathBuf::from,
            )
            .join("release/taskstack-worker")
    });
    if !bin.is_file() {
        bail!(
            "{} not found: cargo build --release -p taskstack-worker (or --worker-bin PATH)",
            bin.display()
        );
    }
    Ok(bin)
}

fn spawn(bin: &PathBuf, redis: &RedisServer, ns: &str, http: &str, c: usize) -> Result<Worker> {
    let dir = tempfile::tempdir()?;
    let toml = dir.path().join("worker.toml");
    std::fs::write(
        &toml,
        format!(
            "[tasks.\"bench.exec\"]\nexec = [\"/bin/cat\"]\n\n\
             [tasks.\"bench.http\"]\nhttp = \"http://{http}/echo\"\n"
        ),
    )?;
    let mut cmd = Command::new(bin);
    for (k, _) in std::env::vars().filter(|(k, _)| k.starts_with("TASKSTACK_")) {
        cmd.env_remove(k);
    }
    cmd.env("TASKSTACK_BROKER_URL", redis.url())
        .env("TASKSTACK_NAMESPACE", ns)
        .env("TASKSTACK_CONFIG", &toml)
        .env("TASKSTACK_CONCURRENCY", c.to_string())
        .env("TASKSTACK_ALLOW_ROOT", "1")
        .env("TASKSTACK_WORKER_METRICS_LISTEN", "off")
        .env("TASKSTACK_WORKER_STATE_FILE", dir.path().join("w.json"))
        .env("TASKSTACK_LOG_LEVEL", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::inherit());
    let child = cmd.spawn().context("cannot start the worker")?;
    let w = Worker { child, _dir: dir };
    let state = w._dir.path().join("w.json");
    let start = Instant::now();
    while !state.exists() {
        ensure!(
            start.elapsed() < Duration::from_secs(60),
            "the worker did not start"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(w)
}

/// A local endpoint answering each POST with its body (the task object).
async fn echo_server() -> Result<String> {
    let app = axum::Router::new().route(
        "/echo",
        axum::routing::post(|body: axum::body::Bytes| async move {
            ([("content-type", "application/json")], body)
        }),
    );
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = l.local_addr()?.to_string();
    tokio::spawn(async move { axum::serve(l, app).await });
    Ok(addr)
}

/// Tasks per second for `n` tasks of `task` sent at once: the clock stops
/// when every result is stored (polled with pipelined `MGET`s every 2 ms,
/// so the driver, not a wait per task, sets the pace).
async fn throughput(p: &Producer, redis: &RedisServer, task: &str, n: usize) -> Result<f64> {
    let reqs: Vec<TaskRequest> = (0..n)
        .map(|i| TaskRequest {
            name: task.into(),
            args: vec![json!(i)],
            kwargs: serde_json::Map::new(),
            options: SendOptions::default(),
        })
        .collect();
    let mut c = redis.conn()?;
    let start = Instant::now();
    let mut pending = Vec::with_capacity(n);
    for chunk in reqs.chunks(1000) {
        pending.extend(p.send_many(chunk).await?);
    }
    while !pending.is_empty() {
        ensure!(
            start.elapsed() < Duration::from_secs(300),
            "{task}: {} tasks never finished",
            pending.len()
        );
        let mut still = Vec::new();
        for chunk in pending.chunks(500) {
            let keys: Vec<String> = chunk
                .iter()
                .map(|id| format!("celery-task-meta-{id}"))
                .collect();
            let vals: Vec<Option<String>> = redis::cmd("MGET").arg(&keys).query(&mut c)?;
            for (id, v) in chunk.iter().zip(vals) {
                let status = v
                    .and_then(|v| serde_json::from_str::<serde_json::Value>(&v).ok())
                    .and_then(|v| v["status"].as_str().map(str::to_owned));
                match status.as_deref() {
                    Some("SUCCESS") => {}
                    Some("FAILURE") => bail!("{task} {id} failed"),
                    _ => still.push(id.clone()),
                }
            }
        }
        pending = still;
        if !pending.is_empty() {
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    }
    Ok(n as f64 / start.elapsed().as_secs_f64())
}

/// Median round trip (send, run, result) of one task at a time.
async fn latency(p: &Producer, task: &str, samples: usize) -> Result<Duration> {
    let mut times = Vec::with_capacity(samples);
    for i in 0..samples.max(1) {
        let start = Instant::now();
        let id = p.send_task(task, vec![json!(i)]).await?;
        let r = p.wait(&id, Duration::from_secs(30)).await?;
        ensure!(r.status == TaskState::Success, "{task} {id}: {r:?}");
        times.push(start.elapsed());
    }
    Ok(median_d(&mut times))
}

fn median_d(v: &mut [Duration]) -> Duration {
    v.sort_unstable();
    v[v.len() / 2]
}

fn median_f(v: &mut [f64]) -> f64 {
    v.sort_unstable_by(f64::total_cmp);
    v[v.len() / 2]
}

fn ms(d: Duration) -> String {
    format!("{:.2} ms", d.as_secs_f64() * 1000.0)
}

#[tokio::main]
async fn main() -> Result<()> {
    let cli = Cli::parse();
    let bin = worker_bin(&cli)?;
    let redis = RedisServer::start()?;
    let http = echo_server().await?;
    let ns = "bench-declared";
    let w = spawn(&bin, &redis, ns, &http, cli.concurrency)?;
    let p = taskstack_integration::producer(&redis.url(), ns)?;
    println!(
        "worker: {} (concurrency {}), {} tasks per throughput run, {} latency samples",
        bin.display(),
        cli.concurrency,
        cli.tasks,
        cli.latency_samples
    );
    // Warm-up: connections, the page cache for /bin/cat.
    for (task, _) in KINDS {
        latency(&p, task, 10).await?;
    }
    let mut tput = vec![Vec::new(); KINDS.len()];
    let mut lat = vec![Vec::new(); KINDS.len()];
    println!("| run | task | tasks/s | median round trip |");
    println!("| --- | --- | --- | --- |");
    for run in 1..=cli.runs.max(1) {
        for (k, (task, label)) in KINDS.iter().enumerate() {
            let t = throughput(&p, &redis, task, cli.tasks).await?;
            let l = latency(&p, task, cli.latency_samples).await?;
            println!("| {run} | {label} | {t:.0} | {} |", ms(l));
            tput[k].push(t);
            lat[k].push(l);
        }
    }
    println!();
    println!("Medians of {} runs:", cli.runs.max(1));
    println!("| task | tasks/s | median round trip | overhead per task vs echo (round trip) |");
    println!("| --- | --- | --- | --- |");
    let echo_lat = median_d(&mut lat[0]);
    for (k, (_, label)) in KINDS.iter().enumerate() {
        let t = median_f(&mut tput[k]);
        let l = median_d(&mut lat[k]);
        println!(
            "| {label} | {t:.0} | {} | {} |",
            ms(l),
            ms(l.saturating_sub(echo_lat))
        );
    }
    let peak = std::fs::read_to_string(format!("/proc/{}/status", w.child.id()))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))?
                .split_whitespace()
                .nth(1)?
                .parse::<u64>()
                .ok()
        });
    if let Some(kib) = peak {
        println!("worker peak RSS (VmHWM): {:.1} MB", kib as f64 / 1024.0);
    }
    Ok(())
}
