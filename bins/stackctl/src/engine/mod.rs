//! The narrow slice of the Docker Engine API that `up`, `verify`,
//! `status`, `logs`, `scale` and `down` need, as a trait: [`live::Live`]
//! implements it with bollard against a real engine, [`fake::Fake`] in
//! memory for the orchestration's unit tests. The types here are stackctl's
//! own (not bollard's), so the orchestration code never depends on which
//! engine API version answered.

pub mod fake;
pub mod live;

use crate::compose::{Healthcheck, Logging, Port, Restart};
use std::collections::BTreeMap;
use std::future::Future;
use std::time::Duration;

/// A failed engine call.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("Docker engine call failed ({op}): {message}")]
pub struct EngineError {
    /// What was asked (`create container x`).
    pub op: String,
    pub message: String,
    /// The HTTP status the engine answered, when it answered.
    pub status: Option<u16>,
}

impl EngineError {
    pub fn new(op: impl Into<String>, message: impl Into<String>, status: Option<u16>) -> Self {
        Self {
            op: op.into(),
            message: message.into(),
            status,
        }
    }
}

pub type EngineResult<T> = Result<T, EngineError>;

/// Everything a container is created with.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ContainerSpec {
    pub name: String,
    pub image: String,
    pub command: Option<Vec<String>>,
    /// `KEY=value`, sorted.
    pub env: Vec<String>,
    pub user: Option<String>,
    pub labels: BTreeMap<String, String>,
    /// Host bind mounts `source:target[:ro]`.
    pub binds: Vec<String>,
    /// Named volumes: (engine volume name, target, read-only).
    pub volumes: Vec<(String, String, bool)>,
    /// Paths mounted as tmpfs.
    pub tmpfs: Vec<String>,
    /// Networks (engine names) with the container's aliases on each; the
    /// first is the one it is created on, the others are connected before
    /// it starts.
    pub networks: Vec<(String, Vec<String>)>,
    pub ports: Vec<Port>,
    pub healthcheck: Option<Healthcheck>,
    pub restart: Option<Restart>,
    pub init: bool,
    pub read_only: bool,
    pub cap_drop: Vec<String>,
    pub security_opt: Vec<String>,
    pub logging: Option<Logging>,
    /// Seconds between SIGTERM and SIGKILL on stop.
    pub stop_timeout: Option<u64>,
}

/// A container as listed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ContainerSummary {
    pub id: String,
    pub name: String,
    pub labels: BTreeMap<String, String>,
    /// created, running, restarting, exited, paused, dead...
    pub state: String,
}

impl ContainerSummary {
    pub fn label(&self, key: &str) -> Option<&str> {
        self.labels.get(key).map(String::as_str)
    }
}

/// A container's health status.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Health {
    /// No health check configured.
    None,
    Starting,
    Healthy,
    Unhealthy,
}

impl std::fmt::Display for Health {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::None => "-",
            Self::Starting => "starting",
            Self::Healthy => "healthy",
            Self::Unhealthy => "unhealthy",
        })
    }
}

/// A published port as the engine reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Published {
    pub host_ip: String,
    pub host_port: u16,
    pub container_port: u16,
}

/// What `inspect` tells about a container.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ContainerInfo {
    pub id: String,
    pub name: String,
    pub labels: BTreeMap<String, String>,
    /// created, running, restarting, exited, paused, dead...
    pub state: String,
    pub running: bool,
    pub exit_code: Option<i64>,
    pub oom_killed: bool,
    pub health: Health,
    /// The outputs of the last health checks, oldest first.
    pub health_log: Vec<String>,
    pub restart_count: i64,
    /// RFC 3339, when the container last started.
    pub started_at: Option<String>,
    pub hostname: String,
    /// The configured user (`uid[:gid]` or a name; empty: root).
    pub user: String,
    /// `no`, `always`, `unless-stopped`, `on-failure` (empty: none).
    pub restart_policy: String,
    pub published: Vec<Published>,
    /// The real uid of the container's main process, when this host can
    /// read it (`/proc`; a local engine only).
    pub process_uid: Option<u32>,
    /// `KEY=value` as configured.
    pub env: Vec<String>,
    /// The image the container was created from (as named).
    pub image: String,
}

impl ContainerInfo {
    pub fn label(&self, key: &str) -> Option<&str> {
        self.labels.get(key).map(String::as_str)
    }

    /// The value of environment variable `key`.
    pub fn env_var(&self, key: &str) -> Option<&str> {
        self.env
            .iter()
            .find_map(|kv| kv.strip_prefix(key).and_then(|r| r.strip_prefix('=')))
    }
}

/// A network or volume as listed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Resource {
    pub name: String,
    pub labels: BTreeMap<String, String>,
}

/// What a command run in a container (`docker exec`) printed.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ExecOutput {
    pub exit_code: Option<i64>,
    pub stdout: String,
    pub stderr: String,
}

/// The Docker calls stackctl makes. Every method fails with the engine's
/// message; none pulls an image.
pub trait Engine: Sync {
    /// The id of local image `name`, None when it is not here.
    fn image_id(&self, name: &str) -> impl Future<Output = EngineResult<Option<String>>> + Send;
    /// Containers (running or not) carrying `label` (`key=value`).
    fn list_containers(
        &self,
        label: &str,
    ) -> impl Future<Output = EngineResult<Vec<ContainerSummary>>> + Send;
    fn inspect_container(
        &self,
        id: &str,
    ) -> impl Future<Output = EngineResult<ContainerInfo>> + Send;
    /// Creates (does not start) a container, attached to all its networks;
    /// its id.
    fn create_container(
        &self,
        spec: &ContainerSpec,
    ) -> impl Future<Output = EngineResult<String>> + Send;
    fn start_container(&self, id: &str) -> impl Future<Output = EngineResult<()>> + Send;
    /// Stops with the container's own stop timeout unless `timeout` is given.
    fn stop_container(
        &self,
        id: &str,
        timeout: Option<Duration>,
    ) -> impl Future<Output = EngineResult<()>> + Send;
    fn remove_container(&self, id: &str) -> impl Future<Output = EngineResult<()>> + Send;
    fn list_networks(
        &self,
        label: &str,
    ) -> impl Future<Output = EngineResult<Vec<Resource>>> + Send;
    fn create_network(
        &self,
        name: &str,
        driver: &str,
        internal: bool,
        labels: &BTreeMap<String, String>,
    ) -> impl Future<Output = EngineResult<()>> + Send;
    fn remove_network(&self, name: &str) -> impl Future<Output = EngineResult<()>> + Send;
    fn list_volumes(&self, label: &str)
    -> impl Future<Output = EngineResult<Vec<Resource>>> + Send;
    fn create_volume(
        &self,
        name: &str,
        driver: &str,
        labels: &BTreeMap<String, String>,
    ) -> impl Future<Output = EngineResult<()>> + Send;
    fn remove_volume(&self, name: &str) -> impl Future<Output = EngineResult<()>> + Send;
    /// Log lines (stdout and stderr) of a container: the last `tail` (all
    /// when None), then, with `follow`, new ones until it stops; each goes
    /// to `on_line`.
    fn logs(
        &self,
        id: &str,
        tail: Option<usize>,
        follow: bool,
        on_line: &mut (dyn FnMut(&str) + Send),
    ) -> impl Future<Output = EngineResult<()>> + Send;
    /// Runs `cmd` in running container `id` with extra `env` (`KEY=value`,
    /// not shown in any process list) and waits for it.
    fn exec(
        &self,
        id: &str,
        cmd: &[String],
        env: &[String],
    ) -> impl Future<Output = EngineResult<ExecOutput>> + Send;
    /// Where this host reaches container `id`'s `port` (`ip:port`, the
    /// container's address on one of its networks; no port need be
    /// published), None when it has no address.
    fn reach(
        &self,
        id: &str,
        port: u16,
    ) -> impl Future<Output = EngineResult<Option<String>>> + Send;
    /// Whether host port `ip:port` can be bound on the engine's host (false
    /// when something already listens there).
    fn host_port_free(&self, ip: &str, port: u16) -> bool;
}

/// The last `n` log lines of container `id` (empty on error).
pub async fn last_log_lines<E: Engine>(engine: &E, id: &str, n: usize) -> Vec<String> {
    let mut lines = Vec::new();
    let _ = engine
        .logs(id, Some(n), false, &mut |l: &str| lines.push(l.to_owned()))
        .await;
    lines
}
