//! The worker's Prometheus metrics: names (constants, so dashboards and
//! alert rules cannot drift from the code) and the registry behind
//! `/metrics` (`worker_metrics_listen`).
//!
//! Label values are bounded: `task` is a registered task name, or
//! `unregistered` / `undecodable` for messages no handler can run;
//! `outcome` is one of [`OUTCOMES`].

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;
use std::time::Duration;

/// Counter (`_total` appended), labels `task`, `outcome`: tasks finished.
pub const TASKS: &str = "taskstack_worker_tasks";
/// Histogram, label `task`: run time of tasks that ran (any outcome).
pub const TASK_DURATION: &str = "taskstack_worker_task_duration_seconds";
/// Gauge: messages this worker holds (running plus waiting for a slot).
pub const MESSAGES_HELD: &str = "taskstack_worker_messages_held";
/// Gauge: tasks running now.
pub const TASKS_RUNNING: &str = "taskstack_worker_tasks_running";
/// Gauge: this worker's concurrency (the most tasks it runs at once).
pub const CONCURRENCY: &str = "taskstack_worker_concurrency";
/// Counter (`_total` appended): messages of dead workers this worker's
/// reaper put back in their queues (each will be delivered again).
pub const MESSAGES_RESTORED: &str = "taskstack_worker_messages_restored";
/// Counter (`_total` appended): messages handed back unstarted at shutdown.
pub const MESSAGES_HANDED_BACK: &str = "taskstack_worker_messages_handed_back";
/// Counter (`_total` appended): expired result records this worker deleted
/// from a PostgreSQL result store (one worker cleans at a time).
pub const RESULTS_EXPIRED: &str = "taskstack_worker_results_expired";
/// Counter (`_total` appended): task events dropped (buffer full or Redis
/// unreachable); tasks never wait for events.
pub const EVENTS_DROPPED: &str = "taskstack_worker_events_dropped";

/// The values of the `outcome` label.
pub const OUTCOMES: [&str; 8] = [
    "success",
    "failure",
    "retry",
    "dead_lettered",
    "revoked",
    "expired",
    "forfeited",
    "duplicate",
];

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct TaskOutcome {
    task: String,
    outcome: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct TaskLabel {
    task: String,
}

type DurationFamily = Family<TaskLabel, Histogram, fn() -> Histogram>;

fn duration_histogram() -> Histogram {
    // 1 ms .. ~9 min
    Histogram::new(exponential_buckets(0.001, 2.5, 15))
}

/// The series of one task name, taken from the families once, so the hot
/// path neither allocates label sets nor searches the families.
#[derive(Debug, Clone)]
struct TaskSeries {
    outcomes: [Counter; OUTCOMES.len()],
    duration: Histogram,
}

/// One worker process's metrics.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    per_task: std::collections::HashMap<String, TaskSeries>,
    tasks: Family<TaskOutcome, Counter>,
    durations: DurationFamily,
    held: Gauge,
    running: Gauge,
    concurrency: Gauge,
    restored: Counter,
    handed_back: Counter,
    results_expired: Counter,
    events_dropped: Counter,
}

impl Metrics {
    /// Metrics with every (task, outcome) series of `tasks` present at 0,
    /// so a rate over them exists before the first task finishes.
    pub fn new(tasks: &[String], concurrency: usize) -> Self {
        let mut registry = Registry::default();
        let m = Self {
            tasks: Family::default(),
            durations: Family::new_with_constructor(duration_histogram),
            held: Gauge::default(),
            running: Gauge::default(),
            concurrency: Gauge::default(),
            restored: Counter::default(),
            handed_back: Counter::default(),
            results_expired: Counter::default(),
            events_dropped: Counter::default(),
            registry: Registry::default(),
            per_task: std::collections::HashMap::new(),
        };
        registry.register(
            TASKS,
            "Tasks finished by this worker, by task and outcome",
            m.tasks.clone(),
        );
        registry.register(
            TASK_DURATION,
            "Run time of the tasks this worker ran, by task",
            m.durations.clone(),
        );
        registry.register(
            MESSAGES_HELD,
            "Messages this worker holds (running or waiting for a slot)",
            m.held.clone(),
        );
        registry.register(TASKS_RUNNING, "Tasks running now", m.running.clone());
        registry.register(
            CONCURRENCY,
            "Most tasks this worker runs at once",
            m.concurrency.clone(),
        );
        registry.register(
            MESSAGES_RESTORED,
            "Messages of dead workers this worker put back in their queues",
            m.restored.clone(),
        );
        registry.register(
            MESSAGES_HANDED_BACK,
            "Messages handed back unstarted at shutdown",
            m.handed_back.clone(),
        );
        registry.register(
            RESULTS_EXPIRED,
            "Expired result records this worker deleted from the PostgreSQL result store",
            m.results_expired.clone(),
        );
        registry.register(
            EVENTS_DROPPED,
            "Task events dropped (buffer full or Redis unreachable)",
            m.events_dropped.clone(),
        );
        m.concurrency
            .set(i64::try_from(concurrency).unwrap_or(i64::MAX));
        let names = tasks
            .iter()
            .map(String::as_str)
            .chain(["unregistered", "undecodable"]);
        let per_task = names
            .map(|task| {
                let series = TaskSeries {
                    outcomes: OUTCOMES.map(|outcome| {
                        m.tasks.get_or_create_owned(&TaskOutcome {
                            task: task.to_owned(),
                            outcome,
                        })
                    }),
                    duration: m.durations.get_or_create_owned(&TaskLabel {
                        task: task.to_owned(),
                    }),
                };
                (task.to_owned(), series)
            })
            .collect();
        Self {
            registry,
            per_task,
            ..m
        }
    }

    /// A task finished with `outcome` (one of [`OUTCOMES`]).
    pub(crate) fn finished(&self, task: &str, outcome: &'static str) {
        let i = OUTCOMES.iter().position(|o| *o == outcome);
        match (self.per_task.get(task), i) {
            (Some(series), Some(i)) => {
                series.outcomes[i].inc();
            }
            _ => {
                self.tasks
                    .get_or_create(&TaskOutcome {
                        task: task.to_owned(),
                        outcome,
                    })
                    .inc();
            }
        }
    }

    /// A task ran for `took`.
    pub(crate) fn ran(&self, task: &str, took: Duration) {
        match self.per_task.get(task) {
            Some(series) => series.duration.observe(took.as_secs_f64()),
            None => self
                .durations
                .get_or_create(&TaskLabel {
                    task: task.to_owned(),
                })
                .observe(took.as_secs_f64()),
        }
    }

    pub(crate) fn restored(&self, n: u64) {
        self.restored.inc_by(n);
    }

    pub(crate) fn results_expired(&self, n: u64) {
        self.results_expired.inc_by(n);
    }

    pub(crate) fn handed_back(&self, n: u64) {
        self.handed_back.inc_by(n);
    }

    /// The text exposition, with the held and running gauges as given.
    /// The counter of dropped task events (handed to the event dispatcher).
    pub fn events_dropped(&self) -> Counter {
        self.events_dropped.clone()
    }

    pub fn render(&self, held: usize, running: usize) -> String {
        self.held.set(i64::try_from(held).unwrap_or(i64::MAX));
        self.running.set(i64::try_from(running).unwrap_or(i64::MAX));
        let mut out = String::new();
        if let Err(e) = prometheus_client::encoding::text::encode(&mut out, &self.registry) {
            tracing::error!(error = %e, "cannot encode metrics");
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_series_of_a_registered_task_exists_from_the_start() {
        let m = Metrics::new(&["t.a".to_owned()], 8);
        m.finished("t.a", "success");
        m.ran("t.a", Duration::from_millis(3));
        m.restored(2);
        let text = m.render(5, 1);
        for line in [
            r#"taskstack_worker_tasks_total{task="t.a",outcome="success"} 1"#,
            r#"taskstack_worker_tasks_total{task="t.a",outcome="dead_lettered"} 0"#,
            r#"taskstack_worker_task_duration_seconds_count{task="t.a"} 1"#,
            "taskstack_worker_messages_held 5",
            "taskstack_worker_tasks_running 1",
            "taskstack_worker_concurrency 8",
            "taskstack_worker_messages_restored_total 2",
        ] {
            assert!(text.contains(line), "missing {line:?} in\n{text}");
        }
    }
}
