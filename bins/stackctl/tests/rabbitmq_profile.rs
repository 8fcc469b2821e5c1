//! The compose profile `rabbitmq` as a user runs it: `stackctl up
//! --profile rabbitmq` (its own project name and secrets directory, the
//! RabbitMQ image built offline by `stackctl build --rabbitmq`'s code)
//! brings the `rabbitmq` service up healthy next to the stack, with its
//! password secret made by `up`, unpublished, non-root. `stackctl down -v`
//! leaves nothing behind (also run on failure, by a drop guard).
//!
//! - With the services on it (the profile's default): `broker_url` of web,
//!   worker and beat is the `rabbitmq` service (results on Redis), and
//!   `stackctl verify` passes every check, the RabbitMQ ones included (the
//!   smoke task goes web → RabbitMQ → worker → Redis; Celery's queue
//!   `celery` durable, a consumer per worker container).
//! - With the services kept on Redis (`BROKER_URL` set by the user, which
//!   the profile leaves alone): `verify` fails exactly `broker.kind`, saying
//!   that RabbitMQ runs while no service's broker is on it.
//! - With the profile `postgres` too: tasks through RabbitMQ, results in
//!   PostgreSQL, no Redis container at all, and `verify` passes reading the
//!   workers' records and the beat lock from PostgreSQL.

use anyhow::{Context as _, Result, ensure};
use serde_json::Value;
use stackctl::engine::Engine as _;
use stackctl::engine::live::Live;
use taskstack_integration::docker::{
    StackctlDown, TEST_TAG, images, leftovers, output_text, run_stackctl, unique,
};
use taskstack_integration::{Prereq, free_port, require};

/// One stack at a time: two, each with its RabbitMQ, starting together on
/// a 2-core machine left the web unhealthy after 20 s.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

fn stackctl(args: &[&str], env: &[(&str, String)]) -> Result<std::process::Output> {
    run_stackctl(env!("CARGO_BIN_EXE_stackctl"), args, env)
}

/// A stack up with the profile, its RabbitMQ container checked.
struct Up {
    env: Vec<(&'static str, String)>,
    /// `--profile` arguments of `up`, given to `verify` too.
    profiles: Vec<&'static str>,
    project: String,
    /// What `stackctl up` printed.
    text: String,
    docker: bollard::Docker,
    /// Runs `stackctl down -v` when dropped.
    down: StackctlDown,
    _secrets: tempfile::TempDir,
}

impl Up {
    /// `stackctl verify --profile rabbitmq --json` (and the other profiles
    /// of `up`): whether it passed, its checks, and its output for messages.
    fn verify(&self) -> Result<(bool, Vec<Value>, String)> {
        let mut args = vec!["verify"];
        for p in &self.profiles {
            args.extend(["--profile", p]);
        }
        args.extend(["-p", &self.project, "--json"]);
        let verify = stackctl(&args, &self.env)?;
        let text = output_text(&verify);
        let report: Value = serde_json::from_slice(&verify.stdout)
            .with_context(|| format!("verify --json: {text}"))?;
        let checks = report["checks"].as_array().context("no checks")?.clone();
        Ok((verify.status.success(), checks, text))
    }

    /// `down -v` and nothing of the project is left.
    async fn down(self) -> Result<()> {
        let Up {
            project,
            docker,
            down,
            ..
        } = self;
        drop(down);
        let left = leftovers(&docker, &format!("com.docker.compose.project={project}")).await?;
        ensure!(left.is_empty(), "left after down -v: {left:?}");
        Ok(())
    }
}

/// `stackctl up --profile rabbitmq` (and `--profile postgres` with
/// `postgres`) on a fresh project (`hint`) with `extra` in its
/// environment; checks the `rabbitmq` container: healthy, unpublished,
/// uid 999, the services' user with the password of the secret `up` made.
async fn up(hint: &str, postgres: bool, extra: &[(&'static str, &str)]) -> Result<Up> {
    require(Prereq::File {
        path: "/usr/lib/rabbitmq",
        package: "rabbitmq-server",
    });
    if postgres {
        require(Prereq::File {
            path: "/usr/lib/postgresql",
            package: "postgresql",
        });
    }
    let report = images()?;
    let redis_image = report.redis_image.clone().context("no Redis image")?;
    let docker = stackctl::docker::connect().await?;
    // Built once for both tests (they run at the same time).
    static BUILT: tokio::sync::OnceCell<String> = tokio::sync::OnceCell::const_new();
    let mq_image = BUILT
        .get_or_try_init(|| async {
            let tag = format!("{}:{TEST_TAG}", stackctl::rabbitmq::RABBITMQ_REPOSITORY);
            stackctl::rabbitmq::build_image(&docker, &tag, &|l| eprintln!("stackctl: {l}"))
                .await
                .map(|_size| tag)
        })
        .await?
        .clone();

    let secrets = tempfile::tempdir()?;
    let mut env = vec![
        (
            "TASKSTACK_SECRETS_DIR",
            secrets.path().display().to_string(),
        ),
        ("WEB_PORT", free_port()?.to_string()),
        ("HEALTHCHECK_INTERVAL", "1s".to_owned()),
        ("RABBITMQ_HEALTHCHECK_INTERVAL", "2s".to_owned()),
        ("TASKSTACK_IMAGE", report.app_image.clone()),
        ("REDIS_IMAGE", redis_image),
        ("RABBITMQ_IMAGE", mq_image),
    ];
    let mut profiles = vec!["rabbitmq"];
    if postgres {
        let tag = format!("{}:{TEST_TAG}", stackctl::postgres::POSTGRES_REPOSITORY);
        stackctl::postgres::build_image(&docker, &tag, &|l| eprintln!("stackctl: {l}")).await?;
        env.push(("POSTGRES_IMAGE", tag));
        profiles.push("postgres");
    }
    env.extend(extra.iter().map(|(k, v)| (*k, (*v).to_owned())));
    let project = unique(hint).replace('-', "");
    let down = StackctlDown {
        exe: env!("CARGO_BIN_EXE_stackctl"),
        project: project.clone(),
        env: env.clone(),
        images: Vec::new(),
    };

    let mut args = vec!["up"];
    for p in &profiles {
        args.extend(["--profile", p]);
    }
    args.extend(["-p", &project, "--timeout", "240"]);
    let up = stackctl(&args, &env)?;
    let text = output_text(&up);
    ensure!(up.status.success(), "stackctl {args:?}: {text}");
    let pw = std::fs::read_to_string(secrets.path().join("rabbitmq_password"))
        .context("up made no rabbitmq_password")?;
    ensure!(pw.len() == 64, "{pw:?}");

    let engine = Live::connect().await?;
    let mq = engine
        .list_containers(&format!("com.docker.compose.project={project}"))
        .await?
        .into_iter()
        .find(|c| c.label("com.docker.compose.service") == Some("rabbitmq"))
        .context("no rabbitmq container")?;
    let info = engine.inspect_container(&mq.id).await?;
    ensure!(
        info.health == stackctl::engine::Health::Healthy,
        "{}: {}",
        info.name,
        info.health
    );
    ensure!(info.published.is_empty(), "{:?}", info.published);
    ensure!(info.process_uid == Some(999), "uid {:?}", info.process_uid);
    // The broker has the services' user with the secret's password.
    let cmd = [
        "sh",
        "-c",
        "exec rabbitmqctl -q authenticate_user taskstack \"$PW\"",
    ]
    .map(String::from);
    let auth = engine
        .exec(&mq.id, &cmd, &[format!("PW={}", pw.trim())])
        .await?;
    ensure!(auth.exit_code == Some(0), "{auth:?}");
    Ok(Up {
        env,
        profiles,
        project,
        text,
        docker,
        down,
        _secrets: secrets,
    })
}

#[tokio::test(flavor = "multi_thread")]
async fn the_services_run_on_the_rabbitmq_profile_and_verify_passes() -> Result<()> {
    let _one_at_a_time = SERIAL.lock().await;
    let up = up("rmqamqp", false, &[]).await?;
    ensure!(
        up.text.contains("profile rabbitmq: tasks through RabbitMQ"),
        "{}",
        up.text
    );
    let (passed, checks, text) = up.verify()?;
    ensure!(passed, "stackctl verify: {text}");
    for id in [
        "broker.kind",
        "rabbitmq.auth",
        "rabbitmq.guest",
        "rabbitmq.not_published",
        "rabbitmq.queues",
        "rabbitmq.consumers",
        "smoke.add",
        "workers.heartbeat",
        "beat.lock",
    ] {
        let c = checks
            .iter()
            .find(|c| c["id"] == id)
            .with_context(|| format!("no check {id}: {text}"))?;
        ensure!(c["ok"] == true, "{c}");
    }
    let consumers = checks
        .iter()
        .find(|c| c["id"] == "rabbitmq.consumers")
        .and_then(|c| c["reason"].as_str())
        .unwrap_or_default();
    // (`ok` above already means at least one consumer per running worker.)
    ensure!(consumers.starts_with("celery: "), "{consumers}");
    up.down().await
}

#[tokio::test(flavor = "multi_thread")]
async fn the_rabbitmq_profile_comes_up_healthy_and_verify_reports_a_broker_nobody_uses()
-> Result<()> {
    let _one_at_a_time = SERIAL.lock().await;
    // The user's choice: tasks stay on Redis.
    let up = up(
        "rmqprofile",
        false,
        &[("BROKER_URL", "redis://redis:6379/0")],
    )
    .await?;
    ensure!(
        !up.text.contains("profile rabbitmq: tasks through RabbitMQ"),
        "BROKER_URL was set, the profile must leave it: {}",
        up.text
    );
    let (passed, checks, text) = up.verify()?;
    ensure!(!passed, "verify passed: {text}");
    let failed: Vec<&Value> = checks.iter().filter(|c| c["ok"] != true).collect();
    ensure!(
        failed.len() == 1 && failed[0]["id"] == "broker.kind",
        "only broker.kind should fail: {failed:?}"
    );
    let reason = failed[0]["reason"].as_str().unwrap_or_default();
    ensure!(
        reason.starts_with("service rabbitmq runs but no service's broker_url is amqp://..."),
        "{reason}"
    );
    ensure!(
        checks
            .iter()
            .any(|c| c["id"] == "service.rabbitmq" && c["ok"] == true),
        "{checks:?}"
    );
    up.down().await
}

#[tokio::test(flavor = "multi_thread")]
async fn with_postgres_too_the_stack_runs_without_redis_and_verify_passes() -> Result<()> {
    let _one_at_a_time = SERIAL.lock().await;
    let up = up("rmqpg", true, &[]).await?;
    for note in [
        "profile rabbitmq: tasks through RabbitMQ (BROKER_URL=amqp://taskstack@rabbitmq:5672/%2F), results in PostgreSQL",
        "service redis is not started: no service keeps anything on Redis",
    ] {
        ensure!(up.text.contains(note), "no note {note:?}: {}", up.text);
    }
    let engine = Live::connect().await?;
    let services: Vec<String> = engine
        .list_containers(&format!("com.docker.compose.project={}", up.project))
        .await?
        .iter()
        .filter_map(|c| c.label("com.docker.compose.service").map(str::to_owned))
        .collect();
    ensure!(
        !services.iter().any(|s| s == "redis") && services.iter().any(|s| s == "postgres"),
        "{services:?}"
    );
    let (passed, checks, text) = up.verify()?;
    ensure!(passed, "stackctl verify: {text}");
    for id in [
        "rabbitmq.queues",
        "rabbitmq.consumers",
        "smoke.add",
        "workers.heartbeat",
        "workers.tasks",
        "beat.lock",
        "beat.lock_ttl",
        "results.store",
        "results.postgresql",
    ] {
        let c = checks
            .iter()
            .find(|c| c["id"] == id)
            .with_context(|| format!("no check {id}: {text}"))?;
        ensure!(c["ok"] == true, "{c}");
    }
    ensure!(
        !checks
            .iter()
            .any(|c| c["id"].as_str().is_some_and(|id| id.starts_with("redis."))),
        "no Redis check applies: {text}"
    );
    // Two worker containers, each with its record in PostgreSQL.
    let workers = checks
        .iter()
        .find(|c| c["id"] == "workers.heartbeat")
        .and_then(|c| c["reason"].as_str())
        .unwrap_or_default();
    ensure!(workers.starts_with("2 worker(s) heartbeating"), "{workers}");

    // Plain docker-compose starts the Redis service anyway: a running
    // container labelled as it fails `redis.unused`, and only that.
    let spec = stackctl::engine::ContainerSpec {
        name: format!("{}_redis_1", up.project),
        image: images()?.redis_image.context("no Redis image")?,
        command: Some(
            ["redis-server", "--save", "", "--appendonly", "no"]
                .map(String::from)
                .to_vec(),
        ),
        env: Vec::new(),
        user: Some("999:1000".into()),
        labels: [
            ("com.docker.compose.project", up.project.as_str()),
            ("com.docker.compose.service", "redis"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect(),
        binds: Vec::new(),
        volumes: Vec::new(),
        tmpfs: Vec::new(),
        networks: Vec::new(),
        ports: Vec::new(),
        healthcheck: None,
        restart: None,
        init: false,
        read_only: false,
        cap_drop: Vec::new(),
        security_opt: Vec::new(),
        logging: None,
        stop_timeout: Some(1),
    };
    let id = engine.create_container(&spec).await?;
    engine.start_container(&id).await?;
    ensure!(engine.inspect_container(&id).await?.running, "{spec:?}");
    let (passed, checks, text) = up.verify()?;
    ensure!(!passed, "verify passed with an unused Redis: {text}");
    let failed: Vec<&Value> = checks.iter().filter(|c| c["ok"] != true).collect();
    ensure!(
        failed.len() == 1 && failed[0]["id"] == "redis.unused",
        "only redis.unused should fail: {failed:?}"
    );
    up.down().await
}
