//! Test harness for taskstack's end-to-end tests: real `redis-server`
//! processes on free loopback ports, real worker and beat processes, and
//! waiting on conditions with deadlines (never fixed sleeps).

mod beat;
pub mod docker;
pub mod http;
pub mod monitors;
#[path = "../../lib/src/test_postgres.rs"]
mod postgres_server;
mod prereq;
mod process;
pub mod python;
#[path = "../../lib/src/test_rabbitmq.rs"]
pub mod rabbitmq_server;
mod redis_server;
pub mod sentinel;
mod web;
mod worker;

pub use beat::BeatProcess;
pub use postgres_server::{PASSWORD as PG_PASSWORD, PgServer};
pub use prereq::{Prereq, in_ci, require};
pub use process::{ServiceProcess, bin, run_to_exit};
pub use redis_server::RedisServer;
pub use sentinel::SentinelSet;
pub use web::{TEST_TOKEN, WebProcess};
pub use worker::{InProcessWorker, WorkerProcess, settings};

use anyhow::Result;
use std::future::Future;
use std::net::TcpListener;
use std::time::{Duration, Instant};

/// Waits until `cond` returns `Some`, polling every 20 ms, failing with
/// `what` after `deadline`.
pub async fn wait_until<T, F, Fut>(what: &str, deadline: Duration, mut cond: F) -> Result<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<Option<T>>>,
{
    let start = Instant::now();
    loop {
        if let Some(v) = cond().await? {
            return Ok(v);
        }
        if start.elapsed() > deadline {
            anyhow::bail!("timed out after {deadline:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Blocking variant of [`wait_until`] for synchronous checks.
pub fn wait_until_sync<T>(
    what: &str,
    deadline: Duration,
    mut cond: impl FnMut() -> Option<T>,
) -> Result<T> {
    let start = Instant::now();
    loop {
        if let Some(v) = cond() {
            return Ok(v);
        }
        if start.elapsed() > deadline {
            anyhow::bail!("timed out after {deadline:?} waiting for {what}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A free TCP port on 127.0.0.1 (bound and released; good enough for tests).
pub fn free_port() -> Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// Whether this test process runs as root (uid 0), as CI does: only then
/// can a service's refusal to run as root be exercised.
pub fn running_as_root() -> Result<bool> {
    use std::os::unix::fs::MetadataExt as _;
    Ok(std::fs::metadata("/proc/self")?.uid() == 0)
}

/// A unique namespace for one test.
pub fn namespace(test: &str) -> String {
    format!(
        "t-{test}-{}",
        &uuid::Uuid::new_v4().simple().to_string()[..8]
    )
}

/// A producer and broker for `redis_url` in `namespace`.
pub fn producer(redis_url: &str, namespace: &str) -> Result<taskstack::Producer> {
    let broker = broker(redis_url, namespace)?;
    Ok(taskstack::Producer::new(broker, "test@localhost"))
}

/// The default `redis_pool_size`: in-process workers run on it, as the
/// worker binary does (and `Worker::run` refuses a pool too small for it).
fn pool_size() -> usize {
    taskstack::config::Config::default().redis_pool_size.get()
}

/// A broker handle for `redis_url` in `namespace`.
pub fn broker(redis_url: &str, namespace: &str) -> Result<taskstack::broker::Broker> {
    let target = taskstack::config::RedisTarget::from_url(redis_url)?;
    let pool = taskstack::broker::RedisPool::new(&target, pool_size(), Duration::from_secs(5))?;
    Ok(taskstack::broker::Broker::new(
        pool.clone(),
        pool,
        taskstack::proto::Keys::new(namespace),
    ))
}

/// A broker handle for a `redis+sentinel://` URL whose sentinels need
/// `sentinel_password`, in `namespace`, waiting for `min_replicas_acked`
/// replicas after the writes that matter (`redis_min_replicas_acked`).
pub fn sentinel_broker(
    url: &str,
    sentinel_password: &str,
    namespace: &str,
    min_replicas_acked: u32,
) -> Result<taskstack::broker::Broker> {
    let target = taskstack::config::RedisTarget::from_sentinel_url(
        url,
        Some(taskstack::config::Secret::new(sentinel_password)),
    )?;
    let pool = taskstack::broker::RedisPool::new(&target, pool_size(), Duration::from_secs(2))?
        .with_min_replicas_acked(min_replicas_acked);
    Ok(taskstack::broker::Broker::new(
        pool.clone(),
        pool,
        taskstack::proto::Keys::new(namespace),
    ))
}
