//! The beat's Prometheus metrics: names (constants, so dashboards and alerts
//! cannot drift from the code), counters, and the `/metrics` endpoint.

use std::fmt::Write as _;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use tokio_util::sync::CancellationToken;

/// Gauge: 1 while this instance leads, 0 while it stands by.
pub const LEADER: &str = "taskstack_beat_leader";
/// Counter: times this instance took the leader lock.
pub const LOCK_ACQUIRED: &str = "taskstack_beat_lock_acquired_total";
/// Counter: successful renewals of the leader lock.
pub const LOCK_RENEWALS: &str = "taskstack_beat_lock_renewals_total";
/// Counter: renewals that failed (Redis error, or the lock was lost).
pub const LOCK_RENEWAL_FAILURES: &str = "taskstack_beat_lock_renewal_failures_total";
/// Counter: times this instance lost leadership without giving it up.
pub const LEADERSHIP_LOST: &str = "taskstack_beat_leadership_lost_total";
/// Counter, label `entry`: slots this instance published.
pub const SLOTS_PUBLISHED: &str = "taskstack_beat_slots_published_total";
/// Counter, label `entry`: missed slots given up (older than the grace).
pub const SLOTS_SKIPPED: &str = "taskstack_beat_slots_skipped_total";
/// Counter, label `entry`: slots the exactly-once record refused because
/// they (or later ones) were already published.
pub const SLOTS_ALREADY_PUBLISHED: &str = "taskstack_beat_slots_already_published_total";

/// Live counters of one beat instance.
#[derive(Debug)]
pub struct Metrics {
    leader: AtomicBool,
    acquired: AtomicU64,
    renewals: AtomicU64,
    renewal_failures: AtomicU64,
    lost: AtomicU64,
    entries: Vec<String>,
    published: Vec<AtomicU64>,
    skipped: Vec<AtomicU64>,
    already: Vec<AtomicU64>,
}

fn counters(n: usize) -> Vec<AtomicU64> {
    (0..n).map(|_| AtomicU64::new(0)).collect()
}

fn bump(c: Option<&AtomicU64>, by: u64) {
    if let Some(c) = c {
        c.fetch_add(by, Ordering::Relaxed);
    }
}

impl Metrics {
    /// Counters for the given entry names (label values: bounded by the
    /// configuration).
    pub fn new(entries: Vec<String>) -> Self {
        let n = entries.len();
        Self {
            leader: AtomicBool::new(false),
            acquired: AtomicU64::new(0),
            renewals: AtomicU64::new(0),
            renewal_failures: AtomicU64::new(0),
            lost: AtomicU64::new(0),
            entries,
            published: counters(n),
            skipped: counters(n),
            already: counters(n),
        }
    }

    pub(crate) fn set_leader(&self, leader: bool) {
        self.leader.store(leader, Ordering::Relaxed);
        if leader {
            self.acquired.fetch_add(1, Ordering::Relaxed);
        }
    }

    pub(crate) fn renewed(&self) {
        self.renewals.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn renewal_failed(&self) {
        self.renewal_failures.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn lost_leadership(&self) {
        self.lost.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn published(&self, entry: usize) {
        bump(self.published.get(entry), 1);
    }

    pub(crate) fn skipped(&self, entry: usize, count: u64) {
        bump(self.skipped.get(entry), count);
    }

    pub(crate) fn already_published(&self, entry: usize) {
        bump(self.already.get(entry), 1);
    }

    /// Whether this instance leads now.
    pub fn is_leader(&self) -> bool {
        self.leader.load(Ordering::Relaxed)
    }

    /// Slots published by this instance, all entries together.
    pub fn published_total(&self) -> u64 {
        self.published
            .iter()
            .map(|c| c.load(Ordering::Relaxed))
            .sum()
    }

    /// Slots skipped by this instance, all entries together.
    pub fn skipped_total(&self) -> u64 {
        self.skipped.iter().map(|c| c.load(Ordering::Relaxed)).sum()
    }

    /// The Prometheus text exposition of every metric.
    pub fn render(&self) -> String {
        let mut out = String::new();
        let scalar = |out: &mut String, name: &str, kind: &str, help: &str, v: u64| {
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {v}"
            );
        };
        scalar(
            &mut out,
            LEADER,
            "gauge",
            "1 while this instance holds the leader lock, 0 while it stands by.",
            u64::from(self.is_leader()),
        );
        for (name, help, c) in [
            (
                LOCK_ACQUIRED,
                "Times this instance took the leader lock.",
                &self.acquired,
            ),
            (
                LOCK_RENEWALS,
                "Successful renewals of the leader lock.",
                &self.renewals,
            ),
            (
                LOCK_RENEWAL_FAILURES,
                "Failed renewals of the leader lock (Redis errors or a lost lock).",
                &self.renewal_failures,
            ),
            (
                LEADERSHIP_LOST,
                "Times this instance lost leadership without giving it up.",
                &self.lost,
            ),
        ] {
            scalar(&mut out, name, "counter", help, c.load(Ordering::Relaxed));
        }
        for (name, help, cs) in [
            (
                SLOTS_PUBLISHED,
                "Slots this instance published, per entry.",
                &self.published,
            ),
            (
                SLOTS_SKIPPED,
                "Missed slots given up, per entry.",
                &self.skipped,
            ),
            (
                SLOTS_ALREADY_PUBLISHED,
                "Slots refused because they were already published, per entry.",
                &self.already,
            ),
        ] {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} counter");
            for (entry, c) in self.entries.iter().zip(cs) {
                let _ = writeln!(
                    out,
                    "{name}{{entry=\"{}\"}} {}",
                    escape_label(entry),
                    c.load(Ordering::Relaxed)
                );
            }
        }
        out
    }
}

/// A label value as the text format wants it: `\`, `"` and newlines escaped.
fn escape_label(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// Serves `GET /metrics` on `listener` until `stop` is cancelled.
pub(crate) async fn serve(
    listener: tokio::net::TcpListener,
    metrics: Arc<Metrics>,
    stop: CancellationToken,
) -> std::io::Result<()> {
    crate::service::metrics_http::serve(
        listener,
        crate::service::metrics_http::TEXT_FORMAT,
        move || metrics.render(),
        stop,
    )
    .await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_the_text_format_with_escaped_labels() {
        let m = Metrics::new(vec!["a".into(), "we\"ird\\".into()]);
        m.set_leader(true);
        m.renewed();
        m.published(1);
        m.skipped(0, 3);
        let text = m.render();
        assert!(text.contains("taskstack_beat_leader 1\n"), "{text}");
        assert!(text.contains("taskstack_beat_lock_acquired_total 1\n"));
        assert!(text.contains("taskstack_beat_lock_renewals_total 1\n"));
        assert!(text.contains("taskstack_beat_slots_published_total{entry=\"we\\\"ird\\\\\"} 1\n"));
        assert!(text.contains("taskstack_beat_slots_skipped_total{entry=\"a\"} 3\n"));
        assert!(text.contains("# TYPE taskstack_beat_slots_skipped_total counter"));
        assert_eq!(m.published_total(), 1);
        assert_eq!(m.skipped_total(), 3);
    }
}
