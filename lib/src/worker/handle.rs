//! What happens to one message a worker took: decode, check, run, record.

use super::poison::{Origin, decode_exception, poison, task_label};
use super::registry::{TaskContext, TaskError, TaskOptions};
use super::route::{Route, route};
use super::shared::{Held, SettleMsg, Shared, Stats, panic_text, persist};
use super::turn::Turn;
use crate::backend::Use;
use crate::broker::{Settle, StartVerdict, Starting};
use crate::proto::envelope::{self, DecodeError, TaskMessage};
use crate::proto::keys::queue_of_key;
use crate::proto::{ExceptionInfo, Provenance, TaskResult, TaskState};
use futures_util::FutureExt as _;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::time::Duration;
use tracing::Instrument as _;

/// Beyond a self-limiting handler's grace, how long the engine waits past
/// the hard limit before it drops the handler itself.
const HARD_LIMIT_SLACK: Duration = Duration::from_secs(1);

/// Handles one message; `turn` is its place in line for a concurrency
/// slot, queued in the order the worker took its messages.
pub(crate) async fn handle(sh: Arc<Shared>, d: Held, turn: Turn) {
    let queue = queue_of_key(&d.queue_key).to_owned();
    let limit = sh.settings.max_message_size;
    let decoded = match d.oversized {
        // fetch.lua kept it in Redis: refused unread, never transferred.
        Some(size) => Err((
            DecodeError::TooLarge {
                size: usize::try_from(size).unwrap_or(usize::MAX),
                limit,
            },
            None,
        )),
        None => envelope::decode_bytes(&d.payload, limit),
    };
    let msg = match decoded {
        Ok(m) => m,
        Err((err, id)) => {
            drop(turn);
            let span = tracing::warn_span!("message", task_id = id.as_deref().unwrap_or(""), queue = %queue);
            let exc = decode_exception(&err);
            async {
                tracing::warn!(reason = %err, "refusing message; dead-lettering it");
                let origin = Origin {
                    task_id: id.as_deref(),
                    task: None,
                    retries: 0,
                };
                Box::pin(poison(&sh, d, &queue, origin, err.to_string(), exc)).await;
            }
            .instrument(span)
            .await;
            return;
        }
    };
    let span = task_span(&msg, &queue);
    run_message(sh, d, queue, msg, turn).instrument(span).await;
}

/// The span a task's logs carry.
pub(super) fn task_span(msg: &TaskMessage, queue: &str) -> tracing::Span {
    tracing::info_span!(
        "task",
        task_id = %msg.id,
        task = %msg.task,
        queue = %queue,
        attempt = msg.retries + 1,
    )
}

fn provenance<'a>(sh: &'a Shared, msg: &'a TaskMessage, queue: &'a str) -> Provenance<'a> {
    Provenance {
        name: &msg.task,
        worker: &sh.id,
        retries: msg.retries,
        queue,
        parent_id: msg.parent_id.as_deref(),
    }
}

/// What the task's records carry of its `args` / `kwargs`: nothing, unless
/// `result_extended` is on or the store has columns for them; taken from
/// the message before the run moves them out.
#[derive(Debug, Clone, Default)]
struct Extended {
    args: Option<serde_json::Value>,
    kwargs: Option<serde_json::Value>,
}

impl Extended {
    fn of(sh: &Shared, msg: &TaskMessage) -> Self {
        if sh.settings.result_extended || sh.backend.records_task_args() {
            let (args, kwargs) = crate::proto::result::bounded_args(&msg.args, &msg.kwargs);
            Self { args, kwargs }
        } else {
            Self::default()
        }
    }

    fn apply(&self, mut r: TaskResult) -> TaskResult {
        r.args.clone_from(&self.args);
        r.kwargs.clone_from(&self.kwargs);
        r
    }
}

async fn run_message(sh: Arc<Shared>, d: Held, queue: String, msg: TaskMessage, turn: Turn) {
    let track = sh.monitor.received(&msg, &queue);
    let (handler, options) = match route(&sh, &msg) {
        Route::Run(handler, options) => (handler, options),
        Route::Expired(exp) => {
            drop(turn);
            tracing::info!(expired_at = %envelope::format_time(exp), "task expired before it ran; recording REVOKED");
            Stats::bump(&sh.stats.revoked);
            sh.metrics.finished(task_label(&sh, &msg.task), "expired");
            track.revoked(false, true);
            let exc = ExceptionInfo::celery("TaskRevokedError", "expired");
            let r = TaskResult::new(
                &msg.id,
                TaskState::Revoked,
                exc.to_value(),
                provenance(&sh, &msg, &queue),
            );
            let r = Extended::of(&sh, &msg).apply(r);
            Box::pin(finish(&sh, d, &msg, Some(r))).await;
            return;
        }
        Route::TooFar(eta) => {
            drop(turn);
            let reason = format!(
                "eta {} lies more than max_task_delay ({}) ahead",
                envelope::format_time(eta),
                humantime::format_duration(sh.settings.max_task_delay)
            );
            tracing::warn!(reason = %reason, "refusing task; dead-lettering it");
            let exc = ExceptionInfo::builtin("ValueError", reason.clone());
            Box::pin(poison(&sh, d, &queue, Origin::of(&msg), reason, exc)).await;
            return;
        }
        Route::NotDue(eta) => {
            drop(turn);
            // A producer that does not park ETA tasks itself (Python Celery)
            // pushed it straight to the queue: park it in Redis until due.
            tracing::debug!(eta = %envelope::format_time(eta), "task not due yet; parking it");
            let due = eta.timestamp_millis();
            let done = Box::pin(async {
                // A session per rare path: it must not hold a connection long.
                let mut consume = sh.backend.consume(&sh.id);
                persist!(
                    sh,
                    "park task until its ETA",
                    consume
                        .park_held(d.seq, &d.queue_key, &d.payload, due, None)
                        .await
                )
            })
            .await;
            // Parked or not (the worker gave up on Redis), the slot returns
            // when `d` drops here.
            let _ = done;
            return;
        }
        Route::Unknown => {
            drop(turn);
            tracing::warn!("task is not registered in this worker; dead-lettering it");
            let exc = ExceptionInfo::celery(
                "NotRegistered",
                format!("task {:?} is not registered in this worker", msg.task),
            );
            let reason = format!("unknown task {:?}", msg.task);
            track.rejected();
            Box::pin(poison(&sh, d, &queue, Origin::of(&msg), reason, exc)).await;
            return;
        }
    };

    // A rate-limited task waits for its token still holding its message
    // (leased, so nothing is lost) but no concurrency slot, so tasks that
    // may run are not held up: it leaves the line and queues again once
    // admitted.
    let turn = {
        let mut admit = std::pin::pin!(sh.limits.admit(&msg.task));
        if admit.as_mut().now_or_never().is_some() {
            Some(turn)
        } else {
            drop(turn);
            sh.until_stop(admit).await.map(|()| Turn::queue(&sh.exec))
        }
    };
    let Some(turn) = turn else {
        sh.settle(SettleMsg::hand_back(d)).await;
        return;
    };
    let permit = sh.until_stop(turn.wait()).await.flatten();
    let Some(permit) = permit else {
        sh.settle(SettleMsg::hand_back(d)).await;
        return;
    };
    // Boxed, like the rare paths above: up to prefetch − concurrency
    // messages wait for a slot, each in a spawned task, and a waiting task
    // should not carry the (much larger) state of a running one.
    let go = Go {
        permit,
        verdict: None,
    };
    Box::pin(execute(sh, d, queue, msg, handler, options, go, track)).await;
}

/// A task's concurrency slot, and whether it was already started (the
/// take's verdict, see [`super::prestart`]) or still is to be.
pub(super) struct Go {
    pub permit: tokio::sync::OwnedSemaphorePermit,
    pub verdict: Option<StartVerdict>,
}

/// Starts (or skips, when revoked) and runs a task that has a slot, then
/// records its outcome.
#[allow(clippy::too_many_arguments)] // two call sites; the fields are all distinct
pub(super) async fn execute(
    sh: Arc<Shared>,
    d: Held,
    queue: String,
    mut msg: TaskMessage,
    handler: super::registry::Handler,
    options: TaskOptions,
    go: Go,
    track: crate::control::Tracked,
) {
    let Go { permit, verdict } = go;
    let started_at = envelope::format_time(sh.now());
    let ext = Extended::of(&sh, &msg);
    let verdict = match verdict {
        Some(v) => Some(v),
        None => {
            // The STARTED record, unless it would not be stored.
            let record = if sh.settings.track_started || !sh.backend.marks_starts() {
                let mut record = TaskResult::new(
                    &msg.id,
                    TaskState::Started,
                    serde_json::json!({ "pid": std::process::id(), "hostname": sh.id }),
                    provenance(&sh, &msg, &queue),
                );
                record.date_started = Some(started_at.clone());
                serde_json::to_string(&ext.apply(record)).unwrap_or_default()
            } else {
                String::new()
            };
            let start = Starting {
                task_id: msg.id.clone(),
                record,
                seq: d.seq,
            };
            sh.start(start).await
        }
    };
    match verdict {
        Some(StartVerdict::Run) => {}
        Some(StartVerdict::Revoked) => {
            drop(permit);
            tracing::info!("task was revoked before it started; skipping it");
            track.revoked(false, false);
            Stats::bump(&sh.stats.revoked);
            sh.metrics.finished(&msg.task, "revoked");
            // The revocation stored the REVOKED record; only the hold is settled.
            finish(&sh, d, &msg, None).await;
            return;
        }
        Some(StartVerdict::Finished) => {
            drop(permit);
            tracing::info!(
                "task already finished (its result record is final): a second delivery; \
                 acknowledging it without running it"
            );
            sh.metrics.finished(&msg.task, "duplicate");
            // The record stays as the first run stored it.
            finish(&sh, d, &msg, None).await;
            return;
        }
        Some(StartVerdict::NotHeld) => {
            drop(permit);
            tracing::warn!(
                "not starting the task: this worker's lease expired and its message went \
                 back to the queue (another worker runs it)"
            );
            Stats::bump(&sh.stats.forfeited);
            sh.metrics.finished(&msg.task, "forfeited");
            // Nothing to settle: the hold is gone; the slot returns with `d`.
            return;
        }
        None => {
            drop(permit);
            sh.settle(SettleMsg::hand_back(d)).await;
            return;
        }
    }
    tracing::debug!("task started");
    let terminate = track.started();
    let started = tokio::time::Instant::now();
    // The message's limits win; the task's (configured, or changed by
    // remote control) apply where it names none, as in Celery.
    let (task_soft, task_hard) = sh.limits.time_limits(&msg.task);
    let soft = msg.soft_time_limit.or(task_soft);
    let hard = msg.hard_time_limit.or(task_hard);
    // A handler that stops itself at the hard deadline (a program task
    // terminating its process group) gets time to do so.
    let backstop = if sh.registry.has_own_hard_limit(&msg.task) {
        super::declared::KILL_GRACE + HARD_LIMIT_SLACK
    } else {
        Duration::ZERO
    };
    let ctx = TaskContext {
        id: msg.id.clone(),
        name: msg.task.clone(),
        // Moved, not copied: nothing after the run reads them (a retry
        // re-publishes the original envelope).
        args: std::mem::take(&mut msg.args),
        kwargs: std::mem::take(&mut msg.kwargs),
        retries: msg.retries,
        eta: msg.eta,
        expires: msg.expires,
        root_id: msg.root_id.clone(),
        parent_id: msg.parent_id.clone(),
        soft_deadline: soft.map(|s| started + s),
        hard_deadline: hard.map(|h| started + h),
        shutdown: sh.stop.clone(),
    };
    let run = async move {
        let fut = std::panic::catch_unwind(AssertUnwindSafe(|| handler(ctx)))?;
        AssertUnwindSafe(fut).catch_unwind().await
    };
    let outcome = async {
        match hard {
            Some(limit) => tokio::time::timeout(limit + backstop, run)
                .await
                .map_err(|_| limit),
            None => Ok(run.await),
        }
    };
    // `revoke terminate=True` stops the task where it awaits (its future
    // is dropped) and records it REVOKED.
    let outcome = tokio::select! {
        o = outcome => Some(o),
        () = terminate.cancelled() => None,
    };
    drop(permit);
    let Some(outcome) = outcome else {
        tracing::warn!(runtime = ?started.elapsed(), "task terminated by a remote revoke; recording REVOKED");
        Stats::bump(&sh.stats.revoked);
        sh.metrics.finished(&msg.task, "revoked");
        track.revoked(true, false);
        let exc = ExceptionInfo::celery("TaskRevokedError", "terminated");
        let mut r = TaskResult::new(
            &msg.id,
            TaskState::Revoked,
            exc.to_value(),
            provenance(&sh, &msg, &queue),
        );
        r.date_started = Some(started_at.clone());
        finish(&sh, d, &msg, Some(ext.apply(r))).await;
        return;
    };
    let runtime = started.elapsed();
    sh.metrics.ran(&msg.task, runtime);
    let from = provenance(&sh, &msg, &queue);
    let stamp = |mut r: TaskResult| {
        r.date_started = Some(started_at.clone());
        ext.apply(r)
    };
    match outcome {
        Ok(Ok(Ok(value))) => {
            tracing::debug!(runtime = ?runtime, "task succeeded");
            Stats::bump(&sh.stats.succeeded);
            sh.metrics.finished(&msg.task, "success");
            track.succeeded(&value, runtime);
            let r = TaskResult::new(&msg.id, TaskState::Success, value, from);
            finish(&sh, d, &msg, Some(stamp(r))).await;
        }
        Ok(Ok(Err(TaskError::Fail(exc)))) => {
            tracing::info!(runtime = ?runtime, exc_type = %exc.exc_type, error = %exc.message, "task failed");
            Stats::bump(&sh.stats.failed);
            sh.metrics.finished(&msg.task, "failure");
            track.failed(&exc);
            let r = TaskResult::failure(&msg.id, TaskState::Failure, &exc, from);
            finish(&sh, d, &msg, Some(stamp(r))).await;
        }
        Ok(Ok(Err(TaskError::Retry { reason, countdown }))) => {
            track.retried(&ExceptionInfo::celery("Retry", reason.clone()));
            let again = Again {
                options,
                reason,
                countdown,
            };
            // Boxed, as the other rare paths: `execute`'s state (allocated
            // for every task that runs) would otherwise hold theirs.
            Box::pin(retry(&sh, d, &queue, &msg, again, &ext)).await;
        }
        Ok(Ok(Err(TaskError::Reject { reason }))) => {
            tracing::warn!(reason = %reason, "task rejected its message; dead-lettering it");
            let exc = ExceptionInfo::celery("Reject", reason.clone());
            track.rejected();
            Box::pin(poison(&sh, d, &queue, Origin::of(&msg), reason, exc)).await;
        }
        Ok(Err(panic)) => {
            let what = panic_text(panic.as_ref());
            tracing::error!(panic = %what, "task panicked; recording FAILURE");
            Stats::bump(&sh.stats.failed);
            sh.metrics.finished(&msg.task, "failure");
            let exc = ExceptionInfo::builtin("RuntimeError", format!("task panicked: {what}"));
            track.failed(&exc);
            let r = TaskResult::failure(&msg.id, TaskState::Failure, &exc, from);
            finish(&sh, d, &msg, Some(stamp(r))).await;
        }
        Err(limit) => {
            tracing::warn!(limit = ?limit, "task exceeded its hard time limit and was stopped");
            Stats::bump(&sh.stats.failed);
            sh.metrics.finished(&msg.task, "failure");
            let exc = ExceptionInfo::celery(
                "TimeLimitExceeded",
                format!("hard time limit ({}s) exceeded", limit.as_secs_f64()),
            );
            track.failed(&exc);
            let r = TaskResult::failure(&msg.id, TaskState::Failure, &exc, from);
            finish(&sh, d, &msg, Some(stamp(r))).await;
        }
    }
}

/// Stores the result (unless the message asked not to) and releases the hold.
async fn finish(sh: &Shared, d: Held, msg: &TaskMessage, mut result: Option<TaskResult>) {
    // Canvas follow-ups (chain, link, link_error, chord) go out before the
    // acknowledgement; giving up on Redis leaves the message to be handed back.
    if let Some(r) = result.as_mut()
        && !super::followups::run(sh, msg, r).await
    {
        return;
    }
    let result = result.filter(|_| !msg.ignore_result).and_then(|r| {
        serde_json::to_string(&r)
            .map_err(|e| tracing::error!(error = %e, "result is not serializable"))
            .ok()
            .map(|json| (msg.id.clone(), json))
    });
    let (seq, slot) = d.into_settlement();
    let started = Some(msg.id.clone());
    sh.settle(SettleMsg::Done(
        Settle {
            seq,
            result,
            started,
        },
        slot,
    ))
    .await;
}

/// Why and when a task asked to run again.
struct Again {
    options: TaskOptions,
    reason: String,
    countdown: Option<Duration>,
}

async fn retry(sh: &Shared, d: Held, queue: &str, msg: &TaskMessage, again: Again, ext: &Extended) {
    let Again {
        options,
        reason,
        countdown,
    } = again;
    let max = msg.max_retries.unwrap_or(options.max_retries);
    let from = provenance(sh, msg, queue);
    if msg.retries >= max {
        tracing::warn!(reason = %reason, max_retries = max, "retries exhausted; dead-lettering the task");
        let exc = ExceptionInfo::celery(
            "MaxRetriesExceededError",
            format!("gave up after {} retries: {reason}", msg.retries),
        );
        let why = format!("retries exhausted ({max}): {reason}");
        poison(sh, d, queue, Origin::of(msg), why, exc).await;
        return;
    }
    let delay = countdown.unwrap_or_else(|| options.backoff(msg.retries));
    let eta = sh.now() + chrono::Duration::from_std(delay).unwrap_or_default();
    tracing::info!(reason = %reason, retry_in = ?delay, "task will be retried");
    Stats::bump(&sh.stats.retried);
    sh.metrics.finished(&msg.task, "retry");
    let exc = ExceptionInfo::celery("Retry", reason);
    let r = ext.apply(TaskResult::failure(&msg.id, TaskState::Retry, &exc, from));
    let next = msg.for_retry(eta);
    let ttl = sh.settings.result_expires;
    let due = eta.timestamp_millis();
    let done = persist!(
        sh,
        "schedule retry",
        async {
            // One session at a time: rare paths must not starve the pool.
            if !msg.ignore_result {
                let mut results = sh.backend.results(Use::Loop);
                results.write(std::slice::from_ref(&r), ttl).await?;
            }
            let mut consume = sh.backend.consume(&sh.id);
            consume
                .park_held(d.seq, &d.queue_key, next.as_bytes(), due, Some(&msg.id))
                .await
        }
        .await
    );
    // The hold is settled (or the worker gave up on Redis); the caller's
    // `Held` returns the slot when it drops.
    let _ = done;
}
#[cfg(test)]
mod tests {
    use super::*;
    use std::future::Future;

    /// The size of the future an `async fn` of three arguments returns.
    fn future_size3<A, B, C, F: Future>(_: &impl Fn(A, B, C) -> F) -> usize {
        std::mem::size_of::<F>()
    }

    /// The same for eight arguments.
    #[allow(clippy::many_single_char_names)]
    fn future_size8<A, B, C, D, E, G, H, I, F: Future>(
        _: &impl Fn(A, B, C, D, E, G, H, I) -> F,
    ) -> usize {
        std::mem::size_of::<F>()
    }

    /// Each message a worker holds is a task of its own, and each task that
    /// runs allocates `execute`'s state and builds it by copying: their size
    /// is paid per message. The rare paths (canvas follow-ups, retries,
    /// dead-lettering) are boxed so they do not count. With them inline,
    /// `execute` was 12,360 bytes (3,232 after), and a worker draining
    /// no-op tasks spent a quarter of its instructions in `memcpy` (an
    /// eighth after; callgrind, bench/HISTORY.md, "Smaller task futures").
    #[test]
    fn a_message_task_carries_no_rare_path_inline() {
        const LIMIT: usize = 6 * 1024;
        let handle_size = future_size3(&handle);
        let execute_size = future_size8(&execute);
        assert!(
            handle_size <= LIMIT,
            "a message task's future is {handle_size} bytes (limit {LIMIT})"
        );
        assert!(
            execute_size <= LIMIT,
            "a running task's future is {execute_size} bytes (limit {LIMIT})"
        );
    }
}
