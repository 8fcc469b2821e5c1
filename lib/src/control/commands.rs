//! The remote-control commands a taskstack worker answers, with Celery's
//! reply shapes (`celery/worker/control.py`): `{"ok": ...}`, `{"error":
//! ...}`, or the command's value. An unknown command gets Celery's error
//! reply (`{"error": "KeyError('name')"}`); a known Celery command this
//! worker does not implement gets an error saying so.

use super::RemoteControl;
use super::kombu::py_repr;
use crate::proto::keys::result_key;
use crate::proto::{ExceptionInfo, Provenance, TaskResult, TaskState};
use crate::worker::shared::{Shared, Stats};
use serde_json::{Map, Value, json};
use std::sync::Arc;

/// Commands that only read.
const INSPECT: &[&str] = &[
    "ping",
    "stats",
    "active",
    "reserved",
    "scheduled",
    "registered",
    "dump_tasks",
    "active_queues",
    "clock",
    "revoked",
    "query_task",
    "hello",
    "conf",
    "report",
];

/// Commands that change how tasks run, not whether the worker runs.
const CONTROL: &[&str] = &[
    "revoke",
    "terminate",
    "revoke_by_stamped_headers",
    "enable_events",
    "disable_events",
    "heartbeat",
    "add_consumer",
    "cancel_consumer",
    "rate_limit",
    "time_limit",
];

/// Celery commands a taskstack worker does not implement.
const UNSUPPORTED: &[&str] = &[
    "pool_grow",
    "pool_shrink",
    "pool_restart",
    "autoscale",
    "election",
    "objgraph",
    "memsample",
    "memdump",
];

fn ok(v: impl Into<Value>) -> Value {
    json!({ "ok": v.into() })
}

fn nok(v: impl Into<Value>) -> Value {
    json!({ "error": v.into() })
}

/// What `worker_remote_control = mode` allows of `method`; the refusal
/// reply otherwise.
fn allowed(mode: RemoteControl, method: &str) -> Result<(), Value> {
    let needs = if INSPECT.contains(&method) {
        RemoteControl::Inspect
    } else if CONTROL.contains(&method) {
        RemoteControl::Control
    } else if method == "shutdown" {
        RemoteControl::All
    } else {
        return Ok(()); // unknown or unsupported: answered as such
    };
    let rank = |m: RemoteControl| match m {
        RemoteControl::All => 3,
        RemoteControl::Control => 2,
        RemoteControl::Inspect => 1,
        RemoteControl::Off => 0,
    };
    if rank(mode) >= rank(needs) {
        Ok(())
    } else {
        Err(nok(format!(
            "remote control command {method:?} is disabled on this worker \
             (worker_remote_control = {:?}; it needs {:?})",
            mode.as_str(),
            needs.as_str()
        )))
    }
}

/// Runs `method`; `None` means no reply (`shutdown`, as in Celery, where
/// the worker stops instead of answering).
pub(crate) async fn dispatch(
    sh: &Arc<Shared>,
    method: &str,
    args: &Map<String, Value>,
) -> Option<Value> {
    if let Err(refusal) = allowed(sh.settings.remote_control, method) {
        tracing::warn!(command = method, "refusing a remote-control command");
        return Some(refusal);
    }
    let m = &sh.monitor;
    Some(match method {
        "ping" => ok("pong"),
        "clock" => json!({ "clock": m.events.clock.value() }),
        "stats" => stats(sh),
        "active" => Value::Array(m.requests(true)),
        "reserved" => Value::Array(m.requests(false)),
        // ETA tasks are parked in Redis, not held by a worker.
        "scheduled" => json!([]),
        "registered" | "dump_tasks" => registered(sh, args),
        "active_queues" => Value::Array(sh.queues.borrow().iter().map(|q| queue_dict(q)).collect()),
        "add_consumer" => super::runtime::add_consumer(sh, args),
        "cancel_consumer" => super::runtime::cancel_consumer(sh, args),
        "rate_limit" => super::runtime::rate_limit(sh, args),
        "time_limit" => super::runtime::time_limit(sh, args),
        "revoked" => json!(m.revoked()),
        "query_task" => {
            let ids = id_list(args.get("ids"));
            let mut out = Map::new();
            for state in ["active", "reserved"] {
                for r in m.requests(state == "active") {
                    if let Some(id) = r["id"].as_str().filter(|id| ids.iter().any(|i| i == id)) {
                        out.insert(id.to_owned(), json!([state, r]));
                    }
                }
            }
            Value::Object(out)
        }
        "hello" => json!({ "revoked": {}, "clock": m.events.clock.forward() }),
        "conf" => json!({}),
        "report" => ok(format!("taskstack-worker {}", env!("CARGO_PKG_VERSION"))),
        "revoke" | "terminate" => {
            let ids = id_list(args.get("task_id"));
            let terminate = method == "terminate"
                || args
                    .get("terminate")
                    .and_then(Value::as_bool)
                    .unwrap_or(false);
            revoke(sh, &ids, terminate).await
        }
        "revoke_by_stamped_headers" => nok(
            "revoke_by_stamped_headers is not supported by taskstack workers; revoke by task id",
        ),
        "enable_events" => {
            if m.events.set_task_events(true) {
                ok("task events already enabled")
            } else {
                tracing::info!("task events enabled by remote control");
                ok("task events enabled")
            }
        }
        "disable_events" => {
            if m.events.set_task_events(false) {
                tracing::info!("task events disabled by remote control");
                ok("task events disabled")
            } else {
                ok("task events already disabled")
            }
        }
        "heartbeat" => Value::Null,
        "shutdown" => {
            let msg = args
                .get("msg")
                .and_then(Value::as_str)
                .unwrap_or("Got shutdown from remote");
            tracing::warn!(reason = msg, "shutting down on a remote-control command");
            m.shutdown.cancel();
            return None;
        }
        other if UNSUPPORTED.contains(&other) => {
            nok(format!("{other} is not supported by taskstack workers"))
        }
        other => nok(format!("KeyError({})", py_repr(&json!(other)))),
    })
}

/// Celery's `registered`: the names, each with ` [rate_limit=...]` when it
/// has one and `taskinfoitems` asks for it (Celery's default items do).
fn registered(sh: &Shared, args: &Map<String, Value>) -> Value {
    let items = id_list(args.get("taskinfoitems"));
    let show_rate = items.is_empty() || items.iter().any(|i| i == "rate_limit");
    let names =
        sh.registry
            .names()
            .into_iter()
            .map(|n| match sh.limits.rate(&n).filter(|_| show_rate) {
                Some(r) => format!("{n} [rate_limit={r}]"),
                None => n,
            });
    Value::Array(names.map(Value::String).collect())
}

/// `task_id` as Celery sends it: one id or a list.
fn id_list(v: Option<&Value>) -> Vec<String> {
    match v {
        Some(Value::String(s)) => vec![s.clone()],
        Some(Value::Array(a)) => a
            .iter()
            .filter_map(Value::as_str)
            .map(str::to_owned)
            .collect(),
        _ => Vec::new(),
    }
}

/// The REVOKED record remote control stores for `id`.
fn revoked_record(sh: &Shared, id: &str) -> String {
    let exc = ExceptionInfo::celery("TaskRevokedError", "revoked");
    let record = TaskResult::new(
        id,
        TaskState::Revoked,
        exc.to_value(),
        Provenance {
            name: "",
            worker: &sh.id,
            retries: 0,
            queue: "",
            parent_id: None,
        },
    );
    serde_json::to_string(&record).unwrap_or_default()
}

/// Celery's `revoke`: every worker that receives it marks the ids revoked
/// in Redis (so whichever worker takes the task skips it, also after a
/// restart, for `result_expires`) and records REVOKED for tasks not
/// started; with `terminate`, running ones are stopped. Without Redis
/// (RabbitMQ with PostgreSQL results) the result row is the mark: a task
/// with a PENDING row is revoked there as through the web API; one without
/// a row (sent by a client that records no PENDING, as Celery's) is skipped
/// by the workers that received the command, as Celery's workers do.
async fn revoke(sh: &Arc<Shared>, ids: &[String], terminate: bool) -> Value {
    #[cfg(feature = "amqp")]
    if sh.backend.records_redis().is_none() && sh.backend.amqp().is_some() {
        let mut states = sh.backend.task_states(crate::backend::Use::Request);
        for id in ids {
            let record = revoked_record(sh, id);
            if let Err(e) = states.revoke(id, &record, sh.settings.result_expires).await {
                tracing::warn!(task_id = %id, error = %e, "cannot record a revocation in the result store; this worker still skips the task");
            }
        }
    }
    if let Some(broker) = sh.backend.records_redis() {
        let ttl = u64::try_from(sh.settings.result_expires.as_millis()).unwrap_or(u64::MAX);
        for id in ids {
            let record = revoked_record(sh, id);
            let mut lane = broker.backend_pool().shared_lane();
            let mut inv = super::pidbox::REVOKE.prepare_invoke();
            inv.key(result_key(id))
                .key(broker.keys().revoked(id))
                .arg(record)
                .arg(ttl);
            let r: Result<String, crate::broker::BrokerError> = async {
                crate::broker::on_lane!(&mut lane, "revoke task", |c| inv.invoke_async(c))
            }
            .await;
            if let Err(e) = r {
                tracing::warn!(task_id = %id, error = %e, "cannot record a revocation in Redis; this worker still skips the task");
            }
        }
    }
    let terminated = sh.monitor.revoke(ids, terminate);
    let shown = format!(
        "{{{}}}",
        ids.iter()
            .map(|i| py_repr(&json!(i)))
            .collect::<Vec<_>>()
            .join(", ")
    );
    if terminate {
        if terminated.is_empty() {
            return ok("terminate: tasks unknown");
        }
        return ok(format!("terminate: {}", terminated.join(", ")));
    }
    tracing::info!(tasks = %ids.join(", "), "tasks flagged as revoked");
    ok(format!("tasks {shown} flagged as revoked"))
}

fn queue_dict(q: &str) -> Value {
    json!({
        "name": q,
        "exchange": {
            "name": q, "type": "direct", "arguments": null, "durable": true,
            "passive": false, "auto_delete": false, "delivery_mode": null, "no_declare": false,
        },
        "routing_key": q,
        "queue_arguments": null,
        "binding_arguments": null,
        "consumer_arguments": null,
        "durable": true,
        "exclusive": false,
        "auto_delete": false,
        "no_ack": false,
        "alias": null,
        "bindings": [],
        "no_declare": null,
        "expires": null,
        "message_ttl": null,
        "max_length": null,
        "max_length_bytes": null,
        "max_priority": null,
    })
}

/// The broker as `celery inspect stats` describes it.
struct BrokerInfo {
    host: String,
    port: u16,
    vhost: String,
    ssl: bool,
    user: Option<String>,
    transport: &'static str,
}

fn broker_info(sh: &Arc<Shared>) -> BrokerInfo {
    #[cfg(feature = "amqp")]
    if let Some(amqp) = sh.backend.amqp() {
        let (host, port, vhost, ssl, user) = amqp.broker_summary();
        return BrokerInfo {
            host,
            port,
            vhost,
            ssl,
            user: Some(user),
            transport: "amqp",
        };
    }
    let (host, port, db) = sh.backend.redis().map_or((String::new(), 0, 0), |b| {
        let target = b.broker_pool().target();
        let (h, p) = target.host_port();
        (h, p, target.db())
    });
    BrokerInfo {
        host,
        port,
        vhost: db.to_string(),
        ssl: false,
        user: None,
        transport: "redis",
    }
}

fn stats(sh: &Arc<Shared>) -> Value {
    let m = &sh.monitor;
    let (_, totals) = m.totals();
    let broker = broker_info(sh);
    json!({
        "total": totals,
        "pid": std::process::id(),
        "clock": m.events.clock.value().to_string(),
        "uptime": m.started.elapsed().as_secs(),
        "pool": {
            "implementation": "taskstack (tokio tasks)",
            "max-concurrency": sh.settings.concurrency,
            "processes": [std::process::id()],
            "max-tasks-per-child": "N/A",
            "put-guarded-by-semaphore": false,
            "timeouts": [0, 0],
            "writes": {},
        },
        "broker": {
            "hostname": broker.host,
            "userid": broker.user,
            "virtual_host": broker.vhost,
            "port": broker.port,
            "insist": false,
            "ssl": broker.ssl,
            "transport": broker.transport,
            "connect_timeout": 4,
            "transport_options": {},
            "login_method": null,
            "uri_prefix": null,
            "heartbeat": 120.0,
            "failover_strategy": "round-robin",
            "alternates": [],
        },
        "prefetch_count": sh.settings.prefetch,
        "rusage": rusage(),
        "taskstack": {
            "worker_id": sh.id,
            "processed": Stats::get(&sh.stats.processed),
            "succeeded": Stats::get(&sh.stats.succeeded),
            "failed": Stats::get(&sh.stats.failed),
            "retried": Stats::get(&sh.stats.retried),
            "revoked": Stats::get(&sh.stats.revoked),
            "dead_lettered": Stats::get(&sh.stats.dead_lettered),
            "events_dropped": m.events.dropped(),
            "remote_control": sh.settings.remote_control.as_str(),
            "task_events": m.events.task_events(),
        },
    })
}

#[allow(unsafe_code)]
fn rusage() -> Value {
    // SAFETY: getrusage fills the zeroed struct it is given.
    let mut u: libc::rusage = unsafe { std::mem::zeroed() };
    if unsafe { libc::getrusage(libc::RUSAGE_SELF, &raw mut u) } != 0 {
        return json!({});
    }
    let secs = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    json!({
        "utime": secs(u.ru_utime),
        "stime": secs(u.ru_stime),
        "maxrss": u.ru_maxrss,
        "ixrss": u.ru_ixrss,
        "idrss": u.ru_idrss,
        "isrss": u.ru_isrss,
        "minflt": u.ru_minflt,
        "majflt": u.ru_majflt,
        "nswap": u.ru_nswap,
        "inblock": u.ru_inblock,
        "oublock": u.ru_oublock,
        "msgsnd": u.ru_msgsnd,
        "msgrcv": u.ru_msgrcv,
        "nsignals": u.ru_nsignals,
        "nvcsw": u.ru_nvcsw,
        "nivcsw": u.ru_nivcsw,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn modes_gate_commands_and_say_why() {
        assert!(allowed(RemoteControl::Inspect, "ping").is_ok());
        assert!(allowed(RemoteControl::Inspect, "revoke").is_err());
        assert!(allowed(RemoteControl::Control, "revoke").is_ok());
        let e = allowed(RemoteControl::Control, "shutdown").expect_err("refused");
        assert!(e["error"].as_str().unwrap_or("").contains("\"all\""), "{e}");
        assert!(allowed(RemoteControl::All, "shutdown").is_ok());
        assert!(allowed(RemoteControl::Inspect, "no_such").is_ok());
        for m in [
            "add_consumer",
            "cancel_consumer",
            "rate_limit",
            "time_limit",
        ] {
            assert!(allowed(RemoteControl::Control, m).is_ok(), "{m}");
            assert!(allowed(RemoteControl::Inspect, m).is_err(), "{m}");
        }
    }
}
