//! `big_messages`: what large messages do to one release `taskstack-worker`'s
//! memory. It sends a 20 MB task (decoded and run: `max_message_size` raised
//! for it), a 20 MB message that is not JSON, and a 20 MB message over the
//! default `max_message_size` (dead-lettered unread), and prints the
//! worker's RSS idle, at its peak, and 2 s and 10 s after each. It prints
//! figures only; it asserts nothing about them.
//!
//! ```sh
//! cargo build --release -p taskstack-worker
//! cargo run --release -p taskstack-bench --bin big_messages
//! ```

#[path = "../procfs.rs"]
mod procfs;

use anyhow::{Context as _, Result, bail};
use procfs::{mb, status_kib};
use redis::Commands as _;
use serde_json::json;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};
use taskstack::proto::envelope::{MessageSpec, encode};
use taskstack_integration::RedisServer;

const SIZE: usize = 20 << 20;

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

fn spawn(bin: &PathBuf, redis: &RedisServer, ns: &str, max_size: Option<&str>) -> Result<Worker> {
    let dir = tempfile::tempdir()?;
    let mut cmd = Command::new(bin);
    for (k, _) in std::env::vars().filter(|(k, _)| k.starts_with("TASKSTACK_")) {
        cmd.env_remove(k);
    }
    cmd.env("TASKSTACK_BROKER_URL", redis.url())
        .env("TASKSTACK_NAMESPACE", ns)
        .env("TASKSTACK_ALLOW_ROOT", "1")
        .env("TASKSTACK_WORKER_METRICS_LISTEN", "off")
        .env("TASKSTACK_WORKER_STATE_FILE", dir.path().join("w.json"))
        .env("TASKSTACK_LOG_LEVEL", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    if let Some(s) = max_size {
        cmd.env("TASKSTACK_MAX_MESSAGE_SIZE", s);
    }
    let child = cmd.spawn().context("cannot start the worker")?;
    let w = Worker { child, _dir: dir };
    let state = w._dir.path().join("w.json");
    wait("the worker to be ready", || state.exists())?;
    Ok(w)
}

fn wait(what: &str, mut cond: impl FnMut() -> bool) -> Result<()> {
    let start = Instant::now();
    while !cond() {
        if start.elapsed() > Duration::from_secs(120) {
            bail!("timed out waiting for {what}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(())
}

fn measure(
    label: &str,
    redis: &RedisServer,
    worker: &Worker,
    payload: &[u8],
    done: impl Fn(&mut redis::Connection) -> bool,
) -> Result<()> {
    let pid = worker.child.id();
    let before = status_kib(pid, "VmRSS:");
    let mut c = redis.conn()?;
    let _: () = c.lpush("celery", payload)?;
    wait(label, || done(&mut c))?;
    let peak = status_kib(pid, "VmHWM:");
    std::thread::sleep(Duration::from_secs(2));
    let after_2s = status_kib(pid, "VmRSS:");
    std::thread::sleep(Duration::from_secs(8));
    let after_10s = status_kib(pid, "VmRSS:");
    println!(
        "| {label} | {} | {} | {} | {} |",
        mb(before),
        mb(peak),
        mb(after_2s),
        mb(after_10s)
    );
    Ok(())
}

fn main() -> Result<()> {
    let bin = std::env::args().nth(1).map_or_else(
        || PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/release/taskstack-worker"),
        PathBuf::from,
    );
    let bin = match std::env::var_os("CARGO_TARGET_DIR") {
        Some(t) if std::env::args().nth(1).is_none() => {
            PathBuf::from(t).join("release/taskstack-worker")
        }
        _ => bin,
    };
    if !bin.is_file() {
        bail!(
            "{} not found: cargo build --release -p taskstack-worker (or pass its path)",
            bin.display()
        );
    }
    let redis = RedisServer::start()?;
    println!("worker: {}", bin.display());
    println!(
        "| message (20 MB) | RSS before | peak RSS (VmHWM) | RSS 2 s after | RSS 10 s after |"
    );
    println!("| --- | --- | --- | --- | --- |");

    let w = spawn(&bin, &redis, "big-run", Some("64MiB"))?;
    let big = encode(&MessageSpec {
        id: "big-1",
        task: "taskstack.echo",
        args: &[json!("x".repeat(SIZE * 3 / 4))],
        origin: "bench",
        ..MessageSpec::default()
    });
    measure(
        "valid task, run (max 64MiB)",
        &redis,
        &w,
        big.as_bytes(),
        |c| c.exists("celery-task-meta-big-1").unwrap_or(false),
    )?;
    let junk = vec![b'{'; SIZE];
    measure("not JSON (max 64MiB)", &redis, &w, &junk, |c| {
        c.llen::<_, u64>("big-run:dead:celery").unwrap_or(0) >= 1
    })?;
    drop(w);

    let w = spawn(&bin, &redis, "big-refused", None)?;
    measure(
        "over max_message_size (2MiB default)",
        &redis,
        &w,
        big.as_bytes(),
        |c| c.llen::<_, u64>("big-refused:dead:celery").unwrap_or(0) >= 1,
    )?;
    Ok(())
}
