//! Secrets never reach a log line or a printed configuration: web, worker
//! and beat run at `debug` level against a Redis that requires a password
//! (given each in a different way), a task runs through all of them, and
//! neither the password nor the API token appears in anything they wrote.

use anyhow::Result;
use serde_json::json;
use std::time::Duration;
use taskstack_integration::{
    BeatProcess, RedisServer, TEST_TOKEN, WebProcess, WorkerProcess, namespace, run_to_exit,
    wait_until,
};

const PASSWORD: &str = "pw-5e1f0c2b9a7d4e36";
const DEBUG: (&str, &str) = ("TASKSTACK_LOG_LEVEL", "debug");

#[tokio::test(flavor = "multi_thread")]
async fn no_password_or_token_in_any_log_line_or_config_output() -> Result<()> {
    let redis = RedisServer::start()?;
    let mut c = redis.conn()?;
    redis::cmd("CONFIG")
        .arg("SET")
        .arg("requirepass")
        .arg(PASSWORD)
        .query::<()>(&mut c)?;
    let plain_url = redis.url();
    let url_with_password = format!("redis://:{PASSWORD}@127.0.0.1:{}/0", redis.port());
    let ns = namespace("secrets");
    let dir = tempfile::tempdir()?;
    let password_file = dir.path().join("redis_password");
    std::fs::write(&password_file, format!("{PASSWORD}\n"))?;
    let password_env = ("TASKSTACK_BROKER_PASSWORD", PASSWORD);

    // The web gets the password in its URL, the worker in a variable, the
    // beat from a file (Docker secrets).
    let web = WebProcess::spawn(&url_with_password, &ns, &[DEBUG]).await?;
    let worker = WorkerProcess::spawn(&plain_url, &ns, &[DEBUG, password_env])?;
    let beat_toml = format!(
        "broker_password_file = {:?}\n[[schedule]]\nname = \"tick\"\ntask = \"taskstack.add\"\n\
         args = [1, 2]\nevery = \"1s\"\n",
        password_file
    );
    let beat = BeatProcess::spawn(&plain_url, &ns, &beat_toml, &[DEBUG])?;

    // Accepted once the worker announces the task.
    let v = wait_until(
        "the task to be accepted",
        Duration::from_secs(20),
        || async {
            let (s, v) = web
                .call(
                    "POST",
                    "/api/v1/tasks",
                    Some(&json!({"task": "taskstack.add", "args": [40, 2]})),
                )
                .await?;
            Ok((s == 202).then_some(v))
        },
    )
    .await?;
    let path = format!("/api/v1/tasks/{}", v["id"].as_str().unwrap_or_default());
    wait_until("the task to succeed", Duration::from_secs(20), || async {
        let (_, v) = web.call("GET", &path, None).await?;
        Ok((v["state"] == "SUCCESS").then_some(()))
    })
    .await?;
    beat.wait_log(r#""message":"published""#, Duration::from_secs(20))?;
    // A refused token is logged about too (as a 401), not echoed.
    let (s, _) = taskstack_integration::http::request(
        &web.addr,
        "GET",
        "/api/v1/queues",
        Some(&format!("{TEST_TOKEN}-wrong")),
        None,
    )
    .await?;
    assert_eq!(s, 401);

    let mut outputs = vec![
        ("web log", web.log()),
        ("worker log", worker.log()),
        ("beat log", beat.log()),
    ];
    for (what, log) in &outputs {
        assert!(
            log.contains("\"level\":\"DEBUG\""),
            "{what} has no debug lines, so it proves little:\n{log}"
        );
    }
    let mut web_config = WebProcess::command(&url_with_password, &ns, &web.addr)?;
    web_config.env(DEBUG.0, DEBUG.1).arg("config");
    let mut worker_config = WorkerProcess::command(&plain_url, &ns, &worker.state_file)?;
    worker_config
        .envs([DEBUG, password_env])
        .env("TASKSTACK_API_TOKENS", TEST_TOKEN)
        .arg("config");
    let mut beat_config =
        BeatProcess::command(&plain_url, &ns, &beat.state_file, &beat.config_file)?;
    beat_config.env(DEBUG.0, DEBUG.1).arg("config");
    for (what, cmd) in [
        ("web config", web_config),
        ("worker config", worker_config),
        ("beat config", beat_config),
    ] {
        let out = run_to_exit(cmd, Duration::from_secs(10))?;
        assert!(out.status.success(), "{what}: {out:?}");
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        // The beat's password is in a file: its configuration names the file.
        if what != "beat config" {
            assert!(text.contains("***"), "{what} shows no redaction:\n{text}");
        }
        outputs.push((what, text));
    }
    for (what, text) in &outputs {
        for secret in [PASSWORD, TEST_TOKEN] {
            let line = text.lines().find(|l| l.contains(secret));
            assert!(line.is_none(), "{what} shows {secret:?}: {line:?}");
        }
    }
    Ok(())
}
