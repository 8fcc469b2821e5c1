//! The limits a running worker applies per task: rate limits (a token
//! bucket per task, per worker) and time limits, seeded from the registry
//! and changed by remote control's `rate_limit` and `time_limit`.
//!
//! A rate-limited task waits for its token before it takes a concurrency
//! slot, so it keeps its message held (and leased) without holding up
//! tasks that can run. Changes are in memory: a restarted worker starts
//! again from its configuration, as a Celery worker does.

use super::registry::{Registry, TaskLimits};
use crate::config::RateLimit;
use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;
use tokio::sync::Notify;
use tokio::time::Instant;

/// A token bucket of capacity one, kept as the time the next token is
/// there (Celery's `TokenBucket(rate, capacity=1)`): an idle task starts at
/// once, then one start every `interval`.
#[derive(Debug, Clone)]
pub(crate) struct Bucket {
    interval: Duration,
    next: Option<Instant>,
}

impl Bucket {
    pub fn new(rate: &RateLimit) -> Self {
        Self {
            interval: rate.interval(),
            next: None,
        }
    }

    /// Takes the next token: the time it is there (`now` or later). Each
    /// call reserves one start, so concurrent waiters get distinct times.
    pub fn reserve(&mut self, now: Instant) -> Instant {
        let at = self.next.map_or(now, |n| n.max(now));
        self.next = Some(at + self.interval);
        at
    }
}

#[derive(Debug)]
struct Entry {
    limits: TaskLimits,
    bucket: Option<Bucket>,
}

/// Why a limit could not be changed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct UnknownTask;

/// Every registered task's limits (see the module docs).
#[derive(Debug)]
pub(crate) struct Limits {
    tasks: Mutex<HashMap<String, Entry>>,
    /// Woken when a rate changes, so waiters take a token of the new rate.
    changed: Notify,
}

impl Limits {
    pub fn new(registry: &Registry) -> Self {
        let tasks = registry
            .names()
            .into_iter()
            .map(|n| {
                let limits = registry.limits(&n).cloned().unwrap_or_default();
                let bucket = limits.rate_limit.as_ref().map(Bucket::new);
                (n, Entry { limits, bucket })
            })
            .collect();
        Self {
            tasks: Mutex::new(tasks),
            changed: Notify::new(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Entry>> {
        self.tasks
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The task's (soft, hard) time limits.
    pub fn time_limits(&self, task: &str) -> (Option<Duration>, Option<Duration>) {
        self.lock().get(task).map_or((None, None), |e| {
            (e.limits.soft_time_limit, e.limits.time_limit)
        })
    }

    /// Sets (or with `None` removes) the task's rate limit; its bucket starts
    /// afresh and tasks waiting for a token take one of the new rate.
    pub fn set_rate(&self, task: &str, rate: Option<RateLimit>) -> Result<(), UnknownTask> {
        {
            let mut tasks = self.lock();
            let e = tasks.get_mut(task).ok_or(UnknownTask)?;
            e.bucket = rate.as_ref().map(Bucket::new);
            e.limits.rate_limit = rate;
        }
        self.changed.notify_waiters();
        Ok(())
    }

    /// Sets the task's time limits (`None`: no limit of that kind).
    pub fn set_time_limits(
        &self,
        task: &str,
        soft: Option<Duration>,
        hard: Option<Duration>,
    ) -> Result<(), UnknownTask> {
        let mut tasks = self.lock();
        let e = tasks.get_mut(task).ok_or(UnknownTask)?;
        e.limits.soft_time_limit = soft;
        e.limits.time_limit = hard;
        Ok(())
    }

    /// The task's rate limit, as configured or last set.
    pub fn rate(&self, task: &str) -> Option<RateLimit> {
        self.lock()
            .get(task)
            .and_then(|e| e.limits.rate_limit.clone())
    }

    /// Waits until the task may start under its rate limit (at once
    /// without one). Cancel-safe: dropping the wait gives nothing back but
    /// the reserved start, which only spaces later starts a little more.
    pub async fn admit(&self, task: &str) {
        loop {
            let changed = self.changed.notified();
            let mut changed = std::pin::pin!(changed);
            // Registered before the token is taken, so a change made after
            // it is never missed.
            changed.as_mut().enable();
            let now = Instant::now();
            let at = {
                let mut tasks = self.lock();
                match tasks.get_mut(task).and_then(|e| e.bucket.as_mut()) {
                    Some(b) => b.reserve(now),
                    None => return,
                }
            };
            if at <= now {
                return;
            }
            tokio::select! {
                () = tokio::time::sleep_until(at) => return,
                () = changed => {}
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rate(s: &str) -> RateLimit {
        RateLimit::parse(s).expect("valid").expect("a limit")
    }

    #[test]
    fn the_bucket_spaces_starts_by_the_interval_and_refills_when_idle() {
        let t0 = Instant::now();
        let mut b = Bucket::new(&rate("2/s"));
        let ms = |n: u64| Duration::from_millis(n);
        // A burst: the first at once, then one every 500 ms.
        assert_eq!(b.reserve(t0), t0);
        assert_eq!(b.reserve(t0), t0 + ms(500));
        assert_eq!(b.reserve(t0 + ms(10)), t0 + ms(1000));
        // Idle past the last reservation: at once again, with no credit
        // saved up (capacity one).
        assert_eq!(b.reserve(t0 + ms(5000)), t0 + ms(5000));
        assert_eq!(b.reserve(t0 + ms(5000)), t0 + ms(5500));
        let mut slow = Bucket::new(&rate("6/m"));
        assert_eq!(slow.reserve(t0), t0);
        assert_eq!(slow.reserve(t0), t0 + Duration::from_secs(10));
    }

    fn registry() -> Registry {
        let mut r = Registry::new();
        r.register("t.a", |_| async { Ok(serde_json::Value::Null) });
        r.register("t.b", |_| async { Ok(serde_json::Value::Null) });
        assert!(r.set_limits(
            "t.a",
            TaskLimits {
                rate_limit: Some(rate("1/h")),
                soft_time_limit: Some(Duration::from_secs(5)),
                time_limit: None,
            },
        ));
        r
    }

    #[test]
    fn limits_start_from_the_registry_and_change_by_name() {
        let l = Limits::new(&registry());
        assert_eq!(l.time_limits("t.a"), (Some(Duration::from_secs(5)), None));
        assert_eq!(l.time_limits("t.b"), (None, None));
        assert_eq!(l.rate("t.a").map(|r| r.to_string()), Some("1/h".into()));
        assert_eq!(
            l.set_time_limits("t.b", None, Some(Duration::from_secs(9))),
            Ok(())
        );
        assert_eq!(l.time_limits("t.b"), (None, Some(Duration::from_secs(9))));
        assert_eq!(l.set_rate("t.nope", None), Err(UnknownTask));
        assert_eq!(l.set_time_limits("t.nope", None, None), Err(UnknownTask));
    }

    /// Paused time on its own thread, bounded by a real-time deadline so
    /// a wrong wait fails instead of hanging the run.
    #[test]
    fn a_waiter_takes_a_token_of_the_new_rate_when_it_changes() {
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .start_paused(true)
                .build()
                .expect("runtime");
            let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                rt.block_on(waiter_scenario());
            }));
            let _ = tx.send(outcome);
        });
        match rx.recv_timeout(std::time::Duration::from_secs(30)) {
            Ok(Ok(())) => {}
            Ok(Err(panic)) => std::panic::resume_unwind(panic),
            Err(_) => panic!("simulated time stood still for 30 s of real time"),
        }
    }

    async fn waiter_scenario() {
        let l = std::sync::Arc::new(Limits::new(&registry()));
        let t0 = Instant::now();
        l.admit("t.a").await; // the first token is there
        l.admit("t.b").await; // no limit
        assert_eq!(Instant::now(), t0);
        let waiter = {
            let l = std::sync::Arc::clone(&l);
            tokio::spawn(async move { l.admit("t.a").await })
        };
        tokio::time::sleep(Duration::from_secs(1)).await;
        assert!(!waiter.is_finished(), "1/h: the next token is an hour away");
        l.set_rate("t.a", None).expect("known");
        tokio::time::timeout(Duration::from_secs(1), waiter)
            .await
            .expect("released by the change")
            .expect("joined");
        assert!(Instant::now() < t0 + Duration::from_secs(2));
        // A new rate: the waiter takes its token at once (a fresh bucket).
        l.set_rate("t.a", Some(rate("1/s"))).expect("known");
        l.admit("t.a").await;
        l.admit("t.a").await;
        assert!(Instant::now() >= t0 + Duration::from_secs(2));
    }
}
