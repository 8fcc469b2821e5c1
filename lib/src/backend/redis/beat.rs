//! The beat's capabilities on Redis: the leader lock (`beat/lock.rs`) and
//! the fenced slot ledger (`beat_publish.lua`).

use super::RedisSession;
use crate::backend::traits::{
    Acquired, BackendError, LeaderLock, LockLease, SlotLedger, SlotOutcome, SlotPublish,
};
use crate::beat::{lock, publish};
use crate::broker::on_lane;
use async_trait::async_trait;
use std::time::Duration;

#[async_trait]
impl LeaderLock for RedisSession {
    async fn try_acquire(&mut self, value: &str, ttl: Duration) -> Result<Acquired, BackendError> {
        let keys = self.shared.broker.keys();
        Ok(
            match lock::try_acquire(&mut self.lane, keys, value, ttl).await? {
                None => Acquired::Yes,
                Some(current) => Acquired::HeldBy(current),
            },
        )
    }

    async fn renew(&mut self, value: &str, ttl: Duration) -> Result<bool, BackendError> {
        let keys = self.shared.broker.keys();
        Ok(lock::renew(&mut self.lane, keys, value, ttl).await?)
    }

    async fn release(&mut self, value: &str) -> Result<bool, BackendError> {
        let keys = self.shared.broker.keys();
        Ok(lock::release(&mut self.lane, keys, value).await?)
    }

    async fn lease(&mut self) -> Result<Option<LockLease>, BackendError> {
        let key = self.shared.broker.keys().beat_lock();
        let mut read = redis::pipe();
        read.cmd("GET").arg(&key).cmd("PTTL").arg(&key);
        let (value, pttl): (Option<String>, i64) =
            on_lane!(&mut self.lane, "read beat lock", |c| read.query_async(c))?;
        // PTTL -2: the key expired between the two reads.
        Ok(value.filter(|_| pttl != -2).map(|value| LockLease {
            value,
            remaining_ms: (pttl >= 0).then_some(pttl),
        }))
    }

    async fn announce(
        &mut self,
        instance_id: &str,
        record: &str,
        ttl: Duration,
    ) -> Result<(), BackendError> {
        let ms = u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX).max(1);
        let mut set = redis::cmd("SET");
        set.arg(self.shared.broker.keys().beat_instance(instance_id))
            .arg(record)
            .arg("PX")
            .arg(ms);
        Ok(on_lane!(&mut self.lane, "beat heartbeat", |c| set
            .query_async::<()>(c))?)
    }

    async fn forget(&mut self, instance_id: &str) -> Result<(), BackendError> {
        let mut del = redis::cmd("DEL");
        del.arg(self.shared.broker.keys().beat_instance(instance_id));
        Ok(on_lane!(&mut self.lane, "delete beat heartbeat", |c| del
            .query_async::<()>(c))?)
    }

    async fn instance(&mut self, instance_id: &str) -> Result<Option<String>, BackendError> {
        let mut get = redis::cmd("GET");
        get.arg(self.shared.broker.keys().beat_instance(instance_id));
        Ok(on_lane!(&mut self.lane, "read beat heartbeat", |c| get
            .query_async(c))?)
    }
}

#[async_trait]
impl SlotLedger for RedisSession {
    async fn publish(&mut self, slot: SlotPublish<'_>) -> Result<SlotOutcome, BackendError> {
        let keys = self.shared.broker.keys();
        let outcome = publish::publish_slot(&mut self.lane, keys, slot).await?;
        if matches!(
            outcome,
            SlotOutcome::Published | SlotOutcome::AlreadyPublished { .. }
        ) {
            // redis_min_replicas_acked: the slot ledger survives a failover,
            // so a new master never lets the slot fire again. A failure here
            // is retried; the ledger then answers AlreadyPublished, and that
            // answer waits too: the slot a failed WAIT left unconfirmed
            // counts as done only once a replica has the connection's writes.
            self.lane.replicated("publish beat slot").await?;
        }
        Ok(outcome)
    }

    async fn last_slots(&mut self, entries: &[&str]) -> Result<Vec<Option<i64>>, BackendError> {
        let keys = self.shared.broker.keys();
        Ok(publish::last_slots(&mut self.lane, keys, entries).await?)
    }
}
