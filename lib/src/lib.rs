//! taskstack: a Celery-protocol task queue on Redis.
//!
//! Everything the taskstack binaries share:
//!
//! - [`config`]: figment-based configuration (defaults < TOML < `TASKSTACK_*`).
//! - [`proto`]: the Celery message envelope, result records and every Redis key name.
//! - [`backend`]: capability traits (enqueue, consume, leases, delayed set,
//!   results, task states, dead letters, inspection, leader lock, slot
//!   ledger) with a Redis and an in-memory implementation, PostgreSQL
//!   results, and RabbitMQ messages (feature `amqp`).
//! - [`broker`]: the Redis side — atomic Lua steps for taking, settling,
//!   delaying, dead-lettering and restoring messages; leases; results.
//! - [`canvas`]: Celery's chain, link, link_error and chord on the wire
//!   (signatures, follow-up messages, Celery's chord counters).
//! - [`producer`]: send tasks, read and await results.
//! - [`worker`]: the execution engine, the task registry and built-in tasks.
//! - [`beat`]: the periodic scheduler (one leader, every slot once).
//! - [`secret`]: passwords, tokens and URLs that print as `***`.
//! - `http_client` (feature `http-client`): one HTTP/1.1 request with a
//!   deadline, for health checks, `stackctl verify` and tests.
//! - [`service`], [`shutdown`], [`telemetry`]: process plumbing shared by
//!   the binaries (exit codes, root refusal, state file, signals, logs).

pub mod backend;
#[cfg(feature = "beat")]
pub mod beat;
pub mod broker;
pub mod canvas;
pub mod config;
#[cfg(feature = "worker")]
pub mod control;
#[cfg(feature = "worker")]
pub mod events;
#[cfg(feature = "http-client")]
pub mod http_client;
pub mod producer;
pub mod proto;
mod results_listener;
pub mod secret;
#[cfg(feature = "service")]
pub mod service;
pub mod shutdown;
#[cfg(feature = "service")]
pub mod telemetry;
#[cfg(test)]
mod test_postgres;
#[cfg(all(test, feature = "amqp"))]
mod test_rabbitmq;
#[cfg(test)]
mod test_redis;
mod waiters;
#[cfg(feature = "worker")]
pub mod worker;

pub use canvas::send::{ChainSent, ChordOptions, ChordSent};
pub use producer::{Producer, SendOptions, TaskRequest};

use broker::{Broker, BrokerError, RedisPool};
use config::{Config, ConfigError};

/// Why connecting from a configuration failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConnectError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Broker(#[from] BrokerError),
    #[error(transparent)]
    Postgres(#[from] backend::postgres::PgError),
}

/// The backend a configuration names: Redis for everything, Redis for
/// messages and PostgreSQL for results (`result_backend =
/// "postgresql://..."`; run [`backend::postgres::prepare`] once at start-up
/// first), or RabbitMQ for messages with the rest on Redis or in
/// PostgreSQL. Connections are opened lazily.
pub fn open_backend(config: &Config) -> Result<std::sync::Arc<dyn backend::Backend>, ConnectError> {
    #[cfg(feature = "amqp")]
    if let Some(url) = config.amqp_url()? {
        let options = backend::amqp::QueueOptions {
            quorum: config.broker_queue_type == config::QueueType::Quorum,
            max_priority: config.broker_queue_max_priority,
        };
        let (url, timeout, prefetch) = (
            url.expose().to_owned(),
            config.redis_timeout,
            config.effective_prefetch(),
        );
        // Everything but the messages in PostgreSQL: no Redis at all.
        if let Some(target) = config.postgres_target()? {
            let pg = backend::postgres::PgRecords::open(
                &target,
                config.redis_pool_size.get(),
                config.result_backend_timeout,
                &config.namespace,
            )?;
            return Ok(std::sync::Arc::new(backend::AmqpBackend::with_postgres(
                url, options, timeout, prefetch, pg,
            )));
        }
        return Ok(std::sync::Arc::new(backend::AmqpBackend::new(
            url,
            options,
            timeout,
            prefetch,
            backend::RedisBackend::new(connect(config)?),
        )));
    }
    let broker = connect(config)?;
    #[cfg(not(feature = "amqp"))]
    if config.broker_is_amqp() {
        return Err(ConnectError::Config(config::ConfigError::Invalid {
            key: "broker_url",
            value: config::redact_url(config.broker_url.expose()),
            reason: "this build has no RabbitMQ support (cargo feature `amqp`)".into(),
        }));
    }
    Ok(match config.postgres_target()? {
        None => std::sync::Arc::new(backend::RedisBackend::new(broker)),
        Some(target) => std::sync::Arc::new(backend::PostgresBackend::new(
            broker,
            &target,
            config.redis_pool_size.get(),
            config.result_backend_timeout,
        )?),
    })
}

/// Builds the broker (and result backend) pools a configuration names.
/// Connections are opened lazily, so this succeeds while Redis is down.
pub fn connect(config: &Config) -> Result<Broker, ConnectError> {
    let size = config.redis_pool_size.get();
    let acked = config.redis_min_replicas_acked;
    let broker = RedisPool::new(&config.broker_target()?, size, config.redis_timeout)?
        .with_min_replicas_acked(acked);
    let backend = match &config.result_backend {
        None => broker.clone(),
        // Results in PostgreSQL: Redis keeps chord counters on the broker.
        Some(url) if config::is_postgres_url(url.expose()) => broker.clone(),
        Some(_) => RedisPool::new(&config.backend_target()?, size, config.redis_timeout)?
            .with_min_replicas_acked(acked),
    };
    Ok(Broker::new(
        broker,
        backend,
        proto::Keys::new(&config.namespace),
    ))
}
