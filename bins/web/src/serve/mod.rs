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
//!
//! One acceptor ([`accept`]) takes the connections and hands each to a
//! shard ([`serve_shard`]), which serves it on its own runtime:
//! [`serve`] runs one of each on the caller's runtime, [`crate::threads`]
//! one shard per thread.

mod shard;
mod tracked;

pub use shard::{Inbox, ShardLink, channel as shard_channel, serve as serve_shard};

use axum::Router;
use std::future::Future;
use std::io;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
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
/// connections. Everything runs on the calling task's runtime (one
/// [`serve_shard`]); see [`crate::threads`] for a server spread over threads.
pub async fn serve(
    listener: TcpListener,
    app: Router,
    limits: Limits,
    shutdown: impl Future<Output = ()> + Send + 'static,
) {
    let (link, inbox) = shard::channel();
    tokio::join!(
        accept(listener, vec![link], limits, shutdown),
        shard::serve(inbox, app, limits),
    );
}

/// Accepts connections on `listener` within `limits` and hands each to the
/// shard serving the fewest, until `shutdown` completes or no shard is
/// left; then drops `shards`, which tells them to stop (they finish what
/// is in flight). At [`Limits::max_connections`] connections served, over
/// all shards, it stops accepting until one closes.
pub async fn accept(
    listener: TcpListener,
    shards: Vec<ShardLink>,
    limits: Limits,
    shutdown: impl Future<Output = ()> + Send + 'static,
) {
    let permits = Arc::new(Semaphore::new(limits.max_connections.max(1)));
    let mut at_cap = Warner::default();
    let mut accept_failed = Warner::default();
    let mut backoff = ACCEPT_BACKOFF.0;
    let mut shutdown = std::pin::pin!(shutdown);
    let mut shards = shard::Shards::new(shards);
    while !shards.is_empty() {
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
        let tcp = match tcp.into_std() {
            Ok(t) => t,
            Err(e) => {
                tracing::debug!(%peer, error = %e, "cannot hand over a connection");
                continue;
            }
        };
        shards.hand(shard::Accepted { tcp, peer, permit });
    }
    drop(listener);
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
