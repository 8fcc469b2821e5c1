//! The RabbitMQ broker (`broker_url = "amqp://..."` or `amqps://`):
//! messages on RabbitMQ in Celery's own topology and wire format, with
//! everything else (results, task states and revocations, worker records,
//! dead-letter records, the beat's lock and ledger) in the result backend:
//! its Redis, through a [`RedisBackend`] on that server, or PostgreSQL
//! (see `records`).
//!
//! - `wire`: kombu's JSON envelope ↔ the AMQP message Celery sends.
//! - [`topology`]: Celery's exchanges, queues and bindings; the delay levels.
//! - `link`: the connection and its publisher-confirm channel.
//! - `consume`: `basic.consume` with `basic.qos`, holds and acknowledgements.
//! - `records`: where the rest lives, Redis or PostgreSQL.
//! - `dead`: dead-letter records in the result backend, requeued to
//!   RabbitMQ.
//! - `held`: each worker's held messages by queue, written with its
//!   heartbeat, for the queues' in-flight counts.
//! - `mailbox`: Celery's remote control (pidbox) and events on RabbitMQ.
//!
//! Guarantees: an enqueue that returned was confirmed by RabbitMQ; a message
//! is acknowledged only after its result was stored; a delayed
//! message waits inside RabbitMQ (durable, persistent), never unacknowledged
//! in a worker; a worker that dies leaves its unacknowledged messages to
//! RabbitMQ, which redelivers them (`redelivered` set).

mod acks;
mod consume;
mod dead;
mod held;
mod link;
pub(crate) mod mailbox;
#[cfg(test)]
mod pg_tests;
mod records;
#[cfg(feature = "beat")]
mod slots;
#[cfg(test)]
mod tests;
pub mod topology;
mod wire;

use super::due_in;
use super::postgres::PgRecords;
use super::redis::RedisBackend;
use super::traits::{
    Backend, BackendError, Clock, Consume, DeadLetters, Delayed, Enqueue, Expiry, Inspect, Leases,
    Outgoing, Parked, Promoted, ResultStore, Store, TaskStates, Use,
};
#[cfg(feature = "beat")]
use super::traits::{LeaderLock, SlotLedger};
use crate::broker::{self, DeadLetter, DelayedSpan, Delivery, QueueCounts, Settle, WorkerRecord};
use crate::proto::keys::queue_of_key;
use async_trait::async_trait;
use consume::Consumer;
use link::{Link, Publish};
use std::sync::Arc;
use std::time::Duration;
pub use topology::QueueOptions;

/// A failed RabbitMQ operation.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{op} failed on RabbitMQ: {detail}")]
pub struct AmqpError {
    pub op: &'static str,
    pub detail: String,
    /// RabbitMQ refused the credentials or the vhost (ACCESS_REFUSED):
    /// retrying will not help until the configuration changes.
    pub refused: bool,
}

impl AmqpError {
    pub(crate) fn of(op: &'static str, e: &lapin::Error) -> Self {
        let detail = e.to_string();
        let refused = detail.contains("ACCESS_REFUSED") || detail.contains("ACCESSREFUSED");
        Self {
            op,
            detail,
            refused,
        }
    }

    /// A refused declaration of `what` (an exchange or a queue) `name`,
    /// with what to do when it exists with other arguments.
    pub(crate) fn declare(op: &'static str, what: &str, name: &str, e: &lapin::Error) -> Self {
        let mut err = Self::of(op, e);
        if err.detail.contains("PRECONDITION_FAILED") || err.detail.contains("PRECONDITIONFAILED") {
            err.detail = format!(
                "the {what} {name:?} already exists on RabbitMQ with other arguments \
                 (PRECONDITION_FAILED: {}); taskstack declares it as Celery does and never \
                 changes an existing {what}: make `broker_queue_type` and \
                 `broker_queue_max_priority` match it, or delete it \
                 when it holds nothing you need",
                err.detail
            );
        }
        err
    }

    pub(crate) fn other(op: &'static str, detail: &str) -> Self {
        Self {
            op,
            detail: detail.to_owned(),
            refused: false,
        }
    }

    pub(crate) fn timeout(op: &'static str, after: Duration) -> Self {
        Self::other(op, &format!("no answer within {after:?}"))
    }

    /// Whether RabbitMQ answered NOT_FOUND (a passive declaration of a
    /// queue that does not exist).
    pub(crate) fn is_not_found(e: &lapin::Error) -> bool {
        let s = e.to_string();
        s.contains("NOT_FOUND") || s.contains("NOTFOUND")
    }
}

/// Messages on RabbitMQ, the rest in the result backend (Redis or
/// PostgreSQL).
#[derive(Debug, Clone)]
pub struct AmqpBackend {
    records: records::Records,
    link: Arc<Link>,
    consumer: Arc<Consumer>,
}

impl AmqpBackend {
    /// A backend publishing to and consuming from `url` (connections are
    /// opened lazily), with `redis` on the result backend's server
    /// (its broker and backend pools both that server). `prefetch` is
    /// `basic.qos`: how many unacknowledged deliveries one worker holds.
    pub fn new(
        url: String,
        options: QueueOptions,
        timeout: Duration,
        prefetch: usize,
        redis: RedisBackend,
    ) -> Self {
        Self::on_records(
            url,
            options,
            timeout,
            prefetch,
            records::Records::Redis(Arc::new(redis)),
        )
    }

    /// [`AmqpBackend::new`] with everything but the messages in PostgreSQL.
    pub(crate) fn with_postgres(
        url: String,
        options: QueueOptions,
        timeout: Duration,
        prefetch: usize,
        pg: PgRecords,
    ) -> Self {
        Self::on_records(url, options, timeout, prefetch, records::Records::Pg(pg))
    }

    fn on_records(
        url: String,
        options: QueueOptions,
        timeout: Duration,
        prefetch: usize,
        records: records::Records,
    ) -> Self {
        let link = Arc::new(Link::new(url, options, timeout));
        Self {
            consumer: Arc::new(Consumer::new(Arc::clone(&link), prefetch)),
            link,
            records,
        }
    }

    /// The connection settings (URL, TLS, timeouts) the remote control and
    /// events open their own connections with.
    pub(crate) fn link(&self) -> &Link {
        &self.link
    }

    /// `(host, port, virtual host, TLS, user)` of the broker URL, as
    /// `celery inspect stats` reports a broker.
    pub fn broker_summary(&self) -> (String, u16, String, bool, String) {
        match self.link.url().parse::<lapin::uri::AMQPUri>() {
            Ok(u) => (
                u.authority.host,
                u.authority.port,
                u.vhost,
                u.scheme == lapin::uri::AMQPScheme::AMQPS,
                u.authority.userinfo.username,
            ),
            Err(_) => (String::new(), 0, String::new(), false, String::new()),
        }
    }

    fn session(&self, usage: Use, worker_id: &str) -> Box<AmqpSession> {
        Box::new(AmqpSession {
            side: self.records.side(usage),
            worker_id: worker_id.to_owned(),
            usage,
            b: self.clone(),
        })
    }

    /// Publishes `batch` with confirms, each to its queue now or through
    /// the delay levels when due later.
    async fn publish(&self, batch: &[(&str, &[u8], Option<i64>)]) -> Result<(), BackendError> {
        let now = broker::now_ms();
        let mut out = Vec::with_capacity(batch.len());
        for (queue_key, payload, due_ms) in batch {
            let delay_s = due_ms.map_or(0, |due| {
                let ms = due_in(due, now).as_millis();
                u64::try_from(ms.div_ceil(1000)).unwrap_or(u64::MAX)
            });
            let message =
                wire::to_amqp(payload, delay_s == 0).map_err(|detail| BackendError::Invalid {
                    op: "publish to RabbitMQ",
                    detail,
                })?;
            out.push(Publish {
                queue: queue_of_key(queue_key).to_owned(),
                delay_s,
                message,
            });
        }
        Ok(self.link.publish(&out).await?)
    }
}

/// One session: the shared RabbitMQ side plus access to the records.
#[derive(Debug)]
struct AmqpSession {
    b: AmqpBackend,
    side: records::Side,
    worker_id: String,
    usage: Use,
}

#[async_trait]
impl Backend for AmqpBackend {
    fn clock(&self) -> Arc<dyn Clock> {
        self.records.clock()
    }
    fn namespace(&self) -> &str {
        self.records.namespace()
    }
    fn amqp(&self) -> Option<&AmqpBackend> {
        Some(self)
    }
    fn records_redis(&self) -> Option<&broker::Broker> {
        // The result backend's Redis: chord counters where Celery's Redis
        // result backend keeps them; follow-ups go to RabbitMQ. None with
        // PostgreSQL (the canvas's records are then in PostgreSQL, see
        // `canvas`).
        self.records.redis()
    }
    fn canvas(&self) -> Option<Box<dyn crate::canvas::store::CanvasStore>> {
        self.records.canvas()
    }
    fn enqueue(&self, usage: Use) -> Box<dyn Enqueue> {
        self.session(usage, "")
    }
    fn consume(&self, worker_id: &str) -> Box<dyn Consume> {
        self.session(Use::Loop, worker_id)
    }
    fn leases(&self, usage: Use) -> Box<dyn Leases> {
        self.records.leases(usage, &self.consumer)
    }
    fn delayed(&self, usage: Use) -> Box<dyn Delayed> {
        self.session(usage, "")
    }
    fn results(&self, usage: Use) -> Box<dyn ResultStore> {
        self.records.results(usage)
    }
    fn task_states(&self, usage: Use) -> Box<dyn TaskStates> {
        self.records.task_states(usage)
    }
    fn dead_letters(&self, usage: Use) -> Box<dyn DeadLetters> {
        self.session(usage, "")
    }
    fn inspect(&self, usage: Use) -> Box<dyn Inspect> {
        self.session(usage, "")
    }
    #[cfg(feature = "beat")]
    fn leader_lock(&self, usage: Use) -> Box<dyn LeaderLock> {
        self.records.leader_lock(usage)
    }
    #[cfg(feature = "beat")]
    fn slot_ledger(&self, usage: Use) -> Box<dyn SlotLedger> {
        slots::ledger(self, usage)
    }
    fn expiry(&self) -> Option<Box<dyn Expiry>> {
        self.records.expiry()
    }
    fn records_task_args(&self) -> bool {
        self.records.records_task_args()
    }
    async fn pings(&self) -> Vec<(Store, Result<Duration, BackendError>)> {
        let mut rabbitmq = self.inspect(Use::Request);
        let (rabbitmq, records) = tokio::join!(rabbitmq.ping(), self.records.ping());
        vec![(Store::RabbitMq, rabbitmq), records]
    }
}

#[async_trait]
impl Enqueue for AmqpSession {
    async fn enqueue(&mut self, batch: &[Outgoing]) -> Result<(), BackendError> {
        self.side.store_pending(batch).await?;
        let msgs: Vec<(&str, &[u8], Option<i64>)> = batch
            .iter()
            .map(|o| (o.queue_key.as_str(), o.payload.as_bytes(), o.due_ms))
            .collect();
        self.b.publish(&msgs).await
    }
}

#[async_trait]
impl Consume for AmqpSession {
    fn worker_id(&self) -> &str {
        &self.worker_id
    }

    async fn take(
        &mut self,
        queue_keys: &[String],
        max: usize,
        _lease: Duration,
        max_size: usize,
    ) -> Result<Vec<Delivery>, BackendError> {
        Ok(self.b.consumer.take(queue_keys, max, max_size).await?)
    }

    async fn wait_for_message(
        &mut self,
        queue_keys: &[String],
        wait: Duration,
    ) -> Result<bool, BackendError> {
        if queue_keys.is_empty() {
            return Err(BackendError::Invalid {
                op: "wait for messages",
                detail: "no queue to wait on".into(),
            });
        }
        Ok(self.b.consumer.wait(queue_keys, wait).await?)
    }

    async fn settle(&mut self, batch: &[Settle], result_ttl: Duration) -> Result<(), BackendError> {
        // Results first: a message is acknowledged only once its result is
        // stored (and announced to waiting clients).
        self.side.store_results(batch, result_ttl).await?;
        let holds = batch
            .iter()
            .filter_map(|s| self.b.consumer.release(s.seq))
            .collect();
        consume::ack(holds).await;
        Ok(())
    }

    async fn hand_back(&mut self, seqs: &[u64]) -> Result<usize, BackendError> {
        let mut n = 0;
        for seq in seqs {
            if let Some(hold) = self.b.consumer.release(*seq) {
                consume::nack(hold).await;
                n += 1;
            }
        }
        Ok(n)
    }

    async fn park_held(
        &mut self,
        seq: u64,
        queue_key: &str,
        payload: &[u8],
        due_ms: i64,
        _started: Option<&str>,
    ) -> Result<(), BackendError> {
        if self.b.consumer.held_queue(seq).is_none() {
            return Ok(());
        }
        // Confirmed in the delay levels first, then acknowledged: a crash
        // in between delivers the original again (a duplicate), never none.
        self.b
            .publish(&[(queue_key, payload, Some(due_ms))])
            .await?;
        if let Some(hold) = self.b.consumer.release(seq) {
            consume::ack(vec![hold]).await;
        }
        Ok(())
    }

    async fn dead_letter(&mut self, seq: u64, record: &DeadLetter) -> Result<(), BackendError> {
        if self.b.consumer.held_queue(seq).is_none() {
            return Ok(());
        }
        let mut record = record.clone();
        if record.payload.is_empty()
            && record.payload_base64.is_none()
            && let Some(bytes) = self.b.consumer.oversized_bytes(seq)
        {
            record.set_payload_owned(bytes);
            record.payload_size = None;
        }
        // Stored first, then acknowledged.
        self.side.store_dead(&record).await?;
        if let Some(hold) = self.b.consumer.release(seq) {
            consume::ack(vec![hold]).await;
        }
        Ok(())
    }
}

#[async_trait]
impl Delayed for AmqpSession {
    async fn park(&mut self, batch: &[Parked]) -> Result<(), BackendError> {
        let msgs: Vec<(&str, &[u8], Option<i64>)> = batch
            .iter()
            .map(|p| (p.queue_key.as_str(), p.payload.as_bytes(), Some(p.due_ms)))
            .collect();
        self.b.publish(&msgs).await
    }

    /// Nothing to move: RabbitMQ's delay levels deliver due messages
    /// themselves.
    async fn promote_due(&mut self, _max: usize) -> Result<Promoted, BackendError> {
        Ok(Promoted::default())
    }
}

#[async_trait]
impl Inspect for AmqpSession {
    /// `ready` is the queue's message count on RabbitMQ (what it has not
    /// delivered); `in_flight` what live workers hold of it, as of their
    /// last heartbeats (every third of a lease; see `held`);
    /// `dead_lettered` the stored records; `consumers` RabbitMQ's count.
    /// `delayed` is not counted per queue (`None`): the delay levels are
    /// shared by every queue, and their total is in
    /// [`Inspect::delayed_span`].
    async fn queue_counts(&mut self, queues: &[String]) -> Result<Vec<QueueCounts>, BackendError> {
        let Self { b, side, usage, .. } = self;
        // RabbitMQ's counts and the records' are asked for at once.
        let (ready, (dead, held)) = tokio::try_join!(
            async {
                b.link
                    .message_counts(queues)
                    .await
                    .map_err(BackendError::from)
            },
            side.counts(*usage, queues),
        )?;
        Ok(ready
            .into_iter()
            .zip(dead)
            .zip(held)
            .map(
                |(((ready, consumers), dead_lettered), in_flight)| QueueCounts {
                    ready,
                    delayed: None,
                    in_flight,
                    dead_lettered,
                    oldest_ready_age: None,
                    consumers: Some(consumers),
                },
            )
            .collect())
    }

    async fn live_workers(&mut self) -> Result<Vec<WorkerRecord>, BackendError> {
        self.side.live_workers(self.usage).await
    }

    /// The messages waiting in the delay levels; RabbitMQ does not say
    /// when they are due without taking them.
    async fn delayed_span(&mut self) -> Result<DelayedSpan, BackendError> {
        let options = self.b.link.options();
        let levels: Vec<String> = (0..topology::LEVELS)
            .map(|l| topology::level_name(options, l))
            .collect();
        let counts = self.b.link.message_counts(&levels).await?;
        Ok(DelayedSpan {
            parked: counts.iter().map(|(messages, _)| messages).sum(),
            first_due_ms: None,
            last_due_ms: None,
        })
    }

    async fn ping(&mut self) -> Result<Duration, BackendError> {
        let start = std::time::Instant::now();
        self.b
            .link
            .message_counts(&[topology::level_name(self.b.link.options(), 0)])
            .await?;
        Ok(start.elapsed())
    }
}
