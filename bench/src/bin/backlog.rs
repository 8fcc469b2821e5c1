//! `backlog`: one stock `taskstack-worker` (default settings) drains a
//! million queued Celery-protocol `taskstack.echo` messages and a million
//! more parked in the delayed set, due over the first part of the run. It
//! samples the worker's RSS and the drain rate over time and prints the
//! peak RSS, the rate in the first and the last 10% of the tasks, Redis's
//! memory per queued and per parked message (beside the size of Python
//! Celery's own message for the same task), how long the library's queue
//! statistics take with the backlog in place, and the idle worker's RSS;
//! it draws the rate and the RSS in a PNG. Each of `--runs` (3) runs has a
//! fresh `redis-server` and worker; a table of the runs and their medians
//! ends the output, and the median run is plotted. It asserts nothing
//! about the figures. See `bench/README.md`.
//!
//! ```sh
//! cargo build --release -p taskstack-worker -p taskstack-bench
//! target/release/backlog                 # --count 100000 --runs 1 for a quick look
//! ```

#[path = "../backlog_data.rs"]
mod backlog_data;
#[allow(dead_code, reason = "shared with the canvas and drain benches")]
#[path = "../canvas_procs.rs"]
mod canvas_procs;
#[path = "../cpu_share.rs"]
mod cpu_share;
#[path = "../plot.rs"]
mod plot;
#[path = "../procfs.rs"]
mod procfs;
#[allow(
    dead_code,
    reason = "shared with the main bench; this binary uses part of it"
)]
#[path = "../redis_info.rs"]
mod redis_info;
#[path = "../samples.rs"]
mod samples;
#[allow(
    dead_code,
    reason = "shared with the main bench; this binary uses the median"
)]
#[path = "../stats.rs"]
mod stats;

use anyhow::{Result, bail, ensure};
use backlog_data::{
    PREFILL, PREFILL_DELAYED, PREFILL_DELAYED_MSG, QUEUE, QUEUED, check_results, message,
    prefill_delayed, prefill_queue,
};
use canvas_procs::Service;
use clap::Parser;
use cpu_share::{Cost, Look};
use procfs::{mb, status_kib};
use redis::aio::MultiplexedConnection;
use redis_info::used_memory;
use samples::{Sample, overdue, print_timeline, rates, share_rate};
use stats::median;
use std::path::PathBuf;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use taskstack::broker::{RedisPool, delayed_span, queue_counts};
use taskstack::config::RedisTarget;
use taskstack::proto::Keys;
use taskstack_integration::RedisServer;

#[derive(Debug, Parser)]
#[command(
    about = "A million queued and a million delayed tasks drained by one stock taskstack-worker: RSS and rate over time, Redis memory per message, queue stats with the backlog"
)]
struct Cli {
    /// Messages prefilled in the queue.
    #[arg(long, default_value_t = 1_000_000)]
    count: usize,
    /// Messages parked in the delayed set (default: --count).
    #[arg(long)]
    delayed: Option<usize>,
    /// Seconds over which the parked messages fall due, from the start of
    /// the drain (default: 30 per million queued messages).
    #[arg(long)]
    delay_spread: Option<f64>,
    /// Sampling period of the RSS and the progress, in milliseconds.
    #[arg(long, default_value_t = 250)]
    sample_ms: u64,
    /// Where the PNG goes (default: bench/results/backlog.png).
    #[arg(long, value_name = "PATH")]
    plot: Option<PathBuf>,
    /// A setting for the worker, `NAME=VALUE` (becoming `TASKSTACK_NAME`);
    /// repeatable. None given: the defaults, the point of this benchmark.
    #[arg(long = "set", value_name = "NAME=VALUE")]
    settings: Vec<String>,
    /// The worker binary (default: `taskstack-worker` beside this one).
    #[arg(long, value_name = "PATH")]
    worker_bin: Option<PathBuf>,
    /// Give up after this many seconds of draining.
    #[arg(long, default_value_t = 1800)]
    timeout: u64,
    /// Runs, each on a fresh `redis-server` and worker; the medians are
    /// printed and the median run plotted.
    #[arg(long, default_value_t = 3)]
    runs: usize,
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

/// What one run measured.
struct Outcome {
    /// Tasks per second over the first and the last 10% of the tasks.
    first: f64,
    last: f64,
    /// The worker's `VmHWM`.
    peak_kib: Option<u64>,
    samples: Vec<Sample>,
    /// Redis's and the worker's CPU over the first and the last 10%.
    first_cpu: Option<Cost>,
    last_cpu: Option<Cost>,
}

impl Outcome {
    /// Seconds from the start of the drain to the last task's result.
    fn secs(&self) -> f64 {
        self.samples.last().map_or(0.0, |s| s.t)
    }

    /// Tasks per second over the whole drain.
    fn rate(&self) -> f64 {
        self.samples.last().map_or(0.0, |s| s.done as f64) / self.secs()
    }

    /// The last 10%'s rate against the first's, in percent.
    fn change(&self) -> f64 {
        (self.last / self.first - 1.0) * 100.0
    }

    /// The most the earliest parked message was overdue at any sample (ms),
    /// if anything was parked at one.
    fn most_overdue(&self) -> Option<f64> {
        self.samples
            .iter()
            .filter_map(|s| s.overdue_ms)
            .reduce(f64::max)
    }
}

/// What every run shares: the settings read from the command line.
struct Plan<'a> {
    cli: &'a Cli,
    delayed: usize,
    spread: f64,
    total: usize,
    env: Vec<(&'a str, String)>,
    worker_bin: PathBuf,
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<()> {
    let cli = Cli::parse();
    ensure!(cli.count > 0, "--count must be at least 1");
    ensure!(cli.runs > 0, "--runs must be at least 1");
    let delayed = cli.delayed.unwrap_or(cli.count);
    let spread = cli.delay_spread.unwrap_or(30.0 * cli.count as f64 / 1e6);
    ensure!(
        spread.is_finite() && spread >= 0.0,
        "--delay-spread must be a number of seconds, 0 or more (got {spread})"
    );
    let env = canvas_procs::settings_env(&cli.settings)?;
    let plan = Plan {
        cli: &cli,
        delayed,
        spread,
        total: cli.count + delayed,
        env: env.iter().map(|(k, v)| (k.as_str(), v.clone())).collect(),
        worker_bin: canvas_procs::worker_bin(cli.worker_bin.as_deref())?,
    };
    let plot_path = cli
        .plot
        .clone()
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("results/backlog.png"));
    if cfg!(debug_assertions) {
        eprintln!("warning: backlog is a debug build (prefilling is slower)");
    }
    println!("backlog: one stock worker drains queued and delayed messages");
    let due = if delayed > 0 {
        format!(" (due over {spread:.1} s from the start of the drain)")
    } else {
        String::new()
    };
    println!(
        "  {} queued + {delayed} delayed taskstack.echo messages{due}, sampled every {} ms; {} run(s), each on a fresh redis-server and worker",
        cli.count, cli.sample_ms, cli.runs
    );
    let mut outcomes = Vec::new();
    for run in 1..=cli.runs {
        println!();
        println!("run {run} of {}", cli.runs);
        outcomes.push(run_once(&plan, run == 1).await?);
    }
    let shown = print_runs(&outcomes);

    let o = &outcomes[shown];
    let rate = rates(&o.samples);
    let rss: Vec<(f64, f64)> = o
        .samples
        .iter()
        .filter_map(|s| Some((s.t, s.rss_kib? as f64 / 1024.0)))
        .collect();
    let title = format!(
        "{} queued + {delayed} delayed tasks, one stock taskstack-worker",
        cli.count
    );
    plot::two_axes(
        &plot_path,
        &title,
        &plot::Series {
            label: "drain rate (tasks/s, 1 s window)".into(),
            points: rate,
        },
        &plot::Series {
            label: "worker RSS (MB)".into(),
            points: rss,
        },
    )?;
    println!("plot: {} (run {})", plot_path.display(), shown + 1);
    Ok(())
}

/// One run: a fresh `redis-server` and worker, the prefill, the drain.
async fn run_once(plan: &Plan<'_>, first_run: bool) -> Result<Outcome> {
    let (cli, delayed, total) = (plan.cli, plan.delayed, plan.total);
    let redis = RedisServer::start()?;
    let url = redis.url();
    let mut con = redis_info::connect(&url).await?;
    let version = redis_info::server_version(&mut con).await?;
    println!(
        "  redis-server {} on 127.0.0.1:{} (no persistence); worker {} ({})",
        version,
        redis.port(),
        plan.worker_bin.display(),
        if plan.env.is_empty() {
            "defaults".to_owned()
        } else {
            format!("{:?}", plan.env)
        }
    );
    if first_run {
        let ours = message(QUEUED, 123_456);
        match celery_envelope(&mut con, &url).await {
            Ok(c) => println!(
                "  one message: {} bytes as this bench writes it; {} bytes as Python Celery's client writes it",
                ours.len(),
                c.len()
            ),
            Err(e) => println!(
                "  one message: {} bytes as this bench writes it; Celery's: not measured ({e:#})",
                ours.len()
            ),
        }
    }

    let worker = Service::taskstack(&plan.worker_bin, &url, &plan.env)?;
    let pid = worker.pid();
    let ready_at = Instant::now();
    let rss_ready = status_kib(pid, "VmRSS:");
    let keys = Keys::new(worker.namespace());

    let m0 = used_memory(&mut con).await?;
    let t = Instant::now();
    let bytes = prefill_queue(&mut con, cli.count).await?;
    let queue_s = t.elapsed().as_secs_f64();
    let m1 = used_memory(&mut con).await?;
    // The parked messages fall due from the start of the drain on: their
    // prefill is given more time than the queue's took (2.5 times, plus
    // two seconds), and the drain starts when the first falls due.
    let first_due = now_ms() + (queue_s * 2500.0) as i64 + 2000;
    let t = Instant::now();
    prefill_delayed(&mut con, delayed, first_due, plan.spread).await?;
    let delayed_s = t.elapsed().as_secs_f64();
    let m2 = used_memory(&mut con).await?;
    println!(
        "  prefill: {} queued in {queue_s:.1} s ({:.0} bytes each), {delayed} delayed in {delayed_s:.1} s",
        cli.count,
        bytes as f64 / cli.count as f64
    );
    let per = |a: u64, b: u64, n: usize| (b.saturating_sub(a)) as f64 / n.max(1) as f64;
    println!(
        "  Redis memory (INFO used_memory): {:.0} bytes per queued message, {:.0} per delayed one",
        per(m0, m1, cli.count),
        per(m1, m2, delayed)
    );
    if delayed > 0 {
        let early = first_due - now_ms();
        if early > 0 {
            tokio::time::sleep(Duration::from_millis(early.unsigned_abs())).await;
        } else {
            println!(
                "  the prefill took {:.1} s longer than planned: the first parked messages are due at the start",
                -early as f64 / 1000.0
            );
        }
    }
    let idle_s = ready_at.elapsed().as_secs_f64();
    let rss_idle = status_kib(pid, "VmRSS:");
    println!(
        "  idle worker RSS: {} right after ready, {} after {idle_s:.1} s idle (the prefill and the wait for the first due time)",
        mb(rss_ready),
        mb(rss_idle)
    );

    // The drain starts: queue and delayed set become the worker's at once
    // (with `--delayed 0` there is no parked set to hand over).
    let mut start = redis::pipe();
    start
        .atomic()
        .cmd("RENAME")
        .arg(PREFILL)
        .arg(QUEUE)
        .ignore();
    if delayed > 0 {
        start
            .cmd("RENAME")
            .arg(PREFILL_DELAYED)
            .arg(keys.parked())
            .ignore()
            .cmd("RENAME")
            .arg(PREFILL_DELAYED_MSG)
            .arg(keys.parked_messages())
            .ignore()
            .cmd("HSET")
            .arg(keys.delayed_counts())
            .arg(QUEUE)
            .arg(delayed)
            .ignore();
    }
    let _: () = start.query_async(&mut con).await?;
    let t0 = Instant::now();
    let start_ms = now_ms();
    if delayed > 0 {
        println!(
            "  drain started; delayed messages due {:+.1} s to {:+.1} s from now",
            (first_due - start_ms) as f64 / 1000.0,
            (first_due - start_ms) as f64 / 1000.0 + plan.spread
        );
    } else {
        println!("  drain started; no delayed messages");
    }
    let pool = RedisPool::new(&RedisTarget::from_url(&url)?, 2, Duration::from_secs(30))?;
    let mut lane = pool.lane();
    queue_stats(&mut lane, &keys, "at the start").await?;

    let (samples, looks) =
        sample_drain(cli, &mut con, &worker, &keys, total, t0, &mut lane).await?;
    let peak_kib = status_kib(pid, "VmHWM:");
    let rss_after = status_kib(pid, "VmRSS:");
    check_results(&mut con, cli.count, delayed).await?;
    worker.stop()?;

    let o = Outcome {
        first: share_rate(&samples, total, 0.0, 0.1),
        last: share_rate(&samples, total, 0.9, 1.0),
        peak_kib,
        samples,
        first_cpu: cpu_share::report("first 10%", &looks[0], &looks[1]),
        last_cpu: cpu_share::report("last 10%", &looks[2], &looks[3]),
    };
    println!(
        "  drained {total} tasks in {:.1} s: {:.0} tasks/s overall",
        o.secs(),
        o.rate()
    );
    println!(
        "  rate in the first 10% of the tasks: {:.0} tasks/s; in the last 10%: {:.0} tasks/s ({:+.1}%)",
        o.first,
        o.last,
        o.change()
    );
    if let Some(ms) = o.most_overdue() {
        println!(
            "  moving due messages to the queue: the earliest parked message was at most {ms:.0} ms past its due time at any sample"
        );
    }
    let sampled_peak = o.samples.iter().filter_map(|s| s.rss_kib).max();
    println!(
        "  worker RSS: peak {} (VmHWM; highest sample {}), {} after the drain",
        mb(peak_kib),
        mb(sampled_peak),
        mb(rss_after)
    );
    print_timeline(&o.samples);
    Ok(o)
}

/// The runs side by side and their medians; returns the index of the run
/// whose change from the first to the last 10% is the median (plotted).
fn print_runs(outcomes: &[Outcome]) -> usize {
    println!();
    println!(
        "| run | drained in | tasks/s overall | first 10% (tasks/s) | last 10% (tasks/s) | last against first | most overdue | peak RSS |"
    );
    println!("| --- | --- | --- | --- | --- | --- | --- | --- |");
    for (i, o) in outcomes.iter().enumerate() {
        println!(
            "| {} | {:.1} s | {:.0} | {:.0} | {:.0} | {:+.1}% | {} | {} |",
            i + 1,
            o.secs(),
            o.rate(),
            o.first,
            o.last,
            o.change(),
            overdue(o.most_overdue()),
            mb(o.peak_kib)
        );
    }
    let med = |f: &dyn Fn(&Outcome) -> f64| {
        let v: Vec<Option<f64>> = outcomes.iter().map(|o| Some(f(o))).collect();
        median(&v).unwrap_or(f64::NAN)
    };
    let change = med(&|o| o.change());
    let overdue_runs: Vec<Option<f64>> = outcomes.iter().map(Outcome::most_overdue).collect();
    println!(
        "| median | {:.1} s | {:.0} | {:.0} | {:.0} | {change:+.1}% | {} | {} |",
        med(&|o| o.secs()),
        med(&|o| o.rate()),
        med(&|o| o.first),
        med(&|o| o.last),
        overdue(median(&overdue_runs)),
        mb(outcomes.iter().filter_map(|o| o.peak_kib).max()),
    );
    println!("(the median row's peak RSS is the highest of the runs)");
    let cpu: Vec<_> = outcomes.iter().map(|o| (o.first_cpu, o.last_cpu)).collect();
    cpu_share::print_runs(&cpu);
    outcomes
        .iter()
        .enumerate()
        .min_by(|a, b| {
            (a.1.change() - change)
                .abs()
                .total_cmp(&(b.1.change() - change).abs())
        })
        .map_or(0, |(i, _)| i)
}

/// Python Celery's message for `taskstack.echo(123456)`, if a Python with
/// Celery is at hand.
async fn celery_envelope(con: &mut MultiplexedConnection, url: &str) -> Result<String> {
    let python = canvas_procs::celery_python()?;
    canvas_procs::celery_envelope(&python, url, "bench.envelope", 123_456, con).await
}

/// Calls the library's queue statistics (what the web API's queue route
/// serves) and the delayed set's span, and prints how long each took.
async fn queue_stats(lane: &mut taskstack::broker::Lane, keys: &Keys, when: &str) -> Result<()> {
    let t = Instant::now();
    let counts = queue_counts(lane, keys, &[QUEUE.to_owned()]).await?;
    let counts_ms = t.elapsed().as_secs_f64() * 1e3;
    let t = Instant::now();
    let span = delayed_span(lane, keys).await?;
    let span_ms = t.elapsed().as_secs_f64() * 1e3;
    let c = counts.first().copied().unwrap_or_default();
    println!(
        "  queue stats {when}: queue_counts {counts_ms:.2} ms (ready {}, delayed {}, in flight {}), delayed_span {span_ms:.2} ms ({} parked)",
        c.ready,
        c.delayed.unwrap_or_default(),
        c.in_flight,
        span.parked
    );
    Ok(())
}

/// One sample's replies: `DBSIZE`, the queue's length, the parked set's
/// size and its earliest member with its due time, the worker's holds (in
/// flight, landing).
type Counts = (u64, u64, u64, Vec<(String, f64)>, u64, u64);

/// Samples until nothing is queued, parked or held: every task's result is
/// then stored (a hold is settled only after its result). Returns the
/// samples and four looks at the CPU counters: at the start, at the first
/// sample with 10% and with 90% of the tasks done, and at the end.
async fn sample_drain(
    cli: &Cli,
    con: &mut MultiplexedConnection,
    worker: &Service,
    keys: &Keys,
    total: usize,
    t0: Instant,
    lane: &mut taskstack::broker::Lane,
) -> Result<(Vec<Sample>, Vec<Look>)> {
    let leases: Vec<String> = redis::cmd("ZRANGE")
        .arg(keys.leases())
        .arg(0)
        .arg(-1)
        .query_async(con)
        .await?;
    let [worker_id] = leases.as_slice() else {
        bail!("expected one worker lease, found {leases:?}");
    };
    let mut base = None;
    let mut samples = Vec::new();
    let marks = [total as u64 / 10, total as u64 * 9 / 10];
    let mut looks = vec![cpu_share::look(con, worker.pid(), 0).await?];
    let mut halfway_stats = false;
    let deadline = t0 + Duration::from_secs(cli.timeout);
    let mut tick = tokio::time::interval(Duration::from_millis(cli.sample_ms));
    loop {
        tick.tick().await;
        let (dbsize, ready, parked, first, inflight, landing): Counts = redis::pipe()
            .cmd("DBSIZE")
            .cmd("LLEN")
            .arg(QUEUE)
            .cmd("ZCARD")
            .arg(keys.parked())
            .cmd("ZRANGE")
            .arg(keys.parked())
            .arg(0)
            .arg(0)
            .arg("WITHSCORES")
            .cmd("HLEN")
            .arg(keys.inflight(worker_id))
            .cmd("LLEN")
            .arg(keys.landing(worker_id))
            .query_async(con)
            .await?;
        let t = t0.elapsed().as_secs_f64();
        let overdue_ms = first
            .first()
            .map(|(_, due)| (now_ms() as f64 - due).max(0.0));
        // Keys other than results (queue, delayed set, the worker's) are
        // few and counted in the first sample.
        let base = *base.get_or_insert(dbsize);
        let finished = ready == 0 && parked == 0 && inflight + landing == 0;
        let done = if finished {
            total as u64
        } else {
            dbsize.saturating_sub(base).min(total as u64)
        };
        samples.push(Sample {
            t,
            done,
            ready,
            parked,
            overdue_ms,
            held: inflight + landing,
            rss_kib: status_kib(worker.pid(), "VmRSS:"),
        });
        while looks.len() <= marks.len() && done >= marks[looks.len() - 1] {
            looks.push(cpu_share::look(con, worker.pid(), done).await?);
        }
        if finished {
            looks.push(cpu_share::look(con, worker.pid(), done).await?);
            return Ok((samples, looks));
        }
        if !halfway_stats && done >= total as u64 / 2 {
            halfway_stats = true;
            queue_stats(lane, keys, "halfway").await?;
        }
        worker.check_running()?;
        if Instant::now() > deadline {
            bail!(
                "{ready} queued, {parked} parked, {} held after {} s; worker log tail:\n{}",
                inflight + landing,
                cli.timeout,
                worker.log_tail()
            );
        }
    }
}
