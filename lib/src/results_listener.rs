//! One subscription connection shared by every result waiter of a process,
//! like Celery's result consumer: waiters are woken by the result's
//! `PUBLISH`, never by polling.

use crate::broker::{BrokerError, RedisPool, get_result, results_parse as parse_result};
use crate::proto::TaskResult;
use crate::proto::keys::result_key;
use crate::waiters::{self, Interest};
use futures_util::StreamExt as _;
use std::sync::Arc;

type Waiters = waiters::Waiters<String>;

/// A live subscription connection and the waiters registered on it.
#[derive(Debug)]
pub(crate) struct Listener {
    sink: redis::aio::PubSubSink,
    waiters: Waiters,
    /// Channels to unsubscribe from, done by the reader task so a waiter
    /// never waits for the reply.
    unsubscribe: tokio::sync::mpsc::UnboundedSender<String>,
    reader: tokio::task::JoinHandle<()>,
}

impl Drop for Listener {
    fn drop(&mut self) {
        self.reader.abort();
    }
}

impl Listener {
    pub(crate) async fn connect(pool: &RedisPool) -> Result<Self, BrokerError> {
        let (sink, mut stream) = pool.pubsub().await?.split();
        let waiters: Waiters = Arc::default();
        let w = Arc::clone(&waiters);
        let (unsubscribe, mut unsub_rx) = tokio::sync::mpsc::unbounded_channel::<String>();
        let mut unsub_sink = sink.clone();
        // Owned by the Listener (aborted on drop).
        let reader = tokio::spawn(async move {
            loop {
                let msg = tokio::select! {
                    m = stream.next() => match m {
                        Some(m) => m,
                        None => break,
                    },
                    Some(channel) = unsub_rx.recv() => {
                        let sink = &mut unsub_sink;
                        let name = channel.as_str();
                        unsubscribe_idle(&w, name, async move {
                            let _ = sink.unsubscribe(name).await;
                        })
                        .await;
                        continue;
                    }
                };
                let Ok(payload) = msg.get_payload::<String>() else {
                    continue;
                };
                let senders = w
                    .lock()
                    .map(|mut m| m.remove(msg.get_channel_name()))
                    .unwrap_or_default();
                for s in senders.into_iter().flatten() {
                    let _ = s.send(payload.clone());
                }
            }
            // Connection gone: dropping every sender wakes every waiter with
            // an error, so they resubscribe on a fresh connection.
            if let Ok(mut m) = w.lock() {
                m.clear();
            }
        });
        Ok(Self {
            sink,
            waiters,
            unsubscribe,
            reader,
        })
    }

    /// Whether the reader still runs (the connection is alive).
    pub(crate) fn is_alive(&self) -> bool {
        !self.reader.is_finished()
    }

    /// Registers interest in `channel` and subscribes; the interest's
    /// [`Interest::next`] yields the next payload published there. Dropping
    /// it ends the interest (the channel is unsubscribed by the reader task
    /// when no waiter is left on it; nobody waits for that reply).
    pub(crate) async fn watch(&self, channel: &str) -> Result<Interest<String>, BrokerError> {
        // Made before subscribing: a failed SUBSCRIBE drops the interest too.
        let interest = waiters::register(&self.waiters, channel, Some(self.unsubscribe.clone()));
        let mut sink = self.sink.clone();
        sink.subscribe(channel)
            .await
            .map_err(BrokerError::redis("subscribe"))?;
        Ok(interest)
    }
}

/// Unsubscribes `channel` (the `unsubscribe` future) when nobody waits on
/// it. A waiter may register while the `UNSUBSCRIBE` is on its way, and its
/// own `SUBSCRIBE` may reach the server first and be undone by it: every
/// waiter registered by the time the server confirmed the `UNSUBSCRIBE` is
/// woken with an error, so it subscribes, and reads the key, again (as
/// after a lost connection), now behind the `UNSUBSCRIBE` on the same
/// connection.
async fn unsubscribe_idle(waiters: &Waiters, channel: &str, unsubscribe: impl Future<Output = ()>) {
    // Re-checked here: a waiter may have registered since it was queued.
    let idle = waiters.lock().is_ok_and(|m| !m.contains_key(channel));
    if !idle {
        return;
    }
    unsubscribe.await;
    let late = waiters
        .lock()
        .map(|mut m| m.remove(channel))
        .unwrap_or_default();
    // Dropping their senders wakes them with an error.
    drop(late);
}

/// Waits up to `timeout` for `task_id`'s final record (SUCCESS, FAILURE or
/// REVOKED) through the process's one listener in `slot` (connected on
/// first use, replaced when lost). `None` when none came in time.
pub(crate) async fn wait_ready(
    slot: &tokio::sync::Mutex<Option<Listener>>,
    pool: &RedisPool,
    task_id: &str,
    timeout: std::time::Duration,
) -> Result<Option<TaskResult>, BrokerError> {
    let deadline = tokio::time::Instant::now() + timeout;
    let channel = result_key(task_id);
    loop {
        let mut interest = {
            let mut guard = slot.lock().await;
            if guard.as_ref().is_none_or(|l| !l.is_alive()) {
                *guard = Some(Listener::connect(pool).await?);
            }
            let Some(listener) = guard.as_ref() else {
                continue;
            };
            listener.watch(&channel).await?
        };
        // Subscribed first, read second: a result published in between
        // is in the key; one published later wakes the receiver.
        let read = get_result(&mut pool.shared_lane(), task_id).await;
        let outcome = match read? {
            Some(r) if r.status.is_ready() => Some(Ok(Some(r))),
            _ => match tokio::time::timeout_at(deadline, interest.next()).await {
                Ok(Ok(raw)) => match parse_result(&raw) {
                    Ok(r) if r.status.is_ready() => Some(Ok(Some(r))),
                    Ok(_) => None,
                    Err(e) => Some(Err(e)),
                },
                // The listener was lost, or a late UNSUBSCRIBE undid this
                // subscription: subscribe (and read the key) again.
                Ok(Err(_)) => None,
                Err(_) => Some(Ok(None)),
            },
        };
        drop(interest);
        if let Some(done) = outcome {
            return done;
        }
        if tokio::time::Instant::now() >= deadline {
            return Ok(None);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_waiter_that_registers_during_an_unsubscribe_is_told_to_subscribe_again() {
        let waiters: Waiters = Arc::default();
        let (tell, _told) = tokio::sync::mpsc::unbounded_channel();
        let mut late = None;
        unsubscribe_idle(&waiters, "ch", async {
            // Registered (and subscribed) while the UNSUBSCRIBE is on its way.
            late = Some(waiters::register(&waiters, "ch", Some(tell.clone())));
        })
        .await;
        let mut late = late.expect("registered");
        let woken = tokio::time::timeout(std::time::Duration::from_secs(5), late.next()).await;
        assert!(
            matches!(woken, Ok(Err(_))),
            "the late waiter must be woken to subscribe again, not left waiting on a \
             channel the connection no longer listens to"
        );
        assert!(waiters.lock().expect("lock").is_empty());
    }

    #[tokio::test]
    async fn a_channel_someone_waits_on_is_not_unsubscribed() {
        let waiters: Waiters = Arc::default();
        let mut waiting = waiters::register(&waiters, "ch", None);
        let mut unsubscribed = false;
        unsubscribe_idle(&waiters, "ch", async { unsubscribed = true }).await;
        assert!(!unsubscribed);
        let senders = waiters.lock().expect("lock").remove("ch").expect("waits");
        for s in senders {
            let _ = s.send("r".to_owned());
        }
        assert_eq!(waiting.next().await.expect("sent"), "r");
    }
}
