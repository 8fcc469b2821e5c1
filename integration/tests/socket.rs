//! Redis through a Unix socket: a worker and a web process given Celery's
//! `redis+socket://` form (password and database in the URL) and redis-py's
//! `unix://` form run tasks end to end, every one of their connections on the
//! socket; a real Celery client given the same `redis+socket://` URL reaches
//! our worker; a socket URL naming a host is refused at start with the key
//! named.

use anyhow::{Result, ensure};
use serde_json::json;
use std::time::Duration;
use taskstack::proto::TaskState;
use taskstack_integration::python::{celery_python, run_client};
use taskstack_integration::{
    RedisServer, WebProcess, WorkerProcess, namespace, producer, run_to_exit, wait_until_sync,
};

/// Makes `redis` refuse connections without `pw`.
fn require_password(redis: &RedisServer, pw: &str) -> Result<()> {
    redis::cmd("CONFIG")
        .arg("SET")
        .arg("requirepass")
        .arg(pw)
        .query::<()>(&mut redis.conn()?)?;
    Ok(())
}

/// How many connections came through the socket (flag `U` in `CLIENT
/// LIST`), and how many through TCP (counting this one, asked at `tcp`).
fn socket_clients(tcp: &str) -> Result<(usize, usize)> {
    let mut c = redis::Client::open(tcp)?.get_connection()?;
    let list: String = redis::cmd("CLIENT").arg("LIST").query(&mut c)?;
    let socket = list
        .lines()
        .filter(|l| {
            l.split(' ')
                .any(|f| f.strip_prefix("flags=").is_some_and(|f| f.contains('U')))
        })
        .count();
    Ok((socket, list.lines().count() - socket))
}

/// Waits until `services` connections or more are on the socket and none
/// but the asking one on TCP.
fn wait_all_on_socket(tcp: &str, services: usize) -> Result<()> {
    wait_until_sync(
        &format!("at least {services} socket connections and no other TCP one"),
        Duration::from_secs(10),
        || {
            socket_clients(tcp)
                .ok()
                .filter(|&(socket, tcp)| socket >= services && tcp == 1)
        },
    )
    .map(drop)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_and_the_web_on_a_unix_socket_run_tasks_end_to_end() -> Result<()> {
    let redis = RedisServer::start()?;
    let sock = redis.socket_path();
    let pw = "s0cket-pass";
    require_password(&redis, pw)?;
    let tcp = format!("redis://:{pw}@127.0.0.1:{}/3", redis.port());
    let ns = namespace("socket");

    // Celery's form: password before @, database as virtual_host.
    let celery_form = format!("redis+socket://:{pw}@{}?virtual_host=3", sock.display());
    let w = WorkerProcess::spawn(&celery_form, &ns, &[])?;
    w.wait_log("worker ready", Duration::from_secs(20))?;
    ensure!(
        !w.log().contains(pw),
        "the password reached the log:\n{}",
        w.log()
    );
    wait_all_on_socket(&tcp, 1)?;
    // The producer is on TCP, database 3: the worker must watch the same one.
    let p = producer(&tcp, &ns)?;
    let id = p
        .send_task("taskstack.add", vec![json!(20), json!(22)])
        .await?;
    let r = p.wait(&id, Duration::from_secs(20)).await?;
    assert_eq!((r.status, r.result), (TaskState::Success, json!(42)));
    drop(p);

    // redis-py's form, the password from the key: the web enqueues and
    // reports results through the socket too.
    let redis_py_form = format!("unix://{}?db=3", sock.display());
    let web = WebProcess::spawn(&redis_py_form, &ns, &[("TASKSTACK_BROKER_PASSWORD", pw)]).await?;
    let done = web.run_add(40, 2).await?;
    assert_eq!(done["result"], 42, "{done}");

    // The worker's and the web's connections all came through the socket.
    wait_all_on_socket(&tcp, 2)?;
    drop((w, web));
    wait_until_sync(
        "the services' socket connections to close",
        Duration::from_secs(10),
        || socket_clients(&tcp).ok().filter(|(s, _)| *s == 0),
    )?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_celery_client_on_the_socket_reaches_our_worker_on_it() -> Result<()> {
    let python = tokio::task::spawn_blocking(celery_python).await??;
    let redis = RedisServer::start()?;
    let pw = "celery-s0cket";
    require_password(&redis, pw)?;
    // Both sides read the same URL, database 5 of a password-protected server.
    let url = format!(
        "redis+socket://:{pw}@{}?virtual_host=5",
        redis.socket_path().display()
    );
    let worker = WorkerProcess::spawn(&url, &namespace("socket-celery"), &[])?;
    worker.wait_log("worker ready", Duration::from_secs(60))?;
    let seen = run_client(&python, "send_add.py", &[&url], || worker.log()).await?;
    assert_eq!(
        (&seen["add_state"], &seen["add_result"]),
        (&json!("SUCCESS"), &json!(5)),
        "{seen}"
    );
    assert_eq!(seen["fail_exc_type"], "RuntimeError", "{seen}");
    // Our worker ran it (it names itself in the record), in database 5.
    let mut c = redis::Client::open(format!("redis://:{pw}@127.0.0.1:{}/5", redis.port()))?
        .get_connection()?;
    let key = format!(
        "celery-task-meta-{}",
        seen["add_id"].as_str().unwrap_or_default()
    );
    let record: String = redis::cmd("GET").arg(&key).query(&mut c)?;
    let record: serde_json::Value = serde_json::from_str(&record)?;
    assert_eq!(record["result"], 5, "{record}");
    assert!(record["worker"].is_string(), "{record}");
    Ok(())
}

#[test]
fn a_socket_url_that_names_a_host_is_refused_with_the_key_named() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let state = dir.path().join("w.json");
    let cmd = WorkerProcess::command("unix://redis/run/redis.sock", "socket-bad", &state)?;
    let out = run_to_exit(cmd, Duration::from_secs(20))?;
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert!(
        err.contains("broker_url") && err.contains("not a host"),
        "{err}"
    );
    Ok(())
}
