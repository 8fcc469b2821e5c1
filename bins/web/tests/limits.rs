//! Slow clients against the real server on a real socket (port 0): header
//! and idle timeouts close them, and the connection cap (over all serving
//! threads) keeps the service answering ordinary requests. A serving thread
//! that fails stops the service.

mod common;

use anyhow::{Context as _, Result};
use common::{App, settings};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};
use taskstack::backend::{Backend, RedisBackend};
use taskstack_integration::TEST_TOKEN;
use taskstack_web::serve::Limits;
use taskstack_web::threads::{OpenBackend, run_on_threads};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;

const LIMITS: Limits = Limits {
    header_timeout: Duration::from_secs(1),
    idle_timeout: Duration::from_secs(2),
    max_connections: 20,
};

/// The app served on 127.0.0.1:0 until the token is cancelled.
struct Served {
    _app: App,
    addr: SocketAddr,
    stop: CancellationToken,
    task: tokio::task::JoinHandle<Result<()>>,
}

impl Served {
    /// Served by `threads` threads (one: [`taskstack_web::run`]; more:
    /// [`run_on_threads`], the others on their own Redis connections).
    async fn start(test: &str, threads: usize) -> Result<Self> {
        let mut s = settings(&["celery"], &["taskstack.add"]);
        s.limits = LIMITS;
        let app = App::new(test, s)?;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let stop = CancellationToken::new();
        let shutdown = stop.clone().cancelled_owned();
        let state = app.state.clone();
        let task = if threads == 1 {
            tokio::spawn(async move {
                taskstack_web::run(state, listener, shutdown).await?;
                Ok(())
            })
        } else {
            let (url, ns) = (app.redis.url(), app.ns.clone());
            let open: Arc<OpenBackend> = Arc::new(move || {
                let broker = taskstack_integration::broker(&url, &ns)?;
                Ok(Arc::new(RedisBackend::new(broker)) as Arc<dyn Backend>)
            });
            tokio::spawn(run_on_threads(state, listener, shutdown, threads, open))
        };
        Ok(Self {
            _app: app,
            addr,
            stop,
            task,
        })
    }

    async fn stop(self) -> Result<()> {
        self.stop.cancel();
        tokio::time::timeout(Duration::from_secs(10), self.task)
            .await
            .context("the server did not stop")???;
        Ok(())
    }
}

/// A connection that sends the start of a request and stops.
async fn slowloris(addr: SocketAddr, start: &[u8]) -> Result<TcpStream> {
    let mut s = TcpStream::connect(addr).await?;
    s.write_all(start).await?;
    Ok(s)
}

/// Waits until the server closes `s` (end of stream or reset), up to `deadline`.
async fn closed_within(s: &mut TcpStream, deadline: Duration) -> Result<()> {
    let mut buf = [0u8; 1024];
    tokio::time::timeout(deadline, async {
        loop {
            match s.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    })
    .await
    .with_context(|| format!("the server kept the connection open for {deadline:?}"))
}

/// One ordinary request on a new connection; the status line.
async fn get(addr: SocketAddr, path: &str) -> Result<String> {
    let mut s = TcpStream::connect(addr).await?;
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n").as_bytes())
        .await?;
    let mut out = Vec::new();
    s.read_to_end(&mut out).await?;
    let text = String::from_utf8_lossy(&out);
    Ok(text.lines().next().unwrap_or_default().to_owned())
}

#[tokio::test(flavor = "multi_thread")]
async fn slow_header_senders_are_cut_and_ordinary_requests_still_answered() -> Result<()> {
    let served = Served::start("limits-slowloris", 2).await?;
    let started = Instant::now();
    // More slow connections than the cap: the first 20 are served (and
    // stall), the rest wait in the backlog and are cut once accepted.
    let mut slow = Vec::new();
    for _ in 0..LIMITS.max_connections + 10 {
        slow.push(slowloris(served.addr, b"GET / HTTP/1.1\r\nHo").await?);
    }
    // While the cap is reached, a normal request waits for a free slot,
    // which the header timeout provides, and is answered.
    let status = tokio::time::timeout(Duration::from_secs(10), get(served.addr, "/health/live"))
        .await
        .context("an ordinary request was not answered while slow clients held the cap")??;
    assert_eq!(status, "HTTP/1.1 200 OK");
    // Every slow connection is closed by the server: at most two header
    // timeouts (one waiting to be accepted, one to send headers) plus slack.
    for s in &mut slow {
        closed_within(s, Duration::from_secs(6)).await?;
    }
    assert!(
        started.elapsed() < Duration::from_secs(8),
        "cutting the slow connections took {:?}",
        started.elapsed()
    );
    // Below the cap again: served at once.
    assert_eq!(get(served.addr, "/health/live").await?, "HTTP/1.1 200 OK");
    served.stop().await
}

#[tokio::test(flavor = "multi_thread")]
async fn a_stalled_body_and_an_idle_keep_alive_are_closed() -> Result<()> {
    let served = Served::start("limits-idle", 2).await?;
    // Headers complete, body promised but never sent: only the idle
    // timeout can end this.
    let mut stalled = slowloris(
        served.addr,
        format!(
            "POST /api/v1/tasks HTTP/1.1\r\nHost: t\r\nAuthorization: Bearer {TEST_TOKEN}\r\n\
             Content-Type: application/json\r\nContent-Length: 1000\r\n\r\n{{\"task\":"
        )
        .as_bytes(),
    )
    .await?;
    // A keep-alive client that got its answer and then says nothing.
    let mut idle = slowloris(served.addr, b"GET /health/live HTTP/1.1\r\nHost: t\r\n\r\n").await?;
    let started = Instant::now();
    closed_within(&mut stalled, LIMITS.idle_timeout + Duration::from_secs(3)).await?;
    closed_within(&mut idle, LIMITS.idle_timeout + Duration::from_secs(3)).await?;
    assert!(
        started.elapsed() < LIMITS.idle_timeout + Duration::from_secs(3),
        "took {:?}",
        started.elapsed()
    );
    served.stop().await
}

#[tokio::test(flavor = "multi_thread")]
async fn stopping_is_not_held_up_by_idle_connections() -> Result<()> {
    for threads in [1, 3] {
        let served = Served::start("limits-stop", threads).await?;
        // Idle keep-alive connections (on every thread) do not hold the
        // shutdown up; each was served first.
        let mut idle = Vec::new();
        for _ in 0..threads * 2 {
            let mut s =
                slowloris(served.addr, b"GET /health/live HTTP/1.1\r\nHost: t\r\n\r\n").await?;
            let mut buf = [0u8; 12];
            s.read_exact(&mut buf).await?;
            assert_eq!(&buf, b"HTTP/1.1 200", "{threads} thread(s)");
            idle.push(s);
        }
        let addr = served.addr;
        served.stop().await?;
        assert!(
            TcpStream::connect(addr).await.is_err(),
            "still accepting after stop ({threads} thread(s))"
        );
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn a_serving_thread_that_fails_stops_the_service_with_its_reason() -> Result<()> {
    let app = App::new("limits-thread-fails", settings(&["celery"], &[]))?;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let open: Arc<OpenBackend> = Arc::new(|| anyhow::bail!("the stores are out of reach"));
    let never = std::future::pending::<()>();
    let outcome = tokio::time::timeout(
        Duration::from_secs(10),
        run_on_threads(app.state.clone(), listener, never, 2, open),
    )
    .await
    .context("the service kept running on fewer threads")?;
    let err = format!("{:#}", outcome.expect_err("a failed thread is an error"));
    assert!(
        err.contains("web thread 1") && err.contains("the stores are out of reach"),
        "{err}"
    );
    assert!(
        TcpStream::connect(addr).await.is_err(),
        "still accepting after the failure"
    );
    Ok(())
}
