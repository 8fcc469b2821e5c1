//! Celery's remote control and monitoring events with RabbitMQ as the
//! broker: the real Python Celery 5 CLI (`celery inspect`, `celery
//! control`, `AsyncResult.revoke`), `celery events --dump` and Flower
//! against real `taskstack-worker` processes on a real RabbitMQ node (a
//! vhost per test), results on a real Redis.

use anyhow::{Context as _, Result, ensure};
use serde_json::{Value, json};
use std::path::Path;
use std::process::Command;
use std::time::Duration;
use taskstack_integration::monitors::Monitors;
use taskstack_integration::python::{celery_json, celery_python, control_client, interop_cmd};
use taskstack_integration::rabbitmq_server as rabbit;
use taskstack_integration::{RedisServer, WebProcess, WorkerProcess, namespace, wait_until_sync};

const LONG: Duration = Duration::from_secs(60);

/// A vhost on the shared RabbitMQ node and a Redis for results, as the
/// workers and the Python side see them.
struct Stack {
    amqp: String,
    redis: RedisServer,
    ns: String,
}

impl Stack {
    fn new(hint: &str) -> Result<Self> {
        Ok(Self {
            amqp: rabbit::shared().vhost(hint),
            redis: RedisServer::start()?,
            ns: namespace(hint),
        })
    }

    fn worker(&self, extra: &[(&str, &str)]) -> Result<WorkerProcess> {
        let redis = self.redis.url();
        let mut env = vec![
            ("TASKSTACK_BROKER_URL", self.amqp.as_str()),
            ("TASKSTACK_RESULT_BACKEND", redis.as_str()),
        ];
        env.extend_from_slice(extra);
        let w = WorkerProcess::spawn(&redis, &self.ns, &env)?;
        w.wait_log("worker ready", LONG).with_context(|| w.log())?;
        Ok(w)
    }

    fn python(&self, python: &Path) -> Command {
        interop_cmd(python, &self.redis.url(), Some(&self.amqp))
    }

    fn cli(&self, python: &Path, args: &[&str]) -> Result<Option<Value>> {
        celery_json(self.python(python), args)
    }

    /// `celery inspect <what> -d node`: the node's reply.
    fn inspect(&self, python: &Path, what: &str, node: &str) -> Result<Value> {
        let replies = self
            .cli(python, &["inspect", what, "-d", node])?
            .with_context(|| format!("{node} did not answer `celery inspect {what}`"))?;
        Ok(replies[node].clone())
    }

    fn client(&self, python: &Path, args: &[&str]) -> Result<Value> {
        control_client(self.python(python), args)
    }

    fn sent(&self, python: &Path, task: &str, args: &str) -> Result<String> {
        Ok(self.client(python, &["send", task, args])?["id"]
            .as_str()
            .context("no id")?
            .to_owned())
    }

    fn wait_state(&self, python: &Path, id: &str, want: &str, w: &WorkerProcess) -> Result<()> {
        wait_until_sync(&format!("task {id} to be {want}"), LONG, || {
            let s = self.client(python, &["state", id]).ok()?;
            (s["state"] == want).then_some(())
        })
        .with_context(|| format!("worker log:\n{}", w.log()))
    }
}

#[test]
fn celery_inspect_control_and_revoke_reach_our_workers_over_rabbitmq() -> Result<()> {
    let python = celery_python()?;
    let s = Stack::new("amqp-control")?;
    let mut a = s.worker(&[("TASKSTACK_WORKER_REMOTE_CONTROL", "all")])?;
    let b = s.worker(&[])?;

    // Default names, one per worker: the second finds the first's pidbox
    // queue held (exclusive) and adds its pid.
    let names = wait_until_sync("both workers to answer ping", LONG, || {
        let v = s.cli(&python, &["inspect", "ping"]).ok()??;
        let names: Vec<String> = v.as_object()?.keys().cloned().collect();
        (names.len() == 2).then_some(names)
    })
    .with_context(|| format!("a:\n{}\nb:\n{}", a.log(), b.log()))?;
    let b_name = names
        .iter()
        .find(|n| n.starts_with(&format!("taskstack-{}@", b.pid())))
        .with_context(|| format!("b's name in {names:?}"))?
        .clone();
    let a_name = names
        .iter()
        .find(|n| **n != b_name)
        .context("a's name")?
        .clone();
    assert!(a_name.starts_with("taskstack@"), "{names:?}");

    let stats = s.inspect(&python, "stats", &a_name)?;
    assert_eq!(stats["broker"]["transport"], "amqp", "{stats}");
    assert_eq!(stats["pid"], json!(a.pid()), "{stats}");
    let queues = s.inspect(&python, "active_queues", &a_name)?;
    assert_eq!(queues[0]["name"], "celery", "{queues}");
    let registered = s.inspect(&python, "registered", &b_name)?;
    assert!(
        registered
            .as_array()
            .is_some_and(|r| r.contains(&json!("taskstack.add"))),
        "{registered}"
    );

    // A running task stopped by AsyncResult.revoke(terminate=True).
    let long = s.sent(&python, "taskstack.sleep", "[120]")?;
    let runner = wait_until_sync("the sleep task to be active", LONG, || {
        names.iter().find_map(|n| {
            let active = s.inspect(&python, "active", n).ok()?;
            active
                .as_array()?
                .iter()
                .any(|t| t["id"] == long.as_str())
                .then(|| n.clone())
        })
    })?;
    s.client(&python, &["revoke_terminate", &long])?;
    s.wait_state(&python, &long, "REVOKED", &a)?;
    assert_eq!(s.inspect(&python, "active", &runner)?, json!([]));

    // Revoked before it is sent: it never runs, on whichever worker.
    let early = uuid::Uuid::new_v4().to_string();
    s.client(&python, &["revoke", &early])?;
    for n in &names {
        wait_until_sync("the revoke to be recorded", LONG, || {
            let r = s.inspect(&python, "revoked", n).ok()?;
            r.as_array()?.contains(&json!(early)).then_some(())
        })?;
    }
    s.client(&python, &["send", "taskstack.add", "[1, 2]", &early])?;
    s.wait_state(&python, &early, "REVOKED", &a)?;
    let add = s.sent(&python, "taskstack.add", "[2, 3]")?;
    s.wait_state(&python, &add, "SUCCESS", &a)?;

    // add_consumer: b serves a new queue at once.
    let extra = format!("extra-{}", &uuid::Uuid::new_v4().simple().to_string()[..8]);
    let out = s
        .python(&python)
        .args([
            "-m",
            "celery",
            "-A",
            "interop_tasks",
            "control",
            "add_consumer",
        ])
        .args([extra.as_str(), "-d", b_name.as_str()])
        .output()?;
    ensure!(
        out.status.success(),
        "add_consumer: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let queues = s.inspect(&python, "active_queues", &b_name)?;
    assert!(
        queues
            .as_array()
            .is_some_and(|q| q.iter().any(|q| q["name"] == extra.as_str())),
        "{queues}"
    );
    let id = s.client(&python, &["send", "taskstack.add", "[4, 5]", "", &extra])?["id"]
        .as_str()
        .context("no id")?
        .to_owned();
    s.wait_state(&python, &id, "SUCCESS", &b)?;

    // Unknown commands get Celery's error; shutdown obeys `all` only.
    let r = s.client(&python, &["broadcast", "no_such_command", "{}"])?;
    assert!(
        r["replies"]
            .as_array()
            .is_some_and(|v| v
                .contains(&json!({ a_name.clone(): {"error": "KeyError('no_such_command')"} }))),
        "{r}"
    );
    let out = s
        .python(&python)
        .args(["-m", "celery", "-A", "interop_tasks", "control", "shutdown"])
        .output()?;
    eprintln!(
        "celery control shutdown: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    let status = a.wait_exit(LONG)?;
    assert!(status.success(), "{status}\n{}", a.log());
    assert!(b.is_running(), "b refuses shutdown:\n{}", b.log());
    let left = s.cli(&python, &["inspect", "ping"])?.context("b answers")?;
    assert_eq!(left.as_object().map(|o| o.len()), Some(1), "{left}");
    Ok(())
}

/// Consumers of `queue` in `vhost`, `None` while it does not exist.
fn consumers(vhost: &str, queue: &str) -> Option<u64> {
    rabbit::shared()
        .list_queues(vhost, &["name", "consumers"])
        .into_iter()
        .find_map(|row| match row.as_slice() {
            [name, n] if name == queue => n.parse().ok(),
            _ => None,
        })
}

#[test]
fn with_remote_control_off_the_name_is_held_again_after_the_connection_breaks() -> Result<()> {
    let python = celery_python()?;
    let s = Stack::new("amqp-control-off")?;
    let node = "off@rc-test";
    let w = s.worker(&[
        ("TASKSTACK_WORKER_REMOTE_CONTROL", "off"),
        ("TASKSTACK_WORKER_NODENAME", node),
    ])?;
    let vhost = rabbit::vhost_of(&s.amqp).to_owned();
    let pidbox = format!("{node}.celery.pidbox");
    // The name is held by a consumed queue, and nothing answers.
    wait_until_sync("the pidbox queue to be consumed", LONG, || {
        (consumers(&vhost, &pidbox) == Some(1)).then_some(())
    })
    .with_context(|| w.log())?;
    ensure!(
        s.cli(&python, &["inspect", "ping", "-d", node])?.is_none(),
        "a worker with remote control off answered ping"
    );
    // Every connection of the vhost is closed: the exclusive queue goes
    // with the worker's, and the worker holds the name again.
    rabbit::shared().ctl(&["close_all_connections", "-p", &vhost, "test"]);
    w.wait_log("the remote-control connection to RabbitMQ ended", LONG)?;
    wait_until_sync("the pidbox queue to be consumed again", LONG, || {
        (consumers(&vhost, &pidbox) == Some(1)).then_some(())
    })
    .with_context(|| w.log())?;
    // And the worker still runs tasks.
    let id = s.sent(&python, "taskstack.add", "[2, 3]")?;
    s.wait_state(&python, &id, "SUCCESS", &w)?;
    Ok(())
}

#[test]
fn workers_started_while_rabbitmq_is_down_get_distinct_names() -> Result<()> {
    let python = celery_python()?;
    let mut node = rabbit::Rabbit::start();
    let s = Stack {
        amqp: node.vhost("amqp-names-down"),
        redis: RedisServer::start()?,
        ns: namespace("amqp-names-down"),
    };
    node.stop();
    let redis = s.redis.url();
    let env = [
        ("TASKSTACK_BROKER_URL", s.amqp.as_str()),
        ("TASKSTACK_RESULT_BACKEND", redis.as_str()),
    ];
    let a = WorkerProcess::spawn(&redis, &s.ns, &env)?;
    let b = WorkerProcess::spawn(&redis, &s.ns, &env)?;
    for w in [&a, &b] {
        w.wait_log("cannot claim the node name on RabbitMQ", LONG)
            .with_context(|| w.log())?;
    }
    node.start_again();
    // Both would have taken `taskstack@<host>` unchecked: the second to
    // reach RabbitMQ would have found its pidbox queue held and answered
    // nothing.
    let names = wait_until_sync("both workers to answer ping", LONG, || {
        let v = s.cli(&python, &["inspect", "ping"]).ok()??;
        let names: Vec<String> = v.as_object()?.keys().cloned().collect();
        (names.len() == 2).then_some(names)
    })
    .with_context(|| format!("a:\n{}\nb:\n{}", a.log(), b.log()))?;
    for w in [&a, &b] {
        let own = format!("taskstack-{}@", w.pid());
        assert!(names.iter().any(|n| n.starts_with(&own)), "{names:?}");
    }
    Ok(())
}

#[test]
fn flower_and_celery_events_show_our_worker_and_web_over_rabbitmq() -> Result<()> {
    let python = Monitors::python()?;
    let s = Stack::new("amqp-events")?;
    let node = format!("ev@{}", s.ns);
    let worker = s.worker(&[
        ("TASKSTACK_WORKER_NODENAME", &node),
        ("TASKSTACK_WORKER_SEND_TASK_EVENTS", "1"),
    ])?;
    let monitors = Monitors::start(|| s.python(&python))?;
    // The event consumers bind their queues once connected: wait until
    // the dump shows the worker's heartbeat before sending tasks.
    wait_until_sync("celery events --dump to see the worker", LONG, || {
        monitors.dump().contains(&node).then_some(())
    })
    .with_context(|| worker.log())?;

    // The web API's `task-sent` events go to RabbitMQ too.
    let redis = s.redis.url();
    let rt = tokio::runtime::Runtime::new()?;
    let web = rt.block_on(WebProcess::spawn(
        &redis,
        &s.ns,
        &[
            ("TASKSTACK_BROKER_URL", s.amqp.as_str()),
            ("TASKSTACK_RESULT_BACKEND", redis.as_str()),
            ("TASKSTACK_TASK_SEND_SENT_EVENT", "true"),
        ],
    ))?;
    let body = json!({"task": "taskstack.add", "args": [1, 1]});
    let (status, v) = rt.block_on(web.call("POST", "/api/v1/tasks", Some(&body)))?;
    ensure!(status == 202, "enqueue through the web: {status} {v}");
    let from_web = v["id"].as_str().context("no id")?.to_owned();

    let ok = s.sent(&python, "taskstack.add", "[20, 22]")?;
    let bad = s.sent(&python, "taskstack.fail", "[\"boom\"]")?;
    let tasks = wait_until_sync("Flower to list both tasks as finished", LONG, || {
        let v = monitors.api("/api/tasks")?;
        (v[&ok]["state"] == "SUCCESS" && v[&bad]["state"] == "FAILURE").then_some(v)
    })
    .with_context(|| {
        format!(
            "worker log:\n{}\nflower log:\n{}",
            worker.log(),
            monitors.flower_log()
        )
    })?;
    assert_eq!(tasks[&ok]["result"], "42", "{}", tasks[&ok]);
    assert_eq!(tasks[&ok]["worker"], node.as_str(), "{}", tasks[&ok]);

    // Flower's worker page asks the worker through the pidbox.
    let workers = wait_until_sync("Flower to list the worker", LONG, || {
        let v = monitors.api("/api/workers?refresh=1")?;
        v.get(&node).filter(|w| w.get("stats").is_some()).cloned()
    })
    .with_context(|| monitors.flower_log())?;
    assert_eq!(workers["stats"]["broker"]["transport"], "amqp", "{workers}");
    let dump = wait_until_sync("celery events --dump to show the tasks", LONG, || {
        let d = monitors.dump();
        (d.contains(&ok) && d.contains("task succeeded")).then_some(d)
    })?;
    let sent = dump
        .lines()
        .find(|l| l.contains(&from_web) && l.contains("task sent"))
        .with_context(|| {
            format!(
                "no task-sent event of {from_web} in:\n{dump}\nweb log:\n{}",
                web.log()
            )
        })?;
    assert!(sent.contains("taskstack.add"), "{sent}");
    assert!(dump.contains(&format!("{node} [")), "{dump}");
    Ok(())
}
