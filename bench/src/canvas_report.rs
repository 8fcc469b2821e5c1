//! Printing the canvas benchmark's figures (`bin/canvas.rs`): each
//! measurement as it finishes, then the medians.

use crate::stats::median;
use crate::{Canvas, Cli, Measure, System, Timed};

pub(crate) fn print_measure(k: usize, m: &Measure) {
    let head = format!(
        "run {k} {:<9} {} of {}",
        m.system.label(),
        m.canvas.label(),
        m.n
    );
    match &m.outcome {
        Err(e) => println!("{head}: NOT RUN: {e}"),
        Ok(t) => {
            let per = m.n as f64;
            let parts: Vec<String> = t
                .cmds
                .iter()
                .map(|c| format!("{} {:.2}", c.name, c.calls as f64 / per))
                .collect();
            println!(
                "{head}: {:.3} s (send call {:.3} s), {:.0} steps/s, redis CPU {}",
                t.seconds,
                t.send_s,
                per / t.seconds,
                t.redis_cpu_s
                    .map_or_else(|| "?".to_owned(), |c| format!("{c:.2} s"))
            );
            println!(
                "    redis cmds per step {:.2} = {}",
                t.cmds_per_step(m.n),
                parts.join(", ")
            );
        }
    }
}

pub(crate) fn print_summary(cli: &Cli, all: &[Measure]) {
    println!();
    println!(
        "medians over {} run(s); seconds = start of the send to the final result seen",
        cli.runs
    );
    println!(
        "{:<10} {:<6} {:>7} {:>10} {:>10} {:>12} {:>10} {:>6}",
        "system", "canvas", "N", "seconds", "steps/s", "cmds/step", "send s", "runs"
    );
    for system in [System::Taskstack, System::Celery] {
        for canvas in [Canvas::Chain, Canvas::Chord] {
            let ms: Vec<&Measure> = all
                .iter()
                .filter(|m| m.system == system && m.canvas == canvas)
                .collect();
            let Some(first) = ms.first() else { continue };
            let ok: Vec<(&Timed, usize)> = ms
                .iter()
                .filter_map(|m| m.outcome.as_ref().ok().map(|t| (t, m.n)))
                .collect();
            if ok.is_empty() {
                let why = ms.iter().find_map(|m| m.outcome.as_ref().err());
                println!(
                    "{:<10} {:<6} {:>7} NOT RUN: {}",
                    system.label(),
                    canvas.label(),
                    first.n,
                    why.map_or("", String::as_str)
                );
                continue;
            }
            let med = |f: &dyn Fn(&Timed, usize) -> f64| {
                median(&ok.iter().map(|(t, n)| Some(f(t, *n))).collect::<Vec<_>>())
                    .unwrap_or(f64::NAN)
            };
            println!(
                "{:<10} {:<6} {:>7} {:>10.3} {:>10.0} {:>12.2} {:>10.3} {:>6}",
                system.label(),
                canvas.label(),
                first.n,
                med(&|t, _| t.seconds),
                med(&|t, n| n as f64 / t.seconds),
                med(&|t, n| t.cmds_per_step(n)),
                med(&|t, _| t.send_s),
                format!("{}/{}", ok.len(), ms.len())
            );
        }
    }
}
