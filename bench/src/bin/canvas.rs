//! `canvas`: a chain of N `add` steps and a chord of N `add` members with
//! an `echo` body, on one release `taskstack-worker` and on a Python
//! Celery worker, against the same throwaway `redis-server`. For each it
//! prints the time from the send to the final result, the steps (or
//! members) per second and the Redis commands per step (`INFO
//! commandstats` over the measurement / N); then the medians. It asserts
//! nothing about the figures. See `bench/README.md`.
//!
//! ```sh
//! cargo build --release -p taskstack-worker -p taskstack-bench
//! target/release/canvas --runs 3
//! ```

#[allow(dead_code, reason = "shared with the drain and backlog benches")]
#[path = "../canvas_procs.rs"]
mod canvas_procs;
#[path = "../canvas_report.rs"]
mod canvas_report;
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
use canvas_procs::{CeleryClient, CeleryPool, Service};
use canvas_report::{print_measure, print_summary};
use clap::Parser;
use redis_info::{CmdStat, commandstats, info_field, redis_cpu_s};
use serde_json::{Value, json};
use std::path::PathBuf;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use taskstack::proto::keys::result_key;
use taskstack::{ChordOptions, TaskRequest};
use taskstack_integration::RedisServer;

#[derive(Debug, Parser)]
#[command(
    about = "Chain and chord time and Redis commands per step: taskstack-worker against a Python Celery worker"
)]
pub(crate) struct Cli {
    /// Steps of the chain.
    #[arg(long, default_value_t = 10_000)]
    chain: usize,
    /// Header members of the chord.
    #[arg(long, default_value_t = 10_000)]
    chord: usize,
    /// Steps of the chain on Celery (default: --chain).
    #[arg(long)]
    celery_chain: Option<usize>,
    /// Header members of the chord on Celery (default: --chord).
    #[arg(long)]
    celery_chord: Option<usize>,
    /// Repetitions; the summary shows medians.
    #[arg(long, default_value_t = 3)]
    runs: usize,
    /// The taskstack worker's TASKSTACK_CONCURRENCY.
    #[arg(long, default_value_t = 16)]
    concurrency: usize,
    /// The taskstack worker's TASKSTACK_MAX_MESSAGE_SIZE: a chain's first
    /// message carries every later step (about 2.7 MB for 10,000 steps).
    #[arg(long, default_value = "64MiB")]
    max_message_size: String,
    /// The Celery worker's pool.
    #[arg(long, value_enum, default_value_t = CeleryPool::Prefork)]
    celery_pool: CeleryPool,
    /// The Celery worker's --concurrency (prefork processes; solo is always 1).
    #[arg(long, default_value_t = 2)]
    celery_concurrency: usize,
    /// Only taskstack.
    #[arg(long)]
    no_celery: bool,
    /// The worker binary (default: `<target dir>/release/taskstack-worker`).
    #[arg(long, value_name = "PATH")]
    worker_bin: Option<PathBuf>,
    /// Give up waiting for one canvas's result after this many seconds.
    #[arg(long, default_value_t = 900)]
    timeout: u64,
}

/// The worker processes compared.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum System {
    Taskstack,
    Celery,
}

impl System {
    pub(crate) fn label(self) -> &'static str {
        match self {
            Self::Taskstack => "taskstack",
            Self::Celery => "celery",
        }
    }
}

/// The canvases measured.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Canvas {
    Chain,
    Chord,
}

impl Canvas {
    pub(crate) fn label(self) -> &'static str {
        match self {
            Self::Chain => "chain",
            Self::Chord => "chord",
        }
    }
}

/// One canvas sent and followed to its result.
#[derive(Debug)]
pub(crate) struct Measure {
    pub(crate) system: System,
    pub(crate) canvas: Canvas,
    pub(crate) n: usize,
    pub(crate) outcome: Result<Timed, String>,
}

#[derive(Debug)]
pub(crate) struct Timed {
    /// Start of the send → the final result seen.
    pub(crate) seconds: f64,
    /// How long the send call itself took.
    pub(crate) send_s: f64,
    /// Commands over the measurement, the bench's own polling removed.
    pub(crate) cmds: Vec<CmdStat>,
    pub(crate) redis_cpu_s: Option<f64>,
}

impl Timed {
    pub(crate) fn cmds_per_step(&self, n: usize) -> f64 {
        self.cmds.iter().map(|c| c.calls).sum::<u64>() as f64 / n as f64
    }
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<()> {
    let cli = Cli::parse();
    ensure!(cli.runs > 0, "--runs must be at least 1");
    ensure!(cli.chain > 0, "--chain must be at least 1");
    ensure!(cli.chord > 0, "--chord must be at least 1");
    ensure!(
        cli.celery_chain != Some(0) && cli.celery_chord != Some(0),
        "--celery-chain and --celery-chord must be at least 1"
    );
    let worker_bin = canvas_procs::worker_bin(cli.worker_bin.as_deref())?;
    let python = if cli.no_celery {
        None
    } else {
        Some(canvas_procs::celery_python()?)
    };
    if cfg!(debug_assertions) {
        eprintln!("warning: canvas is a debug build; the Rust producer is unoptimised");
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
    let celery_url = format!("redis://127.0.0.1:{}/1", redis.port());
    let mut celery_con = redis::Client::open(celery_url.as_str())?
        .get_multiplexed_async_connection()
        .await?;
    let cpus = std::thread::available_parallelism().map_or(0, std::num::NonZero::get);
    println!("canvas benchmark");
    println!(
        "  redis-server {} on 127.0.0.1:{} (no persistence), {cpus} CPUs",
        info_field(&info, "redis_version").unwrap_or("?"),
        redis.port()
    );
    println!(
        "  taskstack: {} (concurrency {}, max message size {}), db 0",
        worker_bin.display(),
        cli.concurrency,
        cli.max_message_size
    );
    if let Some(p) = &python {
        println!(
            "  celery: {} -m celery worker {} (log level WARNING), db 1",
            p.display(),
            cli.celery_pool.args(cli.celery_concurrency).join(" ")
        );
    }
    println!();

    let mut all = Vec::new();
    for k in 1..=cli.runs {
        let _: () = redis::cmd("FLUSHALL").query_async(&mut con).await?;
        let env = [
            ("TASKSTACK_CONCURRENCY", cli.concurrency.to_string()),
            ("TASKSTACK_MAX_MESSAGE_SIZE", cli.max_message_size.clone()),
        ];
        let worker = Service::taskstack(&worker_bin, &url, &env)?;
        for canvas in [Canvas::Chain, Canvas::Chord] {
            let m = measure_taskstack(&cli, &worker, &url, &mut con, canvas).await?;
            print_measure(k, &m);
            all.push(m);
        }
        worker.stop()?;
        if let Some(python) = &python {
            let _: () = redis::cmd("FLUSHALL").query_async(&mut con).await?;
            let worker = Service::celery(
                python,
                &celery_url,
                "canvas_tasks",
                cli.celery_pool,
                cli.celery_concurrency,
            )?;
            for canvas in [Canvas::Chain, Canvas::Chord] {
                let m = measure_celery(&cli, &worker, python, &celery_url, &mut celery_con, canvas)
                    .await?;
                print_measure(k, &m);
                all.push(m);
            }
            worker.stop()?;
        }
    }
    print_summary(&cli, &all);
    Ok(())
}

/// The expected result of the canvas of `n`, as both systems store it.
fn expected(canvas: Canvas, n: usize) -> Value {
    match canvas {
        Canvas::Chain => json!(n),
        Canvas::Chord => json!({
            "args": [(0..n).map(|i| 2 * i).collect::<Vec<_>>()],
            "kwargs": {},
        }),
    }
}

async fn measure_taskstack(
    cli: &Cli,
    worker: &Service,
    url: &str,
    con: &mut redis::aio::MultiplexedConnection,
    canvas: Canvas,
) -> Result<Measure> {
    let n = match canvas {
        Canvas::Chain => cli.chain,
        Canvas::Chord => cli.chord,
    };
    let producer = taskstack_integration::producer(url, worker.namespace())?;
    let (steps, body) = match canvas {
        Canvas::Chain => (
            vec![TaskRequest::new("taskstack.add", vec![json!(1)]); n],
            None,
        ),
        Canvas::Chord => (
            (0..n)
                .map(|i| TaskRequest::new("taskstack.add", vec![json!(i), json!(i)]))
                .collect(),
            Some(TaskRequest::new("taskstack.echo", vec![])),
        ),
    };
    let before = Before::take(con).await?;
    let t0 = Instant::now();
    let result_id = match &body {
        None => producer.send_chain(&steps).await?.result_id().to_owned(),
        Some(body) => {
            producer
                .send_chord(&steps, body, &ChordOptions::default())
                .await?
                .body_id
        }
    };
    let send_s = t0.elapsed().as_secs_f64();
    let done = wait_result(con, &result_id, cli.timeout, worker).await?;
    let seconds = done.at.duration_since(t0).as_secs_f64();
    let timed = before.finish(con, done.polls, seconds, send_s).await?;
    check_result(System::Taskstack, canvas, n, &done.record, worker)?;
    Ok(Measure {
        system: System::Taskstack,
        canvas,
        n,
        outcome: Ok(timed),
    })
}

async fn measure_celery(
    cli: &Cli,
    worker: &Service,
    python: &std::path::Path,
    url: &str,
    con: &mut redis::aio::MultiplexedConnection,
    canvas: Canvas,
) -> Result<Measure> {
    let n = match canvas {
        Canvas::Chain => cli.celery_chain.unwrap_or(cli.chain),
        Canvas::Chord => cli.celery_chord.unwrap_or(cli.chord),
    };
    let mut client = CeleryClient::build(
        python,
        url,
        canvas.label(),
        n,
        Duration::from_secs(cli.timeout),
    )?;
    let before = Before::take(con).await?;
    let sent = match client.send() {
        Ok(sent) => sent,
        Err(e) => {
            return Ok(Measure {
                system: System::Celery,
                canvas,
                n,
                outcome: Err(format!("{e:#}")),
            });
        }
    };
    let done = wait_result(con, &sent.result_id, cli.timeout, worker).await?;
    let seconds = done.wall - sent.send_start;
    let timed = before.finish(con, done.polls, seconds, sent.send_s).await?;
    check_result(System::Celery, canvas, n, &done.record, worker)?;
    Ok(Measure {
        system: System::Celery,
        canvas,
        n,
        outcome: Ok(timed),
    })
}

/// Redis's counters just before a send.
struct Before {
    redis_cpu_s: Option<f64>,
}

impl Before {
    async fn take(con: &mut redis::aio::MultiplexedConnection) -> Result<Self> {
        let _: () = redis::cmd("CONFIG")
            .arg("RESETSTAT")
            .query_async(con)
            .await?;
        Ok(Self {
            redis_cpu_s: redis_cpu_s(con).await?,
        })
    }

    async fn finish(
        self,
        con: &mut redis::aio::MultiplexedConnection,
        own_polls: u64,
        seconds: f64,
        send_s: f64,
    ) -> Result<Timed> {
        let cpu = redis_cpu_s(con).await?;
        let mut cmds = commandstats(con).await?;
        // The bench's own polling is not the system's traffic.
        for c in &mut cmds {
            if c.name == "get" {
                c.calls = c.calls.saturating_sub(own_polls);
            }
        }
        cmds.retain(|c| c.calls > 0);
        Ok(Timed {
            seconds,
            send_s,
            cmds,
            redis_cpu_s: self.redis_cpu_s.zip(cpu).map(|(a, b)| b - a),
        })
    }
}

/// A final result record, and when it was first seen.
struct Done {
    at: Instant,
    /// The same moment as seconds since the Unix epoch (for Celery's clock).
    wall: f64,
    polls: u64,
    record: Value,
}

/// Polls `celery-task-meta-<id>` every 2 ms until it is final.
async fn wait_result(
    con: &mut redis::aio::MultiplexedConnection,
    id: &str,
    timeout: u64,
    worker: &Service,
) -> Result<Done> {
    let key = result_key(id);
    let deadline = Instant::now() + Duration::from_secs(timeout);
    let mut polls = 0;
    loop {
        let raw: Option<String> = redis::cmd("GET").arg(&key).query_async(con).await?;
        polls += 1;
        let at = Instant::now();
        let wall = SystemTime::now().duration_since(UNIX_EPOCH)?.as_secs_f64();
        if let Some(raw) = raw {
            let record: Value =
                serde_json::from_str(&raw).with_context(|| format!("{key} is not JSON"))?;
            if matches!(
                record["status"].as_str(),
                Some("SUCCESS" | "FAILURE" | "REVOKED")
            ) {
                return Ok(Done {
                    at,
                    wall,
                    polls,
                    record,
                });
            }
        }
        worker.check_running()?;
        if at > deadline {
            bail!(
                "no final result under {key} after {timeout} s; {} log tail:\n{}",
                worker.name(),
                worker.log_tail()
            );
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

fn check_result(
    system: System,
    canvas: Canvas,
    n: usize,
    record: &Value,
    worker: &Service,
) -> Result<()> {
    let want = expected(canvas, n);
    if record["status"] != "SUCCESS" || record["result"] != want {
        let shown = record.to_string();
        bail!(
            "{} {} of {n}: wrong final record {}; {} log tail:\n{}",
            system.label(),
            canvas.label(),
            shown.get(..600).unwrap_or(&shown),
            worker.name(),
            worker.log_tail()
        );
    }
    Ok(())
}
