//! Waiting for results without polling: one connection per process runs
//! `LISTEN taskstack_results`; a committed final result is announced with
//! its task id (`NOTIFY`, sent by the upsert on commit) and wakes the
//! waiters of that id, who then read the row.

use super::connect::{Connector, PgError};
use super::schema::CHANNEL;
use super::store;
use crate::proto::TaskResult;
use crate::waiters::{self, Interest};
use futures_util::StreamExt as _;
use std::sync::Arc;
use std::time::Duration;

type Waiters = waiters::Waiters<()>;

/// The LISTEN connection and the waiters registered on it.
#[derive(Debug)]
pub(crate) struct Listener {
    waiters: Waiters,
    /// Keeps the session (and so the LISTEN) open.
    _client: tokio_postgres::Client,
    /// Drives the connection; owned here, aborted on drop. When it ends
    /// (the connection was lost) every waiter's sender is dropped, so they
    /// re-read and listen anew.
    reader: tokio::task::JoinHandle<()>,
}

impl Drop for Listener {
    fn drop(&mut self) {
        self.reader.abort();
    }
}

impl Listener {
    async fn connect(connector: &Connector) -> Result<Self, PgError> {
        let op = "listen for results";
        let (client, mut conn) = connector.connect(op).await?;
        let waiters: Waiters = Arc::default();
        let w = Arc::clone(&waiters);
        let reader = tokio::spawn(async move {
            let mut messages = futures_util::stream::poll_fn(move |cx| conn.poll_message(cx));
            while let Some(Ok(msg)) = messages.next().await {
                if let tokio_postgres::AsyncMessage::Notification(n) = msg {
                    let senders = w.lock().ok().and_then(|mut m| m.remove(n.payload()));
                    for s in senders.into_iter().flatten() {
                        let _ = s.send(());
                    }
                }
            }
            // Lost: wake everyone (their receivers see the senders dropped).
            if let Ok(mut m) = w.lock() {
                m.clear();
            }
        });
        let listening = tokio::time::timeout(
            connector.timeout,
            client.batch_execute(&format!("LISTEN {CHANNEL}")),
        )
        .await;
        match listening {
            Ok(Ok(())) => Ok(Self {
                waiters,
                _client: client,
                reader,
            }),
            Ok(Err(e)) => {
                reader.abort();
                Err(PgError::op(op, &e))
            }
            Err(_) => {
                reader.abort();
                Err(PgError::op(op, &"no answer to LISTEN"))
            }
        }
    }

    /// How many waiters are registered (tests wait for them).
    #[cfg(test)]
    pub(crate) fn waiting(&self) -> usize {
        self.waiters
            .lock()
            .map_or(0, |m| m.values().map(Vec::len).sum())
    }

    fn is_alive(&self) -> bool {
        !self.reader.is_finished()
    }

    /// A waiter on `task_id`, removed when the interest drops.
    fn watch(&self, task_id: &str) -> Interest<()> {
        waiters::register(&self.waiters, task_id, None)
    }
}

/// The process's listener, connected on first use and again after a loss.
pub(crate) type Slot = Arc<tokio::sync::Mutex<Option<Listener>>>;

/// Waits up to `timeout` for the task's final record: listens first, reads
/// second (a result committed in between is in the row; one committed later
/// wakes the receiver), and reads again when woken.
pub(crate) async fn wait_ready(
    slot: &Slot,
    pg: &super::connect::Handles,
    task_id: &str,
    timeout: Duration,
) -> Result<Option<TaskResult>, PgError> {
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        let mut interest = {
            let mut guard = slot.lock().await;
            if guard.as_ref().is_none_or(|l| !l.is_alive()) {
                *guard = Some(Listener::connect(&pg.connector).await?);
            }
            match guard.as_ref() {
                Some(l) => l.watch(task_id),
                None => continue,
            }
        };
        let read = store::read(pg, task_id).await;
        let outcome = match read? {
            Some(r) if r.status.is_ready() => Some(Some(r)),
            _ => match tokio::time::timeout_at(deadline, interest.next()).await {
                // Woken (or the listener was lost): read again.
                Ok(_) => None,
                Err(_) => Some(None),
            },
        };
        drop(interest);
        if let Some(done) = outcome {
            return Ok(done);
        }
        if tokio::time::Instant::now() >= deadline {
            return Ok(None);
        }
    }
}
