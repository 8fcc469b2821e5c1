//! The producer API: send Celery-protocol tasks, read and await results.

use crate::broker::get_result;
use crate::broker::on_lane;
use crate::broker::{Broker, BrokerError, Lane};
use crate::proto::TaskResult;
use crate::proto::envelope::{MessageSpec, encode};
use crate::proto::keys::{priority_bucket, queue_key, result_key};
use crate::results_listener::Listener;
use chrono::{DateTime, Utc};
use serde_json::{Map, Value};
use std::time::Duration;
use tokio::sync::Mutex;

/// Errors of the producer API.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ProducerError {
    #[error(transparent)]
    Broker(#[from] BrokerError),
    #[error("no result for task {task_id} within {waited:?}")]
    Timeout { task_id: String, waited: Duration },
    #[error("invalid send option `{option}`: {reason}")]
    Option {
        option: &'static str,
        reason: String,
    },
}

/// How one task is sent. Everything is optional; the defaults send to the
/// `celery` queue at once with no expiry.
#[derive(Debug, Clone, Default)]
pub struct SendOptions {
    /// Use this id instead of a fresh UUID v4.
    pub task_id: Option<String>,
    /// Queue name (default `celery`).
    pub queue: Option<String>,
    /// Run no earlier than now + countdown.
    pub countdown: Option<Duration>,
    /// Run no earlier than this time (wins over `countdown`).
    pub eta: Option<DateTime<Utc>>,
    /// Do not run after this time: the task is recorded as REVOKED instead.
    pub expires: Option<DateTime<Utc>>,
    /// Celery priority 0..=9; lower runs first.
    pub priority: Option<u8>,
    /// How many times the task may be retried (overrides the worker's
    /// registered default).
    pub max_retries: Option<u32>,
    /// Hard time limit: the task is stopped and fails.
    pub time_limit: Option<Duration>,
    /// Soft time limit: the task is told to wrap up.
    pub soft_time_limit: Option<Duration>,
    /// Extra headers to put on the message.
    pub headers: Option<Map<String, Value>>,
}

/// A task to send, with its options.
#[derive(Debug, Clone)]
pub struct TaskRequest {
    pub name: String,
    pub args: Vec<Value>,
    pub kwargs: Map<String, Value>,
    pub options: SendOptions,
}

/// Sends tasks and reads results. Cheap to share behind an `Arc`.
#[derive(Debug)]
pub struct Producer {
    broker: Broker,
    origin: String,
    listener: Mutex<Option<Listener>>,
    /// Store a PENDING record for each task sent, kept this long after the
    /// task is due.
    pending_ttl: Option<Duration>,
    /// Furthest ahead an ETA or countdown may lie.
    max_delay: Duration,
}

struct Prepared {
    id: String,
    queue_key: String,
    due_ms: Option<i64>,
    payload: String,
    /// The PENDING record and its expiry (ms), when the producer records them.
    pending: Option<(String, u64)>,
}

impl Prepared {
    /// Adds the `SET` of this task's PENDING record, if it has one.
    fn add_record(&self, pipe: &mut redis::Pipeline) {
        if let Some((record, ttl_ms)) = &self.pending {
            pipe.cmd("SET")
                .arg(result_key(&self.id))
                .arg(record)
                .arg("PX")
                .arg(*ttl_ms)
                .ignore();
        }
    }
}

impl Producer {
    /// A producer on `broker`; `origin` goes into each message's `origin`
    /// header (Celery uses `gen<pid>@<host>`).
    pub fn new(broker: Broker, origin: impl Into<String>) -> Self {
        Self {
            broker,
            origin: origin.into(),
            listener: Mutex::new(None),
            pending_ttl: None,
            max_delay: crate::config::DEFAULT_MAX_TASK_DELAY,
        }
    }

    /// Refuses tasks whose ETA or countdown lies further ahead than `max`
    /// (`max_task_delay`; default one year), as workers dead-letter them.
    pub fn max_task_delay(mut self, max: Duration) -> Self {
        self.max_delay = max;
        self
    }

    /// Makes every send store a PENDING result record first, kept `ttl`
    /// after the task is due, so a reader can tell a task that is waiting
    /// from one never sent (or long forgotten), and a task can be revoked
    /// before it starts ([`crate::broker::revoke`]). Costs one more Redis
    /// command per task, in the same round trip when results live on the
    /// broker.
    pub fn record_pending(mut self, ttl: Duration) -> Self {
        self.pending_ttl = Some(ttl);
        self
    }

    /// The broker this producer sends to.
    pub fn broker(&self) -> &Broker {
        &self.broker
    }

    fn prepare(&self, req: &TaskRequest) -> Result<Prepared, ProducerError> {
        let o = &req.options;
        let id = o
            .task_id
            .clone()
            .unwrap_or_else(|| uuid::Uuid::new_v4().to_string());
        if id.is_empty() || id.chars().any(char::is_control) {
            return Err(ProducerError::Option {
                option: "task_id",
                reason: "must be non-empty text without control characters".into(),
            });
        }
        if req.name.is_empty() {
            return Err(ProducerError::Option {
                option: "name",
                reason: "a task name is required".into(),
            });
        }
        let queue = o.queue.as_deref().unwrap_or("celery");
        if queue.is_empty() || queue.chars().any(|c| c.is_control() || c.is_whitespace()) {
            return Err(ProducerError::Option {
                option: "queue",
                reason: format!("{queue:?} is not a valid queue name"),
            });
        }
        if let Some(p) = o.priority
            && p > 9
        {
            return Err(ProducerError::Option {
                option: "priority",
                reason: format!("{p} is outside 0..=9"),
            });
        }
        let now = Utc::now();
        let eta = match (o.eta, o.countdown) {
            (Some(t), _) => Some(t),
            (None, Some(d)) => Some(
                chrono::Duration::from_std(d)
                    .ok()
                    .and_then(|d| now.checked_add_signed(d))
                    .ok_or_else(|| ProducerError::Option {
                        option: "countdown",
                        reason: format!("{d:?} is out of range"),
                    })?,
            ),
            (None, None) => None,
        };
        if let Some(t) = eta
            && t - now > chrono::Duration::from_std(self.max_delay).unwrap_or(chrono::Duration::MAX)
        {
            return Err(ProducerError::Option {
                option: if o.eta.is_some() { "eta" } else { "countdown" },
                reason: format!(
                    "{} lies more than max_task_delay ({}) ahead",
                    crate::proto::envelope::format_time(t),
                    humantime::format_duration(self.max_delay)
                ),
            });
        }
        let payload = encode(&MessageSpec {
            id: &id,
            task: &req.name,
            args: &req.args,
            kwargs: &req.kwargs,
            queue,
            eta,
            expires: o.expires,
            priority: o.priority,
            max_retries: o.max_retries,
            hard_time_limit: o.time_limit,
            soft_time_limit: o.soft_time_limit,
            origin: &self.origin,
            extra_headers: o.headers.as_ref(),
        });
        let due_ms = eta.filter(|t| *t > now).map(|t| t.timestamp_millis());
        let pending = match self.pending_ttl {
            None => None,
            Some(ttl) => {
                let record = serde_json::to_string(&TaskResult::pending(&id, &req.name, queue))
                    .map_err(|e| ProducerError::Option {
                        option: "name",
                        reason: format!("cannot record the task: {e}"),
                    })?;
                let wait_ms = due_ms.map_or(0, |d| d.saturating_sub(now.timestamp_millis()));
                let ttl_ms = u64::try_from(ttl.as_millis())
                    .unwrap_or(u64::MAX)
                    .saturating_add(u64::try_from(wait_ms).unwrap_or(0))
                    .max(1);
                Some((record, ttl_ms))
            }
        };
        Ok(Prepared {
            queue_key: queue_key(queue, priority_bucket(o.priority.unwrap_or(0))),
            due_ms,
            id,
            payload,
            pending,
        })
    }

    /// Sends one task and returns its id. A task due later waits in Redis
    /// (not in any worker's memory) until then.
    pub async fn send(&self, req: &TaskRequest) -> Result<String, ProducerError> {
        self.send_many(std::slice::from_ref(req))
            .await
            .map(|mut ids| ids.pop().unwrap_or_default())
    }

    /// Stores the PENDING records of `prepared` (those that have one) on the
    /// result backend. Runs before the messages are pushed, so a fast
    /// worker's STARTED or final record can never be overwritten by it.
    async fn record(&self, prepared: &[Prepared]) -> Result<(), ProducerError> {
        let mut pipe = redis::pipe();
        for p in prepared {
            p.add_record(&mut pipe);
        }
        if pipe.is_empty() {
            return Ok(());
        }
        let mut lane = self.broker.backend_pool().shared_lane();
        Ok(on_lane!(&mut lane, "record pending task", |c| pipe
            .query_async::<()>(c))?)
    }

    async fn push(&self, lane: &mut Lane, p: &Prepared) -> Result<(), ProducerError> {
        match p.due_ms {
            Some(due) => {
                crate::broker::park(
                    lane,
                    self.broker.keys(),
                    due,
                    &p.queue_key,
                    p.payload.as_bytes(),
                    None,
                )
                .await?
            }
            None => on_lane!(lane, "enqueue", |c| redis::cmd("LPUSH")
                .arg(&p.queue_key)
                .arg(&p.payload)
                .query_async::<()>(c))?,
        }
        Ok(())
    }

    /// Sends a task by name with positional arguments and default options.
    pub async fn send_task(&self, name: &str, args: Vec<Value>) -> Result<String, ProducerError> {
        self.send(&TaskRequest {
            name: name.to_owned(),
            args,
            kwargs: Map::new(),
            options: SendOptions::default(),
        })
        .await
    }

    /// Sends many immediate tasks in one pipeline (one round trip; two when
    /// PENDING records go to a separate result backend). Tasks with an ETA
    /// or countdown are parked one by one. Nothing is sent when any request
    /// is invalid.
    pub async fn send_many(&self, reqs: &[TaskRequest]) -> Result<Vec<String>, ProducerError> {
        let prepared = reqs
            .iter()
            .map(|r| self.prepare(r))
            .collect::<Result<Vec<_>, _>>()?;
        let same_server = self.broker.backend_is_broker();
        if !same_server {
            self.record(&prepared).await?;
        }
        let mut lane = self.broker.broker_pool().shared_lane();
        self.push_many(&mut lane, &prepared, same_server).await?;
        Ok(prepared.into_iter().map(|p| p.id).collect())
    }

    /// Pushes the messages; with `with_records`, each one's PENDING record
    /// goes first in the same pipeline (results live on the broker).
    async fn push_many(
        &self,
        lane: &mut Lane,
        prepared: &[Prepared],
        with_records: bool,
    ) -> Result<(), ProducerError> {
        let mut pipe = redis::pipe();
        for p in prepared {
            if with_records {
                p.add_record(&mut pipe);
            }
            if p.due_ms.is_none() {
                pipe.cmd("LPUSH").arg(&p.queue_key).arg(&p.payload).ignore();
            }
        }
        if !pipe.is_empty() {
            on_lane!(lane, "enqueue", |c| pipe.query_async::<()>(c))?;
        }
        for p in prepared.iter().filter(|p| p.due_ms.is_some()) {
            self.push(lane, p).await?;
        }
        Ok(())
    }

    /// Reads a task's stored result; `None` when there is none yet (or it expired).
    pub async fn result(&self, task_id: &str) -> Result<Option<TaskResult>, ProducerError> {
        let mut lane = self.broker.backend_pool().shared_lane();
        Ok(get_result(&mut lane, task_id).await?)
    }

    /// Waits up to `timeout` for a task's final result (SUCCESS, FAILURE or
    /// REVOKED), woken by the result's publication.
    pub async fn wait(
        &self,
        task_id: &str,
        timeout: Duration,
    ) -> Result<TaskResult, ProducerError> {
        crate::results_listener::wait_ready(
            &self.listener,
            self.broker.backend_pool(),
            task_id,
            timeout,
        )
        .await?
        .ok_or_else(|| ProducerError::Timeout {
            task_id: task_id.to_owned(),
            waited: timeout,
        })
    }
}
