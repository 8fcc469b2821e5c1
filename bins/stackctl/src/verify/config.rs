//! A service's configuration as the service itself loads it: the
//! library's `Config` from the defaults, the TOML file `TASKSTACK_CONFIG`
//! names (the mounted file, read at its host path) and the `TASKSTACK_*`
//! variables of the service's environment, validated by the library.
//! The environment is the running container's when there is one (what the
//! service really runs with, even when the compose file was edited after
//! `up`), the compose file's otherwise. Paths inside the container
//! (`/run/secrets/<name>`, bind mount targets) are read at their host paths.

use crate::compose::{Project, Service};
use crate::engine::ContainerInfo;
use figment::Figment;
use figment::providers::{Format as _, Serialized, Toml};
use std::borrow::Cow;
use std::collections::BTreeMap;
use std::path::PathBuf;
use taskstack::config::{CONFIG_FILE_ENV, Config, ENV_PREFIX};

/// The host path of `path` as `svc`'s container sees it: a secret under
/// `/run/secrets/`, or a file under one of its bind mounts.
pub fn host_path(project: &Project, svc: &Service, path: &std::path::Path) -> Option<PathBuf> {
    let p = path.to_str()?;
    if let Some(name) = p.strip_prefix("/run/secrets/")
        && svc.secrets.iter().any(|s| s == name)
    {
        return project.secrets.get(name).map(|s| s.file.clone());
    }
    svc.binds.iter().find_map(|b| {
        let rest = p.strip_prefix(b.target.trim_end_matches('/'))?;
        if rest.is_empty() {
            Some(b.source.clone())
        } else {
            rest.strip_prefix('/').map(|r| b.source.join(r))
        }
    })
}

/// `svc` with the environment of its first running container among
/// `containers` (`KEY=value` as the engine reports it), or as the compose
/// file has it when none of them runs.
pub fn as_running<'a>(svc: &'a Service, containers: &[&ContainerInfo]) -> Cow<'a, Service> {
    let Some(c) = containers.iter().find(|c| c.running) else {
        return Cow::Borrowed(svc);
    };
    let environment: BTreeMap<String, String> = c
        .env
        .iter()
        .map(|kv| match kv.split_once('=') {
            Some((k, v)) => (k.to_owned(), v.to_owned()),
            None => (kv.clone(), String::new()),
        })
        .collect();
    let mut svc = svc.clone();
    svc.environment = environment;
    Cow::Owned(svc)
}

/// `svc`'s configuration (see the module docs); Err names what is wrong,
/// like the service's own start-up would.
pub fn service_config(project: &Project, svc: &Service) -> Result<Config, String> {
    let map = |path: PathBuf| host_path(project, svc, &path).unwrap_or(path);
    let mut fig = Figment::from(Serialized::defaults(Config::default()));
    if let Some(file) = svc.environment.get(CONFIG_FILE_ENV) {
        let host = map(PathBuf::from(file));
        std::fs::metadata(&host).map_err(|e| {
            format!(
                "service {}: configuration file {file} ({CONFIG_FILE_ENV}; on this host {}): {e}",
                svc.name,
                host.display()
            )
        })?;
        fig = fig.merge(Toml::file_exact(host));
    }
    // As the library's environment provider (figment's `Env::prefixed`):
    // prefix dropped, key lower-cased, `.` nests, the value parsed as
    // figment parses a variable.
    for (key, value) in &svc.environment {
        let Some(rest) = key
            .get(..ENV_PREFIX.len())
            .filter(|p| p.eq_ignore_ascii_case(ENV_PREFIX))
            .map(|_| &key[ENV_PREFIX.len()..])
        else {
            continue;
        };
        if rest.eq_ignore_ascii_case("CONFIG") || rest.split('.').any(str::is_empty) {
            continue;
        }
        let value: figment::value::Value = value.parse().unwrap_or_else(|e| match e {});
        fig = fig.merge(Serialized::default(&rest.to_ascii_lowercase(), value));
    }
    let mut config = Config::from_figment(fig).map_err(|e| format!("service {}: {e}", svc.name))?;
    config.broker_password_file = config.broker_password_file.map(map);
    config.result_backend_password_file = config.result_backend_password_file.map(map);
    config.api_tokens_file = config.api_tokens_file.map(map);
    config.sentinel_password_file = config.sentinel_password_file.map(map);
    Ok(config)
}
