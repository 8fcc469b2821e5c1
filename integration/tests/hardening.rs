//! Regressions found by trying the engine as users would: poison that is
//! not text, several workers and beats on one host with default settings,
//! a worker that lost its lease while frozen, oversized messages and ETAs
//! far in the future. Real worker and beat processes, real Redis, real
//! signals.

use anyhow::{Context as _, Result};
use base64::Engine as _;
use nix::sys::signal::Signal;
use redis::Commands as _;
use serde_json::{Value, json};
use std::collections::HashMap;
use std::time::Duration;
use taskstack::proto::envelope::{MessageSpec, encode};
use taskstack::{SendOptions, TaskRequest};
use taskstack_integration::http::request_text;
use taskstack_integration::{
    BeatProcess, RedisServer, WorkerProcess, namespace, producer, run_to_exit, wait_until,
    wait_until_sync,
};

const WAIT: Duration = Duration::from_secs(30);

fn dead_letters(redis: &RedisServer, ns: &str, queue: &str) -> Result<Vec<Value>> {
    let raw: Vec<String> = redis.conn()?.lrange(format!("{ns}:dead:{queue}"), 0, -1)?;
    raw.iter()
        .map(|r| serde_json::from_str(r).context("dead letter is JSON"))
        .collect()
}

fn wait_dead(redis: &RedisServer, ns: &str, n: usize) -> Result<Vec<Value>> {
    wait_until_sync(&format!("{n} dead letters"), WAIT, || {
        dead_letters(redis, ns, "celery")
            .ok()
            .filter(|d| d.len() >= n)
    })
}

fn held_by_anyone(redis: &RedisServer, ns: &str) -> Result<usize> {
    let mut c = redis.conn()?;
    let keys: Vec<String> = c.keys(format!("{ns}:held:*"))?;
    let mut n = 0;
    for k in keys {
        n += c.hlen::<_, usize>(k)?;
    }
    Ok(n)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_that_is_not_utf8_is_dead_lettered_with_its_bytes() -> Result<()> {
    let redis = RedisServer::start()?;
    let ns = namespace("not-utf8");
    let raw: &[u8] = b"\x80\x81 pickled? \xff";
    let _: () = redis.conn()?.lpush("celery", raw)?;
    let w = WorkerProcess::spawn(&redis.url(), &ns, &[])?;
    let dead = wait_dead(&redis, &ns, 1).with_context(|| w.log())?;
    let d = &dead[0];
    assert!(
        d["reason"].as_str().unwrap_or("").contains("not UTF-8"),
        "{d}"
    );
    let b64 = d["payload_base64"].as_str().context("payload_base64")?;
    assert_eq!(base64::engine::general_purpose::STANDARD.decode(b64)?, raw);
    assert_eq!(held_by_anyone(&redis, &ns)?, 0, "nothing stays held");
    // The worker keeps serving and never looped on the message.
    let p = producer(&redis.url(), &ns)?;
    let id = p
        .send_task("taskstack.add", vec![json!(2), json!(3)])
        .await?;
    assert_eq!(p.wait(&id, WAIT).await?.result, json!(5));
    assert!(
        !w.log().contains("cannot take messages"),
        "the worker failed to take messages:\n{}",
        w.log()
    );
    Ok(())
}

/// Where the worker `id` announces its metrics.
fn metrics_addr(redis: &RedisServer, ns: &str, id: &str) -> Result<Option<String>> {
    let raw: Option<String> = redis.conn()?.get(format!("{ns}:worker:{id}"))?;
    Ok(raw
        .map(|r| serde_json::from_str::<Value>(&r))
        .transpose()?
        .and_then(|v| v["metrics_addr"].as_str().map(str::to_owned)))
}

fn state_id(path: &std::path::Path) -> Option<String> {
    let v: Value = serde_json::from_slice(&std::fs::read(path).ok()?).ok()?;
    v["id"].as_str().map(str::to_owned)
}

/// `<bin> healthcheck` as the image runs it: only the broker and the
/// namespace set, so the state files are the per-process defaults.
fn healthcheck(bin: &str, redis: &RedisServer, ns: &str) -> Result<std::process::Command> {
    let mut check = std::process::Command::new(taskstack_integration::bin(bin)?);
    for (k, _) in std::env::vars().filter(|(k, _)| k.starts_with("TASKSTACK_")) {
        check.env_remove(k);
    }
    check
        .env("TASKSTACK_BROKER_URL", redis.url())
        .env("TASKSTACK_NAMESPACE", ns)
        .arg("healthcheck");
    Ok(check)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn several_workers_and_beats_share_a_host_with_default_settings() -> Result<()> {
    let redis = RedisServer::start()?;
    let ns = namespace("one-host");
    let workers = [
        WorkerProcess::spawn_with_host_defaults(&redis.url(), &ns, &[])?,
        WorkerProcess::spawn_with_host_defaults(&redis.url(), &ns, &[])?,
        WorkerProcess::spawn_with_host_defaults(&redis.url(), &ns, &[])?,
    ];
    let mut addrs = Vec::new();
    for w in &workers {
        w.wait_log("worker ready", WAIT)?;
        assert!(w.is_running(), "{}", w.log());
        let id = wait_until_sync("the state file", WAIT, || state_id(&w.state_file))?;
        let addr = wait_until_sync("the announced metrics address", WAIT, || {
            metrics_addr(&redis, &ns, &id).ok().flatten()
        })?;
        addrs.push(addr);
    }
    let mut distinct = addrs.clone();
    distinct.sort();
    distinct.dedup();
    assert_eq!(
        distinct.len(),
        3,
        "each worker serves its own port: {addrs:?}"
    );
    for a in &addrs {
        let port = a.rsplit_once(':').context("port")?.1;
        let (status, body) =
            request_text(&format!("127.0.0.1:{port}"), "GET", "/metrics", None, None).await?;
        assert_eq!(status, 200, "{a}");
        assert!(body.contains("taskstack_worker_tasks_total"), "{a}");
    }
    // A worker that fell back says so.
    assert!(
        workers
            .iter()
            .filter(|w| w.log().contains("is taken"))
            .count()
            >= 2,
        "at least two of three fell back from port 9101"
    );
    // The healthcheck (no state file named, like the image's) sees all three.
    let out = run_to_exit(healthcheck("taskstack-worker", &redis, &ns)?, WAIT)?;
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{said}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(said.matches("alive").count(), 3, "{said}");

    // Two beats on the same host: both start, one leads, both healthy.
    let beats = [
        BeatProcess::spawn_with_host_defaults(&redis.url(), &ns, "", &[])?,
        BeatProcess::spawn_with_host_defaults(&redis.url(), &ns, "", &[])?,
    ];
    for b in &beats {
        b.wait_log("beat ready", WAIT)?;
        assert!(b.is_running(), "{}", b.log());
    }
    wait_until_sync("one beat to lead", WAIT, || {
        beats
            .iter()
            .any(|b| b.log().contains("leader"))
            .then_some(())
    })?;
    let out = wait_until("both beats healthy", WAIT, || async {
        let out = run_to_exit(healthcheck("taskstack-beat", &redis, &ns)?, WAIT)?;
        Ok(out.status.success().then_some(out))
    })
    .await?;
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(
        said.contains("leader: ") && said.contains("standby "),
        "the healthcheck covers both beats: {said}"
    );
    // Each beat announces where its metrics are (one fell back from 9102).
    let mut beat_addrs = Vec::new();
    for b in &beats {
        let id = wait_until_sync("the beat's state file", WAIT, || state_id(&b.state_file))?;
        let raw: String = redis.conn()?.get(format!("{ns}:beat:instance:{id}"))?;
        let rec: Value = serde_json::from_str(&raw)?;
        beat_addrs.push(
            rec["metrics_addr"]
                .as_str()
                .context("metrics_addr")?
                .to_owned(),
        );
    }
    assert_ne!(beat_addrs[0], beat_addrs[1], "{beat_addrs:?}");

    // Stopping cleans the per-process files.
    for mut w in workers {
        w.signal(Signal::SIGTERM)?;
        w.wait_exit(WAIT)?;
        assert!(!w.state_file.exists(), "{:?} removed at exit", w.state_file);
    }
    for mut b in beats {
        b.signal(Signal::SIGTERM)?;
        b.wait_exit(WAIT)?;
        assert!(!b.state_file.exists(), "{:?} removed at exit", b.state_file);
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_configured_state_file_is_not_shared_by_two_workers() -> Result<()> {
    let redis = RedisServer::start()?;
    let ns = namespace("state-shared");
    let first = WorkerProcess::spawn(&redis.url(), &ns, &[])?;
    first.wait_log("worker ready", WAIT)?;
    let mut second = WorkerProcess::spawn(
        &redis.url(),
        &ns,
        &[(
            "TASKSTACK_WORKER_STATE_FILE",
            first.state_file.to_str().context("path")?,
        )],
    )?;
    let status = second.wait_exit(WAIT)?;
    assert!(!status.success());
    let log = second.log();
    assert!(
        log.contains("worker_state_file") && log.contains("belongs to the running worker"),
        "{log}"
    );
    Ok(())
}

/// How many times each task id logged "task started" across `logs`.
fn starts(logs: &[String]) -> HashMap<String, usize> {
    let mut n = HashMap::new();
    for line in logs.iter().flat_map(|l| l.lines()) {
        if line.contains("\"task started\"")
            && let Ok(v) = serde_json::from_str::<Value>(line)
            && let Some(id) = v["span"]["task_id"]
                .as_str()
                .or_else(|| v["spans"][0]["task_id"].as_str())
        {
            *n.entry(id.to_owned()).or_default() += 1;
        }
    }
    n
}

/// Task ids in the order `log` says they started.
fn start_order(log: &str) -> Vec<String> {
    log.lines()
        .filter(|l| l.contains("\"task started\""))
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter_map(|v| v["span"]["task_id"].as_str().map(str::to_owned))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_starts_the_messages_it_holds_in_the_order_it_took_them() -> Result<()> {
    let redis = RedisServer::start()?;
    let ns = namespace("start-order");
    let p = producer(&redis.url(), &ns)?;
    // Priority 9 first, then priority 0: on Redis 0 is served first (as
    // in Celery), so one take holds the 0s, then the 9s, each in order.
    let mut nines = Vec::new();
    let mut zeros = Vec::new();
    for (priority, ids) in [(9, &mut nines), (0, &mut zeros)] {
        for i in 0..8 {
            let mut req = TaskRequest::new("taskstack.add", vec![json!(i), json!(1)]);
            req.options.priority = Some(priority);
            ids.push(p.send(&req).await?);
        }
    }
    let w = WorkerProcess::spawn(
        &redis.url(),
        &ns,
        &[
            ("TASKSTACK_CONCURRENCY", "1"),
            ("TASKSTACK_PREFETCH", "16"),
            (
                "TASKSTACK_LOG_LEVEL",
                "info,taskstack::worker::handle=debug",
            ),
        ],
    )?;
    for id in zeros.iter().chain(&nines) {
        p.wait(id, WAIT).await.with_context(|| w.log())?;
    }
    let expected: Vec<String> = zeros.into_iter().chain(nines).collect();
    assert_eq!(start_order(&w.log()), expected, "{}", w.log());
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_that_lost_its_lease_starts_nothing_it_held() -> Result<()> {
    let redis = RedisServer::start()?;
    let ns = namespace("lease-lost");
    let p = producer(&redis.url(), &ns)?;
    let env = [
        ("TASKSTACK_LEASE", "3s"),
        ("TASKSTACK_CONCURRENCY", "1"),
        ("TASKSTACK_PREFETCH", "4"),
        (
            "TASKSTACK_LOG_LEVEL",
            "info,taskstack::worker::handle=debug",
        ),
    ];
    let sleeper = p.send_task("taskstack.sleep", vec![json!(4)]).await?;
    let mut adds = Vec::new();
    for i in 0..6 {
        adds.push(
            p.send_task("taskstack.add", vec![json!(i), json!(1)])
                .await?,
        );
    }
    let w1 = WorkerProcess::spawn(&redis.url(), &ns, &env)?;
    wait_until_sync("worker 1 to start the sleep", WAIT, || {
        start_order(&w1.log()).contains(&sleeper).then_some(())
    })
    .with_context(|| w1.log())?;
    // Worker 1 holds the sleep and three adds. Freeze it past its lease.
    w1.signal(Signal::SIGSTOP)?;
    let w2 = WorkerProcess::spawn(&redis.url(), &ns, &env)?;
    w2.wait_log(
        "restored messages held by workers whose lease expired",
        WAIT,
    )?;
    w1.signal(Signal::SIGCONT)?;
    for id in &adds {
        let r = p.wait(id, WAIT).await?;
        assert_eq!(r.status, taskstack::proto::TaskState::Success, "{id}");
    }
    p.wait(&sleeper, WAIT).await?;
    // Worker 1 finishes its running sleep (the documented at-least-once
    // case), then must refuse every add it still held.
    w1.wait_log("not starting the task", WAIT)?;
    let logs = [w1.log(), w2.log()];
    let counts = starts(&logs);
    for id in &adds {
        assert_eq!(
            counts.get(id).copied(),
            Some(1),
            "add {id} ran {:?} times\nworker 1:\n{}\nworker 2:\n{}",
            counts.get(id),
            logs[0],
            logs[1]
        );
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_oversized_message_is_dead_lettered_unread() -> Result<()> {
    let redis = RedisServer::start()?;
    let ns = namespace("oversized");
    let p = producer(&redis.url(), &ns)?;
    let big = p
        .send(&TaskRequest {
            name: "taskstack.echo".into(),
            args: vec![json!("x".repeat(200 * 1024))],
            kwargs: serde_json::Map::new(),
            options: SendOptions::default(),
        })
        .await?;
    let small = p.send_task("taskstack.echo", vec![json!("ok")]).await?;
    let original: String = redis.conn()?.lindex("celery", -1)?;
    let w = WorkerProcess::spawn(
        &redis.url(),
        &ns,
        &[("TASKSTACK_MAX_MESSAGE_SIZE", "64KiB")],
    )?;
    assert_eq!(p.wait(&small, WAIT).await?.result["args"], json!(["ok"]));
    let dead = wait_dead(&redis, &ns, 1)?;
    let reason = dead[0]["reason"].as_str().unwrap_or("");
    assert!(
        reason.contains("max_message_size") && reason.contains("65536"),
        "{reason}"
    );
    // Never sent to the worker: kept apart in Redis, byte for byte.
    let key = dead[0]["payload_key"].as_str().context("payload_key")?;
    let mut c = redis.conn()?;
    let kept: String = c.get(key)?;
    assert_eq!(kept, original, "the message is kept whole");
    assert_eq!(dead[0]["payload_size"], original.len());
    // Refused unread: the id inside was never looked at.
    assert!(dead[0]["task_id"].is_null());
    assert!(
        c.get::<_, Option<String>>(format!("celery-task-meta-{big}"))?
            .is_none()
    );
    assert_eq!(held_by_anyone(&redis, &ns)?, 0, "nothing stays held");
    // Requeued, it is the same message again (dead-lettered again by this
    // worker), and its separate copy goes with the record.
    drop(w);
    let b = taskstack_integration::broker(&redis.url(), &ns)?;
    let mut lane = b.broker_pool().lane();
    let all = taskstack::broker::DeadSelection::Oldest { limit: 10 };
    let picked = taskstack::broker::pick_dead_letters(&mut lane, b.keys(), "celery", &all).await?;
    let moved = taskstack::broker::move_dead_letters(
        &mut lane,
        b.keys(),
        "celery",
        taskstack::broker::DeadLetterAction::Requeue,
        &picked,
    )
    .await?;
    assert_eq!(moved.len(), 1);
    let requeued: String = c.lindex("celery", 0)?;
    assert_eq!(requeued, original);
    assert!(!c.exists::<_, bool>(key)?, "the kept copy is deleted");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_eta_past_max_task_delay_is_refused_and_dead_lettered() -> Result<()> {
    let redis = RedisServer::start()?;
    let ns = namespace("far-eta");
    let p = producer(&redis.url(), &ns)?.max_task_delay(Duration::from_secs(3600));
    // The producer refuses it outright.
    let refused = p
        .send(&TaskRequest {
            name: "taskstack.add".into(),
            args: vec![json!(1), json!(2)],
            kwargs: serde_json::Map::new(),
            options: SendOptions {
                countdown: Some(Duration::from_secs(7200)),
                ..SendOptions::default()
            },
        })
        .await
        .expect_err("countdown past max_task_delay")
        .to_string();
    assert!(
        refused.contains("countdown") && refused.contains("max_task_delay"),
        "{refused}"
    );
    // A Python-style producer pushes one due in year 9999 straight to the queue.
    let eta = chrono::DateTime::parse_from_rfc3339("9999-01-01T00:00:00Z")?.to_utc();
    let far = encode(&MessageSpec {
        id: "far-1",
        task: "taskstack.add",
        args: &[json!(1), json!(2)],
        eta: Some(eta),
        origin: "test",
        ..MessageSpec::default()
    });
    let _: () = redis.conn()?.lpush("celery", far)?;
    let _w = WorkerProcess::spawn(&redis.url(), &ns, &[("TASKSTACK_MAX_TASK_DELAY", "1h")])?;
    let dead = wait_dead(&redis, &ns, 1)?;
    let reason = dead[0]["reason"].as_str().unwrap_or("");
    assert!(
        reason.contains("9999-01-01") && reason.contains("max_task_delay"),
        "{reason}"
    );
    assert_eq!(dead[0]["task_id"], "far-1");
    let r = p.wait("far-1", WAIT).await?;
    assert_eq!(r.status, taskstack::proto::TaskState::Failure);
    let parked: u64 = redis.conn()?.zcard(format!("{ns}:parked"))?;
    assert_eq!(parked, 0, "nothing parked for ever");
    Ok(())
}
