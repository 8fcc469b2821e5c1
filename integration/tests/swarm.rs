//! compose/swarm.yml on a single-node Docker Swarm made by the test on the
//! local engine (`docker swarm init --advertise-addr 127.0.0.1`, left
//! again at the end, with the `docker_gwbridge` network it made, only when
//! the test made it): `docker stack deploy`
//! converges to a healthy stack (`stackctl verify --swarm` passes); a
//! rolling update of the worker image while 5,000 tasks flow loses none;
//! a worker container's process killed mid-batch is replaced by the Swarm
//! and every task of the batch completes; the workers scale to 4, each a
//! live worker. The images are the tests' own (`localhost/...:test`),
//! never pulled (`--resolve-image never`, `--no-resolve-image`).
//!
//! The Swarm is one per engine, so the tests serialize on a file lock.
//! This machine's kernel has no IPVS, so the stack runs with
//! ENDPOINT_MODE=dnsrr and WEB_PUBLISH_MODE=host (the shipped defaults,
//! vip and ingress, need IPVS; a virtual IP answers "no route to host"
//! without it).

use anyhow::{Context as _, Result, bail, ensure};
use nix::fcntl::{Flock, FlockArg};
use serde_json::{Value, json};
use std::collections::BTreeSet;
use std::process::Command;
use std::sync::Mutex;
use std::time::{Duration, Instant};
use taskstack_integration::docker::{
    containers_labelled, crash_main_process, docker, images, init_secrets, unique, workspace_root,
};
use taskstack_integration::http::request as http_json;
use taskstack_integration::{Prereq, free_port, require, wait_until};

const STACK_LABEL: &str = stackctl::verify::swarm::STACK_LABEL;

/// `docker <args>` with `env`; its output, or an error with it.
fn docker_cli(args: &[&str], env: &[(&str, String)]) -> Result<String> {
    let mut cmd = Command::new("docker");
    cmd.args(args);
    for (k, _) in std::env::vars() {
        if taskstack_integration::docker::is_compose_setting(&k)
            || matches!(k.as_str(), "ENDPOINT_MODE" | "BEAT_REPLICAS")
        {
            cmd.env_remove(k);
        }
    }
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = cmd.output().context("cannot run docker (the CLI)")?;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    ensure!(
        out.status.success(),
        "docker {} failed ({}): {text}",
        args.join(" "),
        out.status
    );
    Ok(text)
}

/// This engine in a single-node Swarm for the test's lifetime: the lock
/// is held (other Swarm tests wait), and the Swarm is left on drop only if
/// this guard made it.
struct SwarmNode {
    created: bool,
    /// Whether `swarm init` made the engine's `docker_gwbridge` network
    /// (it outlives `swarm leave`, so the guard removes it).
    made_gwbridge: bool,
    _lock: Flock<std::fs::File>,
}

/// The network `docker swarm init` creates for the services' containers.
const GWBRIDGE: &str = "docker_gwbridge";

fn network_exists(name: &str) -> Result<bool> {
    let names = docker_cli(&["network", "ls", "--format", "{{.Name}}"], &[])?;
    Ok(names.lines().any(|n| n.trim() == name))
}

impl SwarmNode {
    fn join() -> Result<Self> {
        let path = std::env::temp_dir().join("taskstack-swarm-tests.lock");
        let lock = Flock::lock(std::fs::File::create(&path)?, FlockArg::LockExclusive)
            .map_err(|(_, e)| e)
            .with_context(|| format!("cannot lock {}", path.display()))?;
        let state = docker_cli(&["info", "--format", "{{.Swarm.LocalNodeState}}"], &[])?;
        let had_gwbridge = network_exists(GWBRIDGE)?;
        let created = match state.trim() {
            "active" => false,
            "inactive" => {
                docker_cli(&["swarm", "init", "--advertise-addr", "127.0.0.1"], &[])?;
                true
            }
            s => bail!("this engine's Swarm state is `{s}`; expected active or inactive"),
        };
        Ok(Self {
            created,
            made_gwbridge: created && !had_gwbridge,
            _lock: lock,
        })
    }
}

impl Drop for SwarmNode {
    fn drop(&mut self) {
        if !self.created {
            return;
        }
        if let Err(e) = docker_cli(&["swarm", "leave", "--force"], &[]) {
            eprintln!("leaving the test's Swarm: {e:#}");
            return;
        }
        if self.made_gwbridge {
            // The ingress sandbox may still be leaving the network for a
            // moment after `swarm leave`.
            let deadline = Instant::now() + Duration::from_secs(15);
            loop {
                match docker_cli(&["network", "rm", GWBRIDGE], &[]) {
                    Ok(_) => break,
                    Err(_) if Instant::now() < deadline => {
                        std::thread::sleep(Duration::from_millis(200));
                    }
                    Err(e) => {
                        eprintln!("removing the Swarm's {GWBRIDGE} network: {e:#}");
                        break;
                    }
                }
            }
        }
    }
}

/// A stack deployed from compose/swarm.yml with the test images; on drop
/// `docker stack rm`, then its volume once its containers are gone.
struct Stack {
    name: String,
    env: Vec<(&'static str, String)>,
    token: String,
    web: String,
    _secrets: tempfile::TempDir,
}

impl Stack {
    async fn deploy(workers: u32) -> Result<Self> {
        let report = images()?;
        let redis = report.redis_image.clone().context("no Redis image")?;
        let secrets = init_secrets()?;
        let token = std::fs::read_to_string(secrets.path().join("api_token"))?
            .trim()
            .to_owned();
        let port = free_port()?;
        let stack = Self {
            name: unique("swarm").replace('-', ""),
            env: vec![
                ("TASKSTACK_IMAGE", report.app_image.clone()),
                ("REDIS_IMAGE", redis),
                (
                    "TASKSTACK_SECRETS_DIR",
                    secrets.path().display().to_string(),
                ),
                ("WEB_PORT", port.to_string()),
                ("WEB_PUBLISH_MODE", "host".into()),
                ("ENDPOINT_MODE", "dnsrr".into()),
                // One web: a host-mode port is one task per node.
                ("WEB_REPLICAS", "1".into()),
                ("WORKER_REPLICAS", workers.to_string()),
                ("WORKER_CONCURRENCY", "16".into()),
                ("WORKER_LEASE", "4s".into()),
                ("WORKER_DRAIN_TIMEOUT", "5s".into()),
                ("HEALTHCHECK_INTERVAL", "1s".into()),
            ],
            token,
            web: format!("127.0.0.1:{port}"),
            _secrets: secrets,
        };
        let file = workspace_root()?.join("compose/swarm.yml");
        docker_cli(
            &[
                "stack",
                "deploy",
                "--resolve-image",
                "never",
                "-c",
                &file.display().to_string(),
                &stack.name,
            ],
            &stack.env,
        )?;
        Ok(stack)
    }

    fn service(&self, svc: &str) -> String {
        format!("{}_{svc}", self.name)
    }

    /// `stackctl verify --swarm` with the web checks.
    async fn verify(&self) -> Result<stackctl::verify::VerifyReport> {
        let opts = stackctl::verify::swarm::SwarmVerifyOptions {
            stack: self.name.clone(),
            web: Some(self.web.clone()),
            api_token_file: Some(self._secrets.path().join("api_token")),
            smoke_timeout: Duration::from_secs(10),
        };
        Ok(stackctl::verify::swarm::verify(&docker().await?, &opts).await?)
    }

    /// Waits until every check passes; the time it took.
    async fn converge(&self, deadline: Duration) -> Result<Duration> {
        let start = Instant::now();
        let last = Mutex::new(String::new());
        let waited = wait_until("the stack to converge", deadline, || {
            let last = &last;
            async move {
                let r = self.verify().await?;
                *last.lock().expect("not poisoned") = r.render();
                Ok(r.ok.then_some(()))
            }
        })
        .await;
        if let Err(e) = waited {
            bail!(
                "{e:#}\n{}\n{}",
                last.lock().expect("not poisoned"),
                docker_cli(&["stack", "ps", "--no-trunc", &self.name], &[]).unwrap_or_default()
            );
        }
        Ok(start.elapsed())
    }

    /// Running containers of service `svc` (id, name).
    async fn containers(&self, svc: &str) -> Result<Vec<(String, String)>> {
        let docker = docker().await?;
        let mut out = Vec::new();
        for (id, name) in containers_labelled(
            &docker,
            &format!("com.docker.swarm.service.name={}", self.service(svc)),
        )
        .await?
        {
            // The Swarm removes the containers of old tasks: one listed a
            // moment ago may be gone.
            match docker.inspect_container(&id, None).await {
                Ok(c) if c.state.as_ref().and_then(|s| s.running).unwrap_or(false) => {
                    out.push((id, name));
                }
                Ok(_)
                | Err(testcontainers::bollard::errors::Error::DockerResponseServerError {
                    status_code: 404,
                    ..
                }) => {}
                Err(e) => return Err(e.into()),
            }
        }
        Ok(out)
    }

    /// Enqueues `tasks` through the web API in batches of 1,000 at most;
    /// their ids.
    async fn send(&self, tasks: &[Value]) -> Result<Vec<String>> {
        let mut ids = Vec::new();
        for chunk in tasks.chunks(1000) {
            let body = json!({ "tasks": chunk });
            let (status, reply) = http_json(
                &self.web,
                "POST",
                "/api/v1/tasks/batch",
                Some(&self.token),
                Some(&body),
            )
            .await?;
            ensure!(status == 202, "POST /api/v1/tasks/batch: {status} {reply}");
            for t in reply["tasks"].as_array().context("no tasks in the reply")? {
                ids.push(t["id"].as_str().context("no id")?.to_owned());
            }
        }
        Ok(ids)
    }

    /// How many of `ids` succeeded; a FAILURE or REVOKED fails at once.
    async fn succeeded(&self, ids: &[String]) -> Result<usize> {
        let mut set = tokio::task::JoinSet::new();
        for part in ids.chunks(ids.len().div_ceil(16).max(1)) {
            let (web, token, part) = (self.web.clone(), self.token.clone(), part.to_vec());
            set.spawn(async move {
                let mut n = 0;
                for id in part {
                    let path = format!("/api/v1/tasks/{id}");
                    let (status, reply) = http_json(&web, "GET", &path, Some(&token), None).await?;
                    ensure!(status == 200, "GET {path}: {status} {reply}");
                    match reply["state"].as_str() {
                        Some("SUCCESS") => n += 1,
                        Some("FAILURE" | "REVOKED") => bail!("task {id} ended badly: {reply}"),
                        _ => {}
                    }
                }
                anyhow::Ok(n)
            });
        }
        let mut n = 0;
        while let Some(r) = set.join_next().await {
            n += r??;
        }
        Ok(n)
    }

    /// Waits until all of `ids` succeeded.
    async fn all_succeed(&self, ids: &[String], deadline: Duration) -> Result<()> {
        let done = Mutex::new(0);
        let r = wait_until(&format!("{} tasks to succeed", ids.len()), deadline, || {
            let done = &done;
            async move {
                let n = self.succeeded(ids).await?;
                *done.lock().expect("not poisoned") = n;
                Ok((n == ids.len()).then_some(()))
            }
        })
        .await;
        r.with_context(|| {
            format!(
                "{} of {} succeeded",
                done.lock().expect("not poisoned"),
                ids.len()
            )
        })
    }

    /// The update state of service `svc` (`completed`, `updating`, ...).
    async fn update_state(&self, svc: &str) -> Result<Option<String>> {
        let s = docker()
            .await?
            .inspect_service(&self.service(svc), None)
            .await?;
        Ok(s.update_status.and_then(|u| u.state).map(|s| s.to_string()))
    }
}

impl Drop for Stack {
    fn drop(&mut self) {
        if let Err(e) = docker_cli(&["stack", "rm", &self.name], &[]) {
            eprintln!("docker stack rm {}: {e:#}", self.name);
            return;
        }
        // The containers and networks go in the background; the volume
        // can go once no container holds it.
        let label = format!("{STACK_LABEL}={}", self.name);
        let gone = taskstack_integration::wait_until_sync(
            "the stack's containers and networks to go",
            Duration::from_secs(90),
            || {
                let ps = docker_cli(&["ps", "-aq", "--filter", &format!("label={label}")], &[]);
                let nets = docker_cli(
                    &["network", "ls", "-q", "--filter", &format!("label={label}")],
                    &[],
                );
                match (ps, nets) {
                    (Ok(p), Ok(n)) if p.trim().is_empty() && n.trim().is_empty() => Some(()),
                    _ => None,
                }
            },
        );
        if let Err(e) = gone {
            eprintln!("{e:#}");
        }
        let volume = format!("{}_redis-data", self.name);
        if let Err(e) = docker_cli(&["volume", "rm", &volume], &[]) {
            eprintln!("docker volume rm {volume}: {e:#}");
        }
    }
}

/// The stack converges healthy (every `verify --swarm` check passes); the
/// worker service is updated to the same image under a new tag (a real
/// rolling update: new tasks, stop-first, one at a time) while 5,000
/// tasks flow through the web API, and every one of them succeeds.
#[tokio::test(flavor = "multi_thread")]
async fn stack_converges_and_a_rolling_worker_update_loses_no_task() -> Result<()> {
    require(Prereq::Program {
        name: "docker",
        package: "docker.io",
    });
    let report = images()?;
    let _node = SwarmNode::join()?;
    let started = Instant::now();
    let stack = Stack::deploy(2).await?;
    let took = stack.converge(Duration::from_secs(180)).await?;
    eprintln!("swarm: converged healthy in {took:?} (deploy to every check passing)");
    let report_text = stack.verify().await?.render();
    eprintln!("{report_text}");

    // The same image under a new tag: the service spec changes, so the
    // Swarm replaces every worker task.
    let (repo, _) = taskstack_integration::docker::split_image(&report.app_image);
    let new_image = format!("{repo}:{}", stack.name);
    docker_cli(&["tag", &report.app_image, &new_image], &[])?;
    struct Untag(String);
    impl Drop for Untag {
        fn drop(&mut self) {
            let _ = docker_cli(&["rmi", &self.0], &[]);
        }
    }
    let _untag = Untag(new_image.clone());
    let old_workers: BTreeSet<String> = stack
        .containers("worker")
        .await?
        .into_iter()
        .map(|(id, _)| id)
        .collect();

    // 5,000 tasks in 50 batches of 100 while the update runs.
    // 20 ms each: some are always running when a worker is told to stop.
    let tasks: Vec<Value> = (0..5000)
        .map(|_| json!({"task": "taskstack.sleep", "args": [0.02]}))
        .collect();
    let mut ids = stack.send(&tasks[..500]).await?;
    let update_start = Instant::now();
    docker_cli(
        &[
            "service",
            "update",
            "--detach",
            "--no-resolve-image",
            "--image",
            &new_image,
            &stack.service("worker"),
        ],
        &[],
    )?;
    for chunk in tasks[500..].chunks(100) {
        ids.extend(stack.send(chunk).await?);
        // Paced so that the flow spans the update.
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    wait_until(
        "the worker update to complete",
        Duration::from_secs(180),
        || async {
            Ok(match stack.update_state("worker").await?.as_deref() {
                Some("completed") => Some(()),
                Some(s @ ("paused" | "rollback_started" | "rollback_completed")) => {
                    bail!("the worker update ended `{s}`")
                }
                _ => None,
            })
        },
    )
    .await?;
    let update_took = update_start.elapsed();
    stack
        .all_succeed(&ids, Duration::from_secs(120))
        .await
        .context("tasks lost in the rolling update")?;
    eprintln!(
        "swarm: worker update (2 replicas, stop-first) took {update_took:?}; {} of {} tasks \
         succeeded, 0 lost ({:?} since deploy)",
        ids.len(),
        ids.len(),
        started.elapsed()
    );
    let new_workers = stack.containers("worker").await?;
    ensure!(
        new_workers.len() == 2,
        "two workers expected: {new_workers:?}"
    );
    for (id, name) in &new_workers {
        ensure!(!old_workers.contains(id), "{name} was not replaced");
        let c = docker().await?.inspect_container(id, None).await?;
        let image = c.config.and_then(|c| c.image).unwrap_or_default();
        ensure!(image.starts_with(&new_image), "{name} runs {image}");
    }
    let report = stack.verify().await?;
    ensure!(report.ok, "{}", report.render());
    Ok(())
}

/// A worker container's process is SIGKILLed mid-batch: the Swarm starts
/// a new task in its place and every task of the batch completes (the
/// dead worker's return after its lease). Then the workers scale to 4,
/// each a live worker (its heartbeat read through the web API).
#[tokio::test(flavor = "multi_thread")]
async fn a_killed_worker_is_replaced_and_workers_scale_to_four() -> Result<()> {
    // SIGKILLing a container's process from the host needs root.
    require(Prereq::Root);
    require(Prereq::Program {
        name: "docker",
        package: "docker.io",
    });
    images()?;
    let _node = SwarmNode::join()?;
    let stack = Stack::deploy(2).await?;
    stack.converge(Duration::from_secs(180)).await?;

    // 2 workers × 16 slots, 200 tasks of 0.5 s: about 3 s of work.
    let batch: Vec<Value> = (0..200)
        .map(|_| json!({"task": "taskstack.sleep", "args": [0.5]}))
        .collect();
    let ids = stack.send(&batch).await?;
    wait_until("the first tasks to finish", Duration::from_secs(30), || {
        let (stack, ids) = (&stack, &ids);
        async move { Ok((stack.succeeded(ids).await? > 0).then_some(())) }
    })
    .await?;
    let workers = stack.containers("worker").await?;
    let (victim, victim_name) = workers.first().context("no worker container")?.clone();
    let done = stack.succeeded(&ids).await?;
    ensure!(
        done < ids.len(),
        "the batch ended before the kill; make it longer"
    );
    let killed = Instant::now();
    crash_main_process(&docker().await?, &victim).await?;
    eprintln!(
        "swarm: killed the process of {victim_name}; {done} of {} done",
        ids.len()
    );
    // The Swarm replaces it: two running workers again, the victim not
    // among them.
    wait_until(
        "the Swarm to replace the killed worker",
        Duration::from_secs(90),
        || async {
            let now = stack.containers("worker").await?;
            Ok((now.len() == 2 && now.iter().all(|(id, _)| *id != victim)).then_some(()))
        },
    )
    .await?;
    eprintln!("swarm: replaced in {:?}", killed.elapsed());
    stack.all_succeed(&ids, Duration::from_secs(90)).await?;
    eprintln!(
        "swarm: all {} tasks succeeded, 0 lost ({:?} after the kill)",
        ids.len(),
        killed.elapsed()
    );

    // Scale to 4: four running workers, each with a live heartbeat.
    let scaled = Instant::now();
    docker_cli(
        &[
            "service",
            "scale",
            "--detach",
            &format!("{}=4", stack.service("worker")),
        ],
        &[],
    )?;
    let last = Mutex::new(Value::Null);
    wait_until("4 live workers", Duration::from_secs(120), || {
        let last = &last;
        let stack = &stack;
        async move {
            let running = stack.containers("worker").await?;
            if running.len() != 4 {
                return Ok(None);
            }
            let (status, reply) = http_json(
                &stack.web,
                "GET",
                "/api/v1/workers",
                Some(&stack.token),
                None,
            )
            .await?;
            ensure!(status == 200, "GET /api/v1/workers: {status} {reply}");
            let hosts: BTreeSet<String> = reply["workers"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|w| w["host"].as_str().map(str::to_owned))
                .collect();
            *last.lock().expect("not poisoned") = reply;
            Ok(running
                .iter()
                .all(|(id, _)| {
                    hosts
                        .iter()
                        .any(|h| id.starts_with(h.as_str()) && h.len() >= 12)
                })
                .then_some(()))
        }
    })
    .await
    .with_context(|| {
        format!(
            "last /api/v1/workers: {}",
            last.lock().expect("not poisoned")
        )
    })?;
    eprintln!(
        "swarm: 4 live workers {:?} after `service scale`",
        scaled.elapsed()
    );
    // And the Swarm counts them healthy (its task state follows the
    // healthcheck, a little after the first heartbeat).
    stack.converge(Duration::from_secs(60)).await?;
    eprintln!(
        "swarm: 4/4 worker tasks running and healthy {:?} after `service scale`",
        scaled.elapsed()
    );
    let report = stack.verify().await?;
    ensure!(
        report
            .check("service.worker")
            .is_some_and(|c| c.reason.starts_with("4/4")),
        "{}",
        report.render()
    );
    Ok(())
}
