//! Beat processes, each with its own configuration file and state file.

use crate::process::{ServiceProcess, clean_command};
use anyhow::Result;
use std::path::{Path, PathBuf};
use std::process::Command;

/// A `taskstack-beat` process with its own configuration file, state file
/// and log, killed on drop.
#[derive(Debug)]
pub struct BeatProcess {
    process: ServiceProcess,
    pub state_file: PathBuf,
    pub config_file: PathBuf,
    _dir: tempfile::TempDir,
    redis_url: String,
    namespace: String,
}

impl std::ops::Deref for BeatProcess {
    type Target = ServiceProcess;
    fn deref(&self) -> &ServiceProcess {
        &self.process
    }
}

impl std::ops::DerefMut for BeatProcess {
    fn deref_mut(&mut self) -> &mut ServiceProcess {
        &mut self.process
    }
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
        Self::launch(redis_url, namespace, toml, env, false)
    }

    /// Starts a beat with the host defaults for its state file (one per
    /// process in /tmp) and metrics address (9102, or a free port when taken).
    pub fn spawn_with_host_defaults(
        redis_url: &str,
        namespace: &str,
        toml: &str,
        env: &[(&str, &str)],
    ) -> Result<Self> {
        Self::launch(redis_url, namespace, toml, env, true)
    }

    fn launch(
        redis_url: &str,
        namespace: &str,
        toml: &str,
        env: &[(&str, &str)],
        host_defaults: bool,
    ) -> Result<Self> {
        let dir = tempfile::tempdir()?;
        let config_file = dir.path().join("beat.toml");
        std::fs::write(&config_file, toml)?;
        let (cmd, state_file) = if host_defaults {
            let mut cmd = clean_command("taskstack-beat", redis_url, namespace)?;
            cmd.env("TASKSTACK_CONFIG", &config_file);
            (cmd, None)
        } else {
            let state_file = dir.path().join("beat.json");
            let cmd = Self::command(redis_url, namespace, &state_file, &config_file)?;
            (cmd, Some(state_file))
        };
        let process = ServiceProcess::spawn("beat", cmd, env, dir.path().join("beat.log"))?;
        let state_file = state_file.unwrap_or_else(|| {
            PathBuf::from(format!("/tmp/taskstack-beat-{}.json", process.pid()))
        });
        Ok(Self {
            process,
            state_file,
            config_file,
            _dir: dir,
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
        let mut cmd = clean_command("taskstack-beat", redis_url, namespace)?;
        cmd.env("TASKSTACK_CONFIG", config_file)
            .env("TASKSTACK_BEAT_STATE_FILE", state_file)
            .env("TASKSTACK_BEAT_METRICS_LISTEN", "off");
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

    /// [`BeatProcess::healthcheck`] with the `TASKSTACK_*` variables `env`
    /// (those the beat was started with, when they name its stores).
    pub fn healthcheck_with(&self, env: &[(&str, &str)]) -> Result<std::process::Output> {
        Ok(Self::command(
            &self.redis_url,
            &self.namespace,
            &self.state_file,
            &self.config_file,
        )?
        .envs(env.iter().copied())
        .arg("healthcheck")
        .output()?)
    }

    /// The instance id it recorded in its state file (once ready).
    pub fn instance_id(&self) -> Option<String> {
        let v: serde_json::Value =
            serde_json::from_slice(&std::fs::read(&self.state_file).ok()?).ok()?;
        v["id"].as_str().map(str::to_owned)
    }
}
