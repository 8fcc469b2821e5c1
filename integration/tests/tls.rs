//! `rediss://`: a worker process reaches a TLS-only Redis port, trusting a
//! private CA through `SSL_CERT_FILE`, and refuses the server when it does
//! not trust the CA.

use anyhow::{Context as _, Result, ensure};
use serde_json::json;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;
use taskstack::proto::TaskState;
use taskstack_integration::{WorkerProcess, free_port, namespace, producer, wait_until_sync};

fn openssl(dir: &Path, args: &[&str]) -> Result<()> {
    let out = Command::new("openssl")
        .current_dir(dir)
        .args(args)
        .output()
        .context("cannot run openssl (scripts/prereqs installs it)")?;
    ensure!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(())
}

/// A CA and a server certificate for 127.0.0.1 signed by it.
fn certificates(dir: &Path) -> Result<()> {
    openssl(
        dir,
        &[
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "2",
            "-subj",
            "/CN=taskstack test CA",
            "-keyout",
            "ca.key",
            "-out",
            "ca.pem",
        ],
    )?;
    openssl(
        dir,
        &[
            "req",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-subj",
            "/CN=127.0.0.1",
            "-keyout",
            "server.key",
            "-out",
            "server.csr",
        ],
    )?;
    std::fs::write(
        dir.join("san.ext"),
        "subjectAltName=IP:127.0.0.1,DNS:localhost\n",
    )?;
    openssl(
        dir,
        &[
            "x509",
            "-req",
            "-in",
            "server.csr",
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-days",
            "2",
            "-extfile",
            "san.ext",
            "-out",
            "server.pem",
        ],
    )
}

struct TlsRedis {
    child: Child,
    plain: u16,
    tls: u16,
}

impl Drop for TlsRedis {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start_tls_redis(dir: &Path) -> Result<TlsRedis> {
    let (plain, tls) = (free_port()?, free_port()?);
    let child = Command::new("redis-server")
        .current_dir(dir)
        .args(["--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
        .args(["--port", &plain.to_string(), "--tls-port", &tls.to_string()])
        .args([
            "--tls-cert-file",
            "server.pem",
            "--tls-key-file",
            "server.key",
        ])
        .args(["--tls-ca-cert-file", "ca.pem", "--tls-auth-clients", "no"])
        .stdout(Stdio::null())
        .spawn()
        .context("cannot start redis-server")?;
    let server = TlsRedis { child, plain, tls };
    wait_until_sync(
        "redis-server to answer on its plain port",
        Duration::from_secs(10),
        || {
            let mut c = redis::Client::open(format!("redis://127.0.0.1:{plain}/"))
                .ok()?
                .get_connection()
                .ok()?;
            redis::cmd("PING").query::<String>(&mut c).ok()
        },
    )?;
    Ok(server)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rediss_with_a_trusted_ca_works_and_an_untrusted_one_is_refused() -> Result<()> {
    let dir = tempfile::tempdir()?;
    certificates(dir.path())?;
    let redis = start_tls_redis(dir.path())?;
    let ns = namespace("tls");
    let tls_url = format!("rediss://127.0.0.1:{}/0", redis.tls);
    let ca = dir.path().join("ca.pem");

    // Without the CA the server's certificate is not trusted.
    let untrusted = WorkerProcess::spawn(
        &tls_url,
        &ns,
        &[
            ("SSL_CERT_FILE", "/nonexistent-ca.pem"),
            ("SSL_CERT_DIR", "/nonexistent"),
        ],
    )?;
    untrusted.wait_log("register worker", Duration::from_secs(20))?;
    assert!(
        !untrusted.log().contains("worker ready"),
        "{}",
        untrusted.log()
    );
    drop(untrusted);

    let ca_file = ca.to_str().context("utf-8 path")?;
    let w = WorkerProcess::spawn(&tls_url, &ns, &[("SSL_CERT_FILE", ca_file)])?;
    w.wait_log("worker ready", Duration::from_secs(20))?;
    // The producer uses the plain port of the same server; the worker takes
    // the task and stores its result over TLS.
    let p = producer(&format!("redis://127.0.0.1:{}/0", redis.plain), &ns)?;
    let id = p
        .send_task("taskstack.add", vec![json!(20), json!(22)])
        .await?;
    let r = p.wait(&id, Duration::from_secs(20)).await?;
    assert_eq!((r.status, r.result), (TaskState::Success, json!(42)));
    Ok(())
}
