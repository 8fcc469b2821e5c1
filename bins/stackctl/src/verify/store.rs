//! What the stores hold, read through the library the services use: a
//! `Broker` from the service's own configuration (see [`super::config`]),
//! with the Redis service's name in the URL replaced by where this host
//! reaches its container; the live workers, the beat lock (read with the
//! beat's own parser) and the queues' counts through the library's
//! backend over that broker, as `/health` reads them ([`Records`]). A
//! stack that keeps nothing on Redis (RabbitMQ and PostgreSQL) is read
//! through the backend the services open ([`open_backend`]).

use super::checks::{LockFacts, LockHolder, Probe, WorkerRecord};
use crate::compose::Project;
use crate::engine::{ContainerInfo, Engine};
use std::sync::Arc;
use std::time::Duration;
use taskstack::backend::{Backend, RedisBackend, Use};
use taskstack::broker::{Broker, QueueCounts, RedisPool};
use taskstack::config::Config;
use taskstack::proto::keys::result_key;
use taskstack::secret::SecretUrl;

/// Every store read is bounded by this (an unreachable address must not
/// hang `verify`).
const DEADLINE: Duration = Duration::from_secs(10);

/// `url` with its host, when it names one of the project's services,
/// replaced by where this host reaches that service's running container.
async fn reachable<E: Engine>(
    engine: &E,
    project: &Project,
    running: &[&ContainerInfo],
    key: &str,
    raw: &str,
) -> Probe<String> {
    let mut url = url::Url::parse(raw).map_err(|e| format!("{key}: {e}"))?;
    let Some(host) = url.host_str().map(str::to_owned) else {
        return Ok(raw.to_owned());
    };
    if !project.services.contains_key(&host) {
        return Ok(raw.to_owned());
    }
    let port = url.port().unwrap_or(match url.scheme() {
        "amqp" => 5672,
        "amqps" => 5671,
        "postgres" | "postgresql" => 5432,
        _ => 6379,
    });
    let c = running
        .iter()
        .find(|c| c.label(crate::plan::labels::SERVICE) == Some(host.as_str()))
        .ok_or_else(|| format!("no running container of service {host} ({key})"))?;
    let addr = engine
        .reach(&c.id, port)
        .await
        .map_err(|e| e.to_string())?
        .ok_or_else(|| format!("{} has no network address this host reaches", c.name))?;
    let (ip, port) = addr
        .rsplit_once(':')
        .and_then(|(ip, p)| Some((ip.to_owned(), p.parse::<u16>().ok()?)))
        .ok_or_else(|| format!("{}: not an address: {addr}", c.name))?;
    url.set_host(Some(&ip))
        .and_then(|()| {
            url.set_port(Some(port))
                .map_err(|()| url::ParseError::InvalidPort)
        })
        .map_err(|e| format!("{key}: {e}"))?;
    Ok(url.into())
}

/// A broker for `config`, reaching the project's Redis from this host.
pub async fn connect<E: Engine>(
    engine: &E,
    project: &Project,
    running: &[&ContainerInfo],
    mut config: Config,
) -> Probe<Broker> {
    // With RabbitMQ as the broker, the workers' leases, the beat lock and
    // the results are on the result backend's Redis: read that one.
    if super::rabbitmq::broker_kind(config.broker_url.expose()) == "amqp" {
        let backend = config
            .result_backend
            .clone()
            .filter(|b| super::rabbitmq::broker_kind(b.expose()) == "redis")
            .filter(|b| !taskstack::config::is_postgres_url(b.expose()))
            .ok_or("broker_url is amqp://... and result_backend is not a Redis URL")?;
        config.broker_url = backend;
        config.broker_password = config.result_backend_password.clone();
        config.broker_password_file = config.result_backend_password_file.clone();
    }
    let broker_url = config.broker_url.expose();
    let url = reachable(engine, project, running, "broker_url", broker_url).await?;
    config.broker_url = SecretUrl::new(url);
    // A PostgreSQL store is judged by the web's `/health`; this broker
    // reads Redis only (where chord counters stay in that case too).
    if let Some(b) = config
        .result_backend
        .take()
        .filter(|b| !taskstack::config::is_postgres_url(b.expose()))
    {
        let url = reachable(engine, project, running, "result_backend", b.expose()).await?;
        config.result_backend = Some(SecretUrl::new(url));
    }
    taskstack::connect(&config).map_err(|e| e.to_string())
}

/// The broker, or why there is none (prefixed with what needed it).
fn usable<'a>(broker: &'a Probe<Broker>, what: &str) -> Probe<&'a Broker> {
    broker.as_ref().map_err(|e| format!("{what}: {e}"))
}

async fn bounded<T>(what: &str, f: impl Future<Output = Probe<T>>) -> Probe<T> {
    tokio::time::timeout(DEADLINE, f)
        .await
        .map_err(|_| format!("{what}: no answer from the store within {DEADLINE:?}"))?
}

/// Where verify reads the workers' records, the beat lock and the queues'
/// counts: the library's backend, as the services and `/health` read them
/// (on Redis the broker's, see [`on_redis`]; in a stack that keeps nothing
/// on Redis, the one [`open_backend`] opens).
pub struct Records(pub Probe<Arc<dyn Backend>>);

impl Records {
    /// A Redis backend over `broker`.
    pub fn on_redis(broker: &Probe<Broker>) -> Self {
        Self(
            broker
                .clone()
                .map(|b| Arc::new(RedisBackend::new(b)) as Arc<dyn Backend>),
        )
    }

    fn backend(&self, what: &str) -> Probe<&dyn Backend> {
        self.0
            .as_ref()
            .map(|b| b.as_ref())
            .map_err(|e| format!("{what}: {e}"))
    }

    /// The beat lock: who holds it (the beat's own parser) and its PTTL.
    pub async fn beat_lock(&self) -> Probe<Option<LockFacts>> {
        let backend = self.backend("beat lock")?;
        let lease = bounded("beat lock", async {
            backend
                .leader_lock(Use::Request)
                .lease()
                .await
                .map_err(|e| format!("read beat lock: {e}"))
        })
        .await?;
        Ok(lease.map(|l| LockFacts {
            holder: taskstack::beat::lock::LockHolder::parse(&l.value).map(|h| LockHolder {
                id: h.id,
                host: h.host,
                pid: u64::from(h.pid),
                since: h.since,
            }),
            raw: l.value,
            pttl_ms: l.remaining_ms.unwrap_or(-1),
        }))
    }

    /// The live workers, exactly as `/health` reads them.
    pub async fn workers(&self) -> Probe<Vec<WorkerRecord>> {
        let backend = self.backend("live workers")?;
        let live = bounded("live workers", async {
            backend
                .inspect(Use::Request)
                .live_workers()
                .await
                .map_err(|e| e.to_string())
        })
        .await?;
        Ok(live
            .into_iter()
            .map(|w| WorkerRecord {
                id: w.id,
                host: w.host,
                queues: w.queues,
                tasks: w.tasks,
            })
            .collect())
    }

    /// Each queue's messages (ready, delayed, in flight, dead-lettered).
    pub async fn queues(&self, queues: &[String]) -> Probe<Vec<(String, QueueCounts)>> {
        let backend = self.backend("queue counts")?;
        let counts = bounded("queue counts", async {
            backend
                .inspect(Use::Request)
                .queue_counts(queues)
                .await
                .map_err(|e| e.to_string())
        })
        .await?;
        Ok(queues.iter().cloned().zip(counts).collect())
    }
}

/// The backend of a stack that keeps nothing on Redis, opened with
/// `config` (a service's own) with each URL's host, when it names one of
/// the project's services, replaced by where this host reaches it.
pub async fn open_backend<E: Engine>(
    engine: &E,
    project: &Project,
    running: &[&ContainerInfo],
    mut config: Config,
) -> Probe<Arc<dyn Backend>> {
    let url = reachable(
        engine,
        project,
        running,
        "broker_url",
        config.broker_url.expose(),
    )
    .await?;
    config.broker_url = SecretUrl::new(url);
    if let Some(b) = config.result_backend.take() {
        let url = reachable(engine, project, running, "result_backend", b.expose()).await?;
        config.result_backend = Some(SecretUrl::new(url));
    }
    taskstack::open_backend(&config).map_err(|e| e.to_string())
}

/// One command on a connection of `pool`, bounded.
async fn query<T: redis::FromRedisValue>(
    pool: &RedisPool,
    what: &'static str,
    cmd: redis::Cmd,
) -> Probe<T> {
    bounded(what, async {
        let mut conn = pool.get(what).await.map_err(|e| e.to_string())?;
        cmd.query_async(&mut conn)
            .await
            .map_err(|e| format!("{what}: {e}"))
    })
    .await
}

/// `CONFIG GET key`'s value.
pub async fn config_get(broker: &Probe<Broker>, key: &str) -> Probe<String> {
    let broker = usable(broker, key)?;
    let mut cmd = redis::cmd("CONFIG");
    cmd.arg("GET").arg(key);
    let pair: Vec<String> = query(broker.broker_pool(), "CONFIG GET", cmd).await?;
    pair.into_iter()
        .nth(1)
        .ok_or_else(|| format!("CONFIG GET {key}: no such setting"))
}

/// The PTTL (ms) of a task's result record, in the result backend.
pub async fn result_pttl(broker: &Probe<Broker>, task_id: &str) -> Probe<i64> {
    let broker = usable(broker, "result")?;
    let mut cmd = redis::cmd("PTTL");
    cmd.arg(result_key(task_id));
    query(broker.backend_pool(), "result PTTL", cmd).await
}
