//! What some tests need from the machine (root, a program) and cannot
//! provide themselves. A test never passes without testing: a missing
//! prerequisite fails it with a message naming what is missing and how to
//! get it. Under CI (`CI=true`, which `.ci/run` sets) the message adds that
//! CI must provide it, since `scripts/prereqs` installs every package the
//! suite needs.

use std::process::{Command, Stdio};

/// Something a test needs from the machine.
#[derive(Debug, Clone, Copy)]
pub enum Prereq {
    /// uid 0: refusing root, or SIGKILLing a container's process.
    Root,
    /// A program on `PATH` that answers `--version`, from a Debian package.
    Program {
        name: &'static str,
        package: &'static str,
    },
    /// A file installed by a Debian package.
    File {
        path: &'static str,
        package: &'static str,
    },
}

impl Prereq {
    /// What is missing and how to get it, or `None` when present.
    fn missing(self) -> Option<String> {
        match self {
            Prereq::Root => (!crate::running_as_root().unwrap_or(false)).then(|| {
                "this test must run as root (uid 0); run it as root, as CI does".to_owned()
            }),
            Prereq::Program { name, package } => {
                let found = Command::new(name)
                    .arg("--version")
                    .stdin(Stdio::null())
                    .stdout(Stdio::null())
                    .stderr(Stdio::null())
                    .status()
                    .is_ok_and(|s| s.success());
                (!found).then(|| {
                    format!(
                        "{name} is not installed: run scripts/prereqs \
                         (Debian: apt-get install -y {package})"
                    )
                })
            }
            Prereq::File { path, package } => (!std::path::Path::new(path).exists()).then(|| {
                format!(
                    "{path} is missing: run scripts/prereqs \
                         (Debian: apt-get install -y {package})"
                )
            }),
        }
    }
}

/// Whether this runs under CI (`CI` set to anything but `false`/`0`/empty).
pub fn in_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| !matches!(v.trim(), "" | "0" | "false"))
}

/// Fails the calling test (a panic naming the prerequisite) unless `p` is
/// met, so the test can never pass without having run.
#[track_caller]
pub fn require(p: Prereq) {
    if let Some(what) = p.missing() {
        if in_ci() {
            panic!("missing prerequisite under CI=true: {what}; CI must provide it");
        }
        panic!("missing prerequisite, so this test did NOT run: {what}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_present_prerequisite_lets_the_test_run() {
        require(Prereq::Program {
            name: "ls",
            package: "coreutils",
        });
        require(Prereq::File {
            path: "/",
            package: "base-files",
        });
    }

    #[test]
    #[should_panic(expected = "no-such-program-5c1d is not installed")]
    fn a_missing_program_fails_the_test() {
        require(Prereq::Program {
            name: "no-such-program-5c1d",
            package: "nothing",
        });
    }

    #[test]
    #[should_panic(expected = "/no/such/file-5c1d is missing")]
    fn a_missing_file_fails_the_test() {
        require(Prereq::File {
            path: "/no/such/file-5c1d",
            package: "nothing",
        });
    }
}
