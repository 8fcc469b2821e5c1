//! The RabbitMQ image (`stackctl build --rabbitmq`'s code) run as the
//! compose profile `rabbitmq` runs it (non-root, read-only root, /tmp a
//! tmpfs, no capability, the password a mounted secret file, a named
//! volume), checked from outside:
//!
//! * it turns healthy (its exec-form health check) and a real Celery 5
//!   client publishes to it with the secret's password, declaring
//!   Celery's own queue; a wrong password and the `guest` user are refused;
//! * `stackctl verify`'s RabbitMQ facts (`rabbitmqctl` through the
//!   engine's exec) pass, and see that queue durable with its message;
//! * recreated with a new secret on the same volume, the message is still
//!   there, the new password works and the old one no longer does;
//! * without a readable password file it stops at once with exit code 2
//!   and says why.
//!
//! Everything it creates carries a unique label and is removed by a drop
//! guard, also on failure.

use anyhow::{Context as _, Result, ensure};
use stackctl::engine::live::Live;
use stackctl::engine::{ContainerSpec, Engine as _, Health};
use stackctl::verify::rabbitmq::{self as verify_rabbitmq, BrokerFacts};
use std::collections::BTreeMap;
use std::os::unix::fs::PermissionsExt as _;
use std::path::Path;
use std::time::{Duration, Instant};
use taskstack_integration::docker::{TEST_TAG, unique};
use taskstack_integration::python::{celery_python, clean_env};
use taskstack_integration::{Prereq, require, wait_until};

const LABEL: &str = "io.taskstack.test";

/// Removes the test's containers, network and volume (by its label).
struct Cleanup {
    label: String,
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        let label = format!("{LABEL}={}", self.label);
        let done = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .ok()?;
            rt.block_on(async {
                let engine = Live::connect().await.ok()?;
                for c in engine.list_containers(&label).await.ok()? {
                    let _ = engine.remove_container(&c.id).await;
                }
                for n in engine.list_networks(&label).await.ok()? {
                    let _ = engine.remove_network(&n.name).await;
                }
                for v in engine.list_volumes(&label).await.ok()? {
                    let _ = engine.remove_volume(&v.name).await;
                }
                Some(())
            })
        })
        .join();
        if !matches!(done, Ok(Some(()))) {
            eprintln!("cleanup of {} may have left something", self.label);
        }
    }
}

fn spec(
    name: &str,
    image: &str,
    labels: &BTreeMap<String, String>,
    network: &str,
    volume: &str,
    secret: &Path,
    password_file: &str,
) -> ContainerSpec {
    ContainerSpec {
        name: name.into(),
        image: image.into(),
        command: None,
        env: vec![
            format!("RABBITMQ_PASSWORD_FILE={password_file}"),
            "RABBITMQ_USER=taskstack".into(),
            "RABBITMQ_VHOST=/".into(),
        ],
        user: Some("999:999".into()),
        labels: labels.clone(),
        binds: vec![format!(
            "{}:/run/secrets/rabbitmq_password:ro",
            secret.display()
        )],
        volumes: vec![(volume.into(), "/var/lib/rabbitmq".into(), false)],
        tmpfs: vec!["/tmp".into()],
        networks: vec![(network.into(), vec!["rabbitmq".into()])],
        ports: Vec::new(),
        healthcheck: Some(stackctl::compose::Healthcheck {
            test: [
                "CMD",
                "rabbitmq-diagnostics",
                "-q",
                "check_port_connectivity",
            ]
            .map(String::from)
            .to_vec(),
            interval: Some(Duration::from_secs(2)),
            timeout: Some(Duration::from_secs(10)),
            retries: Some(5),
            start_period: Some(Duration::from_secs(60)),
        }),
        restart: None,
        init: true,
        read_only: true,
        cap_drop: vec!["ALL".into()],
        security_opt: vec!["no-new-privileges:true".into()],
        logging: None,
        stop_timeout: Some(30),
    }
}

/// Starts `spec` and waits for it to be healthy; the seconds it took.
async fn start_healthy(engine: &Live, spec: &ContainerSpec) -> Result<(String, f64)> {
    let id = engine.create_container(spec).await?;
    let started = Instant::now();
    engine.start_container(&id).await?;
    let id_ref = id.as_str();
    wait_until(
        "the RabbitMQ container to be healthy",
        Duration::from_secs(180),
        || async move {
            let c = engine.inspect_container(id_ref).await?;
            if !c.running || c.health == Health::Unhealthy {
                let logs = stackctl::engine::last_log_lines(engine, id_ref, 40).await;
                anyhow::bail!(
                    "{} is {} / {}: health {:?}\n{}",
                    c.name,
                    c.state,
                    c.health,
                    c.health_log,
                    logs.join("\n")
                );
            }
            Ok((c.health == Health::Healthy).then_some(()))
        },
    )
    .await?;
    Ok((id, started.elapsed().as_secs_f64()))
}

/// Publishes a task with a real Celery client to `url`; the JSON it printed
/// (`{"sent": id}` or `{"error": name, "detail": text}`).
async fn celery_send(python: &Path, url: &str) -> Result<serde_json::Value> {
    const SCRIPT: &str = r#"
import json, sys
from celery import Celery
from kombu import Connection
url = sys.argv[1]
try:
    # Connect once without retrying: a refused login fails at once.
    Connection(url, connect_timeout=10).connect().close()
    app = Celery("probe", broker=url)
    r = app.send_task("probe.add", args=[2, 3], retry=False)
    print(json.dumps({"sent": r.id}))
except Exception as e:
    print(json.dumps({"error": type(e).__name__, "detail": str(e)}))
"#;
    let mut cmd = std::process::Command::new(python);
    clean_env(&mut cmd);
    let mut cmd = tokio::process::Command::from(cmd);
    cmd.arg("-c").arg(SCRIPT).arg(url).kill_on_drop(true);
    let out = tokio::time::timeout(Duration::from_secs(90), cmd.output())
        .await
        .context("the Celery client hung")??;
    let stdout = String::from_utf8_lossy(&out.stdout);
    stdout
        .lines()
        .rev()
        .find_map(|l| serde_json::from_str::<serde_json::Value>(l.trim()).ok())
        .with_context(|| {
            format!(
                "the Celery client printed no JSON ({}):\n{stdout}\n{}",
                out.status,
                String::from_utf8_lossy(&out.stderr)
            )
        })
}

fn write_secret(path: &Path, password: &str) -> Result<()> {
    std::fs::write(path, format!("{password}\n"))?;
    // The container's user (999) reads it through the bind mount.
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o644))?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn the_rabbitmq_image_serves_celery_with_the_secrets_password_and_keeps_its_data()
-> Result<()> {
    require(Prereq::File {
        path: "/usr/lib/rabbitmq",
        package: "rabbitmq-server",
    });
    let python = celery_python()?;
    let docker = stackctl::docker::connect().await?;
    let image = format!("{}:{TEST_TAG}", stackctl::rabbitmq::RABBITMQ_REPOSITORY);
    let t = Instant::now();
    let bytes =
        stackctl::rabbitmq::build_image(&docker, &image, &|l| eprintln!("stackctl: {l}")).await?;
    eprintln!(
        "{image}: {:.1} MB, built in {:.1}s",
        bytes as f64 / 1e6,
        t.elapsed().as_secs_f64()
    );

    let engine = Live::connect().await?;
    let tag = unique("rmqimage");
    let _cleanup = Cleanup { label: tag.clone() };
    let labels = BTreeMap::from([(LABEL.to_owned(), tag.clone())]);
    let network = format!("{tag}-net");
    let volume = format!("{tag}-data");
    engine
        .create_network(&network, "bridge", true, &labels)
        .await?;
    engine.create_volume(&volume, "local", &labels).await?;
    let dir = tempfile::tempdir()?;
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755))?;
    let secret = dir.path().join("rabbitmq_password");
    let first = format!("first-{}", &unique("pw")[6..]);
    write_secret(&secret, &first)?;

    let s = spec(
        &format!("{tag}-1"),
        &image,
        &labels,
        &network,
        &volume,
        &secret,
        "/run/secrets/rabbitmq_password",
    );
    let (id, secs) = start_healthy(&engine, &s).await?;
    eprintln!("{image}: healthy {secs:.1}s after start (empty volume)");
    let addr = engine
        .reach(&id, 5672)
        .await?
        .context("no address for the container")?;

    // A real Celery client with the secret's password.
    let sent = celery_send(&python, &format!("amqp://taskstack:{first}@{addr}//")).await?;
    ensure!(sent["sent"].is_string(), "Celery could not publish: {sent}");
    for (who, url) in [
        (
            "a wrong password",
            format!("amqp://taskstack:nope@{addr}//"),
        ),
        ("guest", format!("amqp://guest:guest@{addr}//")),
    ] {
        let refused = celery_send(&python, &url).await?;
        ensure!(
            refused["error"].is_string()
                && refused["detail"]
                    .as_str()
                    .is_some_and(|d| d.contains("ACCESS_REFUSED")),
            "{who} was not refused: {refused}"
        );
    }

    // verify's RabbitMQ facts and checks on the live broker.
    let info = engine.inspect_container(&id).await?;
    let facts = verify_rabbitmq::gather(&engine, &info, "taskstack", Some(&first), "/").await;
    let queues = facts.queues.clone();
    let broker = BrokerFacts {
        brokers: vec![("web".into(), "amqp"), ("worker".into(), "amqp")],
        rabbitmq_service: Some("rabbitmq".into()),
        rabbitmq: Some(Ok(facts)),
        queues: vec!["celery".into()],
        workers: std::collections::BTreeMap::new(),
    };
    let checks = verify_rabbitmq::evaluate(&broker);
    let by_id = |id: &str| checks.iter().find(|c| c.id == id).cloned();
    for id in [
        "broker.kind",
        "rabbitmq.auth",
        "rabbitmq.guest",
        "rabbitmq.not_published",
        "rabbitmq.queues",
    ] {
        let c = by_id(id).with_context(|| format!("no check {id}: {checks:?}"))?;
        ensure!(c.ok, "{id} failed: {}", c.reason);
    }
    let q = by_id("rabbitmq.queues").context("rabbitmq.queues")?;
    ensure!(
        q.reason == "celery: durable classic, 1 ready, 0 unacknowledged",
        "{}",
        q.reason
    );
    // No consumer (no worker): the consumers check says so.
    let consumers = by_id("rabbitmq.consumers").context("rabbitmq.consumers")?;
    ensure!(
        !consumers.ok && consumers.reason.contains("0 consumer(s)"),
        "{consumers:?}"
    );
    // The same facts with a wrong password: refused.
    let wrong = verify_rabbitmq::gather(&engine, &info, "taskstack", Some("nope"), "/").await;
    let out = wrong.auth.clone().map_err(anyhow::Error::msg)?;
    ensure!(
        out.exit_code != Some(0),
        "a wrong password authenticated: {out:?}"
    );
    ensure!(
        queues.is_ok_and(|rows| rows.iter().any(|r| r.name == "celery" && r.durable)),
        "celery queue"
    );

    // Recreated on the same volume with a new password.
    engine.stop_container(&id, None).await?;
    let stopped = engine.inspect_container(&id).await?;
    ensure!(
        stopped.exit_code == Some(0),
        "SIGTERM did not stop RabbitMQ cleanly: exit {:?}",
        stopped.exit_code
    );
    engine.remove_container(&id).await?;
    let second = format!("second-{}", &unique("pw")[6..]);
    write_secret(&secret, &second)?;
    let s2 = spec(
        &format!("{tag}-2"),
        &image,
        &labels,
        &network,
        &volume,
        &secret,
        "/run/secrets/rabbitmq_password",
    );
    let (id2, secs) = start_healthy(&engine, &s2).await?;
    eprintln!("{image}: healthy {secs:.1}s after start (existing volume)");
    let info2 = engine.inspect_container(&id2).await?;
    let again = verify_rabbitmq::gather(&engine, &info2, "taskstack", Some(&second), "/").await;
    let auth = again.auth.clone().map_err(anyhow::Error::msg)?;
    ensure!(auth.exit_code == Some(0), "the new password: {auth:?}");
    let old = verify_rabbitmq::gather(&engine, &info2, "taskstack", Some(&first), "/").await;
    let auth = old.auth.clone().map_err(anyhow::Error::msg)?;
    ensure!(
        auth.exit_code != Some(0),
        "the old password still works: {auth:?}"
    );
    let rows = again.queues.clone().map_err(anyhow::Error::msg)?;
    ensure!(
        rows.iter()
            .any(|r| r.name == "celery" && r.durable && r.messages_ready == 1),
        "the message did not survive the recreation: {rows:?}"
    );
    engine.remove_container(&id2).await?;

    // No readable password file: exit 2 at once, saying why.
    let bad = spec(
        &format!("{tag}-3"),
        &image,
        &labels,
        &network,
        &volume,
        &secret,
        "/run/secrets/missing",
    );
    let id3 = engine.create_container(&bad).await?;
    engine.start_container(&id3).await?;
    let id3_ref = id3.as_str();
    let engine_ref = &engine;
    let exited = wait_until(
        "the container without a password to exit",
        Duration::from_secs(30),
        || async move {
            let c = engine_ref.inspect_container(id3_ref).await?;
            Ok((!c.running && c.state == "exited").then_some(c))
        },
    )
    .await?;
    ensure!(exited.exit_code == Some(2), "exit {:?}", exited.exit_code);
    let logs = stackctl::engine::last_log_lines(&engine, &id3, 10).await;
    ensure!(
        logs.iter().any(|l| l
            .contains("taskstack-rabbitmq: cannot read the password file /run/secrets/missing")),
        "{logs:?}"
    );
    Ok(())
}
