//! The Swarm checklist (`stackctl verify --swarm`) as a pure function of
//! what was observed ([`SwarmFacts`]), so each rule is unit-tested without
//! an engine.

use super::checks::{Check, Probe, SmokeFacts};
use crate::plan::Role;
use std::collections::BTreeMap;
use std::time::Duration;

/// One service of the stack as the Swarm manager reports it.
#[derive(Debug, Clone, Default)]
pub struct SwarmService {
    /// The name in the stack file (`worker`, not `taskstack_worker`).
    pub name: String,
    /// Replicas asked for; None for a global service.
    pub desired: Option<u64>,
    /// Tasks the Swarm runs (state `running`: with a healthcheck, healthy).
    pub running: usize,
    /// What the latest tasks that are not running say (state, error).
    pub problems: Vec<String>,
    pub command: Vec<String>,
    pub env: BTreeMap<String, String>,
    /// Where secrets are mounted: file names under /run/secrets.
    pub secret_files: Vec<String>,
    /// The networks it is attached to, each with whether it is internal.
    pub networks: Vec<(String, bool)>,
    /// Published ports (`8000/ingress`).
    pub published: Vec<String>,
    /// `start-first` or `stop-first` (the update order).
    pub update_order: Option<String>,
    pub stop_grace_period: Option<Duration>,
    /// `any`, `on-failure` or `none`.
    pub restart_condition: Option<String>,
    /// The memory limit in bytes.
    pub memory_limit: Option<i64>,
}

impl SwarmService {
    /// Its role, from its command's program, else its name (as for compose).
    pub fn role(&self) -> Role {
        let base = |p: &str| p.rsplit('/').next().unwrap_or(p).to_owned();
        let program = match self.command.first().map(|p| base(p)) {
            Some(p) if p == "taskstack" => self.command.get(1).cloned(),
            p => p,
        };
        let by = |s: &str| match s {
            "taskstack-web" | "web" => Some(Role::Web),
            "taskstack-worker" | "worker" => Some(Role::Worker),
            "taskstack-beat" | "beat" => Some(Role::Beat),
            "redis-server" | "redis" => Some(Role::Redis),
            _ => None,
        };
        program
            .as_deref()
            .and_then(by)
            .or_else(|| by(&self.name))
            .unwrap_or(Role::Other)
    }
}

/// Everything `verify --swarm` observed.
#[derive(Debug, Clone)]
pub struct SwarmFacts {
    pub stack: String,
    /// This engine's Swarm state (`active` and a manager to pass).
    pub node: Probe<(String, bool)>,
    pub services: Vec<SwarmService>,
    /// `GET /health` through the web address given (None: not asked).
    pub web_health: Option<Probe<u16>>,
    /// The end-to-end task through the web API (None: not asked).
    pub smoke: Option<Probe<SmokeFacts>>,
}

fn check(id: &str, ok: bool, reason: impl Into<String>) -> Check {
    Check {
        id: id.to_owned(),
        ok,
        reason: reason.into(),
    }
}

/// The checks, in a stable order.
pub fn evaluate(f: &SwarmFacts) -> Vec<Check> {
    let mut out = Vec::new();
    out.push(match &f.node {
        Ok((state, true)) if state == "active" => {
            check("swarm.node", true, "this engine is an active Swarm manager")
        }
        Ok((state, manager)) => check(
            "swarm.node",
            false,
            format!(
                "Swarm state `{state}`{}: run `docker swarm init` (or join a Swarm as a manager)",
                if *manager { "" } else { ", not a manager" }
            ),
        ),
        Err(e) => check("swarm.node", false, e.clone()),
    });
    let of = |role: Role| f.services.iter().filter(move |s| s.role() == role);
    for (role, what) in [
        (Role::Redis, "redis"),
        (Role::Web, "web"),
        (Role::Worker, "worker"),
        (Role::Beat, "beat"),
    ] {
        if of(role).next().is_none() {
            out.push(check(
                &format!("service.{what}"),
                false,
                format!(
                    "stack {} has no {what} service (label com.docker.stack.namespace={})",
                    f.stack, f.stack
                ),
            ));
        }
    }
    for s in &f.services {
        let (ok, reason) = match s.desired {
            Some(n) if s.running as u64 == n && n > 0 => {
                (true, format!("{}/{n} tasks running and healthy", s.running))
            }
            Some(n) => (
                false,
                format!(
                    "{}/{n} tasks running{}",
                    s.running,
                    if s.problems.is_empty() {
                        String::new()
                    } else {
                        format!(": {}", s.problems.join("; "))
                    }
                ),
            ),
            None if s.running > 0 => (true, format!("global: {} tasks running", s.running)),
            None => (false, "global: no task running".to_owned()),
        };
        out.push(check(&format!("service.{}", s.name), ok, reason));
    }
    for s in of(Role::Redis) {
        let open: Vec<&str> = s
            .networks
            .iter()
            .filter(|(_, internal)| !internal)
            .map(|(n, _)| n.as_str())
            .collect();
        let ok = open.is_empty() && !s.networks.is_empty() && s.published.is_empty();
        let reason = if ok {
            format!(
                "only on internal network(s) {}, nothing published",
                s.networks
                    .iter()
                    .map(|(n, _)| n.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            )
        } else if s.networks.is_empty() {
            "on no network of its own".to_owned()
        } else {
            let mut r = Vec::new();
            if !open.is_empty() {
                r.push(format!("on non-internal network(s) {}", open.join(", ")));
            }
            if !s.published.is_empty() {
                r.push(format!("publishes {}", s.published.join(", ")));
            }
            r.join("; ")
        };
        out.push(check(&format!("redis.internal.{}", s.name), ok, reason));
    }
    for s in f
        .services
        .iter()
        .filter(|s| matches!(s.role(), Role::Web | Role::Worker | Role::Beat))
    {
        out.push(secret_check(
            &format!("secrets.redis_password.{}", s.name),
            s,
            "TASKSTACK_BROKER_PASSWORD_FILE",
            &["TASKSTACK_BROKER_PASSWORD"],
        ));
    }
    for s in of(Role::Web) {
        out.push(secret_check(
            &format!("secrets.api_token.{}", s.name),
            s,
            "TASKSTACK_API_TOKENS_FILE",
            &["TASKSTACK_API_TOKENS"],
        ));
        out.push(order_check(s, "start-first", "no gap in the API"));
    }
    for s in of(Role::Worker) {
        out.push(order_check(
            s,
            "stop-first",
            "the old worker drains before its replacement starts",
        ));
        let drain = s
            .env
            .get("TASKSTACK_DRAIN_TIMEOUT")
            .map(|v| humantime::parse_duration(v).map_err(|e| format!("{v:?}: {e}")))
            .unwrap_or(Ok(taskstack::config::Config::default().drain_timeout));
        let id = format!("worker.stop_grace.{}", s.name);
        out.push(match (drain, s.stop_grace_period) {
            (Err(e), _) => check(&id, false, format!("TASKSTACK_DRAIN_TIMEOUT {e}")),
            (Ok(d), Some(g)) if g > d => check(
                &id,
                true,
                format!(
                    "stop_grace_period {} > drain timeout {}",
                    humantime::format_duration(g),
                    humantime::format_duration(d)
                ),
            ),
            (Ok(d), g) => check(
                &id,
                false,
                format!(
                    "stop_grace_period {} is not above the drain timeout {}: the Swarm would \
                     SIGKILL tasks still draining",
                    g.map_or("unset (10s)".into(), |g| humantime::format_duration(g)
                        .to_string()),
                    humantime::format_duration(d)
                ),
            ),
        });
    }
    for s in of(Role::Beat) {
        let n = s.desired.unwrap_or(0);
        out.push(check(
            &format!("beat.replicas.{}", s.name),
            n >= 1,
            match n {
                0 => "no beat replica: periodic tasks never fire".to_owned(),
                1 => "1 replica (no standby: a dead beat pauses the schedule until replaced)"
                    .to_owned(),
                n => format!("{n} replicas: one holds the leader lock, the others stand by"),
            },
        ));
    }
    for s in &f.services {
        let id = format!("restart.{}", s.name);
        out.push(match s.restart_condition.as_deref() {
            Some(c @ ("any" | "on-failure")) => check(&id, true, format!("restart on {c}")),
            c => check(
                &id,
                false,
                format!(
                    "restart_policy condition {}: a crashed task is not replaced",
                    c.unwrap_or("unset")
                ),
            ),
        });
    }
    let unlimited: Vec<&str> = f
        .services
        .iter()
        .filter(|s| s.memory_limit.is_none_or(|m| m <= 0))
        .map(|s| s.name.as_str())
        .collect();
    out.push(check(
        "resources.memory",
        unlimited.is_empty() && !f.services.is_empty(),
        if unlimited.is_empty() {
            "every service has a memory limit".to_owned()
        } else {
            format!("no memory limit: {}", unlimited.join(", "))
        },
    ));
    if let Some(h) = &f.web_health {
        out.push(match h {
            Ok(s) => check("web.health", *s == 200, format!("GET /health answered {s}")),
            Err(e) => check("web.health", false, e.clone()),
        });
    }
    if let Some(smoke) = &f.smoke {
        out.push(match smoke {
            Ok(s) if s.state == "SUCCESS" && s.result.as_i64() == Some(s.expected) => check(
                "smoke.add",
                true,
                format!(
                    "taskstack.add returned {} in {} ms (task {})",
                    s.result,
                    s.elapsed.as_millis(),
                    s.task_id
                ),
            ),
            Ok(s) => check(
                "smoke.add",
                false,
                format!(
                    "task {} ended {} with {} (expected SUCCESS {})",
                    s.task_id, s.state, s.result, s.expected
                ),
            ),
            Err(e) => check("smoke.add", false, e.clone()),
        });
    }
    out
}

/// The secret behind `file_var` is a mounted Swarm secret, and no
/// variable in `plain` carries it in the service's spec.
fn secret_check(id: &str, s: &SwarmService, file_var: &str, plain: &[&str]) -> Check {
    let leaked: Vec<&str> = plain
        .iter()
        .copied()
        .filter(|k| s.env.contains_key(*k))
        .collect();
    if !leaked.is_empty() {
        return check(
            id,
            false,
            format!(
                "{} set in the service's environment (visible in `docker service inspect`); use {file_var} and a secret",
                leaked.join(", ")
            ),
        );
    }
    match s.env.get(file_var) {
        None => check(id, false, format!("{file_var} is not set")),
        Some(path) => match path.strip_prefix("/run/secrets/") {
            Some(name) if s.secret_files.iter().any(|f| f == name) => {
                check(id, true, format!("{file_var}={path}, a Swarm secret"))
            }
            _ => check(
                id,
                false,
                format!(
                    "{file_var}={path} is not a mounted Swarm secret (mounted: {})",
                    if s.secret_files.is_empty() {
                        "none".to_owned()
                    } else {
                        s.secret_files.join(", ")
                    }
                ),
            ),
        },
    }
}

fn order_check(s: &SwarmService, want: &str, why: &str) -> Check {
    let id = format!("update.{}", s.name);
    match s.update_order.as_deref() {
        Some(o) if o == want => check(&id, true, format!("update order {o}: {why}")),
        o => check(
            &id,
            false,
            format!("update order {} (want {want}: {why})", o.unwrap_or("unset")),
        ),
    }
}

#[cfg(test)]
#[path = "swarm_tests.rs"]
mod tests;
