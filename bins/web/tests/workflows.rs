//! `POST /api/v1/workflows`: chains and chords through the web API, run by
//! a worker on a real Redis; every refusal names the step at fault and
//! sends nothing.

mod common;

use anyhow::Result;
use axum::http::{Method, StatusCode};
use common::{ADD, App, settings};
use serde_json::json;

const ECHO: &str = "taskstack.echo";

#[tokio::test(flavor = "multi_thread")]
async fn a_chain_runs_to_its_last_step_and_every_step_is_known_at_once() -> Result<()> {
    let app = App::new("web-chain", settings(&["celery"], &[ADD, ECHO]))?;
    let body = json!({"chain": [
        {"task": ADD, "args": [2, 2]},
        {"task": ADD, "args": [4]},
        {"task": ECHO, "args": ["end"], "immutable": true},
    ]});
    let (status, sent) = app
        .call(Method::POST, "/api/v1/workflows", Some(body))
        .await?;
    assert_eq!(status, StatusCode::ACCEPTED, "{sent}");
    assert_eq!(sent["kind"], "chain");
    let ids: Vec<String> = serde_json::from_value(sent["task_ids"].clone())?;
    assert_eq!(ids.len(), 3);
    assert_eq!(sent["result_id"], json!(ids[2]));
    assert_eq!(sent["links"]["result"], format!("/api/v1/tasks/{}", ids[2]));
    // Known before any worker runs: PENDING, not 404.
    for id in &ids {
        let (s, v) = app
            .call(Method::GET, &format!("/api/v1/tasks/{id}"), None)
            .await?;
        assert_eq!((s, &v["state"]), (StatusCode::OK, &json!("PENDING")), "{v}");
    }
    let _worker = app.worker(&["celery"], None)?;
    let end = app.wait_state(&ids[2], "SUCCESS").await?;
    assert_eq!(end["result"], json!({"args": ["end"], "kwargs": {}}));
    let second = app.wait_state(&ids[1], "SUCCESS").await?;
    assert_eq!(second["result"], 8);
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn a_chord_body_gets_the_header_results_in_order() -> Result<()> {
    let app = App::new("web-chord", settings(&["celery"], &[ADD, ECHO]))?;
    let _worker = app.worker(&["celery"], None)?;
    let header: Vec<_> = (0..4)
        .map(|i| json!({"task": ADD, "args": [i, i]}))
        .collect();
    let body = json!({"chord": {"header": header, "body": {"task": ECHO}}});
    let (status, sent) = app
        .call(Method::POST, "/api/v1/workflows", Some(body))
        .await?;
    assert_eq!(status, StatusCode::ACCEPTED, "{sent}");
    assert_eq!(sent["kind"], "chord");
    assert!(sent["group_id"].is_string(), "{sent}");
    assert_eq!(sent["task_ids"].as_array().map(Vec::len), Some(5));
    let id = sent["result_id"].as_str().unwrap_or_default().to_owned();
    let done = app.wait_state(&id, "SUCCESS").await?;
    assert_eq!(
        done["result"],
        json!({"args": [[0, 2, 4, 6]], "kwargs": {}})
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn bad_workflows_name_what_is_wrong_and_send_nothing() -> Result<()> {
    let app = App::new("web-bad-workflow", settings(&["celery"], &[ADD]))?;
    let cases = [
        (json!({}), "exactly one of"),
        (
            json!({"chain": [{"task": ADD}], "chord": {"header": [{"task": ADD}], "body": {"task": ADD}}}),
            "exactly one of",
        ),
        (json!({"chain": []}), "1 to 1000"),
        (
            json!({"chain": [{"task": ADD}, {"task": "nope.missing"}]}),
            "chain step 2: task \"nope.missing\" is not known",
        ),
        (
            json!({"chain": [{"task": ADD}, {"task": ADD, "priority": 12}]}),
            "chain step 2: `priority` is 12",
        ),
        (
            json!({"chord": {"header": [], "body": {"task": ADD}}}),
            "`chord.header` has 0 tasks",
        ),
        (
            json!({"chord": {"header": [{"task": ADD, "immutable": true}], "body": {"task": ADD}}}),
            "`immutable` is for chain steps",
        ),
    ];
    for (body, expected) in cases {
        let (status, v) = app
            .call(Method::POST, "/api/v1/workflows", Some(body.clone()))
            .await?;
        assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{body}: {v}");
        let message = v["message"].as_str().unwrap_or_default();
        assert!(message.contains(expected), "{body}: {message}");
    }
    let (status, v) = app
        .call(
            Method::POST,
            "/api/v1/tasks",
            Some(json!({"task": ADD, "immutable": true})),
        )
        .await?;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{v}");
    assert_eq!(app.llen("celery")?, 0, "nothing was sent");
    assert_eq!(app.task_records()?, 0, "nothing was recorded");
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn task_sent_events_are_published_when_asked_for() -> Result<()> {
    use futures_util::StreamExt as _;
    let mut s = settings(&["celery"], &[ADD]);
    s.send_sent_event = true;
    let app = App::new("web-task-sent", s)?;
    let client = redis::Client::open(app.redis.url())?;
    let mut events = client.get_async_pubsub().await?;
    events.psubscribe("/0.celeryev/*").await?;
    let id = app
        .enqueue(json!({"task": ADD, "args": [1, 2], "queue": "celery"}))
        .await?;
    let mut stream = events.on_message();
    let msg = tokio::time::timeout(std::time::Duration::from_secs(10), stream.next())
        .await?
        .ok_or_else(|| anyhow::anyhow!("the subscription ended"))?;
    assert_eq!(msg.get_channel_name(), "/0.celeryev/task.sent");
    let envelope: serde_json::Value = serde_json::from_slice(msg.get_payload_bytes())?;
    // kombu's envelope: the JSON body, base64-encoded.
    let raw = {
        use base64::Engine as _;
        base64::engine::general_purpose::STANDARD
            .decode(envelope["body"].as_str().unwrap_or_default())?
    };
    let body: serde_json::Value = serde_json::from_slice(&raw)?;
    assert_eq!(body["type"], "task-sent", "{body}");
    assert_eq!(body["uuid"], json!(id));
    assert_eq!(body["name"], ADD);
    assert_eq!(body["args"], "(1, 2)");
    assert_eq!(body["queue"], "celery");
    assert!(
        body["clock"].is_u64() && body["timestamp"].is_f64(),
        "{body}"
    );
    Ok(())
}
