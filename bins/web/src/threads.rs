//! The web served by several threads. One acceptor hands each accepted
//! connection to the thread serving the fewest ([`crate::serve::accept`]);
//! every thread runs a current-thread runtime with its own connections to
//! the stores, so a request, its Redis round trip and its answer never
//! change thread. On tokio's multi-thread runtime, where they moved between
//! threads, an enqueue cost up to 1.6 times the CPU it cost on one thread
//! (README, "Performance").

use crate::serve::{self, Inbox, Limits};
use crate::{AppState, router};
use anyhow::{Context as _, anyhow};
use std::future::Future;
use std::sync::Arc;
use taskstack::backend::Backend;
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio_util::sync::CancellationToken;

/// Opens a thread's own connections to the stores (the same stores as the
/// first thread's backend).
pub type OpenBackend = dyn Fn() -> anyhow::Result<Arc<dyn Backend>> + Send + Sync;

/// Serves `state` on `listener` with `threads` threads, the calling one
/// included (its runtime also runs the acceptor), until `shutdown`
/// completes; then every thread lets its requests in flight finish. The
/// other threads open their stores with `open`. A thread that fails (its
/// stores cannot be opened, or it panicked) stops the whole service with
/// an error, so a supervisor restarts it whole rather than it serving on
/// fewer threads unnoticed.
pub async fn run_on_threads(
    state: AppState,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
    threads: usize,
    open: Arc<OpenBackend>,
) -> anyhow::Result<()> {
    let limits = state.settings.limits;
    let addr = listener.local_addr()?;
    let failed = CancellationToken::new();
    let (first, inbox) = serve::shard_channel();
    let mut links = vec![first];
    let mut ends = Vec::with_capacity(threads.saturating_sub(1));
    for i in 1..threads.max(1) {
        let (link, inbox) = serve::shard_channel();
        links.push(link);
        let (tx, rx) = oneshot::channel();
        let (st, open, guard) = (
            state.clone(),
            Arc::clone(&open),
            failed.clone().drop_guard(),
        );
        std::thread::Builder::new()
            .name(format!("web-{i}"))
            .spawn(move || {
                // Cancels `failed` unless the thread ends well, a panic included.
                let guard = guard;
                let r = serve_thread(st, inbox, &*open, limits);
                match &r {
                    Ok(()) => drop(guard.disarm()),
                    Err(e) => tracing::error!(thread = i, error = %format!("{e:#}"), "a web thread failed; stopping"),
                }
                let _ = tx.send(r);
            })
            .context("cannot start a web thread")?;
        ends.push((i, rx));
    }
    tracing::info!(
        listen = %addr,
        threads = threads.max(1),
        header_timeout = ?limits.header_timeout,
        idle_timeout = ?limits.idle_timeout,
        max_connections = limits.max_connections,
        "taskstack-web serving"
    );
    let stop = {
        let failed = failed.clone();
        async move {
            tokio::select! {
                () = shutdown => {}
                () = failed.cancelled() => {}
            }
        }
    };
    let (app, _) = router(state);
    tokio::join!(
        serve::accept(listener, links, limits, stop),
        serve::serve_shard(inbox, app, limits),
    );
    let mut outcome = Ok(());
    for (i, rx) in ends {
        let r = match rx.await {
            Ok(r) => r,
            Err(_) => Err(anyhow!("web thread {i} panicked")),
        };
        if let Err(e) = r
            && outcome.is_ok()
        {
            outcome = Err(e.context(format!("web thread {i}")));
        }
    }
    tracing::info!("taskstack-web stopped");
    outcome
}

/// One thread's share: its runtime, its stores, its connections.
fn serve_thread(
    state: AppState,
    inbox: Inbox,
    open: &OpenBackend,
    limits: Limits,
) -> anyhow::Result<()> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the thread's async runtime")?;
    rt.block_on(async {
        let backend = open()?;
        let (app, _) = router(state.sibling(backend));
        serve::serve_shard(inbox, app, limits).await;
        Ok(())
    })
}
