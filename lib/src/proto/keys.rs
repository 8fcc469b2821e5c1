//! Every Redis key name taskstack reads or writes, in one place.
//!
//! Two families live side by side:
//! - Celery's own names, fixed by the wire protocol so that Python clients and
//!   workers interoperate: queue lists (`<queue>` and `<queue>\x06\x16<bucket>`)
//!   and results (`celery-task-meta-<id>`).
//! - taskstack's bookkeeping, all under a configurable namespace
//!   (`<ns>:...`), so several deployments or tests can share one server.

use std::sync::Arc;

/// Separator Celery's Redis transport puts between a queue name and its
/// priority bucket.
pub const PRIORITY_SEP: &str = "\x06\x16";

/// The priority buckets Celery's Redis transport uses, highest priority first.
pub const PRIORITY_BUCKETS: [u8; 4] = [0, 3, 6, 9];

/// Prefix of a task's result key and of the channel its result is published on.
pub const RESULT_PREFIX: &str = "celery-task-meta-";

/// Maps a Celery priority (0..=9, clamped) to its bucket: 0–2 → 0, 3–5 → 3,
/// 6–8 → 6, 9 → 9. A lower bucket is served first.
pub fn priority_bucket(priority: u8) -> u8 {
    match priority.min(9) {
        0..=2 => 0,
        3..=5 => 3,
        6..=8 => 6,
        _ => 9,
    }
}

/// The Redis list holding `queue`'s messages of the given priority bucket.
pub fn queue_key(queue: &str, bucket: u8) -> String {
    if bucket == 0 {
        queue.to_owned()
    } else {
        format!("{queue}{PRIORITY_SEP}{bucket}")
    }
}

/// The queue name a list key belongs to (strips the priority suffix).
pub fn queue_of_key(key: &str) -> &str {
    key.split_once(PRIORITY_SEP).map_or(key, |(q, _)| q)
}

/// Where a task's result lives, and the channel it is published on.
pub fn result_key(task_id: &str) -> String {
    [RESULT_PREFIX, task_id].concat()
}

/// A hold number is `slot * HOLD_SLOT_UNIT + n`: `n` counts the worker
/// process's takes, `slot` names the list the message came from (an index
/// into the worker's [`Keys::hold_queues`]), so a hold records its queue
/// without a copy of the message prefixed with it. Both stay below 2^53,
/// where Lua's numbers are exact.
pub const HOLD_SLOT_UNIT: u64 = 1 << 45;

/// The most lists one worker process can hold messages from (slots).
pub const HOLD_SLOTS: u64 = 1 << 8;

/// The slot of a hold number (see [`HOLD_SLOT_UNIT`]).
pub fn hold_slot(hold: u64) -> u64 {
    hold / HOLD_SLOT_UNIT
}

/// taskstack's bookkeeping keys under one namespace.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Keys {
    /// Shared: every backend session clones the key layout.
    ns: Arc<str>,
}

impl Keys {
    /// Keys under `namespace` (validated by the configuration loader).
    pub fn new(namespace: &str) -> Self {
        Self {
            ns: Arc::from(namespace),
        }
    }

    /// The namespace itself.
    pub fn namespace(&self) -> &str {
        &self.ns
    }

    /// ZSET: worker id → lease deadline (ms since the epoch). A worker whose
    /// deadline passed is dead; its held messages go back to their queues.
    pub fn leases(&self) -> String {
        format!("{}:leases", self.ns)
    }

    /// HASH per worker: hold number → the raw message, every message the
    /// worker has taken and not yet settled. A hold number carries the
    /// slot of the list the message came from (see [`hold_slot`]), named
    /// in the worker's [`Keys::hold_queues`].
    pub fn inflight(&self, worker_id: &str) -> String {
        format!("{}:held:{worker_id}", self.ns)
    }

    /// Prefix of [`Keys::inflight`], for scripts that derive it from a worker id.
    pub fn inflight_prefix(&self) -> String {
        format!("{}:held:", self.ns)
    }

    /// HASH per worker, field `queues`: the JSON array of the queue lists
    /// its hold numbers' slots name (slot 0 first). It keeps the name the
    /// in-flight hash had in earlier builds, where holds were
    /// `<queue key>\n<raw message>` values: a reaper of such a build stops
    /// with an error at the `queues` field (not a number, and no newline)
    /// before it restores anything, so it never misreads a hold of this
    /// build, and this build's reaper restores an earlier build's holds
    /// from here.
    pub fn hold_queues(&self, worker_id: &str) -> String {
        format!("{}:inflight:{worker_id}", self.ns)
    }

    /// Prefix of [`Keys::hold_queues`].
    pub fn hold_queues_prefix(&self) -> String {
        format!("{}:inflight:", self.ns)
    }

    /// SET per worker: the delivery sequences of its [`Keys::inflight`] hash,
    /// kept in the same steps as the hash, so checking that a batch is
    /// still held (one `SMISMEMBER`) never reads the held messages. It
    /// expires with [`Keys::held_counts`] (the heartbeat renews both).
    pub fn held_seqs(&self, worker_id: &str) -> String {
        format!("{}:held-seqs:{worker_id}", self.ns)
    }

    /// Prefix of [`Keys::held_seqs`].
    pub fn held_seqs_prefix(&self) -> String {
        format!("{}:held-seqs:", self.ns)
    }

    /// HASH per worker: queue name → messages of that queue in the worker's
    /// [`Keys::inflight`] hash, kept by the scripts that add or remove holds
    /// so counting a queue's held messages never reads them.
    pub fn held_counts(&self, worker_id: &str) -> String {
        format!("{}:held-counts:{worker_id}", self.ns)
    }

    /// Prefix of [`Keys::held_counts`].
    pub fn held_counts_prefix(&self) -> String {
        format!("{}:held-counts:", self.ns)
    }

    /// LIST per worker: where a blocking wait (BLMOVE) drops a message, so the
    /// wait and the record of who holds the message are one atomic step.
    pub fn landing(&self, worker_id: &str) -> String {
        format!("{}:landing:{worker_id}", self.ns)
    }

    /// Prefix of [`Keys::landing`].
    pub fn landing_prefix(&self) -> String {
        format!("{}:landing:", self.ns)
    }

    /// HASH: worker id → the queue key its landing list is fed from.
    pub fn landing_sources(&self) -> String {
        format!("{}:landing-src", self.ns)
    }

    /// ZSET: parked id `<unique id>\n<queue key>` → due time (ms since
    /// the epoch): where `delay.lua` parks a message until it is due.
    pub fn parked(&self) -> String {
        format!("{}:parked", self.ns)
    }

    /// HASH: parked id (see [`Keys::parked`]) → the raw message alone, so
    /// moving it makes one Lua string of it, not two.
    pub fn parked_messages(&self) -> String {
        format!("{}:parked-msg", self.ns)
    }

    /// ZSET: delayed-message id → due time (ms since the epoch), where
    /// builds before [`Keys::parked`] parked messages. Nothing parks here
    /// now; `promote.lua` still moves what is here.
    pub fn delayed(&self) -> String {
        format!("{}:delayed", self.ns)
    }

    /// HASH: delayed-message id → `<queue key>\n<raw message>`, the
    /// messages of [`Keys::delayed`].
    pub fn delayed_messages(&self) -> String {
        format!("{}:delayed-msg", self.ns)
    }

    /// HASH: queue name → how many of its messages are parked in
    /// [`Keys::parked`] and [`Keys::delayed`] (kept by the park and promote
    /// scripts).
    pub fn delayed_counts(&self) -> String {
        format!("{}:delayed-count", self.ns)
    }

    /// STRING with expiry per task: present while the task is revoked, so a
    /// worker that takes its message skips it. Lives on the result backend,
    /// beside the task's result record, so revoking and starting are atomic
    /// with respect to each other.
    pub fn revoked(&self, task_id: &str) -> String {
        format!("{}:revoked:{task_id}", self.ns)
    }

    /// Prefix of [`Keys::revoked`].
    pub fn revoked_prefix(&self) -> String {
        format!("{}:revoked:", self.ns)
    }

    /// HASH per worker: task id → sequence number of its hold, for each task
    /// the worker started (one `HSET` per batch, see `scripts/start.lua`)
    /// and has not settled. A revocation is refused while a mark's hold
    /// exists.
    pub fn running(&self, worker_id: &str) -> String {
        format!("{}:running:{worker_id}", self.ns)
    }

    /// Prefix of [`Keys::running`].
    pub fn running_prefix(&self) -> String {
        format!("{}:running:", self.ns)
    }

    /// STRING with expiry per task: the task may still be running in a
    /// worker whose lease expired (the reaper found it marked started), so
    /// a revocation is refused while it lasts.
    pub fn started(&self, task_id: &str) -> String {
        format!("{}:started:{task_id}", self.ns)
    }

    /// Prefix of [`Keys::started`].
    pub fn started_prefix(&self) -> String {
        format!("{}:started:", self.ns)
    }

    /// Prefix of [`Keys::dead_letters`].
    pub fn dead_letters_prefix(&self) -> String {
        format!("{}:dead:", self.ns)
    }

    /// LIST per queue: dead letters, newest first, each a JSON record with the
    /// reason and the original payload.
    pub fn dead_letters(&self, queue: &str) -> String {
        format!("{}:dead:{queue}", self.ns)
    }

    /// STRING: a dead-lettered message too large to have been sent to the
    /// worker, kept apart from its record (which names this key).
    pub fn dead_payload(&self, queue: &str, worker_id: &str, seq: u64) -> String {
        format!("{}:dead:{queue}:payload:{worker_id}:{seq}", self.ns)
    }

    /// STRING with expiry per worker: its heartbeat record (JSON).
    pub fn worker(&self, worker_id: &str) -> String {
        format!("{}:worker:{worker_id}", self.ns)
    }

    /// Prefix of [`Keys::worker`].
    pub fn worker_prefix(&self) -> String {
        format!("{}:worker:", self.ns)
    }

    /// STRING with expiry: the beat leader lock. Its value is a JSON object
    /// naming the holder — `{"id", "host", "pid", "since", "token"}` (`since`
    /// RFC 3339, `token` a random UUID) — taken with `SET NX PX`, renewed
    /// and released only by scripts that compare the whole value.
    pub fn beat_lock(&self) -> String {
        format!("{}:beat:lock", self.ns)
    }

    /// HASH: beat entry name → its last published slot (ms since the epoch).
    /// A slot is published if and only if this records it (or a later one).
    pub fn beat_last(&self) -> String {
        format!("{}:beat:last", self.ns)
    }

    /// STRING with expiry per beat instance: its heartbeat record (JSON:
    /// id, host, pid, role, leader, started_at, last_seen, version).
    pub fn beat_instance(&self, instance_id: &str) -> String {
        format!("{}:beat:instance:{instance_id}", self.ns)
    }

    /// Prefix of [`Keys::beat_instance`].
    pub fn beat_instance_prefix(&self) -> String {
        format!("{}:beat:instance:", self.ns)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn priority_buckets_match_celery() {
        let buckets: Vec<u8> = (0..=12).map(priority_bucket).collect();
        assert_eq!(buckets, [0, 0, 0, 3, 3, 3, 6, 6, 6, 9, 9, 9, 9]);
    }

    #[test]
    fn queue_keys_match_celery() {
        assert_eq!(queue_key("celery", 0), "celery");
        assert_eq!(queue_key("celery", 3), "celery\x06\x163");
        assert_eq!(queue_of_key("celery\x06\x169"), "celery");
        assert_eq!(queue_of_key("other"), "other");
        assert_eq!(result_key("abc"), "celery-task-meta-abc");
    }

    #[test]
    fn bookkeeping_keys_live_under_the_namespace() {
        let k = Keys::new("ns1");
        for key in [
            k.leases(),
            k.inflight("w"),
            k.hold_queues("w"),
            k.landing("w"),
            k.held_counts("w"),
            k.held_seqs("w"),
            k.landing_sources(),
            k.parked(),
            k.parked_messages(),
            k.delayed(),
            k.delayed_messages(),
            k.delayed_counts(),
            k.revoked("t"),
            k.started("t"),
            k.running("w"),
            k.dead_letters("q"),
            k.worker("w"),
            k.beat_lock(),
            k.beat_last(),
            k.beat_instance("b"),
        ] {
            assert!(key.starts_with("ns1:"), "{key}");
        }
        assert!(k.inflight("w").starts_with(&k.inflight_prefix()));
        assert!(k.hold_queues("w").starts_with(&k.hold_queues_prefix()));
        assert_ne!(k.inflight_prefix(), k.hold_queues_prefix());
        assert!(k.landing("w").starts_with(&k.landing_prefix()));
        assert!(k.held_seqs("w").starts_with(&k.held_seqs_prefix()));
        assert!(k.worker("w").starts_with(&k.worker_prefix()));
        assert!(k.revoked("t").starts_with(&k.revoked_prefix()));
        assert!(k.dead_letters("q").starts_with(&k.dead_letters_prefix()));
        assert!(k.beat_instance("b").starts_with(&k.beat_instance_prefix()));
    }
}
