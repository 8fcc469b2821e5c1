//! The beat's loop state: standby or leader, lock renewal, heartbeats and
//! publishing due slots.

use super::health::{InstanceRecord, Role};
use super::lock::LockHolder;
use super::metrics::Metrics;
use super::plan::{Decision, Planner};
use super::publish::Outcome;
use super::schedule::Clock;
use super::{Beat, BeatError, BeatSettings, HEARTBEAT_EVERY, RETRY_SOON, publish, schedule};
use crate::backend::{Acquired, BackendError, LeaderLock, SlotLedger, SlotPublish, Use};
use std::sync::Arc;
use std::time::Duration;
use tokio::time::Instant;

/// The leader's current term.
#[derive(Debug)]
struct Term {
    /// The exact lock value we set.
    value: String,
    holder: LockHolder,
    /// Our lease ends no later than this (measured from when the last
    /// successful renewal was sent).
    lease_until: Instant,
    next_renew: Instant,
    /// The last renewal failed: publish nothing until one succeeds.
    renew_failing: bool,
}

#[derive(Debug)]
enum State {
    Standby,
    Leader(Term),
}

/// The loop's state.
pub(super) struct Engine {
    /// The namespace the state file records.
    namespace: String,
    pub(super) settings: BeatSettings,
    pub(super) id: String,
    host: String,
    started_at: String,
    pub(super) metrics: Arc<Metrics>,
    clock: Arc<dyn Clock>,
    lock: Box<dyn LeaderLock>,
    ledger: Box<dyn SlotLedger>,
    pub(super) planner: Planner,
    state: State,
    next_try: Instant,
    next_heartbeat: Instant,
    retry_at: Option<Instant>,
    /// The leader as last seen (id), for the heartbeat record and logs.
    leader_seen: Option<String>,
    redis_ok: bool,
    ready: bool,
    /// Where `/metrics` is served, announced in the heartbeat record.
    metrics_addr: Option<String>,
    /// The state file this instance wrote, removed at shutdown.
    state_written: Option<std::path::PathBuf>,
}

fn jitter(d: Duration) -> Duration {
    d.mul_f64(0.75 + rand::random::<f64>() / 2.0)
}

impl Engine {
    pub(super) fn new(beat: Beat, metrics_addr: Option<std::net::SocketAddr>) -> Self {
        let now = Instant::now();
        Self {
            lock: beat.backend.leader_lock(Use::Loop),
            ledger: beat.backend.slot_ledger(Use::Loop),
            namespace: beat.backend.namespace().to_owned(),
            planner: Planner::new(&beat.settings.entries, beat.settings.missed_grace),
            started_at: crate::proto::envelope::format_time(beat.clock.now()),
            settings: beat.settings,
            id: beat.id,
            host: beat.host,
            metrics: beat.metrics,
            clock: beat.clock,
            state: State::Standby,
            next_try: now,
            next_heartbeat: now,
            retry_at: None,
            leader_seen: None,
            redis_ok: true,
            ready: false,
            metrics_addr: metrics_addr.map(|a| a.to_string()),
            state_written: None,
        }
    }

    /// One pass: lock upkeep, heartbeat, due slots. Returns when to wake.
    pub(super) async fn step(&mut self) -> Result<Instant, BeatError> {
        self.upkeep_lock().await;
        if Instant::now() >= self.next_heartbeat {
            self.heartbeat().await?;
        }
        if self.may_publish() {
            self.publish_due().await;
        }
        Ok(self.next_wake())
    }

    /// Logs the first failure of an outage (repeats at DEBUG; recovery at
    /// INFO); a refused password is an ERROR that says what to fix.
    fn redis_failed(&mut self, what: &'static str, e: &BackendError) {
        if self.redis_ok && e.is_auth_failure() {
            tracing::error!(
                error = %e,
                "{what} failed: Redis refused the password; check broker_password / \
                 broker_password_file; retrying"
            );
        } else if self.redis_ok {
            tracing::warn!(error = %e, "{what} failed; retrying");
        } else {
            tracing::debug!(error = %e, "{what} failed again");
        }
        self.redis_ok = false;
    }

    fn redis_answered(&mut self) {
        if !self.redis_ok {
            tracing::info!("Redis answers again");
            self.redis_ok = true;
        }
    }

    async fn upkeep_lock(&mut self) {
        let now = Instant::now();
        match &self.state {
            State::Standby if now >= self.next_try => self.try_lead(now).await,
            State::Leader(t) if now >= t.next_renew || now >= t.lease_until => self.renew().await,
            _ => {}
        }
    }

    async fn try_lead(&mut self, now: Instant) {
        self.next_try = now + jitter(self.settings.standby_interval);
        let claim = LockHolder::new(&self.id, &self.host);
        let value = claim.value();
        let ttl = self.settings.lock_ttl;
        match self.lock.try_acquire(&value, ttl).await {
            Ok(Acquired::Yes) => {
                self.redis_answered();
                tracing::info!(instance = %self.id, since = %claim.since, "became leader");
                self.state = State::Leader(Term {
                    value,
                    holder: claim,
                    lease_until: now + ttl,
                    next_renew: now + self.settings.renew_every(),
                    renew_failing: false,
                });
                self.leader_seen = Some(self.id.clone());
                self.metrics.set_leader(true);
                self.planner.suspend();
            }
            Ok(Acquired::HeldBy(current)) => {
                self.redis_answered();
                let holder = current.as_deref().and_then(LockHolder::parse);
                let id = holder.as_ref().map(|h| h.id.clone());
                if id != self.leader_seen {
                    match &holder {
                        Some(h) => tracing::info!(
                            leader = %h.id, host = %h.host, pid = h.pid, since = %h.since,
                            "standing by; another instance leads"
                        ),
                        None => tracing::info!("standing by; the lock is held by something else"),
                    }
                }
                self.leader_seen = id;
            }
            Err(e) => self.redis_failed("taking the leader lock", &e),
        }
    }

    async fn renew(&mut self) {
        let State::Leader(term) = &self.state else {
            return;
        };
        let sent = Instant::now();
        let value = term.value.clone();
        let ttl = self.settings.lock_ttl;
        let r = self.lock.renew(&value, ttl).await;
        let renew_every = self.settings.renew_every();
        match r {
            Ok(true) => {
                self.redis_answered();
                self.metrics.renewed();
                if let State::Leader(term) = &mut self.state {
                    if term.renew_failing {
                        tracing::info!("leader lock renewed again; publishing resumes");
                    }
                    term.renew_failing = false;
                    term.lease_until = sent + ttl;
                    term.next_renew = sent + renew_every;
                }
            }
            Ok(false) => {
                self.metrics.renewal_failed();
                self.lose("the lock expired or another instance took it");
            }
            Err(e) => {
                self.metrics.renewal_failed();
                self.redis_ok = false;
                let now = Instant::now();
                if let State::Leader(term) = &mut self.state {
                    tracing::warn!(
                        error = %e,
                        lease_left = ?term.lease_until.saturating_duration_since(now),
                        "cannot renew the leader lock; publishing nothing until it is renewed"
                    );
                    term.renew_failing = true;
                    term.next_renew = now + RETRY_SOON;
                    if now >= term.lease_until {
                        self.lose("the lease ran out without a renewal");
                    }
                }
            }
        }
    }

    /// Steps down without giving the lock up (it is not ours any more, or
    /// cannot be known to be).
    fn lose(&mut self, reason: &str) {
        if let State::Leader(term) = &self.state {
            tracing::warn!(
                instance = %self.id,
                since = %term.holder.since,
                "lost leadership: {reason}; publishing nothing"
            );
        }
        self.state = State::Standby;
        self.metrics.set_leader(false);
        self.metrics.lost_leadership();
        self.planner.suspend();
        self.retry_at = None;
        self.leader_seen = None;
        self.next_try = Instant::now();
    }

    async fn heartbeat(&mut self) -> Result<(), BeatError> {
        self.next_heartbeat = Instant::now() + HEARTBEAT_EVERY;
        let role = match self.state {
            State::Leader(_) => Role::Leader,
            State::Standby => Role::Standby,
        };
        let record = InstanceRecord {
            id: self.id.clone(),
            host: self.host.clone(),
            pid: std::process::id(),
            role,
            leader: self.leader_seen.clone(),
            started_at: self.started_at.clone(),
            last_seen: crate::proto::envelope::format_time(self.clock.now()),
            version: env!("CARGO_PKG_VERSION").to_owned(),
            metrics_addr: self.metrics_addr.clone(),
        };
        let ttl = self.settings.instance_ttl();
        let json = serde_json::to_string(&record).unwrap_or_default();
        match self.lock.announce(&self.id, &json, ttl).await {
            Ok(()) => {
                self.redis_answered();
                if !self.ready {
                    if let Some(at) = &self.settings.state_file {
                        self.state_written = Some(crate::service::state::claim(
                            at,
                            "beat",
                            "beat_state_file",
                            &self.id,
                            &self.namespace,
                        )?);
                    }
                    self.ready = true;
                    tracing::info!(instance = %self.id, "beat ready");
                }
            }
            Err(e) => self.redis_failed("writing the beat heartbeat", &e),
        }
        Ok(())
    }

    /// Leader, last renewal succeeded, and more than the margin of lease left.
    fn may_publish(&self) -> bool {
        match &self.state {
            State::Leader(t) => {
                !t.renew_failing
                    && t.lease_until.saturating_duration_since(Instant::now())
                        > self.settings.publish_margin()
            }
            State::Standby => false,
        }
    }

    async fn publish_due(&mut self) {
        self.retry_at = None;
        if !self.planner.is_resumed() {
            let names: Vec<&str> = self
                .planner
                .entries()
                .iter()
                .map(|e| e.name.as_str())
                .collect();
            match self.ledger.last_slots(&names).await {
                Ok(last) => {
                    self.planner.resume(&last, self.clock.now());
                    if let Some(next) = self.planner.next_due() {
                        tracing::info!(next = %schedule::format_slot(next), "leading: schedule resumed from the last published slots");
                    }
                }
                Err(e) => {
                    self.redis_failed("reading the last published slots", &e);
                    self.retry_at = Some(Instant::now() + RETRY_SOON);
                    return;
                }
            }
        }
        let margin = self.settings.publish_margin();
        for decision in self.planner.decide(self.clock.now()) {
            match decision {
                Decision::Skip { entry, skipped } => {
                    let name = &self.planner.entries()[entry].name;
                    tracing::warn!(
                        entry = %name,
                        count = skipped.count,
                        at_least = skipped.at_least,
                        latest = ?skipped.latest.map(schedule::format_slot),
                        grace = ?self.settings.missed_grace,
                        "skipping missed slots older than the grace"
                    );
                    self.metrics.skipped(entry, skipped.count);
                    if let Some(latest) = skipped.latest {
                        self.planner.settled(entry, latest);
                    }
                }
                Decision::Publish { entry, slot } => {
                    if !self.may_publish() {
                        return;
                    }
                    let State::Leader(term) = &self.state else {
                        return;
                    };
                    let value = term.value.clone();
                    let e = &self.planner.entries()[entry];
                    let payload = publish::message(e, slot, &self.id);
                    let r = self
                        .ledger
                        .publish(SlotPublish {
                            lock_value: &value,
                            margin,
                            entry: &e.name,
                            queue: &e.queue,
                            slot_ms: slot.timestamp_millis(),
                            payload: &payload,
                        })
                        .await;
                    let name = self.planner.entries()[entry].name.clone();
                    let shown = schedule::format_slot(slot);
                    match r {
                        Ok(Outcome::Published) => {
                            self.redis_answered();
                            self.metrics.published(entry);
                            tracing::debug!(entry = %name, slot = %shown, "published");
                            self.planner.settled(entry, slot);
                        }
                        Ok(Outcome::AlreadyPublished { last_ms }) => {
                            self.redis_answered();
                            self.metrics.already_published(entry);
                            tracing::info!(
                                entry = %name,
                                slot = %shown,
                                "slot already published; not publishing it again"
                            );
                            let last = chrono::DateTime::from_timestamp_millis(last_ms)
                                .map_or(slot, |l| l.max(slot));
                            self.planner.settled(entry, last);
                        }
                        Ok(Outcome::NotLeader) => {
                            self.redis_answered();
                            self.lose("the publish script found the lock is not ours");
                            return;
                        }
                        Ok(Outcome::LeaseTooShort { pttl_ms }) => {
                            self.redis_answered();
                            tracing::warn!(
                                pttl_ms,
                                "lease nearly over; renewing before publishing"
                            );
                            if let State::Leader(term) = &mut self.state {
                                term.next_renew = Instant::now();
                            }
                            self.retry_at = Some(Instant::now());
                            return;
                        }
                        Err(e) => {
                            self.redis_failed("publishing a slot", &e);
                            self.retry_at = Some(Instant::now() + RETRY_SOON);
                            return;
                        }
                    }
                }
            }
        }
    }

    fn next_wake(&self) -> Instant {
        let now = Instant::now();
        let mut wake = self.next_heartbeat;
        match &self.state {
            State::Standby => wake = wake.min(self.next_try),
            State::Leader(t) => {
                wake = wake.min(t.next_renew).min(t.lease_until);
                // While publishing is held (a failing renewal, a short
                // lease) a due slot waits for the renewal; after a failed
                // publish it waits for the retry: never a busy loop.
                if self.may_publish() {
                    let publish_at = self.retry_at.or_else(|| {
                        let slot = self.planner.next_due()?;
                        Some(now + (slot - self.clock.now()).to_std().unwrap_or(Duration::ZERO))
                    });
                    if let Some(at) = publish_at {
                        wake = wake.min(at);
                    }
                }
            }
        }
        wake.max(now)
    }

    /// At shutdown: give the lock up if ours, delete the heartbeat record and
    /// the state file.
    pub(super) async fn stop(&mut self) {
        if let State::Leader(term) = &self.state {
            let value = term.value.clone();
            match self.lock.release(&value).await {
                Ok(true) => tracing::info!("released the leader lock"),
                Ok(false) => tracing::warn!("the leader lock was not ours any more at shutdown"),
                Err(e) => tracing::warn!(
                    error = %e,
                    ttl = ?self.settings.lock_ttl,
                    "cannot release the leader lock; a standby takes over when it expires"
                ),
            }
            self.state = State::Standby;
            self.metrics.set_leader(false);
        }
        if let Err(e) = self.lock.forget(&self.id).await {
            tracing::debug!(error = %e, "cannot delete the heartbeat record; it expires");
        }
        if let Some(path) = self.state_written.take() {
            let _ = std::fs::remove_file(path);
        }
    }
}
