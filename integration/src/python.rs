//! Python tools the tests drive (the real Celery, schemathesis, the
//! Kubernetes manifest checkers), each in a virtual environment under the
//! target directory, made on first use.

use anyhow::{Context as _, Result, bail, ensure};
use std::collections::HashMap;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// A Python environment: its interpreter.
#[derive(Debug, Clone)]
pub struct Venv {
    pub python: PathBuf,
}

impl Venv {
    /// The venv `target/<name>` holding `requirement`, made (once per
    /// process) with `python3 -m venv` and pip when missing or when
    /// `check` (Python source) fails in it. `override_var`, when set in the
    /// environment, names an interpreter to use instead.
    pub fn ensure(name: &str, requirement: &str, check: &str, override_var: &str) -> Result<Self> {
        if let Some(p) = std::env::var_os(override_var) {
            let python = PathBuf::from(p);
            ensure!(
                passes(&python, check),
                "{override_var}={} cannot run `{check}`",
                python.display()
            );
            return Ok(Self { python });
        }
        static MADE: Mutex<Option<HashMap<String, std::result::Result<PathBuf, String>>>> =
            Mutex::new(None);
        let mut made = MADE
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let entry = made
            .get_or_insert_with(HashMap::new)
            .entry(name.to_owned())
            .or_insert_with(|| make(name, requirement, check).map_err(|e| format!("{e:#}")));
        let python = entry.clone().map_err(anyhow::Error::msg)?;
        Ok(Self { python })
    }

    /// `python -m <module>` with a clean Python environment.
    pub fn module(&self, module: &str) -> Command {
        let mut cmd = Command::new(&self.python);
        cmd.arg("-m").arg(module);
        clean_env(&mut cmd);
        cmd
    }
}

/// The tests' Python files (`integration/python`).
pub fn python_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("python")
}

/// The Celery the interoperability tests run against.
pub const CELERY_REQUIREMENT: &str = "celery[redis]==5.*";

/// A Python interpreter that can `import celery, redis`: the one named by
/// `TASKSTACK_CELERY_PYTHON`, or `target/celery-venv/bin/python`, created
/// (once per process) with `python3 -m venv` and pip when missing or broken.
pub fn celery_python() -> Result<PathBuf> {
    Ok(Venv::ensure(
        "celery-venv",
        CELERY_REQUIREMENT,
        "import celery, redis",
        "TASKSTACK_CELERY_PYTHON",
    )?
    .python)
}

/// The Kubernetes manifest checkers (`tests/kubernetes.rs`), pinned:
/// `kubernetes-validate` ships the Kubernetes JSON schemas it validates
/// against, `checkov` checks the security posture, PyYAML reads and
/// writes the manifests (`kubernetes_manifests.py`, `kustomize_render.py`).
pub const KUBERNETES_TOOLS_REQUIREMENT: &str =
    "kubernetes-validate==1.37.0 checkov==3.3.30 PyYAML==6.0.4";

/// A venv with [`KUBERNETES_TOOLS_REQUIREMENT`]: the interpreter named by
/// `TASKSTACK_KUBERNETES_PYTHON`, or `target/kubernetes-venv`, made (once
/// per process) when missing or broken. Its own venv: checkov's many
/// pinned dependencies stay away from Celery's.
pub fn kubernetes_tools() -> Result<Venv> {
    Venv::ensure(
        "kubernetes-venv",
        KUBERNETES_TOOLS_REQUIREMENT,
        "import kubernetes_validate, checkov, jsonschema, yaml",
        "TASKSTACK_KUBERNETES_PYTHON",
    )
}

/// Environment every Python process of the tests gets: nothing written
/// into the source tree, output unbuffered.
pub fn clean_env(cmd: &mut Command) -> &mut Command {
    cmd.env("PYTHONDONTWRITEBYTECODE", "1")
        .env("PYTHONUNBUFFERED", "1")
        .env_remove("PYTHONPATH")
}

/// `python` run from the Python test directory with `interop_tasks`'s
/// settings: results on the Redis at `redis_url`, the broker there too or
/// at `broker_url` (e.g. RabbitMQ).
pub fn interop_cmd(python: &Path, redis_url: &str, broker_url: Option<&str>) -> Command {
    let mut cmd = Command::new(python);
    clean_env(&mut cmd)
        .current_dir(python_dir())
        .env("INTEROP_REDIS_URL", redis_url)
        .stdin(Stdio::null());
    if let Some(b) = broker_url {
        cmd.env("INTEROP_BROKER_URL", b);
    }
    cmd
}

/// `celery -A interop_tasks <args> --json --timeout 3` run by `python`
/// (an [`interop_cmd`]): the replies, or `None` when no node replied (the
/// CLI then exits non-zero).
pub fn celery_json(mut python: Command, args: &[&str]) -> Result<Option<serde_json::Value>> {
    let out = python
        .args(["-m", "celery", "-A", "interop_tasks"])
        .args(args)
        .args(["--json", "--timeout", "3"])
        .output()?;
    if !out.status.success() {
        let err = String::from_utf8_lossy(&out.stderr);
        ensure!(
            err.contains("No nodes replied"),
            "celery {args:?} failed ({}):\n{err}",
            out.status
        );
        return Ok(None);
    }
    Ok(last_json(&out.stdout))
}

/// `control_client.py <args>` run by `python` (an [`interop_cmd`]): its
/// JSON line.
pub fn control_client(mut python: Command, args: &[&str]) -> Result<serde_json::Value> {
    let out = python.arg("control_client.py").args(args).output()?;
    ensure!(
        out.status.success(),
        "control_client.py {args:?} failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    last_json(&out.stdout).context("control_client.py printed no JSON")
}

/// The last line of `stdout` that is a JSON object.
pub fn last_json(stdout: &[u8]) -> Option<serde_json::Value> {
    String::from_utf8_lossy(stdout).lines().rev().find_map(|l| {
        serde_json::from_str::<serde_json::Value>(l.trim())
            .ok()
            .filter(serde_json::Value::is_object)
    })
}

fn passes(python: &Path, check: &str) -> bool {
    Command::new(python)
        .args(["-c", check])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// Runs `cmd` to completion, failing with its output when it does not succeed.
pub fn run(cmd: &mut Command, what: &str) -> Result<Output> {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("cannot run {what} ({cmd:?})"))?;
    if !out.status.success() {
        bail!(
            "{what} failed ({}):\nstdout:\n{}\nstderr:\n{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(out)
}

/// `target/<name>/bin/python`, made if needed (`requirement`: one or more
/// pip requirements, separated by spaces). The venv is built under a
/// name of this process's own and renamed into place, so concurrent test
/// processes never see (or reuse) a half-installed one; the scripts in its
/// `bin` are then pointed at the final path (the tests themselves use
/// `python -m ...`, which works wherever the venv lives).
fn make(name: &str, requirement: &str, check: &str) -> Result<PathBuf> {
    // target/<profile>/deps/<test binary> → target
    let exe = std::env::current_exe()?;
    let target = exe
        .parent()
        .and_then(Path::parent)
        .and_then(Path::parent)
        .context("cannot locate the target directory from the test binary's path")?;
    let venv = target.join(name);
    let python = venv.join("bin").join("python");
    if passes(&python, check) {
        return Ok(python);
    }

    let started = Instant::now();
    let tmp = target.join(format!("{name}.tmp-{}", std::process::id()));
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp)?;
    }
    run(
        Command::new("python3").arg("-m").arg("venv").arg(&tmp),
        "`python3 -m venv` (install python3 and python3-venv)",
    )?;
    let tmp_python = tmp.join("bin").join("python");
    run(
        Command::new(&tmp_python)
            .args(["-m", "pip", "install", "--quiet"])
            .args(requirement.split_whitespace())
            .env("PIP_DISABLE_PIP_VERSION_CHECK", "1"),
        &format!("`pip install {requirement}`"),
    )?;
    ensure!(
        passes(&tmp_python, check),
        "{} cannot run `{check}` after pip install",
        tmp_python.display()
    );

    // Another process may have finished first; a broken venv in the way goes.
    if passes(&python, check) {
        std::fs::remove_dir_all(&tmp)?;
        return Ok(python);
    }
    if venv.exists() {
        std::fs::remove_dir_all(&venv)?;
    }
    if let Err(e) = std::fs::rename(&tmp, &venv) {
        if passes(&python, check) {
            std::fs::remove_dir_all(&tmp)?;
            return Ok(python);
        }
        return Err(e)
            .with_context(|| format!("cannot move {} to {}", tmp.display(), venv.display()));
    }
    repoint_scripts(&venv.join("bin"), &tmp, &venv)?;
    ensure!(
        passes(&python, check),
        "{} cannot run `{check}`",
        python.display()
    );
    eprintln!(
        "created the venv {} in {:.1?}",
        venv.display(),
        started.elapsed()
    );
    Ok(python)
}

/// Rewrites `from` to `to` in the text files of a moved venv's `bin`
/// (console-script shebangs, activate scripts); symlinks and binaries stay.
fn repoint_scripts(bin: &Path, from: &Path, to: &Path) -> Result<()> {
    let (from, to) = (from.to_string_lossy(), to.to_string_lossy());
    for entry in std::fs::read_dir(bin)? {
        let path = entry?.path();
        if path.symlink_metadata()?.file_type().is_symlink() {
            continue;
        }
        let Ok(text) = std::fs::read_to_string(&path) else {
            continue;
        };
        if text.contains(from.as_ref()) {
            std::fs::write(&path, text.replace(from.as_ref(), to.as_ref()))?;
        }
    }
    Ok(())
}

/// A real Celery worker process (`-A interop_tasks`), killed on drop.
#[derive(Debug)]
pub struct CeleryWorker {
    child: Option<Child>,
    log: PathBuf,
    _dir: tempfile::TempDir,
}

impl CeleryWorker {
    /// Starts a solo-pool worker consuming only `queue`.
    pub fn spawn(python: &Path, redis_url: &str, queue: &str) -> Result<Self> {
        Self::spawn_on(python, redis_url, redis_url, queue)
    }

    /// [`CeleryWorker::spawn`] with its broker at `broker_url` (e.g.
    /// RabbitMQ) and its results on the Redis at `redis_url`.
    pub fn spawn_on(python: &Path, broker_url: &str, redis_url: &str, queue: &str) -> Result<Self> {
        let dir = tempfile::tempdir()?;
        let log = dir.path().join("celery.log");
        let out = File::create(&log)?;
        let err = out.try_clone()?;
        let mut cmd = Command::new(python);
        clean_env(&mut cmd)
            .args(["-m", "celery", "-A", "interop_tasks", "worker"])
            .args(["--pool", "solo", "--concurrency", "1", "-Q", queue])
            .args([
                "--without-gossip",
                "--without-mingle",
                "--without-heartbeat",
            ])
            .args(["-l", "info", "-n", &format!("{queue}@%h")])
            .current_dir(python_dir())
            .env("INTEROP_REDIS_URL", redis_url)
            .env("INTEROP_BROKER_URL", broker_url)
            .env("C_FORCE_ROOT", "1")
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err);
        let child = cmd.spawn().context("cannot start the Celery worker")?;
        Ok(Self {
            child: Some(child),
            log,
            _dir: dir,
        })
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Waits for Celery's `celery@<host> ready.` line, failing early with
    /// the log if the process exits.
    pub fn wait_ready(&mut self, deadline: Duration) -> Result<()> {
        let mut exited = None;
        let ready = crate::wait_until_sync(
            "the Celery worker to log that it is ready",
            deadline,
            || {
                if let Some(status) = self
                    .child
                    .as_mut()
                    .and_then(|c| c.try_wait().ok().flatten())
                {
                    exited = Some(status);
                    return Some(false);
                }
                self.log().contains(" ready.").then_some(true)
            },
        );
        match (ready, exited) {
            (Ok(true), _) => Ok(()),
            (_, Some(status)) => bail!("the Celery worker exited ({status}):\n{}", self.log()),
            (Err(e), None) => Err(e).with_context(|| format!("Celery worker log:\n{}", self.log())),
            (Ok(false), None) => bail!("the Celery worker stopped:\n{}", self.log()),
        }
    }
}

impl Drop for CeleryWorker {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Runs `python <python_dir>/<script> <args>` (a Celery client of the
/// tests) for at most two minutes and returns the last line it printed
/// that is a JSON object: what the client saw. A failure, a hang or no
/// JSON line is an error carrying the client's output and `context` (e.g.
/// the worker's log).
pub async fn run_client(
    python: &Path,
    script: &str,
    args: &[&str],
    context: impl Fn() -> String,
) -> Result<serde_json::Value> {
    let mut cmd = tokio::process::Command::new(python);
    cmd.arg(python_dir().join(script))
        .args(args)
        .current_dir(python_dir())
        .env("PYTHONDONTWRITEBYTECODE", "1")
        .env("PYTHONUNBUFFERED", "1")
        .env_remove("PYTHONPATH")
        .stdin(Stdio::null())
        .kill_on_drop(true);
    let out = tokio::time::timeout(Duration::from_secs(120), cmd.output())
        .await
        .with_context(|| format!("{script} {args:?} hung; worker log:\n{}", context()))??;
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    ensure!(
        out.status.success(),
        "{script} {args:?} failed ({}):\nstdout:\n{stdout}\nstderr:\n{stderr}\nworker log:\n{}",
        out.status,
        context()
    );
    let seen = stdout
        .lines()
        .rev()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l.trim()).ok())
        .find(serde_json::Value::is_object)
        .with_context(|| format!("{script} printed no JSON line:\n{stdout}\nstderr:\n{stderr}"))?;
    eprintln!("Celery client saw: {seen}");
    Ok(seen)
}
