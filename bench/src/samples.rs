//! Samples of a drain over time (`bin/backlog.rs`): when a share of the
//! tasks was done, the rate over a window, and a short table for the log.

use crate::procfs::mb;

/// Window of the drain rate: done tasks over the last second.
const RATE_WINDOW: f64 = 1.0;

/// One look at the drain.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Sample {
    /// Seconds since the drain started.
    pub(crate) t: f64,
    /// Tasks whose result exists (from `DBSIZE`).
    pub(crate) done: u64,
    pub(crate) ready: u64,
    pub(crate) parked: u64,
    /// How long past its due time the earliest parked message was, in ms
    /// (0 when it was not due yet; `None` when nothing was parked): how far
    /// the worker's moving of due messages to the queue lagged.
    pub(crate) overdue_ms: Option<f64>,
    pub(crate) held: u64,
    pub(crate) rss_kib: Option<u64>,
}

/// When (seconds, interpolated between samples) `done` first reached `n`.
fn time_at(samples: &[Sample], n: f64) -> f64 {
    let mut prev = (0.0, 0.0);
    for s in samples {
        let d = s.done as f64;
        if d >= n {
            let (t0, d0) = prev;
            return if d > d0 {
                t0 + (s.t - t0) * (n - d0) / (d - d0)
            } else {
                s.t
            };
        }
        prev = (s.t, d);
    }
    prev.0
}

/// Tasks per second over the share `from..to` of all tasks.
pub(crate) fn share_rate(samples: &[Sample], total: usize, from: f64, to: f64) -> f64 {
    let n = total as f64;
    let secs = time_at(samples, to * n) - time_at(samples, from * n);
    (to - from) * n / secs
}

/// The drain rate at each sample: tasks done over the last [`RATE_WINDOW`].
pub(crate) fn rates(samples: &[Sample]) -> Vec<(f64, f64)> {
    let mut j = 0;
    samples
        .iter()
        .map(|s| {
            while j + 1 < samples.len() && samples[j + 1].t <= s.t - RATE_WINDOW {
                j += 1;
            }
            let (t0, d0) = if samples[j].t < s.t {
                (samples[j].t, samples[j].done)
            } else {
                (0.0, 0)
            };
            (s.t, s.done.saturating_sub(d0) as f64 / (s.t - t0).max(1e-3))
        })
        .collect()
}

/// A lag of [`Sample::overdue_ms`] for the tables: `-` when nothing was parked.
pub(crate) fn overdue(ms: Option<f64>) -> String {
    ms.map_or_else(|| "-".to_owned(), |ms| format!("{ms:.0} ms"))
}

/// About twenty lines of the samples, for the log.
pub(crate) fn print_timeline(samples: &[Sample]) {
    println!();
    println!("| s | done | queued | delayed | overdue | held | rate (tasks/s) | RSS |");
    println!("| --- | --- | --- | --- | --- | --- | --- | --- |");
    let rate = rates(samples);
    let step = (samples.len() / 20).max(1);
    for (i, s) in samples.iter().enumerate() {
        if i % step == 0 || i + 1 == samples.len() {
            println!(
                "| {:.1} | {} | {} | {} | {} | {} | {:.0} | {} |",
                s.t,
                s.done,
                s.ready,
                s.parked,
                overdue(s.overdue_ms),
                s.held,
                rate[i].1,
                mb(s.rss_kib)
            );
        }
    }
}
