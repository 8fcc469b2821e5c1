//! The production checklist as a pure function of what was observed
//! ([`Facts`]), so every pass/fail rule is unit-tested without an engine.

use crate::compose::is_loopback;
use crate::engine::{ContainerInfo, ExecOutput, Health, Published};
use crate::plan::Role;
use serde::Serialize;
use std::time::Duration;
use taskstack::broker::QueueCounts;

/// An observation that may have failed (Err says why).
pub type Probe<T> = Result<T, String>;

/// One check's outcome.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Check {
    /// Stable id (`redis.password`, `service.web`, ...).
    pub id: String,
    pub ok: bool,
    /// Why it passed or failed.
    pub reason: String,
}

/// A service and its containers as inspected.
#[derive(Debug, Clone)]
pub struct ServiceFacts {
    pub name: String,
    pub role: Role,
    /// Replicas the compose file asks for.
    pub expected: usize,
    pub containers: Vec<ContainerInfo>,
}

/// What Redis answered (through `redis-cli` run in its container).
#[derive(Debug, Clone)]
pub struct RedisFacts {
    pub container: String,
    /// `PING` without credentials.
    pub unauthenticated_ping: Probe<ExecOutput>,
    pub appendonly: Probe<String>,
    pub maxmemory_policy: Probe<String>,
    pub published: Vec<Published>,
}

/// The beat leader lock's holder (the lock's JSON value).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct LockHolder {
    pub id: String,
    pub host: String,
    pub pid: u64,
    pub since: String,
}

/// `<ns>:beat:lock` as read.
#[derive(Debug, Clone)]
pub struct LockFacts {
    /// None when the key's value is not the expected JSON.
    pub holder: Option<LockHolder>,
    pub raw: String,
    pub pttl_ms: i64,
}

/// A worker heartbeat record (the fields verify reads).
#[derive(Debug, Clone, PartialEq, Eq, serde::Deserialize)]
pub struct WorkerRecord {
    pub id: String,
    pub host: String,
    #[serde(default)]
    pub queues: Vec<String>,
    /// The tasks it runs (built-in, its binary's own, declared).
    #[serde(default)]
    pub tasks: Vec<String>,
}

/// The end-to-end smoke task.
#[derive(Debug, Clone)]
pub struct SmokeFacts {
    pub task_id: String,
    pub expected: i64,
    /// The last state read (SUCCESS, PENDING, ...).
    pub state: String,
    pub result: serde_json::Value,
    pub elapsed: Duration,
}

/// Everything verify observed.
#[derive(Debug, Clone)]
pub struct Facts {
    pub allow_standby_beats: bool,
    pub services: Vec<ServiceFacts>,
    /// None: no running Redis container to ask (or none in use).
    pub redis: Option<RedisFacts>,
    /// Whether the services keep anything on Redis (false: RabbitMQ broker
    /// and PostgreSQL results; then no Redis check applies).
    pub uses_redis: bool,
    /// A running Redis container while no service uses Redis.
    pub unused_redis: Option<String>,
    /// None: no lock key.
    pub beat_lock: Probe<Option<LockFacts>>,
    pub beat_lock_ttl: Duration,
    pub workers: Probe<Vec<WorkerRecord>>,
    /// Queues `/health` requires a live worker on (the web's `queues`).
    pub queues: Vec<String>,
    /// Each of those queues' messages (`taskstack::broker::queue_counts`).
    pub queue_counts: Probe<Vec<(String, QueueCounts)>>,
    /// Status of `GET /health` on the published web port.
    pub web_health: Probe<u16>,
    pub smoke: Probe<SmokeFacts>,
    /// Where results are kept (on Redis: the smoke record's PTTL).
    pub results: super::results::ResultsFacts,
    /// The broker when it is RabbitMQ (or a RabbitMQ service exists).
    pub broker: super::rabbitmq::BrokerFacts,
    /// Redis behind Sentinel, when a service's URL is `redis+sentinel://`.
    pub ha: Option<super::ha::HaFacts>,
}

impl Facts {
    fn role(&self, role: Role) -> impl Iterator<Item = &ContainerInfo> {
        self.services
            .iter()
            .filter(move |s| s.role == role)
            .flat_map(|s| s.containers.iter())
    }
}

/// The tasks each live worker announces; workers that serve one queue
/// must run the same tasks (a message on that queue may reach any of them,
/// and one without its task dead-letters it as unknown).
fn worker_tasks(records: &[WorkerRecord]) -> (bool, String) {
    use std::collections::{BTreeMap, BTreeSet};
    let mut problems = Vec::new();
    let mut served: BTreeMap<&str, Vec<&WorkerRecord>> = BTreeMap::new();
    for r in records {
        if r.tasks.is_empty() {
            problems.push(format!("worker {} announces no task", r.id));
        }
        for q in &r.queues {
            served.entry(q).or_default().push(r);
        }
    }
    for (queue, workers) in &served {
        let all: BTreeSet<&str> = workers
            .iter()
            .flat_map(|w| w.tasks.iter().map(String::as_str))
            .collect();
        for w in workers {
            let missing: Vec<&str> = all
                .iter()
                .copied()
                .filter(|t| !w.tasks.iter().any(|x| x == t))
                .collect();
            if !missing.is_empty() {
                problems.push(format!(
                    "worker {} serves queue {queue} but lacks {} that other workers there run",
                    w.id,
                    missing.join(", ")
                ));
            }
        }
    }
    if !problems.is_empty() {
        return (false, problems.join("; "));
    }
    let mut sets: BTreeMap<Vec<&str>, Vec<&str>> = BTreeMap::new();
    for r in records {
        let mut tasks: Vec<&str> = r.tasks.iter().map(String::as_str).collect();
        tasks.sort_unstable();
        sets.entry(tasks).or_default().push(&r.id);
    }
    let each: Vec<String> = sets
        .iter()
        .map(|(tasks, ids)| format!("{}: {}", ids.join(", "), tasks.join(", ")))
        .collect();
    (true, each.join("; "))
}

fn check(id: &str, ok: bool, reason: impl Into<String>) -> Check {
    Check {
        id: id.to_owned(),
        ok,
        reason: reason.into(),
    }
}

fn probe<T>(id: &str, p: &Probe<T>, f: impl FnOnce(&T) -> (bool, String)) -> Check {
    match p {
        Ok(v) => {
            let (ok, reason) = f(v);
            check(id, ok, reason)
        }
        Err(e) => check(id, false, e.clone()),
    }
}

/// The uid a container runs as, from its configured user (`uid[:gid]`;
/// empty and `root` are 0; another name is unknown).
pub fn configured_uid(user: &str) -> Option<u32> {
    let u = user.split(':').next().unwrap_or("");
    match u {
        "" | "root" => Some(0),
        u => u.parse().ok(),
    }
}

/// How much earlier than the container's recorded start a lock must have
/// been taken to count as a previous life's: the engine records `StartedAt`
/// only after the process runs, and a beat takes a free lock within
/// milliseconds, so a live holder's `since` can precede it slightly.
const START_SLACK: chrono::TimeDelta = chrono::TimeDelta::seconds(1);

/// Whether a lock taken at `since` predates the container's last start
/// (both RFC 3339) by more than [`START_SLACK`]; false when either is
/// unknown.
fn taken_before_start(since: &str, started_at: Option<&str>) -> bool {
    let parse = |s: &str| chrono::DateTime::parse_from_rfc3339(s).ok();
    match (parse(since), started_at.and_then(parse)) {
        (Some(since), Some(started)) => since + START_SLACK < started,
        _ => false,
    }
}

/// Evaluates every check.
pub fn evaluate(f: &Facts) -> Vec<Check> {
    let mut out = Vec::new();

    for s in &f.services {
        let id = format!("service.{}", s.name);
        let mut problems = Vec::new();
        if s.containers.is_empty() {
            problems.push("no container".to_owned());
        }
        for c in &s.containers {
            if !c.running {
                problems.push(format!(
                    "{} is {} (exit code {})",
                    c.name,
                    c.state,
                    c.exit_code.unwrap_or_default()
                ));
            } else if !matches!(c.health, Health::Healthy | Health::None) {
                problems.push(format!("{} is {}", c.name, c.health));
            }
            if matches!(c.restart_policy.as_str(), "" | "no") {
                problems.push(format!("{} has no restart policy", c.name));
            }
        }
        if problems.is_empty() {
            let policy = s
                .containers
                .first()
                .map_or("", |c| c.restart_policy.as_str());
            let health = if s.containers.iter().all(|c| c.health == Health::None) {
                "running"
            } else {
                "running and healthy"
            };
            let count = if s.containers.len() == s.expected {
                format!("{}", s.containers.len())
            } else {
                format!("{} (the file asks for {})", s.containers.len(), s.expected)
            };
            out.push(check(
                &id,
                true,
                format!("{count} {health}, restart {policy}"),
            ));
        } else {
            out.push(check(&id, false, problems.join("; ")));
        }
    }

    match &f.redis {
        None if !f.uses_redis => {
            if let Some(c) = &f.unused_redis {
                out.push(check(
                    "redis.unused",
                    false,
                    format!(
                        "{c} runs but no service keeps anything on Redis (broker_url amqp://..., \
                         result_backend postgresql://...); `stackctl up` does not start it"
                    ),
                ));
            }
        }
        None => {
            for id in ["redis.password", "redis.appendonly", "redis.noeviction"] {
                out.push(check(id, false, "no running Redis container to ask"));
            }
        }
        Some(r) => {
            out.push(probe("redis.password", &r.unauthenticated_ping, |o| {
                let text = format!("{}{}", o.stdout, o.stderr);
                if o.exit_code != Some(0) && (text.contains("NOAUTH") || text.contains("WRONGPASS") || text.contains("NOPERM")) {
                    (true, format!("an unauthenticated PING is refused ({})", text.trim()))
                } else if text.contains("PONG") {
                    (false, "an unauthenticated PING answered PONG: Redis accepts clients without a password".into())
                } else {
                    (false, format!("unexpected answer to an unauthenticated PING (exit {:?}): {}", o.exit_code, text.trim()))
                }
            }));
            out.push(probe("redis.appendonly", &r.appendonly, |v| {
                (v == "yes", format!("appendonly {v}"))
            }));
            out.push(probe("redis.noeviction", &r.maxmemory_policy, |v| {
                (v == "noeviction", format!("maxmemory-policy {v}"))
            }));
        }
    }
    let published: Vec<String> = f
        .role(Role::Redis)
        .flat_map(|c| c.published.iter().map(move |p| (c, p)))
        .filter(|(_, p)| !is_loopback(&p.host_ip))
        .map(|(c, p)| {
            format!(
                "{} on {}:{}",
                c.name,
                if p.host_ip.is_empty() {
                    "0.0.0.0"
                } else {
                    &p.host_ip
                },
                p.host_port
            )
        })
        .collect();
    out.extend(if published.is_empty() {
        if !f.uses_redis && f.unused_redis.is_none() {
            None
        } else {
            Some(check(
                "redis.not_published",
                true,
                "no port published on a non-loopback address",
            ))
        }
    } else {
        Some(check(
            "redis.not_published",
            false,
            format!("published on a public address: {}", published.join(", ")),
        ))
    });

    let beats: Vec<&ContainerInfo> = f.role(Role::Beat).filter(|c| c.running).collect();
    out.push(match beats.len() {
        0 => check("beat.single", false, "no beat container is running"),
        1 => check("beat.single", true, format!("one beat ({})", beats[0].name)),
        n if f.allow_standby_beats => check("beat.single", true, format!("{n} beats, standbys allowed (--allow-standby-beats); the lock keeps one active")),
        n => check("beat.single", false, format!("{n} beat containers run ({}); one schedules, the rest stand by — allow it with --allow-standby-beats", beats.iter().map(|c| c.name.as_str()).collect::<Vec<_>>().join(", "))),
    });
    out.push(probe("beat.lock", &f.beat_lock, |lock| match lock {
        None => (false, "no beat holds the leader lock".into()),
        Some(LockFacts {
            holder: None, raw, ..
        }) => (
            false,
            format!("the lock's value is not a holder record: {raw}"),
        ),
        Some(LockFacts {
            holder: Some(h),
            pttl_ms,
            ..
        }) => match beats.iter().find(|c| c.hostname == h.host) {
            // A lock taken before its container last started belongs to a
            // process that died with the restart: nobody schedules until
            // it expires.
            Some(c) if taken_before_start(&h.since, c.started_at.as_deref()) => (
                false,
                format!(
                    "held by {} ({}), a process that died when {} restarted; a live beat takes over when it expires in {} ms",
                    h.id, h.since, c.name, pttl_ms
                ),
            ),
            Some(c) => (
                true,
                format!(
                    "held by {} ({}, pid {}, since {})",
                    c.name, h.id, h.pid, h.since
                ),
            ),
            None => (
                false,
                format!(
                    "held by {} on host {}, which is not a running beat container of this project",
                    h.id, h.host
                ),
            ),
        },
    }));
    let ttl_ms = i64::try_from(f.beat_lock_ttl.as_millis()).unwrap_or(i64::MAX);
    out.push(probe("beat.lock_ttl", &f.beat_lock, |lock| match lock {
        None => (false, "no lock".into()),
        Some(l) if l.pttl_ms > 0 && l.pttl_ms <= ttl_ms + 1000 => (
            true,
            format!("expires in {} ms (TTL {} ms)", l.pttl_ms, ttl_ms),
        ),
        Some(l) if l.pttl_ms == -1 => (
            false,
            "the lock never expires: a dead leader would hold it forever".into(),
        ),
        Some(l) => (
            false,
            format!(
                "PTTL {} ms, expected within (0, {}] ms",
                l.pttl_ms,
                ttl_ms + 1000
            ),
        ),
    }));

    let workers: Vec<&ContainerInfo> = f.role(Role::Worker).filter(|c| c.running).collect();
    out.push(probe("workers.heartbeat", &f.workers, |records| {
        let mut problems = Vec::new();
        for c in &workers {
            if !records.iter().any(|r| r.host == c.hostname) {
                problems.push(format!("{} has no heartbeat record", c.name));
            }
        }
        for q in &f.queues {
            if !records.iter().any(|r| r.queues.contains(q)) {
                problems.push(format!("no live worker serves queue {q}"));
            }
        }
        if workers.is_empty() {
            problems.push("no worker container is running".into());
        }
        if problems.is_empty() {
            (
                true,
                format!(
                    "{} worker(s) heartbeating; queues {}",
                    workers.len(),
                    f.queues.join(", ")
                ),
            )
        } else {
            (false, problems.join("; "))
        }
    }));
    out.push(probe("workers.tasks", &f.workers, |records| {
        worker_tasks(records)
    }));
    // On RabbitMQ the queues' counts are `rabbitmq.queues`' (the Redis
    // lists are not where the messages are).
    if !f.broker.uses_rabbitmq() {
        out.push(probe("queues.readable", &f.queue_counts, |counts| {
            let each: Vec<String> = counts
                .iter()
                .map(|(q, c)| {
                    let delayed = c.delayed.map_or("?".to_owned(), |d| d.to_string());
                    format!(
                        "{q}: {} ready, {delayed} delayed, {} in flight, {} dead-lettered",
                        c.ready, c.in_flight, c.dead_lettered
                    )
                })
                .collect();
            (true, each.join("; "))
        }));
    }
    let mut root = Vec::new();
    for c in f.role(Role::Worker) {
        if configured_uid(&c.user) == Some(0) || c.process_uid == Some(0) {
            root.push(format!("{} runs as root (user {:?})", c.name, c.user));
        }
    }
    let all_workers = f.role(Role::Worker).count();
    out.push(if root.is_empty() && all_workers > 0 {
        let users: Vec<String> = f
            .role(Role::Worker)
            .map(|c| c.user.clone())
            .collect::<std::collections::BTreeSet<_>>()
            .into_iter()
            .collect();
        check(
            "workers.non_root",
            true,
            format!("user {}", users.join(", ")),
        )
    } else if all_workers == 0 {
        check("workers.non_root", false, "no worker container")
    } else {
        check("workers.non_root", false, root.join("; "))
    });

    out.push(probe("web.health", &f.web_health, |s| {
        (*s == 200, format!("GET /health answered {s}"))
    }));
    out.push(probe("smoke.add", &f.smoke, |s| {
        let ok = s.state == "SUCCESS" && s.result.as_i64() == Some(s.expected);
        (
            ok,
            if ok {
                format!(
                    "taskstack.add returned {} in {} ms (task {})",
                    s.result,
                    s.elapsed.as_millis(),
                    s.task_id
                )
            } else {
                format!(
                    "task {} ended {} with {} (expected SUCCESS {})",
                    s.task_id, s.state, s.result, s.expected
                )
            },
        )
    }));
    out.extend(super::rabbitmq::evaluate(&f.broker));
    out.extend(super::results::evaluate(&f.results));
    out.extend(f.ha.iter().flat_map(super::ha::evaluate));
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    fn container(name: &str, host: &str) -> ContainerInfo {
        ContainerInfo {
            id: format!("{name}-id"),
            name: name.into(),
            labels: BTreeMap::new(),
            state: "running".into(),
            running: true,
            exit_code: Some(0),
            oom_killed: false,
            health: Health::Healthy,
            health_log: Vec::new(),
            restart_count: 0,
            started_at: None,
            hostname: host.into(),
            user: "65534:65534".into(),
            restart_policy: "unless-stopped".into(),
            published: Vec::new(),
            process_uid: Some(65534),
            env: Vec::new(),
            image: "img".into(),
        }
    }

    fn svc(name: &str, role: Role, containers: Vec<ContainerInfo>) -> ServiceFacts {
        ServiceFacts {
            name: name.into(),
            role,
            expected: containers.len(),
            containers,
        }
    }

    /// A healthy stack's facts.
    fn good() -> Facts {
        Facts {
            allow_standby_beats: false,
            services: vec![
                svc("redis", Role::Redis, vec![container("p_redis_1", "r1")]),
                svc("beat", Role::Beat, vec![container("p_beat_1", "b1")]),
                svc(
                    "worker",
                    Role::Worker,
                    vec![container("p_worker_1", "w1"), container("p_worker_2", "w2")],
                ),
                svc("web", Role::Web, vec![container("p_web_1", "web1")]),
            ],
            redis: Some(RedisFacts {
                container: "p_redis_1".into(),
                unauthenticated_ping: Ok(ExecOutput {
                    exit_code: Some(1),
                    stdout: "NOAUTH Authentication required.\n".into(),
                    stderr: String::new(),
                }),
                appendonly: Ok("yes".into()),
                maxmemory_policy: Ok("noeviction".into()),
                published: Vec::new(),
            }),
            uses_redis: true,
            unused_redis: None,
            beat_lock: Ok(Some(LockFacts {
                holder: Some(LockHolder {
                    id: "b1.7.abc".into(),
                    host: "b1".into(),
                    pid: 7,
                    since: "2026-11-24T03:00:00Z".into(),
                }),
                raw: String::new(),
                pttl_ms: 9_000,
            })),
            beat_lock_ttl: Duration::from_secs(10),
            workers: Ok(vec![
                WorkerRecord {
                    id: "w1.1".into(),
                    host: "w1".into(),
                    queues: vec!["celery".into()],
                    tasks: vec!["taskstack.add".into(), "invoices.render".into()],
                },
                WorkerRecord {
                    id: "w2.1".into(),
                    host: "w2".into(),
                    queues: vec!["celery".into()],
                    tasks: vec!["invoices.render".into(), "taskstack.add".into()],
                },
            ]),
            queues: vec!["celery".into()],
            queue_counts: Ok(vec![("celery".into(), QueueCounts::default())]),
            web_health: Ok(200),
            smoke: Ok(SmokeFacts {
                task_id: "t".into(),
                expected: 5,
                state: "SUCCESS".into(),
                result: serde_json::json!(5),
                elapsed: Duration::from_millis(30),
            }),
            results: super::super::results::ResultsFacts::redis(Ok(3_599_000)),
            broker: super::super::rabbitmq::BrokerFacts::default(),
            ha: None,
        }
    }

    fn failed(f: &Facts) -> Vec<String> {
        evaluate(f)
            .into_iter()
            .filter(|c| !c.ok)
            .map(|c| format!("{}: {}", c.id, c.reason))
            .collect()
    }

    #[test]
    fn a_healthy_stack_passes_every_check() {
        let checks = evaluate(&good());
        assert!(checks.iter().all(|c| c.ok), "{checks:#?}");
        let lock = checks
            .iter()
            .find(|c| c.id == "beat.lock")
            .expect("beat.lock");
        assert!(
            lock.reason.starts_with("held by p_beat_1 (b1.7.abc"),
            "{}",
            lock.reason
        );
        let tasks = checks
            .iter()
            .find(|c| c.id == "workers.tasks")
            .expect("workers.tasks");
        assert_eq!(tasks.reason, "w1.1, w2.1: invoices.render, taskstack.add");
    }

    #[test]
    fn a_stack_without_redis_has_no_redis_checks_unless_one_runs_unused() {
        let mut f = good();
        f.uses_redis = false;
        f.redis = None;
        f.services.retain(|s| s.role != Role::Redis);
        let checks = evaluate(&f);
        assert!(checks.iter().all(|c| c.ok), "{checks:#?}");
        assert!(
            !checks.iter().any(|c| c.id.starts_with("redis.")),
            "{checks:#?}"
        );
        // A Redis container that runs anyway (docker-compose starts it).
        f.unused_redis = Some("p_redis_1".into());
        let failures = failed(&f);
        assert_eq!(failures.len(), 1, "{failures:?}");
        assert!(
            failures[0]
                .starts_with("redis.unused: p_redis_1 runs but no service keeps anything on Redis"),
            "{failures:?}"
        );
    }

    #[test]
    fn workers_serving_one_queue_must_run_the_same_tasks() {
        let mut f = good();
        let records = f.workers.as_mut().expect("records");
        records[1].tasks = vec!["taskstack.add".into()];
        records[0].queues.push("reports".into());
        assert_eq!(
            failed(&f),
            [
                "workers.tasks: worker w2.1 serves queue celery but lacks invoices.render that other workers there run"
            ]
        );
        let mut f = good();
        f.workers.as_mut().expect("records")[0].tasks.clear();
        let failures = failed(&f);
        assert_eq!(failures.len(), 1, "{failures:?}");
        assert!(
            failures[0].starts_with("workers.tasks: worker w1.1 announces no task; worker w1.1 serves queue celery but lacks"),
            "{failures:?}"
        );
    }

    #[test]
    fn each_fault_fails_its_own_check() {
        let mut f = good();
        f.redis.as_mut().expect("redis").unauthenticated_ping = Ok(ExecOutput {
            exit_code: Some(0),
            stdout: "PONG\n".into(),
            stderr: String::new(),
        });
        assert_eq!(
            failed(&f),
            [
                "redis.password: an unauthenticated PING answered PONG: Redis accepts clients without a password"
            ]
        );

        let mut f = good();
        f.redis.as_mut().expect("redis").appendonly = Ok("no".into());
        f.redis.as_mut().expect("redis").maxmemory_policy = Ok("allkeys-lru".into());
        assert_eq!(
            failed(&f),
            [
                "redis.appendonly: appendonly no",
                "redis.noeviction: maxmemory-policy allkeys-lru"
            ]
        );

        let mut f = good();
        f.services[0].containers[0].published = vec![Published {
            host_ip: "0.0.0.0".into(),
            host_port: 6379,
            container_port: 6379,
        }];
        assert_eq!(
            failed(&f),
            ["redis.not_published: published on a public address: p_redis_1 on 0.0.0.0:6379"]
        );
        f.services[0].containers[0].published[0].host_ip = "127.0.0.1".into();
        assert!(failed(&f).is_empty());

        // A stopped worker: its service fails, and it no longer heartbeats.
        let mut f = good();
        let w = &mut f.services[2].containers[1];
        w.running = false;
        w.state = "exited".into();
        w.exit_code = Some(137);
        f.workers.as_mut().expect("records").pop();
        assert_eq!(
            failed(&f),
            ["service.worker: p_worker_2 is exited (exit code 137)"]
        );

        let mut f = good();
        f.services[2].containers[0].user = String::new();
        assert_eq!(
            failed(&f),
            ["workers.non_root: p_worker_1 runs as root (user \"\")"]
        );
        let mut f = good();
        f.services[2].containers[0].process_uid = Some(0);
        assert_eq!(failed(&f).len(), 1);

        let mut f = good();
        f.services[3].containers[0].health = Health::Unhealthy;
        f.services[3].containers[0].restart_policy = "no".into();
        assert_eq!(
            failed(&f),
            ["service.web: p_web_1 is unhealthy; p_web_1 has no restart policy"]
        );

        let mut f = good();
        f.workers = Ok(vec![WorkerRecord {
            id: "w1.1".into(),
            host: "w1".into(),
            queues: vec!["other".into()],
            tasks: vec!["taskstack.add".into()],
        }]);
        assert_eq!(
            failed(&f),
            [
                "workers.heartbeat: p_worker_2 has no heartbeat record; no live worker serves queue celery"
            ]
        );

        let mut f = good();
        f.web_health = Ok(503);
        f.smoke = Err("POST /api/v1/tasks answered 401".into());
        f.results = super::super::results::ResultsFacts::redis(Ok(-1));
        assert_eq!(
            failed(&f),
            [
                "web.health: GET /health answered 503",
                "smoke.add: POST /api/v1/tasks answered 401",
                "results.expiry: the result has no expiry: Redis would fill up"
            ]
        );
    }

    #[test]
    fn the_beat_lock_must_be_held_by_one_running_beat_with_a_sane_ttl() {
        let mut f = good();
        f.services[1].containers.push(container("p_beat_2", "b2"));
        assert_eq!(failed(&f).len(), 1);
        assert!(
            failed(&f)[0].starts_with("beat.single: 2 beat containers run (p_beat_1, p_beat_2)"),
            "{:?}",
            failed(&f)
        );
        f.allow_standby_beats = true;
        assert!(failed(&f).is_empty());

        let mut f = good();
        if let Ok(Some(l)) = &mut f.beat_lock {
            l.holder.as_mut().expect("holder").host = "elsewhere".into();
            l.pttl_ms = -1;
        }
        let fails = failed(&f);
        assert!(
            fails[0].starts_with(
                "beat.lock: held by b1.7.abc on host elsewhere, which is not a running beat"
            ),
            "{fails:?}"
        );
        assert!(
            fails[1].starts_with("beat.lock_ttl: the lock never expires"),
            "{fails:?}"
        );

        // The holder died with its container's restart (the lock predates it).
        let mut f = good();
        f.services[1].containers[0].started_at = Some("2026-11-24T03:00:05Z".into());
        let fails = failed(&f);
        assert!(fails[0].starts_with("beat.lock: held by b1.7.abc (2026-11-24T03:00:00Z), a process that died when p_beat_1 restarted"), "{fails:?}");
        f.services[1].containers[0].started_at = Some("2026-11-24T02:59:00Z".into());
        assert!(failed(&f).is_empty());
        // The engine records the start a little after the process took the
        // free lock: that is the live holder.
        f.services[1].containers[0].started_at = Some("2026-11-24T03:00:00.300Z".into());
        assert!(failed(&f).is_empty());

        let mut f = good();
        f.beat_lock = Ok(None);
        assert!(failed(&f)[0].starts_with("beat.lock: no beat holds the leader lock"));
    }

    #[test]
    fn users_map_to_uids() {
        assert_eq!(configured_uid("65534:65534"), Some(65534));
        assert_eq!(configured_uid(""), Some(0));
        assert_eq!(configured_uid("root"), Some(0));
        assert_eq!(configured_uid("0:0"), Some(0));
        assert_eq!(configured_uid("app"), None);
    }
}
