//! A throwaway PostgreSQL server for tests: `initdb` into a temporary
//! directory and `postgres` on a free loopback port, password login
//! (scram-sha-256) for the superuser [`USER`]; stopped (SIGQUIT) and its
//! directory removed on drop. Each test makes its own database
//! ([`PgServer::create_database`]). [`PgServer::start_tls`] starts one with
//! `ssl=on` and a server certificate for `localhost` / `127.0.0.1` signed
//! by a CA of its own, made with `openssl`. The server runs with
//! `fsync=off` (tests need no durability);
//! [`PgServer::start_durable`] starts one with `fsync=on`, as in production
//! (for the benchmarks). PostgreSQL refuses to run as root, so
//! when the tests run as root the server runs as the `postgres` user that
//! Debian's package creates. `scripts/prereqs` installs the package; a
//! missing server fails the test, never skips it.
//!
//! This file is shared, through `#[path]`, by the library's tests and the
//! integration crate.

#![allow(dead_code)]

use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The superuser the server is initialised with.
pub const USER: &str = "taskstack";
/// Its password.
pub const PASSWORD: &str = "pg-test-password";

/// A running (or stopped, between [`PgServer::stop`] and
/// [`PgServer::start_again`]) private server.
#[derive(Debug)]
pub struct PgServer {
    pub port: u16,
    bin: PathBuf,
    data: PathBuf,
    /// `(uid, gid)` to run as when we are root.
    run_as: Option<(u32, u32)>,
    child: Option<Child>,
    /// With TLS: the CA certificate the server's certificate is signed by.
    ca_cert: Option<PathBuf>,
    /// `fsync=on` (a durable server, as in production) instead of the
    /// tests' `fsync=off`.
    fsync: bool,
    dir: tempfile::TempDir,
}

/// The newest `/usr/lib/postgresql/<version>/bin` with `initdb`.
fn bin_dir() -> PathBuf {
    let mut found: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let v = e.file_name().to_str()?.parse::<u32>().ok()?;
            let bin = e.path().join("bin");
            bin.join("initdb").exists().then_some((v, bin))
        })
        .collect();
    found.sort();
    match found.pop() {
        Some((_, bin)) => bin,
        None => panic!(
            "PostgreSQL is not installed (no /usr/lib/postgresql/*/bin/initdb): run \
             scripts/prereqs (Debian: apt-get install -y postgresql){}",
            if std::env::var("CI").is_ok_and(|v| !matches!(v.trim(), "" | "0" | "false")) {
                "; CI must provide it"
            } else {
                ""
            }
        ),
    }
}

fn ids_of(user: &str) -> Option<(u32, u32)> {
    let id = |flag: &str| -> Option<u32> {
        let out = Command::new("id").args([flag, user]).output().ok()?;
        String::from_utf8(out.stdout).ok()?.trim().parse().ok()
    };
    Some((id("-u")?, id("-g")?))
}

fn running_as_root() -> bool {
    use std::os::unix::fs::MetadataExt as _;
    std::fs::metadata("/proc/self").is_ok_and(|m| m.uid() == 0)
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("free port")
        .port()
}

/// Runs `openssl` with `args` in `dir`; panics with its stderr on failure.
fn openssl(dir: &Path, args: &[&str]) {
    let out = Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .stdin(Stdio::null())
        .output()
        .expect("run openssl (Debian: apt-get install -y openssl)");
    assert!(
        out.status.success(),
        "openssl {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A new self-signed CA in `dir` (`<name>.crt`, `<name>.key`, P-256); the
/// certificate's path.
pub fn make_ca(dir: &Path, name: &str) -> PathBuf {
    let (crt, key) = (format!("{name}.crt"), format!("{name}.key"));
    openssl(
        dir,
        &[
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-keyout",
            &key,
            "-out",
            &crt,
            "-days",
            "2",
            "-subj",
            &format!("/CN=taskstack test {name}"),
            "-addext",
            "basicConstraints=critical,CA:TRUE",
            "-addext",
            "keyUsage=critical,keyCertSign,cRLSign",
        ],
    );
    dir.join(crt)
}

/// A CA (`ca.crt`) and a server certificate it signed (`server.crt`,
/// `server.key`) for `localhost` and `127.0.0.1`, in `dir`.
fn make_server_cert(dir: &Path) {
    make_ca(dir, "ca");
    std::fs::write(
        dir.join("server.ext"),
        "subjectAltName=DNS:localhost,IP:127.0.0.1\nbasicConstraints=CA:FALSE\n\
         keyUsage=critical,digitalSignature\nextendedKeyUsage=serverAuth\n",
    )
    .expect("extensions file");
    openssl(
        dir,
        &[
            "req",
            "-new",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-keyout",
            "server.key",
            "-out",
            "server.csr",
            "-subj",
            "/CN=localhost",
        ],
    );
    openssl(
        dir,
        &[
            "x509",
            "-req",
            "-in",
            "server.csr",
            "-CA",
            "ca.crt",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-out",
            "server.crt",
            "-days",
            "2",
            "-extfile",
            "server.ext",
        ],
    );
}

impl PgServer {
    /// Initialises and starts a server; returns once it accepts logins.
    pub fn start() -> Self {
        Self::start_with(false, false)
    }

    /// The same with `fsync=on`: every commit waits for the disk, as on a
    /// production server (the benchmarks measure both).
    pub fn start_durable() -> Self {
        Self::start_with(false, true)
    }

    /// The same with `ssl=on`: a server certificate for `localhost` and
    /// `127.0.0.1` signed by a CA of its own ([`PgServer::ca_cert`]).
    /// Plain connections are still accepted (`sslmode` decides).
    pub fn start_tls() -> Self {
        Self::start_with(true, false)
    }

    /// With TLS, the CA certificate (PEM) that signed the server's.
    pub fn ca_cert(&self) -> Option<&Path> {
        self.ca_cert.as_deref()
    }

    fn start_with(tls: bool, fsync: bool) -> Self {
        let bin = bin_dir();
        let run_as = if running_as_root() {
            Some(ids_of("postgres").expect(
                "running as root, PostgreSQL needs the `postgres` user (Debian's postgresql \
                 package creates it)",
            ))
        } else {
            None
        };
        let dir = tempfile::Builder::new()
            .prefix("taskstack-pg-")
            .tempdir()
            .expect("tempdir");
        if let Some((uid, gid)) = run_as {
            std::os::unix::fs::chown(dir.path(), Some(uid), Some(gid)).expect("chown tempdir");
        }
        let pwfile = dir.path().join("pw");
        std::fs::write(&pwfile, PASSWORD).expect("password file");
        if let Some((uid, gid)) = run_as {
            std::os::unix::fs::chown(&pwfile, Some(uid), Some(gid)).expect("chown pwfile");
        }
        let data = dir.path().join("data");
        let mut init = Command::new(bin.join("initdb"));
        init.arg("-D")
            .arg(&data)
            .args(["-U", USER, "-A", "scram-sha-256", "-N", "-E", "UTF8"])
            .arg(format!("--pwfile={}", pwfile.display()))
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        if let Some((uid, gid)) = run_as {
            init.uid(uid).gid(gid);
        }
        let out = init.output().expect("run initdb");
        assert!(
            out.status.success(),
            "initdb failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let ca_cert = tls.then(|| {
            let certs = dir.path().join("tls");
            std::fs::create_dir(&certs).expect("tls dir");
            make_server_cert(&certs);
            let key = certs.join("server.key");
            std::fs::set_permissions(&key, std::os::unix::fs::PermissionsExt::from_mode(0o600))
                .expect("chmod server.key");
            if let Some((uid, gid)) = run_as {
                std::os::unix::fs::chown(&key, Some(uid), Some(gid)).expect("chown server.key");
            }
            certs.join("ca.crt")
        });
        let mut server = Self {
            port: free_port(),
            bin,
            data,
            run_as,
            child: None,
            ca_cert,
            fsync,
            dir,
        };
        server.start_again();
        server
    }

    /// Starts the server (again) on the same port and data; returns once
    /// it accepts logins.
    pub fn start_again(&mut self) {
        assert!(self.child.is_none(), "already running");
        let mut cmd = Command::new(self.bin.join("postgres"));
        cmd.arg("-D")
            .arg(&self.data)
            .args(["-p", &self.port.to_string(), "-k"])
            .arg(self.dir.path())
            .args(["-c", "listen_addresses=127.0.0.1", "-c"])
            .arg(if self.fsync { "fsync=on" } else { "fsync=off" })
            .args(["-c", "max_connections=200"])
            .args(self.tls_args())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(self.log_path()).expect("log file"));
        if let Some((uid, gid)) = self.run_as {
            cmd.uid(uid).gid(gid);
        }
        self.child = Some(cmd.spawn().expect("start postgres"));
        let start = Instant::now();
        while !self
            .psql("postgres", "SELECT 1")
            .is_ok_and(|o| o.contains('1'))
        {
            assert!(
                start.elapsed() < Duration::from_secs(30),
                "postgres did not start: {}",
                std::fs::read_to_string(self.log_path()).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// `ssl=on` and the certificate files, when started with TLS.
    fn tls_args(&self) -> Vec<String> {
        let Some(ca) = &self.ca_cert else {
            return Vec::new();
        };
        let certs = ca.parent().unwrap_or(Path::new("."));
        [
            "ssl=on".to_owned(),
            format!("ssl_cert_file={}", certs.join("server.crt").display()),
            format!("ssl_key_file={}", certs.join("server.key").display()),
        ]
        .into_iter()
        .flat_map(|kv| ["-c".to_owned(), kv])
        .collect()
    }

    fn log_path(&self) -> PathBuf {
        self.dir.path().join("postgres.log")
    }

    /// The data directory (owned by the server's user).
    pub fn data_dir(&self) -> &Path {
        &self.data
    }

    /// `postgresql://taskstack@127.0.0.1:<port>/<db>` (password apart).
    pub fn url(&self, db: &str) -> String {
        format!(
            "postgresql://{USER}@127.0.0.1:{}/{db}?sslmode=disable",
            self.port
        )
    }

    /// The URL of `db` at `host` (`127.0.0.1` or `localhost`) with
    /// `query` (e.g. `sslmode=require`) instead of `sslmode=disable`.
    pub fn url_with(&self, host: &str, db: &str, query: &str) -> String {
        format!("postgresql://{USER}@{host}:{}/{db}?{query}", self.port)
    }

    /// The same with the password in it.
    pub fn url_with_password(&self, db: &str) -> String {
        format!(
            "postgresql://{USER}:{PASSWORD}@127.0.0.1:{}/{db}?sslmode=disable",
            self.port
        )
    }

    /// Runs SQL through `psql`; its unaligned output.
    pub fn psql(&self, db: &str, sql: &str) -> Result<String, String> {
        let out = Command::new("psql")
            .args(["-h", "127.0.0.1", "-p", &self.port.to_string(), "-U", USER])
            .args([
                "-d",
                db,
                "-X",
                "-A",
                "-t",
                "-v",
                "ON_ERROR_STOP=1",
                "-c",
                sql,
            ])
            .env("PGPASSWORD", PASSWORD)
            .env("PGCONNECT_TIMEOUT", "5")
            .stdin(Stdio::null())
            .output()
            .map_err(|e| format!("psql: {e}"))?;
        if out.status.success() {
            Ok(String::from_utf8_lossy(&out.stdout).into_owned())
        } else {
            Err(String::from_utf8_lossy(&out.stderr).into_owned())
        }
    }

    /// A new, empty database of its own; its name.
    pub fn create_database(&self) -> String {
        let name = format!("t_{}", uuid::Uuid::new_v4().simple());
        self.psql("postgres", &format!("CREATE DATABASE {name}"))
            .expect("create database");
        name
    }

    fn signal(&self, sig: &str) {
        if let Some(c) = &self.child {
            let _ = Command::new("kill")
                .args([sig, &c.id().to_string()])
                .status();
        }
    }

    /// Stops the server (fast shutdown: sessions are cut, data kept) and
    /// waits for it to exit.
    pub fn stop(&mut self) {
        self.signal("-INT");
        if let Some(mut c) = self.child.take() {
            let _ = c.wait();
        }
    }
}

impl Drop for PgServer {
    fn drop(&mut self) {
        // Immediate shutdown: the postmaster ends its sessions too.
        self.signal("-QUIT");
        if let Some(mut c) = self.child.take() {
            let _ = c.wait();
        }
    }
}
