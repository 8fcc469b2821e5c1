//! The real images on a real Docker engine: the Redis image under the
//! library's broker, the whole stack on one user-defined network
//! (testcontainers), the compose file with docker-compose (all healthy, a
//! worker killed mid-batch, `down -v` leaves nothing) and a bad
//! configuration that must show as unhealthy with the reason in the log.
//!
//! The images are built once per test process by `stackctl`'s own code
//! (`taskstack_integration::docker::images`), from this profile's binaries,
//! tagged `localhost/...:test`: nothing is ever pulled. Every test names its
//! containers, networks and compose project uniquely and removes them on
//! drop, so the tests run in parallel and clean up after a failure.

use anyhow::{Context as _, Result, bail, ensure};
use serde_json::{Value, json};
use std::collections::HashMap;
use std::time::{Duration, Instant};
use taskstack::proto::TaskState;
use taskstack::worker::{Registry, builtin};
use taskstack_integration::docker::{
    ComposeProject, container_ip, containers_labelled, docker, health, health_outputs, images,
    leftovers, split_image, unique, workspace_root,
};
use taskstack_integration::http::request as http_json;
use taskstack_integration::{
    InProcessWorker, Prereq, free_port, namespace, producer, require, settings, wait_until,
};
use testcontainers::bollard::models::HealthStatusEnum;
use testcontainers::core::{Healthcheck, WaitFor};
use testcontainers::runners::AsyncRunner as _;
use testcontainers::{ContainerAsync, ContainerRequest, GenericImage, ImageExt as _};

const WAIT: Duration = Duration::from_secs(30);
/// Label on every container the testcontainers tests start.
const TEST_LABEL: &str = "io.taskstack.test";

fn builtins() -> Registry {
    let mut r = Registry::new();
    builtin::register(&mut r);
    r
}

/// A Redis container from the test images, requiring `password`, on
/// `network` under `name` when given.
async fn start_redis(
    password: &str,
    network: Option<(&str, &str)>,
    label: &str,
) -> Result<ContainerAsync<GenericImage>> {
    let report = images()?;
    let image = report.redis_image.context("no Redis image was built")?;
    let (repo, tag) = split_image(&image);
    // No --protected-mode flag: with a password it does not apply. The
    // same command works for the official image (its entrypoint runs it).
    let mut req = GenericImage::new(repo, tag)
        .with_wait_for(WaitFor::message_on_stdout("Ready to accept connections"))
        .with_cmd([
            "redis-server",
            "--requirepass",
            password,
            "--appendonly",
            "no",
            "--save",
            "",
        ])
        .with_label(TEST_LABEL, label)
        .with_startup_timeout(Duration::from_secs(60));
    if let Some((net, name)) = network {
        req = req.with_network(net).with_container_name(name);
    }
    Ok(req.start().await?)
}

/// `binary` of the app image as a service container on `network`, with an
/// exec-form healthcheck through its `healthcheck` subcommand, hardened
/// like the compose file (init, no capabilities, no-new-privileges).
fn app_service(
    binary: &str,
    network: &str,
    name: &str,
    label: &str,
    env: &[(&str, &str)],
) -> Result<ContainerRequest<GenericImage>> {
    let report = images()?;
    let (repo, tag) = split_image(&report.app_image);
    let path = format!("/{binary}");
    let mut req = GenericImage::new(repo, tag)
        .with_network(network)
        .with_container_name(name)
        .with_cmd([path.clone()])
        .with_label(TEST_LABEL, label)
        .with_health_check(
            Healthcheck::cmd([path, "healthcheck".into()])
                .with_interval(Duration::from_millis(500))
                .with_timeout(Duration::from_secs(5))
                .with_retries(3),
        )
        .with_cap_drop("ALL")
        .with_security_opt("no-new-privileges:true")
        .with_host_config_modifier(|hc| hc.init = Some(true))
        .with_env_var("TASKSTACK_LOG_FORMAT", "json")
        .with_startup_timeout(Duration::from_secs(60));
    for (k, v) in env {
        req = req.with_env_var(*k, *v);
    }
    Ok(req)
}

/// POST /api/v1/tasks through the web API; the task id.
async fn enqueue_via_web(addr: &str, token: &str, task: &str, args: Value) -> Result<String> {
    let body = json!({ "task": task, "args": args });
    let (status, reply) =
        http_json(addr, "POST", "/api/v1/tasks", Some(token), Some(&body)).await?;
    ensure!(status == 202, "POST /api/v1/tasks {body}: {status} {reply}");
    ensure!(reply["state"] == "PENDING", "POST /api/v1/tasks: {reply}");
    Ok(reply["id"]
        .as_str()
        .with_context(|| format!("no id in {reply}"))?
        .to_owned())
}

/// Waits until every task in `ids` succeeded (read through the web API,
/// polling with a deadline); their results, in order. A FAILURE fails at once.
async fn results_via_web(
    addr: &str,
    token: &str,
    ids: &[String],
    deadline: Duration,
) -> Result<Vec<Value>> {
    let start = Instant::now();
    let mut results: HashMap<&str, Value> = HashMap::new();
    while results.len() < ids.len() {
        for id in ids {
            if results.contains_key(id.as_str()) {
                continue;
            }
            let path = format!("/api/v1/tasks/{id}");
            let (status, reply) = http_json(addr, "GET", &path, Some(token), None).await?;
            ensure!(status == 200, "GET {path}: {status} {reply}");
            match reply["state"].as_str() {
                Some("SUCCESS") => {
                    results.insert(id, reply["result"].clone());
                }
                Some("FAILURE" | "REVOKED") => bail!("task {id} ended badly: {reply}"),
                _ => {}
            }
        }
        if results.len() < ids.len() {
            ensure!(
                start.elapsed() < deadline,
                "timed out after {deadline:?}: {} of {} tasks succeeded",
                results.len(),
                ids.len()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    Ok(ids.iter().map(|id| results[id.as_str()].clone()).collect())
}

/// How many of `ids` succeeded (read through the web API).
async fn succeeded(addr: &str, token: &str, ids: &[String]) -> Result<usize> {
    let mut n = 0;
    for id in ids {
        let (_, reply) = http_json(
            addr,
            "GET",
            &format!("/api/v1/tasks/{id}"),
            Some(token),
            None,
        )
        .await?;
        n += usize::from(reply["state"] == "SUCCESS");
    }
    Ok(n)
}

/// The "N processed" a worker container's `healthcheck` reports.
fn worker_processed(container: &str) -> Result<u64> {
    let out = std::process::Command::new("docker")
        .args(["exec", container, "/taskstack-worker", "healthcheck"])
        .output()?;
    let text = String::from_utf8_lossy(&out.stdout);
    text.split(" processed")
        .next()
        .and_then(|s| s.rsplit(' ').next())
        .and_then(|n| n.trim().parse().ok())
        .with_context(|| format!("no processed count in {text:?}"))
}

/// (a) The Redis image alone under the library's broker: an in-process
/// worker and producer against it, through the container's address (no
/// port is published).
#[tokio::test(flavor = "multi_thread")]
async fn redis_image_serves_the_broker() -> Result<()> {
    let password = unique("pw");
    let redis = start_redis(&password, None, &unique("redis")).await?;
    let ip = container_ip(&docker().await?, redis.id()).await?;

    // A password is required.
    let mut anon = redis::Client::open(format!("redis://{ip}:6379/0"))?.get_connection()?;
    let refused = redis::cmd("PING")
        .query::<String>(&mut anon)
        .expect_err("an unauthenticated PING must be refused");
    assert!(refused.to_string().contains("NOAUTH"), "{refused}");

    let url = format!("redis://:{password}@{ip}:6379/0");
    let ns = namespace("redis-image");
    let w = InProcessWorker::start(&url, &ns, builtins(), settings(&["celery"]))?;
    let p = producer(&url, &ns)?;
    let add = p.send_task(builtin::ADD, vec![json!(2), json!(3)]).await?;
    let r = p.wait(&add, WAIT).await?;
    assert_eq!((r.status, r.result), (TaskState::Success, json!(5)));
    assert_eq!(w.stop().await?.processed, 1);
    Ok(())
}

/// (b) The whole stack from the images on one user-defined network, found
/// by name through Docker's DNS: Redis with a password, worker, beat (with
/// a schedule) and, when the image holds it, web. A task enqueued through
/// web (or straight into Redis when web is not built yet) returns the
/// right result, and the beat's schedule reaches the worker.
#[tokio::test(flavor = "multi_thread")]
async fn stack_on_one_network_runs_tasks() -> Result<()> {
    let report = images()?;
    let label = unique("stack");
    let net = label.clone();
    let password = unique("pw");
    let token = unique("token");
    let redis = start_redis(&password, Some((&net, &format!("{net}-redis"))), &label).await?;
    let broker_url = format!("redis://{net}-redis:6379/0");
    let common = [
        ("TASKSTACK_BROKER_URL", broker_url.as_str()),
        ("TASKSTACK_BROKER_PASSWORD", password.as_str()),
    ];

    let _worker = app_service(
        "taskstack-worker",
        &net,
        &format!("{net}-worker"),
        &label,
        &common,
    )?
    .with_ready_conditions(vec![WaitFor::healthcheck()])
    .start()
    .await?;
    let beat_toml = "[[schedule]]\nname = \"tick\"\ntask = \"taskstack.add\"\nargs = [20, 22]\nevery = \"1s\"\n";
    let _beat = app_service(
        "taskstack-beat",
        &net,
        &format!("{net}-beat"),
        &label,
        &common,
    )?
    .with_env_var("TASKSTACK_CONFIG", "/etc/taskstack/taskstack.toml")
    .with_copy_to(
        "/etc/taskstack/taskstack.toml",
        beat_toml.as_bytes().to_vec(),
    )
    .with_ready_conditions(vec![WaitFor::healthcheck()])
    .start()
    .await?;

    let ip = container_ip(&docker().await?, redis.id()).await?;
    let url = format!("redis://:{password}@{ip}:6379/0");
    ensure!(
        report.has("taskstack-web"),
        "the app image lacks taskstack-web: {:?}",
        report.binaries
    );
    let tokens = token.clone();
    let web = app_service(
        "taskstack-web",
        &net,
        &format!("{net}-web"),
        &label,
        &common,
    )?
    .with_env_var("TASKSTACK_API_TOKENS", tokens)
    .with_env_var("TASKSTACK_WEB_EXPECT_BEAT", "true")
    .with_ready_conditions(vec![WaitFor::healthcheck()])
    .start()
    .await?;
    let addr = format!("{}:8000", container_ip(&docker().await?, web.id()).await?);
    let (status, _) = http_json(
        &addr,
        "POST",
        "/api/v1/tasks",
        None,
        Some(&json!({"task": "taskstack.add", "args": [1, 1]})),
    )
    .await?;
    assert_eq!(status, 401, "the API requires a token");
    let id = enqueue_via_web(&addr, &token, "taskstack.add", json!([2, 3])).await?;
    assert_eq!(
        results_via_web(&addr, &token, &[id], WAIT).await?,
        [json!(5)]
    );

    // The beat's schedule fired and the worker ran it: a result 42 exists.
    let mut c = redis::Client::open(url.as_str())?.get_connection()?;
    wait_until("a result of the beat's schedule (20 + 22)", WAIT, || {
        let keys: Vec<String> = redis::cmd("KEYS")
            .arg("celery-task-meta-*")
            .query(&mut c)
            .unwrap_or_default();
        let found = keys.iter().any(|k| {
            redis::cmd("GET")
                .arg(k)
                .query::<String>(&mut c)
                .ok()
                .and_then(|s| serde_json::from_str::<Value>(&s).ok())
                .is_some_and(|v| v["result"] == json!(42))
        });
        async move { Ok(found.then_some(())) }
    })
    .await?;
    // The containers (and the network) go when `_beat`, `_worker` and
    // `redis` drop, in that order.
    Ok(())
}

/// Waits until the project runs `expected` containers, each running and
/// healthy; on timeout the error names each container's health outputs.
async fn wait_all_healthy(project: &ComposeProject, expected: usize) -> Result<()> {
    let docker = docker().await?;
    let label = project.label();
    let result = wait_until(
        &format!("{expected} healthy containers in project {}", project.name),
        Duration::from_secs(120),
        || {
            let (docker, label) = (&docker, &label);
            async move {
                let list = containers_labelled(docker, label).await?;
                if list.len() != expected {
                    return Ok(None);
                }
                for (id, _) in &list {
                    let c = docker.inspect_container(id, None).await?;
                    let running = c.state.as_ref().and_then(|s| s.running) == Some(true);
                    if !running || health(&c) != Some(HealthStatusEnum::HEALTHY) {
                        return Ok(None);
                    }
                }
                Ok(Some(()))
            }
        },
    )
    .await;
    if let Err(e) = result {
        let mut report = String::new();
        for (id, name) in containers_labelled(&docker, &label).await? {
            let c = docker.inspect_container(&id, None).await?;
            report.push_str(&format!(
                "\n{name}: {:?} {:?}\n  {}",
                c.state.as_ref().and_then(|s| s.status),
                health(&c),
                health_outputs(&c).join("\n  ")
            ));
        }
        bail!("{e:#}{report}\n{}", project.logs());
    }
    Ok(())
}

/// (c) compose/docker-compose.yml with docker-compose and the test images:
/// all healthy; a task through web completes; a worker process killed in
/// the middle of a batch is restarted by the restart policy and every task
/// of the batch completes; `down -v` leaves nothing with the project label.
#[tokio::test(flavor = "multi_thread")]
async fn compose_stack_is_healthy_survives_a_killed_worker_and_cleans_up() -> Result<()> {
    // SIGKILLing a container's main process from the host needs root.
    require(Prereq::Root);
    let report = images()?;
    ensure!(
        report.has("taskstack-web"),
        "the app image lacks taskstack-web: {:?}",
        report.binaries
    );
    let redis_image = report.redis_image.clone().context("no Redis image")?;
    let secrets = tempfile::tempdir()?;
    let status = std::process::Command::new(workspace_root()?.join("compose/init-secrets"))
        .env("TASKSTACK_SECRETS_DIR", secrets.path())
        .stdout(std::process::Stdio::null())
        .status()?;
    ensure!(status.success(), "compose/init-secrets failed: {status}");
    let token = std::fs::read_to_string(secrets.path().join("api_token"))?;
    let port = free_port()?;
    let mut project = ComposeProject::new(
        &unique("compose").replace('-', ""),
        &[
            ("TASKSTACK_IMAGE", report.app_image.clone()),
            ("REDIS_IMAGE", redis_image),
            (
                "TASKSTACK_SECRETS_DIR",
                secrets.path().display().to_string(),
            ),
            ("WEB_PORT", port.to_string()),
            ("WORKER_REPLICAS", "2".into()),
            ("WORKER_CONCURRENCY", "4".into()),
            ("WORKER_LEASE", "4s".into()),
            ("HEALTHCHECK_INTERVAL", "1s".into()),
        ],
    )?;
    project.run(&["up", "-d"])?;
    // redis, web, beat and two workers.
    wait_all_healthy(&project, 5).await?;

    let addr = format!("127.0.0.1:{port}");
    let id = enqueue_via_web(&addr, &token, "taskstack.add", json!([2, 3])).await?;
    assert_eq!(
        results_via_web(&addr, &token, &[id], WAIT).await?,
        [json!(5)]
    );

    // A batch longer than the kill: 16 tasks of 1.5 s on 2 × 4 slots.
    let started = Instant::now();
    let mut batch = Vec::new();
    for _ in 0..16 {
        batch.push(enqueue_via_web(&addr, &token, "taskstack.sleep", json!([1.5])).await?);
    }
    let docker = docker().await?;
    let workers = containers_labelled(&docker, "com.docker.compose.service=worker")
        .await?
        .into_iter()
        .filter(|(_, name)| name.starts_with(&format!("{}_", project.name)))
        .collect::<Vec<_>>();
    ensure!(workers.len() == 2, "two workers expected: {workers:?}");
    // Mid-batch: once the first tasks finished, crash the worker that
    // ran the most (it holds the rest of what it took).
    wait_until("the first task of the batch to finish", WAIT, || {
        let (addr, token, batch) = (&addr, &token, &batch);
        async move { Ok((succeeded(addr, token, batch).await? > 0).then_some(())) }
    })
    .await?;
    let mut busiest = (0, workers[0].clone());
    for w in &workers {
        let n = worker_processed(&w.0)?;
        if n > busiest.0 {
            busiest = (n, w.clone());
        }
    }
    let (ran, (victim, victim_name)) = busiest;
    let done = succeeded(&addr, &token, &batch).await?;
    ensure!(
        done < batch.len(),
        "the batch ended before the crash; make it longer"
    );
    taskstack_integration::docker::crash_main_process(&docker, &victim).await?;
    eprintln!(
        "{:?}: crashed {victim_name} (it had run {ran}); {done} of {} tasks done",
        started.elapsed(),
        batch.len()
    );
    // The restart policy brings it back, healthy.
    wait_until(
        &format!("{victim_name} to be restarted and healthy"),
        Duration::from_secs(60),
        || {
            let (docker, victim) = (&docker, &victim);
            async move {
                let c = docker.inspect_container(victim, None).await?;
                Ok((c.restart_count.unwrap_or(0) >= 1
                    && health(&c) == Some(HealthStatusEnum::HEALTHY))
                .then_some(()))
            }
        },
    )
    .await?;
    eprintln!(
        "{:?}: {victim_name} restarted and healthy",
        started.elapsed()
    );
    // Every task of the batch completes: the killed worker's tasks come
    // back after its lease (4 s) lapses.
    let results = results_via_web(&addr, &token, &batch, Duration::from_secs(90))
        .await
        .with_context(|| project.logs())?;
    assert_eq!(results.len(), batch.len());
    eprintln!(
        "{:?}: all {} tasks succeeded",
        started.elapsed(),
        batch.len()
    );

    let label = project.label();
    project.down()?;
    let left = leftovers(&docker, &label).await?;
    assert!(left.is_empty(), "down -v left {left:?}");
    Ok(())
}

/// (d) A worker given the wrong Redis password does not restart silently:
/// it keeps running, turns unhealthy, and its log says why.
#[tokio::test(flavor = "multi_thread")]
async fn wrong_redis_password_shows_as_unhealthy_with_the_reason() -> Result<()> {
    let label = unique("badpw");
    let net = label.clone();
    let _redis = start_redis(
        "right-password",
        Some((&net, &format!("{net}-redis"))),
        &label,
    )
    .await?;
    let broker_url = format!("redis://{net}-redis:6379/0");
    let worker = app_service(
        "taskstack-worker",
        &net,
        &format!("{net}-worker"),
        &label,
        &[
            ("TASKSTACK_BROKER_URL", broker_url.as_str()),
            ("TASKSTACK_BROKER_PASSWORD", "wrong-password"),
        ],
    )?
    .start()
    .await?;
    let docker = docker().await?;
    let c = wait_until(
        "the worker to turn unhealthy",
        Duration::from_secs(60),
        || {
            let (docker, id) = (&docker, worker.id());
            async move {
                let c = docker.inspect_container(id, None).await?;
                Ok((health(&c) == Some(HealthStatusEnum::UNHEALTHY)).then_some(c))
            }
        },
    )
    .await?;
    let state = c.state.clone().context("no state")?;
    assert_eq!(state.running, Some(true), "it keeps running: {state:?}");
    assert_eq!(c.restart_count, Some(0), "no silent restarts");
    let outputs = health_outputs(&c).join("\n");
    assert!(
        outputs.contains("unhealthy"),
        "healthcheck output: {outputs}"
    );
    let log = String::from_utf8_lossy(&worker.stderr_to_vec().await?).into_owned()
        + &String::from_utf8_lossy(&worker.stdout_to_vec().await?);
    assert!(
        log.lines()
            .any(|l| l.to_ascii_lowercase().contains("authentication failed")),
        "the log must say the password is wrong:\n{log}"
    );
    assert!(
        log.contains("Redis refused the password; check broker_password"),
        "the log must say what to fix:\n{log}"
    );
    Ok(())
}
