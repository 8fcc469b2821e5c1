//! `/metrics`: the web service's Prometheus metrics (OpenMetrics text).
//!
//! Request counters and latencies are recorded by a middleware; queue
//! depths, live workers, Redis and the beat lock are read from Redis when
//! scraped. Label values are bounded: routes are templates, methods a
//! fixed set, task names those the API accepted (known to workers or the
//! allow-list), queues those of the configuration and live workers.

use crate::state::AppState;
use axum::extract::{MatchedPath, Request, State};
use axum::http::{Method, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;
use std::time::Instant;

/// Counter (`_total` appended), labels `route`, `method`, `status`.
pub const HTTP_REQUESTS: &str = "taskstack_web_http_requests";
/// Histogram, labels `route`, `method`.
pub const HTTP_DURATION: &str = "taskstack_web_http_request_duration_seconds";
/// Counter (`_total` appended), label `task`.
pub const TASKS_ENQUEUED: &str = "taskstack_web_tasks_enqueued";
/// Gauge, labels `queue`, `state` (`ready`, `delayed`, `in_flight`,
/// `dead_lettered`; no `delayed` with a RabbitMQ broker, which cannot count
/// it by queue).
pub const QUEUE_MESSAGES: &str = "taskstack_queue_messages";
/// Gauge, label `queue`: how long the oldest ready message has waited
/// (absent while that message does not say, e.g. one sent by Python Celery).
pub const QUEUE_OLDEST_AGE: &str = "taskstack_queue_oldest_ready_age_seconds";
/// Gauge, label `queue`: live workers consuming it.
pub const WORKERS_LIVE: &str = "taskstack_workers_live";
/// Gauge, label `queue`: consumers the broker counts on it (RabbitMQ
/// only; absent on Redis, which has none to count).
pub const QUEUE_CONSUMERS: &str = "taskstack_queue_consumers";
/// Gauge: 1 when Redis answered the scrape's reads, else 0.
pub const REDIS_UP: &str = "taskstack_redis_up";
/// Gauge: 1 while some beat instance holds the leader lock.
pub const BEAT_LEADER_PRESENT: &str = "taskstack_beat_leader_present";

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct HttpLabels {
    route: String,
    method: &'static str,
    status: u16,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RouteLabels {
    route: String,
    method: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct TaskLabels {
    task: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct QueueStateLabels {
    queue: String,
    state: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct QueueLabels {
    queue: String,
}

type DurationFamily = Family<RouteLabels, Histogram, fn() -> Histogram>;

fn duration_histogram() -> Histogram {
    // 0.25 ms .. ~4 s
    Histogram::new(exponential_buckets(0.000_25, 2.0, 15))
}

/// The registry and its metric families.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    requests: Family<HttpLabels, Counter>,
    durations: DurationFamily,
    enqueued: Family<TaskLabels, Counter>,
    queue_messages: Family<QueueStateLabels, Gauge>,
    oldest_age: Family<QueueLabels, Gauge<f64, std::sync::atomic::AtomicU64>>,
    workers_live: Family<QueueLabels, Gauge>,
    consumers: Family<QueueLabels, Gauge>,
    redis_up: Gauge,
    beat_leader: Gauge,
    /// One scrape at a time: a scrape resets and refills the gauges.
    scrape: tokio::sync::Mutex<()>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::default();
        let requests = Family::<HttpLabels, Counter>::default();
        let durations: DurationFamily = Family::new_with_constructor(duration_histogram);
        let enqueued = Family::<TaskLabels, Counter>::default();
        let queue_messages = Family::<QueueStateLabels, Gauge>::default();
        let oldest_age = Family::<QueueLabels, Gauge<f64, std::sync::atomic::AtomicU64>>::default();
        let workers_live = Family::<QueueLabels, Gauge>::default();
        let consumers = Family::<QueueLabels, Gauge>::default();
        let redis_up = Gauge::default();
        let beat_leader = Gauge::default();
        registry.register(
            HTTP_REQUESTS,
            "HTTP requests answered, by route template, method and status",
            requests.clone(),
        );
        registry.register(
            HTTP_DURATION,
            "Time to answer an HTTP request, by route template and method",
            durations.clone(),
        );
        registry.register(
            TASKS_ENQUEUED,
            "Tasks enqueued through the API, by task name",
            enqueued.clone(),
        );
        registry.register(
            QUEUE_MESSAGES,
            "Messages per queue: ready, delayed (ETA/countdown/retry), in flight (held by workers), dead-lettered",
            queue_messages.clone(),
        );
        registry.register(
            QUEUE_OLDEST_AGE,
            "Seconds the oldest ready message of each queue has waited",
            oldest_age.clone(),
        );
        registry.register(
            WORKERS_LIVE,
            "Live (heartbeating) workers consuming each queue",
            workers_live.clone(),
        );
        registry.register(
            QUEUE_CONSUMERS,
            "Consumers the broker counts on each queue (RabbitMQ)",
            consumers.clone(),
        );
        registry.register(
            REDIS_UP,
            "1 when Redis answered this scrape's reads",
            redis_up.clone(),
        );
        registry.register(
            BEAT_LEADER_PRESENT,
            "1 while a beat instance holds the leader lock",
            beat_leader.clone(),
        );
        Self {
            registry,
            requests,
            durations,
            enqueued,
            queue_messages,
            oldest_age,
            workers_live,
            consumers,
            redis_up,
            beat_leader,
            scrape: tokio::sync::Mutex::new(()),
        }
    }

    pub fn task_enqueued(&self, task: &str) {
        self.tasks_enqueued(task, 1);
    }

    /// Counts `n` tasks named `task` enqueued.
    pub fn tasks_enqueued(&self, task: &str, n: u64) {
        self.enqueued
            .get_or_create(&TaskLabels {
                task: task.to_owned(),
            })
            .inc_by(n);
    }

    fn observe(&self, route: String, method: &'static str, status: u16, secs: f64) {
        self.durations
            .get_or_create(&RouteLabels {
                route: route.clone(),
                method,
            })
            .observe(secs);
        self.requests
            .get_or_create(&HttpLabels {
                route,
                method,
                status,
            })
            .inc();
    }

    /// Reads the broker-side figures and encodes every metric.
    async fn render(&self, state: &AppState) -> String {
        let _one = self.scrape.lock().await;
        self.queue_messages.clear();
        self.oldest_age.clear();
        self.workers_live.clear();
        self.consumers.clear();
        let read = async {
            let queues = crate::api::queues::queue_views(state).await?;
            let leader = state.beat_leader().await?;
            Ok::<_, taskstack::backend::BackendError>((queues, leader.is_some()))
        };
        let up = match read.await {
            Ok((queues, leader)) => {
                for q in queues {
                    // No `delayed` series where the broker cannot count
                    // it by queue (RabbitMQ).
                    for (name, v) in [
                        ("ready", Some(q.ready)),
                        ("delayed", q.delayed),
                        ("in_flight", Some(q.in_flight)),
                        ("dead_lettered", Some(q.dead_lettered)),
                    ]
                    .into_iter()
                    .filter_map(|(name, v)| Some((name, v?)))
                    {
                        self.queue_messages
                            .get_or_create(&QueueStateLabels {
                                queue: q.name.clone(),
                                state: name,
                            })
                            .set(gauge(v));
                    }
                    if let Some(age) = q.oldest_ready_age_seconds {
                        self.oldest_age
                            .get_or_create(&QueueLabels {
                                queue: q.name.clone(),
                            })
                            .set(age);
                    }
                    if let Some(n) = q.consumers {
                        self.consumers
                            .get_or_create(&QueueLabels {
                                queue: q.name.clone(),
                            })
                            .set(gauge(n));
                    }
                    self.workers_live
                        .get_or_create(&QueueLabels { queue: q.name })
                        .set(gauge(q.workers));
                }
                self.beat_leader.set(i64::from(leader));
                1
            }
            Err(e) => {
                tracing::warn!(error = %e, "metrics: cannot read the broker");
                0
            }
        };
        self.redis_up.set(up);
        let mut out = String::new();
        if let Err(e) = prometheus_client::encoding::text::encode(&mut out, &self.registry) {
            tracing::error!(error = %e, "cannot encode metrics");
        }
        out
    }
}

fn gauge(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

/// The route label: the matched template, or `unmatched` (never the raw
/// path, which would make the label unbounded).
fn route_of(req: &Request) -> String {
    req.extensions()
        .get::<MatchedPath>()
        .map_or_else(|| "unmatched".to_owned(), |m| m.as_str().to_owned())
}

/// The method label, from a fixed set.
fn method_of(m: &Method) -> &'static str {
    match *m {
        Method::GET => "GET",
        Method::POST => "POST",
        Method::DELETE => "DELETE",
        Method::PUT => "PUT",
        Method::PATCH => "PATCH",
        Method::HEAD => "HEAD",
        Method::OPTIONS => "OPTIONS",
        _ => "other",
    }
}

/// Middleware: counts and times every request.
pub async fn track(State(state): State<AppState>, req: Request, next: Next) -> Response {
    let route = route_of(&req);
    let method = method_of(req.method());
    let start = Instant::now();
    let resp = next.run(req).await;
    state.metrics.observe(
        route,
        method,
        resp.status().as_u16(),
        start.elapsed().as_secs_f64(),
    );
    resp
}

/// Prometheus metrics (OpenMetrics text format).
#[utoipa::path(
    get,
    path = "/metrics",
    tag = "health",
    responses((status = 200, description = "Every metric", body = String,
        content_type = "application/openmetrics-text"))
)]
pub async fn serve(State(state): State<AppState>) -> impl IntoResponse {
    let body = state.metrics.render(&state).await;
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        body,
    )
}
