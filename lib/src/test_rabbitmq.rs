//! A private RabbitMQ server for tests (the Debian package's
//! `rabbitmq-server`, run directly as the current user): free loopback
//! ports outside the kernel's ephemeral range (see `free_port`), its own
//! node name, mnesia, log and HOME (Erlang cookie) under a
//! temporary directory, and its own epmd port (so no shared epmd outlives
//! it). One server per test binary ([`shared`]) with a vhost per test
//! ([`Rabbit::vhost`]), since vhosts are RabbitMQ's namespaces; a test that
//! restarts the broker starts its own ([`Rabbit::start`]).
//!
//! Clean-up: a watchdog shell process polls the test process and, once it
//! is gone, stops the server's process group, stops its epmd and removes
//! the directory (a static's `Drop` never runs); [`Rabbit`]'s `Drop` does
//! the same at once for a private server. A missing package fails the
//! test (under `CI=true` too), never skips it.
//!
//! This file is shared, through `#[path]`, by the library's tests and the
//! integration crate.

#![allow(dead_code)]

use std::collections::BTreeSet;
use std::hash::{BuildHasher as _, RandomState};
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Mutex, OnceLock};

const SERVER: &str = "/usr/lib/rabbitmq/bin/rabbitmq-server";
const CTL: &str = "/usr/lib/rabbitmq/bin/rabbitmqctl";
/// The user every test connects as (RabbitMQ's default user).
pub const USER: &str = "guest";
pub const PASSWORD: &str = "guest";

/// A running private RabbitMQ node.
#[derive(Debug)]
pub struct Rabbit {
    pub port: u16,
    node: String,
    epmd_port: u16,
    dist_port: u16,
    dir: PathBuf,
    child: Option<Child>,
    /// Whether `Drop` stops it (a private server; the shared one is
    /// stopped by its watchdog).
    owned: bool,
}

/// Boots tried before a test gives up, each on ports of its own.
const BOOT_ATTEMPTS: usize = 3;

/// A loopback port free now, outside the kernel's ephemeral range. The node
/// binds its ports seconds after they are chosen, and a port from that range
/// (where `bind(0)` and every outbound connection get theirs) can meanwhile
/// become the local end of any connection another test opens: a boot once
/// failed in CI with `dist_port_already_used`. Ports below the range (or
/// above it) are only taken by an explicit bind, such as another test
/// server's choice here; [`Rabbit::start`] boots again on new ports if one
/// is taken all the same.
fn free_port() -> u16 {
    static GIVEN: Mutex<BTreeSet<u16>> = Mutex::new(BTreeSet::new());
    let (eph_lo, eph_hi) = ephemeral_range();
    let mut given = GIVEN
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let random = RandomState::new();
    for i in 0u32..10_000 {
        let p = u16::try_from(10_000 + random.hash_one(i) % 55_536).unwrap_or(10_000);
        if (eph_lo..=eph_hi).contains(&p) || given.contains(&p) {
            continue;
        }
        if std::net::TcpListener::bind(("127.0.0.1", p)).is_ok() {
            given.insert(p);
            return p;
        }
    }
    // The range covers (nearly) every port: take one from it after all.
    let p = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free loopback port")
        .port();
    given.insert(p);
    p
}

/// Whether a failed boot's report says one of its ports was taken (the
/// distribution port, the AMQP listener or epmd's).
fn port_taken(report: &str) -> bool {
    [
        "already_used",
        "already used",
        "eaddrinuse",
        "address already in use",
    ]
    .iter()
    .any(|m| report.to_ascii_lowercase().contains(m))
}

/// The kernel's ephemeral port range (Linux's default when unreadable).
fn ephemeral_range() -> (u16, u16) {
    std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|s| {
            let mut it = s.split_whitespace().map(str::parse::<u16>);
            Some((it.next()?.ok()?, it.next()?.ok()?))
        })
        .unwrap_or((32_768, 60_999))
}

fn require_package() {
    if !Path::new(SERVER).exists() {
        let ci = std::env::var("CI").is_ok_and(|v| !matches!(v.trim(), "" | "0" | "false"));
        panic!(
            "RabbitMQ is not installed ({SERVER} is missing): run scripts/prereqs \
             (Debian: apt-get install -y rabbitmq-server){}",
            if ci { "; CI must provide it" } else { "" }
        );
    }
}

/// The server every test of this binary shares (started on first use).
pub fn shared() -> &'static Rabbit {
    static ONE: OnceLock<Rabbit> = OnceLock::new();
    ONE.get_or_init(|| {
        let mut r = Rabbit::start();
        r.owned = false;
        r
    })
}

impl Rabbit {
    /// Starts a private node and waits until it has booted.
    pub fn start() -> Self {
        require_package();
        let dir = tempfile::Builder::new()
            .prefix("taskstack-rabbitmq-")
            .tempdir()
            .expect("temp dir")
            .keep();
        let mut r = Self {
            port: 0,
            node: String::new(),
            epmd_port: 0,
            dist_port: 0,
            dir,
            child: None,
            owned: true,
        };
        for sub in ["home", "mnesia", "log"] {
            std::fs::create_dir_all(r.dir.join(sub)).expect("server dirs");
        }
        std::fs::write(r.dir.join("enabled_plugins"), "[].\n").expect("enabled_plugins");
        r.watchdog();
        for attempt in 1..=BOOT_ATTEMPTS {
            r.choose_ports();
            match r.boot() {
                Ok(()) => return r,
                Err(e) if attempt < BOOT_ATTEMPTS && port_taken(&e) => {
                    eprintln!("RabbitMQ boot {attempt} found a port taken; booting on new ports");
                    r.kill();
                    r.stop_epmd();
                }
                Err(e) => panic!("{e}"),
            }
        }
        unreachable!("the last attempt returns or panics")
    }

    /// New ports and node name (unique in this process; the pid tells
    /// processes apart), written where the node and the watchdog read them;
    /// a new name also gives the node a fresh data directory.
    fn choose_ports(&mut self) {
        self.port = free_port();
        static NODES: AtomicU32 = AtomicU32::new(0);
        self.node = format!(
            "taskstack{}x{}@localhost",
            std::process::id(),
            NODES.fetch_add(1, Ordering::Relaxed)
        );
        self.epmd_port = free_port();
        self.dist_port = free_port();
        std::fs::write(
            self.dir.join("rabbitmq.conf"),
            format!(
                "listeners.tcp.default = 127.0.0.1:{}\nloopback_users = none\n",
                self.port
            ),
        )
        .expect("rabbitmq.conf");
        std::fs::write(self.dir.join("epmd_port"), self.epmd_port.to_string()).expect("epmd port");
    }

    /// Stops the epmd this node started (it outlives the node).
    fn stop_epmd(&self) {
        let _ = Command::new("epmd")
            .args(["-port", &self.epmd_port.to_string(), "-kill"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }

    fn env(&self, cmd: &mut Command) {
        let d = &self.dir;
        cmd.env("HOME", d.join("home"))
            .env("RABBITMQ_NODENAME", &self.node)
            .env("RABBITMQ_NODE_IP_ADDRESS", "127.0.0.1")
            .env("RABBITMQ_NODE_PORT", self.port.to_string())
            .env("RABBITMQ_DIST_PORT", self.dist_port.to_string())
            .env("RABBITMQ_MNESIA_BASE", d.join("mnesia"))
            .env("RABBITMQ_LOG_BASE", d.join("log"))
            .env("RABBITMQ_CONFIG_FILE", d.join("rabbitmq.conf"))
            .env("RABBITMQ_ENABLED_PLUGINS_FILE", d.join("enabled_plugins"))
            .env("RABBITMQ_PID_FILE", d.join("pid"))
            // A node that fails to boot writes its crash dump here, not
            // into the test's working directory.
            .env("ERL_CRASH_DUMP", d.join("erl_crash.dump"))
            .env("ERL_EPMD_PORT", self.epmd_port.to_string());
    }

    /// Starts the node (again, after [`Rabbit::stop`]: same data and ports)
    /// and waits for it to boot.
    pub fn start_again(&mut self) {
        if let Err(e) = self.boot() {
            panic!("{e}");
        }
    }

    /// Starts the node and waits for it to boot; what went wrong otherwise.
    fn boot(&mut self) -> Result<(), String> {
        let _ = std::fs::remove_file(self.dir.join("pid"));
        let log = std::fs::File::create(self.dir.join("server.out")).expect("server log");
        let mut cmd = Command::new(SERVER);
        self.env(&mut cmd);
        let child = cmd
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .process_group(0)
            .spawn()
            .expect("start rabbitmq-server");
        std::fs::write(self.dir.join("pgid"), child.id().to_string()).expect("pgid file");
        self.child = Some(child);
        let pid_file = self.dir.join("pid");
        let waited = self
            .ctl_output(&["wait", &pid_file.to_string_lossy(), "--timeout", "120"])
            .expect("rabbitmqctl wait");
        if waited.status.success() {
            return Ok(());
        }
        Err(format!(
            "RabbitMQ did not boot: {}\n{}",
            String::from_utf8_lossy(&waited.stderr),
            std::fs::read_to_string(self.dir.join("server.out")).unwrap_or_default()
        ))
    }

    /// Stops the node (SIGTERM to its process group) and waits for it.
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = Command::new("kill")
                .args(["-TERM", "--", &format!("-{}", c.id())])
                .status();
            let _ = c.wait();
        }
    }

    /// Kills the node at once (SIGKILL to its process group).
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = Command::new("kill")
                .args(["-KILL", "--", &format!("-{}", c.id())])
                .status();
            let _ = c.wait();
        }
    }

    /// Stops everything this server started once the test process is gone.
    fn watchdog(&self) {
        let script = r#"
            while kill -0 "$1" 2>/dev/null; do sleep 1; done
            pg=$(cat "$2/pgid" 2>/dev/null) && env kill -TERM -- "-$pg" 2>/dev/null
            i=0; while [ -n "$pg" ] && env kill -0 -- "-$pg" 2>/dev/null && [ $i -lt 30 ]; do sleep 1; i=$((i+1)); done
            [ -n "$pg" ] && env kill -KILL -- "-$pg" 2>/dev/null
            ep=$(cat "$2/epmd_port" 2>/dev/null) && [ -n "$ep" ] && epmd -port "$ep" -kill >/dev/null 2>&1
            rm -rf "$2"
        "#;
        // Never waited for: it outlives this process on purpose (init
        // reaps it).
        #[allow(clippy::zombie_processes)]
        Command::new("sh")
            .args(["-c", script, "watchdog"])
            .arg(std::process::id().to_string())
            .arg(&self.dir)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .process_group(0)
            .spawn()
            .expect("start the RabbitMQ watchdog");
    }

    fn ctl_output(&self, args: &[&str]) -> std::io::Result<std::process::Output> {
        let mut cmd = Command::new(CTL);
        self.env(&mut cmd);
        cmd.arg("-n")
            .arg(&self.node)
            .args(args)
            .stdin(Stdio::null())
            .output()
    }

    /// Runs `rabbitmqctl` against this node; its standard output.
    pub fn ctl(&self, args: &[&str]) -> String {
        let out = self.ctl_output(args).expect("run rabbitmqctl");
        assert!(
            out.status.success(),
            "rabbitmqctl {args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// A new vhost (`hint` plus a unique suffix) that [`USER`] may use
    /// fully; its `amqp://` URL.
    pub fn vhost(&self, hint: &str) -> String {
        static N: AtomicU32 = AtomicU32::new(0);
        let name = format!(
            "{hint}-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        );
        self.ctl(&["add_vhost", &name]);
        self.ctl(&["set_permissions", "-p", &name, USER, ".*", ".*", ".*"]);
        self.url(&name)
    }

    /// The URL of `vhost` on this node.
    pub fn url(&self, vhost: &str) -> String {
        format!("amqp://{USER}:{PASSWORD}@127.0.0.1:{}/{vhost}", self.port)
    }

    /// `(messages_ready, messages_unacknowledged)` of every queue of
    /// `vhost`, by name.
    pub fn queue_counts(&self, vhost: &str) -> Vec<(String, u64, u64)> {
        self.list_queues(
            vhost,
            &["name", "messages_ready", "messages_unacknowledged"],
        )
        .into_iter()
        .filter_map(|row| {
            let [name, ready, unacked] = <[String; 3]>::try_from(row).ok()?;
            Some((name, ready.parse().ok()?, unacked.parse().ok()?))
        })
        .collect()
    }

    /// The `columns` of `rabbitmqctl list_queues` for every queue of
    /// `vhost`, one row per queue.
    pub fn list_queues(&self, vhost: &str, columns: &[&str]) -> Vec<Vec<String>> {
        let mut args = vec!["list_queues", "-p", vhost, "--quiet", "--no-table-headers"];
        args.extend_from_slice(columns);
        self.ctl(&args)
            .lines()
            .map(|l| l.split_whitespace().map(str::to_owned).collect())
            .collect()
    }
}

/// The vhost of an `amqp://` URL made by [`Rabbit::vhost`].
pub fn vhost_of(url: &str) -> &str {
    url.rsplit('/').next().unwrap_or_default()
}

impl Drop for Rabbit {
    fn drop(&mut self) {
        if !self.owned {
            return;
        }
        self.stop();
        self.stop_epmd();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

#[cfg(test)]
mod port_tests {
    use super::*;

    #[test]
    fn ports_are_chosen_outside_the_ephemeral_range_and_never_twice() {
        let (lo, hi) = ephemeral_range();
        let ports: Vec<u16> = (0..64).map(|_| free_port()).collect();
        let distinct: BTreeSet<u16> = ports.iter().copied().collect();
        assert_eq!(distinct.len(), ports.len(), "{ports:?}");
        if lo > 11_000 || hi < 65_000 {
            assert!(
                ports.iter().all(|p| !(lo..=hi).contains(p)),
                "{ports:?} against {lo}-{hi}"
            );
        }
    }

    #[test]
    fn a_boot_that_lost_a_port_is_told_from_other_failures() {
        // As a node reported it in CI.
        assert!(port_taken(
            "{dist_port_already_used,41713,not_erlang,\"localhost\"}"
        ));
        assert!(port_taken(
            "ERROR: could not bind to distribution port 41713: already used"
        ));
        assert!(port_taken("{listen_error,eaddrinuse}"));
        assert!(!port_taken("Error: operation wait timed out"));
        assert!(!port_taken("{error,{cannot_read_enabled_plugins_file}}"));
    }
}
