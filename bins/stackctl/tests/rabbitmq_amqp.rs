//! The compose profile `rabbitmq` end to end, with the services on it:
//! `stackctl up --profile rabbitmq` points web, worker and beat's
//! `broker_url` at the `rabbitmq` service (results on Redis), `stackctl
//! verify` passes every check, the RabbitMQ ones included (the smoke task
//! goes web → RabbitMQ → worker → Redis), and the broker shows Celery's
//! queue `celery` durable with one consumer per worker container. Needs
//! the amqp broker backend (`lib/src/backend/amqp`). `stackctl down -v`
//! leaves nothing behind (also run on failure, by a drop guard).

use anyhow::{Context as _, Result, ensure};
use stackctl::engine::Engine as _;
use stackctl::engine::live::Live;
use taskstack_integration::docker::{
    StackctlDown, TEST_TAG, images, leftovers, output_text, run_stackctl, unique,
};
use taskstack_integration::{Prereq, free_port, require};

fn stackctl(args: &[&str], env: &[(&str, String)]) -> Result<std::process::Output> {
    run_stackctl(env!("CARGO_BIN_EXE_stackctl"), args, env)
}

#[tokio::test(flavor = "multi_thread")]
async fn the_services_run_on_the_rabbitmq_profile_and_verify_passes() -> Result<()> {
    require(Prereq::File {
        path: "/usr/lib/rabbitmq",
        package: "rabbitmq-server",
    });
    let report = images()?;
    let redis_image = report.redis_image.clone().context("no Redis image")?;
    let docker = stackctl::docker::connect().await?;
    let mq_image = format!("{}:{TEST_TAG}", stackctl::rabbitmq::RABBITMQ_REPOSITORY);
    stackctl::rabbitmq::build_image(&docker, &mq_image, &|l| eprintln!("stackctl: {l}")).await?;

    let secrets = tempfile::tempdir()?;
    let port = free_port()?;
    let env = vec![
        (
            "TASKSTACK_SECRETS_DIR",
            secrets.path().display().to_string(),
        ),
        ("WEB_PORT", port.to_string()),
        ("HEALTHCHECK_INTERVAL", "1s".to_owned()),
        ("RABBITMQ_HEALTHCHECK_INTERVAL", "2s".to_owned()),
        ("TASKSTACK_IMAGE", report.app_image.clone()),
        ("REDIS_IMAGE", redis_image),
        ("RABBITMQ_IMAGE", mq_image),
    ];
    let project = unique("rmqamqp").replace('-', "");
    let down = StackctlDown {
        exe: env!("CARGO_BIN_EXE_stackctl"),
        project: project.clone(),
        env: env.clone(),
        images: Vec::new(),
    };

    let up = stackctl(
        &[
            "up",
            "--profile",
            "rabbitmq",
            "-p",
            &project,
            "--timeout",
            "240",
        ],
        &env,
    )?;
    let out = output_text(&up);
    ensure!(up.status.success(), "stackctl up --profile rabbitmq: {out}");
    ensure!(
        out.contains("profile rabbitmq: tasks through RabbitMQ"),
        "{out}"
    );
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

    let verify = stackctl(
        &["verify", "--profile", "rabbitmq", "-p", &project, "--json"],
        &env,
    )?;
    let text = output_text(&verify);
    ensure!(verify.status.success(), "stackctl verify: {text}");
    let report: serde_json::Value =
        serde_json::from_slice(&verify.stdout).with_context(|| format!("verify --json: {text}"))?;
    let checks = report["checks"].as_array().context("no checks")?;
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
    eprintln!(
        "{}",
        text.lines()
            .filter(|l| l.contains("\"reason\""))
            .collect::<Vec<_>>()
            .join("\n")
    );

    drop(down);
    let left = leftovers(&docker, &format!("com.docker.compose.project={project}")).await?;
    ensure!(left.is_empty(), "left after down -v: {left:?}");
    Ok(())
}
