//! Printing the figures: each run's report, the summary table with medians, the JSON line.

use crate::Cli;
use crate::redis_info::{CmdStat, RefLine};
use crate::run::RunFigures;
use crate::stats::{Latency, median, round3};
use serde_json::{Map, Value, json};

/// Commands per task (or round trip): the total, then each command with
/// Redis's own time per task in it.
fn cmds_per_task(stats: &[CmdStat], per: usize) -> String {
    let per = per.max(1) as f64;
    let total: u64 = stats.iter().map(|c| c.calls).sum();
    let parts: Vec<String> = stats
        .iter()
        .map(|c| {
            format!(
                "{} {:.2} ({:.1}us)",
                c.name,
                c.calls as f64 / per,
                c.usec as f64 / per
            )
        })
        .collect();
    format!("{:.2} = {}", total as f64 / per, parts.join(", "))
}

/// CPU seconds, and what share of one core they are over `whole` seconds.
fn pct(part: Option<f64>, whole: f64) -> String {
    part.map_or_else(
        || "?".to_owned(),
        |p| format!("{p:.2} s ({:.0}% of a core)", 100.0 * p / whole),
    )
}

/// Prints the figures of run `k`.
pub(crate) fn print_run(k: usize, r: &RunFigures) {
    println!("run {k}");
    println!(
        "  enqueue     {} tasks in {:.3} s ({:.0}/s, before the worker started)",
        r.tasks,
        r.enqueue_s,
        r.tasks as f64 / r.enqueue_s
    );
    println!(
        "  drain       {:.3} s from spawn -> {:.0} tasks/s",
        r.drain_s,
        r.tasks_per_s()
    );
    match (r.startup_s, r.tasks_per_s_excl_startup()) {
        (Some(s), Some(t)) => println!(
            "  startup     {:.1} ms to \"worker ready\" -> {t:.0} tasks/s excluding startup",
            s * 1e3
        ),
        _ => println!("  startup     not detected (no \"worker ready\" line)"),
    }
    println!(
        "  CPU (drain) worker {}, redis {}, bench {}",
        pct(r.worker_cpu_s, r.drain_s),
        pct(r.redis_cpu_s, r.drain_s),
        pct(r.bench_cpu_s, r.drain_s)
    );
    println!(
        "  redis cmds per task (drain, bench polling removed): {}",
        cmds_per_task(&r.drain_cmds, r.tasks)
    );
    let l = r.latency;
    println!(
        "  latency     p50 {:.3} ms, p90 {:.3} ms, p99 {:.3} ms, max {:.3} ms, mean {:.3} ms",
        l.p50, l.p90, l.p99, l.max, l.mean
    );
    println!(
        "  redis cmds per round trip (latency, incl. warm-up and worker background): {}",
        cmds_per_task(&r.latency_cmds, r.latency_round_trips)
    );
    println!(
        "  worker peak RSS (VmHWM) {:.1} MB",
        r.peak_rss_kb as f64 / 1024.0
    );
    println!();
}

/// Prints the table of every run with the medians, then the JSON line.
pub(crate) fn print_summary(
    cli: &Cli,
    cpus: usize,
    ping: Latency,
    runs: &[RunFigures],
    reference: &[RefLine],
) {
    type Figure = fn(&RunFigures) -> Option<f64>;
    let rows: [(&str, &str, usize, Figure); 12] = [
        ("throughput_tasks_per_s", "tasks/s (from spawn)", 0, |r| {
            Some(r.tasks_per_s())
        }),
        (
            "throughput_excl_startup_tasks_per_s",
            "tasks/s (excl. startup)",
            0,
            RunFigures::tasks_per_s_excl_startup,
        ),
        ("drain_s", "drain s", 3, |r| Some(r.drain_s)),
        ("worker_startup_ms", "worker startup ms", 1, |r| {
            r.startup_s.map(|s| s * 1e3)
        }),
        ("worker_cpu_s", "worker CPU s (drain)", 2, |r| {
            r.worker_cpu_s
        }),
        ("redis_cpu_s", "redis CPU s (drain)", 2, |r| r.redis_cpu_s),
        ("latency_p50_ms", "latency p50 ms", 3, |r| {
            Some(r.latency.p50)
        }),
        ("latency_p90_ms", "latency p90 ms", 3, |r| {
            Some(r.latency.p90)
        }),
        ("latency_p99_ms", "latency p99 ms", 3, |r| {
            Some(r.latency.p99)
        }),
        ("latency_max_ms", "latency max ms", 3, |r| {
            Some(r.latency.max)
        }),
        ("latency_mean_ms", "latency mean ms", 3, |r| {
            Some(r.latency.mean)
        }),
        ("worker_peak_rss_mb", "worker peak RSS MB", 1, |r| {
            Some(r.peak_rss_kb as f64 / 1024.0)
        }),
    ];
    let fmt = |v: Option<f64>, d: usize| v.map_or_else(|| "-".to_owned(), |v| format!("{v:.d$}"));

    let mut header = format!("{:<26}", "figure");
    for k in 1..=runs.len() {
        header.push_str(&format!("{:>12}", format!("run {k}")));
    }
    header.push_str(&format!("{:>12}", "median"));
    println!("{header}");
    println!("{}", "-".repeat(header.len()));

    let mut out = Map::new();
    out.insert("bench".into(), json!("taskstack"));
    out.insert("tasks".into(), json!(cli.tasks));
    out.insert("runs".into(), json!(runs.len()));
    out.insert("concurrency".into(), json!(cli.concurrency));
    out.insert("prefetch".into(), json!(cli.prefetch));
    out.insert("latency_samples".into(), json!(cli.latency_samples));
    out.insert("cpus".into(), json!(cpus));
    for (key, label, decimals, get) in rows {
        let values: Vec<Option<f64>> = runs.iter().map(get).collect();
        let med = median(&values);
        let mut line = format!("{label:<26}");
        for v in &values {
            line.push_str(&format!("{:>12}", fmt(*v, decimals)));
        }
        line.push_str(&format!("{:>12}", fmt(med, decimals)));
        println!("{line}");
        out.insert(key.into(), med.map_or(Value::Null, |m| json!(round3(m))));
    }
    out.insert("redis_ping_p50_ms".into(), json!(round3(ping.p50)));
    if !reference.is_empty() {
        let rps: Map<String, Value> = reference
            .iter()
            .map(|r| (r.label.clone(), r.rps.map_or(Value::Null, |v| json!(v))))
            .collect();
        out.insert("redis_benchmark_rps".into(), Value::Object(rps));
    }
    println!();
    println!("{}", Value::Object(out));
}
