//! The compose profile `rabbitmq` as a user runs it: `stackctl up
//! --profile rabbitmq` (its own project name and secrets directory, the
//! RabbitMQ image built offline by `stackctl build --rabbitmq`'s code)
//! brings the `rabbitmq` service up healthy next to the stack, with its
//! password secret made by `up`, unpublished, non-root. The services are
//! kept on Redis here (`BROKER_URL` set by the user, which the profile
//! leaves alone), so `stackctl verify` must fail exactly `broker.kind`,
//! saying that RabbitMQ runs while no service's broker is on it, and pass
//! everything else. `stackctl down -v` leaves nothing behind (also run on
//! failure, by a drop guard).

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
async fn the_rabbitmq_profile_comes_up_healthy_and_verify_reports_a_broker_nobody_uses()
-> Result<()> {
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
        // The user's choice: tasks stay on Redis.
        ("BROKER_URL", "redis://redis:6379/0".to_owned()),
    ];
    let project = unique("rmqprofile").replace('-', "");
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
        !out.contains("profile rabbitmq: tasks through RabbitMQ"),
        "BROKER_URL was set, the profile must leave it: {out}"
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
    ensure!(!verify.status.success(), "verify passed: {text}");
    let report: serde_json::Value =
        serde_json::from_slice(&verify.stdout).with_context(|| format!("verify --json: {text}"))?;
    let checks = report["checks"].as_array().context("no checks")?;
    let failed: Vec<&serde_json::Value> = checks.iter().filter(|c| c["ok"] != true).collect();
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

    drop(down);
    let left = leftovers(&docker, &format!("com.docker.compose.project={project}")).await?;
    ensure!(left.is_empty(), "left after down -v: {left:?}");
    Ok(())
}
