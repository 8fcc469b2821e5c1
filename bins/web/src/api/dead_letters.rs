//! `/api/v1/dead-letters/{queue}`: inspect, requeue and discard dead letters.

use super::check_name;
use crate::error::{ApiError, ApiJson, ApiPath, ApiQuery, ErrorBody};
use crate::state::AppState;
use axum::Json;
use axum::extract::State;
use serde::{Deserialize, Serialize};
use taskstack::backend::Use;
use taskstack::broker::{DeadLetter, DeadLetterAction, DeadSelection};
use taskstack::proto::TaskResult;
use utoipa::{IntoParams, ToSchema};

/// Most dead letters listed or moved by one request.
pub const MAX_BATCH: usize = 10_000;

/// One dead letter.
#[derive(Debug, Serialize, ToSchema)]
pub struct DeadLetterView {
    /// Why it was dead-lettered.
    pub reason: String,
    pub task_id: Option<String>,
    pub task: Option<String>,
    /// The worker that gave up on it.
    pub worker: String,
    /// When (RFC 3339).
    pub at: String,
    /// The original message, byte for byte, when it is UTF-8 text and was
    /// read by the worker; empty otherwise.
    pub payload: String,
    /// The original message in base64, when it was not UTF-8 text (such a
    /// dead letter can be discarded, not requeued).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub payload_base64: Option<String>,
    /// Where a message over `max_message_size` is kept, byte for byte (it
    /// was refused unread); requeueing reads it from there.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub payload_key: Option<String>,
    /// The size in bytes of the message kept at `payload_key`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub payload_size: Option<u64>,
}

impl From<DeadLetter> for DeadLetterView {
    fn from(d: DeadLetter) -> Self {
        Self {
            reason: d.reason,
            task_id: d.task_id,
            task: d.task,
            worker: d.worker,
            at: d.at,
            payload: d.payload,
            payload_base64: d.payload_base64,
            payload_key: d.payload_key,
            payload_size: d.payload_size,
        }
    }
}

#[derive(Debug, Serialize, ToSchema)]
pub struct DeadLetterList {
    pub queue: String,
    /// How many dead letters the queue has in all.
    pub total: u64,
    /// The newest ones, newest first.
    pub dead_letters: Vec<DeadLetterView>,
}

#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct ListParams {
    /// How many to list (newest first), 1 to 1000; default 100.
    #[param(minimum = 1, maximum = 1000)]
    pub limit: Option<usize>,
}

/// Which dead letters to requeue or discard: `task_ids`, or the `oldest` N.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct DeadLetterSelection {
    /// The dead letters of these tasks.
    #[schema(min_items = 1, max_items = 10000, inline)]
    pub task_ids: Option<Vec<TaskId>>,
    /// The oldest N dead letters, 1 to 10000.
    #[schema(minimum = 1, maximum = 10000)]
    pub oldest: Option<usize>,
}

/// A task id.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(transparent)]
#[schema(
    min_length = 1,
    max_length = 255,
    pattern = r"^[^\s\x00-\x1f\x7f-\x9f]+$"
)]
pub struct TaskId(pub String);

/// What a requeue or discard did.
#[derive(Debug, Serialize, ToSchema)]
pub struct DeadLettersMoved {
    pub queue: String,
    /// How many dead letters were requeued or discarded.
    pub count: usize,
    /// Their task ids (null for a message that had none).
    pub task_ids: Vec<Option<String>>,
}

fn check_queue(queue: &str) -> Result<(), ApiError> {
    check_name("queue", queue).map_err(|e| ApiError::bad_request(e.body.message))?;
    if queue.contains(':') {
        return Err(ApiError::bad_request(format!(
            "queue {queue:?} contains ':', which queue names may not"
        )));
    }
    Ok(())
}

/// A queue's newest dead letters.
#[utoipa::path(
    get,
    path = "/api/v1/dead-letters/{queue}",
    tag = "operations",
    params(("queue" = String, Path, description = "Queue name", min_length = 1, max_length = 255, pattern = r"^[^\s\x00-\x1f\x7f-\x9f:]+$"), ListParams),
    security(("bearer" = [])),
    responses(
        (status = 200, description = "Dead letters, newest first", body = DeadLetterList),
        (status = 400, description = "Invalid queue name or query", body = ErrorBody),
        (status = 401, description = "No valid API token", body = ErrorBody),
        (status = 503, description = "Redis unavailable", body = ErrorBody),
    )
)]
pub async fn list(
    State(state): State<AppState>,
    ApiPath(queue): ApiPath<String>,
    ApiQuery(params): ApiQuery<ListParams>,
) -> Result<Json<DeadLetterList>, ApiError> {
    check_queue(&queue)?;
    let limit = params.limit.unwrap_or(100);
    if !(1..=1000).contains(&limit) {
        return Err(ApiError::bad_request(format!(
            "`limit` is {limit}; it must be 1 to 1000"
        )));
    }
    let (items, total) = state
        .backend()
        .dead_letters(Use::Request)
        .page(&queue, limit)
        .await
        .map_err(|e| ApiError::broker(&e))?;
    Ok(Json(DeadLetterList {
        queue,
        total,
        dead_letters: items.into_iter().map(Into::into).collect(),
    }))
}

fn selection(body: DeadLetterSelection) -> Result<DeadSelection, ApiError> {
    match (body.task_ids, body.oldest) {
        (Some(ids), None) => {
            if ids.is_empty() || ids.len() > MAX_BATCH {
                return Err(ApiError::invalid(format!(
                    "`task_ids` must name 1 to {MAX_BATCH} tasks"
                )));
            }
            for id in &ids {
                check_name("task_ids[]", &id.0)?;
            }
            Ok(DeadSelection::TaskIds(
                ids.into_iter().map(|i| i.0).collect(),
            ))
        }
        (None, Some(n)) if (1..=MAX_BATCH).contains(&n) => Ok(DeadSelection::Oldest { limit: n }),
        (None, Some(n)) => Err(ApiError::invalid(format!(
            "`oldest` is {n}; it must be 1 to {MAX_BATCH}"
        ))),
        _ => Err(ApiError::invalid(
            "name the dead letters with exactly one of `task_ids` and `oldest`",
        )),
    }
}

async fn act(
    state: &AppState,
    queue: String,
    body: DeadLetterSelection,
    action: DeadLetterAction,
) -> Result<Json<DeadLettersMoved>, ApiError> {
    check_queue(&queue)?;
    let sel = selection(body)?;
    let mut dead = state.backend().dead_letters(Use::Request);
    let picked = dead
        .pick(&queue, &sel)
        .await
        .map_err(|e| ApiError::broker(&e))?;
    if action == DeadLetterAction::Requeue {
        // PENDING again before the message is back in its queue, so the
        // old FAILURE record never hides the new run and a worker's new
        // record is never overwritten.
        let pending: Vec<TaskResult> = picked
            .iter()
            .filter_map(|p| {
                let r = &p.record;
                Some(TaskResult::pending(
                    r.task_id.as_deref()?,
                    r.task.as_deref().unwrap_or(""),
                    &r.queue,
                ))
            })
            .collect();
        state
            .backend()
            .results(Use::Request)
            .write(&pending, state.settings.result_expires)
            .await
            .map_err(|e| ApiError::broker(&e))?;
    }
    let moved = dead
        .apply(&queue, action, &picked)
        .await
        .map_err(|e| ApiError::broker(&e))?;
    tracing::info!(queue = %queue, count = moved.len(), action = ?action, "dead letters moved");
    Ok(Json(DeadLettersMoved {
        queue,
        count: moved.len(),
        task_ids: moved.into_iter().map(|d| d.task_id).collect(),
    }))
}

/// Requeue dead letters: each original message goes back to the queue and
/// priority it came from, as it was, and its task is PENDING again.
#[utoipa::path(
    post,
    path = "/api/v1/dead-letters/{queue}/requeue",
    tag = "operations",
    params(("queue" = String, Path, description = "Queue name", min_length = 1, max_length = 255, pattern = r"^[^\s\x00-\x1f\x7f-\x9f:]+$")),
    request_body = DeadLetterSelection,
    security(("bearer" = [])),
    responses(
        (status = 200, description = "Requeued", body = DeadLettersMoved),
        (status = 400, description = "Malformed JSON or invalid queue name", body = ErrorBody),
        (status = 401, description = "No valid API token", body = ErrorBody),
        (status = 413, description = "Body larger than the limit", body = ErrorBody),
        (status = 415, description = "Body is not JSON", body = ErrorBody),
        (status = 422, description = "Invalid selection", body = ErrorBody),
        (status = 503, description = "Redis unavailable", body = ErrorBody),
    )
)]
pub async fn requeue(
    State(state): State<AppState>,
    ApiPath(queue): ApiPath<String>,
    ApiJson(body): ApiJson<DeadLetterSelection>,
) -> Result<Json<DeadLettersMoved>, ApiError> {
    act(&state, queue, body, DeadLetterAction::Requeue).await
}

/// Discard dead letters for good.
#[utoipa::path(
    post,
    path = "/api/v1/dead-letters/{queue}/discard",
    tag = "operations",
    params(("queue" = String, Path, description = "Queue name", min_length = 1, max_length = 255, pattern = r"^[^\s\x00-\x1f\x7f-\x9f:]+$")),
    request_body = DeadLetterSelection,
    security(("bearer" = [])),
    responses(
        (status = 200, description = "Discarded", body = DeadLettersMoved),
        (status = 400, description = "Malformed JSON or invalid queue name", body = ErrorBody),
        (status = 401, description = "No valid API token", body = ErrorBody),
        (status = 413, description = "Body larger than the limit", body = ErrorBody),
        (status = 415, description = "Body is not JSON", body = ErrorBody),
        (status = 422, description = "Invalid selection", body = ErrorBody),
        (status = 503, description = "Redis unavailable", body = ErrorBody),
    )
)]
pub async fn discard(
    State(state): State<AppState>,
    ApiPath(queue): ApiPath<String>,
    ApiJson(body): ApiJson<DeadLetterSelection>,
) -> Result<Json<DeadLettersMoved>, ApiError> {
    act(&state, queue, body, DeadLetterAction::Discard).await
}
