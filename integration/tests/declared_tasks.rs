//! Program tasks (`[tasks."name"] exec = [...]`) in a real `taskstack-worker`
//! process against a real Redis: the JSON contract, retries on exit 75,
//! failures by kind, the hard time limit killing the whole process group,
//! bounded output, env and cwd, and configuration errors.

use anyhow::{Context as _, Result};
use serde_json::{Value, json};
use std::path::Path;
use std::time::Duration;
use taskstack::backend::Use;
use taskstack::proto::{TaskResult, TaskState};
use taskstack::{SendOptions, TaskRequest};
use taskstack_integration::{
    RedisServer, WorkerProcess, namespace, producer, run_to_exit, wait_until, wait_until_sync,
};

const WAIT: Duration = Duration::from_secs(30);

/// A worker whose TOML file (in `dir`) is `toml`.
fn worker(redis: &RedisServer, ns: &str, dir: &Path, toml: &str) -> Result<WorkerProcess> {
    let file = dir.join("worker.toml");
    std::fs::write(&file, toml)?;
    let w = WorkerProcess::spawn(
        &redis.url(),
        ns,
        &[("TASKSTACK_CONFIG", file.to_str().context("utf-8 path")?)],
    )?;
    w.wait_log("worker ready", WAIT).with_context(|| w.log())?;
    Ok(w)
}

/// An executable shell script `name` in `dir` running `body`; its path.
fn script(dir: &Path, name: &str, body: &str) -> Result<String> {
    use std::os::unix::fs::PermissionsExt as _;
    let p = dir.join(name);
    std::fs::write(&p, format!("#!/bin/sh\n{body}\n"))?;
    std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755))?;
    Ok(p.to_str().context("utf-8 path")?.to_owned())
}

async fn run(p: &taskstack::Producer, task: &str, args: Vec<Value>) -> Result<TaskResult> {
    let id = p.send_task(task, args).await?;
    Ok(p.wait(&id, WAIT).await?)
}

fn traceback(r: &TaskResult) -> &str {
    r.traceback.as_deref().unwrap_or("")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn programs_get_the_task_on_stdin_and_answer_on_stdout() -> Result<()> {
    let redis = RedisServer::start()?;
    let ns = namespace("exec_contract");
    let dir = tempfile::tempdir()?;
    let work = dir.path().join("work");
    std::fs::create_dir(&work)?;
    let env_probe = script(
        dir.path(),
        "env.sh",
        r#"cat >/dev/null
printf '{"cwd":"%s","bucket":"%s","broker":"%s","path_set":%s}' "$(pwd)" "$REPORTS_BUCKET" "$TASKSTACK_BROKER_URL" "$([ -n "$PATH" ] && echo true || echo false)""#,
    )?;
    let toml = format!(
        r#"
[tasks."t.cat"]
exec = ["/bin/sh", "-c", "cat"]
[tasks."t.quiet"]
exec = ["/bin/sh", "-c", "cat >/dev/null"]
[tasks."t.env"]
exec = ["{env_probe}"]
env = {{ REPORTS_BUCKET = "b-1" }}
cwd = "{work}"
[tasks."t.notjson"]
exec = ["/bin/sh", "-c", "echo done!"]
[tasks."t.exit3"]
exec = ["/bin/sh", "-c", "echo 'Traceback: ValueError: bad invoice' >&2; exit 3"]
[tasks."t.signal"]
exec = ["/bin/sh", "-c", "kill -9 $$"]
"#,
        work = work.display()
    );
    let w = worker(&redis, &ns, dir.path(), &toml)?;
    let p = producer(&redis.url(), &ns)?;

    let mut kwargs = serde_json::Map::new();
    kwargs.insert("k".into(), json!("v"));
    let id = p
        .send(&TaskRequest {
            name: "t.cat".into(),
            args: vec![json!(1), json!("two")],
            kwargs,
            options: SendOptions::default(),
        })
        .await?;
    let r = p.wait(&id, WAIT).await?;
    assert_eq!(r.status, TaskState::Success, "{r:?}\n{}", w.log());
    let mut keys: Vec<&str> = r
        .result
        .as_object()
        .context("object")?
        .keys()
        .map(String::as_str)
        .collect();
    keys.sort_unstable();
    assert_eq!(
        keys,
        [
            "args",
            "eta",
            "expires",
            "id",
            "kwargs",
            "parent_id",
            "retries",
            "root_id",
            "task"
        ]
    );
    assert_eq!(r.result["id"], json!(id));
    assert_eq!(r.result["task"], "t.cat");
    assert_eq!(r.result["args"], json!([1, "two"]));
    assert_eq!(r.result["kwargs"], json!({"k": "v"}));
    assert_eq!(r.result["retries"], 0);

    let r = run(&p, "t.quiet", vec![]).await?;
    assert_eq!(
        (r.status, r.result.clone()),
        (TaskState::Success, Value::Null)
    );

    let r = run(&p, "t.env", vec![]).await?;
    assert_eq!(r.status, TaskState::Success, "{r:?}");
    assert_eq!(
        r.result,
        json!({"cwd": work.canonicalize()?.display().to_string(), "bucket": "b-1", "broker": "", "path_set": true}),
        "a program gets a minimal environment plus its own, in its cwd"
    );

    let r = run(&p, "t.notjson", vec![]).await?;
    assert_eq!(r.status, TaskState::Failure);
    assert_eq!(r.result["exc_type"], "InvalidOutput");
    assert!(traceback(&r).contains("done!"), "{r:?}");

    let r = run(&p, "t.exit3", vec![]).await?;
    assert_eq!(r.status, TaskState::Failure);
    assert_eq!(r.result["exc_type"], "ProcessExitError");
    assert!(
        traceback(&r).contains("status 3") && traceback(&r).contains("ValueError: bad invoice"),
        "{r:?}"
    );

    let r = run(&p, "t.signal", vec![]).await?;
    assert_eq!(r.result["exc_type"], "ProcessExitError");
    assert!(traceback(&r).contains("SIGKILL"), "{r:?}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exit_75_is_retried_with_backoff_then_dead_lettered() -> Result<()> {
    let redis = RedisServer::start()?;
    let ns = namespace("exec_retry");
    let dir = tempfile::tempdir()?;
    // Fails with 75 twice, then succeeds; the attempt count lives in a file.
    let flaky = script(
        dir.path(),
        "flaky.sh",
        &format!(
            r#"f={}/count; n=$(cat "$f" 2>/dev/null || echo 0); n=$((n+1)); echo $n > "$f"
if [ $n -lt 3 ]; then echo "database busy" >&2; exit 75; fi
cat"#,
            dir.path().display()
        ),
    )?;
    let toml = format!(
        r#"
[tasks."t.flaky"]
exec = ["{flaky}"]
retry_backoff = "100ms"
max_retries = 5
[tasks."t.hopeless"]
exec = ["/bin/sh", "-c", "echo still busy >&2; exit 75"]
retry_backoff = "100ms"
max_retries = 2
"#
    );
    let _w = worker(&redis, &ns, dir.path(), &toml)?;
    let p = producer(&redis.url(), &ns)?;

    let r = run(&p, "t.flaky", vec![]).await?;
    assert_eq!(r.status, TaskState::Success, "{r:?}");
    assert_eq!(r.retries, Some(2));
    assert_eq!(r.result["retries"], 2, "the program sees its attempt");

    let id = p.send_task("t.hopeless", vec![]).await?;
    let r = p.wait(&id, WAIT).await?;
    assert_eq!(r.status, TaskState::Failure);
    assert_eq!(r.result["exc_type"], "MaxRetriesExceededError");
    assert!(traceback(&r).contains("still busy"), "{r:?}");
    let dead = wait_until("the dead letter", WAIT, || {
        let mut dl = p.backend().dead_letters(Use::Request);
        async move {
            let (d, _) = dl.page("celery", 10).await?;
            Ok((!d.is_empty()).then_some(d))
        }
    })
    .await?;
    assert_eq!(dead[0].task_id.as_deref(), Some(id.as_str()));
    Ok(())
}

/// The state letter of `/proc/<pid>/stat` (None: no such process).
fn proc_state(pid: i32) -> Option<(char, i32)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let after = &stat[stat.rfind(')')? + 2..];
    let mut f = after.split(' ');
    let state = f.next()?.chars().next()?;
    let ppid = f.next()?.parse().ok()?;
    Some((state, ppid))
}

/// Children of `parent` that are zombies.
fn zombies_of(parent: i32) -> Vec<i32> {
    std::fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
        .filter(|pid| proc_state(*pid) == Some(('Z', parent)))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_hard_limit_kills_the_whole_process_group_and_leaves_no_zombie() -> Result<()> {
    let redis = RedisServer::start()?;
    let ns = namespace("exec_limit");
    let dir = tempfile::tempdir()?;
    let d = dir.path().display();
    // The program starts a grandchild that ignores SIGTERM (only the
    // SIGKILL after the grace stops it), records both pids, and waits.
    let stuck = script(
        dir.path(),
        "stuck.sh",
        &format!(
            r#"cat >/dev/null
(trap '' TERM; exec sleep 300) &
echo $! > {d}/grandchild.pid
echo $$ > {d}/child.pid
wait"#
        ),
    )?;
    let toml = format!(
        r#"
[tasks."t.stuck"]
exec = ["{stuck}"]
time_limit = "1s"
[tasks."t.soft"]
exec = ["/bin/sh", "-c", "trap 'echo wrapping up >&2; exit 1' TERM; cat >/dev/null; sleep 300 & wait"]
soft_time_limit = "500ms"
time_limit = "20s"
"#
    );
    let w = worker(&redis, &ns, dir.path(), &toml)?;
    let worker_pid = i32::try_from(w.pid())?;
    let p = producer(&redis.url(), &ns)?;

    let r = run(&p, "t.stuck", vec![]).await?;
    assert_eq!(r.status, TaskState::Failure, "{r:?}");
    assert_eq!(r.result["exc_type"], "TimeLimitExceeded");
    let pid = |f: &str| -> Result<i32> {
        Ok(std::fs::read_to_string(dir.path().join(f))?
            .trim()
            .parse()?)
    };
    let (child, grandchild) = (pid("child.pid")?, pid("grandchild.pid")?);
    let alive = |pid: i32| proc_state(pid).is_some_and(|(s, _)| s != 'Z');
    wait_until_sync("the program and its child to be gone", WAIT, || {
        (!alive(child) && !alive(grandchild)).then_some(())
    })
    .with_context(|| format!("child {child:?}, grandchild {grandchild:?}"))?;
    // The worker reaped its child: no zombie of it remains.
    wait_until_sync("no zombie child of the worker", WAIT, || {
        zombies_of(worker_pid).is_empty().then_some(())
    })?;
    assert_eq!(proc_state(child), None, "the worker reaped the program");

    // The soft limit sends SIGTERM; the program's handler runs.
    let r = run(&p, "t.soft", vec![]).await?;
    assert_eq!(r.result["exc_type"], "SoftTimeLimitExceeded", "{r:?}");
    assert!(traceback(&r).contains("wrapping up"), "{r:?}");
    assert!(zombies_of(worker_pid).is_empty());
    Ok(())
}

/// The worker's peak resident set (VmHWM), in KiB.
fn peak_rss_kib(pid: u32) -> Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let line = status
        .lines()
        .find(|l| l.starts_with("VmHWM:"))
        .context("VmHWM")?;
    Ok(line.split_whitespace().nth(1).context("value")?.parse()?)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn huge_output_is_bounded() -> Result<()> {
    let redis = RedisServer::start()?;
    let ns = namespace("exec_huge");
    let dir = tempfile::tempdir()?;
    let toml = r#"
[tasks."t.flood"]
exec = ["/bin/sh", "-c", "head -c 100000000 /dev/zero"]
[tasks."t.flood_err"]
exec = ["/bin/sh", "-c", "yes 'line of stderr' | head -c 100000000 >&2; echo the end >&2; exit 1"]
"#;
    let w = worker(&redis, &ns, dir.path(), toml)?;
    let p = producer(&redis.url(), &ns)?;
    let r = run(&p, "t.flood", vec![]).await?;
    assert_eq!(r.result["exc_type"], "InvalidOutput", "{r:?}");
    assert!(traceback(&r).contains("100000000 bytes"), "{r:?}");
    let r = run(&p, "t.flood_err", vec![]).await?;
    assert_eq!(r.result["exc_type"], "ProcessExitError");
    let tb = traceback(&r);
    assert!(
        tb.ends_with("the end") && tb.len() < 16 << 10,
        "{}",
        tb.len()
    );
    let peak = peak_rss_kib(w.pid())?;
    println!("worker peak RSS after 200 MB of program output: {peak} KiB");
    assert!(peak < 100 << 10, "the worker grew to {peak} KiB");
    Ok(())
}

fn run_worker(env: &[(&str, &str)], args: &[&str]) -> Result<std::process::Output> {
    let dir = tempfile::tempdir()?;
    let mut cmd = WorkerProcess::command(
        "redis://127.0.0.1:1/0",
        &namespace("declared_cli"),
        &dir.path().join("w.json"),
    )?;
    cmd.envs(env.iter().copied()).args(args);
    run_to_exit(cmd, Duration::from_secs(20))
}

#[test]
fn bad_declarations_exit_2_naming_the_task_and_key() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let cases: &[(&str, &[&str])] = &[
        (
            "[tasks.a]\nexec = [\"/bin/true\"]\nhttp = \"http://x/\"\n",
            &["task `a`", "`http`", "not both"],
        ),
        ("[tasks.a]\ntime_limit = \"1s\"\n", &["task `a`", "`exec`"]),
        (
            "[tasks.a]\nexec = [\"/bin/true\"]\nretries = 3\n",
            &["task `a`", "`retries`"],
        ),
        (
            "[tasks.a]\nexec = [\"./no-such-program\"]\n",
            &["task `a`", "`exec`", "no-such-program"],
        ),
        (
            "[tasks.a]\nhttp = \"app:8000/a\"\n",
            &["task `a`", "`http`"],
        ),
        (
            "[tasks.a]\nexec = [\"/bin/true\"]\ntime_limit = \"soon\"\n",
            &["task `a`", "`time_limit`"],
        ),
        (
            "[tasks.\"taskstack.echo\"]\nexec = [\"/bin/true\"]\n",
            &["`taskstack.echo`"],
        ),
    ];
    for (i, (toml, needles)) in cases.iter().enumerate() {
        let file = dir.path().join(format!("{i}.toml"));
        std::fs::write(&file, toml)?;
        let out = run_worker(
            &[("TASKSTACK_CONFIG", file.to_str().context("utf-8")?)],
            &[],
        )?;
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{toml}: {err}");
        for n in *needles {
            assert!(err.contains(n), "{toml}: {err:?} should name {n}");
        }
    }
    Ok(())
}

#[test]
fn the_tasks_subcommand_lists_declared_tasks() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let file = dir.path().join("w.toml");
    std::fs::write(
        &file,
        "[tasks.\"reports.render\"]\nexec = [\"/bin/true\"]\n[tasks.\"billing.charge\"]\nhttp = \"http://app:8000/c\"\n",
    )?;
    let out = run_worker(
        &[("TASKSTACK_CONFIG", file.to_str().context("utf-8")?)],
        &["tasks"],
    )?;
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let listed = String::from_utf8(out.stdout)?;
    for t in ["reports.render", "billing.charge", "taskstack.echo"] {
        assert!(listed.lines().any(|l| l == t), "{listed}");
    }
    Ok(())
}

mod http_tasks {
    //! HTTP tasks against a real local HTTP server (axum) that verifies the
    //! worker's signature the way a receiver would.

    use super::*;
    use axum::extract::State;
    use axum::http::{HeaderMap, StatusCode};
    use axum::response::IntoResponse;
    use axum::routing::post;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicU32, Ordering};

    const SECRET: &[u8] = b"s3cret-hmac-key";

    #[derive(Clone, Default)]
    struct App {
        flaky: Arc<AtomicU32>,
        slow: Arc<AtomicU32>,
    }

    fn header<'a>(h: &'a HeaderMap, name: &str) -> &'a str {
        h.get(name).and_then(|v| v.to_str().ok()).unwrap_or("")
    }

    /// What a receiver does: recompute the HMAC of timestamp ‖ body,
    /// compare in constant time, refuse old timestamps (replays).
    fn verified(h: &HeaderMap, body: &[u8]) -> bool {
        let ts = header(h, "x-taskstack-timestamp");
        let Some(hex) = header(h, "x-taskstack-signature").strip_prefix("sha256=") else {
            return false;
        };
        let Ok(tag) = (0..hex.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(hex.get(i..i + 2).unwrap_or("zz"), 16))
            .collect::<Result<Vec<u8>, _>>()
        else {
            return false;
        };
        let now = chrono::Utc::now().timestamp();
        let fresh = ts.parse::<i64>().is_ok_and(|t| (now - t).abs() < 300);
        let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, SECRET);
        let mut data = ts.as_bytes().to_vec();
        data.extend_from_slice(body);
        fresh && ring::hmac::verify(&key, &data, &tag).is_ok()
    }

    async fn signed(headers: HeaderMap, body: axum::body::Bytes) -> impl IntoResponse {
        if !verified(&headers, &body) {
            return (StatusCode::UNAUTHORIZED, "bad signature".to_owned());
        }
        let task: Value = serde_json::from_slice(&body).unwrap_or_default();
        let answer = json!({
            "task": header(&headers, "x-taskstack-task"),
            "id_header": header(&headers, "x-taskstack-task-id"),
            "content_type": header(&headers, "content-type"),
            "payload": task,
        });
        (StatusCode::OK, answer.to_string())
    }

    async fn flaky(State(app): State<App>) -> impl IntoResponse {
        if app.flaky.fetch_add(1, Ordering::SeqCst) == 0 {
            (
                StatusCode::SERVICE_UNAVAILABLE,
                [("retry-after", "1")],
                "warming up",
            )
                .into_response()
        } else {
            (StatusCode::OK, "\"recovered\"").into_response()
        }
    }

    async fn slow(State(app): State<App>) -> impl IntoResponse {
        if app.slow.fetch_add(1, Ordering::SeqCst) == 0 {
            tokio::time::sleep(Duration::from_secs(5)).await;
        }
        "\"fast now\""
    }

    async fn server() -> Result<(String, App)> {
        let app = App::default();
        let router = axum::Router::new()
            .route("/signed", post(signed))
            .route("/flaky", post(flaky))
            .route("/slow", post(slow))
            .route(
                "/unprocessable",
                post(|| async { (StatusCode::UNPROCESSABLE_ENTITY, "invoice id missing") }),
            )
            .route("/html", post(|| async { "<html>hello</html>" }))
            .with_state(app.clone());
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let addr = l.local_addr()?.to_string();
        tokio::spawn(async move { axum::serve(l, router).await });
        Ok((addr, app))
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn endpoints_get_the_task_signed_and_answers_map_to_outcomes() -> Result<()> {
        let redis = RedisServer::start()?;
        let ns = namespace("http_tasks");
        let dir = tempfile::tempdir()?;
        let (addr, app) = server().await?;
        let secret = dir.path().join("hmac");
        std::fs::write(&secret, [SECRET, b"\n"].concat())?;
        let closed = taskstack_integration::free_port()?;
        let toml = format!(
            r#"
[tasks."billing.charge"]
http = "http://{addr}/signed"
secret_file = "{secret}"
[tasks."t.unsigned"]
http = "http://{addr}/signed"
[tasks."t.flaky"]
http = "http://{addr}/flaky"
retry_backoff = "100ms"
[tasks."t.slow"]
http = "http://{addr}/slow"
timeout = "500ms"
retry_backoff = "100ms"
[tasks."t.unprocessable"]
http = "http://{addr}/unprocessable"
[tasks."t.html"]
http = "http://{addr}/html"
[tasks."t.down"]
http = "http://127.0.0.1:{closed}/x"
retry_backoff = "100ms"
max_retries = 1
"#,
            secret = secret.display()
        );
        let w = worker(&redis, &ns, dir.path(), &toml)?;
        let p = producer(&redis.url(), &ns)?;

        let id = p.send_task("billing.charge", vec![json!(42)]).await?;
        let r = p.wait(&id, WAIT).await?;
        assert_eq!(r.status, TaskState::Success, "{r:?}\n{}", w.log());
        assert_eq!(r.result["task"], "billing.charge");
        assert_eq!(r.result["id_header"], json!(id));
        assert_eq!(r.result["content_type"], "application/json");
        assert_eq!(r.result["payload"]["args"], json!([42]));
        assert_eq!(r.result["payload"]["id"], json!(id));

        // Unsigned requests are refused by this receiver: 401 is a failure.
        let r = run(&p, "t.unsigned", vec![]).await?;
        assert_eq!(r.status, TaskState::Failure);
        assert_eq!(r.result["exc_type"], "HTTPError");
        assert!(
            traceback(&r).contains("401") && traceback(&r).contains("bad signature"),
            "{r:?}"
        );

        let r = run(&p, "t.flaky", vec![]).await?;
        assert_eq!(
            (r.status, r.result.clone()),
            (TaskState::Success, json!("recovered")),
            "{r:?}"
        );
        assert_eq!((r.retries, app.flaky.load(Ordering::SeqCst)), (Some(1), 2));

        let r = run(&p, "t.slow", vec![]).await?;
        assert_eq!(
            (r.status, r.result.clone()),
            (TaskState::Success, json!("fast now")),
            "{r:?}"
        );
        assert_eq!(r.retries, Some(1), "the timed-out request was retried");

        let r = run(&p, "t.unprocessable", vec![]).await?;
        assert_eq!(r.status, TaskState::Failure);
        assert_eq!(r.retries, Some(0), "no retry for 422");
        assert!(
            traceback(&r).contains("422") && traceback(&r).contains("invoice id missing"),
            "{r:?}"
        );

        let r = run(&p, "t.html", vec![]).await?;
        assert_eq!(r.result["exc_type"], "InvalidOutput", "{r:?}");

        let r = run(&p, "t.down", vec![]).await?;
        assert_eq!(r.result["exc_type"], "MaxRetriesExceededError", "{r:?}");
        assert!(traceback(&r).contains("refused"), "{r:?}");
        Ok(())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopping_worker_terminates_programs_that_outlast_the_drain() -> Result<()> {
    let redis = RedisServer::start()?;
    let ns = namespace("exec_drain");
    let dir = tempfile::tempdir()?;
    let d = dir.path().display();
    let long = script(
        dir.path(),
        "long.sh",
        // The grandchild ignores SIGTERM: only the SIGKILL stops it.
        &format!(
            "cat >/dev/null\n(trap '' TERM; exec sleep 300) &\necho $! > {d}/grandchild.pid\necho $$ > {d}/child.pid\nwait"
        ),
    )?;
    let file = dir.path().join("worker.toml");
    std::fs::write(&file, format!("[tasks.\"t.long\"]\nexec = [\"{long}\"]\n"))?;
    let mut w = WorkerProcess::spawn(
        &redis.url(),
        &ns,
        &[
            ("TASKSTACK_CONFIG", file.to_str().context("utf-8")?),
            ("TASKSTACK_DRAIN_TIMEOUT", "1s"),
        ],
    )?;
    w.wait_log("worker ready", WAIT).with_context(|| w.log())?;
    let p = producer(&redis.url(), &ns)?;
    p.send_task("t.long", vec![]).await?;
    let pid = |f: &str| -> Option<i32> {
        std::fs::read_to_string(dir.path().join(f))
            .ok()?
            .trim()
            .parse()
            .ok()
    };
    let (child, grandchild) = wait_until_sync("the program to start", WAIT, || {
        Some((pid("child.pid")?, pid("grandchild.pid")?))
    })?;
    w.signal(nix::sys::signal::Signal::SIGTERM)?;
    let status = w.wait_exit(WAIT)?;
    assert_eq!(status.code(), Some(0), "{}", w.log());
    let alive = |pid: i32| proc_state(pid).is_some_and(|(s, _)| s != 'Z');
    wait_until_sync("the program and its child to be gone", WAIT, || {
        (!alive(child) && !alive(grandchild)).then_some(())
    })
    .with_context(|| w.log())?;
    Ok(())
}
