//! The web API's handlers on the in-memory backend (no Redis): the same
//! router, with a worker engine on the same `MemoryBackend`. What these
//! show is that the API reaches storage only through the backend traits;
//! the Redis paths are covered by `tasks.rs`, `ops.rs` and `limits.rs`.

mod common;

use anyhow::Result;
use axum::http::{Method, StatusCode};
use common::{ADD, Api, settings};
use serde_json::{Value, json};
use std::sync::Arc;
use taskstack::backend::{Backend, MemoryBackend};
use taskstack::producer::TaskRequest;
use taskstack::worker::{Registry, Worker, builtin};
use taskstack_web::AppState;
use tokio_util::sync::CancellationToken;

fn api(backend: &MemoryBackend, tasks: &[&str]) -> Api {
    let backend: Arc<dyn Backend> = Arc::new(backend.clone());
    Api::new(AppState::on_backend(backend, settings(&["celery"], tasks)))
}

/// A worker engine with the built-in tasks on `backend`; cancel the token
/// to stop it.
fn worker(backend: &MemoryBackend) -> (CancellationToken, tokio::task::JoinHandle<()>) {
    let mut registry = Registry::new();
    builtin::register(&mut registry);
    let w = Worker::on_backend(
        Arc::new(backend.clone()),
        registry,
        taskstack_integration::settings(&["celery"]),
    );
    let stop = CancellationToken::new();
    let done = stop.clone();
    let handle = tokio::spawn(async move {
        w.run(done.cancelled_owned()).await.expect("worker runs");
    });
    (stop, handle)
}

#[tokio::test]
async fn a_task_enqueued_through_the_api_runs_and_its_result_is_read_back() -> Result<()> {
    let backend = MemoryBackend::new();
    let api = api(&backend, &[ADD]);
    let (stop, handle) = worker(&backend);
    let id = api.enqueue(json!({"task": ADD, "args": [20, 22]})).await?;
    let done = api.wait_state(&id, "SUCCESS").await?;
    assert_eq!(done["result"], 42, "{done}");
    // The worker announced itself through the backend: /workers and
    // /queues see it.
    let (status, workers) = api.call(Method::GET, "/api/v1/workers", None).await?;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(
        workers["workers"].as_array().map(Vec::len),
        Some(1),
        "{workers}"
    );
    let (status, queues) = api.call(Method::GET, "/api/v1/queues", None).await?;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(queues["queues"][0]["name"], "celery", "{queues}");
    assert_eq!(queues["queues"][0]["workers"], 1, "{queues}");
    assert_eq!(queues["delayed"]["parked"], 0, "{queues}");
    stop.cancel();
    handle.await?;
    Ok(())
}

#[tokio::test]
async fn a_queued_task_is_revoked_once_and_a_countdown_is_parked() -> Result<()> {
    let backend = MemoryBackend::new();
    let api = api(&backend, &[ADD]);
    let id = api.enqueue(json!({"task": ADD, "args": [1, 2]})).await?;
    let uri = format!("/api/v1/tasks/{id}");
    let (status, v) = api.call(Method::DELETE, &uri, None).await?;
    assert_eq!(status, StatusCode::OK, "{v}");
    assert_eq!(v["revoked_now"], true, "{v}");
    let (status, v) = api.call(Method::DELETE, &uri, None).await?;
    assert_eq!(status, StatusCode::OK, "{v}");
    assert_eq!(v["revoked_now"], false, "{v}");
    let (status, v) = api.call(Method::GET, &uri, None).await?;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(v["state"], "REVOKED", "{v}");

    api.enqueue(json!({"task": ADD, "args": [1, 2], "countdown": 600}))
        .await?;
    let (_, queues) = api.call(Method::GET, "/api/v1/queues", None).await?;
    assert_eq!(queues["delayed"]["parked"], 1, "{queues}");
    assert_eq!(queues["queues"][0]["delayed"], 1, "{queues}");
    assert!(queues["delayed"]["first_due"].is_string(), "{queues}");
    Ok(())
}

#[tokio::test]
async fn a_dead_letter_is_listed_and_requeued_as_pending() -> Result<()> {
    let backend = MemoryBackend::new();
    let api = api(&backend, &[ADD]);
    let (stop, handle) = worker(&backend);
    // A task no worker knows: the worker dead-letters it.
    let unknown = TaskRequest {
        name: "nobody.knows".into(),
        args: vec![Value::from(1)],
        kwargs: serde_json::Map::new(),
        options: Default::default(),
    };
    let id = api.state.producer.send(&unknown).await?;
    let listed = taskstack_integration::wait_until(
        "the dead letter",
        std::time::Duration::from_secs(10),
        || async {
            let (s, v) = api
                .call(Method::GET, "/api/v1/dead-letters/celery", None)
                .await?;
            Ok((s == StatusCode::OK && v["total"] == 1).then_some(v))
        },
    )
    .await?;
    assert_eq!(
        listed["dead_letters"][0]["task_id"],
        id.as_str(),
        "{listed}"
    );
    stop.cancel();
    handle.await?;

    let (status, moved) = api
        .call(
            Method::POST,
            "/api/v1/dead-letters/celery/requeue",
            Some(json!({"task_ids": [id]})),
        )
        .await?;
    assert_eq!(status, StatusCode::OK, "{moved}");
    assert_eq!(moved["count"], 1, "{moved}");
    api.wait_state(&id, "PENDING").await?;
    let (_, queues) = api.call(Method::GET, "/api/v1/queues", None).await?;
    assert_eq!(queues["queues"][0]["ready"], 1, "{queues}");
    assert_eq!(queues["queues"][0]["dead_lettered"], 0, "{queues}");
    Ok(())
}

#[tokio::test]
async fn an_unavailable_backend_is_a_503_and_a_failed_health_check() -> Result<()> {
    let backend = MemoryBackend::new();
    let api = api(&backend, &[ADD]);
    backend.set_available(false);
    let (status, v) = api.call(Method::GET, "/health", None).await?;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{v}");
    assert_eq!(v["checks"]["redis"]["ok"], false, "{v}");
    let (status, v) = api.call(Method::GET, "/api/v1/queues", None).await?;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{v}");
    let (status, v) = api
        .call(
            Method::POST,
            "/api/v1/tasks",
            Some(json!({"task": ADD, "args": [1, 2]})),
        )
        .await?;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{v}");
    backend.set_available(true);
    let (status, v) = api.call(Method::GET, "/api/v1/queues", None).await?;
    assert_eq!(status, StatusCode::OK, "{v}");
    Ok(())
}
