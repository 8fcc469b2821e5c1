//! `taskstack-web`: the HTTP API of a taskstack deployment.
//!
//! It enqueues Celery-protocol tasks (so Python workers can run them too),
//! reports their state and results, revokes tasks that have not started,
//! shows queues, workers and dead letters, and tells the truth about the
//! stack's health (`/health`) and numbers (`/metrics`).
//!
//! - [`router`] builds the axum router and its OpenAPI document; tests drive
//!   it without a socket.
//! - [`run`] serves it on a listener until a shutdown future completes,
//!   within the timeouts and connection cap of [`serve`];
//!   [`threads::run_on_threads`] does the same on several threads (the
//!   service's way).
//! - Modules: [`api`] (the `/api/v1` handlers), [`auth`] (bearer tokens),
//!   [`error`] (JSON errors), [`health`], [`metrics`], [`openapi`],
//!   [`state`] (what handlers share).

pub mod api;
pub mod auth;
pub mod cli;
pub mod error;
pub mod health;
pub mod metrics;
pub mod openapi;
pub mod serve;
pub mod state;
pub mod threads;

pub use state::{AppState, WebSettings};

use axum::Router;
use axum::extract::DefaultBodyLimit;
use axum::middleware;
use axum::routing::get;
use std::future::Future;
use std::sync::Arc;
use utoipa::OpenApi as _;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

/// The whole application and its OpenAPI document (served at
/// `/openapi.json`), built from the same route list so they cannot differ.
pub fn router(state: AppState) -> (Router, utoipa::openapi::OpenApi) {
    let api = OpenApiRouter::new()
        .routes(routes!(api::tasks::enqueue))
        .routes(routes!(api::batch::enqueue_batch))
        .routes(routes!(api::tasks::get_task, api::tasks::revoke_task))
        .routes(routes!(api::workflows::send_workflow))
        .routes(routes!(api::queues::list_queues))
        .routes(routes!(api::queues::list_workers))
        .routes(routes!(api::dead_letters::list))
        .routes(routes!(api::dead_letters::requeue))
        .routes(routes!(api::dead_letters::discard))
        .route_layer(middleware::from_fn_with_state(
            state.clone(),
            auth::require_token,
        ));
    let (router, mut doc) = OpenApiRouter::with_openapi(openapi::ApiDoc::openapi())
        .merge(api)
        .routes(routes!(health::health))
        .routes(routes!(health::live))
        .routes(routes!(metrics::serve))
        .split_for_parts();
    openapi::restrict_task_names(&mut doc, &state.settings.tasks);
    let doc_json = Arc::new(doc.to_json().unwrap_or_else(|_| "{}".into()));
    let router = router
        .route(
            "/openapi.json",
            get(move || {
                let body = Arc::clone(&doc_json);
                async move {
                    (
                        [(axum::http::header::CONTENT_TYPE, "application/json")],
                        (*body).clone(),
                    )
                }
            }),
        )
        .fallback(health::no_route)
        // One layer of two services (metrics outside, the body limit
        // inside): each `layer` call wraps every route in one more boxed,
        // cloned-per-request service.
        .layer(
            tower::ServiceBuilder::new()
                .layer(middleware::from_fn_with_state(
                    state.clone(),
                    metrics::track,
                ))
                .layer(DefaultBodyLimit::max(state.settings.body_limit)),
        )
        .with_state(state);
    (router, doc)
}

/// Serves the API on `listener` until `shutdown` completes, then stops
/// accepting connections and lets requests in flight finish.
pub async fn run(
    state: AppState,
    listener: tokio::net::TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let limits = state.settings.limits;
    let (app, _) = router(state);
    let addr = listener.local_addr()?;
    tracing::info!(
        listen = %addr,
        header_timeout = ?limits.header_timeout,
        idle_timeout = ?limits.idle_timeout,
        max_connections = limits.max_connections,
        "taskstack-web serving"
    );
    serve::serve(listener, app, limits, shutdown).await;
    tracing::info!("taskstack-web stopped");
    Ok(())
}
