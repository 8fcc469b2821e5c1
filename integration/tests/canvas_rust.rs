//! Canvas sent from Rust (`Producer::send_chain`, `send_chord`, links)
//! and run by a real taskstack worker process on a real Redis: the values
//! and lineage a caller reads back.

use anyhow::{Context as _, Result};
use serde_json::json;
use std::time::Duration;
use taskstack::proto::TaskState;
use taskstack::{ChordOptions, TaskRequest};
use taskstack_integration::{RedisServer, WorkerProcess, namespace, producer};

const WAIT: Duration = Duration::from_secs(30);

async fn stack(test: &str) -> Result<(RedisServer, WorkerProcess, String)> {
    let redis = RedisServer::start()?;
    let ns = namespace(test);
    let worker = WorkerProcess::spawn(&redis.url(), &ns, &[])?;
    worker.wait_log("worker ready", Duration::from_secs(60))?;
    Ok((redis, worker, ns))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rust_chain_runs_each_step_with_the_previous_result() -> Result<()> {
    let (redis, worker, ns) = stack("rust-chain").await?;
    let p = producer(&redis.url(), &ns)?;
    let mut last = TaskRequest::new("taskstack.echo", vec![json!("end")]);
    last.options.immutable = true;
    let sent = p
        .send_chain(&[
            TaskRequest::new("taskstack.add", vec![json!(2), json!(2)]),
            TaskRequest::new("taskstack.add", vec![json!(4)]),
            TaskRequest::new("taskstack.add", vec![json!(8)]),
            last,
        ])
        .await?;
    let end = p
        .wait(sent.result_id(), WAIT)
        .await
        .with_context(|| format!("the chain did not finish; worker log:\n{}", worker.log()))?;
    assert_eq!(end.status, TaskState::Success, "{end:?}");
    // Immutable: the previous result (16) is not prepended.
    assert_eq!(end.result, json!({"args": ["end"], "kwargs": {}}));
    let third = p.result(&sent.task_ids[2]).await?.context("third step")?;
    assert_eq!(third.result, json!(16));
    for (i, id) in sent.task_ids.iter().enumerate().skip(1) {
        let r = p.result(id).await?.context("stored")?;
        assert_eq!(
            r.parent_id.as_deref(),
            Some(sent.task_ids[i - 1].as_str()),
            "step {i}: {r:?}"
        );
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rust_chord_gives_its_body_the_header_results_in_order() -> Result<()> {
    let (redis, worker, ns) = stack("rust-chord").await?;
    let p = producer(&redis.url(), &ns)?;
    let header: Vec<TaskRequest> = (0..5)
        .map(|i| TaskRequest::new("taskstack.add", vec![json!(i), json!(i)]))
        .collect();
    let sent = p
        .send_chord(
            &header,
            &TaskRequest::new("taskstack.echo", vec![]),
            &ChordOptions::default(),
        )
        .await?;
    assert_eq!(sent.header_ids.len(), 5);
    let body = p
        .wait(&sent.body_id, WAIT)
        .await
        .with_context(|| format!("the body never ran; worker log:\n{}", worker.log()))?;
    assert_eq!(body.status, TaskState::Success, "{body:?}");
    assert_eq!(
        body.result,
        json!({"args": [[0, 2, 4, 6, 8]], "kwargs": {}})
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rust_links_run_on_success_and_errbacks_on_failure() -> Result<()> {
    let (redis, worker, ns) = stack("rust-link").await?;
    let p = producer(&redis.url(), &ns)?;
    let mut ok = TaskRequest::new("taskstack.add", vec![json!(1), json!(1)]);
    let mut callback = TaskRequest::new("taskstack.add", vec![json!(10)]);
    callback.options.task_id = Some(uuid::Uuid::new_v4().to_string());
    ok.options.link = vec![callback.clone()];
    p.send(&ok).await?;
    let cb_id = callback.options.task_id.clone().context("id")?;
    let cb = p
        .wait(&cb_id, WAIT)
        .await
        .with_context(|| format!("the callback never ran; worker log:\n{}", worker.log()))?;
    assert_eq!(cb.result, json!(12));

    let mut failing = TaskRequest::new("taskstack.fail", vec![json!("boom")]);
    let mut errback = TaskRequest::new("taskstack.echo", vec![]);
    errback.options.task_id = Some(uuid::Uuid::new_v4().to_string());
    failing.options.link_error = vec![errback.clone()];
    failing.options.link = vec![TaskRequest::new("taskstack.echo", vec![json!("never")])];
    let failed_id = p.send(&failing).await?;
    let eb_id = errback.options.task_id.clone().context("id")?;
    let eb = p
        .wait(&eb_id, WAIT)
        .await
        .with_context(|| format!("the errback never ran; worker log:\n{}", worker.log()))?;
    // Celery's errback convention for a plain signature: the failed
    // task's id first.
    assert_eq!(eb.result["args"][0], json!(failed_id), "{eb:?}");
    let failed = p.result(&failed_id).await?.context("stored")?;
    assert_eq!(failed.status, TaskState::Failure);
    Ok(())
}
