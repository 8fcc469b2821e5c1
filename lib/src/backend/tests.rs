//! The conformance suite against each implementation: the memory one on
//! paused time, the Redis one on a private `redis-server` per test, the
//! PostgreSQL result store on a private `redis-server` and `postgres` per
//! test.

use super::conformance::{self, Harness};
use super::{Backend, MemoryBackend, RedisBackend};
use crate::broker::{Broker, RedisPool};
use crate::config::RedisTarget;
use std::sync::Arc;
use std::time::Duration;

/// Declares one test per conformance case for the harness `$make` builds.
macro_rules! conformance_suite {
    (#[$attr:meta] $make:expr) => {
        conformance_suite!(@cases #[$attr] $make;
            delivery_order_and_priority_buckets,
            waiting_wakes_on_arrival,
            redelivery_after_lease_expiry,
            hand_back_returns_to_the_front,
            settle_stores_results_then_acks_idempotently,
            settle_acknowledges_nothing_until_results_are_stored,
            dead_letters_keep_reason_and_payload_and_move_once,
            oversized_messages_stay_unsent_and_dead_letter_whole,
            delayed_messages_move_when_due_and_not_before,
            revoke_and_start_exclude_each_other,
            a_start_without_tracking_still_refuses_revocation,
            results_expire,
        );
        #[cfg(feature = "beat")]
        mod beat {
            use super::*;
            use crate::backend::conformance::beat as conformance;
            conformance_suite!(@cases #[$attr] $make;
                leader_lock_is_exclusive,
                slots_publish_once_across_handover,
            );
        }
    };
    (@cases #[$attr:meta] $make:expr; $($case:ident),* $(,)?) => {
        $(
            #[$attr]
            async fn $case() {
                let h = $make;
                conformance::$case(&h).await;
            }
        )*
    };
}

/// The memory backend; time steps by advancing paused time.
struct Memory(MemoryBackend);

#[async_trait::async_trait]
impl Harness for Memory {
    fn backend(&self) -> Arc<dyn Backend> {
        Arc::new(self.0.clone())
    }
    fn results_down(&self) -> Arc<dyn Backend> {
        Arc::new(self.0.with_results_unavailable())
    }
    async fn tick(&self) {
        tokio::time::advance(Duration::from_millis(50)).await;
    }
}

/// The Redis backend on its own server; time steps by a short real wait.
struct Redis {
    backend: RedisBackend,
    /// The same broker with results on a port nothing listens on.
    results_down: RedisBackend,
    _server: crate::test_redis::Server,
}

impl Redis {
    fn new() -> Self {
        let server = crate::test_redis::server();
        let target = RedisTarget::from_url(&server.url).expect("url");
        let pool = RedisPool::new(&target, 8, Duration::from_secs(5)).expect("pool");
        let keys = crate::proto::Keys::new("conformance");
        let closed = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("free port");
        let nowhere = RedisTarget::from_url(&format!("redis://{closed}/0")).expect("url");
        let nowhere = RedisPool::new(&nowhere, 1, Duration::from_secs(5)).expect("pool");
        Self {
            backend: RedisBackend::new(Broker::new(pool.clone(), pool.clone(), keys.clone())),
            results_down: RedisBackend::new(Broker::new(pool, nowhere, keys)),
            _server: server,
        }
    }
}

#[async_trait::async_trait]
impl Harness for Redis {
    fn backend(&self) -> Arc<dyn Backend> {
        Arc::new(self.backend.clone())
    }
    fn results_down(&self) -> Arc<dyn Backend> {
        Arc::new(self.results_down.clone())
    }
    async fn tick(&self) {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Messages on Redis, results in PostgreSQL, each its own server.
struct Postgres {
    backend: super::PostgresBackend,
    /// The same broker with results on a port nothing listens on.
    results_down: super::PostgresBackend,
    _redis: crate::test_redis::Server,
    _pg: crate::test_postgres::PgServer,
}

impl Postgres {
    async fn new() -> Self {
        let redis = crate::test_redis::server();
        let pg = crate::test_postgres::PgServer::start();
        let db = pg.create_database();
        let target = pg_target(&pg.url(&db));
        super::postgres::prepare(&target, Duration::from_secs(5), Duration::from_secs(5))
            .await
            .expect("migrate");
        let closed = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("free port");
        let nowhere = pg_target(&format!(
            "postgresql://taskstack@{closed}/nowhere?sslmode=disable"
        ));
        let broker = || {
            let t = RedisTarget::from_url(&redis.url).expect("url");
            let pool = RedisPool::new(&t, 8, Duration::from_secs(5)).expect("pool");
            Broker::new(pool.clone(), pool, crate::proto::Keys::new("conformance"))
        };
        let timeout = Duration::from_secs(2);
        Self {
            backend: super::PostgresBackend::new(broker(), &target, 8, timeout).expect("pg"),
            results_down: super::PostgresBackend::new(broker(), &nowhere, 1, timeout).expect("pg"),
            _redis: redis,
            _pg: pg,
        }
    }
}

/// A target for the test server's user and password.
pub(crate) fn pg_target(url: &str) -> crate::config::PgTarget {
    let pw = crate::config::Secret::new(crate::test_postgres::PASSWORD);
    crate::config::PgTarget::new("result_backend", url, Some(&pw)).expect("target")
}

#[async_trait::async_trait]
impl Harness for Postgres {
    fn backend(&self) -> Arc<dyn Backend> {
        Arc::new(self.backend.clone())
    }
    fn results_down(&self) -> Arc<dyn Backend> {
        Arc::new(self.results_down.clone())
    }
    async fn tick(&self) {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

mod memory {
    use super::*;
    conformance_suite!(
        #[tokio::test(start_paused = true)]
        Memory(MemoryBackend::new())
    );
}

mod redis {
    use super::*;
    conformance_suite!(
        #[tokio::test]
        Redis::new()
    );
}

mod postgres {
    use super::*;
    conformance_suite!(
        #[tokio::test]
        Postgres::new().await
    );
}
