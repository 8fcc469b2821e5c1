//! A real `taskstack-web` against slow clients (slowloris: a request's
//! first bytes and then nothing): it closes them, says so in its log when
//! they fill its connection cap or its file descriptors, and keeps
//! answering ordinary requests.

use anyhow::{Context as _, Result};
use std::io::{Read as _, Write as _};
use std::net::TcpStream;
use std::time::{Duration, Instant};
use taskstack_integration::{Prereq, RedisServer, WebProcess, namespace, require, wait_until};

const HEADER_TIMEOUT: (&str, &str) = ("TASKSTACK_WEB_HEADER_TIMEOUT", "1s");

fn slowloris(addr: &str, n: usize) -> Result<Vec<TcpStream>> {
    (0..n)
        .map(|_| {
            let mut s = TcpStream::connect(addr)?;
            s.write_all(b"GET / HTTP/1.1\r\nHo")?;
            Ok(s)
        })
        .collect()
}

/// Every connection is closed by the server within `deadline` (end of
/// stream or reset on read).
fn all_closed(conns: &mut [TcpStream], deadline: Duration) -> Result<()> {
    let until = Instant::now() + deadline;
    for (i, s) in conns.iter_mut().enumerate() {
        let left = until.saturating_duration_since(Instant::now());
        s.set_read_timeout(Some(left.max(Duration::from_millis(1))))?;
        let mut buf = [0u8; 512];
        loop {
            match s.read(&mut buf) {
                Ok(0) => break,
                Ok(_) => {}
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) =>
                {
                    anyhow::bail!("slow connection {i} still open after {deadline:?}")
                }
                Err(_) => break,
            }
        }
    }
    Ok(())
}

async fn answers(web: &WebProcess, deadline: Duration) -> Result<()> {
    wait_until("an ordinary request to be answered", deadline, || async {
        Ok(matches!(web.call("GET", "/health/live", None).await, Ok((200, _))).then_some(()))
    })
    .await
}

#[tokio::test(flavor = "multi_thread")]
async fn slow_clients_at_the_connection_cap_are_cut_logged_and_do_not_block_others() -> Result<()> {
    let redis = RedisServer::start()?;
    let web = WebProcess::spawn(
        &redis.url(),
        &namespace("web-cap"),
        &[HEADER_TIMEOUT, ("TASKSTACK_WEB_MAX_CONNECTIONS", "20")],
    )
    .await?;
    let mut slow = slowloris(&web.addr, 40)?;
    web.wait_log("connection limit reached", Duration::from_secs(10))?;
    answers(&web, Duration::from_secs(10)).await?;
    all_closed(&mut slow, Duration::from_secs(8)).context(web.log())?;
    answers(&web, Duration::from_secs(2)).await
}

#[tokio::test(flavor = "multi_thread")]
async fn running_out_of_file_descriptors_is_survived_and_logged() -> Result<()> {
    require(Prereq::Program {
        name: "prlimit",
        package: "util-linux",
    });
    let redis = RedisServer::start()?;
    // Fewer descriptors than slow clients and than the default cap: accept
    // fails with EMFILE until the header timeout frees some.
    let web = WebProcess::spawn_under(
        &["prlimit", "--nofile=100:100"],
        &redis.url(),
        &namespace("web-emfile"),
        &[HEADER_TIMEOUT],
    )
    .await?;
    let mut slow = slowloris(&web.addr, 150)?;
    web.wait_log("cannot accept connections", Duration::from_secs(10))?;
    answers(&web, Duration::from_secs(15)).await?;
    all_closed(&mut slow, Duration::from_secs(15)).context(web.log())?;
    assert!(web.is_running(), "{}", web.log());
    answers(&web, Duration::from_secs(2)).await
}
