//! The phases of [`super::Worker::run`] that surround the dispatcher:
//! register the lease, record the state file, run the background loops and
//! stop them in order, release the lease.

use super::keeper;
use super::shared::{SettleMsg, Shared};
use super::starter::StartRequest;
use super::{WorkerError, settler, starter};
use crate::backend::Use;
use std::future::Future;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// How long a stopping worker keeps trying to store results after the drain.
const SETTLE_GRACE: Duration = Duration::from_secs(5);

/// Takes the lease and writes the first heartbeat, retrying until Redis
/// answers; false when `shutdown` came first (nothing was taken).
pub(super) async fn register(
    sh: &Shared,
    started_at: &str,
    shutdown: &mut Pin<&mut impl Future<Output = ()>>,
) -> bool {
    let queue_keys = sh.settings.queue_keys();
    let register = async {
        let mut leases = sh.backend.leases(Use::Loop);
        let mut retry = sh.retrier("register worker (is the broker reachable?)");
        loop {
            let rec = keeper::record(sh, started_at);
            match leases
                .heartbeat(&rec, &queue_keys[0], sh.settings.lease)
                .await
            {
                Ok(_) => return true,
                Err(e) => {
                    retry.again(&e).await;
                }
            }
        }
    };
    tokio::select! {
        () = shutdown.as_mut() => false,
        r = register => r,
    }
}

/// Records this worker in its state file (for `healthcheck`) and logs that
/// it is ready. Returns the file to remove at the end.
pub(super) fn record_state(sh: &Shared) -> Result<Option<PathBuf>, WorkerError> {
    let state_file = match &sh.settings.state_file {
        Some(at) => Some(crate::service::state::claim(
            at,
            "worker",
            "worker_state_file",
            &sh.id,
            sh.backend.namespace(),
        )?),
        None => None,
    };
    tracing::info!(
        worker = %sh.id,
        queues = ?sh.settings.queues,
        tasks = ?sh.registry.names(),
        concurrency = sh.settings.concurrency,
        prefetch = sh.settings.prefetch,
        runtime_threads = tokio::runtime::Handle::current().metrics().num_workers(),
        metrics = ?sh.metrics_addr,
        "worker ready"
    );
    Ok(state_file)
}

/// The loops that run beside the dispatcher, owned so that shutdown waits
/// for each in the right order.
pub(super) struct Loops {
    settler: JoinHandle<()>,
    starter: JoinHandle<()>,
    keeper: JoinHandle<()>,
    metrics: Option<JoinHandle<std::io::Result<()>>>,
    /// Stops the keeper and the metrics endpoint, last of all.
    keep: CancellationToken,
}

impl Loops {
    pub(super) fn spawn(
        sh: &Arc<Shared>,
        metrics_listener: Option<tokio::net::TcpListener>,
        started_at: String,
        settle_rx: mpsc::Receiver<SettleMsg>,
        start_rx: mpsc::Receiver<StartRequest>,
    ) -> Self {
        let keep = CancellationToken::new();
        let metrics = metrics_listener.map(|listener| {
            let m = Arc::clone(sh);
            let render = move || {
                let held =
                    m.settings.prefetch - m.held.available_permits().min(m.settings.prefetch);
                let running =
                    m.settings.concurrency - m.exec.available_permits().min(m.settings.concurrency);
                m.metrics.render(held, running)
            };
            tokio::spawn(crate::service::metrics_http::serve(
                listener,
                crate::service::metrics_http::OPENMETRICS_FORMAT,
                render,
                keep.clone(),
            ))
        });
        Self {
            settler: tokio::spawn(settler::run(Arc::clone(sh), settle_rx)),
            starter: tokio::spawn(starter::run(Arc::clone(sh), start_rx)),
            keeper: tokio::spawn(keeper::run(Arc::clone(sh), started_at, keep.clone())),
            metrics,
            keep,
        }
    }

    /// After the drain: lets the starter and the settler finish what is
    /// queued (within [`SETTLE_GRACE`], the lease renewed meanwhile so
    /// nothing is redelivered while its result is being stored), then stops
    /// the keeper and the metrics endpoint.
    pub(super) async fn finish(self, sh: &Shared) {
        // No task is left to start or settle: closing the channels lets
        // both loops finish their queues and exit.
        sh.close_starts();
        sh.close_settlements();
        let Self {
            settler,
            starter,
            keeper,
            metrics,
            keep,
        } = self;
        let mut settler = std::pin::pin!(settler);
        let mut starter = std::pin::pin!(starter);
        let finished = async {
            let _ = (&mut settler).await;
            let _ = (&mut starter).await;
        };
        if tokio::time::timeout(SETTLE_GRACE, finished).await.is_err() {
            tracing::warn!(
                "results still unsettled after {SETTLE_GRACE:?}; leaving them to redelivery"
            );
            sh.abandon.cancel();
            // A handle already awaited to completion must not be polled again.
            if !settler.is_finished() {
                let _ = settler.await;
            }
            if !starter.is_finished() {
                let _ = starter.await;
            }
        }
        keep.cancel();
        let _ = keeper.await;
        if let Some(server) = metrics {
            match server.await {
                Ok(Err(e)) => tracing::warn!(error = %e, "the metrics endpoint failed"),
                Err(e) => tracing::warn!(error = %e, "the metrics endpoint panicked"),
                Ok(Ok(())) => {}
            }
        }
    }
}

/// Ends the lease at once, handing back anything still held; returns how
/// many messages went back.
pub(super) async fn release(sh: &Shared) -> u64 {
    match sh.backend.leases(Use::Loop).release(&sh.id).await {
        Ok(n) => n,
        Err(e) => {
            tracing::warn!(error = %e, "cannot release the lease; held messages return when it expires");
            0
        }
    }
}
