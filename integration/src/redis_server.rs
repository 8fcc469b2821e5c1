//! A `redis-server` of our own per test.

use crate::{free_port, wait_until_sync};
use anyhow::{Context as _, Result};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

/// A `redis-server` of our own on a free loopback port and a Unix socket in
/// its own directory, killed on drop.
#[derive(Debug)]
pub struct RedisServer {
    port: u16,
    dir: tempfile::TempDir,
    aof: bool,
    child: Option<Child>,
}

impl RedisServer {
    /// Starts a throwaway server (no persistence).
    pub fn start() -> Result<Self> {
        Self::start_with(false)
    }

    /// Starts a server with AOF persistence (`appendfsync always`).
    pub fn start_persistent() -> Result<Self> {
        Self::start_with(true)
    }

    fn start_with(aof: bool) -> Result<Self> {
        let mut s = Self {
            port: free_port()?,
            dir: tempfile::tempdir()?,
            aof,
            child: None,
        };
        // A port found free can be taken by another test before
        // redis-server binds it; then the next free port is tried.
        for _ in 0..2 {
            match s.spawn() {
                Err(e) if e.is::<PortTaken>() => s.port = free_port()?,
                other => return other.map(|()| s),
            }
        }
        s.spawn()?;
        Ok(s)
    }

    fn spawn(&mut self) -> Result<()> {
        let log = self.dir.path().join("redis.log");
        let mut cmd = Command::new("redis-server");
        cmd.arg("--port")
            .arg(self.port.to_string())
            .arg("--bind")
            .arg("127.0.0.1")
            .arg("--dir")
            .arg(self.dir.path())
            .arg("--logfile")
            .arg(&log)
            .arg("--save")
            .arg("")
            .arg("--protected-mode")
            .arg("no")
            .arg("--unixsocket")
            .arg(self.socket_path())
            .arg("--unixsocketperm")
            .arg("700");
        if self.aof {
            cmd.args(["--appendonly", "yes", "--appendfsync", "always"]);
        } else {
            cmd.args(["--appendonly", "no"]);
        }
        let mut child = cmd
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("cannot start redis-server: install it (apt-get install -y redis-server)")?;
        let (port, pid) = (self.port, child.id());
        // Some(true): ours answers; Some(false): it exited, or another
        // process's server answers on the port.
        let ours = wait_until_sync(
            "redis-server to answer PING",
            Duration::from_secs(30),
            || {
                if !matches!(child.try_wait(), Ok(None)) {
                    return Some(false);
                }
                let client = redis::Client::open(format!("redis://127.0.0.1:{port}/")).ok()?;
                let mut c = client.get_connection().ok()?;
                let info: String = redis::cmd("INFO").arg("server").query(&mut c).ok()?;
                Some(info.lines().any(|l| l == format!("process_id:{pid}")))
            },
        );
        let log_text = || std::fs::read_to_string(&log).unwrap_or_default();
        match ours {
            Ok(true) => {
                self.child = Some(child);
                Ok(())
            }
            Ok(false) => {
                let _ = child.kill();
                let status = child.wait()?;
                Err(anyhow::Error::new(PortTaken(port)).context(format!(
                    "redis-server ({status}) did not serve port {port}; its log:\n{}",
                    log_text()
                )))
            }
            Err(e) => {
                let _ = child.kill();
                let _ = child.wait();
                Err(e.context(format!("redis-server's log:\n{}", log_text())))
            }
        }
    }

    /// `redis://127.0.0.1:<port>/0`.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/0", self.port)
    }

    /// The server's Unix socket (in its own temporary directory).
    pub fn socket_path(&self) -> std::path::PathBuf {
        self.dir.path().join("redis.sock")
    }

    /// `unix://<socket>?db=0`: the same server and database as [`Self::url`],
    /// through the socket.
    pub fn socket_url(&self) -> String {
        format!("unix://{}?db=0", self.socket_path().display())
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// A synchronous connection for assertions.
    pub fn conn(&self) -> Result<redis::Connection> {
        Ok(redis::Client::open(self.url())?.get_connection()?)
    }

    /// Kills the server (it stays down until [`RedisServer::restart`]).
    pub fn stop(&mut self) -> Result<()> {
        if let Some(mut child) = self.child.take() {
            child.kill()?;
            child.wait()?;
        }
        Ok(())
    }

    /// Stops the server the way an operator would (`SHUTDOWN`, which writes
    /// the AOF) and starts it again on the same port and data directory.
    pub fn restart(&mut self) -> Result<()> {
        if let Ok(mut c) = self.conn() {
            let _: redis::RedisResult<()> = redis::cmd("SHUTDOWN").query(&mut c);
        }
        if let Some(mut child) = self.child.take() {
            child.wait()?;
        }
        self.spawn()
    }
}

/// The port was served by another process, or redis-server could not bind it.
#[derive(Debug)]
struct PortTaken(u16);

impl std::fmt::Display for PortTaken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "port {} is taken", self.0)
    }
}

impl std::error::Error for PortTaken {}

impl Drop for RedisServer {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}
