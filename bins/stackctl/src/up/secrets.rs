//! The stack's secret files, made by `up` on a first run exactly as
//! `compose/init-secrets` makes them, so that script is not a hidden
//! prerequisite: random 32-byte hex values, the Redis ACL derived from the
//! password (`default` with its SHA-256, `healthcheck` allowed PING only),
//! the directory 0700 and the files 0644 (compose mounts them as they are
//! and the services run as non-root users).
//!
//! A set with none of its files present is made whole. In a set that
//! exists, only a missing secret nothing else is derived from (the API
//! token, Grafana's, PostgreSQL's and RabbitMQ's passwords: e.g.
//! `postgres_password`, which came with the profile `postgres`, or
//! `rabbitmq_password` with `rabbitmq`) is made on its own; filling in
//! the Redis password could leave it and the ACL disagreeing, so that is
//! refused with the exact command that repairs it.

use crate::compose::Project;
use crate::error::StackError;
use ring::rand::SecureRandom as _;
use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};

/// The secret holding the Redis password; the ACL is derived from it.
const REDIS_PASSWORD: &str = "redis_password";
/// The Redis users file (`compose/docker-compose.yml`'s `redis_acl`).
const REDIS_ACL: &str = "redis_acl";
/// Secrets that are a fresh random value each.
const RANDOM: [&str; 5] = [
    REDIS_PASSWORD,
    "api_token",
    "grafana_admin_password",
    "postgres_password",
    "rabbitmq_password",
];
/// Of those, the ones no other file is derived from.
const STANDALONE: [&str; 4] = [
    "api_token",
    "grafana_admin_password",
    "postgres_password",
    "rabbitmq_password",
];

/// Makes the project's secret files when none exists and one of `needed`
/// is missing; returns the files it wrote. A missing secret it cannot
/// make, or one missing from a set that partly exists, fails with the
/// command that creates it.
pub fn ensure<'a>(
    project: &Project,
    needed: impl IntoIterator<Item = &'a String>,
) -> Result<Vec<PathBuf>, StackError> {
    let absent: Vec<&String> = needed
        .into_iter()
        .filter(|n| project.secrets.get(*n).is_some_and(|s| !s.file.exists()))
        .collect();
    let Some(&missing) = absent.first() else {
        return Ok(Vec::new());
    };
    let write_err = |path: &Path, e: std::io::Error| StackError::SecretWrite {
        path: path.to_path_buf(),
        detail: e.to_string(),
    };
    let fresh = project.secrets.values().all(|s| !s.file.exists());
    if !fresh && absent.iter().all(|n| STANDALONE.contains(&n.as_str())) {
        let mut written = Vec::new();
        for name in absent {
            let file = &project.secrets[name].file;
            if !file.exists() {
                write(file, &random_hex().map_err(|e| write_err(file, e))?)
                    .map_err(|e| write_err(file, e))?;
                written.push(file.clone());
            }
        }
        return Ok(written);
    }
    let known = project
        .secrets
        .keys()
        .all(|n| RANDOM.contains(&n.as_str()) || n == REDIS_ACL);
    let acl_has_password =
        !project.secrets.contains_key(REDIS_ACL) || project.secrets.contains_key(REDIS_PASSWORD);
    if !(fresh && known && acl_has_password) {
        let file = project.secrets[missing].file.clone();
        return Err(StackError::SecretMissing {
            name: missing.clone(),
            command: init_command(project, &file),
            file,
        });
    }
    let mut written = Vec::new();
    for (name, secret) in &project.secrets {
        if name == REDIS_ACL {
            continue;
        }
        write(
            &secret.file,
            &random_hex().map_err(|e| write_err(&secret.file, e))?,
        )
        .map_err(|e| write_err(&secret.file, e))?;
        written.push(secret.file.clone());
    }
    if let Some(acl) = project.secrets.get(REDIS_ACL) {
        let password = std::fs::read_to_string(&project.secrets[REDIS_PASSWORD].file)
            .map_err(|e| write_err(&acl.file, e))?;
        write(&acl.file, &acl_file(&password)).map_err(|e| write_err(&acl.file, e))?;
        written.push(acl.file.clone());
    }
    Ok(written)
}

/// The command that makes `file`'s set: the project's `init-secrets`
/// (beside the compose file) with the directory it writes to.
fn init_command(project: &Project, file: &Path) -> String {
    let script = project
        .file
        .parent()
        .map(|d| d.join("init-secrets"))
        .filter(|s| s.exists())
        .map_or_else(
            || "compose/init-secrets".to_owned(),
            |s| s.display().to_string(),
        );
    match file.parent() {
        Some(dir) => format!("TASKSTACK_SECRETS_DIR={} {script}", dir.display()),
        None => script,
    }
}

/// 32 random bytes as 64 hex digits, no newline (as `init-secrets`).
fn random_hex() -> std::io::Result<String> {
    let mut bytes = [0u8; 32];
    ring::rand::SystemRandom::new()
        .fill(&mut bytes)
        .map_err(|_| std::io::Error::other("the system's random source failed"))?;
    Ok(bytes.iter().map(|b| format!("{b:02x}")).collect())
}

/// Redis's users: `default` with the password's SHA-256 (a trailing
/// newline is not part of the password: the services drop it too), and
/// `healthcheck` allowed PING only.
fn acl_file(password: &str) -> String {
    let digest = ring::digest::digest(
        &ring::digest::SHA256,
        password.trim_end_matches(['\n', '\r']).as_bytes(),
    );
    let hash: String = digest.as_ref().iter().map(|b| format!("{b:02x}")).collect();
    format!("user default on #{hash} ~* &* +@all\nuser healthcheck on nopass -@all +ping\n")
}

/// Writes `content` to `path` (through a temporary file and a rename, mode
/// 0644) in a directory made 0700.
fn write(path: &Path, content: &str) -> std::io::Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir)?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))?;
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, content)?;
    std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o644))?;
    std::fs::rename(&tmp, path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_acl_matches_init_secrets() {
        // `printf '%s' pw | sha256sum` of "pw".
        assert_eq!(
            acl_file("pw\n"),
            "user default on #30c952fab122c3f9759f02a6d95c3758b246b4fee239957b2d4fee46e26170c4 \
             ~* &* +@all\nuser healthcheck on nopass -@all +ping\n"
        );
        let r = random_hex().expect("random");
        assert!(
            r.len() == 64 && r.chars().all(|c| c.is_ascii_hexdigit()),
            "{r}"
        );
        assert_ne!(r, random_hex().expect("random"));
    }
}
