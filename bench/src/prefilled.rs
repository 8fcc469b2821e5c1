//! One drain of a prefilled queue (`bin/drain_defaults.rs`,
//! `bin/campaign.rs`): N Celery-protocol `taskstack.echo` messages wait in
//! another list while a worker (taskstack or Celery) starts on the empty
//! `celery` queue; one `RENAME` makes them its queue (the clock starts),
//! then `DBSIZE` is polled every 2 ms (no key scans) until every result
//! exists, confirmed SUCCESS with `MGET`. Redis's `INFO commandstats` is
//! reset at the `RENAME`; the bench's own commands are taken off.

use crate::canvas_procs::Service;
use crate::redis_info::{commandstats, redis_cpu_s};
use anyhow::{Result, bail};
use serde_json::json;
use std::time::{Duration, Instant};
use taskstack::proto::envelope::{MessageSpec, encode};
use taskstack::proto::keys::result_key;

/// Where the messages wait until the drain starts.
const PREFILL: &str = "bench.prefill";
/// The queue both workers consume (both defaults).
const QUEUE: &str = "celery";
/// Keys per `MGET` when confirming results.
const CHUNK: usize = 1_000;

/// One drain's figures.
#[derive(Debug)]
pub(crate) struct Drain {
    /// What drained: `taskstack`, `celery`, ...
    pub(crate) system: &'static str,
    pub(crate) tasks: usize,
    pub(crate) seconds: f64,
    /// Every command Redis ran over the drain (scripts' commands included)
    /// but the bench's own.
    pub(crate) commands: u64,
    pub(crate) redis_cpu_s: Option<f64>,
    /// The busiest commands, for the per-run line.
    top: Vec<(String, u64)>,
}

impl Drain {
    pub(crate) fn tasks_per_s(&self) -> f64 {
        self.tasks as f64 / self.seconds
    }
    pub(crate) fn cmds_per_task(&self) -> f64 {
        self.commands as f64 / self.tasks as f64
    }
}

/// The prefilled messages: `taskstack.echo` with one argument each, as
/// Celery's own client writes them (protocol 2, JSON).
fn messages(run: usize, n: usize) -> Vec<(String, String)> {
    (0..n)
        .map(|i| {
            let id = format!("drain-{run}-{i:07}");
            let args = [json!(i)];
            let spec = MessageSpec {
                id: &id,
                task: "taskstack.echo",
                args: &args,
                queue: QUEUE,
                origin: "bench@drain",
                ..MessageSpec::default()
            };
            let payload = encode(&spec);
            (id, payload)
        })
        .collect()
}

/// Drains `n` messages with the worker `start` returns (ready, on the
/// empty queue of a `FLUSHALL`ed server); gives up after `timeout`.
pub(crate) async fn drain(
    con: &mut redis::aio::MultiplexedConnection,
    system: &'static str,
    n: usize,
    run: usize,
    timeout: Duration,
    start: impl FnOnce() -> Result<Service>,
) -> Result<Drain> {
    let _: () = redis::cmd("FLUSHALL").query_async(con).await?;
    let worker = start()?;
    let msgs = messages(run, n);
    for chunk in msgs.chunks(CHUNK) {
        let payloads: Vec<&str> = chunk.iter().map(|(_, p)| p.as_str()).collect();
        let _: () = redis::cmd("LPUSH")
            .arg(PREFILL)
            .arg(&payloads)
            .query_async(con)
            .await?;
    }
    let keys: Vec<String> = msgs.iter().map(|(id, _)| result_key(id)).collect();
    drop(msgs);

    let _: () = redis::cmd("CONFIG")
        .arg("RESETSTAT")
        .query_async(con)
        .await?;
    let cpu0 = redis_cpu_s(con).await?;
    let t0 = Instant::now();
    let _: () = redis::cmd("RENAME")
        .arg(PREFILL)
        .arg(QUEUE)
        .query_async(con)
        .await?;
    let (mut dbsize_calls, mut mget_calls) = (0u64, 0u64);
    let deadline = t0 + timeout;
    let mut pending: Vec<&str> = keys.iter().map(String::as_str).collect();
    let done = loop {
        let size: u64 = redis::cmd("DBSIZE").query_async(con).await?;
        dbsize_calls += 1;
        // Besides the results, only the queue and a few bookkeeping keys
        // of the worker exist: from N keys on, check the results.
        if size >= n as u64 {
            let mut still = Vec::new();
            for chunk in pending.chunks(CHUNK) {
                let found: Vec<Option<String>> =
                    redis::cmd("MGET").arg(chunk).query_async(con).await?;
                mget_calls += 1;
                for (k, v) in chunk.iter().zip(found) {
                    match v {
                        None => still.push(*k),
                        Some(v) if !v.contains("\"SUCCESS\"") => {
                            bail!("{k} is not SUCCESS: {v}")
                        }
                        Some(_) => {}
                    }
                }
            }
            pending = still;
            if pending.is_empty() {
                break Instant::now();
            }
        }
        worker.check_running()?;
        if Instant::now() > deadline {
            bail!(
                "{} of {n} results missing after {timeout:?}; {} log tail:\n{}",
                pending.len(),
                worker.name(),
                worker.log_tail()
            );
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    };
    let seconds = done.duration_since(t0).as_secs_f64();
    let cpu1 = redis_cpu_s(con).await?;
    let mut stats = commandstats(con).await?;
    for c in &mut stats {
        let own = match c.name.as_str() {
            "dbsize" => dbsize_calls,
            "mget" => mget_calls,
            "rename" => 1,
            _ => 0,
        };
        c.calls = c.calls.saturating_sub(own);
    }
    stats.retain(|c| c.calls > 0);
    stats.sort_by_key(|c| std::cmp::Reverse(c.calls));
    worker.stop()?;
    Ok(Drain {
        system,
        tasks: n,
        seconds,
        commands: stats.iter().map(|c| c.calls).sum(),
        redis_cpu_s: cpu0.zip(cpu1).map(|(a, b)| b - a),
        top: stats
            .iter()
            .take(8)
            .map(|c| (c.name.clone(), c.calls))
            .collect(),
    })
}

/// One line: the drain's rate, commands per task and busiest commands.
pub(crate) fn print_drain(run: usize, d: &Drain) {
    let top: Vec<String> = d
        .top
        .iter()
        .map(|(name, calls)| format!("{name} {:.2}", *calls as f64 / d.tasks as f64))
        .collect();
    println!(
        "run {run} {:<9} {:>7} tasks in {:>7.3} s: {:>9.0} tasks/s, {:.2} Redis commands per task (redis CPU {}); per task: {}",
        d.system,
        d.tasks,
        d.seconds,
        d.tasks_per_s(),
        d.cmds_per_task(),
        d.redis_cpu_s
            .map_or_else(|| "?".to_owned(), |c| format!("{c:.2} s")),
        top.join(", ")
    );
}
