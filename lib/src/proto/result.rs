//! Task results as Celery's Redis backend stores them
//! (`celery-task-meta-<id>`, JSON).

use super::json::{Object, fixed};
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

/// A task's state, with Celery's names on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "UPPERCASE")]
pub enum TaskState {
    Pending,
    Received,
    Started,
    Success,
    Failure,
    Retry,
    Revoked,
}

impl TaskState {
    /// Whether the task will not change state again.
    pub fn is_ready(self) -> bool {
        matches!(self, Self::Success | Self::Failure | Self::Revoked)
    }
}

/// The stored record of a task's outcome. Field names are Celery's; the
/// extended fields (`name`, `worker`, `retries`, `queue`) match Celery's
/// `result_extended`, and Python clients ignore what they do not know.
/// `args` / `kwargs` are there only when the worker records them
/// ([`TaskResult::with_args`]): with `result_extended`, or in the
/// PostgreSQL store's columns.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TaskResult {
    pub status: TaskState,
    pub result: Value,
    pub traceback: Option<String>,
    #[serde(default)]
    pub children: Vec<Value>,
    pub date_done: Option<String>,
    pub task_id: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// The task's positional arguments (Celery's `result_extended`), when
    /// their JSON is at most [`ARGS_BOUND`] bytes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub args: Option<Value>,
    /// Its keyword arguments, on the same terms.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kwargs: Option<Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub worker: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retries: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub queue: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parent_id: Option<String>,
    /// The group (or chord header) the task belonged to, as Celery records it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub group_id: Option<String>,
    /// When a worker started the task (RFC 3339); taskstack's own field.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub date_started: Option<String>,
}

/// The length of a PENDING record's fixed text (its keys and constants).
const PENDING_FIXED: usize = 128;

/// Longest `args` / `kwargs` a record carries (bytes of JSON).
pub const ARGS_BOUND: usize = 4096;

/// `(args, kwargs)` as records carry them: each only when its JSON is at
/// most [`ARGS_BOUND`] bytes.
pub fn bounded_args(
    args: &[Value],
    kwargs: &serde_json::Map<String, Value>,
) -> (Option<Value>, Option<Value>) {
    (bounded(args), bounded(kwargs))
}

/// `v` as a JSON value when its JSON is at most [`ARGS_BOUND`] bytes; the
/// size is counted without building the text, and counting stops at the
/// bound.
fn bounded<T: Serialize + ?Sized>(v: &T) -> Option<Value> {
    struct Count(usize);
    impl std::io::Write for Count {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0 += buf.len();
            if self.0 > ARGS_BOUND {
                return Err(std::io::Error::other("over the bound"));
            }
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    serde_json::to_writer(Count(0), v).ok()?;
    serde_json::to_value(v).ok()
}

/// A failure as Celery encodes exceptions: Python clients rebuild an
/// exception of `exc_type` from `exc_module` (or a generic one).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExceptionInfo {
    pub exc_type: String,
    pub exc_module: String,
    pub message: String,
}

impl ExceptionInfo {
    /// An exception of a Python builtin type (`ValueError`, `RuntimeError`, ...).
    pub fn builtin(exc_type: &str, message: impl Into<String>) -> Self {
        Self {
            exc_type: exc_type.to_owned(),
            exc_module: "builtins".to_owned(),
            message: message.into(),
        }
    }

    /// One of Celery's own exceptions (`TimeLimitExceeded`, `NotRegistered`, ...).
    pub fn celery(exc_type: &str, message: impl Into<String>) -> Self {
        Self {
            exc_type: exc_type.to_owned(),
            exc_module: "celery.exceptions".to_owned(),
            message: message.into(),
        }
    }

    /// The `result` field of a FAILURE or RETRY record.
    pub fn to_value(&self) -> Value {
        json!({
            "exc_type": self.exc_type,
            "exc_message": [self.message],
            "exc_module": self.exc_module,
        })
    }
}

/// Who ran the task and where, for the extended fields.
#[derive(Debug, Clone, Copy)]
pub struct Provenance<'a> {
    pub name: &'a str,
    pub worker: &'a str,
    pub retries: u32,
    pub queue: &'a str,
    pub parent_id: Option<&'a str>,
}

impl TaskResult {
    /// A record in `status` for `task_id`, done now when the state is final.
    pub fn new(task_id: &str, status: TaskState, result: Value, from: Provenance<'_>) -> Self {
        let date_done = status
            .is_ready()
            .then(|| super::envelope::format_time(Utc::now()));
        Self {
            status,
            result,
            traceback: None,
            children: Vec::new(),
            date_done,
            task_id: task_id.to_owned(),
            name: Some(from.name.to_owned()),
            args: None,
            kwargs: None,
            worker: Some(from.worker.to_owned()),
            retries: Some(from.retries),
            queue: Some(from.queue.to_owned()),
            parent_id: from.parent_id.map(str::to_owned),
            group_id: None,
            date_started: None,
        }
    }

    /// The record a producer stores when it enqueues a task, so the task is
    /// known (PENDING) rather than indistinguishable from one never sent.
    pub fn pending(task_id: &str, name: &str, queue: &str) -> Self {
        Self {
            status: TaskState::Pending,
            result: Value::Null,
            traceback: None,
            children: Vec::new(),
            date_done: None,
            task_id: task_id.to_owned(),
            name: Some(name.to_owned()),
            args: None,
            kwargs: None,
            worker: None,
            retries: None,
            queue: Some(queue.to_owned()),
            parent_id: None,
            group_id: None,
            date_started: None,
        }
    }

    /// The JSON text of [`TaskResult::pending`], written straight (a web
    /// batch stores a thousand per request): the same text serde_json
    /// writes for that record.
    pub fn pending_json(task_id: &str, name: &str, queue: &str) -> String {
        let mut out = Vec::with_capacity(PENDING_FIXED + task_id.len() + name.len() + queue.len());
        let mut r = Object::open(&mut out);
        fixed!(&mut r, "status" => "\"PENDING\"", "result" => "null", "traceback" => "null",
            "children" => "[]", "date_done" => "null");
        r.string("task_id", task_id);
        r.string("name", name);
        r.string("queue", queue);
        r.close();
        String::from_utf8(out).expect("JSON text is UTF-8")
    }

    /// A FAILURE (or RETRY) record carrying `exc`, with a traceback text.
    pub fn failure(
        task_id: &str,
        status: TaskState,
        exc: &ExceptionInfo,
        from: Provenance<'_>,
    ) -> Self {
        let mut r = Self::new(task_id, status, exc.to_value(), from);
        r.traceback = Some(format!(
            "{}.{}: {}",
            exc.exc_module, exc.exc_type, exc.message
        ));
        r
    }

    /// The record with the task's `args` and `kwargs`, each kept only when
    /// its JSON is at most [`ARGS_BOUND`] bytes (a larger one is left out,
    /// so a record never grows by more than twice the bound).
    #[must_use]
    pub fn with_args(mut self, args: &[Value], kwargs: &serde_json::Map<String, Value>) -> Self {
        (self.args, self.kwargs) = bounded_args(args, kwargs);
        self
    }

    /// When the task finished, if it did.
    pub fn done_at(&self) -> Option<DateTime<Utc>> {
        self.date_done
            .as_deref()
            .and_then(super::envelope::parse_time)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_written_pending_record_is_serde_jsons() {
        for (id, name, queue) in [
            (
                "9f0c6a1e-2b7d-4c1f-8e3a-5d6b7c8d9e0f",
                "taskstack.add",
                "celery",
            ),
            ("id \"quoted\"", "t\\x\n", "q é"),
            ("", "", ""),
        ] {
            let want = serde_json::to_string(&TaskResult::pending(id, name, queue)).expect("JSON");
            assert_eq!(TaskResult::pending_json(id, name, queue), want);
        }
    }

    fn from() -> Provenance<'static> {
        Provenance {
            name: "t",
            worker: "w",
            retries: 0,
            queue: "q",
            parent_id: None,
        }
    }

    #[test]
    fn args_and_kwargs_are_kept_up_to_the_bound() {
        let small = [json!(1), json!("two")];
        let mut kw = serde_json::Map::new();
        kw.insert("k".into(), json!(true));
        let r = TaskResult::new("id", TaskState::Success, json!(3), from()).with_args(&small, &kw);
        let v = serde_json::to_value(&r).expect("serializes");
        assert_eq!(
            (&v["args"], &v["kwargs"]),
            (&json!([1, "two"]), &json!({"k": true}))
        );
        // `["xxx…"]` is the string plus 4 bytes: exactly at the bound, then over it.
        let at = [json!("x".repeat(ARGS_BOUND - 4))];
        let over = [json!("x".repeat(ARGS_BOUND - 3))];
        assert!(r.clone().with_args(&at, &kw).args.is_some());
        let r = r.with_args(&over, &kw);
        assert_eq!((r.args, r.kwargs), (None, Some(json!({"k": true}))));
        // Without them the record is as before (no keys at all).
        let plain =
            serde_json::to_value(TaskResult::new("id", TaskState::Success, json!(3), from()))
                .expect("serializes");
        assert!(plain.get("args").is_none() && plain.get("kwargs").is_none());
    }

    #[test]
    fn failure_uses_celerys_exception_shape() {
        let r = TaskResult::failure(
            "id",
            TaskState::Failure,
            &ExceptionInfo::builtin("ValueError", "boom"),
            from(),
        );
        let v = serde_json::to_value(&r).expect("serializes");
        assert_eq!(v["status"], "FAILURE");
        assert_eq!(
            v["result"],
            json!({"exc_type": "ValueError", "exc_message": ["boom"], "exc_module": "builtins"})
        );
        assert!(r.done_at().is_some());
    }

    #[test]
    fn parses_a_python_written_result() {
        let raw = r#"{"status": "SUCCESS", "result": 5, "traceback": null, "children": [], "date_done": "2026-11-23T23:44:32.670674+00:00", "task_id": "x"}"#;
        let r: TaskResult = serde_json::from_str(raw).expect("parses");
        assert_eq!(r.status, TaskState::Success);
        assert_eq!(r.result, json!(5));
        assert!(r.worker.is_none());
    }

    #[test]
    fn retry_is_not_ready() {
        let r = TaskResult::new("id", TaskState::Retry, Value::Null, from());
        assert!(r.date_done.is_none());
    }
}
