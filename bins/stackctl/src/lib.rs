//! `stackctl`: taskstack's container tool. Today it builds the images
//! offline (`stackctl build`); bringing the compose stack up, verifying and
//! tearing it down through the Docker Engine API come next (issue 7).
//!
//! Map:
//! - [`build`]: the app image and the Redis image, `FROM scratch`, from
//!   binaries of this host, through an in-memory build context;
//! - [`rootfs`]: a file tree of binaries plus exactly the libraries `ldd`
//!   lists, written as a tar;
//! - [`docker`]: the Docker Engine API calls (bollard), with errors that
//!   say how to fix the machine.
//!
//! The integration tests call [`build::build`] directly, so images are
//! built by the same code whether a human or the test suite asks.

pub mod build;
pub mod docker;
pub mod rootfs;

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
        "`{program}` is not installed on this host; the Redis image is built from it: \
         `apt-get install {package}` (or load a Redis image and pass --redis skip)"
    )]
    RedisMissing {
        program: &'static str,
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
