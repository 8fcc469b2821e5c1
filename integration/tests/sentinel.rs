//! Redis Sentinel: real `taskstack-worker` and `taskstack-web` processes
//! and a producer find the master through three real sentinels (Debian's
//! `redis-sentinel`), each test with its own master, replica and sentinels
//! on free loopback ports; the master is SIGKILLed mid-run and what was
//! lost or run twice is counted and printed.

use anyhow::{Context as _, Result};
use serde_json::{Value, json};
use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::time::{Duration, Instant};
use taskstack::proto::TaskState;
use taskstack::{Producer, SendOptions, TaskRequest};
use taskstack_integration::sentinel::SENTINEL_PASSWORD;
use taskstack_integration::{
    Prereq, SentinelSet, WebProcess, WorkerProcess, namespace, require, sentinel_broker, wait_until,
};

fn prereqs() {
    require(Prereq::Program {
        name: "redis-server",
        package: "redis-server",
    });
    require(Prereq::Program {
        name: "redis-sentinel",
        package: "redis-sentinel",
    });
}

/// The sentinels' password, as every service gets it.
const SENTINEL_ENV: (&str, &str) = ("TASKSTACK_SENTINEL_PASSWORD", SENTINEL_PASSWORD);

fn producer(set: &SentinelSet, ns: &str, min_replicas_acked: u32) -> Result<Producer> {
    Ok(Producer::new(
        sentinel_broker(&set.url(), SENTINEL_PASSWORD, ns, min_replicas_acked)?,
        "test@localhost",
    ))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn worker_web_and_producer_find_the_master_through_the_sentinels() -> Result<()> {
    prereqs();
    let set = SentinelSet::start()?;
    let ns = namespace("sentinel_connect");
    let url = set.url();
    let w = WorkerProcess::spawn(&url, &ns, &[SENTINEL_ENV])?;
    w.wait_log("worker ready", Duration::from_secs(30))
        .with_context(|| w.log())?;
    let web = WebProcess::spawn(&url, &ns, &[SENTINEL_ENV]).await?;
    let p = producer(&set, &ns, 0)?;
    let id = p
        .send_task("taskstack.add", vec![json!(2), json!(3)])
        .await?;
    let r = p.wait(&id, Duration::from_secs(20)).await?;
    assert_eq!((r.status, r.result), (TaskState::Success, json!(5)));
    // Through the web API too.
    let (status, body) = web
        .call(
            "POST",
            "/api/v1/tasks",
            Some(&json!({"task": "taskstack.echo", "args": ["via-web"]})),
        )
        .await?;
    assert_eq!(status, 202, "{body}\n{}", web.log());
    let id = body["id"].as_str().context("id")?.to_owned();
    web.wait_state(&id, "SUCCESS").await?;
    // The data is on the master the sentinels name.
    let mut m = set.master_conn()?;
    let stored: Option<String> = redis::cmd("GET")
        .arg(format!("celery-task-meta-{id}"))
        .query(&mut m)?;
    assert!(stored.is_some_and(|s| s.contains("via-web")));
    // A wrong sentinel password is refused at connection, and says so.
    let bad = sentinel_broker(&url, "wrong", &ns, 0)?;
    let e = bad.ping().await.expect_err("wrong sentinel password");
    assert!(e.to_string().contains("sentinel"), "{e}");
    Ok(())
}

/// A worker whose one task `t.record` appends the task's JSON (one line)
/// to `record`: executions are counted outside Redis, so a write Redis
/// lost in the failover cannot hide one.
fn recording_worker(
    set: &SentinelSet,
    ns: &str,
    dir: &Path,
    min_replicas_acked: &str,
) -> Result<WorkerProcess> {
    use std::os::unix::fs::PermissionsExt as _;
    let record = dir.join("executions.jsonl");
    let script = dir.join("record.sh");
    std::fs::write(
        &script,
        format!(
            "#!/bin/sh\nIFS= read -r line\nprintf '%s\\n' \"$line\" >> '{}'\n",
            record.display()
        ),
    )?;
    std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755))?;
    let toml = dir.join("worker.toml");
    std::fs::write(
        &toml,
        format!("[tasks.\"t.record\"]\nexec = [\"{}\"]\n", script.display()),
    )?;
    let w = WorkerProcess::spawn(
        &set.url(),
        ns,
        &[
            SENTINEL_ENV,
            ("TASKSTACK_CONFIG", toml.to_str().context("utf-8 path")?),
            ("TASKSTACK_CONCURRENCY", "16"),
            ("TASKSTACK_LEASE", "2s"),
            ("TASKSTACK_REDIS_TIMEOUT", "2s"),
            ("TASKSTACK_REDIS_MIN_REPLICAS_ACKED", min_replicas_acked),
        ],
    )?;
    w.wait_log("worker ready", Duration::from_secs(30))
        .with_context(|| w.log())?;
    Ok(w)
}

/// How many times each task id ran, from the record file.
fn executions(dir: &Path) -> Result<HashMap<String, usize>> {
    let text = std::fs::read_to_string(dir.join("executions.jsonl")).unwrap_or_default();
    let mut runs = HashMap::new();
    for line in text.lines().filter(|l| !l.is_empty()) {
        let v: Value = serde_json::from_str(line).with_context(|| format!("line {line:?}"))?;
        let id = v["id"].as_str().context("id")?.to_owned();
        *runs.entry(id).or_insert(0) += 1;
    }
    Ok(runs)
}

fn record_task(id: String) -> TaskRequest {
    TaskRequest {
        name: "t.record".into(),
        args: vec![],
        kwargs: serde_json::Map::new(),
        options: SendOptions {
            task_id: Some(id),
            ..SendOptions::default()
        },
    }
}

/// What the producer saw: ids whose enqueue was acknowledged, when, and
/// how many sends failed (and were retried with the same ids).
struct Sent {
    acked: Vec<(String, Instant)>,
    send_errors: usize,
}

/// Sends `n` `t.record` tasks in batches of 25, paced so the run spans the
/// failover; a failed batch is sent again with the same ids until it is
/// acknowledged (as a careful producer would).
async fn produce(p: Producer, n: usize) -> Result<Sent> {
    let mut sent = Sent {
        acked: Vec::with_capacity(n),
        send_errors: 0,
    };
    let start = Instant::now();
    for _ in 0..n.div_ceil(25) {
        let ids: Vec<String> = (0..25).map(|_| uuid::Uuid::new_v4().to_string()).collect();
        let reqs: Vec<TaskRequest> = ids.iter().cloned().map(record_task).collect();
        loop {
            match p.send_many(&reqs).await {
                Ok(_) => break,
                Err(e) => {
                    sent.send_errors += 1;
                    anyhow::ensure!(
                        start.elapsed() < Duration::from_secs(90),
                        "the producer never recovered: {e}"
                    );
                    // Backoff between retries of a failed send.
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        }
        let now = Instant::now();
        sent.acked.extend(ids.into_iter().map(|id| (id, now)));
        // Pacing, so the run spans the failover.
        tokio::time::sleep(Duration::from_millis(15)).await;
    }
    Ok(sent)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn master_sigkilled_mid_run_fails_over_and_the_service_recovers() -> Result<()> {
    failover_run(0).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_redis_min_replicas_acked_no_acknowledged_task_is_lost_in_a_failover() -> Result<()> {
    failover_run(1).await
}

/// The master SIGKILLed while 3,000 tasks flow; with `acked` > 0 every
/// service waits for that many replicas (`redis_min_replicas_acked`), and
/// nothing acknowledged may be lost.
async fn failover_run(replicas: u32) -> Result<()> {
    prereqs();
    let mut set = SentinelSet::start()?;
    let ns = namespace("sentinel_failover");
    let dir = tempfile::tempdir()?;
    if replicas > 0 {
        enqueue_cost(&set).await?;
    }
    let w = recording_worker(&set, &ns, dir.path(), &replicas.to_string())?;
    let acked_env = replicas.to_string();
    let web = WebProcess::spawn(
        &set.url(),
        &ns,
        &[
            SENTINEL_ENV,
            ("TASKSTACK_REDIS_MIN_REPLICAS_ACKED", &acked_env),
        ],
    )
    .await?;
    const N: usize = 3000;
    let producing = tokio::spawn(produce(producer(&set, &ns, replicas)?, N));

    wait_until(
        "500 executions before the kill",
        Duration::from_secs(60),
        || async { Ok((executions(dir.path())?.len() >= 500).then_some(())) },
    )
    .await
    .with_context(|| w.log())?;
    let killed_at = Instant::now();
    let old = set.kill_master()?;
    let (new, failover) = set.wait_failover(old, killed_at)?;
    let promoted_at = Instant::now();
    assert_ne!(old, new);
    if replicas > 0 {
        // Writes wait for a replica: bring the old master back, which the
        // sentinels turn into the new master's replica.
        set.restart_node(old)?;
    }

    let sent = producing.await??;
    let acked: HashSet<&str> = sent.acked.iter().map(|(id, _)| id.as_str()).collect();
    // Everything acknowledged runs, or the runs stop changing (what the
    // failover lost never runs).
    let mut last = (0, Instant::now());
    let runs = wait_until(
        "every acknowledged task to run (or the runs to settle)",
        Duration::from_secs(90),
        || {
            let polled = executions(dir.path()).map(|runs| {
                let total: usize = runs.values().sum();
                if total != last.0 {
                    last = (total, Instant::now());
                }
                let settled = last.1.elapsed() > Duration::from_secs(10);
                let all = acked.iter().all(|id| runs.contains_key(*id));
                (all || settled).then_some(runs)
            });
            async move { polled }
        },
    )
    .await
    .with_context(|| w.log())?;

    let lost: Vec<&(String, Instant)> = sent
        .acked
        .iter()
        .filter(|(id, _)| !runs.contains_key(id))
        .collect();
    let duplicated = runs.values().filter(|n| **n > 1).count();
    let extra_runs: usize = runs.values().map(|n| n.saturating_sub(1)).sum();
    let lost_after_promotion = lost.iter().filter(|(_, at)| *at > promoted_at).count();
    println!(
        "sentinel failover (redis_min_replicas_acked = {replicas}): {} acknowledged, {} lost, {} duplicated \
         ({} extra runs), {} failed sends retried; failover took {:.1} s \
         (down-after {} ms); {} lost among those acknowledged after the promotion",
        sent.acked.len(),
        lost.len(),
        duplicated,
        extra_runs,
        sent.send_errors,
        failover.as_secs_f64(),
        taskstack_integration::sentinel::DOWN_AFTER.as_millis(),
        lost_after_promotion,
    );
    assert_eq!(sent.acked.len(), N.div_ceil(25) * 25);
    assert!(
        sent.send_errors > 0,
        "no send failed: the kill did not happen mid-run, the test proved nothing"
    );
    if replicas > 0 {
        assert!(
            lost.is_empty(),
            "{} acknowledged tasks lost although a replica acknowledged them",
            lost.len()
        );
    }
    assert_eq!(
        lost_after_promotion,
        0,
        "tasks enqueued on the new master were lost\n{}",
        w.log()
    );
    assert!(
        runs.keys().all(|id| acked.contains(id.as_str())),
        "a task ran that nobody sent"
    );
    // The worker and the web follow the new master.
    w.wait_log(
        "redis sentinel: connecting to the master",
        Duration::from_secs(1),
    )?;
    let p = producer(&set, &ns, replicas)?;
    let id = p
        .send_task("taskstack.add", vec![json!(1), json!(1)])
        .await?;
    let r = p.wait(&id, Duration::from_secs(30)).await?;
    assert_eq!(r.status, TaskState::Success);
    wait_until(
        "the web to be healthy again",
        Duration::from_secs(30),
        || async {
            let (s, _) = web.call("GET", "/health", None).await?;
            Ok((s == 200).then_some(()))
        },
    )
    .await
    .with_context(|| web.log())?;
    Ok(())
}

/// Prints what waiting for a replica costs an enqueue: 2,000 tasks in
/// batches of 25 into a queue nobody consumes, without and with
/// `redis_min_replicas_acked = 1` (median of three runs each).
async fn enqueue_cost(set: &SentinelSet) -> Result<()> {
    let mut line = String::from("enqueue cost, 2,000 tasks in batches of 25 (median of 3):");
    for acked in [0, 1] {
        let p = producer(set, &namespace("sentinel_cost"), acked)?;
        let mut times = Vec::new();
        for _ in 0..3 {
            let reqs: Vec<TaskRequest> = (0..25)
                .map(|_| {
                    let mut r = record_task(uuid::Uuid::new_v4().to_string());
                    r.options.task_id = None;
                    r.options.queue = Some("sentinel-cost".into());
                    r
                })
                .collect();
            let start = Instant::now();
            for _ in 0..80 {
                p.send_many(&reqs).await?;
            }
            times.push(start.elapsed());
        }
        times.sort();
        let median = times[1];
        line.push_str(&format!(
            " redis_min_replicas_acked={acked}: {:.0} ms ({:.0} tasks/s);",
            median.as_secs_f64() * 1000.0,
            2000.0 / median.as_secs_f64()
        ));
    }
    println!("{line}");
    Ok(())
}
