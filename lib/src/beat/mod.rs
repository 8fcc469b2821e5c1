//! The periodic scheduler behind `taskstack-beat`: exactly one active
//! leader among any number of instances, and every scheduled slot published
//! at most once — exactly once while a leader is up.
//!
//! - [`schedule`]: entries, cron and interval maths, DST rules.
//! - [`plan`]: which slot to publish when, catch-up after an outage.
//! - [`lock`]: the leader lock (`SET NX PX` + compare-value scripts).
//! - [`publish`]: the fenced, exactly-once publish script and the message.
//! - [`metrics`]: metric names, counters and the `/metrics` endpoint.
//! - [`health`]: state file, heartbeat records, `healthcheck`.
//!
//! One loop per instance. A standby tries to take the lock about every
//! second. The leader renews it every third of its TTL and publishes due
//! slots only while its lease has more than a margin (a fifth of the TTL)
//! left and its last renewal succeeded; the publish script checks the same
//! in Redis (fencing), so a leader that was paused past its lease publishes
//! nothing when it wakes. At shutdown the leader deletes the lock (only if
//! still its own) so a standby takes over within about a second.

mod engine;
use engine::Engine;
pub mod health;
pub mod lock;
pub mod metrics;
pub mod plan;
pub mod publish;
pub mod schedule;

use crate::backend::{Backend, RedisBackend};
use crate::broker::Broker;
use crate::config::{Config, ConfigError};
use metrics::Metrics;
use schedule::{BackendClock, Clock, Entry};
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

/// How often each instance refreshes its heartbeat record.
const HEARTBEAT_EVERY: Duration = Duration::from_secs(1);
/// How soon a failed Redis step of the leader (renewal, publish) is retried.
const RETRY_SOON: Duration = Duration::from_millis(250);

/// Errors that stop a beat.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum BeatError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    StateFile(#[from] crate::service::state::StateError),
    #[error("the metrics endpoint failed: {source}")]
    Metrics {
        #[source]
        source: std::io::Error,
    },
}

/// The beat's share of the configuration.
#[derive(Debug, Clone)]
pub struct BeatSettings {
    /// Compiled entries (disabled ones are kept but never planned).
    pub entries: Vec<Entry>,
    /// The leader lock's time to live.
    pub lock_ttl: Duration,
    /// How old a missed slot may be and still be published.
    pub missed_grace: Duration,
    /// Where to record this instance for `healthcheck`; `None` for none.
    pub state_file: Option<crate::service::state::StatePath>,
    /// How often a standby tries to take the lock (jittered by ±25 %).
    pub standby_interval: Duration,
}

impl BeatSettings {
    /// The beat settings of a validated configuration.
    pub fn from_config(c: &Config) -> Result<Self, ConfigError> {
        let entries = c
            .schedule
            .iter()
            .enumerate()
            .map(|(i, e)| {
                Entry::compile(e).map_err(|err| ConfigError::Schedule {
                    entry: e.label(i),
                    field: err.field,
                    value: err.value,
                    reason: err.reason,
                })
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Self {
            entries,
            lock_ttl: c.beat_lock_ttl,
            missed_grace: c.beat_missed_grace,
            state_file: Some(crate::service::state::StatePath::new(
                "beat",
                c.beat_state_file.as_deref(),
            )),
            standby_interval: Duration::from_secs(1),
        })
    }

    /// How often the leader renews the lock: a third of its TTL.
    pub fn renew_every(&self) -> Duration {
        self.lock_ttl / 3
    }

    /// How much lease the leader must have left to publish: a fifth of the
    /// TTL. A leader renews with two thirds left, so only failing renewals
    /// bring it this low.
    pub fn publish_margin(&self) -> Duration {
        self.lock_ttl / 5
    }

    fn instance_ttl(&self) -> Duration {
        self.lock_ttl.max(HEARTBEAT_EVERY * 3)
    }
}

/// What a finished run reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BeatSummary {
    /// Slots this instance published.
    pub published: u64,
    /// Missed slots this instance gave up.
    pub skipped: u64,
}

/// One beat instance.
#[derive(Debug)]
pub struct Beat {
    backend: Arc<dyn Backend>,
    settings: BeatSettings,
    id: String,
    host: String,
    metrics: Arc<Metrics>,
    clock: Arc<dyn Clock>,
}

impl Beat {
    /// An instance with a fresh identity (`<host>.<pid>.<tag>`).
    pub fn new(broker: Broker, settings: BeatSettings) -> Self {
        Self::on_backend(Arc::new(RedisBackend::new(broker)), settings)
    }

    /// An instance on any backend (e.g. [`crate::backend::MemoryBackend`]
    /// in tests), with a fresh identity.
    pub fn on_backend(backend: Arc<dyn Backend>, settings: BeatSettings) -> Self {
        let host = crate::worker::hostname();
        let tag = uuid::Uuid::new_v4().simple().to_string();
        let id = format!("{host}.{}.{}", std::process::id(), &tag[..8]);
        let names = settings
            .entries
            .iter()
            .filter(|e| e.enabled)
            .map(|e| e.name.clone())
            .collect();
        let clock = Arc::new(BackendClock(backend.clock()));
        Self {
            backend,
            settings,
            id,
            host,
            metrics: Arc::new(Metrics::new(names)),
            clock,
        }
    }

    /// Uses `clock` for slot times instead of the system clock.
    pub fn with_clock(mut self, clock: Arc<dyn Clock>) -> Self {
        self.clock = clock;
        self
    }

    /// This instance's identity (also the `origin` of what it publishes).
    pub fn id(&self) -> &str {
        &self.id
    }

    /// Live counters (what `/metrics` serves).
    pub fn metrics(&self) -> Arc<Metrics> {
        Arc::clone(&self.metrics)
    }

    /// Runs until `shutdown` completes: stands by or leads, publishes due
    /// slots while leading, serves metrics on `metrics_listener` if given.
    /// Then releases the lock if it holds it and returns. Redis being
    /// unreachable is not an error: the instance stands by and keeps trying.
    pub async fn run(
        self,
        metrics_listener: Option<tokio::net::TcpListener>,
        shutdown: impl Future<Output = ()>,
    ) -> Result<BeatSummary, BeatError> {
        let stop = CancellationToken::new();
        let mut services = JoinSet::new();
        let metrics_addr = metrics_listener.as_ref().and_then(|l| l.local_addr().ok());
        if let Some(listener) = metrics_listener {
            if let Ok(addr) = listener.local_addr() {
                tracing::info!(%addr, "serving metrics at /metrics");
            }
            services.spawn(metrics::serve(
                listener,
                Arc::clone(&self.metrics),
                stop.clone(),
            ));
        }
        let mut engine = Engine::new(self, metrics_addr);
        tracing::info!(
            instance = %engine.id,
            entries = ?engine.planner.entries().iter().map(|e| e.name.as_str()).collect::<Vec<_>>(),
            lock_ttl = ?engine.settings.lock_ttl,
            missed_grace = ?engine.settings.missed_grace,
            "beat starting as standby"
        );
        if engine.planner.entries().is_empty() {
            tracing::warn!(
                "no enabled [[schedule]] entry: this beat will lead or stand by but publish nothing"
            );
        }
        let mut shutdown = std::pin::pin!(shutdown);
        let outcome = loop {
            let wake = tokio::select! {
                biased;
                () = &mut shutdown => break Ok(()),
                r = services.join_next(), if !services.is_empty() => {
                    // The endpoint only ends early on an error.
                    match r {
                        Some(Ok(Err(source))) => break Err(BeatError::Metrics { source }),
                        _ => continue,
                    }
                }
                r = engine.step() => match r {
                    Ok(wake) => wake,
                    Err(e) => break Err(e),
                },
            };
            tokio::select! {
                biased;
                () = &mut shutdown => break Ok(()),
                () = tokio::time::sleep_until(wake) => {}
            }
        };
        engine.stop().await;
        stop.cancel();
        while services.join_next().await.is_some() {}
        outcome?;
        let summary = BeatSummary {
            published: engine.metrics.published_total(),
            skipped: engine.metrics.skipped_total(),
        };
        tracing::info!(
            published = summary.published,
            skipped = summary.skipped,
            "beat stopped"
        );
        Ok(summary)
    }
}

#[cfg(test)]
mod engine_tests;
#[cfg(test)]
mod tests;
