//! Ready for dependents before the engine's first health check.
//!
//! The engine runs a container's health test for the first time one
//! `interval` after the container starts (engine 20.10 has no
//! `start_interval`), so every `condition: service_healthy` link of a
//! chain costs at least one interval: 5 s per link at the shipped
//! `HEALTHCHECK_INTERVAL`, three links from `redis` to `web`. While a
//! dependent waits, `up` runs the dependency's own health test itself
//! (`docker exec`, the command the engine would run) once per poll; the
//! first exit 0 lets the dependents start. `up` still returns only when the
//! engine reports every container healthy, and a container the engine
//! later finds unhealthy (or that exits) still fails `up`.

use crate::compose::Healthcheck;
use crate::engine::Engine;
use std::time::Duration;

/// Longest one probe may take before it counts as failed (the check's own
/// `timeout` when shorter).
pub const MAX_PROBE: Duration = Duration::from_secs(5);

/// Least time between the end of a failed probe of a container and the
/// start of its next one; a probe that took longer waits as long again, so
/// a costly test (RabbitMQ's runs an Erlang VM) takes at most half a core
/// while the service starts.
pub const MIN_GAP: Duration = Duration::from_millis(250);

/// When the next probe of a container may start, after one that failed
/// having taken `took`.
pub fn next_after_failure(now: tokio::time::Instant, took: Duration) -> tokio::time::Instant {
    now + took.max(MIN_GAP)
}

/// The command the engine runs for health test `test`: the arguments of
/// `CMD`, `/bin/sh -c` with those of `CMD-SHELL`; None for anything else.
pub fn command(test: &[String]) -> Option<Vec<String>> {
    match test.split_first()? {
        (kind, rest) if kind == "CMD" && !rest.is_empty() => Some(rest.to_vec()),
        (kind, rest) if kind == "CMD-SHELL" && !rest.is_empty() => {
            let mut cmd = vec!["/bin/sh".to_owned(), "-c".to_owned()];
            cmd.extend_from_slice(rest);
            Some(cmd)
        }
        _ => None,
    }
}

/// Runs `hc`'s test once in container `id`: true when it exited 0 within
/// the check's timeout (at most [`MAX_PROBE`]). A non-zero exit, a refused
/// exec or a timeout are all false: the engine's own checks decide then.
pub async fn passes<E: Engine>(engine: &E, id: &str, hc: &Healthcheck) -> bool {
    let Some(cmd) = command(&hc.test) else {
        return false;
    };
    let limit = hc.timeout.map_or(MAX_PROBE, |t| t.min(MAX_PROBE));
    matches!(
        tokio::time::timeout(limit, engine.exec(id, &cmd, &[])).await,
        Ok(Ok(out)) if out.exit_code == Some(0)
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn strings(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| (*s).to_owned()).collect()
    }

    #[test]
    fn the_command_is_the_one_the_engine_runs() {
        assert_eq!(
            command(&strings(&["CMD", "/taskstack-worker", "healthcheck"])),
            Some(strings(&["/taskstack-worker", "healthcheck"]))
        );
        assert_eq!(
            command(&strings(&["CMD-SHELL", "pg_isready -q"])),
            Some(strings(&["/bin/sh", "-c", "pg_isready -q"]))
        );
        let now = tokio::time::Instant::now();
        assert_eq!(
            next_after_failure(now, Duration::from_millis(40)),
            now + MIN_GAP
        );
        assert_eq!(
            next_after_failure(now, Duration::from_secs(2)),
            now + Duration::from_secs(2)
        );
        for none in [&["NONE"][..], &["CMD"], &["CMD-SHELL"], &[], &["x", "y"]] {
            assert_eq!(command(&strings(none)), None, "{none:?}");
        }
    }
}
