//! The beat's guarantees: one lock holder, and never the same slot twice.

use super::{Harness, LONG, SHORT, Waiter, drain, keys};
use crate::backend::{Acquired, LeaderLock, SlotLedger, SlotOutcome, SlotPublish, Use};
use std::time::Duration;

async fn acquire(lock: &mut dyn LeaderLock, value: &str, ttl: Duration) -> Acquired {
    lock.try_acquire(value, ttl).await.expect("acquire")
}

/// Waits until `lock` can be taken with `value` (the holder's TTL ran out).
async fn take_over(h: &dyn Harness, lock: &mut dyn LeaderLock, value: &str) {
    let w = Waiter::new(h, "the lock to expire");
    while acquire(lock, value, LONG).await != Acquired::Yes {
        w.tick().await;
    }
}

pub(crate) async fn leader_lock_is_exclusive(h: &dyn Harness) {
    let b = h.backend();
    let (mut a, mut other) = (b.leader_lock(Use::Loop), b.leader_lock(Use::Loop));
    assert_eq!(acquire(&mut *a, "A", LONG).await, Acquired::Yes);
    let held = acquire(&mut *other, "B", LONG).await;
    assert_eq!(held, Acquired::HeldBy(Some("A".into())));
    assert!(!other.renew("B", LONG).await.expect("renew"), "wrong token");
    assert!(!other.release("B").await.expect("release"), "wrong token");
    assert_eq!(other.holder().await.expect("holder").as_deref(), Some("A"));
    let lease = other.lease().await.expect("lease").expect("held");
    let left = lease.remaining_ms.expect("the lock expires");
    assert!(
        lease.value == "A" && left > 0 && left <= 60_000,
        "{lease:?} (TTL {LONG:?})"
    );
    assert!(a.renew("A", SHORT).await.expect("renew"));
    assert!(a.release("A").await.expect("release"));
    assert_eq!(other.holder().await.expect("holder"), None);
    assert_eq!(other.lease().await.expect("lease"), None);
    assert!(!a.renew("A", LONG).await.expect("renew"), "released");

    // Expiry hands the lock over; the old holder cannot renew it back.
    assert_eq!(acquire(&mut *other, "B", SHORT).await, Acquired::Yes);
    take_over(h, &mut *a, "A2").await;
    assert!(!other.renew("B", LONG).await.expect("renew"), "lost");
    assert_eq!(other.holder().await.expect("holder").as_deref(), Some("A2"));
}

/// Publishes slot `slot_ms` of entry `e` (queue `bq`) holding `lock_value`.
async fn publish(
    ledger: &mut dyn SlotLedger,
    lock_value: &str,
    slot_ms: i64,
    margin: Duration,
) -> SlotOutcome {
    let payload = format!("p{slot_ms}");
    let slot = SlotPublish {
        lock_value,
        margin,
        entry: "e",
        queue: "bq",
        slot_ms,
        payload: &payload,
    };
    ledger.publish(slot).await.expect("publish")
}

pub(crate) async fn slots_publish_once_across_handover(h: &dyn Harness) {
    let b = h.backend();
    let (mut lock_a, mut lock_b) = (b.leader_lock(Use::Loop), b.leader_lock(Use::Loop));
    let (mut a, mut other) = (b.slot_ledger(Use::Loop), b.slot_ledger(Use::Loop));
    let m = Duration::from_millis(100);
    let already = |last_ms| SlotOutcome::AlreadyPublished { last_ms };
    assert_eq!(acquire(&mut *lock_a, "A", LONG).await, Acquired::Yes);
    assert_eq!(publish(&mut *a, "A", 1000, m).await, SlotOutcome::Published);
    assert_eq!(publish(&mut *a, "A", 1000, m).await, already(1000));
    assert_eq!(publish(&mut *a, "A", 500, m).await, already(1000));
    let r = publish(&mut *other, "B", 2000, m).await;
    assert_eq!(r, SlotOutcome::NotLeader, "only the holder publishes");
    let r = publish(&mut *a, "A", 2000, LONG * 2).await;
    assert!(matches!(r, SlotOutcome::LeaseTooShort { pttl_ms } if pttl_ms > 0));

    // Handover: the new leader cannot repeat a slot, the old one publishes nothing.
    assert!(lock_a.release("A").await.expect("release"));
    assert_eq!(acquire(&mut *lock_b, "B", SHORT).await, Acquired::Yes);
    assert_eq!(publish(&mut *other, "B", 1000, m).await, already(1000));
    assert_eq!(
        publish(&mut *other, "B", 2000, m).await,
        SlotOutcome::Published
    );
    assert_eq!(publish(&mut *a, "A", 3000, m).await, SlotOutcome::NotLeader);
    take_over(h, &mut *lock_a, "A2").await;
    let r = publish(&mut *other, "B", 3000, m).await;
    assert_eq!(
        r,
        SlotOutcome::NotLeader,
        "an expired leader publishes nothing"
    );
    assert_eq!(publish(&mut *a, "A2", 2000, m).await, already(2000));
    let last = a.last_slots(&["e", "never"]).await.expect("last");
    assert_eq!(last, [Some(2000), None]);
    assert_eq!(drain(&*b, "w", &keys(&["bq"])).await, ["p1000", "p2000"]);
}
