//! What Redis reports about itself (INFO, CPU, commandstats) and the `redis-benchmark` reference.

use anyhow::{Context as _, Result, ensure};
use std::process::{Command, Stdio};
use std::time::Duration;

/// One Redis command's share of the traffic (from `INFO commandstats`).
#[derive(Debug, Clone)]
pub(crate) struct CmdStat {
    pub(crate) name: String,
    pub(crate) calls: u64,
    pub(crate) usec: u64,
}

/// A reference line of `redis-benchmark`.
#[derive(Debug)]
pub(crate) struct RefLine {
    pub(crate) label: String,
    pub(crate) line: String,
    pub(crate) rps: Option<f64>,
}

/// `used_cpu_sys + used_cpu_user` of the server, in seconds.
pub(crate) async fn redis_cpu_s(
    con: &mut redis::aio::MultiplexedConnection,
) -> Result<Option<f64>> {
    let info: String = redis::cmd("INFO").arg("cpu").query_async(con).await?;
    let field = |name| info_field(&info, name).and_then(|v| v.parse::<f64>().ok());
    Ok(field("used_cpu_sys")
        .zip(field("used_cpu_user"))
        .map(|(s, u)| s + u))
}

/// A connection to the benchmark's server without the client's default
/// 500 ms reply timeout: prefills carry megabytes and `FLUSHALL` of a
/// large database takes longer, on machines that are busy too.
#[allow(
    dead_code,
    reason = "not every binary sharing this module connects with it"
)]
pub(crate) async fn connect(url: &str) -> Result<redis::aio::MultiplexedConnection> {
    let config =
        redis::AsyncConnectionConfig::new().set_response_timeout(Some(Duration::from_secs(120)));
    redis::Client::open(url)?
        .get_multiplexed_async_connection_with_config(&config)
        .await
        .context("cannot connect to the benchmark redis-server")
}

/// The server's `redis_version` (`?` when `INFO server` does not say).
#[allow(dead_code, reason = "not every binary sharing this module prints it")]
pub(crate) async fn server_version(con: &mut redis::aio::MultiplexedConnection) -> Result<String> {
    let info: String = redis::cmd("INFO").arg("server").query_async(con).await?;
    Ok(info_field(&info, "redis_version").unwrap_or("?").to_owned())
}

/// `used_memory` of `INFO memory`: the bytes Redis's allocator holds for data
/// and overhead.
#[allow(
    dead_code,
    reason = "the backlog bench's; the main bench shares this module"
)]
pub(crate) async fn used_memory(con: &mut redis::aio::MultiplexedConnection) -> Result<u64> {
    let info: String = redis::cmd("INFO").arg("memory").query_async(con).await?;
    info_field(&info, "used_memory")
        .and_then(|v| v.parse().ok())
        .context("INFO memory has no used_memory")
}

/// `INFO commandstats`, busiest first, without our own INFO/CONFIG calls.
pub(crate) async fn commandstats(
    con: &mut redis::aio::MultiplexedConnection,
) -> Result<Vec<CmdStat>> {
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

/// The value of `name:value` in an `INFO` reply.
pub(crate) fn info_field<'a>(info: &'a str, name: &str) -> Option<&'a str> {
    info.lines()
        .find_map(|l| l.trim().strip_prefix(name)?.strip_prefix(':'))
}

/// Runs `redis-benchmark -q -n 200000 -t set,lpush,rpop` (with `-P` if
/// `pipeline` is given) and returns its requests-per-second lines.
pub(crate) fn redis_benchmark(port: u16, pipeline: Option<u32>) -> Result<Vec<RefLine>> {
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
