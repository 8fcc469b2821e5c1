//! `POST /api/v1/tasks/batch`: many tasks in one request, all checked
//! before any is sent, then sent in one round trip to Redis.

use super::enqueue::{EnqueueRequest, validate};
use super::tasks::{Enqueued, JSON, enqueued_len, send_error, write_enqueued};
use crate::error::{ApiError, ApiJson};
use crate::state::AppState;
use axum::extract::State;
use axum::http::header::CONTENT_TYPE;
use axum::http::{HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::json;
use taskstack::TaskRequest;
use taskstack::proto::json::Object;
use utoipa::ToSchema;

/// Most tasks one batch may hold. The body limit (`web_body_limit`) bounds
/// the request's bytes as for every route.
pub const MAX_BATCH_TASKS: usize = 1000;

/// Tasks to enqueue together.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct BatchRequest {
    /// The tasks, each as `POST /api/v1/tasks` takes it. All are checked
    /// first: one invalid task and none is sent.
    #[schema(min_items = 1, max_items = 1000)]
    pub tasks: Vec<EnqueueRequest>,
}

/// The answer to a batch: one entry per task, in the request's order.
#[derive(Debug, Serialize, ToSchema)]
pub struct BatchEnqueued {
    pub tasks: Vec<Enqueued>,
}

/// Enqueue many tasks in one request.
///
/// Every task is checked (as `POST /api/v1/tasks` checks one) before any is
/// sent; the first invalid one is named by its position (`details.index`,
/// from 0) and nothing is enqueued. Then every task gets its PENDING record
/// and its message in one round trip to Redis. The answer lists each task's
/// id in the request's order.
#[utoipa::path(
    post,
    path = "/api/v1/tasks/batch",
    tag = "tasks",
    request_body = BatchRequest,
    security(("bearer" = [])),
    responses(
        (status = 202, description = "Every task enqueued", body = BatchEnqueued),
        (status = 400, description = "Malformed JSON", body = crate::error::ErrorBody),
        (status = 401, description = "No valid API token", body = crate::error::ErrorBody),
        (status = 413, description = "Body larger than the limit", body = crate::error::ErrorBody),
        (status = 415, description = "Body is not JSON", body = crate::error::ErrorBody),
        (status = 422, description = "No task, too many tasks, or an invalid task (none is enqueued)", body = crate::error::ErrorBody),
        (status = 503, description = "Redis unavailable", body = crate::error::ErrorBody),
    )
)]
pub async fn enqueue_batch(
    State(state): State<AppState>,
    ApiJson(req): ApiJson<BatchRequest>,
) -> Result<Response, ApiError> {
    let n = req.tasks.len();
    if n == 0 || n > MAX_BATCH_TASKS {
        return Err(ApiError::invalid(format!(
            "`tasks` has {n} tasks; a batch must have 1 to {MAX_BATCH_TASKS}"
        ))
        .with_details(json!({ "count": n, "max": MAX_BATCH_TASKS })));
    }
    let mut tasks: Vec<TaskRequest> = Vec::with_capacity(n);
    for (i, t) in req.tasks.into_iter().enumerate() {
        let at = |mut e: ApiError| {
            e.body.message = format!("`tasks[{i}]`: {}", e.body.message);
            let mut details = e.body.details.take().unwrap_or_else(|| json!({}));
            details["index"] = json!(i);
            e.with_details(details)
        };
        if t.immutable {
            return Err(at(ApiError::invalid(
                "`immutable` is for workflow steps (POST /api/v1/workflows): a single task has no previous result",
            )));
        }
        tasks.push(validate(&state, t).await.map_err(at)?);
    }
    let ids = state.producer.send_many(&tasks).await.map_err(send_error)?;
    // Counted per name, not per task: batches are mostly one task name.
    let mut i = 0;
    while i < tasks.len() {
        let name = &tasks[i].name;
        let run = tasks[i..].iter().take_while(|t| &t.name == name).count();
        state.metrics.tasks_enqueued(name, run as u64);
        i += run;
    }
    let sent: Vec<(&str, &TaskRequest)> = ids.iter().map(String::as_str).zip(&tasks).collect();
    state.tasks_sent(&sent).await;
    tracing::debug!(tasks = n, "batch enqueued");
    let body = answer(&ids, &tasks, Utc::now());
    Ok((
        StatusCode::ACCEPTED,
        [(CONTENT_TYPE, HeaderValue::from_static(JSON))],
        body,
    )
        .into_response())
}

/// The answer's JSON text, as [`BatchEnqueued`] serializes: written
/// straight, since a thousand answers through serde took a tenth of a
/// batch's time.
fn answer(ids: &[String], tasks: &[TaskRequest], now: DateTime<Utc>) -> Vec<u8> {
    let len: usize = ids
        .iter()
        .zip(tasks)
        .map(|(id, t)| enqueued_len(id, t) + 1)
        .sum();
    let mut out = Vec::with_capacity(16 + len);
    let mut top = Object::open(&mut out);
    top.key("tasks");
    let list = top.out();
    list.push(b'[');
    for (i, (id, task)) in ids.iter().zip(tasks).enumerate() {
        if i > 0 {
            list.push(b',');
        }
        write_enqueued(list, id, task, now);
    }
    list.push(b']');
    top.close();
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::tasks::{TaskLinks, link};
    use serde_json::Map;
    use std::time::Duration;
    use taskstack::SendOptions;
    use taskstack::proto::TaskState;

    fn task(name: &str, queue: &str, options: SendOptions) -> TaskRequest {
        TaskRequest {
            name: name.into(),
            args: Vec::new(),
            kwargs: Map::new(),
            options: SendOptions {
                queue: Some(queue.into()),
                ..options
            },
        }
    }

    #[test]
    fn the_written_answer_is_what_serde_writes() {
        let now = Utc::now();
        let ids = vec![
            "9f0c6a1e-2b7d-4c1f-8e3a-5d6b7c8d9e0f".to_string(),
            "caller's \"id\"".to_string(),
            "later".to_string(),
        ];
        let tasks = vec![
            task("taskstack.add", "celery", SendOptions::default()),
            task("t\\odd", "q é", SendOptions::default()),
            task(
                "t",
                "celery",
                SendOptions {
                    countdown: Some(Duration::from_millis(1500)),
                    ..Default::default()
                },
            ),
        ];
        let want = BatchEnqueued {
            tasks: ids
                .iter()
                .zip(&tasks)
                .map(|(id, t)| Enqueued {
                    id: id.clone(),
                    state: TaskState::Pending,
                    task: t.name.clone(),
                    queue: t.options.queue.clone().unwrap_or_default(),
                    eta: super::super::tasks::eta_of(t, now),
                    links: TaskLinks { this: link(id) },
                })
                .collect(),
        };
        assert!(want.tasks[2].eta.is_some());
        let want = serde_json::to_string(&want).expect("JSON");
        let got = String::from_utf8(answer(&ids, &tasks, now)).expect("UTF-8");
        assert_eq!(got, want);
    }
}
