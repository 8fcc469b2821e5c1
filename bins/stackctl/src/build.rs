//! `stackctl build`: the app image and, when no Redis image is at hand, a
//! Redis image, both `FROM scratch` and built from files of this host, so
//! no registry is ever contacted.
//!
//! * `localhost/taskstack:<tag>` holds `/taskstack-web`, `/taskstack-worker`
//!   and `/taskstack-beat` plus the libraries `ldd` lists for them, a
//!   world-writable `/tmp` (the services' state files) and the host's CA
//!   bundle (for `rediss://`). It runs as `65534:65534`; each service runs
//!   a different command of the same image (default `/taskstack-worker`).
//! * `localhost/taskstack-redis:<tag>` holds the host's Debian
//!   `redis-server` and `redis-cli` (in `/usr/local/bin`, as in the official
//!   image, so one compose file fits both), dash as `/bin/sh` and coreutils'
//!   `timeout` (the profile `ha`'s scripts) and their libraries, with `/data`
//!   owned by `999:1000` (the official image's `redis` user).
//!
//! * with `postgres`, `localhost/taskstack-postgres:<tag>`: the host's
//!   Debian PostgreSQL for the compose profile `postgres` (see
//!   [`crate::postgres`]).
//! * with `rabbitmq`, `localhost/taskstack-rabbitmq:<tag>`: the host's
//!   Debian RabbitMQ for the compose profile `rabbitmq` (see
//!   [`crate::rabbitmq`]).
//!
//! Tags live under `localhost/`, so a missing image can never be fetched
//! from Docker Hub by mistake.

use crate::BuildError;
use crate::docker;
use crate::rootfs::{Rootfs, append_file};
use bollard::Docker;
use std::path::{Path, PathBuf};

/// The service commands the app image holds, in this order: each a link
/// to the multi-call binary (`/taskstack-worker` may be a team's own
/// worker instead).
pub const SERVICE_BINARIES: [&str; 3] = ["taskstack-web", "taskstack-worker", "taskstack-beat"];
/// The package of the multi-call binary, and the binary (`/taskstack`):
/// one copy of the library for the three services.
pub const MULTICALL_PACKAGE: &str = "taskstack-multicall";
pub const MULTICALL_BINARY: &str = "taskstack";
/// Repository of the app image.
pub const APP_REPOSITORY: &str = "localhost/taskstack";
/// Repository of the Redis image built from the host's `redis-server`.
pub const REDIS_REPOSITORY: &str = "localhost/taskstack-redis";
/// The public Redis image the compose file defaults to.
pub const PUBLIC_REDIS_IMAGE: &str = "redis:7-alpine";
/// Default tag of both images.
pub const DEFAULT_TAG: &str = "local";
/// Upper bound for the app image: 12 MB (one static multi-call binary of
/// 11.2 MB and the CA bundle).
pub const MAX_APP_IMAGE_BYTES: u64 = 12_000_000;
/// The app image's user: nobody:nogroup, numeric (there is no /etc/passwd).
pub const APP_USER: &str = "65534:65534";
/// The Redis image's user, the official image's `redis` (999:1000), so a
/// named volume for `/data` works with either image.
pub const REDIS_UID: u64 = 999;
pub const REDIS_GID: u64 = 1000;

const CA_BUNDLE: &str = "/etc/ssl/certs/ca-certificates.crt";
/// The Redis image's `/bin/sh` (Debian's `dash`), and coreutils' `timeout`
/// (the scripts bound each question to a host that may not resolve).
const SHELL: &str = "/bin/dash";
const TIMEOUT: &str = "/usr/bin/timeout";

/// Which cargo profile to compile when no `bin_dir` is given.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Profile {
    /// The workspace's `release` profile plus fat LTO, one codegen unit and
    /// `opt-level = "s"`, as the custom profile `image` (defined here
    /// through `CARGO_PROFILE_IMAGE_*`, so the workspace's own release
    /// builds and their cache are untouched), linked statically against
    /// glibc (`+crt-static`, still position-independent, its relative
    /// relocations packed as `DT_RELR`) for the host's target given
    /// explicitly, so build scripts and proc macros stay dynamic. The image
    /// then needs no shared library at all. On x86_64 the multi-call
    /// binary's functions are laid out in the order of [`SYMBOL_ORDER`].
    /// Output in `<target dir>/<host triple>/image/`.
    Image,
    /// The workspace's `release` profile (`<target dir>/release/`).
    Release,
    /// `dev` (`<target dir>/debug/`).
    Debug,
}

/// The multi-call binary's function order for `Profile::Image`, relative
/// to its package (made by `scripts/symbol-order`).
pub const SYMBOL_ORDER: &str = "symbol-order.txt";

/// The target triple `Profile::Image` compiles for (this host's, given
/// explicitly so `+crt-static` leaves build scripts and proc macros
/// alone), its directory under the target dir, and cargo's variable for
/// that target's rustflags.
#[cfg(not(target_arch = "aarch64"))]
mod image_target {
    pub const TRIPLE: &str = "x86_64-unknown-linux-gnu";
    pub const DIR: &str = "x86_64-unknown-linux-gnu/image";
    pub const RUSTFLAGS_VAR: &str = "CARGO_TARGET_X86_64_UNKNOWN_LINUX_GNU_RUSTFLAGS";
}
#[cfg(target_arch = "aarch64")]
mod image_target {
    pub const TRIPLE: &str = "aarch64-unknown-linux-gnu";
    pub const DIR: &str = "aarch64-unknown-linux-gnu/image";
    pub const RUSTFLAGS_VAR: &str = "CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_RUSTFLAGS";
}

impl Profile {
    /// The directory under the target dir.
    pub fn dir(self) -> &'static str {
        match self {
            Self::Image => image_target::DIR,
            Self::Release => "release",
            Self::Debug => "debug",
        }
    }

    /// cargo's arguments and environment for this profile.
    fn cargo_args(self) -> (Vec<&'static str>, Vec<(&'static str, &'static str)>) {
        match self {
            Self::Image => (
                vec!["--profile", "image", "--target", image_target::TRIPLE],
                vec![
                    ("CARGO_PROFILE_IMAGE_INHERITS", "release"),
                    ("CARGO_PROFILE_IMAGE_LTO", "fat"),
                    ("CARGO_PROFILE_IMAGE_CODEGEN_UNITS", "1"),
                    // Measured on the multi-call binary (bench, drain of
                    // 20,000 no-op tasks, two runs each, same machine):
                    // 9,735 and 10,413 tasks/s at "s" against 11,963 and
                    // 9,602 at 3 (noise, not a loss), 12.8 MB to 10.5 MB.
                    // "z" saves 0.6 MB more but drained about 19% slower.
                    ("CARGO_PROFILE_IMAGE_OPT_LEVEL", "s"),
                    // A static PIE relocates itself at start: one 24-byte
                    // RELA entry per pointer in its tables was 1.0 MB of
                    // the 12.14 MB binary; packed as RELR (glibc 2.36,
                    // binutils 2.38) they take 19 KB.
                    (
                        image_target::RUSTFLAGS_VAR,
                        "-C target-feature=+crt-static -C link-arg=-Wl,-z,pack-relative-relocs",
                    ),
                    // The code the services run to start and to idle laid
                    // out together (bins/taskstack/build.rs): an idle
                    // worker then keeps far fewer pages of it resident.
                    ("TASKSTACK_SYMBOL_ORDER", SYMBOL_ORDER),
                ],
            ),
            Self::Release => (vec!["--release"], Vec::new()),
            Self::Debug => (Vec::new(), Vec::new()),
        }
    }
}

/// Whether to build the Redis image.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RedisChoice {
    /// Build it unless the public image (`PUBLIC_REDIS_IMAGE`) is present locally.
    Auto,
    /// Always build it.
    Build,
    /// Never build it.
    Skip,
}

/// What to build.
#[derive(Debug, Clone)]
pub struct BuildOptions {
    /// Where the service binaries are; None: compile them with cargo.
    pub bin_dir: Option<PathBuf>,
    /// Profile to compile (and to look in) when `bin_dir` is None.
    pub profile: Profile,
    /// Tag of both images.
    pub tag: String,
    pub redis: RedisChoice,
    /// Fail when the app image is larger (None: no check, e.g. debug builds).
    pub max_app_bytes: Option<u64>,
    /// Drop debug information from the binaries before packaging them
    /// (`strip --strip-debug`): a debug build's 120 MB binaries become
    /// about 25 MB. Release builds are stripped by the cargo profile.
    pub strip_debug_info: bool,
    /// A team's own worker binary (built on `taskstack::worker::main`) to
    /// package as `/taskstack-worker` instead of the stock one, so the
    /// compose stack runs it unchanged; the stock worker is then not
    /// compiled. The size limit is not applied to an image holding it.
    pub worker_bin: Option<PathBuf>,
    /// Also build the PostgreSQL image (profile `postgres`).
    pub postgres: bool,
    /// Also build the RabbitMQ image (profile `rabbitmq`).
    pub rabbitmq: bool,
}

impl Default for BuildOptions {
    fn default() -> Self {
        Self {
            bin_dir: None,
            profile: Profile::Image,
            tag: DEFAULT_TAG.into(),
            redis: RedisChoice::Auto,
            max_app_bytes: Some(MAX_APP_IMAGE_BYTES),
            strip_debug_info: false,
            worker_bin: None,
            postgres: false,
            rabbitmq: false,
        }
    }
}

/// What was built.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BuildReport {
    /// `localhost/taskstack:<tag>`.
    pub app_image: String,
    pub app_bytes: u64,
    /// The binaries in the app image (paths `/<name>`).
    pub binaries: Vec<String>,
    /// Service binaries left out because their package is not in the
    /// workspace yet (only when stackctl compiled them itself).
    pub left_out: Vec<String>,
    /// The Redis image to use: the one built, or the public one found locally.
    pub redis_image: Option<String>,
    /// Whether `redis_image` was built now (false: found locally, or skipped).
    pub redis_built: bool,
    pub redis_bytes: Option<u64>,
    /// The tasks `/taskstack-worker` runs when it is a team's own binary
    /// (what its `tasks` subcommand printed); empty for the stock worker.
    pub worker_tasks: Vec<String>,
    /// The PostgreSQL image built now, with its size (`postgres` only).
    pub postgres_image: Option<(String, u64)>,
    /// The RabbitMQ image built now, with its size (`rabbitmq` only).
    pub rabbitmq_image: Option<(String, u64)>,
}

impl BuildReport {
    /// Whether the app image holds `binary` (e.g. "taskstack-web").
    pub fn has(&self, binary: &str) -> bool {
        self.binaries.iter().any(|b| b == binary)
    }
}

/// Builds the images; `log` receives one line per step.
pub async fn build(opts: &BuildOptions, log: &dyn Fn(&str)) -> Result<BuildReport, BuildError> {
    // Fail on a missing engine before spending minutes compiling.
    let docker = docker::connect().await?;
    let worker_tasks = match &opts.worker_bin {
        Some(path) => own_worker_tasks(path).await?,
        None => Vec::new(),
    };
    let (bin_dir, left_out) = match &opts.bin_dir {
        Some(dir) => (dir.clone(), Vec::new()),
        None => {
            let ws = workspace().await?;
            let dir = ws.target_dir.join(opts.profile.dir());
            if ws.packages.iter().any(|p| p == MULTICALL_PACKAGE) {
                log(&format!(
                    "compiling {MULTICALL_PACKAGE} (/{MULTICALL_BINARY}: {}; {})",
                    SERVICE_BINARIES.join(", "),
                    opts.profile.dir()
                ));
                cargo_build(
                    &[MULTICALL_PACKAGE.to_owned()],
                    opts.profile,
                    &ws.target_dir,
                )
                .await?;
                (dir, Vec::new())
            } else {
                log(&format!(
                    "note: package {MULTICALL_PACKAGE} is not in the workspace; \
                     the image will hold no service of its own"
                ));
                (dir, vec![MULTICALL_PACKAGE.to_owned()])
            }
        }
    };
    let mut sources: Vec<(String, PathBuf)> = Vec::new();
    let mut links: Vec<String> = Vec::new();
    if left_out.is_empty() {
        sources.push((MULTICALL_BINARY.into(), bin_dir.join(MULTICALL_BINARY)));
        links.extend(
            SERVICE_BINARIES
                .into_iter()
                .filter(|b| opts.worker_bin.is_none() || *b != "taskstack-worker")
                .map(String::from),
        );
    }
    if let Some(path) = &opts.worker_bin {
        sources.push(("taskstack-worker".into(), path.clone()));
    }
    let binaries: Vec<String> = sources
        .iter()
        .map(|(name, _)| name.clone())
        .chain(links.iter().cloned())
        .collect();
    let app_image = format!("{APP_REPOSITORY}:{}", opts.tag);
    let app_bytes = build_app_image(
        &docker,
        &app_image,
        &sources,
        &links,
        opts.strip_debug_info,
        log,
    )
    .await?;
    if let Some(max) = opts.max_app_bytes
        && opts.worker_bin.is_none()
        && app_bytes > max
    {
        return Err(BuildError::TooLarge {
            image: app_image,
            bytes: app_bytes,
            max,
        });
    }

    let redis_tag = format!("{REDIS_REPOSITORY}:{}", opts.tag);
    let (redis_image, redis_built, redis_bytes) = match opts.redis {
        RedisChoice::Skip => (None, false, None),
        RedisChoice::Auto => match docker::local_image_size(&docker, PUBLIC_REDIS_IMAGE).await? {
            Some(bytes) => {
                log(&format!(
                    "{PUBLIC_REDIS_IMAGE} is present locally: not building {redis_tag}"
                ));
                (Some(PUBLIC_REDIS_IMAGE.to_owned()), false, Some(bytes))
            }
            None => {
                let bytes = build_redis_image(&docker, &redis_tag, log).await?;
                (Some(redis_tag), true, Some(bytes))
            }
        },
        RedisChoice::Build => {
            let bytes = build_redis_image(&docker, &redis_tag, log).await?;
            (Some(redis_tag), true, Some(bytes))
        }
    };
    let postgres_image = if opts.postgres {
        let tag = format!("{}:{}", crate::postgres::POSTGRES_REPOSITORY, opts.tag);
        let bytes = crate::postgres::build_image(&docker, &tag, log).await?;
        Some((tag, bytes))
    } else {
        None
    };
    let rabbitmq_image = if opts.rabbitmq {
        let tag = format!("{}:{}", crate::rabbitmq::RABBITMQ_REPOSITORY, opts.tag);
        let bytes = crate::rabbitmq::build_image(&docker, &tag, log).await?;
        Some((tag, bytes))
    } else {
        None
    };
    Ok(BuildReport {
        app_image,
        app_bytes,
        binaries,
        left_out,
        redis_image,
        redis_built,
        redis_bytes,
        worker_tasks,
        postgres_image,
        rabbitmq_image,
    })
}

/// Checks that `path` is a worker binary built on `taskstack::worker::main`
/// by running its `tasks` subcommand (with the defaults: no configuration
/// file, no environment), and returns the tasks it printed.
async fn own_worker_tasks(path: &Path) -> Result<Vec<String>, BuildError> {
    let not_a_worker = |detail: String| BuildError::NotAWorker {
        path: path.to_path_buf(),
        detail,
    };
    if !path.is_file() {
        return Err(not_a_worker("no such file".into()));
    }
    let out = tokio::process::Command::new(path)
        .arg("tasks")
        .env_clear()
        .env("PATH", "/usr/bin:/bin")
        .stdin(std::process::Stdio::null())
        .output()
        .await
        .map_err(|e| not_a_worker(format!("cannot run it: {e}")))?;
    if !out.status.success() {
        let stderr = String::from_utf8_lossy(&out.stderr);
        return Err(not_a_worker(format!(
            "`{} tasks` exited with {}: {}",
            path.display(),
            out.status,
            stderr.trim()
        )));
    }
    let tasks: Vec<String> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .map(String::from)
        .collect();
    if tasks.is_empty() {
        return Err(not_a_worker(
            "its `tasks` subcommand printed no task".into(),
        ));
    }
    Ok(tasks)
}

/// The app image's Dockerfile (kept in step with the top-level `Dockerfile`:
/// same paths, user and default command).
pub fn app_dockerfile() -> String {
    format!(
        "FROM scratch\n\
         LABEL org.opencontainers.image.title=\"taskstack\" \\\n      \
               org.opencontainers.image.description=\"taskstack-web, taskstack-worker and taskstack-beat\" \\\n      \
               io.taskstack.built-by=\"stackctl build\"\n\
         COPY rootfs/ /\n\
         USER {APP_USER}\n\
         CMD [\"/taskstack-worker\"]\n"
    )
}

/// The Redis image's Dockerfile. No ENTRYPOINT: compose's
/// `command: ["redis-server", ...]` then works with this image and with
/// the official one (whose entrypoint script runs its arguments).
pub fn redis_dockerfile() -> String {
    format!(
        "FROM scratch\n\
         LABEL org.opencontainers.image.title=\"taskstack-redis\" \\\n      \
               org.opencontainers.image.description=\"redis-server, redis-cli, dash and timeout from the build host's Debian packages\" \\\n      \
               io.taskstack.built-by=\"stackctl build\"\n\
         COPY rootfs/ /\n\
         COPY --chown={REDIS_UID}:{REDIS_GID} data/ /data/\n\
         ENV PATH=/usr/local/bin:/usr/bin:/bin\n\
         WORKDIR /data\n\
         USER {REDIS_UID}:{REDIS_GID}\n\
         EXPOSE 6379\n\
         CMD [\"redis-server\"]\n"
    )
}

/// Builds the app image `tag` from `binaries` (each packaged as `/<name>`
/// from its path on this host) and `links` (each `/<name>`, a link to the
/// multi-call `/taskstack`); returns its size.
pub async fn build_app_image(
    docker: &Docker,
    tag: &str,
    binaries: &[(String, PathBuf)],
    links: &[String],
    strip_debug_info: bool,
    log: &dyn Fn(&str),
) -> Result<u64, BuildError> {
    let mut fs = Rootfs::new();
    for (name, src) in binaries {
        let src = src.as_path();
        if !src.is_file() {
            return Err(BuildError::BinaryMissing {
                name: name.clone(),
                dir: src.parent().unwrap_or(Path::new("/")).to_path_buf(),
            });
        }
        if strip_debug_info {
            let stripped = strip_debug(src).await?;
            let added = fs
                .binary_with_libs(&stripped, &format!("/{name}"))
                .map(|_| ());
            let _ = std::fs::remove_file(&stripped);
            added?;
        } else {
            fs.binary_with_libs(src, &format!("/{name}"))?;
        }
    }
    for name in links {
        fs.symlink(&format!("/{name}"), MULTICALL_BINARY);
    }
    fs.dir("/tmp", 0o1777, 0, 0);
    if let Ok(ca) = std::fs::read(CA_BUNDLE) {
        fs.file(Path::new(CA_BUNDLE), ca, 0o644);
    }
    log(&format!(
        "building {tag} from {} ({} files, {:.1} MB)",
        binaries
            .iter()
            .map(|(_, p)| p.display().to_string())
            .collect::<Vec<_>>()
            .join(", "),
        binaries.len(),
        mb(fs.content_size())
    ));
    let context = context(&app_dockerfile(), &fs)?;
    docker::build_image(docker, tag, context).await?;
    let bytes = docker::local_image_size(docker, tag)
        .await?
        .unwrap_or_default();
    log(&format!("built {tag}: {:.1} MB", mb(bytes)));
    Ok(bytes)
}

/// Builds the Redis image `tag` from the host's `redis-server` and
/// `redis-cli`; returns its size.
pub async fn build_redis_image(
    docker: &Docker,
    tag: &str,
    log: &dyn Fn(&str),
) -> Result<u64, BuildError> {
    let server = which("redis-server").ok_or(BuildError::RedisMissing {
        program: "redis-server",
        package: "redis-server",
    })?;
    let cli = which("redis-cli").ok_or(BuildError::RedisMissing {
        program: "redis-cli",
        package: "redis-tools",
    })?;
    let mut fs = Rootfs::new();
    // Debian's /usr/bin/redis-server is a symlink to redis-check-rdb, and
    // redis picks its mode from argv[0]: the file is read through the link
    // and stored under the name redis-server.
    // dash as /bin/sh: the profile `ha` starts nodes and sentinels
    // through shell scripts (compose/redis-ha), as the official image can.
    fs.binary_with_libs(&server, "/usr/local/bin/redis-server")?
        .binary_with_libs(&cli, "/usr/local/bin/redis-cli")?
        .binary_with_libs(Path::new(SHELL), "/bin/sh")?
        .binary_with_libs(Path::new(TIMEOUT), "/usr/bin/timeout")?
        .dir("/tmp", 0o1777, 0, 0);
    log(&format!(
        "building {tag} from {}, {}, {SHELL} and {TIMEOUT}",
        server.display(),
        cli.display()
    ));
    // COPY makes everything root-owned; /data comes from an empty
    // directory copied with --chown.
    let mut tar = context_tar(&redis_dockerfile(), &fs)?;
    Rootfs::new().append_to(&mut tar, "data")?;
    let context = tar
        .into_inner()
        .map_err(|source| BuildError::Context { source })?;
    docker::build_image(docker, tag, context).await?;
    let bytes = docker::local_image_size(docker, tag)
        .await?
        .unwrap_or_default();
    log(&format!("built {tag}: {:.1} MB", mb(bytes)));
    Ok(bytes)
}

/// A copy of `bin` without debug information, in the temporary directory.
async fn strip_debug(bin: &Path) -> Result<PathBuf, BuildError> {
    let name = bin.file_name().unwrap_or_default().to_string_lossy();
    let out = std::env::temp_dir().join(format!("stackctl-{}-{name}", std::process::id()));
    let status = tokio::process::Command::new("strip")
        .arg("--strip-debug")
        .arg("-o")
        .arg(&out)
        .arg(bin)
        .status()
        .await
        .map_err(|e| BuildError::Strip {
            bin: bin.to_path_buf(),
            detail: format!("cannot run strip ({e}); install binutils"),
        })?;
    if !status.success() {
        return Err(BuildError::Strip {
            bin: bin.to_path_buf(),
            detail: status.to_string(),
        });
    }
    Ok(out)
}

fn context(dockerfile: &str, fs: &Rootfs) -> Result<Vec<u8>, BuildError> {
    context_tar(dockerfile, fs)?
        .into_inner()
        .map_err(|source| BuildError::Context { source })
}

fn context_tar(dockerfile: &str, fs: &Rootfs) -> Result<tar::Builder<Vec<u8>>, BuildError> {
    let mut tar = tar::Builder::new(Vec::new());
    append_file(&mut tar, "Dockerfile", dockerfile.as_bytes(), 0o644)?;
    fs.append_to(&mut tar, "rootfs")?;
    Ok(tar)
}

/// The workspace as cargo sees it.
#[derive(Debug, Clone)]
pub struct Workspace {
    /// Honours `CARGO_TARGET_DIR` and cargo's configuration.
    pub target_dir: PathBuf,
    pub packages: Vec<String>,
}

/// Asks `cargo metadata` (run from the current directory) for the target
/// directory and the workspace's packages.
pub async fn workspace() -> Result<Workspace, BuildError> {
    let out = tokio::process::Command::new(cargo())
        .args(["metadata", "--format-version", "1", "--no-deps"])
        .output()
        .await
        .map_err(|e| BuildError::Cargo {
            command: "cargo metadata".into(),
            detail: e.to_string(),
        })?;
    if !out.status.success() {
        return Err(BuildError::Cargo {
            command: "cargo metadata".into(),
            detail: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
        });
    }
    parse_metadata(&out.stdout).map_err(|detail| BuildError::Cargo {
        command: "cargo metadata".into(),
        detail,
    })
}

fn parse_metadata(json: &[u8]) -> Result<Workspace, String> {
    let v: serde_json::Value = serde_json::from_slice(json).map_err(|e| e.to_string())?;
    let target_dir = v["target_directory"]
        .as_str()
        .ok_or("no target_directory")?
        .into();
    let packages = v["packages"]
        .as_array()
        .ok_or("no packages")?
        .iter()
        .filter_map(|p| p["name"].as_str().map(str::to_owned))
        .collect();
    Ok(Workspace {
        target_dir,
        packages,
    })
}

/// `cargo build <profile> -p <each>` into `target_dir`.
pub async fn cargo_build(
    packages: &[String],
    profile: Profile,
    target_dir: &Path,
) -> Result<(), BuildError> {
    let (profile_args, env) = profile.cargo_args();
    let mut args = vec!["build".to_owned()];
    args.extend(profile_args.iter().map(|a| (*a).to_owned()));
    for p in packages {
        args.push("-p".into());
        args.push(p.clone());
    }
    let command = format!("cargo {}", args.join(" "));
    let status = tokio::process::Command::new(cargo())
        .args(&args)
        .envs(env)
        .env("CARGO_TARGET_DIR", target_dir)
        .status()
        .await
        .map_err(|e| BuildError::Cargo {
            command: command.clone(),
            detail: e.to_string(),
        })?;
    if !status.success() {
        return Err(BuildError::Cargo {
            command,
            detail: status.to_string(),
        });
    }
    Ok(())
}

fn cargo() -> String {
    std::env::var("CARGO").unwrap_or_else(|_| "cargo".into())
}

fn which(program: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .chain(["/usr/sbin", "/usr/bin"].map(PathBuf::from))
        .map(|d| d.join(program))
        .find(|p| p.is_file())
}

#[allow(clippy::cast_precision_loss)]
fn mb(bytes: u64) -> f64 {
    bytes as f64 / 1e6
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metadata_gives_target_dir_and_packages() {
        let json = br#"{"packages":[{"name":"taskstack"},{"name":"taskstack-worker"}],
                        "target_directory":"/w/target","workspace_root":"/w"}"#;
        let ws = parse_metadata(json).expect("parsed");
        assert_eq!(ws.target_dir, PathBuf::from("/w/target"));
        assert_eq!(ws.packages, ["taskstack", "taskstack-worker"]);
    }

    #[test]
    fn the_image_build_orders_functions_from_the_committed_file() {
        let (_, env) = Profile::Image.cargo_args();
        let order = env
            .iter()
            .find(|(k, _)| *k == "TASKSTACK_SYMBOL_ORDER")
            .map(|(_, v)| *v)
            .expect("the image profile passes TASKSTACK_SYMBOL_ORDER");
        // Relative to the multi-call package, as its build script reads it.
        let file = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../taskstack")
            .join(order);
        let text = std::fs::read_to_string(&file).expect("the symbol order file");
        let names: Vec<&str> = text.lines().collect();
        assert!(names.len() > 1000, "{} names only", names.len());
        assert!(names.iter().all(|n| !n.is_empty() && !n.contains(' ')));
        assert!(names.iter().any(|n| n.starts_with("_ZN9taskstack6worker")));
        for (_, profile_env) in [Profile::Release.cargo_args(), Profile::Debug.cargo_args()] {
            assert!(profile_env.is_empty());
        }
    }

    #[test]
    fn dockerfiles_need_no_base_image_and_run_unprivileged() {
        for df in [app_dockerfile(), redis_dockerfile()] {
            assert!(df.starts_with("FROM scratch\n"), "{df}");
            assert_eq!(df.matches("FROM").count(), 1, "{df}");
            assert!(!df.contains("RUN "), "no shell in scratch: {df}");
        }
        assert!(app_dockerfile().contains("USER 65534:65534"));
        assert!(redis_dockerfile().contains("USER 999:1000"));
    }
}
