//! Results, task states, dead letters, inspection and the beat's lock and
//! slot ledger.

use super::{MemorySession, State, ms, to_json};
use crate::backend::traits::{BackendError, DeadLetters, Inspect, ResultStore, TaskStates};
use crate::broker::{
    DeadLetter, DeadLetterAction, DeadSelection, DelayedSpan, PickedDeadLetter, QueueCounts,
    RevokeOutcome, StartVerdict, Starting, WorkerRecord,
};
use crate::proto::keys::{PRIORITY_BUCKETS, queue_key, queue_of_key};
use crate::proto::{TaskResult, TaskState};
use async_trait::async_trait;
use std::time::Duration;

fn parse_result(raw: &str) -> Result<TaskResult, BackendError> {
    crate::broker::results_parse(raw).map_err(BackendError::from)
}

impl State {
    fn result(&self, task_id: &str, now: i64) -> Option<&str> {
        self.results
            .get(task_id)
            .and_then(|r| r.live(now))
            .map(String::as_str)
    }
}

#[async_trait]
impl ResultStore for MemorySession {
    async fn write(&mut self, results: &[TaskResult], ttl: Duration) -> Result<(), BackendError> {
        let json = results
            .iter()
            .map(|r| to_json("store results", r))
            .collect::<Result<Vec<_>, _>>()?;
        let (mut st, now) = self.result_state("store results")?;
        for (r, json) in results.iter().zip(json) {
            st.set_result(&r.task_id, json, now + ms(ttl));
        }
        drop(st);
        self.inner.recorded.notify_waiters();
        Ok(())
    }

    async fn read(&mut self, task_id: &str) -> Result<Option<TaskResult>, BackendError> {
        let (st, now) = self.result_state("read result")?;
        st.result(task_id, now).map(parse_result).transpose()
    }

    async fn wait(
        &mut self,
        task_id: &str,
        timeout: Duration,
    ) -> Result<Option<TaskResult>, BackendError> {
        let deadline = tokio::time::Instant::now() + timeout;
        let inner = std::sync::Arc::clone(&self.inner);
        loop {
            // Registered before reading, so a result stored in between wakes it.
            let recorded = inner.recorded.notified();
            let mut recorded = std::pin::pin!(recorded);
            recorded.as_mut().enable();
            if let Some(r) = self.read(task_id).await?
                && r.status.is_ready()
            {
                return Ok(Some(r));
            }
            if tokio::time::timeout_at(deadline, recorded).await.is_err() {
                return Ok(None);
            }
        }
    }
}

/// The `status` of a stored record ('' when it has none).
fn status_of(raw: &str) -> String {
    serde_json::from_str::<serde_json::Value>(raw)
        .ok()
        .and_then(|v| v.get("status")?.as_str().map(str::to_owned))
        .unwrap_or_default()
}

#[async_trait]
impl TaskStates for MemorySession {
    async fn start_batch(
        &mut self,
        worker_id: Option<&str>,
        tasks: &[Starting],
        ttl: Duration,
        // Starts are marked by their STARTED records here: always stored.
        _track_started: bool,
    ) -> Result<Vec<StartVerdict>, BackendError> {
        let (mut st, now) = self.result_state("start tasks")?;
        let mut out = Vec::with_capacity(tasks.len());
        for t in tasks {
            let held = worker_id.is_none_or(|w| {
                st.holds
                    .get(w)
                    .is_some_and(|holds| holds.contains_key(&t.seq))
            });
            let revoked = st.revoked.get(&t.task_id).is_some_and(|until| *until > now);
            out.push(if !held {
                StartVerdict::NotHeld
            } else if revoked {
                StartVerdict::Revoked
            } else {
                st.set_result(&t.task_id, t.record.clone(), now + ms(ttl));
                StartVerdict::Run
            });
        }
        Ok(out)
    }

    async fn revoke(
        &mut self,
        task_id: &str,
        record: &str,
        ttl: Duration,
    ) -> Result<RevokeOutcome, BackendError> {
        let (mut st, now) = self.result_state("revoke task")?;
        let Some(current) = st.results.get(task_id).filter(|r| r.until_ms > now) else {
            return Ok(RevokeOutcome::Unknown);
        };
        let status = status_of(&current.value);
        match status.as_str() {
            "REVOKED" => return Ok(RevokeOutcome::AlreadyRevoked),
            "PENDING" | "RECEIVED" | "RETRY" => {}
            _ => {
                let state =
                    serde_json::from_value::<TaskState>(serde_json::Value::String(status.clone()))
                        .map_err(|_| BackendError::Invalid {
                            op: "revoke task",
                            detail: format!("unknown task state {status:?}"),
                        })?;
                return Ok(RevokeOutcome::Refused(state));
            }
        }
        // A record that would live longer (a task due later) keeps its expiry.
        let until = (now + ms(ttl)).max(current.until_ms);
        st.revoked.insert(task_id.to_owned(), until);
        st.set_result(task_id, record.to_owned(), until);
        drop(st);
        self.inner.recorded.notify_waiters();
        Ok(RevokeOutcome::Revoked)
    }
}

#[async_trait]
impl DeadLetters for MemorySession {
    async fn page(
        &mut self,
        queue: &str,
        count: usize,
    ) -> Result<(Vec<DeadLetter>, u64), BackendError> {
        let (st, _) = self.state("read dead letters")?;
        let Some(list) = st.dead.get(queue) else {
            return Ok((Vec::new(), 0));
        };
        // As `LRANGE 0 count-1`: a count of 0 reads them all.
        let take = if count == 0 { list.len() } else { count };
        let items = list
            .iter()
            .take(take)
            .map(|raw| {
                serde_json::from_str(raw).map_err(|e| BackendError::Invalid {
                    op: "read dead letters",
                    detail: e.to_string(),
                })
            })
            .collect::<Result<_, _>>()?;
        Ok((items, list.len() as u64))
    }

    async fn pick(
        &mut self,
        queue: &str,
        selection: &DeadSelection,
    ) -> Result<Vec<PickedDeadLetter>, BackendError> {
        let (st, _) = self.state("read dead letters")?;
        let list = st.dead.get(queue).cloned().unwrap_or_default();
        // The list is newest first; the oldest `limit` are at its end (as
        // `LRANGE -limit -1`: a limit of 0 reads them all).
        let skip = match selection {
            DeadSelection::Oldest { limit } if *limit > 0 => list.len().saturating_sub(*limit),
            _ => 0,
        };
        Ok(list
            .into_iter()
            .skip(skip)
            .rev()
            .filter_map(|raw| {
                let record = serde_json::from_str::<DeadLetter>(&raw).ok()?;
                let wanted = match selection {
                    DeadSelection::Oldest { .. } => true,
                    DeadSelection::TaskIds(ids) => {
                        record.task_id.as_ref().is_some_and(|id| ids.contains(id))
                    }
                };
                wanted.then_some(PickedDeadLetter { raw, record })
            })
            .collect())
    }

    async fn apply(
        &mut self,
        queue: &str,
        action: DeadLetterAction,
        picked: &[PickedDeadLetter],
    ) -> Result<Vec<DeadLetter>, BackendError> {
        let (mut st, _) = self.state("move dead letters")?;
        let mut done = Vec::new();
        for p in picked {
            let Some(list) = st.dead.get_mut(queue) else {
                break;
            };
            // As dead_move.lua: a message that was not UTF-8 text could
            // never run; it can be discarded, not requeued.
            // (Messages kept apart under `payload_key` come only from the
            // Redis fetch's size limit; this backend never makes them.)
            if action == DeadLetterAction::Requeue
                && (p.record.payload_base64.is_some() || p.record.payload_key.is_some())
            {
                continue;
            }
            // The first match from the newest end, as `LREM key 1 raw`.
            let Some(at) = list.iter().position(|r| *r == p.raw) else {
                continue;
            };
            list.remove(at);
            if action == DeadLetterAction::Requeue {
                st.push_back(&p.record.queue_key, p.record.payload.clone().into_bytes());
            }
            done.push(p.record.clone());
        }
        drop(st);
        if action == DeadLetterAction::Requeue && !done.is_empty() {
            self.inner.arrived.notify_waiters();
        }
        Ok(done)
    }
}

/// How long ago (ms) a message became ready, from its `taskstack_ready_at`
/// header; `None` when it has none (e.g. sent by Python Celery).
fn ready_for(payload: &[u8], now: i64) -> Option<i64> {
    const FIELD: &str = "\"taskstack_ready_at\":";
    let payload = std::str::from_utf8(payload).ok()?;
    let at = payload.find(FIELD)? + FIELD.len();
    let digits: String = payload[at..]
        .trim_start()
        .chars()
        .take_while(char::is_ascii_digit)
        .collect();
    let at: i64 = digits.parse().ok()?;
    Some((now - at).max(0))
}

#[async_trait]
impl Inspect for MemorySession {
    async fn queue_counts(&mut self, queues: &[String]) -> Result<Vec<QueueCounts>, BackendError> {
        let (st, now) = self.state("count queue messages")?;
        let mut out = Vec::with_capacity(queues.len());
        for q in queues {
            let mut c = QueueCounts::default();
            let mut oldest = Some(0_i64);
            for b in PRIORITY_BUCKETS {
                let Some(list) = st.lists.get(&queue_key(q, b)).filter(|l| !l.is_empty()) else {
                    continue;
                };
                c.ready += list.len() as u64;
                let waited = list.front().and_then(|m| ready_for(m, now));
                oldest = match (oldest, waited) {
                    (Some(o), Some(w)) => Some(o.max(w)),
                    _ => None,
                };
            }
            c.oldest_ready_age = oldest.map(|o| Duration::from_millis(o.unsigned_abs()));
            c.delayed = Some(
                st.delayed
                    .values()
                    .filter(|p| queue_of_key(&p.queue_key) == q)
                    .count() as u64,
            );
            c.in_flight = st
                .holds
                .values()
                .flat_map(|h| h.values())
                .filter(|p| queue_of_key(&p.queue_key) == q)
                .count() as u64;
            c.dead_lettered = st.dead.get(q).map_or(0, |d| d.len() as u64);
            out.push(c);
        }
        Ok(out)
    }

    async fn delayed_span(&mut self) -> Result<DelayedSpan, BackendError> {
        let (st, _) = self.state("read the delayed set")?;
        Ok(DelayedSpan {
            parked: st.delayed.len() as u64,
            first_due_ms: st.delayed.keys().next().map(|(due, _)| *due),
            last_due_ms: st.delayed.keys().next_back().map(|(due, _)| *due),
        })
    }

    async fn ping(&mut self) -> Result<Duration, BackendError> {
        let start = std::time::Instant::now();
        drop(self.state("ping")?);
        Ok(start.elapsed())
    }

    async fn live_workers(&mut self) -> Result<Vec<WorkerRecord>, BackendError> {
        let (st, now) = self.state("list workers")?;
        let mut live: Vec<(i64, &str)> = st
            .leases
            .iter()
            .filter(|(_, d)| **d >= now)
            .map(|(w, d)| (*d, w.as_str()))
            .collect();
        live.sort_unstable();
        Ok(live
            .into_iter()
            .filter_map(|(_, w)| st.workers.get(w)?.live(now).cloned())
            .collect())
    }
}
