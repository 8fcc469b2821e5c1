//! `/api/v1/tasks`: enqueue a task, read its state and result, revoke it.

use super::check_name;
use super::enqueue::{EnqueueRequest, validate};
use crate::error::{ApiError, ApiJson, ApiPath, ErrorBody};
use crate::state::AppState;
use axum::extract::State;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::IntoResponse;
use chrono::{DateTime, Utc};
use serde::Serialize;
use serde_json::{Value, json};
use taskstack::TaskRequest;
use taskstack::backend::Use;
use taskstack::broker::RevokeOutcome;
use taskstack::producer::ProducerError;
use taskstack::proto::json::Object;
use taskstack::proto::{ExceptionInfo, Provenance, TaskResult, TaskState};
use utoipa::ToSchema;

/// Links to a task's resources.
#[derive(Debug, Serialize, ToSchema)]
pub struct TaskLinks {
    /// Where to poll the task's state.
    #[serde(rename = "self")]
    pub this: String,
}

/// The answer to an enqueue.
#[derive(Debug, Serialize, ToSchema)]
pub struct Enqueued {
    pub id: String,
    pub state: TaskState,
    pub task: String,
    pub queue: String,
    /// When the task is due, if later than now.
    pub eta: Option<DateTime<Utc>>,
    pub links: TaskLinks,
}

/// Why a task failed, was retried or was revoked.
#[derive(Debug, Serialize, ToSchema)]
pub struct TaskErrorView {
    /// Exception type, e.g. `ValueError`, `TimeLimitExceeded`.
    #[serde(rename = "type")]
    pub kind: String,
    pub module: Option<String>,
    pub message: String,
}

/// A task's state and outcome.
#[derive(Debug, Serialize, ToSchema)]
pub struct TaskView {
    pub id: String,
    pub state: TaskState,
    pub task: Option<String>,
    pub queue: Option<String>,
    /// The return value (SUCCESS only): any JSON value.
    #[schema(value_type = Option<Value>)]
    pub result: Option<Value>,
    /// Why it failed, is being retried or was revoked.
    pub error: Option<TaskErrorView>,
    pub traceback: Option<String>,
    /// The worker that ran (or is running) it.
    pub worker: Option<String>,
    pub retries: Option<u32>,
    pub date_started: Option<String>,
    pub date_done: Option<String>,
}

impl TaskView {
    fn of(r: TaskResult) -> Self {
        let state = r.status;
        let (result, error) = match r.status {
            TaskState::Success => (Some(r.result), None),
            TaskState::Failure | TaskState::Retry | TaskState::Revoked => {
                (None, Some(error_of(&r.result)))
            }
            _ => (None, None),
        };
        Self {
            id: r.task_id,
            state,
            task: r.name,
            queue: r.queue,
            result,
            error,
            traceback: r.traceback,
            worker: r.worker,
            retries: r.retries,
            date_started: r.date_started,
            date_done: r.date_done,
        }
    }
}

/// Celery's exception shape (`exc_type`, `exc_message`, `exc_module`), read
/// leniently: Python writes `exc_message` as a list of arguments.
fn error_of(v: &Value) -> TaskErrorView {
    let text = |k: &str| v.get(k).and_then(Value::as_str).map(str::to_owned);
    let message = match v.get("exc_message") {
        Some(Value::Array(parts)) => parts
            .iter()
            .map(|p| p.as_str().map_or_else(|| p.to_string(), str::to_owned))
            .collect::<Vec<_>>()
            .join(", "),
        Some(Value::String(s)) => s.clone(),
        Some(other) => other.to_string(),
        None => v.to_string(),
    };
    TaskErrorView {
        kind: text("exc_type").unwrap_or_else(|| "Exception".into()),
        module: text("exc_module"),
        message,
    }
}

/// The answer to a revocation.
#[derive(Debug, Serialize, ToSchema)]
pub struct Revoked {
    pub id: String,
    pub state: TaskState,
    /// True when this request revoked it, false when it was revoked before.
    pub revoked_now: bool,
}

/// A producer's refusal as a 422 naming the option; anything else as the
/// broker's failure.
pub(super) fn send_error(e: ProducerError) -> ApiError {
    match e {
        ProducerError::Option { option, reason } => {
            ApiError::invalid(format!("`{option}`: {reason}"))
        }
        other => ApiError::broker(&other),
    }
}

/// When `task` is due, if later than `now`.
pub(super) fn eta_of(task: &TaskRequest, now: DateTime<Utc>) -> Option<DateTime<Utc>> {
    task.options.eta.or_else(|| {
        task.options
            .countdown
            .filter(|d| !d.is_zero())
            .and_then(|d| chrono::Duration::from_std(d).ok())
            .map(|d| now + d)
    })
}

/// Where a task's state is read: this path and its id.
pub(super) const TASKS_PATH: &str = "/api/v1/tasks/";

pub(super) fn link(id: &str) -> String {
    [TASKS_PATH, id].concat()
}

/// Enqueue a task.
///
/// The message is a Celery protocol v2 message, so Python Celery workers can
/// run it too. A PENDING record is stored first, so the task is known from
/// the moment this answers.
#[utoipa::path(
    post,
    path = "/api/v1/tasks",
    tag = "tasks",
    request_body = EnqueueRequest,
    security(("bearer" = [])),
    responses(
        (status = 202, description = "Enqueued", body = Enqueued,
            headers(("location" = String, description = "Where to poll the task"))),
        (status = 400, description = "Malformed JSON", body = ErrorBody),
        (status = 401, description = "No valid API token", body = ErrorBody),
        (status = 413, description = "Body larger than the limit", body = ErrorBody),
        (status = 415, description = "Body is not JSON", body = ErrorBody),
        (status = 422, description = "Invalid request, unknown task or queue", body = ErrorBody),
        (status = 503, description = "Redis unavailable", body = ErrorBody),
    )
)]
pub async fn enqueue(
    State(state): State<AppState>,
    ApiJson(req): ApiJson<EnqueueRequest>,
) -> Result<impl IntoResponse, ApiError> {
    if req.immutable {
        return Err(ApiError::invalid(
            "`immutable` is for workflow steps (POST /api/v1/workflows): a single task has no previous result",
        ));
    }
    let task = validate(&state, req).await?;
    let id = state.producer.send(&task).await.map_err(send_error)?;
    state.metrics.task_enqueued(&task.name);
    state.tasks_sent(&[(&id, &task)]).await;
    tracing::debug!(task_id = %id, task = %task.name, "task enqueued");
    let mut body = Vec::with_capacity(enqueued_len(&id, &task));
    write_enqueued(&mut body, &id, &task, Utc::now());
    Ok((
        StatusCode::ACCEPTED,
        [(header::LOCATION, link(&id))],
        [(header::CONTENT_TYPE, HeaderValue::from_static(JSON))],
        body,
    ))
}

/// The content type of JSON answers.
pub(super) const JSON: &str = "application/json";

/// An [`Enqueued`] answer's length without its id, name and queue,
/// rounded up.
const ENQUEUED_FIXED: usize = 128;

/// About how long the [`Enqueued`] answer for task `id` is (its id twice:
/// as itself and in its link), to size the text before writing it.
pub(super) fn enqueued_len(id: &str, task: &TaskRequest) -> usize {
    ENQUEUED_FIXED
        + 2 * id.len()
        + task.name.len()
        + task.options.queue.as_ref().map_or(0, String::len)
}

/// Writes the [`Enqueued`] answer for task `id` at the end of `out`: the
/// text its serde derive gives, written straight (a batch writes a
/// thousand; through serde they took a tenth of its time).
pub(super) fn write_enqueued(out: &mut Vec<u8>, id: &str, task: &TaskRequest, now: DateTime<Utc>) {
    let mut o = Object::open(out);
    o.string("id", id);
    o.text("state", "PENDING");
    o.string("task", &task.name);
    o.string("queue", task.options.queue.as_deref().unwrap_or_default());
    match eta_of(task, now) {
        Some(eta) => o.value("eta", &eta),
        None => o.raw("eta", "null"),
    }
    let mut links = o.object("links");
    links.joined("self", &[TASKS_PATH, id]);
    links.close();
    o.close();
}

/// A task's state, result or error.
///
/// `404` when the id was never enqueued through this API (or a producer
/// that records PENDING tasks) or its record expired (`result_expires`).
#[utoipa::path(
    get,
    path = "/api/v1/tasks/{id}",
    tag = "tasks",
    params(("id" = String, Path, description = "The task id", min_length = 1, max_length = 255, pattern = r"^[^\s\x00-\x1f\x7f-\x9f]+$")),
    security(("bearer" = [])),
    responses(
        (status = 200, description = "The task", body = TaskView),
        (status = 400, description = "Invalid id", body = ErrorBody),
        (status = 401, description = "No valid API token", body = ErrorBody),
        (status = 404, description = "No such task (or its record expired)", body = ErrorBody),
        (status = 503, description = "Redis unavailable", body = ErrorBody),
    )
)]
pub async fn get_task(
    State(state): State<AppState>,
    ApiPath(id): ApiPath<String>,
) -> Result<axum::Json<TaskView>, ApiError> {
    check_id(&id)?;
    match state
        .backend()
        .results(Use::Request)
        .read(&id)
        .await
        .map_err(|e| ApiError::broker(&e))?
    {
        Some(r) => Ok(axum::Json(TaskView::of(r))),
        None => Err(not_found(&id)),
    }
}

fn check_id(id: &str) -> Result<(), ApiError> {
    check_name("id", id).map_err(|e| ApiError::bad_request(e.body.message))
}

fn not_found(id: &str) -> ApiError {
    ApiError::not_found(format!(
        "no task {id:?}: it was never enqueued, or its record expired"
    ))
}

/// Revoke a task that has not started.
///
/// The worker that takes it skips it and its state becomes REVOKED. A task
/// that has started or finished cannot be revoked (`409`).
#[utoipa::path(
    delete,
    path = "/api/v1/tasks/{id}",
    tag = "tasks",
    params(("id" = String, Path, description = "The task id", min_length = 1, max_length = 255, pattern = r"^[^\s\x00-\x1f\x7f-\x9f]+$")),
    security(("bearer" = [])),
    responses(
        (status = 200, description = "Revoked (now or before)", body = Revoked),
        (status = 400, description = "Invalid id", body = ErrorBody),
        (status = 401, description = "No valid API token", body = ErrorBody),
        (status = 404, description = "No such task (or its record expired)", body = ErrorBody),
        (status = 409, description = "The task has started or finished", body = ErrorBody),
        (status = 503, description = "Redis unavailable", body = ErrorBody),
    )
)]
pub async fn revoke_task(
    State(state): State<AppState>,
    ApiPath(id): ApiPath<String>,
) -> Result<axum::Json<Revoked>, ApiError> {
    check_id(&id)?;
    let exc = ExceptionInfo::celery("TaskRevokedError", "revoked through the API");
    let mut record = TaskResult::failure(
        &id,
        TaskState::Revoked,
        &exc,
        Provenance {
            name: "",
            worker: "",
            retries: 0,
            queue: "",
            parent_id: None,
        },
    );
    record.name = None;
    record.worker = None;
    record.queue = None;
    record.retries = None;
    let json = serde_json::to_string(&record).map_err(|e| ApiError::broker(&e))?;
    let outcome = state
        .backend()
        .task_states(Use::Request)
        .revoke(&id, &json, state.settings.result_expires)
        .await
        .map_err(|e| ApiError::broker(&e))?;
    let done = |now| {
        Ok(axum::Json(Revoked {
            id: id.clone(),
            state: TaskState::Revoked,
            revoked_now: now,
        }))
    };
    match outcome {
        RevokeOutcome::Revoked => {
            tracing::info!(task_id = %id, "task revoked");
            done(true)
        }
        RevokeOutcome::AlreadyRevoked => done(false),
        RevokeOutcome::Unknown => Err(not_found(&id)),
        RevokeOutcome::Refused(s) => {
            let state = s;
            Err(ApiError::new(
                StatusCode::CONFLICT,
                "not_revocable",
                format!("task {id:?} cannot be revoked: it is {state:?} (only tasks that have not started can be)"),
            )
            .with_details(json!({ "state": state })))
        }
        _ => Err(ApiError::broker(&"unexpected revocation outcome")),
    }
}
