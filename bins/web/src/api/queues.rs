//! `/api/v1/queues` and `/api/v1/workers`: what is waiting where, and who
//! is working.

use crate::error::{ApiError, ErrorBody};
use crate::state::{AppState, read_snapshot};
use axum::Json;
use axum::extract::State;
use serde::Serialize;
use taskstack::backend::{BackendError, Use};
use taskstack::broker::{DelayedSpan, WorkerRecord};
use utoipa::ToSchema;

/// One queue's messages and workers.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct QueueView {
    pub name: String,
    /// Waiting to be taken (all priorities).
    pub ready: u64,
    /// Parked until due (ETA, countdown, retry backoff); null with a
    /// RabbitMQ broker, whose delay levels are shared by every queue (their
    /// total is `delayed.parked` of the list).
    pub delayed: Option<u64>,
    /// Taken by workers, not yet finished.
    pub in_flight: u64,
    /// In the queue's dead-letter list.
    pub dead_lettered: u64,
    /// Live workers consuming the queue.
    pub workers: u64,
    /// How long the oldest ready message has waited, in seconds (0 when
    /// none is ready; null when that message does not say, e.g. one sent
    /// by Python Celery).
    pub oldest_ready_age_seconds: Option<f64>,
    /// Consumers RabbitMQ counts on the queue (one per worker serving
    /// it); absent on Redis, which has no consumers to count.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub consumers: Option<u64>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct QueueList {
    pub queues: Vec<QueueView>,
    pub delayed: DelayedView,
}

/// The delayed set, shared by every queue: ETA, countdown and retry
/// messages waiting to be due.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct DelayedView {
    /// Messages parked in all.
    pub parked: u64,
    /// When the message due first is due (RFC 3339), null when none is parked.
    pub first_due: Option<String>,
    /// When the message due last is due (RFC 3339): an ETA far ahead shows here.
    pub last_due: Option<String>,
}

impl From<DelayedSpan> for DelayedView {
    fn from(s: DelayedSpan) -> Self {
        let at = |ms: Option<i64>| {
            ms.and_then(chrono::DateTime::from_timestamp_millis)
                .map(taskstack::proto::envelope::format_time)
        };
        Self {
            parked: s.parked,
            first_due: at(s.first_due_ms),
            last_due: at(s.last_due_ms),
        }
    }
}

/// Every configured queue and every queue a live worker consumes.
pub async fn queue_views(state: &AppState) -> Result<Vec<QueueView>, BackendError> {
    let snapshot = read_snapshot(state.backend().as_ref()).await?;
    let mut names = state.settings.queues.clone();
    for q in &snapshot.queues {
        if !names.contains(q) {
            names.push(q.clone());
        }
    }
    let counts = state
        .backend()
        .inspect(Use::Request)
        .queue_counts(&names)
        .await?;
    Ok(names
        .into_iter()
        .zip(counts)
        .map(|(name, c)| QueueView {
            workers: snapshot.workers_on(&name) as u64,
            name,
            ready: c.ready,
            delayed: c.delayed,
            in_flight: c.in_flight,
            dead_lettered: c.dead_lettered,
            oldest_ready_age_seconds: c.oldest_ready_age.map(|d| d.as_secs_f64()),
            consumers: c.consumers,
        })
        .collect())
}

/// Message counts per queue.
#[utoipa::path(
    get,
    path = "/api/v1/queues",
    tag = "operations",
    security(("bearer" = [])),
    responses(
        (status = 200, description = "Every configured or consumed queue", body = QueueList),
        (status = 401, description = "No valid API token", body = ErrorBody),
        (status = 503, description = "Redis unavailable", body = ErrorBody),
    )
)]
pub async fn list_queues(State(state): State<AppState>) -> Result<Json<QueueList>, ApiError> {
    let queues = queue_views(&state)
        .await
        .map_err(|e| ApiError::broker(&e))?;
    let delayed = state
        .backend()
        .inspect(Use::Request)
        .delayed_span()
        .await
        .map_err(|e| ApiError::broker(&e))?
        .into();
    Ok(Json(QueueList { queues, delayed }))
}

#[derive(Debug, Serialize, ToSchema)]
pub struct WorkerList {
    /// Live workers' heartbeat records.
    pub workers: Vec<WorkerRecord>,
}

/// Live workers (those whose heartbeat has not expired).
#[utoipa::path(
    get,
    path = "/api/v1/workers",
    tag = "operations",
    security(("bearer" = [])),
    responses(
        (status = 200, description = "Live workers", body = WorkerList),
        (status = 401, description = "No valid API token", body = ErrorBody),
        (status = 503, description = "Redis unavailable", body = ErrorBody),
    )
)]
pub async fn list_workers(State(state): State<AppState>) -> Result<Json<WorkerList>, ApiError> {
    let snapshot = read_snapshot(state.backend().as_ref())
        .await
        .map_err(|e| ApiError::broker(&e))?;
    let mut workers = snapshot.workers.clone();
    workers.sort_by(|a, b| a.id.cmp(&b.id));
    Ok(Json(WorkerList { workers }))
}
