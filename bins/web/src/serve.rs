//! Serving the router on a TCP listener so that slow or stalled clients
//! cannot take the API down:
//!
//! - a client gets [`Limits::header_timeout`] to send a request's headers
//!   (hyper's header-read timer, which also bounds how long an idle
//!   keep-alive connection waits for its next request);
//! - a connection on which nothing is read or written for
//!   [`Limits::idle_timeout`] is closed (a stalled body, a client that never
//!   reads its answer);
//! - at most [`Limits::max_connections`] connections are served at once.
//!   At the cap the server stops accepting, so newcomers wait in the kernel's
//!   listen backlog until a connection closes, rather than each costing a
//!   file descriptor and a task; a rate-limited WARN says the cap was hit.
//! - `accept` failing for lack of file descriptors (EMFILE/ENFILE) or memory
//!   is logged (rate-limited) and retried after a growing pause, instead of
//!   spinning on the error or stopping the service.

use axum::Router;
use hyper::server::conn::http1;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use tokio::time::Instant;

/// How a connection is bounded (`web_header_timeout`, `web_idle_timeout`,
/// `web_max_connections`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    pub header_timeout: Duration,
    pub idle_timeout: Duration,
    pub max_connections: usize,
}

impl Default for Limits {
    /// The configuration's defaults.
    fn default() -> Self {
        let c = taskstack::config::Config::default();
        Self {
            header_timeout: c.web_header_timeout,
            idle_timeout: c.web_idle_timeout,
            max_connections: c.web_max_connections.get(),
        }
    }
}

/// At most one WARN of a kind per this long: a flood must not become a
/// flood of log lines.
const WARN_EVERY: Duration = Duration::from_secs(10);
/// Pauses after a failed `accept`, doubling from the first to the last.
const ACCEPT_BACKOFF: (Duration, Duration) = (Duration::from_millis(50), Duration::from_secs(1));

/// Serves `app` on `listener` within `limits` until `shutdown` completes;
/// then stops accepting, lets requests in flight finish and closes idle
/// connections.
pub async fn serve(
    listener: TcpListener,
    app: Router,
    limits: Limits,
    shutdown: impl Future<Output = ()> + Send + 'static,
) {
    let permits = Arc::new(Semaphore::new(limits.max_connections.max(1)));
    let mut http = http1::Builder::new();
    http.timer(TokioTimer::new())
        .header_read_timeout(limits.header_timeout);
    let graceful = GracefulShutdown::new();
    let mut connections = JoinSet::new();
    let mut at_cap = Warner::default();
    let mut accept_failed = Warner::default();
    let mut backoff = ACCEPT_BACKOFF.0;
    let mut shutdown = std::pin::pin!(shutdown);
    loop {
        while connections.try_join_next().is_some() {}
        let permit = match Arc::clone(&permits).try_acquire_owned() {
            Ok(p) => p,
            Err(_) => {
                if at_cap.due() {
                    tracing::warn!(
                        max_connections = limits.max_connections,
                        "connection limit reached: new connections wait until one closes \
                         (web_max_connections)"
                    );
                }
                tokio::select! {
                    p = Arc::clone(&permits).acquire_owned() => match p {
                        Ok(p) => p,
                        Err(_) => break, // never closed
                    },
                    () = &mut shutdown => break,
                }
            }
        };
        let (tcp, peer) = tokio::select! {
            r = listener.accept() => match r {
                Ok(accepted) => accepted,
                // The peer gave up before we accepted: nothing to do.
                Err(e) if is_peer_error(&e) => continue,
                Err(e) => {
                    if accept_failed.due() {
                        tracing::warn!(
                            error = %e,
                            pause = ?backoff,
                            "cannot accept connections (out of file descriptors? raise the \
                             limit or lower web_max_connections); retrying"
                        );
                    }
                    tokio::select! {
                        () = tokio::time::sleep(backoff) => {}
                        () = &mut shutdown => break,
                    }
                    backoff = (backoff * 2).min(ACCEPT_BACKOFF.1);
                    continue;
                }
            },
            () = &mut shutdown => break,
        };
        backoff = ACCEPT_BACKOFF.0;
        // Small request/response pairs: never wait to coalesce segments.
        let _ = tcp.set_nodelay(true);
        let (io, activity) = Tracked::new(tcp);
        let conn = graceful
            .watch(http.serve_connection(TokioIo::new(io), TowerToHyperService::new(app.clone())));
        let idle = limits.idle_timeout;
        connections.spawn(async move {
            let _permit = permit;
            tokio::select! {
                r = conn => if let Err(e) = r {
                    tracing::debug!(%peer, error = %e, "connection closed");
                },
                () = activity.idle_for(idle) => {
                    tracing::debug!(%peer, idle = ?idle, "closing an idle connection");
                }
            }
        });
    }
    drop(listener);
    graceful.shutdown().await;
    while connections.join_next().await.is_some() {}
}

/// Errors that concern one connection only (the client reset it before
/// it was accepted), not the listener.
fn is_peer_error(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::ConnectionAborted
            | io::ErrorKind::ConnectionReset
            | io::ErrorKind::ConnectionRefused
            | io::ErrorKind::Interrupted
    )
}

/// Says when a rate-limited warning may be logged again.
#[derive(Debug, Default)]
struct Warner {
    last: Option<Instant>,
}

impl Warner {
    fn due(&mut self) -> bool {
        let now = Instant::now();
        if self
            .last
            .is_some_and(|t| now.duration_since(t) < WARN_EVERY)
        {
            return false;
        }
        self.last = Some(now);
        true
    }
}

/// When a connection last moved a byte, shared between its I/O and its
/// idle watch.
#[derive(Debug, Clone)]
struct Activity {
    start: Instant,
    /// Milliseconds after `start` of the last read or write.
    last_ms: Arc<AtomicU64>,
}

impl Activity {
    fn touch(&self) {
        let ms = u64::try_from(self.start.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.last_ms.store(ms, Ordering::Relaxed);
    }

    /// Completes once nothing has moved for `idle`.
    async fn idle_for(&self, idle: Duration) {
        loop {
            let last = self.start + Duration::from_millis(self.last_ms.load(Ordering::Relaxed));
            let deadline = last + idle;
            if Instant::now() >= deadline {
                return;
            }
            tokio::time::sleep_until(deadline).await;
        }
    }
}

/// A TCP stream that records when bytes last moved.
#[derive(Debug)]
struct Tracked {
    inner: TcpStream,
    activity: Activity,
}

impl Tracked {
    fn new(inner: TcpStream) -> (Self, Activity) {
        let activity = Activity {
            start: Instant::now(),
            last_ms: Arc::new(AtomicU64::new(0)),
        };
        (
            Self {
                inner,
                activity: activity.clone(),
            },
            activity,
        )
    }
}

impl AsyncRead for Tracked {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let r = Pin::new(&mut self.inner).poll_read(cx, buf);
        if matches!(r, Poll::Ready(Ok(()))) && buf.filled().len() > before {
            self.activity.touch();
        }
        r
    }
}

impl AsyncWrite for Tracked {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write(cx, buf);
        if matches!(r, Poll::Ready(Ok(n)) if n > 0) {
            self.activity.touch();
        }
        r
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        if matches!(r, Poll::Ready(Ok(n)) if n > 0) {
            self.activity.touch();
        }
        r
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}
