//! The beat's capabilities: the leader lock and the slot ledger.

use super::{Expiring, MemorySession, State, ms};
use crate::backend::traits::{
    Acquired, BackendError, LeaderLock, LockLease, SlotLedger, SlotOutcome, SlotPublish,
};
use crate::proto::keys::queue_key;
use async_trait::async_trait;
use std::sync::PoisonError;
use std::time::Duration;

impl State {
    /// The lock's value while it is held.
    fn lock_value(&self, now: i64) -> Option<&str> {
        self.lock.as_ref()?.live(now).map(String::as_str)
    }
}

#[async_trait]
impl LeaderLock for MemorySession {
    async fn try_acquire(&mut self, value: &str, ttl: Duration) -> Result<Acquired, BackendError> {
        let (mut st, now) = self.state("take beat lock")?;
        if let Some(current) = st.lock_value(now) {
            return Ok(Acquired::HeldBy(Some(current.to_owned())));
        }
        st.lock = Some(Expiring {
            value: value.to_owned(),
            until_ms: now + ms(ttl),
        });
        Ok(Acquired::Yes)
    }

    async fn renew(&mut self, value: &str, ttl: Duration) -> Result<bool, BackendError> {
        let (mut st, now) = self.state("renew beat lock")?;
        let ours = st.lock_value(now) == Some(value);
        if let Some(lock) = st.lock.as_mut().filter(|_| ours) {
            lock.until_ms = now + ms(ttl);
        }
        Ok(ours)
    }

    async fn release(&mut self, value: &str) -> Result<bool, BackendError> {
        let (mut st, now) = self.state("release beat lock")?;
        let ours = st.lock_value(now) == Some(value);
        if ours {
            st.lock = None;
        }
        Ok(ours)
    }

    async fn lease(&mut self) -> Result<Option<LockLease>, BackendError> {
        let (st, now) = self.state("read beat lock")?;
        Ok(st
            .lock
            .as_ref()
            .filter(|l| l.live(now).is_some())
            .map(|l| LockLease {
                value: l.value.clone(),
                remaining_ms: Some(l.until_ms - now),
            }))
    }

    async fn announce(
        &mut self,
        instance_id: &str,
        record: &str,
        ttl: Duration,
    ) -> Result<(), BackendError> {
        let (mut st, now) = self.state("beat heartbeat")?;
        let record = Expiring {
            value: record.to_owned(),
            until_ms: now + ms(ttl),
        };
        st.beat_instances.insert(instance_id.to_owned(), record);
        Ok(())
    }

    async fn forget(&mut self, instance_id: &str) -> Result<(), BackendError> {
        let (mut st, _) = self.state("delete beat heartbeat")?;
        st.beat_instances.remove(instance_id);
        Ok(())
    }

    async fn instance(&mut self, instance_id: &str) -> Result<Option<String>, BackendError> {
        let (st, now) = self.state("read beat heartbeat")?;
        Ok(st
            .beat_instances
            .get(instance_id)
            .and_then(|r| r.live(now))
            .cloned())
    }
}

impl super::MemoryBackend {
    /// The heartbeat records of live beat instances (id → JSON), for tests.
    pub fn beat_instances(&self) -> Vec<(String, String)> {
        let st = self
            .inner
            .state
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let now = crate::backend::Clock::now_ms(&self.inner.clock);
        let mut live: Vec<_> = st
            .beat_instances
            .iter()
            .filter_map(|(id, r)| r.live(now).map(|v| (id.clone(), v.clone())))
            .collect();
        live.sort();
        live
    }
}

#[async_trait]
impl SlotLedger for MemorySession {
    async fn publish(&mut self, slot: SlotPublish<'_>) -> Result<SlotOutcome, BackendError> {
        let (mut st, now) = self.state("publish beat slot")?;
        if st.lock_value(now) != Some(slot.lock_value) {
            return Ok(SlotOutcome::NotLeader);
        }
        let pttl_ms = st.lock.as_ref().map_or(0, |l| l.until_ms - now);
        if pttl_ms <= i64::try_from(slot.margin.as_millis()).unwrap_or(i64::MAX) {
            return Ok(SlotOutcome::LeaseTooShort { pttl_ms });
        }
        if let Some(last_ms) = st.last_slots.get(slot.entry).copied()
            && last_ms >= slot.slot_ms
        {
            return Ok(SlotOutcome::AlreadyPublished { last_ms });
        }
        st.push_back(&queue_key(slot.queue, 0), slot.payload.as_bytes().to_vec());
        st.last_slots.insert(slot.entry.to_owned(), slot.slot_ms);
        drop(st);
        self.inner.arrived.notify_waiters();
        Ok(SlotOutcome::Published)
    }

    async fn last_slots(&mut self, entries: &[&str]) -> Result<Vec<Option<i64>>, BackendError> {
        let (st, _) = self.state("read beat last slots")?;
        Ok(entries
            .iter()
            .map(|e| st.last_slots.get(*e).copied())
            .collect())
    }
}
