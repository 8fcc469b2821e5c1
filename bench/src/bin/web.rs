//! `web` (cargo run --release -p taskstack-bench --bin web): enqueue
//! throughput, latency and memory of one release `taskstack-web` process,
//! loaded by `wrk` posting `POST /api/v1/tasks` (or, with `--batch N`,
//! `POST /api/v1/tasks/batch` with N tasks a request) against a throwaway
//! `redis-server` on the same machine. Prints figures (medians over the
//! runs); asserts no timing. See `bench/README.md`.

use anyhow::{Context as _, Result, bail, ensure};
use clap::Parser;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};
use taskstack_integration::{RedisServer, TEST_TOKEN, free_port, wait_until_sync};

#[derive(Debug, Parser)]
#[command(
    name = "web",
    about = "Enqueue throughput, latency and memory of one release taskstack-web under wrk"
)]
struct Cli {
    /// Seconds each wrk run lasts.
    #[arg(long, default_value_t = 30)]
    duration: u64,
    /// wrk connections.
    #[arg(long, default_value_t = 64)]
    connections: usize,
    /// wrk threads.
    #[arg(long, default_value_t = 2)]
    threads: usize,
    /// Runs (medians are reported).
    #[arg(long, default_value_t = 3)]
    runs: usize,
    /// Post batches of N tasks to `POST /api/v1/tasks/batch` instead of
    /// one task a request (0: the single-task route).
    #[arg(long, default_value_t = 0, value_name = "N")]
    batch: usize,
    /// The web reaches Redis through the server's Unix socket
    /// (`unix://...`) instead of loopback TCP.
    #[arg(long)]
    socket: bool,
    /// The web binary (default: `<workspace>/target/release/taskstack-web`).
    #[arg(long, value_name = "PATH")]
    web_bin: Option<PathBuf>,
    /// Count the web process's instructions per request under valgrind's
    /// callgrind instead of timing it: each run serves wrk for
    /// `--duration` seconds, and an idle twin (same duration, no requests)
    /// is subtracted, which removes start-up and timers. The count does
    /// not move with the machine's load. Use few connections
    /// (`--connections 8 --threads 1`): under callgrind the web serves
    /// about a thousand requests a second.
    #[arg(long)]
    callgrind: bool,
}

/// What one wrk run measured.
#[derive(Debug, Clone, Copy)]
struct Run {
    requests_per_sec: f64,
    p50_ms: f64,
    p99_ms: f64,
    non_2xx: u64,
    requests: u64,
    enqueued: u64,
    peak_rss_mb: f64,
}

const POST_LUA: &str = r#"
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
wrk.headers["Authorization"] = "Bearer TOKEN"
wrk.body = 'BODY'
"#;

/// One task, as both routes take it.
const TASK: &str = r#"{"task": "taskstack.add", "args": [2, 3]}"#;

/// The request body: one task, or `{"tasks": [...]}` with `batch` of them.
fn body(batch: usize) -> String {
    if batch == 0 {
        TASK.to_owned()
    } else {
        format!(r#"{{"tasks": [{}]}}"#, vec![TASK; batch].join(", "))
    }
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    ensure!(
        cli.runs > 0 && cli.duration > 0,
        "--runs and --duration must be at least 1"
    );
    ensure!(
        cli.batch <= 1000,
        "--batch is at most 1000 (the route's MAX_BATCH_TASKS)"
    );
    let web_bin = cli.web_bin.clone().unwrap_or_else(|| {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/release/taskstack-web")
    });
    if !web_bin.is_file() {
        bail!(
            "{} not found: run `cargo build --release -p taskstack-web` first (or pass --web-bin)",
            web_bin.display()
        );
    }
    if Command::new("wrk").arg("--version").output().is_err() {
        bail!("wrk is not installed: apt-get install -y wrk");
    }
    let dir = tempfile::tempdir()?;
    let script = dir.path().join("post.lua");
    std::fs::write(
        &script,
        POST_LUA
            .replace("TOKEN", TEST_TOKEN)
            .replace("BODY", &body(cli.batch)),
    )?;
    let per_request = cli.batch.max(1) as f64;
    let route = if cli.batch == 0 {
        "POST /api/v1/tasks (taskstack.add)".to_owned()
    } else {
        format!(
            "POST /api/v1/tasks/batch ({} x taskstack.add a request)",
            cli.batch
        )
    };

    println!(
        "taskstack web benchmark: wrk -t{} -c{} -d{}s {route}, {} run(s)",
        cli.threads, cli.connections, cli.duration, cli.runs
    );
    println!(
        "  web {}; redis-server on loopback ({}), no persistence, no worker (the queue grows)",
        web_bin.display(),
        if cli.socket { "its Unix socket" } else { "TCP" }
    );
    if cli.callgrind {
        return count_instructions(&cli, &web_bin, &script);
    }
    let mut runs = Vec::new();
    for k in 1..=cli.runs {
        let r = run_once(&cli, &web_bin, &script).with_context(|| format!("run {k}"))?;
        println!(
            "  run {k}: {:.0} req/s ({:.0} tasks/s), p50 {:.2} ms, p99 {:.2} ms, peak RSS {:.1} MB, {} requests, {} non-2xx, {} messages enqueued",
            r.requests_per_sec,
            r.requests_per_sec * per_request,
            r.p50_ms,
            r.p99_ms,
            r.peak_rss_mb,
            r.requests,
            r.non_2xx,
            r.enqueued
        );
        runs.push(r);
    }
    let med = |f: fn(&Run) -> f64| {
        let mut v: Vec<f64> = runs.iter().map(f).collect();
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    let targets = if cli.batch == 0 {
        "targets: >= 40000 enqueues/s, p99 <= 5 ms, RSS <= 30 MB"
    } else {
        "target: >= 200000 tasks/s through the batch route"
    };
    println!(
        "median: {:.0} requests/s = {:.0} tasks enqueued/s, p50 {:.2} ms, p99 {:.2} ms, peak RSS {:.1} MB ({targets})",
        med(|r| r.requests_per_sec),
        med(|r| r.requests_per_sec) * per_request,
        med(|r| r.p50_ms),
        med(|r| r.p99_ms),
        med(|r| r.peak_rss_mb)
    );
    Ok(())
}

/// The web's configuration, on `cmd` (the web binary, or valgrind
/// running it): this Redis (through its socket with `--socket`), listening
/// on `addr`, the bench's token and allow-list, no other `TASKSTACK_*`
/// variable.
fn configure<'a>(
    cmd: &'a mut Command,
    cli: &Cli,
    redis: &RedisServer,
    addr: &str,
) -> &'a mut Command {
    for (k, _) in std::env::vars() {
        if k.starts_with("TASKSTACK_") {
            cmd.env_remove(k);
        }
    }
    let url = if cli.socket {
        redis.socket_url()
    } else {
        redis.url()
    };
    cmd.env("TASKSTACK_BROKER_URL", url)
        .env("TASKSTACK_WEB_LISTEN", addr)
        .env("TASKSTACK_API_TOKENS", TEST_TOKEN)
        .env("TASKSTACK_WEB_TASKS", "taskstack.add")
        .env("TASKSTACK_ALLOW_ROOT", "1")
        .env("TASKSTACK_LOG_LEVEL", "warn")
        .env("TASKSTACK_LOG_FORMAT", "json")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
}

/// wrk posting the bench's request to the web at `addr`.
fn wrk(cli: &Cli, script: &Path, addr: &str) -> Command {
    let mut wrk = Command::new("wrk");
    wrk.arg(format!("-t{}", cli.threads))
        .arg(format!("-c{}", cli.connections))
        .arg(format!("-d{}s", cli.duration))
        .arg("--latency")
        .arg("-s")
        .arg(script)
        .arg(format!(
            "http://{addr}/api/v1/tasks{}",
            if cli.batch == 0 { "" } else { "/batch" }
        ))
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    wrk
}

fn run_once(cli: &Cli, web_bin: &Path, script: &Path) -> Result<Run> {
    let redis = RedisServer::start()?;
    let addr = format!("127.0.0.1:{}", free_port()?);
    let mut web = configure(&mut Command::new(web_bin), cli, &redis, &addr)
        .spawn()
        .context("cannot start taskstack-web")?;
    let pid = web.id();
    let result = (|| {
        wait_until_sync("taskstack-web to listen", Duration::from_secs(10), || {
            std::net::TcpStream::connect(&addr).ok()
        })?;
        let wrk = wrk(cli, script, &addr)
            .spawn()
            .context("cannot start wrk")?;
        // Sample the web process's resident memory while wrk runs.
        let mut peak_kb = 0u64;
        let deadline = Instant::now() + Duration::from_secs(cli.duration + 30);
        let wrk = {
            let mut wrk = wrk;
            loop {
                peak_kb = peak_kb.max(rss_kb(pid).unwrap_or(0));
                if wrk.try_wait()?.is_some() || Instant::now() > deadline {
                    break wrk;
                }
                std::thread::sleep(Duration::from_millis(100));
            }
        };
        let out = wrk.wait_with_output()?;
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        ensure!(
            out.status.success(),
            "wrk failed: {text}{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let mut con = redis.conn()?;
        let enqueued: u64 = redis::cmd("LLEN").arg("celery").query(&mut con)?;
        Ok(Run {
            requests_per_sec: field(&text, "Requests/sec:")?,
            p50_ms: latency_ms(&text, "50%")?,
            p99_ms: latency_ms(&text, "99%")?,
            non_2xx: text
                .lines()
                .find_map(|l| l.trim().strip_prefix("Non-2xx or 3xx responses:"))
                .and_then(|v| v.trim().parse().ok())
                .unwrap_or(0),
            requests: text
                .lines()
                .find_map(|l| {
                    l.trim()
                        .split_once(" requests in ")
                        .map(|(n, _)| n.trim().parse().ok())
                })
                .flatten()
                .unwrap_or(0),
            enqueued,
            peak_rss_mb: peak_kb as f64 / 1024.0,
        })
    })();
    let _ = web.kill();
    let _ = web.wait();
    result
}

/// `--callgrind`: instructions per request, each run a loaded and an idle
/// web under callgrind.
fn count_instructions(cli: &Cli, web_bin: &Path, script: &Path) -> Result<()> {
    if Command::new("valgrind").arg("--version").output().is_err() {
        bail!("valgrind is not installed: apt-get install -y valgrind");
    }
    let per_request = cli.batch.max(1) as f64;
    let mut counts = Vec::new();
    for k in 1..=cli.runs {
        let (idle, _) =
            under_callgrind(cli, web_bin, None).with_context(|| format!("run {k}, idle"))?;
        let (busy, enqueued) = under_callgrind(cli, web_bin, Some(script))
            .with_context(|| format!("run {k}, loaded"))?;
        let requests = enqueued as f64 / per_request;
        ensure!(requests >= 1.0, "run {k}: no task was enqueued");
        let each = busy.saturating_sub(idle) as f64 / requests;
        println!(
            "  run {k}: {each:.0} instructions per request ({:.0} per task): {busy} loaded - {idle} idle, {requests:.0} requests",
            each / per_request
        );
        counts.push(each);
    }
    counts.sort_by(f64::total_cmp);
    let median = counts[counts.len() / 2];
    println!(
        "median: {median:.0} instructions per request ({:.0} per task), the web process's user-space instructions (libc included, the kernel's not)",
        median / per_request
    );
    Ok(())
}

/// Runs the web under callgrind for `--duration` seconds, serving wrk with
/// `script` or idle, then stops it with SIGTERM; returns the instructions
/// it executed and the messages it enqueued.
fn under_callgrind(cli: &Cli, web_bin: &Path, script: Option<&Path>) -> Result<(u64, u64)> {
    let redis = RedisServer::start()?;
    let addr = format!("127.0.0.1:{}", free_port()?);
    let dir = tempfile::tempdir()?;
    let out = dir.path().join("callgrind.out");
    let mut valgrind = Command::new("valgrind");
    valgrind
        .arg("--tool=callgrind")
        .arg(format!("--callgrind-out-file={}", out.display()))
        .arg(web_bin);
    let mut web = configure(&mut valgrind, cli, &redis, &addr)
        .spawn()
        .context("cannot start taskstack-web under valgrind")?;
    let result = (|| {
        wait_until_sync(
            "taskstack-web under callgrind to listen",
            Duration::from_secs(120),
            || std::net::TcpStream::connect(&addr).ok(),
        )?;
        match script {
            Some(script) => {
                let out = wrk(cli, script, &addr).output().context("cannot run wrk")?;
                ensure!(
                    out.status.success(),
                    "wrk failed: {}",
                    String::from_utf8_lossy(&out.stderr)
                );
            }
            // The twin's whole point is to last as long as a loaded run.
            None => std::thread::sleep(Duration::from_secs(cli.duration)),
        }
        let mut con = redis.conn()?;
        let enqueued: u64 = redis::cmd("LLEN").arg("celery").query(&mut con)?;
        let pid = nix::unistd::Pid::from_raw(i32::try_from(web.id())?);
        nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM)?;
        let status = wait_until_sync(
            "taskstack-web under callgrind to exit after SIGTERM",
            Duration::from_secs(120),
            || web.try_wait().ok().flatten(),
        )?;
        ensure!(
            status.success(),
            "taskstack-web under callgrind exited with {status}"
        );
        let text = std::fs::read_to_string(&out)
            .with_context(|| format!("callgrind wrote no {}", out.display()))?;
        let total = text
            .lines()
            .find_map(|l| {
                l.strip_prefix("totals:")
                    .or_else(|| l.strip_prefix("summary:"))
            })
            .and_then(|v| v.trim().parse().ok())
            .with_context(|| format!("no totals line in {}", out.display()))?;
        Ok((total, enqueued))
    })();
    if result.is_err() {
        let _ = web.kill();
        let _ = web.wait();
    }
    result
}

fn rss_kb(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
}

fn field(text: &str, name: &str) -> Result<f64> {
    text.lines()
        .find_map(|l| l.trim().strip_prefix(name))
        .and_then(|v| v.trim().parse().ok())
        .with_context(|| format!("no {name:?} in wrk's output:\n{text}"))
}

/// A line of wrk's latency distribution (`99%    1.23ms`), in milliseconds.
fn latency_ms(text: &str, pct: &str) -> Result<f64> {
    let raw = text
        .lines()
        .find_map(|l| l.trim().strip_prefix(pct).map(str::trim))
        .with_context(|| format!("no {pct} latency in wrk's output:\n{text}"))?;
    let (num, unit) = raw.split_at(raw.find(|c: char| c.is_alphabetic()).unwrap_or(raw.len()));
    let n: f64 = num
        .parse()
        .with_context(|| format!("bad latency {raw:?}"))?;
    Ok(match unit {
        "us" => n / 1000.0,
        "ms" => n,
        "s" => n * 1000.0,
        "m" => n * 60_000.0,
        _ => bail!("unknown latency unit in {raw:?}"),
    })
}
