//! [`Engine`] on a real Docker engine through bollard (API 1.41 and later:
//! no field newer than Debian 12's engine 20.10 is used).

use super::{
    ContainerInfo, ContainerSpec, ContainerSummary, Engine, EngineError, EngineResult, ExecOutput,
    Health, Published, Resource,
};
use crate::compose::Restart;
use bollard::Docker;
use bollard::container::LogOutput;
use bollard::errors::Error as BollardError;
use bollard::exec::StartExecResults;
use bollard::models::{
    ContainerCreateBody, EndpointSettings, ExecConfig, HealthConfig, HealthStatusEnum, HostConfig,
    HostConfigLogConfig, NetworkConnectRequest, NetworkCreateRequest, NetworkingConfig,
    PortBinding, RestartPolicy, RestartPolicyNameEnum, VolumeCreateRequest,
};
use bollard::query_parameters::{
    CreateContainerOptionsBuilder, InspectContainerOptions, ListContainersOptionsBuilder,
    ListNetworksOptionsBuilder, ListVolumesOptionsBuilder, LogsOptionsBuilder,
    RemoveContainerOptionsBuilder, RemoveVolumeOptions, StartContainerOptions,
    StopContainerOptionsBuilder,
};
use futures_util::StreamExt as _;
use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

/// The real engine (`DOCKER_HOST` or the local socket).
#[derive(Debug, Clone)]
pub struct Live {
    docker: Docker,
    local: bool,
}

impl Live {
    /// Connects and negotiates the API version; fails with instructions
    /// when no engine answers.
    pub async fn connect() -> Result<Self, crate::BuildError> {
        let docker = crate::docker::connect().await?;
        let local = std::env::var("DOCKER_HOST").map_or(true, |h| h.starts_with("unix://"));
        Ok(Self { docker, local })
    }

    /// Wraps a connected client.
    pub fn new(docker: Docker) -> Self {
        let local = std::env::var("DOCKER_HOST").map_or(true, |h| h.starts_with("unix://"));
        Self { docker, local }
    }

    /// The bollard client.
    pub fn docker(&self) -> &Docker {
        &self.docker
    }
}

fn err(op: impl Into<String>, e: BollardError) -> EngineError {
    match e {
        BollardError::DockerResponseServerError {
            status_code,
            message,
        } => EngineError::new(op, message, Some(status_code)),
        other => EngineError::new(op, other.to_string(), None),
    }
}

fn label_filter(label: &str) -> HashMap<&str, Vec<&str>> {
    HashMap::from([("label", vec![label])])
}

fn to_map(m: Option<HashMap<String, String>>) -> BTreeMap<String, String> {
    m.unwrap_or_default().into_iter().collect()
}

fn nanos(d: Option<Duration>) -> Option<i64> {
    d.map(|d| i64::try_from(d.as_nanos()).unwrap_or(i64::MAX))
}

fn create_body(spec: &ContainerSpec) -> ContainerCreateBody {
    let port_key = |p: &crate::compose::Port| format!("{}/{}", p.container_port, p.protocol);
    let mut bindings: HashMap<String, Option<Vec<PortBinding>>> = HashMap::new();
    for p in &spec.ports {
        bindings
            .entry(port_key(p))
            .or_insert_with(|| Some(Vec::new()))
            .get_or_insert_with(Vec::new)
            .push(PortBinding {
                host_ip: Some(p.host_ip.clone()),
                host_port: Some(p.host_port.to_string()),
            });
    }
    let restart_policy = spec.restart.as_ref().map(|r| {
        let (name, max) = match r {
            Restart::No => (RestartPolicyNameEnum::NO, None),
            Restart::Always => (RestartPolicyNameEnum::ALWAYS, None),
            Restart::UnlessStopped => (RestartPolicyNameEnum::UNLESS_STOPPED, None),
            Restart::OnFailure(n) => (RestartPolicyNameEnum::ON_FAILURE, n.map(i64::from)),
        };
        RestartPolicy {
            name: Some(name),
            maximum_retry_count: max,
        }
    });
    let mut binds = spec.binds.clone();
    binds.extend(spec.volumes.iter().map(|(v, t, ro)| {
        if *ro {
            format!("{v}:{t}:ro")
        } else {
            format!("{v}:{t}")
        }
    }));
    let host_config = HostConfig {
        binds: Some(binds),
        port_bindings: (!bindings.is_empty()).then_some(bindings),
        restart_policy,
        init: spec.init.then_some(true),
        readonly_rootfs: spec.read_only.then_some(true),
        tmpfs: (!spec.tmpfs.is_empty()).then(|| {
            spec.tmpfs
                .iter()
                .map(|t| (t.clone(), String::new()))
                .collect()
        }),
        cap_drop: (!spec.cap_drop.is_empty()).then(|| spec.cap_drop.clone()),
        security_opt: (!spec.security_opt.is_empty()).then(|| spec.security_opt.clone()),
        log_config: spec.logging.as_ref().map(|l| HostConfigLogConfig {
            typ: Some(l.driver.clone()),
            config: Some(l.options.clone().into_iter().collect()),
        }),
        network_mode: spec.networks.first().map(|(n, _)| n.clone()),
        ..Default::default()
    };
    let networking_config = spec.networks.first().map(|(n, aliases)| NetworkingConfig {
        endpoints_config: Some(HashMap::from([(
            n.clone(),
            EndpointSettings {
                aliases: Some(aliases.clone()),
                ..Default::default()
            },
        )])),
    });
    ContainerCreateBody {
        image: Some(spec.image.clone()),
        cmd: spec.command.clone(),
        env: Some(spec.env.clone()),
        user: spec.user.clone(),
        labels: Some(spec.labels.clone().into_iter().collect()),
        exposed_ports: (!spec.ports.is_empty()).then(|| spec.ports.iter().map(port_key).collect()),
        healthcheck: spec.healthcheck.as_ref().map(|h| HealthConfig {
            test: Some(h.test.clone()),
            interval: nanos(h.interval),
            timeout: nanos(h.timeout),
            retries: h.retries.map(i64::from),
            start_period: nanos(h.start_period),
            // Needs API 1.44; Debian 12's engine speaks 1.41.
            start_interval: None,
        }),
        stop_timeout: spec
            .stop_timeout
            .map(|s| i64::try_from(s).unwrap_or(i64::MAX)),
        host_config: Some(host_config),
        networking_config,
        ..Default::default()
    }
}

fn process_uid(pid: i64) -> Option<u32> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

impl Engine for Live {
    async fn image_id(&self, name: &str) -> EngineResult<Option<String>> {
        match self.docker.inspect_image(name).await {
            Ok(i) => Ok(Some(i.id.unwrap_or_default())),
            Err(BollardError::DockerResponseServerError {
                status_code: 404, ..
            }) => Ok(None),
            Err(e) => Err(err(format!("inspect image {name}"), e)),
        }
    }

    async fn list_containers(&self, label: &str) -> EngineResult<Vec<ContainerSummary>> {
        let filters = label_filter(label);
        let list = self
            .docker
            .list_containers(Some(
                ListContainersOptionsBuilder::default()
                    .all(true)
                    .filters(&filters)
                    .build(),
            ))
            .await
            .map_err(|e| err("list containers", e))?;
        Ok(list
            .into_iter()
            .map(|c| ContainerSummary {
                id: c.id.unwrap_or_default(),
                name: c
                    .names
                    .and_then(|n| n.into_iter().next())
                    .unwrap_or_default()
                    .trim_start_matches('/')
                    .to_owned(),
                labels: to_map(c.labels),
                state: c.state.map(|s| s.to_string()).unwrap_or_default(),
            })
            .collect())
    }

    async fn inspect_container(&self, id: &str) -> EngineResult<ContainerInfo> {
        let c = self
            .docker
            .inspect_container(id, None::<InspectContainerOptions>)
            .await
            .map_err(|e| err(format!("inspect container {id}"), e))?;
        let state = c.state.unwrap_or_default();
        let health = state.health.clone().unwrap_or_default();
        let config = c.config.unwrap_or_default();
        let mut published = Vec::new();
        for (key, bindings) in c.network_settings.and_then(|n| n.ports).unwrap_or_default() {
            let container_port = key
                .split('/')
                .next()
                .and_then(|p| p.parse().ok())
                .unwrap_or_default();
            for b in bindings.unwrap_or_default() {
                published.push(Published {
                    host_ip: b.host_ip.unwrap_or_default(),
                    host_port: b.host_port.and_then(|p| p.parse().ok()).unwrap_or_default(),
                    container_port,
                });
            }
        }
        published
            .sort_by(|a, b| (a.container_port, &a.host_ip).cmp(&(b.container_port, &b.host_ip)));
        let running = state.running == Some(true);
        Ok(ContainerInfo {
            id: c.id.unwrap_or_default(),
            name: c
                .name
                .unwrap_or_default()
                .trim_start_matches('/')
                .to_owned(),
            labels: to_map(config.labels),
            state: state.status.map(|s| s.to_string()).unwrap_or_default(),
            running,
            exit_code: state.exit_code,
            oom_killed: state.oom_killed == Some(true),
            health: match health.status {
                None | Some(HealthStatusEnum::NONE | HealthStatusEnum::EMPTY) => Health::None,
                Some(HealthStatusEnum::STARTING) => Health::Starting,
                Some(HealthStatusEnum::HEALTHY) => Health::Healthy,
                Some(HealthStatusEnum::UNHEALTHY) => Health::Unhealthy,
            },
            health_log: health
                .log
                .unwrap_or_default()
                .into_iter()
                .map(|r| {
                    format!(
                        "exit {}: {}",
                        r.exit_code.unwrap_or(-1),
                        r.output.unwrap_or_default().trim()
                    )
                })
                .collect(),
            restart_count: c.restart_count.unwrap_or_default(),
            started_at: state.started_at,
            hostname: config.hostname.unwrap_or_default(),
            user: config.user.unwrap_or_default(),
            restart_policy: c
                .host_config
                .and_then(|h| h.restart_policy)
                .and_then(|r| r.name)
                .map(|n| n.to_string())
                .unwrap_or_default(),
            published,
            process_uid: if self.local && running {
                state.pid.and_then(process_uid)
            } else {
                None
            },
            env: config.env.unwrap_or_default(),
            image: config.image.unwrap_or_default(),
        })
    }

    async fn create_container(&self, spec: &ContainerSpec) -> EngineResult<String> {
        let op = || format!("create container {}", spec.name);
        let created = self
            .docker
            .create_container(
                Some(
                    CreateContainerOptionsBuilder::default()
                        .name(&spec.name)
                        .build(),
                ),
                create_body(spec),
            )
            .await
            .map_err(|e| err(op(), e))?;
        // API 1.41 takes one network at creation; the others are connected
        // before the container starts, so it starts on all of them.
        for (net, aliases) in spec.networks.iter().skip(1) {
            self.docker
                .connect_network(
                    net,
                    NetworkConnectRequest {
                        container: created.id.clone(),
                        endpoint_config: Some(EndpointSettings {
                            aliases: Some(aliases.clone()),
                            ..Default::default()
                        }),
                    },
                )
                .await
                .map_err(|e| err(format!("connect {} to network {net}", spec.name), e))?;
        }
        Ok(created.id)
    }

    async fn start_container(&self, id: &str) -> EngineResult<()> {
        self.docker
            .start_container(id, None::<StartContainerOptions>)
            .await
            .map_err(|e| err(format!("start container {id}"), e))
    }

    async fn stop_container(&self, id: &str, timeout: Option<Duration>) -> EngineResult<()> {
        let mut opts = StopContainerOptionsBuilder::default();
        if let Some(t) = timeout {
            opts = opts.t(i32::try_from(t.as_secs()).unwrap_or(i32::MAX));
        }
        match self.docker.stop_container(id, Some(opts.build())).await {
            // 304: already stopped.
            Ok(())
            | Err(BollardError::DockerResponseServerError {
                status_code: 304, ..
            }) => Ok(()),
            Err(e) => Err(err(format!("stop container {id}"), e)),
        }
    }

    async fn remove_container(&self, id: &str) -> EngineResult<()> {
        self.docker
            .remove_container(
                id,
                Some(RemoveContainerOptionsBuilder::default().force(true).build()),
            )
            .await
            .map_err(|e| err(format!("remove container {id}"), e))
    }

    async fn list_networks(&self, label: &str) -> EngineResult<Vec<Resource>> {
        let filters = label_filter(label);
        let list = self
            .docker
            .list_networks(Some(
                ListNetworksOptionsBuilder::default()
                    .filters(&filters)
                    .build(),
            ))
            .await
            .map_err(|e| err("list networks", e))?;
        Ok(list
            .into_iter()
            .map(|n| Resource {
                name: n.name.unwrap_or_default(),
                labels: to_map(n.labels),
            })
            .collect())
    }

    async fn create_network(
        &self,
        name: &str,
        driver: &str,
        internal: bool,
        labels: &BTreeMap<String, String>,
    ) -> EngineResult<()> {
        self.docker
            .create_network(NetworkCreateRequest {
                name: name.to_owned(),
                driver: Some(driver.to_owned()),
                internal: Some(internal),
                labels: Some(labels.clone().into_iter().collect()),
                ..Default::default()
            })
            .await
            .map(|_| ())
            .map_err(|e| err(format!("create network {name}"), e))
    }

    async fn remove_network(&self, name: &str) -> EngineResult<()> {
        self.docker
            .remove_network(name)
            .await
            .map_err(|e| err(format!("remove network {name}"), e))
    }

    async fn list_volumes(&self, label: &str) -> EngineResult<Vec<Resource>> {
        let filters = label_filter(label);
        let list = self
            .docker
            .list_volumes(Some(
                ListVolumesOptionsBuilder::default()
                    .filters(&filters)
                    .build(),
            ))
            .await
            .map_err(|e| err("list volumes", e))?;
        Ok(list
            .volumes
            .unwrap_or_default()
            .into_iter()
            .map(|v| Resource {
                name: v.name,
                labels: v.labels.into_iter().collect(),
            })
            .collect())
    }

    async fn create_volume(
        &self,
        name: &str,
        driver: &str,
        labels: &BTreeMap<String, String>,
    ) -> EngineResult<()> {
        self.docker
            .create_volume(VolumeCreateRequest {
                name: Some(name.to_owned()),
                driver: Some(driver.to_owned()),
                labels: Some(labels.clone().into_iter().collect()),
                ..Default::default()
            })
            .await
            .map(|_| ())
            .map_err(|e| err(format!("create volume {name}"), e))
    }

    async fn remove_volume(&self, name: &str) -> EngineResult<()> {
        self.docker
            .remove_volume(name, None::<RemoveVolumeOptions>)
            .await
            .map_err(|e| err(format!("remove volume {name}"), e))
    }

    async fn logs(
        &self,
        id: &str,
        tail: Option<usize>,
        follow: bool,
        on_line: &mut (dyn FnMut(&str) + Send),
    ) -> EngineResult<()> {
        let tail = tail.map_or_else(|| "all".to_owned(), |n| n.to_string());
        let opts = LogsOptionsBuilder::default()
            .stdout(true)
            .stderr(true)
            .follow(follow)
            .tail(&tail)
            .build();
        let mut stream = self.docker.logs(id, Some(opts));
        let mut partial = String::new();
        while let Some(item) = stream.next().await {
            let chunk = item.map_err(|e| err(format!("logs of {id}"), e))?;
            let bytes = match chunk {
                LogOutput::StdOut { message }
                | LogOutput::StdErr { message }
                | LogOutput::Console { message }
                | LogOutput::StdIn { message } => message,
            };
            partial.push_str(&String::from_utf8_lossy(&bytes));
            while let Some(nl) = partial.find('\n') {
                let line: String = partial.drain(..=nl).collect();
                on_line(line.trim_end_matches(['\n', '\r']));
            }
        }
        if !partial.is_empty() {
            on_line(&partial);
        }
        Ok(())
    }

    async fn exec(&self, id: &str, cmd: &[String], env: &[String]) -> EngineResult<ExecOutput> {
        let op = || format!("exec {} in {id}", cmd.first().map_or("", String::as_str));
        let created = self
            .docker
            .create_exec(
                id,
                ExecConfig {
                    cmd: Some(cmd.to_vec()),
                    env: Some(env.to_vec()),
                    attach_stdout: Some(true),
                    attach_stderr: Some(true),
                    ..Default::default()
                },
            )
            .await
            .map_err(|e| err(op(), e))?;
        let mut out = ExecOutput::default();
        if let StartExecResults::Attached { mut output, .. } = self
            .docker
            .start_exec(&created.id, None)
            .await
            .map_err(|e| err(op(), e))?
        {
            while let Some(item) = output.next().await {
                match item.map_err(|e| err(op(), e))? {
                    LogOutput::StdErr { message } => {
                        out.stderr.push_str(&String::from_utf8_lossy(&message));
                    }
                    LogOutput::StdOut { message } | LogOutput::Console { message } => {
                        out.stdout.push_str(&String::from_utf8_lossy(&message));
                    }
                    LogOutput::StdIn { .. } => {}
                }
            }
        }
        out.exit_code = self
            .docker
            .inspect_exec(&created.id)
            .await
            .map_err(|e| err(op(), e))?
            .exit_code;
        Ok(out)
    }

    async fn reach(&self, id: &str, port: u16) -> EngineResult<Option<String>> {
        let c = self
            .docker
            .inspect_container(id, None::<InspectContainerOptions>)
            .await
            .map_err(|e| err(format!("inspect container {id}"), e))?;
        // Any network will do: on the engine's host every bridge network is
        // routed, internal ones included.
        Ok(c.network_settings
            .and_then(|n| n.networks)
            .unwrap_or_default()
            .into_values()
            .filter_map(|e| e.ip_address)
            .find(|ip| !ip.is_empty())
            .map(|ip| format!("{ip}:{port}")))
    }

    fn host_port_free(&self, ip: &str, port: u16) -> bool {
        if !self.local {
            return true;
        }
        let ip = if ip.is_empty() { "0.0.0.0" } else { ip };
        std::net::TcpListener::bind((ip, port)).is_ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::compose::{Healthcheck, Logging, Port};

    #[test]
    fn a_spec_becomes_the_engine_request_compose_would_send() {
        let spec = ContainerSpec {
            name: "p_web_1".into(),
            image: "img".into(),
            command: Some(vec!["/taskstack-web".into()]),
            env: vec!["A=1".into()],
            user: Some("65534:65534".into()),
            labels: BTreeMap::from([("k".into(), "v".into())]),
            binds: vec!["/s/api_token:/run/secrets/api_token:ro".into()],
            volumes: vec![("p_data".into(), "/data".into(), false)],
            tmpfs: vec!["/tmp".into()],
            networks: vec![
                ("p_backend".into(), vec!["web".into()]),
                ("p_frontend".into(), vec!["web".into()]),
            ],
            ports: vec![Port {
                host_ip: "127.0.0.1".into(),
                host_port: 8000,
                container_port: 8000,
                protocol: "tcp".into(),
            }],
            healthcheck: Some(Healthcheck {
                test: vec!["CMD".into(), "/taskstack-web".into(), "healthcheck".into()],
                interval: Some(Duration::from_secs(5)),
                timeout: Some(Duration::from_secs(3)),
                retries: Some(3),
                start_period: Some(Duration::from_secs(10)),
            }),
            restart: Some(Restart::UnlessStopped),
            init: true,
            read_only: true,
            cap_drop: vec!["ALL".into()],
            security_opt: vec!["no-new-privileges:true".into()],
            logging: Some(Logging {
                driver: "json-file".into(),
                options: BTreeMap::from([("max-size".into(), "10m".into())]),
            }),
            stop_timeout: Some(30),
        };
        let body = create_body(&spec);
        let hc = body.healthcheck.as_ref().expect("healthcheck");
        assert_eq!(hc.interval, Some(5_000_000_000));
        assert_eq!(hc.start_period, Some(10_000_000_000));
        assert_eq!(hc.start_interval, None, "needs API 1.44");
        assert_eq!(body.exposed_ports, Some(vec!["8000/tcp".to_owned()]));
        assert_eq!(body.stop_timeout, Some(30));
        let host = body.host_config.as_ref().expect("host config");
        assert_eq!(
            host.binds.as_deref(),
            Some(
                &[
                    "/s/api_token:/run/secrets/api_token:ro".to_owned(),
                    "p_data:/data".to_owned()
                ][..]
            )
        );
        let binding = &host.port_bindings.as_ref().expect("ports")["8000/tcp"];
        assert_eq!(
            binding
                .as_ref()
                .map(|b| (b[0].host_ip.clone(), b[0].host_port.clone())),
            Some((Some("127.0.0.1".into()), Some("8000".into())))
        );
        assert_eq!(
            host.restart_policy.as_ref().and_then(|r| r.name),
            Some(RestartPolicyNameEnum::UNLESS_STOPPED)
        );
        assert_eq!((host.init, host.readonly_rootfs), (Some(true), Some(true)));
        assert_eq!(host.network_mode.as_deref(), Some("p_backend"));
        assert!(host.tmpfs.as_ref().is_some_and(|t| t.contains_key("/tmp")));
        // Only the first network at creation; the other is connected before start.
        let endpoints = body
            .networking_config
            .as_ref()
            .and_then(|n| n.endpoints_config.as_ref())
            .expect("endpoints");
        assert_eq!(endpoints.keys().collect::<Vec<_>>(), ["p_backend"]);
    }
}
