//! Messages: sending, taking, settling, leases and the delayed set.

use super::{Expiring, MemorySession, Placed, State, ms, to_json};
use crate::backend::due_in;
use crate::backend::traits::{
    BackendError, Consume, Delayed, Enqueue, Leases, Outgoing, Parked, Promoted, Reaped,
};
use crate::broker::{DeadLetter, Delivery, Settle, WorkerRecord};
use async_trait::async_trait;
use std::time::Duration;

/// Most workers one reap forgets (as the Redis script's batch).
const REAP_BATCH: usize = 100;

#[async_trait]
impl Enqueue for MemorySession {
    async fn enqueue(&mut self, batch: &[Outgoing]) -> Result<(), BackendError> {
        let pending = batch.iter().any(|o| o.pending.is_some());
        self.results_reachable("record pending task", pending)?;
        let (mut st, now) = self.state("enqueue")?;
        for o in batch {
            if let Some(p) = &o.pending {
                st.set_result(&p.task_id, p.record.clone(), now + ms(p.ttl));
            }
        }
        for o in batch {
            match o.due_ms {
                None => st.push_back(&o.queue_key, o.payload.clone().into_bytes()),
                Some(due) => st.park(
                    due,
                    Placed {
                        queue_key: o.queue_key.clone(),
                        payload: o.payload.clone().into_bytes(),
                    },
                ),
            }
        }
        drop(st);
        self.inner.arrived.notify_waiters();
        Ok(())
    }
}

impl MemorySession {
    /// Removes `seq` from this worker's holds, if it is still held.
    fn unhold(st: &mut State, worker: &str, seq: u64) -> Option<Placed> {
        st.holds.get_mut(worker)?.remove(&seq)
    }
}

#[async_trait]
impl Consume for MemorySession {
    fn worker_id(&self) -> &str {
        &self.worker_id
    }

    async fn take(
        &mut self,
        queue_keys: &[String],
        max: usize,
        lease: Duration,
        max_size: usize,
    ) -> Result<Vec<Delivery>, BackendError> {
        let (mut st, now) = self.state("take")?;
        let st = &mut *st;
        st.leases.insert(self.worker_id.clone(), now + ms(lease));
        let mut out = Vec::new();
        for key in queue_keys {
            while out.len() < max {
                let Some(payload) = st.lists.get_mut(key).and_then(|l| l.pop_front()) else {
                    break;
                };
                st.last_seq += 1;
                let seq = st.last_seq;
                // Oversized: held, but only its length is handed out.
                let oversized = (payload.len() > max_size).then_some(payload.len() as u64);
                let sent = if oversized.is_some() {
                    Vec::new()
                } else {
                    payload.clone()
                };
                st.holds.entry(self.worker_id.clone()).or_default().insert(
                    seq,
                    Placed {
                        queue_key: key.clone(),
                        payload,
                    },
                );
                out.push(Delivery {
                    seq,
                    queue_key: key.clone(),
                    payload: sent,
                    oversized,
                });
            }
        }
        Ok(out)
    }

    async fn wait_for_message(
        &mut self,
        queue_keys: &[String],
        wait: Duration,
    ) -> Result<bool, BackendError> {
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            // Registered before looking, so an arrival in between wakes it.
            let arrived = self.inner.arrived.notified();
            let mut arrived = std::pin::pin!(arrived);
            arrived.as_mut().enable();
            {
                let (st, _) = self.state("wait for messages")?;
                let ready = queue_keys
                    .iter()
                    .any(|k| st.lists.get(k).is_some_and(|l| !l.is_empty()));
                if ready {
                    return Ok(true);
                }
            }
            if tokio::time::timeout_at(deadline, arrived).await.is_err() {
                return Ok(false);
            }
        }
    }

    async fn settle(&mut self, batch: &[Settle], result_ttl: Duration) -> Result<(), BackendError> {
        let results = batch.iter().any(|s| s.result.is_some());
        self.results_reachable("store results", results)?;
        let (mut st, now) = self.state("store results and acknowledge")?;
        // As Redis's `SET ... EX`: whole seconds, at least one.
        let until = now + i64::try_from(result_ttl.as_secs().max(1) * 1000).unwrap_or(i64::MAX);
        let mut stored = false;
        for s in batch {
            if let Some((id, json)) = &s.result {
                st.set_result(id, json.clone(), until);
                stored = true;
            }
        }
        for s in batch {
            Self::unhold(&mut st, &self.worker_id, s.seq);
        }
        drop(st);
        if stored {
            self.inner.recorded.notify_waiters();
        }
        Ok(())
    }

    async fn hand_back(&mut self, seqs: &[u64]) -> Result<usize, BackendError> {
        let (mut st, _) = self.state("hand back")?;
        let mut n = 0;
        // The last first, so the first (oldest) ends at the very front.
        for seq in seqs.iter().rev() {
            if let Some(p) = Self::unhold(&mut st, &self.worker_id, *seq) {
                st.push_front(&p.queue_key, p.payload);
                n += 1;
            }
        }
        drop(st);
        if n > 0 {
            self.inner.arrived.notify_waiters();
        }
        Ok(n)
    }

    async fn park_held(
        &mut self,
        seq: u64,
        queue_key: &str,
        payload: &[u8],
        due_ms: i64,
        // Starts are marked by STARTED records here: no mark to delete.
        _started: Option<&str>,
    ) -> Result<(), BackendError> {
        let (mut st, _) = self.state("park delayed message")?;
        if Self::unhold(&mut st, &self.worker_id, seq).is_some() {
            let placed = Placed {
                queue_key: queue_key.to_owned(),
                payload: payload.to_vec(),
            };
            st.park(due_ms, placed);
        }
        Ok(())
    }

    async fn dead_letter(&mut self, seq: u64, record: &DeadLetter) -> Result<(), BackendError> {
        let (mut st, _) = self.state("dead-letter")?;
        let Some(held) = st.holds.get(&self.worker_id).and_then(|h| h.get(&seq)) else {
            return Ok(());
        };
        let json = if record.payload_size.is_some() && record.payload_key.is_none() {
            // Oversized: the worker never had the bytes; the record keeps
            // them here, so a requeue restores the message.
            let mut record = record.clone();
            record.set_payload(&held.payload);
            to_json("dead-letter", &record)?
        } else {
            to_json("dead-letter", record)?
        };
        Self::unhold(&mut st, &self.worker_id, seq);
        st.dead
            .entry(record.queue.clone())
            .or_default()
            .push_front(json);
        Ok(())
    }
}

#[async_trait]
impl Leases for MemorySession {
    async fn heartbeat(
        &mut self,
        record: &WorkerRecord,
        _landing_source: &str,
        lease: Duration,
    ) -> Result<bool, BackendError> {
        let (mut st, now) = self.state("heartbeat")?;
        let added = st
            .leases
            .insert(record.id.clone(), now + ms(lease))
            .is_none();
        let until = now + ms(lease).max(1000);
        st.workers.insert(
            record.id.clone(),
            Expiring {
                value: record.clone(),
                until_ms: until,
            },
        );
        Ok(added)
    }

    async fn reap_expired(&mut self) -> Result<Reaped, BackendError> {
        let (mut st, now) = self.state("reap")?;
        let mut dead: Vec<(i64, String)> = st
            .leases
            .iter()
            .filter(|(_, deadline)| **deadline <= now)
            .map(|(w, d)| (*d, w.clone()))
            .collect();
        dead.sort();
        dead.truncate(REAP_BATCH);
        let mut reaped = Reaped::default();
        for (_, w) in dead {
            reaped.workers += 1;
            reaped.restored += st.reap_worker(&w);
        }
        drop(st);
        if reaped.restored > 0 {
            self.inner.arrived.notify_waiters();
        }
        Ok(reaped)
    }

    async fn release(&mut self, worker_id: &str) -> Result<u64, BackendError> {
        let (mut st, _) = self.state("release lease")?;
        let restored = st.reap_worker(worker_id);
        drop(st);
        if restored > 0 {
            self.inner.arrived.notify_waiters();
        }
        Ok(restored)
    }
}

#[async_trait]
impl Delayed for MemorySession {
    async fn park(&mut self, batch: &[Parked]) -> Result<(), BackendError> {
        let (mut st, _) = self.state("park delayed message")?;
        for p in batch {
            let placed = Placed {
                queue_key: p.queue_key.clone(),
                payload: p.payload.clone().into_bytes(),
            };
            st.park(p.due_ms, placed);
        }
        Ok(())
    }

    async fn promote_due(&mut self, max: usize) -> Result<Promoted, BackendError> {
        let (mut st, now) = self.state("promote delayed messages")?;
        let due: Vec<(i64, u64)> = st
            .delayed
            .range(..=(now, u64::MAX))
            .take(max)
            .map(|(k, _)| *k)
            .collect();
        for k in &due {
            if let Some(p) = st.delayed.remove(k) {
                st.push_back(&p.queue_key, p.payload);
            }
        }
        let next_due_in = st.delayed.keys().next().map(|(d, _)| due_in(*d, now));
        drop(st);
        if !due.is_empty() {
            self.inner.arrived.notify_waiters();
        }
        Ok(Promoted {
            moved: due.len() as u64,
            next_due_in,
        })
    }
}
