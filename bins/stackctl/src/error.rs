//! Why `up`, `verify`, `status`, `logs`, `scale` or `down` could not do
//! their work; each message says what to do about it.

use crate::BuildError;
use crate::compose::ComposeError;
use crate::engine::EngineError;
use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StackError {
    /// No engine, or the image build failed.
    #[error(transparent)]
    Build(#[from] BuildError),
    #[error(transparent)]
    Compose(#[from] ComposeError),
    #[error(transparent)]
    Engine(#[from] EngineError),
    #[error(
        "image {image} (service {service}) is not on this Docker engine, and stackctl never pulls: \
         build it offline with `stackctl build` (or `stackctl up --build`; the PostgreSQL \
         image of the profile `postgres`: `stackctl build --postgres`), or point \
         TASKSTACK_IMAGE / REDIS_IMAGE / POSTGRES_IMAGE at images that are here"
    )]
    ImageMissing { service: String, image: String },
    #[error(
        "secret `{name}`: {} does not exist, and the other secrets of its set do (`up` makes a \
         set only when none of it exists); create the missing ones with `{command}`",
        file.display()
    )]
    SecretMissing {
        name: String,
        file: PathBuf,
        /// The command that creates it.
        command: String,
    },
    #[error("cannot write the secret file {}: {detail}", path.display())]
    SecretWrite { path: PathBuf, detail: String },
    #[error("service {service}: {} (mounted into the container) does not exist", source_path.display())]
    BindMissing {
        service: String,
        source_path: PathBuf,
    },
    #[error(
        "port {addr} (service {service}) is already in use on this host: stop what listens there, \
         or publish elsewhere (for web: WEB_PORT=... / WEB_BIND=...)"
    )]
    PortTaken { service: String, addr: String },
    #[error(
        "service {service} would run {replicas} beat replicas: only one may schedule, the others \
         would stand by on the Redis lock; pass --allow-standby-beats if that is what you want"
    )]
    BeatReplicas { service: String, replicas: usize },
    #[error(
        "{kind} {name} exists but does not belong to project {project}; remove it or choose another \
         project name (--project)"
    )]
    Foreign {
        kind: &'static str,
        name: String,
        project: String,
    },
    #[error("{}", failed_message(service, container, reason, health, logs))]
    ServiceFailed {
        service: String,
        container: String,
        reason: String,
        /// The last health-check outputs, oldest first.
        health: Vec<String>,
        /// The container's last log lines.
        logs: Vec<String>,
    },
    #[error("timed out after {}s waiting for: {}", waited.as_secs(), pending.join("; "))]
    Timeout {
        waited: std::time::Duration,
        pending: Vec<String>,
    },
    #[error("no service `{service}` in the compose file (services: {known})")]
    UnknownService { service: String, known: String },
    #[error("service {service} has no containers in project {project}; run `stackctl up` first")]
    NotUp { service: String, project: String },
}

fn failed_message(
    service: &str,
    container: &str,
    reason: &str,
    health: &[String],
    logs: &[String],
) -> String {
    let mut s = format!("service {service} failed: {container} {reason}");
    if !health.is_empty() {
        s.push_str("\n  last health checks:");
        for h in health {
            s.push_str("\n    ");
            s.push_str(h);
        }
    }
    if !logs.is_empty() {
        s.push_str(&format!("\n  last {} log lines:", logs.len()));
        for l in logs {
            s.push_str("\n    ");
            s.push_str(l);
        }
    }
    s
}
