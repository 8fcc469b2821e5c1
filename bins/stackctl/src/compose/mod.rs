//! Reading a Compose file the way Compose does, for the subset of the
//! format `compose/docker-compose.yml` uses: YAML anchors and `<<:` merge
//! keys, `x-` extension keys, `${VAR}` / `${VAR:-default}` /
//! `${VAR:?error}` interpolation from the environment and the `.env` file
//! beside the compose file, then typed services, networks, volumes and
//! secrets. Any other key is an error naming the file, the line (where it
//! can be found) and the key: a setting stackctl would not apply is never
//! silently dropped.
//!
//! - [`interpolate`]: variable substitution;
//! - [`dotenv`]: the `.env` file;
//! - [`model`]: the accepted keys, as serde types;
//! - [`stores`]: services wait for the stores their URLs name.

pub mod dotenv;
pub mod interpolate;
pub mod model;
pub mod stores;

use model::{DependsOn, Flag, MapOrList, NetworkRefs, RawFile, RawService, Scalar};
use serde::Serialize;
use serde_norway::Value;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// A compose file that cannot be used, with where and why.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{}{}: {}{message}", file.display(), line.map(|l| format!(":{l}")).unwrap_or_default(), if key.is_empty() { String::new() } else { format!("{key}: ") })]
pub struct ComposeError {
    pub file: PathBuf,
    /// 1-based line of the offending key, when it could be found.
    pub line: Option<usize>,
    /// Dotted path of the key (`services.web.ports[0]`); empty for the file.
    pub key: String,
    pub message: String,
}

/// The environment the file is interpolated with: process variables (or a
/// test's own map) over the `.env` file's.
pub type Env = BTreeMap<String, String>;

/// A loaded compose project.
#[derive(Debug, Clone, PartialEq)]
pub struct Project {
    /// Compose's project name: `--project`, else `COMPOSE_PROJECT_NAME`,
    /// else the file's `name:`, else its directory's name; normalised like
    /// Compose v1 (lower case; letters, digits, `-` and `_`).
    pub name: String,
    /// Absolute path of the compose file.
    pub file: PathBuf,
    /// The directory relative paths are resolved against (the file's).
    pub working_dir: PathBuf,
    pub services: BTreeMap<String, Service>,
    pub networks: BTreeMap<String, Network>,
    pub volumes: BTreeMap<String, Volume>,
    pub secrets: BTreeMap<String, Secret>,
    /// The environment the file was interpolated with.
    pub env: Env,
    /// Services of the file left out although their profile is on, with
    /// why (the Redis service when no service keeps anything on Redis).
    pub skipped: BTreeMap<String, String>,
}

/// One service, every value interpolated and typed.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Service {
    pub name: String,
    pub image: String,
    pub command: Option<Vec<String>>,
    pub user: Option<String>,
    pub environment: BTreeMap<String, String>,
    /// Host paths (absolute) mounted into the container.
    pub binds: Vec<Bind>,
    /// Named volumes of the project mounted into the container.
    pub volume_mounts: Vec<VolumeMount>,
    pub secrets: Vec<String>,
    pub networks: Vec<String>,
    pub ports: Vec<Port>,
    pub healthcheck: Option<Healthcheck>,
    pub depends_on: BTreeMap<String, Condition>,
    pub replicas: usize,
    pub restart: Restart,
    pub init: bool,
    pub read_only: bool,
    pub tmpfs: Vec<String>,
    pub cap_drop: Vec<String>,
    pub security_opt: Vec<String>,
    pub logging: Option<Logging>,
    #[serde(with = "opt_secs")]
    pub stop_grace_period: Option<Duration>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Bind {
    pub source: PathBuf,
    pub target: String,
    pub read_only: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct VolumeMount {
    /// The volume's key in the file (the engine's name is `<project>_<key>`).
    pub volume: String,
    pub target: String,
    pub read_only: bool,
}

/// A published port: `[host_ip:]host_port:container_port[/proto]`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Port {
    /// Empty: every interface.
    pub host_ip: String,
    pub host_port: u16,
    pub container_port: u16,
    pub protocol: String,
}

impl Port {
    /// Whether the port is published only on a loopback address.
    pub fn loopback_only(&self) -> bool {
        is_loopback(&self.host_ip)
    }
}

/// Whether `ip` (as the engine reports a binding's host IP) is loopback.
pub fn is_loopback(ip: &str) -> bool {
    ip.parse::<std::net::IpAddr>()
        .is_ok_and(|a| a.is_loopback())
}

/// An exec-form health check.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Healthcheck {
    /// `["CMD", ...]` (exec form) or `["CMD-SHELL", ...]`.
    pub test: Vec<String>,
    #[serde(with = "opt_secs")]
    pub interval: Option<Duration>,
    #[serde(with = "opt_secs")]
    pub timeout: Option<Duration>,
    pub retries: Option<u32>,
    #[serde(with = "opt_secs")]
    pub start_period: Option<Duration>,
}

/// When a dependency counts as ready for its dependents.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum Condition {
    /// Its containers are running.
    Started,
    /// Its containers are healthy (it must have a health check).
    Healthy,
}

/// The restart policy.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub enum Restart {
    No,
    Always,
    UnlessStopped,
    OnFailure(Option<u32>),
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Logging {
    pub driver: String,
    pub options: BTreeMap<String, String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Network {
    pub internal: bool,
    pub driver: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Volume {
    pub driver: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Secret {
    /// Absolute path of the file on this host.
    pub file: PathBuf,
}

/// The network a service without `networks:` joins (Compose's `default`).
pub const DEFAULT_NETWORK: &str = "default";

mod opt_secs {
    use serde::Serializer;
    use std::time::Duration;

    #[allow(clippy::ref_option)]
    pub fn serialize<S: Serializer>(d: &Option<Duration>, s: S) -> Result<S::Ok, S::Error> {
        match d {
            Some(d) => s.serialize_some(&d.as_nanos()),
            None => s.serialize_none(),
        }
    }
}

/// Loads `file`, interpolating with `env` over the `.env` file beside it;
/// `project` overrides the project name.
pub fn load(file: &Path, env: &Env, project: Option<&str>) -> Result<Project, ComposeError> {
    let file = std::path::absolute(file).unwrap_or_else(|_| file.to_path_buf());
    let whole = |message: String| ComposeError {
        file: file.clone(),
        line: None,
        key: String::new(),
        message,
    };
    let text = std::fs::read_to_string(&file).map_err(|e| whole(format!("cannot read: {e}")))?;
    let working_dir = file
        .parent()
        .map_or_else(|| PathBuf::from("."), Path::to_path_buf);
    let mut full_env = Env::new();
    let dotenv_path = working_dir.join(".env");
    if let Ok(dot) = std::fs::read_to_string(&dotenv_path) {
        full_env = dotenv::parse(&dot).map_err(|(line, message)| ComposeError {
            file: dotenv_path.clone(),
            line: Some(line),
            key: String::new(),
            message,
        })?;
    }
    full_env.extend(env.iter().map(|(k, v)| (k.clone(), v.clone())));
    parse(&text, &file, &working_dir, full_env, project)
}

/// Parses compose `text` (see [`load`]); `file` is only used in messages
/// and labels, `working_dir` resolves relative paths.
pub fn parse(
    text: &str,
    file: &Path,
    working_dir: &Path,
    env: Env,
    project: Option<&str>,
) -> Result<Project, ComposeError> {
    let err = |path: &str, message: String| ComposeError {
        file: file.to_path_buf(),
        line: find_line(text, path),
        key: path.to_owned(),
        message,
    };
    let mut value: Value = serde_norway::from_str(text).map_err(|e| ComposeError {
        file: file.to_path_buf(),
        line: e.location().map(|l| l.line()),
        key: String::new(),
        message: format!("invalid YAML: {e}"),
    })?;
    // A merged mapping may itself hold `<<` (an anchor built on another
    // anchor): merge until none is left.
    for _ in 0..16 {
        if !has_merge_key(&value) {
            break;
        }
        value
            .apply_merge()
            .map_err(|e| err("", format!("invalid merge key (<<): {e}")))?;
    }
    strip_extensions(&mut value);
    interpolate_values(&mut value, &env, "", text, file)?;
    let raw: RawFile = serde_path_to_error::deserialize(value).map_err(|e| {
        let mut path = e.path().to_string();
        let inner = e.into_inner().to_string();
        if let Some(field) = unknown_field(&inner) {
            path = if path.is_empty() || path == "." {
                field.to_owned()
            } else if path.ends_with(field) {
                path
            } else {
                format!("{path}.{field}")
            };
            let message = format!(
                "unknown key `{field}`: stackctl does not support it (it would be ignored); {}",
                inner.split_once(", ").map_or("", |(_, rest)| rest)
            );
            return err(&path, message);
        }
        err(&path, inner)
    })?;

    let name = project
        .map(str::to_owned)
        .or_else(|| env.get("COMPOSE_PROJECT_NAME").cloned())
        .or(raw.name.clone())
        .or_else(|| {
            working_dir
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
        })
        .map(|n| normalize_name(&n))
        .filter(|n| !n.is_empty())
        .ok_or_else(|| {
            err(
                "name",
                "cannot derive a project name; pass --project".into(),
            )
        })?;

    let mut networks = BTreeMap::new();
    for (key, net) in raw.networks {
        let net = net.unwrap_or(model::RawNetwork {
            internal: false,
            driver: None,
        });
        networks.insert(
            key,
            Network {
                internal: net.internal,
                driver: net.driver.unwrap_or_else(|| "bridge".into()),
            },
        );
    }
    let mut volumes = BTreeMap::new();
    for (key, vol) in raw.volumes {
        volumes.insert(
            key,
            Volume {
                driver: vol.and_then(|v| v.driver).unwrap_or_else(|| "local".into()),
            },
        );
    }
    let mut secrets = BTreeMap::new();
    for (key, s) in raw.secrets {
        secrets.insert(
            key,
            Secret {
                file: resolve(working_dir, &s.file),
            },
        );
    }

    let enabled: Vec<&str> = env
        .get("COMPOSE_PROFILES")
        .map(|p| {
            p.split(',')
                .map(str::trim)
                .filter(|p| !p.is_empty())
                .collect()
        })
        .unwrap_or_default();
    let mut services = BTreeMap::new();
    for (svc_name, raw_svc) in raw.services {
        if !raw_svc.profiles.is_empty()
            && !raw_svc
                .profiles
                .iter()
                .any(|p| enabled.contains(&p.as_str()))
        {
            continue;
        }
        let svc = service(
            &svc_name,
            raw_svc,
            working_dir,
            &networks,
            &volumes,
            &secrets,
        )
        .map_err(|(path, message)| err(&format!("services.{svc_name}.{path}"), message))?;
        services.insert(svc_name, svc);
    }
    let skipped = stores::skip_unused_redis(&mut services);
    if services
        .values()
        .any(|s| s.networks.iter().any(|n| n == DEFAULT_NETWORK))
    {
        networks
            .entry(DEFAULT_NETWORK.to_owned())
            .or_insert(Network {
                internal: false,
                driver: "bridge".into(),
            });
    }
    // Only what the enabled services use is created.
    networks.retain(|k, _| services.values().any(|s| s.networks.contains(k)));
    volumes.retain(|k, _| {
        services
            .values()
            .any(|s| s.volume_mounts.iter().any(|m| &m.volume == k))
    });
    stores::add_store_dependencies(&mut services);
    for (svc_name, svc) in &services {
        for (dep, condition) in &svc.depends_on {
            let Some(target) = services.get(dep) else {
                return Err(err(
                    &format!("services.{svc_name}.depends_on"),
                    format!("unknown service `{dep}` (or one whose profile is not enabled)"),
                ));
            };
            if *condition == Condition::Healthy && target.healthcheck.is_none() {
                return Err(err(
                    &format!("services.{svc_name}.depends_on"),
                    format!(
                        "`{dep}` has no healthcheck, so `condition: service_healthy` can never hold"
                    ),
                ));
            }
        }
    }
    let project = Project {
        name,
        file: file.to_path_buf(),
        working_dir: working_dir.to_path_buf(),
        services,
        networks,
        volumes,
        secrets,
        env,
        skipped,
    };
    project.start_order().map_err(|cycle| {
        err(
            "services",
            format!("dependency cycle: {}", cycle.join(" -> ")),
        )
    })?;
    Ok(project)
}

impl Project {
    /// Services in an order where each comes after everything it depends
    /// on (ties by name); Err with a cycle.
    pub fn start_order(&self) -> Result<Vec<String>, Vec<String>> {
        let mut order: Vec<String> = Vec::new();
        let mut state: BTreeMap<&str, u8> = BTreeMap::new(); // 1 visiting, 2 done
        fn visit<'a>(
            p: &'a Project,
            name: &'a str,
            state: &mut BTreeMap<&'a str, u8>,
            order: &mut Vec<String>,
            stack: &mut Vec<String>,
        ) -> Result<(), Vec<String>> {
            match state.get(name) {
                Some(2) => return Ok(()),
                Some(_) => {
                    stack.push(name.to_owned());
                    return Err(stack.clone());
                }
                None => {}
            }
            state.insert(name, 1);
            stack.push(name.to_owned());
            if let Some(s) = p.services.get(name) {
                for dep in s.depends_on.keys() {
                    visit(p, dep, state, order, stack)?;
                }
            }
            stack.pop();
            state.insert(name, 2);
            order.push(name.to_owned());
            Ok(())
        }
        for name in self.services.keys() {
            visit(self, name, &mut state, &mut order, &mut Vec::new())?;
        }
        Ok(order)
    }

    /// The engine's name of network `key`: `<project>_<key>`.
    pub fn network_name(&self, key: &str) -> String {
        format!("{}_{key}", self.name)
    }

    /// The engine's name of volume `key`: `<project>_<key>`.
    pub fn volume_name(&self, key: &str) -> String {
        format!("{}_{key}", self.name)
    }
}

/// Compose v1's project-name normalisation.
pub fn normalize_name(name: &str) -> String {
    name.to_lowercase()
        .chars()
        .filter(|c| c.is_ascii_alphanumeric() || *c == '-' || *c == '_')
        .collect()
}

fn resolve(dir: &Path, p: &str) -> PathBuf {
    let path = Path::new(p);
    let joined = if path.is_absolute() {
        path.to_path_buf()
    } else {
        dir.join(path)
    };
    // Lexically tidy `./` and `..` so labels and binds read well.
    let mut out = PathBuf::new();
    for c in joined.components() {
        match c {
            std::path::Component::CurDir => {}
            std::path::Component::ParentDir => {
                out.pop();
            }
            c => out.push(c),
        }
    }
    out
}

type FieldError = (String, String);

fn service(
    name: &str,
    raw: RawService,
    dir: &Path,
    networks: &BTreeMap<String, Network>,
    volumes: &BTreeMap<String, Volume>,
    secrets: &BTreeMap<String, Secret>,
) -> Result<Service, FieldError> {
    let e = |k: &str, m: String| (k.to_owned(), m);
    let image = raw.image.filter(|i| !i.is_empty()).ok_or_else(|| {
        e(
            "image",
            "required (stackctl runs images; build them with `stackctl build`)".into(),
        )
    })?;
    let mut environment = BTreeMap::new();
    match raw.environment {
        None => {}
        Some(MapOrList::Map(m)) => {
            for (k, v) in m {
                environment.insert(k, v.map(Scalar::into_string).unwrap_or_default());
            }
        }
        Some(MapOrList::List(l)) => {
            for item in l {
                let (k, v) = item.split_once('=').unwrap_or((item.as_str(), ""));
                environment.insert(k.to_owned(), v.to_owned());
            }
        }
    }
    let mut binds = Vec::new();
    let mut volume_mounts = Vec::new();
    for (i, v) in raw.volumes.iter().enumerate() {
        let key = format!("volumes[{i}]");
        let parts: Vec<&str> = v.split(':').collect();
        let (source, target, mode) = match parts.as_slice() {
            [s, t] => (*s, *t, ""),
            [s, t, m] => (*s, *t, *m),
            _ => {
                return Err(e(
                    &key,
                    format!("expected SOURCE:TARGET[:ro|rw], found {v:?}"),
                ));
            }
        };
        let read_only = match mode {
            "" | "rw" => false,
            "ro" => true,
            other => {
                return Err(e(
                    &key,
                    format!("unsupported mount mode {other:?} (ro or rw)"),
                ));
            }
        };
        if source.starts_with('.') || source.starts_with('/') || source.starts_with('~') {
            binds.push(Bind {
                source: resolve(dir, source),
                target: target.to_owned(),
                read_only,
            });
        } else {
            if !volumes.contains_key(source) {
                return Err(e(
                    &key,
                    format!("volume `{source}` is not declared under the top-level `volumes:`"),
                ));
            }
            volume_mounts.push(VolumeMount {
                volume: source.to_owned(),
                target: target.to_owned(),
                read_only,
            });
        }
    }
    for (i, s) in raw.secrets.iter().enumerate() {
        if !secrets.contains_key(s) {
            return Err(e(
                &format!("secrets[{i}]"),
                format!("secret `{s}` is not declared under the top-level `secrets:`"),
            ));
        }
    }
    let svc_networks = match raw.networks {
        None => vec![DEFAULT_NETWORK.to_owned()],
        Some(NetworkRefs::List(l)) => l,
        Some(NetworkRefs::Map(m)) => m.into_keys().collect(),
    };
    for n in &svc_networks {
        if n != DEFAULT_NETWORK && !networks.contains_key(n) {
            return Err(e(
                "networks",
                format!("network `{n}` is not declared under the top-level `networks:`"),
            ));
        }
    }
    let mut ports = Vec::new();
    for (i, p) in raw.ports.into_iter().enumerate() {
        ports.push(parse_port(&p.into_string()).map_err(|m| e(&format!("ports[{i}]"), m))?);
    }
    let healthcheck = match raw.healthcheck {
        None => None,
        Some(h) if h.disable => None,
        Some(h) => {
            let test = match h.test {
                None => return Err(e("healthcheck.test", "required".into())),
                Some(model::StringOrList::String(s)) => vec!["CMD-SHELL".to_owned(), s],
                Some(l) => l.into_list(),
            };
            if test.first().map(String::as_str) == Some("NONE") {
                None
            } else {
                if !matches!(test.first().map(String::as_str), Some("CMD" | "CMD-SHELL"))
                    || test.len() < 2
                {
                    return Err(e(
                        "healthcheck.test",
                        format!("expected [\"CMD\", ...] (exec form), found {test:?}"),
                    ));
                }
                Some(Healthcheck {
                    test,
                    interval: opt_duration(h.interval.as_deref())
                        .map_err(|m| e("healthcheck.interval", m))?,
                    timeout: opt_duration(h.timeout.as_deref())
                        .map_err(|m| e("healthcheck.timeout", m))?,
                    retries: h
                        .retries
                        .map(|r| r.into_string().parse::<u32>())
                        .transpose()
                        .map_err(|x| e("healthcheck.retries", format!("not a count: {x}")))?,
                    start_period: opt_duration(h.start_period.as_deref())
                        .map_err(|m| e("healthcheck.start_period", m))?,
                })
            }
        }
    };
    let mut depends_on = BTreeMap::new();
    match raw.depends_on {
        None => {}
        Some(DependsOn::List(l)) => {
            for d in l {
                depends_on.insert(d, Condition::Started);
            }
        }
        Some(DependsOn::Map(m)) => {
            for (d, dep) in m {
                let c = match dep.condition.as_deref() {
                    None | Some("service_started") => Condition::Started,
                    Some("service_healthy") => Condition::Healthy,
                    Some(other) => {
                        return Err(e(
                            &format!("depends_on.{d}.condition"),
                            format!(
                                "unsupported condition {other:?} (service_started or service_healthy)"
                            ),
                        ));
                    }
                };
                depends_on.insert(d, c);
            }
        }
    }
    let replicas = match raw.deploy.and_then(|d| d.replicas) {
        None => 1,
        Some(r) => {
            let s = r.into_string();
            s.trim()
                .parse::<usize>()
                .map_err(|_| e("deploy.replicas", format!("not a count: {s:?}")))?
        }
    };
    let restart = match raw.restart.as_deref() {
        None | Some("no") => Restart::No,
        Some("always") => Restart::Always,
        Some("unless-stopped") => Restart::UnlessStopped,
        Some("on-failure") => Restart::OnFailure(None),
        Some(s) if s.starts_with("on-failure:") => Restart::OnFailure(Some(
            s["on-failure:".len()..]
                .parse()
                .map_err(|_| e("restart", format!("bad retry count in {s:?}")))?,
        )),
        Some(other) => {
            return Err(e(
                "restart",
                format!("unknown policy {other:?} (no, always, unless-stopped, on-failure[:N])"),
            ));
        }
    };
    let flag = |f: Option<Flag>, key: &str| -> Result<bool, FieldError> {
        match f {
            None => Ok(false),
            Some(Flag::Bool(b)) => Ok(b),
            Some(Flag::String(s)) => match s.as_str() {
                "true" | "yes" | "1" => Ok(true),
                "false" | "no" | "0" | "" => Ok(false),
                _ => Err(e(key, format!("expected true or false, found {s:?}"))),
            },
        }
    };
    let logging = match raw.logging {
        None => None,
        Some(l) => Some(Logging {
            driver: l.driver.unwrap_or_else(|| "json-file".into()),
            options: l
                .options
                .into_iter()
                .map(|(k, v)| (k, v.into_string()))
                .collect(),
        }),
    };
    Ok(Service {
        name: name.to_owned(),
        image,
        command: raw.command.map(model::StringOrList::into_list),
        user: raw.user.map(Scalar::into_string),
        environment,
        binds,
        volume_mounts,
        secrets: raw.secrets,
        networks: svc_networks,
        ports,
        healthcheck,
        depends_on,
        replicas,
        restart,
        init: flag(raw.init, "init")?,
        read_only: flag(raw.read_only, "read_only")?,
        tmpfs: raw
            .tmpfs
            .map(model::StringOrList::into_list)
            .unwrap_or_default(),
        cap_drop: raw.cap_drop,
        security_opt: raw.security_opt,
        logging,
        stop_grace_period: opt_duration(raw.stop_grace_period.as_deref())
            .map_err(|m| e("stop_grace_period", m))?,
    })
}

/// A Compose duration: `1m30s`, `10s`, `500ms`, `1h`, or plain seconds.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    if let Ok(secs) = s.parse::<f64>() {
        return Duration::try_from_secs_f64(secs).map_err(|e| format!("{s:?}: {e}"));
    }
    humantime::parse_duration(s)
        .map_err(|e| format!("not a duration {s:?} ({e}); e.g. 10s, 1m30s, 500ms"))
}

fn opt_duration(s: Option<&str>) -> Result<Option<Duration>, String> {
    s.map(parse_duration).transpose()
}

fn parse_port(spec: &str) -> Result<Port, String> {
    let (spec_np, protocol) = match spec.rsplit_once('/') {
        Some((p, proto @ ("tcp" | "udp"))) => (p, proto),
        Some((_, other)) => return Err(format!("unsupported protocol {other:?}")),
        None => (spec, "tcp"),
    };
    let parts: Vec<&str> = spec_np.rsplitn(3, ':').collect();
    let num = |s: &str| {
        s.parse::<u16>()
            .ok()
            .filter(|p| *p != 0)
            .ok_or_else(|| format!("bad port {s:?} in {spec:?}"))
    };
    match parts.as_slice() {
        [c, h] => Ok(Port {
            host_ip: String::new(),
            host_port: num(h)?,
            container_port: num(c)?,
            protocol: protocol.into(),
        }),
        [c, h, ip] => Ok(Port {
            host_ip: ip.trim_start_matches('[').trim_end_matches(']').to_owned(),
            host_port: num(h)?,
            container_port: num(c)?,
            protocol: protocol.into(),
        }),
        _ => Err(format!(
            "expected [HOST_IP:]HOST_PORT:CONTAINER_PORT, found {spec:?} (stackctl publishes only explicit host ports)"
        )),
    }
}

fn has_merge_key(v: &Value) -> bool {
    match v {
        Value::Mapping(m) => m
            .iter()
            .any(|(k, v)| k.as_str() == Some("<<") || has_merge_key(v)),
        Value::Sequence(s) => s.iter().any(has_merge_key),
        Value::Tagged(t) => has_merge_key(&t.value),
        _ => false,
    }
}

fn strip_extensions(v: &mut Value) {
    if let Value::Mapping(m) = v {
        m.retain(|k, _| !k.as_str().is_some_and(|k| k.starts_with("x-")));
        if let Some(Value::Mapping(services)) = m.get_mut("services") {
            for (_, svc) in services.iter_mut() {
                if let Value::Mapping(s) = svc {
                    s.retain(|k, _| !k.as_str().is_some_and(|k| k.starts_with("x-")));
                }
            }
        }
    }
}

fn interpolate_values(
    v: &mut Value,
    env: &Env,
    path: &str,
    text: &str,
    file: &Path,
) -> Result<(), ComposeError> {
    match v {
        Value::String(s) => {
            *s = interpolate::interpolate(s, env).map_err(|e| {
                let (line, message) = match e {
                    interpolate::InterpolateError::Required { var, message } => (
                        find_text_line(text, &format!("${{{var}"))
                            .or_else(|| find_line(text, path)),
                        format!("variable {var} is required: {message}"),
                    ),
                    interpolate::InterpolateError::Syntax { detail } => {
                        (find_line(text, path), detail)
                    }
                };
                ComposeError {
                    file: file.to_path_buf(),
                    line,
                    key: path.to_owned(),
                    message,
                }
            })?;
        }
        Value::Sequence(seq) => {
            for (i, item) in seq.iter_mut().enumerate() {
                interpolate_values(item, env, &format!("{path}[{i}]"), text, file)?;
            }
        }
        Value::Mapping(m) => {
            for (k, item) in m.iter_mut() {
                let key = k.as_str().map_or_else(|| format!("{k:?}"), str::to_owned);
                let p = if path.is_empty() {
                    key
                } else {
                    format!("{path}.{key}")
                };
                interpolate_values(item, env, &p, text, file)?;
            }
        }
        Value::Tagged(t) => interpolate_values(&mut t.value, env, path, text, file)?,
        _ => {}
    }
    Ok(())
}

fn unknown_field(msg: &str) -> Option<&str> {
    let rest = msg.strip_prefix("unknown field `")?;
    rest.split('`').next()
}

fn find_text_line(text: &str, needle: &str) -> Option<usize> {
    text.lines().position(|l| l.contains(needle)).map(|i| i + 1)
}

/// The 1-based line of dotted `path`'s last key: each key is looked for
/// (as `key:` starting a line) after the line of the one before it; when
/// one is not found (a key merged in from an anchor), the first line
/// holding the last key anywhere.
fn find_line(text: &str, path: &str) -> Option<usize> {
    let keys: Vec<&str> = path
        .split('.')
        .map(|k| k.split('[').next().unwrap_or(k))
        .filter(|k| !k.is_empty())
        .collect();
    let last = *keys.last()?;
    let lines: Vec<&str> = text.lines().collect();
    let is_key = |l: &str, k: &str| {
        let t = l.trim_start().trim_start_matches("- ");
        t.strip_prefix(k).is_some_and(|r| r.starts_with(':'))
            || t.strip_prefix(&format!("\"{k}\""))
                .is_some_and(|r| r.starts_with(':'))
    };
    let mut from = 0;
    let mut found = None;
    for k in &keys {
        match lines[from..].iter().position(|l| is_key(l, k)) {
            Some(i) => {
                found = Some(from + i);
                from += i + 1;
            }
            None => {
                found = None;
                break;
            }
        }
    }
    found
        .or_else(|| lines.iter().position(|l| is_key(l, last)))
        .map(|i| i + 1)
}

#[cfg(test)]
mod tests;
