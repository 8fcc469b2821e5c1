//! The state file a service writes once ready, naming the process that runs
//! here, so an exec-form `healthcheck` (no shell, no port) can find it.

use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

/// Who runs here.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct State {
    /// The instance id (also its key suffix in Redis).
    pub id: String,
    pub pid: u32,
    /// The Redis namespace it uses.
    pub namespace: String,
    /// When the process started (clock ticks since boot, from
    /// `/proc/<pid>/stat`), so a file left by a killed process is not taken
    /// for a live one when its pid is reused.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub started: Option<u64>,
}

impl State {
    /// Whether the process this state names is still running: its pid is
    /// alive and, when recorded, started at the same moment.
    pub fn running(&self) -> bool {
        process_alive(self.pid) && self.started.is_none_or(|t| start_time(self.pid) == Some(t))
    }
}

/// When `pid` started, in clock ticks since boot (`/proc/<pid>/stat` field 22).
fn start_time(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name (which may hold spaces): state is
    // field 3, so starttime (22) is the 20th.
    stat.rsplit_once(')')?
        .1
        .split_whitespace()
        .nth(19)?
        .parse()
        .ok()
}

/// Where a service records itself for `healthcheck`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StatePath {
    /// Exactly this file (`worker_state_file` / `beat_state_file` set). Two
    /// running processes may not share it: the second refuses to start.
    File(PathBuf),
    /// One file per process, `<dir>/<prefix><pid>.json` (the default), so
    /// any number of instances run on one host; `healthcheck` checks every
    /// live one.
    PerProcess { dir: PathBuf, prefix: String },
}

impl StatePath {
    /// `configured` when set, else one file per process in `/tmp`, named
    /// `taskstack-<what>-<pid>.json`.
    pub fn new(what: &str, configured: Option<&Path>) -> Self {
        match configured {
            Some(p) => Self::File(p.to_owned()),
            None => Self::PerProcess {
                dir: PathBuf::from("/tmp"),
                prefix: format!("taskstack-{what}-"),
            },
        }
    }

    /// The file this process writes.
    pub fn own_file(&self) -> PathBuf {
        match self {
            Self::File(p) => p.clone(),
            Self::PerProcess { dir, prefix } => {
                dir.join(format!("{prefix}{}.json", std::process::id()))
            }
        }
    }

    /// The files that may name a running instance.
    fn candidates(&self) -> Vec<PathBuf> {
        match self {
            Self::File(p) => vec![p.clone()],
            Self::PerProcess { dir, prefix } => std::fs::read_dir(dir)
                .map(|entries| {
                    let mut found: Vec<PathBuf> = entries
                        .filter_map(Result::ok)
                        .map(|e| e.path())
                        .filter(|p| {
                            p.file_name().and_then(|n| n.to_str()).is_some_and(|n| {
                                n.strip_prefix(prefix.as_str())
                                    .and_then(|rest| rest.strip_suffix(".json"))
                                    .is_some_and(|pid| pid.parse::<u32>().is_ok())
                            })
                        })
                        .collect();
                    found.sort();
                    found
                })
                .unwrap_or_default(),
        }
    }

    /// Where `healthcheck` looks, for messages.
    pub fn describe(&self) -> String {
        match self {
            Self::File(p) => format!("{p:?}"),
            Self::PerProcess { dir, prefix } => format!("{dir:?}/{prefix}<pid>.json"),
        }
    }
}

/// Why this process cannot record itself.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StateError {
    #[error(
        "{key} {path:?} belongs to the running {what} {id} (pid {pid}): give each {what} on \
         this host its own file, or leave {key} unset (each process then gets its own)"
    )]
    InUse {
        key: &'static str,
        what: String,
        path: PathBuf,
        id: String,
        pid: u32,
    },
    #[error("cannot write the {what} state file {path:?} ({key}): {source}")]
    Io {
        key: &'static str,
        what: String,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// Records this process as instance `id` of `what` ("worker", "beat") at
/// `at`, refusing a configured file that a live process of another pid
/// still names. With per-process files, the files of processes that are no
/// longer running are removed on the way. Returns the file written.
pub fn claim(
    at: &StatePath,
    what: &str,
    key: &'static str,
    id: &str,
    namespace: &str,
) -> Result<PathBuf, StateError> {
    let path = at.own_file();
    match at {
        StatePath::File(p) => {
            if let Some(other) = read(p).filter(|s| s.pid != std::process::id())
                && other.running()
            {
                return Err(StateError::InUse {
                    key,
                    what: what.to_owned(),
                    path: p.clone(),
                    id: other.id,
                    pid: other.pid,
                });
            }
        }
        StatePath::PerProcess { .. } => {
            for stale in at.candidates() {
                if read(&stale).is_some_and(|s| !s.running()) {
                    let _ = std::fs::remove_file(stale);
                }
            }
        }
    }
    write(&path, id, namespace).map_err(|source| StateError::Io {
        key,
        what: what.to_owned(),
        path: path.clone(),
        source,
    })?;
    Ok(path)
}

fn read(path: &Path) -> Option<State> {
    serde_json::from_slice(&std::fs::read(path).ok()?).ok()
}

/// Records this process as `id` (atomically: temp file + rename).
pub fn write(path: &Path, id: &str, namespace: &str) -> std::io::Result<()> {
    let state = State {
        id: id.to_owned(),
        pid: std::process::id(),
        namespace: namespace.to_owned(),
        started: start_time(std::process::id()),
    };
    let tmp = path.with_extension(format!("tmp{}", std::process::id()));
    std::fs::write(&tmp, serde_json::to_vec(&state)?)?;
    std::fs::rename(tmp, path)
}

/// Every running instance of `what` recorded at `at` that uses
/// `namespace`; Err when there is none (saying where it looked), or when a
/// configured file names a process that is not running.
pub fn read_all_live(at: &StatePath, what: &str, namespace: &str) -> Result<Vec<State>, String> {
    if let StatePath::File(p) = at {
        return read_live(p, what, namespace).map(|s| vec![s]);
    }
    let mut live = Vec::new();
    let mut elsewhere = Vec::new();
    for path in at.candidates() {
        match read(&path) {
            Some(s) if s.running() && s.namespace == namespace => live.push(s),
            Some(s) if s.running() => elsewhere.push(s.namespace),
            _ => {}
        }
    }
    if live.is_empty() {
        let also = if elsewhere.is_empty() {
            String::new()
        } else {
            format!(" (running ones use namespaces {elsewhere:?})")
        };
        return Err(format!(
            "no running {what} in namespace {namespace:?} recorded at {}{also}: the {what} is \
             not running or not ready",
            at.describe()
        ));
    }
    Ok(live)
}

/// Reads the state file of `what` ("worker", "beat") and checks that the
/// process it names is alive and uses `namespace`; Err says what is wrong.
pub fn read_live(path: &Path, what: &str, namespace: &str) -> Result<State, String> {
    let raw = std::fs::read(path).map_err(|e| {
        format!("no {what} state at {path:?} ({e}): the {what} is not running or not ready")
    })?;
    let state: State = serde_json::from_slice(&raw)
        .map_err(|e| format!("{what} state file {path:?} is unreadable: {e}"))?;
    if !state.running() {
        return Err(format!(
            "{what} {} (pid {}) is not running",
            state.id, state.pid
        ));
    }
    if state.namespace != namespace {
        return Err(format!(
            "{what} {} uses namespace {:?}, this check {namespace:?}",
            state.id, state.namespace
        ));
    }
    Ok(state)
}

/// Whether `pid` is a live (not zombie) process.
pub fn process_alive(pid: u32) -> bool {
    // /proc/<pid>/stat is "pid (comm) S ..."; comm may hold spaces or
    // parentheses, so the state is the first field after the last ')'.
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|stat| {
        stat.rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().next())
            .is_some_and(|state| !matches!(state, "Z" | "X" | "x"))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_written_state_reads_back_while_the_process_lives() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("s.json");
        write(&path, "w1", "ns").expect("write");
        let s = read_live(&path, "worker", "ns").expect("alive");
        assert_eq!((s.id.as_str(), s.pid), ("w1", std::process::id()));
        let e = read_live(&path, "worker", "other").expect_err("namespace");
        assert!(e.contains("namespace"), "{e}");
        let e = read_live(&dir.path().join("none"), "beat", "ns").expect_err("missing");
        assert!(e.contains("no beat state"), "{e}");
        assert!(!process_alive(u32::MAX));
    }

    #[test]
    fn a_reused_pid_is_not_taken_for_the_process_that_wrote_the_file() {
        let me = std::process::id();
        let now = State {
            id: "w".into(),
            pid: me,
            namespace: "ns".into(),
            started: start_time(me),
        };
        assert!(now.started.is_some());
        assert!(now.running());
        // The same pid, started at another moment: someone else's process.
        let earlier = State {
            started: now.started.map(|t| t.saturating_sub(1)),
            ..now.clone()
        };
        assert!(!earlier.running());
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("w.json");
        std::fs::write(&path, serde_json::to_vec(&earlier).expect("json")).expect("write");
        let e = read_live(&path, "worker", "ns").expect_err("not running");
        assert!(e.contains("is not running"), "{e}");
    }

    #[test]
    fn per_process_files_let_many_instances_share_a_host() {
        let dir = tempfile::tempdir().expect("tempdir");
        let at = StatePath::PerProcess {
            dir: dir.path().to_owned(),
            prefix: "taskstack-worker-".into(),
        };
        let e = read_all_live(&at, "worker", "ns").expect_err("none yet");
        assert!(e.contains("no running worker"), "{e}");
        // A file left by a process that is gone, and one of another kind.
        let stale = dir
            .path()
            .join(format!("taskstack-worker-{}.json", u32::MAX));
        std::fs::write(&stale, r#"{"id":"old","pid":4294967295,"namespace":"ns"}"#).expect("write");
        std::fs::write(dir.path().join("taskstack-beat-1.json"), "{}").expect("write");
        let path = claim(&at, "worker", "worker_state_file", "w1", "ns").expect("claim");
        assert_eq!(path, at.own_file());
        assert!(!stale.exists(), "a dead process's file is removed");
        let live = read_all_live(&at, "worker", "ns").expect("live");
        assert_eq!(live.len(), 1);
        assert_eq!(live[0].id, "w1");
        let e = read_all_live(&at, "worker", "other").expect_err("namespace");
        assert!(e.contains("\"ns\""), "{e}");
    }

    #[test]
    fn a_configured_file_is_not_shared_by_two_live_processes() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("w.json");
        let at = StatePath::File(path.clone());
        // Another live process (pid 1, init) already recorded itself here.
        std::fs::write(&path, r#"{"id":"first","pid":1,"namespace":"ns"}"#).expect("write");
        let e = claim(&at, "worker", "worker_state_file", "w2", "ns")
            .expect_err("in use")
            .to_string();
        assert!(
            e.contains("worker_state_file") && e.contains("first") && e.contains("pid 1"),
            "{e}"
        );
        // A file naming a process that is gone is taken over.
        std::fs::write(&path, r#"{"id":"gone","pid":4294967295,"namespace":"ns"}"#).expect("write");
        claim(&at, "worker", "worker_state_file", "w2", "ns").expect("claim");
        assert_eq!(read_live(&path, "worker", "ns").expect("live").id, "w2");
    }
}
