//! The quick start as a user types it, against the real Docker engine:
//! `stackctl build`, then a plain `stackctl up` (no image variables, no
//! secrets made beforehand), then `stackctl verify`. Its own project name
//! and secrets directory; the project is taken down with `stackctl down -v`
//! and the images it built are removed when the test ends, even after a
//! failure (images that were already here are left, rebuilt). Then the
//! same path with a team's own worker binary in place of the stock one.

use anyhow::{Context as _, Result, ensure};
use stackctl::build::{APP_REPOSITORY, DEFAULT_TAG, REDIS_REPOSITORY};
use stackctl::engine::Engine as _;
use stackctl::engine::live::Live;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;
use taskstack_integration::docker::{
    StackctlDown, output_text as text, run_stackctl, unique, workspace_root,
};
use taskstack_integration::http::request;
use taskstack_integration::{free_port, wait_until};

/// `stackctl <args>` in the workspace, with none of the caller's compose
/// settings (image variables above all) and `env` set.
fn stackctl(args: &[&str], env: &[(&str, String)]) -> Result<Output> {
    run_stackctl(env!("CARGO_BIN_EXE_stackctl"), args, env)
}

/// Takes the project down and removes the images this test made.
fn cleanup(project: &str, env: &[(&'static str, String)], images: Vec<String>) -> StackctlDown {
    StackctlDown {
        exe: env!("CARGO_BIN_EXE_stackctl"),
        project: project.to_owned(),
        env: env.to_vec(),
        images,
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn build_then_a_plain_up_runs_what_was_built() -> Result<()> {
    let engine = Live::connect().await?;
    let app = format!("{APP_REPOSITORY}:{DEFAULT_TAG}");
    let redis = format!("{REDIS_REPOSITORY}:{DEFAULT_TAG}");
    let mut new_images = Vec::new();
    for image in [&app, &redis] {
        if engine.image_id(image).await?.is_none() {
            new_images.push(image.clone());
        }
    }
    let secrets = tempfile::tempdir()?;
    let secrets_dir: PathBuf = secrets.path().join("secrets");
    let env = vec![
        ("TASKSTACK_SECRETS_DIR", secrets_dir.display().to_string()),
        ("WEB_PORT", free_port()?.to_string()),
        ("HEALTHCHECK_INTERVAL", "1s".to_owned()),
    ];
    let project = unique("buildup").replace('-', "");
    let _cleanup = cleanup(&project, &env, new_images);

    // Debug binaries (this test's own profile, already compiled): the
    // release images' size limit does not apply to them.
    let built = stackctl(&["build", "--profile", "debug"], &[])?;
    ensure!(built.status.success(), "stackctl build: {}", text(&built));
    ensure!(
        text(&built).contains("run the stack with these images: stackctl up"),
        "{}",
        text(&built)
    );

    let up = stackctl(&["up", "-p", &project, "--timeout", "180"], &env)?;
    let out = text(&up);
    ensure!(up.status.success(), "stackctl up: {out}");
    ensure!(
        out.contains(&format!(
            "using {app} (made by `stackctl build`) for beat, web, worker"
        )),
        "{out}"
    );
    for f in ["redis_password", "api_token", "redis_users.acl"] {
        ensure!(
            out.contains(&format!("created secret {}", secrets_dir.join(f).display())),
            "{out}"
        );
    }
    let listed = engine
        .list_containers(&format!("com.docker.compose.project={project}"))
        .await?;
    for c in &listed {
        let info = engine.inspect_container(&c.id).await?;
        let want = if c.name.contains("_redis_") && !out.contains(&redis) {
            // redis:7-alpine was here already: the file's default stays.
            "redis:7-alpine"
        } else if c.name.contains("_redis_") {
            redis.as_str()
        } else {
            app.as_str()
        };
        ensure!(info.image == want, "{} runs {}", c.name, info.image);
    }
    ensure!(listed.len() == 5, "{listed:?}");

    // The stack it made passes the checklist, read the way the services
    // read their configuration.
    let verify = stackctl(&["verify", "-p", &project], &env)?;
    ensure!(
        verify.status.success(),
        "stackctl verify: {}",
        text(&verify)
    );
    ensure!(Path::new(&secrets_dir).join("api_token").exists());
    Ok(())
}

/// Issue 12's second door as a team takes it: the template worker
/// (examples/my-worker) compiled, packaged by `stackctl build --worker-bin`
/// into an image of its own tag, the stack brought up on that image, and
/// the template's task run through the web API with the generated token.
#[tokio::test(flavor = "multi_thread")]
async fn a_teams_own_worker_runs_its_task_in_the_stack() -> Result<()> {
    let root = workspace_root()?;
    let built = Command::new(env!("CARGO"))
        .args(["build", "-p", "my-worker"])
        .current_dir(&root)
        .output()
        .context("cannot run cargo")?;
    ensure!(
        built.status.success(),
        "cargo build -p my-worker: {}",
        text(&built)
    );
    let bin = target_dir(&root)?.join("debug").join("my-worker");

    let tag = unique("own");
    let app = format!("{APP_REPOSITORY}:{tag}");
    let redis = format!("{REDIS_REPOSITORY}:{tag}");
    let secrets = tempfile::tempdir()?;
    let port = free_port()?;
    let env = vec![
        (
            "TASKSTACK_SECRETS_DIR",
            secrets.path().display().to_string(),
        ),
        ("WEB_PORT", port.to_string()),
        ("HEALTHCHECK_INTERVAL", "1s".to_owned()),
        ("TASKSTACK_IMAGE", app.clone()),
        ("REDIS_IMAGE", redis.clone()),
    ];
    let project = unique("ownworker").replace('-', "");
    let _cleanup = cleanup(&project, &env, vec![app.clone(), redis.clone()]);
    let bin_arg = bin.display().to_string();
    let args = [
        "build",
        "--profile",
        "debug",
        "--tag",
        &tag,
        "--redis",
        "build",
        "--worker-bin",
        &bin_arg,
    ];
    let build = stackctl(&args, &[])?;
    let out = text(&build);
    ensure!(build.status.success(), "stackctl build: {out}");
    ensure!(
        out.contains("/taskstack-worker is your own worker; its tasks: invoices.render"),
        "{out}"
    );

    let up = stackctl(&["up", "-p", &project, "--timeout", "180"], &env)?;
    ensure!(up.status.success(), "stackctl up: {}", text(&up));
    let verify = stackctl(&["verify", "-p", &project], &env)?;
    ensure!(
        verify.status.success(),
        "stackctl verify: {}",
        text(&verify)
    );

    let token = std::fs::read_to_string(secrets.path().join("api_token"))?;
    let addr = format!("127.0.0.1:{port}");
    let invoice = serde_json::json!({
        "number": "INV-42", "currency": "EUR", "tax_rate_percent": 20,
        "lines": [{"description": "Hosting", "quantity": 3, "unit_price": 1000}]
    });
    let body = serde_json::json!({"task": "invoices.render", "args": [invoice]});
    let (status, reply) = request(
        &addr,
        "POST",
        "/api/v1/tasks",
        Some(token.trim()),
        Some(&body),
    )
    .await?;
    ensure!(reply["state"] == "PENDING", "POST /api/v1/tasks: {reply}");
    ensure!(status == 202, "POST /api/v1/tasks: {status} {reply}");
    let id = reply["id"].as_str().context("no task id")?.to_owned();
    let path = format!("/api/v1/tasks/{id}");
    let (addr, path, token) = (addr.as_str(), path.as_str(), token.trim());
    let done = wait_until(
        "invoices.render to finish",
        Duration::from_secs(60),
        || async move {
            let (status, reply) = request(addr, "GET", path, Some(token), None).await?;
            ensure!(status == 200, "GET {path}: {status} {reply}");
            Ok(matches!(reply["state"].as_str(), Some("SUCCESS" | "FAILURE")).then_some(reply))
        },
    )
    .await?;
    ensure!(done["state"] == "SUCCESS", "{done}");
    ensure!(done["result"]["total"] == 3600, "{done}");
    ensure!(done["result"]["number"] == "INV-42", "{done}");
    Ok(())
}

/// The workspace's target directory, as cargo reports it.
fn target_dir(root: &Path) -> Result<PathBuf> {
    let out = Command::new(env!("CARGO"))
        .args(["metadata", "--format-version", "1", "--no-deps"])
        .current_dir(root)
        .output()
        .context("cannot run cargo metadata")?;
    ensure!(out.status.success(), "cargo metadata: {}", text(&out));
    let meta: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    Ok(PathBuf::from(
        meta["target_directory"]
            .as_str()
            .context("no target_directory")?,
    ))
}
