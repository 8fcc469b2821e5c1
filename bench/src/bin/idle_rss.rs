//! `idle_rss`: the resident memory of idle workers. Each binary given is
//! started several times as a worker with default settings (its metrics
//! listener on the default address, falling back to a free port) against a
//! throwaway `redis-server`; once it is ready and has idled for `--idle`
//! seconds its `VmRSS`, `RssAnon` and `RssFile` are read from
//! `/proc/<pid>/status`, then it gets SIGTERM and must exit 0. It prints
//! each start and the medians; it asserts nothing about them.
//!
//! A multi-call binary (the app image's `taskstack`) is run through a link
//! named `taskstack-worker`, as the image runs it.
//!
//! ```sh
//! cargo build --release -p taskstack-worker -p taskstack-bench
//! cargo run --release -p stackctl -- build      # the image's binary
//! target/release/idle_rss --bin target/release/taskstack-worker \
//!     --bin target/x86_64-unknown-linux-gnu/image/taskstack
//! ```

#[allow(dead_code, reason = "shared with the canvas and drain benches")]
#[path = "../canvas_procs.rs"]
mod canvas_procs;
#[allow(
    dead_code,
    reason = "shared with the other benches; this one reads status only"
)]
#[path = "../procfs.rs"]
mod procfs;

use anyhow::{Context as _, Result, ensure};
use canvas_procs::Service;
use clap::Parser;
use procfs::status_kib;
use std::path::PathBuf;
use std::time::Duration;
use taskstack_integration::RedisServer;

#[derive(Debug, Parser)]
#[command(about = "Idle workers' resident memory (VmRSS, RssAnon, RssFile), medians over starts")]
struct Cli {
    /// A worker binary (repeatable; default: `taskstack-worker` beside
    /// this one). A multi-call binary is run as `taskstack-worker`.
    #[arg(long = "bin", value_name = "PATH")]
    bins: Vec<PathBuf>,
    /// Starts per binary.
    #[arg(long, default_value_t = 5)]
    starts: usize,
    /// Seconds each worker idles after it is ready before it is measured.
    #[arg(long, default_value_t = 5.0)]
    idle: f64,
}

/// One start's figures, KiB.
#[derive(Debug, Clone, Copy)]
struct Rss {
    total: u64,
    anon: u64,
    file: u64,
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    ensure!(cli.starts > 0, "--starts must be at least 1");
    ensure!(
        cli.idle.is_finite() && cli.idle >= 0.0,
        "--idle must be a number of seconds, 0 or more"
    );
    let bins = if cli.bins.is_empty() {
        vec![canvas_procs::worker_bin(None)?]
    } else {
        cli.bins.clone()
    };
    let redis = RedisServer::start()?;
    let url = redis.url();
    println!(
        "idle_rss: {} start(s) per binary, measured {:.1} s after `worker ready`, defaults, redis-server on 127.0.0.1:{}",
        cli.starts,
        cli.idle,
        redis.port()
    );
    let mut summary = Vec::new();
    for bin in &bins {
        let bin = std::fs::canonicalize(bin).with_context(|| format!("{}", bin.display()))?;
        // Run as `taskstack-worker`, whatever the file is called.
        let links = tempfile::tempdir()?;
        let link = links.path().join("taskstack-worker");
        std::os::unix::fs::symlink(&bin, &link)?;
        let mut runs = Vec::new();
        for start in 1..=cli.starts {
            let env = [(
                "TASKSTACK_WORKER_METRICS_LISTEN",
                taskstack::config::Config::default().worker_metrics_listen,
            )];
            let worker = Service::taskstack(&link, &url, &env)
                .with_context(|| format!("starting {}", bin.display()))?;
            std::thread::sleep(Duration::from_secs_f64(cli.idle));
            let pid = worker.pid();
            let read =
                |field| status_kib(pid, field).with_context(|| format!("no {field} for pid {pid}"));
            let rss = Rss {
                total: read("VmRSS:")?,
                anon: read("RssAnon:")?,
                file: read("RssFile:")?,
            };
            worker.stop()?;
            println!(
                "  {} start {start}: VmRSS {} (anonymous {}, file {})",
                bin.display(),
                mb(rss.total),
                mb(rss.anon),
                mb(rss.file)
            );
            runs.push(rss);
        }
        summary.push((bin, runs));
    }
    println!();
    println!("| binary | size | VmRSS (median) | anonymous | file-backed | runs (VmRSS) |");
    println!("| --- | --- | --- | --- | --- | --- |");
    for (bin, runs) in &summary {
        let median = |f: fn(&Rss) -> u64| {
            let mut v: Vec<u64> = runs.iter().map(f).collect();
            v.sort_unstable();
            v[v.len() / 2]
        };
        let all: Vec<String> = runs.iter().map(|r| mb(r.total)).collect();
        let size = std::fs::metadata(bin).map_or(0, |m| m.len());
        println!(
            "| {} | {:.1} MB | {} | {} | {} | {} |",
            bin.display(),
            size as f64 / 1e6,
            mb(median(|r| r.total)),
            mb(median(|r| r.anon)),
            mb(median(|r| r.file)),
            all.join(" / ")
        );
    }
    Ok(())
}

/// KiB as MB (MiB), two decimals.
fn mb(kib: u64) -> String {
    format!("{:.2} MB", kib as f64 / 1024.0)
}
