//! A Redis Sentinel set of our own per test: a master, a replica and three
//! sentinels (Debian's `redis-sentinel`), each on a free loopback port,
//! with passwords on the data nodes and on the sentinels, killed on drop.

use crate::{free_port, wait_until_sync};
use anyhow::{Context as _, Result, bail};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The data nodes' password (`requirepass` and `masterauth`).
pub const DATA_PASSWORD: &str = "data-pw";
/// The sentinels' own password (`requirepass` on each sentinel).
pub const SENTINEL_PASSWORD: &str = "sentinel-pw";
/// How long the sentinels wait before they call an unanswering master down.
pub const DOWN_AFTER: Duration = Duration::from_millis(1000);

/// One `redis-server` or `redis-sentinel` process.
#[derive(Debug)]
struct Node {
    port: u16,
    child: Option<Child>,
    args: Vec<String>,
    program: &'static str,
}

impl Node {
    fn spawn(program: &'static str, port: u16, args: Vec<String>, log: &Path) -> Result<Self> {
        let mut n = Self {
            port,
            child: None,
            args,
            program,
        };
        n.start(log)?;
        Ok(n)
    }

    fn start(&mut self, log: &Path) -> Result<()> {
        self.start_with(log, &[])
    }

    /// Starts the process with its arguments and `extra` after them.
    fn start_with(&mut self, log: &Path, extra: &[String]) -> Result<()> {
        let out = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)?;
        let child = Command::new(self.program)
            .args(&self.args)
            .args(extra)
            .stdout(Stdio::from(out.try_clone()?))
            .stderr(Stdio::from(out))
            .spawn()
            .with_context(|| {
                format!(
                    "cannot start {}: install it (apt-get install -y redis-server redis-sentinel)",
                    self.program
                )
            })?;
        self.child = Some(child);
        Ok(())
    }

    fn kill(&mut self) -> Result<()> {
        if let Some(mut c) = self.child.take() {
            c.kill()?; // SIGKILL
            c.wait()?;
        }
        Ok(())
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        let _ = self.kill();
    }
}

/// A master, a replica and three sentinels monitoring them.
#[derive(Debug)]
pub struct SentinelSet {
    master_name: String,
    /// The two data nodes; which one is master changes with failovers.
    data: Vec<Node>,
    sentinels: Vec<Node>,
    dir: tempfile::TempDir,
}

impl SentinelSet {
    /// Starts the set and waits until the sentinels could fail over: the
    /// replica is in sync, and every sentinel knows the replica and has a
    /// quorum (`SENTINEL CKQUORUM`).
    pub fn start() -> Result<Self> {
        let dir = tempfile::tempdir()?;
        let master_name = "mymaster".to_owned();
        let mut data = Vec::new();
        let master_port = free_port()?;
        for (i, replica_of) in [None, Some(master_port)].into_iter().enumerate() {
            let port = if i == 0 { master_port } else { free_port()? };
            let node_dir = dir.path().join(format!("data{i}"));
            std::fs::create_dir(&node_dir)?;
            let mut args: Vec<String> = [
                "--port",
                &port.to_string(),
                "--bind",
                "127.0.0.1",
                "--dir",
                &node_dir.display().to_string(),
                "--save",
                "",
                "--appendonly",
                "no",
                // Full syncs start at once (the default waits 5 s for more replicas).
                "--repl-diskless-sync-delay",
                "0",
                "--protected-mode",
                "no",
                "--requirepass",
                DATA_PASSWORD,
                "--masterauth",
                DATA_PASSWORD,
            ]
            .map(str::to_owned)
            .to_vec();
            if let Some(m) = replica_of {
                args.extend(["--replicaof".into(), "127.0.0.1".into(), m.to_string()]);
            }
            let log = dir.path().join(format!("data{i}.log"));
            data.push(Node::spawn("redis-server", port, args, &log)?);
            wait_until_sync(
                "a data node to answer PING",
                Duration::from_secs(10),
                || ping(port, Some(DATA_PASSWORD)),
            )?;
        }
        let replica_port = data[1].port;
        wait_until_sync(
            "the replica to be in sync with the master",
            Duration::from_secs(20),
            || {
                let info = info(replica_port, DATA_PASSWORD, "replication").ok()?;
                info.contains("master_link_status:up").then_some(())
            },
        )?;
        let mut sentinels = Vec::new();
        for i in 0..3 {
            let port = free_port()?;
            let conf = dir.path().join(format!("sentinel{i}.conf"));
            std::fs::write(
                &conf,
                format!(
                    "port {port}\nbind 127.0.0.1\nprotected-mode no\ndir {dir}\n\
                     requirepass {SENTINEL_PASSWORD}\n\
                     sentinel sentinel-pass {SENTINEL_PASSWORD}\n\
                     sentinel monitor {master_name} 127.0.0.1 {master_port} 2\n\
                     sentinel auth-pass {master_name} {DATA_PASSWORD}\n\
                     sentinel down-after-milliseconds {master_name} {down}\n\
                     sentinel failover-timeout {master_name} 10000\n\
                     sentinel parallel-syncs {master_name} 1\n",
                    dir = dir.path().display(),
                    down = DOWN_AFTER.as_millis(),
                ),
            )?;
            let log = dir.path().join(format!("sentinel{i}.log"));
            sentinels.push(Node::spawn(
                "redis-sentinel",
                port,
                vec![conf.display().to_string()],
                &log,
            )?);
        }
        let set = Self {
            master_name,
            data,
            sentinels,
            dir,
        };
        set.wait_ready(Duration::from_secs(30))
            .with_context(|| set.logs())?;
        Ok(set)
    }

    /// Waits until every sentinel sees the master, the replica and a quorum.
    fn wait_ready(&self, deadline: Duration) -> Result<()> {
        for s in &self.sentinels {
            wait_until_sync(
                "a sentinel to know the replica and the other sentinels",
                deadline,
                || {
                    let mut c = sentinel_conn(s.port).ok()?;
                    let replicas: Vec<redis::Value> = redis::cmd("SENTINEL")
                        .arg("REPLICAS")
                        .arg(&self.master_name)
                        .query(&mut c)
                        .ok()?;
                    let ok: String = redis::cmd("SENTINEL")
                        .arg("CKQUORUM")
                        .arg(&self.master_name)
                        .query(&mut c)
                        .ok()?;
                    let sentinels: Vec<redis::Value> = redis::cmd("SENTINEL")
                        .arg("SENTINELS")
                        .arg(&self.master_name)
                        .query(&mut c)
                        .ok()?;
                    (!replicas.is_empty() && ok.starts_with("OK") && sentinels.len() == 2)
                        .then_some(())
                },
            )?;
        }
        Ok(())
    }

    /// `redis+sentinel://:<data password>@127.0.0.1:<p1>,...,<p3>/mymaster/0`.
    pub fn url(&self) -> String {
        let hosts: Vec<String> = self
            .sentinels
            .iter()
            .map(|s| format!("127.0.0.1:{}", s.port))
            .collect();
        format!(
            "redis+sentinel://:{DATA_PASSWORD}@{}/{}/0",
            hosts.join(","),
            self.master_name
        )
    }

    /// The sentinels' ports.
    pub fn sentinel_ports(&self) -> Vec<u16> {
        self.sentinels.iter().map(|s| s.port).collect()
    }

    /// The master's port as the first sentinel that answers names it.
    pub fn master_port(&self) -> Result<u16> {
        let mut last = None;
        for s in &self.sentinels {
            match master_addr(s.port, &self.master_name) {
                Ok(p) => return Ok(p),
                Err(e) => last = Some(e),
            }
        }
        Err(last.unwrap_or_else(|| anyhow::anyhow!("no sentinel")))
    }

    /// A synchronous connection to the current master (for assertions).
    pub fn master_conn(&self) -> Result<redis::Connection> {
        data_conn(self.master_port()?)
    }

    /// A synchronous connection to the data node on `port`.
    pub fn data_conn(&self, port: u16) -> Result<redis::Connection> {
        data_conn(port)
    }

    /// SIGKILLs the current master; returns its port. It stays down until
    /// [`SentinelSet::restart_node`].
    pub fn kill_master(&mut self) -> Result<u16> {
        let port = self.master_port()?;
        let node = self
            .data
            .iter_mut()
            .find(|n| n.port == port)
            .context("the master is none of ours")?;
        node.kill()?;
        Ok(port)
    }

    /// Waits until the sentinels name a master other than `old_port` and
    /// that node answers as master; returns its port and how long that took
    /// from `since`.
    pub fn wait_failover(&self, old_port: u16, since: Instant) -> Result<(u16, Duration)> {
        let port = wait_until_sync(
            "the sentinels to promote the replica",
            Duration::from_secs(60),
            || {
                let p = self.master_port().ok().filter(|p| *p != old_port)?;
                let role: Vec<redis::Value> =
                    redis::cmd("ROLE").query(&mut data_conn(p).ok()?).ok()?;
                matches!(role.first(), Some(redis::Value::BulkString(b)) if b == b"master")
                    .then_some(p)
            },
        )
        .with_context(|| self.logs())?;
        Ok((port, since.elapsed()))
    }

    /// Starts the killed node on `port` again as a replica of `master`
    /// (the new master), as Redis's documentation asks of a node without
    /// persistence: started as it was first, it would come back as an
    /// empty master, and a client that a sentinel not yet aware of the
    /// failover sends there writes into it until the sentinels demote it,
    /// which loses those writes (a Celery client lost 4,429 of 5,000
    /// acknowledged tasks that way in one CI run).
    pub fn restart_node(&mut self, port: u16, master: u16) -> Result<()> {
        let i = self
            .data
            .iter()
            .position(|n| n.port == port)
            .context("no such node")?;
        let log = self.dir.path().join(format!("data{i}.log"));
        let replica_of = ["--replicaof".into(), "127.0.0.1".into(), master.to_string()];
        self.data[i].start_with(&log, &replica_of)?;
        wait_until_sync(
            "the restarted node to answer",
            Duration::from_secs(10),
            || ping(port, Some(DATA_PASSWORD)),
        )?;
        Ok(())
    }

    /// The lines of every node's log that contain one of `needles`, each
    /// after its file's name (a failure's diagnosis: syncs, role changes,
    /// the sentinels' events).
    pub fn log_lines(&self, needles: &[&str]) -> String {
        let mut names: Vec<_> = std::fs::read_dir(self.dir.path())
            .map(|d| d.flatten().map(|e| e.path()).collect())
            .unwrap_or_default();
        names.sort();
        let mut out = String::new();
        for p in names
            .iter()
            .filter(|p| p.extension().is_some_and(|e| e == "log"))
        {
            let text = std::fs::read_to_string(p).unwrap_or_default();
            let name = p.file_name().map(|n| n.to_string_lossy().into_owned());
            for l in text
                .lines()
                .filter(|l| needles.iter().any(|n| l.contains(n)))
            {
                out.push_str(&format!("{}: {l}\n", name.as_deref().unwrap_or("?")));
            }
        }
        out
    }

    /// Every node's log, for a failing test's message.
    pub fn logs(&self) -> String {
        let mut out = String::new();
        let mut names: Vec<_> = std::fs::read_dir(self.dir.path())
            .map(|d| d.flatten().map(|e| e.path()).collect())
            .unwrap_or_default();
        names.sort();
        for p in names
            .iter()
            .filter(|p| p.extension().is_some_and(|e| e == "log"))
        {
            let text = std::fs::read_to_string(p).unwrap_or_default();
            let tail: Vec<&str> = text.lines().rev().take(40).collect();
            out.push_str(&format!("--- {}\n", p.display()));
            for l in tail.into_iter().rev() {
                out.push_str(l);
                out.push('\n');
            }
        }
        out
    }
}

fn data_conn(port: u16) -> Result<redis::Connection> {
    Ok(
        redis::Client::open(format!("redis://:{DATA_PASSWORD}@127.0.0.1:{port}/0"))?
            .get_connection_with_timeout(Duration::from_secs(2))?,
    )
}

fn sentinel_conn(port: u16) -> Result<redis::Connection> {
    Ok(
        redis::Client::open(format!("redis://:{SENTINEL_PASSWORD}@127.0.0.1:{port}/"))?
            .get_connection_with_timeout(Duration::from_secs(2))?,
    )
}

fn master_addr(sentinel_port: u16, name: &str) -> Result<u16> {
    let mut c = sentinel_conn(sentinel_port)?;
    let addr: Option<(String, String)> = redis::cmd("SENTINEL")
        .arg("GET-MASTER-ADDR-BY-NAME")
        .arg(name)
        .query(&mut c)?;
    match addr {
        Some((_, port)) => Ok(port.parse()?),
        None => bail!("sentinel {sentinel_port} knows no master {name:?}"),
    }
}

fn ping(port: u16, password: Option<&str>) -> Option<()> {
    let auth = password.map(|p| format!(":{p}@")).unwrap_or_default();
    let client = redis::Client::open(format!("redis://{auth}127.0.0.1:{port}/")).ok()?;
    let mut c = client
        .get_connection_with_timeout(Duration::from_secs(1))
        .ok()?;
    redis::cmd("PING").query::<String>(&mut c).ok().map(drop)
}

fn info(port: u16, password: &str, section: &str) -> Result<String> {
    let mut c = redis::Client::open(format!("redis://:{password}@127.0.0.1:{port}/"))?
        .get_connection_with_timeout(Duration::from_secs(1))?;
    Ok(redis::cmd("INFO").arg(section).query(&mut c)?)
}
