//! The operations routes in process: queues, workers, dead letters,
//! health, metrics and the OpenAPI document.

mod common;

use anyhow::Result;
use axum::body::Body;
use axum::http::{Method, Request, StatusCode};
use common::{ADD, App, settings};
use serde_json::{Value, json};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;
use taskstack::worker::{Registry, TaskContext, TaskError};
use taskstack_integration::wait_until;

#[tokio::test(flavor = "multi_thread")]
async fn queues_count_ready_and_delayed_messages_and_workers_are_listed() -> Result<()> {
    let app = App::new("web-queues", settings(&["celery", "slow"], &[ADD]))?;
    for _ in 0..3 {
        app.enqueue(json!({"task": ADD, "args": [1, 2], "queue": "slow"}))
            .await?;
    }
    app.enqueue(json!({"task": ADD, "args": [1, 2], "queue": "slow", "countdown": 600}))
        .await?;
    app.enqueue(json!({"task": ADD, "args": [1, 2], "queue": "slow", "priority": 9}))
        .await?;
    let (s, v) = app.call(Method::GET, "/api/v1/queues", None).await?;
    assert_eq!(s, StatusCode::OK, "{v}");
    let mut slow = v["queues"]
        .as_array()
        .and_then(|q| q.iter().find(|q| q["name"] == "slow"))
        .cloned()
        .unwrap_or_default();
    let age = slow["oldest_ready_age_seconds"].as_f64();
    assert!(age.is_some_and(|a| (0.0..60.0).contains(&a)), "{slow}");
    if let Some(o) = slow.as_object_mut() {
        o.remove("oldest_ready_age_seconds");
    }
    assert_eq!(
        slow,
        json!({"name": "slow", "ready": 4, "delayed": 1, "in_flight": 0, "dead_lettered": 0, "workers": 0})
    );

    let worker = app.worker(&["celery"], None)?;
    let w = wait_until(
        "the worker to be listed",
        Duration::from_secs(10),
        || async {
            let (_, v) = app.call(Method::GET, "/api/v1/workers", None).await?;
            Ok(v["workers"].as_array().and_then(|w| w.first()).cloned())
        },
    )
    .await?;
    assert_eq!(w["id"], worker.id.as_str());
    assert_eq!(w["queues"], json!(["celery"]));
    assert!(
        w["tasks"]
            .as_array()
            .is_some_and(|t| t.contains(&json!(ADD))),
        "{w}"
    );
    let (_, v) = app.call(Method::GET, "/api/v1/queues", None).await?;
    assert_eq!(v["queues"][0]["name"], "celery");
    assert_eq!(v["queues"][0]["workers"], 1);
    worker.stop().await?;
    Ok(())
}

/// A task that rejects its message (so it is dead-lettered) until `healed`.
fn flaky_registry(healed: Arc<AtomicBool>) -> Registry {
    let mut r = Registry::new();
    r.register("test.flaky", move |ctx: TaskContext| {
        let healed = Arc::clone(&healed);
        async move {
            if healed.load(Ordering::SeqCst) {
                Ok(json!(ctx.args.len()))
            } else {
                Err(TaskError::Reject {
                    reason: "not yet".into(),
                })
            }
        }
    });
    r
}

#[tokio::test(flavor = "multi_thread")]
async fn dead_letters_are_listed_requeued_and_discarded() -> Result<()> {
    let app = App::new("web-dead", settings(&["celery"], &["test.flaky"]))?;
    let healed = Arc::new(AtomicBool::new(false));
    let worker = app.worker(&["celery"], Some(flaky_registry(Arc::clone(&healed))))?;
    let mut ids = Vec::new();
    for i in 0..3 {
        ids.push(
            app.enqueue(json!({"task": "test.flaky", "args": [i]}))
                .await?,
        );
    }
    let list = wait_until("three dead letters", Duration::from_secs(10), || async {
        let (_, v) = app
            .call(Method::GET, "/api/v1/dead-letters/celery", None)
            .await?;
        Ok((v["total"] == 3).then_some(v))
    })
    .await?;
    let first = &list["dead_letters"][0];
    assert!(
        first["reason"]
            .as_str()
            .is_some_and(|r| r.contains("not yet")),
        "{first}"
    );
    assert!(
        first["payload"]
            .as_str()
            .is_some_and(|p| p.contains("test.flaky"))
    );
    let (_, v) = app
        .call(Method::GET, "/api/v1/dead-letters/celery?limit=1", None)
        .await?;
    assert_eq!(
        (
            v["total"].clone(),
            v["dead_letters"].as_array().map(Vec::len)
        ),
        (json!(3), Some(1))
    );
    let (_, v) = app
        .call(Method::GET, &format!("/api/v1/tasks/{}", ids[0]), None)
        .await?;
    assert_eq!(v["state"], "FAILURE");

    // Requeue one by id once the task is fixed: it runs and succeeds.
    healed.store(true, Ordering::SeqCst);
    let (s, v) = app
        .call(
            Method::POST,
            "/api/v1/dead-letters/celery/requeue",
            Some(json!({"task_ids": [ids[0]]})),
        )
        .await?;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert_eq!(
        (v["count"].clone(), v["task_ids"].clone()),
        (json!(1), json!([ids[0]]))
    );
    let done = app.wait_state(&ids[0], "SUCCESS").await?;
    assert_eq!(done["result"], 1);
    // Requeueing it again finds nothing: it is no longer dead-lettered.
    let (_, v) = app
        .call(
            Method::POST,
            "/api/v1/dead-letters/celery/requeue",
            Some(json!({"task_ids": [ids[0]]})),
        )
        .await?;
    assert_eq!(v["count"], 0);

    // Discard the oldest of the other two (they ran concurrently, so
    // either may be the oldest): the other one stays.
    let (_, before) = app
        .call(Method::GET, "/api/v1/dead-letters/celery", None)
        .await?;
    let oldest = before["dead_letters"][1]["task_id"].clone();
    let newest = before["dead_letters"][0]["task_id"].clone();
    let (s, v) = app
        .call(
            Method::POST,
            "/api/v1/dead-letters/celery/discard",
            Some(json!({"oldest": 1})),
        )
        .await?;
    assert_eq!(
        (s, v["count"].clone(), v["task_ids"].clone()),
        (StatusCode::OK, json!(1), json!([oldest]))
    );
    let (_, v) = app
        .call(Method::GET, "/api/v1/dead-letters/celery", None)
        .await?;
    assert_eq!(v["total"], 1);
    assert_eq!(v["dead_letters"][0]["task_id"], newest);

    for (body, code) in [
        (json!({}), StatusCode::UNPROCESSABLE_ENTITY),
        (json!({"oldest": 0}), StatusCode::UNPROCESSABLE_ENTITY),
        (
            json!({"oldest": 1, "task_ids": ["a"]}),
            StatusCode::UNPROCESSABLE_ENTITY,
        ),
        (json!({"task_ids": []}), StatusCode::UNPROCESSABLE_ENTITY),
        (json!({"all": true}), StatusCode::UNPROCESSABLE_ENTITY),
    ] {
        let (s, v) = app
            .call(
                Method::POST,
                "/api/v1/dead-letters/celery/discard",
                Some(body.clone()),
            )
            .await?;
        assert_eq!(s, code, "{body}: {v}");
        assert_eq!(v["error"], "invalid_request");
    }
    for uri in [
        "/api/v1/dead-letters/celery?limit=0",
        "/api/v1/dead-letters/celery?limit=x",
        "/api/v1/dead-letters/a:b",
    ] {
        let (s, v) = app.call(Method::GET, uri, None).await?;
        assert_eq!(s, StatusCode::BAD_REQUEST, "{uri}: {v}");
    }
    let (_, v) = app
        .call(Method::GET, "/api/v1/dead-letters/celery", None)
        .await?;
    assert_eq!(v["total"], 1, "a rejected request moved dead letters");
    worker.stop().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn health_names_what_is_missing() -> Result<()> {
    let mut s = settings(&["celery"], &[]);
    s.expect_beat = true;
    let mut app = App::new("web-health", s)?;
    let (s, v) = app.call(Method::GET, "/health", None).await?;
    assert_eq!(s, StatusCode::SERVICE_UNAVAILABLE, "{v}");
    assert_eq!(v["failed"], json!(["workers", "beat"]));
    assert_eq!(v["checks"]["workers"]["missing"], json!(["celery"]));
    assert!(v["checks"]["redis"]["latency_ms"].is_number());

    let worker = app.worker(&["celery"], None)?;
    let v = wait_until(
        "only the beat to be missing",
        Duration::from_secs(10),
        || async {
            let (_, v) = app.call(Method::GET, "/health", None).await?;
            Ok((v["failed"] == json!(["beat"])).then_some(v))
        },
    )
    .await?;
    assert_eq!(
        v["checks"]["workers"]["queues"],
        json!([{"queue": "celery", "workers": 1}])
    );
    // A beat leader's lock, as the beat writes it.
    let holder = taskstack::beat::lock::LockHolder::new("beat-1", "host-a");
    let mut c = app.redis.conn()?;
    redis::cmd("SET")
        .arg(taskstack::proto::Keys::new(&app.ns).beat_lock())
        .arg(holder.value())
        .query::<()>(&mut c)?;
    let (s, v) = app.call(Method::GET, "/health", None).await?;
    assert_eq!(
        (s, v["status"].clone()),
        (StatusCode::OK, json!("ok")),
        "{v}"
    );
    assert_eq!(v["checks"]["beat"]["leader"]["id"], "beat-1");
    worker.stop().await?;

    app.redis.stop()?;
    let (s, v) = app.call(Method::GET, "/health", None).await?;
    assert_eq!(s, StatusCode::SERVICE_UNAVAILABLE);
    assert!(
        v["failed"]
            .as_array()
            .is_some_and(|f| f.contains(&json!("redis"))),
        "{v}"
    );
    let (s, _) = app.call(Method::GET, "/health/live", None).await?;
    assert_eq!(s, StatusCode::OK, "liveness does not depend on Redis");
    let (s, v) = app.call(Method::GET, "/api/v1/queues", None).await?;
    assert_eq!(
        (s, v["error"].clone()),
        (StatusCode::SERVICE_UNAVAILABLE, json!("broker_unavailable"))
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn metrics_cover_requests_enqueues_queues_and_workers() -> Result<()> {
    let app = App::new("web-metrics", settings(&["celery"], &[ADD]))?;
    app.enqueue(json!({"task": ADD, "args": [1, 2]})).await?;
    app.call(Method::POST, "/api/v1/tasks", Some(json!({"task": "x"})))
        .await?;
    app.call(Method::GET, "/api/v1/tasks/some-id", None).await?;
    let (s, _, text) = app
        .raw(Request::get("/metrics").body(Body::empty())?)
        .await?;
    assert_eq!(s, StatusCode::OK);
    for line in [
        r#"taskstack_web_http_requests_total{route="/api/v1/tasks",method="POST",status="202"} 1"#,
        r#"taskstack_web_http_requests_total{route="/api/v1/tasks",method="POST",status="422"} 1"#,
        r#"taskstack_web_http_requests_total{route="/api/v1/tasks/{id}",method="GET",status="404"} 1"#,
        r#"taskstack_web_tasks_enqueued_total{task="taskstack.add"} 1"#,
        r#"taskstack_queue_messages{queue="celery",state="ready"} 1"#,
        r#"taskstack_queue_messages{queue="celery",state="dead_lettered"} 0"#,
        r#"taskstack_queue_oldest_ready_age_seconds{queue="celery"} "#,
        r#"taskstack_workers_live{queue="celery"} 0"#,
        "taskstack_redis_up 1",
        "taskstack_beat_leader_present 0",
    ] {
        assert!(text.contains(line), "missing {line:?} in\n{text}");
    }
    assert!(text.contains("taskstack_web_http_request_duration_seconds_bucket{"));
    assert!(text.trim_end().ends_with("# EOF"));
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn the_openapi_document_describes_every_route() -> Result<()> {
    let app = App::new("web-openapi", settings(&["celery"], &[ADD]))?;
    let (s, _, text) = app
        .raw(Request::get("/openapi.json").body(Body::empty())?)
        .await?;
    assert_eq!(s, StatusCode::OK);
    let doc: Value = serde_json::from_str(&text)?;
    assert!(doc["openapi"].as_str().is_some_and(|v| v.starts_with("3.")));
    let routes = [
        ("/api/v1/tasks", "post"),
        ("/api/v1/tasks/batch", "post"),
        ("/api/v1/tasks/{id}", "get"),
        ("/api/v1/tasks/{id}", "delete"),
        ("/api/v1/workflows", "post"),
        ("/api/v1/queues", "get"),
        ("/api/v1/workers", "get"),
        ("/api/v1/dead-letters/{queue}", "get"),
        ("/api/v1/dead-letters/{queue}/requeue", "post"),
        ("/api/v1/dead-letters/{queue}/discard", "post"),
        ("/health", "get"),
        ("/health/live", "get"),
        ("/metrics", "get"),
    ];
    for (path, method) in routes {
        let op = &doc["paths"][path][method];
        assert!(op.is_object(), "{method} {path} is not documented");
        if path.starts_with("/api/") {
            assert_eq!(op["security"], json!([{"bearer": []}]), "{method} {path}");
            assert!(
                op["responses"]["401"].is_object(),
                "{method} {path} lacks 401"
            );
        }
    }
    let paths = doc["paths"].as_object().map_or(0, |p| {
        p.values()
            .map(|v| v.as_object().map_or(0, |o| o.len()))
            .sum()
    });
    assert_eq!(paths, routes.len(), "undocumented or extra operations");
    assert_eq!(
        doc["components"]["securitySchemes"]["bearer"]["scheme"],
        "bearer"
    );
    Ok(())
}
