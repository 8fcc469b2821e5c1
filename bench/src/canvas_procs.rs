//! The processes of the canvas and drain benchmarks (`bin/canvas.rs`,
//! `bin/drain_defaults.rs`): a `taskstack-worker`, a Python Celery worker,
//! and the Celery client that sends one canvas
//! (`bench/python/canvas_tasks.py`).

use anyhow::{Context as _, Result, bail};
use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;
use serde_json::Value;
use std::cell::RefCell;
use std::io::{BufRead as _, BufReader, Write as _};
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;
use taskstack_integration::wait_until_sync;

const LOG_TAIL: usize = 40;

/// The Celery worker's execution pool.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub(crate) enum CeleryPool {
    /// `-P prefork -c <--celery-concurrency>`: Celery's default pool.
    Prefork,
    /// `-P solo`: tasks run in the worker process, one at a time.
    Solo,
}

impl CeleryPool {
    pub(crate) fn args(self, concurrency: usize) -> Vec<String> {
        match self {
            Self::Prefork => vec![
                "-P".into(),
                "prefork".into(),
                "-c".into(),
                concurrency.to_string(),
            ],
            Self::Solo => vec!["-P".into(), "solo".into()],
        }
    }
}

/// The worker binary: `path`, or `<target dir>/release/taskstack-worker`
/// beside this benchmark's own binary.
pub(crate) fn worker_bin(path: Option<&Path>) -> Result<PathBuf> {
    let bin = match path {
        Some(p) => p.to_path_buf(),
        None => std::env::current_exe()?.with_file_name("taskstack-worker"),
    };
    if !bin.is_file() {
        bail!(
            "{} not found: cargo build --release -p taskstack-worker (or --worker-bin PATH)",
            bin.display()
        );
    }
    Ok(bin)
}

/// A Python that can import Celery: `TASKSTACK_CELERY_PYTHON`, or the
/// integration tests' venv `<target dir>/celery-venv` (never made here).
pub(crate) fn celery_python() -> Result<PathBuf> {
    if std::env::var_os("TASKSTACK_CELERY_PYTHON").is_some() {
        return taskstack_integration::python::celery_python();
    }
    let exe = std::env::current_exe()?;
    let venv = exe
        .parent()
        .and_then(Path::parent)
        .context("cannot locate the target directory")?
        .join("celery-venv/bin/python");
    if !venv.is_file() {
        bail!(
            "no Celery venv at {}: set TASKSTACK_CELERY_PYTHON to a Python with celery[redis] \
             (the integration tests make target/celery-venv), or pass --no-celery",
            venv.display()
        );
    }
    Ok(venv)
}

/// `--set NAME=VALUE` settings as the worker's environment: `CONCURRENCY=64`
/// (or `TASKSTACK_CONCURRENCY=64`) becomes `TASKSTACK_CONCURRENCY=64`.
pub(crate) fn settings_env(settings: &[String]) -> Result<Vec<(String, String)>> {
    let mut env = Vec::new();
    for s in settings {
        let Some((name, value)) = s.split_once('=') else {
            bail!("--set {s:?}: expected NAME=VALUE, e.g. CONCURRENCY=64");
        };
        let name = name.trim().to_ascii_uppercase();
        let name = name.strip_prefix("TASKSTACK_").unwrap_or(&name);
        if name.is_empty() {
            bail!("--set {s:?}: no name");
        }
        env.push((format!("TASKSTACK_{name}"), value.to_owned()));
    }
    Ok(env)
}

/// The message Python Celery's own client writes for
/// `send_task("taskstack.echo", args=[arg])`: sent by
/// `bench/python/envelope.py` to `queue` of the server at `url` (which
/// should hold nothing else there), then taken off that list.
pub(crate) async fn celery_envelope(
    python: &Path,
    url: &str,
    queue: &str,
    arg: u64,
    con: &mut redis::aio::MultiplexedConnection,
) -> Result<String> {
    let mut cmd = Command::new(python);
    cmd.args(["envelope.py", queue, &arg.to_string()])
        .current_dir(python_dir())
        .env("BENCH_CELERY_URL", url)
        .stdin(Stdio::null());
    taskstack_integration::python::clean_env(&mut cmd);
    let out = cmd
        .output()
        .with_context(|| format!("cannot run the Celery client ({cmd:?})"))?;
    if !out.status.success() {
        bail!(
            "envelope.py exited with {}: {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let msg: Option<String> = redis::cmd("RPOP").arg(queue).query_async(con).await?;
    msg.with_context(|| format!("envelope.py sent nothing to the list {queue:?}"))
}

fn python_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("python")
}

/// A worker process in a process group of its own (Celery's prefork
/// children included), its output in a log file; killed on drop.
#[derive(Debug)]
pub(crate) struct Service {
    name: &'static str,
    child: RefCell<Child>,
    log: PathBuf,
    namespace: String,
    _dir: tempfile::TempDir,
}

impl Service {
    /// A `taskstack-worker` in a fresh namespace, ready, with `env` set
    /// (every other `TASKSTACK_*` variable removed, so its settings are
    /// the defaults unless `env` names them).
    pub(crate) fn taskstack(bin: &Path, url: &str, env: &[(&str, String)]) -> Result<Self> {
        let dir = tempfile::tempdir()?;
        let namespace = taskstack_integration::namespace("bench");
        let mut cmd = Command::new(bin);
        for (k, _) in std::env::vars_os() {
            if k.to_string_lossy().starts_with("TASKSTACK_") {
                cmd.env_remove(k);
            }
        }
        cmd.env("TASKSTACK_BROKER_URL", url)
            .env("TASKSTACK_NAMESPACE", &namespace)
            .env("TASKSTACK_ALLOW_ROOT", "1")
            .env("TASKSTACK_WORKER_STATE_FILE", dir.path().join("w.json"))
            .env("TASKSTACK_WORKER_METRICS_LISTEN", "off")
            .env(
                "TASKSTACK_LOG_LEVEL",
                "warn,taskstack::worker=info,taskstack::worker::handle=warn",
            )
            .envs(env.iter().map(|(k, v)| (*k, v.as_str())));
        Self::start("taskstack-worker", cmd, dir, namespace, "worker ready")
    }

    /// A Celery worker serving `celery` with the tasks of `app`
    /// (`bench/python/<app>.py`, which prints `BENCH-WORKER-READY` when
    /// ready), with the pool `pool` of `concurrency` processes, ready.
    pub(crate) fn celery(
        python: &Path,
        url: &str,
        app: &str,
        pool: CeleryPool,
        concurrency: usize,
    ) -> Result<Self> {
        Self::celery_on(python, url, url, app, pool, concurrency)
    }

    /// [`Service::celery`] with the broker at `broker` and the results at
    /// `results` (`BENCH_CELERY_RESULT_URL`; the app must read it).
    pub(crate) fn celery_on(
        python: &Path,
        broker: &str,
        results: &str,
        app: &str,
        pool: CeleryPool,
        concurrency: usize,
    ) -> Result<Self> {
        let dir = tempfile::tempdir()?;
        let mut cmd = Command::new(python);
        cmd.args(["-m", "celery", "-A", app, "worker"])
            .args(pool.args(concurrency))
            .args(["--loglevel", "WARNING", "-Q", "celery"])
            .current_dir(python_dir())
            .env("BENCH_CELERY_URL", broker)
            .env("BENCH_CELERY_RESULT_URL", results);
        taskstack_integration::python::clean_env(&mut cmd);
        Self::start(
            "celery worker",
            cmd,
            dir,
            String::new(),
            "BENCH-WORKER-READY",
        )
    }

    fn start(
        name: &'static str,
        mut cmd: Command,
        dir: tempfile::TempDir,
        namespace: String,
        ready: &str,
    ) -> Result<Self> {
        let log = dir.path().join("worker.log");
        let file = std::fs::File::create(&log)?;
        cmd.stdin(Stdio::null())
            .stdout(file.try_clone()?)
            .stderr(file)
            .process_group(0);
        let child = cmd
            .spawn()
            .with_context(|| format!("cannot start the {name} ({cmd:?})"))?;
        let s = Self {
            name,
            child: RefCell::new(child),
            log,
            namespace,
            _dir: dir,
        };
        wait_until_sync(
            &format!("the {name} to log {ready:?}"),
            Duration::from_secs(120),
            || {
                if let Err(e) = s.check_running() {
                    return Some(Err(e));
                }
                std::fs::read_to_string(&s.log)
                    .ok()
                    .filter(|l| l.contains(ready))
                    .map(|_| Ok(()))
            },
        )
        .and_then(|r| r)
        .with_context(|| format!("{name} log tail:\n{}", s.log_tail()))?;
        Ok(s)
    }

    pub(crate) fn name(&self) -> &'static str {
        self.name
    }

    /// The process id (of the group leader: Celery's main process).
    pub(crate) fn pid(&self) -> u32 {
        self.child.borrow().id()
    }

    pub(crate) fn namespace(&self) -> &str {
        &self.namespace
    }

    pub(crate) fn check_running(&self) -> Result<()> {
        if let Some(status) = self.child.borrow_mut().try_wait()? {
            bail!(
                "the {} exited early with {status}; log tail:\n{}",
                self.name,
                self.log_tail()
            );
        }
        Ok(())
    }

    pub(crate) fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(LOG_TAIL)..].join("\n")
    }

    fn pgid(&self) -> Result<Pid> {
        Ok(Pid::from_raw(i32::try_from(self.child.borrow().id())?))
    }

    /// SIGTERM (a graceful stop for both workers), then waits for the exit.
    pub(crate) fn stop(self) -> Result<()> {
        nix::sys::signal::kill(self.pgid()?, Signal::SIGTERM)?;
        let status = wait_until_sync(
            &format!("the {} to exit after SIGTERM", self.name),
            Duration::from_secs(60),
            || self.child.borrow_mut().try_wait().ok().flatten(),
        )?;
        if !status.success() {
            bail!(
                "the {} exited with {status} after SIGTERM; log tail:\n{}",
                self.name,
                self.log_tail()
            );
        }
        Ok(())
    }
}

impl Drop for Service {
    fn drop(&mut self) {
        // The whole group: a prefork worker's children too.
        if let Ok(pgid) = self.pgid() {
            let _ = killpg(pgid, Signal::SIGKILL);
        }
        let _ = self.child.get_mut().wait();
    }
}

/// What the Celery client reported after `apply_async`.
#[derive(Debug)]
pub(crate) struct Sent {
    /// Unix time at the start of `apply_async`.
    pub(crate) send_start: f64,
    pub(crate) send_s: f64,
    pub(crate) result_id: String,
}

/// `canvas_tasks.py <kind> <n>`: the canvas built, waiting for the word to send it.
#[derive(Debug)]
pub(crate) struct CeleryClient {
    child: Child,
    stdin: Option<ChildStdin>,
    lines: mpsc::Receiver<String>,
    timeout: Duration,
    built: Result<(), String>,
}

impl CeleryClient {
    pub(crate) fn build(
        python: &Path,
        url: &str,
        kind: &str,
        n: usize,
        timeout: Duration,
    ) -> Result<Self> {
        let mut cmd = Command::new(python);
        cmd.arg("canvas_tasks.py")
            .args([kind, &n.to_string()])
            .current_dir(python_dir())
            .env("BENCH_CELERY_URL", url)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit());
        taskstack_integration::python::clean_env(&mut cmd);
        let mut child = cmd
            .spawn()
            .with_context(|| format!("cannot start the Celery client ({cmd:?})"))?;
        let stdin = child.stdin.take();
        let stdout = child.stdout.take().context("no stdout")?;
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let mut c = Self {
            child,
            stdin,
            lines,
            timeout,
            built: Ok(()),
        };
        let first = c.next_line("building the canvas")?;
        if let Some(e) = first.get("error") {
            c.built = Err(e.as_str().unwrap_or_default().to_owned());
        }
        Ok(c)
    }

    fn next_line(&mut self, what: &str) -> Result<Value> {
        let line = self.lines.recv_timeout(self.timeout).map_err(|_| {
            anyhow::anyhow!(
                "the Celery client printed nothing while {what} ({:?})",
                self.timeout
            )
        })?;
        serde_json::from_str(&line)
            .with_context(|| format!("the Celery client printed {line:?} while {what}"))
    }

    /// Sends the canvas (`apply_async`); Err when Celery could not build or
    /// send it (the message says why, as Celery did).
    pub(crate) fn send(&mut self) -> Result<Sent> {
        if let Err(e) = &self.built {
            bail!("{e}");
        }
        let mut stdin = self.stdin.take().context("no stdin")?;
        stdin.write_all(b"go\n")?;
        drop(stdin);
        let v = self.next_line("sending the canvas")?;
        if let Some(e) = v.get("error") {
            bail!("{}", e.as_str().unwrap_or_default());
        }
        let sent = Sent {
            send_start: v["send_start"].as_f64().context("no send_start")?,
            send_s: v["send_s"].as_f64().context("no send_s")?,
            result_id: v["result_id"].as_str().context("no result_id")?.to_owned(),
        };
        Ok(sent)
    }
}

impl Drop for CeleryClient {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.child.kill();
        }
        let _ = self.child.wait();
    }
}
