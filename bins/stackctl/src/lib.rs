//! `stackctl`: taskstack's container tool. It builds the images offline
//! (`stackctl build`) and runs the compose stack through the Docker Engine
//! API — no `docker` or `docker-compose` process is involved: `up`
//! (dependency order, health, reconcile), `verify` (the production
//! checklist), `status`, `logs`, `scale` and `down`.
//!
//! Map:
//! - [`build`]: the app image and the Redis image, `FROM scratch`, from
//!   binaries of this host, through an in-memory build context;
//! - [`postgres`]: the PostgreSQL image (profile `postgres`) and the
//!   profile's result store settings;
//! - [`rabbitmq`]: the RabbitMQ image (profile `rabbitmq`) and the
//!   profile's broker settings;
//! - [`rootfs`]: a file tree of binaries plus exactly the libraries `ldd`
//!   lists, written as a tar;
//! - [`docker`]: connecting to the engine and the image build calls;
//! - [`compose`]: reading `docker-compose.yml` (merge keys, interpolation,
//!   `.env`), refusing keys stackctl would not apply;
//! - [`plan`]: containers, labels and configuration hashes per service,
//!   and the reconcile decisions;
//! - [`engine`]: the narrow Docker trait with the bollard implementation
//!   and an in-memory fake;
//! - [`up`]: bringing services up in dependency order (also `scale`);
//! - [`verify`]: the checklist ([`verify::swarm`]: a Swarm stack's, from
//!   `docker stack deploy -c compose/swarm.yml`); [`ops`]: `status`, `logs`, `down`;
//! - [`progress`]: live per-service progress; [`error`]: what can go
//!   wrong, and what to do. (HTTP: `taskstack::http_client`.)
//!
//! The integration tests call these functions directly, so a human and
//! the test suite drive the stack through the same code.

pub mod build;
pub mod compose;
pub mod docker;
pub mod engine;
pub mod error;
pub mod ha;
pub mod ops;
pub mod plan;
pub mod postgres;
pub mod progress;
pub mod rabbitmq;
pub mod rootfs;
pub mod up;
pub mod verify;

pub use error::StackError;

use std::path::PathBuf;
/// Why an image could not be built; each message says how to fix it.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum BuildError {
    #[error(
        "cannot reach the Docker engine at {host} ({detail}). Start it (`systemctl start docker`, \
         or `dockerd > /tmp/dockerd.log 2>&1 &` where there is no systemd; Debian: \
         `apt-get install docker.io`), or point DOCKER_HOST at a running engine; a user who is \
         not root needs to be in the `docker` group"
    )]
    EngineUnreachable { host: String, detail: String },
    #[error("Docker engine call failed ({op}): {source}")]
    Docker {
        op: &'static str,
        source: bollard::errors::Error,
    },
    #[error("building image {tag} failed:\n{detail}")]
    Build { tag: String, detail: String },
    #[error(
        "{} not found: build it with `cargo build --release -p {name}` \
         (or pass the directory holding it with --bin-dir)",
        dir.join(name).display()
    )]
    BinaryMissing { name: String, dir: PathBuf },
    #[error(
        "--worker-bin {}: not a worker built on `taskstack::worker::main` ({detail})",
        path.display()
    )]
    NotAWorker { path: PathBuf, detail: String },
    #[error(
        "`{program}` is not installed on this host; the Redis image is built from it: \
         `apt-get install {package}` (or load a Redis image and pass --redis skip)"
    )]
    RedisMissing {
        program: &'static str,
        package: &'static str,
    },
    #[error(
        "PostgreSQL is not installed on this host (no {}/<version>/bin/postgres); the \
         PostgreSQL image is built from it: `apt-get install postgresql` (scripts/prereqs does)",
        dir.display()
    )]
    PostgresMissing { dir: PathBuf },
    #[error(
        "{} is missing on this host; the RabbitMQ image is built from the installed Debian \
         packages: `apt-get install {package}` (scripts/prereqs installs rabbitmq-server)",
        path.display()
    )]
    RabbitmqMissing {
        path: PathBuf,
        package: &'static str,
    },
    #[error("ldd {}: {detail}", bin.display())]
    Ldd { bin: PathBuf, detail: String },
    #[error("strip --strip-debug {}: {detail}", bin.display())]
    Strip { bin: PathBuf, detail: String },
    #[error("cannot read {}: {source}", path.display())]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot write the build context: {source}")]
    Context { source: std::io::Error },
    #[error("`{command}` failed: {detail}")]
    Cargo { command: String, detail: String },
    #[error("{image} is {:.1} MB, more than the {:.1} MB allowed", *bytes as f64 / 1e6, *max as f64 / 1e6)]
    TooLarge { image: String, bytes: u64, max: u64 },
}
