//! RabbitMQ as the broker of the compose stack (profile `rabbitmq`):
//!
//! * the image `localhost/taskstack-rabbitmq:<tag>` (`stackctl build
//!   --rabbitmq`), `FROM scratch`, from this host's Debian `rabbitmq-server`
//!   and Erlang packages: the trees `/usr/lib/erlang` and `/usr/lib/rabbitmq`
//!   as installed (links kept), the libraries `ldd` lists for every ELF file
//!   in them (the emulator, its port programs, the crypto NIF), dash as
//!   `/bin/sh` and coreutils' `dirname`, `basename`, `readlink` (RabbitMQ's
//!   and Erlang's start scripts are shell scripts calling them), `df` and
//!   `getconf` (RabbitMQ's disk and memory monitors run them), a
//!   `rabbitmq.conf` (AMQP on 5672, logs on stdout, definitions loaded at
//!   boot), `/etc/passwd` naming `rabbitmq` (999:999) and the entrypoint
//!   (`images/rabbitmq/entrypoint.sh`: the services' user, vhost and
//!   permissions from the password secret, then `exec rabbitmq-server`);
//! * [`profile_env`]: with the profile on, the services' `broker_url`
//!   points at it (results stay on the Redis service) unless the user chose
//!   a broker (`BROKER_URL`).

use crate::BuildError;
use crate::compose::{Env, dotenv};
use crate::docker;
use crate::rootfs::Rootfs;
use bollard::Docker;
use std::path::{Path, PathBuf};

/// Repository of the RabbitMQ image.
pub const RABBITMQ_REPOSITORY: &str = "localhost/taskstack-rabbitmq";
/// The compose profile that adds the RabbitMQ service, and that service.
pub const PROFILE: &str = "rabbitmq";
pub const SERVICE: &str = "rabbitmq";
/// The image's user, the official rabbitmq image's `rabbitmq`.
pub const RABBITMQ_UID: u64 = 999;
/// The services' AMQP user and vhost (the entrypoint's defaults).
pub const USER: &str = "taskstack";
pub const VHOST: &str = "/";
/// The trees copied as installed.
const ERLANG_ROOT: &str = "/usr/lib/erlang";
const RABBITMQ_ROOT: &str = "/usr/lib/rabbitmq";
/// The programs the start scripts call besides shell built-ins, and the
/// ones RabbitMQ runs itself: `df` for the free disk space alarm (without
/// it the alarm is off), `getconf` for the memory page size.
const TOOLS: [&str; 5] = ["dirname", "basename", "readlink", "df", "getconf"];
/// The shell (Debian's `dash`).
const SHELL: &str = "/bin/dash";
const ENTRYPOINT: &str = "/usr/local/bin/taskstack-rabbitmq-entrypoint";
const ENTRYPOINT_SCRIPT: &str = include_str!("../images/rabbitmq/entrypoint.sh");
const CONFIG: &str = include_str!("../images/rabbitmq/rabbitmq.conf");

/// What the compose file's `BROKER_URL` / `BROKER_PASSWORD_FILE` become
/// when the profile is on and the user set neither (`%2F`: the vhost `/`).
pub const BROKER_URL: &str = "amqp://taskstack@rabbitmq:5672/%2F";
pub const BROKER_PASSWORD_FILE: &str = "/run/secrets/rabbitmq_password";

/// Whether `env`'s `COMPOSE_PROFILES` holds `profile`.
pub fn profile_enabled(env: &Env, profile: &str) -> bool {
    env.get("COMPOSE_PROFILES")
        .is_some_and(|p| p.split(',').any(|p| p.trim() == profile))
}

/// With the `rabbitmq` profile enabled in `env` (`COMPOSE_PROFILES`), sets
/// `BROKER_URL` and `BROKER_PASSWORD_FILE` to the profile's service unless
/// the environment or the `.env` beside `compose_file` sets `BROKER_URL`
/// (then the user's choice stands, and `verify` reports a RabbitMQ service
/// that no service uses). Returns a note for the user when it set them.
pub fn profile_env(env: &mut Env, compose_file: &Path) -> Option<String> {
    if !profile_enabled(env, PROFILE) {
        return None;
    }
    let dot = dotenv::beside(compose_file);
    if env.contains_key("BROKER_URL") || dot.contains_key("BROKER_URL") {
        return None;
    }
    env.insert("BROKER_URL".into(), BROKER_URL.into());
    env.insert("BROKER_PASSWORD_FILE".into(), BROKER_PASSWORD_FILE.into());
    let results = match env.get("RESULT_BACKEND").or(dot.get("RESULT_BACKEND")) {
        Some(b) if taskstack::config::is_postgres_url(b) => "results in PostgreSQL",
        _ => "results on Redis",
    };
    Some(format!(
        "profile {PROFILE}: tasks through RabbitMQ (BROKER_URL={BROKER_URL}), {results}"
    ))
}

/// The RabbitMQ version Debian's `rabbitmq-server` package installed here
/// (from `<RABBITMQ_ROOT>/lib/rabbitmq_server-<version>`) and the erts
/// version of the Erlang runtime (`<ERLANG_ROOT>/erts-<version>`).
pub fn installed() -> Result<(String, String), BuildError> {
    let versioned = |dir: &str, prefix: &str| -> Option<String> {
        let mut found: Vec<String> = std::fs::read_dir(dir)
            .ok()?
            .filter_map(Result::ok)
            .filter_map(|e| {
                let name = e.file_name().to_string_lossy().into_owned();
                name.strip_prefix(prefix).map(str::to_owned)
            })
            .collect();
        found.sort();
        found.pop()
    };
    let rabbit = versioned(&format!("{RABBITMQ_ROOT}/lib"), "rabbitmq_server-").ok_or(
        BuildError::RabbitmqMissing {
            path: PathBuf::from(RABBITMQ_ROOT),
            package: "rabbitmq-server",
        },
    )?;
    let erts = versioned(ERLANG_ROOT, "erts-").ok_or(BuildError::RabbitmqMissing {
        path: PathBuf::from(ERLANG_ROOT),
        package: "erlang-base",
    })?;
    Ok((rabbit, erts))
}

/// The image's Dockerfile for RabbitMQ `version`.
pub fn dockerfile(version: &str) -> String {
    let u = RABBITMQ_UID;
    format!(
        "FROM scratch\n\
         LABEL org.opencontainers.image.title=\"taskstack-rabbitmq\" \\\n      \
               org.opencontainers.image.description=\"RabbitMQ {version} from the build host's Debian packages, taskstack's broker\" \\\n      \
               io.taskstack.built-by=\"stackctl build\"\n\
         COPY rootfs/ /\n\
         COPY --chown={u}:{u} data/ /var/lib/rabbitmq/\n\
         ENV PATH={RABBITMQ_ROOT}/bin:{ERLANG_ROOT}/bin:/usr/local/bin:/usr/bin:/bin \\\n    \
             HOME=/var/lib/rabbitmq \\\n    \
             RABBITMQ_NODENAME=rabbit@localhost \\\n    \
             RABBITMQ_LOG_BASE=/tmp \\\n    \
             LC_ALL=C.UTF-8 \\\n    \
             TZ=UTC\n\
         WORKDIR /var/lib/rabbitmq\n\
         USER {u}:{u}\n\
         EXPOSE 5672\n\
         ENTRYPOINT [\"{ENTRYPOINT}\"]\n"
    )
}

/// Builds the image `tag` from the host's RabbitMQ; returns its size.
pub async fn build_image(
    docker: &Docker,
    tag: &str,
    log: &dyn Fn(&str),
) -> Result<u64, BuildError> {
    let (version, erts) = installed()?;
    let fs = rootfs()?;
    log(&format!(
        "building {tag} from RabbitMQ {version} (erts {erts}) and {SHELL} ({:.1} MB of files)",
        fs.content_size() as f64 / 1e6
    ));
    let mut tar = tar::Builder::new(Vec::new());
    crate::rootfs::append_file(
        &mut tar,
        "Dockerfile",
        dockerfile(&version).as_bytes(),
        0o644,
    )?;
    fs.append_to(&mut tar, "rootfs")?;
    // COPY makes everything root-owned; the volume's mount point comes
    // from an empty directory copied with --chown (a new named volume
    // takes its owner from it).
    Rootfs::new().append_to(&mut tar, "data")?;
    let context = tar
        .into_inner()
        .map_err(|source| BuildError::Context { source })?;
    docker::build_image(docker, tag, context).await?;
    let bytes = docker::local_image_size(docker, tag)
        .await?
        .unwrap_or_default();
    log(&format!("built {tag}: {:.1} MB", bytes as f64 / 1e6));
    Ok(bytes)
}

/// The image's files (see the module docs).
fn rootfs() -> Result<Rootfs, BuildError> {
    let mut fs = Rootfs::new();
    let mut elves = Vec::new();
    for root in [ERLANG_ROOT, RABBITMQ_ROOT] {
        elves.extend(fs.tree(Path::new(root))?);
    }
    // The files themselves are in already; this adds what they load.
    for elf in &elves {
        fs.libraries_of(elf)?;
    }
    for tool in TOOLS {
        let src = ["/usr/bin", "/bin"]
            .map(|d| Path::new(d).join(tool))
            .into_iter()
            .find(|p| p.is_file())
            .ok_or(BuildError::RabbitmqMissing {
                path: PathBuf::from("/usr/bin").join(tool),
                package: if tool == "getconf" {
                    "libc-bin"
                } else {
                    "coreutils"
                },
            })?;
        fs.binary_with_libs(&src, &format!("/usr/bin/{tool}"))?;
    }
    fs.binary_with_libs(Path::new(SHELL), "/bin/sh")?;
    fs.file(
        Path::new(ENTRYPOINT),
        ENTRYPOINT_SCRIPT.as_bytes().to_vec(),
        0o755,
    );
    fs.file(
        Path::new("/etc/rabbitmq/rabbitmq.conf"),
        CONFIG.as_bytes().to_vec(),
        0o644,
    );
    fs.file(
        Path::new("/etc/rabbitmq/enabled_plugins"),
        b"[].\n".to_vec(),
        0o644,
    );
    let u = RABBITMQ_UID;
    fs.file(
        Path::new("/etc/passwd"),
        format!(
            "root:x:0:0:root:/root:/bin/sh\nrabbitmq:x:{u}:{u}:RabbitMQ:/var/lib/rabbitmq:/bin/sh\n"
        )
        .into_bytes(),
        0o644,
    );
    fs.file(
        Path::new("/etc/group"),
        format!("root:x:0:\nrabbitmq:x:{u}:\n").into_bytes(),
        0o644,
    );
    // glibc's built-in `files` and `dns` sources: no NSS module to load.
    fs.file(
        Path::new("/etc/nsswitch.conf"),
        b"passwd: files\ngroup: files\nhosts: files dns\n".to_vec(),
        0o644,
    );
    fs.dir("/tmp", 0o1777, 0, 0);
    Ok(fs)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_dockerfile_needs_no_base_image_and_runs_as_rabbitmq() {
        let df = dockerfile("3.10.8");
        assert!(df.starts_with("FROM scratch\n"), "{df}");
        assert_eq!(df.matches("FROM").count(), 1, "{df}");
        assert!(!df.contains("RUN "), "{df}");
        assert!(df.contains("USER 999:999"), "{df}");
        assert!(df.contains("HOME=/var/lib/rabbitmq"), "{df}");
        // A fixed node name: the data directory under the volume is named
        // after it, so a recreated container (new hostname) keeps its data.
        assert!(df.contains("RABBITMQ_NODENAME=rabbit@localhost"), "{df}");
        assert!(!df.contains("EXPOSE 15672"), "{df}");
    }

    #[test]
    fn the_entrypoint_and_config_agree_on_the_definitions_file() {
        assert!(ENTRYPOINT_SCRIPT.starts_with("#!/bin/sh\n"));
        assert!(ENTRYPOINT_SCRIPT.contains("exec rabbitmq-server"));
        assert!(ENTRYPOINT_SCRIPT.contains("defs=/tmp/taskstack-definitions.json"));
        assert!(CONFIG.contains("load_definitions = /tmp/taskstack-definitions.json"));
        assert!(CONFIG.contains("listeners.tcp.default = 5672"));
        assert!(ENTRYPOINT_SCRIPT.contains(&format!("RABBITMQ_USER:-{USER}")));
        assert!(ENTRYPOINT_SCRIPT.contains(&format!("RABBITMQ_VHOST:-{VHOST}")));
    }

    fn env(pairs: &[(&str, &str)]) -> Env {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    #[test]
    fn the_profile_points_the_broker_at_rabbitmq_unless_chosen() {
        let dir = tempfile::tempdir().expect("tempdir");
        let file = dir.path().join("docker-compose.yml");
        let mut off = env(&[("COMPOSE_PROFILES", "postgres")]);
        assert_eq!(profile_env(&mut off, &file), None);
        assert!(!off.contains_key("BROKER_URL"));

        let mut on = env(&[("COMPOSE_PROFILES", "app, rabbitmq")]);
        let note = profile_env(&mut on, &file).expect("a note");
        assert!(note.contains(BROKER_URL), "{note}");
        assert_eq!(on["BROKER_URL"], "amqp://taskstack@rabbitmq:5672/%2F");
        assert_eq!(on["BROKER_PASSWORD_FILE"], "/run/secrets/rabbitmq_password");
        assert!(!on.contains_key("RESULT_BACKEND"), "results stay on Redis");
        assert!(note.ends_with("results on Redis"), "{note}");

        let mut both = env(&[("COMPOSE_PROFILES", "postgres,rabbitmq")]);
        crate::postgres::profile_env(&mut both, &file).expect("the postgres profile's note");
        let note = profile_env(&mut both, &file).expect("a note");
        assert!(note.ends_with("results in PostgreSQL"), "{note}");

        let mut chosen = env(&[
            ("COMPOSE_PROFILES", "rabbitmq"),
            ("BROKER_URL", "amqp://me@elsewhere:5672/%2F"),
        ]);
        assert_eq!(profile_env(&mut chosen, &file), None);
        assert_eq!(chosen["BROKER_URL"], "amqp://me@elsewhere:5672/%2F");

        std::fs::write(dir.path().join(".env"), "BROKER_URL=redis://redis:6379/1\n")
            .expect("write .env");
        let mut in_dotenv = env(&[("COMPOSE_PROFILES", "rabbitmq")]);
        assert_eq!(profile_env(&mut in_dotenv, &file), None);
        assert!(!in_dotenv.contains_key("BROKER_URL"));
    }
}
