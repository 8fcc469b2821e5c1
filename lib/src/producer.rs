//! The producer API: send Celery-protocol tasks, read and await results.

use crate::backend::{Backend, BackendError, Clock, Outgoing, PendingRecord, RedisBackend, Use};
use crate::broker::{Broker, BrokerError};
use crate::proto::TaskResult;
use crate::proto::envelope::{MessageSpec, encode};
use crate::proto::keys::{priority_bucket, queue_key};
use chrono::{DateTime, Utc};
use serde_json::{Map, Value};
use std::sync::Arc;
use std::time::Duration;

/// Errors of the producer API.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ProducerError {
    #[error(transparent)]
    Broker(#[from] BrokerError),
    #[error(transparent)]
    Backend(#[from] BackendError),
    #[error("no result for task {task_id} within {waited:?}")]
    Timeout { task_id: String, waited: Duration },
    /// The task was sent; waiting for its result failed.
    #[error("task {task_id} was sent, but waiting for its result failed: {source}")]
    Wait {
        task_id: String,
        #[source]
        source: BackendError,
    },
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
    /// Tasks sent with this task's result prepended to their args when it
    /// succeeds (Celery's `link`; see [`crate::canvas`]).
    pub link: Vec<TaskRequest>,
    /// Tasks sent with this task's id prepended to their args when it fails
    /// (Celery's `link_error`).
    pub link_error: Vec<TaskRequest>,
    /// As a chain step or callback: do not prepend the previous result
    /// (Celery's immutable signature, `.si()`).
    pub immutable: bool,
}

/// A task to send, with its options.
#[derive(Debug, Clone)]
pub struct TaskRequest {
    pub name: String,
    pub args: Vec<Value>,
    pub kwargs: Map<String, Value>,
    pub options: SendOptions,
}

impl TaskRequest {
    /// `name(args)` with no keyword arguments and default options.
    pub fn new(name: impl Into<String>, args: Vec<Value>) -> Self {
        Self {
            name: name.into(),
            args,
            kwargs: Map::new(),
            options: SendOptions::default(),
        }
    }
}

/// Sends tasks and reads results. Cheap to share behind an `Arc`.
#[derive(Debug)]
pub struct Producer {
    backend: Arc<dyn Backend>,
    clock: Arc<dyn Clock>,
    origin: String,
    /// Store a PENDING record for each task sent, kept this long after the
    /// task is due.
    pending_ttl: Option<Duration>,
    /// Furthest ahead an ETA or countdown may lie.
    max_delay: Duration,
}

/// A task ready to send, and its id.
pub(crate) struct Prepared {
    pub(crate) id: String,
    pub(crate) out: Outgoing,
}

/// What a canvas adds to a task's message beyond its own options.
#[derive(Debug, Default)]
pub(crate) struct Embedded {
    /// The rest of the chain, next step LAST, as Celery carries it.
    pub(crate) chain: Option<Value>,
    /// The chord body this header task counts into.
    pub(crate) chord: Option<Value>,
    /// The `group` id and `group_index` headers.
    pub(crate) group: Option<(String, usize)>,
}

impl Producer {
    /// A producer on `broker`; `origin` goes into each message's `origin`
    /// header (Celery uses `gen<pid>@<host>`).
    pub fn new(broker: Broker, origin: impl Into<String>) -> Self {
        Self::on_backend(Arc::new(RedisBackend::new(broker)), origin)
    }

    /// A producer on any backend (e.g. [`crate::backend::MemoryBackend`] in
    /// tests).
    pub fn on_backend(backend: Arc<dyn Backend>, origin: impl Into<String>) -> Self {
        Self {
            clock: backend.clock(),
            backend,
            origin: origin.into(),
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
    /// before it starts ([`crate::backend::TaskStates::revoke`]). Costs one
    /// more command per task, in the same round trip when results live on
    /// the broker.
    pub fn record_pending(mut self, ttl: Duration) -> Self {
        self.pending_ttl = Some(ttl);
        self
    }

    /// How long PENDING records live, when this producer stores them.
    pub(crate) fn pending_ttl(&self) -> Option<Duration> {
        self.pending_ttl
    }

    /// The backend this producer sends to and reads results from.
    pub fn backend(&self) -> &Arc<dyn Backend> {
        &self.backend
    }

    fn prepare(&self, req: &TaskRequest) -> Result<Prepared, ProducerError> {
        self.prepare_embedded(req, None, Embedded::default())
    }

    /// Checks `req` and builds its message under `id` (default: its
    /// `task_id` option, else a fresh UUID v4), its links and `extra` in
    /// the embed.
    pub(crate) fn prepare_embedded(
        &self,
        req: &TaskRequest,
        id: Option<&str>,
        extra: Embedded,
    ) -> Result<Prepared, ProducerError> {
        let o = &req.options;
        let id = id
            .map(str::to_owned)
            .or_else(|| o.task_id.clone())
            .unwrap_or_else(|| {
                let mut text = [0; uuid::fmt::Hyphenated::LENGTH];
                uuid::Uuid::new_v4()
                    .hyphenated()
                    .encode_lower(&mut text)
                    .to_owned()
            });
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
        let now = DateTime::from_timestamp_millis(self.clock.now_ms()).unwrap_or_else(Utc::now);
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
        let link = crate::canvas::send::signatures("link", &o.link)?;
        let link_error = crate::canvas::send::signatures("link_error", &o.link_error)?;
        let embed = (!link.is_empty()
            || !link_error.is_empty()
            || extra.chain.is_some()
            || extra.chord.is_some())
        .then(|| {
            let list = |l: Vec<Value>| {
                if l.is_empty() {
                    Value::Null
                } else {
                    Value::Array(l)
                }
            };
            serde_json::json!({
                "callbacks": list(link),
                "errbacks": list(link_error),
                "chain": extra.chain.unwrap_or(Value::Null),
                "chord": extra.chord.unwrap_or(Value::Null),
            })
        });
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
            embed: embed.as_ref(),
            group: extra.group.as_ref().map(|(g, i)| (g.as_str(), *i)),
        });
        let due_ms = eta.filter(|t| *t > now).map(|t| t.timestamp_millis());
        let pending = match self.pending_ttl {
            None => None,
            Some(ttl) => {
                let record = TaskResult::pending_json(&id, &req.name, queue);
                let wait_ms = due_ms.map_or(0, |d| d.saturating_sub(now.timestamp_millis()));
                let wait = Duration::from_millis(u64::try_from(wait_ms).unwrap_or(0));
                Some(PendingRecord {
                    task_id: id.clone(),
                    record,
                    ttl: ttl.saturating_add(wait).max(Duration::from_millis(1)),
                })
            }
        };
        Ok(Prepared {
            out: Outgoing {
                queue_key: queue_key(queue, priority_bucket(o.priority.unwrap_or(0))),
                payload,
                due_ms,
                pending,
            },
            id,
        })
    }

    /// Sends one task and returns its id. A task due later waits in Redis
    /// (not in any worker's memory) until then.
    pub async fn send(&self, req: &TaskRequest) -> Result<String, ProducerError> {
        self.send_many(std::slice::from_ref(req))
            .await
            .map(|mut ids| ids.pop().unwrap_or_default())
    }

    /// Sends one task and waits up to `timeout` for its final result
    /// (SUCCESS, FAILURE or REVOKED), like Celery's `apply_async().get()`.
    ///
    /// The wait begins with the send, not after it: on Redis the result's
    /// subscription is made while the task is being enqueued (Celery's Redis
    /// backend also subscribes when it sends), so a quick task's result is
    /// not held up by a subscription that starts only once the send has
    /// answered, as with [`Producer::send`] followed by [`Producer::wait`].
    ///
    /// The send always runs to its end (unless the caller drops this future
    /// itself). A failed send ends the wait at once and is the error
    /// returned. Once the task is sent, a wait that fails
    /// ([`ProducerError::Wait`]) or times out ([`ProducerError::Timeout`])
    /// names the task, so its result can still be read later.
    pub async fn send_and_wait(
        &self,
        req: &TaskRequest,
        timeout: Duration,
    ) -> Result<TaskResult, ProducerError> {
        let prepared = self.prepare(req)?;
        let id = prepared.id.clone();
        let mut results = self.backend.results(Use::Request);
        let (failed, mut send_failed) = tokio::sync::oneshot::channel::<()>();
        let send = async {
            let sent = self.send_prepared(vec![prepared]).await;
            if sent.is_err() {
                let _ = failed.send(());
            }
            sent
        };
        let wait = async {
            tokio::select! {
                waited = results.wait(&id, timeout) => Some(waited),
                // Only a failed send ends the wait; a sent one drops the
                // sender without a value, which leaves this branch off.
                Ok(()) = &mut send_failed => None,
            }
        };
        let (sent, waited) = tokio::join!(send, wait);
        sent?;
        match waited {
            Some(Ok(Some(result))) => Ok(result),
            Some(Ok(None)) | None => Err(ProducerError::Timeout {
                task_id: id,
                waited: timeout,
            }),
            Some(Err(source)) => Err(ProducerError::Wait {
                task_id: id,
                source,
            }),
        }
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

    /// Sends many tasks in one batch (on Redis one round trip for the
    /// immediate ones, PENDING records included; two when results live on
    /// another server). Tasks with an ETA or countdown are parked until due.
    /// Nothing is sent when any request is invalid.
    pub async fn send_many(&self, reqs: &[TaskRequest]) -> Result<Vec<String>, ProducerError> {
        let prepared = reqs
            .iter()
            .map(|r| self.prepare(r))
            .collect::<Result<Vec<_>, _>>()?;
        self.send_prepared(prepared).await
    }

    /// Sends prepared tasks in one batch; returns their ids.
    pub(crate) async fn send_prepared(
        &self,
        prepared: Vec<Prepared>,
    ) -> Result<Vec<String>, ProducerError> {
        let (ids, batch): (Vec<String>, Vec<Outgoing>) =
            prepared.into_iter().map(|p| (p.id, p.out)).unzip();
        self.backend.enqueue(Use::Request).enqueue(&batch).await?;
        Ok(ids)
    }

    /// Reads a task's stored result; `None` when there is none yet (or it expired).
    pub async fn result(&self, task_id: &str) -> Result<Option<TaskResult>, ProducerError> {
        Ok(self.backend.results(Use::Request).read(task_id).await?)
    }

    /// Waits up to `timeout` for a task's final result (SUCCESS, FAILURE or
    /// REVOKED), woken by the result's publication.
    pub async fn wait(
        &self,
        task_id: &str,
        timeout: Duration,
    ) -> Result<TaskResult, ProducerError> {
        self.backend
            .results(Use::Request)
            .wait(task_id, timeout)
            .await?
            .ok_or_else(|| ProducerError::Timeout {
                task_id: task_id.to_owned(),
                waited: timeout,
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::MemoryBackend;

    fn req(name: &str, options: SendOptions) -> TaskRequest {
        TaskRequest {
            name: name.into(),
            args: vec![serde_json::json!(1)],
            kwargs: Map::new(),
            options,
        }
    }

    async fn counts(b: &dyn Backend) -> crate::broker::QueueCounts {
        let mut inspect = b.inspect(Use::Request);
        let c = inspect.queue_counts(&["celery".into()]).await;
        c.expect("counts").remove(0)
    }

    #[tokio::test(start_paused = true)]
    async fn sends_record_pending_and_park_what_is_due_later() {
        let b: Arc<dyn Backend> = Arc::new(MemoryBackend::new());
        let p =
            Producer::on_backend(Arc::clone(&b), "test").record_pending(Duration::from_secs(60));
        let now = p.send(&req("t.now", SendOptions::default())).await;
        let later = SendOptions {
            countdown: Some(Duration::from_secs(30)),
            ..SendOptions::default()
        };
        let later = p.send(&req("t.later", later)).await.expect("send");
        let c = counts(&*b).await;
        assert_eq!((c.ready, c.delayed), (1, Some(1)));
        for id in [now.expect("send"), later.clone()] {
            let r = p
                .result(&id)
                .await
                .expect("read")
                .expect("a PENDING record");
            assert_eq!(r.status, crate::proto::TaskState::Pending);
        }
        // The later task's record outlives the pending TTL by its wait.
        tokio::time::advance(Duration::from_secs(75)).await;
        assert!(p.result(&later).await.expect("read").is_some());
        let mut delayed = b.delayed(Use::Request);
        assert_eq!(delayed.promote_due(10).await.expect("promote").moved, 1);
    }

    #[tokio::test(start_paused = true)]
    async fn bad_options_name_what_is_wrong_and_send_nothing() {
        let b: Arc<dyn Backend> = Arc::new(MemoryBackend::new());
        let p =
            Producer::on_backend(Arc::clone(&b), "test").max_task_delay(Duration::from_secs(3600));
        let far = SendOptions {
            countdown: Some(Duration::from_secs(7200)),
            ..SendOptions::default()
        };
        let bad_priority = SendOptions {
            priority: Some(12),
            ..SendOptions::default()
        };
        let batch = [req("t.ok", SendOptions::default()), req("t.far", far)];
        match p.send_many(&batch).await {
            Err(ProducerError::Option { option, reason }) => {
                assert_eq!(option, "countdown");
                assert!(reason.contains("max_task_delay"), "{reason}");
            }
            other => panic!("expected a refusal, got {other:?}"),
        }
        let r = p.send(&req("t.x", bad_priority)).await;
        assert!(
            matches!(
                r,
                Err(ProducerError::Option {
                    option: "priority",
                    ..
                })
            ),
            "{r:?}"
        );
        let r = p.send(&req("", SendOptions::default())).await;
        assert!(
            matches!(r, Err(ProducerError::Option { option: "name", .. })),
            "{r:?}"
        );
        let c = counts(&*b).await;
        assert_eq!(
            (c.ready, c.delayed),
            (0, Some(0)),
            "nothing of a refused batch is sent"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn wait_times_out_naming_the_task() {
        let b: Arc<dyn Backend> = Arc::new(MemoryBackend::new());
        let p = Producer::on_backend(b, "test");
        let r = p.wait("nobody", Duration::from_secs(5)).await;
        match r {
            Err(ProducerError::Timeout { task_id, waited }) => {
                assert_eq!(
                    (task_id.as_str(), waited),
                    ("nobody", Duration::from_secs(5))
                );
            }
            other => panic!("expected a timeout, got {other:?}"),
        }
    }
}
