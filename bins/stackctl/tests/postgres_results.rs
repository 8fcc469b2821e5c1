//! Results in PostgreSQL in the compose stack, as a user runs it:
//! `stackctl up --profile postgres` (its own project name and secrets
//! directory; the PostgreSQL image built offline from this host's Debian
//! `postgresql` by `stackctl build --postgres`'s code), `stackctl verify`
//! passing with the result store checks, a task enqueued through the web
//! API reaching SUCCESS, its row read back with `psql` inside the
//! PostgreSQL container, then `stackctl down -v` leaving nothing behind
//! (also run on failure, by a drop guard).

use anyhow::{Context as _, Result, ensure};
use stackctl::engine::Engine as _;
use stackctl::engine::live::Live;
use std::time::Duration;
use taskstack_integration::docker::{
    StackctlDown, images, leftovers, output_text, run_stackctl, unique,
};
use taskstack_integration::http::request;
use taskstack_integration::{Prereq, free_port, require, wait_until};

fn stackctl(args: &[&str], env: &[(&str, String)]) -> Result<std::process::Output> {
    run_stackctl(env!("CARGO_BIN_EXE_stackctl"), args, env)
}

#[tokio::test(flavor = "multi_thread")]
async fn the_postgres_profile_keeps_results_in_postgresql() -> Result<()> {
    require(Prereq::File {
        path: "/usr/lib/postgresql",
        package: "postgresql",
    });
    let report = images()?;
    let redis_image = report.redis_image.clone().context("no Redis image")?;
    let docker = stackctl::docker::connect().await?;
    let pg_image = format!(
        "{}:{}",
        stackctl::postgres::POSTGRES_REPOSITORY,
        taskstack_integration::docker::TEST_TAG
    );
    let bytes =
        stackctl::postgres::build_image(&docker, &pg_image, &|l| eprintln!("stackctl: {l}"))
            .await?;
    eprintln!("{pg_image}: {:.1} MB", bytes as f64 / 1e6);

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
        ("POSTGRES_IMAGE", pg_image),
    ];
    let project = unique("pgresults").replace('-', "");
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
            "postgres",
            "-p",
            &project,
            "--timeout",
            "180",
        ],
        &env,
    )?;
    let out = output_text(&up);
    ensure!(up.status.success(), "stackctl up --profile postgres: {out}");
    ensure!(
        out.contains("profile postgres: results in PostgreSQL"),
        "{out}"
    );

    let verify = stackctl(
        &["verify", "--profile", "postgres", "-p", &project, "--json"],
        &env,
    )?;
    let text = output_text(&verify);
    ensure!(verify.status.success(), "stackctl verify: {text}");
    let report: serde_json::Value =
        serde_json::from_slice(&verify.stdout).with_context(|| format!("verify --json: {text}"))?;
    for id in ["results.store", "results.postgresql", "results.expiry"] {
        let check = report["checks"]
            .as_array()
            .and_then(|c| c.iter().find(|c| c["id"] == id))
            .with_context(|| format!("no check {id}: {text}"))?;
        ensure!(check["ok"] == true, "{check}");
    }

    // A task through the web API.
    let token = std::fs::read_to_string(secrets.path().join("api_token"))?;
    let addr = format!("127.0.0.1:{port}");
    let body = serde_json::json!({"task": "taskstack.add", "args": [20, 22]});
    let (status, reply) = request(
        &addr,
        "POST",
        "/api/v1/tasks",
        Some(token.trim()),
        Some(&body),
    )
    .await?;
    ensure!(status == 202, "POST /api/v1/tasks: {status} {reply}");
    let id = reply["id"].as_str().context("no task id")?.to_owned();
    let path = format!("/api/v1/tasks/{id}");
    let (addr_ref, path_ref, token_ref) = (addr.as_str(), path.as_str(), token.trim());
    let done = wait_until(
        "taskstack.add to finish",
        Duration::from_secs(60),
        || async move {
            let (status, reply) = request(addr_ref, "GET", path_ref, Some(token_ref), None).await?;
            ensure!(status == 200, "GET {path_ref}: {status} {reply}");
            Ok(matches!(reply["state"].as_str(), Some("SUCCESS" | "FAILURE")).then_some(reply))
        },
    )
    .await?;
    ensure!(done["state"] == "SUCCESS" && done["result"] == 42, "{done}");

    // The row is in PostgreSQL: psql in its container, as the superuser
    // through the socket (peer authentication; no password).
    let engine = Live::connect().await?;
    let pg = engine
        .list_containers(&format!("com.docker.compose.project={project}"))
        .await?
        .into_iter()
        .find(|c| c.label("com.docker.compose.service") == Some("postgres"))
        .context("no postgres container")?;
    let sql = format!(
        "SELECT state, result, task_name, expires_at > now() FROM taskstack_results \
         WHERE task_id = '{id}'"
    );
    let cmd = [
        "psql",
        "-U",
        "postgres",
        "-d",
        "taskstack",
        "-tA",
        "-c",
        &sql,
    ]
    .map(String::from);
    let row = engine.exec(&pg.id, &cmd, &[]).await?;
    ensure!(
        row.exit_code == Some(0) && row.stdout.trim() == "SUCCESS|42|taskstack.add|t",
        "psql in {}: {row:?}",
        pg.name
    );
    // The services log in as `taskstack`, not as the superuser.
    let sql = "SELECT rolsuper FROM pg_roles WHERE rolname = 'taskstack'";
    let cmd = [
        "psql",
        "-U",
        "postgres",
        "-d",
        "taskstack",
        "-tA",
        "-c",
        sql,
    ]
    .map(String::from);
    let su = engine.exec(&pg.id, &cmd, &[]).await?;
    ensure!(su.stdout.trim() == "f", "{su:?}");

    // Down with volumes: nothing of the project is left.
    drop(down);
    let left = leftovers(&docker, &format!("com.docker.compose.project={project}")).await?;
    ensure!(left.is_empty(), "left after down -v: {left:?}");
    Ok(())
}
