//! An in-memory [`Engine`] for unit tests of the orchestration: containers,
//! networks and volumes as maps, health that evolves per inspection as each
//! service's [`Behaviour`] says, and a log of every mutating call so tests
//! can assert on order.

use super::{
    ContainerInfo, ContainerSpec, ContainerSummary, Engine, EngineError, EngineResult, ExecOutput,
    Health, Published, Resource,
};
use crate::compose::Restart;
use crate::plan::labels;
use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

/// How a service's containers behave once started.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Behaviour {
    /// Healthy after this many inspections (running at once without a
    /// health check).
    HealthyAfter(u32),
    /// Unhealthy after this many inspections, with this check output.
    UnhealthyAfter(u32, String),
    /// Exits with this code after this many inspections.
    ExitsAfter(u32, i64),
}

/// A container in the fake.
#[derive(Debug, Clone)]
pub struct FakeContainer {
    pub id: String,
    pub spec: ContainerSpec,
    pub running: bool,
    pub exited: Option<i64>,
    pub health: Health,
    pub inspections: u32,
    pub restart_count: i64,
}

/// Answers `exec` calls: (container, command) → output.
pub type ExecHandler = Arc<dyn Fn(&FakeContainer, &[String]) -> ExecOutput + Send + Sync>;

#[derive(Default)]
struct State {
    containers: BTreeMap<String, FakeContainer>,
    networks: BTreeMap<String, BTreeMap<String, String>>,
    volumes: BTreeMap<String, BTreeMap<String, String>>,
    images: BTreeMap<String, String>,
    behaviours: BTreeMap<String, Behaviour>,
    busy_ports: BTreeSet<u16>,
    /// Container port → where the test serves it.
    forwards: BTreeMap<u16, String>,
    calls: Vec<String>,
    next_id: u64,
    exec: Option<ExecHandler>,
    logs: BTreeMap<String, Vec<String>>,
}

/// The fake engine. Cheap to clone (shared state).
#[derive(Clone, Default)]
pub struct Fake {
    state: Arc<Mutex<State>>,
}

impl std::fmt::Debug for Fake {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Fake").finish_non_exhaustive()
    }
}

impl Fake {
    /// An engine holding `images` (as named) and nothing else.
    pub fn with_images(images: &[&str]) -> Self {
        let fake = Self::default();
        {
            let mut s = fake.lock();
            for (i, name) in images.iter().enumerate() {
                s.images
                    .insert((*name).to_owned(), format!("sha256:{i:064}"));
            }
        }
        fake
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Sets how `service`'s containers behave (default: healthy after 2
    /// inspections).
    pub fn set_behaviour(&self, service: &str, b: Behaviour) {
        self.lock().behaviours.insert(service.to_owned(), b);
    }

    /// Marks a host port as taken by something else.
    /// Makes every running container's `port` reachable at `addr` (a real
    /// server of the test's own, e.g. a redis-server on a free port).
    pub fn forward(&self, port: u16, addr: &str) {
        self.lock().forwards.insert(port, addr.to_owned());
    }

    pub fn occupy_port(&self, port: u16) {
        self.lock().busy_ports.insert(port);
    }

    /// Replaces an image's id (as a rebuild would).
    pub fn set_image(&self, name: &str, id: &str) {
        self.lock().images.insert(name.to_owned(), id.to_owned());
    }

    /// Answers `exec` calls with `h`.
    pub fn set_exec(&self, h: ExecHandler) {
        self.lock().exec = Some(h);
    }

    /// Sets the log lines of a container (by name).
    pub fn set_logs(&self, name: &str, lines: &[&str]) {
        self.lock().logs.insert(
            name.to_owned(),
            lines.iter().map(|l| (*l).to_owned()).collect(),
        );
    }

    /// Every mutating call so far (`create <name>`, `start <name>`,
    /// `stop <name>`, `remove <name>`, `network <name>`, `volume <name>`,
    /// `rm-network <name>`, `rm-volume <name>`).
    pub fn calls(&self) -> Vec<String> {
        self.lock().calls.clone()
    }

    /// Forgets the calls recorded so far.
    pub fn clear_calls(&self) {
        self.lock().calls.clear();
    }

    /// The containers, by name.
    pub fn containers(&self) -> BTreeMap<String, FakeContainer> {
        self.lock()
            .containers
            .values()
            .map(|c| (c.spec.name.clone(), c.clone()))
            .collect()
    }

    /// Stops a container as `docker stop` would (by name).
    pub fn stop_by_name(&self, name: &str) {
        let mut s = self.lock();
        if let Some(c) = s.containers.values_mut().find(|c| c.spec.name == name) {
            c.running = false;
            c.exited = Some(0);
        }
    }

    /// Names of the networks and volumes present.
    pub fn resources(&self) -> (Vec<String>, Vec<String>) {
        let s = self.lock();
        (
            s.networks.keys().cloned().collect(),
            s.volumes.keys().cloned().collect(),
        )
    }

    fn find<'a>(s: &'a mut State, id: &str) -> EngineResult<&'a mut FakeContainer> {
        if s.containers.contains_key(id) {
            return s
                .containers
                .get_mut(id)
                .ok_or_else(|| EngineError::new("find", "gone", Some(404)));
        }
        s.containers
            .values_mut()
            .find(|c| c.spec.name == id)
            .ok_or_else(|| {
                EngineError::new(format!("container {id}"), "No such container", Some(404))
            })
    }
}

fn matches(labels: &BTreeMap<String, String>, filter: &str) -> bool {
    match filter.split_once('=') {
        Some((k, v)) => labels.get(k).is_some_and(|x| x == v),
        None => labels.contains_key(filter),
    }
}

impl Engine for Fake {
    async fn image_id(&self, name: &str) -> EngineResult<Option<String>> {
        Ok(self.lock().images.get(name).cloned())
    }

    async fn list_containers(&self, label: &str) -> EngineResult<Vec<ContainerSummary>> {
        Ok(self
            .lock()
            .containers
            .values()
            .filter(|c| matches(&c.spec.labels, label))
            .map(|c| ContainerSummary {
                id: c.id.clone(),
                name: c.spec.name.clone(),
                labels: c.spec.labels.clone(),
                state: if c.running {
                    "running".into()
                } else if c.exited.is_some() {
                    "exited".into()
                } else {
                    "created".into()
                },
            })
            .collect())
    }

    async fn inspect_container(&self, id: &str) -> EngineResult<ContainerInfo> {
        let mut s = self.lock();
        let behaviours = s.behaviours.clone();
        let c = Self::find(&mut s, id)?;
        let service = c
            .spec
            .labels
            .get(labels::SERVICE)
            .cloned()
            .unwrap_or_default();
        let behaviour = behaviours
            .get(&service)
            .cloned()
            .unwrap_or(Behaviour::HealthyAfter(2));
        let mut health_log = Vec::new();
        if c.running {
            c.inspections += 1;
            let has_check = c.spec.healthcheck.is_some();
            match &behaviour {
                Behaviour::HealthyAfter(n) if has_check => {
                    c.health = if c.inspections >= *n {
                        Health::Healthy
                    } else {
                        Health::Starting
                    };
                }
                Behaviour::HealthyAfter(_) => {}
                Behaviour::UnhealthyAfter(n, out) => {
                    if c.inspections >= *n {
                        c.health = Health::Unhealthy;
                        health_log.push(format!("exit 1: {out}"));
                    } else {
                        c.health = Health::Starting;
                    }
                }
                Behaviour::ExitsAfter(n, code) => {
                    if c.inspections >= *n {
                        c.running = false;
                        c.exited = Some(*code);
                    }
                }
            }
        }
        let state = if c.running {
            "running"
        } else if c.exited.is_some() {
            "exited"
        } else {
            "created"
        };
        Ok(ContainerInfo {
            id: c.id.clone(),
            name: c.spec.name.clone(),
            labels: c.spec.labels.clone(),
            state: state.into(),
            running: c.running,
            exit_code: c.exited,
            oom_killed: false,
            health: if c.spec.healthcheck.is_none() {
                Health::None
            } else {
                c.health
            },
            health_log,
            restart_count: c.restart_count,
            started_at: Some("2026-11-24T03:00:00Z".into()),
            hostname: c.id[..12.min(c.id.len())].to_owned(),
            user: c.spec.user.clone().unwrap_or_default(),
            restart_policy: match &c.spec.restart {
                None | Some(Restart::No) => "no".into(),
                Some(Restart::Always) => "always".into(),
                Some(Restart::UnlessStopped) => "unless-stopped".into(),
                Some(Restart::OnFailure(_)) => "on-failure".into(),
            },
            published: c
                .spec
                .ports
                .iter()
                .map(|p| Published {
                    host_ip: p.host_ip.clone(),
                    host_port: p.host_port,
                    container_port: p.container_port,
                })
                .collect(),
            process_uid: None,
            env: c.spec.env.clone(),
            image: c.spec.image.clone(),
        })
    }

    async fn create_container(&self, spec: &ContainerSpec) -> EngineResult<String> {
        let mut s = self.lock();
        if !s.images.contains_key(&spec.image) {
            return Err(EngineError::new(
                format!("create container {}", spec.name),
                format!("No such image: {}", spec.image),
                Some(404),
            ));
        }
        if s.containers.values().any(|c| c.spec.name == spec.name) {
            return Err(EngineError::new(
                format!("create container {}", spec.name),
                "Conflict. The container name is already in use",
                Some(409),
            ));
        }
        for (net, _) in &spec.networks {
            if !s.networks.contains_key(net) {
                return Err(EngineError::new(
                    "create container",
                    format!("network {net} not found"),
                    Some(404),
                ));
            }
        }
        s.next_id += 1;
        // Distinct in the first 12 digits, the container's host name (as
        // Docker's ids are).
        let id = format!("{:012x}{}", s.next_id, "0".repeat(52));
        s.calls.push(format!("create {}", spec.name));
        s.containers.insert(
            id.clone(),
            FakeContainer {
                id: id.clone(),
                spec: spec.clone(),
                running: false,
                exited: None,
                health: Health::Starting,
                inspections: 0,
                restart_count: 0,
            },
        );
        Ok(id)
    }

    async fn start_container(&self, id: &str) -> EngineResult<()> {
        let mut s = self.lock();
        let busy = s.busy_ports.clone();
        let c = Self::find(&mut s, id)?;
        if let Some(p) = c.spec.ports.iter().find(|p| busy.contains(&p.host_port)) {
            return Err(EngineError::new(
                format!("start container {}", c.spec.name),
                format!(
                    "driver failed programming external connectivity: Bind for {}:{} failed: port is already allocated",
                    p.host_ip, p.host_port
                ),
                Some(500),
            ));
        }
        c.running = true;
        c.exited = None;
        c.inspections = 0;
        c.health = Health::Starting;
        let name = c.spec.name.clone();
        s.calls.push(format!("start {name}"));
        Ok(())
    }

    async fn stop_container(&self, id: &str, _timeout: Option<Duration>) -> EngineResult<()> {
        let mut s = self.lock();
        let c = Self::find(&mut s, id)?;
        c.running = false;
        c.exited.get_or_insert(0);
        let name = c.spec.name.clone();
        s.calls.push(format!("stop {name}"));
        Ok(())
    }

    async fn remove_container(&self, id: &str) -> EngineResult<()> {
        let mut s = self.lock();
        let c = Self::find(&mut s, id)?;
        let (key, name) = (c.id.clone(), c.spec.name.clone());
        s.containers.remove(&key);
        s.calls.push(format!("remove {name}"));
        Ok(())
    }

    async fn list_networks(&self, label: &str) -> EngineResult<Vec<Resource>> {
        Ok(self
            .lock()
            .networks
            .iter()
            .filter(|(_, l)| matches(l, label))
            .map(|(n, l)| Resource {
                name: n.clone(),
                labels: l.clone(),
            })
            .collect())
    }

    async fn create_network(
        &self,
        name: &str,
        _driver: &str,
        _internal: bool,
        labels: &BTreeMap<String, String>,
    ) -> EngineResult<()> {
        let mut s = self.lock();
        if s.networks.contains_key(name) {
            return Err(EngineError::new(
                format!("create network {name}"),
                "already exists",
                Some(409),
            ));
        }
        s.networks.insert(name.to_owned(), labels.clone());
        s.calls.push(format!("network {name}"));
        Ok(())
    }

    async fn remove_network(&self, name: &str) -> EngineResult<()> {
        let mut s = self.lock();
        s.networks.remove(name);
        s.calls.push(format!("rm-network {name}"));
        Ok(())
    }

    async fn list_volumes(&self, label: &str) -> EngineResult<Vec<Resource>> {
        Ok(self
            .lock()
            .volumes
            .iter()
            .filter(|(_, l)| matches(l, label))
            .map(|(n, l)| Resource {
                name: n.clone(),
                labels: l.clone(),
            })
            .collect())
    }

    async fn create_volume(
        &self,
        name: &str,
        _driver: &str,
        labels: &BTreeMap<String, String>,
    ) -> EngineResult<()> {
        let mut s = self.lock();
        s.volumes.insert(name.to_owned(), labels.clone());
        s.calls.push(format!("volume {name}"));
        Ok(())
    }

    async fn remove_volume(&self, name: &str) -> EngineResult<()> {
        let mut s = self.lock();
        s.volumes.remove(name);
        s.calls.push(format!("rm-volume {name}"));
        Ok(())
    }

    async fn logs(
        &self,
        id: &str,
        tail: Option<usize>,
        _follow: bool,
        on_line: &mut (dyn FnMut(&str) + Send),
    ) -> EngineResult<()> {
        let lines = {
            let mut s = self.lock();
            let name = Self::find(&mut s, id)?.spec.name.clone();
            s.logs.get(&name).cloned().unwrap_or_default()
        };
        let skip = tail.map_or(0, |n| lines.len().saturating_sub(n));
        for l in &lines[skip..] {
            on_line(l);
        }
        Ok(())
    }

    async fn exec(&self, id: &str, cmd: &[String], _env: &[String]) -> EngineResult<ExecOutput> {
        let (c, h) = {
            let mut s = self.lock();
            let h = s.exec.clone();
            (Self::find(&mut s, id)?.clone(), h)
        };
        if !c.running {
            return Err(EngineError::new(
                "exec",
                format!("Container {} is not running", c.spec.name),
                Some(409),
            ));
        }
        Ok(h.map_or_else(ExecOutput::default, |h| h(&c, cmd)))
    }

    async fn reach(&self, id: &str, port: u16) -> EngineResult<Option<String>> {
        let s = self.lock();
        let c = s.containers.values().find(|c| c.id == id).ok_or_else(|| {
            EngineError::new(
                format!("inspect container {id}"),
                "No such container",
                Some(404),
            )
        })?;
        Ok(s.forwards.get(&port).filter(|_| c.running).cloned())
    }

    fn host_port_free(&self, _ip: &str, port: u16) -> bool {
        !self.lock().busy_ports.contains(&port)
    }
}
