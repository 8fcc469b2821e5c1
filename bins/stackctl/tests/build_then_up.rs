//! The quick start as a user types it, against the real Docker engine:
//! `stackctl build`, then a plain `stackctl up` (no image variables, no
//! secrets made beforehand), then `stackctl verify`. Its own project name
//! and secrets directory; the project is taken down with `stackctl down -v`
//! and the images it built are removed when the test ends, even after a
//! failure (images that were already here are left, rebuilt).

use anyhow::{Context as _, Result, ensure};
use bollard::query_parameters::RemoveImageOptions;
use stackctl::build::{APP_REPOSITORY, DEFAULT_TAG, REDIS_REPOSITORY};
use stackctl::engine::Engine as _;
use stackctl::engine::live::Live;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use taskstack_integration::docker::{is_compose_setting, unique, workspace_root};
use taskstack_integration::free_port;

/// `stackctl <args>` in the workspace, with none of the caller's compose
/// settings (image variables above all) and `env` set.
fn stackctl(args: &[&str], env: &[(&str, String)]) -> Result<Output> {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_stackctl"));
    cmd.args(args).current_dir(workspace_root()?);
    for (k, _) in std::env::vars() {
        if is_compose_setting(&k) {
            cmd.env_remove(k);
        }
    }
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.output().context("cannot run stackctl")
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// Takes the project down and removes the images this test made.
struct Cleanup {
    project: String,
    env: Vec<(&'static str, String)>,
    new_images: Vec<String>,
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        match stackctl(&["down", "-v", "-p", &self.project], &self.env) {
            Ok(o) if o.status.success() => {}
            Ok(o) => eprintln!("stackctl down -p {}: {}", self.project, text(&o)),
            Err(e) => eprintln!("stackctl down -p {}: {e:#}", self.project),
        }
        let images = std::mem::take(&mut self.new_images);
        let removed = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            rt.block_on(async {
                let docker = stackctl::docker::connect().await?;
                for image in images {
                    docker
                        .remove_image(&image, None::<RemoveImageOptions>, None)
                        .await
                        .with_context(|| format!("docker rmi {image}"))?;
                }
                anyhow::Ok(())
            })
        })
        .join();
        if let Ok(Err(e)) = removed {
            eprintln!("removing the built images: {e:#}");
        }
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
    let _cleanup = Cleanup {
        project: project.clone(),
        env: env.clone(),
        new_images,
    };

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
