//! The enqueue request: its schema, and the checks that turn it into a
//! task to send (bounds the schema states, and what only the deployment
//! knows: which task names and queues exist).

use super::check_name;
use crate::error::ApiError;
use crate::state::AppState;
use axum::http::StatusCode;
use chrono::{DateTime, Utc};
use serde::Deserialize;
use serde_json::{Map, Value, json};
use std::time::Duration;
use taskstack::{SendOptions, TaskRequest};
use utoipa::ToSchema;

/// Longest countdown, time limit or expiry horizon accepted (seconds): a
/// year. Anything longer is almost certainly a unit mistake.
const MAX_SECONDS: f64 = 365.0 * 24.0 * 3600.0;

/// A task to enqueue.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct EnqueueRequest {
    /// The task's registered name.
    #[schema(
        example = "taskstack.add",
        min_length = 1,
        max_length = 255,
        pattern = r"^[^\s\x00-\x1f\x7f-\x9f]+$"
    )]
    pub task: String,
    /// Positional arguments.
    #[serde(default)]
    #[schema(example = json!([2, 3]))]
    pub args: Vec<Value>,
    /// Keyword arguments.
    #[serde(default)]
    #[schema(value_type = Object)]
    pub kwargs: Map<String, Value>,
    /// Queue to send to (default: the first configured queue).
    #[schema(
        min_length = 1,
        max_length = 255,
        pattern = r"^[^\s\x00-\x1f\x7f-\x9f:]+$"
    )]
    pub queue: Option<String>,
    /// Run no earlier than this many seconds from now.
    #[schema(minimum = 0, maximum = 31_536_000)]
    pub countdown: Option<f64>,
    /// Run no earlier than this time (RFC 3339). Not together with `countdown`.
    pub eta: Option<DateTime<Utc>>,
    /// Do not run after this time (RFC 3339): the task is then recorded REVOKED.
    pub expires: Option<DateTime<Utc>>,
    /// Celery priority, 0 (first) to 9 (last).
    #[schema(minimum = 0, maximum = 9)]
    pub priority: Option<u8>,
    /// How many times the task may be retried (overrides the worker's default).
    #[schema(minimum = 0, maximum = 1000)]
    pub max_retries: Option<u32>,
    /// Hard time limit in seconds: the task is stopped and fails.
    #[schema(exclusive_minimum = 0, maximum = 31_536_000)]
    pub time_limit: Option<f64>,
    /// Soft time limit in seconds: the task is told to wrap up.
    #[schema(exclusive_minimum = 0, maximum = 31_536_000)]
    pub soft_time_limit: Option<f64>,
    /// Workflows only (`POST /api/v1/workflows`): a chain step that does
    /// not receive the previous step's result (Celery's `.si()`).
    #[serde(default)]
    pub immutable: bool,
}

fn seconds(field: &str, v: Option<f64>, allow_zero: bool) -> Result<Option<Duration>, ApiError> {
    let Some(s) = v else { return Ok(None) };
    let ok = if allow_zero { s >= 0.0 } else { s > 0.0 };
    if !ok || s > MAX_SECONDS || !s.is_finite() {
        let bound = if allow_zero { "0" } else { "more than 0" };
        return Err(ApiError::invalid(format!(
            "`{field}` is {s}; it must be {bound} and at most {MAX_SECONDS} seconds (a year)"
        )));
    }
    Ok(Some(Duration::from_secs_f64(s)))
}

fn horizon(field: &str, t: Option<DateTime<Utc>>) -> Result<(), ApiError> {
    if let Some(t) = t
        && (t - Utc::now()).num_seconds() as f64 > MAX_SECONDS
    {
        return Err(ApiError::invalid(format!(
            "`{field}` {t} is more than a year away"
        )));
    }
    Ok(())
}

/// Checks a request against the schema's bounds and what the deployment
/// knows, and turns it into a task to send.
pub async fn validate(state: &AppState, req: EnqueueRequest) -> Result<TaskRequest, ApiError> {
    check_name("task", &req.task)?;
    if let Some(q) = &req.queue {
        check_name("queue", q)?;
        if q.contains(':') {
            return Err(ApiError::invalid(format!(
                "`queue` {q:?} contains ':', which queue names may not"
            )));
        }
    }
    if let Some(p) = req.priority
        && p > 9
    {
        return Err(ApiError::invalid(format!(
            "`priority` is {p}; it must be 0 to 9"
        )));
    }
    if req.max_retries.is_some_and(|m| m > 1000) {
        return Err(ApiError::invalid("`max_retries` must be at most 1000"));
    }
    if req.countdown.is_some() && req.eta.is_some() {
        return Err(ApiError::invalid(
            "give `countdown` or `eta`, not both: they say the same thing",
        ));
    }
    let countdown = seconds("countdown", req.countdown, true)?;
    let time_limit = seconds("time_limit", req.time_limit, false)?;
    let soft_time_limit = seconds("soft_time_limit", req.soft_time_limit, false)?;
    horizon("eta", req.eta)?;
    horizon("expires", req.expires)?;
    if let Some(exp) = req.expires {
        if exp <= Utc::now() {
            return Err(ApiError::invalid(format!(
                "`expires` {exp} is in the past: the task could never run"
            )));
        }
        if req.eta.is_some_and(|eta| eta >= exp) {
            return Err(ApiError::invalid(
                "`expires` is not after `eta`: the task could never run",
            ));
        }
    }

    let queue = req
        .queue
        .clone()
        .unwrap_or_else(|| state.settings.queues[0].clone());
    let allow_list = &state.settings.tasks;
    let configured_queue = state.settings.queues.contains(&queue);
    // Live workers are only read (at most once a second, cached) when the
    // allow-list or the configured queues do not settle the question.
    let snapshot = if allow_list.is_empty() || !configured_queue {
        Some(state.snapshot().await.map_err(|e| ApiError::broker(&e))?)
    } else {
        None
    };
    let task_known = if allow_list.is_empty() {
        snapshot
            .as_ref()
            .is_some_and(|s| s.tasks.contains(&req.task))
    } else {
        allow_list.contains(&req.task)
    };
    if !task_known {
        let (why, known): (&str, Vec<&String>) = if allow_list.is_empty() {
            (
                "no live worker announces it",
                snapshot.iter().flat_map(|s| s.tasks.iter()).collect(),
            )
        } else {
            (
                "it is not in the configured allow-list (web_tasks)",
                allow_list.iter().collect(),
            )
        };
        return Err(ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "unknown_task",
            format!("task {:?} is not known: {why}", req.task),
        )
        .with_details(json!({ "known_tasks": known })));
    }
    if !configured_queue && !snapshot.as_ref().is_some_and(|s| s.queues.contains(&queue)) {
        let mut known: Vec<&String> = state.settings.queues.iter().collect();
        for q in snapshot.iter().flat_map(|s| s.queues.iter()) {
            if !known.contains(&q) {
                known.push(q);
            }
        }
        return Err(ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "unknown_queue",
            format!("queue {queue:?} is neither configured nor consumed by a live worker"),
        )
        .with_details(json!({ "known_queues": known })));
    }
    Ok(TaskRequest {
        name: req.task,
        args: req.args,
        kwargs: req.kwargs,
        options: SendOptions {
            queue: Some(queue),
            countdown,
            eta: req.eta,
            expires: req.expires,
            priority: req.priority,
            max_retries: req.max_retries,
            time_limit,
            soft_time_limit,
            immutable: req.immutable,
            ..SendOptions::default()
        },
    })
}
