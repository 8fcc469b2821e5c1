//! Celery's monitoring events, as Flower, `celery events` and exporters
//! read them: published on the `celeryev` exchange exactly as kombu does,
//! through a `Sink`: on Redis `PUBLISH /<db>.celeryev/<routing key>`
//! (`RedisSink`), on RabbitMQ the `celeryev` topic exchange
//! (`AmqpSink`, through `backend::amqp::mailbox`).
//!
//! Worker events (`worker-online`, `worker-heartbeat` every 2 s,
//! `worker-offline`) are always sent, as a Celery worker does; task events
//! (`task-received`, `-started`, `-succeeded`, `-failed`, `-retried`,
//! `-revoked`, `-rejected`) only with `worker_send_task_events` (`-E`) or
//! after the `enable_events` remote command. Task events go through a
//! bounded buffer: a full buffer drops the event (counted in
//! `taskstack_worker_events_dropped_total`), never slows a task. Events that
//! piled up while one was being published go out as one `task.multi`
//! message (a JSON list), as Celery batches them.

pub mod sent;

use crate::broker::{Lane, on_lane};
use crate::control::kombu;
use serde_json::{Map, Value, json};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

/// How often a worker sends `worker-heartbeat` (Celery's `freq`).
pub const HEARTBEAT_INTERVAL: Duration = Duration::from_secs(2);
/// Task events buffered at most; more are dropped and counted.
pub const BUFFER: usize = 8192;
/// Most events in one `task.multi` message.
const MAX_BATCH: usize = 256;
/// The exchange events go to.
pub const EXCHANGE: &str = "celeryev";

/// A Lamport clock, as kombu's `LamportClock` (shared by events and the
/// pidbox, like Celery's `app.clock`).
#[derive(Debug, Default)]
pub struct Clock(AtomicU64);

impl Clock {
    /// Advances and returns the new value.
    pub fn forward(&self) -> u64 {
        self.0.fetch_add(1, Ordering::Relaxed) + 1
    }

    /// Moves past a value seen on a received message.
    pub fn adjust(&self, other: u64) -> u64 {
        let mut cur = self.0.load(Ordering::Relaxed);
        loop {
            let next = cur.max(other) + 1;
            match self
                .0
                .compare_exchange(cur, next, Ordering::Relaxed, Ordering::Relaxed)
            {
                Ok(_) => return next,
                Err(seen) => cur = seen,
            }
        }
    }

    pub fn value(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

/// The event dispatcher of one worker.
#[derive(Debug)]
pub struct Events {
    hostname: String,
    pid: u32,
    utcoffset: f64,
    pub clock: Arc<Clock>,
    task_events: AtomicBool,
    tx: mpsc::Sender<Value>,
    rx: std::sync::Mutex<Option<mpsc::Receiver<Value>>>,
    dropped: AtomicU64,
    /// `taskstack_worker_events_dropped_total`.
    dropped_metric: prometheus_client::metrics::counter::Counter,
}

/// Seconds since the Unix epoch, as Celery's `time.time()`.
pub fn timestamp() -> f64 {
    chrono::Utc::now().timestamp_micros() as f64 / 1e6
}

impl Events {
    /// A dispatcher sending as `hostname`; task events on when `task_events`.
    pub fn new(
        hostname: &str,
        task_events: bool,
        dropped_metric: prometheus_client::metrics::counter::Counter,
    ) -> Self {
        let (tx, rx) = mpsc::channel(BUFFER);
        // Celery's utcoffset(): hours west of UTC.
        let east = chrono::Local::now().offset().local_minus_utc();
        Self {
            hostname: hostname.to_owned(),
            pid: std::process::id(),
            utcoffset: f64::from(-east / 3600),
            clock: Arc::default(),
            task_events: AtomicBool::new(task_events),
            tx,
            rx: std::sync::Mutex::new(Some(rx)),
            dropped: AtomicU64::new(0),
            dropped_metric,
        }
    }

    pub fn hostname(&self) -> &str {
        &self.hostname
    }

    /// Whether task events are sent.
    pub fn task_events(&self) -> bool {
        self.task_events.load(Ordering::Relaxed)
    }

    /// Turns task events on or off; returns the previous setting.
    pub fn set_task_events(&self, on: bool) -> bool {
        self.task_events.swap(on, Ordering::Relaxed)
    }

    /// Task events dropped because the buffer was full or Redis refused them.
    pub fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }

    /// An event of `kind` with `fields`, stamped as Celery stamps them.
    pub fn event(&self, kind: &str, fields: Map<String, Value>) -> Value {
        let mut m = Map::new();
        m.insert("hostname".into(), json!(self.hostname));
        m.insert("utcoffset".into(), json!(self.utcoffset));
        m.insert("pid".into(), json!(self.pid));
        m.insert("clock".into(), json!(self.clock.forward()));
        m.extend(fields);
        m.insert("timestamp".into(), json!(timestamp()));
        m.insert("type".into(), json!(kind));
        Value::Object(m)
    }

    /// Queues a task event (built by `fields` only when task events are
    /// on); never waits: a full buffer drops it.
    pub fn task(&self, kind: &str, fields: impl FnOnce() -> Map<String, Value>) {
        if !self.task_events() {
            return;
        }
        let ev = self.event(kind, fields());
        if self.tx.try_send(ev).is_err() {
            self.lost(1);
        }
    }

    fn lost(&self, n: u64) {
        if n > 0 {
            self.dropped.fetch_add(n, Ordering::Relaxed);
            self.dropped_metric.inc_by(n);
        }
    }

    /// The publishing loop (once per dispatcher): `worker-online`, then task
    /// events and a heartbeat every [`HEARTBEAT_INTERVAL`] until `stop`,
    /// then what is left and `worker-offline`. `worker` gives the fields of
    /// a worker event (`active`, `processed`).
    pub(crate) async fn run(
        self: Arc<Self>,
        sink: &mut dyn Sink,
        stop: CancellationToken,
        worker: impl Fn() -> (usize, u64) + Send,
    ) {
        let Some(mut rx) = self.rx.lock().ok().and_then(|mut g| g.take()) else {
            return;
        };
        let mut out = Publisher {
            sink,
            hostname: &self.hostname,
            warned: false,
        };
        out.send(self.worker_event("worker-online", &worker)).await;
        let mut tick = tokio::time::interval(HEARTBEAT_INTERVAL);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tick.tick().await;
        let mut buf = Vec::with_capacity(MAX_BATCH);
        loop {
            tokio::select! {
                biased;
                () = stop.cancelled() => break,
                n = rx.recv_many(&mut buf, MAX_BATCH) => {
                    if n == 0 {
                        break;
                    }
                    let lost = out.send_batch(std::mem::take(&mut buf)).await;
                    self.lost(lost);
                }
                _ = tick.tick() => {
                    out.send(self.worker_event("worker-heartbeat", &worker)).await;
                }
            }
        }
        while let Ok(ev) = rx.try_recv() {
            buf.push(ev);
        }
        if !buf.is_empty() {
            let lost = out.send_batch(buf).await;
            self.lost(lost);
        }
        out.send(self.worker_event("worker-offline", &worker)).await;
    }

    fn worker_event(&self, kind: &str, worker: &impl Fn() -> (usize, u64)) -> Value {
        let (active, processed) = worker();
        let mut f = Map::new();
        f.insert("freq".into(), json!(HEARTBEAT_INTERVAL.as_secs_f64()));
        f.insert("active".into(), json!(active));
        f.insert("processed".into(), json!(processed));
        f.insert("loadavg".into(), json!(loadavg()));
        f.insert("sw_ident".into(), json!("taskstack"));
        f.insert("sw_ver".into(), json!(env!("CARGO_PKG_VERSION")));
        f.insert(
            "sw_sys".into(),
            json!(std::env::consts::OS.replace("linux", "Linux")),
        );
        self.event(kind, f)
    }
}

/// The 1, 5 and 15 minute load averages (rounded as Celery rounds them).
#[allow(unsafe_code)]
fn loadavg() -> [f64; 3] {
    let mut l = [0.0f64; 3];
    // SAFETY: getloadavg writes at most 3 doubles into the array given.
    let n = unsafe { libc::getloadavg(l.as_mut_ptr(), 3) };
    if n < 3 {
        return [0.0; 3];
    }
    l.map(|x| (x * 100.0).round() / 100.0)
}

/// Where events go: the broker's `celeryev` exchange.
#[async_trait::async_trait]
pub(crate) trait Sink: Send {
    /// Publishes `body` with `routing_key`, header `hostname`.
    async fn publish(
        &mut self,
        routing_key: &str,
        body: &Value,
        hostname: &str,
    ) -> Result<(), String>;
}

/// Events on Redis, as kombu's Redis transport publishes them
/// (`PUBLISH /<db>.celeryev/<routing key>` of the JSON envelope).
pub(crate) struct RedisSink {
    pub lane: Lane,
    pub db: i64,
}

#[async_trait::async_trait]
impl Sink for RedisSink {
    async fn publish(
        &mut self,
        routing_key: &str,
        body: &Value,
        hostname: &str,
    ) -> Result<(), String> {
        let channel = kombu::fanout_channel(self.db, EXCHANGE, routing_key);
        let msg = kombu::envelope(
            body,
            json!({"hostname": hostname}),
            EXCHANGE,
            routing_key,
            1,
        );
        let r: Result<i64, crate::broker::BrokerError> = async {
            on_lane!(&mut self.lane, "publish event", |c| redis::cmd("PUBLISH")
                .arg(&channel)
                .arg(&msg)
                .query_async::<i64>(c))
        }
        .await;
        r.map(drop).map_err(|e| e.to_string())
    }
}

/// Events on RabbitMQ's durable `celeryev` topic exchange, on a
/// connection of their own (opened at the first event, again after it
/// broke); the worker's and the web API's.
#[cfg(feature = "amqp")]
#[derive(Debug)]
pub(crate) struct AmqpSink {
    backend: crate::backend::AmqpBackend,
    out: crate::backend::amqp::mailbox::EventPublisher,
}

#[cfg(feature = "amqp")]
impl AmqpSink {
    pub(crate) fn new(backend: crate::backend::AmqpBackend) -> Self {
        Self {
            backend,
            out: crate::backend::amqp::mailbox::EventPublisher::new(),
        }
    }

    /// Closes the events connection.
    pub(crate) async fn close(self) {
        self.out.close().await;
    }
}

#[cfg(feature = "amqp")]
#[async_trait::async_trait]
impl Sink for AmqpSink {
    async fn publish(
        &mut self,
        routing_key: &str,
        body: &Value,
        hostname: &str,
    ) -> Result<(), String> {
        self.out
            .publish(self.backend.link(), routing_key, body, hostname)
            .await
            .map_err(|e| e.to_string())
    }
}

struct Publisher<'a> {
    sink: &'a mut dyn Sink,
    hostname: &'a str,
    warned: bool,
}

impl Publisher<'_> {
    /// Publishes one event; false when the broker refused it.
    async fn send(&mut self, ev: Value) -> bool {
        let kind = ev["type"].as_str().unwrap_or("").replace('-', ".");
        self.publish(&kind, &ev).await
    }

    /// Publishes a batch (one event alone, several as `task.multi`);
    /// returns how many were lost.
    async fn send_batch(&mut self, mut evs: Vec<Value>) -> u64 {
        let n = evs.len() as u64;
        let ok = if evs.len() == 1 {
            let ev = evs.pop().unwrap_or_default();
            self.send(ev).await
        } else {
            self.publish("task.multi", &Value::Array(evs)).await
        };
        if ok { 0 } else { n }
    }

    async fn publish(&mut self, routing_key: &str, body: &Value) -> bool {
        match self.sink.publish(routing_key, body, self.hostname).await {
            Ok(()) => {
                self.warned = false;
                true
            }
            Err(e) => {
                if !self.warned {
                    tracing::warn!(error = %e, "cannot publish monitoring events; dropping them until the broker answers");
                    self.warned = true;
                }
                false
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clocks_move_forward_and_past_what_they_saw() {
        let c = Clock::default();
        assert_eq!(c.forward(), 1);
        assert_eq!(c.adjust(10), 11);
        assert_eq!(c.forward(), 12);
        assert_eq!(c.adjust(3), 13);
    }

    #[test]
    fn task_events_are_buffered_only_when_on_and_dropped_when_full() {
        let ev = Events::new("n@h", false, Default::default());
        ev.task("task-started", Map::new);
        assert_eq!(ev.tx.capacity(), BUFFER, "off: nothing buffered");
        ev.set_task_events(true);
        for _ in 0..BUFFER + 3 {
            ev.task("task-started", Map::new);
        }
        assert_eq!(ev.dropped(), 3);
        let e = ev.event("task-started", Map::new());
        assert_eq!(e["hostname"], "n@h");
        assert_eq!(e["type"], "task-started");
        assert!(e["clock"].as_u64().is_some() && e["timestamp"].as_f64().is_some());
    }
}
