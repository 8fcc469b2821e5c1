//! Where the CPU went in a share of a drain (`bin/backlog.rs`): Redis's
//! (`INFO cpu`, and its commands from `INFO commandstats`) and the
//! worker's (`/proc/<pid>/stat`), per task done, between two looks.

use crate::redis_info::{CmdStat, commandstats, redis_cpu_s};
use crate::stats::median;
use anyhow::Result;
use redis::aio::MultiplexedConnection;
use std::time::Instant;

/// Linux reports a process's CPU time in units of USER_HZ, which is 100 on
/// every architecture it supports (`sysconf(_SC_CLK_TCK)`).
const USER_HZ: f64 = 100.0;
/// Commands named per window, busiest (by time) first.
const NAMED: usize = 6;

/// The counters at one moment of the drain.
#[derive(Debug, Clone)]
pub(crate) struct Look {
    at: Instant,
    done: u64,
    redis_cpu_s: Option<f64>,
    worker_cpu_s: Option<f64>,
    stats: Vec<CmdStat>,
}

/// Redis's and the worker's CPU over a window, as shares of one core and
/// as microseconds per task done.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Cost {
    pub(crate) redis_core: f64,
    pub(crate) redis_us: f64,
    pub(crate) worker_core: f64,
    pub(crate) worker_us: f64,
}

/// The counters now, with `done` tasks finished so far.
pub(crate) async fn look(con: &mut MultiplexedConnection, pid: u32, done: u64) -> Result<Look> {
    Ok(Look {
        at: Instant::now(),
        done,
        redis_cpu_s: redis_cpu_s(con).await?,
        worker_cpu_s: process_cpu_s(pid),
        stats: commandstats(con).await?,
    })
}

/// User plus system time of a process and all its threads, in seconds.
fn process_cpu_s(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name, which is in parentheses and may hold
    // spaces: state is field 3, utime 14 and stime 15.
    let rest = &stat[stat.rfind(')')? + 1..];
    let mut fields = rest.split_whitespace().skip(11);
    let utime: f64 = fields.next()?.parse().ok()?;
    let stime: f64 = fields.next()?.parse().ok()?;
    Some((utime + stime) / USER_HZ)
}

/// Prints the window from `a` to `b` and returns its cost; `None` (and a
/// line saying so) when no task finished in it or a counter was missing.
pub(crate) fn report(label: &str, a: &Look, b: &Look) -> Option<Cost> {
    let secs = b.at.duration_since(a.at).as_secs_f64();
    let tasks = b.done.saturating_sub(a.done);
    let cost = match (a.redis_cpu_s, b.redis_cpu_s, a.worker_cpu_s, b.worker_cpu_s) {
        (Some(r0), Some(r1), Some(w0), Some(w1)) if tasks > 0 && secs > 0.0 => Cost {
            redis_core: (r1 - r0) / secs,
            redis_us: (r1 - r0) * 1e6 / tasks as f64,
            worker_core: (w1 - w0) / secs,
            worker_us: (w1 - w0) * 1e6 / tasks as f64,
        },
        _ => {
            println!(
                "  CPU in the {label}: not measured ({tasks} tasks in {secs:.1} s, or a counter missing)"
            );
            return None;
        }
    };
    println!(
        "  CPU in the {label} ({tasks} tasks in {secs:.1} s): Redis {:.0}% of a core, {:.1} µs per task; worker {:.0}%, {:.1} µs per task",
        cost.redis_core * 100.0,
        cost.redis_us,
        cost.worker_core * 100.0,
        cost.worker_us
    );
    println!(
        "    Redis's time by command, µs per task (a script's call includes the commands it runs): {}",
        busiest(&a.stats, &b.stats, tasks)
    );
    Some(cost)
}

/// The [`NAMED`] commands that took the most time between two
/// `INFO commandstats`, as "name µs-per-task (calls per task)".
fn busiest(before: &[CmdStat], after: &[CmdStat], tasks: u64) -> String {
    let mut grown: Vec<(&str, u64, u64)> = after
        .iter()
        .map(|c| {
            let (calls, usec) = before
                .iter()
                .find(|b| b.name == c.name)
                .map_or((0, 0), |b| (b.calls, b.usec));
            (
                c.name.as_str(),
                c.usec.saturating_sub(usec),
                c.calls.saturating_sub(calls),
            )
        })
        .filter(|&(_, _, calls)| calls > 0)
        .collect();
    grown.sort_by(|x, y| y.1.cmp(&x.1).then_with(|| x.0.cmp(y.0)));
    let per = |n: u64| n as f64 / tasks as f64;
    grown
        .iter()
        .take(NAMED)
        .map(|&(name, usec, calls)| format!("{name} {:.2} ({:.3} calls)", per(usec), per(calls)))
        .collect::<Vec<_>>()
        .join(", ")
}

/// Redis's and the worker's CPU in the first and the last 10% of each run,
/// and their medians.
pub(crate) fn print_runs(runs: &[(Option<Cost>, Option<Cost>)]) {
    // Per run: (share of a core, µs per task) of Redis in the first and
    // the last 10%, then of the worker.
    let columns = |&(f, l): &(Option<Cost>, Option<Cost>)| {
        [
            f.map(|c| (c.redis_core, c.redis_us)),
            l.map(|c| (c.redis_core, c.redis_us)),
            f.map(|c| (c.worker_core, c.worker_us)),
            l.map(|c| (c.worker_core, c.worker_us)),
        ]
    };
    let cell = |v: Option<(f64, f64)>| {
        v.map_or_else(
            || "?".to_owned(),
            |(core, us)| format!("{:.0}% of a core, {us:.1} µs/task", core * 100.0),
        )
    };
    println!();
    println!("| run | Redis, first 10% | Redis, last 10% | worker, first 10% | worker, last 10% |");
    println!("| --- | --- | --- | --- | --- |");
    let all: Vec<_> = runs.iter().map(columns).collect();
    for (i, row) in all.iter().enumerate() {
        let cells: Vec<String> = row.iter().map(|&v| cell(v)).collect();
        println!("| {} | {} |", i + 1, cells.join(" | "));
    }
    let medians: Vec<String> = (0..4)
        .map(|k| {
            let of = |f: fn((f64, f64)) -> f64| {
                median(&all.iter().map(|row| row[k].map(f)).collect::<Vec<_>>())
            };
            cell(of(|v| v.0).zip(of(|v| v.1)))
        })
        .collect();
    println!("| median | {} |", medians.join(" | "));
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stat(name: &str, calls: u64, usec: u64) -> CmdStat {
        CmdStat {
            name: name.into(),
            calls,
            usec,
        }
    }

    #[test]
    fn busiest_orders_by_time_grown_and_skips_idle_commands() {
        let before = [
            stat("evalsha", 10, 1000),
            stat("set", 5, 50),
            stat("ping", 1, 1),
        ];
        let after = [
            stat("evalsha", 30, 5000),
            stat("set", 105, 450),
            stat("ping", 1, 1),
            stat("publish", 100, 30),
        ];
        assert_eq!(
            busiest(&before, &after, 100),
            "evalsha 40.00 (0.200 calls), set 4.00 (1.000 calls), publish 0.30 (1.000 calls)"
        );
    }

    #[test]
    fn process_cpu_grows_while_this_process_computes() {
        let pid = std::process::id();
        let before = process_cpu_s(pid).expect("own /proc/<pid>/stat");
        let deadline = Instant::now() + std::time::Duration::from_secs(10);
        let mut x = 0u64;
        while process_cpu_s(pid).expect("own /proc/<pid>/stat") <= before {
            assert!(Instant::now() < deadline, "no CPU time counted in 10 s");
            for i in 0..100_000u64 {
                x = std::hint::black_box(x.wrapping_mul(31).wrapping_add(i));
            }
        }
        assert!(process_cpu_s(u32::MAX).is_none(), "no such process");
    }
}
