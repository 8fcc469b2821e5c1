//! The state file a service writes once ready, naming the process that runs
//! here, so an exec-form `healthcheck` (no shell, no port) can find it.

use serde::{Deserialize, Serialize};
use std::path::Path;

/// Who runs here.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct State {
    /// The instance id (also its key suffix in Redis).
    pub id: String,
    pub pid: u32,
    /// The Redis namespace it uses.
    pub namespace: String,
}

/// Records this process as `id` (atomically: temp file + rename).
pub fn write(path: &Path, id: &str, namespace: &str) -> std::io::Result<()> {
    let state = State {
        id: id.to_owned(),
        pid: std::process::id(),
        namespace: namespace.to_owned(),
    };
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, serde_json::to_vec(&state)?)?;
    std::fs::rename(tmp, path)
}

/// Reads the state file of `what` ("worker", "beat") and checks that the
/// process it names is alive and uses `namespace`; Err says what is wrong.
pub fn read_live(path: &Path, what: &str, namespace: &str) -> Result<State, String> {
    let raw = std::fs::read(path).map_err(|e| {
        format!("no {what} state at {path:?} ({e}): the {what} is not running or not ready")
    })?;
    let state: State = serde_json::from_slice(&raw)
        .map_err(|e| format!("{what} state file {path:?} is unreadable: {e}"))?;
    if !process_alive(state.pid) {
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
}
