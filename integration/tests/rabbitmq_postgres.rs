//! RabbitMQ with PostgreSQL results and no Redis at all (issue 15): real
//! `taskstack-worker`, `taskstack-web` and `taskstack-beat` processes on a
//! vhost of the shared RabbitMQ node and a private `postgres`. Every
//! process is also given a Redis URL on a port nothing listens on, so a
//! use of Redis anywhere would fail the test.
//!
//! Needs `cargo build -p taskstack-worker -p taskstack-web -p
//! taskstack-beat` first.

use anyhow::{Context as _, Result, ensure};
use nix::sys::signal::Signal;
use serde_json::json;
use std::time::Duration;
use taskstack::{Producer, SendOptions, TaskRequest};
use taskstack_integration::rabbitmq_server::{self as rabbit, vhost_of};
use taskstack_integration::{
    BeatProcess, PG_PASSWORD, PgServer, WebProcess, WorkerProcess, free_port, namespace,
    wait_until, wait_until_sync,
};

struct Stack {
    amqp: String,
    pg: PgServer,
    db: String,
    ns: String,
    /// A Redis URL nothing answers at.
    no_redis: String,
}

impl Stack {
    fn new(hint: &str) -> Result<Self> {
        let pg = PgServer::start();
        let db = pg.create_database();
        Ok(Self {
            amqp: rabbit::shared().vhost(hint),
            pg,
            db,
            ns: namespace(hint),
            no_redis: format!("redis://127.0.0.1:{}/0", free_port()?),
        })
    }

    fn env(&self) -> Vec<(&'static str, String)> {
        vec![
            ("TASKSTACK_BROKER_URL", self.amqp.clone()),
            ("TASKSTACK_RESULT_BACKEND", self.pg.url(&self.db)),
            ("TASKSTACK_RESULT_BACKEND_PASSWORD", PG_PASSWORD.to_owned()),
        ]
    }

    /// A worker with a short lease (heartbeats, so held counts, every
    /// second) and concurrency 2.
    /// The same settings for a producer or reader in this process.
    fn config(&self) -> taskstack::config::Config {
        taskstack::config::Config {
            broker_url: self.amqp.as_str().into(),
            result_backend: Some(self.pg.url(&self.db).as_str().into()),
            result_backend_password: Some(PG_PASSWORD.into()),
            namespace: self.ns.clone(),
            ..Default::default()
        }
    }

    fn worker(&self) -> Result<WorkerProcess> {
        let mut env = self.env();
        env.push(("TASKSTACK_LEASE", "3s".to_owned()));
        env.push(("TASKSTACK_CONCURRENCY", "2".to_owned()));
        let w = WorkerProcess::spawn(&self.no_redis, &self.ns, &refs(&env))?;
        w.wait_log("worker ready", Duration::from_secs(60))
            .with_context(|| w.log())?;
        Ok(w)
    }

    fn psql(&self, sql: &str) -> Result<String> {
        Ok(self
            .pg
            .psql(&self.db, sql)
            .map_err(anyhow::Error::msg)?
            .trim()
            .to_owned())
    }

    /// Results rows that are SUCCESS.
    fn successes(&self) -> Result<usize> {
        Ok(self
            .psql("SELECT count(*) FROM taskstack_results WHERE state = 'SUCCESS'")?
            .parse()?)
    }

    /// `(ready, unacknowledged)` over every queue of the vhost.
    fn rabbit_counts(&self) -> (u64, u64) {
        rabbit::shared()
            .queue_counts(vhost_of(&self.amqp))
            .into_iter()
            .fold((0, 0), |(r, u), (_, r2, u2)| (r + r2, u + u2))
    }
}

fn refs<'a>(env: &'a [(&'static str, String)]) -> Vec<(&'static str, &'a str)> {
    env.iter().map(|(k, v)| (*k, v.as_str())).collect()
}

async fn post(web: &WebProcess, body: serde_json::Value) -> Result<String> {
    let (s, v) = web.call("POST", "/api/v1/tasks", Some(&body)).await?;
    ensure!(s == 202, "enqueue: {s} {v}");
    Ok(v["id"].as_str().context("no id")?.to_owned())
}

/// Two workers and the web API: results, revocation, a second delivery of
/// a finished task, dead letters and in-flight counts, workers' records,
/// `/health` and the workers' healthcheck, all without Redis; then one
/// worker SIGKILLed mid-run loses none of its tasks.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn workers_and_web_on_rabbitmq_and_postgresql_need_no_redis() -> Result<()> {
    let s = Stack::new("pg-stack")?;
    let env = s.env();
    let w1 = s.worker()?;
    let mut w2 = s.worker()?;
    let web = WebProcess::spawn(&s.no_redis, &s.ns, &refs(&env)).await?;
    let logs = || format!("w1:\n{}\nw2:\n{}\nweb:\n{}", w1.log(), w2.log(), web.log());

    let (status, health) = wait_until("/health to pass", Duration::from_secs(60), || async {
        let (status, v) = web.call("GET", "/health", None).await?;
        Ok((status == 200).then_some((status, v)))
    })
    .await
    .with_context(logs)?;
    assert_eq!(status, 200, "{health}");
    for store in ["rabbitmq", "postgresql"] {
        assert_eq!(health["checks"][store]["ok"], true, "{health}");
    }
    assert!(health["checks"].get("redis").is_none(), "{health}");
    // RabbitMQ's consumer count per queue: one per worker, in the API and
    // as a metric.
    wait_until(
        "two consumers on celery",
        Duration::from_secs(30),
        || async {
            let (_, q) = web.call("GET", "/api/v1/queues", None).await?;
            let celery = q["queues"]
                .as_array()
                .and_then(|a| a.iter().find(|x| x["name"] == "celery"))
                .cloned()
                .unwrap_or_default();
            Ok((celery["consumers"] == 2).then_some(()))
        },
    )
    .await
    .with_context(logs)?;
    let (code, metrics) =
        taskstack_integration::http::request_text(&web.addr, "GET", "/metrics", None, None).await?;
    assert_eq!(code, 200);
    assert!(
        metrics.contains(r#"taskstack_queue_consumers{queue="celery"} 2"#),
        "{metrics}"
    );
    assert!(
        !metrics.contains(r#"state="delayed""#),
        "no per-queue delayed count on RabbitMQ: {metrics}"
    );

    let id = post(&web, json!({"task": "taskstack.add", "args": [40, 2]})).await?;
    let done = web.wait_state(&id, "SUCCESS").await.with_context(logs)?;
    assert_eq!(done["result"], 42, "{done}");
    assert_eq!(
        s.psql(&format!(
            "SELECT state || '|' || result || '|' || task_name FROM taskstack_results \
             WHERE task_id = '{id}'"
        ))?,
        "SUCCESS|42|taskstack.add"
    );

    // Revoked while it waits in RabbitMQ's delay levels: when due, a worker
    // takes it, finds the row revoked and acknowledges it unrun.
    let later = post(
        &web,
        json!({"task": "taskstack.add", "args": [1, 1], "countdown": 2}),
    )
    .await?;
    // RabbitMQ's delay levels are shared by every queue: no per-queue
    // count (null, not 0), the total as the list's `delayed.parked`.
    let (_, q) = web.call("GET", "/api/v1/queues", None).await?;
    let celery = q["queues"]
        .as_array()
        .and_then(|a| a.iter().find(|x| x["name"] == "celery"))
        .with_context(|| format!("no queue celery: {q}"))?;
    assert!(celery["delayed"].is_null(), "{q}");
    assert!(q["delayed"]["parked"].is_u64(), "{q}");
    let (code, v) = web
        .call("DELETE", &format!("/api/v1/tasks/{later}"), None)
        .await?;
    assert_eq!(code, 200, "{v}");
    let skipped = "task was revoked before it started; skipping it";
    wait_until_sync(
        "the revoked task to be skipped",
        Duration::from_secs(60),
        || (w1.log().contains(skipped) || w2.log().contains(skipped)).then_some(()),
    )
    .with_context(logs)?;
    web.wait_state(&later, "REVOKED").await?;
    let (code, v) = web
        .call("DELETE", &format!("/api/v1/tasks/{id}"), None)
        .await?;
    assert_eq!(code, 409, "a finished task is not revoked: {v}");

    // The workers' records and the healthcheck read PostgreSQL.
    let (_, workers) = web.call("GET", "/api/v1/workers", None).await?;
    let listed = workers["workers"]
        .as_array()
        .or_else(|| workers.as_array())
        .map_or(0, Vec::len);
    assert_eq!(listed, 2, "{workers}");
    assert_eq!(
        s.psql("SELECT count(*) FROM taskstack_workers WHERE expires_at > now()")?,
        "2"
    );
    let out = WorkerProcess::command(&s.no_redis, &s.ns, &w1.state_file)?
        .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
        .arg("healthcheck")
        .output()?;
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("alive"));

    // What the workers hold shows as in flight while they run it.
    let sleeps: Vec<String> = {
        let mut ids = Vec::new();
        for i in 0..8 {
            ids.push(post(&web, json!({"task": "taskstack.sleep", "args": [2.0, i]})).await?);
        }
        ids
    };
    wait_until("in-flight counts", Duration::from_secs(30), || async {
        let (_, q) = web.call("GET", "/api/v1/queues", None).await?;
        let held = q["queues"]
            .as_array()
            .and_then(|a| a.iter().find(|x| x["name"] == "celery"))
            .and_then(|c| c["in_flight"].as_u64())
            .unwrap_or(0);
        Ok((held > 0).then_some(()))
    })
    .await
    .with_context(logs)?;
    // One worker dies mid-run: RabbitMQ gives its messages to the other.
    w2.signal(Signal::SIGKILL)?;
    for id in &sleeps {
        web.wait_state(id, "SUCCESS").await.with_context(logs)?;
    }
    wait_until_sync(
        "every message acknowledged",
        Duration::from_secs(30),
        || (s.rabbit_counts() == (0, 0)).then_some(()),
    )?;
    w2.wait_exit(Duration::from_secs(5))?;
    Ok(())
}

/// PostgreSQL stopped and started again while two workers drain sleeping
/// tasks from RabbitMQ: the workers keep retrying their STARTED and result
/// writes, acknowledge nothing that was not stored, and once PostgreSQL is
/// back every task ends SUCCESS, RabbitMQ ends empty and both workers
/// still run.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgresql_restarted_under_load_loses_no_task_from_rabbitmq() -> Result<()> {
    const N: usize = 1500;
    let mut s = Stack::new("pg-restart")?;
    let mut w1 = s.worker()?;
    let mut w2 = s.worker()?;
    let producer = Producer::on_backend(taskstack::open_backend(&s.config())?, "pg-restart");
    let reqs: Vec<TaskRequest> = (0..N)
        .map(|i| TaskRequest {
            name: "taskstack.sleep".into(),
            args: vec![json!(0.01), json!(i)],
            kwargs: serde_json::Map::new(),
            options: SendOptions::default(),
        })
        .collect();
    for chunk in reqs.chunks(500) {
        producer.send_many(chunk).await?;
    }
    wait_until("some results", Duration::from_secs(60), || async {
        Ok((s.successes()? >= 100).then_some(()))
    })
    .await
    .with_context(|| format!("w1:\n{}\nw2:\n{}", w1.log(), w2.log()))?;
    s.pg.stop();
    ensure!(
        s.successes().is_err(),
        "psql answered with the server stopped"
    );
    wait_until_sync("a worker to retry", Duration::from_secs(30), || {
        (w1.log().contains("failed; retrying") || w2.log().contains("failed; retrying"))
            .then_some(())
    })
    .with_context(|| format!("w1:\n{}\nw2:\n{}", w1.log(), w2.log()))?;
    s.pg.start_again();
    wait_until(
        "every task to be SUCCESS",
        Duration::from_secs(180),
        || async { Ok((s.successes()? == N).then_some(())) },
    )
    .await
    .with_context(|| format!("w1:\n{}\nw2:\n{}", w1.log(), w2.log()))?;
    assert_eq!(
        s.psql("SELECT count(*) FROM taskstack_results WHERE state <> 'SUCCESS'")?,
        "0"
    );
    wait_until_sync(
        "every message acknowledged",
        Duration::from_secs(30),
        || (s.rabbit_counts() == (0, 0)).then_some(()),
    )?;
    for w in [&mut w1, &mut w2] {
        ensure!(
            w.wait_exit(Duration::from_millis(300)).is_err(),
            "a worker exited: {}",
            w.log()
        );
    }
    Ok(())
}

/// A real Python Celery client (`broker="amqp://..."`, no result backend,
/// so no PENDING rows) sends 600 tasks to two taskstack workers on
/// RabbitMQ with PostgreSQL results; one worker is SIGKILLed mid-run.
/// Every task's row ends SUCCESS (created by the worker's STARTED upsert)
/// and RabbitMQ ends empty.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_python_celery_clients_tasks_survive_a_killed_worker_with_postgresql_results()
-> Result<()> {
    use taskstack_integration::python::{celery_python, run_client};
    const N: usize = 600;
    let python = tokio::task::spawn_blocking(celery_python).await??;
    let s = Stack::new("pg-pyclient")?;
    let mut doomed = s.worker()?;
    let survivor = s.worker()?;
    let dir = tempfile::tempdir()?;
    let ids_file = dir.path().join("ids");
    let ids_arg = ids_file.display().to_string();
    let n = N.to_string();
    let args = [s.amqp.as_str(), n.as_str(), "0.02", ids_arg.as_str()];
    let client = run_client(&python, "send_sleeps.py", &args, || survivor.log());
    let kill = async {
        wait_until("50 results", Duration::from_secs(120), || async {
            Ok((s.successes()? >= 50).then_some(()))
        })
        .await?;
        doomed.kill()?;
        anyhow::Ok(())
    };
    let (sent, killed) = tokio::join!(client, kill);
    let (sent, ()) = (sent?, killed?);
    assert_eq!(sent["sent"], N, "{sent}");
    let ids: Vec<String> = std::fs::read_to_string(&ids_file)?
        .lines()
        .map(str::to_owned)
        .collect();
    assert_eq!(ids.len(), N);
    wait_until("every task SUCCESS", Duration::from_secs(120), || async {
        Ok((s.successes()? == N).then_some(()))
    })
    .await
    .with_context(|| survivor.log())?;
    // Exactly the client's ids, each once.
    let listed =
        s.psql("SELECT string_agg(task_id, ',' ORDER BY task_id) FROM taskstack_results")?;
    let mut sorted = ids.clone();
    sorted.sort();
    assert_eq!(listed, sorted.join(","));
    wait_until_sync(
        "every message acknowledged",
        Duration::from_secs(30),
        || (s.rabbit_counts() == (0, 0)).then_some(()),
    )?;
    Ok(())
}

/// Two workers and two beats on one host with the host defaults (a state
/// file per process in /tmp, metrics on 9101 / 9102 or a free port), on
/// RabbitMQ with PostgreSQL results: the healthchecks, run as the image
/// runs them (no state file named), find every process alive in
/// PostgreSQL, one beat leading and one standing by.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn several_workers_and_beats_share_a_host_with_default_settings() -> Result<()> {
    use taskstack_integration::run_to_exit;
    const WAIT: Duration = Duration::from_secs(60);
    let s = Stack::new("pg-one-host")?;
    let env = s.env();
    let workers = [
        WorkerProcess::spawn_with_host_defaults(&s.no_redis, &s.ns, &refs(&env))?,
        WorkerProcess::spawn_with_host_defaults(&s.no_redis, &s.ns, &refs(&env))?,
    ];
    for w in &workers {
        w.wait_log("worker ready", WAIT).with_context(|| w.log())?;
    }
    let beats = [
        BeatProcess::spawn_with_host_defaults(&s.no_redis, &s.ns, "", &refs(&env))?,
        BeatProcess::spawn_with_host_defaults(&s.no_redis, &s.ns, "", &refs(&env))?,
    ];
    for b in &beats {
        b.wait_log("beat ready", WAIT).with_context(|| b.log())?;
    }
    let healthcheck = |bin: &str| -> Result<std::process::Command> {
        let mut check = std::process::Command::new(taskstack_integration::bin(bin)?);
        for (k, _) in std::env::vars().filter(|(k, _)| k.starts_with("TASKSTACK_")) {
            check.env_remove(k);
        }
        check
            .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
            .env("TASKSTACK_NAMESPACE", &s.ns)
            .arg("healthcheck");
        Ok(check)
    };
    let out = wait_until("both workers alive", WAIT, || async {
        let out = run_to_exit(healthcheck("taskstack-worker")?, WAIT)?;
        let said = String::from_utf8_lossy(&out.stdout).into_owned();
        Ok((out.status.success() && said.matches("alive").count() == 2).then_some(said))
    })
    .await
    .with_context(|| format!("{}\n{}", workers[0].log(), workers[1].log()))?;
    assert_eq!(out.matches("alive").count(), 2, "{out}");
    let said = wait_until("both beats healthy", WAIT, || async {
        let out = run_to_exit(healthcheck("taskstack-beat")?, WAIT)?;
        Ok(out
            .status
            .success()
            .then(|| String::from_utf8_lossy(&out.stdout).into_owned()))
    })
    .await
    .with_context(|| format!("{}\n{}", beats[0].log(), beats[1].log()))?;
    assert!(
        said.contains("leader: ") && said.contains("standby "),
        "the healthcheck covers both beats: {said}"
    );
    // Each worker serves its own metrics port (at least one fell back).
    let fell_back = workers
        .iter()
        .filter(|w| w.log().contains("is taken"))
        .count();
    assert!(fell_back >= 1, "{}\n{}", workers[0].log(), workers[1].log());
    assert_eq!(
        s.psql("SELECT count(*) FROM taskstack_workers WHERE expires_at > now()")?,
        "2"
    );
    Ok(())
}

/// Dead letters on RabbitMQ with PostgreSQL records through the web API: a
/// task no worker knows is dead-lettered (its row FAILURE `NotRegistered`),
/// listed, requeued (the row PENDING again, the message back on RabbitMQ,
/// taken and dead-lettered again since it is still unknown: a new record),
/// then discarded; nothing is left in RabbitMQ or in the dead letters.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_letters_are_listed_requeued_and_discarded_through_the_web_api() -> Result<()> {
    let s = Stack::new("pg-dead")?;
    let env = s.env();
    let w = s.worker()?;
    let web = WebProcess::spawn(&s.no_redis, &s.ns, &refs(&env)).await?;
    let logs = || format!("worker:\n{}\nweb:\n{}", w.log(), web.log());
    let producer = Producer::on_backend(taskstack::open_backend(&s.config())?, "pg-dead");
    let id = producer
        .send(&TaskRequest {
            name: "tests.nobody.knows".into(),
            args: vec![json!(1)],
            kwargs: serde_json::Map::new(),
            options: SendOptions::default(),
        })
        .await?;
    let row = |s: &Stack| -> Result<String> {
        s.psql(&format!(
            "SELECT state || '|' || coalesce(error->>'exc_type', '') FROM taskstack_results \
             WHERE task_id = '{id}'"
        ))
    };
    let first = wait_until("a dead letter", Duration::from_secs(60), || async {
        let (_, v) = web.call("GET", "/api/v1/dead-letters/celery", None).await?;
        Ok((v["total"] == 1).then_some(v))
    })
    .await
    .with_context(logs)?;
    let record = &first["dead_letters"][0];
    assert_eq!(record["task_id"], json!(id), "{first}");
    assert_eq!(row(&s)?, "FAILURE|NotRegistered");

    let (code, v) = web
        .call(
            "POST",
            "/api/v1/dead-letters/celery/requeue",
            Some(&json!({"task_ids": [id]})),
        )
        .await?;
    assert_eq!((code, v["count"].clone()), (200, json!(1)), "{v}");
    // Taken again and, still unknown, dead-lettered again: a new record.
    let again = wait_until(
        "the second dead letter",
        Duration::from_secs(60),
        || async {
            let (_, v) = web.call("GET", "/api/v1/dead-letters/celery", None).await?;
            Ok((v["total"] == 1 && v["dead_letters"][0]["at"] != record["at"]).then_some(v))
        },
    )
    .await
    .with_context(logs)?;
    assert_eq!(again["dead_letters"][0]["task_id"], json!(id), "{again}");
    assert_eq!(row(&s)?, "FAILURE|NotRegistered");

    let (code, v) = web
        .call(
            "POST",
            "/api/v1/dead-letters/celery/discard",
            Some(&json!({"oldest": 10})),
        )
        .await?;
    assert_eq!((code, v["count"].clone()), (200, json!(1)), "{v}");
    let (_, v) = web.call("GET", "/api/v1/dead-letters/celery", None).await?;
    assert_eq!(v["total"], 0, "{v}");
    wait_until_sync("RabbitMQ empty", Duration::from_secs(30), || {
        (s.rabbit_counts() == (0, 0)).then_some(())
    })?;
    Ok(())
}

/// Two beats on RabbitMQ and PostgreSQL: one leads; the leader SIGKILLed,
/// the standby takes over once the lock's TTL passed; both answer their
/// healthcheck from PostgreSQL. The proof is the queue itself: every
/// message published is read back from RabbitMQ and counted by its
/// `beat_slot` header, and no slot was published twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn beats_on_rabbitmq_and_postgresql_publish_each_slot_once() -> Result<()> {
    let s = Stack::new("pg-beat")?;
    let env = s.env();
    let toml = "beat_lock_ttl = \"3s\"\n\
                [[schedule]]\nname = \"tick\"\ntask = \"taskstack.add\"\nevery = \"1s\"\n\
                args = [1, 2]\n";
    let mut beats = [
        BeatProcess::spawn(&s.no_redis, &s.ns, toml, &refs(&env))?,
        BeatProcess::spawn(&s.no_redis, &s.ns, toml, &refs(&env))?,
    ];
    let logs = || format!("a:\n{}\nb:\n{}", beats[0].log(), beats[1].log());
    let queued = || s.rabbit_counts().0;
    wait_until_sync("three slots published", Duration::from_secs(60), || {
        (queued() >= 3).then_some(())
    })
    .with_context(logs)?;
    let health = |beat: &BeatProcess| -> Result<String> {
        let out = beat.healthcheck_with(&refs(&env))?;
        let said = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        ensure!(out.status.success(), "beat healthcheck failed: {said}");
        Ok(said)
    };
    let verdicts = [health(&beats[0])?, health(&beats[1])?];
    let lead = verdicts
        .iter()
        .position(|v| v.contains("healthy: leader"))
        .with_context(|| format!("no leader: {verdicts:?}"))?;
    assert!(
        verdicts[1 - lead].contains("healthy: standby"),
        "{verdicts:?}"
    );
    let before = queued();
    beats[lead].signal(Signal::SIGKILL)?;
    wait_until_sync("the standby to take over", Duration::from_secs(60), || {
        (queued() >= before + 3).then_some(())
    })
    .with_context(logs)?;
    assert!(
        health(&beats[1 - lead])?.contains("healthy: leader"),
        "the standby leads now"
    );
    beats[1 - lead].signal(Signal::SIGTERM)?;
    for b in &mut beats {
        b.wait_exit(Duration::from_secs(30))?;
    }
    assert_eq!(s.psql("SELECT count(*) FROM taskstack_beat_outbox")?, "0");

    // Read every message back from RabbitMQ.
    let backend = taskstack::open_backend(&s.config())?;
    let mut reader = backend.consume("reader");
    let total = queued();
    let keys = ["celery".to_owned()];
    let mut slots = Vec::new();
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while (slots.len() as u64) < total && std::time::Instant::now() < deadline {
        for d in reader
            .take(&keys, 100, Duration::from_secs(60), usize::MAX)
            .await?
        {
            let text = d.text().context("not text")?;
            let (entry, slot) = taskstack::beat::publish::beat_headers(text)
                .context("beat_entry / beat_slot headers")?;
            assert_eq!(entry, "tick");
            slots.push(slot);
        }
        reader
            .wait_for_message(&keys, Duration::from_millis(200))
            .await?;
    }
    assert_eq!(slots.len() as u64, total, "every message read back");
    let mut distinct = slots.clone();
    distinct.sort();
    distinct.dedup();
    assert_eq!(
        distinct.len(),
        slots.len(),
        "a slot was published twice: {slots:?}"
    );
    Ok(())
}

/// Chains, chords, links and a failing chord through the web API on
/// RabbitMQ with PostgreSQL results: the follow-ups' sent markers and the
/// chord counters live in PostgreSQL.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_canvas_runs_on_rabbitmq_and_postgresql() -> Result<()> {
    let s = Stack::new("pg-canvas")?;
    let env = s.env();
    let worker = s.worker()?;
    let web = WebProcess::spawn(&s.no_redis, &s.ns, &refs(&env)).await?;
    let logs = || format!("worker:\n{}\nweb:\n{}", worker.log(), web.log());
    let workflow = |body: serde_json::Value| {
        let web = &web;
        async move {
            let (code, v) = web.call("POST", "/api/v1/workflows", Some(&body)).await?;
            ensure!(code == 202, "workflow: {code} {v}");
            Ok::<_, anyhow::Error>(v)
        }
    };
    let chain = workflow(json!({"chain": [
        {"task": "taskstack.add", "args": [2, 2]},
        {"task": "taskstack.add", "args": [4]},
        {"task": "taskstack.echo", "args": ["end"], "immutable": true},
    ]}))
    .await?;
    let ids: Vec<String> = serde_json::from_value(chain["task_ids"].clone())?;
    let second = web
        .wait_state(&ids[1], "SUCCESS")
        .await
        .with_context(logs)?;
    assert_eq!(second["result"], 8, "{second}");
    let end = web
        .wait_state(&ids[2], "SUCCESS")
        .await
        .with_context(logs)?;
    assert_eq!(
        end["result"],
        json!({"args": ["end"], "kwargs": {}}),
        "{end}"
    );

    let header: Vec<_> = (0..4)
        .map(|i| json!({"task": "taskstack.add", "args": [i, i]}))
        .collect();
    let chord =
        workflow(json!({"chord": {"header": header, "body": {"task": "taskstack.echo"}}})).await?;
    let body_id = chord["result_id"].as_str().context("result_id")?.to_owned();
    let done = web
        .wait_state(&body_id, "SUCCESS")
        .await
        .with_context(logs)?;
    assert_eq!(
        done["result"],
        json!({"args": [[0, 2, 4, 6]], "kwargs": {}}),
        "{done}"
    );

    let failing = workflow(json!({"chord": {
        "header": [
            {"task": "taskstack.add", "args": [1, 1]},
            {"task": "taskstack.fail", "args": ["boom"]},
        ],
        "body": {"task": "taskstack.echo"},
    }}))
    .await?;
    let body_id = failing["result_id"]
        .as_str()
        .context("result_id")?
        .to_owned();
    let failed = web
        .wait_state(&body_id, "FAILURE")
        .await
        .with_context(logs)?;
    assert!(failed.to_string().contains("ChordError"), "{failed}");

    // A link, from a producer in this process.
    let p = Producer::on_backend(taskstack::open_backend(&s.config())?, "test@localhost");
    let echo = TaskRequest {
        name: "taskstack.echo".into(),
        args: Vec::new(),
        kwargs: serde_json::Map::new(),
        options: SendOptions {
            task_id: Some("linked-echo".into()),
            ..SendOptions::default()
        },
    };
    let add = TaskRequest {
        name: "taskstack.add".into(),
        args: vec![json!(20), json!(22)],
        kwargs: serde_json::Map::new(),
        options: SendOptions {
            link: vec![echo],
            ..SendOptions::default()
        },
    };
    let id = p.send(&add).await?;
    let r = p
        .wait(&id, Duration::from_secs(60))
        .await
        .with_context(logs)?;
    assert_eq!(r.result, json!(42));
    let r = p
        .wait("linked-echo", Duration::from_secs(60))
        .await
        .with_context(logs)?;
    assert_eq!(r.result, json!({"args": [42], "kwargs": {}}), "{r:?}");
    // The sent markers are there; the completed chord cleaned up its
    // parts (a failed one's stay until they expire, as on Redis).
    let markers: u64 = s
        .psql("SELECT count(*) FROM taskstack_canvas_sent")?
        .parse()?;
    assert!(markers >= 4, "{markers} sent markers");
    let group = chord["group_id"].as_str().context("group_id")?;
    let parts = format!("SELECT count(*) FROM taskstack_chord_parts WHERE group_id = '{group}'");
    assert_eq!(s.psql(&parts)?, "0");
    assert_eq!(s.rabbit_counts(), (0, 0), "everything acknowledged");
    Ok(())
}
