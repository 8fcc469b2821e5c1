//! `deploy/supervisor/supervisord.conf` under a real supervisord (PyPI
//! `supervisor`, in a venv under the target directory): web, beat and four
//! workers start and serve; a worker SIGKILLed in the middle of a batch is
//! restarted by supervisord and every task of the batch completes; at the
//! end supervisord stops everything cleanly.
//!
//! The config is the shipped file with only what must differ in a test
//! changed (see [`derive_config`]): paths moved into a temporary directory,
//! `user=` commented out, `TASKSTACK_ALLOW_ROOT=1` added, the workers'
//! metrics ports moved to free ones. The services read a TOML file and
//! secret files at the shipped paths (moved), against a throwaway Redis that
//! requires the password.

use anyhow::{Context as _, Result, bail, ensure};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use redis::Commands as _;
use serde_json::{Value, json};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};
use taskstack::{SendOptions, TaskRequest};
use taskstack_integration::python::Venv;
use taskstack_integration::{
    RedisServer, bin, free_port, http, namespace, producer, wait_until, wait_until_sync,
};

const SUPERVISOR_REQUIREMENT: &str = "supervisor==4.3.0";
const WORKERS: u32 = 4;
const PASSWORD: &str = "supervised-redis-password-0123456789";
const TOKEN: &str = "supervised-api-token-0123456789abcdef";

fn shipped_config() -> Result<String> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/supervisor/supervisord.conf");
    std::fs::read_to_string(&path).with_context(|| format!("cannot read {}", path.display()))
}

/// Replaces every `from` in `text` by `to`, failing when there is none: a
/// change to the shipped file that this derivation no longer matches must
/// not go unnoticed.
fn replace_all(text: &str, from: &str, to: &str) -> Result<String> {
    ensure!(
        text.contains(from),
        "supervisord.conf no longer contains {from:?}: update derive_config"
    );
    Ok(text.replace(from, to))
}

/// The shipped config for this test: `/usr/local/bin` → the built binaries,
/// `/etc/taskstack`, `/var/log/taskstack`, `/var/lib/taskstack` and `/run` →
/// under `dir`, `user=` commented out (the test's user runs everything),
/// `TASKSTACK_ALLOW_ROOT=1` added to each environment (CI runs as root),
/// `TASKSTACK_TASK_TRACK_STARTED=1` too (the test finds running tasks by
/// their STARTED records), and
/// worker metrics ports `127.0.0.1:911<n>` → `127.0.0.1:<metrics_prefix><n>`.
fn derive_config(shipped: &str, dir: &Path, bin_dir: &Path, metrics_prefix: u16) -> Result<String> {
    let d = dir.display();
    let mut text = replace_all(
        shipped,
        "/usr/local/bin/",
        &format!("{}/", bin_dir.display()),
    )?;
    text = replace_all(&text, "/etc/taskstack/", &format!("{d}/etc/taskstack/"))?;
    text = replace_all(&text, "/var/log/taskstack", &format!("{d}/log"))?;
    text = replace_all(&text, "/var/lib/taskstack", &format!("{d}/lib"))?;
    text = replace_all(&text, "/run/", &format!("{d}/run/"))?;
    text = replace_all(
        &text,
        "127.0.0.1:911%(process_num)d",
        &format!("127.0.0.1:{metrics_prefix}%(process_num)d"),
    )?;
    let mut users = 0;
    let mut envs = 0;
    let lines: Vec<String> = text
        .lines()
        .map(|line| {
            if line.starts_with("user=") {
                users += 1;
                format!(";{line}")
            } else if line.starts_with("environment=") {
                envs += 1;
                format!("{line},TASKSTACK_ALLOW_ROOT=\"1\",TASKSTACK_TASK_TRACK_STARTED=\"1\"")
            } else {
                line.to_owned()
            }
        })
        .collect();
    ensure!(
        users == 3 && envs == 3,
        "expected user= and environment= in 3 programs, found {users} and {envs}"
    );
    // Every shipped absolute path must now start with `dir`.
    let d = d.to_string();
    for line in lines.iter().filter(|l| !l.starts_with(';')) {
        let marked = line.replace(&d, "<DIR>");
        for shipped in ["/usr/local/", "/etc/", "/var/", "/run/"] {
            for (i, _) in marked.match_indices(shipped) {
                ensure!(
                    marked[..i].ends_with("<DIR>"),
                    "a shipped {shipped} path is left in the derived config: {line}"
                );
            }
        }
    }
    Ok(lines.join("\n") + "\n")
}

/// A prefix `p` such that the ports `p*10 + 1 ..= p*10 + WORKERS` are free
/// and below the ephemeral range.
fn free_metrics_prefix() -> Result<u16> {
    for prefix in 2911..3270u16 {
        let free = (1..=WORKERS)
            .all(|n| std::net::TcpListener::bind(("127.0.0.1", prefix * 10 + n as u16)).is_ok());
        if free {
            return Ok(prefix);
        }
    }
    bail!("no free block of {WORKERS} ports for the workers' metrics")
}

/// A supervisord run in the foreground (`-n`) as the test's child; on drop
/// it is shut down (its programs stopped), or killed with every program it
/// was seen running.
struct Supervisord {
    child: Option<Child>,
    venv: Venv,
    conf: PathBuf,
    log: PathBuf,
    seen_pids: Vec<u32>,
}

/// One line of `supervisorctl status`.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Status {
    state: String,
    pid: Option<u32>,
}

impl Supervisord {
    fn start(venv: Venv, conf: PathBuf, log: PathBuf) -> Result<Self> {
        let mut cmd = venv.module("supervisor.supervisord");
        cmd.arg("-n").arg("-c").arg(&conf);
        for (k, _) in std::env::vars() {
            if k.starts_with("TASKSTACK_") {
                cmd.env_remove(k);
            }
        }
        let child = cmd
            .stdin(Stdio::null())
            .stdout(std::fs::File::create(&log)?)
            .stderr(Stdio::inherit())
            .spawn()
            .context("cannot start supervisord")?;
        Ok(Self {
            child: Some(child),
            venv,
            conf,
            log,
            seen_pids: Vec::new(),
        })
    }

    /// `supervisorctl -c <conf> <args>`: its output (`status` exits non-zero
    /// while a program is not RUNNING, so the exit code is not judged).
    fn ctl(&self, args: &[&str]) -> Result<String> {
        let out = self
            .venv
            .module("supervisor.supervisorctl")
            .arg("-c")
            .arg(&self.conf)
            .args(args)
            .stdin(Stdio::null())
            .output()
            .context("cannot run supervisorctl")?;
        Ok(format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ))
    }

    /// Program name (`taskstack-web`, `taskstack-worker:taskstack-worker-1`)
    /// → state and pid.
    fn status(&mut self) -> Result<BTreeMap<String, Status>> {
        let out = self.ctl(&["status"])?;
        let mut all = BTreeMap::new();
        for line in out.lines() {
            let mut words = line.split_whitespace();
            let (Some(name), Some(state)) = (words.next(), words.next()) else {
                continue;
            };
            if !name.starts_with("taskstack-") {
                continue;
            }
            let pid = (words.next() == Some("pid"))
                .then(|| words.next())
                .flatten()
                .and_then(|p| p.trim_end_matches(',').parse().ok());
            if let Some(p) = pid
                && !self.seen_pids.contains(&p)
            {
                self.seen_pids.push(p);
            }
            all.insert(
                name.to_owned(),
                Status {
                    state: state.to_owned(),
                    pid,
                },
            );
        }
        Ok(all)
    }

    /// Waits until all `expected` programs are RUNNING; returns their pids.
    fn wait_all_running(
        &mut self,
        expected: &[String],
        deadline: Duration,
    ) -> Result<BTreeMap<String, u32>> {
        let mut last = BTreeMap::new();
        let found = wait_until_sync("every program RUNNING", deadline, || {
            last = self.status().ok()?;
            expected
                .iter()
                .map(|name| match last.get(name) {
                    Some(Status {
                        state,
                        pid: Some(pid),
                    }) if state == "RUNNING" => Some((name.clone(), *pid)),
                    _ => None,
                })
                .collect::<Option<BTreeMap<_, _>>>()
        });
        found.with_context(|| format!("supervisorctl status: {last:#?}\n{}", self.logs()))
    }

    /// supervisord's own log and the programs' logs, for failure messages.
    fn logs(&self) -> String {
        let mut all = format!(
            "supervisord:\n{}",
            std::fs::read_to_string(&self.log).unwrap_or_default()
        );
        if let Some(dir) = self.log.parent()
            && let Ok(entries) = std::fs::read_dir(dir.join("log"))
        {
            for e in entries.flatten() {
                let text = std::fs::read_to_string(e.path()).unwrap_or_default();
                let tail: Vec<&str> = text.lines().rev().take(15).collect();
                all.push_str(&format!("\n--- {}:\n", e.path().display()));
                for l in tail.into_iter().rev() {
                    all.push_str(l);
                    all.push('\n');
                }
            }
        }
        all
    }

    /// `supervisorctl shutdown`, then waits for supervisord to exit.
    fn shutdown(&mut self, deadline: Duration) -> Result<std::process::ExitStatus> {
        ensure!(self.child.is_some(), "supervisord already stopped");
        let out = self.ctl(&["shutdown"])?;
        let child = self.child.as_mut().context("supervisord")?;
        let status = wait_until_sync("supervisord to exit", deadline, || {
            child.try_wait().ok().flatten()
        })
        .with_context(|| format!("supervisorctl shutdown: {out}"))?;
        self.child = None;
        Ok(status)
    }
}

impl Drop for Supervisord {
    fn drop(&mut self) {
        if self.child.is_none() {
            return;
        }
        if self.shutdown(Duration::from_secs(60)).is_ok() {
            return;
        }
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        // Programs outlive a killed supervisord: end them by their pids.
        for pid in &self.seen_pids {
            if let Ok(pid) = i32::try_from(*pid) {
                let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
            }
        }
    }
}

/// Ids (of `ids`) whose record is SUCCESS.
fn succeeded(c: &mut redis::Connection, ids: &[String]) -> Result<usize> {
    let keys: Vec<String> = ids
        .iter()
        .map(|id| format!("celery-task-meta-{id}"))
        .collect();
    let vals: Vec<Option<String>> = redis::cmd("MGET").arg(&keys).query(c)?;
    let mut n = 0;
    for v in vals.into_iter().flatten() {
        if serde_json::from_str::<Value>(&v)?["status"] == "SUCCESS" {
            n += 1;
        }
    }
    Ok(n)
}

/// Worker ids that have a task of `ids` running (its record STARTED).
fn running_on(c: &mut redis::Connection, ids: &[String]) -> Result<Vec<String>> {
    let keys: Vec<String> = ids
        .iter()
        .map(|id| format!("celery-task-meta-{id}"))
        .collect();
    let vals: Vec<Option<String>> = redis::cmd("MGET").arg(&keys).query(c)?;
    let mut workers = Vec::new();
    for v in vals.into_iter().flatten() {
        let record: Value = serde_json::from_str(&v)?;
        if record["status"] == "STARTED"
            && let Some(w) = record["worker"].as_str()
        {
            workers.push(w.to_owned());
        }
    }
    Ok(workers)
}

fn pid_alive(pid: u32) -> bool {
    i32::try_from(pid).is_ok_and(|p| kill(Pid::from_raw(p), None).is_ok())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn supervisord_restarts_a_killed_worker_and_no_task_is_lost() -> Result<()> {
    let started = Instant::now();
    let venv = Venv::ensure(
        "supervisor-venv",
        SUPERVISOR_REQUIREMENT,
        "import supervisor.supervisord, supervisor.supervisorctl",
        "TASKSTACK_SUPERVISOR_PYTHON",
    )?;
    let bin_dir = bin("taskstack-worker")?
        .parent()
        .context("binary directory")?
        .to_path_buf();
    eprintln!(
        "supervisor venv and built binaries ready after {:.1?}",
        started.elapsed()
    );

    // A throwaway Redis that wants the password the services read from the
    // shipped credential path.
    let redis = RedisServer::start()?;
    {
        let mut c = redis.conn()?;
        let _: () = redis::cmd("CONFIG")
            .arg("SET")
            .arg("requirepass")
            .arg(PASSWORD)
            .query(&mut c)?;
    }
    let authed_url = format!("redis://:{PASSWORD}@127.0.0.1:{}/0", redis.port());
    let mut conn = redis::Client::open(authed_url.as_str())?.get_connection()?;
    let ns = namespace("supervisor");

    let dir = tempfile::tempdir()?;
    let d = dir.path();
    for sub in ["etc/taskstack/credentials", "log", "lib", "run"] {
        std::fs::create_dir_all(d.join(sub))?;
    }
    std::fs::write(
        d.join("etc/taskstack/credentials/redis_password"),
        format!("{PASSWORD}\n"),
    )?;
    std::fs::write(
        d.join("etc/taskstack/credentials/api_tokens"),
        format!("# rotated tokens go here, one per line\n{TOKEN}\n"),
    )?;
    let web_addr = format!("127.0.0.1:{}", free_port()?);
    let beat_metrics = format!("127.0.0.1:{}", free_port()?);
    // Short lease: the killed worker's tasks come back within seconds.
    // Two slots and four held per worker: the batch spreads over workers and
    // outlasts the kill.
    std::fs::write(
        d.join("etc/taskstack/taskstack.toml"),
        format!(
            r#"broker_url = "redis://127.0.0.1:{port}/0"
namespace = "{ns}"
queues = "celery"
concurrency = 2
prefetch = 4
lease = "2s"
drain_timeout = "5s"
web_listen = "{web_addr}"
beat_metrics_listen = "{beat_metrics}"
log_level = "info"
"#,
            port = redis.port()
        ),
    )?;
    let metrics_prefix = free_metrics_prefix()?;
    let conf = d.join("supervisord.conf");
    std::fs::write(
        &conf,
        derive_config(&shipped_config()?, d, &bin_dir, metrics_prefix)?,
    )?;

    let mut sup = Supervisord::start(venv, conf, d.join("supervisord.out"))?;
    let mut programs = vec!["taskstack-web".to_owned(), "taskstack-beat".to_owned()];
    programs.extend((1..=WORKERS).map(|n| format!("taskstack-worker:taskstack-worker-{n}")));
    let pids = sup.wait_all_running(&programs, Duration::from_secs(60))?;
    eprintln!(
        "all {} programs RUNNING after {:.1?}",
        programs.len(),
        started.elapsed()
    );

    // Web serves with the token file and sees live workers; the beat leads.
    let health = wait_until("web /health 200", Duration::from_secs(30), || async {
        let r = http::request(&web_addr, "GET", "/health", None, None).await;
        Ok(r.ok().filter(|(s, _)| *s == 200))
    })
    .await
    .with_context(|| sup.logs())?;
    eprintln!("web /health: {}", health.1);
    let (status, body) = http::request(
        &web_addr,
        "POST",
        "/api/v1/tasks",
        Some(TOKEN),
        Some(&json!({"task": "taskstack.add", "args": [2, 3]})),
    )
    .await?;
    ensure!(status == 202, "enqueue through web: {status} {body}");
    let add_id = body["id"].as_str().context("task id")?.to_owned();
    let lock = format!("{ns}:beat:lock");
    wait_until_sync("a beat leader lock", Duration::from_secs(20), || {
        conn.exists::<_, bool>(&lock).ok().filter(|e| *e)
    })
    .with_context(|| sup.logs())?;
    for n in 1..=WORKERS {
        let addr = format!("127.0.0.1:{}", metrics_prefix * 10 + n as u16);
        let (status, _) = http::request_text(&addr, "GET", "/metrics", None, None)
            .await
            .with_context(|| format!("worker {n} metrics on {addr}"))?;
        ensure!(status == 200, "worker {n} /metrics on {addr}: {status}");
    }

    // The batch, then SIGKILL a worker that holds some of it while a task runs.
    let p = producer(&authed_url, &ns)?;
    let batch: Vec<TaskRequest> = (0..20)
        .map(|_| TaskRequest {
            name: "taskstack.sleep".into(),
            args: vec![json!(1.0)],
            kwargs: serde_json::Map::new(),
            options: SendOptions::default(),
        })
        .collect();
    let ids = p.send_many(&batch).await?;
    let worker_ids: BTreeMap<u32, String> =
        wait_until_sync("every worker's state file", Duration::from_secs(20), || {
            (1..=WORKERS)
                .map(|n| {
                    let raw = std::fs::read(d.join(format!("lib/worker-{n}.json"))).ok()?;
                    let state: Value = serde_json::from_slice(&raw).ok()?;
                    Some((n, state["id"].as_str()?.to_owned()))
                })
                .collect()
        })?;
    let (victim, held_at_kill) = wait_until_sync(
        "a worker holding messages of the batch with one of them running",
        Duration::from_secs(20),
        || {
            let running = running_on(&mut conn, &ids).ok()?;
            worker_ids.iter().find_map(|(n, id)| {
                let held: usize = conn.hlen(format!("{ns}:held:{id}")).ok()?;
                (held > 0 && running.contains(id)).then_some((*n, held))
            })
        },
    )
    .with_context(|| sup.logs())?;
    let name = format!("taskstack-worker:taskstack-worker-{victim}");
    let old_pid = pids[&name];
    kill(Pid::from_raw(i32::try_from(old_pid)?), Signal::SIGKILL)?;
    eprintln!("SIGKILLed {name} (pid {old_pid}) holding {held_at_kill} messages, one running");

    let restarted = wait_until_sync(
        "supervisord to restart the killed worker",
        Duration::from_secs(30),
        || match sup.status().ok()?.get(&name) {
            Some(Status {
                state,
                pid: Some(pid),
            }) if state == "RUNNING" && *pid != old_pid => Some(*pid),
            _ => None,
        },
    )
    .with_context(|| sup.logs())?;
    eprintln!("{name} RUNNING again as pid {restarted}");
    ensure!(!pid_alive(old_pid), "the killed worker {old_pid} is alive");

    let total = ids.len();
    wait_until_sync(
        "every task of the batch to succeed",
        Duration::from_secs(90),
        || (succeeded(&mut conn, &ids).ok()? == total).then_some(()),
    )
    .with_context(|| sup.logs())?;
    let add: Value =
        serde_json::from_str(&conn.get::<_, String>(format!("celery-task-meta-{add_id}"))?)?;
    ensure!(
        add["status"] == "SUCCESS" && add["result"] == 5,
        "the task sent through web: {add}"
    );
    let after = sup.wait_all_running(&programs, Duration::from_secs(10))?;
    eprintln!("supervisorctl status after the batch: all RUNNING {after:?}");

    // The shipped healthcheck works with the program's own environment.
    let health = Command::new(bin_dir.join("taskstack-worker"))
        .arg("healthcheck")
        .env_clear()
        .env("TASKSTACK_CONFIG", d.join("etc/taskstack/taskstack.toml"))
        .env(
            "TASKSTACK_BROKER_PASSWORD_FILE",
            d.join("etc/taskstack/credentials/redis_password"),
        )
        .env(
            "TASKSTACK_WORKER_STATE_FILE",
            d.join(format!("lib/worker-{victim}.json")),
        )
        .output()?;
    ensure!(
        health.status.success(),
        "taskstack-worker healthcheck of the restarted worker: {}{}",
        String::from_utf8_lossy(&health.stdout),
        String::from_utf8_lossy(&health.stderr)
    );

    // A clean stop: every program gets SIGTERM and exits within stopwaitsecs.
    let stopping = Instant::now();
    let exit = sup.shutdown(Duration::from_secs(60))?;
    ensure!(exit.success(), "supervisord exited with {exit}");
    for (name, pid) in &after {
        ensure!(!pid_alive(*pid), "{name} (pid {pid}) outlived supervisord");
    }
    // Each program exited 0 after SIGTERM: none was SIGKILLed at stopwaitsecs.
    let sup_log = std::fs::read_to_string(d.join("log/supervisord.log"))?;
    for name in &programs {
        let base = name.rsplit(':').next().unwrap_or(name);
        ensure!(
            sup_log.contains(&format!("stopped: {base} (exit status 0)")),
            "{base} did not stop cleanly:\n{sup_log}"
        );
    }
    eprintln!(
        "supervisord stopped everything in {:.1?}; the test took {:.1?}",
        stopping.elapsed(),
        started.elapsed()
    );
    Ok(())
}
