//! `/api/v1/workflows`: a chain or a chord of tasks in one request, sent as
//! Celery's canvas, so taskstack and Python Celery workers run it alike.

use super::enqueue::{EnqueueRequest, validate};
use super::tasks::{link, send_error};
use crate::error::{ApiError, ApiJson};
use crate::state::AppState;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use serde::{Deserialize, Serialize};
use taskstack::{ChordOptions, TaskRequest};
use utoipa::ToSchema;

/// Most tasks one workflow may hold (steps, or header tasks plus body).
pub const MAX_WORKFLOW_TASKS: usize = 1000;

/// A chord: the header tasks run in parallel; the body gets their results.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ChordRequest {
    /// Tasks run in parallel.
    #[schema(min_items = 1, max_items = 999)]
    pub header: Vec<EnqueueRequest>,
    /// Sent when every header task succeeded, with the list of their
    /// results (in header order) prepended to its args.
    pub body: EnqueueRequest,
}

/// A workflow: exactly one of `chain` or `chord`.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct WorkflowRequest {
    /// Steps run one after another; each gets the previous step's result
    /// prepended to its args unless it is `immutable`. A failing step stops
    /// the chain.
    #[schema(min_items = 1, max_items = 1000)]
    pub chain: Option<Vec<EnqueueRequest>>,
    pub chord: Option<ChordRequest>,
}

/// Links to a workflow's resources.
#[derive(Debug, Serialize, ToSchema)]
pub struct WorkflowLinks {
    /// Where to poll the workflow's result (the last step, or the body).
    pub result: String,
}

/// The answer to a workflow.
#[derive(Debug, Serialize, ToSchema)]
pub struct WorkflowSent {
    /// `chain` or `chord`.
    pub kind: String,
    /// The task whose result is the workflow's result.
    pub result_id: String,
    /// Every task id: the steps in order, or the header tasks then the body.
    pub task_ids: Vec<String>,
    /// The chord's group id.
    pub group_id: Option<String>,
    pub links: WorkflowLinks,
}

async fn tasks(
    state: &AppState,
    what: &str,
    reqs: Vec<EnqueueRequest>,
) -> Result<Vec<TaskRequest>, ApiError> {
    let mut out = Vec::with_capacity(reqs.len());
    for (i, r) in reqs.into_iter().enumerate() {
        out.push(validate(state, r).await.map_err(|mut e| {
            e.body.message = format!("{what} {}: {}", i + 1, e.body.message);
            e
        })?);
    }
    Ok(out)
}

/// Send a chain or a chord.
///
/// Celery's canvas on the wire: every task id is chosen up front and
/// recorded PENDING before anything is sent, so each one can be polled at
/// `/api/v1/tasks/{id}` at once. Chords need a store for their counters:
/// a Redis broker, or RabbitMQ with Redis or PostgreSQL results.
#[utoipa::path(
    post,
    path = "/api/v1/workflows",
    tag = "tasks",
    request_body = WorkflowRequest,
    security(("bearer" = [])),
    responses(
        (status = 202, description = "Sent", body = WorkflowSent,
            headers(("location" = String, description = "Where to poll the workflow's result"))),
        (status = 400, description = "Malformed JSON", body = crate::error::ErrorBody),
        (status = 401, description = "No valid API token", body = crate::error::ErrorBody),
        (status = 413, description = "Body larger than the limit", body = crate::error::ErrorBody),
        (status = 415, description = "Body is not JSON", body = crate::error::ErrorBody),
        (status = 422, description = "Invalid workflow, unknown task or queue", body = crate::error::ErrorBody),
        (status = 503, description = "Redis unavailable", body = crate::error::ErrorBody),
    )
)]
pub async fn send_workflow(
    State(state): State<AppState>,
    ApiJson(req): ApiJson<WorkflowRequest>,
) -> Result<impl IntoResponse, ApiError> {
    let sent = match (req.chain, req.chord) {
        (Some(chain), None) => {
            if chain.is_empty() || chain.len() > MAX_WORKFLOW_TASKS {
                return Err(ApiError::invalid(format!(
                    "`chain` has {} steps; it must have 1 to {MAX_WORKFLOW_TASKS}",
                    chain.len()
                )));
            }
            let steps = tasks(&state, "chain step", chain).await?;
            let sent = state
                .producer
                .send_chain(&steps)
                .await
                .map_err(send_error)?;
            for s in &steps {
                state.metrics.task_enqueued(&s.name);
            }
            state.tasks_sent(&[(&sent.task_ids[0], &steps[0])]).await;
            WorkflowSent {
                kind: "chain".into(),
                result_id: sent.result_id().to_owned(),
                links: WorkflowLinks {
                    result: link(sent.result_id()),
                },
                task_ids: sent.task_ids,
                group_id: None,
            }
        }
        (None, Some(chord)) => {
            if chord.header.is_empty() || chord.header.len() >= MAX_WORKFLOW_TASKS {
                return Err(ApiError::invalid(format!(
                    "`chord.header` has {} tasks; it must have 1 to {}",
                    chord.header.len(),
                    MAX_WORKFLOW_TASKS - 1
                )));
            }
            if chord.body.immutable || chord.header.iter().any(|h| h.immutable) {
                return Err(ApiError::invalid(
                    "`immutable` is for chain steps; a chord's body always gets the header's results",
                ));
            }
            let header = tasks(&state, "chord header task", chord.header).await?;
            let body = tasks(&state, "chord body", vec![chord.body])
                .await?
                .pop()
                .unwrap_or_else(|| TaskRequest::new("", vec![]));
            let options = ChordOptions {
                group_id: None,
                expires: Some(state.settings.result_expires),
            };
            let sent = state
                .producer
                .send_chord(&header, &body, &options)
                .await
                .map_err(send_error)?;
            for s in header.iter().chain([&body]) {
                state.metrics.task_enqueued(&s.name);
            }
            let sent_now: Vec<(&str, &TaskRequest)> = sent
                .header_ids
                .iter()
                .map(String::as_str)
                .zip(&header)
                .collect();
            state.tasks_sent(&sent_now).await;
            let mut task_ids = sent.header_ids;
            task_ids.push(sent.body_id.clone());
            WorkflowSent {
                kind: "chord".into(),
                links: WorkflowLinks {
                    result: link(&sent.body_id),
                },
                result_id: sent.body_id,
                task_ids,
                group_id: Some(sent.group_id),
            }
        }
        _ => {
            return Err(ApiError::invalid("give exactly one of `chain` or `chord`"));
        }
    };
    tracing::debug!(kind = %sent.kind, result_id = %sent.result_id, tasks = sent.task_ids.len(), "workflow sent");
    Ok((
        StatusCode::ACCEPTED,
        [(header::LOCATION, sent.links.result.clone())],
        axum::Json(sent),
    ))
}
