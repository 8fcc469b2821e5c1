//! Remote-control commands that change how a running worker works, with
//! the replies of Celery 5's `celery/worker/control.py`: `add_consumer`,
//! `cancel_consumer` (the queues served), `rate_limit` and `time_limit`
//! (a task's limits). Their changes last until the worker stops; a
//! restarted worker starts from its configuration again, as a Celery
//! worker does.

use super::kombu::py_repr;
use crate::config::RateLimit;
use crate::worker::shared::Shared;
use serde_json::{Map, Value, json};
use std::time::Duration;

fn ok(v: impl Into<Value>) -> Value {
    json!({ "ok": v.into() })
}

fn nok(v: impl Into<Value>) -> Value {
    json!({ "error": v.into() })
}

fn str_arg<'a>(args: &'a Map<String, Value>, key: &str) -> Option<&'a str> {
    args.get(key).and_then(Value::as_str)
}

/// `add_consumer(queue, exchange=None, exchange_type=None,
/// routing_key=None)`: serve `queue` too. Celery answers the same whether
/// or not the queue was served already; so does this. The exchange and
/// routing key are not used: a taskstack worker reads the queue's list.
pub(crate) fn add_consumer(sh: &Shared, args: &Map<String, Value>) -> Value {
    let queue = match queue_arg(args) {
        Ok(q) => q,
        Err(e) => return e,
    };
    let added = sh.queues.send_if_modified(|qs| {
        if qs.iter().any(|q| q == queue) {
            false
        } else {
            qs.push(queue.to_owned());
            true
        }
    });
    if added {
        let now = sh.queues.borrow().clone();
        tracing::info!(queue, queues = ?now, "started consuming from a queue (remote control)");
    }
    ok(format!("add consumer {queue}"))
}

/// `cancel_consumer(queue)`: stop taking messages from `queue`; those
/// already taken finish, the rest stay in the queue. A worker left with no
/// queue takes nothing until `add_consumer`.
pub(crate) fn cancel_consumer(sh: &Shared, args: &Map<String, Value>) -> Value {
    let queue = match queue_arg(args) {
        Ok(q) => q,
        Err(e) => return e,
    };
    let removed = sh.queues.send_if_modified(|qs| {
        let before = qs.len();
        qs.retain(|q| q != queue);
        qs.len() != before
    });
    if removed {
        let left = sh.queues.borrow().clone();
        if left.is_empty() {
            tracing::warn!(
                queue,
                "no longer consuming from any queue (remote control); add_consumer resumes"
            );
        } else {
            tracing::info!(queue, queues = ?left, "no longer consuming from a queue (remote control)");
        }
    }
    ok(format!("no longer consuming from {queue}"))
}

fn queue_arg(args: &Map<String, Value>) -> Result<&str, Value> {
    let Some(queue) = str_arg(args, "queue") else {
        return Err(nok("queue: a queue name is needed"));
    };
    crate::config::check_queue_name(queue)
        .map_err(|why| nok(format!("queue {}: {why}", py_repr(&json!(queue)))))?;
    Ok(queue)
}

/// `rate_limit(task_name, rate_limit)`: Celery's replies, including its
/// "disabled" wording only for an empty value (`"0"` disables too, and is
/// answered as a new limit, as Celery does).
pub(crate) fn rate_limit(sh: &Shared, args: &Map<String, Value>) -> Value {
    let raw = args.get("rate_limit").cloned().unwrap_or(Value::Null);
    let rate = match RateLimit::from_value(&raw) {
        Ok(r) => r,
        Err(e) => {
            return nok(format!(
                "Invalid rate limit string: ValueError({})",
                py_repr(&json!(e))
            ));
        }
    };
    let task = str_arg(args, "task_name").unwrap_or_default();
    let shown = rate.as_ref().map(ToString::to_string);
    if sh.limits.set_rate(task, rate).is_err() {
        tracing::error!(task, "rate limit attempt for an unknown task");
        return nok("unknown task");
    }
    let disabled = match &raw {
        Value::Null => true,
        Value::String(s) => s.is_empty(),
        Value::Number(n) => n.as_f64() == Some(0.0),
        _ => false,
    };
    if disabled {
        tracing::info!(task, "rate limit disabled (remote control)");
        return ok("rate limit disabled successfully");
    }
    tracing::info!(
        task,
        rate_limit = shown.as_deref().unwrap_or("none"),
        "new rate limit (remote control)"
    );
    ok("new rate limit set successfully")
}

/// `time_limit(task_name, soft=None, hard=None)`: sets both, as Celery
/// does (an absent one is removed); the message's own limits still win.
pub(crate) fn time_limit(sh: &Shared, args: &Map<String, Value>) -> Value {
    let limit = |key: &str| -> Result<Option<Duration>, Value> {
        match args.get(key) {
            None | Some(Value::Null) => Ok(None),
            Some(v) => match v.as_f64().map(Duration::try_from_secs_f64) {
                // 0 is "no limit", as Celery's `soft or task.soft` reads it.
                Some(Ok(d)) if d.is_zero() => Ok(None),
                Some(Ok(d)) => Ok(Some(d)),
                _ => Err(nok(format!(
                    "{key}: {v} is not a number of seconds (0 or more)"
                ))),
            },
        }
    };
    let (soft, hard) = match (limit("soft"), limit("hard")) {
        (Ok(s), Ok(h)) => (s, h),
        (Err(e), _) | (_, Err(e)) => return e,
    };
    let task = str_arg(args, "task_name").unwrap_or_default();
    if sh.limits.set_time_limits(task, soft, hard).is_err() {
        tracing::error!(task, "time limit change attempt for an unknown task");
        return nok("unknown task");
    }
    tracing::info!(task, soft = ?soft, hard = ?hard, "new time limits (remote control)");
    ok("time limits set successfully")
}
