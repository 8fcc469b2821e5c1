//! `rabbitmq`: one `taskstack-worker` on RabbitMQ, the same worker on
//! Redis, and a Python Celery worker (`-P prefork -c 2`) on RabbitMQ, in
//! the same run, at default settings, results on the same Redis for all
//! three; with `--postgres`, also the taskstack worker on RabbitMQ with
//! results in PostgreSQL (no Redis at all). For each it prints the drain
//! rate of a prefilled queue and the round-trip latency of single tasks on
//! the idle worker; then the medians and the ratios. It asserts nothing
//! about the figures. See `bench/README.md`.
//!
//! ```sh
//! cargo build --release -p taskstack-worker -p taskstack-bench
//! target/release/rabbitmq --runs 3 [--postgres]
//! ```
//!
//! One measurement: the result Redis is emptied (`FLUSHALL`) and, on
//! RabbitMQ, a fresh vhost is made; N Celery-protocol `taskstack.echo`
//! messages are put in the queue `celery` (on RabbitMQ published with
//! publisher confirms, on Redis `LPUSH`ed) before any worker runs; the
//! worker starts and the clock starts when it says it is ready (both
//! consume from their start, so the few messages taken before the ready
//! line are a head start of a few milliseconds at most). The bench then
//! polls `DBSIZE` on the result Redis every 2 ms until it reaches N and
//! reads the pending results with `MGET` until every one is SUCCESS (a
//! STARTED record counts as pending: on RabbitMQ taskstack marks starts
//! with it). Then, on the same idle worker, single tasks are sent one at
//! a time with taskstack's producer and waited for (`send_task` to
//! result), the same producer code for all three.
//!
//! With PostgreSQL results each drain gets a fresh database; completion is
//! polled every 20 ms with one `count(*)` of the results table's SUCCESS
//! rows (a scan, so not every 2 ms), so the rate's resolution is 20 ms.

#[allow(dead_code, reason = "shared with the canvas bench")]
#[path = "../canvas_procs.rs"]
mod canvas_procs;
#[allow(
    dead_code,
    reason = "shared with the main bench; this binary uses part of it"
)]
#[path = "../latency.rs"]
mod latency;
#[allow(
    dead_code,
    reason = "shared with the main bench; this binary uses part of it"
)]
#[path = "../stats.rs"]
mod stats;

use anyhow::{Context as _, Result, bail, ensure};
use canvas_procs::{CeleryPool, Service};
use clap::Parser;
use serde_json::json;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};
use taskstack::backend::{Outgoing, Use};
use taskstack::config::Config;
use taskstack::config::Secret;
use taskstack::proto::envelope::{MessageSpec, encode};
use taskstack::proto::keys::result_key;
use taskstack::{Producer, open_backend};
use taskstack_integration::rabbitmq_server::Rabbit;
use taskstack_integration::{PG_PASSWORD, PgServer, RedisServer};

/// The task every worker runs (latency.rs sends it too).
const ECHO: &str = "taskstack.echo";
/// The queue all three consume (their default).
const QUEUE: &str = "celery";
/// Messages per publish or `LPUSH`, and keys per `MGET`.
const CHUNK: usize = 1_000;

#[derive(Debug, Parser)]
#[command(
    about = "taskstack on RabbitMQ, taskstack on Redis and Celery prefork -c 2 on RabbitMQ: drain rate and latency at default settings, in one run"
)]
struct Cli {
    /// Messages prefilled for each taskstack drain.
    #[arg(long, default_value_t = 20_000)]
    tasks: usize,
    /// Messages prefilled for each Celery drain.
    #[arg(long, default_value_t = 5_000)]
    celery_tasks: usize,
    /// Measured round trips per worker (after 20 unmeasured ones).
    #[arg(long, default_value_t = 200)]
    latency_samples: usize,
    /// Repetitions; the summary shows medians.
    #[arg(long, default_value_t = 3)]
    runs: usize,
    /// The Celery worker's --concurrency (prefork processes).
    #[arg(long, default_value_t = 2)]
    celery_concurrency: usize,
    /// Only taskstack.
    #[arg(long)]
    no_celery: bool,
    /// Also taskstack on RabbitMQ with results in PostgreSQL (a private
    /// `postgres` from Debian's package, `fsync=off` like the Redis
    /// without persistence, unless `--pg-durable`).
    #[arg(long)]
    postgres: bool,
    /// The private PostgreSQL with `fsync=on` (every commit waits for the
    /// disk, as in production).
    #[arg(long, requires = "postgres")]
    pg_durable: bool,
    /// The worker binary (default: `taskstack-worker` beside this one).
    #[arg(long, value_name = "PATH")]
    worker_bin: Option<PathBuf>,
    /// Give up on a drain after this many seconds.
    #[arg(long, default_value_t = 600)]
    timeout: u64,
}

/// Which worker on which broker.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum System {
    TaskstackRabbit,
    TaskstackRabbitPg,
    TaskstackRedis,
    CeleryRabbit,
}

impl System {
    fn label(self) -> &'static str {
        match self {
            Self::TaskstackRabbit => "taskstack on RabbitMQ",
            Self::TaskstackRabbitPg => "taskstack on RabbitMQ + PostgreSQL",
            Self::TaskstackRedis => "taskstack on Redis",
            Self::CeleryRabbit => "Celery on RabbitMQ",
        }
    }
}

/// One measurement's figures.
#[derive(Debug)]
struct Run {
    system: System,
    tasks: usize,
    seconds: f64,
    latency: stats::Latency,
}

impl Run {
    fn tasks_per_s(&self) -> f64 {
        self.tasks as f64 / self.seconds
    }
}

/// Where one measurement's messages and results live.
struct Target<'a> {
    /// `amqp://...` (a fresh vhost) or the Redis URL.
    broker: String,
    redis: &'a RedisServer,
    /// Results in this PostgreSQL database (URL without the password)
    /// instead of on Redis.
    pg: Option<String>,
    namespace: String,
}

impl Target<'_> {
    /// The result backend's URL.
    fn results(&self) -> String {
        self.pg.clone().unwrap_or_else(|| self.redis.url())
    }

    fn config(&self) -> Config {
        Config {
            broker_url: self.broker.as_str().into(),
            result_backend: Some(self.results().as_str().into()),
            result_backend_password: self.pg.as_ref().map(|_| Secret::new(PG_PASSWORD)),
            namespace: self.namespace.clone(),
            ..Default::default()
        }
    }
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<()> {
    let cli = Cli::parse();
    ensure!(cli.runs > 0, "--runs must be at least 1");
    ensure!(
        cli.tasks > 0 && cli.celery_tasks > 0 && cli.latency_samples > 0,
        "--tasks, --celery-tasks and --latency-samples must be at least 1"
    );
    let worker_bin = canvas_procs::worker_bin(cli.worker_bin.as_deref())?;
    let python = if cli.no_celery {
        None
    } else {
        Some(canvas_procs::celery_python()?)
    };
    if cfg!(debug_assertions) {
        eprintln!("warning: rabbitmq is a debug build (it runs the producer of the latency phase)");
    }
    let node = tokio::task::spawn_blocking(Rabbit::start).await?;
    let redis = RedisServer::start()?;
    let pg = match (cli.postgres, cli.pg_durable) {
        (false, _) => None,
        (true, false) => Some(tokio::task::spawn_blocking(PgServer::start).await?),
        (true, true) => Some(tokio::task::spawn_blocking(PgServer::start_durable).await?),
    };
    let mut con = redis::Client::open(redis.url())?
        .get_multiplexed_async_connection()
        .await?;
    println!("RabbitMQ against Redis at default settings");
    println!(
        "  RabbitMQ {} on 127.0.0.1:{} (a private node, a vhost per drain); results on redis-server at 127.0.0.1:{} (no persistence); {} CPUs",
        node.ctl(&["version"]).trim(),
        node.port,
        redis.port(),
        std::thread::available_parallelism().map_or(0, std::num::NonZero::get)
    );
    if let Some(pg) = &pg {
        println!(
            "  PostgreSQL {} (fsync {}, a database per drain) for taskstack on RabbitMQ + PostgreSQL",
            pg.psql("postgres", "SHOW server_version")
                .map_err(anyhow::Error::msg)?
                .trim(),
            pg.psql("postgres", "SHOW fsync")
                .map_err(anyhow::Error::msg)?
                .trim()
        );
    }
    println!("  taskstack: {} (defaults)", worker_bin.display());
    if let Some(p) = &python {
        println!(
            "  celery: {} -m celery worker {} (otherwise defaults)",
            p.display(),
            CeleryPool::Prefork.args(cli.celery_concurrency).join(" ")
        );
    }
    println!(
        "  {} messages per taskstack drain, {} per Celery drain, {} round trips each, {} run(s)",
        cli.tasks, cli.celery_tasks, cli.latency_samples, cli.runs
    );
    println!();

    let mut runs = Vec::new();
    let timeout = Duration::from_secs(cli.timeout);
    for run in 1..=cli.runs {
        let mut systems = vec![System::TaskstackRabbit];
        if pg.is_some() {
            systems.push(System::TaskstackRabbitPg);
        }
        systems.push(System::TaskstackRedis);
        if python.is_some() {
            systems.push(System::CeleryRabbit);
        }
        for system in systems {
            let target = Target {
                broker: if system == System::TaskstackRedis {
                    redis.url()
                } else {
                    node.vhost("bench")
                },
                redis: &redis,
                pg: pg
                    .as_ref()
                    .filter(|_| system == System::TaskstackRabbitPg)
                    .map(|pg| pg.url(&pg.create_database())),
                namespace: taskstack_integration::namespace("bench"),
            };
            let n = if system == System::CeleryRabbit {
                cli.celery_tasks
            } else {
                cli.tasks
            };
            let start = || match system {
                System::CeleryRabbit => Service::celery_on(
                    python.as_deref().context("no Celery")?,
                    &target.broker,
                    &redis.url(),
                    "drain_tasks",
                    CeleryPool::Prefork,
                    cli.celery_concurrency,
                ),
                _ => taskstack_worker(&worker_bin, &target),
            };
            let r = measure(&mut con, system, &target, n, run, &cli, timeout, start)
                .await
                .with_context(|| format!("run {run}, {}", system.label()))?;
            println!(
                "run {run} {:<22} {:>6} tasks in {:>7.3} s: {:>8.0} tasks/s; latency p50 {:.3} ms, p99 {:.3} ms",
                system.label(),
                r.tasks,
                r.seconds,
                r.tasks_per_s(),
                r.latency.p50,
                r.latency.p99
            );
            runs.push(r);
        }
    }
    print_summary(&runs);
    Ok(())
}

/// A `taskstack-worker` with default settings on `t`'s broker and results.
fn taskstack_worker(bin: &Path, t: &Target<'_>) -> Result<Service> {
    let mut env = vec![
        ("TASKSTACK_RESULT_BACKEND", t.results()),
        ("TASKSTACK_NAMESPACE", t.namespace.clone()),
    ];
    if t.pg.is_some() {
        env.push(("TASKSTACK_RESULT_BACKEND_PASSWORD", PG_PASSWORD.to_owned()));
    }
    Service::taskstack(bin, &t.broker, &env)
}

/// The prefilled messages: `taskstack.echo` with one argument each, as
/// Celery's own client writes them (protocol 2, JSON).
fn messages(system: System, run: usize, n: usize) -> Vec<(String, String)> {
    (0..n)
        .map(|i| {
            let id = format!("{system:?}-{run}-{i:07}");
            let args = [json!(i)];
            let payload = encode(&MessageSpec {
                id: &id,
                task: ECHO,
                args: &args,
                queue: QUEUE,
                origin: "bench@rabbitmq",
                ..MessageSpec::default()
            });
            (id, payload)
        })
        .collect()
}

/// Prefills, starts the worker, times the drain, then the round trips.
#[allow(clippy::too_many_arguments, reason = "one call site")]
async fn measure(
    con: &mut redis::aio::MultiplexedConnection,
    system: System,
    target: &Target<'_>,
    n: usize,
    run: usize,
    cli: &Cli,
    timeout: Duration,
    start: impl FnOnce() -> Result<Service>,
) -> Result<Run> {
    let _: () = redis::cmd("FLUSHALL").query_async(con).await?;
    let msgs = messages(system, run, n);
    if system == System::TaskstackRedis {
        for chunk in msgs.chunks(CHUNK) {
            let payloads: Vec<&str> = chunk.iter().map(|(_, p)| p.as_str()).collect();
            let _: () = redis::cmd("LPUSH")
                .arg(QUEUE)
                .arg(&payloads)
                .query_async(con)
                .await?;
        }
    } else {
        // Published with confirms, as the producer does; no PENDING records
        // (they would count as results).
        let backend = open_backend(&target.config())?;
        let mut enqueue = backend.enqueue(Use::Request);
        for chunk in msgs.chunks(CHUNK) {
            let batch: Vec<Outgoing> = chunk
                .iter()
                .map(|(_, p)| Outgoing {
                    queue_key: QUEUE.into(),
                    payload: p.clone(),
                    due_ms: None,
                    pending: None,
                })
                .collect();
            enqueue.enqueue(&batch).await?;
        }
    }
    let keys: Vec<String> = msgs.iter().map(|(id, _)| result_key(id)).collect();
    drop(msgs);

    let worker = start()?;
    let t0 = Instant::now();
    let done = match &target.pg {
        None => wait_results(con, &keys, t0 + timeout, &worker).await?,
        Some(url) => wait_rows(url, keys.len(), t0 + timeout, &worker).await?,
    };
    let seconds = done.duration_since(t0).as_secs_f64();

    let producer = Producer::on_backend(open_backend(&target.config())?, "bench@rabbitmq");
    let latency = latency::measure_latency(
        &producer,
        20,
        cli.latency_samples,
        latency::Api::SendAndWait,
    )
    .await
    .with_context(|| format!("{} log tail:\n{}", worker.name(), worker.log_tail()))?;
    worker.stop()?;
    Ok(Run {
        system,
        tasks: n,
        seconds,
        latency,
    })
}

/// Polls `DBSIZE` every 2 ms; from N keys on, reads the pending results
/// until every one is SUCCESS. When that was seen.
async fn wait_results(
    con: &mut redis::aio::MultiplexedConnection,
    keys: &[String],
    deadline: Instant,
    worker: &Service,
) -> Result<Instant> {
    let mut pending: Vec<&str> = keys.iter().map(String::as_str).collect();
    loop {
        let size: u64 = redis::cmd("DBSIZE").query_async(con).await?;
        if size >= keys.len() as u64 {
            let mut still = Vec::new();
            for chunk in pending.chunks(CHUNK) {
                let found: Vec<Option<String>> =
                    redis::cmd("MGET").arg(chunk).query_async(con).await?;
                for (k, v) in chunk.iter().zip(found) {
                    match v {
                        Some(v) if v.contains("\"SUCCESS\"") => {}
                        Some(v) if v.contains("\"FAILURE\"") || v.contains("\"REVOKED\"") => {
                            bail!("{k} is not SUCCESS: {v}")
                        }
                        _ => still.push(*k),
                    }
                }
            }
            pending = still;
            if pending.is_empty() {
                return Ok(Instant::now());
            }
        }
        worker.check_running()?;
        if Instant::now() > deadline {
            bail!(
                "{} of {} results missing; {} log tail:\n{}",
                pending.len(),
                keys.len(),
                worker.name(),
                worker.log_tail()
            );
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

/// Polls the results table (the drain's own database) every 20 ms until
/// `n` rows are SUCCESS (a FAILURE or REVOKED row fails the run). When
/// that was seen.
async fn wait_rows(url: &str, n: usize, deadline: Instant, worker: &Service) -> Result<Instant> {
    let mut config: tokio_postgres::Config = url.parse()?;
    config.password(PG_PASSWORD);
    let (client, connection) = config.connect(tokio_postgres::NoTls).await?;
    tokio::spawn(connection);
    let count = client
        .prepare(
            "SELECT count(*) FILTER (WHERE state = 'SUCCESS'),
                    count(*) FILTER (WHERE state IN ('FAILURE', 'REVOKED'))
             FROM taskstack_results",
        )
        .await
        .context("the results table (made by the worker at its start)")?;
    loop {
        let row = client.query_one(&count, &[]).await?;
        let (done, failed): (i64, i64) = (row.get(0), row.get(1));
        ensure!(failed == 0, "{failed} results are FAILURE or REVOKED");
        if usize::try_from(done).is_ok_and(|d| d >= n) {
            return Ok(Instant::now());
        }
        worker.check_running()?;
        if Instant::now() > deadline {
            bail!(
                "{done} of {n} results SUCCESS; {} log tail:\n{}",
                worker.name(),
                worker.log_tail()
            );
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn print_summary(runs: &[Run]) {
    println!();
    println!("| system | tasks/s (median) | runs | latency p50 / p99 ms (median) |");
    println!("| --- | --- | --- | --- |");
    let mut rates = Vec::new();
    for system in [
        System::TaskstackRabbit,
        System::TaskstackRabbitPg,
        System::TaskstackRedis,
        System::CeleryRabbit,
    ] {
        let mine: Vec<&Run> = runs.iter().filter(|r| r.system == system).collect();
        if mine.is_empty() {
            continue;
        }
        let med = |f: &dyn Fn(&Run) -> f64| {
            stats::median(&mine.iter().map(|r| Some(f(r))).collect::<Vec<_>>()).unwrap_or(f64::NAN)
        };
        let rate = med(&Run::tasks_per_s);
        let each: Vec<String> = mine
            .iter()
            .map(|r| format!("{:.0}", r.tasks_per_s()))
            .collect();
        println!(
            "| {} | {rate:.0} | {} | {:.3} / {:.3} |",
            system.label(),
            each.join(" / "),
            med(&|r| r.latency.p50),
            med(&|r| r.latency.p99)
        );
        rates.push((system, rate));
    }
    let rate = |s: System| rates.iter().find(|(x, _)| *x == s).map(|(_, r)| *r);
    println!();
    if let (Some(a), Some(b)) = (rate(System::TaskstackRabbit), rate(System::TaskstackRedis)) {
        println!("taskstack on RabbitMQ / on Redis: {:.2}x", a / b);
    }
    if let (Some(a), Some(c)) = (rate(System::TaskstackRabbit), rate(System::CeleryRabbit)) {
        println!("taskstack / Celery, both on RabbitMQ: {:.1}x", a / c);
    }
    if let (Some(p), Some(a)) = (
        rate(System::TaskstackRabbitPg),
        rate(System::TaskstackRabbit),
    ) {
        println!(
            "taskstack on RabbitMQ, results in PostgreSQL / on Redis: {:.2}x",
            p / a
        );
    }
    if let (Some(p), Some(c)) = (rate(System::TaskstackRabbitPg), rate(System::CeleryRabbit)) {
        println!(
            "taskstack on RabbitMQ + PostgreSQL / Celery on RabbitMQ (results on Redis): {:.1}x",
            p / c
        );
    }
}
