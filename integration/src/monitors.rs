//! Celery's monitors, run for real against a test's broker: Flower (its
//! HTTP API) and `celery events --dump` (its output), both started from the
//! Python test directory with `interop_tasks`'s settings.

use crate::python::Venv;
use anyhow::{Context as _, Result};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

/// A child process killed (and reaped) on drop.
#[derive(Debug)]
pub struct Killed(pub Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Flower and `celery events --dump`, stopped on drop.
#[derive(Debug)]
pub struct Monitors {
    /// `127.0.0.1:<port>` Flower serves on.
    pub addr: String,
    dump_log: PathBuf,
    flower_log: PathBuf,
    _dump: Killed,
    _flower: Killed,
    _dir: tempfile::TempDir,
}

impl Monitors {
    /// The interpreter of the venv with Celery, its Redis support and
    /// Flower (py-amqp, for RabbitMQ, comes with Celery).
    pub fn python() -> Result<PathBuf> {
        Ok(Venv::ensure(
            "flower-venv",
            "celery[redis]==5.* flower",
            "import celery, redis, flower",
            "TASKSTACK_FLOWER_PYTHON",
        )?
        .python)
    }

    /// Starts both with commands made by `python` (the interpreter with
    /// the broker's settings, e.g. `python::interop_cmd`) and waits until
    /// Flower serves.
    pub fn start(python: impl Fn() -> Command) -> Result<Self> {
        let dir = tempfile::tempdir()?;
        let dump_log = dir.path().join("dump.log");
        let dump = Killed(
            python()
                .args(["-m", "celery", "-A", "interop_tasks", "events", "--dump"])
                .stdout(std::fs::File::create(&dump_log)?)
                .stderr(Stdio::null())
                .spawn()?,
        );
        let port = crate::free_port()?;
        let flower_log = dir.path().join("flower.log");
        let flower = Killed(
            python()
                .args(["-m", "celery", "-A", "interop_tasks", "flower"])
                .arg(format!("--port={port}"))
                .arg("--address=127.0.0.1")
                .env("FLOWER_UNAUTHENTICATED_API", "true")
                .stdout(Stdio::null())
                .stderr(std::fs::File::create(&flower_log)?)
                .spawn()?,
        );
        let m = Self {
            addr: format!("127.0.0.1:{port}"),
            dump_log,
            flower_log,
            _dump: dump,
            _flower: flower,
            _dir: dir,
        };
        crate::wait_until_sync("Flower to serve", Duration::from_secs(60), || {
            let (status, _) = crate::http::get_blocking(&m.addr, "/healthcheck").ok()?;
            (status == 200).then_some(())
        })
        .with_context(|| m.flower_log())?;
        Ok(m)
    }

    /// What `celery events --dump` printed so far.
    pub fn dump(&self) -> String {
        std::fs::read_to_string(&self.dump_log).unwrap_or_default()
    }

    /// Flower's log so far.
    pub fn flower_log(&self) -> String {
        std::fs::read_to_string(&self.flower_log).unwrap_or_default()
    }

    /// `GET path` from Flower's API as JSON, when it answers 200.
    pub fn api(&self, path: &str) -> Option<serde_json::Value> {
        let (status, body) = crate::http::get_blocking(&self.addr, path).ok()?;
        serde_json::from_str(&body).ok().filter(|_| status == 200)
    }
}
