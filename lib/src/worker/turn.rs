//! A message's place in line for a concurrency slot.
//!
//! Each message a worker takes runs in a task of its own, but the runtime
//! does not poll new tasks in the order they were spawned (the last one
//! spawned often runs first), so tasks that asked the slot semaphore for
//! themselves started in no set order: with `concurrency` below `prefetch`,
//! a queue's messages (and Redis's priority buckets) were not served in
//! order. The dispatch loop therefore queues every message at the
//! semaphore, which is first in, first out, before it spawns the message's
//! task, in the order the messages were taken.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, Waker};
use tokio::sync::{AcquireError, OwnedSemaphorePermit, Semaphore};

type Acquire = Pin<Box<dyn Future<Output = Result<OwnedSemaphorePermit, AcquireError>> + Send>>;

/// A slot already held, or a queued request for one. Dropping it gives the
/// slot back, or leaves the line.
pub(crate) enum Turn {
    Now(OwnedSemaphorePermit),
    Queued(Acquire),
    /// The semaphore was closed.
    Closed,
}

impl Turn {
    /// Takes a free slot, or queues for one behind every earlier request.
    /// Call it in the order the messages should start.
    pub fn queue(slots: &Arc<Semaphore>) -> Self {
        // A free permit is only free when nobody waits: released permits
        // go to waiters first, so this does not jump the line.
        if let Ok(p) = Arc::clone(slots).try_acquire_owned() {
            return Self::Now(p);
        }
        let mut acquire: Acquire = Box::pin(Arc::clone(slots).acquire_owned());
        // The first poll puts the request in the semaphore's queue; the
        // message's task polls it again with its own waker.
        match acquire
            .as_mut()
            .poll(&mut Context::from_waker(Waker::noop()))
        {
            Poll::Ready(Ok(p)) => Self::Now(p),
            Poll::Ready(Err(_)) => Self::Closed,
            Poll::Pending => Self::Queued(acquire),
        }
    }

    /// Waits for the slot; `None` when the semaphore was closed.
    pub async fn wait(self) -> Option<OwnedSemaphorePermit> {
        match self {
            Self::Now(p) => Some(p),
            Self::Queued(acquire) => acquire.await.ok(),
            Self::Closed => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn slots_are_granted_in_the_order_turns_were_queued() {
        let slots = Arc::new(Semaphore::new(1));
        let first = Turn::queue(&slots);
        assert!(matches!(first, Turn::Now(_)));
        let turns: Vec<Turn> = (0..32).map(|_| Turn::queue(&slots)).collect();
        assert!(turns.iter().all(|t| matches!(t, Turn::Queued(_))));
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        let mut tasks = tokio::task::JoinSet::new();
        // Spawned in order; the runtime polls them in any order.
        for (i, t) in turns.into_iter().enumerate() {
            let tx = tx.clone();
            tasks.spawn(async move {
                let p = t.wait().await.expect("open");
                tx.send(i).expect("receiver");
                tokio::task::yield_now().await;
                drop(p);
            });
        }
        drop(tx);
        tokio::task::yield_now().await;
        drop(first);
        let mut order = Vec::new();
        while let Some(i) = rx.recv().await {
            order.push(i);
        }
        assert_eq!(order, (0..32).collect::<Vec<_>>());
        while tasks.join_next().await.is_some() {}
    }

    #[tokio::test]
    async fn a_dropped_turn_leaves_the_line_and_gives_its_slot_back() {
        let slots = Arc::new(Semaphore::new(1));
        let held = Turn::queue(&slots);
        let skipped = Turn::queue(&slots);
        let next = Turn::queue(&slots);
        drop(held);
        // The released slot went to `skipped`, which gives it on.
        drop(skipped);
        let p = next.wait().await.expect("open");
        assert_eq!(slots.available_permits(), 0);
        drop(p);
        assert_eq!(slots.available_permits(), 1);
        slots.close();
        assert!(Turn::queue(&slots).wait().await.is_none());
    }
}
