//! The files under `deploy/` other than supervisor's (that one runs under a
//! real supervisord in `tests/supervisor.rs`): the systemd units pass
//! `systemd-analyze verify` without a single warning and keep their
//! `systemd-analyze security` exposure at "OK"; the sysusers file makes the
//! user; the Redis settings, with the ACL file `deploy/init-secrets` writes,
//! give a real `redis-server` persistence, no eviction and a password that
//! can be rotated with two passwords valid during the switch; the drain
//! deadline fits inside every stop timeout.

use anyhow::{Context as _, Result, bail, ensure};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::Duration;
use taskstack_integration::{Prereq, bin, free_port, require, wait_until_sync};

/// `deploy/` of this workspace.
fn deploy() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy")
}

/// The three taskstack units as installed, and the instance name of each
/// that `verify` and `security` look at.
const UNITS: [(&str, &str); 3] = [
    ("taskstack-web.service", "taskstack-web.service"),
    ("taskstack-beat.service", "taskstack-beat.service"),
    ("taskstack-worker@.service", "taskstack-worker@1.service"),
];

/// Highest accepted `systemd-analyze security` exposure, in its tenths
/// (`--threshold` counts 0-100): 1.5, "OK". Measured 1.1 for each unit on
/// Debian 12's systemd 252; a unit that loses a hardening setting fails.
const MAX_EXPOSURE_TENTHS: u32 = 15;

/// `systemd-analyze` (and `systemd-sysusers`), which `scripts/prereqs`
/// installs (Debian's `systemd` package; systemd need not run).
fn require_systemd_tools() {
    for name in ["systemd-analyze", "systemd-sysusers"] {
        require(Prereq::Program {
            name,
            package: "systemd",
        });
    }
}

fn run(cmd: &mut Command) -> Result<Output> {
    cmd.stdin(Stdio::null())
        .output()
        .with_context(|| format!("cannot run {cmd:?}"))
}

fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// A directory tree `systemd-analyze --root` treats as a whole system.
///
/// `verify` checks that every `ExecStart=` binary exists and is executable,
/// but the units name their install paths (`/usr/local/bin/taskstack-*`,
/// Debian's `/usr/bin/redis-server`), which a CI machine does not have.
/// Rewriting `ExecStart=` in a copy would verify a different text than the
/// one shipped; instead the units are copied byte for byte into a temporary
/// root's `etc/systemd/system`, with the workspace's built binaries
/// hard-linked at the install paths and the host's own unit tree beside
/// them (so `sysinit.target` and friends, and Debian's `redis-server.service`
/// that the drop-in extends, resolve as on a real host).
struct SystemRoot {
    dir: tempfile::TempDir,
}

impl SystemRoot {
    fn new() -> Result<Self> {
        // In the target directory, beside the binaries: hard links need the
        // same file system.
        let web = bin("taskstack-web")?;
        let target = web
            .parent()
            .and_then(Path::parent)
            .context("no target directory")?;
        let dir = tempfile::Builder::new()
            .prefix("systemd-root-")
            .tempdir_in(target)?;
        let root = dir.path();

        let host_units = std::fs::canonicalize("/lib/systemd/system")
            .context("the host has no /lib/systemd/system (Debian's systemd package)")?;
        let copy_to = root.join(host_units.strip_prefix("/")?);
        std::fs::create_dir_all(copy_to.parent().context("unit dir parent")?)?;
        let out = run(Command::new("cp").arg("-a").arg(&host_units).arg(&copy_to))?;
        ensure!(
            out.status.success(),
            "cp -a of the host's units: {}",
            text(&out)
        );

        let units = root.join("etc/systemd/system");
        std::fs::create_dir_all(units.join("redis-server.service.d"))?;
        for (file, _) in UNITS {
            std::fs::copy(deploy().join("systemd").join(file), units.join(file))?;
        }
        std::fs::copy(
            deploy().join("systemd/redis-server.service.d/taskstack.conf"),
            units.join("redis-server.service.d/taskstack.conf"),
        )?;

        let local_bin = root.join("usr/local/bin");
        std::fs::create_dir_all(&local_bin)?;
        for name in ["taskstack-web", "taskstack-worker", "taskstack-beat"] {
            let built = bin(name)?;
            let placed = local_bin.join(name);
            if std::fs::hard_link(&built, &placed).is_err() {
                std::fs::copy(&built, &placed)?;
            }
        }
        if let Ok(redis) = std::fs::canonicalize("/usr/bin/redis-server") {
            std::fs::create_dir_all(root.join("usr/bin"))?;
            std::fs::copy(redis, root.join("usr/bin/redis-server"))?;
        }
        Ok(Self { dir })
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }

    /// `systemd-analyze <args> --root=<root> <unit>`.
    fn analyze(&self, args: &[&str], unit: &str) -> Result<Output> {
        run(Command::new("systemd-analyze")
            .args(args)
            .arg(format!("--root={}", self.path().display()))
            .arg(unit))
    }

    /// Whether Debian's `redis-server.service` (which the drop-in extends)
    /// and its binary are in the root.
    fn has_redis_unit(&self) -> bool {
        self.path()
            .join("usr/lib/systemd/system/redis-server.service")
            .exists()
            && self.path().join("usr/bin/redis-server").exists()
    }
}

#[test]
fn systemd_units_pass_verify_without_a_warning() -> Result<()> {
    require_systemd_tools();
    let root = SystemRoot::new()?;
    let mut units: Vec<&str> = UNITS.iter().map(|(_, instance)| *instance).collect();
    // A second worker instance: the instance name feeds paths and the port.
    units.push("taskstack-worker@4.service");
    // The drop-in extends Debian's redis-server.service.
    for path in [
        "/lib/systemd/system/redis-server.service",
        "/usr/bin/redis-server",
    ] {
        require(Prereq::File {
            path,
            package: "redis-server",
        });
    }
    ensure!(
        root.has_redis_unit(),
        "redis-server.service was not copied into the root"
    );
    units.push("redis-server.service");
    for unit in units {
        let out = root.analyze(&["verify"], unit)?;
        // verify exits 0 on an unknown key or a bad value (it only warns),
        // so any output at all fails.
        ensure!(
            out.status.success() && text(&out).trim().is_empty(),
            "systemd-analyze verify {unit}: {}\n{}",
            out.status,
            text(&out)
        );
        eprintln!("systemd-analyze verify {unit}: clean");
    }

    // The check above can fail: a misspelt key in a copy is reported.
    let units_dir = root.path().join("etc/systemd/system");
    let web = std::fs::read_to_string(units_dir.join("taskstack-web.service"))?;
    let typo = web.replacen("NoNewPrivileges=", "NoNewPrivilegez=", 1);
    ensure!(typo != web, "taskstack-web.service has no NoNewPrivileges=");
    std::fs::write(units_dir.join("taskstack-typo.service"), typo)?;
    let out = root.analyze(&["verify"], "taskstack-typo.service")?;
    ensure!(
        text(&out).contains("NoNewPrivilegez"),
        "a misspelt key went unreported: {}",
        text(&out)
    );
    Ok(())
}

#[test]
fn systemd_units_are_hardened() -> Result<()> {
    require_systemd_tools();
    let root = SystemRoot::new()?;
    let threshold = format!("--threshold={MAX_EXPOSURE_TENTHS}");
    for (_, unit) in UNITS {
        let out = root.analyze(&["security", "--offline=yes", &threshold], unit)?;
        let report = text(&out);
        let overall = report
            .lines()
            .find(|l| l.contains("Overall exposure level"))
            .with_context(|| format!("no overall exposure for {unit}:\n{report}"))?;
        eprintln!("{}", overall.trim());
        ensure!(
            out.status.success(),
            "{unit} is exposed above {MAX_EXPOSURE_TENTHS}/100:\n{report}"
        );
    }
    Ok(())
}

/// `postgresql-results.conf` (results in PostgreSQL on the host),
/// installed for the three units as its header says: they still pass
/// `verify` without a warning and keep their exposure, and the drop-in is
/// really read (a misspelt key in that directory is reported).
#[test]
fn the_postgresql_drop_in_orders_the_units_after_postgresql() -> Result<()> {
    require_systemd_tools();
    for path in [
        "/lib/systemd/system/postgresql.service",
        "/lib/systemd/system/postgresql@.service",
    ] {
        require(Prereq::File {
            path,
            package: "postgresql",
        });
    }
    let dropin = std::fs::read_to_string(deploy().join("systemd/postgresql-results.conf"))?;
    for line in ["Wants=postgresql.service", "After=postgresql.service"] {
        ensure!(
            dropin.lines().any(|l| l == line),
            "no `{line}` in the drop-in"
        );
    }
    let root = SystemRoot::new()?;
    let units_dir = root.path().join("etc/systemd/system");
    let threshold = format!("--threshold={MAX_EXPOSURE_TENTHS}");
    for (file, unit) in UNITS {
        let dir = units_dir.join(format!("{file}.d"));
        std::fs::create_dir_all(&dir)?;
        std::fs::write(dir.join("postgresql.conf"), &dropin)?;
        let out = root.analyze(&["verify"], unit)?;
        ensure!(
            out.status.success() && text(&out).trim().is_empty(),
            "systemd-analyze verify {unit} with the drop-in: {}\n{}",
            out.status,
            text(&out)
        );
        let out = root.analyze(&["security", "--offline=yes", &threshold], unit)?;
        ensure!(
            out.status.success(),
            "{unit} with the drop-in is exposed above {MAX_EXPOSURE_TENTHS}/100:\n{}",
            text(&out)
        );
        eprintln!("systemd-analyze verify {unit} with postgresql-results.conf: clean");
    }
    std::fs::write(
        units_dir.join("taskstack-web.service.d/typo.conf"),
        "[Unit]\nAftr=postgresql.service\n",
    )?;
    let out = root.analyze(&["verify"], "taskstack-web.service")?;
    ensure!(
        text(&out).contains("Aftr"),
        "a misspelt key in the drop-in directory went unreported: {}",
        text(&out)
    );
    Ok(())
}

#[test]
fn sysusers_file_makes_a_user_without_login() -> Result<()> {
    require_systemd_tools();
    let root = tempfile::tempdir()?;
    std::fs::create_dir_all(root.path().join("etc"))?;
    let out = run(Command::new("systemd-sysusers")
        .arg(format!("--root={}", root.path().display()))
        .arg(deploy().join("systemd/taskstack.sysusers")))?;
    ensure!(out.status.success(), "systemd-sysusers: {}", text(&out));
    let passwd = std::fs::read_to_string(root.path().join("etc/passwd"))?;
    let line = passwd
        .lines()
        .find(|l| l.starts_with("taskstack:"))
        .with_context(|| format!("no taskstack user in:\n{passwd}"))?;
    ensure!(line.ends_with(":/usr/sbin/nologin"), "{line}");
    let uid: u32 = line.split(':').nth(2).context("uid")?.parse()?;
    ensure!(uid != 0 && uid < 1000, "not a system user: {line}");
    Ok(())
}

/// `key=<n>s` (or `key = "<n>s"`) in `text`, in seconds.
fn seconds(text: &str, key: &str) -> Result<Vec<u64>> {
    let mut found = Vec::new();
    for line in text.lines() {
        let Some((k, v)) = line.split_once('=') else {
            continue;
        };
        if k.trim() != key {
            continue;
        }
        let v = v.trim().trim_matches('"');
        let n = v.strip_suffix('s').unwrap_or(v);
        found.push(
            n.parse()
                .with_context(|| format!("{key}={v}: not whole seconds"))?,
        );
    }
    Ok(found)
}

#[test]
fn every_stop_timeout_outlasts_the_drain() -> Result<()> {
    let toml = std::fs::read_to_string(deploy().join("etc/taskstack.toml"))?;
    let drain = *seconds(&toml, "drain_timeout")?
        .first()
        .context("drain_timeout in deploy/etc/taskstack.toml")?;
    let worker = std::fs::read_to_string(deploy().join("systemd/taskstack-worker@.service"))?;
    let supervisor = std::fs::read_to_string(deploy().join("supervisor/supervisord.conf"))?;
    let mut stops = seconds(&worker, "TimeoutStopSec")?;
    ensure!(
        !stops.is_empty(),
        "no TimeoutStopSec in taskstack-worker@.service"
    );
    let waits = seconds(&supervisor, "stopwaitsecs")?;
    ensure!(
        waits.len() == 3,
        "stopwaitsecs of 3 programs expected, found {waits:?}"
    );
    // supervisord.conf's last program is the worker.
    stops.push(*waits.last().context("stopwaitsecs")?);
    for stop in stops {
        ensure!(
            stop >= drain + 10,
            "a stop timeout of {stop}s leaves no margin over drain_timeout {drain}s"
        );
    }
    Ok(())
}

/// A `redis-server` configured like production: Debian's defaults replaced
/// by `deploy/redis/taskstack.conf` (included byte for byte, as the
/// drop-in does), then only the port, data directory and ACL file moved
/// into the test's directory.
struct DeployedRedis {
    child: Child,
    port: u16,
}

impl DeployedRedis {
    fn start(dir: &Path, acl: &Path) -> Result<Self> {
        let port = free_port()?;
        let child = Command::new("redis-server")
            .arg("--include")
            .arg(deploy().join("redis/taskstack.conf"))
            .args(["--port", &port.to_string(), "--save", ""])
            .arg("--dir")
            .arg(dir)
            .arg("--aclfile")
            .arg(acl)
            .stdout(std::fs::File::create(dir.join("redis.log"))?)
            .stderr(Stdio::null())
            .spawn()
            .context("cannot start redis-server (apt-get install redis-server)")?;
        let mut redis = Self { child, port };
        let url = redis.url(None);
        let up = wait_until_sync("redis-server to answer", Duration::from_secs(10), || {
            let mut c = redis::Client::open(url.as_str())
                .ok()?
                .get_connection()
                .ok()?;
            // NOAUTH is an answer: the server is up and wants the password.
            match redis::cmd("PING").query::<String>(&mut c) {
                Ok(_) => Some(()),
                Err(e) => (e.code() == Some("NOAUTH")).then_some(()),
            }
        });
        if let Err(e) = up {
            let log = std::fs::read_to_string(dir.join("redis.log")).unwrap_or_default();
            return Err(e.context(log));
        }
        if let Ok(Some(status)) = redis.child.try_wait() {
            bail!("redis-server exited: {status}");
        }
        Ok(redis)
    }

    fn url(&self, password: Option<&str>) -> String {
        match password {
            Some(p) => format!("redis://:{p}@127.0.0.1:{}/0", self.port),
            None => format!("redis://127.0.0.1:{}/0", self.port),
        }
    }

    fn conn(&self, password: &str) -> redis::RedisResult<redis::Connection> {
        redis::Client::open(self.url(Some(password)))?.get_connection()
    }
}

impl Drop for DeployedRedis {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn config(c: &mut redis::Connection, key: &str) -> Result<String> {
    let v: Vec<String> = redis::cmd("CONFIG").arg("GET").arg(key).query(c)?;
    v.get(1)
        .cloned()
        .with_context(|| format!("CONFIG GET {key}"))
}

#[test]
fn redis_settings_persist_refuse_eviction_and_rotate_the_password() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let etc = dir.path().join("etc-taskstack");
    let redis_etc = dir.path().join("etc-redis");
    let out = run(Command::new(deploy().join("init-secrets"))
        .env("TASKSTACK_ETC", &etc)
        .env("REDIS_ETC", &redis_etc))?;
    ensure!(out.status.success(), "deploy/init-secrets: {}", text(&out));
    let password = std::fs::read_to_string(etc.join("credentials/redis_password"))?;
    let password = password.trim_end();
    let tokens = std::fs::read_to_string(etc.join("credentials/api_tokens"))?;
    ensure!(
        tokens.trim().len() >= 16,
        "API token too short for taskstack-web"
    );
    {
        use std::os::unix::fs::PermissionsExt as _;
        for f in ["credentials/redis_password", "credentials/api_tokens"] {
            let mode = std::fs::metadata(etc.join(f))?.permissions().mode() & 0o777;
            ensure!(mode == 0o600, "{f} has mode {mode:o}, not 0600");
        }
    }
    let acl = redis_etc.join("taskstack-users.acl");
    let redis = DeployedRedis::start(dir.path(), &acl)?;

    // No password, no service.
    let mut anon = redis::Client::open(redis.url(None))?.get_connection()?;
    let err = redis::cmd("PING")
        .query::<String>(&mut anon)
        .expect_err("PING without a password");
    ensure!(err.code() == Some("NOAUTH"), "{err}");

    let mut c = redis.conn(password)?;
    ensure!(config(&mut c, "appendonly")? == "yes");
    ensure!(config(&mut c, "appendfsync")? == "everysec");
    ensure!(config(&mut c, "maxmemory-policy")? == "noeviction");
    ensure!(config(&mut c, "bind")? == "127.0.0.1 -::1");

    // Rotation as docs/operations.md describes it: add the new password,
    // save; both work while the services move over; drop the old, save.
    let new = "rotated-password-0123456789abcdef";
    let _: () = redis::cmd("ACL")
        .arg("SETUSER")
        .arg("default")
        .arg(format!(">{new}"))
        .query(&mut c)?;
    let _: () = redis::cmd("ACL").arg("SAVE").query(&mut c)?;
    redis
        .conn(password)
        .context("the old password during the switch")?;
    let mut c2 = redis
        .conn(new)
        .context("the new password during the switch")?;
    let saved = std::fs::read_to_string(&acl)?;
    ensure!(
        saved.matches('#').count() == 2,
        "two password hashes saved: {saved}"
    );
    let _: () = redis::cmd("ACL")
        .arg("SETUSER")
        .arg("default")
        .arg(format!("<{password}"))
        .query(&mut c2)?;
    let _: () = redis::cmd("ACL").arg("SAVE").query(&mut c2)?;
    let old = redis.conn(password);
    ensure!(
        old.is_err(),
        "the old password still works after the switch"
    );
    redis
        .conn(new)
        .context("the new password after the switch")?;
    Ok(())
}
