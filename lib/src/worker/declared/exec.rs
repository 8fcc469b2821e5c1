//! Program tasks: one process (in a process group of its own) per task, the
//! task as one JSON object on its stdin, the result as JSON on its stdout.

use super::output::{self, Ended, Limit, MAX_OUTPUT, STDERR_TAIL};
use crate::config::{ConfigError, ExecDecl};
use crate::worker::{TaskContext, TaskOutcome};
use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;
use std::collections::BTreeMap;
use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::AsyncWriteExt as _;
use tokio::process::{Child, Command};
use tokio::time::Instant;

/// Time a terminated program's group gets between SIGTERM and SIGKILL.
pub const KILL_GRACE: Duration = Duration::from_secs(2);

/// Variables a program inherits from the worker (when set); everything
/// else comes from its declaration's `env`.
const INHERITED: &[&str] = &["PATH", "HOME", "LANG", "LC_ALL", "TZ", "TMPDIR"];
const DEFAULT_PATH: &str = "/usr/local/bin:/usr/bin:/bin";

/// A declared program, resolved: its absolute path, its environment.
#[derive(Debug)]
pub struct Program {
    program: PathBuf,
    args: Vec<String>,
    env: BTreeMap<OsString, OsString>,
    cwd: Option<PathBuf>,
}

fn bad(task: &str, key: &str, reason: String) -> ConfigError {
    ConfigError::Load(format!("task `{task}`: key `{key}`: {reason}"))
}

impl Program {
    /// Resolves `decl` on this machine: the working directory exists, the
    /// program is an executable file (a bare name is looked up in `PATH`, a
    /// relative path from the working directory).
    pub fn resolve(task: &str, decl: &ExecDecl) -> Result<Self, ConfigError> {
        let mut env: BTreeMap<OsString, OsString> = INHERITED
            .iter()
            .filter_map(|k| std::env::var_os(k).map(|v| (OsString::from(k), v)))
            .collect();
        env.entry("PATH".into())
            .or_insert_with(|| DEFAULT_PATH.into());
        env.extend(decl.env.iter().map(|(k, v)| (k.into(), v.into())));
        let base = std::env::current_dir().unwrap_or_else(|_| PathBuf::from("/"));
        let cwd = match &decl.cwd {
            Some(c) => {
                let c = base.join(c);
                if !c.is_dir() {
                    return Err(bad(
                        task,
                        "cwd",
                        format!("{} is not a directory", c.display()),
                    ));
                }
                Some(c)
            }
            None => None,
        };
        let dir = cwd.as_deref().unwrap_or(&base);
        let name = &decl.argv[0];
        let program = if name.contains('/') {
            let p = dir.join(name);
            if !is_executable(&p) {
                return Err(bad(
                    task,
                    "exec",
                    format!(
                        "program {name:?} ({}) is not an executable file",
                        p.display()
                    ),
                ));
            }
            p
        } else {
            let path = env
                .get(&OsString::from("PATH"))
                .cloned()
                .unwrap_or_default();
            std::env::split_paths(&path)
                .map(|d| dir.join(d).join(name))
                .find(|p| is_executable(p))
                .ok_or_else(|| {
                    bad(
                        task,
                        "exec",
                        format!(
                            "program {name:?} is not an executable file in PATH ({}); give its full path",
                            path.to_string_lossy()
                        ),
                    )
                })?
        };
        Ok(Self {
            program,
            args: decl.argv[1..].to_vec(),
            env,
            cwd,
        })
    }
}

fn is_executable(p: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

/// Signals a process group; a group already gone is not an error.
fn signal_group(pgid: i32, sig: Signal) {
    let _ = killpg(Pid::from_raw(pgid), sig);
}

/// A started program: dropped before it was reaped (the worker stopped the
/// task: hard limit from the message, drain timeout), its group is
/// terminated, killed after [`KILL_GRACE`], and the process reaped.
struct Running {
    child: Option<Child>,
    pgid: i32,
}

impl Running {
    fn child(&mut self) -> &mut Child {
        self.child
            .as_mut()
            .expect("present until reaped or dropped")
    }

    /// SIGTERM to the group, SIGKILL after the grace; waits for the exit.
    async fn terminate(&mut self) -> std::io::Result<std::process::ExitStatus> {
        signal_group(self.pgid, Signal::SIGTERM);
        match tokio::time::timeout(KILL_GRACE, self.child().wait()).await {
            Ok(s) => s,
            Err(_) => {
                signal_group(self.pgid, Signal::SIGKILL);
                self.child().wait().await
            }
        }
    }

    /// The program exited and was reaped: whatever it left in its group
    /// (background children) is killed, and the drop does nothing more.
    fn reaped(mut self) {
        self.child = None;
        signal_group(self.pgid, Signal::SIGKILL);
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        let pgid = self.pgid;
        signal_group(pgid, Signal::SIGTERM);
        // SIGKILLs the group when the reaping ends, or when it is cut short
        // (the runtime shutting down as the worker exits).
        let kill = KillGroupOnDrop(pgid);
        match tokio::runtime::Handle::try_current() {
            Ok(rt) => {
                rt.spawn(async move {
                    let _kill = kill;
                    if tokio::time::timeout(KILL_GRACE, child.wait())
                        .await
                        .is_err()
                    {
                        signal_group(pgid, Signal::SIGKILL);
                        let _ = child.wait().await;
                    }
                });
            }
            // No runtime (the process is ending): no grace to wait in.
            Err(_) => {
                drop(kill);
                let _ = child.try_wait();
            }
        }
    }
}

/// SIGKILLs a process group when dropped.
struct KillGroupOnDrop(i32);

impl Drop for KillGroupOnDrop {
    fn drop(&mut self) {
        signal_group(self.0, Signal::SIGKILL);
    }
}

async fn sleep_until(t: Option<Instant>) {
    match t {
        Some(t) => tokio::time::sleep_until(t).await,
        None => std::future::pending().await,
    }
}

/// Runs `prog` for the task of `ctx`, with `input` on its stdin.
pub async fn run(prog: Arc<Program>, ctx: TaskContext, input: Vec<u8>) -> TaskOutcome {
    let mut cmd = Command::new(&prog.program);
    cmd.args(&prog.args)
        .env_clear()
        .envs(&prog.env)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        .kill_on_drop(false);
    if let Some(c) = &prog.cwd {
        cmd.current_dir(c);
    }
    let mut child = cmd.spawn().map_err(|e| {
        output::failure(
            "ProcessStartError",
            format!("cannot start {}: {e}", prog.program.display()),
        )
    })?;
    let Some(pid) = child.id().and_then(|p| i32::try_from(p).ok()) else {
        let _ = child.wait().await;
        return Err(output::failure(
            "ProcessStartError",
            "the program ended before it could be watched".into(),
        ));
    };
    let (stdin, stdout, stderr) = (child.stdin.take(), child.stdout.take(), child.stderr.take());
    let mut running = Running {
        child: Some(child),
        pgid: pid,
    };
    // Spawned, so a program that writes before it reads never deadlocks
    // with the worker; each ends when the pipe closes.
    if let Some(mut stdin) = stdin {
        tokio::spawn(async move {
            // A program that does not read its input is not an error.
            let _ = stdin.write_all(&input).await;
        });
    }
    let stdout = stdout.map(|s| tokio::spawn(output::read_head(s, MAX_OUTPUT)));
    let stderr = stderr.map(|s| tokio::spawn(output::read_tail(s, STDERR_TAIL)));

    // The declaration's limits are the task's (see `declared::register`),
    // so the message's or remote control's apply here too.
    let (hard, soft) = (ctx.hard_deadline, ctx.soft_deadline);
    let mut limit = Limit::None;
    let status = loop {
        tokio::select! {
            s = running.child().wait() => break Some(s),
            () = sleep_until(soft), if limit == Limit::None => {
                tracing::info!(pid, "soft time limit passed; sending SIGTERM to the program's process group");
                signal_group(pid, Signal::SIGTERM);
                limit = Limit::Soft;
            }
            () = sleep_until(hard) => {
                tracing::warn!(pid, "hard time limit passed; terminating the program's process group");
                limit = Limit::Hard;
                break None;
            }
        }
    };
    let status = match status {
        Some(s) => s,
        None => running.terminate().await,
    };
    running.reaped();
    let status = status.map_err(|e| {
        output::failure(
            "ProcessExitError",
            format!("cannot wait for the program: {e}"),
        )
    })?;
    let ended = {
        use std::os::unix::process::ExitStatusExt as _;
        match (status.code(), status.signal()) {
            (Some(c), _) => Ended::Exited(c),
            (None, Some(s)) => Ended::Signalled(s),
            (None, None) => Ended::Exited(-1),
        }
    };
    // The group is gone, so the pipes are closed; a process that left the
    // group (setsid) and kept them open is not waited for.
    let collect = |h: Option<tokio::task::JoinHandle<output::Captured>>| async move {
        match h {
            Some(h) => tokio::time::timeout(KILL_GRACE, h)
                .await
                .ok()
                .and_then(Result::ok)
                .unwrap_or_default(),
            None => output::Captured::default(),
        }
    };
    let (out, err) = tokio::join!(collect(stdout), collect(stderr));
    output::program_outcome(ended, limit, &out, &err)
}
