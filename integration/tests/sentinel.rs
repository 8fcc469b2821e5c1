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

/// How many times each task id ran, from the record file. Its last line
/// may still be being appended by a running task (the shell writes it in
/// pieces): only lines that end in a newline are read.
fn executions(dir: &Path) -> Result<HashMap<String, usize>> {
    let text = std::fs::read_to_string(dir.join("executions.jsonl")).unwrap_or_default();
    let complete = text.rfind('\n').map_or("", |end| &text[..end]);
    let mut runs = HashMap::new();
    for line in complete.lines().filter(|l| !l.is_empty()) {
        let v: Value = serde_json::from_str(line).with_context(|| format!("line {line:?}"))?;
        let id = v["id"].as_str().context("id")?.to_owned();
        *runs.entry(id).or_insert(0) += 1;
    }
    Ok(runs)
}

/// Waits until every id of `acked` ran, or the runs stop changing for 10 s
/// (what the failover lost never runs); how many times each id ran.
async fn wait_runs(
    dir: &Path,
    acked: &HashSet<&str>,
    w: &WorkerProcess,
) -> Result<HashMap<String, usize>> {
    let mut last = (0, Instant::now());
    wait_until(
        "every acknowledged task to run (or the runs to settle)",
        Duration::from_secs(90),
        || {
            let polled = executions(dir).map(|runs| {
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
    .with_context(|| w.log())
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
async fn with_redis_min_replicas_acked_through_a_failover_losses_reported() -> Result<()> {
    failover_run(1).await
}

/// The master SIGKILLed while 3,000 tasks flow; with `replicas` > 0 every
/// service waits for that many replicas (`redis_min_replicas_acked`).
/// Nothing sent after the promotion may be lost; losses before it are
/// printed (with the setting they are an open defect, see
/// docs/operations.md).
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
        // Writes wait for a replica: bring the old master back as the new
        // master's replica.
        set.restart_node(old, new)?;
    }

    let sent = producing.await??;
    let acked: HashSet<&str> = sent.acked.iter().map(|(id, _)| id.as_str()).collect();
    let runs = wait_runs(dir.path(), &acked, &w).await?;

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
    if replicas > 0 && !lost.is_empty() {
        // A defect seen while the old master was restarted empty as a
        // master (docs/operations.md, "Redis Sentinel"): with the setting,
        // tasks acknowledged before the promotion were lost in some runs
        // and were nowhere on the new master afterwards. None since it
        // comes back as a replica; reported with where the master has them
        // (if anywhere), not asserted, until more runs back that; nothing
        // sent after the promotion may be lost (asserted below).
        let ids: Vec<&str> = lost.iter().map(|(id, _)| id.as_str()).collect();
        let mentions: Vec<String> = w
            .log()
            .lines()
            .filter(|l| ids.iter().take(3).any(|id| l.contains(id)))
            .map(str::to_owned)
            .collect();
        eprintln!(
            "DEFECT: {} acknowledged tasks lost although a replica acknowledged them; \
             where the master has them: {:?}\nthe first three in the worker's log:\n{}\n\
             syncs, role changes and sentinel events:\n{}",
            lost.len(),
            locate(&set, &ids)?,
            mentions.join("\n"),
            set.log_lines(&FAILOVER_EVENTS),
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

/// The beat's queue in the beat-across-a-failover tests.
const BEAT_QUEUE: &str = "beat-ha";

/// One `every = "1s"` entry, a 3 s leader lock.
const BEAT_TOML: &str = "beat_lock_ttl = \"3s\"\n\
     [[schedule]]\nname = \"tick\"\ntask = \"proj.tick\"\nevery = \"1s\"\nqueue = \"beat-ha\"\n";

/// The slot and the publishing instance of every message on the beat's
/// queue on the current master, oldest first.
fn beat_messages(set: &SentinelSet) -> Result<Vec<(chrono::DateTime<chrono::Utc>, String)>> {
    let raw: Vec<String> = redis::cmd("LRANGE")
        .arg(BEAT_QUEUE)
        .arg(0)
        .arg(-1)
        .query(&mut set.master_conn()?)?;
    raw.iter()
        .rev()
        .map(|payload| {
            let (entry, slot) = taskstack::beat::publish::beat_headers(payload)
                .context("beat_entry / beat_slot headers")?;
            anyhow::ensure!(entry == "tick", "entry {entry}");
            let v: Value = serde_json::from_str(payload)?;
            let origin = v["headers"]["origin"].as_str().context("origin")?;
            Ok((slot, origin.to_owned()))
        })
        .collect()
}

fn beat_queue_len(set: &SentinelSet) -> Option<usize> {
    redis::cmd("LLEN")
        .arg(BEAT_QUEUE)
        .query(&mut set.master_conn().ok()?)
        .ok()
}

/// How many lines of the beats' logs contain `needle`.
fn beat_log_count(beats: &[taskstack_integration::BeatProcess], needle: &str) -> usize {
    beats.iter().map(|b| b.log().matches(needle).count()).sum()
}

#[test]
fn beat_leader_and_standby_fire_each_slot_once_across_a_failover() -> Result<()> {
    beat_failover(1)
}

#[test]
fn beat_across_a_failover_without_replica_acks_fires_no_slot_twice_on_the_new_master() -> Result<()>
{
    beat_failover(0)
}

/// Two beats (leader and standby) with a one-second schedule; the master
/// is SIGKILLed right after a publish; the old master comes back as a
/// replica; the beats go on. Every slot is counted on the new master's
/// queue by its `beat_slot` header.
fn beat_failover(replicas: u32) -> Result<()> {
    use taskstack_integration::BeatProcess;
    prereqs();
    let mut set = SentinelSet::start()?;
    let ns = namespace("sentinel_beat");
    let acked = replicas.to_string();
    let env = [
        SENTINEL_ENV,
        ("TASKSTACK_REDIS_MIN_REPLICAS_ACKED", acked.as_str()),
        ("TASKSTACK_REDIS_TIMEOUT", "2s"),
    ];
    let mut beats: Vec<BeatProcess> = (0..2)
        .map(|_| BeatProcess::spawn(&set.url(), &ns, BEAT_TOML, &env))
        .collect::<Result<_>>()?;
    let logs = |beats: &[BeatProcess]| -> String {
        beats
            .iter()
            .map(|b| format!("--- beat pid {}\n{}", b.pid(), b.log()))
            .collect()
    };
    // A few slots, then the kill right after one of them is published.
    let before = taskstack_integration::wait_until_sync(
        "three published slots",
        Duration::from_secs(30),
        || beat_queue_len(&set).filter(|n| *n >= 3),
    )
    .with_context(|| logs(&beats))?;
    taskstack_integration::wait_until_sync(
        "one more published slot",
        Duration::from_secs(5),
        || beat_queue_len(&set).filter(|n| *n > before),
    )?;
    let killed_at = Instant::now();
    let killed_wall = chrono::Utc::now();
    let old = set.kill_master()?;
    let (new, failover) = set.wait_failover(old, killed_at)?;
    // The old master comes back as the new one's replica (with the
    // setting, writes wait for it).
    set.restart_node(old, new)?;
    assert_ne!(old, new);
    let at_promotion = beat_queue_len(&set).unwrap_or(0);
    let first_after = taskstack_integration::wait_until_sync(
        "a slot published on the new master",
        Duration::from_secs(30),
        || beat_queue_len(&set).filter(|n| *n > at_promotion),
    )
    .map(|_| killed_at.elapsed())
    .with_context(|| format!("{}\n{}", logs(&beats), set.logs()))?;
    // The beats go on: five slots beyond the kill.
    taskstack_integration::wait_until_sync(
        "slots 5 s beyond the kill on the new master",
        Duration::from_secs(30),
        || {
            let msgs = beat_messages(&set).ok()?;
            let last = msgs.iter().map(|m| m.0).max()?;
            (last >= killed_wall + chrono::Duration::seconds(5)).then_some(())
        },
    )
    .with_context(|| logs(&beats))?;
    for b in &mut beats {
        b.kill()?;
    }

    let msgs = beat_messages(&set)?;
    let mut per_slot: std::collections::BTreeMap<chrono::DateTime<chrono::Utc>, usize> =
        std::collections::BTreeMap::new();
    for (slot, _) in &msgs {
        *per_slot.entry(*slot).or_insert(0) += 1;
    }
    let first = *per_slot.keys().next().context("no slot")?;
    let last = *per_slot.keys().next_back().context("no slot")?;
    let window = usize::try_from((last - first).num_seconds())? + 1;
    let twice: Vec<_> = per_slot.iter().filter(|(_, n)| **n > 1).collect();
    let missing = window - per_slot.len();
    let origins: HashSet<&str> = msgs.iter().map(|m| m.1.as_str()).collect();
    let already = beat_log_count(&beats, "slot already published");
    let lost_lead = beat_log_count(&beats, "lost leadership");
    println!(
        "beat across a sentinel failover (redis_min_replicas_acked = {replicas}): {} slots in \
         {window} s on the new master, {} published twice, {missing} missing; {} leader(s) \
         published; {already} \"already published\" answers, {lost_lead} lost leadership; \
         failover took {:.1} s, first slot on the new master {:.1} s after the kill",
        per_slot.len(),
        twice.len(),
        origins.len(),
        failover.as_secs_f64(),
        first_after.as_secs_f64(),
    );
    if !twice.is_empty() || (replicas > 0 && missing > 0) {
        // Printed before the (long) beat logs, so a truncated CI log keeps it.
        eprintln!(
            "master {old} failed over to {new}, now {:?}; slots twice: {twice:?}; {missing} \
             missing\nsyncs, role changes and sentinel events:\n{}",
            set.master_port().ok(),
            set.log_lines(&FAILOVER_EVENTS),
        );
    }
    // The slot ledger and the message are one atomic script, replicated
    // as one: the new master never holds a slot twice.
    assert!(
        twice.is_empty(),
        "slots published twice: {twice:?}\n{}",
        logs(&beats)
    );
    if replicas > 0 {
        // Every slot counted by a beat is on the replica: none is missing.
        assert_eq!(
            missing,
            0,
            "slots missing on the new master\n{}",
            logs(&beats)
        );
    }
    assert!(
        last >= killed_wall + chrono::Duration::seconds(5),
        "the beats went on after the failover"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn celery_client_through_a_failover_counted_without_replica_acks() -> Result<()> {
    celery_failover_run(0).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn celery_client_through_a_failover_counted_with_replica_acks() -> Result<()> {
    celery_failover_run(1).await
}

/// A real Celery client (Celery's `sentinel://...;sentinel://...` broker
/// URL, `master_name` and `sentinel_kwargs` in the transport options)
/// sends 5,000 tasks to a taskstack worker on the `redis+sentinel://` URL
/// while the master is SIGKILLed; lost and repeated executions are
/// counted. `replicas` is the worker's `redis_min_replicas_acked` (Celery's
/// own enqueue never waits for a replica).
async fn celery_failover_run(replicas: u32) -> Result<()> {
    prereqs();
    let python = taskstack_integration::python::celery_python()?;
    let mut set = SentinelSet::start()?;
    let ns = namespace("sentinel_celery");
    let dir = tempfile::tempdir()?;
    let w = recording_worker(&set, &ns, dir.path(), &replicas.to_string())?;
    const N: usize = 5000;
    let acked_file = dir.path().join("acked.tsv");
    let ports: Vec<String> = set
        .sentinel_ports()
        .iter()
        .map(ToString::to_string)
        .collect();
    let args: Vec<String> = vec![
        ports.join(","),
        taskstack_integration::sentinel::DATA_PASSWORD.to_owned(),
        "mymaster".to_owned(),
        SENTINEL_PASSWORD.to_owned(),
        N.to_string(),
        acked_file.display().to_string(),
    ];
    let client = {
        let python = python.clone();
        tokio::spawn(async move {
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            taskstack_integration::python::run_client(
                &python,
                "send_through_failover.py",
                &args,
                String::new,
            )
            .await
        })
    };

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
    let promoted_wall = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)?
        .as_secs_f64();
    assert_ne!(old, new);
    if replicas > 0 {
        // The worker's writes wait for a replica: bring the old master
        // back as the new master's replica.
        set.restart_node(old, new)?;
    }

    let seen = client.await?.with_context(|| w.log())?;
    let text = std::fs::read_to_string(&acked_file)?;
    let sent: Vec<(String, f64)> = text
        .lines()
        .map(|l| {
            let (id, at) = l.split_once('\t').context("id<TAB>time")?;
            Ok((id.to_owned(), at.parse()?))
        })
        .collect::<Result<_>>()?;
    let acked: HashSet<&str> = sent.iter().map(|(id, _)| id.as_str()).collect();
    let runs = wait_runs(dir.path(), &acked, &w).await?;

    let lost: Vec<&(String, f64)> = sent
        .iter()
        .filter(|(id, _)| !runs.contains_key(id))
        .collect();
    let duplicated = runs.values().filter(|n| **n > 1).count();
    let extra_runs: usize = runs.values().map(|n| n.saturating_sub(1)).sum();
    let lost_after_promotion = lost.iter().filter(|(_, at)| *at > promoted_wall).count();
    let send_errors = seen["send_errors"].as_u64().context("send_errors")?;
    println!(
        "celery client through a sentinel failover (worker redis_min_replicas_acked = {replicas}): \
         {} acknowledged by Celery, {} lost, {duplicated} duplicated ({extra_runs} extra runs), \
         {send_errors} failed sends resent; failover took {:.1} s; {lost_after_promotion} lost \
         among those acknowledged after the promotion; client took {} s",
        sent.len(),
        lost.len(),
        failover.as_secs_f64(),
        seen["seconds"],
    );
    assert_eq!(sent.len(), N, "{seen}");
    assert!(
        send_errors > 0,
        "no send failed: the kill did not happen mid-run, the test proved nothing"
    );
    let master_now = set.master_port()?;
    if lost_after_promotion > 0 || master_now != new {
        let ids: Vec<&str> = lost.iter().map(|(id, _)| id.as_str()).collect();
        eprintln!(
            "master {old} failed over to {new}, now {master_now}; {lost_after_promotion} lost \
             after the promotion; where the master has them: {:?}\nsyncs, role changes and \
             sentinel events:\n{}",
            locate(&set, &ids)?,
            set.log_lines(&FAILOVER_EVENTS),
        );
    }
    if master_now == new {
        assert_eq!(
            lost_after_promotion,
            0,
            "tasks Celery enqueued on the new master were lost\n{}",
            w.log()
        );
    } else {
        // The sentinels failed the promoted master over again
        // (docs/operations.md, "Redis Sentinel": reproduced under load, a
        // sentinel judged the promoted master down within
        // down-after-milliseconds of the switch). The node kept taking
        // Celery's writes as a master until the sentinels demoted it, and
        // its resync from the new master wiped them: Celery's enqueue does
        // not WAIT. That is the sentinels' decision only on a down
        // judgment of the promoted master: the events must show one.
        let judged = format!("+sdown master mymaster 127.0.0.1 {new}");
        let events = set.log_lines(&["+sdown master"]);
        assert!(
            events.contains(&judged),
            "the master moved from {new} to {master_now} without a sentinel judging {new} \
             down:\n{events}"
        );
        eprintln!(
            "SECOND FAILOVER: a sentinel judged the promoted master down ({judged}) and the \
             sentinels moved the master to {master_now}; {lost_after_promotion} tasks Celery \
             enqueued on {new} after the promotion were lost with it"
        );
    }
    assert!(
        runs.keys().all(|id| acked.contains(id.as_str())),
        "a task ran that nobody sent"
    );
    Ok(())
}

/// What the data nodes and sentinels log about syncs and role changes.
const FAILOVER_EVENTS: [&str; 14] = [
    "+sdown",
    "+new-epoch",
    "MASTER <-> REPLICA",
    "Flushing old data",
    "Connecting to MASTER",
    "MASTER MODE",
    "REPLICAOF",
    "Setting secondary replication ID",
    "+switch-master",
    "+convert-to-slave",
    "+failover-state",
    "-failover-abort",
    "+promoted-slave",
    "+odown",
];

/// For the ids given, the keys of the current master whose lists or hashes
/// mention them, and the string keys (results) named after them, with how
/// many ids each holds (a failure's diagnosis).
fn locate(set: &SentinelSet, ids: &[&str]) -> Result<Vec<(String, usize)>> {
    let mut con = set.master_conn()?;
    let keys: Vec<String> = redis::cmd("KEYS").arg("*").query(&mut con)?;
    let mut out = Vec::new();
    let mut strings = Vec::new();
    for k in keys {
        let kind: String = redis::cmd("TYPE").arg(&k).query(&mut con)?;
        let items: Vec<String> = match kind.as_str() {
            "list" => redis::cmd("LRANGE")
                .arg(&k)
                .arg(0)
                .arg(-1)
                .query(&mut con)?,
            "hash" => redis::cmd("HVALS").arg(&k).query(&mut con)?,
            "zset" => redis::cmd("ZRANGE")
                .arg(&k)
                .arg(0)
                .arg(-1)
                .query(&mut con)?,
            "string" => {
                if ids.iter().any(|id| k.contains(*id)) {
                    strings.push(k);
                }
                continue;
            }
            _ => continue,
        };
        let n = ids
            .iter()
            .filter(|id| items.iter().any(|v| v.contains(*id)))
            .count();
        if n > 0 {
            out.push((k, n));
        }
    }
    if let Some(first) = strings.first() {
        let value: String = redis::cmd("GET").arg(first).query(&mut con)?;
        let sample: String = value.chars().take(200).collect();
        out.push((
            format!("string keys named after them, the first {first} = {sample}"),
            strings.len(),
        ));
    }
    Ok(out)
}
