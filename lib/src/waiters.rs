//! Waiters registered by key (a result channel, a task id), each woken once
//! through a oneshot by the reader of a subscription connection (Redis
//! `SUBSCRIBE`, PostgreSQL `LISTEN`).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use tokio::sync::{mpsc, oneshot};

/// The waiters of one connection, by key.
pub(crate) type Waiters<T> = Arc<Mutex<HashMap<String, Vec<oneshot::Sender<T>>>>>;

/// Registers a waiter on `key`. `on_idle` is told the key when the last
/// waiter on it is gone (to unsubscribe it).
pub(crate) fn register<T>(
    waiters: &Waiters<T>,
    key: &str,
    on_idle: Option<mpsc::UnboundedSender<String>>,
) -> Interest<T> {
    let (tx, rx) = oneshot::channel();
    if let Ok(mut m) = waiters.lock() {
        m.entry(key.to_owned()).or_default().push(tx);
    }
    Interest {
        rx,
        waiters: Arc::clone(waiters),
        key: key.to_owned(),
        on_idle,
    }
}

/// One waiter's interest in a key. Dropping it ends the interest, also when
/// its waiter is cancelled midway (a caller's timeout, a failed send beside
/// it), so no waiter, and no subscription, is left behind.
#[derive(Debug)]
pub(crate) struct Interest<T> {
    rx: oneshot::Receiver<T>,
    waiters: Waiters<T>,
    key: String,
    on_idle: Option<mpsc::UnboundedSender<String>>,
}

impl<T> Interest<T> {
    /// The next value sent to this waiter; an error when its connection
    /// was lost (the reader dropped every sender).
    pub(crate) async fn next(&mut self) -> Result<T, oneshot::error::RecvError> {
        (&mut self.rx).await
    }
}

impl<T> Drop for Interest<T> {
    fn drop(&mut self) {
        // Closed first, so this waiter's sender counts as gone below.
        self.rx.close();
        let key = &self.key;
        let idle = self.waiters.lock().is_ok_and(|mut m| {
            if let Some(v) = m.get_mut(key) {
                v.retain(|s| !s.is_closed());
                if v.is_empty() {
                    m.remove(key);
                }
            }
            !m.contains_key(key)
        });
        if idle && let Some(tell) = &self.on_idle {
            let _ = tell.send(std::mem::take(&mut self.key));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_dropped_interest_leaves_no_waiter_and_reports_its_key_idle_once() {
        let waiters: Waiters<u8> = Arc::default();
        let (tell, mut told) = mpsc::unbounded_channel();
        let mut first = register(&waiters, "k", Some(tell.clone()));
        let second = register(&waiters, "k", Some(tell));
        drop(second);
        assert!(told.try_recv().is_err(), "a waiter is left on k");
        let sent = waiters
            .lock()
            .expect("lock")
            .remove("k")
            .expect("first waits");
        for s in sent {
            let _ = s.send(7);
        }
        assert_eq!(first.next().await.expect("sent"), 7);
        drop(first);
        assert_eq!(told.try_recv().expect("idle"), "k");
        assert!(waiters.lock().expect("lock").is_empty());
    }

    #[tokio::test]
    async fn a_cancelled_wait_removes_its_waiter() {
        let waiters: Waiters<()> = Arc::default();
        let mut interest = register(&waiters, "k", None);
        let waited =
            tokio::time::timeout(std::time::Duration::from_millis(10), interest.next()).await;
        assert!(waited.is_err());
        drop(interest);
        assert!(waiters.lock().expect("lock").is_empty());
    }
}
