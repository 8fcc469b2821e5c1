//! Worker processes and in-process worker engines.

use crate::process::{ServiceProcess, clean_command};
use anyhow::Result;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

/// A `taskstack-worker` process, killed on drop.
#[derive(Debug)]
pub struct WorkerProcess {
    process: ServiceProcess,
    pub state_file: PathBuf,
    _dir: tempfile::TempDir,
}

impl std::ops::Deref for WorkerProcess {
    type Target = ServiceProcess;
    fn deref(&self) -> &ServiceProcess {
        &self.process
    }
}

impl std::ops::DerefMut for WorkerProcess {
    fn deref_mut(&mut self) -> &mut ServiceProcess {
        &mut self.process
    }
}

impl WorkerProcess {
    /// Starts a worker against `redis_url` in `namespace`, with extra
    /// `TASKSTACK_*` variables.
    pub fn spawn(redis_url: &str, namespace: &str, env: &[(&str, &str)]) -> Result<Self> {
        let dir = tempfile::tempdir()?;
        let state_file = dir.path().join("worker.json");
        let cmd = Self::command(redis_url, namespace, &state_file)?;
        let process = ServiceProcess::spawn("worker", cmd, env, dir.path().join("worker.log"))?;
        Ok(Self {
            process,
            state_file,
            _dir: dir,
        })
    }

    /// Starts a worker as an operator would on a shared host: no state file
    /// and no metrics address configured, so both are the defaults (a state
    /// file per process in /tmp, metrics on 9101 or a free port).
    pub fn spawn_with_host_defaults(
        redis_url: &str,
        namespace: &str,
        env: &[(&str, &str)],
    ) -> Result<Self> {
        let dir = tempfile::tempdir()?;
        let mut cmd = clean_command("taskstack-worker", redis_url, namespace)?;
        cmd.env_remove("TASKSTACK_WORKER_METRICS_LISTEN");
        let process = ServiceProcess::spawn("worker", cmd, env, dir.path().join("worker.log"))?;
        let state_file = PathBuf::from(format!("/tmp/taskstack-worker-{}.json", process.pid()));
        Ok(Self {
            process,
            state_file,
            _dir: dir,
        })
    }

    /// The command with a clean environment for this test.
    pub fn command(redis_url: &str, namespace: &str, state_file: &Path) -> Result<Command> {
        let mut cmd = clean_command("taskstack-worker", redis_url, namespace)?;
        cmd.env("TASKSTACK_WORKER_STATE_FILE", state_file);
        Ok(cmd)
    }
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
        result_extended: false,
        max_message_size: 1 << 20,
        max_task_delay: taskstack::config::DEFAULT_MAX_TASK_DELAY,
        state_file: None,
        nodename: None,
        remote_control: taskstack::config::RemoteControl::default(),
        task_events: false,
        track_started: false,
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
        let worker = taskstack::worker::Worker::new(
            crate::broker(redis_url, namespace)?,
            registry,
            settings,
        );
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
