//! PostgreSQL results in the compose stack (profile `postgres`):
//!
//! * the image `localhost/taskstack-postgres:<tag>` (`stackctl build
//!   --postgres`), `FROM scratch`, from this host's Debian `postgresql`
//!   package: `postgres`, `initdb`, `pg_isready` and `psql` at their Debian
//!   paths with the libraries `ldd` lists, the share directory (catalog
//!   bootstrap files, time zone sets, text search data; of the extensions
//!   only PL/pgSQL, which `initdb` installs), the PL/pgSQL, Snowball and
//!   encoding conversion modules, the UTC zone file, `/etc/passwd` and
//!   `/etc/group` naming `postgres` (999:999, `initdb` looks its user up),
//!   and dash as `/bin/sh`: `initdb` starts its bootstrap backend through
//!   `popen()`, so a shell is needed, and it also runs the small entrypoint
//!   (`images/postgres/entrypoint.sh`: `initdb` on an empty volume, the
//!   role's password from the compose secret, then `exec postgres`);
//! * [`profile_env`]: with the profile on, the services' `result_backend`
//!   points at it unless the user chose one (`RESULT_BACKEND`).

use crate::BuildError;
use crate::compose::{Env, dotenv};
use crate::docker;
use crate::rootfs::Rootfs;
use bollard::Docker;
use std::path::{Path, PathBuf};

/// Repository of the PostgreSQL image.
pub const POSTGRES_REPOSITORY: &str = "localhost/taskstack-postgres";
/// The compose profile that adds the PostgreSQL service, and that service.
pub const PROFILE: &str = "postgres";
pub const SERVICE: &str = "postgres";
/// The image's user, the official postgres (Debian) image's `postgres`.
pub const POSTGRES_UID: u64 = 999;
/// Where Debian installs the server's versions (`<major>/bin/postgres`).
const DEBIAN_ROOT: &str = "/usr/lib/postgresql";
const SHARE_ROOT: &str = "/usr/share/postgresql";
/// The programs of the image (from `<DEBIAN_ROOT>/<major>/bin`).
const PROGRAMS: [&str; 4] = ["postgres", "initdb", "pg_isready", "psql"];
/// The shell `initdb` needs (Debian's `dash`).
const SHELL: &str = "/bin/dash";
const ENTRYPOINT: &str = "/usr/local/bin/taskstack-postgres-entrypoint";
const ENTRYPOINT_SCRIPT: &str = include_str!("../images/postgres/entrypoint.sh");

/// What the compose file's `RESULT_BACKEND` / `RESULT_BACKEND_PASSWORD_FILE`
/// become when the profile is on and the user set neither.
pub const RESULT_BACKEND: &str = "postgresql://taskstack@postgres:5432/taskstack";
pub const RESULT_BACKEND_PASSWORD_FILE: &str = "/run/secrets/postgres_password";

/// With the `postgres` profile enabled in `env` (`COMPOSE_PROFILES`), sets
/// `RESULT_BACKEND` and `RESULT_BACKEND_PASSWORD_FILE` to the profile's
/// service unless the environment or the `.env` beside `compose_file` sets
/// `RESULT_BACKEND` (then the user's choice stands, and `verify` reports a
/// PostgreSQL service that no result goes to). Returns a note for the user
/// when it set them.
pub fn profile_env(env: &mut Env, compose_file: &Path) -> Option<String> {
    let enabled = env
        .get("COMPOSE_PROFILES")
        .is_some_and(|p| p.split(',').any(|p| p.trim() == PROFILE));
    if !enabled {
        return None;
    }
    let dot = dotenv::beside(compose_file);
    if env.contains_key("RESULT_BACKEND") || dot.contains_key("RESULT_BACKEND") {
        return None;
    }
    env.insert("RESULT_BACKEND".into(), RESULT_BACKEND.into());
    env.insert(
        "RESULT_BACKEND_PASSWORD_FILE".into(),
        RESULT_BACKEND_PASSWORD_FILE.into(),
    );
    Some(format!(
        "profile {PROFILE}: results in PostgreSQL (RESULT_BACKEND={RESULT_BACKEND})"
    ))
}

/// The newest PostgreSQL version Debian's `postgresql` package installed
/// here: (major version, its `bin` directory).
pub fn installed() -> Result<(String, PathBuf), BuildError> {
    let missing = || BuildError::PostgresMissing {
        dir: PathBuf::from(DEBIAN_ROOT),
    };
    let mut versions: Vec<(u32, String)> = std::fs::read_dir(DEBIAN_ROOT)
        .map_err(|_| missing())?
        .filter_map(Result::ok)
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            let n = name.parse::<u32>().ok()?;
            e.path().join("bin/postgres").is_file().then_some((n, name))
        })
        .collect();
    versions.sort();
    let (_, major) = versions.pop().ok_or_else(missing)?;
    let bin = Path::new(DEBIAN_ROOT).join(&major).join("bin");
    Ok((major, bin))
}

/// The image's Dockerfile for PostgreSQL `major`.
pub fn dockerfile(major: &str) -> String {
    format!(
        "FROM scratch\n\
         LABEL org.opencontainers.image.title=\"taskstack-postgres\" \\\n      \
               org.opencontainers.image.description=\"PostgreSQL {major} from the build host's Debian package, for taskstack's results\" \\\n      \
               io.taskstack.built-by=\"stackctl build\"\n\
         COPY rootfs/ /\n\
         COPY --chown={POSTGRES_UID}:{POSTGRES_UID} pgdata/ /var/lib/postgresql/\n\
         ENV PATH={DEBIAN_ROOT}/{major}/bin:/usr/local/bin:/usr/bin:/bin \\\n    \
             PGDATA=/var/lib/postgresql/data \\\n    \
             PGHOST=/tmp \\\n    \
             TZ=UTC\n\
         USER {POSTGRES_UID}:{POSTGRES_UID}\n\
         EXPOSE 5432\n\
         STOPSIGNAL SIGINT\n\
         ENTRYPOINT [\"{ENTRYPOINT}\"]\n\
         CMD [\"-c\", \"listen_addresses=*\", \"-c\", \"unix_socket_directories=/tmp\", \"-c\", \"jit=off\"]\n"
    )
}

/// Builds the image `tag` from the host's PostgreSQL; returns its size.
pub async fn build_image(
    docker: &Docker,
    tag: &str,
    log: &dyn Fn(&str),
) -> Result<u64, BuildError> {
    let (major, bin) = installed()?;
    let fs = rootfs(&major, &bin)?;
    log(&format!(
        "building {tag} from PostgreSQL {major} ({}) and {SHELL} ({:.1} MB of files)",
        bin.display(),
        fs.content_size() as f64 / 1e6
    ));
    let mut tar = tar::Builder::new(Vec::new());
    crate::rootfs::append_file(&mut tar, "Dockerfile", dockerfile(&major).as_bytes(), 0o644)?;
    fs.append_to(&mut tar, "rootfs")?;
    // COPY makes everything root-owned; the volume's mount point comes
    // from an empty directory copied with --chown (a new named volume
    // takes its owner from it).
    Rootfs::new().append_to(&mut tar, "pgdata")?;
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
fn rootfs(major: &str, bin: &Path) -> Result<Rootfs, BuildError> {
    let mut fs = Rootfs::new();
    for p in PROGRAMS {
        let src = bin.join(p);
        fs.binary_with_libs(&src, &src.to_string_lossy())?;
    }
    let lib = Path::new(DEBIAN_ROOT).join(major).join("lib");
    for entry in read_dir(&lib)? {
        let name = entry.file_name().unwrap_or_default().to_string_lossy();
        let wanted = name == "plpgsql.so"
            || name == "dict_snowball.so"
            || (name.ends_with(".so") && name.contains("_and_"));
        if wanted {
            fs.binary_with_libs(&entry, &entry.to_string_lossy())?;
        }
    }
    let share = Path::new(SHARE_ROOT).join(major);
    copy_tree(&mut fs, &share, &|rel: &Path| {
        let first = rel
            .components()
            .next()
            .map(|c| c.as_os_str().to_string_lossy());
        match first.as_deref() {
            Some("man" | "contrib") => false,
            Some("extension") => {
                rel.components().count() == 1
                    || rel
                        .file_name()
                        .is_some_and(|n| n.to_string_lossy().starts_with("plpgsql"))
            }
            _ => true,
        }
    })?;
    for zone in ["/usr/share/zoneinfo/UTC", "/usr/share/zoneinfo/Etc/UTC"] {
        if let Ok(data) = std::fs::read(zone) {
            fs.file(Path::new(zone), data, 0o644);
        }
    }
    fs.binary_with_libs(Path::new(SHELL), "/bin/sh")?;
    fs.file(
        Path::new(ENTRYPOINT),
        ENTRYPOINT_SCRIPT.as_bytes().to_vec(),
        0o755,
    );
    let (u, g) = (POSTGRES_UID, POSTGRES_UID);
    fs.file(
        Path::new("/etc/passwd"),
        format!("root:x:0:0:root:/root:/bin/sh\npostgres:x:{u}:{g}:PostgreSQL:/var/lib/postgresql:/bin/sh\n")
            .into_bytes(),
        0o644,
    );
    fs.file(
        Path::new("/etc/group"),
        format!("root:x:0:\npostgres:x:{g}:\n").into_bytes(),
        0o644,
    );
    // glibc's built-in `files` source: no NSS module to load.
    fs.file(
        Path::new("/etc/nsswitch.conf"),
        b"passwd: files\ngroup: files\nhosts: files dns\n".to_vec(),
        0o644,
    );
    fs.dir("/tmp", 0o1777, 0, 0);
    Ok(fs)
}

fn read_dir(dir: &Path) -> Result<Vec<PathBuf>, BuildError> {
    let err = |source| BuildError::Read {
        path: dir.to_path_buf(),
        source,
    };
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).map_err(err)? {
        out.push(e.map_err(err)?.path());
    }
    out.sort();
    Ok(out)
}

/// Copies the regular files under `root` (symlinks followed) that `keep`
/// accepts (given the path relative to `root`), at the same paths.
fn copy_tree(fs: &mut Rootfs, root: &Path, keep: &dyn Fn(&Path) -> bool) -> Result<(), BuildError> {
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for path in read_dir(&dir)? {
            let rel = path.strip_prefix(root).unwrap_or(&path);
            if !keep(rel) {
                continue;
            }
            if path.is_dir() {
                stack.push(path);
            } else if path.is_file() {
                let data = std::fs::read(&path).map_err(|source| BuildError::Read {
                    path: path.clone(),
                    source,
                })?;
                fs.file(&path, data, 0o644);
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_dockerfile_needs_no_base_image_and_runs_as_postgres() {
        let df = dockerfile("15");
        assert!(df.starts_with("FROM scratch\n"), "{df}");
        assert_eq!(df.matches("FROM").count(), 1, "{df}");
        assert!(!df.contains("RUN "), "{df}");
        assert!(df.contains("USER 999:999"), "{df}");
        assert!(df.contains("ENV PATH=/usr/lib/postgresql/15/bin:"), "{df}");
        // Fast shutdown: SIGTERM would wait for the services' pooled
        // connections to close.
        assert!(df.contains("STOPSIGNAL SIGINT"), "{df}");
    }

    #[test]
    fn the_entrypoint_is_a_posix_shell_script() {
        assert!(ENTRYPOINT_SCRIPT.starts_with("#!/bin/sh\n"));
        assert!(ENTRYPOINT_SCRIPT.contains("exec postgres"));
    }

    fn env(pairs: &[(&str, &str)]) -> Env {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    #[test]
    fn the_profile_points_results_at_postgres_unless_chosen() {
        let dir = tempfile::tempdir().expect("tempdir");
        let file = dir.path().join("docker-compose.yml");
        let mut off = env(&[("COMPOSE_PROFILES", "app")]);
        assert_eq!(profile_env(&mut off, &file), None);
        assert!(!off.contains_key("RESULT_BACKEND"));

        let mut on = env(&[("COMPOSE_PROFILES", "app, postgres")]);
        let note = profile_env(&mut on, &file).expect("a note");
        assert!(note.contains(RESULT_BACKEND), "{note}");
        assert_eq!(on["RESULT_BACKEND"], RESULT_BACKEND);
        assert_eq!(
            on["RESULT_BACKEND_PASSWORD_FILE"],
            "/run/secrets/postgres_password"
        );

        let mut chosen = env(&[
            ("COMPOSE_PROFILES", "postgres"),
            ("RESULT_BACKEND", "redis://redis:6379/0"),
        ]);
        assert_eq!(profile_env(&mut chosen, &file), None);
        assert_eq!(chosen["RESULT_BACKEND"], "redis://redis:6379/0");

        std::fs::write(
            dir.path().join(".env"),
            "RESULT_BACKEND=redis://redis:6379/1\n",
        )
        .expect("write .env");
        let mut in_dotenv = env(&[("COMPOSE_PROFILES", "postgres")]);
        assert_eq!(profile_env(&mut in_dotenv, &file), None);
        assert!(!in_dotenv.contains_key("RESULT_BACKEND"));
    }
}
