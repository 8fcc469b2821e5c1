//! What remote control sees of a worker, and the task events it sends: the
//! requests reserved and running (each with a token that `revoke
//! terminate=True` cancels), the ids revoked by remote command, and the
//! per-task counts `stats` reports.

use super::kombu::{py_repr, py_tuple};
use crate::events::{Events, timestamp};
use crate::proto::ExceptionInfo;
use crate::proto::envelope::{TaskMessage, format_time};
use serde_json::{Map, Value, json};
use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio_util::sync::CancellationToken;

/// Revoked ids remembered for `inspect revoked` (Celery keeps 50,000).
const REVOKED_KEPT: usize = 50_000;

#[derive(Debug)]
struct Request {
    name: String,
    args: Value,
    kwargs: Value,
    queue: String,
    time_start: Option<f64>,
    terminate: CancellationToken,
}

#[derive(Debug, Default)]
struct Revoked {
    set: HashSet<String>,
    order: VecDeque<String>,
}

/// One worker's monitor (see the module docs).
#[derive(Debug)]
pub(crate) struct Monitor {
    pub nodename: String,
    pub events: Arc<Events>,
    requests: Mutex<HashMap<String, Request>>,
    revoked: Mutex<Revoked>,
    totals: Mutex<BTreeMap<String, u64>>,
    processed: AtomicU64,
    /// Cancelled by the `shutdown` command.
    pub shutdown: CancellationToken,
    pub started: std::time::Instant,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl Monitor {
    pub fn new(
        nodename: String,
        task_events: bool,
        dropped: prometheus_client::metrics::counter::Counter,
    ) -> Self {
        Self {
            events: Arc::new(Events::new(&nodename, task_events, dropped)),
            nodename,
            requests: Mutex::default(),
            revoked: Mutex::default(),
            totals: Mutex::default(),
            processed: AtomicU64::new(0),
            shutdown: CancellationToken::new(),
            started: std::time::Instant::now(),
        }
    }

    /// A message was taken and decoded: it is reserved until it starts,
    /// and tracked until the returned guard drops.
    pub fn received(self: &Arc<Self>, msg: &TaskMessage, queue: &str) -> Tracked {
        lock(&self.requests).insert(
            msg.id.clone(),
            Request {
                name: msg.task.clone(),
                args: json!(msg.args),
                kwargs: json!(msg.kwargs),
                queue: queue.to_owned(),
                time_start: None,
                terminate: CancellationToken::new(),
            },
        );
        self.events.task("task-received", || {
            let mut f = Map::new();
            f.insert("uuid".into(), json!(msg.id));
            f.insert("name".into(), json!(msg.task));
            let args = msg
                .header_str("argsrepr")
                .map_or_else(|| py_tuple(&msg.args), str::to_owned);
            let kwargs = msg
                .header_str("kwargsrepr")
                .map_or_else(|| py_repr(&json!(msg.kwargs)), str::to_owned);
            f.insert("args".into(), json!(args));
            f.insert("kwargs".into(), json!(kwargs));
            f.insert("root_id".into(), json!(msg.root_id));
            f.insert("parent_id".into(), json!(msg.parent_id));
            f.insert("retries".into(), json!(msg.retries));
            f.insert("eta".into(), json!(msg.eta.map(format_time)));
            f.insert("expires".into(), json!(msg.expires.map(format_time)));
            f
        });
        Tracked {
            monitor: Arc::clone(self),
            id: msg.id.clone(),
            name: msg.task.clone(),
        }
    }

    /// Celery's `request.info()` of the tracked requests, running ones
    /// (`active`) or reserved ones.
    pub fn requests(&self, active: bool) -> Vec<Value> {
        let pid = std::process::id();
        lock(&self.requests)
            .iter()
            .filter(|(_, r)| r.time_start.is_some() == active)
            .map(|(id, r)| {
                json!({
                    "id": id,
                    "name": r.name,
                    "args": r.args,
                    "kwargs": r.kwargs,
                    "type": r.name,
                    "hostname": self.nodename,
                    "time_start": r.time_start,
                    "acknowledged": false,
                    "delivery_info": {
                        "exchange": "",
                        "routing_key": r.queue,
                        "priority": 0,
                        "redelivered": false,
                    },
                    "worker_pid": pid,
                })
            })
            .collect()
    }

    /// How many tracked requests are running.
    pub fn active_count(&self) -> usize {
        lock(&self.requests)
            .values()
            .filter(|r| r.time_start.is_some())
            .count()
    }

    /// Tasks finished, in all and by name.
    pub fn totals(&self) -> (u64, BTreeMap<String, u64>) {
        (
            self.processed.load(Ordering::Relaxed),
            lock(&self.totals).clone(),
        )
    }

    /// Remembers ids revoked by remote command; cancels those running when
    /// `terminate`, returning the ids cancelled.
    pub fn revoke(&self, ids: &[String], terminate: bool) -> Vec<String> {
        {
            let mut r = lock(&self.revoked);
            for id in ids {
                if r.set.insert(id.clone()) {
                    r.order.push_back(id.clone());
                }
            }
            while r.order.len() > REVOKED_KEPT {
                if let Some(old) = r.order.pop_front() {
                    r.set.remove(&old);
                }
            }
        }
        if !terminate {
            return Vec::new();
        }
        let requests = lock(&self.requests);
        ids.iter()
            .filter(|id| {
                requests.get(*id).is_some_and(|r| {
                    r.time_start.is_some() && {
                        r.terminate.cancel();
                        true
                    }
                })
            })
            .cloned()
            .collect()
    }

    /// The ids revoked by remote command, oldest first.
    pub fn revoked(&self) -> Vec<String> {
        lock(&self.revoked).order.iter().cloned().collect()
    }
}

/// A request the monitor tracks; dropping it forgets the request.
#[derive(Debug)]
pub(crate) struct Tracked {
    monitor: Arc<Monitor>,
    id: String,
    name: String,
}

impl Tracked {
    /// The task starts: it is active now. The token is cancelled by `revoke
    /// terminate=True`.
    pub fn started(&self) -> CancellationToken {
        let token = {
            let mut reqs = lock(&self.monitor.requests);
            reqs.get_mut(&self.id).map(|r| {
                r.time_start = Some(timestamp());
                r.terminate.clone()
            })
        };
        self.event("task-started", Map::new);
        token.unwrap_or_default()
    }

    fn event(&self, kind: &str, fields: impl FnOnce() -> Map<String, Value>) {
        self.monitor.events.task(kind, || {
            let mut f = Map::new();
            f.insert("uuid".into(), json!(self.id));
            f.extend(fields());
            f
        });
    }

    fn done(&self) {
        self.monitor.processed.fetch_add(1, Ordering::Relaxed);
        *lock(&self.monitor.totals)
            .entry(self.name.clone())
            .or_default() += 1;
    }

    pub fn succeeded(&self, result: &Value, runtime: Duration) {
        self.done();
        self.event("task-succeeded", || {
            let mut f = Map::new();
            f.insert("result".into(), json!(py_repr(result)));
            f.insert("runtime".into(), json!(runtime.as_secs_f64()));
            f
        });
    }

    pub fn failed(&self, exc: &ExceptionInfo) {
        self.done();
        self.event("task-failed", || exception_fields(exc));
    }

    pub fn retried(&self, exc: &ExceptionInfo) {
        self.event("task-retried", || exception_fields(exc));
    }

    pub fn revoked(&self, terminated: bool, expired: bool) {
        self.done();
        self.event("task-revoked", || {
            let mut f = Map::new();
            f.insert("terminated".into(), json!(terminated));
            f.insert(
                "signum".into(),
                if terminated { json!(15) } else { Value::Null },
            );
            f.insert("expired".into(), json!(expired));
            f
        });
    }

    pub fn rejected(&self) {
        self.done();
        self.event("task-rejected", || {
            let mut f = Map::new();
            f.insert("requeue".into(), json!(false));
            f
        });
    }
}

fn exception_fields(exc: &ExceptionInfo) -> Map<String, Value> {
    let mut f = Map::new();
    f.insert(
        "exception".into(),
        json!(format!(
            "{}({})",
            exc.exc_type,
            py_repr(&json!(exc.message))
        )),
    );
    f.insert("traceback".into(), json!(""));
    f
}

impl Drop for Tracked {
    fn drop(&mut self) {
        lock(&self.monitor.requests).remove(&self.id);
    }
}
