//! The measured `taskstack-worker` child: spawn, log capture, `/proc` CPU and RSS, stop.

use crate::Cli;
use anyhow::{Context as _, Result, bail};
use std::collections::VecDeque;
use std::io::{BufRead as _, BufReader};
use std::path::Path;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// Linux reports process CPU times in USER_HZ ticks, 100 per second.
const USER_HZ: f64 = 100.0;

const LOG_TAIL: usize = 40;

/// utime + stime of `/proc/<pid>/stat`, in seconds.
pub(crate) fn proc_cpu_s(pid: &str) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name (which may contain spaces): state is
    // field 3, utime 14, stime 15.
    let mut fields = stat
        .get(stat.rfind(')')? + 1..)?
        .split_whitespace()
        .skip(11);
    let utime: f64 = fields.next()?.parse().ok()?;
    let stime: f64 = fields.next()?.parse().ok()?;
    Some((utime + stime) / USER_HZ)
}

/// What the worker logged, and when it said it was ready.
#[derive(Debug, Default)]
struct LogState {
    ready: Option<Instant>,
    tail: VecDeque<String>,
}

/// A `taskstack-worker` process whose stderr is read by a thread; killed on
/// drop unless it was stopped.
#[derive(Debug)]
pub(crate) struct WorkerProc {
    child: Child,
    log: Arc<Mutex<LogState>>,
    reader: Option<JoinHandle<()>>,
}

impl WorkerProc {
    pub(crate) fn spawn(
        cli: &Cli,
        bin: &Path,
        url: &str,
        namespace: &str,
        state_dir: &Path,
    ) -> Result<Self> {
        let mut cmd = Command::new(bin);
        for (k, _) in std::env::vars_os() {
            if k.to_string_lossy().starts_with("TASKSTACK_") {
                cmd.env_remove(k);
            }
        }
        cmd.env("TASKSTACK_BROKER_URL", url)
            .env("TASKSTACK_NAMESPACE", namespace)
            .env("TASKSTACK_ALLOW_ROOT", "1")
            .env("TASKSTACK_WORKER_STATE_FILE", state_dir.join("w.json"))
            .env("TASKSTACK_WORKER_METRICS_LISTEN", "off")
            .env("TASKSTACK_LOG_LEVEL", &cli.worker_log_level)
            .env("TASKSTACK_LOG_FORMAT", "json")
            .env("TASKSTACK_CONCURRENCY", cli.concurrency.to_string())
            .env("TASKSTACK_PREFETCH", cli.prefetch.to_string())
            .env(
                "TASKSTACK_WORKER_SEND_TASK_EVENTS",
                if cli.task_events { "1" } else { "0" },
            )
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        let mut child = cmd
            .spawn()
            .with_context(|| format!("cannot start {}", bin.display()))?;
        let log = Arc::new(Mutex::new(LogState::default()));
        let reader = match child.stderr.take() {
            Some(stderr) => {
                let log = Arc::clone(&log);
                Some(std::thread::spawn(move || read_log(stderr, &log)))
            }
            None => None,
        };
        Ok(Self { child, log, reader })
    }

    fn state(&self) -> std::sync::MutexGuard<'_, LogState> {
        self.log.lock().unwrap_or_else(PoisonError::into_inner)
    }

    pub(crate) fn ready_at(&self) -> Option<Instant> {
        self.state().ready
    }

    pub(crate) fn log_tail(&self) -> String {
        self.state()
            .tail
            .iter()
            .map(String::as_str)
            .collect::<Vec<_>>()
            .join("\n")
    }

    pub(crate) fn check_running(&mut self) -> Result<()> {
        if let Some(status) = self.child.try_wait()? {
            bail!(
                "worker exited early with {status}; log tail:\n{}",
                self.log_tail()
            );
        }
        Ok(())
    }

    pub(crate) fn cpu_s(&self) -> Option<f64> {
        proc_cpu_s(&self.child.id().to_string())
    }

    /// `VmHWM` (peak resident set) in kB.
    pub(crate) fn peak_rss_kb(&self) -> Result<u64> {
        let path = format!("/proc/{}/status", self.child.id());
        let status =
            std::fs::read_to_string(&path).with_context(|| format!("cannot read {path}"))?;
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmHWM:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .with_context(|| format!("no VmHWM in {path}"))
    }

    /// SIGTERM, then waits for the exit.
    pub(crate) fn stop(&mut self, deadline: Duration) -> Result<ExitStatus> {
        let pid = nix::unistd::Pid::from_raw(i32::try_from(self.child.id())?);
        nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM)?;
        let child = &mut self.child;
        let status = taskstack_integration::wait_until_sync(
            "worker to exit after SIGTERM",
            deadline,
            || child.try_wait().ok().flatten(),
        )?;
        if let Some(r) = self.reader.take() {
            let _ = r.join();
        }
        Ok(status)
    }
}

impl Drop for WorkerProc {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

fn read_log(stderr: std::process::ChildStderr, log: &Mutex<LogState>) {
    for line in BufReader::new(stderr).lines() {
        let Ok(line) = line else { break };
        let now = Instant::now();
        let mut s = log.lock().unwrap_or_else(PoisonError::into_inner);
        if s.ready.is_none() && line.contains("worker ready") {
            s.ready = Some(now);
        }
        if s.tail.len() == LOG_TAIL {
            s.tail.pop_front();
        }
        s.tail.push_back(line);
    }
}
