//! Connections to a master found through Redis Sentinel.
//!
//! [`Discovery`] asks the sentinels (the redis crate's `SentinelClient`,
//! which also checks with `ROLE` that the server it names is a master) and
//! caches the answer. Every connection remembers the *generation* of the
//! answer it was made from. A connection-level error, or a `READONLY` reply
//! (a master demoted to replica by a failover), makes the holder call
//! [`Discovery::forget`]: the cached master is dropped, the generation
//! moves on, and every pooled connection of an older generation is closed
//! at its next checkout instead of being handed out again. The next
//! connection asks the sentinels anew, so worker, web and beat follow a
//! failover as soon as the sentinels have promoted a replica.

use super::BrokerError;
use crate::config::SentinelTarget;
use deadpool::managed::{self, Metrics, RecycleError, RecycleResult};
use redis::aio::MultiplexedConnection;
use redis::sentinel::{SentinelClient, SentinelNodeConnectionInfo, SentinelServerType};
use redis::{ConnectionAddr, ConnectionInfo, IntoConnectionInfo as _, RedisConnectionInfo};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// The master's address as the sentinels last gave it, and where to ask again.
pub(crate) struct Discovery {
    sentinels: tokio::sync::Mutex<SentinelClient>,
    master: std::sync::Mutex<Option<(redis::Client, u64)>>,
    generation: AtomicU64,
    /// Redacted, for errors and logs.
    shown: String,
    master_name: String,
    timeout: Duration,
}

impl Discovery {
    /// Sentinels of `t`; `timeout` bounds one lookup (all sentinels asked).
    pub(crate) fn new(
        t: &SentinelTarget,
        shown: String,
        timeout: Duration,
    ) -> Result<Self, redis::RedisError> {
        let addr = |host: &str, port: u16| {
            if t.tls {
                ConnectionAddr::TcpTls {
                    host: host.to_owned(),
                    port,
                    insecure: false,
                    tls_params: None,
                }
            } else {
                ConnectionAddr::Tcp(host.to_owned(), port)
            }
        };
        let mut sentinel_auth = RedisConnectionInfo::default();
        if let Some(pw) = &t.sentinel_password {
            sentinel_auth = sentinel_auth.set_password(pw.expose());
        }
        let sentinels = t
            .sentinels
            .iter()
            .map(|(h, p)| {
                addr(h, *p)
                    .into_connection_info()
                    .map(|i| i.set_redis_settings(sentinel_auth.clone()))
            })
            .collect::<Result<Vec<ConnectionInfo>, _>>()?;
        let mut node = RedisConnectionInfo::default().set_db(t.db);
        if let Some(u) = &t.username {
            node = node.set_username(u);
        }
        if let Some(pw) = &t.password {
            node = node.set_password(pw.expose());
        }
        let mut node_info = SentinelNodeConnectionInfo::default().set_redis_connection_info(node);
        if t.tls {
            node_info = node_info.set_tls_mode(redis::TlsMode::Secure);
        }
        let client = SentinelClient::build(
            sentinels,
            t.master_name.clone(),
            Some(node_info),
            SentinelServerType::Master,
        )?;
        Ok(Self {
            sentinels: tokio::sync::Mutex::new(client),
            master: std::sync::Mutex::new(None),
            generation: AtomicU64::new(0),
            shown,
            master_name: t.master_name.clone(),
            timeout,
        })
    }

    /// The current generation (see the module docs).
    pub(crate) fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    /// A client for the master and the generation it belongs to: the
    /// cached one, or a fresh answer from the sentinels.
    pub(crate) async fn master(&self) -> Result<(redis::Client, u64), String> {
        if let Some(m) = self.cached() {
            return Ok(m);
        }
        let mut sentinels = self.sentinels.lock().await;
        // Someone else may have asked while this caller waited for the lock.
        if let Some(m) = self.cached() {
            return Ok(m);
        }
        let generation = self.generation();
        // Boxed: the lookup's future is deep, and every caller's future
        // (an HTTP handler's) would otherwise carry it inline.
        let lookup = Box::pin(tokio::time::timeout(
            self.timeout,
            sentinels.async_get_client(),
        ));
        let client = match lookup.await {
            Ok(Ok(c)) => c,
            Ok(Err(e)) => {
                return Err(format!(
                    "no sentinel names a reachable master {:?}: {e}",
                    self.master_name
                ));
            }
            Err(_) => {
                return Err(format!(
                    "asking the sentinels for master {:?} timed out after {:?}",
                    self.master_name, self.timeout
                ));
            }
        };
        tracing::info!(
            target_url = %self.shown,
            master = %client.get_connection_info().addr(),
            generation,
            "redis sentinel: connecting to the master the sentinels name"
        );
        if let Ok(mut slot) = self.master.lock() {
            *slot = Some((client.clone(), generation));
        }
        Ok((client, generation))
    }

    fn cached(&self) -> Option<(redis::Client, u64)> {
        let slot = self.master.lock().ok()?;
        slot.as_ref()
            .filter(|(_, g)| *g == self.generation())
            .cloned()
    }

    /// A connection of generation `seen` failed in a way that may mean the
    /// master moved: forget it, so the next connection asks the sentinels.
    /// Only the first report per generation counts.
    pub(crate) fn forget(&self, seen: u64, why: &str) {
        if self
            .generation
            .compare_exchange(seen, seen + 1, Ordering::AcqRel, Ordering::Acquire)
            .is_ok()
        {
            tracing::warn!(
                target_url = %self.shown,
                generation = seen,
                reason = why,
                "redis sentinel: master connection lost; asking the sentinels again"
            );
            if let Ok(mut slot) = self.master.lock() {
                *slot = None;
            }
        }
    }
}

/// Whether an error on a connection to a Sentinel-found master means the
/// master may have moved: the connection failed, or the server turned
/// replica (`READONLY`).
pub(crate) fn master_may_have_moved(e: &redis::RedisError) -> bool {
    !matches!(e.kind(), redis::ErrorKind::Server(_)) || is_readonly(e)
}

/// A write refused by a replica (a master demoted by a failover), also when
/// a Lua script's write was refused.
pub(crate) fn is_readonly(e: &redis::RedisError) -> bool {
    matches!(
        e.kind(),
        redis::ErrorKind::Server(redis::ServerErrorKind::ReadOnly)
    ) || e.to_string().contains("READONLY")
}

/// A pooled connection to the master and the generation it was made in.
pub struct SentinelConn {
    pub(crate) conn: MultiplexedConnection,
    pub(crate) generation: u64,
}

impl std::fmt::Debug for SentinelConn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SentinelConn")
            .field("generation", &self.generation)
            .finish_non_exhaustive()
    }
}

/// deadpool's manager: creates connections to the master [`Discovery`]
/// names; a connection of an older generation is never handed out again.
pub struct SentinelManager {
    pub(crate) discovery: Arc<Discovery>,
    pub(crate) conn_cfg: redis::AsyncConnectionConfig,
}

impl std::fmt::Debug for SentinelManager {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SentinelManager")
            .field("target", &self.discovery.shown)
            .finish_non_exhaustive()
    }
}

impl managed::Manager for SentinelManager {
    type Type = SentinelConn;
    type Error = BrokerError;

    async fn create(&self) -> Result<SentinelConn, BrokerError> {
        let d = &self.discovery;
        let err = |reason: String| BrokerError::Connect {
            op: "connect",
            target: d.shown.clone(),
            reason,
        };
        let (client, generation) = d.master().await.map_err(err)?;
        match client
            .get_multiplexed_async_connection_with_config(&self.conn_cfg)
            .await
        {
            Ok(conn) => Ok(SentinelConn { conn, generation }),
            Err(e) => {
                d.forget(generation, "cannot connect to the master");
                Err(err(format!(
                    "master {}: {e}",
                    client.get_connection_info().addr()
                )))
            }
        }
    }

    async fn recycle(&self, c: &mut SentinelConn, _: &Metrics) -> RecycleResult<BrokerError> {
        if c.generation != self.discovery.generation() {
            return Err(RecycleError::message("the master changed"));
        }
        let pong = redis::cmd("PING")
            .query_async::<String>(&mut c.conn)
            .await
            .map_err(|e| {
                if master_may_have_moved(&e) {
                    self.discovery.forget(c.generation, "PING failed");
                }
                RecycleError::Backend(BrokerError::Redis {
                    op: "ping",
                    source: e,
                })
            })?;
        if pong == "PONG" {
            Ok(())
        } else {
            Err(RecycleError::message("unexpected PING reply"))
        }
    }
}

/// The pool of connections to a Sentinel-found master.
pub(crate) type SentinelPool = managed::Pool<SentinelManager>;
/// One connection of a [`SentinelPool`].
pub type SentinelObject = managed::Object<SentinelManager>;
