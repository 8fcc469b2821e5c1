//! `POST /api/v1/tasks/batch` in process on a real `redis-server`: every
//! task enqueued in order and answered with its id; every rejection named,
//! and a rejected batch enqueues nothing.

mod common;

use anyhow::Result;
use axum::body::Body;
use axum::http::{Method, Request, StatusCode, header};
use common::{ADD, App, settings};
use serde_json::{Value, json};
use taskstack_integration::TEST_TOKEN;

const BATCH: &str = "/api/v1/tasks/batch";

#[tokio::test(flavor = "multi_thread")]
async fn a_batch_is_enqueued_in_order_and_each_task_runs() -> Result<()> {
    let app = App::new("web-batch", settings(&["celery", "other"], &[ADD]))?;
    let tasks: Vec<Value> = (0..300)
        .map(|i| match i % 100 {
            // A run to another queue, and one with a countdown (parked).
            50..=59 => json!({"task": ADD, "args": [i, 0], "queue": "other"}),
            60 => json!({"task": ADD, "args": [i, 0], "countdown": 600}),
            _ => json!({"task": ADD, "args": [i, 0]}),
        })
        .collect();
    let (s, v) = app
        .call(Method::POST, BATCH, Some(json!({ "tasks": tasks })))
        .await?;
    assert_eq!(s, StatusCode::ACCEPTED, "{v}");
    let answers = v["tasks"].as_array().expect("a list of tasks");
    assert_eq!(answers.len(), 300);
    let mut ids = std::collections::HashSet::new();
    for (i, a) in answers.iter().enumerate() {
        let id = a["id"].as_str().expect("an id");
        assert!(ids.insert(id.to_owned()), "ids are unique: {id}");
        assert_eq!(a["state"], "PENDING");
        assert_eq!(a["links"]["self"], format!("/api/v1/tasks/{id}"));
        let queue = if (50..60).contains(&(i % 100)) {
            "other"
        } else {
            "celery"
        };
        assert_eq!(a["queue"], queue, "task {i}");
        assert_eq!(a["eta"].is_string(), i % 100 == 60, "task {i}");
    }
    assert_eq!(app.llen("celery")?, 267);
    assert_eq!(app.llen("other")?, 30);
    assert_eq!(app.task_records()?, 300, "a PENDING record for each");

    // In the request's order: the first task is taken first (a worker
    // pops the list's right end), the last one last.
    let mut c = app.redis.conn()?;
    let first: String = redis::cmd("LINDEX").arg("celery").arg(-1).query(&mut c)?;
    let last: String = redis::cmd("LINDEX").arg("celery").arg(0).query(&mut c)?;
    let id_of = |i: usize| answers[i]["id"].as_str().unwrap_or("").to_owned();
    assert!(first.contains(&id_of(0)), "{first}");
    assert!(last.contains(&id_of(299)), "{last}");
    // Every immediate task runs, with its own arguments.
    let worker = app.worker(&["celery", "other"], None)?;
    for (i, a) in answers.iter().enumerate() {
        if i % 100 == 60 {
            continue;
        }
        let done = app
            .wait_state(a["id"].as_str().unwrap_or(""), "SUCCESS")
            .await?;
        assert_eq!(done["result"], i, "task {i}");
    }
    let (_, v) = app
        .call(
            Method::GET,
            &format!("/api/v1/tasks/{}", answers[60]["id"].as_str().unwrap_or("")),
            None,
        )
        .await?;
    assert_eq!(v["state"], "PENDING", "the parked task waits: {v}");
    worker.stop().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn a_bad_batch_is_named_and_enqueues_nothing() -> Result<()> {
    let app = App::new("web-batch-bad", settings(&["celery"], &[ADD]))?;
    let ok = json!({"task": ADD, "args": [1, 2]});
    let many: Vec<Value> = (0..1001).map(|_| ok.clone()).collect();
    // (body, status, error code, text the message must contain, details.index)
    let cases: Vec<(Value, StatusCode, &str, &str, Option<u64>)> = vec![
        (
            json!({"tasks": []}),
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_request",
            "1 to 1000",
            None,
        ),
        (
            json!({ "tasks": many }),
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_request",
            "has 1001 tasks",
            None,
        ),
        (
            json!({"tasks": [ok, ok, {"task": ADD, "priority": 12}]}),
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_request",
            "`tasks[2]`: `priority` is 12",
            Some(2),
        ),
        (
            json!({"tasks": [ok, {"task": "not.allowed"}]}),
            StatusCode::UNPROCESSABLE_ENTITY,
            "unknown_task",
            "`tasks[1]`: task \"not.allowed\" is not known",
            Some(1),
        ),
        (
            json!({"tasks": [ok, {"task": ADD, "queue": "nowhere"}]}),
            StatusCode::UNPROCESSABLE_ENTITY,
            "unknown_queue",
            "`tasks[1]`: queue \"nowhere\"",
            Some(1),
        ),
        (
            json!({"tasks": [{"task": ADD, "immutable": true}]}),
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_request",
            "`tasks[0]`: `immutable`",
            Some(0),
        ),
        (
            json!({"tasks": [ok, {"task": ADD, "colour": "red"}]}),
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_request",
            "colour",
            None,
        ),
        (
            json!({"tasks": ok}),
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_request",
            "tasks",
            None,
        ),
        (
            json!([ok]),
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_request",
            "",
            None,
        ),
    ];
    for (body, status, code, text, index) in cases {
        let (s, v) = app.call(Method::POST, BATCH, Some(body.clone())).await?;
        let shown = body.to_string();
        let shown = &shown[..shown.len().min(120)];
        assert_eq!(s, status, "{shown}: {v}");
        assert_eq!(v["error"], code, "{shown}: {v}");
        let message = v["message"].as_str().unwrap_or("");
        assert!(
            !message.is_empty() && message.contains(text),
            "{shown}: {message:?} does not say {text:?}"
        );
        assert_eq!(v["details"]["index"].as_u64(), index, "{shown}: {v}");
    }

    let post = |body: Body, token: &str| {
        Request::post(BATCH)
            .header(header::AUTHORIZATION, format!("Bearer {token}"))
            .header(header::CONTENT_TYPE, "application/json")
            .body(body)
    };
    // Over the body limit (64 KiB here), however few tasks.
    let big = json!({"tasks": [{"task": ADD, "args": ["x".repeat(70_000)]}]});
    let raw_cases = vec![
        (
            post(Body::from(big.to_string()), TEST_TOKEN)?,
            StatusCode::PAYLOAD_TOO_LARGE,
            "body_too_large",
        ),
        (
            post(Body::from("{\"tasks\": ["), TEST_TOKEN)?,
            StatusCode::BAD_REQUEST,
            "malformed_json",
        ),
        (
            post(Body::from(json!({"tasks": [ok]}).to_string()), "wrong")?,
            StatusCode::UNAUTHORIZED,
            "unauthorized",
        ),
        (
            Request::post(BATCH)
                .header(header::AUTHORIZATION, format!("Bearer {TEST_TOKEN}"))
                .body(Body::from(json!({"tasks": [ok]}).to_string()))?,
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "unsupported_media_type",
        ),
    ];
    for (req, status, code) in raw_cases {
        let (s, _, text) = app.raw(req).await?;
        assert_eq!(s, status, "{text}");
        let v: Value = serde_json::from_str(&text)?;
        assert_eq!(v["error"], code, "{text}");
    }
    assert_eq!(
        app.llen("celery")?,
        0,
        "a rejected batch enqueued a message"
    );
    assert_eq!(
        app.task_records()?,
        0,
        "a rejected batch left a task record"
    );

    // The route is in the OpenAPI document, bounded as enforced.
    let (s, doc) = app.call(Method::GET, "/openapi.json", None).await?;
    assert_eq!(s, StatusCode::OK);
    let op = &doc["paths"][BATCH]["post"];
    assert!(op["responses"]["202"].is_object(), "{op}");
    let tasks = &doc["components"]["schemas"]["BatchRequest"]["properties"]["tasks"];
    assert_eq!(
        (tasks["minItems"].as_u64(), tasks["maxItems"].as_u64()),
        (Some(1), Some(1000)),
        "{tasks}"
    );
    Ok(())
}
