//! The task routes in process: enqueue, read, revoke; auth; every
//! rejection, and that a rejected request enqueues nothing.

mod common;

use anyhow::Result;
use axum::body::Body;
use axum::http::{Method, Request, StatusCode, header};
use common::{ADD, App, settings};
use serde_json::{Value, json};
use taskstack_integration::TEST_TOKEN;

#[tokio::test(flavor = "multi_thread")]
async fn an_enqueued_task_runs_and_its_result_is_reported() -> Result<()> {
    let app = App::new("web-run", settings(&["celery"], &[]))?;
    let worker = app.worker(&["celery"], None)?;
    // Task names come from live workers: wait until this one announced them.
    taskstack_integration::wait_until(
        "the worker to register",
        std::time::Duration::from_secs(10),
        || async {
            let (s, _) = app
                .call(
                    Method::POST,
                    "/api/v1/tasks",
                    Some(json!({"task": ADD, "args": [2, 3]})),
                )
                .await?;
            Ok((s == StatusCode::ACCEPTED).then_some(()))
        },
    )
    .await?;
    let req = Request::post("/api/v1/tasks")
        .header(header::AUTHORIZATION, format!("Bearer {TEST_TOKEN}"))
        .header(header::CONTENT_TYPE, "application/json")
        .body(Body::from(
            json!({"task": ADD, "args": [20, 22]}).to_string(),
        ))?;
    let (status, headers, body) = app.raw(req).await?;
    assert_eq!(status, StatusCode::ACCEPTED, "{body}");
    let v: Value = serde_json::from_str(&body)?;
    let id = v["id"].as_str().expect("an id").to_owned();
    assert_eq!(v["state"], "PENDING");
    assert_eq!(v["queue"], "celery");
    assert_eq!(v["links"]["self"], format!("/api/v1/tasks/{id}"));
    assert_eq!(
        headers[header::LOCATION],
        format!("/api/v1/tasks/{id}").as_str()
    );
    assert_eq!(headers[header::CONTENT_TYPE], "application/json");
    assert_eq!(v["task"], ADD);
    assert!(v["eta"].is_null(), "{body}");

    let done = app.wait_state(&id, "SUCCESS").await?;
    assert_eq!(done["result"], 42);
    assert_eq!(done["task"], ADD);
    assert!(
        done["date_started"].is_string() && done["date_done"].is_string(),
        "{done}"
    );
    assert!(done["error"].is_null());

    // A failure reports the exception.
    let id = app
        .enqueue(json!({"task": "taskstack.fail", "args": ["boom"]}))
        .await?;
    let failed = app.wait_state(&id, "FAILURE").await?;
    assert!(
        failed["error"]["message"]
            .as_str()
            .unwrap_or("")
            .contains("boom"),
        "{failed}"
    );
    assert!(failed["result"].is_null());
    worker.stop().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn a_task_waiting_in_the_queue_is_pending_and_unknown_ids_are_404() -> Result<()> {
    let app = App::new("web-pending", settings(&["celery"], &[ADD]))?;
    let id = app
        .enqueue(json!({"task": ADD, "args": [1, 2], "countdown": 60}))
        .await?;
    let (s, v) = app
        .call(Method::GET, &format!("/api/v1/tasks/{id}"), None)
        .await?;
    assert_eq!(
        (s, v["state"].clone()),
        (StatusCode::OK, json!("PENDING")),
        "{v}"
    );
    // The delayed set shows when its messages are due.
    let (s, v) = app.call(Method::GET, "/api/v1/queues", None).await?;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert_eq!(v["delayed"]["parked"], 1, "{v}");
    let due = v["delayed"]["last_due"].as_str().unwrap_or_default();
    assert!(
        due.starts_with("20") && due == v["delayed"]["first_due"],
        "{v}"
    );
    let (s, v) = app
        .call(Method::GET, "/api/v1/tasks/never-sent", None)
        .await?;
    assert_eq!(
        (s, v["error"].clone()),
        (StatusCode::NOT_FOUND, json!("not_found")),
        "{v}"
    );
    let (s, v) = app
        .call(Method::GET, "/api/v1/tasks/bad%07id", None)
        .await?;
    assert_eq!(s, StatusCode::BAD_REQUEST, "{v}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn the_api_requires_a_valid_token_and_probes_do_not() -> Result<()> {
    let app = App::new("web-auth", settings(&["celery"], &[ADD]))?;
    let body = || Body::from(json!({"task": ADD}).to_string());
    let cases = [
        (None, StatusCode::UNAUTHORIZED),
        (
            Some("Bearer wrong-token-0123456789"),
            StatusCode::UNAUTHORIZED,
        ),
        (
            Some(format!("Basic {TEST_TOKEN}").leak() as &str),
            StatusCode::UNAUTHORIZED,
        ),
        (
            Some(format!("bearer {TEST_TOKEN}").leak() as &str),
            StatusCode::ACCEPTED,
        ),
    ];
    for (auth, want) in cases {
        let mut b = Request::post("/api/v1/tasks").header(header::CONTENT_TYPE, "application/json");
        if let Some(a) = auth {
            b = b.header(header::AUTHORIZATION, a);
        }
        let (status, headers, text) = app.raw(b.body(body())?).await?;
        assert_eq!(status, want, "{auth:?}: {text}");
        if want == StatusCode::UNAUTHORIZED {
            let v: Value = serde_json::from_str(&text)?;
            assert_eq!(v["error"], "unauthorized");
            assert!(headers.contains_key(header::WWW_AUTHENTICATE));
        }
    }
    assert_eq!(
        app.llen("celery")?,
        1,
        "only the authenticated request enqueued"
    );
    for path in [
        "/api/v1/queues",
        "/api/v1/workers",
        "/api/v1/dead-letters/celery",
        "/api/v1/tasks/x",
    ] {
        let (status, _, _) = app.raw(Request::get(path).body(Body::empty())?).await?;
        assert_eq!(status, StatusCode::UNAUTHORIZED, "{path}");
    }
    for path in ["/health/live", "/metrics", "/openapi.json"] {
        let (status, _, _) = app.raw(Request::get(path).body(Body::empty())?).await?;
        assert_eq!(status, StatusCode::OK, "{path}");
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn bad_requests_get_a_named_error_and_enqueue_nothing() -> Result<()> {
    let app = App::new("web-bad", settings(&["celery"], &[ADD]))?;
    let future = (chrono::Utc::now() + chrono::Duration::hours(1)).to_rfc3339();
    let past = (chrono::Utc::now() - chrono::Duration::hours(1)).to_rfc3339();
    let cases: Vec<(Value, StatusCode, &str, &str)> = vec![
        (
            json!({"task": ADD, "args": {"a": 1}}),
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_request",
            "args",
        ),
        (
            json!({"task": ADD, "kwargs": [1]}),
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_request",
            "kwargs",
        ),
        (
            json!({"args": [1]}),
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_request",
            "task",
        ),
        (
            json!({"task": ADD, "colour": "red"}),
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_request",
            "colour",
        ),
        (
            json!({"task": ""}),
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_request",
            "task",
        ),
        (
            json!({"task": "nope.nothing"}),
            StatusCode::UNPROCESSABLE_ENTITY,
            "unknown_task",
            "nope.nothing",
        ),
        (
            json!({"task": ADD, "queue": "elsewhere"}),
            StatusCode::UNPROCESSABLE_ENTITY,
            "unknown_queue",
            "elsewhere",
        ),
        (
            json!({"task": ADD, "queue": "a:b"}),
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_request",
            "':'",
        ),
        (
            json!({"task": ADD, "priority": 10}),
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_request",
            "priority",
        ),
        (
            json!({"task": ADD, "priority": -1}),
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_request",
            "priority",
        ),
        (
            json!({"task": ADD, "countdown": -5}),
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_request",
            "countdown",
        ),
        (
            json!({"task": ADD, "countdown": 1e300}),
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_request",
            "countdown",
        ),
        (
            // Past max_task_delay (1 h in these settings).
            json!({"task": ADD, "countdown": 7200}),
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_request",
            "max_task_delay",
        ),
        (
            json!({"task": ADD, "countdown": 5, "eta": future}),
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_request",
            "not both",
        ),
        (
            json!({"task": ADD, "expires": past}),
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_request",
            "past",
        ),
        (
            json!({"task": ADD, "eta": "tomorrow"}),
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_request",
            "eta",
        ),
        (
            json!({"task": ADD, "time_limit": 0}),
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_request",
            "time_limit",
        ),
        (
            json!([1, 2]),
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_request",
            "schema",
        ),
    ];
    for (body, status, code, mentions) in cases {
        let (s, v) = app
            .call(Method::POST, "/api/v1/tasks", Some(body.clone()))
            .await?;
        assert_eq!(s, status, "{body}: {v}");
        assert_eq!(v["error"], code, "{body}: {v}");
        let msg = v["message"].as_str().unwrap_or_default();
        assert!(
            msg.contains(mentions),
            "{body}: message {msg:?} should mention {mentions:?}"
        );
    }
    let (_, v) = app
        .call(Method::POST, "/api/v1/tasks", Some(json!({"task": "nope"})))
        .await?;
    assert_eq!(v["details"]["known_tasks"], json!([ADD]));

    let post = |ct: Option<&str>, body: String| {
        let mut b = Request::post("/api/v1/tasks")
            .header(header::AUTHORIZATION, format!("Bearer {TEST_TOKEN}"));
        if let Some(ct) = ct {
            b = b.header(header::CONTENT_TYPE, ct);
        }
        b.body(Body::from(body))
    };
    let raw_cases = [
        (
            post(Some("application/json"), "{\"task\": ".into())?,
            StatusCode::BAD_REQUEST,
            "malformed_json",
        ),
        (
            post(None, json!({"task": ADD}).to_string())?,
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "unsupported_media_type",
        ),
        (
            post(Some("text/plain"), json!({"task": ADD}).to_string())?,
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "unsupported_media_type",
        ),
        (
            post(
                Some("application/json"),
                format!(
                    "{{\"task\": \"{ADD}\", \"args\": [\"{}\"]}}",
                    "x".repeat(70_000)
                ),
            )?,
            StatusCode::PAYLOAD_TOO_LARGE,
            "body_too_large",
        ),
    ];
    for (req, status, code) in raw_cases {
        let (s, _, text) = app.raw(req).await?;
        assert_eq!(s, status, "{text}");
        let v: Value = serde_json::from_str(&text)?;
        assert_eq!(v["error"], code, "{text}");
        assert!(v["message"].as_str().is_some_and(|m| !m.is_empty()));
    }
    assert_eq!(
        app.llen("celery")?,
        0,
        "a rejected request enqueued a message"
    );
    assert_eq!(
        app.task_records()?,
        0,
        "a rejected request left a task record"
    );

    let (s, v) = app.call(Method::GET, "/no/such/route", None).await?;
    assert_eq!(
        (s, v["error"].clone()),
        (StatusCode::NOT_FOUND, json!("not_found"))
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn a_revoked_task_never_runs_and_a_started_one_cannot_be_revoked() -> Result<()> {
    let app = App::new(
        "web-revoke",
        settings(&["celery"], &[ADD, "taskstack.sleep"]),
    )?;
    // No worker yet: the task waits in the queue.
    let revoked = app.enqueue(json!({"task": ADD, "args": [1, 1]})).await?;
    let uri = format!("/api/v1/tasks/{revoked}");
    let (s, v) = app.call(Method::DELETE, &uri, None).await?;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert_eq!(
        (v["state"].clone(), v["revoked_now"].clone()),
        (json!("REVOKED"), json!(true))
    );
    let (s, v) = app.call(Method::DELETE, &uri, None).await?;
    assert_eq!(
        (s, v["revoked_now"].clone()),
        (StatusCode::OK, json!(false)),
        "{v}"
    );
    let marker = app.enqueue(json!({"task": ADD, "args": [2, 2]})).await?;

    let worker = app.worker(&["celery"], None)?;
    app.wait_state(&marker, "SUCCESS").await?;
    taskstack_integration::wait_until(
        "the queue to be empty",
        std::time::Duration::from_secs(10),
        || async {
            let (_, v) = app.call(Method::GET, "/api/v1/queues", None).await?;
            let q = &v["queues"][0];
            Ok((q["ready"] == 0 && q["in_flight"] == 0).then_some(()))
        },
    )
    .await?;
    let (_, v) = app.call(Method::GET, &uri, None).await?;
    assert_eq!(v["state"], "REVOKED", "the revoked task ran: {v}");
    assert_eq!(v["error"]["type"], "TaskRevokedError");

    let running = app
        .enqueue(json!({"task": "taskstack.sleep", "args": [3]}))
        .await?;
    app.wait_state(&running, "STARTED").await?;
    let (s, v) = app
        .call(Method::DELETE, &format!("/api/v1/tasks/{running}"), None)
        .await?;
    assert_eq!(s, StatusCode::CONFLICT, "{v}");
    assert_eq!(
        (v["error"].clone(), v["details"]["state"].clone()),
        (json!("not_revocable"), json!("STARTED"))
    );
    app.wait_state(&running, "SUCCESS").await?;
    let (s, _) = app
        .call(Method::DELETE, &format!("/api/v1/tasks/{running}"), None)
        .await?;
    assert_eq!(s, StatusCode::CONFLICT);
    let (s, _) = app
        .call(Method::DELETE, "/api/v1/tasks/never-sent", None)
        .await?;
    assert_eq!(s, StatusCode::NOT_FOUND);
    worker.stop().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn many_concurrent_enqueues_all_succeed_and_leave_redis_free_for_others() -> Result<()> {
    // Far more concurrent requests than the Redis pool has connections.
    let app = std::sync::Arc::new(App::new("web-concurrent", settings(&["celery"], &[ADD]))?);
    let mut set = tokio::task::JoinSet::new();
    for i in 0..300 {
        let app = std::sync::Arc::clone(&app);
        set.spawn(async move {
            app.call(
                Method::POST,
                "/api/v1/tasks",
                Some(json!({"task": ADD, "args": [i, 1]})),
            )
            .await
        });
    }
    while let Some(r) = set.join_next().await {
        let (s, v) = r??;
        assert_eq!(s, StatusCode::ACCEPTED, "{v}");
    }
    assert_eq!(app.llen("celery")?, 300);
    // Every other route still gets a connection at once.
    for uri in [
        "/api/v1/queues",
        "/api/v1/workers",
        "/api/v1/dead-letters/celery",
    ] {
        let (s, v) = app.call(Method::GET, uri, None).await?;
        assert_eq!(s, StatusCode::OK, "{uri}: {v}");
    }
    let (_, v) = app.call(Method::GET, "/health", None).await?;
    assert_eq!(v["checks"]["redis"]["ok"], true, "{v}");
    Ok(())
}
