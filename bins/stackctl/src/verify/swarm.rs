//! `stackctl verify --swarm`: the checklist of a stack deployed with
//! `docker stack deploy -c compose/swarm.yml <stack>`. Facts come from
//! the Swarm manager through the Engine API (services, their tasks,
//! networks), and through the web API at an address given by the caller
//! (`/health` and a smoke task); [`swarm_checks::evaluate`] turns them into
//! pass/fail with reasons. Redis sits on an internal overlay network, so
//! it is judged through the web's `/health`, never reached directly.

use super::VerifyReport;
use super::checks::{Probe, SmokeFacts};
use super::swarm_checks::{self, SwarmFacts, SwarmService};
use crate::BuildError;
use crate::error::StackError;
use bollard::Docker;
use bollard::models::{Task, TaskState};
use bollard::query_parameters::{ListServicesOptions, ListTasksOptions};
use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::time::Duration;
use taskstack::http_client;

/// The label `docker stack deploy` puts on everything of a stack.
pub const STACK_LABEL: &str = "com.docker.stack.namespace";

/// How `verify --swarm` runs.
#[derive(Debug, Clone)]
pub struct SwarmVerifyOptions {
    /// The stack's name (`docker stack deploy ... <stack>`).
    pub stack: String,
    /// `host:port` of the web API as published by the Swarm; None skips
    /// `/health` and the smoke task.
    pub web: Option<String>,
    /// The file holding an API token (the `api_token` secret's source).
    pub api_token_file: Option<PathBuf>,
    /// How long the smoke task may take.
    pub smoke_timeout: Duration,
}

fn docker_err(op: &'static str) -> impl FnOnce(bollard::errors::Error) -> StackError {
    move |source| StackError::Build(BuildError::Docker { op, source })
}

/// The services of `stack` with their tasks, as the manager reports them.
pub async fn services(docker: &Docker, stack: &str) -> Result<Vec<SwarmService>, StackError> {
    let filters = HashMap::from([("label".to_owned(), vec![format!("{STACK_LABEL}={stack}")])]);
    let listed = docker
        .list_services(Some(ListServicesOptions {
            filters: Some(filters),
            status: None,
        }))
        .await
        .map_err(docker_err("list services"))?;
    let mut network_internal: HashMap<String, (String, bool)> = HashMap::new();
    let mut out = Vec::new();
    for svc in listed {
        let Some(spec) = svc.spec else { continue };
        let full = spec.name.clone().unwrap_or_default();
        let name = full
            .strip_prefix(&format!("{stack}_"))
            .unwrap_or(&full)
            .to_owned();
        let task = spec.task_template.clone().unwrap_or_default();
        let c = task.container_spec.clone().unwrap_or_default();
        let mut s = SwarmService {
            name,
            desired: match &spec.mode {
                Some(m) if m.global.is_some() => None,
                Some(m) => Some(
                    m.replicated
                        .as_ref()
                        .and_then(|r| r.replicas)
                        .unwrap_or(1)
                        .max(0) as u64,
                ),
                None => Some(1),
            },
            command: c
                .command
                .clone()
                .unwrap_or_default()
                .into_iter()
                .chain(c.args.clone().unwrap_or_default())
                .collect(),
            env: c
                .env
                .clone()
                .unwrap_or_default()
                .into_iter()
                .filter_map(|kv| {
                    kv.split_once('=')
                        .map(|(k, v)| (k.to_owned(), v.to_owned()))
                })
                .collect::<BTreeMap<_, _>>(),
            secret_files: c
                .secrets
                .clone()
                .unwrap_or_default()
                .into_iter()
                .filter_map(|s| s.file.and_then(|f| f.name))
                .collect(),
            update_order: spec
                .update_config
                .as_ref()
                .and_then(|u| u.order)
                .map(|o| o.to_string()),
            stop_grace_period: c
                .stop_grace_period
                .and_then(|ns| u64::try_from(ns).ok())
                .map(Duration::from_nanos),
            restart_condition: task
                .restart_policy
                .as_ref()
                .and_then(|r| r.condition)
                .map(|c| c.to_string()),
            memory_limit: task
                .resources
                .as_ref()
                .and_then(|r| r.limits.as_ref())
                .and_then(|l| l.memory_bytes),
            published: spec
                .endpoint_spec
                .as_ref()
                .and_then(|e| e.ports.clone())
                .unwrap_or_default()
                .into_iter()
                .map(|p| {
                    format!(
                        "{}/{}",
                        p.published_port.unwrap_or_default(),
                        p.publish_mode.map(|m| m.to_string()).unwrap_or_default()
                    )
                })
                .collect(),
            ..SwarmService::default()
        };
        for target in task
            .networks
            .or(spec.networks)
            .unwrap_or_default()
            .into_iter()
            .filter_map(|n| n.target)
        {
            if !network_internal.contains_key(&target) {
                let n = docker
                    .inspect_network(&target, None)
                    .await
                    .map_err(docker_err("inspect network"))?;
                network_internal.insert(
                    target.clone(),
                    (
                        n.name.unwrap_or_else(|| target.clone()),
                        n.internal.unwrap_or(false),
                    ),
                );
            }
            s.networks.push(network_internal[&target].clone());
        }
        if let Some(id) = &svc.id {
            let tasks = docker
                .list_tasks(Some(ListTasksOptions {
                    filters: Some(HashMap::from([("service".to_owned(), vec![id.clone()])])),
                }))
                .await
                .map_err(docker_err("list tasks"))?;
            (s.running, s.problems) = task_summary(&tasks);
        }
        out.push(s);
    }
    out.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(out)
}

/// Running tasks (desired and actual state `running`), and what the
/// newest others that should run say.
fn task_summary(tasks: &[Task]) -> (usize, Vec<String>) {
    let state = |t: &Task| t.status.as_ref().and_then(|s| s.state);
    let running = tasks
        .iter()
        .filter(|t| {
            t.desired_state == Some(TaskState::RUNNING) && state(t) == Some(TaskState::RUNNING)
        })
        .count();
    let mut others: Vec<&Task> = tasks
        .iter()
        .filter(|t| state(t) != Some(TaskState::RUNNING))
        .collect();
    // Newest first. `updated_at` is a String or a (Copy) date depending on
    // bollard's features (the tests' dependencies turn them on), so it is
    // compared by reference: a key would need a clone that clippy refuses
    // in one build and the compiler needs in the other.
    #[allow(clippy::unnecessary_sort_by)]
    others.sort_by(|a, b| b.updated_at.cmp(&a.updated_at));
    let problems = others
        .into_iter()
        .take(3)
        .map(|t| {
            let st = t.status.clone().unwrap_or_default();
            format!(
                "task {} {}{}",
                t.slot.map_or_else(|| "?".to_owned(), |s| s.to_string()),
                st.state.map(|s| s.to_string()).unwrap_or_default(),
                st.err
                    .or(st.message)
                    .map(|e| format!(" ({e})"))
                    .unwrap_or_default()
            )
        })
        .collect();
    (running, problems)
}

/// Runs the Swarm checklist against `opts.stack`.
pub async fn verify(
    docker: &Docker,
    opts: &SwarmVerifyOptions,
) -> Result<VerifyReport, StackError> {
    let node = docker
        .info()
        .await
        .map(|i| {
            let s = i.swarm.unwrap_or_default();
            (
                s.local_node_state
                    .map(|s| s.to_string())
                    .unwrap_or_default(),
                s.control_available.unwrap_or(false),
            )
        })
        .map_err(|e| e.to_string());
    let services = services(docker, &opts.stack).await?;
    let (web_health, smoke) = match &opts.web {
        None => (None, None),
        Some(addr) => {
            let t = Duration::from_secs(5);
            let health: Probe<u16> = http_client::request(addr, "GET", "/health", None, None, t)
                .await
                .map(|r| r.status)
                .map_err(|e| format!("GET http://{addr}/health: {e}"));
            let token: Probe<String> = match &opts.api_token_file {
                None => {
                    Err("no API token: pass --api-token-file (the api_token secret's file)".into())
                }
                Some(p) => std::fs::read_to_string(p)
                    .map(|t| t.trim().to_owned())
                    .map_err(|e| format!("cannot read {}: {e}", p.display())),
            };
            let smoke: Probe<SmokeFacts> = match token {
                Ok(token) => super::smoke_task(addr, &token, opts.smoke_timeout).await,
                Err(e) => Err(e),
            };
            (Some(health), Some(smoke))
        }
    };
    let facts = SwarmFacts {
        stack: opts.stack.clone(),
        node,
        services,
        web_health,
        smoke,
    };
    let checks = swarm_checks::evaluate(&facts);
    Ok(VerifyReport {
        project: opts.stack.clone(),
        ok: checks.iter().all(|c| c.ok),
        checks,
        beat_lock_holder: None,
    })
}
