//! Test harness for taskstack's end-to-end tests: real `redis-server`
//! processes on free loopback ports, real worker and beat processes, and
//! waiting on conditions with deadlines (never fixed sleeps).

use anyhow::{Context as _, Result, bail};
use std::future::Future;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// Waits until `cond` returns `Some`, polling every 20 ms, failing with
/// `what` after `deadline`.
pub async fn wait_until<T, F, Fut>(what: &str, deadline: Duration, mut cond: F) -> Result<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<Option<T>>>,
{
    let start = Instant::now();
    loop {
        if let Some(v) = cond().await? {
            return Ok(v);
        }
        if start.elapsed() > deadline {
            bail!("timed out after {deadline:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Blocking variant of [`wait_until`] for synchronous checks.
pub fn wait_until_sync<T>(
    what: &str,
    deadline: Duration,
    mut cond: impl FnMut() -> Option<T>,
) -> Result<T> {
    let start = Instant::now();
    loop {
        if let Some(v) = cond() {
            return Ok(v);
        }
        if start.elapsed() > deadline {
            bail!("timed out after {deadline:?} waiting for {what}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A free TCP port on 127.0.0.1 (bound and released; good enough for tests).
pub fn free_port() -> Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// A `redis-server` of our own on a free loopback port, killed on drop.
#[derive(Debug)]
pub struct RedisServer {
    port: u16,
    dir: tempfile::TempDir,
    aof: bool,
    child: Option<Child>,
}

impl RedisServer {
    /// Starts a throwaway server (no persistence).
    pub fn start() -> Result<Self> {
        Self::start_with(false)
    }

    /// Starts a server with AOF persistence (`appendfsync always`).
    pub fn start_persistent() -> Result<Self> {
        Self::start_with(true)
    }

    fn start_with(aof: bool) -> Result<Self> {
        let mut s = Self {
            port: free_port()?,
            dir: tempfile::tempdir()?,
            aof,
            child: None,
        };
        s.spawn()?;
        Ok(s)
    }

    fn spawn(&mut self) -> Result<()> {
        let mut cmd = Command::new("redis-server");
        cmd.arg("--port")
            .arg(self.port.to_string())
            .arg("--bind")
            .arg("127.0.0.1")
            .arg("--dir")
            .arg(self.dir.path())
            .arg("--save")
            .arg("")
            .arg("--protected-mode")
            .arg("no");
        if self.aof {
            cmd.args(["--appendonly", "yes", "--appendfsync", "always"]);
        } else {
            cmd.args(["--appendonly", "no"]);
        }
        let child = cmd
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("cannot start redis-server: install it (apt-get install -y redis-server)")?;
        self.child = Some(child);
        let port = self.port;
        wait_until_sync(
            "redis-server to answer PING",
            Duration::from_secs(10),
            || {
                let client = redis::Client::open(format!("redis://127.0.0.1:{port}/")).ok()?;
                let mut c = client.get_connection().ok()?;
                redis::cmd("PING").query::<String>(&mut c).ok()
            },
        )?;
        Ok(())
    }

    /// `redis://127.0.0.1:<port>/0`.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/0", self.port)
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// A synchronous connection for assertions.
    pub fn conn(&self) -> Result<redis::Connection> {
        Ok(redis::Client::open(self.url())?.get_connection()?)
    }

    /// Stops the server the way an operator would (`SHUTDOWN`, which writes
    /// the AOF) and starts it again on the same port and data directory.
    pub fn restart(&mut self) -> Result<()> {
        if let Ok(mut c) = self.conn() {
            let _: redis::RedisResult<()> = redis::cmd("SHUTDOWN").query(&mut c);
        }
        if let Some(mut child) = self.child.take() {
            child.wait()?;
        }
        self.spawn()
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Path of a workspace binary, built on first use (`cargo test` does not
/// build other packages' binaries).
pub fn bin(name: &str) -> Result<PathBuf> {
    static BUILT: OnceLock<std::result::Result<PathBuf, String>> = OnceLock::new();
    let dir = BUILT
        .get_or_init(|| build_bins().map_err(|e| format!("{e:#}")))
        .clone()
        .map_err(anyhow::Error::msg)?;
    let p = dir.join(name);
    if !p.exists() {
        bail!("{} was not built", p.display());
    }
    Ok(p)
}

fn build_bins() -> Result<PathBuf> {
    // target/<profile>/deps/<test binary> → target/<profile>
    let exe = std::env::current_exe()?;
    let profile_dir = exe
        .parent()
        .and_then(Path::parent)
        .context("cannot locate the target directory")?
        .to_path_buf();
    let release = profile_dir.file_name().is_some_and(|n| n == "release");
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let mut cmd = Command::new(cargo);
    cmd.args([
        "build",
        "--quiet",
        "-p",
        "taskstack-worker",
        "-p",
        "taskstack-beat",
    ]);
    if release {
        cmd.arg("--release");
    }
    let target_dir = profile_dir.parent().context("no target dir")?;
    cmd.env("CARGO_TARGET_DIR", target_dir);
    let status = cmd.status().context("cannot run cargo build")?;
    if !status.success() {
        bail!("cargo build -p taskstack-worker -p taskstack-beat failed: {status}");
    }
    Ok(profile_dir)
}

/// A `taskstack-worker` process, killed on drop.
#[derive(Debug)]
pub struct WorkerProcess {
    child: Option<Child>,
    pub state_file: PathBuf,
    _dir: tempfile::TempDir,
    log: PathBuf,
}

impl WorkerProcess {
    /// Starts a worker against `redis_url` in `namespace`, with extra
    /// `TASKSTACK_*` variables.
    pub fn spawn(redis_url: &str, namespace: &str, env: &[(&str, &str)]) -> Result<Self> {
        let dir = tempfile::tempdir()?;
        let state_file = dir.path().join("worker.json");
        let log = dir.path().join("worker.log");
        let mut cmd = Self::command(redis_url, namespace, &state_file)?;
        for (k, v) in env {
            cmd.env(k, v);
        }
        let child = cmd
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log)?)
            .spawn()
            .context("cannot start taskstack-worker")?;
        Ok(Self {
            child: Some(child),
            state_file,
            _dir: dir,
            log,
        })
    }

    /// The command with a clean environment for this test.
    pub fn command(redis_url: &str, namespace: &str, state_file: &Path) -> Result<Command> {
        let mut cmd = Command::new(bin("taskstack-worker")?);
        for (k, _) in std::env::vars() {
            if k.starts_with("TASKSTACK_") {
                cmd.env_remove(k);
            }
        }
        cmd.env("TASKSTACK_BROKER_URL", redis_url)
            .env("TASKSTACK_NAMESPACE", namespace)
            .env("TASKSTACK_WORKER_STATE_FILE", state_file)
            .env("TASKSTACK_ALLOW_ROOT", "1")
            .env("TASKSTACK_LOG_FORMAT", "json")
            .env("TASKSTACK_LOG_LEVEL", "info");
        Ok(cmd)
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().map_or(0, Child::id)
    }

    /// Sends a real signal to the process.
    pub fn signal(&self, sig: nix::sys::signal::Signal) -> Result<()> {
        let pid = nix::unistd::Pid::from_raw(i32::try_from(self.pid())?);
        nix::sys::signal::kill(pid, sig)?;
        Ok(())
    }

    /// Waits for the process to exit, up to `deadline`.
    pub fn wait_exit(&mut self, deadline: Duration) -> Result<std::process::ExitStatus> {
        let child = self.child.as_mut().context("already reaped")?;
        let status = wait_until_sync("worker to exit", deadline, || {
            child.try_wait().ok().flatten()
        })?;
        self.child = None;
        Ok(status)
    }

    /// What the worker logged so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Waits until the worker logged `needle`.
    pub fn wait_log(&self, needle: &str, deadline: Duration) -> Result<()> {
        wait_until_sync(
            &format!("worker log line containing {needle:?}"),
            deadline,
            || self.log().contains(needle).then_some(()),
        )
        .with_context(|| format!("worker log:\n{}", self.log()))
    }
}

impl Drop for WorkerProcess {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// A unique namespace for one test.
pub fn namespace(test: &str) -> String {
    format!(
        "t-{test}-{}",
        &uuid::Uuid::new_v4().simple().to_string()[..8]
    )
}

/// A producer and broker for `redis_url` in `namespace`.
pub fn producer(redis_url: &str, namespace: &str) -> Result<taskstack::Producer> {
    let broker = broker(redis_url, namespace)?;
    Ok(taskstack::Producer::new(broker, "test@localhost"))
}

/// A broker handle for `redis_url` in `namespace`.
pub fn broker(redis_url: &str, namespace: &str) -> Result<taskstack::broker::Broker> {
    let target = taskstack::config::RedisTarget::from_url(redis_url)?;
    let pool = taskstack::broker::RedisPool::new(&target, 8, Duration::from_secs(5))?;
    Ok(taskstack::broker::Broker::new(
        pool.clone(),
        pool,
        taskstack::proto::Keys::new(namespace),
    ))
}

/// A worker engine running inside the test process.
#[derive(Debug)]
pub struct InProcessWorker {
    stop: tokio_util::sync::CancellationToken,
    handle: tokio::task::JoinHandle<
        Result<taskstack::worker::RunSummary, taskstack::worker::WorkerError>,
    >,
    pub id: String,
}

/// Default settings for in-process workers: short lease, small drain.
pub fn settings(queues: &[&str]) -> taskstack::worker::WorkerSettings {
    taskstack::worker::WorkerSettings {
        queues: queues.iter().map(|q| (*q).to_owned()).collect(),
        concurrency: 8,
        prefetch: 32,
        lease: Duration::from_secs(3),
        drain_timeout: Duration::from_secs(5),
        result_expires: Duration::from_secs(600),
        state_file: None,
    }
}

impl InProcessWorker {
    /// Starts an engine with `registry` and `settings`.
    pub fn start(
        redis_url: &str,
        namespace: &str,
        registry: taskstack::worker::Registry,
        settings: taskstack::worker::WorkerSettings,
    ) -> Result<Self> {
        taskstack::telemetry::init("taskstack=info", taskstack::config::LogFormat::Pretty);
        let worker =
            taskstack::worker::Worker::new(broker(redis_url, namespace)?, registry, settings);
        let id = worker.id().to_owned();
        let stop = tokio_util::sync::CancellationToken::new();
        let s = stop.clone();
        let handle = tokio::spawn(async move { worker.run(s.cancelled_owned()).await });
        Ok(Self { stop, handle, id })
    }

    /// Stops it gracefully and returns its summary.
    pub async fn stop(self) -> Result<taskstack::worker::RunSummary> {
        self.stop.cancel();
        Ok(self.handle.await??)
    }
}

/// A `taskstack-beat` process with its own configuration file, state file
/// and log, killed on drop.
#[derive(Debug)]
pub struct BeatProcess {
    child: Option<Child>,
    pub state_file: PathBuf,
    pub config_file: PathBuf,
    _dir: tempfile::TempDir,
    log: PathBuf,
    redis_url: String,
    namespace: String,
}

impl BeatProcess {
    /// Starts a beat against `redis_url` in `namespace`, with `toml` (the
    /// `[[schedule]]` entries and any other keys) as its configuration file
    /// and extra `TASKSTACK_*` variables. Metrics are off unless `env` says.
    pub fn spawn(
        redis_url: &str,
        namespace: &str,
        toml: &str,
        env: &[(&str, &str)],
    ) -> Result<Self> {
        let dir = tempfile::tempdir()?;
        let state_file = dir.path().join("beat.json");
        let config_file = dir.path().join("beat.toml");
        let log = dir.path().join("beat.log");
        std::fs::write(&config_file, toml)?;
        let mut cmd = Self::command(redis_url, namespace, &state_file, &config_file)?;
        for (k, v) in env {
            cmd.env(k, v);
        }
        let child = cmd
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log)?)
            .spawn()
            .context("cannot start taskstack-beat")?;
        Ok(Self {
            child: Some(child),
            state_file,
            config_file,
            _dir: dir,
            log,
            redis_url: redis_url.to_owned(),
            namespace: namespace.to_owned(),
        })
    }

    /// The command with a clean environment for this test.
    pub fn command(
        redis_url: &str,
        namespace: &str,
        state_file: &Path,
        config_file: &Path,
    ) -> Result<Command> {
        let mut cmd = Command::new(bin("taskstack-beat")?);
        for (k, _) in std::env::vars() {
            if k.starts_with("TASKSTACK_") {
                cmd.env_remove(k);
            }
        }
        cmd.env("TASKSTACK_BROKER_URL", redis_url)
            .env("TASKSTACK_NAMESPACE", namespace)
            .env("TASKSTACK_CONFIG", config_file)
            .env("TASKSTACK_BEAT_STATE_FILE", state_file)
            .env("TASKSTACK_BEAT_METRICS_LISTEN", "off")
            .env("TASKSTACK_ALLOW_ROOT", "1")
            .env("TASKSTACK_LOG_FORMAT", "json")
            .env("TASKSTACK_LOG_LEVEL", "info");
        Ok(cmd)
    }

    /// `taskstack-beat healthcheck` for this instance, run to completion.
    pub fn healthcheck(&self) -> Result<std::process::Output> {
        Ok(Self::command(
            &self.redis_url,
            &self.namespace,
            &self.state_file,
            &self.config_file,
        )?
        .arg("healthcheck")
        .output()?)
    }

    /// The instance id it recorded in its state file (once ready).
    pub fn instance_id(&self) -> Option<String> {
        let v: serde_json::Value =
            serde_json::from_slice(&std::fs::read(&self.state_file).ok()?).ok()?;
        v["id"].as_str().map(str::to_owned)
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().map_or(0, Child::id)
    }

    /// Whether the process is still running (not reaped).
    pub fn is_running(&self) -> bool {
        self.child.is_some()
    }

    /// Sends a real signal to the process.
    pub fn signal(&self, sig: nix::sys::signal::Signal) -> Result<()> {
        let pid = nix::unistd::Pid::from_raw(i32::try_from(self.pid())?);
        nix::sys::signal::kill(pid, sig)?;
        Ok(())
    }

    /// SIGKILL, then reaps the process.
    pub fn kill(&mut self) -> Result<()> {
        if let Some(mut c) = self.child.take() {
            c.kill()?;
            c.wait()?;
        }
        Ok(())
    }

    /// Waits for the process to exit, up to `deadline`.
    pub fn wait_exit(&mut self, deadline: Duration) -> Result<std::process::ExitStatus> {
        let child = self.child.as_mut().context("already reaped")?;
        let status = wait_until_sync("beat to exit", deadline, || child.try_wait().ok().flatten())?;
        self.child = None;
        Ok(status)
    }

    /// What the beat logged so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Waits until the beat logged `needle`.
    pub fn wait_log(&self, needle: &str, deadline: Duration) -> Result<()> {
        wait_until_sync(
            &format!("beat log line containing {needle:?}"),
            deadline,
            || self.log().contains(needle).then_some(()),
        )
        .with_context(|| format!("beat log:\n{}", self.log()))
    }
}

impl Drop for BeatProcess {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            // A stopped (SIGSTOP) process still dies of SIGKILL.
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}
