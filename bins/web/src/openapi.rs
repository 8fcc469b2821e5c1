//! `/openapi.json`: the OpenAPI 3 document, generated from the handlers'
//! annotations as the router is built (see [`crate::router`]).

use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::{Modify, OpenApi};

/// The document's fixed parts; paths are added by the router.
#[derive(OpenApi)]
#[openapi(
    info(
        title = "taskstack web API",
        description = "Enqueue Celery-protocol tasks, read their results, revoke them, and inspect queues, workers and dead letters. Every `/api` route takes `Authorization: Bearer <token>`.",
    ),
    modifiers(&BearerAuth),
    tags(
        (name = "tasks", description = "Enqueue, read and revoke tasks"),
        (name = "operations", description = "Queues, workers and dead letters"),
        (name = "health", description = "Readiness and liveness"),
    )
)]
#[derive(Debug)]
pub struct ApiDoc;

struct BearerAuth;

impl Modify for BearerAuth {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(
                HttpBuilder::new()
                    .scheme(HttpAuthScheme::Bearer)
                    .description(Some("An API token from `api_tokens` / `api_tokens_file`"))
                    .build(),
            ),
        );
    }
}

/// With an allow-list of task names (`web_tasks`), the document says
/// exactly which names `POST /api/v1/tasks` accepts.
pub fn restrict_task_names(doc: &mut utoipa::openapi::OpenApi, tasks: &[String]) {
    use utoipa::openapi::{RefOr, schema::Schema};
    if tasks.is_empty() {
        return;
    }
    let task = doc
        .components
        .as_mut()
        .and_then(|c| c.schemas.get_mut("EnqueueRequest"))
        .and_then(|s| match s {
            RefOr::T(Schema::Object(o)) => o.properties.get_mut("task"),
            _ => None,
        });
    if let Some(RefOr::T(Schema::Object(t))) = task {
        t.enum_values = Some(tasks.iter().map(|n| serde_json::json!(n)).collect());
    }
}
