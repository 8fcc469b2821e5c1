//! Redis connections: a deadpool pool per server, and [`Lane`], a connection
//! a long-lived loop keeps between calls (no PING per checkout) and replaces
//! after a connection error.

use crate::config::RedisTarget;
use deadpool_redis::{Connection, Manager, Pool, Runtime};
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
}

/// A pool of connections to one Redis server.
#[derive(Clone)]
pub struct RedisPool {
    pool: Pool,
    client: redis::Client,
    target: RedisTarget,
    timeout: Duration,
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
        if target.url().starts_with("rediss:") {
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
        let manager = Manager::new_with_config(target.url(), conn_cfg)
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
            pool,
            client,
            target: target.clone(),
            timeout,
        })
    }

    /// A connection from the pool (checked with a PING when reused).
    pub async fn get(&self, op: &'static str) -> Result<Connection, BrokerError> {
        self.pool.get().await.map_err(|e| BrokerError::Connect {
            op,
            target: self.target.redacted(),
            reason: e.to_string(),
        })
    }

    /// A fresh dedicated connection for publish/subscribe.
    pub async fn pubsub(&self) -> Result<redis::aio::PubSub, BrokerError> {
        let err = |reason: String| BrokerError::Connect {
            op: "subscribe",
            target: self.target.redacted(),
            reason,
        };
        match tokio::time::timeout(self.timeout, self.client.get_async_pubsub()).await {
            Ok(Ok(p)) => Ok(p),
            Ok(Err(e)) => Err(err(e.to_string())),
            Err(_) => Err(err(format!("timed out after {:?}", self.timeout))),
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

    /// Whether two pools talk to the same server and database.
    pub fn same_server(&self, other: &RedisPool) -> bool {
        self.target.url() == other.target.url()
    }

    /// A lane on this pool.
    pub fn lane(&self) -> Lane {
        Lane {
            pool: self.clone(),
            conn: None,
        }
    }
}

/// A connection kept by one loop across calls. After an I/O error or a
/// timeout the connection is dropped and the next call takes a fresh one.
pub struct Lane {
    pool: RedisPool,
    conn: Option<Connection>,
}

impl std::fmt::Debug for Lane {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Lane")
            .field("pool", &self.pool)
            .field("connected", &self.conn.is_some())
            .finish()
    }
}

impl Lane {
    /// This lane's connection, opening one when needed.
    pub async fn conn(&mut self, op: &'static str) -> Result<&mut Connection, BrokerError> {
        match &mut self.conn {
            Some(c) => Ok(c),
            slot => Ok(slot.insert(self.pool.get(op).await?)),
        }
    }

    /// Turns a command's outcome into ours; a connection-level error drops
    /// the connection so the next call reconnects.
    pub fn check<T>(
        &mut self,
        op: &'static str,
        r: redis::RedisResult<T>,
    ) -> Result<T, BrokerError> {
        r.map_err(|e| {
            if !matches!(e.kind(), redis::ErrorKind::Server(_)) {
                self.conn = None;
            }
            BrokerError::Redis { op, source: e }
        })
    }

    /// The pool this lane draws from.
    pub fn pool(&self) -> &RedisPool {
        &self.pool
    }
}

/// Runs `$body` (an expression using `$c: &mut Connection`) on `$lane`,
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

/// Idle lanes kept for reuse by request/response callers (the producer):
/// a reused lane skips the pool's PING check, saving a round trip per call.
#[derive(Debug)]
pub struct LanePool {
    pool: RedisPool,
    idle: std::sync::Mutex<Vec<Lane>>,
}

impl LanePool {
    /// Lanes drawn from `pool`.
    pub fn new(pool: RedisPool) -> Self {
        Self {
            pool,
            idle: std::sync::Mutex::new(Vec::new()),
        }
    }

    /// An idle lane, or a new one.
    pub fn take(&self) -> Lane {
        self.idle
            .lock()
            .ok()
            .and_then(|mut v| v.pop())
            .unwrap_or_else(|| self.pool.lane())
    }

    /// Returns a lane for reuse (one that lost its connection is dropped).
    pub fn give_back(&self, lane: Lane) {
        if lane.conn.is_some()
            && let Ok(mut v) = self.idle.lock()
        {
            v.push(lane);
        }
    }

    /// The pool lanes come from.
    pub fn pool(&self) -> &RedisPool {
        &self.pool
    }
}
