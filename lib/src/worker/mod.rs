//! The execution engine: takes messages, runs registered handlers within
//! concurrency and time limits, records results, retries with backoff,
//! dead-letters what cannot run, and drains gracefully.
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
mod handle;
pub mod health;
mod keeper;
pub mod metrics;
mod registry;
mod settler;
mod shared;
mod starter;

pub use registry::{Registry, TaskContext, TaskError, TaskFuture, TaskOptions, TaskOutcome};
pub use shared::Stats;
pub(crate) use shared::panic_text;

use crate::broker::{
    Broker, BrokerError, Delivery, Take, fetch, heartbeat, release, wait_for_message,
};
use crate::config::Config;
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

/// Errors that stop a worker.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum WorkerError {
    #[error("no task is registered")]
    NoTasks,
    #[error(transparent)]
    Broker(#[from] BrokerError),
    #[error(transparent)]
    StateFile(#[from] crate::service::state::StateError),
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
    /// Largest message decoded; larger ones are dead-lettered unread.
    pub max_message_size: usize,
    /// Furthest an ETA may lie ahead; later ones are dead-lettered.
    pub max_task_delay: Duration,
    /// Where to record this worker's id for `healthcheck`; `None` for none.
    pub state_file: Option<StatePath>,
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
            max_message_size: usize::try_from(c.max_message_size).unwrap_or(usize::MAX),
            max_task_delay: c.max_task_delay,
            state_file: Some(StatePath::new("worker", c.worker_state_file.as_deref())),
        }
    }

    /// The lists served, in order: priority bucket first, then queue.
    pub fn queue_keys(&self) -> Vec<String> {
        PRIORITY_BUCKETS
            .iter()
            .flat_map(|b| self.queues.iter().map(move |q| queue_key(q, *b)))
            .collect()
    }
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
    broker: Broker,
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
    /// A worker with a fresh identity (unique per process start).
    pub fn new(broker: Broker, registry: Registry, settings: WorkerSettings) -> Self {
        let tag = uuid::Uuid::new_v4().simple().to_string();
        let id = format!("{}.{}.{}", hostname(), std::process::id(), &tag[..8]);
        let metrics = Arc::new(metrics::Metrics::new(
            &registry.names(),
            settings.concurrency,
        ));
        Self {
            broker,
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
        let (settle_tx, settle_rx) = mpsc::channel(self.settings.prefetch.max(64) * 2);
        let (start_tx, start_rx) = mpsc::channel(self.settings.concurrency.max(64) * 2);
        let sh = Arc::new(Shared {
            held: Arc::new(Semaphore::new(self.settings.prefetch)),
            exec: Arc::new(Semaphore::new(self.settings.concurrency)),
            broker: self.broker,
            registry: self.registry,
            settings: self.settings,
            id: self.id,
            stats: self.stats,
            metrics: self.metrics,
            metrics_addr: self
                .metrics_listener
                .as_ref()
                .and_then(|l| l.local_addr().ok()),
            stop: CancellationToken::new(),
            abandon: CancellationToken::new(),
            settle_tx: std::sync::Mutex::new(Some(settle_tx)),
            start_tx: std::sync::Mutex::new(Some(start_tx)),
        });
        let stop = sh.stop.clone();
        let mut shutdown = std::pin::pin!(shutdown);
        let started_at = crate::proto::envelope::format_time(chrono::Utc::now());
        let queue_keys = sh.settings.queue_keys();

        // Register first, so the lease exists before anything is taken.
        let register = async {
            let mut lane = sh.broker.broker_pool().lane();
            let mut retry = sh.retrier("register worker (is Redis reachable?)");
            loop {
                let rec = keeper::record(&sh, &started_at);
                match heartbeat(
                    &mut lane,
                    sh.broker.keys(),
                    &rec,
                    &queue_keys[0],
                    sh.settings.lease,
                )
                .await
                {
                    Ok(_) => return true,
                    Err(e) => {
                        retry.again(&e).await;
                    }
                }
            }
        };
        let registered = tokio::select! {
            () = &mut shutdown => false,
            r = register => r,
        };
        if !registered {
            return Ok(RunSummary {
                processed: 0,
                handed_back: 0,
            });
        }
        let state_file = match &sh.settings.state_file {
            Some(at) => Some(crate::service::state::claim(
                at,
                "worker",
                "worker_state_file",
                &sh.id,
                sh.broker.keys().namespace(),
            )?),
            None => None,
        };
        tracing::info!(
            worker = %sh.id,
            queues = ?sh.settings.queues,
            tasks = ?sh.registry.names(),
            concurrency = sh.settings.concurrency,
            prefetch = sh.settings.prefetch,
            "worker ready"
        );

        let keep = CancellationToken::new();
        let metrics_server = self.metrics_listener.map(|listener| {
            let m = Arc::clone(&sh);
            let render = move || {
                let held =
                    m.settings.prefetch - m.held.available_permits().min(m.settings.prefetch);
                let running =
                    m.settings.concurrency - m.exec.available_permits().min(m.settings.concurrency);
                m.metrics.render(held, running)
            };
            tokio::spawn(crate::service::metrics_http::serve(
                listener,
                crate::service::metrics_http::OPENMETRICS_FORMAT,
                render,
                keep.clone(),
            ))
        });
        let settler = tokio::spawn(settler::run(Arc::clone(&sh), settle_rx));
        let starter = tokio::spawn(starter::run(Arc::clone(&sh), start_rx));
        let keeper = tokio::spawn(keeper::run(
            Arc::clone(&sh),
            started_at.clone(),
            keep.clone(),
        ));

        let mut tasks = JoinSet::new();
        tokio::select! {
            () = &mut shutdown => {}
            () = dispatch(&sh, &queue_keys, &mut tasks) => {}
        }
        stop.cancel();
        tracing::info!(
            in_flight = tasks.len(),
            drain_timeout = ?sh.settings.drain_timeout,
            "stopping: taking no new messages, handing back unstarted ones, draining"
        );
        drain(&mut tasks, sh.settings.drain_timeout).await;
        // No task is left to start: the starter finishes and exits.
        sh.close_starts();

        // Every settlement is queued now. Closing the channel lets the
        // settler finish them and exit; the lease keeps being renewed until
        // it has, so nothing is redelivered while its result is being stored.
        sh.close_settlements();
        let mut settler = std::pin::pin!(settler);
        let mut starter = std::pin::pin!(starter);
        let finished = async {
            let _ = (&mut settler).await;
            let _ = (&mut starter).await;
        };
        if tokio::time::timeout(SETTLE_GRACE, finished).await.is_err() {
            tracing::warn!(
                "results still unsettled after {SETTLE_GRACE:?}; leaving them to redelivery"
            );
            sh.abandon.cancel();
            // A handle already awaited to completion must not be polled again.
            if !settler.is_finished() {
                let _ = settler.await;
            }
            if !starter.is_finished() {
                let _ = starter.await;
            }
        }
        keep.cancel();
        let _ = keeper.await;
        if let Some(server) = metrics_server {
            match server.await {
                Ok(Err(e)) => tracing::warn!(error = %e, "the metrics endpoint failed"),
                Err(e) => tracing::warn!(error = %e, "the metrics endpoint panicked"),
                Ok(Ok(())) => {}
            }
        }

        let mut lane = sh.broker.broker_pool().lane();
        let at_release = match release(&mut lane, sh.broker.keys(), &sh.id).await {
            Ok(n) => n,
            Err(e) => {
                tracing::warn!(error = %e, "cannot release the lease; held messages return when it expires");
                0
            }
        };
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

/// How long a stopping worker keeps trying to store results after the drain.
const SETTLE_GRACE: Duration = Duration::from_secs(5);

/// Waits for running tasks until `timeout`, then aborts the rest (their
/// messages stay held and are handed back by the lease release).
async fn drain(tasks: &mut JoinSet<()>, timeout: Duration) {
    let deadline = tokio::time::Instant::now() + timeout;
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

/// Takes messages while there is room and spawns a task per message.
async fn dispatch(sh: &Arc<Shared>, queue_keys: &[String], tasks: &mut JoinSet<()>) {
    let mut lane = sh.broker.broker_pool().lane();
    let mut last_seq: u64 = 0;
    let mut backoff = Duration::from_millis(50);
    loop {
        while let Some(r) = tasks.try_join_next() {
            if let Err(e) = r {
                tracing::error!(error = %e, "message task failed");
            }
        }
        let Ok(first) = sh.held.acquire().await else {
            return;
        };
        first.forget();
        let extra = sh.held.available_permits();
        let budget = 1 + match sh
            .held
            .try_acquire_many(u32::try_from(extra).unwrap_or(u32::MAX))
        {
            Ok(p) => {
                p.forget();
                extra
            }
            Err(_) => 0,
        };
        let take = Take {
            worker_id: &sh.id,
            queue_keys,
            max: budget,
            last_seq,
            lease: sh.settings.lease,
        };
        // Reserve the whole range before asking: if the reply is lost after
        // the script ran, the next call must not reuse (and overwrite) a
        // sequence number that records a held message.
        last_seq += budget as u64;
        let got = fetch(&mut lane, sh.broker.keys(), take).await;
        let deliveries: Vec<Delivery> = match got {
            Ok(d) => {
                backoff = Duration::from_millis(50);
                d
            }
            Err(e) => {
                sh.held.add_permits(budget);
                tracing::warn!(error = %e, retry_in = ?backoff, "cannot take messages");
                tokio::time::sleep(jitter(backoff)).await;
                backoff = (backoff * 2).min(Duration::from_secs(5));
                continue;
            }
        };
        sh.held.add_permits(budget - deliveries.len());
        if deliveries.is_empty() {
            if let Err(e) = wait_for_message(
                &mut lane,
                sh.broker.keys(),
                &sh.id,
                &queue_keys[0],
                IDLE_WAIT,
            )
            .await
            {
                tracing::warn!(error = %e, retry_in = ?backoff, "cannot wait for messages");
                tokio::time::sleep(jitter(backoff)).await;
                backoff = (backoff * 2).min(Duration::from_secs(5));
            }
            continue;
        }
        for d in deliveries {
            tasks.spawn(handle::handle(Arc::clone(sh), d));
        }
    }
}
