//! What every handler shares: the producer, the backend, the settings, the
//! tokens, the metrics and a short-lived view of the live workers.

use crate::auth::Tokens;
use crate::metrics::Metrics;
use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};
use taskstack::Producer;
use taskstack::TaskRequest;
use taskstack::backend::{Backend, BackendError, RedisBackend, Use};
use taskstack::beat::lock::LockHolder;
use taskstack::broker::{Broker, WorkerRecord};
use taskstack::config::{Config, ConfigError};
use taskstack::events::sent::SentEvents;
use taskstack::secret::Secret;

/// How long the view of live workers (the task names and queues they
/// announce) is reused before it is read again. Bounds what enqueueing
/// costs Redis; a worker that just started is known within this long.
pub const CATALOG_TTL: Duration = Duration::from_secs(1);

/// The web service's share of the configuration.
#[derive(Debug, Clone)]
pub struct WebSettings {
    pub listen: SocketAddr,
    /// Queues the deployment is configured with (`queues`); `/health`
    /// requires a live worker on each, and enqueueing to them is allowed
    /// even while no worker runs.
    pub queues: Vec<String>,
    /// Allow-list of task names; empty = the names live workers announce.
    pub tasks: Vec<String>,
    pub expect_beat: bool,
    pub result_expires: Duration,
    /// ETAs and countdowns further ahead are refused (422).
    pub max_task_delay: Duration,
    /// Publish Celery's `task-sent` event for each task enqueued
    /// (`task_send_sent_event`).
    pub send_sent_event: bool,
    pub body_limit: usize,
    /// Accepted API tokens; `Debug` shows them as `***`.
    pub tokens: Vec<Secret>,
    /// Timeouts and the connection cap that keep slow clients from taking
    /// the API down.
    pub limits: crate::serve::Limits,
    /// Threads serving requests (`web_threads`), each with its own runtime
    /// and connections to the stores (see [`crate::threads`]).
    pub threads: usize,
}

impl WebSettings {
    /// The settings of a validated configuration; fails when no API token
    /// is configured or the token file cannot be read.
    pub fn from_config(c: &Config) -> Result<Self, ConfigError> {
        Ok(Self {
            listen: c.web_addr()?,
            queues: c.queues.clone(),
            tasks: c.web_tasks.clone(),
            expect_beat: c.web_expect_beat,
            result_expires: c.result_expires,
            max_task_delay: c.max_task_delay,
            send_sent_event: c.task_send_sent_event,
            body_limit: usize::try_from(c.web_body_limit).unwrap_or(usize::MAX),
            tokens: c.load_api_tokens()?,
            limits: crate::serve::Limits {
                header_timeout: c.web_header_timeout,
                idle_timeout: c.web_idle_timeout,
                max_connections: c.web_max_connections.get(),
            },
            threads: c.web_thread_count()?,
        })
    }
}

/// Live workers and what they announce, as read at one instant.
#[derive(Debug, Default)]
pub struct Snapshot {
    pub workers: Vec<WorkerRecord>,
    pub tasks: BTreeSet<String>,
    pub queues: BTreeSet<String>,
}

impl Snapshot {
    fn of(workers: Vec<WorkerRecord>) -> Self {
        let tasks = workers
            .iter()
            .flat_map(|w| w.tasks.iter().cloned())
            .collect();
        let queues = workers
            .iter()
            .flat_map(|w| w.queues.iter().cloned())
            .collect();
        Self {
            workers,
            tasks,
            queues,
        }
    }

    /// Live workers consuming `queue`.
    pub fn workers_on(&self, queue: &str) -> usize {
        self.workers
            .iter()
            .filter(|w| w.queues.iter().any(|q| q == queue))
            .count()
    }
}

/// A cached [`Snapshot`], read again when older than [`CATALOG_TTL`]; one
/// request refreshes it while the others wait for that read.
#[derive(Debug, Default)]
struct Catalog {
    current: RwLock<Option<(Instant, Arc<Snapshot>)>>,
    refresh: tokio::sync::Mutex<()>,
}

impl Catalog {
    fn fresh(&self) -> Option<Arc<Snapshot>> {
        let g = self.current.read().ok()?;
        g.as_ref()
            .filter(|(at, _)| at.elapsed() < CATALOG_TTL)
            .map(|(_, s)| Arc::clone(s))
    }

    async fn get(&self, backend: &dyn Backend) -> Result<Arc<Snapshot>, BackendError> {
        if let Some(s) = self.fresh() {
            return Ok(s);
        }
        let _only_one = self.refresh.lock().await;
        if let Some(s) = self.fresh() {
            return Ok(s);
        }
        let s = Arc::new(read_snapshot(backend).await?);
        if let Ok(mut g) = self.current.write() {
            *g = Some((Instant::now(), Arc::clone(&s)));
        }
        Ok(s)
    }
}

/// Reads the live workers now.
pub async fn read_snapshot(backend: &dyn Backend) -> Result<Snapshot, BackendError> {
    let workers = backend.inspect(Use::Request).live_workers().await?;
    Ok(Snapshot::of(workers))
}

/// Shared by every handler; cheap to clone.
#[derive(Debug, Clone)]
pub struct AppState(Arc<Inner>);

#[derive(Debug)]
pub struct Inner {
    pub producer: Producer,
    backend: Arc<dyn Backend>,
    pub settings: WebSettings,
    pub tokens: Tokens,
    /// Shared by every thread's copy of the state (see [`AppState::sibling`]).
    pub metrics: Arc<Metrics>,
    catalog: Catalog,
    /// `task-sent` events, when `task_send_sent_event` is on.
    sent_events: Option<SentEvents>,
}

impl std::ops::Deref for AppState {
    type Target = Inner;
    fn deref(&self) -> &Inner {
        &self.0
    }
}

/// `task-sent` events on the broker's wire (Redis or RabbitMQ); `None`
/// on a backend without a broker (the in-memory one of unit tests).
fn sent_events(backend: &dyn Backend) -> Option<SentEvents> {
    if let Some(amqp) = backend.amqp() {
        return Some(SentEvents::on_amqp(&origin(), amqp.clone()));
    }
    backend
        .redis()
        .map(|b| SentEvents::new(&origin(), b.clone()))
}

impl AppState {
    /// The web API on Redis.
    pub fn new(broker: Broker, settings: WebSettings) -> Self {
        Self::on_backend(Arc::new(RedisBackend::new(broker)), settings)
    }

    /// The web API on any backend (e.g. `MemoryBackend` in unit tests).
    pub fn on_backend(backend: Arc<dyn Backend>, settings: WebSettings) -> Self {
        Self::build(backend, settings, Arc::new(Metrics::new()))
    }

    /// The same service on `backend` (another runtime's connections to the
    /// same stores): the settings and tokens as here, the metrics shared,
    /// its own producer and view of the live workers. Each of the web's
    /// threads serves with one (see [`crate::threads`]), so a request's
    /// Redis round trip stays on its thread.
    pub fn sibling(&self, backend: Arc<dyn Backend>) -> Self {
        Self::build(backend, self.settings.clone(), Arc::clone(&self.metrics))
    }

    fn build(backend: Arc<dyn Backend>, settings: WebSettings, metrics: Arc<Metrics>) -> Self {
        let producer = Producer::on_backend(Arc::clone(&backend), origin())
            .record_pending(settings.result_expires)
            .max_task_delay(settings.max_task_delay);
        let sent_events = settings
            .send_sent_event
            .then(|| sent_events(&*backend))
            .flatten();
        Self(Arc::new(Inner {
            producer,
            sent_events,
            backend,
            tokens: Tokens::new(&settings.tokens),
            settings,
            metrics,
            catalog: Catalog::default(),
        }))
    }

    /// Publishes `task-sent` for tasks just sent under `ids`, when
    /// `task_send_sent_event` is on; a lost event is logged, never an error.
    pub async fn tasks_sent(&self, sent: &[(&str, &TaskRequest)]) {
        let Some(ev) = &self.sent_events else {
            return;
        };
        let events = sent.iter().map(|(id, req)| ev.event(id, req)).collect();
        let lost = ev.publish(events).await;
        if lost > 0 {
            tracing::debug!(lost, "task-sent events not published");
        }
    }

    /// Where queues, results and records live.
    pub fn backend(&self) -> &Arc<dyn Backend> {
        &self.backend
    }

    /// The beat instance holding the leader lock, if any.
    pub async fn beat_leader(&self) -> Result<Option<LockHolder>, BackendError> {
        let raw = self.backend.leader_lock(Use::Request).holder().await?;
        Ok(raw.as_deref().and_then(LockHolder::parse))
    }

    /// The live workers, at most [`CATALOG_TTL`] old.
    pub async fn snapshot(&self) -> Result<Arc<Snapshot>, BackendError> {
        self.catalog.get(self.backend.as_ref()).await
    }
}

/// The `origin` header of messages this process sends, as Celery writes it.
fn origin() -> String {
    format!(
        "taskstack-web-{}@{}",
        std::process::id(),
        taskstack::worker::hostname()
    )
}
