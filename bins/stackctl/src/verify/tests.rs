//! `verify` end to end against the fake engine: `redis-cli` answers come
//! from an exec handler, the web API from a tiny HTTP server on a free
//! loopback port (published as the web container's port).

use super::*;
use crate::engine::ExecOutput;
use crate::engine::fake::{ExecHandler, Fake, FakeContainer};
use crate::progress::Recorder;
use crate::up::tests::{APP, REDIS, shipped};
use crate::up::{UpOptions, up};
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

/// Answers `/health`, `POST /api/v1/tasks` (the sum of the args) and
/// `GET /api/v1/tasks/<id>` like taskstack-web.
async fn fake_web() -> (u16, tokio::task::JoinHandle<()>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let port = listener.local_addr().expect("addr").port();
    let handle = tokio::spawn(async move {
        let results: Arc<Mutex<BTreeMap<String, i64>>> = Arc::default();
        while let Ok((mut s, _)) = listener.accept().await {
            let mut buf = vec![0; 4096];
            let n = s.read(&mut buf).await.unwrap_or(0);
            let req = String::from_utf8_lossy(&buf[..n]).into_owned();
            let (status, body) = if req.starts_with("GET /health") {
                ("200 OK", json!({"status": "ok"}))
            } else if req.starts_with("POST /api/v1/tasks") {
                let body: Value = req
                    .split_once("\r\n\r\n")
                    .and_then(|(_, b)| serde_json::from_str(b).ok())
                    .unwrap_or_default();
                let sum = body["args"]
                    .as_array()
                    .map_or(0, |a| a.iter().filter_map(Value::as_i64).sum());
                let id = format!("task-{sum}");
                results.lock().expect("lock").insert(id.clone(), sum);
                ("202 Accepted", json!({"id": id, "state": "PENDING"}))
            } else if let Some(rest) = req.strip_prefix("GET /api/v1/tasks/") {
                let id = rest.split_whitespace().next().unwrap_or_default();
                let r = results.lock().expect("lock").get(id).copied();
                ("200 OK", json!({"id": id, "state": "SUCCESS", "result": r}))
            } else {
                ("404 Not Found", json!({}))
            };
            let text = body.to_string();
            let _ = s
                .write_all(
                    format!(
                        "HTTP/1.1 {status}\r\ncontent-length: {}\r\n\r\n{text}",
                        text.len()
                    )
                    .as_bytes(),
                )
                .await;
        }
    });
    (port, handle)
}

/// redis-cli in the fake Redis container: `password` required unless
/// `open`; the lock held by the first beat container.
fn redis_cli(engine: &Fake, open: bool) -> ExecHandler {
    let engine = engine.clone();
    Arc::new(move |_c: &FakeContainer, cmd: &[String]| {
        let args: Vec<&str> = cmd.iter().skip(3).map(String::as_str).collect();
        let host_of = |svc: &str| {
            engine
                .containers()
                .values()
                .filter(|c| c.spec.name.contains(&format!("_{svc}_")) && c.running)
                .map(|c| c.id[..12].to_owned())
                .collect::<Vec<_>>()
        };
        let ok = |s: String| ExecOutput {
            exit_code: Some(0),
            stdout: s,
            stderr: String::new(),
        };
        match args.as_slice() {
            ["PING"] if open => ok("PONG\n".into()),
            ["PING"] => ExecOutput {
                exit_code: Some(1),
                stdout: "NOAUTH Authentication required.\n".into(),
                stderr: String::new(),
            },
            ["CONFIG", "GET", k] => ok(format!(
                "{k}\n{}\n",
                if *k == "appendonly" {
                    "yes"
                } else {
                    "noeviction"
                }
            )),
            ["GET", "taskstack:beat:lock"] => match host_of("beat").first() {
                Some(h) => ok(format!(
                    "{{\"id\":\"{h}.1.x\",\"host\":\"{h}\",\"pid\":1,\"since\":\"now\",\"token\":\"t\"}}\n"
                )),
                None => ok("\n".into()),
            },
            ["PTTL", "taskstack:beat:lock"] => ok("8000\n".into()),
            ["PTTL", _] => ok("3599000\n".into()),
            ["KEYS", _] => ok(host_of("worker")
                .iter()
                .map(|h| format!("taskstack:worker:{h}\n"))
                .collect()),
            ["MGET", ..] => ok(host_of("worker")
                .iter()
                .map(|h| format!("{{\"id\":\"{h}\",\"host\":\"{h}\",\"queues\":[\"celery\"]}}\n"))
                .collect()),
            other => ExecOutput {
                exit_code: Some(1),
                stdout: format!("ERR unexpected {other:?}"),
                stderr: String::new(),
            },
        }
    })
}

async fn stack(
    open_redis: bool,
) -> (
    Fake,
    Project,
    tempfile::TempDir,
    tokio::task::JoinHandle<()>,
) {
    let dir = tempfile::tempdir().expect("tempdir");
    let (port, web) = fake_web().await;
    let p = shipped(dir.path(), &[("WEB_PORT", &port.to_string())]);
    let engine = Fake::with_images(&[APP, REDIS]);
    engine.set_exec(redis_cli(&engine, open_redis));
    let opts = UpOptions {
        poll: Duration::from_millis(1),
        ..UpOptions::default()
    };
    up(&engine, &p, &opts, &mut Recorder::default())
        .await
        .expect("up");
    (engine, p, dir, web)
}

#[tokio::test]
async fn a_good_stack_passes_and_names_the_lock_holder() {
    let (engine, p, _dir, web) = stack(false).await;
    let report = verify(&engine, &p, &VerifyOptions::default())
        .await
        .expect("verify");
    assert!(report.ok, "{}", report.render());
    let holder = report.beat_lock_holder.clone().expect("holder");
    assert_eq!(holder.container.as_deref(), Some("proj_beat_1"));
    assert!(
        report
            .check("smoke.add")
            .expect("smoke")
            .reason
            .starts_with("taskstack.add returned")
    );
    let json = serde_json::to_value(&report.checks).expect("json");
    assert_eq!(json[0]["id"], "service.beat");
    web.abort();
}

#[tokio::test]
async fn an_open_redis_and_a_stopped_worker_fail_their_checks() {
    let (engine, p, _dir, web) = stack(true).await;
    engine.stop_by_name("proj_worker_2");
    let report = verify(&engine, &p, &VerifyOptions::default())
        .await
        .expect("verify");
    let failed: Vec<&str> = report.failed().iter().map(|c| c.id.as_str()).collect();
    assert_eq!(
        failed,
        ["service.worker", "redis.password"],
        "{}",
        report.render()
    );
    assert!(!report.ok);
    web.abort();
}
