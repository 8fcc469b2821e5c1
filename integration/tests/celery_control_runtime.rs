//! Remote control that changes a running taskstack worker, driven by the
//! real Python Celery 5 CLI (`celery control add_consumer`,
//! `cancel_consumer`, `rate_limit`, `time_limit`, `inspect active_queues`)
//! and `AsyncResult.revoke(terminate=True)` against a real
//! `taskstack-worker` process on a real Redis.
//!
//! Build first: `cargo build -p taskstack-worker`.

use anyhow::{Context as _, Result, ensure};
use serde_json::{Map, Value, json};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;
use taskstack::proto::{TaskResult, TaskState};
use taskstack::{SendOptions, TaskRequest};
use taskstack_integration::python::{celery_python, interop_cmd};
use taskstack_integration::{
    RedisServer, WorkerProcess, namespace, producer, run_to_exit, wait_until_sync,
};

const LONG: Duration = Duration::from_secs(60);

fn python_cmd(python: &Path, url: &str) -> Command {
    interop_cmd(python, url, None)
}

/// A Celery CLI session against one worker node.
struct Celery<'a> {
    python: &'a Path,
    url: &'a str,
    node: &'a str,
}

impl Celery<'_> {
    /// `celery <kind> <args> -d node --json`: the node's reply.
    fn call(&self, kind: &str, args: &[&str]) -> Result<Value> {
        let out = python_cmd(self.python, self.url)
            .args(["-m", "celery", "-A", "interop_tasks", kind])
            .args(args)
            .args(["-d", self.node, "--json", "--timeout", "3"])
            .output()?;
        let stdout = String::from_utf8_lossy(&out.stdout);
        ensure!(
            out.status.success(),
            "celery {kind} {args:?} failed ({}):\n{stdout}\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        let replies: Value = stdout
            .lines()
            .rev()
            .find_map(|l| serde_json::from_str(l.trim()).ok())
            .with_context(|| format!("celery {kind} {args:?} printed no JSON: {stdout}"))?;
        // `inspect` prints {node: reply}; `control` prints [{node: reply}].
        let reply = match &replies {
            Value::Array(a) => a.iter().find_map(|r| r.get(self.node)).cloned(),
            other => other.get(self.node).cloned(),
        };
        reply.with_context(|| format!("{} did not answer: {replies}", self.node))
    }

    fn control(&self, args: &[&str]) -> Result<Value> {
        self.call("control", args)
    }

    fn queues(&self) -> Result<Vec<String>> {
        let v = self.call("inspect", &["active_queues"])?;
        Ok(v.as_array()
            .context("active_queues is a list")?
            .iter()
            .filter_map(|q| q["name"].as_str().map(str::to_owned))
            .collect())
    }
}

/// One test's Redis server, namespace, worker node name and scratch
/// directory, and the Python with Celery's CLI.
struct Rig {
    python: PathBuf,
    redis: RedisServer,
    url: String,
    ns: String,
    node: String,
    dir: tempfile::TempDir,
}

impl Rig {
    /// A fresh Redis server; namespace `what`, node `<name>@<namespace>`.
    fn new(what: &str, name: &str) -> Result<Self> {
        let python = celery_python()?;
        let redis = RedisServer::start()?;
        let url = redis.url();
        let ns = namespace(what);
        Ok(Self {
            python,
            redis,
            url,
            node: format!("{name}@{ns}"),
            ns,
            dir: tempfile::tempdir()?,
        })
    }

    /// The worker of this node, its TOML file `toml` written to the
    /// scratch directory, once it says it is ready.
    fn worker(&self, toml: &str) -> Result<WorkerProcess> {
        let file = self.dir.path().join("worker.toml");
        std::fs::write(&file, toml)?;
        let w = WorkerProcess::spawn(
            &self.redis.url(),
            &self.ns,
            &[
                ("TASKSTACK_CONFIG", file.to_str().context("utf-8 path")?),
                ("TASKSTACK_WORKER_NODENAME", &self.node),
            ],
        )?;
        w.wait_log("worker ready", LONG).with_context(|| w.log())?;
        Ok(w)
    }

    /// The Celery CLI aimed at this node.
    fn celery(&self) -> Celery<'_> {
        Celery {
            python: &self.python,
            url: &self.url,
            node: &self.node,
        }
    }
}

fn request(task: &str, args: Vec<Value>, queue: Option<&str>) -> TaskRequest {
    TaskRequest {
        name: task.to_owned(),
        args,
        kwargs: Map::new(),
        options: SendOptions {
            queue: queue.map(str::to_owned),
            ..SendOptions::default()
        },
    }
}

fn started_ms(r: &TaskResult) -> Result<i64> {
    let s = r.date_started.as_deref().context("date_started")?;
    Ok(chrono::DateTime::parse_from_rfc3339(s)?.timestamp_millis())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn add_consumer_and_cancel_consumer_change_the_queues_served() -> Result<()> {
    let rig = Rig::new("ctl_queues", "q")?;
    let (url, ns) = (rig.url.as_str(), rig.ns.as_str());
    let mut w = rig.worker("")?;
    let celery = rig.celery();
    let p = producer(url, ns)?;
    assert_eq!(celery.queues()?, ["celery"]);

    let r = celery.control(&["add_consumer", "reports"])?;
    assert_eq!(r, json!({"ok": "add consumer reports"}));
    assert_eq!(celery.queues()?, ["celery", "reports"]);
    // Celery answers the same for a queue already served; nothing doubles.
    let r = celery.control(&["add_consumer", "reports"])?;
    assert_eq!(r, json!({"ok": "add consumer reports"}));
    assert_eq!(celery.queues()?, ["celery", "reports"]);
    let id = p
        .send(&request(
            "taskstack.add",
            vec![json!(1), json!(2)],
            Some("reports"),
        ))
        .await?;
    let r = p.wait(&id, LONG).await.with_context(|| w.log())?;
    assert_eq!((r.status, r.result), (TaskState::Success, json!(3)));

    let r = celery.control(&["cancel_consumer", "reports"])?;
    assert_eq!(r, json!({"ok": "no longer consuming from reports"}));
    assert_eq!(celery.queues()?, ["celery"]);
    // Sent to the cancelled queue first, then to the served one: the take
    // that runs the second would have taken the first had it served it.
    let parked = p
        .send(&request(
            "taskstack.add",
            vec![json!(2), json!(2)],
            Some("reports"),
        ))
        .await?;
    let served = p
        .send(&request("taskstack.add", vec![json!(3), json!(3)], None))
        .await?;
    let r = p.wait(&served, LONG).await.with_context(|| w.log())?;
    assert_eq!(r.status, TaskState::Success);
    let pending = p.result(&parked).await?;
    assert!(
        pending
            .as_ref()
            .is_none_or(|r| r.status == TaskState::Pending),
        "a task on a cancelled queue ran: {pending:?}"
    );
    // Not lost: serving the queue again runs it.
    celery.control(&["add_consumer", "reports"])?;
    let r = p.wait(&parked, LONG).await.with_context(|| w.log())?;
    assert_eq!((r.status, r.result), (TaskState::Success, json!(4)));

    // Every queue cancelled: the worker stays up, takes nothing, and resumes.
    celery.control(&["cancel_consumer", "celery"])?;
    celery.control(&["cancel_consumer", "reports"])?;
    assert_eq!(celery.queues()?, Vec::<String>::new());
    let idle = p
        .send(&request("taskstack.add", vec![json!(5), json!(5)], None))
        .await?;
    celery.control(&["add_consumer", "celery"])?;
    let r = p.wait(&idle, LONG).await.with_context(|| w.log())?;
    assert_eq!(r.result, json!(10));

    let r = celery.control(&["add_consumer", "bad:name"])?;
    assert!(
        r["error"].as_str().is_some_and(|e| e.contains("bad:name")),
        "{r}"
    );
    assert!(w.is_running());

    // As with Celery, the change lasts until the worker stops: a restarted
    // worker serves its configured queues.
    celery.control(&["add_consumer", "reports"])?;
    assert_eq!(celery.queues()?, ["celery", "reports"]);
    w.signal(nix::sys::signal::Signal::SIGTERM)?;
    let status = w.wait_exit(LONG)?;
    assert!(status.success(), "{status}\n{}", w.log());
    let w = rig.worker("")?;
    let queues = wait_until_sync("the restarted worker to answer", LONG, || {
        celery.queues().ok()
    })
    .with_context(|| w.log())?;
    assert_eq!(queues, ["celery"]);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rate_limits_space_task_starts_and_change_at_run_time() -> Result<()> {
    let rig = Rig::new("ctl_rate", "rate")?;
    let (url, ns) = (rig.url.as_str(), rig.ns.as_str());
    let toml = "[task_annotations.\"taskstack.add\"]\nrate_limit = \"2/s\"\n";
    let w = rig.worker(toml)?;
    let celery = rig.celery();
    let p = producer(url, ns)?;

    // Configured: 2/s on taskstack.add; a task without a limit sent after
    // the burst is not held up by it.
    let burst: Vec<TaskRequest> = (0..4)
        .map(|i| request("taskstack.add", vec![json!(i), json!(1)], None))
        .collect();
    let ids = p.send_many(&burst).await?;
    let free = p
        .send(&request("taskstack.echo", vec![json!("free")], None))
        .await?;
    let mut starts = Vec::new();
    for id in &ids {
        let r = p.wait(id, LONG).await.with_context(|| w.log())?;
        assert_eq!(r.status, TaskState::Success, "{r:?}");
        starts.push(started_ms(&r)?);
    }
    let free = p.wait(&free, LONG).await?;
    starts.sort_unstable();
    spaced(&starts, 450)?;
    ensure!(
        started_ms(&free)? < starts[starts.len() - 1],
        "the unlimited task waited behind the limited ones: {starts:?} vs {:?}",
        free.date_started
    );

    // Changed at run time, with Celery's replies; `registered` shows it.
    let r = celery.control(&["rate_limit", "taskstack.echo", "120/m"])?;
    assert_eq!(r, json!({"ok": "new rate limit set successfully"}));
    let registered = celery.call("inspect", &["registered"])?;
    for want in [
        "taskstack.add [rate_limit=2/s]",
        "taskstack.echo [rate_limit=120/m]",
    ] {
        assert!(
            registered
                .as_array()
                .is_some_and(|a| a.contains(&json!(want))),
            "{registered}"
        );
    }
    let burst: Vec<TaskRequest> = (0..4)
        .map(|i| request("taskstack.echo", vec![json!(i)], None))
        .collect();
    let ids = p.send_many(&burst).await?;
    let mut starts = Vec::new();
    for id in &ids {
        starts.push(started_ms(&p.wait(id, LONG).await?)?);
    }
    starts.sort_unstable();
    spaced(&starts, 450)?;

    let r = celery.control(&["rate_limit", "taskstack.add", ""])?;
    assert_eq!(r, json!({"ok": "rate limit disabled successfully"}));
    let burst: Vec<TaskRequest> = (0..6)
        .map(|i| request("taskstack.add", vec![json!(i)], None))
        .collect();
    let ids = p.send_many(&burst).await?;
    let mut starts = Vec::new();
    for id in &ids {
        starts.push(started_ms(&p.wait(id, LONG).await?)?);
    }
    starts.sort_unstable();
    // Six starts at 2/s would span 2.5 s.
    ensure!(
        starts[5] - starts[0] < 2000,
        "still rate limited after the limit was removed: {starts:?}"
    );

    let r = celery.control(&["rate_limit", "no.such.task", "1/s"])?;
    assert_eq!(r, json!({"error": "unknown task"}));
    let r = celery.control(&["rate_limit", "taskstack.add", "ten/s"])?;
    let e = r["error"].as_str().unwrap_or_default();
    assert!(
        e.starts_with("Invalid rate limit string: ValueError(") && e.contains("ten"),
        "{r}"
    );
    Ok(())
}

/// Each start at least `gap_ms` after the one before.
fn spaced(starts: &[i64], gap_ms: i64) -> Result<()> {
    for pair in starts.windows(2) {
        ensure!(
            pair[1] - pair[0] >= gap_ms,
            "starts closer than {gap_ms} ms: {starts:?}"
        );
    }
    Ok(())
}

#[test]
fn bad_rate_limits_stop_the_worker_naming_the_task_and_key() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let cases: &[(&str, &[&str])] = &[
        (
            "[task_annotations.\"taskstack.add\"]\nrate_limit = \"10/d\"\n",
            &["task `taskstack.add`", "`rate_limit`", "unit"],
        ),
        (
            "[task_annotations.\"no.such\"]\nrate_limit = \"1/s\"\n",
            &["task `no.such`", "not registered"],
        ),
        (
            "[tasks.p]\nexec = [\"/bin/true\"]\nrate_limit = \"fast\"\n",
            &["task `p`", "`rate_limit`", "\"fast\""],
        ),
    ];
    for (i, (toml, needles)) in cases.iter().enumerate() {
        let file = dir.path().join(format!("{i}.toml"));
        std::fs::write(&file, toml)?;
        let mut cmd = WorkerProcess::command(
            "redis://127.0.0.1:1/0",
            &namespace("ctl_bad"),
            &dir.path().join("w.json"),
        )?;
        cmd.env("TASKSTACK_CONFIG", &file);
        let out = run_to_exit(cmd, Duration::from_secs(20))?;
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{toml}: {err}");
        for n in *needles {
            assert!(err.contains(n), "{toml}: {err:?} should name {n}");
        }
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn time_limit_changes_a_tasks_limits_at_run_time() -> Result<()> {
    let rig = Rig::new("ctl_time", "time")?;
    let (url, ns) = (rig.url.as_str(), rig.ns.as_str());
    let toml = "[tasks.\"t.prog\"]\nexec = [\"/bin/sh\", \"-c\", \"cat >/dev/null; sleep 60\"]\n";
    let w = rig.worker(toml)?;
    let celery = rig.celery();
    let p = producer(url, ns)?;
    let run = |task: &'static str| {
        let p = &p;
        async move {
            let id = p.send_task(task, vec![json!(60)]).await?;
            anyhow::Ok(p.wait(&id, LONG).await?)
        }
    };

    let r = celery.control(&["time_limit", "taskstack.sleep", "0.3", "30"])?;
    assert_eq!(r, json!({"ok": "time limits set successfully"}));
    let r = run("taskstack.sleep").await.with_context(|| w.log())?;
    assert_eq!(r.result["exc_type"], "SoftTimeLimitExceeded", "{r:?}");

    celery.control(&["time_limit", "taskstack.sleep", "0", "0.5"])?;
    let r = run("taskstack.sleep").await.with_context(|| w.log())?;
    assert_eq!(r.result["exc_type"], "TimeLimitExceeded", "{r:?}");

    // A program task: its process group is terminated at the new limit.
    celery.control(&["time_limit", "t.prog", "0", "0.5"])?;
    let r = run("t.prog").await.with_context(|| w.log())?;
    assert_eq!(r.result["exc_type"], "TimeLimitExceeded", "{r:?}");
    assert!(
        r.result["exc_message"]
            .to_string()
            .contains("process group was terminated"),
        "{r:?}"
    );

    let r = celery.control(&["time_limit", "no.such.task", "1", "2"])?;
    assert_eq!(r, json!({"error": "unknown task"}));
    Ok(())
}

fn alive(pid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|stat| {
        stat.rfind(')')
            .and_then(|i| stat[i + 2..].chars().next())
            .is_some_and(|s| s != 'Z')
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revoke_terminate_kills_a_program_tasks_whole_process_group() -> Result<()> {
    let rig = Rig::new("ctl_terminate", "term")?;
    let (python, url, ns, dir) = (&rig.python, rig.url.as_str(), rig.ns.as_str(), &rig.dir);
    let d = dir.path().display();
    // The program starts a child that ignores SIGTERM, then waits.
    let script = dir.path().join("stuck.sh");
    std::fs::write(
        &script,
        format!(
            "#!/bin/sh\ncat >/dev/null\n(trap '' TERM; exec sleep 300) &\n\
             echo $! > {d}/grandchild.pid\necho $$ > {d}/child.pid\nwait\n"
        ),
    )?;
    {
        use std::os::unix::fs::PermissionsExt as _;
        std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755))?;
    }
    let toml = format!("[tasks.\"t.stuck\"]\nexec = [\"{}\"]\n", script.display());
    let w = rig.worker(&toml)?;
    let p = producer(url, ns)?;

    let id = p.send_task("t.stuck", vec![]).await?;
    let pid = |f: &str| -> Option<i32> {
        std::fs::read_to_string(dir.path().join(f))
            .ok()?
            .trim()
            .parse()
            .ok()
    };
    let (child, grandchild) = wait_until_sync("the program and its child to start", LONG, || {
        Some((pid("child.pid")?, pid("grandchild.pid")?))
    })
    .with_context(|| w.log())?;
    assert!(alive(child) && alive(grandchild));

    // AsyncResult(id).revoke(terminate=True), as a Celery user calls it.
    let out = python_cmd(python, url)
        .args(["control_client.py", "revoke_terminate", &id])
        .output()?;
    ensure!(
        out.status.success(),
        "revoke_terminate: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let r = p.wait(&id, LONG).await.with_context(|| w.log())?;
    assert_eq!(r.status, TaskState::Revoked, "{r:?}");
    assert_eq!(r.result["exc_type"], "TaskRevokedError", "{r:?}");
    assert!(
        r.result["exc_message"].to_string().contains("terminated"),
        "{r:?}"
    );
    wait_until_sync("the program and its child to be gone", LONG, || {
        (!alive(child) && !alive(grandchild)).then_some(())
    })
    .with_context(|| format!("child {child}, grandchild {grandchild}\n{}", w.log()))?;
    // Python Celery sees the state Celery reports for a terminated task.
    let out = python_cmd(python, url)
        .args(["control_client.py", "state", &id])
        .output()?;
    let state = String::from_utf8_lossy(&out.stdout);
    assert!(state.contains("\"REVOKED\""), "{state}");
    assert!(w.is_running());
    Ok(())
}
