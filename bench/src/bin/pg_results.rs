//! `pg_results`: tasks/s and enqueue-to-result latency of one release
//! `taskstack-worker` with results in PostgreSQL against results in Redis,
//! same machine, same run, alternating, on a throwaway `redis-server` and a
//! throwaway `postgres` (Debian's package; a database per run). It prints
//! each run and the medians; it asserts nothing about them.
//!
//! ```sh
//! cargo build --release -p taskstack-worker
//! cargo run --release -p taskstack-bench --bin pg_results -- --runs 3
//! cargo run --release -p taskstack-bench --bin pg_results -- --runs 3 --pg-fsync on
//! ```
//!
//! The throwaway `postgres` runs with `fsync=off` unless `--pg-fsync on`
//! asks for a durable server (every commit waits for the disk, as in
//! production).
//!
//! Throughput: `--tasks` echo tasks are enqueued before the worker starts;
//! the clock runs from the worker's "worker ready" state file to the moment
//! the queue is empty and nothing is held (a message is acknowledged only
//! after its result is stored, so then every result is stored). Latency:
//! one task at a time, sent and awaited with `Producer::wait` (Redis
//! PUBLISH or PostgreSQL NOTIFY).

use anyhow::{Context as _, Result, bail, ensure};
use clap::Parser;
use serde_json::json;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};
use taskstack::backend::{Backend, PostgresBackend, RedisBackend, Use};
use taskstack::config::{PgTarget, Secret};
use taskstack::{Producer, SendOptions, TaskRequest};
use taskstack_integration::{PG_PASSWORD, PgServer, RedisServer};

#[derive(Debug, Parser)]
#[command(about = "Worker throughput and latency with PostgreSQL results against Redis results")]
struct Cli {
    /// Tasks per throughput measurement.
    #[arg(long, default_value_t = 50_000)]
    tasks: usize,
    /// One-at-a-time round trips per latency measurement.
    #[arg(long, default_value_t = 300)]
    latency_samples: usize,
    /// Repetitions of each store; the summary shows medians.
    #[arg(long, default_value_t = 3)]
    runs: usize,
    /// The worker's TASKSTACK_CONCURRENCY.
    #[arg(long, default_value_t = 64)]
    concurrency: usize,
    /// The worker's TASKSTACK_PREFETCH.
    #[arg(long, default_value_t = 512)]
    prefetch: usize,
    /// The PostgreSQL server's `fsync`: `on` is a durable server (every
    /// commit waits for the disk, as in production); `off` is the tests'
    /// setting.
    #[arg(long, value_enum, default_value_t = Fsync::Off)]
    pg_fsync: Fsync,
    /// The worker binary (default: `<target dir>/release/taskstack-worker`).
    #[arg(long, value_name = "PATH")]
    worker_bin: Option<PathBuf>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum Fsync {
    On,
    Off,
}

struct Worker {
    child: Child,
    dir: tempfile::TempDir,
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

/// Starts a worker and returns once it has recorded itself (ready).
fn spawn(
    cli: &Cli,
    bin: &PathBuf,
    redis: &RedisServer,
    ns: &str,
    pg: Option<&str>,
) -> Result<Worker> {
    let dir = tempfile::tempdir()?;
    let mut cmd = Command::new(bin);
    for (k, _) in std::env::vars().filter(|(k, _)| k.starts_with("TASKSTACK_")) {
        cmd.env_remove(k);
    }
    cmd.env("TASKSTACK_BROKER_URL", redis.url())
        .env("TASKSTACK_NAMESPACE", ns)
        .env("TASKSTACK_CONCURRENCY", cli.concurrency.to_string())
        .env("TASKSTACK_PREFETCH", cli.prefetch.to_string())
        .env("TASKSTACK_ALLOW_ROOT", "1")
        .env("TASKSTACK_WORKER_METRICS_LISTEN", "off")
        .env("TASKSTACK_WORKER_STATE_FILE", dir.path().join("w.json"))
        .env("TASKSTACK_LOG_LEVEL", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::inherit());
    if let Some(url) = pg {
        cmd.env("TASKSTACK_RESULT_BACKEND", url)
            .env("TASKSTACK_RESULT_BACKEND_PASSWORD", PG_PASSWORD);
    }
    let child = cmd.spawn().context("cannot start the worker")?;
    let w = Worker { child, dir };
    let state = w.dir.path().join("w.json");
    let start = Instant::now();
    while !state.exists() {
        ensure!(
            start.elapsed() < Duration::from_secs(60),
            "the worker did not start"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    Ok(w)
}

fn echo(i: usize) -> TaskRequest {
    TaskRequest {
        name: "taskstack.echo".into(),
        args: vec![json!(i)],
        kwargs: serde_json::Map::new(),
        options: SendOptions::default(),
    }
}

/// One store's figures.
struct Figures {
    tasks_per_s: f64,
    p50_ms: f64,
    p99_ms: f64,
}

async fn run(
    cli: &Cli,
    bin: &PathBuf,
    redis: &RedisServer,
    pg: Option<&PgServer>,
) -> Result<Figures> {
    let ns = taskstack_integration::namespace("pgbench");
    let broker = taskstack_integration::broker(&redis.url(), &ns)?;
    let (backend, url): (Arc<dyn Backend>, Option<String>) = match pg {
        None => (Arc::new(RedisBackend::new(broker)), None),
        Some(pg) => {
            let db = pg.create_database();
            let url = pg.url(&db);
            let target = PgTarget::new("result_backend", &url, Some(&Secret::new(PG_PASSWORD)))?;
            taskstack::backend::postgres::prepare(
                &target,
                Duration::from_secs(5),
                Duration::from_secs(10),
            )
            .await?;
            let b = PostgresBackend::new(broker, &target, 4, Duration::from_secs(5))?;
            (Arc::new(b), Some(url))
        }
    };
    let producer = Producer::on_backend(Arc::clone(&backend), "bench");
    let reqs: Vec<TaskRequest> = (0..cli.tasks).map(echo).collect();
    for chunk in reqs.chunks(1000) {
        producer.send_many(chunk).await?;
    }
    let worker = spawn(cli, bin, redis, &ns, url.as_deref())?;
    let start = Instant::now();
    let queues = vec![taskstack::proto::keys::queue_key("celery", 0)];
    let mut inspect = backend.inspect(Use::Request);
    loop {
        let c = inspect.queue_counts(&queues).await?;
        if c[0].ready == 0 && c[0].in_flight == 0 {
            break;
        }
        ensure!(
            start.elapsed() < Duration::from_secs(600),
            "drain took over 10 min"
        );
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    let tasks_per_s = cli.tasks as f64 / start.elapsed().as_secs_f64();
    let mut times = Vec::with_capacity(cli.latency_samples);
    for i in 0..cli.latency_samples {
        let t = Instant::now();
        let id = producer.send(&echo(i)).await?;
        let r = producer.wait(&id, Duration::from_secs(10)).await?;
        ensure!(r.status.is_ready(), "{id} ended {:?}", r.status);
        times.push(t.elapsed().as_secs_f64() * 1000.0);
    }
    drop(worker);
    times.sort_by(f64::total_cmp);
    let rank = |p: f64| times[((p * times.len() as f64).ceil() as usize).clamp(1, times.len()) - 1];
    Ok(Figures {
        tasks_per_s,
        p50_ms: rank(0.5),
        p99_ms: rank(0.99),
    })
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied().unwrap_or(f64::NAN)
}

#[tokio::main]
async fn main() -> Result<()> {
    let cli = Cli::parse();
    ensure!(
        cli.runs > 0 && cli.latency_samples > 0,
        "--runs and --latency-samples must be > 0"
    );
    let bin = worker_bin(&cli)?;
    let redis = RedisServer::start()?;
    let pg = match cli.pg_fsync {
        Fsync::On => PgServer::start_durable(),
        Fsync::Off => PgServer::start(),
    };
    let fsync = pg
        .psql("postgres", "SHOW fsync")
        .map_err(anyhow::Error::msg)?;
    println!(
        "{} echo tasks per run, concurrency {}, prefetch {}, {} latency samples, {} runs each, \
         PostgreSQL fsync={}",
        cli.tasks,
        cli.concurrency,
        cli.prefetch,
        cli.latency_samples,
        cli.runs,
        fsync.trim()
    );
    let mut all: [Vec<Figures>; 2] = [Vec::new(), Vec::new()];
    for r in 0..cli.runs {
        for (i, (name, store)) in [("redis", None), ("postgresql", Some(&pg))]
            .into_iter()
            .enumerate()
        {
            let f = run(&cli, &bin, &redis, store).await?;
            println!(
                "run {} {name:>10}: {:>8.0} tasks/s  latency p50 {:.2} ms  p99 {:.2} ms",
                r + 1,
                f.tasks_per_s,
                f.p50_ms,
                f.p99_ms
            );
            all[i].push(f);
        }
    }
    for (name, figs) in ["redis", "postgresql"].iter().zip(&all) {
        println!(
            "median {name:>10}: {:>8.0} tasks/s  latency p50 {:.2} ms  p99 {:.2} ms",
            median(figs.iter().map(|f| f.tasks_per_s).collect()),
            median(figs.iter().map(|f| f.p50_ms).collect()),
            median(figs.iter().map(|f| f.p99_ms).collect()),
        );
    }
    Ok(())
}
