//! `verify` end to end against the fake engine: `redis-cli` answers come
//! from an exec handler, the web API from a tiny HTTP server on a free
//! loopback port (published as the web container's port).

use super::*;
use crate::engine::ExecOutput;
use crate::engine::fake::{ExecHandler, Fake, FakeContainer};
use crate::progress::Recorder;
use crate::up::tests::{APP, REDIS, shipped, shipped_file};
use crate::up::{UpOptions, up};
use std::collections::BTreeMap;
use std::path::Path;
use std::sync::{Arc, Mutex};
use taskstack::beat::lock::LockHolder;
use taskstack::broker::WorkerRecord;
use taskstack::proto::Keys;
use taskstack_integration::RedisServer;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

/// One request: its head and body, read until `content-length` is
/// satisfied (the client may send them in separate writes).
async fn read_request(s: &mut tokio::net::TcpStream) -> String {
    let mut raw = Vec::new();
    let mut buf = vec![0; 4096];
    loop {
        let n = s.read(&mut buf).await.unwrap_or(0);
        raw.extend_from_slice(&buf[..n]);
        let text = String::from_utf8_lossy(&raw).into_owned();
        if let Some((head, body)) = text.split_once("\r\n\r\n") {
            let want = head
                .lines()
                .find_map(|l| {
                    let (k, v) = l.split_once(':')?;
                    k.eq_ignore_ascii_case("content-length")
                        .then(|| v.trim().parse::<usize>().ok())?
                })
                .unwrap_or(0);
            if body.len() >= want {
                return text;
            }
        }
        if n == 0 {
            return text;
        }
    }
}

/// Answers `/health`, `POST /api/v1/tasks` (the sum of the args, its
/// result record written to `redis` with an hour's expiry, as a worker
/// would) and `GET /api/v1/tasks/<id>` like taskstack-web.
async fn fake_web(redis: String) -> (u16, tokio::task::JoinHandle<()>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let port = listener.local_addr().expect("addr").port();
    let handle = tokio::spawn(async move {
        let results: Arc<Mutex<BTreeMap<String, i64>>> = Arc::default();
        while let Ok((mut s, _)) = listener.accept().await {
            let req = read_request(&mut s).await;
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
                let mut c = ::redis::Client::open(redis.as_str())
                    .and_then(|c| c.get_connection())
                    .expect("redis");
                let _: () = ::redis::cmd("SET")
                    .arg(taskstack::proto::keys::result_key(&id))
                    .arg(sum)
                    .arg("EX")
                    .arg(3600)
                    .query(&mut c)
                    .expect("result");
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

/// redis-cli in the fake Redis container (verify runs only an
/// unauthenticated PING there): refused unless `open`.
fn redis_cli(open: bool) -> ExecHandler {
    Arc::new(move |_c: &FakeContainer, cmd: &[String]| {
        let args: Vec<&str> = cmd.iter().skip(3).map(String::as_str).collect();
        match args.as_slice() {
            ["PING"] if open => ExecOutput {
                exit_code: Some(0),
                stdout: "PONG\n".into(),
                stderr: String::new(),
            },
            ["PING"] => ExecOutput {
                exit_code: Some(1),
                stdout: "NOAUTH Authentication required.\n".into(),
                stderr: String::new(),
            },
            other => ExecOutput {
                exit_code: Some(1),
                stdout: format!("ERR unexpected {other:?}"),
                stderr: String::new(),
            },
        }
    })
}

/// The password `shipped` writes to every secret file.
const PASSWORD: &str = "s3cret-s3cret-s3cret";

/// A real redis-server standing in for the Redis container (port 6379 of
/// every container reaches it), with the stack's password and settings.
fn real_redis(engine: &Fake) -> RedisServer {
    let redis = RedisServer::start().expect("redis-server (apt-get install redis-server)");
    let mut c = redis.conn().expect("conn");
    let _: () = ::redis::cmd("CONFIG")
        .arg("SET")
        .arg("appendonly")
        .arg("yes")
        .query(&mut c)
        .expect("appendonly");
    let _: () = ::redis::cmd("CONFIG")
        .arg("SET")
        .arg("requirepass")
        .arg(PASSWORD)
        .query(&mut c)
        .expect("requirepass");
    engine.forward(6379, &format!("127.0.0.1:{}", redis.port()));
    redis
}

fn authed(redis: &RedisServer) -> ::redis::Connection {
    ::redis::Client::open(format!("redis://:{PASSWORD}@127.0.0.1:{}/0", redis.port()))
        .and_then(|c| c.get_connection())
        .expect("authenticated connection")
}

/// The running containers of `service` (their host names are their short ids).
fn hosts(engine: &Fake, service: &str) -> Vec<String> {
    engine
        .containers()
        .values()
        .filter(|c| c.spec.name.contains(&format!("_{service}_")) && c.running)
        .map(|c| c.id[..12].to_owned())
        .collect()
}

/// What a live beat and live workers leave in namespace `ns`: the lock
/// held by the first beat container; a lease and a heartbeat record for
/// each worker container in `leased`, only the record for the others.
fn heartbeats(redis: &RedisServer, engine: &Fake, ns: &str, leased: usize) {
    let keys = Keys::new(ns);
    let mut c = authed(redis);
    if let Some(h) = hosts(engine, "beat").first() {
        let holder = LockHolder::new(&format!("{h}.1.x"), h);
        let _: () = ::redis::cmd("SET")
            .arg(keys.beat_lock())
            .arg(holder.value())
            .arg("PX")
            .arg(8000)
            .query(&mut c)
            .expect("lock");
    }
    for (i, h) in hosts(engine, "worker").iter().enumerate() {
        let record = WorkerRecord {
            id: format!("{h}.1"),
            host: h.clone(),
            pid: 1,
            queues: vec!["celery".into()],
            tasks: vec!["taskstack.add".into()],
            concurrency: 1,
            started_at: String::new(),
            last_heartbeat: String::new(),
            processed: 0,
            failed: 0,
            retried: 0,
            dead_lettered: 0,
            version: String::new(),
            metrics_addr: None,
        };
        let json = serde_json::to_string(&record).expect("json");
        let _: () = ::redis::cmd("SET")
            .arg(keys.worker(&record.id))
            .arg(json)
            .query(&mut c)
            .expect("record");
        if i < leased {
            let far = taskstack::broker::now_ms() + 60_000;
            let _: () = ::redis::cmd("ZADD")
                .arg(keys.leases())
                .arg(far)
                .arg(&record.id)
                .query(&mut c)
                .expect("lease");
        }
    }
}

/// A stack `up` made on the fake engine, its Redis and its web real
/// servers of the test's own.
struct Stack {
    engine: Fake,
    p: Project,
    _secrets: tempfile::TempDir,
    web: tokio::task::JoinHandle<()>,
    redis: RedisServer,
}

async fn stack_on(file: Option<&Path>, open_redis: bool) -> Stack {
    let dir = tempfile::tempdir().expect("tempdir");
    let engine = Fake::with_images(&[APP, REDIS]);
    engine.set_exec(redis_cli(open_redis));
    let redis = real_redis(&engine);
    let (port, web) = fake_web(format!("redis://:{PASSWORD}@127.0.0.1:{}/0", redis.port())).await;
    let p = match file {
        None => shipped(dir.path(), &[("WEB_PORT", &port.to_string())]),
        Some(f) => shipped_file(f, dir.path(), &[("WEB_PORT", &port.to_string())]),
    };
    let opts = UpOptions {
        poll: Duration::from_millis(1),
        ..UpOptions::default()
    };
    up(&engine, &p, &opts, &mut Recorder::default())
        .await
        .expect("up");
    Stack {
        engine,
        p,
        _secrets: dir,
        web,
        redis,
    }
}

/// [`stack_on`] the shipped file, with a live beat and live workers.
async fn stack(open_redis: bool) -> Stack {
    let s = stack_on(None, open_redis).await;
    heartbeats(&s.redis, &s.engine, "taskstack", usize::MAX);
    s
}

#[tokio::test]
async fn a_good_stack_passes_and_names_the_lock_holder() {
    let s = stack(false).await;
    let (engine, p, web) = (&s.engine, &s.p, &s.web);
    let report = verify(engine, p, &VerifyOptions::default())
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
    let s = stack(true).await;
    let (engine, p, web) = (&s.engine, &s.p, &s.web);
    engine.stop_by_name("proj_worker_2");
    let report = verify(engine, p, &VerifyOptions::default())
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

/// The configuration is the services' own: a namespace set only in the
/// mounted TOML file is where verify looks, and a worker counts as live
/// only with a lease (as for `/health`), not for a heartbeat key alone.
#[tokio::test]
async fn the_mounted_toml_decides_and_only_leased_workers_are_live() {
    let compose = tempfile::tempdir().expect("tempdir");
    let shipped_dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../compose");
    std::fs::create_dir(compose.path().join("redis-ha")).expect("mkdir");
    for f in [
        "docker-compose.yml",
        "redis.conf",
        "redis-ha/lib.sh",
        "redis-ha/node.sh",
        "redis-ha/sentinel.sh",
    ] {
        std::fs::copy(shipped_dir.join(f), compose.path().join(f)).expect("copy");
    }
    let toml = std::fs::read_to_string(shipped_dir.join("taskstack.toml")).expect("toml");
    std::fs::write(
        compose.path().join("taskstack.toml"),
        format!("namespace = \"from-toml\"\n{toml}"),
    )
    .expect("write toml");
    let s = stack_on(Some(&compose.path().join("docker-compose.yml")), false).await;
    let (engine, p, web, redis) = (&s.engine, &s.p, &s.web, &s.redis);
    // Worker 2 left a heartbeat key behind but holds no lease.
    heartbeats(redis, engine, "from-toml", 1);
    // The default namespace has a full set: it must not be looked at.
    heartbeats(redis, engine, "taskstack", usize::MAX);

    let report = verify(engine, p, &VerifyOptions::default())
        .await
        .expect("verify");
    let failed: Vec<String> = report
        .failed()
        .iter()
        .map(|c| format!("{}: {}", c.id, c.reason))
        .collect();
    assert_eq!(
        failed,
        ["workers.heartbeat: proj_worker_2 has no heartbeat record"],
        "{}",
        report.render()
    );

    heartbeats(redis, engine, "from-toml", usize::MAX);
    let report = verify(engine, p, &VerifyOptions::default())
        .await
        .expect("verify");
    assert!(report.ok, "{}", report.render());
    assert!(
        report
            .check("queues.readable")
            .expect("counts")
            .reason
            .starts_with("celery: 0 ready"),
        "{}",
        report.render()
    );
    web.abort();
}

/// The running containers' environment decides, not a compose file
/// edited after `up`: the file now names a namespace the services do not
/// use, and verify still looks where they work (and passes).
#[tokio::test]
async fn the_running_containers_environment_decides_not_an_edited_file() {
    let s = stack(false).await;
    let (engine, web) = (&s.engine, &s.web);
    let mut edited = s.p.clone();
    for svc in edited.services.values_mut() {
        svc.environment
            .insert("TASKSTACK_NAMESPACE".into(), "edited-after-up".into());
    }
    let report = verify(engine, &edited, &VerifyOptions::default())
        .await
        .expect("verify");
    assert!(report.ok, "{}", report.render());

    // With no container running, the file is all there is to go by.
    let svc = &edited.services["worker"];
    let from_file = config::service_config(&edited, &config::as_running(svc, &[]))
        .expect("the file's configuration");
    assert_eq!(from_file.namespace, "edited-after-up");
    web.abort();
}
