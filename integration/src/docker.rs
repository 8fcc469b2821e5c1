//! Helpers for the container tests: the images (built once per test
//! process by `stackctl`'s own code), unique names, container state read
//! through the Docker API, a docker-compose project that is taken down on
//! drop. (HTTP requests to the web API: [`crate::http`].)

use anyhow::{Context as _, Result, bail};
use stackctl::build::{BuildOptions, BuildReport, Profile, RedisChoice};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;
use testcontainers::bollard::Docker;
use testcontainers::bollard::models::{ContainerInspectResponse, HealthStatusEnum};
use testcontainers::bollard::query_parameters::{
    ListContainersOptionsBuilder, ListNetworksOptionsBuilder, ListVolumesOptionsBuilder,
};

/// Tag of the images the tests build (a human's `stackctl build` uses
/// `local`, so the two never overwrite each other).
pub const TEST_TAG: &str = "test";

/// The images for this test process: built on first use (once per process,
/// whichever test asks first), from binaries of the test's own profile, so
/// `cargo test` on a fresh machine needs nothing built beforehand.
pub fn images() -> Result<BuildReport> {
    static BUILT: OnceLock<std::result::Result<BuildReport, String>> = OnceLock::new();
    tokio::task::block_in_place(|| {
        BUILT
            .get_or_init(|| {
                // A runtime of its own: the first test's runtime may be gone
                // when a later test reads the result.
                std::thread::spawn(build_images)
                    .join()
                    .unwrap_or_else(|_| Err("the image build panicked".into()))
            })
            .clone()
            .map_err(anyhow::Error::msg)
    })
}

fn build_images() -> std::result::Result<BuildReport, String> {
    let release = std::env::current_exe()
        .ok()
        .and_then(|exe| {
            exe.parent()
                .and_then(Path::parent)
                .map(|p| p.ends_with("release"))
        })
        .unwrap_or(false);
    let opts = BuildOptions {
        bin_dir: None,
        profile: if release {
            Profile::Release
        } else {
            Profile::Debug
        },
        tag: TEST_TAG.into(),
        redis: RedisChoice::Auto,
        // The size limit is `stackctl build`'s (release); debug binaries
        // are larger.
        max_app_bytes: None,
        strip_debug_info: !release,
        worker_bin: None,
        postgres: false,
        rabbitmq: false,
    };
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| e.to_string())?;
    rt.block_on(stackctl::build::build(&opts, &|line| {
        eprintln!("stackctl: {line}");
    }))
    .map_err(|e| format!("building the test images failed: {e}"))
}

/// A Docker API client (the engine's API version negotiated).
pub async fn docker() -> Result<Docker> {
    Ok(stackctl::docker::connect().await?)
}

/// A name no other test (or run) uses: `ts-<what>-<8 hex>`.
pub fn unique(what: &str) -> String {
    format!(
        "ts-{what}-{}",
        &uuid::Uuid::new_v4().simple().to_string()[..8]
    )
}

/// `image` ("repo:tag") split for `GenericImage::new`.
pub fn split_image(image: &str) -> (&str, &str) {
    image.rsplit_once(':').unwrap_or((image, "latest"))
}

/// The address of container `id` on its (first) network, reachable from
/// this host without publishing a port.
pub async fn container_ip(docker: &Docker, id: &str) -> Result<String> {
    let c = docker.inspect_container(id, None).await?;
    c.network_settings
        .and_then(|n| n.networks)
        .and_then(|nets| {
            nets.into_values()
                .filter_map(|e| e.ip_address)
                .find(|ip| !ip.is_empty())
        })
        .with_context(|| format!("container {id} has no IP address"))
}

/// The health status of a container (None when it has no healthcheck).
pub fn health(c: &ContainerInspectResponse) -> Option<HealthStatusEnum> {
    c.state.as_ref()?.health.as_ref()?.status
}

/// The outputs of a container's last health checks, for failure messages.
pub fn health_outputs(c: &ContainerInspectResponse) -> Vec<String> {
    c.state
        .as_ref()
        .and_then(|s| s.health.as_ref())
        .and_then(|h| h.log.as_ref())
        .map(|log| {
            log.iter()
                .map(|r| {
                    format!(
                        "exit {:?}: {}",
                        r.exit_code,
                        r.output.as_deref().unwrap_or("").trim()
                    )
                })
                .collect()
        })
        .unwrap_or_default()
}

/// Containers (running or not) with label `key=value`, as (id, name).
pub async fn containers_labelled(docker: &Docker, label: &str) -> Result<Vec<(String, String)>> {
    let filters = HashMap::from([("label", vec![label])]);
    let list = docker
        .list_containers(Some(
            ListContainersOptionsBuilder::default()
                .all(true)
                .filters(&filters)
                .build(),
        ))
        .await?;
    Ok(list
        .into_iter()
        .map(|c| {
            let name = c
                .names
                .and_then(|n| n.into_iter().next())
                .unwrap_or_default();
            (
                c.id.unwrap_or_default(),
                name.trim_start_matches('/').to_owned(),
            )
        })
        .collect())
}

/// Everything left with label `label`: containers, networks and volumes.
pub async fn leftovers(docker: &Docker, label: &str) -> Result<Vec<String>> {
    let filters = HashMap::from([("label", vec![label])]);
    let mut left: Vec<String> = containers_labelled(docker, label)
        .await?
        .into_iter()
        .map(|(_, n)| format!("container {n}"))
        .collect();
    for n in docker
        .list_networks(Some(
            ListNetworksOptionsBuilder::default()
                .filters(&filters)
                .build(),
        ))
        .await?
    {
        left.push(format!("network {}", n.name.unwrap_or_default()));
    }
    let volumes = docker
        .list_volumes(Some(
            ListVolumesOptionsBuilder::default()
                .filters(&filters)
                .build(),
        ))
        .await?;
    for v in volumes.volumes.unwrap_or_default() {
        left.push(format!("volume {}", v.name));
    }
    Ok(left)
}

/// A `docker-compose` project on `compose/docker-compose.yml`, taken down
/// with its volumes (`down -v`) when dropped, even after a failure.
#[derive(Debug)]
pub struct ComposeProject {
    pub name: String,
    file: PathBuf,
    env: Vec<(String, String)>,
    down: bool,
}

impl ComposeProject {
    /// A project named `name` (nothing is started yet) with `env` set for
    /// every docker-compose call.
    pub fn new(name: &str, env: &[(&str, String)]) -> Result<Self> {
        let file = workspace_root()?.join("compose/docker-compose.yml");
        Ok(Self {
            name: name.to_owned(),
            file,
            env: env
                .iter()
                .map(|(k, v)| ((*k).to_owned(), v.clone()))
                .collect(),
            down: false,
        })
    }

    /// The label docker-compose puts on everything of this project.
    pub fn label(&self) -> String {
        format!("com.docker.compose.project={}", self.name)
    }

    /// Runs `docker-compose -p <name> -f <file> <args>`; Err with its output
    /// on failure.
    pub fn run(&self, args: &[&str]) -> Result<String> {
        let mut cmd = Command::new("docker-compose");
        cmd.arg("-p")
            .arg(&self.name)
            .arg("-f")
            .arg(&self.file)
            .args(args)
            .env_remove("DOCKER_BUILDKIT");
        // Only what this test sets: a developer's own settings (.env,
        // exported WEB_PORT, ...) must not leak in.
        for (k, _) in std::env::vars() {
            if is_compose_setting(&k) {
                cmd.env_remove(k);
            }
        }
        for (k, v) in &self.env {
            cmd.env(k, v);
        }
        let out = cmd
            .output()
            .context("cannot run docker-compose (apt-get install docker-compose)")?;
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        if !out.status.success() {
            bail!(
                "docker-compose {} failed: {}\n{text}",
                args.join(" "),
                out.status
            );
        }
        Ok(text)
    }

    /// `down -v --remove-orphans`.
    pub fn down(&mut self) -> Result<String> {
        self.down = true;
        self.run(&["down", "-v", "--remove-orphans", "--timeout", "5"])
    }

    /// The last log lines of the project (for failure messages).
    pub fn logs(&self) -> String {
        self.run(&["logs", "--no-color", "--tail", "40"])
            .unwrap_or_else(|e| format!("{e:#}"))
    }
}

impl Drop for ComposeProject {
    fn drop(&mut self) {
        if !self.down
            && let Err(e) = self.down()
        {
            eprintln!("cleanup of compose project {}: {e:#}", self.name);
        }
    }
}

/// Whether environment variable `k` is a compose setting of the stack (a
/// test clears the caller's before setting its own).
pub fn is_compose_setting(k: &str) -> bool {
    k.starts_with("TASKSTACK_")
        || k.starts_with("WORKER_")
        || k.starts_with("WEB_")
        || k.starts_with("REDIS_")
        || k.starts_with("COMPOSE_")
        || k.starts_with("APP_")
        || k.starts_with("POSTGRES_")
        || k.starts_with("RESULT_BACKEND")
        || k.starts_with("BROKER_")
        || k.starts_with("RABBITMQ_")
        || matches!(k, "HEALTHCHECK_INTERVAL" | "LOG_LEVEL")
}

/// Runs the `stackctl` binary `exe` (a test's `env!("CARGO_BIN_EXE_stackctl")`)
/// with `args` in the workspace, with none of the caller's compose settings
/// ([`is_compose_setting`]) and `env` set.
pub fn run_stackctl(
    exe: &str,
    args: &[&str],
    env: &[(&str, String)],
) -> Result<std::process::Output> {
    let mut cmd = Command::new(exe);
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

/// A process's stdout then stderr, for failure messages.
pub fn output_text(o: &std::process::Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// The workspace's root directory (this crate's parent).
pub fn workspace_root() -> Result<PathBuf> {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .context("no workspace root")
}

/// A temporary directory holding the stack's secrets, made by
/// `compose/init-secrets` (`redis_password`, `api_token`,
/// `redis_users.acl`, ...).
pub fn init_secrets() -> Result<tempfile::TempDir> {
    let dir = tempfile::tempdir()?;
    let status = Command::new(workspace_root()?.join("compose/init-secrets"))
        .env("TASKSTACK_SECRETS_DIR", dir.path())
        .stdout(std::process::Stdio::null())
        .status()?;
    anyhow::ensure!(status.success(), "compose/init-secrets failed: {status}");
    Ok(dir)
}

/// SIGKILLs the main process of container `id` from the host, as the OOM
/// killer or a crash would. (`docker kill` would not do: engine 20.10
/// treats it as a manual stop, and no restart policy restarts a manually
/// stopped container.) With `init: true` the process is docker-init's
/// child. Needs root (or the container's user).
pub async fn crash_main_process(docker: &Docker, id: &str) -> Result<()> {
    let c = docker.inspect_container(id, None).await?;
    let init = c
        .state
        .and_then(|s| s.pid)
        .context("the container has no process")?;
    let children = std::fs::read_to_string(format!("/proc/{init}/task/{init}/children"))?;
    let pid: i32 = children
        .split_whitespace()
        .next()
        .context("docker-init has no child")?
        .parse()?;
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid),
        nix::sys::signal::Signal::SIGKILL,
    )?;
    Ok(())
}

/// A compose project run by `stackctl`'s library on
/// `compose/docker-compose.yml`, with only the given environment (never
/// the test process's), taken down with its volumes (`stackctl down -v`)
/// when dropped, even after a failure.
#[derive(Debug)]
pub struct StackctlProject {
    pub project: stackctl::compose::Project,
    pub env: Vec<(String, String)>,
}

impl StackctlProject {
    /// Loads the compose file as project `name` with `env`.
    pub fn new(name: &str, env: &[(&str, String)]) -> Result<Self> {
        Self::with_file(
            name,
            &workspace_root()?.join("compose/docker-compose.yml"),
            env,
        )
    }

    /// Like [`StackctlProject::new`] on another compose file (e.g. a
    /// deliberately broken copy).
    pub fn with_file(name: &str, file: &Path, env: &[(&str, String)]) -> Result<Self> {
        let map: stackctl::compose::Env = env
            .iter()
            .map(|(k, v)| ((*k).to_owned(), v.clone()))
            .collect();
        Ok(Self {
            project: stackctl::compose::load(file, &map, Some(name))?,
            env: env
                .iter()
                .map(|(k, v)| ((*k).to_owned(), v.clone()))
                .collect(),
        })
    }

    /// The project's name.
    pub fn name(&self) -> &str {
        &self.project.name
    }

    /// The label on everything of this project.
    pub fn label(&self) -> String {
        format!("com.docker.compose.project={}", self.project.name)
    }

    /// The same project seen by `docker-compose` (same file, name and
    /// environment), for checking that it recognises what stackctl made.
    pub fn compose(&self) -> Result<ComposeProject> {
        let env: Vec<(&str, String)> = self
            .env
            .iter()
            .map(|(k, v)| (k.as_str(), v.clone()))
            .collect();
        let mut c = ComposeProject::new(&self.project.name, &env)?;
        // stackctl's guard does the cleanup.
        c.down = true;
        Ok(c)
    }
}

impl Drop for StackctlProject {
    fn drop(&mut self) {
        let name = self.project.name.clone();
        // A runtime of its own: the test's may be shutting down.
        let done = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .map_err(|e| e.to_string())?;
            rt.block_on(async {
                let engine = stackctl::engine::live::Live::connect()
                    .await
                    .map_err(|e| e.to_string())?;
                stackctl::ops::down(&engine, &name, true)
                    .await
                    .map_err(|e| e.to_string())
            })
        })
        .join();
        match done {
            Ok(Ok(_)) => {}
            Ok(Err(e)) => eprintln!("cleanup of stackctl project {}: {e}", self.project.name),
            Err(_) => eprintln!("cleanup of stackctl project {} panicked", self.project.name),
        }
    }
}

/// A test's stack run through the `stackctl` binary `exe` (a test's
/// `env!("CARGO_BIN_EXE_stackctl")`): when dropped, even after a failure,
/// `stackctl down -v -p <project>` with `env`, then the images the test
/// made are removed, last first (an image built on another goes before
/// it). A step that fails is reported on stderr and the rest still run.
#[derive(Debug)]
pub struct StackctlDown {
    pub exe: &'static str,
    pub project: String,
    pub env: Vec<(&'static str, String)>,
    pub images: Vec<String>,
}

impl Drop for StackctlDown {
    fn drop(&mut self) {
        let p = &self.project;
        match run_stackctl(self.exe, &["down", "-v", "-p", p], &self.env) {
            Ok(o) if o.status.success() => {}
            Ok(o) => eprintln!("stackctl down -v -p {p}: {}", output_text(&o)),
            Err(e) => eprintln!("stackctl down -v -p {p}: {e:#}"),
        }
        let images = std::mem::take(&mut self.images);
        if images.is_empty() {
            return;
        }
        // A runtime of its own: the test's may be shutting down.
        let removed = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            rt.block_on(async {
                let docker = stackctl::docker::connect().await?;
                for image in images.iter().rev() {
                    if let Err(e) = docker
                        .remove_image(
                            image,
                            None::<testcontainers::bollard::query_parameters::RemoveImageOptions>,
                            None,
                        )
                        .await
                    {
                        eprintln!("docker rmi {image}: {e}");
                    }
                }
                anyhow::Ok(())
            })
        })
        .join();
        match removed {
            Ok(Ok(())) => {}
            Ok(Err(e)) => eprintln!("removing the test's images: {e:#}"),
            Err(_) => eprintln!("removing the test's images panicked"),
        }
    }
}
