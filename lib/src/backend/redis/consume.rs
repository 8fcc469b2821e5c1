//! The Redis session's side of taking and settling messages.

use super::RedisSession;
use crate::backend::traits::{BackendError, Consume};
use crate::broker::{self, DeadLetter, Delivery, Settle, StartLanded, StartVerdict, Take};
use crate::proto::keys::hold_slot;
use async_trait::async_trait;
use std::sync::atomic::Ordering;
use std::time::Duration;

impl RedisSession {
    /// A take, starting `start` in the same script when given and results
    /// live on the broker's server (where start.lua's marks are kept).
    async fn take_maybe_starting(
        &mut self,
        queue_keys: &[String],
        max: usize,
        lease: Duration,
        max_size: usize,
        start: Option<StartLanded<'_>>,
    ) -> Result<(Vec<Delivery>, Option<StartVerdict>), BackendError> {
        // The whole range is reserved before asking: if the reply is lost
        // after the script ran, a later take must not reuse (and overwrite)
        // a number that records a held message.
        let last_seq = self.shared.last_seq.fetch_add(max as u64, Ordering::SeqCst);
        if last_seq.saturating_add(max as u64) > broker::MAX_TAKE_COUNTER {
            return Err(BackendError::Invalid {
                op: "take messages",
                detail: format!(
                    "this worker process has used {last_seq} hold numbers, the most it can \
                     (Lua's numbers are exact below 2^53): restart it"
                ),
            });
        }
        let (slots, named) = {
            let mut h = self
                .shared
                .hold_slots
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            (h.slots(queue_keys)?, h.json().to_owned())
        };
        let take = Take {
            worker_id: &self.worker_id,
            queue_keys,
            max,
            last_seq,
            lease,
            max_size,
            landing: self.landing,
            slots: &slots,
            named: &named,
        };
        let keys = self.shared.broker.keys();
        if !self.uncertain.is_empty() {
            // Held by this worker without its knowledge, if at all: back to
            // the front of their queues (numbers never recorded are skipped).
            let back =
                broker::requeue(&mut self.lane, keys, &self.worker_id, &self.uncertain).await?;
            if back > 0 {
                tracing::warn!(
                    messages = back,
                    "a take's reply was lost after it ran; its messages went back to their queues"
                );
            }
            self.uncertain.clear();
        }
        // The landed message is forgotten whatever happens: a take empties
        // the landing list (it is read first, whole).
        self.landed = None;
        let got = match start {
            Some(s) if self.same_server() => {
                broker::fetch_starting(&mut self.lane, keys, take, s).await
            }
            _ => broker::fetch(&mut self.lane, keys, take)
                .await
                .map(|d| (d, None)),
        };
        let got = match got {
            Ok(got) => got,
            Err(e) => {
                // A take asked to start its landed message may have marked
                // it started too: the mark names one of these numbers, which
                // no take uses again, so once the hold goes back revoke.lua
                // no longer counts it (it counts a mark only while its hold
                // exists); the task's next acknowledgement here or the
                // worker's release deletes it.
                // Each number may have been used with any of the lists.
                let mut distinct = slots.clone();
                distinct.sort_unstable();
                distinct.dedup();
                for n in last_seq + 1..=last_seq + max as u64 {
                    self.uncertain
                        .extend(distinct.iter().map(|s| broker::hold_number(*s, n)));
                }
                return Err(e.into());
            }
        };
        // Numbers past those used were never recorded: handed back unless
        // another take reserved after this one, so the counter grows with
        // messages taken, not with takes.
        let _ = self.shared.last_seq.compare_exchange(
            last_seq + max as u64,
            last_seq + got.0.len() as u64,
            Ordering::SeqCst,
            Ordering::SeqCst,
        );
        // The take emptied the landing list (it is read first, whole).
        self.landing = false;
        Ok(got)
    }
}

#[async_trait]
impl Consume for RedisSession {
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
        Ok(self
            .take_maybe_starting(queue_keys, max, lease, max_size, None)
            .await?
            .0)
    }

    async fn take_starting(
        &mut self,
        queue_keys: &[String],
        max: usize,
        lease: Duration,
        max_size: usize,
        start: StartLanded<'_>,
    ) -> Result<(Vec<Delivery>, Option<StartVerdict>), BackendError> {
        self.take_maybe_starting(queue_keys, max, lease, max_size, Some(start))
            .await
    }

    async fn wait_for_message(
        &mut self,
        queue_keys: &[String],
        wait: Duration,
    ) -> Result<bool, BackendError> {
        let Some(first) = queue_keys.first() else {
            return Err(BackendError::Invalid {
                op: "wait for messages",
                detail: "no queue to wait on".into(),
            });
        };
        let keys = self.shared.broker.keys();
        // Set before asking: a reply lost after BLMOVE moved a message
        // must not leave it unread on the landing list.
        self.landing = true;
        let moved =
            broker::wait_for_message(&mut self.lane, keys, &self.worker_id, first, wait).await?;
        let landed = moved.is_some();
        self.landed = moved;
        Ok(landed)
    }

    fn landed(&mut self) -> Option<Vec<u8>> {
        self.landed.take()
    }

    async fn settle(&mut self, batch: &[Settle], result_ttl: Duration) -> Result<(), BackendError> {
        let backend = (!self.same_server()).then_some(&mut self.backend);
        let keys = self.shared.broker.keys();
        let queues = self.shared.slot_queues();
        Ok(broker::settle(
            &mut self.lane,
            backend,
            keys,
            &self.worker_id,
            batch,
            &|seq| {
                usize::try_from(hold_slot(seq))
                    .ok()
                    .and_then(|slot| queues.get(slot).cloned())
            },
            result_ttl,
        )
        .await?)
    }

    async fn hand_back(&mut self, seqs: &[u64]) -> Result<usize, BackendError> {
        let keys = self.shared.broker.keys();
        Ok(broker::requeue(&mut self.lane, keys, &self.worker_id, seqs).await?)
    }

    async fn park_held(
        &mut self,
        seq: u64,
        queue_key: &str,
        payload: &[u8],
        due_ms: i64,
        started: Option<&str>,
    ) -> Result<(), BackendError> {
        let keys = self.shared.broker.keys();
        let held = Some((self.worker_id.as_str(), seq, started));
        Ok(broker::park(&mut self.lane, keys, due_ms, queue_key, payload, held).await?)
    }

    async fn dead_letter(&mut self, seq: u64, record: &DeadLetter) -> Result<(), BackendError> {
        let keys = self.shared.broker.keys();
        if record.payload_size.is_some() && record.payload_key.is_none() {
            // Oversized: dead_letter.lua copies the held bytes to a key of
            // their own instead of fetching them.
            let mut record = record.clone();
            record.payload_key = Some(keys.dead_payload(&record.queue, &self.worker_id, seq));
            return Ok(
                broker::dead_letter(&mut self.lane, keys, &self.worker_id, seq, &record).await?,
            );
        }
        Ok(broker::dead_letter(&mut self.lane, keys, &self.worker_id, seq, record).await?)
    }
}
