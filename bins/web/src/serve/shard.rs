//! A shard: one runtime's share of the connections. The acceptor
//! ([`super::accept`]) hands each accepted connection to the shard serving
//! the fewest; the shard serves it with hyper on its own runtime, so a
//! request, its Redis round trip and its answer stay on one thread.

use super::Limits;
use super::tracked::Tracked;
use axum::Router;
use hyper::server::conn::http1;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use tokio::net::TcpStream;
use tokio::sync::{OwnedSemaphorePermit, mpsc};
use tokio::task::JoinSet;

/// A connection accepted for a shard, holding its place under the cap.
#[derive(Debug)]
pub(super) struct Accepted {
    pub tcp: std::net::TcpStream,
    pub peer: SocketAddr,
    pub permit: OwnedSemaphorePermit,
}

/// The acceptor's end of a shard: where its connections go, and how many
/// it serves.
#[derive(Debug)]
pub struct ShardLink {
    tx: mpsc::UnboundedSender<Accepted>,
    serving: Arc<AtomicUsize>,
}

/// The shard's end: the connections handed to it. Dropping every
/// [`ShardLink`] (the acceptor stopped) tells the shard to stop.
#[derive(Debug)]
pub struct Inbox {
    rx: mpsc::UnboundedReceiver<Accepted>,
    serving: Arc<AtomicUsize>,
}

/// A new shard's two ends. The channel is unbounded, but what travels on
/// it is bounded by the connection cap: each connection carries its permit.
pub fn channel() -> (ShardLink, Inbox) {
    let (tx, rx) = mpsc::unbounded_channel();
    let serving = Arc::new(AtomicUsize::new(0));
    (
        ShardLink {
            tx,
            serving: Arc::clone(&serving),
        },
        Inbox { rx, serving },
    )
}

/// The shards the acceptor hands connections to.
#[derive(Debug)]
pub(super) struct Shards {
    links: Vec<ShardLink>,
    /// Where the search for the least busy shard starts: equals take turns,
    /// so one-request connections spread too.
    next: usize,
}

impl Shards {
    pub(super) fn new(links: Vec<ShardLink>) -> Self {
        Self { links, next: 0 }
    }

    pub(super) fn is_empty(&self) -> bool {
        self.links.is_empty()
    }

    /// The least busy shard, equals taken in turn.
    fn least(&mut self) -> Option<usize> {
        let n = self.links.len();
        let start = self.next % n.max(1);
        let best = (0..n)
            .map(|k| (start + k) % n)
            .min_by_key(|&i| self.links[i].serving.load(Ordering::Relaxed))?;
        self.next = best + 1;
        Some(best)
    }

    /// Hands `conn` to the least busy shard. A shard that stopped (its
    /// thread failed) is dropped and the next one takes the connection;
    /// with none left the connection is closed.
    pub(super) fn hand(&mut self, mut conn: Accepted) {
        while let Some(i) = self.least() {
            let link = &self.links[i];
            link.serving.fetch_add(1, Ordering::Relaxed);
            match link.tx.send(conn) {
                Ok(()) => return,
                Err(mpsc::error::SendError(back)) => {
                    tracing::error!("a web thread stopped serving; its share goes to the others");
                    self.links.swap_remove(i);
                    conn = back;
                }
            }
        }
    }
}

/// Lowers a shard's count of connections served when one ends.
struct Serving(Arc<AtomicUsize>);

impl Drop for Serving {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Serves the connections handed to `inbox` with `app` within `limits`
/// until the acceptor stops; then lets requests in flight finish and
/// closes idle connections.
pub async fn serve(mut inbox: Inbox, app: Router, limits: Limits) {
    let mut http = http1::Builder::new();
    http.timer(TokioTimer::new())
        .header_read_timeout(limits.header_timeout);
    let graceful = GracefulShutdown::new();
    let mut connections = JoinSet::new();
    while let Some(Accepted { tcp, peer, permit }) = inbox.rx.recv().await {
        while connections.try_join_next().is_some() {}
        let serving = Serving(Arc::clone(&inbox.serving));
        let tcp = match TcpStream::from_std(tcp) {
            Ok(t) => t,
            Err(e) => {
                tracing::debug!(%peer, error = %e, "cannot serve a connection");
                continue;
            }
        };
        let (io, activity) = Tracked::new(tcp);
        let conn = graceful
            .watch(http.serve_connection(TokioIo::new(io), TowerToHyperService::new(app.clone())));
        let idle = limits.idle_timeout;
        connections.spawn(async move {
            let _held = (permit, serving);
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
    graceful.shutdown().await;
    while connections.join_next().await.is_some() {}
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::sync::Semaphore;

    /// A real accepted connection with a permit.
    fn accepted(listener: &std::net::TcpListener, permits: &Arc<Semaphore>) -> Accepted {
        let addr = listener.local_addr().expect("addr");
        let _client = std::net::TcpStream::connect(addr).expect("connect");
        let (tcp, peer) = listener.accept().expect("accept");
        let permit = Arc::clone(permits).try_acquire_owned().expect("permit");
        Accepted { tcp, peer, permit }
    }

    #[test]
    fn connections_go_to_the_least_busy_shard_equals_in_turn_and_past_a_stopped_one() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let permits = Arc::new(Semaphore::new(16));
        let (links, mut inboxes): (Vec<_>, Vec<_>) = (0..3).map(|_| channel()).unzip();
        let mut shards = Shards::new(links);
        let received = |inboxes: &mut Vec<Inbox>| -> Vec<usize> {
            inboxes
                .iter_mut()
                .map(|i| std::iter::from_fn(|| i.rx.try_recv().ok()).count())
                .collect()
        };
        // Equals take turns: one each, then one each again.
        for _ in 0..6 {
            shards.hand(accepted(&listener, &permits));
        }
        assert_eq!(received(&mut inboxes), vec![2, 2, 2]);
        // Shard 1's connections end: it is the least busy, and gets the
        // next two.
        inboxes[1].serving.fetch_sub(2, Ordering::Relaxed);
        shards.hand(accepted(&listener, &permits));
        shards.hand(accepted(&listener, &permits));
        assert_eq!(received(&mut inboxes), vec![0, 2, 0]);
        // A stopped shard is skipped (and forgotten); nothing is lost.
        let stopped = inboxes.remove(0);
        drop(stopped);
        for _ in 0..4 {
            shards.hand(accepted(&listener, &permits));
        }
        assert_eq!(received(&mut inboxes), vec![2, 2]);
        assert_eq!(shards.links.len(), 2);
    }
}
