//! A private RabbitMQ server for tests (the Debian package's
//! `rabbitmq-server`, run directly as the current user): free loopback
//! ports, its own node name, mnesia, log and HOME (Erlang cookie) under a
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

use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU32, Ordering};

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

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free loopback port")
        .port()
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
            port: free_port(),
            node: format!("taskstack{}x{}@localhost", std::process::id(), free_port()),
            epmd_port: free_port(),
            dist_port: free_port(),
            dir,
            child: None,
            owned: true,
        };
        for sub in ["home", "mnesia", "log"] {
            std::fs::create_dir_all(r.dir.join(sub)).expect("server dirs");
        }
        std::fs::write(
            r.dir.join("rabbitmq.conf"),
            format!(
                "listeners.tcp.default = 127.0.0.1:{}\nloopback_users = none\n",
                r.port
            ),
        )
        .expect("rabbitmq.conf");
        std::fs::write(r.dir.join("enabled_plugins"), "[].\n").expect("enabled_plugins");
        r.watchdog();
        r.start_again();
        r
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
            .env("ERL_EPMD_PORT", self.epmd_port.to_string());
    }

    /// Starts the node (again, after [`Rabbit::stop`]: same data) and waits
    /// for it to boot.
    pub fn start_again(&mut self) {
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
        assert!(
            waited.status.success(),
            "RabbitMQ did not boot: {}\n{}",
            String::from_utf8_lossy(&waited.stderr),
            std::fs::read_to_string(self.dir.join("server.out")).unwrap_or_default()
        );
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
            epmd -port "$3" -kill >/dev/null 2>&1
            rm -rf "$2"
        "#;
        // Never waited for: it outlives this process on purpose (init
        // reaps it).
        #[allow(clippy::zombie_processes)]
        Command::new("sh")
            .args(["-c", script, "watchdog"])
            .arg(std::process::id().to_string())
            .arg(&self.dir)
            .arg(self.epmd_port.to_string())
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
        let _ = Command::new("epmd")
            .args(["-port", &self.epmd_port.to_string(), "-kill"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
