//! The Redis broker: taking, settling and restoring messages, delayed
//! messages, dead letters, worker leases and results.
//!
//! Every step that moves a message between two places is one Lua script (in
//! `lib/scripts/`), so a crash at any point leaves each message in exactly
//! one place: queued, held by a worker, parked until due, or dead-lettered.

mod consume;
mod dead;
mod delayed;
mod hold_queues;
mod inspect;
mod lease;
mod pool;
mod results;
mod sentinel;
mod state;

pub use consume::{Delivery, Settle, StartLanded};
pub use dead::{DeadLetter, DeadLetterAction, DeadSelection, PickedDeadLetter};
pub use hold_queues::HoldQueues;
pub(crate) use hold_queues::{MAX_TAKE_COUNTER, hold_number};
pub use inspect::{DelayedSpan, QueueCounts, delayed_span, queue_counts, queue_counts_read};
pub use lease::WorkerRecord;
pub(crate) use pool::on_lane;
pub use pool::{BrokerError, Lane, LaneConn, RedisPool};

use crate::proto::Keys;
use redis::Script;
use std::sync::LazyLock;

pub(crate) static FETCH: LazyLock<Script> =
    LazyLock::new(|| Script::new(include_str!("../../scripts/fetch.lua")));
pub(crate) static REQUEUE: LazyLock<Script> =
    LazyLock::new(|| Script::new(include_str!("../../scripts/requeue.lua")));
pub(crate) static REAP: LazyLock<Script> =
    LazyLock::new(|| Script::new(include_str!("../../scripts/reap.lua")));
pub(crate) static DELAY: LazyLock<Script> =
    LazyLock::new(|| Script::new(include_str!("../../scripts/delay.lua")));
pub(crate) static PROMOTE: LazyLock<Script> =
    LazyLock::new(|| Script::new(include_str!("../../scripts/promote.lua")));
pub(crate) static DEAD_LETTER: LazyLock<Script> =
    LazyLock::new(|| Script::new(include_str!("../../scripts/dead_letter.lua")));
pub(crate) static DEAD_MOVE: LazyLock<Script> =
    LazyLock::new(|| Script::new(include_str!("../../scripts/dead_move.lua")));
pub(crate) static START: LazyLock<Script> =
    LazyLock::new(|| Script::new(include_str!("../../scripts/start.lua")));
pub(crate) static REVOKE: LazyLock<Script> =
    LazyLock::new(|| Script::new(include_str!("../../scripts/revoke.lua")));
pub(crate) static ACK: LazyLock<Script> =
    LazyLock::new(|| Script::new(include_str!("../../scripts/ack.lua")));
pub(crate) static QUEUE_STATS: LazyLock<Script> =
    LazyLock::new(|| Script::new(include_str!("../../scripts/queue_stats.lua")));

/// The broker and result-backend connections plus the key layout.
#[derive(Debug, Clone)]
pub struct Broker {
    broker: RedisPool,
    backend: RedisPool,
    keys: Keys,
}

impl Broker {
    /// A broker on `broker`, storing results in `backend` (may be the same pool).
    pub fn new(broker: RedisPool, backend: RedisPool, keys: Keys) -> Self {
        Self {
            broker,
            backend,
            keys,
        }
    }

    /// The key layout.
    pub fn keys(&self) -> &Keys {
        &self.keys
    }

    /// The broker's pool.
    pub fn broker_pool(&self) -> &RedisPool {
        &self.broker
    }

    /// The result backend's pool.
    pub fn backend_pool(&self) -> &RedisPool {
        &self.backend
    }

    /// Whether results live on the broker's server (then a result and its
    /// acknowledgement go out in one pipeline).
    pub fn backend_is_broker(&self) -> bool {
        self.broker.same_server(&self.backend)
    }

    /// Round-trip time of a PING to the broker (over the shared connection).
    pub async fn ping(&self) -> Result<std::time::Duration, BrokerError> {
        let mut lane = self.broker.shared_lane();
        lane.conn("ping").await?;
        let start = std::time::Instant::now();
        on_lane!(&mut lane, "ping", |c| redis::cmd("PING")
            .query_async::<String>(c))?;
        Ok(start.elapsed())
    }
}

/// Milliseconds since the Unix epoch, the clock all lease and due times use.
pub fn now_ms() -> i64 {
    chrono::Utc::now().timestamp_millis()
}

#[cfg(feature = "amqp")]
pub(crate) use consume::held_count_ttl_ms;
pub(crate) use consume::{Take, fetch, fetch_starting, requeue, settle, wait_for_message};
pub(crate) use dead::dead_letter;
pub use dead::{dead_letters, move_dead_letters, pick_dead_letters};
pub(crate) use delayed::{park, promote};
pub(crate) use lease::{heartbeat, reap, release};
pub use lease::{live_workers, worker_record};
pub(crate) use results::parse_result as results_parse;
pub use results::{get_result, store_result, store_results};
pub(crate) use state::start_batch;
pub use state::{RevokeOutcome, StartVerdict, Starting, revoke};
pub(crate) use state::{held, mark_revoked};

#[cfg(test)]
mod held_counts_tests;
#[cfg(test)]
mod held_seqs_tests;
#[cfg(test)]
mod hold_slots_tests;
#[cfg(test)]
mod promote_tests;
#[cfg(test)]
mod start_landed_tests;
#[cfg(test)]
mod test_support;
#[cfg(test)]
mod tests;
