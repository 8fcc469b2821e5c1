//! The compose profile `ha` as a user runs it: `stackctl up --profile ha`
//! (its own project name and secrets directory, the Redis image built
//! offline by `stackctl build`'s code) brings up the master `redis`, the
//! replica `redis-replica` and three sentinels, and web, worker and beat
//! reach the master through the sentinels. `stackctl verify` passes with
//! the Sentinel checks (`ha.sentinels`: the three name one master and can
//! fail it over; `ha.replica`: a replica in sync).
//!
//! Then the master's container is stopped: the sentinels promote the
//! replica; a task enqueued through the web API after the promotion
//! succeeds, and a result written before it is still there. The old
//! master is started again: it asks the sentinels, comes back as a replica
//! of the promoted node (authenticating with the Redis password) and
//! `verify` passes again with `redis-replica` as the master.
//! `stackctl down -v` leaves nothing behind (also run on failure, by a
//! drop guard).

use anyhow::{Context as _, Result, ensure};
use serde_json::Value;
use stackctl::engine::Engine as _;
use stackctl::engine::live::Live;
use std::time::Duration;
use taskstack_integration::docker::{
    StackctlDown, images, leftovers, output_text, run_stackctl, unique,
};
use taskstack_integration::http::request;
use taskstack_integration::{free_port, wait_until};

fn stackctl(args: &[&str], env: &[(&str, String)]) -> Result<std::process::Output> {
    run_stackctl(env!("CARGO_BIN_EXE_stackctl"), args, env)
}

/// `stackctl verify --profile ha --json`: whether it passed, its checks,
/// and its output for messages.
fn verify(project: &str, env: &[(&str, String)]) -> Result<(bool, Vec<Value>, String)> {
    let out = stackctl(&["verify", "--profile", "ha", "-p", project, "--json"], env)?;
    let text = output_text(&out);
    let report: Value =
        serde_json::from_slice(&out.stdout).with_context(|| format!("verify --json: {text}"))?;
    let checks = report["checks"].as_array().context("no checks")?.clone();
    Ok((out.status.success(), checks, text))
}

fn check<'a>(checks: &'a [Value], id: &str) -> Result<&'a Value> {
    checks
        .iter()
        .find(|c| c["id"] == id)
        .with_context(|| format!("no check {id}: {checks:?}"))
}

/// Enqueues `taskstack.add` through the web API and waits for its result.
/// A `503` (the web's pooled connection to the old master broke under the
/// enqueue) is retried, as a client does (at least once: had the old
/// master taken the first, the task runs twice); each is printed.
async fn add(addr: &str, token: &str, a: i64, b: i64) -> Result<String> {
    let body = serde_json::json!({"task": "taskstack.add", "args": [a, b]});
    let body = &body;
    let reply = wait_until(
        "POST /api/v1/tasks",
        Duration::from_secs(30),
        || async move {
            let (status, reply) =
                request(addr, "POST", "/api/v1/tasks", Some(token), Some(body)).await?;
            if status == 503 {
                eprintln!("POST /api/v1/tasks: 503 {reply} (retried)");
                return Ok(None);
            }
            ensure!(status == 202, "POST /api/v1/tasks: {status} {reply}");
            Ok(Some(reply))
        },
    )
    .await?;
    let id = reply["id"].as_str().context("no task id")?.to_owned();
    let done = result(addr, token, &id, Duration::from_secs(60)).await?;
    ensure!(
        done["state"] == "SUCCESS" && done["result"] == a + b,
        "{done}"
    );
    Ok(id)
}

/// The task's record once it is SUCCESS or FAILURE.
async fn result(addr: &str, token: &str, id: &str, deadline: Duration) -> Result<Value> {
    let path = format!("/api/v1/tasks/{id}");
    let path = path.as_str();
    wait_until(&format!("task {id} to finish"), deadline, || async move {
        let (status, reply) = request(addr, "GET", path, Some(token), None).await?;
        ensure!(
            status == 200 || status == 404,
            "GET {path}: {status} {reply}"
        );
        Ok(matches!(reply["state"].as_str(), Some("SUCCESS" | "FAILURE")).then_some(reply))
    })
    .await
}

/// The master's address a sentinel names, asked with redis-cli in its
/// container.
async fn named_master(engine: &Live, sentinel_id: &str, password: &str) -> Result<String> {
    let cmd = [
        "redis-cli",
        "--no-auth-warning",
        "--raw",
        "-p",
        "26379",
        "SENTINEL",
        "get-master-addr-by-name",
        stackctl::ha::MASTER_NAME,
    ]
    .map(String::from);
    let out = engine
        .exec(sentinel_id, &cmd, &[format!("REDISCLI_AUTH={password}")])
        .await?;
    Ok(out.stdout.lines().next().unwrap_or_default().to_owned())
}

#[tokio::test(flavor = "multi_thread")]
async fn the_ha_profile_fails_over_to_the_replica_and_the_old_master_rejoins() -> Result<()> {
    let report = images()?;
    let redis_image = report.redis_image.clone().context("no Redis image")?;
    let docker = stackctl::docker::connect().await?;
    let secrets = tempfile::tempdir()?;
    let port = free_port()?;
    let env = vec![
        (
            "TASKSTACK_SECRETS_DIR",
            secrets.path().display().to_string(),
        ),
        ("WEB_PORT", port.to_string()),
        ("HEALTHCHECK_INTERVAL", "1s".to_owned()),
        ("TASKSTACK_IMAGE", report.app_image.clone()),
        ("REDIS_IMAGE", redis_image),
        // Down after 2 s instead of 5: the failover below comes sooner.
        ("SENTINEL_DOWN_AFTER_MS", "2000".to_owned()),
    ];
    let project = unique("haprofile").replace('-', "");
    let down = StackctlDown {
        exe: env!("CARGO_BIN_EXE_stackctl"),
        project: project.clone(),
        env: env.clone(),
        images: Vec::new(),
    };

    let up = stackctl(
        &["up", "--profile", "ha", "-p", &project, "--timeout", "240"],
        &env,
    )?;
    let text = output_text(&up);
    ensure!(up.status.success(), "stackctl up --profile ha: {text}");
    ensure!(
        text.contains("profile ha: Redis master `taskstack` through three sentinels"),
        "{text}"
    );

    // The sentinels learn the replica from the master's INFO (every 10 s).
    let (project_ref, env_ref) = (project.as_str(), env.as_slice());
    let checks = wait_until(
        "verify to pass (the sentinels knowing the replica)",
        Duration::from_secs(60),
        || async move {
            let (passed, checks, text) = verify(project_ref, env_ref)?;
            let unaware = text.contains("knows no replica it could promote");
            ensure!(passed || unaware, "stackctl verify: {text}");
            Ok(passed.then_some(checks))
        },
    )
    .await?;
    for id in [
        "ha.sentinels",
        "ha.replica",
        "smoke.add",
        "workers.heartbeat",
        "beat.lock",
    ] {
        let c = check(&checks, id)?;
        ensure!(c["ok"] == true, "{c}");
    }
    let sentinels = check(&checks, "ha.sentinels")?["reason"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    ensure!(
        sentinels.starts_with("3 of 3 sentinels name redis (")
            && sentinels.contains(":6379) the master of taskstack"),
        "{sentinels}"
    );

    let token = std::fs::read_to_string(secrets.path().join("api_token"))?;
    let token = token.trim();
    let password = std::fs::read_to_string(secrets.path().join("redis_password"))?;
    let password = password.trim();
    let addr = format!("127.0.0.1:{port}");
    let before = add(&addr, token, 20, 22).await?;

    let engine = Live::connect().await?;
    let listed = engine
        .list_containers(&format!("com.docker.compose.project={project}"))
        .await?;
    let of = |service: &str| {
        listed
            .iter()
            .find(|c| c.label("com.docker.compose.service") == Some(service))
            .map(|c| c.id.clone())
            .with_context(|| format!("no {service} container"))
    };
    let (master, replica, sentinel) = (of("redis")?, of("redis-replica")?, of("sentinel-2")?);
    let replica_ip = engine
        .reach(&replica, 6379)
        .await?
        .context("the replica has no address")?;
    let replica_ip = replica_ip.rsplit_once(':').map(|(ip, _)| ip.to_owned());
    ensure!(
        named_master(&engine, &sentinel, password).await? != replica_ip.clone().unwrap_or_default(),
        "the replica is the master before the failover"
    );

    // The master goes away: the sentinels promote the replica.
    let stopped = std::time::Instant::now();
    engine
        .stop_container(&master, Some(Duration::from_secs(10)))
        .await?;
    let (e, s, want) = (&engine, sentinel.as_str(), replica_ip.unwrap_or_default());
    let want = want.as_str();
    wait_until(
        "the sentinels to promote redis-replica",
        Duration::from_secs(90),
        || async move { Ok((named_master(e, s, password).await? == want).then_some(())) },
    )
    .await?;
    // Web and worker follow the new master: a new task succeeds, and the
    // result written before the failover is there.
    let promoted = stopped.elapsed();
    add(&addr, token, 1000, 337).await?;
    eprintln!(
        "FAILOVER master stopped -> replica promoted {:.1} s, -> a new task's result {:.1} s",
        promoted.as_secs_f64(),
        stopped.elapsed().as_secs_f64()
    );
    let old = result(&addr, token, &before, Duration::from_secs(10)).await?;
    ensure!(old["state"] == "SUCCESS" && old["result"] == 42, "{old}");

    // The old master comes back as a replica of the promoted node.
    engine.start_container(&master).await?;
    let checks = wait_until(
        "verify to pass with redis-replica the master",
        Duration::from_secs(120),
        || async move {
            let (passed, checks, _) = verify(project_ref, env_ref)?;
            Ok(passed.then_some(checks))
        },
    )
    .await?;
    let sentinels = check(&checks, "ha.sentinels")?["reason"]
        .as_str()
        .unwrap_or_default();
    ensure!(
        sentinels.starts_with("3 of 3 sentinels name redis-replica ("),
        "{sentinels}"
    );
    let replica = check(&checks, "ha.replica")?["reason"]
        .as_str()
        .unwrap_or_default();
    ensure!(
        replica.contains("redis (") && replica.contains("online"),
        "{replica}"
    );
    let logs = stackctl::engine::last_log_lines(&engine, &master, 50).await;
    ensure!(
        logs.iter()
            .any(|l| l.contains("node.sh: redis starts as a replica of")),
        "the old master did not ask the sentinels: {logs:?}"
    );

    drop(down);
    let left = leftovers(&docker, &format!("com.docker.compose.project={project}")).await?;
    ensure!(left.is_empty(), "left after down -v: {left:?}");
    Ok(())
}
