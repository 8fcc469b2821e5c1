//! Redis connections: a deadpool pool per server, one shared multiplexed
//! connection per server, and [`Lane`], the handle every Redis step runs on.
//!
//! Two kinds of lane:
//! - a *pooled* lane keeps one connection of the pool for a long-lived loop
//!   (the worker's dispatcher, settler, keeper): no PING per checkout, and
//!   blocking commands (BLMOVE) only ever block that loop;
//! - a *shared* lane uses the server's one multiplexed connection, which
//!   pipelines the commands of every concurrent caller (the producer, the
//!   web API's requests): no checkout, no pool slot held, so any number of
//!   concurrent requests never wait for one. Never used for blocking commands.
//!
//! Either kind is replaced after a connection error.
//!
//! A target given as a `redis+sentinel://` URL connects to the master the
//! sentinels name (`super::sentinel`): its pooled connections come from a
//! pool of its own, and a connection error or a `READONLY` reply sends the
//! next connection back to the sentinels, so a failover is followed.

use super::sentinel::{
    Discovery, SentinelManager, SentinelObject, SentinelPool, master_may_have_moved,
};
use crate::config::RedisTarget;
use deadpool_redis::{Connection, Manager, Pool, Runtime};
use redis::aio::MultiplexedConnection;
use std::sync::Arc;
use std::time::Duration;

/// A failed Redis operation, naming what taskstack was doing.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum BrokerError {
    #[error("redis {op} failed: {source}")]
    Redis {
        op: &'static str,
        #[source]
        source: redis::RedisError,
    },
    #[error("no redis connection for {op} ({target}): {reason}")]
    Connect {
        op: &'static str,
        target: String,
        reason: String,
    },
    #[error("redis {op} returned an unexpected reply: {detail}")]
    Reply { op: &'static str, detail: String },
}

impl BrokerError {
    pub(crate) fn redis(op: &'static str) -> impl FnOnce(redis::RedisError) -> Self {
        move |source| Self::Redis { op, source }
    }

    /// Whether the connection broke under the command (closed, reset, a
    /// broken pipe): the lane has dropped it, so a read may be redone on a
    /// fresh one (with Sentinel, one to the master the sentinels name now).
    pub fn is_connection_lost(&self) -> bool {
        match self {
            Self::Redis { source, .. } => source.is_io_error() || source.is_connection_dropped(),
            Self::Connect { .. } | Self::Reply { .. } => false,
        }
    }

    /// Whether Redis refused the credentials (a wrong or missing password):
    /// retrying will not help until the configuration changes.
    pub fn is_auth_failure(&self) -> bool {
        let text = match self {
            Self::Redis { source, .. } => {
                if source.kind() == redis::ErrorKind::AuthenticationFailed {
                    return true;
                }
                source.to_string()
            }
            Self::Connect { reason, .. } => reason.clone(),
            Self::Reply { .. } => return false,
        };
        [
            "AuthenticationFailed",
            "WRONGPASS",
            "NOAUTH",
            "invalid password",
        ]
        .iter()
        .any(|m| text.contains(m))
    }
}

/// Where connections come from: one server named directly, or the master
/// the sentinels name.
#[derive(Clone)]
enum Source {
    Direct {
        pool: Pool,
        // Boxed: a Client is far larger than the Sentinel variant.
        client: Box<redis::Client>,
    },
    Sentinel {
        pool: SentinelPool,
        discovery: Arc<Discovery>,
    },
}

/// A pool of connections to one Redis server. Cloning it is cheap (a few
/// reference counts): every lane, and so every web request, takes a clone.
#[derive(Clone)]
pub struct RedisPool {
    source: Arc<Source>,
    conn_cfg: Arc<redis::AsyncConnectionConfig>,
    target: Arc<RedisTarget>,
    timeout: Duration,
    /// The shared multiplexed connection and the sentinel generation it was
    /// made in (0 without Sentinel), opened on first use and replaced after
    /// a connection error or a failover.
    shared: Arc<tokio::sync::Mutex<Option<(MultiplexedConnection, u64)>>>,
    /// `redis_min_replicas_acked`: replicas that must have the writes that
    /// matter before they count as done (0: do not wait).
    min_replicas_acked: u32,
}

impl std::fmt::Debug for RedisPool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisPool")
            .field("target", &self.target)
            .finish_non_exhaustive()
    }
}

impl RedisPool {
    /// A pool of at most `size` connections; `timeout` bounds connecting and
    /// every command (blocking waits are kept shorter than it).
    pub fn new(target: &RedisTarget, size: usize, timeout: Duration) -> Result<Self, BrokerError> {
        if target.is_tls() {
            // rustls needs one process-wide crypto provider; a second install is a no-op.
            let _ = rustls::crypto::ring::default_provider().install_default();
        }
        let connect_err = |reason: String| BrokerError::Connect {
            op: "connect",
            target: target.redacted(),
            reason,
        };
        let conn_cfg = redis::AsyncConnectionConfig::new()
            .set_connection_timeout(Some(timeout))
            .set_response_timeout(Some(timeout));
        if let Some(s) = target.sentinel() {
            let discovery = Arc::new(
                Discovery::new(s, target.redacted(), timeout)
                    .map_err(|e| connect_err(e.to_string()))?,
            );
            let manager = SentinelManager {
                discovery: Arc::clone(&discovery),
                conn_cfg: conn_cfg.clone(),
            };
            // Creating a connection asks the sentinels first, then connects.
            let pool = SentinelPool::builder(manager)
                .max_size(size)
                .runtime(deadpool::Runtime::Tokio1)
                .wait_timeout(Some(timeout * 2))
                .create_timeout(Some(timeout * 2))
                .recycle_timeout(Some(timeout))
                .build()
                .map_err(|e| connect_err(e.to_string()))?;
            return Ok(Self {
                source: Arc::new(Source::Sentinel { pool, discovery }),
                conn_cfg: Arc::new(conn_cfg),
                target: Arc::new(target.clone()),
                timeout,
                shared: Arc::default(),
                min_replicas_acked: 0,
            });
        }
        let manager = Manager::new_with_config(target.url(), conn_cfg.clone())
            .map_err(|e| connect_err(e.to_string()))?;
        let pool = Pool::builder(manager)
            .max_size(size)
            .runtime(Runtime::Tokio1)
            .wait_timeout(Some(timeout))
            .create_timeout(Some(timeout))
            .recycle_timeout(Some(timeout))
            .build()
            .map_err(|e| connect_err(e.to_string()))?;
        let client = redis::Client::open(target.url()).map_err(|e| connect_err(e.to_string()))?;
        Ok(Self {
            source: Arc::new(Source::Direct {
                pool,
                client: Box::new(client),
            }),
            conn_cfg: Arc::new(conn_cfg),
            target: Arc::new(target.clone()),
            timeout,
            shared: Arc::default(),
            min_replicas_acked: 0,
        })
    }

    /// The shared multiplexed connection (a cheap handle), connecting when
    /// there is none.
    async fn shared(&self, op: &'static str) -> Result<(MultiplexedConnection, u64), BrokerError> {
        let mut slot = self.shared.lock().await;
        if let Some((c, g)) = slot.as_ref()
            && *g == self.generation()
        {
            return Ok((c.clone(), *g));
        }
        let err = |reason: String| BrokerError::Connect {
            op,
            target: self.target.redacted(),
            reason,
        };
        let (client, g) = self.client().await.map_err(err)?;
        let c = client
            .get_multiplexed_async_connection_with_config(&self.conn_cfg)
            .await
            .map_err(|e| {
                self.forget(g, "cannot connect to the master");
                err(e.to_string())
            })?;
        *slot = Some((c.clone(), g));
        Ok((c, g))
    }

    /// A client for the server (with Sentinel: the master the sentinels
    /// name now) and the generation it belongs to.
    async fn client(&self) -> Result<(redis::Client, u64), String> {
        match self.source.as_ref() {
            Source::Direct { client, .. } => Ok((client.as_ref().clone(), 0)),
            Source::Sentinel { discovery, .. } => Box::pin(discovery.master()).await,
        }
    }

    /// The sentinel generation connections are made in now (0 without Sentinel).
    fn generation(&self) -> u64 {
        match self.source.as_ref() {
            Source::Direct { .. } => 0,
            Source::Sentinel { discovery, .. } => discovery.generation(),
        }
    }

    /// With Sentinel: a connection of generation `seen` failed in a way
    /// that may mean the master moved, so the next one asks the sentinels.
    fn forget(&self, seen: u64, why: &str) {
        if let Source::Sentinel { discovery, .. } = self.source.as_ref() {
            discovery.forget(seen, why);
        }
    }

    /// Forgets the shared connection after a connection error, so the next
    /// shared lane reconnects.
    fn drop_shared(&self) {
        if let Ok(mut slot) = self.shared.try_lock() {
            *slot = None;
        }
    }

    /// A connection from the pool (checked with a PING when reused; with
    /// Sentinel, also dropped when the master changed since it was made).
    pub async fn get(&self, op: &'static str) -> Result<LaneConn, BrokerError> {
        let err = |reason: String| BrokerError::Connect {
            op,
            target: self.target.redacted(),
            reason,
        };
        match self.source.as_ref() {
            Source::Direct { pool, .. } => pool
                .get()
                .await
                .map(LaneConn::Pooled)
                .map_err(|e| err(e.to_string())),
            // Boxed, like the lookup inside it: keeps callers' futures shallow.
            Source::Sentinel { pool, .. } => match Box::pin(pool.get()).await {
                Ok(c) => Ok(LaneConn::Sentinel(c)),
                // The manager's own error says what failed.
                Err(deadpool::managed::PoolError::Backend(e)) => Err(e),
                Err(e) => Err(err(e.to_string())),
            },
        }
    }

    /// A fresh dedicated connection for publish/subscribe (with Sentinel:
    /// to the master the sentinels name now).
    pub async fn pubsub(&self) -> Result<redis::aio::PubSub, BrokerError> {
        let err = |reason: String| BrokerError::Connect {
            op: "subscribe",
            target: self.target.redacted(),
            reason,
        };
        let connect = async {
            let (client, g) = self.client().await?;
            client.get_async_pubsub().await.map_err(|e| {
                self.forget(g, "cannot subscribe on the master");
                e.to_string()
            })
        };
        match tokio::time::timeout(self.timeout, connect).await {
            Ok(Ok(p)) => Ok(p),
            Ok(Err(e)) => Err(err(e)),
            Err(_) => Err(err(format!("timed out after {:?}", self.timeout))),
        }
    }

    /// Makes [`Lane::replicated`] wait until `n` replicas have this pool's
    /// writes (`redis_min_replicas_acked`; 0 does not wait).
    #[must_use]
    pub fn with_min_replicas_acked(mut self, n: u32) -> Self {
        self.min_replicas_acked = n;
        self
    }

    /// The most connections this pool opens (`redis_pool_size`).
    pub fn max_size(&self) -> usize {
        match self.source.as_ref() {
            Source::Direct { pool, .. } => pool.status().max_size,
            Source::Sentinel { pool, .. } => pool.status().max_size,
        }
    }

    /// The server this pool talks to (password hidden when printed).
    pub fn target(&self) -> &RedisTarget {
        &self.target
    }

    /// The per-command timeout.
    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    /// Whether two pools talk to the same server and database (for
    /// Sentinel: the same sentinels, master name and database).
    pub fn same_server(&self, other: &RedisPool) -> bool {
        self.target.url() == other.target.url()
    }

    /// A pooled lane: it keeps one connection of the pool while it lives.
    pub fn lane(&self) -> Lane {
        Lane {
            pool: self.clone(),
            conn: None,
            generation: 0,
            shared: false,
        }
    }

    /// A shared lane: commands go over the server's one multiplexed
    /// connection, pipelined with every other caller's. For request/response
    /// callers; never for blocking commands.
    pub fn shared_lane(&self) -> Lane {
        Lane {
            pool: self.clone(),
            conn: None,
            generation: 0,
            shared: true,
        }
    }
}

/// The connection behind a lane: one of the pool's, or the shared one.
#[allow(missing_debug_implementations)] // neither connection type is Debug
pub enum LaneConn {
    Pooled(Connection),
    Shared(MultiplexedConnection),
    /// One of the pool's, to a master found through Sentinel.
    Sentinel(SentinelObject),
}

impl LaneConn {
    /// The sentinel generation this connection was made in (0 without Sentinel).
    fn generation(&self) -> u64 {
        match self {
            Self::Sentinel(c) => c.generation,
            Self::Pooled(_) | Self::Shared(_) => 0,
        }
    }
}

impl redis::aio::ConnectionLike for LaneConn {
    fn req_packed_command<'a>(
        &'a mut self,
        cmd: &'a redis::Cmd,
    ) -> redis::RedisFuture<'a, redis::Value> {
        match self {
            Self::Pooled(c) => c.req_packed_command(cmd),
            Self::Shared(c) => c.req_packed_command(cmd),
            Self::Sentinel(c) => c.conn.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        cmd: &'a redis::Pipeline,
        offset: usize,
        count: usize,
    ) -> redis::RedisFuture<'a, Vec<redis::Value>> {
        match self {
            Self::Pooled(c) => c.req_packed_commands(cmd, offset, count),
            Self::Shared(c) => c.req_packed_commands(cmd, offset, count),
            Self::Sentinel(c) => c.conn.req_packed_commands(cmd, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Self::Pooled(c) => c.get_db(),
            Self::Shared(c) => c.get_db(),
            Self::Sentinel(c) => c.conn.get_db(),
        }
    }
}

/// Transfers over this size make [`Lane::recycle_after`] close the
/// connection that carried them.
pub const LARGE_TRANSFER: usize = 4 << 20;

/// The handle a Redis step runs on (see the module docs for the two
/// kinds). After an I/O error or a timeout the connection is dropped and
/// the next call takes a fresh one.
pub struct Lane {
    pool: RedisPool,
    conn: Option<LaneConn>,
    /// The sentinel generation of `conn` (0 without Sentinel).
    generation: u64,
    shared: bool,
}

impl std::fmt::Debug for Lane {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Lane")
            .field("pool", &self.pool)
            .field("connected", &self.conn.is_some())
            .field("shared", &self.shared)
            .finish()
    }
}

impl Lane {
    /// This lane's connection, opening one when needed.
    pub async fn conn(&mut self, op: &'static str) -> Result<&mut LaneConn, BrokerError> {
        if self.conn.is_none() {
            let (conn, generation) = if self.shared {
                let (c, g) = self.pool.shared(op).await?;
                (LaneConn::Shared(c), g)
            } else {
                let c = self.pool.get(op).await?;
                let g = c.generation();
                (c, g)
            };
            self.conn = Some(conn);
            self.generation = generation;
        }
        self.conn.as_mut().ok_or_else(|| BrokerError::Reply {
            op,
            detail: "no connection".into(),
        })
    }

    /// Turns a command's outcome into ours; a connection-level error drops
    /// the connection so the next call reconnects. With Sentinel, so does a
    /// `READONLY` reply (the master was demoted), and either sends the next
    /// connection back to the sentinels.
    pub fn check<T>(
        &mut self,
        op: &'static str,
        r: redis::RedisResult<T>,
    ) -> Result<T, BrokerError> {
        r.map_err(|e| {
            let sentinel = matches!(*self.pool.source, Source::Sentinel { .. });
            let moved = sentinel && master_may_have_moved(&e);
            if moved || !matches!(e.kind(), redis::ErrorKind::Server(_)) {
                if moved {
                    self.pool.forget(self.generation, &e.to_string());
                }
                if self.shared {
                    self.pool.drop_shared();
                }
                self.conn = None;
            }
            BrokerError::Redis { op, source: e }
        })
    }

    /// Closes this lane's pooled connection instead of returning it to the
    /// pool (the next call opens a fresh one), when `bytes` moved over it
    /// exceed `LARGE_TRANSFER` (4 MiB): a connection's buffers keep the size of
    /// the largest reply or request it carried for as long as it lives. The
    /// shared connection is left alone.
    pub fn recycle_after(&mut self, bytes: usize) {
        if bytes <= LARGE_TRANSFER {
            return;
        }
        match self.conn.take() {
            Some(LaneConn::Pooled(c)) => drop(Connection::take(c)),
            Some(LaneConn::Sentinel(c)) => drop(SentinelObject::take(c)),
            other => self.conn = other,
        }
    }

    /// The pool this lane draws from.
    pub fn pool(&self) -> &RedisPool {
        &self.pool
    }

    /// With `redis_min_replicas_acked` set: `WAIT`s until that many
    /// replicas have every write made so far on this lane's connection, so
    /// the write survives a failover; fails naming `op` when fewer did
    /// within three quarters of the command timeout (the write stays on
    /// the master: redoing the step is safe, it is what the callers do).
    /// Without the setting, returns at once.
    pub async fn replicated(&mut self, op: &'static str) -> Result<(), BrokerError> {
        let n = self.pool.min_replicas_acked;
        if n == 0 || self.conn.is_none() {
            return Ok(());
        }
        let ms = u64::try_from(self.pool.timeout.as_millis() * 3 / 4).unwrap_or(u64::MAX);
        let acked: i64 = on_lane!(self, op, |c| redis::cmd("WAIT")
            .arg(n)
            .arg(ms)
            .query_async::<i64>(c))?;
        if acked < i64::from(n) {
            return Err(BrokerError::Reply {
                op,
                detail: format!(
                    "only {acked} replica(s) of the {n} redis_min_replicas_acked asks for \
                     acknowledged the write within {ms} ms; it may not survive a failover"
                ),
            });
        }
        Ok(())
    }
}

/// Runs `$body` (an expression using `$c: &mut LaneConn`) on `$lane`,
/// mapping errors to [`BrokerError`] and dropping broken connections.
macro_rules! on_lane {
    ($lane:expr, $op:expr, |$c:ident| $body:expr) => {{
        let op: &'static str = $op;
        let lane: &mut $crate::broker::Lane = $lane;
        let r = {
            let $c = lane.conn(op).await?;
            $body.await
        };
        lane.check(op, r)
    }};
}
pub(crate) use on_lane;
