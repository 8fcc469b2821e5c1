//! Dead-lettering a message the worker cannot run: its FAILURE record
//! (when the task id is known) and the move to the dead-letter list.

use super::shared::{Held, Shared, Stats, persist};
use crate::backend::Use;
use crate::broker::DeadLetter;
use crate::proto::envelope::{self, DecodeError, TaskMessage};
use crate::proto::{ExceptionInfo, Provenance, TaskResult, TaskState};

/// The exception a message that does not decode is recorded with: kombu's
/// `ContentDisallowed` for a refused content type, else `ValueError`.
pub(super) fn decode_exception(err: &DecodeError) -> ExceptionInfo {
    match err {
        DecodeError::ContentType { .. } => ExceptionInfo {
            exc_type: "ContentDisallowed".into(),
            exc_module: "kombu.exceptions".into(),
            message: err.to_string(),
        },
        _ => ExceptionInfo::builtin("ValueError", err.to_string()),
    }
}

/// What is known about a poisoned message's task.
#[derive(Debug, Clone, Copy)]
pub(super) struct Origin<'a> {
    pub(super) task_id: Option<&'a str>,
    pub(super) task: Option<&'a str>,
    pub(super) retries: u32,
}

impl<'a> Origin<'a> {
    pub(super) fn of(msg: &'a TaskMessage) -> Self {
        Self {
            task_id: Some(&msg.id),
            task: Some(&msg.task),
            retries: msg.retries,
        }
    }
}

/// Records a FAILURE result when the task id is known, then moves the
/// message to its queue's dead-letter list (releasing the hold atomically).
pub(super) async fn poison(
    sh: &Shared,
    mut d: Held,
    queue: &str,
    origin: Origin<'_>,
    reason: String,
    exc: ExceptionInfo,
) {
    Stats::bump(&sh.stats.dead_lettered);
    let Origin {
        task_id,
        task,
        retries,
    } = origin;
    let label = task.map_or("undecodable", |t| task_label(sh, t));
    sh.metrics.finished(label, "dead_lettered");
    let result = task_id.map(|id| {
        TaskResult::failure(
            id,
            TaskState::Failure,
            &exc,
            Provenance {
                name: task.unwrap_or(""),
                worker: &sh.id,
                retries,
                queue,
                parent_id: None,
            },
        )
    });
    let mut record = DeadLetter {
        reason,
        queue: queue.to_owned(),
        queue_key: d.queue_key.clone(),
        task_id: task_id.map(str::to_owned),
        task: task.map(str::to_owned),
        payload: String::new(),
        payload_base64: None,
        payload_key: None,
        payload_size: None,
        worker: sh.id.clone(),
        at: envelope::format_time(sh.now()),
    };
    match d.oversized {
        // Too large to have been sent here: the backend keeps its bytes
        // (on Redis, dead_letter.lua copies them from the hold to a key of
        // their own).
        Some(size) => record.payload_size = Some(size),
        // Moved, not copied: a large message is in memory once, not twice.
        None => record.set_payload_owned(d.take_payload()),
    }
    let ttl = sh.settings.result_expires;
    let done = persist!(
        sh,
        "dead-letter message",
        async {
            // One session at a time: rare paths must not starve the pool.
            if let Some(r) = &result {
                let mut results = sh.backend.results(Use::Loop);
                results.write(std::slice::from_ref(r), ttl).await?;
            }
            let mut consume = sh.backend.consume(&sh.id);
            consume.dead_letter(d.seq, &record).await
        }
        .await
    );
    // The hold is settled (or the worker gave up on Redis); the caller's
    // `Held` returns the slot when it drops.
    let _ = done;
}

/// The `task` label of a metric: the name when it is registered (so the
/// label's values are bounded by the registry), else `unregistered`.
pub(super) fn task_label<'a>(sh: &Shared, task: &'a str) -> &'a str {
    if sh.registry.get(task).is_some() {
        task
    } else {
        "unregistered"
    }
}
