//! The execution engine: takes messages, runs registered handlers within
//! concurrency, rate and time limits, records results, retries with
//! backoff, dead-letters what cannot run, and drains gracefully.
//!
//! A worker with your own tasks is a few lines:
//!
//! ```no_run
//! use taskstack::worker::{Registry, TaskContext, Worker, WorkerSettings};
//! # async fn demo(config: taskstack::config::Config) -> Result<(), Box<dyn std::error::Error>> {
//! let mut registry = Registry::new();
//! registry.register("proj.hello", |ctx: TaskContext| async move {
//!     Ok(serde_json::json!(format!("hello {}", ctx.args.len())))
//! });
//! let broker = taskstack::connect(&config)?;
//! let worker = Worker::new(broker, registry, WorkerSettings::from_config(&config));
//! worker.run(async { let _ = tokio::signal::ctrl_c().await; }).await?;
//! # Ok(()) }
//! ```

pub mod builtin;
pub mod declared;
mod followups;
mod handle;
pub mod health;
mod keeper;
pub(crate) mod limits;
pub mod metrics;
mod phases;
mod poison;
mod prestart;
mod registry;
mod route;
#[cfg(feature = "cli")]
pub mod service_main;
mod settler;
pub(crate) mod shared;
mod starter;
#[cfg(test)]
mod tests;
mod turn;

pub use registry::{
    Registry, TaskContext, TaskError, TaskFuture, TaskLimits, TaskOptions, TaskOutcome,
};
#[cfg(feature = "cli")]
pub use service_main::{WorkerMain, main};
pub use shared::Stats;
pub(crate) use shared::panic_text;

use crate::backend::{Backend, BackendError, RedisBackend};
use crate::broker::{Broker, BrokerError};
use crate::config::{Config, ConfigError};
use crate::proto::keys::{PRIORITY_BUCKETS, queue_key};
use crate::service::state::StatePath;
use shared::{Shared, jitter};
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{Semaphore, mpsc};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

/// How long an idle worker blocks on its first queue's default-priority list
/// before looking at every list again: a message there wakes it at once;
/// messages on other queues or priority buckets wait at most this long.
const IDLE_WAIT: Duration = Duration::from_millis(100);

/// Redis connections a worker's loops keep while it runs: the dispatcher's,
/// the settler's and the starter's lanes (one per batch in flight), the
/// keeper's two (lease, delayed messages), remote control's replies and the
/// event sink's.
const HELD_CONNECTIONS: usize = 1 + settler::IN_FLIGHT + starter::IN_FLIGHT + 2 + 2;

/// The smallest `redis_pool_size` a worker runs with: its loops'
/// connections and one for the steps that take one for a moment (a retry's
/// or a dead letter's result, canvas follow-ups). With fewer, a loop would
/// wait for a connection that never frees and the worker would stall.
pub const MIN_POOL_SIZE: usize = HELD_CONNECTIONS + 1;

/// Refuses a `redis_pool_size` too small for a worker, naming the key.
pub fn check_pool_size(size: usize) -> Result<(), ConfigError> {
    if size >= MIN_POOL_SIZE {
        return Ok(());
    }
    Err(ConfigError::Invalid {
        key: "redis_pool_size",
        value: size.to_string(),
        reason: format!(
            "a worker needs at least {MIN_POOL_SIZE}: its loops keep {HELD_CONNECTIONS} \
             connections and one more is for retries, dead letters and canvas follow-ups"
        ),
    })
}

/// Errors that stop a worker.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum WorkerError {
    #[error("no task is registered")]
    NoTasks,
    #[error(transparent)]
    Broker(#[from] BrokerError),
    #[error(transparent)]
    Backend(#[from] BackendError),
    #[error(transparent)]
    StateFile(#[from] crate::service::state::StateError),
    #[error(transparent)]
    Config(#[from] ConfigError),
}

/// The worker's share of the configuration.
#[derive(Debug, Clone)]
pub struct WorkerSettings {
    pub queues: Vec<String>,
    pub concurrency: usize,
    pub prefetch: usize,
    pub lease: Duration,
    pub drain_timeout: Duration,
    pub result_expires: Duration,
    /// Records carry `args` / `kwargs` (`result_extended`).
    pub result_extended: bool,
    /// Largest message decoded; larger ones are dead-lettered unread.
    pub max_message_size: usize,
    /// Furthest an ETA may lie ahead; later ones are dead-lettered.
    pub max_task_delay: Duration,
    /// Where to record this worker's id for `healthcheck`; `None` for none.
    pub state_file: Option<StatePath>,
    /// The Celery node name (`worker_nodename`); `None`: `taskstack@<host>`
    /// (or `taskstack-<pid>@<host>` when taken).
    pub nodename: Option<String>,
    /// Which remote-control commands are obeyed (`worker_remote_control`).
    pub remote_control: crate::control::RemoteControl,
    /// Send task events from the start (`worker_send_task_events`, `-E`).
    pub task_events: bool,
    /// Store STARTED records (`task_track_started`).
    pub track_started: bool,
}

impl WorkerSettings {
    /// The worker settings of a validated configuration.
    pub fn from_config(c: &Config) -> Self {
        Self {
            queues: c.queues.clone(),
            concurrency: c.concurrency.get(),
            prefetch: c.effective_prefetch(),
            lease: c.lease,
            drain_timeout: c.drain_timeout,
            result_expires: c.result_expires,
            result_extended: c.result_extended,
            max_message_size: usize::try_from(c.max_message_size).unwrap_or(usize::MAX),
            max_task_delay: c.max_task_delay,
            state_file: Some(StatePath::new("worker", c.worker_state_file.as_deref())),
            nodename: c.worker_nodename.clone(),
            remote_control: c.worker_remote_control,
            task_events: c.worker_send_task_events,
            track_started: c.task_track_started,
        }
    }

    /// The lists served, in order: priority bucket first, then queue.
    pub fn queue_keys(&self) -> Vec<String> {
        queue_keys(&self.queues)
    }
}

/// The lists of `queues`, in the order they are served: priority bucket
/// first, then queue.
fn queue_keys(queues: &[String]) -> Vec<String> {
    PRIORITY_BUCKETS
        .iter()
        .flat_map(|b| queues.iter().map(move |q| queue_key(q, *b)))
        .collect()
}

/// What a finished run reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RunSummary {
    /// Messages settled (results stored and acknowledged).
    pub processed: u64,
    /// Messages handed back to their queues at shutdown.
    pub handed_back: u64,
}

/// A worker process's engine.
#[derive(Debug)]
pub struct Worker {
    backend: Arc<dyn Backend>,
    registry: Registry,
    settings: WorkerSettings,
    id: String,
    stats: Arc<Stats>,
    metrics: Arc<metrics::Metrics>,
    metrics_listener: Option<tokio::net::TcpListener>,
}

/// This machine's host name.
pub fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_owned())
        .ok()
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "localhost".into())
}

impl Worker {
    /// A worker on Redis with a fresh identity (unique per process start).
    pub fn new(broker: Broker, registry: Registry, settings: WorkerSettings) -> Self {
        Self::on_backend(Arc::new(RedisBackend::new(broker)), registry, settings)
    }

    /// A worker on any backend (e.g. [`crate::backend::MemoryBackend`] in
    /// tests) with a fresh identity (unique per process start).
    pub fn on_backend(
        backend: Arc<dyn Backend>,
        registry: Registry,
        settings: WorkerSettings,
    ) -> Self {
        let tag = uuid::Uuid::new_v4().simple().to_string();
        let id = format!("{}.{}.{}", hostname(), std::process::id(), &tag[..8]);
        let metrics = Arc::new(metrics::Metrics::new(
            &registry.names(),
            settings.concurrency,
        ));
        Self {
            backend,
            registry,
            settings,
            id,
            stats: Arc::default(),
            metrics,
            metrics_listener: None,
        }
    }

    /// Serves Prometheus metrics (`GET /metrics`) on `listener` while the
    /// worker runs.
    pub fn serve_metrics(mut self, listener: tokio::net::TcpListener) -> Self {
        self.metrics_listener = Some(listener);
        self
    }

    /// The metrics `/metrics` serves.
    pub fn metrics(&self) -> Arc<metrics::Metrics> {
        Arc::clone(&self.metrics)
    }

    /// This worker's identity.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// Live counters.
    pub fn stats(&self) -> Arc<Stats> {
        Arc::clone(&self.stats)
    }

    /// Runs until `shutdown` completes, then drains: stops taking messages,
    /// hands back those not started, lets running tasks finish within the
    /// drain timeout, hands back the rest, and releases its lease.
    pub async fn run(self, shutdown: impl Future<Output = ()>) -> Result<RunSummary, WorkerError> {
        if self.registry.is_empty() {
            return Err(WorkerError::NoTasks);
        }
        if let Some(broker) = self.backend.redis() {
            check_pool_size(broker.broker_pool().max_size())?;
        }
        let metrics_listener = self.metrics_listener;
        let (settle_tx, settle_rx) = mpsc::channel(self.settings.prefetch.max(64) * 2);
        let (start_tx, start_rx) = mpsc::channel(self.settings.concurrency.max(64) * 2);
        let (nodename, claimed) =
            crate::control::claim_nodename(&*self.backend, self.settings.nodename.as_deref()).await;
        let monitor = Arc::new(crate::control::Monitor::new(
            nodename,
            self.settings.task_events,
            self.metrics.events_dropped(),
        ));
        let sh = Arc::new(Shared {
            monitor,
            held: Arc::new(Semaphore::new(self.settings.prefetch)),
            exec: Arc::new(Semaphore::new(self.settings.concurrency)),
            clock: self.backend.clock(),
            backend: self.backend,
            limits: limits::Limits::new(&self.registry),
            queues: tokio::sync::watch::Sender::new(self.settings.queues.clone()),
            landing_source: std::sync::Mutex::new(
                self.settings
                    .queue_keys()
                    .first()
                    .cloned()
                    .unwrap_or_default(),
            ),
            registry: self.registry,
            settings: self.settings,
            id: self.id,
            stats: self.stats,
            metrics: self.metrics,
            metrics_addr: metrics_listener.as_ref().and_then(|l| l.local_addr().ok()),
            stop: CancellationToken::new(),
            abandon: CancellationToken::new(),
            settle_tx: std::sync::Mutex::new(Some(settle_tx)),
            start_tx: std::sync::Mutex::new(Some(start_tx)),
        });
        let mut shutdown = std::pin::pin!(shutdown);
        let started_at = crate::proto::envelope::format_time(sh.now());

        // 1. Register: the lease exists before anything is taken.
        if !phases::register(&sh, &started_at, &mut shutdown).await {
            return Ok(RunSummary {
                processed: 0,
                handed_back: 0,
            });
        }
        let state_file = phases::record_state(&sh)?;
        // 2. Serve: the background loops, then the dispatcher until shutdown.
        let loops = phases::Loops::spawn(
            &sh,
            metrics_listener,
            started_at.clone(),
            settle_rx,
            start_rx,
        );
        let control = crate::control::pidbox::Service::spawn(&sh, claimed);
        let mut tasks = JoinSet::new();
        let deadline = {
            let mut dispatching = std::pin::pin!(dispatch(&sh, &started_at, &mut tasks));
            let asked = tokio::select! {
                () = &mut shutdown => true,
                () = sh.monitor.shutdown.cancelled() => true,
                () = &mut dispatching => false,
            };
            // 3. Drain: no new messages; running tasks get the drain timeout.
            sh.stop.cancel();
            let deadline = tokio::time::Instant::now() + sh.settings.drain_timeout;
            // The dispatcher ends at its next wait. A take that starts its
            // landed message is let finish rather than dropped: it may have
            // marked the message running (see `prestart`), and dropped, the
            // release would hand it back as a task that ran.
            if asked
                && tokio::time::timeout_at(deadline, dispatching)
                    .await
                    .is_err()
            {
                tracing::warn!(
                    "a take was still unanswered at the drain timeout; the release hands back what it took"
                );
            }
            deadline
        };
        tracing::info!(
            in_flight = tasks.len(),
            drain_timeout = ?sh.settings.drain_timeout,
            "stopping: taking no new messages, handing back unstarted ones, draining"
        );
        drain(&mut tasks, deadline).await;
        // 4. Settle what finished, stop the loops, and hand back the rest.
        loops.finish(&sh).await;
        let at_release = phases::release(&sh).await;
        control.stop(&sh).await;
        if let Some(path) = state_file {
            let _ = std::fs::remove_file(path);
        }
        let summary = RunSummary {
            processed: Stats::get(&sh.stats.processed),
            handed_back: Stats::get(&sh.stats.handed_back) + at_release,
        };
        tracing::info!(
            processed = summary.processed,
            handed_back = summary.handed_back,
            "worker stopped"
        );
        Ok(summary)
    }
}

/// Waits for running tasks until `deadline`, then aborts the rest (their
/// messages stay held and are handed back by the lease release).
async fn drain(tasks: &mut JoinSet<()>, deadline: tokio::time::Instant) {
    loop {
        tokio::select! {
            r = tasks.join_next() => match r {
                None => return,
                Some(Err(e)) if e.is_panic() => tracing::error!(error = %e, "message task panicked"),
                Some(_) => {}
            },
            () = tokio::time::sleep_until(deadline) => {
                tracing::warn!(unfinished = tasks.len(), "drain timeout reached; handing unfinished tasks back");
                tasks.abort_all();
                while tasks.join_next().await.is_some() {}
                return;
            }
        }
    }
}

/// Takes messages while there is room and spawns a task per message,
/// from the queues served at the time (remote control may change them),
/// until the worker is told to stop. Each of its waits is given up at the
/// stop, and so is a plain take; a take that starts its landed message is
/// not (see `Worker::run`).
async fn dispatch(sh: &Arc<Shared>, started_at: &str, tasks: &mut JoinSet<()>) {
    let mut consume = sh.backend.consume(&sh.id);
    let mut backoff = Duration::from_millis(50);
    let mut queues = sh.queues.subscribe();
    let mut keys = queue_keys(&queues.borrow_and_update());
    // Whether the last blocking wait ended with a message landing.
    let mut woke = false;
    loop {
        if sh.stop.is_cancelled() {
            return;
        }
        if keys.is_empty() {
            // Every queue was cancelled: wait for an `add_consumer`.
            let Some(Ok(())) = sh.until_stop(queues.changed()).await else {
                return;
            };
            keys = serve(sh, started_at, &mut queues, &keys).await;
            continue;
        }
        while let Some(r) = tasks.try_join_next() {
            if let Err(e) = r {
                tracing::error!(error = %e, "message task failed");
            }
        }
        // Wait for room for one message, then take every free slot: the
        // unused ones return when `slots` drops.
        let Some(Ok(mut slots)) = sh.until_stop(Arc::clone(&sh.held).acquire_owned()).await else {
            return;
        };
        let extra = u32::try_from(sh.held.available_permits()).unwrap_or(u32::MAX);
        if extra > 0
            && let Ok(more) = Arc::clone(&sh.held).try_acquire_many_owned(extra)
        {
            slots.merge(more);
        }
        let budget = slots.num_permits();
        // The message the last wait brought, started in the take when the
        // worker will run it at once.
        let pre = consume.landed().and_then(|b| prestart::plan(sh, &b));
        let (lease, max_size) = (sh.settings.lease, sh.settings.max_message_size);
        let got = match &pre {
            Some(p) => {
                let start = crate::broker::StartLanded {
                    task_id: &p.msg.id,
                    len: p.len,
                };
                consume
                    .take_starting(&keys, budget, lease, max_size, start)
                    .await
            }
            // A plain take may be dropped: the release hands back all
            // the worker holds, known to it or not.
            None => match sh
                .until_stop(consume.take(&keys, budget, lease, max_size))
                .await
            {
                Some(got) => got.map(|d| (d, None)),
                None => return,
            },
        };
        let (deliveries, verdict) = match got {
            Ok(d) => {
                backoff = Duration::from_millis(50);
                // The take emptied the landing list (it is taken first),
                // so the lists served may change now.
                if queues.has_changed().unwrap_or(false) {
                    keys = serve(sh, started_at, &mut queues, &keys).await;
                }
                d
            }
            Err(e) => {
                drop(slots);
                tracing::warn!(error = %e, retry_in = ?backoff, "cannot take messages");
                if sh
                    .until_stop(tokio::time::sleep(jitter(backoff)))
                    .await
                    .is_none()
                {
                    return;
                }
                backoff = (backoff * 2).min(Duration::from_secs(5));
                continue;
            }
        };
        // Woken by a message and then short of the budget: every list was
        // empty a moment ago, so the worker blocks again at once rather
        // than asking a second time (a message on the first list ends the
        // wait at once; one anywhere else waits at most IDLE_WAIT, as it
        // does whenever the worker is blocked).
        let idle_again = std::mem::take(&mut woke) && deliveries.len() < budget;
        let mut held = Vec::with_capacity(deliveries.len());
        let mut surplus = Vec::new();
        for d in deliveries {
            match slots.split(1) {
                Some(slot) => held.push(shared::Held::new(d, slot)),
                // A take never returns more than asked; should a reply ever
                // do so, the extra goes back rather than unaccounted.
                None => surplus.push(d.seq),
            }
        }
        drop(slots);
        if !surplus.is_empty() {
            tracing::error!(
                count = surplus.len(),
                "took more messages than asked; handing them back"
            );
            if let Err(e) = consume.hand_back(&surplus).await {
                tracing::warn!(error = %e, "cannot hand back; the lease returns them");
            }
        }
        // Each message queues for a concurrency slot here, in the order
        // taken, not when its task is first polled (see `turn`).
        let idle = held.is_empty() || idle_again;
        // Started by the take: the first message, with its slot already.
        let mut held = held.into_iter();
        if let Some((verdict, pre)) = verdict.zip(pre)
            && let Some(h) = held.next()
        {
            let run = prestart::run(Arc::clone(sh), h, pre, verdict);
            tasks.spawn(Box::pin(run));
        }
        for h in held {
            let turn = turn::Turn::queue(&sh.exec);
            // Boxed: the runtime moves a task's future by value as it
            // spawns and finishes it, so a small one is cheaper to move.
            tasks.spawn(Box::pin(handle::handle(Arc::clone(sh), h, turn)));
        }
        if idle && !keys.is_empty() {
            let Some(waited) = sh
                .until_stop(consume.wait_for_message(&keys, IDLE_WAIT))
                .await
            else {
                return;
            };
            match waited {
                Ok(landed) => {
                    woke = landed;
                    // Nothing landed: the lists served may change now too.
                    if !landed && queues.has_changed().unwrap_or(false) {
                        keys = serve(sh, started_at, &mut queues, &keys).await;
                    }
                }
                Err(e) => {
                    tracing::warn!(error = %e, retry_in = ?backoff, "cannot wait for messages");
                    if sh
                        .until_stop(tokio::time::sleep(jitter(backoff)))
                        .await
                        .is_none()
                    {
                        return;
                    }
                    backoff = (backoff * 2).min(Duration::from_secs(5));
                }
            }
        }
    }
}

/// The lists of the queues now served (remote control changed them). When
/// the first one changes (the one the blocking wait moves messages from),
/// the lease record names it before any message lands from it.
async fn serve(
    sh: &Shared,
    started_at: &str,
    queues: &mut tokio::sync::watch::Receiver<Vec<String>>,
    old: &[String],
) -> Vec<String> {
    let keys = queue_keys(&queues.borrow_and_update());
    if let Some(first) = keys.first()
        && old.first() != Some(first)
    {
        *sh.landing_source
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = first.clone();
        let rec = keeper::record(sh, started_at);
        let mut leases = sh.backend.leases(crate::backend::Use::Loop);
        if let Err(e) = leases.heartbeat(&rec, first, sh.settings.lease).await {
            tracing::warn!(error = %e, "cannot record the new first queue in the lease; the next heartbeat will");
        }
    }
    keys
}
