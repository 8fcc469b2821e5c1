//! Building the workspace's binaries and running one as a child process
//! with a clean `TASKSTACK_*` environment, a log file and real signals.

use crate::wait_until_sync;
use anyhow::{Context as _, Result, bail};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::Duration;

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
        "-p",
        "taskstack-web",
    ]);
    if release {
        cmd.arg("--release");
    }
    let target_dir = profile_dir.parent().context("no target dir")?;
    cmd.env("CARGO_TARGET_DIR", target_dir);
    let status = cmd.status().context("cannot run cargo build")?;
    if !status.success() {
        bail!(
            "cargo build -p taskstack-worker -p taskstack-beat -p taskstack-web failed: {status}"
        );
    }
    Ok(profile_dir)
}

/// `name` (a workspace binary) with every inherited `TASKSTACK_*` variable
/// removed and the ones every test service needs set.
pub(crate) fn clean_command(name: &str, redis_url: &str, namespace: &str) -> Result<Command> {
    let mut cmd = Command::new(bin(name)?);
    for (k, _) in std::env::vars() {
        if k.starts_with("TASKSTACK_") {
            cmd.env_remove(k);
        }
    }
    cmd.env("TASKSTACK_BROKER_URL", redis_url)
        .env("TASKSTACK_NAMESPACE", namespace)
        .env("TASKSTACK_ALLOW_ROOT", "1")
        .env("TASKSTACK_LOG_FORMAT", "json")
        .env("TASKSTACK_LOG_LEVEL", "info")
        // Tests run many services at once: no fixed metrics ports unless a
        // test asks for one.
        .env("TASKSTACK_WORKER_METRICS_LISTEN", "off");
    Ok(cmd)
}

/// Runs `cmd` to its exit (stdout and stderr captured), killing it after
/// `deadline`: a service that starts instead of refusing runs forever.
pub fn run_to_exit(mut cmd: Command, deadline: Duration) -> Result<std::process::Output> {
    let mut child = cmd.stdout(Stdio::piped()).stderr(Stdio::piped()).spawn()?;
    wait_until_sync("the process to exit", deadline, || {
        child.try_wait().ok().flatten()
    })
    .inspect_err(|_| {
        let _ = child.kill();
    })?;
    Ok(child.wait_with_output()?)
}

/// A running service binary (its stderr in a log file), killed on drop.
#[derive(Debug)]
pub struct ServiceProcess {
    child: Option<Child>,
    what: &'static str,
    log: PathBuf,
}

impl ServiceProcess {
    /// Spawns `cmd` with `env` added, logging to `log`.
    pub(crate) fn spawn(
        what: &'static str,
        mut cmd: Command,
        env: &[(&str, &str)],
        log: PathBuf,
    ) -> Result<Self> {
        for (k, v) in env {
            cmd.env(k, v);
        }
        let child = cmd
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log)?)
            .spawn()
            .with_context(|| format!("cannot start the {what}"))?;
        Ok(Self {
            child: Some(child),
            what,
            log,
        })
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
        let status = wait_until_sync(&format!("the {} to exit", self.what), deadline, || {
            child.try_wait().ok().flatten()
        })?;
        self.child = None;
        Ok(status)
    }

    /// What the process logged so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Waits until the process logged `needle`.
    pub fn wait_log(&self, needle: &str, deadline: Duration) -> Result<()> {
        wait_until_sync(
            &format!("{} log line containing {needle:?}", self.what),
            deadline,
            || self.log().contains(needle).then_some(()),
        )
        .with_context(|| format!("{} log:\n{}", self.what, self.log()))
    }
}

impl Drop for ServiceProcess {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            // A stopped (SIGSTOP) process still dies of SIGKILL.
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}
