//! The task registry: names mapped to async handlers, each with its retry
//! policy, and the context and outcome types handlers use.

use crate::proto::ExceptionInfo;
use serde_json::{Map, Value};
use std::collections::BTreeMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// What a handler returns: a JSON value, or an outcome saying what to do.
pub type TaskOutcome = Result<Value, TaskError>;

/// A boxed handler future.
pub type TaskFuture = Pin<Box<dyn Future<Output = TaskOutcome> + Send>>;

pub(crate) type Handler = Arc<dyn Fn(TaskContext) -> TaskFuture + Send + Sync>;

/// Why a task did not succeed, chosen by the handler: the retry policy
/// depends on this intent, never on an error's text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TaskError {
    /// Try again later (after `countdown`, or the policy's backoff), while
    /// retries remain; then the task fails and is dead-lettered.
    Retry {
        reason: String,
        countdown: Option<Duration>,
    },
    /// Fail now; the result records the exception.
    Fail(ExceptionInfo),
    /// The message itself is unusable (poison): dead-letter it at once.
    Reject { reason: String },
}

impl TaskError {
    /// A retry with the policy's backoff.
    pub fn retry(reason: impl Into<String>) -> Self {
        Self::Retry {
            reason: reason.into(),
            countdown: None,
        }
    }

    /// A failure recorded as the Python builtin exception `exc_type`.
    pub fn fail(exc_type: &str, message: impl Into<String>) -> Self {
        Self::Fail(ExceptionInfo::builtin(exc_type, message))
    }

    /// A poison message.
    pub fn reject(reason: impl Into<String>) -> Self {
        Self::Reject {
            reason: reason.into(),
        }
    }
}

/// Retry policy of one task.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TaskOptions {
    /// Retries allowed after the first attempt (a message's `max_retries`
    /// header overrides it).
    pub max_retries: u32,
    /// Backoff before retry n is `retry_backoff × 2ⁿ`, capped, with jitter.
    pub retry_backoff: Duration,
    pub retry_backoff_max: Duration,
}

impl Default for TaskOptions {
    fn default() -> Self {
        Self {
            max_retries: 3,
            retry_backoff: Duration::from_secs(1),
            retry_backoff_max: Duration::from_secs(600),
        }
    }
}

impl TaskOptions {
    /// The delay before retry number `retries + 1`: exponential, capped, with
    /// "equal jitter" (uniform in the upper half), so retries of a burst of
    /// failures spread out instead of returning together.
    pub fn backoff(&self, retries: u32) -> Duration {
        let exp = self
            .retry_backoff
            .saturating_mul(1u32.checked_shl(retries.min(31)).unwrap_or(u32::MAX));
        let cap = exp.min(self.retry_backoff_max);
        let half = cap / 2;
        half + half.mul_f64(rand::random::<f64>())
    }
}

/// The limits of one task: how often it may start on one worker, and how
/// long it may run when its message names no time limits (a message's
/// `timelimit` header wins, as in Celery). Remote control's `rate_limit`
/// and `time_limit` commands change them while the worker runs.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct TaskLimits {
    pub rate_limit: Option<crate::config::RateLimit>,
    pub soft_time_limit: Option<Duration>,
    pub time_limit: Option<Duration>,
}

/// Everything a handler knows about the task it runs.
#[derive(Debug, Clone)]
pub struct TaskContext {
    pub id: String,
    pub name: String,
    pub args: Vec<Value>,
    pub kwargs: Map<String, Value>,
    /// How many times this task was retried before this attempt.
    pub retries: u32,
    /// When the task was due (its ETA or countdown), if it had one.
    pub eta: Option<chrono::DateTime<chrono::Utc>>,
    /// When the task expires, if it does.
    pub expires: Option<chrono::DateTime<chrono::Utc>>,
    /// The first task of the workflow this one belongs to.
    pub root_id: Option<String>,
    /// The task that sent this one.
    pub parent_id: Option<String>,
    pub(crate) soft_deadline: Option<Instant>,
    /// When the hard time limit passes; handlers registered as enforcing
    /// it themselves (program tasks) stop there, the engine a grace later.
    pub(crate) hard_deadline: Option<Instant>,
    pub(crate) shutdown: CancellationToken,
}

impl TaskContext {
    /// A context for calling a handler directly (tests, examples).
    pub fn new(name: &str, args: Vec<Value>, kwargs: Map<String, Value>) -> Self {
        Self {
            id: uuid::Uuid::new_v4().to_string(),
            name: name.to_owned(),
            args,
            kwargs,
            retries: 0,
            eta: None,
            expires: None,
            root_id: None,
            parent_id: None,
            soft_deadline: None,
            hard_deadline: None,
            shutdown: CancellationToken::new(),
        }
    }

    /// Completes when the soft time limit passes (never, without one).
    /// Long handlers `select!` on it to wrap up in time.
    pub async fn soft_time_limit(&self) {
        match self.soft_deadline {
            Some(t) => tokio::time::sleep_until(t).await,
            None => std::future::pending().await,
        }
    }

    /// Whether the soft time limit has passed.
    pub fn soft_limit_passed(&self) -> bool {
        self.soft_deadline.is_some_and(|t| Instant::now() >= t)
    }

    /// Completes when the worker begins shutting down; a handler may stop
    /// early and ask for a retry.
    pub async fn shutting_down(&self) {
        self.shutdown.cancelled().await;
    }
}

#[derive(Clone)]
struct Entry {
    handler: Handler,
    options: TaskOptions,
    limits: TaskLimits,
    /// The handler stops itself at its hard deadline (see [`TaskContext`]).
    own_hard_limit: bool,
}

/// Task names mapped to handlers.
#[derive(Clone, Default)]
pub struct Registry {
    tasks: BTreeMap<String, Entry>,
}

impl std::fmt::Debug for Registry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list().entries(self.tasks.keys()).finish()
    }
}

impl Registry {
    /// An empty registry.
    pub fn new() -> Self {
        Self::default()
    }

    /// Registers `handler` under `name` with the default retry policy.
    pub fn register<F, Fut>(&mut self, name: &str, handler: F) -> &mut Self
    where
        F: Fn(TaskContext) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = TaskOutcome> + Send + 'static,
    {
        self.register_with(name, TaskOptions::default(), handler)
    }

    /// Registers `handler` under `name` with its own retry policy. A second
    /// registration of a name replaces the first.
    pub fn register_with<F, Fut>(
        &mut self,
        name: &str,
        options: TaskOptions,
        handler: F,
    ) -> &mut Self
    where
        F: Fn(TaskContext) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = TaskOutcome> + Send + 'static,
    {
        let h: Handler = Arc::new(move |ctx| Box::pin(handler(ctx)));
        self.tasks.insert(
            name.to_owned(),
            Entry {
                handler: h,
                options,
                limits: TaskLimits::default(),
                own_hard_limit: false,
            },
        );
        self
    }

    /// Sets the rate and time limits of `name`; false when no task of that
    /// name is registered.
    pub fn set_limits(&mut self, name: &str, limits: TaskLimits) -> bool {
        match self.tasks.get_mut(name) {
            Some(e) => {
                e.limits = limits;
                true
            }
            None => false,
        }
    }

    /// The limits `name` starts with (`None`: not registered).
    pub fn limits(&self, name: &str) -> Option<&TaskLimits> {
        self.tasks.get(name).map(|e| &e.limits)
    }

    /// Marks `name`'s handler as stopping itself at its hard deadline.
    pub(crate) fn enforces_own_hard_limit(&mut self, name: &str) {
        if let Some(e) = self.tasks.get_mut(name) {
            e.own_hard_limit = true;
        }
    }

    /// Whether `name`'s handler stops itself at its hard deadline.
    pub(crate) fn has_own_hard_limit(&self, name: &str) -> bool {
        self.tasks.get(name).is_some_and(|e| e.own_hard_limit)
    }

    /// The registered names, sorted.
    pub fn names(&self) -> Vec<String> {
        self.tasks.keys().cloned().collect()
    }

    /// Whether `name` is registered.
    pub fn contains(&self, name: &str) -> bool {
        self.tasks.contains_key(name)
    }

    /// Moves every task of `other` into this registry; a name both hold is
    /// refused (returned) and nothing is moved.
    pub fn absorb(&mut self, other: Registry) -> Result<(), String> {
        if let Some(name) = other.tasks.keys().find(|n| self.tasks.contains_key(*n)) {
            return Err(name.clone());
        }
        self.tasks.extend(other.tasks);
        Ok(())
    }

    /// Whether no task is registered.
    pub fn is_empty(&self) -> bool {
        self.tasks.is_empty()
    }

    pub(crate) fn get(&self, name: &str) -> Option<(Handler, TaskOptions)> {
        self.tasks
            .get(name)
            .map(|e| (Arc::clone(&e.handler), e.options))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_exponentially_with_jitter_and_a_cap() {
        let o = TaskOptions {
            max_retries: 10,
            retry_backoff: Duration::from_millis(100),
            retry_backoff_max: Duration::from_secs(1),
        };
        for _ in 0..200 {
            let d0 = o.backoff(0);
            assert!(d0 >= Duration::from_millis(50) && d0 <= Duration::from_millis(100));
            let d2 = o.backoff(2);
            assert!(d2 >= Duration::from_millis(200) && d2 <= Duration::from_millis(400));
            let d9 = o.backoff(9);
            assert!(d9 >= Duration::from_millis(500) && d9 <= Duration::from_secs(1));
            assert!(o.backoff(u32::MAX) <= Duration::from_secs(1));
        }
        let spread: std::collections::HashSet<_> = (0..50).map(|_| o.backoff(3)).collect();
        assert!(spread.len() > 10, "jitter should spread retries");
    }

    #[tokio::test]
    async fn registered_handlers_run() {
        let mut r = Registry::new();
        r.register("t.double", |ctx: TaskContext| async move {
            let n = ctx
                .args
                .first()
                .and_then(Value::as_i64)
                .ok_or_else(|| TaskError::fail("TypeError", "need an int"))?;
            Ok(Value::from(n * 2))
        });
        assert_eq!(r.names(), ["t.double"]);
        let (h, _) = r.get("t.double").expect("registered");
        let out = h(TaskContext::new(
            "t.double",
            vec![Value::from(21)],
            Map::new(),
        ))
        .await;
        assert_eq!(out, Ok(Value::from(42)));
        let out = h(TaskContext::new("t.double", vec![], Map::new())).await;
        assert_eq!(out, Err(TaskError::fail("TypeError", "need an int")));
        assert!(r.get("t.other").is_none());
    }

    #[test]
    fn absorbing_refuses_a_name_both_hold_and_moves_nothing() {
        let ok = |_: TaskContext| async { Ok(Value::Null) };
        let mut base = Registry::new();
        base.register("a", ok);
        let mut other = Registry::new();
        other.register("b", ok).register("a", ok);
        assert_eq!(base.absorb(other), Err("a".to_owned()));
        assert_eq!(base.names(), ["a"]);
        let mut other = Registry::new();
        other.register("b", ok);
        assert_eq!(base.absorb(other), Ok(()));
        assert!(base.contains("b"));
        assert_eq!(base.names(), ["a", "b"]);
    }
}
