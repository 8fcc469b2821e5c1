//! `stackctl up` and `stackctl scale`: networks and volumes, then each
//! service's containers in dependency order, a service starting only once
//! what it depends on is ready (`condition: service_healthy`: every
//! container healthy), reconciling against what already runs (same
//! configuration hash: left alone; different: recreated; surplus:
//! removed), failing with the health-check outputs and the last log lines
//! of a container that turns unhealthy or exits.

pub mod images;
pub mod probe;
pub mod secrets;

use crate::compose::{Condition, Project};
use crate::engine::{Engine, Health, last_log_lines};
use crate::error::StackError;
use crate::plan::{self, Action, Role, ServicePlan, labels, project_label, resource_labels};
use crate::progress::{Progress, Stage};
use futures_util::StreamExt as _;
use futures_util::stream::FuturesUnordered;
use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;
use tokio::time::Instant;

/// How `up` runs.
#[derive(Debug, Clone)]
pub struct UpOptions {
    /// Allow more than one beat replica (they stand by on the Redis lock).
    pub allow_standby_beats: bool,
    /// Give up when the stack is not ready after this long.
    pub timeout: Duration,
    /// How often container states are polled.
    pub poll: Duration,
    /// Replica counts overriding the file's (`scale worker=3`).
    pub replicas: BTreeMap<String, usize>,
    /// Touch only these services (`scale`); the others must already run.
    pub only: Option<BTreeSet<String>>,
}

impl Default for UpOptions {
    fn default() -> Self {
        Self {
            allow_standby_beats: false,
            timeout: Duration::from_secs(300),
            poll: Duration::from_millis(100),
            replicas: BTreeMap::new(),
            only: None,
        }
    }
}

/// A published port of a running container.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Endpoint {
    pub service: String,
    pub container: String,
    pub host_ip: String,
    pub host_port: u16,
    pub container_port: u16,
}

impl Endpoint {
    /// `http://ip:port`, with 127.0.0.1 for "every interface".
    pub fn url(&self) -> String {
        let ip = match self.host_ip.as_str() {
            "" | "0.0.0.0" | "::" => "127.0.0.1",
            ip => ip,
        };
        format!("http://{ip}:{}", self.host_port)
    }
}

/// What `up` did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct UpReport {
    pub created: Vec<String>,
    pub recreated: Vec<String>,
    pub kept: Vec<String>,
    pub removed: Vec<String>,
    pub endpoints: Vec<Endpoint>,
    pub elapsed: Duration,
}

#[derive(Debug, Clone, PartialEq)]
enum State {
    Waiting,
    /// Started; (container id, restart count when started).
    Checking(Vec<(String, i64)>),
    Ready(Vec<String>),
}

/// Brings `project` up (see the module docs).
pub async fn up<E: Engine>(
    engine: &E,
    project: &Project,
    opts: &UpOptions,
    progress: &mut dyn Progress,
) -> Result<UpReport, StackError> {
    let started = Instant::now();
    let selected = |s: &str| opts.only.as_ref().is_none_or(|o| o.contains(s));
    for s in opts.replicas.keys().chain(opts.only.iter().flatten()) {
        if !project.services.contains_key(s) {
            return Err(StackError::UnknownService {
                service: s.clone(),
                known: project
                    .services
                    .keys()
                    .cloned()
                    .collect::<Vec<_>>()
                    .join(", "),
            });
        }
    }

    // Everything the containers need must be here before anything changes.
    let mut image_ids = BTreeMap::new();
    for svc in project.services.values().filter(|s| selected(&s.name)) {
        match engine.image_id(&svc.image).await? {
            Some(id) => {
                image_ids.insert(svc.image.clone(), id);
            }
            None => {
                return Err(StackError::ImageMissing {
                    service: svc.name.clone(),
                    image: svc.image.clone(),
                });
            }
        }
        for b in &svc.binds {
            if !b.source.exists() {
                return Err(StackError::BindMissing {
                    service: svc.name.clone(),
                    source_path: b.source.clone(),
                });
            }
        }
    }
    let needed = project
        .services
        .values()
        .filter(|s| selected(&s.name))
        .flat_map(|s| s.secrets.iter());
    for file in secrets::ensure(project, needed)? {
        progress.note(&format!("created secret {}", file.display()));
    }
    let plans = plan::plan(project, &opts.replicas, &image_ids);
    for p in plans.values() {
        if p.role == Role::Beat
            && p.replicas > 1
            && !opts.allow_standby_beats
            && selected(&p.service)
        {
            return Err(StackError::BeatReplicas {
                service: p.service.clone(),
                replicas: p.replicas,
            });
        }
    }

    ensure_resources(engine, project).await?;

    let existing = engine
        .list_containers(&project_label(&project.name))
        .await?;
    for c in &existing {
        let svc = c.label(labels::SERVICE).unwrap_or_default();
        if !project.services.contains_key(svc) {
            progress.note(&format!(
                "warning: {} belongs to service `{svc}`, which is not in {} (`stackctl down` removes it)",
                c.name,
                project.file.display()
            ));
        }
    }

    // `compose::parse` refused cycles already.
    let order = project
        .start_order()
        .unwrap_or_else(|_| project.services.keys().cloned().collect());
    let mut report = UpReport::default();
    let mut actions: BTreeMap<String, Vec<Action>> = BTreeMap::new();
    let mut state: BTreeMap<String, State> = BTreeMap::new();
    for name in &order {
        let plan = &plans[name];
        if selected(name) {
            let acts = plan::reconcile(plan, &existing);
            check_ports(engine, plan, &acts)?;
            actions.insert(name.clone(), acts);
            state.insert(name.clone(), State::Waiting);
        } else {
            // Not ours to change: watched so its dependents can wait on it.
            let ids: Vec<(String, i64)> = existing
                .iter()
                .filter(|c| c.label(labels::SERVICE) == Some(name.as_str()))
                .map(|c| (c.id.clone(), i64::MAX))
                .collect();
            state.insert(name.clone(), State::Checking(ids));
        }
    }
    // Surplus containers go first (scale-down, duplicates).
    for acts in actions.values() {
        for a in acts {
            if let Action::Remove { id, name } = a {
                engine.stop_container(id, None).await?;
                engine.remove_container(id).await?;
                progress.note(&format!("removed {name}"));
                report.removed.push(name.clone());
            }
        }
    }

    // Health tests `up` runs itself (see `probe`): those in flight, when a
    // container whose test failed may be probed again, the containers that
    // passed one, and the services all of whose containers did (ready for
    // their dependents ahead of the engine's verdict).
    let mut probes = FuturesUnordered::new();
    let mut probing: BTreeSet<String> = BTreeSet::new();
    let mut not_before: BTreeMap<String, Instant> = BTreeMap::new();
    let mut passed: BTreeSet<String> = BTreeSet::new();
    let mut tested: BTreeSet<String> = BTreeSet::new();
    loop {
        // Start every waiting service whose dependencies are ready.
        let mut to_start = Vec::new();
        for name in &order {
            if state[name] != State::Waiting {
                continue;
            }
            let mut waiting_for = Vec::new();
            for (dep, cond) in &project.services[name].depends_on {
                let ok = match (&state[dep], cond) {
                    (State::Ready(_), _) | (State::Checking(_), Condition::Started) => true,
                    (State::Checking(_), Condition::Healthy) => tested.contains(dep),
                    (State::Waiting, _) => false,
                };
                if !ok {
                    waiting_for.push(match cond {
                        Condition::Healthy => format!("{dep} (healthy)"),
                        Condition::Started => format!("{dep} (started)"),
                    });
                }
            }
            if waiting_for.is_empty() {
                to_start.push(name.clone());
            } else {
                progress.stage(
                    name,
                    Stage::Waiting,
                    &format!("for {}", waiting_for.join(", ")),
                );
            }
        }
        for name in &to_start {
            progress.stage(name, Stage::Starting, "");
        }
        let results = futures_util::future::join_all(
            to_start
                .iter()
                .map(|name| apply(engine, project, &plans[name], &actions[name])),
        )
        .await;
        for (name, result) in to_start.iter().zip(results) {
            let applied = result?;
            report.created.extend(applied.created);
            report.recreated.extend(applied.recreated);
            report.kept.extend(applied.kept);
            state.insert(name.clone(), State::Checking(applied.containers));
        }

        // Look at every started service. Those a waiting service needs
        // healthy get their health test run by `up` until it passes.
        let awaited: BTreeSet<&str> = order
            .iter()
            .filter(|n| state[*n] == State::Waiting)
            .flat_map(|n| &project.services[n].depends_on)
            .filter(|(_, cond)| **cond == Condition::Healthy)
            .map(|(dep, _)| dep.as_str())
            .collect();
        let mut progressed = false;
        for name in &order {
            let State::Checking(ids) = state[name].clone() else {
                continue;
            };
            if ids.is_empty() && !selected(name) {
                return Err(StackError::NotUp {
                    service: name.clone(),
                    project: project.name.clone(),
                });
            }
            let (mut ready, mut test_passed) = (0, 0);
            for (id, restarts_at_start) in &ids {
                let c = engine.inspect_container(id).await?;
                let failure = if c.health == Health::Unhealthy {
                    Some("is unhealthy".to_owned())
                } else if c.restart_count > *restarts_at_start {
                    Some(format!(
                        "exited (code {}) and was restarted {} time(s)",
                        c.exit_code.unwrap_or_default(),
                        c.restart_count - restarts_at_start.min(&c.restart_count)
                    ))
                } else if !c.running {
                    Some(format!(
                        "exited with code {}{}",
                        c.exit_code.unwrap_or_default(),
                        if c.oom_killed {
                            " (killed: out of memory)"
                        } else {
                            ""
                        }
                    ))
                } else {
                    None
                };
                if let Some(reason) = failure {
                    progress.stage(name, Stage::Failed, &format!("{} {reason}", c.name));
                    let n = c.health_log.len();
                    return Err(StackError::ServiceFailed {
                        service: name.clone(),
                        container: c.name.clone(),
                        reason,
                        health: c.health_log[n.saturating_sub(5)..].to_vec(),
                        logs: last_log_lines(engine, id, 20).await,
                    });
                }
                if matches!(c.health, Health::Healthy | Health::None) {
                    ready += 1;
                } else if passed.contains(id) {
                    test_passed += 1;
                } else if let Some(hc) = &plans[name].template().healthcheck
                    && awaited.contains(name.as_str())
                    && c.running
                    && c.health == Health::Starting
                    && not_before.get(id).is_none_or(|t| Instant::now() >= *t)
                    && probing.insert(id.clone())
                {
                    let (id, hc) = (id.clone(), hc.clone());
                    probes.push(async move {
                        let began = Instant::now();
                        let ok = probe::passes(engine, &id, &hc).await;
                        (id, ok, began.elapsed())
                    });
                }
            }
            if ready < ids.len() && ready + test_passed == ids.len() && tested.insert(name.clone())
            {
                progress.stage(
                    name,
                    Stage::Checking,
                    &format!(
                        "{test_passed}/{} passed the health test; dependents start (the engine's first check is pending)",
                        ids.len()
                    ),
                );
                progressed = true;
            }
            if ready == ids.len() {
                let has_check = plans[name].template().healthcheck.is_some();
                progress.stage(
                    name,
                    Stage::Ready,
                    &format!(
                        "{} {}",
                        ids.len(),
                        if has_check { "healthy" } else { "running" }
                    ),
                );
                state.insert(
                    name.clone(),
                    State::Ready(ids.into_iter().map(|(id, _)| id).collect()),
                );
                progressed = true;
            } else if !tested.contains(name) {
                progress.stage(
                    name,
                    Stage::Checking,
                    &format!("{ready}/{} healthy", ids.len()),
                );
            }
        }

        if state.values().all(|s| matches!(s, State::Ready(_))) {
            break;
        }
        if started.elapsed() > opts.timeout {
            let pending = order
                .iter()
                .filter_map(|n| match &state[n] {
                    State::Ready(_) => None,
                    State::Waiting => {
                        Some(format!("{n} (not started: waiting for its dependencies)"))
                    }
                    State::Checking(_) => Some(format!("{n} (not healthy yet)")),
                })
                .collect();
            return Err(StackError::Timeout {
                waited: opts.timeout,
                pending,
            });
        }
        if progressed {
            // A service became ready (or passed its test): its dependents
            // start at once.
            continue;
        }
        let nap = tokio::time::sleep(opts.poll);
        tokio::pin!(nap);
        loop {
            tokio::select! {
                () = &mut nap => break,
                Some((id, ok, took)) = probes.next(), if !probes.is_empty() => {
                    probing.remove(&id);
                    if ok {
                        passed.insert(id);
                        break;
                    }
                    not_before.insert(id, probe::next_after_failure(Instant::now(), took));
                }
            }
        }
    }

    for name in order.iter().filter(|n| selected(n)) {
        if let State::Ready(ids) = &state[name] {
            for id in ids {
                let c = engine.inspect_container(id).await?;
                for p in c.published {
                    report.endpoints.push(Endpoint {
                        service: name.clone(),
                        container: c.name.clone(),
                        host_ip: p.host_ip,
                        host_port: p.host_port,
                        container_port: p.container_port,
                    });
                }
            }
        }
    }
    report.elapsed = started.elapsed();
    Ok(report)
}

/// Creates the project's networks and volumes that are missing (labelled
/// as Compose labels them).
async fn ensure_resources<E: Engine>(engine: &E, project: &Project) -> Result<(), StackError> {
    let label = project_label(&project.name);
    let networks: BTreeSet<String> = engine
        .list_networks(&label)
        .await?
        .into_iter()
        .map(|n| n.name)
        .collect();
    for (key, net) in &project.networks {
        let name = project.network_name(key);
        if networks.contains(&name) {
            continue;
        }
        engine
            .create_network(
                &name,
                &net.driver,
                net.internal,
                &resource_labels(project, labels::NETWORK, key),
            )
            .await
            .map_err(|e| {
                if e.status == Some(409) {
                    StackError::Foreign {
                        kind: "network",
                        name: name.clone(),
                        project: project.name.clone(),
                    }
                } else {
                    e.into()
                }
            })?;
    }
    let volumes: BTreeSet<String> = engine
        .list_volumes(&label)
        .await?
        .into_iter()
        .map(|v| v.name)
        .collect();
    for (key, vol) in &project.volumes {
        let name = project.volume_name(key);
        if !volumes.contains(&name) {
            engine
                .create_volume(
                    &name,
                    &vol.driver,
                    &resource_labels(project, labels::VOLUME, key),
                )
                .await?;
        }
    }
    Ok(())
}

/// Fails when a port a new container would publish is taken on the host.
fn check_ports<E: Engine>(
    engine: &E,
    plan: &ServicePlan,
    actions: &[Action],
) -> Result<(), StackError> {
    // A recreated or kept container holds its own port already.
    if !actions.iter().any(|a| matches!(a, Action::Create { .. }))
        || actions
            .iter()
            .any(|a| matches!(a, Action::Keep { .. } | Action::Recreate { .. }))
    {
        return Ok(());
    }
    for p in &plan.template().ports {
        if !engine.host_port_free(&p.host_ip, p.host_port) {
            return Err(StackError::PortTaken {
                service: plan.service.clone(),
                addr: format!(
                    "{}:{}",
                    if p.host_ip.is_empty() {
                        "0.0.0.0"
                    } else {
                        &p.host_ip
                    },
                    p.host_port
                ),
            });
        }
    }
    Ok(())
}

#[derive(Debug, Default)]
struct Applied {
    containers: Vec<(String, i64)>,
    created: Vec<String>,
    recreated: Vec<String>,
    kept: Vec<String>,
}

/// Carries out one service's actions: its containers, started.
async fn apply<E: Engine>(
    engine: &E,
    project: &Project,
    plan: &ServicePlan,
    actions: &[Action],
) -> Result<Applied, StackError> {
    let mut out = Applied::default();
    let port_error = |e: crate::engine::EngineError| -> StackError {
        let m = e.message.to_ascii_lowercase();
        if m.contains("port is already allocated") || m.contains("address already in use") {
            let addr = plan
                .template()
                .ports
                .iter()
                .map(|p| format!("{}:{}", p.host_ip, p.host_port))
                .collect::<Vec<_>>()
                .join(", ");
            StackError::PortTaken {
                service: plan.service.clone(),
                addr,
            }
        } else {
            e.into()
        }
    };
    for a in actions {
        match a {
            Action::Keep {
                id, name, running, ..
            } => {
                let restarts = engine.inspect_container(id).await?.restart_count;
                if !running {
                    engine.start_container(id).await.map_err(port_error)?;
                }
                out.containers.push((id.clone(), restarts));
                out.kept.push(name.clone());
            }
            Action::Recreate { id, name, number } => {
                engine.stop_container(id, None).await?;
                engine.remove_container(id).await?;
                let spec = plan.container(&project.name, *number);
                let new = engine.create_container(&spec).await?;
                engine.start_container(&new).await.map_err(port_error)?;
                out.containers.push((new, 0));
                out.recreated.push(name.clone());
            }
            Action::Create { number } => {
                let spec = plan.container(&project.name, *number);
                let id = engine.create_container(&spec).await?;
                engine.start_container(&id).await.map_err(port_error)?;
                out.containers.push((id, 0));
                out.created.push(spec.name);
            }
            Action::Remove { .. } => {}
        }
    }
    Ok(out)
}

#[cfg(test)]
pub(crate) mod tests;
